"""Expected GPU memory of a training run, and the batch size that fits a GPU: an estimate, not a measurement.

    peak ~ CUDA context (0.5 GiB) + 22 bytes per U-Net parameter (fp32 weights, gradients, two AdamW moments, EMA
           and autocast copies) + the frozen VAE's weights + max(the U-Net's saved activations, the VAE's encoding)

The U-Net's activations are counted rather than guessed: one small CPU forward pass records the bytes autograd keeps
per input cell, which then scale with the cells (the side, divided by the VAE's factor in latent space, squared) and
the batch size. Under gradient checkpointing the same pass counts what checkpointing keeps (each block's input and
what lies outside the blocks) plus the largest block's activations, which the backward pass recomputes and holds at
once. The notebook shows this estimate, suggests its batch size with ``suggest_batch_size`` and turns gradient
checkpointing on by ``needs_gradient_checkpointing``; the measured peak is printed after training.
"""

from __future__ import annotations

import functools

import torch

from .latents import VAE_DOWNSAMPLE_FACTOR
from .model import LiquidDiffusionUNet

CUDA_CONTEXT_BYTES = 0.5 * 2**30
TRAINING_BYTES_PER_PARAMETER = 22
SD_VAE_PARAMETERS = 83.7e6
SD_VAE_LATENT_CHANNELS = 4
# The VAE encoder's peak working set, in copies of its first 128-channel full-resolution feature map (a measured
# bound, rounded up; docs/design.md: the memory estimate).
VAE_ENCODE_FEATURE_COPIES = 6
BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def saved_activation_bytes(model: LiquidDiffusionUNet, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[int, int]:
    """``(bytes autograd keeps from one forward pass of model for its backward, the largest block's own share)``,
    weights not counted.

    Under gradient checkpointing (``model.enable_gradient_checkpointing()``) the first number is what the forward pass
    keeps (each block's inputs and what lies outside the blocks) and the second is the working set of the largest
    block, whose activations its backward recomputes and holds at once, so their sum is the activations' peak; without
    it, the second number is 0 (everything is kept, counted in the first)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def counting(saved: dict):
        def keep(tensor):
            key = tensor.untyped_storage().data_ptr()
            if key not in weights:
                saved[key] = max(saved.get(key, 0), tensor.untyped_storage().nbytes())
            return tensor

        return keep

    kept, largest_block = {}, [0]

    def checkpoint_counting(block, *inputs):  # a checkpointed block keeps its inputs and recomputes the rest
        for tensor in inputs:
            counting(kept)(tensor)
        block_saved = {}
        with torch.autograd.graph.saved_tensors_hooks(counting(block_saved), lambda tensor: tensor):
            block(*inputs)
        largest_block[0] = max(largest_block[0], sum(block_saved.values()))
        return torch.utils.checkpoint.checkpoint(block.__call__, *inputs, use_reentrant=False)

    checkpointing, previous = model.is_gradient_checkpointing, model._gradient_checkpointing_func
    if checkpointing:
        model.enable_gradient_checkpointing(checkpoint_counting)
    try:
        with torch.autograd.graph.saved_tensors_hooks(counting(kept), lambda tensor: tensor):
            model(sample, timestep)
    finally:
        if checkpointing:
            model.enable_gradient_checkpointing(previous)
    return sum(kept.values()), largest_block[0]


@functools.cache
def activation_bytes(preset: str, in_channels: int, gradient_checkpointing: bool = False) -> tuple[float, int]:
    """``(fp32 bytes of activations per input cell for one image, parameter count)`` of a preset, from one small CPU
    forward pass (``saved_activation_bytes``: what autograd keeps, plus under gradient checkpointing the largest
    block's recomputed working set)."""
    model = LiquidDiffusionUNet.from_preset(preset, in_channels=in_channels)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    size = 4 * model.downsample_factor
    kept, recomputed = saved_activation_bytes(model, torch.randn(1, in_channels, size, size), torch.full((1,), 0.5))
    return (kept + recomputed) / size**2, sum(p.numel() for p in model.parameters())


def estimate_training_memory_gib(
    preset: str,
    space: str,
    resolution: int,
    batch_size: int,
    *,
    mixed_precision: str = "no",
    vae_dtype: torch.dtype = torch.float32,
    cache_latents: bool = False,
    gradient_checkpointing: bool = False,
) -> float:
    """Rough peak GPU memory (GiB) of training ``preset`` at ``resolution`` with ``batch_size`` images per step.

    Mixed precision (``fp16``/``bf16``) keeps activations at about 0.6 of their fp32 size; ``vae_dtype`` is the
    frozen VAE's (``latents.vae_dtype``); with ``cache_latents`` the VAE never encodes during training; with
    ``gradient_checkpointing`` (``--gradient-checkpointing``) the activations are those checkpointing keeps, plus
    the one block it recomputes at a time.
    """
    latent = space == "latent"
    per_cell, parameters = activation_bytes(preset, SD_VAE_LATENT_CHANNELS if latent else 3, gradient_checkpointing)
    cells = (resolution // (VAE_DOWNSAMPLE_FACTOR if latent else 1)) ** 2
    half = mixed_precision in ("fp16", "bf16")
    activations = per_cell * cells * batch_size * (0.6 if half else 1.0) * 1.5  # autocast; backward, allocator slack
    vae_bytes = vae_dtype.itemsize
    vae_weights = SD_VAE_PARAMETERS * vae_bytes if latent else 0
    # the VAE encoder's full-resolution 128-channel stage, at most 16 images at a time
    vae_work = (
        min(batch_size, 16) * resolution**2 * 128 * vae_bytes * VAE_ENCODE_FEATURE_COPIES
        if latent and not cache_latents
        else 0
    )
    total = CUDA_CONTEXT_BYTES + TRAINING_BYTES_PER_PARAMETER * parameters + vae_weights + max(activations, vae_work)
    return total / 2**30


def suggest_batch_size(gpu_memory_gib: float, preset: str, space: str, resolution: int, **estimate) -> int:
    """The largest power of two whose estimate (``estimate``: keywords of ``estimate_training_memory_gib``) fits in
    75% of the GPU, capped by the GPU's class (small GPUs are also slow ones: a bigger batch there mostly makes each
    step longer): 8 below 24 GiB, 16 below 48 GiB, else 32. 4 without a GPU (``gpu_memory_gib`` 0), 1 when nothing
    fits."""
    if gpu_memory_gib == 0:
        return 4
    cap = 8 if gpu_memory_gib < 24 else 16 if gpu_memory_gib < 48 else 32
    fitting = [
        b
        for b in BATCH_SIZES
        if b <= cap and estimate_training_memory_gib(preset, space, resolution, b, **estimate) <= 0.75 * gpu_memory_gib
    ]
    return fitting[-1] if fitting else 1


def needs_gradient_checkpointing(
    gpu_memory_gib: float, preset: str, space: str, resolution: int, batch_size: int, **estimate
) -> bool:
    """Whether ``batch_size`` does not fit in 75% of the GPU (the margin ``suggest_batch_size`` keeps) without
    gradient checkpointing, by ``estimate_training_memory_gib`` (``estimate``: its keywords); ``False`` without a
    GPU (``gpu_memory_gib`` 0), where memory is not what limits a run."""
    estimate.pop("gradient_checkpointing", None)
    return bool(gpu_memory_gib) and (
        estimate_training_memory_gib(preset, space, resolution, batch_size, **estimate) > 0.75 * gpu_memory_gib
    )
