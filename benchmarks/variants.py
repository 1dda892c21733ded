"""Block designs screened for issue 11 (see BENCHMARKS.md, ablation table); ``quality.py --liquid-variant NAME``.

Each variant builds a ``LiquidDiffusionUNet`` of a preset and swaps its blocks (and, where named, its skip fusions)
for another design of the same widths, so that every row of the ablation table is reproducible by one command.
``seed`` is the package's block (format 1, which issue 11 kept; the study ran on commit 81db8dd's model), and
``package`` the same by its other name. ``conv-*`` is the DiCo-style ``LiquidConvBlock``.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import common
from liquid_diffusion.model import LiquidDiffusionBlock, TimestepEmbedder, LiquidDiffusionUNet, ParallelCfC, _num_groups


# ---- variants of the package's block (format 1, kept by issue 11)


class ResidualRelaxCfC(ParallelCfC):
    """The seed's cell with ``input = x`` and ``out = x + CfC``: ``y = x + (1 - alpha) * CfC`` (no stream shrink)."""

    def forward(self, x, features, t_emb):
        f, g, h = self.heads(self.backbone(features)).chunk(3, dim=1)
        time_a, time_b = self.time_ab(t_emb)[:, :, None, None].chunk(2, dim=1)
        gate = torch.sigmoid(time_a * f - time_b)
        return x + (1 - self.relaxation(t_emb)) * (h + gate * (g - h))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at each position (affine-free), as DiT's and DiCo's norms; replaces AdaLN's GroupNorm."""

    def __init__(self, channels):
        super().__init__()
        self.num_channels = channels

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-6)


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


class Format1Head(nn.Sequential):
    """The format-1 model's head: ``conv3x3(SiLU(GroupNorm(x)))``, not modulated by t (zero-init conv)."""

    def __init__(self, channels, out_channels):
        super().__init__(nn.GroupNorm(_num_groups(channels), channels, eps=1e-6), nn.SiLU(),
                         nn.Conv2d(channels, out_channels, 3, padding=1))
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)

    def forward(self, x, t_emb=None):
        return super().forward(x)


def format1(model):
    """Gives a format-2 model the seed's (format 1) stem ``conv3x3 -> SiLU -> conv3x3`` and un-modulated head."""
    w, c = model.config.widths[0], model.config.in_channels
    model.stem = nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1))
    model.head = Format1Head(w, model.config.out_channels or c)
    return model


def _seed(cell_cls=None, liquid=True, fmt1=True):
    """The seed's model, format 1 (``liquid=False``: its ablation); ``cell_cls`` swaps the CfC cell of every block.

    ``fmt1=False``: the package's model (format 2: single-conv stem, t-modulated head) with the same changes.
    """
    def make(preset, c):
        model = LiquidDiffusionUNet.from_preset(preset, in_channels=c, liquid=liquid)
        model = format1(model) if fmt1 else model
        if cell_cls is not None:
            for m in model.modules():
                if isinstance(m, LiquidDiffusionBlock):
                    m.cfc = cell_cls(m.norm_cfc.norm.num_channels, model.time_embedder.mlp.linear_2.out_features)
        return model
    return make


def _patched(base, silu_emb=False, channel_ln=False):
    """``base`` (a variant) with DiT's ``SiLU`` before every modulation and/or a per-position channel LayerNorm."""
    def make(preset, c):
        model = base(preset, c)
        if silu_emb:
            model.time_embedder = nn.Sequential(model.time_embedder, nn.SiLU())
        if channel_ln:
            for m in model.modules():
                if hasattr(m, "norm") and isinstance(m.norm, nn.GroupNorm) and not m.norm.affine:
                    m.norm = ChannelLayerNorm(m.norm.num_channels)
        return model
    return make


class AdaLNHead(nn.Module):
    """DiT's final layer on a feature map: ``v = conv3x3(GN(x) * (1 + scale(t_emb)) + shift(t_emb))``, all zero-init.

    The model calls ``head(x)`` without ``t_emb``; a forward hook on the time embedder hands it over (benchmark only).
    """

    def __init__(self, channels, embed_dim, out_channels, silu=False):
        super().__init__()
        self.norm = nn.GroupNorm(_num_groups(channels), channels, affine=False, eps=1e-6)
        self.modulation = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.silu = silu
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.t_emb = None

    def forward(self, x, t_emb=None):
        scale, shift = self.modulation(self.t_emb if t_emb is None else t_emb)[:, :, None, None].chunk(2, dim=1)
        x = self.norm(x) * (1 + scale) + shift
        return self.conv(F.silu(x) if self.silu else x)


