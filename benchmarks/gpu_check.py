"""One prepared check of every CUDA path: CLI correctness, peak VRAM, sampling and training speed, MFU, CUDA tests.

One command, about 8 minutes on one H100, spends scarce GPU minutes on measuring rather than debugging; the same
script runs on the CPU at toy sizes (``--dry-run``, tests/test_gpu_check.py) so that it is known to work first::

    python -m benchmarks.gpu_check --out-dir gpu_out              # on a CUDA machine
    python -m benchmarks.gpu_check --out-dir /tmp/gc --dry-run    # CPU, toy sizes, about a minute
    bash benchmarks/gpu_check.sh                                  # the GPU machine: carried wheels + $OUT

Sections, in order (each one guarded: a failure is recorded with its one-line error and the next section runs;
``report.md`` and ``report.json`` in ``--out-dir`` are rewritten after every section, so a timeout leaves what was
measured; once ``--budget-s`` seconds have passed the remaining sections are skipped with a note):

* **environment**  -- card, its dense bf16 peak (``common.PEAK_BF16_TFLOPS``), torch / diffusers / datasets versions.
* **notebook**     -- ``LiquidDiffusion_Training.ipynb`` executed end to end by nbclient on the device through its
  ``LD_*`` overrides: a generated image folder, latent space with the random-weight VAE, train with a mid-run grid,
  final samples, export, load back; the executed notebook comes back as ``notebook_executed.ipynb``.
* **memory**       -- peak VRAM (``torch.cuda.max_memory_allocated``, reset before each run) of training at 256 px,
  batch 8: tiny with cached latents and with the SD-VAE encoder in the loop, in fp16 and bf16; small and base.
  Counted: model, fp32 EMA copy, AdamW state, gradients, activations, the batch and (in the loop) the VAE -- what
  the trainer holds; not counted: the CUDA context and the allocator's cache.
* **cli**          -- ``python -m liquid_diffusion train`` in subprocesses on a generated image folder, latent space
  with a random-weight SD-VAE-shaped ``AutoencoderKL`` saved locally (no internet needed), under
  ``--mixed-precision fp16`` (GradScaler), ``bf16`` and ``bf16 --compile``, each with and without
  ``--cache-latents``: train, ``--resume latest`` for more steps, ``export``; every loss in metrics.jsonl finite,
  checkpoints before and after the resume, sample grids and the exported pipeline present.
* **sampling**     -- seconds for 16 images with 25 Euler steps, model only and with the SD-VAE decode
  (``sampling.run_setting``).
* **speed**        -- training images/s of tiny / small / base vs DiT-S/2, DiT-B/2 and the matched UNet2DModel at
  4x32x32 and 4x64x64, batch 8 and the largest batch that fits a T4-sized budget, bf16 and bf16 + compile, the
  models of one setting timed in interleaved rounds in this one process (``common.interleaved``). Settings run in
  priority order (the issue's target, 4x32x32 batch 8 with compile, first), so a short budget cuts the least useful.
* **profile**      -- ``torch.profiler`` over a few eager steps of tiny, DiT-S/2 and UNet2DModel at 4x32x32,
  batch 8, after the first speed setting: wall and kernel ms per step (how busy the GPU is: at small batch the host's
  launches may be the limit), kernels launched per step, and the ops whose kernels take the most time.
* **mfu**          -- achieved TFLOP/s (``torch.utils.flop_counter`` FLOPs of forward + backward x images/s) over
  the card's dense bf16 peak, for every speed row.
* **tests**        -- the pytest files whose code runs on CUDA when a GPU is present (the Trainer takes the
  accelerator's device) and the explicit CUDA variants (``test_compile.py``).
* **quality**      -- equal GPU minutes: tiny, DiT-S/2 and UNet2DModel each train for the same minutes through the
  product's ``Trainer`` (``benchmarks/recipe.py``) on Twemoji at 32 px (carried in ``.bench_data/twemoji-32px``;
  generated shapes when absent), one batch for all, each at its learning rate; scored by the held-out validation loss.

``--dry-run``: micro preset, a tiny VAE, 8x8 latents, a few steps; fp16/bf16 fall back to fp32 where CUDA is missing
(the trainer does so itself, so the CLI runs get the same flags), and compile uses the ``aot_eager`` backend (dynamo's
graph capture without inductor's minutes of C++ compilation on a CPU). Numbers from a dry run mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks import gpu_check_sections as sections


@dataclass
class Plan:
    """Sizes of one run: ``full()`` for a GPU, ``dry_run()`` for the CPU smoke run."""

    dry: bool
    preset: str = "tiny"  # the CLI and memory runs
    resolution: int = 256
    num_images: int = 64
    batch: int = 8
    cli_steps: tuple[int, int] = (200, 100)  # steps of the first run, then more steps after --resume
    cli_configs: tuple = sections.CLI_CONFIGS  # (--mixed-precision, --cache-latents, --compile)
    cli_jobs: int = 6  # CLI chains run concurrently (correctness only: their speed is not reported)
    cli_timeout_s: float = 300.0
    memory_presets: tuple[str, ...] = ("tiny", "small", "base")
    models: tuple[str, ...] = ("liquid-tiny", "liquid-small", "liquid-base", "dit-s2", "dit-b2", "unet2d")
    model_overrides: dict | None = None  # name -> common.build_model keyword overrides (the dry run's small peers)
    # (latent size, batch kind, models also compiled), in run order. Batch kind "8": ``batch``; "max": the largest
    # batch under ``mem_budget_mib``, per model; "8+": ``batch``, compiled models only (no eager rows)
    speed_settings: tuple = (
        (32, "8", ("liquid-tiny", "dit-s2", "unet2d")),
        (32, "max", ()),
        (64, "8", ("liquid-tiny", "dit-s2")),
        (64, "max", ()),
        (32, "8+", ("liquid-small", "liquid-base", "dit-b2")),  # compile of the larger ones, if time is left
    )
    dtype_name: str = "bf16"
    compile_backend: str = "inductor"
    compile_mode: str | None = None  # torch.compile's mode, e.g. "reduce-overhead": CUDA graphs (CUDA + inductor)
    rounds: int = 3
    steps: int = 5  # timed steps per model per round
    warmup: int = 2
    mem_budget_mib: float = 14.0 * 1024  # T4: 15 GiB on the card, ~1 GiB for the CUDA context and allocator slack
    max_batch_cap: int = 1024
    sample_models: tuple[str, ...] = ("liquid-tiny", "liquid-small", "liquid-base", "dit-s2", "dit-b2", "unet2d")
    profile_models: tuple[str, ...] = ("liquid-tiny", "dit-s2", "unet2d")
    profile_latent: int = 32
    profile_top: int = 8  # ops listed per model
    num_samples: int = 16
    sample_steps: int = 25
    # the two-process test is left out: torchrun would put both ranks on the one GPU
    pytest_args: tuple[str, ...] = ("tests/test_compile.py", "tests/test_trainer.py", "-k", "not two_process")
    pytest_timeout_s: float = 240.0
    # quality: equal minutes each through Trainer; learning rates at batch 8 (default: the trainer's), sqrt-scaled
    quality_models: tuple[str, ...] = ("liquid-tiny", "dit-s2", "unet2d")
    quality_lr: dict = dataclasses.field(default_factory=dict)
    quality_minutes: float = 1.5
    quality_batch: int = 64
    quality_validation_images: int = 256
    quality_images: int = 512  # generated, when no real images were carried
    notebook_steps: int = 200  # the notebook's run (a grid at half way)
    notebook_timeout_s: float = 300.0  # per cell

    @classmethod
    def full(cls) -> Plan:
        return cls(dry=False)

    @classmethod
    def dry_run(cls) -> Plan:
        return cls(
            dry=True,
            preset="micro",
            resolution=64,
            num_images=8,
            batch=2,
            cli_steps=(2, 1),
            cli_jobs=1,
            cli_configs=(("bf16", True, True),),
            cli_timeout_s=120.0,
            memory_presets=("micro",),
            models=("liquid-micro", "dit-s2"),
            model_overrides={"dit-s2": dict(hidden=64, depth=1, heads=1)},
            speed_settings=((8, "8", ("liquid-micro", "dit-s2")), (8, "max", ()), (8, "8+", ("dit-s2",))),
            dtype_name="fp32",
            compile_backend="aot_eager",
            rounds=2,
            steps=1,
            warmup=1,
            mem_budget_mib=256.0,
            max_batch_cap=8,
            sample_models=("liquid-micro", "dit-s2"),
            num_samples=2,
            sample_steps=2,
            profile_models=("liquid-micro", "dit-s2"),
            profile_latent=8,
            profile_top=3,
            pytest_args=("tests/test_trainer.py", "-k", "mixed_precision_auto"),
            pytest_timeout_s=120.0,
            quality_models=("liquid-micro", "dit-micro"),
            quality_minutes=0.02,
            quality_batch=4,
            quality_validation_images=8,
            quality_images=40,
            notebook_steps=4,
            notebook_timeout_s=300.0,
        )

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[self.dtype_name]


# ------------------------------------------------------------------------------------------------------------------
# The report: rewritten after every section
# ------------------------------------------------------------------------------------------------------------------


class Report:
    """Collects sections (status, Markdown body, data) and writes ``report.md`` + ``report.json`` after each one."""

    def __init__(self, out_dir: Path, header: str, meta: dict):
        self.out_dir, self.header, self.meta = out_dir, header, meta
        self.sections: list[dict] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, status: str, seconds: float, body: str = "", data=None, error: str | None = None):
        self.sections.append(
            dict(name=name, status=status, seconds=round(seconds, 2), body=body, data=data, error=error)
        )
        self.write()

    def write(self) -> None:
        lines = [self.header, "", "| section | status | seconds | note |", "|---|---|---|---|"]
        for s in self.sections:
            lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['error'] or ''} |")
        for s in self.sections:
            lines += ["", f"## {s['name']} ({s['status']})", ""]
            if s["error"]:
                lines.append(f"**{s['status']}:** `{s['error']}`\n")
            if s["body"]:
                lines.append(s["body"])
        _atomic_write(self.out_dir / "report.md", "\n".join(lines) + "\n")
        payload = dict(meta=self.meta, sections=self.sections)
        _atomic_write(self.out_dir / "report.json", json.dumps(payload, indent=1, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` -- what the report shows for a failed section."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"[:300]


class Runner:
    """Runs sections under the global time budget; each section returns (Markdown body, data) or raises."""

    def __init__(self, report: Report, budget_s: float, log):
        self.report, self.budget_s, self.log = report, budget_s, log
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def run(self, name: str, fn, *args, always: bool = False) -> object:
        if self.remaining() <= 0 and not always:
            note = f"skipped: the time budget (--budget-s {self.budget_s:g}) was spent after {self.elapsed():.0f} s"
            self.log(f"== {name}: {note}")
            self.report.add(name, "skipped", 0.0, error=note)
            return None
        self.log(f"\n== {name} (t = {self.elapsed():.0f} s)")
        start = time.perf_counter()
        try:
            body, data, status = fn(*args)
        except Exception as error:  # noqa: BLE001 -- one failing section must not stop the others
            self.log(traceback.format_exc())
            self.report.add(
                name,
                "failed",
                time.perf_counter() - start,
                error=one_line(error),
                data=dict(traceback=traceback.format_exc()[-4000:]),
            )
            return None
        self.report.add(name, status, time.perf_counter() - start, body=body, data=data)
        self.log(body)
        return data


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out-dir", required=True, help="report.md, report.json and the CLI runs' folders go here")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, seconds: checks the script itself")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="skip the remaining sections (with a note) once this many seconds have passed (default 480); "
        "it also caps each CLI command and the pytest run at what is left of it plus a minute, so a "
        "small budget cuts the CLI chains short (give cli about 300 s)",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=sections.SECTIONS,
        default=list(sections.SECTIONS),
        help="run only these sections (default: all, in the documented order)",
    )
    p.add_argument(
        "--work-dir",
        help="where the CLI runs and logs go (default: OUT_DIR/work); keep it out of a "
        "folder that must stay small, such as the GPU machine's $OUT",
    )
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (the dry run uses 1 unless told)")
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help="time and sample only these models (common.build_model names, e.g. liquid-tiny-ablation; "
        "the first is the one the targets judge); default: the plan's",
    )
    p.add_argument(
        "--compile-models",
        nargs="*",
        metavar="NAME",
        help="the models the first speed setting also compiles (default: the plan's, kept to --models)",
    )
    p.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile's mode for the compiled rows (reduce-overhead records CUDA graphs, which "
        "removes the per-kernel launch cost; with inductor on CUDA only); default: torch's default",
    )
    return p.parse_args(argv)


def select_models(plan: Plan, models: list[str] | None, compile_models: list[str] | None) -> Plan:
    """``plan`` with ``--models`` / ``--compile-models`` applied; later settings compile only selected models."""
    if models is None and compile_models is None:
        return plan
    models = tuple(models or plan.models)
    kept = lambda names: tuple(m for m in names if m in models)
    first, *rest = plan.speed_settings
    first = (*first[:2], tuple(compile_models) if compile_models is not None else kept(first[2]))
    return dataclasses.replace(
        plan,
        models=models,
        sample_models=models,
        profile_models=models,
        speed_settings=(first, *[(*s[:2], kept(s[2])) for s in rest]),
    )


def describe(device: torch.device) -> dict:
    name, peak = common.peak_tflops(device)
    versions = {}
    for package in ("torch", "diffusers", "datasets", "accelerate", "huggingface_hub", "safetensors", "pyarrow"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001
            versions[package] = None
    info = dict(
        device=str(device),
        name=name,
        peak_bf16_tflops=peak,
        python=platform.python_version(),
        versions=versions,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            native_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
        )
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    plan = select_models(Plan.dry_run() if args.dry_run else Plan.full(), args.models, args.compile_models)
    if args.compile_mode and args.compile_mode != "default":
        plan = dataclasses.replace(plan, compile_mode=args.compile_mode)
    for name in {*plan.models, *plan.speed_settings[0][2]}:
        if not common.is_model_name(name):
            print(f"error: unknown model {name!r} in --models / --compile-models (see benchmarks/common.py)")
            return 2
    if args.threads or plan.dry:
        torch.set_num_threads(args.threads or 1)
    if device.type != "cuda" and not plan.dry:
        print("note: no CUDA device; running the full-size plan on the CPU will take hours -- use --dry-run")
    out_dir = Path(args.out_dir).resolve()
    info = describe(device)
    command = "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"# GPU check{' (DRY RUN: toy sizes on the CPU, numbers mean nothing)' if plan.dry else ''}\n\n"
        f"machine: {common.describe_machine(device)}  \ncommand: `{command}`  \ndate: {info['date']}"
    )
    report = Report(out_dir, header, dict(info=info, plan=plan.__dict__, command=command))

    def log(message=""):
        print(message, flush=True)

    runner = Runner(report, args.budget_s, log)
    work_dir = Path(args.work_dir).resolve() if args.work_dir else out_dir / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    context = sections.Context(
        plan=plan, device=device, out_dir=out_dir, work_dir=work_dir, runner=runner, info=info, log=log
    )
    for section, title, function, function_args in sections.steps(plan):
        if section in args.sections:
            runner.run(title, function, context, *function_args, always=section in sections.ALWAYS)
    failed = [s["name"] for s in report.sections if s["status"] in ("failed", "checks failed")]
    log(
        f"\nwrote {out_dir / 'report.md'} and report.json in {runner.elapsed():.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
