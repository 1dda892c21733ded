"""The training run's settings: ``TrainConfig``, its validation, and the ``train`` command's flags made from it.

Every ``TrainConfig`` field is one command-line flag (``--batch-size`` for ``batch_size``), documented by the field's
help text, so the notebook, the command line and ``accelerate launch`` configure a run the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from . import flow
from .checkpoints import Checkpoint
from .errors import check_number
from .latents import DEFAULT_VAE, VAE_DOWNSAMPLE_FACTOR, native_bf16
from .model import PRESETS
from .sources import DEFAULT_DATASET
from .tracking import trackers

LR_SCHEDULES = ("constant", "cosine", "linear", "rsqrt")
# --batch-size auto: the batch on a CPU, and the batch at which --lr is given (docs/design.md: the training recipe)
CPU_BATCH_SIZE = 8
REFERENCE_BATCH_SIZE = 8

# Fields that fix the network or what its inputs mean; resuming with other values is refused.
RESUME_MUST_MATCH = ("preset", "space", "resolution", "vae")
# Fields that fix the data order; resuming with other values works but is no longer exact.
RESUME_EXACT_ONLY_IF_SAME = ("batch_size", "grad_accum", "seed", "dataset", "validation_images")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a training run needs; defaults suit the tiny preset on a Colab T4. Each field is a CLI flag."""

    # data
    dataset: str = _help(
        "short name (afhq, celeba, flowers, pokemon, anime, cartoon), Hub id or local path", default=DEFAULT_DATASET
    )
    split: str = _help("dataset split", default="train")
    config_name: str | None = _help("dataset configuration name, if the dataset has several", default=None)
    image_column: str | None = _help("column holding the images (found automatically when omitted)", default=None)
    resolution: int = _help("training resolution in pixels (square)", default=256)
    flip: bool = _help("random horizontal flips", default=True)
    random_crop: bool = _help("random instead of center crop", default=False)
    shuffle_buffer: int = _help("streaming shuffle buffer size", default=1000)
    num_workers: int = _help("DataLoader worker processes for decoding images", default=2)
    # class conditioning (classifier-free guidance)
    class_conditional: bool = _help(
        "condition on the dataset's ClassLabel column (image folders: one sub-folder "
        "per class) and learn classifier-free guidance",
        default=False,
    )
    label_column: str | None = _help(
        "ClassLabel column to condition on (found automatically when omitted)", default=None
    )
    class_dropout: float = _help(
        "fraction of labels replaced by the null class in training (for guidance)", default=0.1
    )
    guidance_scale: float = _help(
        "classifier-free guidance scale w of the sample grids (1: no guidance); the model card recommends it",
        default=flow.DEFAULT_GUIDANCE_SCALE,
    )
    # model and latent space
    preset: str = _help(f"model size: {', '.join(PRESETS)}", default="tiny")
    space: str = _help("'latent' (frozen SD-VAE) or 'pixel' (no VAE)", default="latent")
    vae: str = _help("VAE Hub id or local path (latent space only)", default=DEFAULT_VAE)
    cache_latents: bool = _help(
        "encode the dataset once into a latent cache, then train on latents only", default=False
    )
    cache_dir: str | None = _help("latent cache directory (default: OUTPUT_DIR/latent-cache)", default=None)
    cache_num_images: int | None = _help("cache only the first N images (default: all)", default=None)
    # optimisation
    batch_size: int | str = _help(
        "images per process per micro-batch, or 'auto': on a GPU the largest that fits "
        "it by the memory estimate (capped by the GPU's class), on a CPU "
        f"{CPU_BATCH_SIZE}; --lr is then the rate at batch {REFERENCE_BATCH_SIZE}, scaled "
        f"by sqrt(batch / {REFERENCE_BATCH_SIZE})",
        default="auto",
    )
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    steps: int = _help("optimizer steps to train in total", default=20_000)
    lr: float = _help("AdamW learning rate (at batch 8 with --batch-size auto, see there)", default=1e-3)
    warmup_steps: int = _help("linear learning-rate warmup steps", default=500)
    lr_schedule: str = _help(
        "learning rate after the warmup: constant, cosine or linear (to 0 at --steps), or rsqrt "
        "(lr * sqrt(warmup / step): needs no known end, for open-ended runs)",
        default="constant",
    )
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm", default=1.0)
    ema_decay: float = _help("EMA decay (reached after the EMA warmup)", default=0.9999)
    ema_power: float = _help("EMA warmup: decay = min(ema_decay, 1 - (1 + step) ** -ema_power)", default=2 / 3)
    timestep_sampling: str = _help("training t distribution: uniform or logit_normal", default="uniform")
    logit_mean: float = _help("logit_normal t sampling: mean of logit(t)", default=0.0)
    logit_std: float = _help("logit_normal t sampling: standard deviation of logit(t)", default=1.0)
    mixed_precision: str = _help(
        "auto (bf16 where supported, fp16 on T4-class GPUs, fp32 on CPU), no, fp16, bf16", default="auto"
    )
    compile: bool = _help("torch.compile the model (CUDA only; ignored on CPU)", default=False)
    gradient_checkpointing: bool = _help(
        "recompute each block's activations in the backward pass instead of keeping "
        "them: much less GPU memory, slower steps (README: Memory)",
        default=False,
    )
    seed: int = _help("random seed", default=0)
    # feedback and checkpoints
    output_dir: str = _help("where checkpoints, samples and metrics.jsonl go", default="outputs/liquid-diffusion")
    log_every: int = _help("log metrics every N steps", default=50)
    progress_bar: bool = _help("show a tqdm progress bar (the notebook draws its own panel instead)", default=True)
    sample_every: int = _help("write an EMA sample grid every N steps (0: only at the end)", default=500)
    num_sample_images: int = _help("images in each sample grid", default=16)
    sample_steps: int = _help("Euler steps for the sample grids", default=25)
    checkpoint_every: int = _help("save a checkpoint every N steps (and always at the end)", default=1000)
    keep_checkpoints: int = _help("keep only the newest K checkpoints", default=3)
    resume: str | None = _help(
        "'latest' (newest complete checkpoint in OUTPUT_DIR, if any) or a checkpoint path", default=None
    )
    overwrite: bool = _help(
        "start afresh in an OUTPUT_DIR that already holds a run, deleting that run's checkpoints, "
        "metrics and samples (without it such a folder is refused unless --resume)",
        default=False,
    )
    push_to_hub: str | None = _help("Hub repo id USER/NAME to push checkpoints to (in the background)", default=None)
    push_every: int = _help("push every N checkpoints", default=1)
    hub_private: bool = _help("create the Hub repo as private", default=False)
    # validation (liquid_diffusion/validation.py)
    validation_images: int = _help(
        "held-out images (never trained on) scored by the flow loss at fixed t and noise; "
        "a folder gives at most 10 %% of its images (0: off)",
        default=256,
    )
    validation_every: int = _help(
        "score the EMA and raw weights on the held-out images every N steps and at the end (0: only at the end)",
        default=1000,
    )
    # evaluation (liquid_diffusion/evaluate.py)
    eval_every: int = _help(
        "KID/FID of the EMA weights at the first checkpoint at or past every N steps and at the "
        "end, logged to metrics.jsonl; best.json names the best checkpoint (0: off)",
        default=0,
    )
    eval_samples: int = _help("generated (and real) images per in-training evaluation", default=1000)
    eval_feature_extractor: str = _help(
        "'inception' or module.path:callable (see `evaluate --help`)", default="inception"
    )
    # experiment tracking (liquid_diffusion/tracking.py)
    report_to: str = _help(
        "also send metrics, sample grids and settings to: none, tensorboard (OUTPUT_DIR/logs), "
        'wandb or all; needs pip install "liquid-diffusion[tracking]"',
        default="none",
    )

    def validate(self) -> None:
        """Raises ValueError with a one-line fix for values that cannot work."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        if self.space not in ("latent", "pixel"):
            raise ValueError(f"space must be 'latent' or 'pixel', got {self.space!r}")
        if self.timestep_sampling not in flow.TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {', '.join(flow.TIMESTEP_SAMPLINGS)}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        # the VAE is not loaded yet: assume SD-VAE's factor (the trainer checks again with the loaded VAE's)
        check_resolution(
            self.resolution, self.preset, self.space, VAE_DOWNSAMPLE_FACTOR if self.space == "latent" else 1
        )
        if self.batch_size != "auto":
            check_number(self, "batch_size", minimum=1)
        for name in (
            "grad_accum",
            "steps",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "num_sample_images",
            "sample_steps",
            "push_every",
        ):
            check_number(self, name, minimum=1)
        for name in (
            "warmup_steps",
            "sample_every",
            "num_workers",
            "shuffle_buffer",
            "seed",
            "eval_every",
            "validation_images",
            "validation_every",
        ):
            check_number(self, name, minimum=0)
        if self.cache_num_images is not None:
            check_number(self, "cache_num_images", minimum=1)
        if self.eval_every:
            check_number(self, "eval_samples", minimum=2)
        for name in ("lr", "max_grad_norm", "ema_power", "logit_std"):
            check_number(self, name, minimum=0, inclusive=False)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1) (e.g. 0.9), got {getattr(self, name)}")
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"--logit-mean must be a finite number, got {self.logit_mean}")
        check_number(self, "weight_decay", minimum=0)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must lie in [0, 1) (e.g. 0.9999), got {self.ema_decay}")
        if self.cache_latents and self.space != "latent":
            raise ValueError("cache_latents needs space='latent' (pixel space has no VAE to cache)")
        if not 0 <= self.class_dropout < 1 or not 0 <= self.guidance_scale < float("inf"):  # NaN fails too
            raise ValueError(
                f"need 0 <= class_dropout < 1 and guidance_scale >= 0, got {self.class_dropout} and "
                f"{self.guidance_scale}"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in OUTPUT_DIR and --overwrite deletes it: pass one of them")
        if self.label_column and not self.class_conditional:
            raise ValueError("label_column only applies to class-conditional training: add --class-conditional")
        trackers(self.report_to)  # a known name


def check_resolution(resolution: int, preset: str, space: str, vae_factor: int) -> None:
    """Raises a one-line ValueError unless ``resolution`` is a positive multiple of the U-Net's downsampling factor
    times the VAE's (``vae_factor``; 1 in pixel space)."""
    factor = 2 ** (len(PRESETS[preset]["widths"]) - 1) * vae_factor
    if resolution <= 0 or resolution % factor:
        raise ValueError(
            f"resolution {resolution} must be a positive multiple of {factor} for the {preset} preset "
            f"in {space} space (e.g. {max(factor, (resolution // factor) * factor)})"
        )