def _with_head(base, silu=False, linear_stem=False):
    """``base`` with a t-modulated head (``AdaLNHead``) and/or a single-conv stem (no SiLU between two convs)."""
    def make(preset, c):
        model = base(preset, c)
        width, embed_dim = model.config.widths[0], model.time_embedder.mlp.linear_2.out_features
        head = AdaLNHead(width, embed_dim, model.config.out_channels or c, silu=silu)
        model.head = head
        model.time_embedder.register_forward_hook(lambda mod, inp, out: setattr(head, "t_emb", out))
        if linear_stem:
            model.stem = nn.Conv2d(c, width, 3, padding=1)
        return model
    return make


class InputSkip(nn.Module):
    """``v = net(x_t, t) + s(t_emb) * x_t``: a per-channel, t-dependent linear skip from input to output (zero-init),
    so the part of v that is linear in x_t (v = (x_t - x0) / t) needs no path through the U-Net's nonlinearities."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        embed_dim, c = net.time_embedder.mlp.linear_2.out_features, net.config.in_channels
        self.skip = nn.Linear(embed_dim, c)
        nn.init.zeros_(self.skip.weight)
        nn.init.zeros_(self.skip.bias)
        self.t_emb = None
        net.time_embedder.register_forward_hook(lambda mod, inp, out: setattr(self, "t_emb", out))

    def forward(self, sample, timestep):
        out = self.net(sample, timestep).sample
        return type("Out", (), {"sample": out + self.skip(self.t_emb)[:, :, None, None] * sample})()


def _gated_forward(self, x, t_emb):
    """LiquidDiffusionBlock.forward with DiT's adaLN-Zero gates on the mix and feed-forward branches."""
    x = self.cfc(x, self.norm_cfc(x, t_emb), t_emb)
    g_mix, g_ff = self.gates(t_emb)[:, :, None, None].chunk(2, dim=1)
    x = x + g_mix * self.mix(self.norm_mix(x, t_emb))
    return x + g_ff * self.ff(self.norm_ff(x, t_emb))


def _package(freq_dim=None, gated=False, input_skip=False):
    """The package's model with a wider sinusoid (``freq_dim``), adaLN-Zero branch gates, and/or ``InputSkip``."""
    def make(preset, c):
        model = LiquidDiffusionUNet.from_preset(preset, in_channels=c)
        embed_dim = model.time_embedder.mlp.linear_2.out_features
        if freq_dim:
            model.time_embedder = TimestepEmbedder(freq_dim, embed_dim)
        if gated:
            for block in (m for m in model.modules() if isinstance(m, LiquidDiffusionBlock)):
                width = block.norm_mix.norm.num_channels
                block.gates = nn.Linear(embed_dim, 2 * width)
                nn.init.zeros_(block.gates.weight)
                nn.init.zeros_(block.gates.bias)
                for proj in (block.mix.proj, block.ff.net[-1]):  # a zero gate on a zero branch would never learn
                    proj.reset_parameters()
                block.forward = types.MethodType(_gated_forward, block)
        return InputSkip(model) if input_skip else model
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
    "seed-silu": _patched(_seed(), silu_emb=True),
    "seed-ln": _patched(_seed(), channel_ln=True),
    "seed-resrelax-silu": _patched(_seed(ResidualRelaxCfC), silu_emb=True),
    "seed-adahead": _with_head(_seed()),
    "seed-adahead-silu": _with_head(_seed(), silu=True),
    "seed-linstem": _with_head(_seed(), linear_stem=True),
    "seed-inskip": lambda preset, c: InputSkip(_seed()(preset, c)),
    "seed-inskip-adahead": lambda preset, c: InputSkip(_with_head(_seed())(preset, c)),
    "package-resrelax": _seed(ResidualRelaxCfC, fmt1=False),
    "package-silu": _patched(_seed(fmt1=False), silu_emb=True),
    "package-ln": _patched(_seed(fmt1=False), channel_ln=True),
    "package-freq256": _package(freq_dim=256),
    "package-gated": _package(gated=True),
    "package-inskip": _package(input_skip=True),
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
