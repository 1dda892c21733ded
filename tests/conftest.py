"""Shared offline fixtures: tiny image folders, a Hub-layout parquet dataset and a tiny SD-VAE-shaped VAE.

Everything is written once per test session to a temp dir, so any test file can use them for free:

* ``image_folder``       -- 12 good images of mixed PIL modes and formats in nested folders, plus the bad cases
                            (a truncated JPEG, a text file named ``.png``, a 4x4 image, a stray ``notes.txt``).
* ``clean_image_folder`` -- 32 learnable 32x32 RGB images (coloured squares/discs on gradients), for training tests.
* ``parquet_dataset``    -- ``data/train-00000-of-00001.parquet`` with an ``image`` column of the ``Image`` feature.
* ``tiny_vae_dir``       -- a random ``AutoencoderKL`` with SD-VAE's shape (4 latent channels, 8x downsampling,
                            scaling_factor 0.18215) but tiny widths, saved with ``save_pretrained``.
* ``pixel_run``, ``latent_run`` -- fake training output dirs in the trainer's exact layout (micro U-Nets; metrics,
                            sample grids, complete checkpoints 250 and 500, a half-written 750), for export and push.
* ``pixel_export``, ``latent_export`` -- those runs exported with ``export_checkpoint``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# What ``image_folder`` holds, for assertions: good images, undecodable ones, and those smaller than 32 px.
IMAGE_FOLDER_GOOD = 13  # 12 ordinary images + the 4x4 one
IMAGE_FOLDER_CORRUPT = 2  # truncated JPEG + text file named .png
IMAGE_FOLDER_TINY = 1  # 4x4, upscaled at any resolution >= 8


def _pattern(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth RGB uint8 pattern (gradient + disc), different for each seed."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    grad = rng.uniform(-2, 2, (3, 2))
    img = base + np.stack([grad[c, 0] * xx + grad[c, 1] * yy for c in range(3)], -1)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, min(w, h) / 4
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rgb(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray(_pattern(seed, size), "RGB")


def _write_mixed_images(root: Path) -> None:
    (root / "cats" / "big").mkdir(parents=True)
    (root / "dogs").mkdir()
    _rgb(0).save(root / "cats" / "rgb.png")
    _rgb(1, (64, 48)).save(root / "cats" / "rgb.jpg", quality=90)
    _rgb(2).save(root / "cats" / "big" / "rgb.webp")
    _rgb(3).save(root / "cats" / "big" / "rgb.bmp")
    _rgb(4).convert("L").save(root / "dogs" / "gray.jpg")
    la = _rgb(5).convert("LA")
    la.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (40, 1))))
    la.save(root / "dogs" / "gray_alpha.png")
    _rgb(6).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "dogs" / "palette.gif")
    transparent_palette = _rgb(7).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette.info["transparency"] = 0
    transparent_palette.save(root / "dogs" / "palette_transparent.png", transparency=0)
    rgba = _rgb(8).convert("RGBA")
    alpha = np.full((40, 48), 255, np.uint8)
    alpha[:, :24] = 0  # left half fully transparent: must come out white
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "rgba.png")
    _rgb(9).convert("CMYK").save(root / "cmyk.jpg")
    deep = (np.asarray(_rgb(10).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(root / "gray16.png")  # uint16 -> mode I;16
    _rgb(11, (40, 56)).save(root / "tall.png")
    _rgb(12, (4, 4)).save(root / "tiny.png")
    # Bad cases: a truncated JPEG, a text file with an image extension, and a non-image file.
    buffer = io.BytesIO()
    _rgb(13, (64, 64)).save(buffer, "JPEG")
    (root / "dogs" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (root / "not_an_image.png").write_text("this is not a PNG")
    (root / "notes.txt").write_text("a non-image file that the image loader must ignore")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A folder of 12 mixed-mode images (RGB, L, LA, P, P+transparency, RGBA, CMYK, I;16; png/jpg/webp/gif/bmp)
    in nested subfolders, plus a 4x4 image, a truncated JPEG, a text file named ``.png`` and a ``notes.txt``."""
    root = tmp_path_factory.mktemp("image_folder")
    _write_mixed_images(root)
    return root


