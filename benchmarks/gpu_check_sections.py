"""The sections of ``gpu_check.py`` (see its docstring). Each returns ``(Markdown body, data, status)`` or raises."""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from benchmarks import common, sampling
from liquid_diffusion.errors import first_line

ROOT = Path(__file__).resolve().parent.parent

# A random AutoencoderKL with SD-VAE's layout (4 latent channels, 8x downsampling) but tiny widths, for the dry run
# (the same as tests/conftest.py's ``tiny_vae_dir``).
TINY_VAE_CONFIG = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)
# (--mixed-precision, --cache-latents, --compile) of the CLI runs
CLI_CONFIGS = (
    ("fp16", False, False),
    ("fp16", True, False),
    ("bf16", False, False),
    ("bf16", True, False),
    ("bf16", False, True),
    ("bf16", True, True),
)
VRAM_TARGET_MIB = 3 * 1024  # the goal for tiny, 256 px, batch 8, cached latents (half the card's ~6 GB)
SPEED_TARGET = 1.5  # tiny / DiT-S/2 training images/s, bf16 + compile, 4x32x32


@dataclass
class Context:
    plan: object
    device: torch.device
    out_dir: Path
    work_dir: Path
    runner: object
    info: dict
    log: object
    speed_rows: list = field(default_factory=list)
    memory_rows: list = field(default_factory=list)
    max_batches: dict = field(default_factory=dict)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _vae(plan):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if plan.dry:
        return AutoencoderKL(**TINY_VAE_CONFIG).eval().requires_grad_(False)
    return common.build_vae()


# ------------------------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------------------------


def environment(ctx: Context):
    info = ctx.info
    rows = [[k, v] for k, v in info.items() if k != "versions"] + [[k, v] for k, v in info["versions"].items()]
    body = common.markdown_table(["what", "value"], rows)
    if ctx.device.type != "cuda":
        body += "\n\nNo CUDA device: every number below is from the CPU."
    return body, info, "ok"


# ------------------------------------------------------------------------------------------------------------------
# memory: what the trainer holds while training, at 256 px, batch 8
# ------------------------------------------------------------------------------------------------------------------


def _train_memory(ctx: Context, preset: str, precision: str, in_loop: bool, vae_cpu) -> dict:
    """Peak memory added by building and training ``preset`` for 3 steps (model, fp32 EMA copy, AdamW, activations,
    batch; with ``in_loop`` also the VAE and its encoder pass). The VAE runs in bf16 for bf16 and in fp32 for fp16
    -- ``latents.vae_dtype`` on a T4, which has no native bf16."""
    plan, device = ctx.plan, ctx.device
    cuda = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision] if cuda else None
    vae_dtype = torch.bfloat16 if cuda and precision == "bf16" else torch.float32
    size = plan.resolution // 8
    torch.manual_seed(0)
    with common.peak_memory(device) as mem:
        vae = copy.deepcopy(vae_cpu).to(device, vae_dtype) if in_loop else None
        model = common.build_model(f"liquid-{preset}", 4, size).to(device).train()
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        ema = [p.detach().clone().float() for p in model.parameters()]  # diffusers EMAModel's shadow copy
        if in_loop:
            batch = torch.rand(plan.batch, 3, plan.resolution, plan.resolution, device=device, dtype=vae_dtype) * 2 - 1
        else:
            batch = torch.randn(plan.batch, 4, size, size, device=device)
        step = common.make_train_step(model, batch, autocast_dtype=dtype, vae=vae)
        losses = [float(step()) for _ in range(3)]
    del vae, model, ema, batch, step
    _free(device)
    return dict(
        preset=preset,
        precision=precision if cuda else f"{precision} (ran fp32: no CUDA)",
        data="VAE in the loop" if in_loop else "cached latents",
        mib=mem["mib"],
        how=mem["how"],
        loss_finite=all(math.isfinite(x) for x in losses),
    )


def memory(ctx: Context):
    plan = ctx.plan
    vae_cpu = _vae(plan)
    runs = [(plan.preset, p, loop) for loop in (False, True) for p in ("fp16", "bf16")]
    runs += [
        (preset, "bf16", loop) for preset in plan.memory_presets if preset != plan.preset for loop in (False, True)
    ]
    rows = []
    for preset, precision, in_loop in runs:
        if ctx.runner.remaining() <= 0:
            break
        rows.append(_train_memory(ctx, preset, precision, in_loop, vae_cpu))
        ctx.log(f"  {rows[-1]['preset']} {rows[-1]['precision']} {rows[-1]['data']}: {rows[-1]['mib']:.0f} MiB")
    ctx.memory_rows = rows
    table = common.markdown_table(
        ["preset", "precision", "data", "peak (MiB)", "peak (GiB)", "losses finite"],
        [
            [r["preset"], r["precision"], r["data"], r["mib"], r["mib"] / 1024, "yes" if r["loss_finite"] else "NO"]
            for r in rows
        ],
    )
    body = (
        f"{plan.resolution} px, batch {plan.batch}, 3 training steps; {rows[0]['how'] if rows else ''}, reset "
        "before each run. Counted: model, fp32 EMA copy, AdamW state, gradients, activations, batch and (VAE in "
        "the loop) the SD-VAE weights and its encoder pass; not counted: CUDA context, allocator cache. fp16 "
        "runs the VAE in fp32 (the T4 path), bf16 in bf16.\n\n" + table
    )
    if len(rows) < len(runs):
        body += f"\n\n{len(runs) - len(rows)} run(s) skipped: time budget spent."
    status = "ok" if rows and all(r["loss_finite"] for r in rows) else "checks failed"
    return body, rows, status


