"""Rectified flow: the objective and the ODE samplers, small and pure.

Convention (fixed across the package, the same as diffusers' ``FlowMatchEulerDiscreteScheduler`` sigma):
t in [0, 1], **t = 0 is data, t = 1 is pure noise**::

    x_t      = (1 - t) * x0 + t * noise
    v_target = noise - x0
    loss     = MSE(v(x_t, t), v_target)

Sampling integrates dx/dt = v from t = 1 down to t = 0 on the grid t_i = 1 - i / N.

A *velocity function* is any callable ``v(x, t)`` with ``t`` of shape [B]; a diffusers-style model whose output
has ``.sample`` (such as ``LiquidDiffusionUNet``) can be passed directly.

Class-conditional models are sampled through ``guided_velocity``, which turns ``v(x, t, labels)`` into such a
velocity function with classifier-free guidance; the samplers themselves stay label-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
# Classifier-free guidance scale of sample grids and of the pipeline when nothing else is recorded.
DEFAULT_GUIDANCE_SCALE = 2.0


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) * x0 + t * noise``, with ``t`` of shape [B] broadcast over the other dims."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``v = dx_t/dt = noise - x0``: the constant velocity of the straight path from data to noise."""
    return noise - x0


def sample_timesteps(
    batch_size: int,
    sampling: str = "uniform",
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Training times ``t`` of shape [B].

    ``uniform``: t ~ U(0, 1). ``logit_normal`` (SD3): t = sigmoid(u), u ~ N(logit_mean, logit_std^2), which spends
    more of the budget on mid-range noise levels.
    """
    if sampling == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if sampling == "logit_normal":
        u = torch.randn(batch_size, device=device, generator=generator)
        return torch.sigmoid(logit_mean + logit_std * u)
    raise ValueError(f"unknown timestep sampling {sampling!r}; valid: {', '.join(TIMESTEP_SAMPLINGS)}")


def flow_matching_loss(
    velocity_fn: Callable,
    x0: torch.Tensor,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    sampling: str = "uniform",
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``E_t,noise || v(x_t, t) - (noise - x0) ||^2`` (mean over all elements).

    Args:
        velocity_fn: the model, ``v(x_t, t)``.
        x0: clean data [B, ...].
        noise: standard normal noise like ``x0`` (drawn when omitted).
        t: times of shape [B] (drawn with ``sampling`` when omitted).
        sampling: ``uniform`` or ``logit_normal``.
        generator: RNG for the draws.
        reduction: ``mean`` for a scalar, ``none`` for the per-sample loss of shape [B] (for per-t statistics).
    """
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if t is None:
        t = sample_timesteps(x0.shape[0], sampling, device=x0.device, generator=generator)
    prediction = _velocity(velocity_fn, interpolate(x0, noise, t), t)
    per_element = F.mse_loss(prediction.float(), velocity_target(x0, noise).float(), reduction="none")
    if reduction == "mean":
        return per_element.mean()
    if reduction == "none":
        return per_element.flatten(1).mean(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}; valid: mean, none")


def timestep_grid(num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The N + 1 integration times ``t_i = 1 - i / N``, from noise (1) to data (0)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, device=device)


@torch.no_grad()
def euler_sample(
    velocity_fn: Callable, noise: torch.Tensor, num_steps: int = 25, return_trajectory: bool = False
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler integration of dx/dt = v from t = 1 to t = 0: ``x <- x + (t_next - t) * v(x, t)``.

    Returns the sample at t = 0 (and, with ``return_trajectory``, the N + 1 states from noise to sample).
    """
    x, trajectory = noise, [noise]
    grid = timestep_grid(num_steps, noise.device)
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * _velocity(velocity_fn, x, t.expand(x.shape[0]))
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def heun_sample(
    velocity_fn: Callable, noise: torch.Tensor, num_steps: int = 25, return_trajectory: bool = False
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Heun (2nd-order, trapezoidal) integration from t = 1 to t = 0, two model calls per step::

    v1 = v(x, t);  x' = x + (t_next - t) * v1;  v2 = v(x', t_next);  x <- x + (t_next - t) * (v1 + v2) / 2
    """
    x, trajectory = noise, [noise]
    grid = timestep_grid(num_steps, noise.device)
    batch = noise.shape[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        v1 = _velocity(velocity_fn, x, t.expand(batch))
        v2 = _velocity(velocity_fn, x + dt * v1, t_next.expand(batch))
        x = x + dt * (v1 + v2) / 2
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}
# Velocity evaluations per integration step (for progress bars over model calls).
MODEL_CALLS_PER_STEP = {"euler": 1, "heun": 2}


def check_sampler(sampler: str) -> str:
    """Returns ``sampler`` if it names one of ``SAMPLERS``, else raises a one-line ``ValueError`` listing them."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    return sampler


def guided_velocity(
    velocity_fn: Callable, class_labels: torch.Tensor, guidance_scale: float = 1.0, null_class: int | None = None
) -> Callable:
    """Classifier-free guidance: the velocity function ``x, t -> v_u + w * (v_c - v_u)`` for a conditional model.

    ``v_c = v(x, t, class_labels)`` and ``v_u = v(x, t, null_class)`` come from ONE forward pass over the batch
    ``[x; x]`` with labels ``[class_labels; null]``, and the guidance applies to every channel (the whole velocity,
    not the first 3 of 4 latent channels as in a known DiT sampling bug). ``w = 1`` is exactly the conditional
    prediction (one plain pass, no doubling), ``w = 0`` the unconditional one, ``w > 1`` pushes samples towards
    their class.

    Args:
        velocity_fn: the conditional model, called as ``velocity_fn(x, t, class_labels)``.
        class_labels: int64 ids [B] (or a scalar id for the whole batch).
        guidance_scale: w.
        null_class: the id of the unconditional class (``LiquidDiffusionUNet.null_class``); needed when w != 1.
    """
    if guidance_scale != 1 and null_class is None:
        raise ValueError("classifier-free guidance needs the model's null class (null_class=model.null_class)")

    def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=x.device).long().expand(x.shape[0])
        return _unwrap(velocity_fn(x, t, labels))

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        labels = torch.as_tensor(class_labels, device=x.device).long().expand(batch)
        labels = torch.cat([labels, torch.full_like(labels, null_class)])
        t = torch.as_tensor(t, device=x.device)
        t = torch.cat([t, t]) if t.ndim else t
        v_cond, v_uncond = _unwrap(velocity_fn(torch.cat([x, x]), t, labels)).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return conditional if guidance_scale == 1 else guided


def sample(velocity_fn: Callable, noise: torch.Tensor, num_steps: int = 25, sampler: str = "euler") -> torch.Tensor:
    """Runs the named sampler (``euler`` or ``heun``) from ``noise`` to t = 0."""
    return SAMPLERS[check_sampler(sampler)](velocity_fn, noise, num_steps)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes t of shape [B] (or a scalar) to broadcast over ``like`` of shape [B, ...]."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def _velocity(velocity_fn: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Calls ``velocity_fn`` and unwraps a diffusers-style output (``.sample``) or a 1-tuple."""
    return _unwrap(velocity_fn(x, t))


def _unwrap(out) -> torch.Tensor:
    """The velocity tensor of a model output: ``.sample`` of a diffusers-style output, a 1-tuple's item, or itself."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple):
        return out[0]
    return out
