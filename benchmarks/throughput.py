"""Training throughput and peak memory: LiquidDiffusion presets against DiT-S/2, DiT-B/2 and a matched UNet2DModel.

What it measures, per latent size (4x32x32 = 256px images through SD-VAE, 4x64x64 = 512px) and per model:

* **images/s** of a full rectified-flow training step -- forward, backward and ``AdamW.step`` -- on a fixed batch of
  random latents (the data pipeline is not timed). All models of one setting live in one process and are timed in
  *interleaved rounds* (round r runs every model once for ``--steps`` steps, in rotating order), so a machine that
  slows down mid-run (shared CPUs, GPU clocks) hurts every model alike; the table shows the median over rounds, the
  spread of the rounds, and the ratio of each model's median to each peer's.
* **peak memory** of building the model + optimizer and running the warm-up steps (see ``common.peak_memory``:
  ``torch.cuda.max_memory_allocated`` delta on CUDA, peak-RSS delta on the CPU -- which counts weights, gradients,
  AdamW state, activations and allocator slack, so it is not a VRAM prediction).
* **FLOPs** of one forward + backward (``torch.utils.flop_counter``), the achieved TFLOP/s and, on a GPU whose peak
  is in ``common.PEAK_BF16_TFLOPS``, the MFU (achieved / peak dense bf16).
* On CUDA (or with ``--variants``/``--vae`` on the CPU): bf16 autocast, bf16 + channels_last and bf16 +
  ``torch.compile`` variants, and peak VRAM at ``--batch`` with the SD-VAE (random weights, real shape) encoding
  256px/512px images inside every step ("VAE in the loop") next to the cached-latent number.

Examples::

    python -m benchmarks.throughput --quick                      # seconds, smoke test
    python -m benchmarks.throughput                              # CPU default: fp32, 32 and 64 latents
    python -m benchmarks.throughput --device cuda                # + bf16 / channels_last / compile / VAE memory
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from benchmarks import common

DEFAULT_MODELS = ["liquid-micro", "liquid-tiny", "liquid-small", "liquid-base", "dit-s2", "dit-b2", "unet2d"]
PEERS = ["dit-s2", "dit-b2", "unet2d"]
VARIANTS = {  # name -> (autocast dtype, channels_last, compile)
    "fp32": (None, False, False),
    "fp32+channels_last": (None, True, False),  # what the trainer runs (channels_last on every device)
    "bf16": (torch.bfloat16, False, False),
    "bf16+channels_last": (torch.bfloat16, True, False),
    "bf16+compile": (torch.bfloat16, False, True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="liquid-<preset>, dit-s2, dit-b2, unet2d")
    p.add_argument("--latent-sizes", nargs="+", type=int, default=[32, 64], help="latent H=W (32 = 256px, 64 = 512px)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all on CUDA, fp32 on the CPU")
    p.add_argument(
        "--vae",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure memory and images/s with the SD-VAE encoder in the loop (default: on for CUDA)",
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice); 1 on an oversubscribed CPU"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="micro/tiny/DiT-S/2/UNet2DModel at 16x16, batch 2: seconds")
    p.add_argument("--output", help="also write the markdown tables (and a .json next to it) here")
    args = p.parse_args(argv)
    if args.quick:
        args.models = ["liquid-micro", "liquid-tiny", "dit-s2", "unet2d"]
        args.latent_sizes, args.batch, args.rounds, args.steps, args.warmup = [16], 2, 2, 1, 1
    return args


def build_job(name, size, args, device, variant):
    """Model + optimizer + fixed batch for one (model, size, variant); returns (model, step closure, flops, memory)."""
    dtype, channels_last, compile_ = VARIANTS[variant]
    torch.manual_seed(args.seed)
    batch = torch.randn(args.batch, 4, size, size, device=device)
    with common.peak_memory(device) as mem:
        model = common.build_model(name, 4, size).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            batch = batch.contiguous(memory_format=torch.channels_last)
        flops = common.train_step_flops(model, batch)  # eager FLOPs (compile does not change the count)
        runner = torch.compile(model) if compile_ else model
        step = common.make_train_step(runner, batch, autocast_dtype=dtype)
        for _ in range(args.warmup):
            step()
        common.sync(device)
    return model, step, flops, mem


def vae_in_loop(name, size, args, device):
    """Peak memory and images/s of training with the SD-VAE encoding ``8 * size`` px images inside each step."""
    torch.manual_seed(args.seed)
    images = torch.rand(args.batch, 3, 8 * size, 8 * size, device=device) * 2 - 1
    dtype = torch.bfloat16 if device.type == "cuda" else None
    with common.peak_memory(device) as mem:
        vae = common.build_vae().to(device)
        model = common.build_model(name, 4, size).to(device).train()
        step = common.make_train_step(model, images, autocast_dtype=dtype, vae=vae)
        for _ in range(max(1, args.warmup)):
            step()
        seconds = min(common.timed(step, device) for _ in range(args.steps))
    del vae, model, step
    return mem["mib"], args.batch / seconds


def run_setting(size, variant, args, device, log):
    """All models at one latent size and variant, timed in interleaved rounds; returns rows for the tables."""
    log(f"\n== latents 4x{size}x{size} ({8 * size}px), batch {args.batch}, {variant} ==")
    built = {}
    for name in args.models:
        model, step, flops, mem = build_job(name, size, args, device, variant)
        built[name] = dict(model=model, step=step, flops=flops, mem=mem, params=common.count_params(model))
        log(
            f"  built {name}: {built[name]['params']:.1f}M params, {flops / args.batch / 1e9:.2f} GFLOP/img fwd+bwd, "
            f"peak mem +{mem['mib']:.0f} MiB"
        )

    def job(name):
        step = built[name]["step"]
        return lambda: args.batch * args.steps / common.timed(lambda: [step() for _ in range(args.steps)], device)

    rates = common.interleaved({n: job(n) for n in args.models}, args.rounds, log)
    _, peak = common.peak_tflops(device)
    rows = []
    for name in args.models:
        b, ips = built[name], common.median(rates[name])
        achieved = b["flops"] / args.batch * ips / 1e12
        rows.append(
            dict(
                model=name,
                latent=size,
                variant=variant,
                batch=args.batch,
                params_m=b["params"],
                gflop_per_img=b["flops"] / args.batch / 1e9,
                images_per_s=ips,
                spread_pct=common.spread(rates[name]),
                rounds=rates[name],
                tflops=achieved,
                mfu_pct=100 * achieved / peak if peak else float("nan"),
                peak_mem_mib=b["mem"]["mib"],
                mem_how=b["mem"]["how"],
            )
        )
    for row in rows:
        for peer in PEERS:
            if peer in rates:
                row[f"x_{peer}"] = row["images_per_s"] / common.median(rates[peer])
    built.clear()  # the models go before the next setting is built
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    variants = args.variants or (list(VARIANTS) if device.type == "cuda" else ["fp32"])
    use_vae = args.vae if args.vae is not None else device.type == "cuda"
    lines: list[str] = []

    def log(msg=""):
        print(msg, flush=True)

    header_info = (
        f"# Training throughput ({datetime.date.today().isoformat()})\n\nmachine: "
        f"{common.describe_machine(device)}\ncommand: python -m benchmarks.throughput "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}\n"
    )
    log(header_info)
    rows = []
    for size in args.latent_sizes:
        for variant in variants:
            rows += run_setting(size, variant, args, device, log)

    peers = [p for p in PEERS if p in args.models]
    header = [
        "model",
        "latent",
        "variant",
        "params (M)",
        "GFLOP/img",
        "images/s",
        "spread %",
        "TFLOP/s",
        "MFU %",
        "peak mem (MiB)",
    ] + [f"x {p}" for p in peers]
    table = common.markdown_table(
        header,
        [
            [
                r["model"],
                f"4x{r['latent']}x{r['latent']}",
                r["variant"],
                r["params_m"],
                r["gflop_per_img"],
                r["images_per_s"],
                r["spread_pct"],
                r["tflops"],
                r["mfu_pct"],
                r["peak_mem_mib"],
            ]
            + [r.get(f"x_{p}", float("nan")) for p in peers]
            for r in rows
        ],
    )
    lines += [
        header_info,
        f"batch {args.batch}, {args.rounds} interleaved rounds x {args.steps} steps, median; "
        f"memory: {rows[0]['mem_how']}\n",
        table,
    ]

    vae_rows = []
    if use_vae:
        log("\n== peak memory with cached latents vs the SD-VAE encoder in the loop ==")
        for size in args.latent_sizes:
            for name in args.models:
                same = [r for r in rows if r["model"] == name and r["latent"] == size]
                cached = next((r for r in same if r["variant"] == "bf16"), same[0])["peak_mem_mib"]
                mib, ips = vae_in_loop(name, size, args, device)
                vae_rows.append(dict(model=name, latent=size, cached_mib=cached, vae_mib=mib, vae_images_per_s=ips))
                log(f"  {name} 4x{size}x{size}: cached {cached:.0f} MiB, VAE in loop {mib:.0f} MiB, {ips:.3g} img/s")
        lines += [
            f"\nPeak memory at batch {args.batch}: cached latents (the bf16 row above where measured, else the "
            "first variant) vs SD-VAE encoder in the loop (VAE weights included; bf16 autocast on CUDA)\n",
            common.markdown_table(
                ["model", "latent", "cached latents (MiB)", "VAE in loop (MiB)", "VAE in loop images/s"],
                [
                    [r["model"], f"4x{r['latent']}x{r['latent']}", r["cached_mib"], r["vae_mib"], r["vae_images_per_s"]]
                    for r in vae_rows
                ],
            ),
        ]

    text = "\n".join(lines)
    log("\n" + text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(dict(rows=rows, vae_rows=vae_rows, machine=common.describe_machine(device)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
