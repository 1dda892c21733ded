"""Equal-budget quality study in pixel space at 32x32: LiquidDiffusion vs DiT vs UNet2DModel vs the liquid ablation.

Every model is trained with the same rectified-flow objective on the same data, for the same number of steps, batch
size, learning-rate schedule and seeds (same data order, same noise and t draws), then scored by the **held-out
flow-matching loss** on a fixed grid of t values with fixed noise seeds, overall and per t (t = 0.05 is where a
relaxation that tends to the identity at small t would show up; see SPEC.md), and sampled with 25 Euler steps from
fixed noise into PNG grids.

Data (``--data``): ``shapes`` (default, offline, the fast smoke test) is a synthetic but structured set generated
deterministically here: 32x32 RGB images of one to three anti-aliased coloured shapes over a two-colour gradient;
train and held-out sets come from different seeds. ``twemoji`` is real art no one here drew: the 3786 Twemoji 64 px
PNGs of the npm package ``emoji-datasource-twitter`` (CC-BY 4.0), fetched once with ``npm pack`` into
``--cache-dir`` (never the repo), composited on white, box-filtered to 32 px, with a fixed held-out split by
file-name hash (392 images held out, the first ``--eval-size`` of them scored).

``--eval-at 300`` with ``--steps 600`` scores the same run after 300 and 600 steps (two budgets, one schedule).
``--seconds 240`` gives every model 240 seconds of training time instead of a number of steps (equal wall-clock):
the learning-rate schedule follows the time spent, and each model is scored at the step it reached.
``--liquid-variant NAME`` trains a block design of ``variants.py`` instead of the package's (the ablation table), and
``liquid-ablation`` is then that design's ``NAME-ablation``.

Models at the default settings (chosen so the study fits about 15 minutes of a 2-core CPU, and roughly matched in
training FLOPs per image rather than in parameters -- the table prints both):

* ``liquid``          -- ``LiquidDiffusionUNet`` preset ``--liquid-preset`` (micro: widths 32/64/128, depths 2/2/2);
* ``liquid-ablation`` -- the same with ``liquid=False`` (ParallelCfC -> a plain gated 1x1 projection);
* ``dit``             -- ``DiTTransformer2DModel`` of DiT-S/2's shape family (patch 2 on 32x32 pixels, depth 12, head
  dim 64) at reduced width ``--dit-hidden`` (128, 2 heads); ``--dit-hidden 384 --dit-heads 6`` is DiT-S/2 proper;
* ``unet2d``          -- ``UNet2DModel`` with ``--unet-channels`` (32 64 128; attention in the two lower stages).

Example::

    python -m benchmarks.quality --out-dir bench_out/quality            # the full study, ~15 min on 2 CPU cores
    python -m benchmarks.quality --quick --out-dir /tmp/q               # seconds, smoke test
    # the same study with one model per process (1 thread each: faster on a busy multi-core CPU), then one table:
    for m in liquid dit unet2d liquid-ablation; do
        python -m benchmarks.quality --models $m --threads 1 --out-dir out/q_$m & done; wait
    python -m benchmarks.quality --merge out/q_liquid out/q_dit out/q_unet2d out/q_liquid-ablation --out-dir out/q
    python -m benchmarks.quality --liquid-preset tiny --dit-hidden 384 --dit-heads 6 \\
        --unet-channels 96 192 256 --steps 5000 --device cuda           # full-size models, on a GPU
    # issue 11's protocol: tiny vs DiT-S/2 vs UNet2DModel (tiny's size) on real images, 300 and 600 steps, per seed
    python -m benchmarks.quality --data twemoji --liquid-preset tiny --dit-hidden 384 --dit-heads 6 \\
        --unet-channels 96 192 256 --steps 600 --eval-at 300 --eval-seeds 1 --seed 0 --out-dir out/tiny_s0
    # ... and every seed and budget at once, in parallel, with one table of means over seeds (quality_study.py)
    python -m benchmarks.quality_study --preset tiny --budgets 300 600 --seeds 0 1 2 --device cuda --out-dir out/study
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import sys
import tarfile
import time

import numpy as np
import torch

from benchmarks import common, variants
from liquid_diffusion import flow

T_GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def make_shapes(n: int, seed: int, size: int = 32, supersample: int = 2) -> torch.Tensor:
    """``n`` RGB images in [-1, 1], shape [n, 3, size, size]: coloured shapes on gradient backgrounds (deterministic)."""
    rng = np.random.default_rng(seed)
    s = size * supersample
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)
        img = c0[:, None, None] * (1 - ramp) + c1[:, None, None] * ramp
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(0, 4)
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            color = rng.uniform(0, 1, 3)
            if kind == 0:  # disc
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            elif kind == 1:  # axis-aligned square
                mask = (abs(xx - cx) < r) & (abs(yy - cy) < r)
            elif kind == 2:  # upward triangle
                mask = (yy < cy + r) & (yy - (cy - r) > 2 * abs(xx - cx))
            else:  # ring
                d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
                mask = (d < r) & (d > 0.55 * r)
            img = np.where(mask[None], color[:, None, None], img)
        img = img.reshape(3, size, supersample, size, supersample).mean(axis=(2, 4))  # anti-aliasing
        images[i] = img * 2 - 1
    return torch.from_numpy(images)


EMOJI_PACKAGE = "emoji-datasource-twitter@16.0.0"  # Twemoji 64 px PNGs, CC-BY 4.0 (npm registry)


def load_emoji(cache_dir: str, size: int = 32, holdout_pct: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) RGB images in [-1, 1], shape [n, 3, size, size], from the Twemoji 64 px PNGs.

    The npm package is fetched once with ``npm pack`` into ``cache_dir`` (never into the repo); every PNG is
    composited on white and box-filtered to ``size``. The split is fixed by file name: an image is held out when
    ``md5(name) % 100 < holdout_pct`` (about 380 of 3786 images at 10 %), so it does not depend on any seed;
    the held-out images come in md5 order, so ``--eval-size`` takes a fair subset of them.
    """
    cache = os.path.join(cache_dir, f"{EMOJI_PACKAGE.replace('@', '-')}-{size}px.pt")
    if not os.path.exists(cache):
        from PIL import Image

        with tarfile.open(common.npm_pack(EMOJI_PACKAGE, cache_dir)) as tar:
            members = sorted((m for m in tar.getmembers() if re.fullmatch(r"package/img/twitter/64/[^/]+\.png", m.name)),
                             key=lambda m: m.name)
            names, images = [], []
            for m in members:
                rgba = Image.open(tar.extractfile(m)).convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgba).convert("RGB").resize((size, size), Image.BOX)
                names.append(os.path.basename(m.name))
                images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))
        torch.save(dict(names=names, images=torch.stack(images)), cache)
    blob = torch.load(cache)
    digest = [int(hashlib.md5(n.encode()).hexdigest(), 16) for n in blob["names"]]
    held = torch.tensor([d % 100 < holdout_pct for d in digest])
    images = blob["images"].float() / 127.5 - 1
    order = sorted(range(len(digest)), key=lambda i: digest[i])  # held-out in hash order: any prefix is a fair sample
    return images[~held], images[[i for i in order if held[i]]]


