"""A first run that needs nothing: no GPU, no Hub, no dataset to download.

``python -m liquid_diffusion quickstart`` draws a small built-in dataset of coloured shapes (a disc, a square, a
bar or a cross on a soft two-colour background, 32x32 pixels, generated on the spot), trains the ``micro`` model on
it in pixel space (about 5 minutes on a 2-core CPU), and writes ``samples/progress.png``: the sample grid at every
stage side by side, from noise to shapes, always from the same noise. Interrupt it at any time; running the same
command again resumes. A quickstart of an older release's architecture cannot be resumed: it is renamed aside
(``<output-dir>-version<N>``, nothing deleted) and a new one starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .checkpoints import CorruptCheckpointError, list_checkpoints, read_json
from .config import TrainConfig
from .errors import check_not_a_file, check_number
from .metrics import TrainerCallback
from .model import FORMAT_VERSION
from .trainer import Trainer

COLOURS = np.array([(220, 40, 40), (40, 170, 60), (40, 70, 220), (240, 200, 30)], dtype=np.float32)


def shape_image(index: int, size: int = 32) -> Image.Image:
    """Image ``index`` of the built-in set: shape ``index % 4`` in its colour, at a random place, on a gradient."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    top, bottom = rng.uniform(150, 250, 3), rng.uniform(150, 250, 3)
    pixels = top * (1 - yy[..., None]) + bottom * yy[..., None]
    cx, cy = rng.uniform(0.3, 0.7, 2)
    kind = index % 4
    if kind == 0:  # disc
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.22**2
    elif kind == 1:  # square
        mask = (abs(xx - cx) < 0.2) & (abs(yy - cy) < 0.2)
    elif kind == 2:  # horizontal bar
        mask = (abs(yy - cy) < 0.1) & (abs(xx - 0.5) < 0.4)
    else:  # cross
        mask = ((abs(xx - cx) < 0.08) | (abs(yy - cy) < 0.08)) & (abs(xx - cx) < 0.3) & (abs(yy - cy) < 0.3)
    pixels[mask] = COLOURS[kind]
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def make_shapes_folder(folder: str | Path, count: int = 1024, size: int = 32) -> Path:
    """Writes the first ``count`` built-in images as PNGs into ``folder`` (kept if already complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / f"shape-{index:05d}.png"
        if not path.exists():
            shape_image(index, size).save(path)
    return folder


def progress_strip(sample_paths: list[Path], out: Path) -> Path:
    """The sample grids side by side, each labelled with its step: learning at a glance."""
    grids = [Image.open(path).convert("RGB") for path in sample_paths]
    label_height, gap = 14, 6
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    strip = Image.new("RGB", (width, max(g.height for g in grids) + label_height), "white")
    draw, x = ImageDraw.Draw(strip), 0
    for path, grid in zip(sample_paths, grids):
        strip.paste(grid, (x, label_height))
        draw.text((x + 2, 1), f"step {int(path.stem.split('-')[-1])}", fill="black")
        x += grid.width + gap
    strip.save(out)
    return out


class _Progress(TrainerCallback):
    def on_sample(self, trainer, step, path):
        print(f"\nsample grid at step {step}: {path}")


def quickstart_config(output_dir: str | Path, steps: int = 1000, batch_size: int = 16) -> TrainConfig:
    """The quickstart's training settings: micro model, pixel space, 32 px, CPU-sized."""
    output_dir = Path(output_dir)
    return TrainConfig(
        dataset=str(output_dir / "shapes"),
        space="pixel",
        preset="micro",
        resolution=32,
        flip=False,
        batch_size=batch_size,
        steps=steps,
        lr=2e-3,
        warmup_steps=50,
        ema_decay=0.999,
        shuffle_buffer=1024,
        num_workers=0,
        log_every=25,
        sample_every=max(1, steps // 5),
        num_sample_images=16,
        sample_steps=25,
        checkpoint_every=max(1, steps // 3),
        keep_checkpoints=1,
        output_dir=str(output_dir),
        resume="latest",
    )


def set_aside_older_run(output_dir: str | Path) -> Path | None:
    """Renames ``output_dir`` to ``<output_dir>-version<N>`` when its newest checkpoint was saved by architecture
    version N of an older (or newer) release, which this one cannot resume; returns the new path, else ``None``.

    A user who upgrades and runs the quickstart again wants to see the new model learn, not an error; their old run
    is kept whole. (``train --resume`` refuses such a run in one line instead: there the user must choose.)
    """
    output_dir = Path(output_dir).resolve()
    checkpoints = list_checkpoints(output_dir) if output_dir.is_dir() else []
    if not checkpoints:
        return None
    try:
        version = read_json(checkpoints[-1] / "unet" / "config.json").get("format_version", 1)
    except CorruptCheckpointError:
        return None  # damaged checkpoints are the trainer's to report and skip
    if version == FORMAT_VERSION:
        return None
    target, copy = output_dir.with_name(f"{output_dir.name}-version{version}"), 1
    while target.exists():
        copy += 1
        target = output_dir.with_name(f"{output_dir.name}-version{version}-{copy}")
    output_dir.rename(target)
    return target


def _run_quickstart(args: argparse.Namespace) -> int:
    check_number(args, "steps", 1)
    check_number(args, "batch_size", 1)
    check_not_a_file(args.output_dir, "--output-dir")
    moved = set_aside_older_run(args.output_dir)
    if moved is not None:
        print(
            f"{args.output_dir} held a quickstart of an older LiquidDiffusion architecture, which this release "
            f"cannot resume: kept it as {moved} and starting a new one"
        )
    config = quickstart_config(args.output_dir, args.steps, args.batch_size)
    make_shapes_folder(config.dataset)
    print(
        f"built-in dataset: 1024 shapes (32x32) in {config.dataset}; training the micro model for {config.steps} "
        f"steps in {config.output_dir} (Ctrl-C saves; the same command resumes)"
    )
    try:
        trainer = Trainer(config, callbacks=[_Progress()])
        trainer.resume_hint = "run the same quickstart command again to continue"
        trainer.train()
    except KeyboardInterrupt:
        return 130
    grids = sorted((Path(config.output_dir) / "samples").glob("step-*.png"))
    strip = progress_strip(grids, Path(config.output_dir) / "samples" / "progress.png")
    print(
        f"done: {strip} shows the samples from step {grids[0].stem[5:].lstrip('0')} to {config.steps}, "
        "left to right (same noise in every grid)"
    )
    return 0


def add_quickstart_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="train a tiny model on built-in shapes, offline, in ~5 minutes on a CPU",
        description=__doc__.splitlines()[0] + " Trains the micro model on a generated dataset of shapes and writes "
        "samples/progress.png.",
    )
    parser.add_argument("--output-dir", default="outputs/quickstart", help="where everything goes")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    parser.set_defaults(func=_run_quickstart)