def resume_position(
    checkpoint: Checkpoint, config: TrainConfig, class_names: list[str] | None, num_processes: int, report=print
) -> int:
    """The data position (micro-batches drawn per process) at which ``config`` resumes ``checkpoint`` with a model of
    ``class_names`` on ``num_processes`` processes.

    A changed ``RESUME_MUST_MATCH`` field or label set (or labels where there were none) is refused in one line
    (ValueError). After a changed ``RESUME_EXACT_ONLY_IF_SAME`` field or number of processes, the run continues at
    the same number of images seen per process, in the new data order, and ``report`` says the resume is not exact.
    """
    path, saved, state = checkpoint.path, checkpoint.train_config, checkpoint.state
    mismatched = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(config, k)]
    if mismatched:
        details = ", ".join(f"{k}={saved.get(k)!r} (now {getattr(config, k)!r})" for k in mismatched)
        raise ValueError(
            f"cannot resume {path}: it was trained with {details}; use the same values or a new --output-dir"
        )
    saved_classes = checkpoint.unet[0].get("class_names")
    if (saved_classes or None) != (class_names or None):

        def describe(names):
            return f"classes [{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}]" if names else "no classes"

        raise ValueError(
            f"cannot resume {path}: it was trained with {describe(saved_classes)}, this run has "
            f"{describe(class_names)}; use the same dataset and labels or a new --output-dir"
        )
    batches_consumed = state["batches_consumed"]
    changed = [k for k in RESUME_EXACT_ONLY_IF_SAME if saved.get(k) != getattr(config, k)]
    old_processes = state.get("num_processes", 1)
    if old_processes != num_processes:
        changed.append("number of processes")
    if changed:
        images_per_process = batches_consumed * saved["batch_size"] * old_processes / num_processes
        batches_consumed = int(images_per_process // config.batch_size)
        report(
            f"note: {', '.join(changed)} changed since {path.name}: resuming, but not exactly "
            "(the data order differs from an uninterrupted run)"
        )
    return batches_consumed


def resolve_batch_size(config: TrainConfig, device: torch.device, saved: dict | None = None, report=print) -> None:
    """Replaces ``batch_size="auto"`` in ``config`` by a number, and ``lr`` by the rate for it; says why, once.

    A resumed run (``saved``: its checkpoint's train config) keeps its batch size and learning rate. On a GPU the
    batch is ``memory.suggest_batch_size`` for the card; on a CPU ``CPU_BATCH_SIZE``. Adam's rate is scaled by
    ``sqrt(batch / REFERENCE_BATCH_SIZE)`` (the square-root rule: the gradient's noise falls as 1 / sqrt(batch)).
    """
    if config.batch_size != "auto":
        return
    if saved and isinstance(saved.get("batch_size"), int):
        config.batch_size, config.lr = saved["batch_size"], saved.get("lr", config.lr)
        report(f"batch size auto: {config.batch_size} and lr {config.lr:g}, as the run being resumed")
        return
    if device.type == "cuda":
        from .latents import vae_dtype
        from .memory import suggest_batch_size

        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        config.batch_size = suggest_batch_size(
            gib,
            config.preset,
            config.space,
            config.resolution,
            mixed_precision=resolve_mixed_precision(config.mixed_precision),
            vae_dtype=vae_dtype(device),
            cache_latents=config.cache_latents,
            gradient_checkpointing=config.gradient_checkpointing,
        )
        why = (
            f"the largest that fits 75 % of this {gib:.0f} GiB GPU by the memory estimate, capped by its class "
            "(8 below 24 GiB, 16 below 48 GiB, else 32)"
        )
    else:
        config.batch_size, why = CPU_BATCH_SIZE, "a small batch on the CPU"
    base = config.lr
    config.lr = base * math.sqrt(config.batch_size / REFERENCE_BATCH_SIZE)
    report(
        f"batch size auto: {config.batch_size} ({why}); lr {base:g} x sqrt({config.batch_size}/"
        f"{REFERENCE_BATCH_SIZE}) = {config.lr:.3g}"
    )


def int_or_auto(text: str) -> int | str:
    """``--batch-size``'s type: a whole number or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def resolve_mixed_precision(choice: str) -> str:
    """``auto``: bf16 where the GPU supports it, fp16 (with loss scaling) on T4-class GPUs, ``no`` on CPU."""
    if choice != "auto":
        if choice in ("fp16", "bf16") and not torch.cuda.is_available():
            print(f"note: --mixed-precision {choice} needs a GPU; training in fp32 on the CPU")
            return "no"
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if native_bf16() else "fp16"


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_class: type = None,
    exclude: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> None:
    """One flag per field of ``config_class`` (default ``TrainConfig``), named and documented from the dataclass;
    ``exclude``: fields without a flag; ``defaults``: other defaults than the dataclass's (reflow's). Its help ends in
    the default once: as the field's help text words it (``(default: all)``), else ``(default: VALUE)``; nothing for a
    default of ``None`` whose help says what leaving the flag out does."""
    defaults = defaults or {}
    for f in dataclasses.fields(config_class or TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        text = f.metadata["help"]
        if "(default:" not in text and default is not None:
            text += f" (default: {default})"
        kwargs = {"dest": f.name, "help": text, "default": default}
        if f.type in ("bool", bool):  # its help set after: Python 3.10's action appends a default of its own
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs).help = text
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", metavar="PATH", **kwargs)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float, "int | str": int_or_auto}.get(
                str(f.type), str
            )
            parser.add_argument(flag, type=kind, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated ``TrainConfig`` of parsed ``add_config_flags`` flags."""
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    config.validate()
    return config
