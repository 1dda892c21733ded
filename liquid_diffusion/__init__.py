"""LiquidDiffusion: an attention-free, CfC-gated U-Net trained with rectified flow.

Data flows one way: sources -> data -> latents -> objective (``flow``) -> model -> trainer -> publish.
"""

from . import flow
from .flow import euler_sample, flow_matching_loss, heun_sample, interpolate, velocity_target
from .model import PRESETS, LiquidDiffusionUNet
from .pipeline import LiquidDiffusionPipeline

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "LiquidDiffusionPipeline",
    "LiquidDiffusionUNet",
    "euler_sample",
    "flow",
    "flow_matching_loss",
    "heun_sample",
    "interpolate",
    "velocity_target",
]
