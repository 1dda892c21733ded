"""Sampling from a trained model: image grids for training, the ``sample`` command and the notebook.

``generate`` integrates the flow ODE with the package's own sampler (``flow.sample``: Euler or Heun, optionally
with classifier-free guidance) from seeded noise and decodes through the frozen VAE; ``save_grid`` writes the
images as one PNG, atomically; ``load_for_sampling`` loads any checkpoint, export or Hub id.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import flow
from .data import image_grid
from .errors import DiskFullError, check_number, disk_full, first_line
from .hub import load_pipeline
from .latents import FrozenVAE, vae_dtype
from .model import LiquidDiffusionUNet
from .pipeline import DEFAULT_STEPS


@torch.no_grad()
def generate(
    model: LiquidDiffusionUNet,
    vae,
    num_images: int,
    steps: int = 25,
    sampler: str = "euler",
    *,
    seed: int = 0,
    resolution: int | None = None,
    progress: bool = False,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Samples ``num_images`` images in [-1, 1] (decoded through ``vae`` when given) from seeded noise.

    ``progress`` shows a bar over the model calls (``steps`` for Euler, ``2 * steps`` for Heun). ``class_labels``
    (int64 ids [num_images], class-conditional models) samples those classes with classifier-free guidance
    ``guidance_scale`` (``flow.guided_velocity``); without them a conditional model samples unconditionally.
    """
    device = next(model.parameters()).device
    channels = model.config.in_channels
    size = resolution // (vae.downsample_factor if vae is not None else 1)
    noise = torch.randn(num_images, channels, size, size, generator=torch.Generator().manual_seed(seed))
    velocity_fn = model
    if class_labels is not None:
        velocity_fn = flow.guided_velocity(model, class_labels.to(device), guidance_scale, model.null_class)
    calls = steps * flow.MODEL_CALLS_PER_STEP[flow.check_sampler(sampler)]
    with tqdm(total=calls, desc="sampling", unit="step", disable=not progress) as bar:

        def velocity(x, t):
            out = velocity_fn(x, t)
            bar.update(1)
            return out

        x = flow.sample(velocity, noise.to(device), steps, sampler)
    if vae is not None:
        x = vae.decode(x)
    return x.float().clamp(-1, 1).cpu()


def class_grid_labels(model: LiquidDiffusionUNet, num_images: int, max_rows: int = 8):
    """``(labels, columns)`` of a grid with one row per class (the first ``max_rows`` classes) and about
    ``num_images`` images in all; ``(None, None)`` for an unconditional model."""
    if not model.config.num_classes:
        return None, None
    rows = max(1, min(model.config.num_classes, max_rows, num_images))
    columns = max(1, num_images // rows)
    return torch.arange(rows).repeat_interleave(columns), columns


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Writes images in [-1, 1] of shape [N, 3, H, W] as one PNG grid, atomically (a viewer never sees half a file)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a folder; give the grid a file name, e.g. {str(path / 'grid.png')!r}"
        )
    try:  # a temporary name of its own: several runs writing one --out never collide
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        with os.fdopen(handle, "wb") as stream:
            image_grid(images, nrow).save(stream, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp's file is private
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise _write_error(path, error) from None
        raise
    return path


def _write_error(path: Path, error: OSError) -> OSError:
    """One line for a grid that cannot be written: a full disk (``DiskFullError``) or a folder that is read-only or
    not ours (``PermissionError``)."""
    if disk_full(error):
        return DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}; free some space")
    return PermissionError(
        f"cannot write {path} ({error.strerror or first_line(error)}); write it to a folder you "
        "can write to (e.g. --out DIR/grid.png)"
    )


# What `sample` and `evaluate` advise when the Hub is unreachable for a latent checkpoint's VAE.
CHECKPOINT_OFFLINE_ADVICE = {
    "vae": "export the checkpoint where the Hub is reachable (the exported folder holds the VAE) and pass that folder "
    "as --checkpoint",
}