def save_grid(images: torch.Tensor, path: str, nrow: int = 4) -> None:
    """Writes images in [-1, 1] of shape [N, 3, H, W] as one PNG grid (PIL), upscaled 4x for viewing."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + 2) + 2, nrow * (w + 2) + 2), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = x[k]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    img.resize((img.width * 4, img.height * 4), Image.NEAREST).save(path)


def side_by_side(grids: dict[str, str], path: str) -> None:
    """Pastes the PNG grids ``{label: file}`` next to each other, each under its label, into one PNG."""
    from PIL import Image, ImageDraw

    images = {k: Image.open(v).convert("RGB") for k, v in grids.items() if os.path.exists(v)}
    if not images:
        return
    width, height = sum(i.width + 16 for i in images.values()), max(i.height for i in images.values()) + 24
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for label, image in images.items():
        ImageDraw.Draw(canvas).text((x + 4, 4), label, fill="black")
        canvas.paste(image, (x, 24))
        x += image.width + 16
    canvas.save(path)


# ------------------------------------------------------------------------------------------------------------------
# Models, training, evaluation
# ------------------------------------------------------------------------------------------------------------------


def build(kind: str, args) -> common.VelocityModel:
    if kind == "liquid" and args.liquid_variant:
        return variants.build(args.liquid_variant, args.liquid_preset, 3)
    if kind == "liquid":
        return common.build_model(f"liquid-{args.liquid_preset}", 3, 32)
    if kind == "liquid-ablation" and args.liquid_variant:
        return variants.build(f"{args.liquid_variant}-ablation", args.liquid_preset, 3)
    if kind == "liquid-ablation":
        return common.build_model(f"liquid-{args.liquid_preset}-ablation", 3, 32)
    if kind == "dit":
        return common.build_model("dit-s2", 3, 32, hidden=args.dit_hidden, depth=args.dit_depth, heads=args.dit_heads)
    if kind == "unet2d":
        return common.build_model("unet2d", 3, 32, block_out_channels=tuple(args.unet_channels))
    raise ValueError(kind)


def lr_factor_by_time(done: float, warmup: float = 0.05) -> float:
    """The learning rate's factor once the fraction ``done`` of a ``--seconds`` budget is spent: linear warm-up over
    the first ``warmup`` of the time (from at least 5 % of the rate), then a cosine to 0 at the budget's end."""
    done = min(1.0, max(0.0, done))
    return min(1.0, max(0.05, done / warmup)) * 0.5 * (1 + math.cos(math.pi * done))