# ------------------------------------------------------------------------------------------------------------------
# cli: the real command line, end to end
# ------------------------------------------------------------------------------------------------------------------


def _write_images(folder: Path, count: int, resolution: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = common.make_shapes(count, seed=0, size=resolution)
    for i, image in enumerate(images):
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"shape_{i:03d}.png")
    return folder


def _subprocess_env(plan) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if plan.dry:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _call(args: list, env: dict, timeout: float, log_path: Path) -> dict:
    """Runs a command in its own process group (killed whole on timeout: DataLoader workers, compile workers)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(a) for a in args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=max(10.0, timeout))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc, err = "timeout", err + f"\ntimed out after {timeout:.0f} s"
    log_path.write_text(f"$ {' '.join(map(str, args))}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    lines = [line for line in err.splitlines() if line.strip()]
    return dict(
        rc=rc,
        seconds=time.perf_counter() - start,
        stdout=out,
        last_error=lines[-1][:300] if lines else "",
        stderr_tail=err[-3000:],
    )


def _cli_chain(ctx: Context, config, images: Path, vae_dir: Path) -> dict:
    """train -> train --resume latest (more steps) -> export, for one (precision, cache, compile)."""
    plan = ctx.plan
    precision, cache, compiled = config
    name = precision + ("+compile" if compiled else "") + ("+cache" if cache else "")
    out = ctx.work_dir / "cli" / name
    shutil.rmtree(out, ignore_errors=True)  # a run left by an earlier check would be resumed instead of started
    out.mkdir(parents=True)
    first, more = plan.cli_steps
    python = [sys.executable, "-m", "liquid_diffusion"]
    train = (
        python
        + [
            "train",
            "--dataset",
            images,
            "--space",
            "latent",
            "--vae",
            vae_dir,
            "--resolution",
            plan.resolution,
            "--preset",
            plan.preset,
            "--batch-size",
            plan.batch,
            "--log-every",
            max(1, first // 10),
            "--sample-every",
            first,
            "--checkpoint-every",
            first,
            "--warmup-steps",
            10,
            "--num-workers",
            2,
            "--no-progress-bar",
            "--output-dir",
            out,
            "--mixed-precision",
            precision,
            "--seed",
            0,
        ]
        + (["--compile"] if compiled else [])
        + (["--cache-latents"] if cache else [])
    )
    env, timeout = _subprocess_env(plan), lambda: min(plan.cli_timeout_s, max(30.0, ctx.runner.remaining() + 60))
    runs = {"train": _call(train + ["--steps", first], env, timeout(), out / "train.log")}
    if runs["train"]["rc"] == 0:
        runs["resume"] = _call(
            train + ["--steps", first + more, "--resume", "latest"], env, timeout(), out / "resume.log"
        )
    if runs.get("resume", {}).get("rc") == 0:
        runs["export"] = _call(
            python + ["export", "--checkpoint", out, "--out", out / "export", "--overwrite"],
            env,
            timeout(),
            out / "export.log",
        )
    return dict(name=name, out=out, runs=runs, checks=_cli_checks(out, runs, first, first + more))


def _cli_checks(out: Path, runs: dict, first: int, total: int) -> dict:
    records = []
    if (out / "metrics.jsonl").exists():
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r.get("loss") for r in records]
    finite = bool(losses) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses)
    return {
        "train exit 0": runs["train"]["rc"] == 0,
        "resumed": "resume" in runs and runs["resume"]["rc"] == 0 and f"at step {first}" in runs["resume"]["stdout"],
        "losses finite": finite,
        "steps logged to the end": bool(records) and records[-1].get("step") == total,
        "checkpoints": all((out / f"checkpoint-{s:06d}" / "state.json").exists() for s in (first, total)),
        "samples": len(list((out / "samples").glob("step-*.png"))) >= 2 if (out / "samples").exists() else False,
        "export": "export" in runs and runs["export"]["rc"] == 0 and (out / "export" / "model_index.json").exists(),
        "_losses": (losses[0], losses[-1]) if losses else None,
        "_skipped_nonfinite": sum(r.get("skipped_nonfinite", 0) for r in records),
        "_images_per_s": records[-1].get("images_per_s") if records else None,
    }


def cli(ctx: Context):
    plan = ctx.plan
    work = ctx.work_dir / "cli"
    images = _write_images(work / "images", plan.num_images, plan.resolution)
    vae_dir = work / "vae"
    _vae(plan).save_pretrained(vae_dir)
    with concurrent.futures.ThreadPoolExecutor(plan.cli_jobs) as pool:
        results = list(pool.map(lambda c: _cli_chain(ctx, c, images, vae_dir), plan.cli_configs))
    check_names = [k for k in results[0]["checks"] if not k.startswith("_")]
    rows, data = [], []
    for r in results:
        checks, failed = r["checks"], [k for k in check_names if not r["checks"][k]]
        error = next((run["last_error"] for run in r["runs"].values() if run["rc"] != 0), "")
        losses = checks["_losses"] or (float("nan"), float("nan"))
        rows.append(
            [r["name"], "PASS" if not failed else "FAIL"]
            + ["ok" if checks[k] else "NO" for k in check_names]
            + [
                losses[0],
                losses[1],
                checks["_skipped_nonfinite"],
                checks["_images_per_s"] or float("nan"),
                sum(run["seconds"] for run in r["runs"].values()),
                error or "-",
            ]
        )
        data.append(
            dict(
                name=r["name"],
                passed=not failed,
                failed_checks=failed,
                checks=checks,
                runs={k: {kk: vv for kk, vv in v.items() if kk != "stdout"} for k, v in r["runs"].items()},
            )
        )
    first, more = plan.cli_steps
    body = (
        f"`python -m liquid_diffusion train` on {plan.num_images} generated {plan.resolution} px images, preset "
        f"{plan.preset}, latent space with a random-weight {'tiny' if plan.dry else 'SD-VAE-shaped'} VAE saved "
        f"locally, batch {plan.batch}: {first} steps, then `--resume latest` to {first + more}, then `export`. "
        f"{plan.cli_jobs} chains at a time (their images/s are not a benchmark). Logs: {work}/<run>/*.log.\n\n"
        + common.markdown_table(
            ["run", "verdict"]
            + check_names
            + ["first loss", "last loss", "fp16 skipped", "images/s", "wall s", "error"],
            rows,
        )
    )
    status = "ok" if all(d["passed"] for d in data) else "checks failed"
    return body, data, status


# ------------------------------------------------------------------------------------------------------------------
# notebook: the Colab notebook executed end to end on this device (nbclient), as tests/test_notebook.py does on the CPU
# ------------------------------------------------------------------------------------------------------------------


def notebook(ctx: Context):
    """``LiquidDiffusion_Training.ipynb`` top to bottom in a kernel on this machine, through its ``LD_*`` overrides:
    a generated image folder, latent space with a random-weight SD-VAE-shaped VAE saved locally (no Hub here), the
    plan's preset and resolution; trains with a mid-run grid, final samples, export, load back. The executed
    notebook, with its outputs, is written to the report folder."""
    import nbclient
    import nbformat

    plan = ctx.plan
    work = ctx.work_dir / "notebook"
    shutil.rmtree(work, ignore_errors=True)
    images = _write_images(work / "images", plan.num_images, plan.resolution)
    _vae(plan).save_pretrained(work / "vae")
    steps, output_dir = plan.notebook_steps, work / "run"
    overrides = dict(
        LD_DATASET=images,
        LD_SPACE="latent",
        LD_VAE=work / "vae",
        LD_PRESET=plan.preset,
        LD_RESOLUTION=plan.resolution,
        LD_STEPS=steps,
        LD_BATCH_SIZE=plan.batch,
        LD_SAMPLE_EVERY=steps // 2,
        LD_NUM_SAMPLES=4,
        LD_OUTPUT_DIR=output_dir,
        LD_HUB_REPO="",
        LD_EVAL_EVERY=0,
        LD_MOUNT_DRIVE=0,
        LD_SKIP_INSTALL=1,
        HF_HUB_OFFLINE=1,
        HF_DATASETS_OFFLINE=1,
        MPLBACKEND="Agg",
        PYTHONPATH=_subprocess_env(plan)["PYTHONPATH"],
    )
    start = time.perf_counter()
    executed = nbformat.read(ROOT / "LiquidDiffusion_Training.ipynb", as_version=nbformat.NO_CONVERT)
    error = ""
    try:
        # the kernel inherits the environment; it is restored afterwards
        with mock.patch.dict(os.environ, {name: str(value) for name, value in overrides.items()}):
            nbclient.NotebookClient(
                executed,
                timeout=plan.notebook_timeout_s,
                kernel_name="python3",
                resources={"metadata": {"path": str(ROOT)}},
            ).execute()
    except Exception as failure:  # noqa: BLE001 -- the outputs so far still go into the report
        error = f"{type(failure).__name__}: {first_line(failure)}"[:300]
    seconds = time.perf_counter() - start
    nbformat.write(executed, ctx.out_dir / "notebook_executed.ipynb")
    cells = [cell for cell in executed.cells if cell.cell_type == "code"]
    errors = [
        f"{cell.metadata.get('id')}: {o.get('ename')}: {o.get('evalue', '')[:200]}"
        for cell in cells
        for o in cell.outputs
        if o.output_type == "error"
    ]
    records = []
    if (output_dir / "metrics.jsonl").exists():
        records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [r["loss"] for r in records if "loss" in r]
    stream = "".join(o.get("text", "") for cell in cells for o in cell.outputs if o.output_type == "stream")
    checks = {
        "every cell ran": not error and not errors and all(cell.get("execution_count") for cell in cells),
        "on the GPU": ctx.device.type != "cuda" or "No GPU found" not in stream + str(executed.cells),
        "trained to the end": bool(records) and max(r["step"] for r in records) == steps,
        "losses finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "mid-run grid": (output_dir / "samples" / f"step-{steps // 2:06d}.png").exists(),
        "final samples": bool(list((output_dir / "samples").glob("final-*.png"))) if output_dir.exists() else False,
        "export": (output_dir / "export" / f"checkpoint-{steps:06d}" / "model_index.json").exists(),
        "panel and samples shown": sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs) >= 3,
    }
    failed = [name for name, ok in checks.items() if not ok]
    rows = [[name, "ok" if ok else "NO"] for name, ok in checks.items()]
    body = (
        f"`LiquidDiffusion_Training.ipynb` executed by nbclient on {ctx.device} in {seconds:.0f} s: preset "
        f"{plan.preset}, {plan.num_images} generated {plan.resolution} px images, latent space with a random "
        f"{'tiny' if plan.dry else 'SD-VAE-shaped'} VAE, batch {plan.batch}, {steps} steps (grid at "
        f"{steps // 2}); first/last loss {losses[0] if losses else float('nan'):.4f} / "
        f"{losses[-1] if losses else float('nan'):.4f}. The executed notebook: `notebook_executed.ipynb`.\n\n"
        + common.markdown_table(["check", "result"], rows)
    )
    if error or errors:
        body += "\n\n" + "\n".join(f"* `{line}`" for line in ([error] if error else []) + errors[:10])
    data = dict(
        checks=checks,
        failed=failed,
        seconds=seconds,
        error=error,
        cell_errors=errors,
        losses=(losses[0], losses[-1]) if losses else None,
    )
    return body, data, "ok" if not failed else "checks failed"


# ------------------------------------------------------------------------------------------------------------------
# sampling: sampling.py's interleaved timing, 16 images x 25 Euler steps, with and without the VAE decode
# ------------------------------------------------------------------------------------------------------------------


def sampling_speed(ctx: Context):
    plan = ctx.plan
    size = plan.resolution // 8
    args = argparse.Namespace(
        models=list(plan.sample_models),
        num_samples=plan.num_samples,
        steps=plan.sample_steps,
        report_steps=plan.sample_steps,
        rounds=2,
        vae=True,
        vae_batch=4,
        vae_rounds=1,
        vae_samples=None,
        seed=0,
    )
    variant = "bf16" if ctx.device.type == "cuda" else "fp32"
    rows = sampling.run_setting(size, variant, args, ctx.device, ctx.log)
    _free(ctx.device)
    body = (
        f"{plan.num_samples} samples, {plan.sample_steps} Euler steps, 4x{size}x{size} latents, {variant}, one "
        "batch, median of 2 interleaved rounds; the SD-VAE decode (chunks of 4) is timed once and added.\n\n"
        + common.markdown_table(
            ["model", "params (M)", "model only (s)", "spread %", "VAE decode (s)", "with VAE (s)", "x dit-s2"],
            [
                [
                    r["model"],
                    r["params_m"],
                    r["seconds"],
                    r["spread_pct"],
                    r["vae_decode_s"],
                    r["seconds_with_vae"],
                    r.get("x_dit-s2", float("nan")),
                ]
                for r in rows
            ],
        )
    )
    return body, rows, "ok"


# ------------------------------------------------------------------------------------------------------------------
# speed: training images/s, interleaved rounds in this process
# ------------------------------------------------------------------------------------------------------------------


def _dynamo_graphs() -> tuple[int, int]:
    """(graphs compiled so far, graph breaks so far) from dynamo's global counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def compile_label(plan) -> str:
    """The variant suffix of a compiled row: ``+compile``, or ``+compile(MODE)`` with a ``compile_mode``."""
    return f"+compile({plan.compile_mode})" if plan.compile_mode else "+compile"