def load_for_sampling(
    checkpoint: str, use_ema: bool = True, device: str | torch.device = "cpu", *, with_recommended: bool = False
):
    """``(unet, FrozenVAE or None, resolution)`` from a training checkpoint, an output dir (its newest checkpoint),
    an exported pipeline folder or a Hub id -- whatever ``hub.load_pipeline`` accepts. ``with_recommended`` appends
    ``Recommended(guidance_scale, steps)``: the model's recommended guidance scale (``None`` when none is recorded)
    and number of steps (a few-step model's ``recommended_steps``, else ``pipeline.DEFAULT_STEPS``).

    The pipeline is the one loader of all four kinds; its parts feed ``generate``, which shares the sampler
    (``flow.sample``, ``flow.guided_velocity``) and the decode (``latents.unscale_latents``) with the pipeline's own
    ``__call__`` and adds what training grids and FID need: seeded CPU noise and a chunked bf16/fp32 VAE."""
    pipe = load_pipeline(checkpoint, use_ema=use_ema)
    device = torch.device(device)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae = FrozenVAE(vae, device=device, dtype=vae_dtype(device))
    loaded = pipe.unet.to(device).eval(), vae, pipe.config.resolution
    recommended = Recommended(pipe.config.get("guidance_scale"), pipe.config.get("recommended_steps") or DEFAULT_STEPS)
    return (*loaded, recommended) if with_recommended else loaded


class Recommended(NamedTuple):
    """What a model's pipeline config recommends for sampling it."""

    guidance_scale: float | None
    steps: int


def _run_sample(args: argparse.Namespace) -> int:
    flow.check_sampler(args.sampler)
    for name, minimum in (("num_images", 1), ("seed", 0)):
        check_number(args, name, minimum)
    if args.steps is not None:
        check_number(args, "steps", 1)
    if args.resolution is not None:
        check_number(args, "resolution", 1)
    if args.guidance_scale is not None:
        check_number(args, "guidance_scale", 0)  # NaN and inf too
    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(
            f"--out {str(out)!r} is a folder; give the grid a file name, e.g. {str(out / 'grid.png')!r}"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    unet, vae, resolution, recommended = load_for_sampling(
        args.checkpoint, use_ema=not args.raw, device=device, with_recommended=True
    )
    if args.guidance_scale is None:
        guidance = recommended.guidance_scale
        args.guidance_scale = guidance if guidance is not None else flow.DEFAULT_GUIDANCE_SCALE
    if args.steps is None:
        args.steps = recommended.steps
    resolution = args.resolution or resolution
    if resolution is None:
        raise ValueError("the checkpoint does not record its resolution; pass --resolution")
    factor = unet.downsample_factor * (vae.downsample_factor if vae is not None else 1)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} must be a multiple of {factor} for this model")
    labels, columns = class_grid_labels(unet, args.num_images, max_rows=args.num_images)
    if args.class_label is not None:  # names or ids; refused with one line for an unconditional model
        labels, columns = unet.class_ids(args.class_label).expand(args.num_images), None
    images = generate(
        unet,
        vae,
        len(labels) if labels is not None else args.num_images,
        args.steps,
        args.sampler,
        seed=args.seed,
        resolution=resolution,
        progress=True,
        class_labels=labels,
        guidance_scale=args.guidance_scale,
    )
    print(f"wrote {save_grid(images, out, columns)}")
    return 0


def add_sample_command(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="sample an image grid from a checkpoint (EMA weights)")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint-NNNNNN dir, a training output dir (newest checkpoint), an exported folder "
        "or a Hub id USER/NAME",
    )
    parser.add_argument("--num-images", type=int, default=16, help="images in the grid (default: 16)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"ODE integration steps (default: the model's recommended steps, e.g. 1-2 after reflow; else {DEFAULT_STEPS})",
    )
    parser.add_argument("--sampler", default="euler", help="euler or heun (default: euler)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--out", default="grid.png", help="output PNG (default: grid.png)")
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--resolution", type=int, default=None, help="override the checkpoint's resolution")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--class",
        dest="class_label",
        default=None,
        metavar="NAME|ID",
        help="class-conditional models: sample this class (default: one row per class)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale w for class-conditional models; 1 = no guidance "
        f"(default: the model's recommended scale, else {flow.DEFAULT_GUIDANCE_SCALE})",
    )
    parser.set_defaults(func=_run_sample, offline_advice=CHECKPOINT_OFFLINE_ADVICE)
