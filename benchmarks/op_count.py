"""Kernels per training step: how many ATen ops one forward + backward dispatches, by kind, for each model.

On a GPU at small batch every model is bound by per-step overhead (BENCHMARKS.md section 4): each op that is not a
view launches at least one kernel, so eager speed follows this count more than FLOPs; and the ops that are neither a
matmul nor a convolution move whole feature maps through memory for little arithmetic. Counted on the CPU with a
``TorchDispatchMode`` (the ops are the same on every device; compilation fuses some of them), one step on a batch of
random latents after a warm-up step, the optimizer not included::

    python -m benchmarks.op_count --models liquid-tiny liquid-tiny-ablation dit-s2 unet2d
    python -m benchmarks.op_count --quick      # micro and a one-layer DiT, seconds

Kinds: ``matmul/conv`` (``mm``, ``addmm``, ``bmm``, convolutions and attention: the compute-bound ops), ``norm``
(layer / group norms and their backward), ``other`` (elementwise, reductions, copies, concatenations: memory-bound).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import common

COMPUTE_OPS = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "convolution_backward",
    "_convolution",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention_backward",
)
NORM_OPS = ("native_layer_norm", "native_layer_norm_backward", "native_group_norm", "native_group_norm_backward")
# ops that move no data: shape and metadata only
FREE_OPS = (
    "detach",
    "alias",
    "lift_fresh",
    "empty",
    "empty_strided",
    "empty_like",
    "zeros_like",
    "new_empty",
    "new_empty_strided",
    "_local_scalar_dense",
    "sym_size",
    "sym_stride",
    "is_same_size",
)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it, by kind (views and metadata-only ops are not counted)."""

    def __init__(self):
        super().__init__()
        self.kinds, self.names = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in FREE_OPS):
            kind = "matmul/conv" if name in COMPUTE_OPS else "norm" if name in NORM_OPS else "other"
            self.kinds[kind] += 1
            self.names[name] += 1
        return func(*args, **(kwargs or {}))


def count_step(model: torch.nn.Module, batch: torch.Tensor) -> dict:
    """Ops of one forward and one backward of the rectified-flow loss ``mean((model(x_t, t) - v)^2)`` (its own 3
    ops included; x_t and v are built outside), after a warm-up step, by kind."""
    t = torch.rand(batch.shape[0])
    noise = torch.randn_like(batch)
    x_t, target = (1 - t[:, None, None, None]) * batch + t[:, None, None, None] * noise, noise - batch
    loss = lambda: (model(x_t, t) - target).pow(2).mean()  # noqa: E731
    loss().backward()
    model.zero_grad(set_to_none=True)
    with OpCounter() as forward:
        value = loss()
    with OpCounter() as backward:
        value.backward()
    return dict(
        forward=dict(forward.kinds),
        backward=dict(backward.kinds),
        total=sum(forward.kinds.values()) + sum(backward.kinds.values()),
        top_other=dict((forward.names + backward.names).most_common(8)),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["liquid-tiny", "liquid-tiny-ablation", "dit-s2", "unet2d"])
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="the counts do not depend on it")
    p.add_argument("--quick", action="store_true", help="micro and a one-layer DiT-S/2 at 8x8: a smoke test")
    args = p.parse_args(argv)
    overrides = {}
    if args.quick:
        args.models, args.latent_size, overrides = ["liquid-micro", "dit-s2"], 8, {"dit-s2": dict(depth=1)}
    unknown = [m for m in args.models if not common.is_model_name(m)]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)} (see benchmarks/common.py)")
        return 2
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        model = common.build_model(name, 4, args.latent_size, **overrides.get(name, {}))
        counts = count_step(model, torch.randn(args.batch, 4, args.latent_size, args.latent_size))
        kinds = lambda k: counts["forward"].get(k, 0) + counts["backward"].get(k, 0)  # noqa: E731
        rows.append(
            [
                name,
                common.count_params(model),
                sum(counts["forward"].values()),
                sum(counts["backward"].values()),
                counts["total"],
                kinds("matmul/conv"),
                kinds("norm"),
                kinds("other"),
            ]
        )
        print(f"{name}: most frequent ops {counts['top_other']}", file=sys.stderr)
    print(
        common.markdown_table(
            [
                "model",
                "params (M)",
                "forward ops",
                "backward ops",
                "total",
                "matmul/conv",
                "norm",
                "other (memory-bound)",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
