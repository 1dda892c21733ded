"""Few-step generation by reflow, measured on real images: how close 1, 2 and 4 Euler steps of a reflow student come
to the teacher's many-step ODE sample from the same noise, next to the teacher itself at the same number of model
calls (Euler, and Heun where the calls allow), and the wall-clock per image.

One command runs it all (each stage resumes: the reflow run with ``--resume``, the teacher's reference samples from
``WORK_DIR/reference.safetensors``)::

    python -m benchmarks.reflow --teacher /tmp/reflow-teacher --work-dir /tmp/reflow-study \\
        --out benchmarks/results/reflow-2026-12-07 --pairs 2000 --teacher-steps 8 --reflow-steps 800 --batch-size 16

1. ``python -m liquid_diffusion reflow`` (``ReflowTrainer``) from the teacher into ``WORK_DIR/reflow``: pairs, then
   ``--reflow-steps`` steps; with ``--distill-steps N`` a second stage trains the result at t = 1 only
   (``--distill-t 1``) on the same pairs into ``WORK_DIR/distill``.
2. ``--eval-noises`` noises never used for pairs (seed ``EVAL_SEED``): the teacher's reference sample (Heun,
   ``--reference-steps``), then every contender's sample from the same noise; the distance is the mean squared
   difference per pixel of the images in [-1, 1] (clamped, as saved), averaged over the noises (with its standard
   error).
3. Wall-clock per image: each sampler timed on the whole batch of noises (one batch, this process's threads).
4. The held-out validation loss of every model's one-step prediction x0 = x_t - t v(x_t, t): the trainer's own
   validation (``validation.Validator``: the teacher run's held-out images, a fixed grid of t, fixed noise), so the
   students are scored on real images that neither the teacher nor the pairs ever held. From pure noise (t = 1) a
   one-step sample has no held-out image to be compared with; that is what the distance of step 2 measures.

Writes ``OUT/reflow.json`` (settings, timings, the table) and ``OUT/teacher25_vs_student.png`` (rows: teacher
Euler 25 steps, then the student at 1, 2, 4 steps, then the teacher at 4 Euler steps, from the same noise) plus the
runs' own sample grids.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liquid_diffusion import flow
from liquid_diffusion.checkpoints import checkpoint_step
from liquid_diffusion.data import ImageBatchStream
from liquid_diffusion.hub import load_pipeline
from liquid_diffusion.reflow import ReflowConfig, ReflowTrainer, load_teacher
from liquid_diffusion.sampling import save_grid
from liquid_diffusion.stopping import TrainingInterrupted
from liquid_diffusion.validation import Validator, choose_holdout

EVAL_SEED = 1_000_003  # the evaluation noises' generator seed: far from the pair shards' (seed * stride + index)
CALLS = (1, 2, 4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher run, checkpoint or export")
    p.add_argument("--work-dir", required=True, help="where the reflow runs and the reference samples go")
    p.add_argument("--out", required=True, help="results folder (JSON and PNGs)")
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--teacher-sampler", default="heun")
    p.add_argument("--teacher-steps", type=int, default=8)
    p.add_argument("--reflow-steps", type=int, default=800)
    p.add_argument("--distill-steps", type=int, default=0, help="a second, t = 1 only stage (0: none)")
    p.add_argument(
        "--control",
        action="store_true",
        help="also train the reflow run on for --distill-steps more steps at t as usual (uniform), from "
        "a copy of its final checkpoint: what the distillation stage is to be compared with",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-noises", type=int, default=128)
    p.add_argument("--reference-steps", type=int, default=50, help="Heun steps of the reference (2 calls each)")
    p.add_argument("--grid-images", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def run_stage(args, output_dir: Path, **overrides) -> tuple[Path, float, float]:
    """A reflow run (resumed where it stopped); returns its pipeline folder, the seconds this call took and the
    seconds of them spent generating pairs."""
    start = time.perf_counter()
    values = dict(
        teacher=args.teacher,
        teacher_name=args.teacher,
        output_dir=str(output_dir),
        pairs=args.pairs,
        teacher_sampler=args.teacher_sampler,
        teacher_steps=args.teacher_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=50,
        steps=args.reflow_steps,
        log_every=50,
        sample_every=0,
        num_sample_images=8,
        checkpoint_every=200,
        resume="latest",
        num_workers=0,
        progress_bar=False,
    )
    config = ReflowConfig(**{**values, **overrides})
    trainer = ReflowTrainer(config)
    trainer.train()
    resumed = trainer._resumed_from
    if resumed is not None and checkpoint_step(resumed) >= config.steps:  # done before: no time of this call's
        return trainer.pipeline_dir, None, None
    return trainer.pipeline_dir, time.perf_counter() - start, trainer.pair_seconds


@torch.no_grad()
def sample(unet, noise: torch.Tensor, steps: int, sampler: str) -> tuple[torch.Tensor, float]:
    """``(images in [-1, 1] clamped, seconds per image)`` of ``unet`` from ``noise`` (pixel space)."""
    start = time.perf_counter()
    x = flow.sample(unet, noise.contiguous(memory_format=torch.channels_last), steps, sampler)
    return x.float().clamp(-1, 1).contiguous(), (time.perf_counter() - start) / len(noise)


def distance(images: torch.Tensor, reference: torch.Tensor) -> dict:
    per_image = (images - reference).pow(2).flatten(1).mean(1)
    return {"mse": per_image.mean().item(), "mse_stderr": (per_image.std() / len(per_image) ** 0.5).item()}


def held_out_validator(teacher) -> Validator | None:
    """The teacher run's held-out images as the trainer scores them (``Trainer._load_validation_set``): the same
    hashed choice, the same fixed t and noise; latents through the teacher's VAE in latent space."""
    config = teacher.train_config
    holdout = choose_holdout(config["dataset"], config.get("validation_images") or 256, config.get("split", "train"))
    if holdout is None:
        return None
    stream = ImageBatchStream(
        config["dataset"],
        config["resolution"],
        32,
        split=config.get("split", "train"),
        config_name=config.get("config_name"),
        image_column=config.get("image_column"),
        flip=False,
        shuffle_buffer=0,
        num_epochs=1,
        holdout=holdout,
        part="validation",
    )
    images = torch.cat([batch for batch in stream if batch.shape[0]])
    if teacher.vae is not None:
        from liquid_diffusion.latents import FrozenVAE

        images = FrozenVAE(teacher.vae, device=torch.device("cpu"), dtype=torch.float32).encode(images)
    return Validator(images.contiguous(memory_format=torch.channels_last))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    if (out / "reflow.json").is_file():  # a rerun: the stages done before keep the times they took then
        timings = json.loads((out / "reflow.json").read_text()).get("timings", {})

    def timed(key: str, seconds: float | None) -> None:
        if seconds is not None:
            timings[key] = seconds

    try:
        student_dir, run_s, pairs_s = run_stage(args, work / "reflow")
        timed("reflow_run_s", run_s)
        timed("pairs_s", pairs_s)
    except TrainingInterrupted:
        return 143

    teacher = load_teacher(args.teacher)
    unet = teacher.unet.eval()
    shape = (args.eval_noises, unet.config.in_channels, *[teacher.train_config["resolution"]] * 2)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    reference_path = work / f"reference-heun{args.reference_steps}-{args.eval_noises}.safetensors"
    if reference_path.is_file():
        saved = load_file(reference_path)
        reference, timings["reference_s_per_image"] = saved["images"], float(saved["s_per_image"])
    else:
        reference, per_image = sample(unet, noise, args.reference_steps, "heun")
        timings["reference_s_per_image"] = per_image
        save_file({"images": reference, "s_per_image": torch.tensor(per_image)}, str(reference_path))

    rows, grid_rows, recommended, held_out = [], {}, {}, {}
    validator = held_out_validator(teacher)

    def score_held_out(name: str, model) -> None:
        if validator is None:
            return
        loss, per_t = validator.loss(model.eval())
        held_out[name] = {"val_loss": loss, "val_loss_t": per_t}
        print(f"{name:8s} held-out validation loss {loss:.4f} ({len(validator)} images)", flush=True)

    n = args.grid_images

    def add(model: str, sampler: str, steps: int, images: torch.Tensor, per_image: float) -> None:
        calls = steps * flow.MODEL_CALLS_PER_STEP[sampler]
        rows.append(
            {
                "model": model,
                "sampler": sampler,
                "steps": steps,
                "model_calls": calls,
                "s_per_image": per_image,
                **distance(images, reference),
            }
        )
        print(
            f"{model:8s} {sampler:5s} {steps:3d} steps ({calls:3d} calls): mse {rows[-1]['mse']:.5f} "
            f"+- {rows[-1]['mse_stderr']:.5f}, {per_image * 1000:.1f} ms/image",
            flush=True,
        )
        grid_rows[(model, sampler, steps)] = images[:n]

    def evaluate(name: str, folder: Path) -> None:
        pipe = load_pipeline(folder)
        for calls in CALLS:
            add(name, "euler", calls, *sample(pipe.unet.eval(), noise, calls, "euler"))
        recommended[name] = pipe.config.get("recommended_steps")
        score_held_out(name, pipe.unet)
        # the pipeline itself, 1 step, from the same noise: the numbers above are what users get
        images = pipe(latents=noise[:n], num_inference_steps=1, output_type="pt").images * 2 - 1
        assert torch.allclose(images, grid_rows[(name, "euler", 1)], atol=1e-4), "pipeline != evaluated sampler"
        grids = sorted((folder.parent / "samples").glob("step-*.png"))
        if grids:
            shutil.copyfile(grids[-1], out / f"{name}-training-grid-{grids[-1].name}")

    def write() -> None:
        order = (
            [("teacher", "euler", 25)]
            + [("reflow", "euler", c) for c in CALLS]
            + [(name, "euler", 1) for name in ("control", "distill") if (name, "euler", 1) in grid_rows]
            + [("teacher", "euler", 4)]
        )
        save_grid(torch.cat([grid_rows[key] for key in order]), out / "teacher25_vs_student.png", n)
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.reflow " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "threads": args.threads,
                "torch": torch.__version__,
            },
            "teacher": {
                "path": args.teacher,
                "sha256": teacher.sha256,
                "step": teacher.step,
                "preset": teacher.train_config.get("preset"),
                "dataset": teacher.train_config.get("dataset"),
                "resolution": teacher.train_config.get("resolution"),
            },
            "settings": {k: v for k, v in vars(args).items() if k not in ("teacher", "work_dir", "out")},
            "reference": f"teacher, heun x {args.reference_steps} steps ({2 * args.reference_steps} model calls)",
            "eval_noises": args.eval_noises,
            "eval_seed": EVAL_SEED,
            "recommended_steps": recommended,
            "held_out": {"images": len(validator) if validator else 0, **held_out},
            "grid_rows": [" ".join(map(str, key)) for key in order],
            "timings": timings,
            "rows": rows,
        }
        (out / "reflow.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out / 'reflow.json'}", flush=True)

    score_held_out("teacher", unet)
    for calls in CALLS:
        add("teacher", "euler", calls, *sample(unet, noise, calls, "euler"))
        if calls % 2 == 0:
            add("teacher", "heun", calls // 2, *sample(unet, noise, calls // 2, "heun"))
    add("teacher", "euler", 25, *sample(unet, noise, 25, "euler"))
    add(
        "teacher",
        args.teacher_sampler,
        args.teacher_steps,
        *sample(unet, noise, args.teacher_steps, args.teacher_sampler),
    )  # the pairs' own sampler: the floor
    evaluate("reflow", student_dir)
    write()
    if args.distill_steps:  # a second stage: the reflow result trained at t = 1 only, on the same pairs
        try:
            distill_dir, run_s, _ = run_stage(
                args,
                work / "distill",
                init=str(student_dir),
                distill_t=1.0,
                pair_cache_dir=str(work / "reflow" / "pair-cache"),
                steps=args.distill_steps,
            )
            timed("distill_run_s", run_s)
        except TrainingInterrupted:
            return 143
        evaluate("distill", distill_dir)
        write()
    if args.distill_steps and args.control:
        control = work / "control"
        start = work / "reflow" / f"checkpoint-{args.reflow_steps:06d}"
        if not control.is_dir():
            shutil.copytree(start, control / start.name)
        try:
            control_dir, run_s, _ = run_stage(
                args,
                control,
                pair_cache_dir=str(work / "reflow" / "pair-cache"),
                steps=args.reflow_steps + args.distill_steps,
            )
            timed("control_run_s", run_s)
        except TrainingInterrupted:
            return 143
        evaluate("control", control_dir)
        write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
