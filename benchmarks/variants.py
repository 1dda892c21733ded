"""Block designs screened for issue 11 (see BENCHMARKS.md, ablation table); ``quality.py --liquid-variant NAME``.

Each variant builds a ``LiquidDiffusionUNet`` of a preset and swaps its blocks (and, where named, its skip fusions)
for another design of the same widths, so that every row of the ablation table is reproducible by one command.
``seed`` is a verbatim copy of the package's block as of issue 11 (so it stays reproducible if the package's block
changes); ``package`` is whatever the installed package builds. ``conv-*`` is the DiCo-style ``LiquidConvBlock``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from liquid_diffusion.model import LiquidDiffusionUNet, _num_groups


# ---- the seed design (format 1), verbatim from liquid_diffusion/model.py before issue 11


class SeedAdaLN(nn.Module):
    """Adaptive GroupNorm: ``y = GroupNorm(x) * (1 + scale(t_emb)) + shift(t_emb)``.

    The modulation is zero-initialised (as in DiT's adaLN-Zero), so at initialisation it is a plain
    affine-free normalisation.

    Args:
        channels: feature channels C.
        embed_dim: width of ``t_emb``.
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(_num_groups(channels), channels, affine=False, eps=1e-6)
        self.modulation = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(t_emb)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class SeedCfC(nn.Module):
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
    through a stack of cells nearly unchanged at initialisation, as in a residual network. Measured (benchmarks/
    quality.py, 150 steps): held-out loss 0.384 with alpha_0 ~ 0.86 against 0.439 with alpha_0 = exp(-1) ~ 0.37,
    which shrank the stream by 0.37 per block and trained worse than the plain-conv ablation (0.416).

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


class SeedResidualConv(nn.Module):
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


class SeedFeedForward(nn.Module):
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


# ----------------------------------------------------------------------------------------------------------------
# 3. Model
# ----------------------------------------------------------------------------------------------------------------


class SeedBlock(nn.Module):
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
        self.norm_cfc = SeedAdaLN(channels, embed_dim)
        self.cfc = (SeedCfC if liquid else SeedResidualConv)(channels, embed_dim)
        self.norm_mix = SeedAdaLN(channels, embed_dim)
        self.mix = MultiScaleSpatialMix(channels)
        self.norm_ff = SeedAdaLN(channels, embed_dim)
        self.ff = SeedFeedForward(channels, ff_mult)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.cfc(x, self.norm_cfc(x, t_emb), t_emb)
        x = x + self.mix(self.norm_mix(x, t_emb))
        return x + self.ff(self.norm_ff(x, t_emb))



class ResidualRelaxCfC(SeedCfC):
    """The seed's cell with ``input = x`` and ``out = x + CfC``: ``y = x + (1 - alpha) * CfC`` (no stream shrink)."""

    def forward(self, x, features, t_emb):
        f, g, h = self.heads(self.backbone(features)).chunk(3, dim=1)
        time_a, time_b = self.time_ab(t_emb)[:, :, None, None].chunk(2, dim=1)
        gate = torch.sigmoid(time_a * f - time_b)
        return x + (1 - self.relaxation(t_emb)) * (h + gate * (g - h))


class LiquidConvBlock(nn.Module):
    """DiCo-style liquid block: one GroupNorm per branch, one depthwise conv, channel gate, CfC head, gated FF.

        n   = GN(x) * (1 + s1) + b1
        u   = GELU(dw_k(W_in n));  u = u * sigmoid(W_c mean_hw(u))          # compact channel attention
        f, g, h = W_fgh u
        gate = sigmoid(time_a * f - time_b);  out = gate * g + (1 - gate) * h
        alpha = exp(-lambda * tau(t_emb));   x = alpha * x + (1 - alpha) * (x + out)   (= x + (1 - alpha) * out)
        x   = x + g2 * FF(GN(x) * (1 + s2) + b2)                              # adaLN-Zero gated channel MLP
    """

    def __init__(self, channels, embed_dim, kernel=3, hidden_mult=1, ff_mult=4, liquid=True, cca=True,
                 tau_min=0.05, tau_init=0.5):
        super().__init__()
        c, hid = channels, hidden_mult * channels
        self.liquid, self.cca = liquid, cca
        self.norm1 = nn.GroupNorm(_num_groups(c), c, affine=False, eps=1e-6)
        self.norm2 = nn.GroupNorm(_num_groups(c), c, affine=False, eps=1e-6)
        self.modulation = nn.Linear(embed_dim, 5 * c)  # s1, b1, s2, b2, g2
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.w_in = nn.Conv2d(c, hid, 1)
        self.dw = nn.Conv2d(hid, hid, kernel, padding=kernel // 2, groups=hid)
        if cca:
            self.w_c = nn.Conv2d(hid, hid, 1)
        if liquid:
            self.heads = nn.Conv2d(hid, 3 * c, 1)
            self.time_ab = nn.Linear(embed_dim, 2 * c)
            nn.init.zeros_(self.time_ab.weight)
            with torch.no_grad():
                self.time_ab.bias.copy_(torch.cat([torch.ones(c), torch.zeros(c)]))
            self.time_tau = nn.Linear(embed_dim, c)
            nn.init.zeros_(self.time_tau.weight)
            nn.init.constant_(self.time_tau.bias, math.log(math.expm1(tau_init - tau_min)))
            self.rho = nn.Parameter(torch.full((c,), math.log(math.e - 1)))
            self.tau_min = tau_min
        else:  # ablation: a plain 1x1 out projection gated adaLN-Zero style
            self.w_out = nn.Conv2d(hid, c, 1)
            self.gate1 = nn.Linear(embed_dim, c)
            nn.init.zeros_(self.gate1.weight)
            nn.init.zeros_(self.gate1.bias)
        self.ff = nn.Sequential(nn.Conv2d(c, ff_mult * c, 1), nn.GELU(), nn.Conv2d(ff_mult * c, c, 1))

    def relaxation(self, t_emb):
        tau = self.tau_min + F.softplus(self.time_tau(t_emb))
        return torch.exp(-F.softplus(self.rho) * tau)[:, :, None, None]

    def forward(self, x, t_emb):
        s1, b1, s2, b2, g2 = self.modulation(t_emb)[:, :, None, None].chunk(5, dim=1)
        u = F.gelu(self.dw(self.w_in(self.norm1(x) * (1 + s1) + b1)))
        if self.cca:
            u = u * torch.sigmoid(self.w_c(u.mean(dim=(2, 3), keepdim=True)))
        if self.liquid:
            f, g, h = self.heads(u).chunk(3, dim=1)
            time_a, time_b = self.time_ab(t_emb)[:, :, None, None].chunk(2, dim=1)
            gate = torch.sigmoid(time_a * f - time_b)
            x = x + (1 - self.relaxation(t_emb)) * (h + gate * (g - h))
        else:
            x = x + self.gate1(t_emb)[:, :, None, None] * self.w_out(u)
        return x + g2 * self.ff(self.norm2(x) * (1 + s2) + b2)


class AdditiveSkip(nn.Module):
    """``y = x + W skip`` (1x1), instead of ``W [x ; skip]``."""

    def __init__(self, channels):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x, skip):
        return x + self.proj(skip)


def _swap_blocks(model, make):
    """Replaces every block of ``model`` by ``make(width, embed_dim)`` (widths from the model's config)."""
    embed_dim, widths = model.time_embedder.mlp.linear_2.out_features, model.config.widths
    for stages, ws in ((model.encoder, widths), ([model.bottleneck], widths[-1:]), (model.decoder, widths)):
        for blocks, w in zip(stages, ws):
            for i in range(len(blocks)):
                blocks[i] = make(w, embed_dim)
    return model


def _seed(cell_cls=None, liquid=True):
    def make(preset, c):
        model = LiquidDiffusionUNet.from_preset(preset, in_channels=c)
        model = _swap_blocks(model, lambda w, e: SeedBlock(w, e, liquid=liquid))
        if cell_cls is not None:
            for m in model.modules():
                if isinstance(m, SeedBlock):
                    m.cfc = cell_cls(m.norm_cfc.norm.num_channels, model.time_embedder.mlp.linear_2.out_features)
        return model
    return make


def _conv(additive=False, **kw):
    def make(preset, c):
        model = _swap_blocks(LiquidDiffusionUNet.from_preset(preset, in_channels=c),
                             lambda ch, e: LiquidConvBlock(ch, e, **kw))
        if additive:
            model.fusions = nn.ModuleList(AdditiveSkip(f.proj.out_channels) for f in model.fusions)
        return model
    return make


VARIANTS: dict = {
    "seed": _seed(),
    "seed-ablation": _seed(liquid=False),
    "seed-resrelax": _seed(ResidualRelaxCfC),
    "package": lambda preset, c: LiquidDiffusionUNet.from_preset(preset, in_channels=c),
    "package-ablation": lambda preset, c: LiquidDiffusionUNet.from_preset(preset, in_channels=c, liquid=False),
    "conv-k3": _conv(kernel=3),
    "conv-k5": _conv(kernel=5),
    "conv-k7": _conv(kernel=7),
    "conv-k5-h2": _conv(kernel=5, hidden_mult=2),  # = branch issue-11-convblock's package block (format 2)
    "conv-k7-h2": _conv(kernel=7, hidden_mult=2),
    "conv-k5-nocca": _conv(kernel=5, cca=False),
    "conv-k5-ablation": _conv(kernel=5, liquid=False),
    "conv-k5-addskip": _conv(kernel=5, additive=True),
}


def build(name: str, preset: str, in_channels: int) -> common.VelocityModel:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    return common.VelocityModel(VARIANTS[name](preset, in_channels), "liquid")
