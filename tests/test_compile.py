"""``torch.compile(model, fullgraph=True)``: one graph (no graph break), the eager result, no recompile between steps.

``fullgraph=True`` turns any graph break into an error, and ``torch._dynamo.config.error_on_recompile`` turns a
recompilation into one, so a break or a guard that changes from one training step to the next (new data, new t, same
shapes) fails here on the CPU instead of costing time on a GPU. Each case runs a training step (forward + backward)
through the compiled model and through an eager copy with the same weights and compares the outputs and every
gradient, then a second step on new data under ``error_on_recompile``.

Backends: ``aot_eager`` (dynamo's capture and AOTAutograd's forward/backward graphs, exactly what inductor receives,
without compiling kernels) on the micro preset, forward + backward; ``inductor`` (the real compiler, C++ kernels on
the CPU) on a one-stage model of the same blocks, training-mode forward only -- on a 2-core CPU inductor spent
~4.7 min (forward + backward) on the micro preset and ~1.8 min on the one-stage model in g++, measured under load;
and the micro preset with inductor on CUDA (Triton), forward + backward, skipped without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from liquid_diffusion.model import LiquidDiffusionUNet

MICRO = dict(widths=(32, 64, 128), depths=(1, 1, 1))
ONE_STAGE = dict(widths=(8,), depths=(1,))  # every block kind, the fewest kernels

CASES = [  # backend, device, model, latent size, tolerance, with backward
    pytest.param("aot_eager", "cpu", MICRO, 16, 1e-6, True, id="aot_eager-cpu-micro"),
    pytest.param("inductor", "cpu", ONE_STAGE, 8, 1e-5, False, id="inductor-cpu-one-stage-forward"),
    pytest.param(
        "inductor",
        "cuda",
        MICRO,
        32,
        1e-4,
        True,
        id="inductor-cuda-micro",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def _model(config: dict, device: str) -> LiquidDiffusionUNet:
    """A model whose zero-initialised parts (head, modulations, projections) are perturbed, so outputs and
    gradients are not trivially zero and a wrong compiled graph cannot pass."""
    torch.manual_seed(0)
    model = LiquidDiffusionUNet(in_channels=4, **config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(device).train()


def _train_step(model, x, t, target, backward: bool = True):
    """Forward (+ backward) of the flow loss; returns (output, gradients) and clears the gradients."""
    out = model(x, t).sample
    if not backward:  # the training-mode forward graph only (AOTAutograd compiles the backward at its first use)
        return out.detach(), []
    (out.float() - target).square().mean().backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _data(seed: int, size: int, device: str):
    g = torch.Generator().manual_seed(seed)
    x, target = torch.randn(2, 4, size, size, generator=g), torch.randn(2, 4, size, size, generator=g)
    return x.to(device), torch.rand(2, generator=g).to(device), target.to(device)


@pytest.mark.parametrize("backend, device, config, size, tol, backward", CASES)
def test_fullgraph_compile_matches_eager_and_does_not_recompile(backend, device, config, size, tol, backward):
    torch._dynamo.reset()
    counters.clear()
    eager = _model(config, device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)

    for step in range(2):  # step 0 compiles; step 1 (new x, t and target) must reuse the graph
        x, t, target = _data(step, size, device)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out, grads = _train_step(compiled, x, t, target, backward)
        ref_out, ref_grads = _train_step(eager, x, t, target, backward)
        assert ref_out.abs().max() > 1e-3  # a real signal, not zeros
        torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
        for name_param, grad, ref in zip(eager.named_parameters(), grads, ref_grads):
            torch.testing.assert_close(grad, ref, atol=10 * tol, rtol=10 * tol, msg=lambda m: f"{name_param[0]}: {m}")
    assert counters["stats"]["unique_graphs"] == 1  # one graph for both steps: no break, no recompile
    assert not counters["graph_break"]


def test_compiled_sampling_forward_does_not_recompile_per_step():
    """The sampler's loop (no_grad, eval, a new t every step) reuses one graph, as the training steps do."""
    torch._dynamo.reset()
    counters.clear()
    model = _model(MICRO, "cpu").eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        for i, t in enumerate((1.0, 0.6, 0.2)):
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                out = compiled(x, torch.full((2,), t)).sample
            torch.testing.assert_close(out, model(x, torch.full((2,), t)).sample, atol=1e-6, rtol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
