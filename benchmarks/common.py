"""Shared pieces of the benchmark scripts: the models compared, a common velocity interface, timing and memory.

Every model is wrapped in ``VelocityModel`` so that all of them are called the same way, ``v = model(x_t, t)`` with
t in [0, 1] (t = 0 data, t = 1 noise, the package's convention) and a plain tensor out:

* ``liquid-<preset>``  -- ``LiquidDiffusionUNet.from_preset(preset)``; ``liquid-<preset>-ablation`` is the same with
  ``liquid=False`` (ParallelCfC replaced by a plain adaLN-Zero-gated 1x1 projection, ``GatedProjection``).
* ``dit-s2`` / ``dit-b2`` -- diffusers ``DiTTransformer2DModel``: DiT-S/2 (hidden 384, depth 12, 6 heads, patch 2)
  and DiT-B/2 (768, 12, 12, 2). DiT is class-conditional; we build it with a single class
  (``num_embeds_ada_norm=1``) and pass ``class_labels`` of zeros. Its timestep embedding expects the 0..1000 scale,
  so the wrapper passes ``1000 * t``. Note that diffusers gives every DiT block its own timestep/label embedder,
  so its parameter counts are above the paper's (DiT-S/2 35.2M here vs 33M).
* ``unet2d`` -- diffusers ``UNet2DModel`` matched to ``liquid-tiny``'s ~21.8M parameters (``UNET2D_CONFIG``:
  block_out_channels (96, 192, 256), layers_per_block 2, self-attention in the two lower stages -- the DDPM
  recipe); also called with ``1000 * t``.

Memory on the CPU is the process's resident set: ``/proc/self/clear_refs`` resets the kernel's high-water mark
(VmHWM), and ``peak_rss_delta`` is VmHWM after the measured work minus VmRSS before it (after ``gc.collect`` and
glibc ``malloc_trim``). It counts everything the work touched -- weights, gradients, AdamW state, activations,
allocator slack -- and is therefore comparable in spirit, not in value, to ``torch.cuda.max_memory_allocated``.
Where ``/proc`` cannot be reset it falls back to ``resource.getrusage`` maxrss, which only grows over the process's
life (the delta is then a lower bound).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from liquid_diffusion import flow
from liquid_diffusion.model import PRESETS, LiquidDiffusionUNet

# Peak dense bf16 tensor throughput in TFLOP/s, matched by substring of torch.cuda.get_device_name() (first hit).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM ("H100 80GB HBM3")
    "A100": 312.0,
    "A10G": 70.0,
    "A6000": 155.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 tensor cores; V100 has no bf16
    "T4": 65.0,  # fp16 tensor cores; T4 has no bf16
}

UNET2D_CONFIG = dict(
    block_out_channels=(96, 192, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
DIT_CONFIGS = {"dit-s2": dict(hidden=384, depth=12, heads=6), "dit-b2": dict(hidden=768, depth=12, heads=12)}

# SD-VAE (stabilityai/sd-vae-ft-mse) shape: random weights, since the Hub is not always reachable.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
    scaling_factor=0.18215,
)
SD_VAE_SCALING = SD_VAE_CONFIG["scaling_factor"]


class VelocityModel(nn.Module):
    """``v = model(x_t, t)`` with t in [0, 1], whatever the wrapped network's own timestep convention is."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "liquid":
            return self.net(x, t).sample
        if self.kind == "dit":
            labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self.net(x, timestep=t * 1000.0, class_labels=labels).sample
        return self.net(x, t * 1000.0).sample  # unet2d


def build_model(name: str, in_channels: int = 4, sample_size: int = 32, **overrides) -> VelocityModel:
    """Builds a named model (see the module docstring) with random weights, wrapped in ``VelocityModel``.

    ``overrides`` go to the underlying constructor (e.g. ``widths=...`` for a reduced liquid model, or
    ``hidden``/``depth``/``heads``/``patch`` for a DiT, ``block_out_channels`` for the UNet2DModel).
    """
    if name.startswith("liquid-"):
        preset = name[len("liquid-") :]
        liquid = not preset.endswith("-ablation")
        preset = preset.removesuffix("-ablation")
        net = LiquidDiffusionUNet.from_preset(preset, in_channels=in_channels, liquid=liquid, **overrides)
        return VelocityModel(net, "liquid")
    if name.startswith("dit"):
        from diffusers import DiTTransformer2DModel

        cfg = {**DIT_CONFIGS.get(name, DIT_CONFIGS["dit-s2"]), "patch": 2, **overrides}
        net = DiTTransformer2DModel(
            num_attention_heads=cfg["heads"],
            attention_head_dim=cfg["hidden"] // cfg["heads"],
            in_channels=in_channels,
            num_layers=cfg["depth"],
            sample_size=sample_size,
            patch_size=cfg["patch"],
            num_embeds_ada_norm=1,
        )
        return VelocityModel(net, "dit")
    if name.startswith("unet2d"):
        from diffusers import UNet2DModel

        net = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, **{**UNET2D_CONFIG, **overrides}
        )
        return VelocityModel(net, "unet2d")
    raise ValueError(f"unknown model {name!r}; use liquid-<preset>[-ablation], dit-s2, dit-b2 or unet2d")


def is_model_name(name: str) -> bool:
    """Whether ``build_model`` knows ``name`` (checked before a long run starts, not after its first hour)."""
    if name.startswith("liquid-"):
        return name[len("liquid-") :].removesuffix("-ablation") in PRESETS
    return name in DIT_CONFIGS or name == "unet2d"


