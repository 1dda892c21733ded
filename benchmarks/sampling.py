"""Sampling speed: seconds to draw 16 samples with 25 Euler steps, model only and with the SD-VAE decode.

For every model (LiquidDiffusion presets, DiT-S/2, DiT-B/2, the parameter-matched UNet2DModel; see ``common.py``) it
times ``liquid_diffusion.flow.euler_sample`` on ``--num-samples`` latents of 4 x S x S (S = 32: 256px images) in one
batch, under ``torch.no_grad``, with random weights (speed does not depend on the weights). The SD-VAE decode of
those latents (random-weight ``AutoencoderKL`` with SD-VAE's shape, decoded in chunks of ``--vae-batch``) is timed
separately, ``--vae-rounds`` times after the model rounds, because it does not depend on which model made the
latents (and it is by far the slowest part on a CPU); "with VAE" is model seconds + decode seconds.

The models of one setting are timed in interleaved rounds in one process (every model once per round, rotating
order), and the table reports medians, the spread of the rounds and the ratio to each peer. One warm-up call per
model (a 1-step sample) precedes the rounds.

Examples::

    python -m benchmarks.sampling --quick
    python -m benchmarks.sampling                      # CPU: fp32
    python -m benchmarks.sampling --device cuda        # fp32 and bf16 autocast
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from benchmarks import common
from liquid_diffusion import flow

DEFAULT_MODELS = ["liquid-micro", "liquid-tiny", "liquid-small", "liquid-base", "dit-s2", "dit-b2", "unet2d"]
PEERS = ["dit-s2", "dit-b2", "unet2d"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--latent-sizes", nargs="+", type=int, default=[32], help="latent H=W (32 = 256px, 64 = 512px)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=25, help="Euler steps timed")
    p.add_argument(
        "--report-steps",
        type=int,
        default=25,
        help="steps the table reports; if != --steps, times are scaled linearly (each step is one "
        "identical forward pass) -- for slow CPUs",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--vae", action=argparse.BooleanOptionalAction, default=True, help="time the SD-VAE decode too")
    p.add_argument("--vae-batch", type=int, default=4, help="latents decoded per VAE call")
    p.add_argument("--vae-rounds", type=int, default=1, help="timed VAE decodes (after the model rounds)")
    p.add_argument(
        "--vae-samples",
        type=int,
        help="decode only this many latents and scale the time linearly to --num-samples (slow CPUs)",
    )
    p.add_argument(
        "--variants", nargs="+", choices=["fp32", "bf16"], help="default: fp32 and bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice); 1 on an oversubscribed CPU"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="micro/DiT-S/2/UNet2DModel, 2 samples x 2 steps at 16x16")
    p.add_argument("--output", help="also write the markdown table (and a .json next to it) here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.latent_sizes = ["liquid-micro", "dit-s2", "unet2d"], [16]
        args.num_samples, args.steps, args.report_steps, args.rounds, args.vae_batch = 2, 2, 2, 1, 2
    return args


def run_setting(size, variant, args, device, log):
    dtype = torch.bfloat16 if variant == "bf16" else None
    log(
        f"\n== {args.num_samples} samples x {args.steps} Euler steps, latents 4x{size}x{size} ({8 * size}px), {variant} =="
    )
    noise = torch.randn(args.num_samples, 4, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)

    def sampler(model, steps):
        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return flow.euler_sample(model, noise, num_steps=steps)

        return run

    jobs, params = {}, {}
    for name in args.models:
        torch.manual_seed(args.seed)
        model = common.build_model(name, 4, size).to(device).eval()
        params[name] = common.count_params(model)
        sampler(model, 1)()  # warm-up
        full = sampler(model, args.steps)
        jobs[name] = (lambda f: lambda: common.timed(f, device))(full)
    times = common.interleaved(jobs, args.rounds, log)
    decode_s = float("nan")
    if args.vae:
        vae = common.build_vae().to(device)
        latents = noise / common.SD_VAE_SCALING

        def decode(x):
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                for chunk in x.split(args.vae_batch):
                    _ = vae.decode(chunk).sample

        decode(latents[:1])  # warm-up
        n_vae = args.vae_samples or args.num_samples
        decode_times = [common.timed(lambda: decode(latents[:n_vae]), device) for _ in range(args.vae_rounds)]
        decode_s = common.median(decode_times) * args.num_samples / n_vae
        log(
            f"  VAE decode of {n_vae} latents: "
            + ", ".join(f"{t:.3g}s" for t in decode_times)
            + ("" if n_vae == args.num_samples else f" -> {decode_s:.3g}s scaled to {args.num_samples}")
        )
    rows = []
    for name in args.models:
        raw = common.median(times[name])
        s = raw * args.report_steps / args.steps  # linear in the number of (identical) Euler steps
        row = dict(
            model=name,
            latent=size,
            variant=variant,
            params_m=params[name],
            seconds=s,
            spread_pct=common.spread(times[name]),
            rounds=times[name],
            vae_decode_s=decode_s,
            seconds_with_vae=s + decode_s,
        )
        for peer in PEERS:
            if peer in times:  # > 1: this model is faster than the peer
                row[f"x_{peer}"] = common.median(times[peer]) / raw
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    variants = args.variants or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    command = "python -m benchmarks.sampling " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (
        f"# Sampling speed ({datetime.date.today().isoformat()})\n\nmachine: {common.describe_machine(device)}\n"
        f"command: {command}\n"
    )
    print(head, flush=True)
    rows = []
    for size in args.latent_sizes:
        for variant in variants:
            rows += run_setting(size, variant, args, device, lambda m: print(m, flush=True))

    peers = [p for p in PEERS if p in args.models]
    header = [
        "model",
        "latent",
        "variant",
        "params (M)",
        "model only (s)",
        "spread %",
        "VAE decode (s)",
        "with VAE (s)",
    ] + [f"speed-up vs {p}" for p in peers]
    table = common.markdown_table(
        header,
        [
            [
                r["model"],
                f"4x{r['latent']}x{r['latent']}",
                r["variant"],
                r["params_m"],
                r["seconds"],
                r["spread_pct"],
                r["vae_decode_s"],
                r["seconds_with_vae"],
            ]
            + [r.get(f"x_{p}", float("nan")) for p in peers]
            for r in rows
        ],
    )
    scaled = (
        f" (timed {args.steps} steps, scaled x{args.report_steps / args.steps:g})"
        if args.steps != args.report_steps
        else ""
    )
    vae_note = (
        f"; VAE decode timed on {args.vae_samples} latents, scaled to {args.num_samples}"
        if args.vae and args.vae_samples and args.vae_samples != args.num_samples
        else ""
    )
    text = "\n".join(
        [
            head,
            f"{args.num_samples} samples, {args.report_steps} Euler steps{scaled}, one batch; median "
            f"of {args.rounds} interleaved rounds; speed-up = peer seconds / model seconds (model only)"
            f"{vae_note}\n",
            table,
        ]
    )
    print("\n" + text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(dict(rows=rows, machine=common.describe_machine(device)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
