"""The training-recipe study, through the product's own ``Trainer``: what ``train`` users get, measured.

Every run is ``Trainer(TrainConfig(...)).train()`` on a folder of real images in pixel space at 32 px, the code path
users run (data stream, EMA, clipping, precision, schedule, checkpoints), scored by the trainer's own validation loss
(``validation.py``: held-out images, fixed t grid, fixed noise). Peers (DiT, UNet2DModel) go through the same trainer:
``PeerTrainer`` only swaps the network (the trainer's ``_build_model`` hook) and skips writing diffusers checkpoints
and sample grids, which the peers' wrappers do not have.

Data (fetched with ``npm pack`` into ``--cache-dir``, never the repo; written once as 32 px PNG folders):

* ``twemoji`` -- the 3786 Twemoji 64 px PNGs of ``emoji-datasource-twitter`` (CC-BY 4.0), flat colour art;
* ``openmoji`` -- the ~4500 OpenMoji colour SVGs of ``openmoji`` (CC-BY-SA 4.0), outlined line art, rasterised with
  cairosvg (``pip install cairosvg``).

A run is a recipe (named in ``RECIPES``, plus ``key=value`` overrides of ``TrainConfig`` fields), a model, a budget
(steps at the recipe's batch size) and a seed; it writes one JSON file. ``plan`` files list runs; ``study`` runs a
plan with N processes of one thread each, skipping runs whose JSON exists; ``table`` prints one row per (recipe,
model, budget) with the mean and spread over seeds.

Example::

    python -m benchmarks.recipe run --recipe today --steps 1500 --seed 0 --out-dir out/recipe
    python -m benchmarks.recipe run --recipe today --set lr=1e-3 lr_schedule=cosine --steps 1500 --out-dir out/recipe
    python -m benchmarks.recipe study --plan benchmarks/recipe_plans/screen.txt --jobs 2 --out-dir out/recipe
    python -m benchmarks.recipe table out/recipe
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from benchmarks import common
from liquid_diffusion.config import TrainConfig
from liquid_diffusion.model import LiquidDiffusionUNet
from liquid_diffusion.trainer import Trainer

RESOLUTION = 32
DATASETS = {
    "twemoji": ("emoji-datasource-twitter@16.0.0", "package/img/twitter/64/", ".png"),
    "openmoji": ("openmoji@17.0.0", "package/color/svg/", ".svg"),
}

# Recipes: TrainConfig values. ``today`` is the trainer's defaults before the study (issue 27).
RECIPES: dict[str, dict] = {
    "today": dict(
        lr=1e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        warmup_steps=500,
        lr_schedule="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        ema_decay=0.9999,
        ema_power=2 / 3,
        timestep_sampling="uniform",
        logit_mean=0.0,
        logit_std=1.0,
        batch_size=8,
    ),
}
# the old benchmark loop's recipe (benchmarks/quality.py): AdamW 0.9/0.99, lr 5e-4, cosine to zero
RECIPES["bench"] = {**RECIPES["today"], "lr": 5e-4, "adam_beta2": 0.99, "warmup_steps": 100, "lr_schedule": "cosine"}

# The trainer's defaults now (chosen by this study), at the CPU's batch of 8.
RECIPES["default"] = {**{name: getattr(TrainConfig(), name) for name in RECIPES["today"]}, "batch_size": 8}

# Peers at micro's scale (the models of the old quality study's defaults) and at tiny's (DiT-S/2 and the matched
# UNet2DModel of the speed benchmarks), built by benchmarks/common.py.
PEERS = {
    "dit-micro": ("dit-s2", dict(hidden=128, depth=12, heads=2)),
    "unet2d-micro": ("unet2d", dict(block_out_channels=(32, 64, 128))),
    "dit-s2": ("dit-s2", {}),
    "unet2d": ("unet2d", {}),
}


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def prepare(name: str, cache_dir: str) -> Path:
    """The folder of ``name``'s images as 32 px RGB PNGs (composited on white, box-filtered), written once."""
    if name not in DATASETS:
        raise SystemExit(f"error: unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    from PIL import Image

    folder = Path(cache_dir) / f"{name}-{RESOLUTION}px"
    done = folder / ".complete"
    if done.is_file():
        return folder
    spec, prefix, suffix = DATASETS[name]
    folder.mkdir(parents=True, exist_ok=True)
    skipped = []
    with tarfile.open(common.npm_pack(spec, cache_dir)) as tar:
        for member in tar.getmembers():
            if not (member.name.startswith(prefix) and member.name.endswith(suffix)):
                continue
            data = tar.extractfile(member).read()
            if suffix == ".svg":
                import cairosvg  # only for openmoji

                try:
                    data = cairosvg.svg2png(bytestring=data, output_width=4 * RESOLUTION, output_height=4 * RESOLUTION)
                except Exception:  # noqa: BLE001 -- an SVG feature cairosvg lacks (e.g. a marker it cannot resolve)
                    skipped.append(member.name)
                    continue
            rgba = Image.open(io.BytesIO(data)).convert("RGBA")
            rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            stem = Path(member.name).stem.lower()
            rgb.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX).save(folder / f"{stem}.png")
    if skipped:
        print(f"{name}: {len(skipped)} images that cairosvg cannot render left out (e.g. {Path(skipped[0]).name})")
    done.write_text(f"ok; left out: {len(skipped)}")
    return folder


