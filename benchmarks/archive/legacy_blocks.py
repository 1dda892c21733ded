"""Architecture version 3's block (``liquid_diffusion`` up to format 3), kept for the ablation tables of BENCHMARKS.md
section 3: ``benchmarks/variants.py`` builds every design of versions 1-3 from these parts.

``V3UNet`` is the package's U-Net skeleton (stem, stages, ``OutputHead``, ``FilterSkip``) with these blocks, built
in the same order as version 3 built them, so a seed gives the same initial weights as the runs in the tables (on
``legacy_v6.V6UNet``: blocks that embed t themselves).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from benchmarks import legacy_v6
from benchmarks.legacy_v6 import V6UNet
from liquid_diffusion.blocks import AdaLN


class ParallelCfC(legacy_v6.ParallelCfC):
    """Version 3's CfC cell: the package's gating and relaxation, with its own features and another relaxation.

    With ``u = backbone(features)`` (depthwise 7x7 -> 1x1 -> SiLU) and 1x1 heads f, g, h::

        gate  = sigmoid(time_a(t_emb) * f(u) - time_b(t_emb));  out = gate * g(u) + (1 - gate) * h(u)
        alpha = exp(-lambda * tau(t_emb))
        y     = alpha * x + (1 - alpha) * out          # relaxes towards out itself (version 4: towards x + out)

    ``tau_init = 0.15``: alpha starts at exp(-0.15) ~ 0.86, so the stream passes a stack of cells nearly unchanged
    at initialisation (alpha_0 = exp(-1) trained worse than the plain-conv ablation; BENCHMARKS.md).
    """

    def __init__(self, channels: int, embed_dim: int, tau_min: float = 0.05, tau_init: float = 0.15):
        # built before the heads, as version 3 did, so that a seed draws the same initial weights
        backbone = nn.Sequential(
            nn.Conv2d(channels, channels, 7, padding=3, groups=channels),
            nn.Conv2d(channels, channels, 1),
            nn.SiLU(),
        )
        super().__init__(channels, embed_dim, tau_min, tau_init)
        self.backbone = backbone

    def forward(self, x: torch.Tensor, features: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        out = self.interpolation(self.backbone(features), t_emb)
        alpha = self.relaxation(t_emb)
        return out + alpha * (x - out)  # = alpha * x + (1 - alpha) * out


class ResidualConv(nn.Module):
    """Ablation of ``ParallelCfC`` (``liquid=False``): the same depthwise-7x7 + 1x1 backbone and a conv head of the
    same width, but no gate, no interpolation and no relaxation: ``y = x + W_out(SiLU(W_in(backbone(features))))``
    with ``W_in: C -> 2C`` and ``W_out: 2C -> C`` (4C^2 weights, as the CfC's 1x1 + three heads).

    Args:
        channels: feature channels C.
        embed_dim: unused; kept so both cells share a signature.
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(channels, channels, 7, padding=3, groups=channels),
            nn.Conv2d(channels, 2 * channels, 1),
            nn.SiLU(),
            nn.Conv2d(2 * channels, channels, 1),
        )

    def forward(self, x: torch.Tensor, features: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return x + self.backbone(features)


class MultiScaleSpatialMix(nn.Module):
    """Attention replacement: parallel depthwise 3x3, 5x5, 7x7 convs and a global-average-pool branch, fused by 1x1.

    ``mix(x) = W_proj [dw3(x) ; dw5(x) ; dw7(x) ; broadcast(W_g mean_hw(x))]`` where ``;`` is channel
    concatenation and ``W_proj: 4C -> C`` is zero-initialised (the residual branch starts switched off).

    Args:
        channels: feature channels C.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.dw3 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.dw5 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.dw7 = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.global_proj = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(4 * channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.global_proj(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
        return self.proj(torch.cat([self.dw3(x), self.dw5(x), self.dw7(x), pooled], dim=1))


class FeedForward(nn.Module):
    """Channel MLP: ``ff(x) = W_2 SiLU(W_1 x)`` with 1x1 convs ``C -> mult*C -> C``; ``W_2`` zero-initialised.

    Args:
        channels: feature channels C.
        mult: hidden expansion.
    """

    def __init__(self, channels: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, mult * channels, 1), nn.SiLU(), nn.Conv2d(mult * channels, channels, 1)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LiquidDiffusionBlock(nn.Module):
    """One liquid block::

        x = ParallelCfC(x, AdaLN_1(x, t_emb), t_emb)       # liquid gating + relaxation (its own residual)
        x = x + MultiScaleSpatialMix(AdaLN_2(x, t_emb))    # attention-free spatial mixing
        x = x + FeedForward(AdaLN_3(x, t_emb))             # channel MLP

    Args:
        channels: feature channels C.
        embed_dim: width of ``t_emb``.
        ff_mult: FeedForward expansion.
        liquid: ``False`` swaps ``ParallelCfC`` for the ``ResidualConv`` ablation.
    """

    def __init__(self, channels: int, embed_dim: int, ff_mult: int = 4, liquid: bool = True):
        super().__init__()
        self.norm_cfc = AdaLN(channels, embed_dim)
        self.cfc = (ParallelCfC if liquid else ResidualConv)(channels, embed_dim)
        self.norm_mix = AdaLN(channels, embed_dim)
        self.mix = MultiScaleSpatialMix(channels)
        self.norm_ff = AdaLN(channels, embed_dim)
        self.ff = FeedForward(channels, ff_mult)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.cfc(x, self.norm_cfc(x, t_emb), t_emb)
        x = x + self.mix(self.norm_mix(x, t_emb))
        return x + self.ff(self.norm_ff(x, t_emb))


class V3UNet(V6UNet):
    """``LiquidDiffusionUNet`` with version 3's ``LiquidDiffusionBlock`` (call it with version 3's shape keywords,
    ``V3_PRESETS``)."""

    block_class = LiquidDiffusionBlock

    def __init__(self, *, widths, decoder_widths=None, **kwargs):
        super().__init__(widths=widths, decoder_widths=decoder_widths or tuple(widths), **kwargs)  # decoder as wide


V3_PRESETS: dict[str, dict] = {
    "micro": dict(widths=(32, 64, 128), depths=(1, 1, 1), bottleneck_depth=1, ff_mult=4),
    "tiny": dict(widths=(96, 192, 384), depths=(1, 1, 1), bottleneck_depth=2, ff_mult=4),
    "small": dict(widths=(96, 192, 384), depths=(2, 3, 6), bottleneck_depth=2, ff_mult=4),
    "base": dict(widths=(128, 256, 512), depths=(2, 4, 8), bottleneck_depth=2, ff_mult=4),
}
