"""Issue 11's quality protocol in one command: every model x seed x budget of ``quality.py``, in parallel, one table.

``quality.py`` trains and scores the models of one seed and one budget. This script runs the whole grid -- budgets
(``--budgets``, each scored at its half-way step too), seeds (``--seeds``) and models (liquid, liquid-ablation, DiT,
UNet2DModel, sized for ``--preset``) -- as separate ``quality.py`` processes, ``--jobs`` at a time, in priority order
(budgets as given, then seeds, then models), and writes ``summary.md`` / ``summary.json``: per budget and scored step,
each model's held-out loss as the mean over seeds with its range, at t = 0.05 and t = 0.5, and liquid's ratio to
each other model (< 1: liquid is better). Budgets above ``--split-above`` steps get one process per model, shorter
ones one process per seed (less start-up per step).

Made for a lent GPU, where the time is fixed in advance: after ``--deadline-s`` seconds no job is started and the
running ones are stopped; every job writes its JSON after each scored step, so a stopped job keeps its half-way
score, and the summary says which runs did not finish. The same command works on the CPU (slowly)::

    # tiny vs DiT-S/2 vs UNet2DModel (tiny's size) vs liquid=False on Twemoji 32 px, 3 seeds, 300 / 600 / 2000 steps
    python -m benchmarks.quality_study --preset tiny --budgets 300 600 2000 --seeds 0 1 2 --jobs 8 \\
        --deadline-s 240 --out-dir out/study --device cuda
    python -m benchmarks.quality_study --summarize out/study   # the table again, from the JSONs

Runs are scored in fp32 on every device (quality.py turns TF32 off on CUDA), so a GPU run reproduces the CPU's
numbers up to kernel rounding. The ``train s`` of runs sharing one device are not wall-clock comparisons.

Equal wall-clock (issue 11's goal 2): ``--seconds S`` gives every model S seconds of training time per seed instead
of a number of steps (quality.py ``--seconds``), each model in a process of its own, scored at its end; the summary
shows the steps each model reached. Run them one at a time with all the cores, as a user trains::

    python -m benchmarks.quality_study --preset tiny --seconds 240 --seeds 0 1 2 --models liquid dit unet2d \\
        --jobs 1 --threads 2 --out-dir out/wallclock
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from benchmarks import common

MODELS = ("liquid", "dit", "unet2d", "liquid-ablation")
# The peers at each preset's size: DiT of DiT-S/2's shape (patch 2 on 32 px: 256 tokens), UNet2DModel of its size.
PEERS = {
    "micro": ["--dit-hidden", "128", "--dit-heads", "2", "--unet-channels", "32", "64", "128"],
    "tiny": ["--dit-hidden", "384", "--dit-heads", "6", "--unet-channels", "96", "192", "256"],
}


def plan_jobs(args) -> list[dict]:
    """The grid as ``quality.py`` invocations, in priority order."""
    common_argv = ["--data", args.data, "--liquid-preset", args.preset, *PEERS[args.preset],
                   "--eval-size", str(args.eval_size), "--eval-seeds", str(args.eval_seeds),
                   "--num-samples", str(args.num_samples), "--threads", str(args.threads), "--device", args.device,
                   "--cache-dir", args.cache_dir]
    jobs = []
    for budget in args.budgets:
        groups = [[m] for m in args.models] if budget > args.split_above else [list(args.models)]
        for seed in args.seeds:
            for models in groups:
                name = f"b{budget}_s{seed}" + (f"_{models[0]}" if len(models) == 1 else "")
                argv = [*common_argv, "--steps", str(budget), "--eval-at", str(budget // 2), "--seed", str(seed),
                        "--models", *models, "--out-dir", os.path.join(args.out_dir, name), *args.quality_args]
                jobs.append(dict(name=name, budget=budget, seed=seed, models=models, argv=argv))
    for seconds in args.seconds:  # equal wall-clock: one process per model, so no model's time includes another's
        for seed in args.seeds:
            for model in args.models:
                name = f"t{seconds:g}s_s{seed}_{model}"
                argv = [*common_argv, "--seconds", f"{seconds:g}", "--seed", str(seed), "--models", model,
                        "--out-dir", os.path.join(args.out_dir, name), *args.quality_args]
                jobs.append(dict(name=name, budget=f"{seconds:g} s", seed=seed, models=[model], argv=argv))
    return jobs


def run_jobs(jobs: list[dict], args) -> dict[str, str]:
    """Runs the jobs ``args.jobs`` at a time until all end or the deadline; returns name -> status."""
    start, pending, running, status = time.monotonic(), list(jobs), {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    while pending or running:
        late = time.monotonic() - start > args.deadline_s
        while pending and len(running) < args.jobs and not late:
            job = pending.pop(0)
            os.makedirs(os.path.join(args.out_dir, job["name"]), exist_ok=True)
            log = open(os.path.join(args.out_dir, job["name"], "log.txt"), "w")
            running[job["name"]] = subprocess.Popen([sys.executable, "-m", "benchmarks.quality", *job["argv"]],
                                                    stdout=log, stderr=subprocess.STDOUT, env=env,
                                                    start_new_session=True)
            print(f"[{time.monotonic() - start:5.0f}s] started {job['name']}", flush=True)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                status[name] = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            elif late:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status[name] = "stopped at the deadline"
            else:
                continue
            del running[name]
            print(f"[{time.monotonic() - start:5.0f}s] {name}: {status[name]}", flush=True)
        if late:
            status.update({job["name"]: "not started (deadline)" for job in pending})
            pending = []
        time.sleep(0.5)
    return status


def collect(out_dir: str) -> list[dict]:
    """One record per (run, model, scored step) from every ``*/quality.json`` under ``out_dir``."""
    records, seen = [], set()
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name, "quality.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            run = json.load(f)
        seconds = run["args"].get("seconds")
        budget = run["args"]["steps"] if seconds is None else f"{seconds:g} s"
        for model, result in run["results"].items():
            for step, at in result.get("at", {}).items():
                key = (model, budget, run["args"]["seed"], int(step))
                if key in seen:  # the same run twice (e.g. a stopped group re-run per model): one is enough
                    continue
                seen.add(key)
                records.append(dict(run=name, model=model, budget=budget, seconds=seconds, seed=run["args"]["seed"],
                                    step=int(step), mean=at["mean"], t005=at["per_t"]["0.05"],
                                    t05=at["per_t"]["0.5"], train_s=at["train_seconds"],
                                    params_m=result["params_m"], gflop=result["gflop_per_img"],
                                    machine=run["machine"]))
    return records


def summarize(out_dir: str, status: dict | None = None) -> str:
    """``summary.md`` / ``summary.json``: per budget and scored step, each model's mean over seeds and its range."""
    records = collect(out_dir)
    groups: dict[tuple, list[dict]] = {}
    for r in records:  # a seconds budget is scored once, at its end, where each model and seed ends its own step
        groups.setdefault((r["budget"], r["step"] if r["seconds"] is None else "end", r["model"]), []).append(r)
    # step budgets first (by steps, then scored step), then seconds budgets (by seconds); models in MODELS order
    order = lambda kv: (kv[1][0]["seconds"] is not None, kv[1][0]["seconds"] or kv[1][0]["budget"],
                        0 if kv[0][1] == "end" else kv[0][1], MODELS.index(kv[0][2]))
    rows, means = [], {}
    for (budget, step, model), rs in sorted(groups.items(), key=order):
        m, t005 = statistics.mean(r["mean"] for r in rs), statistics.mean(r["t005"] for r in rs)
        means[(budget, step, model)] = (m, t005)
        span = lambda key, f=".4f": f"{min(r[key] for r in rs):{f}}-{max(r[key] for r in rs):{f}}"
        rows.append([budget, step if step != "end" else f"end ({span('step', 'd')})", model, rs[0]["params_m"],
                     rs[0]["gflop"], ",".join(str(r["seed"]) for r in rs), f"**{m:.4f}** ({span('mean')})",
                     f"{t005:.4f} ({span('t005')})", f"{statistics.mean(r['t05'] for r in rs):.4f}"])
    ratios = []
    for (budget, step, model), (m, t005) in means.items():
        if model != "liquid" and (budget, step, "liquid") in means:
            lm, l005 = means[(budget, step, "liquid")]
            seeds = lambda mod: sorted(r["seed"] for r in groups[(budget, step, mod)])
            note = "" if seeds("liquid") == seeds(model) else f" (seeds differ: {seeds('liquid')} vs {seeds(model)})"
            where = f"{budget} steps, scored at {step}" if step != "end" else f"{budget} of training each"
            ratios.append(f"- {where}: liquid / {model}: mean {lm / m:.3f}, t=0.05 {l005 / t005:.3f}{note}")
    header = ["budget", "step", "model", "params (M)", "GFLOP/img", "seeds", "held-out mean (range)",
              "t=0.05 (range)", "t=0.5"]
    machines = sorted({r["machine"] for r in records})
    text = "\n".join([f"# Quality study ({out_dir})", "", f"machine: {'; '.join(machines)}", "",
                      common.markdown_table(header, rows), "", "liquid against each model (< 1: liquid is better):",
                      *ratios])
    if status:
        text += "\n\nruns: " + ", ".join(f"{k} {v}" for k, v in status.items())
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(dict(records=records, status=status or {}), f, indent=1)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="bench_out/quality_study")
    p.add_argument("--preset", choices=sorted(PEERS), default="tiny")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--budgets", type=int, nargs="+", default=None,
                   help="training steps (batch 16) per run (default 300 600, or none with --seconds)")
    p.add_argument("--seconds", type=float, nargs="+", default=[],
                   help="equal wall-clock budgets: seconds of training per model and seed, each model in its own "
                        "process (run them --jobs 1 --threads 2 on a quiet 2-core CPU: alone, as a user would)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", choices=["shapes", "twemoji"], default="twemoji")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/liquid-diffusion-bench"))
    p.add_argument("--eval-size", type=int, default=128)
    p.add_argument("--eval-seeds", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--jobs", type=int, default=2, help="quality.py processes at a time (--threads CPU threads each)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    p.add_argument("--split-above", type=int, default=1000,
                   help="budgets above this many steps get one process per model (default 1000)")
    p.add_argument("--deadline-s", type=float, default=float("inf"),
                   help="start no job after this many seconds and stop the running ones")
    p.add_argument("--device", default="auto")
    p.add_argument("--summarize", metavar="DIR", help="only rewrite DIR's summary from the runs' JSONs")
    p.add_argument("quality_args", nargs="*", help="after --: more quality.py flags for every run (e.g. --lr 1e-3)")
    args = p.parse_args(argv)
    if args.budgets is None:
        args.budgets = [] if args.seconds else [300, 600]
    if args.budgets and min(args.budgets) < 1:
        p.error("--budgets must be positive")
    if args.seconds and not all(0 < s < float("inf") for s in args.seconds):
        p.error("--seconds must be positive numbers of seconds")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if min(args.seeds) < 0:
        p.error("--seeds must be non-negative")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    status = run_jobs(plan_jobs(args), args)
    print("\n" + summarize(args.out_dir, status))
    return 0 if all(s == "done" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