# ------------------------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------------------------


class PeerTrainer(Trainer):
    """The product's trainer with a peer network (``PEERS``) in place of the U-Net; no checkpoints or grids."""

    peer: str = ""

    def _build_model(self):
        self.vae = None
        kind, overrides = PEERS[self.peer]
        return common.build_model(kind, in_channels=3, sample_size=self.config.resolution, **overrides)

    def write_samples(self):
        return None

    def save_checkpoint(self):
        self.accelerator.wait_for_everyone()
        return self.output_dir


def with_time_budget(trainer_class: type, seconds: float) -> type:
    """``trainer_class`` that ends its run (validating and saving as at ``--steps``) once ``seconds`` of training have
    passed: the equal wall-clock budget. The clock starts at the first step and stops while the model is validated."""

    class Timed(trainer_class):
        _start = None
        _validating_s = 0.0

        def _train_step(self, batches, stats):
            if self._start is None:
                self._start = time.perf_counter()
            super()._train_step(batches, stats)
            if self.step % 10 == 9 or self.device.type != "cuda":  # a CUDA clock needs a sync: not every step
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if time.perf_counter() - self._start - self._validating_s >= seconds:
                    self.config.steps = self.step + 1  # this step is the last: the loop logs, validates and saves

        def validate(self, progress=None):
            start = time.perf_counter()
            try:
                return super().validate(progress)
            finally:
                self._validating_s += time.perf_counter() - start

    Timed.__name__ = f"Timed{trainer_class.__name__}"
    return Timed


class AblationTrainer(Trainer):
    """The product's trainer with the ``liquid=False`` ablation of the preset (ParallelCfC -> a gated projection)."""

    def _build_model(self):
        self.vae = None
        model = LiquidDiffusionUNet.from_preset(self.config.preset, in_channels=3, liquid=False)
        return model.to(memory_format=torch.channels_last)


