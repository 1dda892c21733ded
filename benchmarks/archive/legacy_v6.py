"""Architecture versions 4-6's block (``liquid_diffusion`` formats 4-6), kept for the ablation tables of BENCHMARKS.md
section 3: ``benchmarks/variants.py`` builds every design of the fifth and sixth rounds from these parts.

Version 7 computes the same function with every block's t-dependent vectors from one ``BlockModulation``; these
blocks still embed t themselves, with five linear maps each. ``V6UNet`` is the package's skeleton with these blocks,
built in the same order as version 6 built them, so a seed gives the same initial weights as the runs in the tables
(and its weights load into version 7 through ``upgrade_state_dict``).
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn as nn

from liquid_diffusion.blocks import (AdaLN, FeedForward, OutputHead, PositionEmbedder,  # noqa: F401 (as in version 7)
                                     SkipFusion, SpatialMix, liquid_relaxation)
from liquid_diffusion.model import LiquidDiffusionUNet


class ParallelCfC(nn.Module):
    """Version 6's CfC cell, with its own linear maps of t_emb (version 7's ``ParallelCfC`` gets the vectors)::

        gate  = sigmoid(time_a(t_emb) * f(u) - time_b(t_emb));   out = gate * g(u) + (1 - gate) * h(u)
        alpha = exp(-softplus(rho) * (tau_min + softplus(time_tau(t_emb))));   y = x + (1 - alpha) * out
    """

    def __init__(self, channels: int, embed_dim: int, tau_min: float = 0.05, tau_init: float = 0.5):
        super().__init__()
        self.heads = nn.Conv2d(channels, 3 * channels, 1)
        self.time_ab = nn.Linear(embed_dim, 2 * channels)
        self.time_tau = nn.Linear(embed_dim, channels)
        self.rho = nn.Parameter(torch.full((channels,), math.log(math.e - 1)))
        self.tau_min = tau_min
        nn.init.zeros_(self.time_ab.weight)
        with torch.no_grad():
            self.time_ab.bias.copy_(torch.cat([torch.ones(channels), torch.zeros(channels)]))
        nn.init.zeros_(self.time_tau.weight)
        nn.init.constant_(self.time_tau.bias, math.log(math.expm1(tau_init - tau_min)))

    def relaxation(self, t_emb: torch.Tensor) -> torch.Tensor:
        return liquid_relaxation(self.rho, self.time_tau(t_emb), self.tau_min)[:, :, None, None]

    def interpolation(self, u: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        f, g, h = self.heads(u).chunk(3, dim=1)
        time_a, time_b = self.time_ab(t_emb)[:, :, None, None].chunk(2, dim=1)
        gate = torch.sigmoid(time_a * f - time_b)
        return h + gate * (g - h)

    def forward(self, x: torch.Tensor, u: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return x + (1 - self.relaxation(t_emb)) * self.interpolation(u, t_emb)


class GatedProjection(nn.Module):
    """Version 6's ablation of the cell: ``y = x + gate(t_emb) * W_out u`` (gate zero-initialised)."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.w_out = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Linear(embed_dim, channels)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor, u: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return x + self.gate(t_emb)[:, :, None, None] * self.w_out(u)


class LiquidDiffusionBlock(nn.Module):
    """Version 4-6's block, each vector of t from its own linear map::

        x = ParallelCfC(x, SpatialMix(AdaLN_1(x, t_emb)), t_emb)
        x = x + ff_gate(t_emb) * FeedForward(AdaLN_2(x, t_emb))
    """

    def __init__(self, channels: int, embed_dim: int, ff_mult: int = 2, liquid: bool = True):
        super().__init__()
        self.norm_mix = AdaLN(channels, embed_dim)
        self.mix = SpatialMix(channels)
        self.cfc = (ParallelCfC if liquid else GatedProjection)(channels, embed_dim)
        self.norm_ff = AdaLN(channels, embed_dim)
        self.ff = FeedForward(channels, ff_mult)
        self.ff_gate = nn.Linear(embed_dim, channels)
        nn.init.zeros_(self.ff_gate.weight)
        nn.init.zeros_(self.ff_gate.bias)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.cfc(x, self.mix(self.norm_mix(x, t_emb)), t_emb)
        return x + self.ff_gate(t_emb)[:, :, None, None] * self.ff(self.norm_ff(x, t_emb))


class V6UNet(LiquidDiffusionUNet):
    """``LiquidDiffusionUNet`` with blocks that take ``t_emb`` themselves (``block_class``; version 6's by default):
    no ``BlockModulation``, and a config saying version 6 (5 without position features), as those versions saved."""

    block_class = LiquidDiffusionBlock

    @functools.wraps(LiquidDiffusionUNet.__init__)  # the same signature, for diffusers' from_config
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modulation = None  # built (after every block, so the blocks' random draws are version 6's), not used
        self._load_state_dict_pre_hooks.clear()  # these weights are version 6's own: nothing to upgrade
        self.register_to_config(format_version=6 if self.position_embedder is not None else 5)

    def make_block(self, channels: int, ff_mult: int, liquid: bool) -> nn.Module:
        embed_dim = self.config.time_embed_dim or 4 * self.config.widths[0]
        return self.block_class(channels, embed_dim, ff_mult, liquid)

    def block_inputs(self, t_emb: torch.Tensor):
        return itertools.repeat(t_emb)

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        pass