def _clean_image(index: int, size: int = 32) -> Image.Image:
    """One of four learnable classes (red square, green disc, blue bar, yellow cross) on a soft gradient."""
    rng = np.random.default_rng(1000 + index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    shade = rng.uniform(0.2, 0.4)
    img = np.stack([shade + 0.3 * xx, shade + 0.3 * yy, np.full_like(xx, shade + 0.15)], -1)
    kind = index % 4
    cx, cy = rng.uniform(0.35, 0.65, 2)
    if kind == 0:
        mask = (abs(xx - cx) < 0.2) & (abs(yy - cy) < 0.2)
        color = (0.9, 0.1, 0.1)
    elif kind == 1:
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.06
        color = (0.1, 0.85, 0.2)
    elif kind == 2:
        mask = abs(yy - cy) < 0.12
        color = (0.15, 0.2, 0.95)
    else:
        mask = (abs(xx - cx) < 0.08) | (abs(yy - cy) < 0.08)
        color = (0.95, 0.9, 0.1)
    img[mask] = color
    return Image.fromarray((img * 255).round().astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def clean_image_folder(tmp_path_factory) -> Path:
    """32 good 32x32 RGB PNGs of four simple classes (square, disc, bar, cross): learnable by a micro model."""
    root = tmp_path_factory.mktemp("clean_images")
    for i in range(32):
        _clean_image(i).save(root / f"img_{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory) -> Path:
    """A dataset directory in the Hub's layout: ``data/train-00000-of-00001.parquet`` with 10 rows,
    an ``image`` column of the ``datasets.Image`` feature and a ``text`` column."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    root = tmp_path_factory.mktemp("parquet_dataset")
    (root / "data").mkdir()
    images = [_rgb(100 + i, (40 + 4 * i, 40)) for i in range(10)]
    dataset = Dataset.from_dict(
        {"image": images, "text": [f"pattern {i}" for i in range(10)]},
        features=Features({"image": ImageFeature(), "text": Value("string")}),
    )
    dataset.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A random ``AutoencoderKL`` with SD-VAE's shape (4 down blocks = 8x downsampling, 4 latent channels,
    scaling_factor 0.18215) and tiny widths, saved with ``save_pretrained``; load it by path."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.18215,
    )
    root = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(root)
    return root


# ---------------------------------------------------------------------------------------------------------------
# Fake training runs in the trainer's exact layout, and their exports (tests/test_export.py, tests/test_hub.py)
# ---------------------------------------------------------------------------------------------------------------

FAKE_TOKEN = "hf_FAKEtokenFAKEtokenFAKEtoken1234"
MICRO = dict(widths=(8, 16), depths=(1, 1), bottleneck_depth=1)  # downsample factor 2
REQUIRED_EXPORT_FILES = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet_raw/config.json",
    "unet_raw/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "train_config.json",
    "samples.png",
    "loss_curve.png",
    "README.md",
}
VAE_FILES = {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}


def micro_unet(in_channels: int, seed: int):
    """A micro U-Net whose zero-initialised layers are perturbed, so its velocity is not identically zero."""
    import torch

    from liquid_diffusion import LiquidDiffusionUNet

    torch.manual_seed(seed)
    unet = LiquidDiffusionUNet(in_channels=in_channels, **MICRO).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return unet


def write_fake_checkpoint(output_dir: Path, step: int, config: dict, in_channels: int) -> Path:
    checkpoint = output_dir / f"checkpoint-{step:06d}"
    micro_unet(in_channels, seed=step).save_pretrained(checkpoint / "unet", safe_serialization=True)
    micro_unet(in_channels, seed=step + 1).save_pretrained(checkpoint / "unet_ema", safe_serialization=True)
    (checkpoint / "train_config.json").write_text(json.dumps(config, indent=2))
    (checkpoint / "state.json").write_text(json.dumps({"step": step, "batches_consumed": step}))
    (checkpoint / "training_state.pt").write_bytes(b"optimizer state: never read by export or push")
    return checkpoint


def make_run(output_dir: Path, *, space: str, vae: str, dataset: str, resolution: int) -> Path:
    """An output dir with metrics, two sample grids, complete checkpoints 250 and 500 and a half-written 750."""
    config = dict(
        dataset=dataset,
        preset="micro",
        resolution=resolution,
        space=space,
        vae=vae,
        steps=1000,
        batch_size=4,
        lr=1e-4,
        seed=0,
        timestep_sampling="uniform",
        sample_steps=25,
        push_to_hub="me/liquid",
        hub_token=FAKE_TOKEN,  # a careless config: must never reach the export
    )
    in_channels = 4 if space == "latent" else 3
    output_dir.mkdir(parents=True)
    with open(output_dir / "metrics.jsonl", "w") as handle:
        for step in range(50, 801, 50):
            bins = [1.0 - 0.05 * i for i in range(10)] if step % 100 == 0 else None
            record = dict(
                step=step, loss=1.0 / (1 + step / 100), lr=1e-4, images_per_s=100.0, grad_norm=0.5, loss_t_bins=bins
            )
            handle.write(json.dumps(record) + "\n")
        handle.write('{"step": 850, "loss": 0.1')  # a line being written when the export runs
    (output_dir / "samples").mkdir()
    for step, colour in ((250, "red"), (500, "blue"), (750, "green")):
        Image.new("RGB", (64, 64), colour).save(output_dir / "samples" / f"step-{step:06d}.png")
    write_fake_checkpoint(output_dir, 250, config, in_channels)
    write_fake_checkpoint(output_dir, 500, config, in_channels)
    half = output_dir / "checkpoint-000750"  # no state.json yet: incomplete
    micro_unet(in_channels, seed=750).save_pretrained(half / "unet", safe_serialization=True)
    return output_dir


@pytest.fixture(scope="session")
def pixel_run(tmp_path_factory) -> Path:
    return make_run(
        tmp_path_factory.mktemp("pixel") / "run",
        space="pixel",
        vae="stabilityai/sd-vae-ft-mse",
        dataset="anime",
        resolution=16,
    )


@pytest.fixture(scope="session")
def latent_run(tmp_path_factory, tiny_vae_dir) -> Path:
    return make_run(
        tmp_path_factory.mktemp("latent") / "run",
        space="latent",
        vae=str(tiny_vae_dir),
        dataset="huggan/AFHQv2",
        resolution=32,
    )


@pytest.fixture(scope="session")
def pixel_export(pixel_run, tmp_path_factory) -> Path:
    from liquid_diffusion.export import export_checkpoint

    return export_checkpoint(pixel_run, tmp_path_factory.mktemp("exports") / "pixel", repo_id="me/liquid-anime")


@pytest.fixture(scope="session")
def latent_export(latent_run, tmp_path_factory) -> Path:
    from liquid_diffusion.export import export_checkpoint

    return export_checkpoint(latent_run, tmp_path_factory.mktemp("exports") / "latent")


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