def _build_job(ctx: Context, name: str, size: int, batch: int, compiled: bool) -> dict:
    """Model + AdamW + fixed batch of random latents, warmed up (and compiled); flops and peak memory measured."""
    plan, device = ctx.plan, ctx.device
    torch.manual_seed(0)
    latents = torch.randn(batch, 4, size, size, device=device)
    graphs0, breaks0 = _dynamo_graphs()
    with common.peak_memory(device) as mem:
        model = common.build_model(name, 4, size, **(plan.model_overrides or {}).get(name, {})).to(device).train()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            latents = latents.contiguous(memory_format=torch.channels_last)
        # FLOPs are linear in the batch; counting at batch 1 keeps this fp32 pass out of the measured peak
        flops = common.train_step_flops(model, latents[:1]) * batch
        # dynamic=False: the models share one forward code object, and a second shape would otherwise make dynamo
        # recompile it with dynamic shapes (slower kernels) for every model after the first
        mode = dict(mode=plan.compile_mode) if plan.compile_mode else {}
        runner = torch.compile(model, backend=plan.compile_backend, dynamic=False, **mode) if compiled else model
        step = common.make_train_step(runner, latents, autocast_dtype=plan.dtype)
        warmup_s = common.timed(lambda: [step() for _ in range(plan.warmup)], device)
    graphs1, breaks1 = _dynamo_graphs()
    return dict(
        model=model,
        step=step,
        flops=flops,
        mem=mem["mib"],
        params=common.count_params(model),
        batch=batch,
        warmup_s=warmup_s,
        graphs=graphs1 - graphs0,
        breaks=breaks1 - breaks0,
    )


