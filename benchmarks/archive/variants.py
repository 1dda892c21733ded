"""Designs screened for issue 11 (BENCHMARKS.md section 3, ablation tables): the model ``liquid-<preset>@NAME``.

Every variant is the package's U-Net skeleton of a preset (``LiquidDiffusionUNet``, or ``V3UNet`` with version 3's
blocks) with named parts swapped, so that every row of the ablation tables is reproducible by one command:

* ``seed``: the model issue 11 started from (architecture version 1): stem ``conv3x3 -> SiLU -> conv3x3``, head
  ``GroupNorm -> SiLU -> conv3x3`` without t, GroupNorm inside every AdaLN.
* ``head``: version 2's linear stem and t-modulated head (``OutputHead``), still with GroupNorm AdaLNs.
* ``v2``: architecture version 2 (+ per-position LayerNorm in every AdaLN; no ``FilterSkip``).
* ``v3``: architecture version 3 (+ ``FilterSkip``, and tiny 96/192/384 x 1/1/1; its blocks are in
  ``legacy_blocks.py``); ``deep*``: version 3's parts in tiny's version-2 shape (64/128/256 x 2/2/4). Every design
  of version 2 or earlier builds tiny in that old shape. Versions 1-3 are built as they were, so a seed gives the
  same initial weights as the runs in the tables.
* ``package``: the package as it is (version 7); ``dico``: version 4's design as it was first screened (lean
  ``LiquidConvBlock``s with a per-position LayerNorm in version 3's skeleton and DiCo's shape, tiny 96/192/384 x
  4/4/2 with no separate bottleneck): the same equations as the package, other initial weights for a seed.
* suffixes: ``-ablation`` (``liquid=False``), ``-resrelax`` (``y = x + (1 - alpha) CfC``; ``-zero``: g and h
  zero-initialised), ``-silu`` (SiLU before every modulation, as DiT), ``-gated`` (adaLN-Zero gates on the mix and
  feed-forward branches), ``-inskip`` (a per-channel t-dependent skip from x_t to v), ``-k9`` (FilterSkip with 8
  9x9 filters), ``-cfchead`` (the CfC interpolation between the U-Net and the FilterSkip), ``-hires`` (one more
  block per full-resolution stage), ``-strip`` (1x31 and 31x1 depthwise strips in the mix), ``-scan`` (a liquid
  leaky-integrator scan along rows and columns in the mix), ``-freq256`` (256 sinusoid features), ``-patch2``
  (DiT's patch-2 stem and head: the U-Net runs at half resolution), ``-w2`` (widths doubled), ``-w1.25`` (widths
  x 1.25: tiny at DiT-S/2's parameter count).
* ``conv-*``: the DiCo-style ``LiquidConvBlock`` (branch ``issue-11-convblock``), in the seed's skeleton.
* ``v4*``: version 4 (``v4``) and the fifth round's screens built on it (``v4-dec2x-d2-e2`` is version 5's design).
* ``v5-*``: the sixth round, on version 5: ``-cfcff`` (the CfC cell as the channel MLP, a liquid GLU), ``-ff4`` (a
  4x MLP at full resolution), ``-skipcfc`` (CfC skip fusions), ``-pos`` (fixed Fourier position features in the
  stem).
* ``v6``: version 6, the same function as the package (version 7) with five linear maps of t_emb in every block;
  ``v7-from-v6``: the package starting from version 6's initial weights. Versions 4-6 are built from
  ``legacy_v6.py``'s blocks, as those versions built them.
"""
from __future__ import annotations

import functools
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import common
from benchmarks.legacy_blocks import V3_PRESETS, LiquidDiffusionBlock, MultiScaleSpatialMix, ParallelCfC, V3UNet
from benchmarks import legacy_v6 as v4  # versions 4-6's parts (the package's until version 7), for their variants
from benchmarks.legacy_v6 import V6UNet
from liquid_diffusion.blocks import AdaLN, FilterSkip, OutputHead, TimestepEmbedder, normalise_channels
from liquid_diffusion.model import PRESETS, LiquidDiffusionUNet

# ------------------------------------------------------------------------------------------------ swapped parts


def _num_groups(channels: int) -> int:
    """Largest of 32, 16, 8, 4, 2, 1 that divides ``channels`` (GroupNorm needs a divisor)."""
    for groups in (32, 16, 8, 4, 2, 1):
        if channels % groups == 0:
            return groups
    return 1