def train(model, data: torch.Tensor, args, device, on_eval=None, clock=time.perf_counter) -> dict:
    """AdamW with linear warm-up then cosine decay; data order, noise and t come from ``args.seed`` (same for all).

    ``args.steps`` steps, or with ``args.seconds`` as many steps as fit in that much training time (forward, backward
    and optimizer; scoring excluded): the schedule then follows the time spent, and no step starts that would end
    past the budget by the previous step's duration. ``on_eval(step, seconds)`` is called after each step listed in
    ``args.eval_at`` (seconds: training time so far), and at the end of a ``--seconds`` run. ``clock``: seconds.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    by_time = args.seconds is not None
    if not by_time:
        warmup = max(1, args.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    losses, seconds, step, last, next_report = [], 0.0, 0, 0.0, 0.1
    while (step == 0 or seconds + last <= args.seconds) if by_time else step < args.steps:
        start = clock()
        if by_time:
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_factor_by_time(seconds / args.seconds)
        idx = torch.randint(0, data.shape[0], (args.batch,), generator=gen)
        x0 = data[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.rand(args.batch, generator=gen).to(device)
        loss = flow.flow_matching_loss(model, x0, noise=noise, t=t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if not by_time:
            schedule.step()
        losses.append(loss.item())
        last = clock() - start
        seconds += last
        step += 1
        progress = seconds / args.seconds if by_time else step / args.steps
        if progress >= next_report - 1e-9:
            next_report = math.floor(progress * 10 + 1e-9) / 10 + 0.1
            total = f"{args.seconds:.0f}s" if by_time else f"{args.steps}"
            print(f"    step {step} ({total}): loss {np.mean(losses[-50:]):.4f} ({seconds:.0f}s)", flush=True)
        if on_eval is not None and not by_time and step in args.eval_at:
            on_eval(step, seconds)
            model.train()
    common.sync(device)
    if on_eval is not None and by_time:
        on_eval(step, seconds)
    return dict(steps=step, train_seconds=seconds, final_train_loss=float(np.mean(losses[-50:])))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, args, device) -> dict:
    """Held-out loss at every t of ``T_GRID`` for every eval seed (fixed noise per seed): per-t means and the mean."""
    model.eval()
    per_t = {t: [] for t in T_GRID}
    for seed in range(args.eval_seeds):
        gen = torch.Generator().manual_seed(10_000 + seed)
        noise_all = torch.randn(data.shape, generator=gen)
        for t in T_GRID:
            for i in range(0, data.shape[0], args.eval_batch):
                x0, noise = data[i : i + args.eval_batch].to(device), noise_all[i : i + args.eval_batch].to(device)
                tt = torch.full((x0.shape[0],), t, device=device)
                per_t[t].append(flow.flow_matching_loss(model, x0, noise=noise, t=tt, reduction="none").cpu())
    per_t = {t: torch.cat(v).mean().item() for t, v in per_t.items()}
    return dict(per_t=per_t, mean=float(np.mean(list(per_t.values()))))


@torch.no_grad()
def sample_grid(model, args, device, path: str) -> None:
    model.eval()
    noise = torch.randn(args.num_samples, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    save_grid(flow.euler_sample(model, noise, num_steps=args.sample_steps), path)


def _floats_per_t(r: dict) -> dict:
    """JSON turns the float t keys into strings; this turns them back (also in the per-step ``at`` entries)."""
    r = {**r, "per_t": {float(t): v for t, v in r["per_t"].items()}}
    if "at" in r:
        r["at"] = {int(k): {**a, "per_t": {float(t): v for t, v in a["per_t"].items()}} for k, a in r["at"].items()}
    return r


def write_json(args, results, machine, command) -> None:
    with open(os.path.join(args.out_dir, "quality.json"), "w") as f:
        json.dump(dict(args=vars(args), results=results, machine=machine, command=command), f, indent=1)


def run_model(kind, train_data, eval_data, args, device, results, machine, command) -> dict:
    """Trains one model, scores it at every ``args.eval_at`` step (JSON written after each), samples a grid."""
    torch.manual_seed(args.seed)
    model = build(kind, args).to(device)
    gflop = common.train_step_flops(model, train_data[:2].to(device)) / 2 / 1e9
    print(f"\n== {kind}: {common.count_params(model):.2f}M params, {gflop:.2f} GFLOP/img fwd+bwd ==", flush=True)
    stats = dict(params_m=common.count_params(model), gflop_per_img=gflop, at={})
    results[kind] = stats

    def on_eval(step, seconds):
        stats["at"][step] = dict(evaluate(model, eval_data, args, device), train_seconds=seconds)
        print(f"  step {step}: held-out loss {stats['at'][step]['mean']:.4f}; "
              f"t=0.05: {stats['at'][step]['per_t'][0.05]:.4f}; {seconds:.0f}s", flush=True)
        write_json(args, results, machine, command)

    stats.update(train(model, train_data, args, device, on_eval))
    stats.update(stats["at"][stats["steps"]])
    sample_grid(model, args, device, os.path.join(args.out_dir, f"samples_{kind}.png"))
    return stats


# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["liquid", "dit", "unet2d", "liquid-ablation"],
                   choices=["liquid", "dit", "unet2d", "liquid-ablation"])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seconds", type=float, default=None,
                   help="equal wall-clock: train each model for this many seconds of training time instead of --steps "
                        "steps (the schedule follows the time; scored at the end)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=8192)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--liquid-preset", default="micro")
    p.add_argument("--liquid-variant", help="a block design of benchmarks/variants.py instead of the package's")
    p.add_argument("--data", choices=["shapes", "twemoji"], default="shapes",
                   help="shapes: synthetic, offline; twemoji: real 64px emoji art via `npm pack` (cached, see --cache-dir)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/liquid-diffusion-bench"))
    p.add_argument("--eval-at", type=int, nargs="+", default=[],
                   help="also score the held-out loss after these steps of the same run (the final step always)")
    p.add_argument("--dit-hidden", type=int, default=128)
    p.add_argument("--dit-depth", type=int, default=12)
    p.add_argument("--dit-heads", type=int, default=2)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default="bench_out/quality")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="only write the combined table of earlier runs' DIR/quality.json (e.g. one model per process)")
    p.add_argument("--quick", action="store_true",
                   help="5 steps, tiny data and eval, shallow DiT / narrow UNet2DModel: a smoke test in seconds")
    args = p.parse_args(argv)
    if args.seconds is not None and not (0 < args.seconds < math.inf):
        p.error(f"--seconds must be a positive number of seconds, not {args.seconds}")
    if args.seconds is not None and args.eval_at:
        p.error("--eval-at counts steps, which a --seconds run does not fix: it is scored at its end; drop --eval-at")
    if args.quick:
        args.steps, args.batch, args.train_size, args.eval_size = 5, 4, 64, 16
        args.eval_seeds, args.num_samples, args.sample_steps = 1, 4, 2
        args.dit_depth, args.unet_channels = 2, [32, 32, 64]
        args.eval_at = [] if args.seconds is not None else [3]
    if args.seconds is None:
        args.eval_at = sorted({s for s in args.eval_at if 0 < s < args.steps} | {args.steps})
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    if device.type == "cuda":  # fp32 as on the CPU: TF32 convolutions would round the conv nets' inputs, not DiT's
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out_dir, exist_ok=True)
    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"machine: {common.describe_machine(device)}\ncommand: {command}", flush=True)

    if not args.merge:
        if args.data == "twemoji":
            train_data, eval_data = load_emoji(args.cache_dir)
            eval_data = eval_data[: args.eval_size]
        else:
            train_data = make_shapes(args.train_size, seed=args.seed)
            eval_data = make_shapes(args.eval_size, seed=args.seed + 999_983)
        save_grid(eval_data[: args.num_samples], os.path.join(args.out_dir, "data.png"))

    results, commands, machine = {}, [], common.describe_machine(device)
    grids = {}
    for run_dir in args.merge or []:  # combine runs made in separate processes (same budget flags)
        with open(os.path.join(run_dir, "quality.json")) as f:
            run = json.load(f)
        # a run stopped part-way lacks its final score: leave that model out (a --seconds run's models each end
        # at their own step, which they record)
        final = {k: str(r.get("steps", run["args"]["steps"])) for k, r in run["results"].items()}
        finished = {k: {**r, **r["at"][final[k]]} for k, r in run["results"].items() if final[k] in r.get("at", {})}
        for k in sorted(set(run["results"]) - set(finished)):
            print(f"note: {run_dir}: {k} did not finish its {run['args']['steps']} steps; left out", flush=True)
        results.update({k: _floats_per_t(r) for k, r in finished.items()})
        grids.update({k: os.path.join(run_dir, f"samples_{k}.png") for k in finished})
        for key in ("steps", "seconds", "batch", "lr", "seed", "eval_size", "eval_seeds", "sample_steps", "data",
                    "eval_at"):
            setattr(args, key, run["args"].get(key, getattr(args, key)))
        commands.append(run["command"])
        machine = run["machine"]
    command = "; ".join(commands) if commands else command
    for kind in [] if args.merge else args.models:
        results[kind] = run_model(kind, train_data, eval_data, args, device, results, machine, command)
        grids[kind] = os.path.join(args.out_dir, f"samples_{kind}.png")
    side_by_side(grids, os.path.join(args.out_dir, "samples_side_by_side.png"))
    header = ["model", "step", "params (M)", "GFLOP/img", "train s", "held-out loss (mean over t)"]
    header += [f"t={t}" for t in T_GRID]
    rows = [[k, step, r["params_m"], r["gflop_per_img"], a["train_seconds"], a["mean"]]
            + [a["per_t"][t] for t in T_GRID]
            for k, r in results.items() for step, a in sorted(r.get("at", {args.steps: r}).items())]
    table = common.markdown_table(header, rows)
    ref = results.get("liquid")
    verdicts = []
    if ref:
        for other in ("dit", "unet2d", "liquid-ablation"):
            if other in results:
                o = results[other]
                verdicts.append(f"liquid / {other}: mean {ref['mean'] / o['mean']:.3f}, "
                                f"t=0.05 {ref['per_t'][0.05] / o['per_t'][0.05]:.3f} (< 1: liquid is better)")
    if args.seconds is None:
        budget, scored = f"{args.steps} steps", f"scored after steps {args.eval_at} of the same run"
    else:  # equal wall-clock: every model trains the same seconds, so each ends at its own step (the table's step)
        budget, scored = f"{args.seconds:g} s of training per model", "scored at the end"
    text = "\n".join([
        f"# Equal-budget quality, pixel space 32x32 ({datetime.date.today().isoformat()})\n",
        f"machine: {machine}", f"command: {command}",
        f"data: {args.data}; budget: {budget} x batch {args.batch}, AdamW lr {args.lr} (warm-up + cosine), "
        f"seed {args.seed}, {scored}; "
        f"held-out: {args.eval_size} images x {args.eval_seeds} noise seeds x t in {list(T_GRID)}\n",
        table, "", *verdicts, "", f"sample grids ({args.sample_steps} Euler steps, same noise): "
        + ", ".join(f"samples_{k}.png" for k in results) + " and all of them in samples_side_by_side.png; data.png: "
        "held-out images"])
    print("\n" + text)
    with open(os.path.join(args.out_dir, "quality.md"), "w") as f:
        f.write(text + "\n")
    write_json(args, results, machine, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
