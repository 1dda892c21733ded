"""The parts of the LiquidDiffusion U-Net, each with the equation it implements (``model.py`` assembles them).

Three sections, read top to bottom:

1. Embedders      -- sinusoidal timestep embedding + MLP (diffusers' ``Timesteps`` / ``TimestepEmbedding``), and the
                     fixed Fourier features of where each pixel is (``PositionEmbedder``).
2. Block parts    -- ``AdaLN``, ``SpatialMix``, ``ParallelCfC`` (and its ``liquid=False`` ablation
                     ``GatedProjection``), ``FeedForward``.
3. U-Net parts    -- ``LiquidDiffusionBlock``, ``BlockModulation`` (every block's t-dependent vectors at once),
                     ``Downsample``, ``Upsample``, ``SkipFusion``, ``OutputHead``, ``FilterSkip``.

Lineage: CfC networks (Hasani et al., Nature MI 2022), LTC networks (AAAI 2021), LiquidTAD (parallel liquid
relaxation), USM and DiffuSSM (attention-free diffusion backbones), DiT (adaLN-Zero, the final layer), DiCo (the
conv module with its channel gate, and the deep U shape of many light blocks).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

# The sinusoid sees t * TIME_SCALE so that its frequencies span the [0, 1] range as they span 0..1000 in DDPM.
TIME_SCALE = 1000.0


# ----------------------------------------------------------------------------------------------------------------
# 1. Embedders
# ----------------------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Maps a flow time t in [0, 1] to a conditioning vector.

    ``t_emb = MLP(sinusoid(1000 * t))`` with ``MLP = Linear -> SiLU -> Linear`` (diffusers' building blocks).

    Args:
        frequency_dim: width of the sinusoidal features.
        embed_dim: width of ``t_emb``.
    """

    def __init__(self, frequency_dim: int, embed_dim: int):
        super().__init__()
        self.sinusoid = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(frequency_dim, embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.sinusoid(t * TIME_SCALE)
        return self.mlp(features.to(self.mlp.linear_1.weight.dtype))


class PositionEmbedder(nn.Module):
    """Tells every pixel where it is: ``W p(y, x)``, added to the stem's output, where ``p`` holds the fixed Fourier
    features of the pixel's normalised coordinates (cell centres in [-1, 1] at any resolution)::

        p = [y, x, sin(pi 2^k y), cos(pi 2^k y), sin(pi 2^k x), cos(pi 2^k x)  for k < frequencies]

    and ``W`` is a zero-initialised 1x1 conv, so a new model starts as one without it. A convolution learns where
    it is only from its zero padding, a few pixels from the border; DiT's fixed sincos embedding tells every token
    (docs/design.md: position features).

    Args:
        frequencies: number of octaves k (2 + 4 * frequencies features).
        width: channels of the stem's output.
    """

    def __init__(self, frequencies: int, width: int):
        super().__init__()
        self.frequencies = frequencies
        self.proj = nn.Conv2d(2 + 4 * frequencies, width, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``p`` of an ``height`` x ``width`` grid, shape [1, 2 + 4 * frequencies, height, width], in float32."""
        y = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=device)[:, None].expand(height, width)
        x = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=device)[None, :].expand(height, width)
        octaves = math.pi * 2.0 ** torch.arange(self.frequencies, device=device, dtype=torch.float32)
        waves = [wave(c[None] * octaves[:, None, None]) for c in (y, x) for wave in (torch.sin, torch.cos)]
        return torch.cat([y[None], x[None], *waves])[None]

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        features = self.features(*sample.shape[2:], sample.device)
        return self.proj(features.to(self.proj.weight.dtype))


# ----------------------------------------------------------------------------------------------------------------
# 2. Block parts
# ----------------------------------------------------------------------------------------------------------------


class AdaLN(nn.Module):
    """Adaptive LayerNorm over channels at every position (DiT's adaLN on a feature map)::

        y = LN_c(x) * (1 + scale(t_emb)) + shift(t_emb),   LN_c(x)[b, :, i, j] = (x - mean_c) / sqrt(var_c + eps)

    Per position, not per image: a GroupNorm's statistics come from the whole feature map, so on nearly clean inputs
    the little noise a position carries stays tiny next to the image; a per-position norm brings it to unit scale,
    where the network can find it (docs/design.md: the per-position norm). The modulation is zero-initialised (as
    DiT's adaLN-Zero), so at initialisation this is a plain affine-free normalisation. The head owns one; the blocks
    get their ``1 + scale`` and ``shift`` from ``BlockModulation`` and apply ``modulate_channels``.

    Args:
        channels: feature channels C.
        embed_dim: width of ``t_emb``.
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.channels = channels
        self.modulation = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(t_emb)[:, :, None, None].chunk(2, dim=1)
        return modulate_channels(x, 1 + scale, shift)


def modulate_channels(x: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN with its vectors given: ``LN_c(x) * gain + shift``, ``gain = 1 + scale`` ([B, C, 1, 1] each)."""
    return normalise_channels(x) * gain + shift


def normalise_channels(x: torch.Tensor) -> torch.Tensor:
    """``LN_c(x)``: zero mean and unit variance over the channels at every position, no affine."""
    # layer_norm normalises the last dim: channels go last as a view (no copy in channels_last memory)
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6).permute(0, 3, 1, 2)


class SpatialMix(nn.Module):
    """The attention replacement (DiCo's conv module): a pointwise conv, a depthwise conv, and a channel gate::

        u = GELU(dw_k(W_in x))
        u = u * sigmoid(W_c mean_hw(u))          # compact channel attention: a global, content-dependent gate

    Local reach comes from the depthwise k x k kernel and the U-Net's resolutions, global context from the gate (no
    softmax over positions anywhere). Light on purpose: the U-Net stacks many of these blocks (docs/design.md: many
    light blocks).

    Args:
        channels: feature channels C.
        kernel: the depthwise kernel size k.
    """

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.w_in = nn.Conv2d(channels, channels, 1)
        self.depthwise = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.channel_gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.gelu(self.depthwise(self.w_in(x)))
        return u * torch.sigmoid(self.channel_gate(u.mean(dim=(2, 3), keepdim=True)))


# The liquid relaxation's time scale: tau >= TAU_MIN keeps alpha < 1 whenever lambda > 0; tau starts at TAU_INIT
# for every t (with lambda = 1, alpha = exp(-TAU_INIT): a part of the cell's update goes in from the first step).
TAU_MIN, TAU_INIT = 0.05, 0.5


def liquid_relaxation(rho: torch.Tensor, tau_logit: torch.Tensor) -> torch.Tensor:
    """The liquid relaxation factor ``alpha = exp(-lambda * tau)`` with ``lambda = softplus(rho) >= 0`` (learned per
    channel) and the time scale ``tau = TAU_MIN + softplus(tau_logit) > 0`` (``tau_logit`` a linear map of t_emb)."""
    return torch.exp(-F.softplus(rho) * (TAU_MIN + F.softplus(tau_logit)))


class ParallelCfC(nn.Module):
    """Closed-form continuous-time (CfC, Hasani et al. 2022, Eq. 10) cell made spatial and fully parallel.

    On the mixed features ``u`` (``SpatialMix``), with 1x1 heads f, g, h::

        gate  = sigmoid(time_a(t_emb) * f(u) - time_b(t_emb))     # liquid time-gating
        out   = gate * g(u) + (1 - gate) * h(u)                    # CfC interpolation
        alpha = exp(-lambda * tau(t_emb))                          # liquid relaxation (``liquid_relaxation``)
        y     = alpha * x + (1 - alpha) * (x + out)                # time-aware residual (= x + (1 - alpha) * out)

    The relaxation's input is the residual stream x and its target ``x + out``, so the stream is never shrunk: the
    relaxation sets, per channel and per t, how much of the cell's update goes in (relaxing towards ``out`` itself
    would replace part of the stream in every block). ``tau`` is deliberately *not* the flow time t: with
    tau = t, alpha -> 1 as t -> 0 and the cell would switch itself off on nearly clean inputs, exactly where fine
    detail is decided. Here tau is a learned, positive function of ``t_emb``.

    The cell holds the heads; its t-dependent vectors ``time_a``, ``time_b`` and ``1 - alpha`` (and lambda's ``rho``)
    live in ``BlockModulation``, which computes them for every block of the network at once. All operations are
    elementwise or 1x1 convolutions: ``torch.compile`` fuses the gating, and the cell works in ``channels_last``.

    Args:
        channels: feature channels C (of x and u).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.heads = nn.Conv2d(channels, 3 * channels, 1)  # f, g, h in one matmul

    def interpolation(self, u: torch.Tensor, time_a: torch.Tensor, time_b: torch.Tensor) -> torch.Tensor:
        """out = gate * g(u) + (1 - gate) * h(u) with gate = sigmoid(time_a * f(u) - time_b)."""
        f, g, h = self.heads(u).chunk(3, dim=1)
        gate = torch.sigmoid(time_a * f - time_b)
        return h + gate * (g - h)

    def forward(
        self, x: torch.Tensor, u: torch.Tensor, time_a: torch.Tensor, time_b: torch.Tensor, update: torch.Tensor
    ) -> torch.Tensor:
        """``x + update * out`` with ``update = 1 - alpha``: the vectors are [B, C, 1, 1]."""
        return x + update * self.interpolation(u, time_a, time_b)  # = alpha x + (1 - alpha) (x + out)


class GatedProjection(nn.Module):
    """Ablation of ``ParallelCfC`` (``liquid=False``): no gate, no interpolation, no relaxation, but DiT's
    adaLN-Zero gate: ``y = x + gate(t_emb) * W_out u`` with ``W_out: C -> C`` (1x1) and ``gate`` a zero-initialised
    linear map of ``t_emb`` (in ``BlockModulation``).

    Args:
        channels: feature channels C.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.w_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, u: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x + gate * self.w_out(u)


class FeedForward(nn.Module):
    """Channel MLP: ``ff(x) = W_2 GELU(W_1 x)`` with 1x1 convs ``C -> mult*C -> C`` (the block gates it).

    Args:
        channels: feature channels C.
        mult: hidden expansion.
    """

    def __init__(self, channels: int, mult: int = 2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, mult * channels, 1), nn.GELU(), nn.Conv2d(mult * channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------------
# 3. U-Net parts
# ----------------------------------------------------------------------------------------------------------------


class LiquidDiffusionBlock(nn.Module):
    """One liquid block::

        u = SpatialMix(LN_c(x) * (1 + scale_mix) + shift_mix)      # AdaLN; pointwise, depthwise 3x3, channel gate
        x = ParallelCfC(x, u; time_a, time_b, alpha)              # CfC gating + liquid relaxation: x + (1-alpha) out
        x = x + gate_ff * FeedForward(LN_c(x) * (1 + scale_ff) + shift_ff)      # channel MLP, adaLN-Zero gate

    The per-channel vectors (``scale_mix`` ... ``gate_ff``, all functions of t_emb alone) come in as one slab
    ``[B, K, C]`` from ``BlockModulation``, in its ``kinds`` order (``1 + scale`` and ``1 - alpha`` already formed).

    Args:
        channels: feature channels C.
        ff_mult: FeedForward expansion.
        liquid: ``False`` swaps ``ParallelCfC`` for the ``GatedProjection`` ablation.
    """

    def __init__(self, channels: int, ff_mult: int = 2, liquid: bool = True):
        super().__init__()
        self.channels = channels
        self.mix = SpatialMix(channels)
        self.cfc = ParallelCfC(channels) if liquid else GatedProjection(channels)
        self.ff = FeedForward(channels, ff_mult)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        gain_mix, shift_mix, *cell, gain_ff, shift_ff, gate_ff = modulation[..., None, None].unbind(1)
        x = self.cfc(x, self.mix(modulate_channels(x, gain_mix, shift_mix)), *cell)
        return x + gate_ff * self.ff(modulate_channels(x, gain_ff, shift_ff))


class BlockModulation(nn.Module):
    """Every block's t-dependent vectors at once: one matmul and one elementwise pass per step for the whole network.

    With N = sum of the blocks' widths C_i, ``W: embed_dim -> K N`` and kinds k (8 for liquid blocks)::

        m[k] = W_k t_emb + b_k                          # [B, N]: block i's channels are m[k][:, n_i : n_i + C_i]
        scale_mix, shift_mix, time_a, time_b, tau_logit, scale_ff, shift_ff, gate_ff = m
        slab_i = [1 + scale_mix, shift_mix, time_a, time_b, 1 - alpha, 1 + scale_ff, shift_ff, gate_ff]_i
        alpha  = liquid_relaxation(rho, tau_logit)      # rho: lambda's parameter, per channel of every block

    and for the ``liquid=False`` ablation ``[1 + scale_mix, shift_mix, gate, 1 + scale_ff, shift_ff, gate_ff]``.

    The same function as a linear map per vector per block (DiT's adaLN modulation): stacking the maps of all blocks
    into one ``W`` gives the same numbers from one kernel instead of five per block, and the elementwise tails
    (``1 + scale``, the relaxation) run once instead of once per block. At small batch a GPU step costs per kernel
    launched, not per FLOP (docs/design.md: one modulation for every block).

    Initialised with zero weights; biases ``time_a = 1`` (the gate starts as ``sigmoid(f(u))``), ``tau = TAU_INIT``
    for every t, every other vector 0 (adaLN-Zero: the feed-forward branch and the ablation's projection start
    switched off); ``lambda = 1``.

    Args:
        embed_dim: width of ``t_emb``.
        widths: the channels C_i of every block, in the order the blocks run.
        liquid: liquid blocks (8 kinds) or their ablation (6 kinds).
    """

    LIQUID_KINDS = ("scale_mix", "shift_mix", "time_a", "time_b", "tau", "scale_ff", "shift_ff", "gate_ff")
    ABLATION_KINDS = ("scale_mix", "shift_mix", "gate", "scale_ff", "shift_ff", "gate_ff")

    def __init__(self, embed_dim: int, widths: list[int], liquid: bool = True):
        super().__init__()
        self.widths = list(widths)
        self.kinds = self.LIQUID_KINDS if liquid else self.ABLATION_KINDS
        total = sum(self.widths)
        self.linear = nn.Linear(embed_dim, len(self.kinds) * total)
        nn.init.zeros_(self.linear.weight)
        initial = {"time_a": 1.0, "tau": math.log(math.expm1(TAU_INIT - TAU_MIN))}
        with torch.no_grad():
            self.linear.bias.copy_(torch.tensor([initial.get(k, 0.0) for k in self.kinds]).repeat_interleave(total))
        self.rho = nn.Parameter(torch.full((total,), math.log(math.e - 1))) if liquid else None  # softplus(rho) = 1
        # 1 at the scales: the blocks get 1 + scale (a buffer, not a bias: weight decay pulls the scales towards 0,
        # i.e. the gains towards 1)
        offset = torch.tensor([float(k.startswith("scale")) for k in self.kinds])[:, None]
        self.register_buffer("offset", offset, persistent=False)

    def forward(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One slab [B, K, C_i] per block, in ``widths`` order."""
        m = self.linear(t_emb).unflatten(1, (len(self.kinds), -1))
        m = m + self.offset.to(m.dtype)
        if self.rho is not None:
            i = self.kinds.index("tau")
            update = 1 - liquid_relaxation(self.rho, m[:, i])
            # under autocast 1 - alpha is float32 (softplus runs in float32), and so is the slab: the residual stream
            # it scales then stays float32 (a bfloat16 slab makes the velocity's error larger; docs/design.md)
            m = torch.cat([m[:, :i], update[:, None], m[:, i + 1 :]], dim=1)
        return m.split(self.widths, dim=2)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, ``C_in -> C_out``, halving H and W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv, ``C_in -> C_out``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SkipFusion(nn.Module):
    """Fuses decoder features with the matching encoder features: ``y = W [x ; skip]``, ``W: 2C -> C_out`` (1x1).

    ``C_out`` is the decoder stage's width, which may exceed the encoder's (the full-resolution decoder stage is
    twice as wide as its encoder stage, as DiCo's).
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.proj = nn.Conv2d(2 * channels, out_channels or channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x, skip], dim=1))


class OutputHead(nn.Module):
    """DiT's final layer on a feature map: ``v = conv3x3(AdaLN(x, t_emb))``, the conv zero-initialised.

    The velocity's scale depends on t (``v = (x_t - x0) / t``), and the norm erases the scale of the features it
    normalises: the head must get it back from ``t_emb`` (an un-modulated ``GroupNorm -> SiLU -> conv`` head
    cannot; docs/design.md: the t-modulated head).

    Args:
        channels: feature channels C.
        embed_dim: width of ``t_emb``.
        out_channels: channels of the velocity.
    """

    def __init__(self, channels: int, embed_dim: int, out_channels: int):
        super().__init__()
        self.norm = AdaLN(channels, embed_dim)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x, t_emb))


class FilterSkip(nn.Module):
    """A t-dependent linear filter from the network's input straight to its output::

        skip(x_t, t_emb) = sum_k a_k(t_emb) * (K_k * x_t)

    ``K_k`` are ``n_filters`` learned ``kernel x kernel`` convolutions ``C_in -> C_out`` (with a bias) and
    ``a_k(t_emb)`` their per-output-channel coefficients (zero-initialised, so the skip starts switched off): a linear
    filter whose kernel moves with t inside the span of the K_k. On nearly clean inputs the velocity is mostly a
    high-pass of x_t with gain 1/t (``v = (x_t - x0) / t``, the part of x_t that is noise), which the best linear
    (Wiener) filter gets without carrying small differences through the U-Net's norms; the U-Net adds the nonlinear
    rest (docs/design.md: the filter skip).

    Args:
        in_channels: channels of x_t.
        out_channels: channels of the velocity.
        embed_dim: width of ``t_emb``.
        n_filters: K, the number of basis filters.
        kernel: their size.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, n_filters: int = 4, kernel: int = 5):
        super().__init__()
        self.n_filters = n_filters
        self.filters = nn.Conv2d(in_channels, n_filters * out_channels, kernel, padding=kernel // 2)
        self.coefficients = nn.Linear(embed_dim, n_filters * out_channels)
        nn.init.zeros_(self.coefficients.weight)
        nn.init.zeros_(self.coefficients.bias)

    def forward(self, sample: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        filtered = self.filters(sample)
        batch, _, height, width = filtered.shape
        filtered = filtered.view(batch, self.n_filters, -1, height, width)
        a = self.coefficients(t_emb).view(batch, self.n_filters, -1, 1, 1)
        return (a * filtered).sum(dim=1)
