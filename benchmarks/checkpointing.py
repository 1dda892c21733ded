"""What gradient checkpointing saves and costs: activation memory kept for the backward pass, and training-step time.

For each preset and latent size, one forward and backward pass of the rectified-flow loss through
``LiquidDiffusionUNet`` with and without ``enable_gradient_checkpointing()``, on the CPU, batch 1 by default::

    python -m benchmarks.checkpointing                   # tiny/small/base at 256 and 512 px (latents 32 and 64)
    python -m benchmarks.checkpointing --quick           # micro at latent 8: a smoke test

Columns: ``kept`` -- the bytes autograd keeps from the forward pass for the backward (weights not counted), counted
with saved-tensor hooks (``memory.saved_activation_bytes``): under checkpointing the blocks' inputs and what lies
outside the blocks; ``recomputed`` -- the largest block's activations, which checkpointing recomputes and holds at
once in the backward; ``peak`` = kept + recomputed, the activations' high-water mark; ``RSS`` -- the process's peak
resident memory added by one forward and backward pass (``common.peak_memory``: counts the gradients, the backward's
temporaries and allocator slack too); ``step`` -- median seconds of a forward and backward pass over interleaved
rounds, after a warm-up pass; ``GFLOP`` -- the pass's floating-point operations (``common.train_step_flops``: with
checkpointing they include the blocks' second forward), the cost in compute, free of the CPU timings' noise on a
shared machine. The same numbers go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks import common
from liquid_diffusion import flow
from liquid_diffusion.memory import saved_activation_bytes
from liquid_diffusion.model import LiquidDiffusionUNet

MIB = 2**20


def forward_backward(model: LiquidDiffusionUNet, sample: torch.Tensor):
    """One forward and backward pass of the rectified-flow loss on ``sample`` (always the same noise and t), as a
    closure; the gradients are dropped afterwards, so that between steps only the weights stay in memory. (The
    optimizer's update is left out: it does not depend on checkpointing.)"""

    def step() -> None:
        flow.flow_matching_loss(model, sample, generator=torch.Generator().manual_seed(0)).backward()
        model.zero_grad(set_to_none=True)

    return step


def measure(preset: str, latent_size: int, batch: int, rounds: int) -> dict:
    """Activation bytes, peak RSS and step time of ``preset`` at ``latent_size``, without and with checkpointing."""
    torch.manual_seed(0)
    sample = torch.randn(batch, 4, latent_size, latent_size)
    result, steps = {"preset": preset, "latent_size": latent_size, "resolution": 8 * latent_size, "batch": batch}, {}
    for mode, checkpointing in (("plain", False), ("checkpointed", True)):
        model = LiquidDiffusionUNet.from_preset(preset, in_channels=4)
        if checkpointing:
            model.enable_gradient_checkpointing()
        kept, recomputed = saved_activation_bytes(model, sample, torch.full((batch,), 0.5))
        step = forward_backward(model, sample)
        step()  # warm-up
        with common.peak_memory(torch.device("cpu")) as peak:
            step()
        result[mode] = dict(
            kept_mib=kept / MIB,
            recomputed_mib=recomputed / MIB,
            peak_mib=(kept + recomputed) / MIB,
            rss_mib=peak["mib"],
            gflop=common.train_step_flops(model, sample) / 1e9,
        )
        steps[mode] = lambda step=step: common.timed(step, torch.device("cpu"))
    times = common.interleaved(steps, rounds, log=lambda line: print(line, file=sys.stderr))
    for mode, values in times.items():
        result[mode]["step_s"] = common.median(values)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    p.add_argument("--latent-sizes", nargs="+", type=int, default=[32, 64], help="256 px -> 32, 512 px -> 64")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="timed steps per mode, interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="checkpointing.json")
    p.add_argument("--quick", action="store_true", help="micro at latent 8, one round: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.latent_sizes, args.rounds = ["micro"], [8], 1
    torch.set_num_threads(args.threads)
    results, rows = [], []
    for preset in args.presets:
        for size in args.latent_sizes:
            r = measure(preset, size, args.batch, args.rounds)
            results.append(r)
            Path(args.out).write_text(
                json.dumps(dict(machine=common.machine_cpu(), torch=torch.__version__, results=results), indent=1)
            )  # kept if a later size is killed
            plain, ckpt = r["plain"], r["checkpointed"]
            rows.append(
                [
                    preset,
                    f"{r['resolution']} px ({size}x{size})",
                    plain["peak_mib"],
                    ckpt["kept_mib"],
                    ckpt["recomputed_mib"],
                    ckpt["peak_mib"],
                    100 * (1 - ckpt["peak_mib"] / plain["peak_mib"]),
                    plain["rss_mib"],
                    ckpt["rss_mib"],
                    plain["step_s"],
                    ckpt["step_s"],
                    100 * (ckpt["step_s"] / plain["step_s"] - 1),
                    100 * (ckpt["gflop"] / plain["gflop"] - 1),
                ]
            )
    print(f"batch {args.batch}, fp32, {common.machine_cpu()}")
    print(
        common.markdown_table(
            [
                "preset",
                "resolution",
                "activations (MiB)",
                "checkpointed: kept",
                "+ recomputed",
                "= peak",
                "saved (%)",
                "RSS (MiB)",
                "checkpointed RSS",
                "fwd+bwd (s)",
                "checkpointed (s)",
                "slower (%)",
                "more GFLOP (%)",
            ],
            rows,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