def npm_pack(spec: str, cache_dir: str) -> str:
    """Path of the npm tarball of ``spec`` (``name@version``) in ``cache_dir``, fetched with ``npm pack`` once."""
    name, version = spec.rsplit("@", 1)
    path = os.path.join(cache_dir, f"{name.replace('/', '-').lstrip('@')}-{version}.tgz")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        if shutil.which("npm") is None:
            raise FileNotFoundError(f"npm is needed to fetch {spec}; install Node.js or put {path} there by hand")
        subprocess.run(["npm", "pack", spec, "--pack-destination", cache_dir], check=True, capture_output=True)
    return path


def make_shapes(n: int, seed: int, size: int = 32, supersample: int = 2) -> torch.Tensor:
    """``n`` RGB images in [-1, 1], shape [n, 3, size, size]: coloured shapes on gradient backgrounds (deterministic)."""
    rng = np.random.default_rng(seed)
    s = size * supersample
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)
        img = c0[:, None, None] * (1 - ramp) + c1[:, None, None] * ramp
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(0, 4)
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            color = rng.uniform(0, 1, 3)
            if kind == 0:  # disc
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            elif kind == 1:  # axis-aligned square
                mask = (abs(xx - cx) < r) & (abs(yy - cy) < r)
            elif kind == 2:  # upward triangle
                mask = (yy < cy + r) & (yy - (cy - r) > 2 * abs(xx - cx))
            else:  # ring
                d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
                mask = (d < r) & (d > 0.55 * r)
            img = np.where(mask[None], color[:, None, None], img)
        img = img.reshape(3, size, supersample, size, supersample).mean(axis=(2, 4))  # anti-aliasing
        images[i] = img * 2 - 1
    return torch.from_numpy(images)


def build_vae():
    """A random-weight ``AutoencoderKL`` with SD-VAE's shape (83.7M params); same cost as the real one."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD_VAE_CONFIG).eval().requires_grad_(False)


def count_params(model: nn.Module) -> float:
    """Parameters in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


# ------------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, synchronising the accelerator before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(jobs: dict[str, Callable[[], float]], rounds: int, log: Callable[[str], None] = print) -> dict:
    """Runs every job once per round, in rotating order, so that a slowdown of the machine hits all of them alike.

    Each job returns a rate (higher is better) or a duration; the result maps name -> list of per-round values.
    """
    names, values = list(jobs), {name: [] for name in jobs}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            values[name].append(jobs[name]())
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {values[n][-1]:.3g}" for n in names))
    return values


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def spread(xs: list[float]) -> float:
    """(max - min) / median, in percent: how noisy the rounds were."""
    return 100.0 * (max(xs) - min(xs)) / statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_cpu_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Measures the peak memory *added* by the enclosed block, in MiB; read ``result["mib"]`` after the block.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` at entry
    (so models built earlier and still alive are not counted).
    CPU: peak RSS delta (see the module docstring). ``result["how"]`` says which method was used.
    """
    result: dict = {}
    _release_cpu_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        result["how"] = "torch.cuda.max_memory_allocated delta"
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base, how = _proc_status_kb("VmRSS"), "peak RSS delta (VmHWM after clear_refs)"
    except OSError:
        base, how = None, None
    if base is None:
        base, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss delta (lower bound)"
    yield result
    peak = (
        _proc_status_kb("VmHWM") if how.startswith("peak RSS") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    result["mib"], result["how"] = (peak - base) / 1024, how


# ------------------------------------------------------------------------------------------------------------------
# Training step, FLOPs, machine description
# ------------------------------------------------------------------------------------------------------------------


def make_train_step(
    model: nn.Module,
    batch: torch.Tensor,
    lr: float = 1e-4,
    autocast_dtype: torch.dtype | None = None,
    vae=None,
    generator: torch.Generator | None = None,
) -> Callable[[], torch.Tensor]:
    """One rectified-flow training step (forward + backward + AdamW) on a fixed batch, as a closure.

    With ``vae``, ``batch`` holds images and each step first encodes them (no grad) -- the "VAE in the loop" setting;
    without it ``batch`` holds (cached) latents.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    device = batch.device

    def step() -> torch.Tensor:
        x0 = batch
        if vae is not None:
            with torch.no_grad():
                x0 = vae.encode(batch).latent_dist.sample() * SD_VAE_SCALING
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = flow.flow_matching_loss(model, x0, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    """``aten.convolution_backward``'s FLOPs with groups counted: torch's formula counts the weight gradient of a
    grouped (depthwise) convolution as if it were dense, C times too many (torch 2.13). The input gradient is a
    transposed convolution with the same weight; the weight gradient takes as many multiply-adds as the forward."""
    from torch.utils.flop_counter import conv_flop_count, get_shape

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, get_shape(out_shape[0]), not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def train_step_flops(model: nn.Module, batch: torch.Tensor) -> float:
    """FLOPs of one forward + backward pass on ``batch`` (``torch.utils.flop_counter``, with grouped convolutions'
    weight gradients counted right; the optimizer is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        loss = flow.flow_matching_loss(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    """(device name, peak dense bf16 TFLOP/s or None when unknown / CPU)."""
    if device.type != "cuda":
        return machine_cpu(), None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return name, value
    return name, None


def machine_cpu() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return f"{model}, {torch.get_num_threads()} torch threads"


def describe_machine(device: torch.device) -> str:
    name, _ = peak_tflops(device)
    return f"{name} | torch {torch.__version__} | python {platform.python_version()}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