def max_batch(ctx: Context, name: str, size: int) -> int:
    """Largest batch whose eager training peak stays under ``plan.mem_budget_mib``: a line through the peaks at
    batch b and 2b predicts it, one run checks it (scaled down until it fits, at most 3 tries)."""
    key = (name, size)
    if key in ctx.max_batches:
        return ctx.max_batches[key]["batch"]
    plan = ctx.plan

    def peak(batch: int) -> float:
        job = _build_job(ctx, name, size, batch, compiled=False)
        mib = job["mem"]
        del job
        _free(ctx.device)
        return mib

    b = plan.batch
    p1, p2 = peak(b), peak(2 * b)
    per_image = (p2 - p1) / b
    guess = (
        int((plan.mem_budget_mib - (p1 - per_image * b)) / per_image * 0.97) if per_image > 0 else plan.max_batch_cap
    )
    guess = max(1, min(plan.max_batch_cap, guess))
    tries = [(b, p1), (2 * b, p2)]
    for _ in range(3):
        p = peak(guess)
        tries.append((guess, p))
        if p <= plan.mem_budget_mib or guess == 1:
            break
        guess = max(1, int(guess * plan.mem_budget_mib / p * 0.97))
    ctx.max_batches[key] = dict(batch=guess, probes=tries)
    ctx.log(f"  max batch {name} 4x{size}x{size}: {guess} (peaks MiB by batch: {tries})")
    return guess


