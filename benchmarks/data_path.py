"""Data-path throughput: is data ever the bottleneck of training?

Measures, on this machine:

1. decode + transform at 256 px (``ImageBatchStream`` through ``make_dataloader``) with 0, 1, 2 workers, on a folder
   of synthetic 512x512 JPEGs (AFHQv2's native size; noisy textures so the files are as heavy as photos);
2. VAE encode images/s of an ``AutoencoderKL`` with the real SD-VAE config (``stabilityai/sd-vae-ft-mse``'s shape,
   83.7M params) but **random weights**, since the Hub may be unreachable -- the cost is the same;
3. latent-cache read rate: ``load_latent_cache`` from disk, then ``LatentBatchStream`` batches of 8 (4x32x32);
   the cache is built by ``build_latent_cache`` with a tiny random VAE of the same 8x / 4-channel shape;
4. the training rate of ``LiquidDiffusionUNet.from_preset("tiny")`` at batch 8 on 4x32x32 latents
   (forward + backward + AdamW), to check that the cache serves latents >= 10x faster than the model consumes them.

Usage: ``python -m benchmarks.data_path [--quick] [--device cpu|cuda|auto]``. Not a test: numbers depend on the machine
and its load; every rate is the median of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import SD_VAE_CONFIG  # stabilityai/sd-vae-ft-mse's shape, random weights
from liquid_diffusion import flow
from liquid_diffusion.data import ImageBatchStream, make_dataloader
from liquid_diffusion.latents import FrozenVAE, LatentBatchStream, build_latent_cache, load_latent_cache
from liquid_diffusion.model import LiquidDiffusionUNet

TINY_VAE_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


def write_jpegs(folder: Path, count: int, size: int = 512) -> None:
    """Synthetic photo-like JPEGs: smooth colour fields plus noise, ~100 KB each at 512 px like AFHQ."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.stack([xx, yy, 1 - xx], -1))
        pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.jpg", quality=90)


def rate(count: int, seconds: float) -> float:
    return count / seconds


def decode_rate(folder: Path, resolution: int, num_workers: int, batches: int) -> float:
    """Images/s of decode + transform through the DataLoader, batches of 16, worker start-up included (timing
    after a warm-up batch would count the workers' prefetched batches as free)."""
    stream = ImageBatchStream(str(folder), resolution, 16, shuffle_buffer=256, seed=0)
    start, images = time.perf_counter(), 0
    iterator = iter(make_dataloader(stream, num_workers))
    for _ in range(batches):
        images += len(next(iterator))
    elapsed = time.perf_counter() - start
    del iterator
    return rate(images, elapsed)


def vae_encode_rate(vae: FrozenVAE, resolution: int, batch: int, device: torch.device) -> float:
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    vae.encode(pixels[:1])  # warm-up
    sync(device)
    start = time.perf_counter()
    vae.encode(pixels)
    sync(device)
    return rate(batch, time.perf_counter() - start)


def cache_rates(cache: Path, batches: int) -> tuple[float, float]:
    """(latents/s of load_latent_cache from disk, latents/s of LatentBatchStream batches of 8)."""
    start = time.perf_counter()
    latents, _ = load_latent_cache(cache)
    load = rate(len(latents), time.perf_counter() - start)
    iterator = iter(make_dataloader(LatentBatchStream(latents, 8, seed=0)))
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return load, rate(8 * batches, time.perf_counter() - start)


def train_rate(device: torch.device, steps: int) -> float:
    """Images/s of the tiny preset at batch 8 on 4x32x32 latents: forward + backward + AdamW."""
    torch.manual_seed(0)
    model = LiquidDiffusionUNet.from_preset("tiny").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(8, 4, 32, 32, device=device)

    def step():
        loss = flow.flow_matching_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return rate(8 * steps, time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="fewer images, batches and rounds (about a minute)")
    parser.add_argument("--device", default="auto", help="device for the VAE and the training step")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=None, help="repetitions per measurement (median reported)")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rounds = args.rounds or (1 if args.quick else 3)
    num_images, decode_batches = (96, 12) if args.quick else (384, 48)
    vae_batch, cache_batches, train_steps = (2, 200, 2) if args.quick else (8, 2000, 10)
    median = lambda fn: statistics.median(fn() for _ in range(rounds))  # noqa: E731

    print(
        f"device {device} | torch {torch.__version__} | {os.cpu_count()} CPU cores | "
        f"{torch.get_num_threads()} torch threads | {rounds} round(s)"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        write_jpegs(folder, num_images)
        for workers in args.workers:
            results[f"decode + transform {args.resolution}px, {workers} workers"] = median(
                lambda: decode_rate(folder, args.resolution, workers, decode_batches)
            )
            print(list(results.items())[-1])

        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        sd_vae = FrozenVAE(AutoencoderKL(**SD_VAE_CONFIG), device=device, chunk_size=vae_batch)
        params = sum(p.numel() for p in sd_vae.vae.parameters()) / 1e6
        results[f"SD-VAE encode {args.resolution}px (random weights, {params:.1f}M params)"] = median(
            lambda: vae_encode_rate(sd_vae, args.resolution, vae_batch, device)
        )
        print(list(results.items())[-1])
        sd_vae = None  # freed before the next model is built

        tiny_vae = FrozenVAE(AutoencoderKL(**TINY_VAE_CONFIG))
        cache = build_latent_cache(str(folder), tiny_vae, Path(tmp) / "cache", args.resolution, progress=False)
        loads, streams = zip(*(cache_rates(cache, cache_batches) for _ in range(rounds)))
        results["latent cache: load_latent_cache from disk (latents/s)"] = statistics.median(loads)
        results["latent cache: LatentBatchStream, batch 8 (latents/s)"] = statistics.median(streams)
        print(list(results.items())[-1])

    results["train tiny preset, batch 8, 4x32x32 fwd+bwd+AdamW"] = median(lambda: train_rate(device, train_steps))
    print("\n| measurement | images/s |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:,.0f} |" if value >= 100 else f"| {name} | {value:.3g} |")
    train = results["train tiny preset, batch 8, 4x32x32 fwd+bwd+AdamW"]
    served = results["latent cache: LatentBatchStream, batch 8 (latents/s)"]
    verdict = "OK" if served >= 10 * train else "TOO SLOW"
    print(f"\ncache serves {served / train:,.0f}x the tiny model's training rate (needs >= 10x): {verdict}")
    return 0 if served >= 10 * train else 1


if __name__ == "__main__":
    sys.exit(main())
