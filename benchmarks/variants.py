"""Block designs screened for issue 11 (see BENCHMARKS.md, ablation table); ``quality.py --liquid-variant NAME``.

Each variant builds a ``LiquidDiffusionUNet`` of a preset and swaps its blocks (and, where named, its skip fusions)
for another design of the same widths, so that every row of the ablation table is reproducible by one command.
``seed`` is the package's block (format 1, which issue 11 kept; the study ran on commit 81db8dd's model), and
``package`` the same by its other name. ``conv-*`` is the DiCo-style ``LiquidConvBlock``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from liquid_diffusion.model import LiquidDiffusionBlock, LiquidDiffusionUNet, ParallelCfC, _num_groups


# ---- variants of the package's block (format 1, kept by issue 11)


class ResidualRelaxCfC(ParallelCfC):
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
    """The package's block (``liquid=False``: its ablation); ``cell_cls`` swaps the CfC cell of every block."""
    def make(preset, c):
        model = LiquidDiffusionUNet.from_preset(preset, in_channels=c, liquid=liquid)
        if cell_cls is not None:
            for m in model.modules():
                if isinstance(m, LiquidDiffusionBlock):
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
