"""The training-memory estimate and batch-size suggestion the notebook shows (liquid_diffusion/memory.py)."""

from __future__ import annotations

import pytest
import torch

from liquid_diffusion import memory as memory_module
from liquid_diffusion.memory import (
    CUDA_CONTEXT_BYTES,
    TRAINING_BYTES_PER_PARAMETER,
    activation_bytes,
    estimate_training_memory_gib,
    needs_gradient_checkpointing,
    saved_activation_bytes,
    suggest_batch_size,
)
from liquid_diffusion.model import LiquidDiffusionUNet


def test_activation_bytes_counts_the_presets_parameters_and_real_activations():
    per_cell, parameters = activation_bytes("micro", 3)
    model = LiquidDiffusionUNet.from_preset("micro", in_channels=3)
    assert parameters == sum(p.numel() for p in model.parameters())
    # at least the fp32 input and output of every cell are kept for backward, and far less than the weights
    assert 2 * 3 * 4 < per_cell < 4 * parameters


def test_the_estimate_grows_with_batch_size_resolution_and_preset():
    micro = [estimate_training_memory_gib("micro", "pixel", 32, b) for b in (1, 2, 4, 8)]
    assert micro == sorted(micro) and len(set(micro)) == 4
    # activations are linear in the batch in pixel space (no VAE): equal steps for equal increments
    assert micro[2] - micro[1] == pytest.approx(2 * (micro[1] - micro[0]))
    assert estimate_training_memory_gib("micro", "pixel", 64, 4) > micro[2]
    assert estimate_training_memory_gib("tiny", "pixel", 32, 4) > micro[2]
    # with no activations the estimate is the context and the training state of every parameter
    _, parameters = activation_bytes("micro", 3)
    floor = (CUDA_CONTEXT_BYTES + TRAINING_BYTES_PER_PARAMETER * parameters) / 2**30
    assert floor < micro[0] < micro[3]


def test_latent_space_adds_the_vae_and_its_encoding_and_half_precision_saves():
    pixel = estimate_training_memory_gib("micro", "pixel", 256, 8)
    latent = estimate_training_memory_gib("micro", "latent", 256, 8)
    cached = estimate_training_memory_gib("micro", "latent", 256, 8, cache_latents=True)
    bf16_vae = estimate_training_memory_gib("micro", "latent", 256, 8, vae_dtype=torch.bfloat16)
    assert latent > cached and latent > bf16_vae
    assert cached > estimate_training_memory_gib(
        "micro", "latent", 256, 8, cache_latents=True, vae_dtype=torch.bfloat16
    )
    assert pixel > estimate_training_memory_gib("micro", "pixel", 256, 8, mixed_precision="fp16")


