"""Architecture version 3's block (``liquid_diffusion`` up to format 3), kept for the ablation tables of BENCHMARKS.md
section 3: ``benchmarks/variants.py`` builds every design of versions 1-3 from these parts.

``V3UNet`` is the package's U-Net skeleton (stem, stages, ``OutputHead``, ``FilterSkip``) with these blocks, built
in the same order as version 3 built them, so a seed gives the same initial weights as the runs in the tables.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from liquid_diffusion.blocks import AdaLN
from liquid_diffusion.model import LiquidDiffusionUNet


class ParallelCfC(nn.Module):
    """Closed-form continuous-time (CfC, Hasani et al. 2022, Eq. 10) cell made spatial and fully parallel.

    With ``u = backbone(features)`` (depthwise 7x7 -> 1x1 -> SiLU) and 1x1 heads f, g, h::

        gate  = sigmoid(time_a(t_emb) * f(u) - time_b(t_emb))     # liquid time-gating
        out   = gate * g(u) + (1 - gate) * h(u)                    # CfC interpolation
        tau   = tau_min + softplus(time_tau(t_emb))                # time scale, learned from t_emb
        alpha = exp(-lambda * tau),  lambda = softplus(rho) >= 0   # liquid relaxation, rho learned per channel
        y     = alpha * x + (1 - alpha) * out                      # time-aware residual

    ``tau`` is deliberately *not* the flow time t itself: with tau = t, alpha -> 1 as t -> 0 and the cell becomes
    the identity on nearly clean inputs, exactly where fine detail is decided. Here tau is a learned, positive
    function of ``t_emb`` that starts at the same value ``tau_init`` for every t, and the network learns per channel
    and per t how much to relax.

    ``tau_init = 0.15`` makes alpha start at exp(-0.15) ~ 0.86 at every noise level: the residual stream passes
    through a stack of cells nearly unchanged at initialisation, as in a residual network (alpha_0 = exp(-1)
    trained worse than the plain-conv ablation; BENCHMARKS.md has the numbers).

    All operations are elementwise or convolutions, so ``torch.compile`` can fuse the gating and the cell
    works in ``channels_last``.

    Args:
        channels: feature channels C.
        embed_dim: width of ``t_emb``.
        tau_min: lower bound of the time scale, keeps alpha < 1 whenever lambda > 0.
        tau_init: the time scale at initialisation, the same for every t.
    """

    def __init__(self, channels: int, embed_dim: int, tau_min: float = 0.05, tau_init: float = 0.15):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(channels, channels, 7, padding=3, groups=channels),
            nn.Conv2d(channels, channels, 1),
            nn.SiLU(),
        )
        self.heads = nn.Conv2d(channels, 3 * channels, 1)  # f, g, h in one matmul
        self.time_ab = nn.Linear(embed_dim, 2 * channels)  # time_a, time_b
        self.time_tau = nn.Linear(embed_dim, channels)
        self.rho = nn.Parameter(torch.full((channels,), math.log(math.e - 1)))  # softplus(rho) = 1
        self.tau_min = tau_min
        # time_a = 1, time_b = 0 at init: the gate starts as sigmoid(f(u)), the same for every t.
        nn.init.zeros_(self.time_ab.weight)
        with torch.no_grad():
            self.time_ab.bias.copy_(torch.cat([torch.ones(channels), torch.zeros(channels)]))
        # tau_min + softplus(bias) = tau_init at init, for every t.
        nn.init.zeros_(self.time_tau.weight)
        nn.init.constant_(self.time_tau.bias, math.log(math.expm1(tau_init - tau_min)))

    def relaxation(self, t_emb: torch.Tensor) -> torch.Tensor:
        """alpha = exp(-lambda * tau(t_emb)), shape [B, C, 1, 1]."""
        tau = self.tau_min + F.softplus(self.time_tau(t_emb))
        return torch.exp(-F.softplus(self.rho) * tau)[:, :, None, None]

    def forward(self, x: torch.Tensor, features: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        f, g, h = self.heads(self.backbone(features)).chunk(3, dim=1)
        time_a, time_b = self.time_ab(t_emb)[:, :, None, None].chunk(2, dim=1)
        gate = torch.sigmoid(time_a * f - time_b)
        out = h + gate * (g - h)  # = gate * g + (1 - gate) * h
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


class V3UNet(LiquidDiffusionUNet):
    """``LiquidDiffusionUNet`` with version 3's ``LiquidDiffusionBlock`` (call it with version 3's shape keywords,
    ``V3_PRESETS``)."""

    block_class = LiquidDiffusionBlock


V3_PRESETS: dict[str, dict] = {
    "micro": dict(widths=(32, 64, 128), depths=(1, 1, 1), bottleneck_depth=1, ff_mult=4),
    "tiny": dict(widths=(96, 192, 384), depths=(1, 1, 1), bottleneck_depth=2, ff_mult=4),
    "small": dict(widths=(96, 192, 384), depths=(2, 3, 6), bottleneck_depth=2, ff_mult=4),
    "base": dict(widths=(128, 256, 512), depths=(2, 4, 8), bottleneck_depth=2, ff_mult=4),
}