class GroupAdaLN(AdaLN):
    """AdaLN as architecture version 1 had it: ``GroupNorm(x) * (1 + scale) + shift`` (statistics per image)."""

    def __init__(self, channels, embed_dim):
        super().__init__(channels, embed_dim)
        self.norm = nn.GroupNorm(_num_groups(channels), channels, affine=False, eps=1e-6)

    def forward(self, x, t_emb):
        scale, shift = self.modulation(t_emb)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class Format1Head(nn.Sequential):
    """The seed's head: ``conv3x3(SiLU(GroupNorm(x)))``, not modulated by t (zero-init conv)."""

    def __init__(self, channels, out_channels):
        super().__init__(nn.GroupNorm(_num_groups(channels), channels, eps=1e-6), nn.SiLU(),
                         nn.Conv2d(channels, out_channels, 3, padding=1))
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)

    def forward(self, x, t_emb=None):
        return super().forward(x)


class SiLUHead(OutputHead):
    """``conv3x3(SiLU(AdaLN(x, t_emb)))``: the t-modulated head with the seed's SiLU kept."""

    def forward(self, x, t_emb):
        return self.conv(F.silu(self.norm(x, t_emb)))


class PatchHead(nn.Module):
    """``v = unpatchify(W AdaLN(x, t_emb))``: DiT's final layer, each feature vector giving a p x p patch (zero-init)."""

    def __init__(self, channels, embed_dim, out_channels, patch):
        super().__init__()
        self.norm = AdaLN(channels, embed_dim)
        self.proj = nn.Conv2d(channels, out_channels * patch * patch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.patch = patch

    def forward(self, x, t_emb):
        return F.pixel_shuffle(self.proj(self.norm(x, t_emb)), self.patch)


class ResidualRelaxCfC(ParallelCfC):
    """The cell with ``input = x`` and ``out = x + CfC``: ``y = x + (1 - alpha) * CfC`` (no stream shrink)."""

    def forward(self, x, features, t_emb):
        return x + (1 - self.relaxation(t_emb)) * self.interpolation(self.backbone(features), t_emb)


class NoSkip(nn.Module):
    """Architecture version 2 had no ``FilterSkip``: ``skip(x_t, t_emb) = 0``."""

    def forward(self, sample, t_emb):
        return 0


class ZeroResidualRelaxCfC(ResidualRelaxCfC):
    """``ResidualRelaxCfC`` with the g and h heads zero-initialised: every cell starts as the identity (adaLN-Zero's
    rule), where the package's cell starts by replacing 1 - alpha_0 = 14 % of the stream with random features."""

    def __init__(self, channels, embed_dim):
        super().__init__(channels, embed_dim)
        with torch.no_grad():
            self.heads.weight[channels:].zero_()
            self.heads.bias[channels:].zero_()


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
        return types.SimpleNamespace(sample=out + self.skip(self.t_emb)[:, :, None, None] * sample)


class CfCFilterHead(nn.Module):
    """The CfC interpolation at the output, between the network and the linear filter skip::

        g, f  = net(x_t, t)                                   # the U-Net's head gives 2C channels
        h     = sum_k a_k(t_emb) * (K_k * x_t)                 # FilterSkip's t-dependent linear filter
        gate  = sigmoid(time_a(t_emb) * f - time_b(t_emb))
        v     = gate * g + (1 - gate) * h

    The gate decides per pixel where the linear (Wiener-like) estimate holds (flat regions) and where the network's
    nonlinear one must take over (edges); an additive skip can only add the two.
    """

    def __init__(self, net):
        super().__init__()
        self.net, self.t_emb = net, None
        net.time_embedder.register_forward_hook(lambda mod, inp, out: setattr(self, "t_emb", out))
        width, embed_dim, c = net.config.widths[0], net.time_embedder.mlp.linear_2.out_features, net.config.in_channels
        self.skip, net.input_skip = net.input_skip, NoSkip()
        net.head = OutputHead(width, embed_dim, 2 * c)
        self.time_ab = nn.Linear(embed_dim, 2 * c)
        nn.init.zeros_(self.time_ab.weight)
        with torch.no_grad():
            self.time_ab.bias.copy_(torch.cat([torch.ones(c), torch.zeros(c)]))

    def forward(self, sample, timestep):
        g, f = self.net(sample, timestep).sample.chunk(2, dim=1)
        linear = self.skip(sample, self.t_emb)
        time_a, time_b = self.time_ab(self.t_emb)[:, :, None, None].chunk(2, dim=1)
        gate = torch.sigmoid(time_a * f - time_b)
        return types.SimpleNamespace(sample=linear + gate * (g - linear))


class StripSpatialMix(MultiScaleSpatialMix):
    """``MultiScaleSpatialMix`` with two long depthwise strips added: ``W_proj [dw3 ; dw5 ; dw7 ; pool ; dw_1xK ;
    dw_Kx1]`` (zero-init ``W_proj``): a K-pixel reach along rows and columns, e.g. a long edge, at 2K MACs per pixel."""

    def __init__(self, channels, strip=31):
        super().__init__(channels)
        c = channels
        self.strip_h = nn.Conv2d(c, c, (1, strip), padding=(0, strip // 2), groups=c)
        self.strip_v = nn.Conv2d(c, c, (strip, 1), padding=(strip // 2, 0), groups=c)
        self.proj = nn.Conv2d(6 * c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        pooled = self.global_proj(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
        return self.proj(torch.cat([self.dw3(x), self.dw5(x), self.dw7(x), pooled, self.strip_h(x), self.strip_v(x)],
                                   dim=1))


def _linear_scan(log_a, c, dim):
    """``h_i = a_i h_(i-1) + c_i`` along ``dim`` in parallel: ``h = A * cumsum(c / A)`` with ``A = cumprod(a)``, in
    log space (log a >= -1, so 1 / A stays below e^L: fine in fp32 for rows up to ~80 positions)."""
    log_cum = torch.cumsum(log_a, dim)
    return torch.exp(log_cum) * torch.cumsum(c * torch.exp(-log_cum), dim)


def _scan_both_ways(log_a, c, dim):
    """The forward scan plus the scan run from the other end."""
    backward = _linear_scan(log_a.flip(dim), c.flip(dim), dim).flip(dim)
    return _linear_scan(log_a, c, dim) + backward


class LiquidScanMix(MultiScaleSpatialMix):
    """``MultiScaleSpatialMix`` plus a liquid scan branch: an input-dependent leaky integrator (an LTC neuron's
    exponential relaxation) run both ways along rows, then both ways along columns, so every position sees the whole
    feature map with a content-dependent reach::

        a = exp(-min(softplus(W_d x), 1)),  c = (1 - a) * W_v x          # per position and channel
        r = scan_row(a, c) + scan_row_reversed(a, c)                     # h_i = a_i h_(i-1) + c_i
        s = scan_col(a, (1 - a) r) + scan_col_reversed(a, (1 - a) r)
        mix(x) = W_proj [dw3 ; dw5 ; dw7 ; pool ; s]                      # W_proj zero-initialised
    """

    def __init__(self, channels):
        super().__init__(channels)
        self.scan_in = nn.Conv2d(channels, 2 * channels, 1)  # W_v, W_d
        self.proj = nn.Conv2d(5 * channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def scan(self, x):
        v, d = self.scan_in(x).float().chunk(2, dim=1)
        log_a = -F.softplus(d).clamp(max=1.0)
        gain = -torch.expm1(log_a)  # 1 - a
        rows = _scan_both_ways(log_a, gain * v, 3)
        return _scan_both_ways(log_a, gain * rows, 2).to(x.dtype)

    def forward(self, x):
        pooled = self.global_proj(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
        return self.proj(torch.cat([self.dw3(x), self.dw5(x), self.dw7(x), pooled, self.scan(x)], dim=1))


def _gated_forward(self, x, t_emb):
    """LiquidDiffusionBlock.forward with DiT's adaLN-Zero gates on the mix and feed-forward branches."""
    x = self.cfc(x, self.norm_cfc(x, t_emb), t_emb)
    g_mix, g_ff = self.gates(t_emb)[:, :, None, None].chunk(2, dim=1)
    x = x + g_mix * self.mix(self.norm_mix(x, t_emb))
    return x + g_ff * self.ff(self.norm_ff(x, t_emb))


def _replace_modules(model, cls, make):
    """Replaces every submodule of type ``cls`` (exactly) by ``make(old)``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is cls:
                setattr(parent, name, make(child))


# ------------------------------------------------------------------------------------------------ DiCo-style block


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
                 tau_min=0.05, tau_init=0.5, norm="gn"):
        super().__init__()
        c, hid = channels, hidden_mult * channels
        self.liquid, self.cca = liquid, cca
        make_norm = (lambda: nn.GroupNorm(_num_groups(c), c, affine=False, eps=1e-6)) if norm == "gn" else (
            lambda: ChannelLayerNorm())
        self.norm1, self.norm2 = make_norm(), make_norm()
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


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at every position, no affine (the norm inside the package's ``AdaLN``)."""

    def forward(self, x):
        return normalise_channels(x)


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


def _conv(additive=False, **kw):
    def make(preset, c):
        model = _swap_blocks(_model(preset, c, norm="gn", skeleton="v1", skip=False, tiny_shape="v2"),
                             lambda ch, e: LiquidConvBlock(ch, e, **kw))
        if additive:
            model.fusions = nn.ModuleList(AdditiveSkip(f.proj.out_channels) for f in model.fusions)
        return model
    return make


def _dico(shape, **kw):
    """Lean ``LiquidConvBlock``s (per-position LayerNorm) in the package's version-3 skeleton (linear stem,
    ``OutputHead``, ``FilterSkip``) and in DiCo's deep shape: many light blocks, most of them at the two higher
    resolutions, instead of a few heavy ones. ``shape`` gives tiny's widths / depths / bottleneck; micro keeps its
    widths and takes the depths."""
    def make(preset, c):
        config = dict(V3_PRESETS[preset])
        config.update(shape if preset == "tiny" else {k: v for k, v in shape.items() if k != "widths"})
        model = V3UNet(in_channels=c, **config)
        return _swap_blocks(model, lambda ch, e: LiquidConvBlock(ch, e, norm="ln", **kw))
    return make


DICO_SHAPE = dict(widths=(96, 192, 384), depths=(4, 4, 2), bottleneck_depth=0)


# ------------------------------------------------------------------------------------------------ fifth round (v4)


class WideContextCfC(v4.ParallelCfC):
    """The CfC cell choosing, per position, channel and t, between a local and a wide view of the mixed features::

        f, g, h_pre = W u;  h = dw_k(h_pre)                  # g sees u's 3x3 reach, h a k x k neighbourhood of it
        gate = sigmoid(time_a * f - time_b);  out = gate * g + (1 - gate) * h

    (selective-kernel style: flat regions can take the wide, smoothed view, edges the local one, and the balance can
    move with the noise level). The relaxation is the package's.
    """

    def __init__(self, channels, embed_dim, kernel=7):
        super().__init__(channels, embed_dim)
        self.h_spatial = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)

    def interpolation(self, u, t_emb):
        f, g, h = self.heads(u).chunk(3, dim=1)
        time_a, time_b = self.time_ab(t_emb)[:, :, None, None].chunk(2, dim=1)
        gate = torch.sigmoid(time_a * f - time_b)
        h = self.h_spatial(h)
        return h + gate * (g - h)


class CfCSkipFusion(nn.Module):
    """A U-Net skip fusion by the CfC interpolation, time-gated between the encoder's features and the decoder's::

        f, g, h = W [x ; skip]   (1x1, 2C -> 3 C_out)
        gate = sigmoid(time_a(t_emb) * f - time_b(t_emb));  y = gate * g + (1 - gate) * h

    (version 4's ``SkipFusion`` is ``W [x ; skip]``, 2C -> C).
    """

    def __init__(self, channels, out_channels, embed_dim):
        super().__init__()
        self.heads = nn.Conv2d(2 * channels, 3 * out_channels, 1)
        self.time_ab = nn.Linear(embed_dim, 2 * out_channels)
        nn.init.zeros_(self.time_ab.weight)
        with torch.no_grad():
            self.time_ab.bias.copy_(torch.cat([torch.ones(out_channels), torch.zeros(out_channels)]))
        self.t_emb = None  # set by the model's forward pre-hook

    def forward(self, x, skip):
        f, g, h = self.heads(torch.cat([x, skip], dim=1)).chunk(3, dim=1)
        time_a, time_b = self.time_ab(self.t_emb)[:, :, None, None].chunk(2, dim=1)
        return h + torch.sigmoid(time_a * f - time_b) * (g - h)


def _remember_t_emb(model, fusions):
    """Skip fusions take no t_emb in the package's forward: hand it over through a hook on the time embedder."""
    def hook(module, args, output):
        for fusion in fusions:
            fusion.t_emb = output
    model.time_embedder.register_forward_hook(hook)


class WideningFusion(v4.SkipFusion):
    """``y = W [x ; skip]`` with ``W: 2C -> C_out`` (DiCo's full-resolution decoder is twice as wide as its encoder)."""

    def __init__(self, channels, out_channels):
        super().__init__(channels)
        self.proj = nn.Conv2d(2 * channels, out_channels, 1)


# Architecture version 4's presets: the decoder as wide as the encoder.
V4_PRESETS = {
    "micro": dict(widths=(32, 64, 128), depths=(2, 2, 2), decoder_widths=(32, 64, 128)),
    "tiny": dict(widths=(96, 192, 384), depths=(4, 4, 2), decoder_widths=(96, 192, 384)),
    "small": dict(widths=(128, 256, 512), depths=(6, 6, 4), decoder_widths=(128, 256, 512)),
    "base": dict(widths=(192, 384, 768), depths=(8, 8, 3), decoder_widths=(192, 384, 768)),
}


def _xavier(model):
    """DiT's and DiCo's initialisation: xavier-uniform weights and zero biases for every conv and linear map of the
    U-Net that is not zero-initialised on purpose (the gates, modulations and head stay zero; the time embedder keeps
    diffusers' init)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not name.startswith("time_embedder"):
            if module.weight.abs().sum() > 0:
                if isinstance(module, nn.Conv2d) and module.groups > 1:  # depthwise: as a linear map of its taps
                    nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                else:
                    nn.init.xavier_uniform_(module.weight.flatten(1) if module.weight.ndim > 2 else module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def _v4(cell=None, skipcfc=False, liquid=True, ff_mult_full_res=None, decoder_full_res=None, depths=None,
        xavier=False):
    """The package (version 4) with named parts swapped. ``decoder_full_res=(width, depth)`` rebuilds the
    full-resolution decoder stage (and the head) at that width and depth, as DiCo's 2x-wide last stage."""
    def make(preset, c):
        config = dict(V4_PRESETS[preset])
        if depths and preset == "tiny":
            config["depths"] = depths
        model = V6UNet(in_channels=c, liquid=liquid, **config)
        embed_dim = model.time_embedder.mlp.linear_2.out_features
        if decoder_full_res:
            width0 = model.config.widths[0]
            width, depth = decoder_full_res
            width = width if preset == "tiny" else 2 * width0
            model.fusions[0] = WideningFusion(width0, width)
            model.decoder[0] = nn.ModuleList(model.block_class(width, embed_dim, model.config.ff_mult, liquid)
                                             for _ in range(depth))
            model.head = v4.OutputHead(width, embed_dim, model.head.conv.out_channels)
        if xavier:
            _xavier(model)
        if ff_mult_full_res:  # more channel-MLP capacity per pixel at full resolution only
            for block in (*model.encoder[0], *model.decoder[0]):
                block.ff = v4.FeedForward(block.norm_ff.channels, ff_mult_full_res)
        if cell is not None and liquid:
            _replace_modules(model, v4.ParallelCfC, lambda old: cell(old.rho.numel(), embed_dim))
        if skipcfc and liquid:
            model.fusions = nn.ModuleList(CfCSkipFusion(f.proj.out_channels, f.proj.out_channels, embed_dim)
                                          for f in model.fusions)
            _remember_t_emb(model, model.fusions)
        return model
    return make

# ------------------------------------------------------------------------------------------------ sixth round (v5)


class CfCFeedForward(nn.Module):
    """The CfC cell as the block's channel MLP, a gated linear unit with the liquid relaxation as its residual gate::

        f, g, h = W_fgh z                      (1x1, C -> 3 x hidden)
        gate    = sigmoid(time_a(t_emb) * f - time_b(t_emb))
        out     = W_2 (gate * g + (1 - gate) * h)           (1x1, hidden -> C)
        y       = x + (1 - alpha(t_emb)) * out              (alpha as the package's ``ParallelCfC``)

    With h = 0 the interpolation is a sigmoid GLU, which trains better than a GELU MLP at equal parameters in
    transformers (Shazeer 2020); its ``liquid=False`` ablation is the package's GELU ``FeedForward``.
    """

    def __init__(self, channels, embed_dim, hidden):
        super().__init__()
        self.heads = nn.Conv2d(channels, 3 * hidden, 1)
        self.w_2 = nn.Conv2d(hidden, channels, 1)
        self.relax = v4.ParallelCfC(channels, embed_dim)  # only its time_tau and rho are used: alpha(t_emb)
        del self.relax.heads, self.relax.time_ab
        self.time_ab = nn.Linear(embed_dim, 2 * hidden)
        nn.init.zeros_(self.time_ab.weight)
        with torch.no_grad():
            self.time_ab.bias.copy_(torch.cat([torch.ones(hidden), torch.zeros(hidden)]))

    def forward(self, x, z, t_emb):
        f, g, h = self.heads(z).chunk(3, dim=1)
        time_a, time_b = self.time_ab(t_emb)[:, :, None, None].chunk(2, dim=1)
        out = self.w_2(h + torch.sigmoid(time_a * f - time_b) * (g - h))
        return x + (1 - self.relax.relaxation(t_emb)) * out


class LiquidFeedForwardBlock(nn.Module):
    """Version 5's block with the CfC cell moved from the mix branch into the channel MLP::

        x = x + gate(t_emb) * W_o SpatialMix(AdaLN_1(x, t_emb))      # the ablation's mix branch (adaLN-Zero)
        x = CfCFeedForward(x, AdaLN_2(x, t_emb), t_emb)              # hidden 1.5 C: the block keeps 9 C^2 weights

    ``liquid=False`` gives exactly the package's ablation block (``GatedProjection`` and the gated GELU MLP).
    """

    def __init__(self, channels, embed_dim, ff_mult=2, liquid=True, hidden_mult=1.5):
        super().__init__()
        self.norm_mix = AdaLN(channels, embed_dim)
        self.mix = v4.SpatialMix(channels)
        self.proj = v4.GatedProjection(channels, embed_dim)
        self.norm_ff = AdaLN(channels, embed_dim)
        self.ff = CfCFeedForward(channels, embed_dim, int(hidden_mult * channels))

    def forward(self, x, t_emb):
        x = self.proj(x, self.mix(self.norm_mix(x, t_emb)), t_emb)
        return self.ff(x, self.norm_ff(x, t_emb), t_emb)


class PositionStem(nn.Module):
    """The stem plus where each pixel is: ``stem(x_t) + W p(y, x)``, the package's ``PositionEmbedder`` (version 6)
    wrapped around version 5's stem, built after the rest of the model as the package builds it."""

    def __init__(self, stem, n_freqs=4):
        super().__init__()
        self.stem = stem
        self.position = v4.PositionEmbedder(n_freqs, stem.out_channels)

    def features(self, height, width, like):
        return self.position.features(height, width, like.device).to(like.dtype)

    def forward(self, sample):
        return self.stem(sample) + self.position(sample)


class EdgeAwareScan(nn.Module):
    """Attention-free non-local averaging: a liquid recursive filter with a content-dependent time constant, run
    both ways along rows, then both ways along columns (the domain transform's edge-aware recursive filter, Gastal
    and Oliveira 2011, with a learned decay)::

        v, d = W z                           (1x1, C -> 2C)
        a    = exp(-softplus(d))             (per position and channel: a -> 1 averages on, a -> 0 stops at an edge)
        r    = scan_rows(a, (1 - a) v)       (h_i = a_i h_(i-1) + (1 - a_i) v_i, forward plus backward)
        out  = W_o scan_cols(a, (1 - a) r)   (W_o zero-initialised)

    Flat regions of a nearly clean image can then average their noise away over their whole extent, which is what
    DiT-S/2's attention can do and a stack of 3x3 convolutions cannot.
    """

    def __init__(self, channels):
        super().__init__()
        self.w_in = nn.Conv2d(channels, 2 * channels, 1)
        self.w_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.w_out.weight)
        nn.init.zeros_(self.w_out.bias)

    @staticmethod
    def scan(log_a, c, dim):
        # h = A cumsum(c / A) with A = cumprod(a): 1 / A stays below e^80 in fp32 when log a >= -80 / length
        log_a = log_a.clamp(min=-80.0 / log_a.shape[dim])
        return _scan_both_ways(log_a, (-torch.expm1(log_a)) * c, dim)

    def forward(self, z):
        v, d = self.w_in(z).float().chunk(2, dim=1)
        log_a = -F.softplus(d)
        rows = self.scan(log_a, v, 3)
        return self.w_out(self.scan(log_a, rows, 2).to(z.dtype))


class ScanBlock(v4.LiquidDiffusionBlock):
    """The package's block with an ``EdgeAwareScan`` beside its ``SpatialMix``:
    ``u = SpatialMix(z) + EdgeAwareScan(z)``, ``z = AdaLN_1(x, t_emb)``; the rest as the package's."""

    def forward(self, x, t_emb):
        z = self.norm_mix(x, t_emb)
        x = self.cfc(x, self.mix(z) + self.scan(z), t_emb)
        return x + self.ff_gate(t_emb)[:, :, None, None] * self.ff(self.norm_ff(x, t_emb))


def _v5(block=None, liquid=True, ff_mult_full_res=None, skipcfc=False, position=False, scan_full_res=False):
    """Version 5 (the package without its position embedder) with named parts swapped: its liquid blocks by
    ``block`` (the ablation stays the package's), a wider channel MLP in the full-resolution blocks, CfC skip fusions
    (``CfCSkipFusion``), position features (``PositionStem``: ``v5-pos`` is version 6, weight for weight)."""
    def make(preset, c):
        cls = V6UNet if block is None or not liquid else type("VariantUNet", (V6UNet,), {"block_class": block})
        model = cls(in_channels=c, liquid=liquid, **{**PRESETS[preset], "position_frequencies": 0})
        if ff_mult_full_res:
            for block_ in (*model.encoder[0], *model.decoder[0]):
                block_.ff = v4.FeedForward(block_.norm_ff.channels, ff_mult_full_res)
        if position:
            model.stem = PositionStem(model.stem)
        if scan_full_res:
            for block_ in (*model.encoder[0], *model.decoder[0]):
                block_.__class__ = ScanBlock
                block_.scan = EdgeAwareScan(block_.norm_mix.channels)
        if skipcfc and liquid:
            embed_dim = model.time_embedder.mlp.linear_2.out_features
            model.fusions = nn.ModuleList(CfCSkipFusion(w, dw, embed_dim)
                                          for w, dw in zip(model.config.widths, model.decoder_widths))
            _remember_t_emb(model, model.fusions)
        return model
    return make


# ------------------------------------------------------------------------------------------------ the builder


def _model(preset, c, *, norm="ln", skeleton="v2", liquid=True, cell=None, silu=False, gated=False, inskip=False,
           freq=None, patch=None, width_mult=1, filterskip=None, cfchead=False, depths=None, strip=None, skip=True,
           scan=False, tiny_shape="v3"):
    """The package's model of ``preset`` (``in_channels=c``) with the parts the keywords name swapped."""
    config = dict(V3_PRESETS[preset])
    if preset == "tiny" and tiny_shape == "v2":  # tiny's shape up to version 3: deeper and narrower
        config.update(TINY_V2_SHAPE)
    config["widths"] = tuple(int(w * width_mult) for w in config["widths"])
    if depths:
        config["depths"] = depths(config["depths"])
    model = V3UNet(in_channels=c, liquid=liquid, **config)
    width, embed_dim = model.config.widths[0], model.time_embedder.mlp.linear_2.out_features
    if skeleton == "v1":
        model.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        model.head = Format1Head(width, c)
    elif skeleton == "v1-stem":  # the seed's stem with the t-modulated head
        model.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
    if silu == "head":
        model.head = SiLUHead(width, embed_dim, c)
    if patch:
        model.stem = nn.Conv2d(c, width, patch, stride=patch)
        model.head = PatchHead(width, embed_dim, c, patch)
    if norm == "gn":
        _replace_modules(model, AdaLN, lambda old: GroupAdaLN(old.channels, embed_dim))
    if strip:
        _replace_modules(model, MultiScaleSpatialMix, lambda old: StripSpatialMix(old.proj.out_channels, strip))
    if scan:
        _replace_modules(model, MultiScaleSpatialMix, lambda old: LiquidScanMix(old.proj.out_channels))
    if cell is not None:
        _replace_modules(model, ParallelCfC, lambda old: cell(old.rho.numel(), embed_dim))
    if silu is True:
        model.time_embedder = nn.Sequential(model.time_embedder, nn.SiLU())
    if freq:
        model.time_embedder = TimestepEmbedder(freq, embed_dim)
    if gated:
        for block in (m for m in model.modules() if isinstance(m, LiquidDiffusionBlock)):
            block.gates = nn.Linear(embed_dim, 2 * block.norm_mix.channels)
            nn.init.zeros_(block.gates.weight)
            nn.init.zeros_(block.gates.bias)
            for proj in (block.mix.proj, block.ff.net[-1]):  # a zero gate on a zero branch would never learn
                proj.reset_parameters()
            block.forward = types.MethodType(_gated_forward, block)
    if not skip:
        model.input_skip = NoSkip()
    elif filterskip:
        model.input_skip = FilterSkip(c, c, embed_dim, **filterskip)
    if cfchead:
        return CfCFilterHead(model)
    return InputSkip(model) if inskip else model


TINY_V2_SHAPE = dict(widths=(64, 128, 256), depths=(2, 2, 4), bottleneck_depth=2)


def _one_more_full_res_block(depths):
    return (depths[0] + 1,) + tuple(depths[1:])


def _v(**kw):
    return functools.partial(_model, **kw)


def _v2(**kw):
    """A design of version 2 or earlier: no FilterSkip, and tiny in its old shape."""
    return functools.partial(_model, skip=False, tiny_shape="v2", **kw)


def _package(liquid=True):
    return lambda preset, c: LiquidDiffusionUNet.from_preset(preset, in_channels=c, liquid=liquid)


def _v6(liquid=True, as_package=False):
    """Version 6; ``as_package``: the package (version 7) starting from version 6's initial weights for the seed."""
    def make(preset, c):
        model = V6UNet(in_channels=c, liquid=liquid, **PRESETS[preset])
        if not as_package:
            return model
        package = LiquidDiffusionUNet.from_preset(preset, in_channels=c, liquid=liquid)
        package.load_state_dict(model.state_dict())
        return package
    return make


VARIANTS: dict = {
    # the package as it is (version 7)
    "package": _package(),
    "package-ablation": _package(liquid=False),
    # version 1 and what was tried on it
    "seed": _v2(norm="gn", skeleton="v1"),
    "seed-ablation": _v2(norm="gn", skeleton="v1", liquid=False),
    "seed-resrelax": _v2(norm="gn", skeleton="v1", cell=ResidualRelaxCfC),
    "seed-adahead": _v2(norm="gn", skeleton="v1-stem"),
    "seed-adahead-silu": _v2(norm="gn", skeleton="v1-stem", silu="head"),
    # the linear stem and t-modulated head, GroupNorm
    "head": _v2(norm="gn"),
    "head-ablation": _v2(norm="gn", liquid=False),
    "head-resrelax": _v2(norm="gn", cell=ResidualRelaxCfC),
    "head-silu": _v2(norm="gn", silu=True),
    "head-patch2": _v2(norm="gn", patch=2),
    "head-patch2-w2": _v2(norm="gn", patch=2, width_mult=2),
    # version 2 (+ per-position LayerNorm) and what was tried on it
    "v2": _v2(),
    "v2-ablation": _v2(liquid=False),
    "v2-resrelax": _v2(cell=ResidualRelaxCfC),
    "v2-gated": _v2(gated=True),
    "v2-inskip": _v2(inskip=True),
    "v2-freq256": _v2(freq=256),
    # version 3 (+ FilterSkip, tiny 96/192/384 x 1/1/1) and what was tried on it
    "v3": _v(),
    "v3-ablation": _v(liquid=False),
    "v3-k9": _v(filterskip=dict(n_filters=8, kernel=9)),
    "v3-gated": _v(gated=True),
    "v3-gated-k9": _v(gated=True, filterskip=dict(n_filters=8, kernel=9)),
    "v3-hires": _v(depths=_one_more_full_res_block),
    "v3-strip": _v(strip=31),
    "v3-resrelax": _v(cell=ResidualRelaxCfC),
    "v3-resrelax-zero": _v(cell=ZeroResidualRelaxCfC),
    "v3-scan": _v(scan=True),
    "v3-cfchead": _v(cfchead=True),
    "v3-cfchead-ablation": _v(liquid=False, cfchead=True),
    "v3-w1.25": _v(width_mult=1.25),  # DiT-S/2's parameter count (a diagnostic, not a preset)
    # tiny (--liquid-preset tiny) in its version-2 shape, 64/128/256 x 2/2/4, with the version-3 parts
    "deep": _v(tiny_shape="v2"),
    "deep-ablation": _v(tiny_shape="v2", liquid=False),
    "deep-hires": _v(tiny_shape="v2", depths=_one_more_full_res_block),
    "deep-resrelax": _v(tiny_shape="v2", cell=ResidualRelaxCfC),
    "deep-resrelax-zero": _v(tiny_shape="v2", cell=ZeroResidualRelaxCfC),
    # the DiCo-style block in the seed's skeleton
    "conv-k3": _conv(kernel=3),
    "conv-k5": _conv(kernel=5),
    "conv-k7": _conv(kernel=7),
    "conv-k5-h2": _conv(kernel=5, hidden_mult=2),  # = branch issue-11-convblock's package block (format 2)
    "conv-k7-h2": _conv(kernel=7, hidden_mult=2),
    "conv-k5-nocca": _conv(kernel=5, cca=False),
    "conv-k5-ablation": _conv(kernel=5, liquid=False),
    "conv-k5-addskip": _conv(kernel=5, additive=True),
    # DiCo's shape and lean blocks in the version-3 skeleton (fourth round; the package's version 4 is this design)
    "dico": _dico(DICO_SHAPE, kernel=3, ff_mult=2),
    "dico-ablation": _dico(DICO_SHAPE, kernel=3, ff_mult=2, liquid=False),
    "dico-k7": _dico(DICO_SHAPE, kernel=7, ff_mult=2),
    # version 4 (the package before version 5), and the fifth round's designs built on it
    "v4": _v4(),
    "v4-ablation": _v4(liquid=False),
    "v4-wide": _v4(cell=WideContextCfC),
    "v4-wide-ablation": _v4(liquid=False),
    "v4-skipcfc": _v4(skipcfc=True),
    "v4-skipcfc-ablation": _v4(liquid=False),
    "v4-dec2x": _v4(decoder_full_res=(192, 4)),
    "v4-dec2x-d2": _v4(decoder_full_res=(192, 2)),
    "v4-dec2x-d2-e2": _v4(decoder_full_res=(192, 2), depths=(2, 4, 2)),
    "v4-dec2x-d2-e2-ablation": _v4(liquid=False, decoder_full_res=(192, 2), depths=(2, 4, 2)),
    "v4-dec2x-d2-e3": _v4(decoder_full_res=(192, 2), depths=(3, 4, 2)),
    "v4-xavier": _v4(xavier=True),
    "v4-xavier-ablation": _v4(liquid=False, xavier=True),
    "v4-ff4": _v4(ff_mult_full_res=4),
    "v4-ff4-ablation": _v4(liquid=False, ff_mult_full_res=4),
    # sixth round, on version 5
    "v5-cfcff": _v5(block=LiquidFeedForwardBlock),
    "v5-cfcff-ablation": _v5(block=LiquidFeedForwardBlock, liquid=False),  # = package-ablation
    "v5-ff4": _v5(ff_mult_full_res=4),
    "v5-ff4-ablation": _v5(ff_mult_full_res=4, liquid=False),
    "v5-skipcfc": _v5(skipcfc=True),
    "v5-skipcfc-ablation": _v5(skipcfc=True, liquid=False),  # = package-ablation
    "v5": _v5(),
    "v5-ablation": _v5(liquid=False),
    "v5-pos": _v5(position=True),
    "v5-pos-ablation": _v5(position=True, liquid=False),
    "v5-pos-cfcff": _v5(block=LiquidFeedForwardBlock, position=True),
    "v5-scan": _v5(scan_full_res=True),
    "v5-scan-ablation": _v5(scan_full_res=True, liquid=False),
    # version 6: the package's function, each block embedding t itself
    "v6": _v6(),
    "v6-ablation": _v6(liquid=False),
    "v7-from-v6": _v6(as_package=True),  # the package, from version 6's initial weights: the same run as "v6"
}


def build(name: str, preset: str, in_channels: int) -> common.VelocityModel:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    return common.VelocityModel(VARIANTS[name](preset, in_channels), "liquid")
