"""Shared offline fixtures: tiny image folders, a Hub-layout parquet dataset and a tiny SD-VAE-shaped VAE.

Everything is written once per test session to a temp dir, so any test file can use them for free:

* ``image_folder``       -- 12 good images of mixed PIL modes and formats in nested folders, plus the bad cases
                            (a truncated JPEG, a text file named ``.png``, a 4x4 image, a stray ``notes.txt``).
* ``clean_image_folder`` -- 32 learnable 32x32 RGB images (coloured squares/discs on gradients), for training tests.
* ``parquet_dataset``    -- ``data/train-00000-of-00001.parquet`` with an ``image`` column of the ``Image`` feature.
* ``tiny_vae_dir``       -- a random ``AutoencoderKL`` with SD-VAE's shape (4 latent channels, 8x downsampling,
                            scaling_factor 0.18215) but tiny widths, saved with ``save_pretrained``.
"""

from __future__ import annotations

import io
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
    from datasets import Dataset, Features, Image as ImageFeature, Value

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
