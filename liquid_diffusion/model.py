"""The LiquidDiffusion U-Net: an attention-free velocity network built from CfC-gated blocks.

Two sections, read top to bottom (the parts, with their equations, are in ``blocks.py``):

1. Model           -- ``LiquidDiffusionUNet`` (diffusers ``ModelMixin`` + ``ConfigMixin``, so ``save_pretrained`` /
                      ``from_pretrained`` / ``push_to_hub`` come for free), its architecture version and class labels.
2. Presets         -- the named sizes ``micro`` / ``tiny`` / ``small`` / ``base``.

Convention (rectified flow): ``timestep`` t is in [0, 1], t = 0 is data and t = 1 is pure noise; the network
predicts the velocity v = noise - x0. There is no attention and no softmax over positions anywhere: global
context comes from a global-average-pool branch and the U-Net's downsampling.

Lineage: CfC networks (Hasani et al., Nature MI 2022), LTC networks (AAAI 2021), LiquidTAD (parallel liquid
relaxation), USM and DiffuSSM (attention-free diffusion backbones), Rectified Flow (ICLR 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .blocks import (
    BlockModulation,
    Downsample,
    FilterSkip,
    LiquidDiffusionBlock,
    OutputHead,
    PositionEmbedder,
    SkipFusion,
    TimestepEmbedder,
    Upsample,
)

# The architecture version, saved in every config: a model of another version has other parts and weights, so loading
# one is refused in a single line (``check_format``) instead of failing on a list of mismatched tensors.
FORMAT_VERSION = 7


def check_format(config: dict) -> None:
    """Refuses, in one line, a saved config of another architecture version than this package builds (a config
    without the field is version 1)."""
    version = config.get("format_version", 1)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"this model was saved by LiquidDiffusion architecture version {version}, but this version of the "
            f"package builds version {FORMAT_VERSION} (the format changed: the architecture was redesigned); "
            "retrain it, or load it with the package release that saved it"
        )


# ----------------------------------------------------------------------------------------------------------------
# 1. Model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LiquidDiffusionOutput(BaseOutput):
    """Output of ``LiquidDiffusionUNet``.

    Args:
        sample: the predicted velocity ``v = noise - x0``, shaped like the input.
    """

    sample: torch.Tensor


class LiquidDiffusionUNet(ModelMixin, ConfigMixin):
    """Attention-free U-Net that predicts the rectified-flow velocity ``v(x_t, t)``.

    ``t_emb = MLP(sinusoid(t))``; stem ``conv3x3`` (linear, as DiT's patch embedding) plus the
    ``PositionEmbedder``'s ``W p(y, x)`` (fixed Fourier features of where each pixel is); encoder stage i holds
    ``depths[i]`` ``LiquidDiffusionBlock``s at width ``widths[i]`` with stride-2 downsampling between stages; a
    bottleneck of ``bottleneck_depth`` blocks (none in the presets); the decoder mirrors the encoder's depths at
    ``decoder_widths`` (upsample to ``widths[i]``, ``SkipFusion`` with the matching encoder output to
    ``decoder_widths[i]``, blocks; the deepest decoder stage is not upsampled, and without a bottleneck its
    ``SkipFusion`` is a 1x1 conv of the deepest encoder output); ``OutputHead`` ``conv3x3(AdaLN(x, t_emb))``
    (zero-initialised) back to ``out_channels``; plus ``FilterSkip``, a t-dependent linear filter of x_t added to
    the head's output. Every block's t-dependent vectors come from one ``BlockModulation`` per step::

        v = OutputHead(U-Net(stem(x_t) + W p(y, x)), t_emb) + sum_k a_k(t_emb) * (K_k * x_t)

    Args:
        in_channels: 4 for SD-VAE latents, 3 for pixel space.
        out_channels: channels of the predicted velocity (defaults to ``in_channels``).
        widths: channel width per stage, increasing.
        depths: blocks per encoder stage (the decoder mirrors them).
        decoder_widths: channel width per decoder stage. By default ``widths`` with the first doubled: the
            full-resolution decoder stage is twice as wide as its encoder stage (as DiCo's), because that is where
            the last details of a nearly clean image are decided (docs/design.md: the wide full-resolution decoder
            stage). Pass ``widths`` itself for a decoder as wide as the encoder.
        bottleneck_depth: extra blocks at the lowest resolution, between the encoder and the decoder.
        ff_mult: FeedForward expansion.
        time_embed_dim: width of ``t_emb`` (defaults to ``4 * widths[0]``).
        liquid: ``False`` replaces every ``ParallelCfC`` by the ``GatedProjection`` ablation.
        num_classes: K > 0 makes the model class-conditional: ``t_emb = MLP(sinusoid(t)) + E[y]`` with a learned
            label embedding ``E`` of K + 1 rows, row K being the "null" class (unconditional). 0 (the default):
            unconditional, with no label embedding at all.
        class_names: the K label names, in id order (stored in the config so sampling can ask for names).
        position_frequencies: octaves of the ``PositionEmbedder`` added to the stem (the presets use 4); 0 leaves
            it out.
        format_version: the architecture version (``FORMAT_VERSION``), saved in the config so that loading weights
            of another version fails in one line instead of with a list of mismatched tensors.
    """

    # diffusers' gradient checkpointing (``enable_gradient_checkpointing``): each block's activations are recomputed
    # in the backward pass from its input instead of being kept from the forward pass (see ``run_block``).
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        widths: tuple[int, ...] = (96, 192, 384),
        depths: tuple[int, ...] = (2, 4, 2),
        decoder_widths: tuple[int, ...] | None = None,
        bottleneck_depth: int = 0,
        ff_mult: int = 2,
        time_embed_dim: int | None = None,
        liquid: bool = True,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        position_frequencies: int = 0,
        format_version: int = FORMAT_VERSION,
    ):
        super().__init__()
        check_format({"format_version": format_version})
        widths, depths = tuple(widths), tuple(depths)
        decoder_widths = tuple(decoder_widths or (2 * widths[0], *widths[1:]))
        if len(widths) != len(depths) or len(decoder_widths) != len(widths) or not widths:
            raise ValueError(
                f"widths {widths}, depths {depths} and decoder_widths {decoder_widths} must be non-empty "
                "and of equal length"
            )
        out_channels = out_channels or in_channels
        embed_dim = time_embed_dim or 4 * widths[0]

        self.time_embedder = TimestepEmbedder(widths[0], embed_dim)
        self.class_embedder = _class_embedder(num_classes, class_names, embed_dim)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        def stage(width: int, depth: int) -> nn.ModuleList:
            return nn.ModuleList(LiquidDiffusionBlock(width, ff_mult, liquid) for _ in range(depth))

        self.encoder = nn.ModuleList(stage(w, d) for w, d in zip(widths, depths))
        self.downsamples = nn.ModuleList(Downsample(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.bottleneck = stage(widths[-1], bottleneck_depth)
        # Decoder stage i (deepest first) mirrors encoder stage i; stages above the deepest start by upsampling.
        self.upsamples = nn.ModuleList(Upsample(b, a) for a, b in zip(widths[:-1], decoder_widths[1:]))
        self.fusions = nn.ModuleList(SkipFusion(w, dw) for w, dw in zip(widths, decoder_widths))
        self.decoder = nn.ModuleList(stage(w, d) for w, d in zip(decoder_widths, depths))

        self.head = OutputHead(decoder_widths[0], embed_dim, out_channels)
        self.input_skip = FilterSkip(in_channels, out_channels, embed_dim)
        stage_widths = {
            "bottleneck": widths[-1],
            **{f"encoder.{i}": w for i, w in enumerate(widths)},
            **{f"decoder.{i}": w for i, w in enumerate(decoder_widths)},
        }
        self.modulation = BlockModulation(
            embed_dim, [stage_widths[name.rsplit(".", 1)[0]] for name in self.block_names()], liquid
        )
        if position_frequencies < 0:
            raise ValueError(f"position_frequencies must be 0 or positive, got {position_frequencies}")
        # built last, so that every other weight draws the same random numbers as in a model without it
        self.position_embedder = PositionEmbedder(position_frequencies, widths[0]) if position_frequencies else None
        self.gradient_checkpointing = False  # switched by diffusers' enable/disable_gradient_checkpointing

    def run_block(self, block: nn.Module, x: torch.Tensor, block_input: torch.Tensor) -> torch.Tensor:
        """``block(x, block_input)``; under gradient checkpointing, while gradients are recorded, the block keeps only
        its inputs for the backward pass and recomputes its activations there (same gradients, less memory, one more
        forward pass of every block per step)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, x, block_input)
        return block(x, block_input)

    def block_names(self) -> list[str]:
        """The blocks' module names in the order they run (encoder, bottleneck, decoder deepest first)."""
        stages = [f"encoder.{i}" for i in range(len(self.encoder))] + ["bottleneck"]
        stages += [f"decoder.{i}" for i in reversed(range(len(self.decoder)))]
        return [f"{stage}.{j}" for stage in stages for j in range(len(self.get_submodule(stage)))]

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``, refusing a config of another architecture version (``check_format``)."""
        loaded = super().load_config(*args, **kwargs)
        check_format(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """The width of each decoder stage (``decoder_widths`` as built, also when the config left it to default)."""
        return tuple(fusion.proj.out_channels for fusion in self.fusions)

    @property
    def downsample_factor(self) -> int:
        """H and W must be divisible by this: 2 ** (number of stages - 1)."""
        return 2 ** (len(self.config.widths) - 1)

    def _check_inputs(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Validates ``sample`` and returns ``timestep`` as a float tensor of shape [B] on the sample's device."""
        if sample.ndim != 4:
            raise ValueError(f"sample must be [B, C, H, W], got shape {tuple(sample.shape)}")
        batch, channels, height, width = sample.shape
        if channels != self.config.in_channels:
            raise ValueError(
                f"sample has {channels} channels but this model takes in_channels={self.config.in_channels} "
                "(4 for SD-VAE latents, 3 for pixel space)"
            )
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"sample height and width ({height}x{width}) must be divisible by {factor}, the model's total "
                f"downsampling factor (2 ** (len(widths) - 1))"
            )
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep)  # a Python float becomes float32, an int int64
        integer = not timestep.is_floating_point()
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise ValueError(f"timestep must be a number in [0, 1] (t = 0 data, t = 1 noise), got {timestep.dtype}")
        if integer:  # as diffusers' models take them: an integer t means the same as the float of the same value
            timestep = timestep.float()
        if timestep.ndim == 0 or timestep.shape == (1,):  # one t for the whole batch, as in UNet2DModel
            timestep = timestep.reshape(()).expand(batch)
        elif timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or of shape [{batch}], got shape {tuple(timestep.shape)}")
        timestep = timestep.to(sample.device)
        if timestep.device.type == "cpu":
            if not torch.compiler.is_compiling() and bool(((timestep < 0) | (timestep > 1)).any()):
                raise ValueError(
                    f"timestep must lie in [0, 1] (t = 0 data, t = 1 noise), got values from "
                    f"{timestep.min().item():.4g} to {timestep.max().item():.4g}"
                    + ("; divide a scheduler's integer timesteps by its num_train_timesteps" if integer else "")
                )
        else:  # on an accelerator a Python-side check would force a host sync every step; assert on the device
            torch._assert_async(((timestep >= 0) & (timestep <= 1)).all(), "timestep must lie in [0, 1]")
        return timestep

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> LiquidDiffusionOutput | tuple[torch.Tensor]:
        """Predicts the velocity ``v = noise - x0`` at ``x_t = (1 - t) x0 + t noise``.

        Args:
            sample: ``x_t``, shape [B, in_channels, H, W] with H, W divisible by ``downsample_factor``.
            timestep: t in [0, 1] (0 data, 1 noise): a tensor of shape [B], or a scalar or one-element tensor
                for the whole batch (as ``UNet2DModel`` takes it); integers mean the same as floats (0 or 1).
            class_labels: class-conditional models only: integer ids of shape [B] in [0, num_classes], where
                ``num_classes`` (``null_class``) asks for the unconditional prediction; ``None`` means all null.
            return_dict: return a ``LiquidDiffusionOutput`` (else a 1-tuple).
        """
        timestep = self._check_inputs(sample, timestep)
        t_emb = self.time_embedder(timestep)
        if self.class_embedder is not None:
            t_emb = t_emb + self.class_embedder(self._check_labels(class_labels, sample))
        elif class_labels is not None:
            raise ValueError("class_labels given, but this model is unconditional (num_classes=0)")

        x = self.stem(sample)
        if self.position_embedder is not None:
            x = x + self.position_embedder(sample)
        block_inputs, skips = iter(self.modulation(t_emb)), []  # each block's slab, in the order the blocks run
        for i, blocks in enumerate(self.encoder):
            if i > 0:
                x = self.downsamples[i - 1](x)
            for block in blocks:
                x = self.run_block(block, x, next(block_inputs))
            skips.append(x)
        for block in self.bottleneck:
            x = self.run_block(block, x, next(block_inputs))
        for i in reversed(range(len(self.decoder))):
            if i < len(self.decoder) - 1:
                x = self.upsamples[i](x)
            x = self.fusions[i](x, skips[i])
            for block in self.decoder[i]:
                x = self.run_block(block, x, next(block_inputs))
        velocity = self.head(x, t_emb) + self.input_skip(sample, t_emb)

        if not return_dict:
            return (velocity,)
        return LiquidDiffusionOutput(sample=velocity)

    @property
    def null_class(self) -> int | None:
        """The label id of the unconditional ("null") class, ``num_classes``; ``None`` for unconditional models."""
        return self.config.num_classes if self.config.num_classes else None

    def _check_labels(self, class_labels, sample: torch.Tensor) -> torch.Tensor:
        """``class_labels`` as int64 ids [B] on the sample's device (``None``: all null)."""
        batch = sample.shape[0]
        if class_labels is None:
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=sample.device)
        class_labels = torch.as_tensor(class_labels, device=sample.device)
        if class_labels.is_floating_point() or class_labels.shape not in ((batch,), ()):
            raise ValueError(
                f"class_labels must be integer ids of shape [{batch}], got {class_labels.dtype} of "
                f"shape {tuple(class_labels.shape)}"
            )
        class_labels = class_labels.long().expand(batch)
        if class_labels.device.type == "cpu" and bool(((class_labels < 0) | (class_labels > self.null_class)).any()):
            raise ValueError(
                f"class_labels must lie in [0, {self.null_class}] ({self.null_class} = unconditional), "
                f"got {class_labels.min().item()} to {class_labels.max().item()}"
            )
        return class_labels

    def class_ids(self, labels) -> torch.Tensor:
        """Label names (from ``class_names``) or ids, one or a list, as int64 ids [N]; ``ValueError`` if unknown."""
        if not self.config.num_classes:
            raise ValueError("this model is unconditional: it takes no class (train with --class-conditional)")
        return resolve_class_labels(labels, self.config.class_names or [], self.config.num_classes)

    # ------------------------------------------------------------------------------------------------------------
    # 2. Presets
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LiquidDiffusionUNet:
        """Builds a model of a named size (see ``PRESETS``); keyword overrides win over the preset's values.

        Example: ``LiquidDiffusionUNet.from_preset("micro", in_channels=3)`` for pixel space.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _class_embedder(num_classes: int, class_names, embed_dim: int) -> nn.Embedding | None:
    """The label embedding of a class-conditional model (K + 1 rows, the last one the null class), else ``None``."""
    if not num_classes:
        return None
    if num_classes < 0 or (class_names is not None and len(class_names) != num_classes):
        raise ValueError(
            f"num_classes={num_classes} must be positive and match the {len(class_names or [])} class_names"
        )
    embedder = nn.Embedding(num_classes + 1, embed_dim)
    nn.init.normal_(embedder.weight, std=0.02)  # as DiT's LabelEmbedder: small next to t_emb at init
    return embedder


def resolve_class_labels(labels, class_names: list[str], num_classes: int) -> torch.Tensor:
    """Names or ids (an int, a str, a digit string or a list of them) -> int64 ids [N] in [0, num_classes)."""
    items = [labels] if isinstance(labels, (int, str)) or torch.is_tensor(labels) and labels.ndim == 0 else labels
    ids = []
    for item in items:
        item = item.item() if torch.is_tensor(item) else item
        if isinstance(item, str) and item in class_names:
            ids.append(class_names.index(item))
        elif isinstance(item, int) or isinstance(item, str) and item.strip().isdigit():
            ids.append(int(item))
        else:
            ids.append(-1)
        if not 0 <= ids[-1] < num_classes:
            names = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
            raise ValueError(f"unknown class {item!r}; use a name ({names}) or an id in [0, {num_classes - 1}]")
    return torch.tensor(ids, dtype=torch.long)


PRESETS: dict[str, dict] = {
    # DiCo's shape: many light blocks, most of them at the two higher resolutions, a full-resolution decoder stage
    # twice as wide as its encoder stage, and position features (docs/design.md). micro: tests and CPU demos; tiny:
    # a T4 at 256 px, batch 8
    "micro": dict(widths=(32, 64, 128), depths=(1, 2, 2), decoder_widths=(64, 64, 128), position_frequencies=4),
    "tiny": dict(widths=(96, 192, 384), depths=(2, 4, 2), decoder_widths=(192, 192, 384), position_frequencies=4),
    "small": dict(widths=(128, 256, 512), depths=(3, 6, 4), decoder_widths=(256, 256, 512), position_frequencies=4),
    "base": dict(widths=(192, 384, 768), depths=(4, 8, 3), decoder_widths=(384, 384, 768), position_frequencies=4),
}
"""Named sizes: encoder widths and depths per stage, decoder widths (the decoder mirrors the depths; no separate
bottleneck). tiny, small and base have ~23M / ~69M / ~154M parameters in a deep shape of light blocks with a wide
full-resolution decoder stage (docs/design.md: many light blocks)."""