def test_gradient_checkpointing_keeps_the_blocks_inputs_and_recomputes_one_block_at_a_time():
    model = LiquidDiffusionUNet.from_preset("tiny", in_channels=4)
    x, t = torch.randn(1, 4, 16, 16), torch.full((1,), 0.5)
    plain, nothing_recomputed = saved_activation_bytes(model, x, t)
    model.enable_gradient_checkpointing()
    checkpoint_function = model._gradient_checkpointing_func
    kept, recomputed = saved_activation_bytes(model, x, t)
    assert nothing_recomputed == 0 and 0 < recomputed < kept + recomputed < 0.5 * plain
    # every block's input is still kept: at least one fp32 feature map per block
    smallest_map = 4 * min(model.config.widths) * (16 // model.downsample_factor) ** 2
    assert kept > len(model.block_names()) * smallest_map
    # measuring leaves it switched on, with the checkpoint function it had
    assert model.is_gradient_checkpointing and model._gradient_checkpointing_func is checkpoint_function
    per_cell, _ = activation_bytes("tiny", 4)
    assert activation_bytes("tiny", 4, gradient_checkpointing=True)[0] == pytest.approx(
        per_cell * (kept + recomputed) / plain
    )


def test_the_estimate_knows_what_gradient_checkpointing_saves():
    plain = [estimate_training_memory_gib("tiny", "latent", 512, b, cache_latents=True) for b in (1, 8)]
    checkpointed = [
        estimate_training_memory_gib("tiny", "latent", 512, b, cache_latents=True, gradient_checkpointing=True)
        for b in (1, 8)
    ]
    assert checkpointed[0] < plain[0] and plain[1] - plain[0] > 2 * (checkpointed[1] - checkpointed[0])
    assert suggest_batch_size(8, "base", "latent", 512, cache_latents=True) < suggest_batch_size(
        8, "base", "latent", 512, cache_latents=True, gradient_checkpointing=True
    )


def test_gradient_checkpointing_is_needed_when_the_batch_does_not_fit_three_quarters_of_the_gpu_without_it():
    need = estimate_training_memory_gib("base", "latent", 512, 4, cache_latents=True)
    assert needs_gradient_checkpointing(need / 0.75 * 0.99, "base", "latent", 512, 4, cache_latents=True)
    assert not needs_gradient_checkpointing(
        need / 0.75 * 1.01, "base", "latent", 512, 4, cache_latents=True, gradient_checkpointing=True
    )  # judged without it, whatever is asked
    assert not needs_gradient_checkpointing(0, "base", "latent", 512, 64)  # no GPU


def test_suggested_batch_size_is_the_largest_power_of_two_that_fits_three_quarters_of_the_gpu():
    assert suggest_batch_size(0, "tiny", "latent", 256) == 4  # no GPU
    for memory in (4, 8, 16, 40, 80):
        b = suggest_batch_size(memory, "micro", "pixel", 128)
        cap = 8 if memory < 24 else 16 if memory < 48 else 32
        assert b <= cap and estimate_training_memory_gib("micro", "pixel", 128, b) <= 0.75 * memory
        assert b == cap or estimate_training_memory_gib("micro", "pixel", 128, 2 * b) > 0.75 * memory
    need_4 = estimate_training_memory_gib("micro", "pixel", 512, 4)
    assert suggest_batch_size(need_4 / 0.75 * 1.001, "micro", "pixel", 512) == 4
    assert suggest_batch_size(0.1, "micro", "pixel", 512) == 1  # nothing fits: 1, and let training say so


# Peaks measured on an NVIDIA H200 (torch.cuda.max_memory_allocated, no CUDA context; BENCHMARKS.md section 4):
# (preset, --mixed-precision, VAE dtype, cached latents, MiB) at 256 px in latent space, batch 8. They were measured
# on architecture version 3, so the estimate is fed version 3's counts: its fp32 activation bytes per latent cell
# and its parameters, as ``activation_bytes`` counted them for its presets (in_channels 4).
MEASURED_H200 = [
    ("tiny", "fp16", torch.float32, True, 796),
    ("tiny", "bf16", torch.bfloat16, True, 731),
    ("tiny", "fp16", torch.float32, False, 2302),
    ("tiny", "bf16", torch.bfloat16, False, 1362),
    ("small", "bf16", torch.bfloat16, True, 2100),
    ("small", "bf16", torch.bfloat16, False, 2244),
    ("base", "bf16", torch.bfloat16, True, 4240),
    ("base", "bf16", torch.bfloat16, False, 4393),
]
MEASURED_ARCHITECTURE_COUNTS = {
    "tiny": (50809.25, 21545668),
    "small": (126526.25, 66775684),
    "base": (199759.25, 150474212),
}


@pytest.fixture
def version_3_presets(monkeypatch):
    """The estimate's formula, fed the counts of the architecture that was measured (counted on version 3's model,
    ``benchmarks/legacy_blocks.py`` at commit 53d37d4)."""

    def counts(preset, in_channels, gradient_checkpointing=False):
        assert in_channels == 4 and not gradient_checkpointing
        return MEASURED_ARCHITECTURE_COUNTS[preset]

    monkeypatch.setattr(memory_module, "activation_bytes", counts)


@pytest.mark.parametrize("preset, precision, vae_dtype, cached, measured_mib", MEASURED_H200)
def test_the_estimate_covers_the_peaks_measured_on_a_gpu_without_doubling_them(
    version_3_presets, preset, precision, vae_dtype, cached, measured_mib
):
    estimate = estimate_training_memory_gib(
        preset, "latent", 256, 8, mixed_precision=precision, vae_dtype=vae_dtype, cache_latents=cached
    )
    without_context_mib = (estimate * 2**30 - CUDA_CONTEXT_BYTES) / 2**20
    assert measured_mib <= without_context_mib < 1.6 * measured_mib