def speed_setting(ctx: Context, size: int, batch_kind: str, compile_models: tuple):
    plan, device = ctx.plan, ctx.device
    eager_models = plan.models if batch_kind in ("8", "max") else ()
    variant = plan.dtype_name
    jobs, skipped = {}, []
    for name, compiled in [(m, False) for m in eager_models] + [(m, True) for m in compile_models]:
        if ctx.runner.remaining() <= 0:
            skipped.append(name + (" compiled" if compiled else ""))
            continue
        batch = max_batch(ctx, name, size) if batch_kind == "max" else plan.batch
        label = f"{name} {variant}{compile_label(plan) if compiled else ''}"
        jobs[label] = _build_job(ctx, name, size, batch, compiled)
        jobs[label].update(name=name, variant=variant + (compile_label(plan) if compiled else ""))
        ctx.log(
            f"  built {label}: batch {batch}, warm-up {jobs[label]['warmup_s']:.1f} s, "
            f"{jobs[label]['graphs']} graph(s), {jobs[label]['breaks']} break(s), +{jobs[label]['mem']:.0f} MiB"
        )
    if not jobs:
        raise RuntimeError("no model could be built before the time budget was spent")

    def rate(job):
        return lambda: (
            job["batch"] * plan.steps / common.timed(lambda: [job["step"]() for _ in range(plan.steps)], device)
        )

    graphs_before, _ = _dynamo_graphs()
    rates = common.interleaved({k: rate(j) for k, j in jobs.items()}, plan.rounds, ctx.log)
    recompiles = _dynamo_graphs()[0] - graphs_before
    _, peak = common.peak_tflops(device)
    rows = []
    for label, job in jobs.items():
        ips = common.median(rates[label])
        tflops = job["flops"] / job["batch"] * ips / 1e12
        peer = f"dit-s2 {job['variant']}"
        rows.append(
            dict(
                model=job["name"],
                variant=job["variant"],
                latent=size,
                batch=job["batch"],
                batch_kind=batch_kind,
                params_m=job["params"],
                gflop_per_img=job["flops"] / job["batch"] / 1e9,
                images_per_s=ips,
                spread_pct=common.spread(rates[label]),
                rounds=rates[label],
                tflops=tflops,
                mfu_pct=100 * tflops / peak if peak else None,
                peak_mem_mib=job["mem"],
                warmup_s=job["warmup_s"],
                graphs=job["graphs"],
                graph_breaks=job["breaks"],
                x_dit_s2=ips / common.median(rates[peer]) if peer in rates else None,
            )
        )
    del jobs
    _free(device)
    ctx.speed_rows += rows
    body = (
        f"4x{size}x{size} latents, batch {plan.batch if batch_kind != 'max' else 'max under the T4 budget'}"
        f" ({plan.mem_budget_mib / 1024:.1f} GiB of allocations), {variant} autocast"
        f"{', channels_last' if device.type == 'cuda' else ''}, compile backend {plan.compile_backend}"
        f"{f' (mode {plan.compile_mode})' if plan.compile_mode else ''}; median "
        f"of {plan.rounds} interleaved rounds x {plan.steps} steps; x dit-s2 = images/s over DiT-S/2's in the "
        f"same variant. Dynamo graphs compiled during the timed rounds (recompiles): {recompiles}.\n\n"
        + common.markdown_table(
            [
                "model",
                "variant",
                "batch",
                "params (M)",
                "GFLOP/img",
                "images/s",
                "spread %",
                "x dit-s2",
                "peak MiB",
                "warm-up s",
                "graphs",
                "breaks",
            ],
            [
                [
                    r["model"],
                    r["variant"],
                    r["batch"],
                    r["params_m"],
                    r["gflop_per_img"],
                    r["images_per_s"],
                    r["spread_pct"],
                    r["x_dit_s2"] if r["x_dit_s2"] is not None else float("nan"),
                    r["peak_mem_mib"],
                    r["warmup_s"],
                    r["graphs"],
                    r["graph_breaks"],
                ]
                for r in rows
            ],
        )
    )
    if skipped:
        body += f"\n\nNot built (time budget spent): {', '.join(skipped)}."
    return (
        body,
        dict(rows=rows, recompiles_during_timing=recompiles, skipped=skipped),
        "ok" if not skipped else "partial",
    )


