"""``python -m liquid_diffusion preview``: a grid of images exactly as training sees them (after the VAE round trip
with ``--vae``), with how many were read, skipped (undecodable) and upscaled."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .data import ImageBatchStream, image_grid
from .errors import check_number
from .latents import FrozenVAE, vae_dtype
from .sources import DATASETS, DEFAULT_DATASET


def add_preview_command(subparsers) -> None:
    """Registers ``preview``: a grid of images exactly as training sees them, with read/skipped/upscaled counts."""
    parser = subparsers.add_parser(
        "preview",
        help="write a grid of training images (after the VAE round trip with --vae) and count bad/small files",
        description="Writes a grid of images exactly as training sees them and prints how many images were read, "
        "skipped (undecodable) and upscaled (smaller than --resolution).",
    )
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"short name ({', '.join(DATASETS)}), Hub id or local folder (default: {DEFAULT_DATASET})",
    )
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--config-name", default=None, help="dataset configuration (subset) name, if any")
    parser.add_argument("--image-column", default=None, help="image column (default: found from the features)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="training resolution in pixels: images are resized and cropped to this square (default: 256)",
    )
    parser.add_argument("--num", type=int, default=16, help="number of images in the grid (default: 16)")
    parser.add_argument("--out", default="preview.png", help="output PNG path (default: preview.png)")
    parser.add_argument(
        "--vae",
        default=None,
        help="latent space: show images after encode+decode by this VAE (Hub id or path; default: none, pixel space)",
    )
    parser.add_argument(
        "--random-crop", action="store_true", help="random instead of center crop, as train --random-crop"
    )
    parser.add_argument(
        "--no-flip", dest="flip", action="store_false", help="no random horizontal flips (train flips unless --no-flip)"
    )
    parser.add_argument(
        "--shuffle-buffer",
        type=int,
        default=1000,
        help="streaming shuffle buffer size; 0 keeps the source order (default: 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle, crops and flips (default: 0)")
    parser.set_defaults(
        func=run_preview,
        offline_advice={
            "dataset": "to preview without the Hub pass a local image folder (--dataset PATH)",
            "vae": "to preview without the Hub leave out --vae (pixel space), or pass a local VAE folder (--vae PATH, "
            "written by AutoencoderKL.save_pretrained)",
        },
    )


def run_preview(args: argparse.Namespace) -> int:
    for name, minimum in (("num", 1), ("resolution", 1), ("shuffle_buffer", 0), ("seed", 0)):
        check_number(args, name, minimum)
    stream = ImageBatchStream(
        args.dataset,
        args.resolution,
        args.num,
        split=args.split,
        config_name=args.config_name,
        image_column=args.image_column,
        random_crop=args.random_crop,
        flip=args.flip,
        shuffle_buffer=args.shuffle_buffer,
        seed=args.seed,
        num_epochs=1,
    )
    pixels = next(batch for batch in stream if len(batch))
    if args.vae:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        vae = FrozenVAE(args.vae, device=device, dtype=vae_dtype(device))
        pixels = vae.decode(vae.encode(pixels)).cpu()
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pixels).save(out)
    stats = stream.stats
    print(
        f"{args.dataset}: read {stats.read} images, skipped {stats.skipped} (undecodable), upscaled "
        f"{stats.upscaled} (shorter side below {args.resolution}px); wrote a grid of {len(pixels)} to {out}"
    )
    return 0