def run_name(
    recipe: str, overrides: dict, model: str, steps: int, seed: int, data: str, minutes: float | None = None
) -> str:
    extra = "".join(f"_{k}={v}" for k, v in sorted(overrides.items()))
    budget = f"m{minutes:g}" if minutes else f"s{steps}"
    return f"{data}_{model}_{recipe}{extra}_{budget}_seed{seed}".replace("/", "-")


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def run(
    recipe: str,
    overrides: dict,
    model: str,
    steps: int,
    seed: int,
    data: str,
    cache_dir: str,
    out_dir: str,
    validation_images: int = 256,
    evaluations: int = 4,
    minutes: float | None = None,
    folder: Path | None = None,
) -> dict:
    """Trains one run through ``Trainer`` and returns (and writes) its result: the validation curve and the final
    EMA and raw validation losses, per t too. With ``minutes``, the budget is wall-clock training time instead of
    ``steps`` (then at most ``steps``), validated at the end only. ``folder``: the images of ``data``, when they
    were prepared elsewhere (the GPU machine has no npm)."""
    folder = folder or prepare(data, cache_dir)
    name = run_name(recipe, overrides, model, steps, seed, data, minutes)
    work = Path(out_dir) / "runs" / name
    values = {**RECIPES[recipe], **overrides}
    preset = model.removeprefix("liquid-").removesuffix("-ablation") if model.startswith("liquid-") else "micro"
    settings = dict(
        dataset=str(folder),
        space="pixel",
        resolution=RESOLUTION,
        preset=preset,
        steps=steps,
        seed=seed,
        output_dir=str(work),
        validation_images=validation_images,
        validation_every=0 if minutes else max(1, steps // evaluations),
        log_every=50,
        sample_every=0,
        num_sample_images=4,
        sample_steps=2,
        checkpoint_every=10**9,
        keep_checkpoints=1,
        num_workers=0,
        progress_bar=False,
    )
    if any(work.glob("checkpoint-*")):  # a run cut short (its SIGTERM saved a checkpoint) resumes exactly
        settings["resume"] = "latest"
    elif work.exists():
        import shutil

        shutil.rmtree(work)
    config = TrainConfig(**{**settings, **values})
    if model in PEERS:
        trainer_class = type("Peer", (PeerTrainer,), {"peer": model})
    else:
        trainer_class = AblationTrainer if model.endswith("-ablation") else Trainer
    trainer = (with_time_budget(trainer_class, minutes * 60) if minutes else trainer_class)(config)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val_loss" in r]
    train_logs = [r for r in records if "images_per_s" in r]
    final = validations[-1]
    result = dict(
        name=name,
        data=data,
        model=model,
        recipe=recipe,
        overrides=overrides,
        config=values,
        steps=trainer.step,
        seed=seed,
        minutes=minutes,
        images=trainer.step * config.batch_size,
        params_m=common.count_params(trainer.unwrapped_model),
        val_loss=final["val_loss"],
        val_loss_raw=final["val_loss_raw"],
        val_loss_t=final["val_loss_t"],
        val_loss_raw_t=final["val_loss_raw_t"],
        val_images=final["val_images"],
        curve=[(r["step"], r["val_loss"], r["val_loss_raw"]) for r in validations],
        val_time_s=sum(r["val_time_s"] for r in validations),
        wall_s=wall,
        resumed="resume" in settings,
        images_per_s=statistics.median(r["images_per_s"] for r in train_logs) if train_logs else None,
        machine=common.describe_machine(trainer.device),
        threads=torch.get_num_threads(),
        command=" ".join(
            ["python -m benchmarks.recipe run"] + _run_flags(recipe, overrides, model, steps, seed, data, minutes)
        ),
    )
    (Path(out_dir) / f"{name}.json").write_text(json.dumps(result, indent=1))
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # checkpoints of a study run are not kept
    return result


def _run_flags(recipe, overrides, model, steps, seed, data, minutes=None) -> list[str]:
    flags = ["--recipe", recipe, "--model", model, "--steps", str(steps), "--seed", str(seed), "--data", data]
    if minutes:
        flags += ["--minutes", f"{minutes:g}"]
    if overrides:
        flags += ["--set", *(f"{k}={v}" for k, v in sorted(overrides.items()))]
    return flags


# ------------------------------------------------------------------------------------------------------------------
# A study: many runs, one thread each
# ------------------------------------------------------------------------------------------------------------------


def read_plan(path: str) -> list[list[str]]:
    """A plan: one run's flags per line (``--recipe today --steps 1500 --seed 0 ...``); ``#`` starts a comment."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
    return [shlex.split(line) for line in lines if line]


def study(plan: list[list[str]], jobs: int, out_dir: str, cache_dir: str) -> None:
    """Runs every line of ``plan`` in its own process (one thread), ``jobs`` at once; finished runs are skipped."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    pending = []
    for flags in plan:
        args = parse_args(["run", *flags, "--out-dir", out_dir, "--cache-dir", cache_dir])
        name = run_name(args.recipe, _overrides(args.set), args.model, args.steps, args.seed, args.data, args.minutes)
        if not (Path(out_dir) / f"{name}.json").exists():
            pending.append((name, flags))
    running: list[tuple[str, subprocess.Popen]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_dir = Path(out_dir) / "logs"
    log_dir.mkdir(exist_ok=True)
    while pending or running:
        while pending and len(running) < jobs:
            name, flags = pending.pop(0)
            command = [
                sys.executable,
                "-m",
                "benchmarks.recipe",
                "run",
                *flags,
                "--out-dir",
                out_dir,
                "--cache-dir",
                cache_dir,
                "--threads",
                "1",
            ]
            log = open(log_dir / f"{name}.log", "w")
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
            print(f"started {name}", flush=True)
        time.sleep(2)
        for item in list(running):
            name, process = item
            if process.poll() is not None:
                running.remove(item)
                print(f"{'done' if process.returncode == 0 else f'FAILED ({process.returncode})'} {name}", flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Speed: co-timed training images/s, for the equal wall-clock comparison
# ------------------------------------------------------------------------------------------------------------------


def speed(models: list[str], batch: int = 8, rounds: int = 5, steps: int = 5) -> dict[str, float]:
    """Training images/s of each model at the study's size (pixel space, 32 px, ``batch``), timed in interleaved
    rounds in one process so that a busy machine slows all alike (the study's own runs share cores, so their img/s
    do not compare). Median over rounds."""
    device = torch.device("cpu")
    x0 = torch.randn(batch, 3, RESOLUTION, RESOLUTION)
    jobs = {}
    for name in models:
        torch.manual_seed(0)
        if name in PEERS:
            kind, overrides = PEERS[name]
            model = common.build_model(kind, in_channels=3, sample_size=RESOLUTION, **overrides)
        else:
            model = common.build_model(name, in_channels=3, sample_size=RESOLUTION)
            model = model.to(memory_format=torch.channels_last)  # as the trainer holds the U-Net
        layout = torch.channels_last if name not in PEERS else torch.contiguous_format
        step = common.make_train_step(model.train(), x0.contiguous(memory_format=layout))
        step()  # warm-up
        jobs[name] = lambda step=step: batch * steps / common.timed(lambda: [step() for _ in range(steps)], device)
    return {name: statistics.median(rates) for name, rates in common.interleaved(jobs, rounds).items()}


def val_at_step(result: dict, step: float) -> float | None:
    """The EMA validation loss of ``result``'s curve at ``step``, linear between its points; None before the first."""
    curve = [(s, v) for s, v, _ in result["curve"]]
    if step < curve[0][0]:
        return None
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return curve[-1][1]


# ------------------------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------------------------


def collect(out_dir: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))]


def describe(result: dict) -> str:
    extra = " ".join(f"{k}={v}" for k, v in sorted(result["overrides"].items()))
    return f"{result['recipe']} {extra}".strip()


def table(results: list[dict]) -> str:
    """One row per (data, model, recipe, budget): mean over seeds of the final EMA validation loss, its range, the
    raw weights' loss, t = 0.05 / 0.5 / 0.95 and the training throughput. A budget is steps, or minutes of training
    (then the images column is the mean number the runs saw)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        budget = f"{r['minutes']:g} min" if r.get("minutes") else r["steps"]
        groups.setdefault((r["data"], r["model"], describe(r), budget), []).append(r)
    rows = []
    for (data, model, recipe, budget), runs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], str(kv[0][3]), _mean(kv[1], "val_loss"))
    ):
        losses = [r["val_loss"] for r in runs]
        spread = f"{min(losses):.4f}-{max(losses):.4f}" if len(runs) > 1 else ""

        def at(t):
            return _fmt(statistics.mean(r["val_loss_t"].get(t, float("nan")) for r in runs))

        rows.append(
            [
                data,
                model,
                recipe,
                budget,
                round(_mean(runs, "images")),
                len(runs),
                f"{statistics.mean(losses):.4f}",
                spread,
                _fmt(_mean(runs, "val_loss_raw")),
                at("0.05"),
                at("0.5"),
                at("0.95"),
                _fmt(statistics.median(r["images_per_s"] or 0 for r in runs), 1),
            ]
        )
    header = [
        "data",
        "model",
        "recipe",
        "budget",
        "images",
        "seeds",
        "val (EMA)",
        "range",
        "val (raw)",
        "t=0.05",
        "t=0.5",
        "t=0.95",
        "img/s",
    ]
    return common.markdown_table(header, rows)


def _mean(runs, key):
    return statistics.mean(r[key] for r in runs)


def _fmt(value, digits=4):
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------


def _overrides(pairs: list[str]) -> dict:
    overrides = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"error: --set takes FIELD=VALUE with a TrainConfig field, got {pair!r}")
        overrides[key] = parse_value(value)
    return overrides


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="train one run through Trainer and write its JSON")
    one.add_argument("--recipe", default="today", choices=sorted(RECIPES))
    one.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="TrainConfig overrides")
    one.add_argument(
        "--model",
        default="liquid-micro",
        help="liquid-<preset>, liquid-<preset>-ablation or a peer: " + ", ".join(PEERS),
    )
    one.add_argument("--steps", type=int, default=1500, help="the budget in steps (with --minutes: at most)")
    one.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="the budget in minutes of training (equal wall-clock comparisons), validated at the end",
    )
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--data", default="twemoji", choices=sorted(DATASETS))
    one.add_argument("--threads", type=int, default=None)
    for p in (one, sub.add_parser("study", help="run a plan file, several processes at once")):
        p.add_argument("--out-dir", default="bench_out/recipe")
        p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/liquid-diffusion-bench"))
    sub.choices["study"].add_argument("--plan", required=True)
    sub.choices["study"].add_argument("--jobs", type=int, default=2)
    fast = sub.add_parser("speed", help="co-timed training images/s of models at the study's size")
    fast.add_argument("--models", nargs="+", default=["liquid-micro", "dit-micro", "unet2d-micro"])
    fast.add_argument("--rounds", type=int, default=5)
    fast.add_argument("--threads", type=int, default=1)
    fast.add_argument("--output", help="also write the rates here as JSON")
    tab = sub.add_parser("table", help="print the table of a study's results")
    tab.add_argument("out_dir")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "table":
        print(table(collect(args.out_dir)))
        return 0
    if args.command == "speed":
        torch.set_num_threads(args.threads)
        rates = speed(args.models, rounds=args.rounds)
        print(common.markdown_table(["model", "images/s"], [[m, f"{r:.1f}"] for m, r in rates.items()]))
        if args.output:
            Path(args.output).write_text(
                json.dumps(
                    dict(
                        rates=rates, threads=args.threads, batch=8, machine=common.describe_machine(torch.device("cpu"))
                    )
                )
            )
        return 0
    if args.command == "study":
        study(read_plan(args.plan), args.jobs, args.out_dir, args.cache_dir)
        print(table(collect(args.out_dir)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model not in PEERS and not args.model.startswith("liquid-"):
        raise SystemExit(
            f"error: unknown model {args.model!r}; use liquid-<preset>[-ablation] or one of {', '.join(PEERS)}"
        )
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    result = run(
        args.recipe,
        _overrides(args.set),
        args.model,
        args.steps,
        args.seed,
        args.data,
        args.cache_dir,
        args.out_dir,
        minutes=args.minutes,
    )
    print(
        f"{result['name']}: val_loss {result['val_loss']:.4f} (raw {result['val_loss_raw']:.4f}), "
        f"{result['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