# ------------------------------------------------------------------------------------------------------------------
# profile: where a training step's time goes (per-step overhead or kernels, and which kernels)
# ------------------------------------------------------------------------------------------------------------------


def profile_step(ctx: Context):
    """``torch.profiler`` over ``plan.steps`` eager steps of each ``plan.profile_models`` model (4x32x32 latents,
    ``plan.batch``): wall ms per step, the device's kernel ms per step (GPU busy = kernels / wall: far below 1 means
    the step waits on the host, launching kernels), kernels launched per step, and the ops whose kernels take the
    most device time. On the CPU (dry run) the ops are ranked by CPU time and kernels are not counted."""
    from torch.profiler import ProfilerActivity, profile

    plan, device = ctx.plan, ctx.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows, tops, skipped = [], [], []
    for name in plan.profile_models:
        if ctx.runner.remaining() <= 0:
            skipped.append(name)
            continue
        job = _build_job(ctx, name, plan.profile_latent, plan.batch, compiled=False)
        with profile(activities=activities) as prof:
            wall_s = common.timed(lambda: [job["step"]() for _ in range(plan.steps)], device)
        job = None  # freed before the next model is built
        _free(device)
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"] if cuda else []
        kernel_ms = sum(e.device_time_total for e in kernels) / 1000 / plan.steps if cuda else float("nan")
        wall_ms = 1000 * wall_s / plan.steps
        rows.append(
            [
                name,
                wall_ms,
                kernel_ms,
                kernel_ms / wall_ms if cuda else float("nan"),
                len(kernels) / plan.steps if cuda else float("nan"),
            ]
        )
        total = sum(own(e) for e in ops) or 1
        for e in sorted(ops, key=own, reverse=True)[: plan.profile_top]:
            tops.append([name, e.key, own(e) / 1000 / plan.steps, 100 * own(e) / total, e.count / plan.steps])
    body = (
        f"Eager {plan.dtype_name}, 4x{plan.profile_latent}x{plan.profile_latent} latents, batch {plan.batch}, "
        f"{plan.steps} profiled steps (forward + backward + AdamW) after the warm-up.\n\n"
        + common.markdown_table(["model", "wall ms/step", "kernel ms/step", "GPU busy", "kernels/step"], rows)
        + f"\n\nOps with the most {'device' if cuda else 'CPU'} time (their own kernels), per step:\n\n"
        + common.markdown_table(["model", "op", "ms/step", "% of the model's", "calls/step"], tops)
    )
    if skipped:
        body += f"\n\nNot profiled (time budget spent): {', '.join(skipped)}."
    data = dict(
        rows=[dict(zip(("model", "wall_ms", "kernel_ms", "busy", "kernels"), r)) for r in rows],
        top_ops=tops,
        skipped=skipped,
    )
    return body, data, "ok" if rows and not skipped else "partial"


# ------------------------------------------------------------------------------------------------------------------
# mfu and targets: derived from the rows measured above
# ------------------------------------------------------------------------------------------------------------------


def mfu(ctx: Context):
    name, peak = common.peak_tflops(ctx.device)
    rows = ctx.speed_rows
    if not rows:
        return "No speed rows to derive it from (no speed setting ran).", {}, "skipped"
    peaks = common.markdown_table(["card (substring)", "dense bf16 TFLOP/s"], list(common.PEAK_BF16_TFLOPS.items()))
    table = common.markdown_table(
        ["model", "variant", "latent", "batch", "GFLOP/img", "images/s", "TFLOP/s", "MFU %"],
        [
            [
                r["model"],
                r["variant"],
                f"4x{r['latent']}x{r['latent']}",
                r["batch"],
                r["gflop_per_img"],
                r["images_per_s"],
                r["tflops"],
                r["mfu_pct"] if r["mfu_pct"] is not None else float("nan"),
            ]
            for r in rows
        ],
    )
    body = (
        f"FLOPs of one forward + backward from `torch.utils.flop_counter` (eager; the optimizer is not counted) "
        f"x images/s, over the peak of **{name}**: {peak if peak else 'unknown (no entry below)'} TFLOP/s.\n\n"
        f"{table}\n\nPeaks (`common.PEAK_BF16_TFLOPS`, first matching substring of the card's name):\n\n{peaks}"
    )
    return (
        body,
        dict(
            card=name,
            peak_tflops=peak,
            rows=[{k: r[k] for k in ("model", "variant", "latent", "batch", "tflops", "mfu_pct")} for r in rows],
        ),
        "ok",
    )


def targets(ctx: Context):
    """The issue's two targets, from the rows measured above (a verdict only where both numbers exist)."""

    def find(model, variant, latent=ctx.plan.speed_settings[0][0]):
        return next(
            (
                r
                for r in ctx.speed_rows
                if r["model"] == model and r["variant"] == variant and r["latent"] == latent and r["batch_kind"] == "8"
            ),
            None,
        )

    variant = ctx.plan.dtype_name + compile_label(ctx.plan)
    tiny, dit = find(ctx.plan.models[0], variant), find("dit-s2", variant)
    ratio = tiny["images_per_s"] / dit["images_per_s"] if tiny and dit else None
    mem = next(
        (
            r
            for r in ctx.memory_rows
            if r["preset"] == ctx.plan.preset and r["data"] == "cached latents" and r["precision"].startswith("bf16")
        ),
        None,
    )
    rows = [
        [
            f"{ctx.plan.models[0]} >= {SPEED_TARGET}x DiT-S/2 images/s, {variant}, 4x{ctx.plan.speed_settings[0][0]}"
            f"x{ctx.plan.speed_settings[0][0]}, batch {ctx.plan.batch}",
            f"{ratio:.2f}x" if ratio else "not measured",
            _verdict(ratio, lambda v: v >= SPEED_TARGET),
        ],
        [
            f"{ctx.plan.preset} peak training VRAM <= {VRAM_TARGET_MIB} MiB, {ctx.plan.resolution} px, batch "
            f"{ctx.plan.batch}, cached latents, bf16",
            f"{mem['mib']:.0f} MiB" if mem else "not measured",
            _verdict(mem and mem["mib"], lambda v: v <= VRAM_TARGET_MIB),
        ],
    ]
    body = common.markdown_table(["target", "measured", "verdict"], rows)
    if ctx.device.type != "cuda":
        body += "\n\n(CPU run: the verdicts say nothing about a GPU.)"
    return body, dict(speed_ratio=ratio, tiny_cached_bf16_mib=mem["mib"] if mem else None), "ok"


def _verdict(value, ok) -> str:
    return "not measured" if value is None else ("met" if ok(value) else "missed")


# ------------------------------------------------------------------------------------------------------------------
# tests: the pytest files whose code runs on CUDA here
# ------------------------------------------------------------------------------------------------------------------


def tests(ctx: Context):
    plan = ctx.plan
    args = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *plan.pytest_args]
    timeout = min(plan.pytest_timeout_s, max(30.0, ctx.runner.remaining() + 30))
    result = _call(args, _subprocess_env(plan), timeout, ctx.work_dir / "pytest.log")
    lines = [line for line in result["stdout"].splitlines() if line.strip()]
    summary = lines[-1] if lines else result["last_error"]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    body = (
        f"`{' '.join(map(str, args[1:]))}` on {ctx.device}: **{summary}** (exit {result['rc']}, "
        f"{result['seconds']:.0f} s). The trainer tests have no CUDA switch of their own: `Trainer` takes the "
        "accelerator's device, so on a GPU they run there; `tests/test_compile.py` has explicit `[cuda]` "
        "variants (skipped without a GPU)."
    )
    if failures:
        body += "\n\n" + "\n".join(f"* `{line[:300]}`" for line in failures[:20])
    data = dict(rc=result["rc"], summary=summary, failures=failures, stdout_tail=result["stdout"][-4000:])
    return body, data, "ok" if result["rc"] == 0 else "checks failed"


# ------------------------------------------------------------------------------------------------------------------
# quality: equal GPU minutes through the product's Trainer, scored by its validation loss (benchmarks/recipe.py)
# ------------------------------------------------------------------------------------------------------------------

QUALITY_DATA = ROOT / ".bench_data" / "twemoji-32px"  # carried to the GPU machine (it has no npm): see gpu_check.sh


def quality(ctx: Context):
    """Each model trains for the same minutes on the same images through ``Trainer`` (the recipe study's
    ``run(minutes=...)``: data path, EMA, clipping, bf16, schedule as ``train``), at one batch for all and each at
    its own learning rate scaled by the trainer's square-root rule; then the held-out validation loss."""
    from benchmarks import recipe
    from liquid_diffusion.config import REFERENCE_BATCH_SIZE, TrainConfig

    plan = ctx.plan
    work = ctx.work_dir / "quality"
    shutil.rmtree(work, ignore_errors=True)
    folder, data = QUALITY_DATA, "twemoji"
    if plan.dry or not (folder / ".complete").is_file():
        folder, data = _write_images(work / "images", plan.quality_images, recipe.RESOLUTION), "shapes"
    scale = math.sqrt(plan.quality_batch / REFERENCE_BATCH_SIZE)
    rows, data_rows = [], []
    for model in plan.quality_models:
        if ctx.runner.remaining() <= 0:
            rows.append([model, "skipped: the time budget was spent"] + [""] * 6)
            continue
        lr = plan.quality_lr.get(model, TrainConfig().lr) * scale
        result = recipe.run(
            "default",
            dict(lr=lr, batch_size=plan.quality_batch),
            model,
            10**7,
            0,
            data,
            "",
            str(work),
            validation_images=plan.quality_validation_images,
            minutes=plan.quality_minutes,
            folder=folder,
        )
        data_rows.append(result)
        rows.append(
            [
                model,
                f"{result['params_m']:.1f}M",
                f"{lr:.3g}",
                result["steps"],
                result["images"],
                result["images_per_s"],
                result["val_loss"],
                result["val_loss_raw"],
            ]
        )
        _free(ctx.device)
    body = (
        f"{plan.quality_minutes:g} min of training each (validation excluded), {data} at {recipe.RESOLUTION} px "
        f"in pixel space ({folder}), batch {plan.quality_batch}, the trainer's defaults otherwise; validation "
        f"loss of the EMA (and raw) weights on {plan.quality_validation_images} held-out images, 8 fixed t, "
        "fixed noise (lower is better).\n\n"
        + common.markdown_table(
            ["model", "params", "lr", "steps", "images", "images/s", "val (EMA)", "val (raw)"], rows
        )
    )
    return body, data_rows, "ok"


# ------------------------------------------------------------------------------------------------------------------
# Order
# ------------------------------------------------------------------------------------------------------------------

SECTIONS = (
    "environment",
    "notebook",
    "memory",
    "cli",
    "sampling",
    "speed",
    "profile",
    "tests",
    "quality",
    "mfu",
    "targets",
)
ALWAYS = ("environment", "mfu", "targets")  # cheap: run even when the budget is spent


def steps(plan) -> list[tuple[str, str, object, tuple]]:
    """(section, title, function, args) in run order: the two most wanted speed settings (and the profile of the
    first one's models) before the CUDA tests."""
    functions = dict(
        environment=environment,
        notebook=notebook,
        memory=memory,
        cli=cli,
        sampling=sampling_speed,
        tests=tests,
        mfu=mfu,
        targets=targets,
    )

    def title(size, kind, compiled):
        batch = "max under the T4 budget" if kind == "max" else str(plan.batch)
        return f"speed: 4x{size}x{size}, batch {batch}" + (f", compiled: {', '.join(compiled)}" if compiled else "")

    speed = [("speed", title(*setting), speed_setting, setting) for setting in plan.speed_settings]
    plain = [(name, name, functions[name], ()) for name in ("environment", "notebook", "cli", "memory", "sampling")]
    return (
        plain
        + speed[:1]
        + [("profile", "profile", profile_step, ())]
        + speed[1:2]
        + [("tests", "tests", tests, ()), ("quality", "quality", quality, ())]
        + speed[2:]
        + [("mfu", "mfu", mfu, ()), ("targets", "targets", targets, ())]
    )
