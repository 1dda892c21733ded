"""Rectified-flow training with accelerate: EMA, mixed precision, live sample grids and exact resume.

One ``Trainer`` serves the notebook, ``python -m liquid_diffusion train`` and ``accelerate launch`` alike::

    batches (pixels, latents or cached latents) -> flow_matching_loss -> AdamW (+ warmup, clipping) -> EMA
                                                 -> metrics.jsonl / samples/step-N.png / checkpoint-N/

Output directory layout::

    metrics.jsonl               one JSON object per logged step
    samples/step-000500.png     EMA sample grids, always from the same noise
    checkpoint-000500/          unet/ and unet_ema/ (safetensors), training_state.pt, state.json, train_config.json
    best.json                   with --eval-every: the checkpoint with the best KID so far (kept when pruning)

Exact resume: the only randomness of a step (noise and t) comes from a generator re-seeded from
(seed, process, step), and the data streams restart at the batch where they stopped, so N steps + resume + N steps
equals 2N steps in one go.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import flow
from .checkpoints import (
    CheckpointWriteError,
    list_checkpoints,
    newest_intact,
    read_checkpoint,
    remove_stale_temporaries,
    save_torch,
    write_checkpoint,
)
from .data import resolve_source
from .errors import check_number
from .hub import HubPusher, check_can_push
from .latents import native_bf16, vae_dtype
from .model import PRESETS, LiquidDiffusionUNet, check_format
from .sampling import class_grid_labels, generate, save_grid

NUM_T_BINS = 10
# Fields that fix the network or what its inputs mean; resuming with other values is refused.
RESUME_MUST_MATCH = ("preset", "space", "resolution", "vae")
# Fields that fix the data order; resuming with other values works but is no longer exact.
RESUME_EXACT_ONLY_IF_SAME = ("batch_size", "grad_accum", "seed", "dataset")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a training run needs; defaults suit the tiny preset on a Colab T4. Each field is a CLI flag."""

    # data
    dataset: str = _help("short name (afhq, celeba, flowers, pokemon, anime, cartoon), Hub id or local path",
                         default="huggan/AFHQv2")
    split: str = _help("dataset split", default="train")
    config_name: str | None = _help("dataset configuration name, if the dataset has several", default=None)
    image_column: str | None = _help("column holding the images (found automatically when omitted)", default=None)
    resolution: int = _help("training resolution in pixels (square)", default=256)
    flip: bool = _help("random horizontal flips", default=True)
    random_crop: bool = _help("random instead of center crop", default=False)
    shuffle_buffer: int = _help("streaming shuffle buffer size", default=1000)
    num_workers: int = _help("DataLoader worker processes for decoding images", default=2)
    # class conditioning (classifier-free guidance)
    class_conditional: bool = _help("condition on the dataset's ClassLabel column (image folders: one sub-folder "
                                    "per class) and learn classifier-free guidance", default=False)
    label_column: str | None = _help("ClassLabel column to condition on (found automatically when omitted)",
                                     default=None)
    class_dropout: float = _help("fraction of labels replaced by the null class in training (for guidance)",
                                 default=0.1)
    guidance_scale: float = _help("classifier-free guidance scale w of the sample grids (1: no guidance); the "
                                  "model card recommends it", default=flow.DEFAULT_GUIDANCE_SCALE)
    # model and latent space
    preset: str = _help(f"model size: {', '.join(PRESETS)}", default="tiny")
    space: str = _help("'latent' (frozen SD-VAE) or 'pixel' (no VAE)", default="latent")
    vae: str = _help("VAE Hub id or local path (latent space only)", default="stabilityai/sd-vae-ft-mse")
    cache_latents: bool = _help("encode the dataset once into a latent cache, then train on latents only",
                                default=False)
    cache_dir: str | None = _help("latent cache directory (default: OUTPUT_DIR/latent-cache)", default=None)
    cache_num_images: int | None = _help("cache only the first N images (default: all)", default=None)
    # optimisation
    batch_size: int = _help("images per process per micro-batch", default=8)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    steps: int = _help("optimizer steps to train in total", default=20_000)
    lr: float = _help("AdamW learning rate", default=1e-4)
    warmup_steps: int = _help("linear learning-rate warmup steps", default=500)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm", default=1.0)
    ema_decay: float = _help("EMA decay (reached after the EMA warmup)", default=0.9999)
    timestep_sampling: str = _help("training t distribution: uniform or logit_normal", default="uniform")
    mixed_precision: str = _help("auto (bf16 where supported, fp16 on T4-class GPUs, fp32 on CPU), no, fp16, bf16",
                                 default="auto")
    compile: bool = _help("torch.compile the model (CUDA only; ignored on CPU)", default=False)
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
    resume: str | None = _help("'latest' (newest complete checkpoint in OUTPUT_DIR, if any) or a checkpoint path",
                               default=None)
    push_to_hub: str | None = _help("Hub repo id USER/NAME to push checkpoints to (in the background)", default=None)
    push_every: int = _help("push every N checkpoints", default=1)
    hub_private: bool = _help("create the Hub repo as private", default=False)
    # evaluation (liquid_diffusion/evaluate.py)
    eval_every: int = _help("KID/FID of the EMA weights at the first checkpoint at or past every N steps and at the "
                            "end, logged to metrics.jsonl; best.json names the best checkpoint (0: off)", default=0)
    eval_samples: int = _help("generated (and real) images per in-training evaluation", default=1000)
    eval_feature_extractor: str = _help("'inception' or module.path:callable (see `evaluate --help`)",
                                        default="inception")

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
        factor = 2 ** (len(PRESETS[self.preset]["widths"]) - 1) * (8 if self.space == "latent" else 1)
        if self.resolution <= 0 or self.resolution % factor:
            raise ValueError(
                f"resolution {self.resolution} must be a positive multiple of {factor} for the {self.preset} preset "
                f"in {self.space} space (e.g. {max(factor, (self.resolution // factor) * factor)})"
            )
        for name in ("batch_size", "grad_accum", "steps", "log_every", "checkpoint_every", "keep_checkpoints",
                     "num_sample_images", "sample_steps", "push_every"):
            check_number(self, name, minimum=1)
        for name in ("warmup_steps", "sample_every", "num_workers", "shuffle_buffer", "seed", "eval_every"):
            check_number(self, name, minimum=0)
        if self.cache_num_images is not None:
            check_number(self, "cache_num_images", minimum=1)
        if self.eval_every:
            check_number(self, "eval_samples", minimum=2)
        for name in ("lr", "max_grad_norm"):
            check_number(self, name, minimum=0, inclusive=False)
        check_number(self, "weight_decay", minimum=0)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must lie in [0, 1) (e.g. 0.9999), got {self.ema_decay}")
        if self.cache_latents and self.space != "latent":
            raise ValueError("cache_latents needs space='latent' (pixel space has no VAE to cache)")
        if not 0 <= self.class_dropout < 1 or self.guidance_scale < 0:
            raise ValueError(f"need 0 <= class_dropout < 1 and guidance_scale >= 0, got {self.class_dropout} and "
                             f"{self.guidance_scale}")
        if self.label_column and not self.class_conditional:
            raise ValueError("label_column only applies to class-conditional training: add --class-conditional")


def _check_writable(folder: Path) -> None:
    """Creates ``folder`` and proves it writable now, not at the first checkpoint an hour later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"cannot write to --output-dir {str(folder)!r} ({error.strerror or error}); "
                              "pick a folder you can write to") from None


class TrainerCallback:
    """Hooks for the notebook (or any caller); every method is optional."""

    def on_log(self, trainer: "Trainer", record: dict) -> None:
        """Called on the main process after each metrics record is written."""

    def on_sample(self, trainer: "Trainer", step: int, path: Path) -> None:
        """Called on the main process after a sample grid is written."""

    def on_checkpoint(self, trainer: "Trainer", step: int, path: Path) -> None:
        """Called on the main process after a checkpoint is complete."""

    def on_eval(self, trainer: "Trainer", record: dict) -> None:
        """Called on the main process after an ``--eval-every`` evaluation (``record``: step, kid, fid, ...)."""


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


class Trainer:
    """Trains a ``LiquidDiffusionUNet`` with the rectified-flow loss (see ``flow.py``).

    Args:
        config: the run's ``TrainConfig``.
        callbacks: ``TrainerCallback`` objects notified of logs, samples and checkpoints.
    """

    def __init__(self, config: TrainConfig, callbacks: list[TrainerCallback] | None = None):
        config.validate()
        self.config = config
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(config.output_dir).expanduser()
        # The cheap checks first: a typo in a path must not wait for a VAE download.
        if not config.cache_latents or not (Path(self._cache_dir()) / "metadata.json").is_file():
            resolve_source(config.dataset)
        if config.push_to_hub:
            check_can_push(config.push_to_hub)
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(config.mixed_precision),
            gradient_accumulation_steps=config.grad_accum,
            # accelerate only runs a multi-process job on CPUs (gloo) when told so; without this, torchrun or
            # `accelerate launch` on a GPU-less machine would give N independent single-process runs.
            cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        )
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            _check_writable(self.output_dir)
        self.vae = None  # FrozenVAE, loaded when needed

        set_seed(config.seed)  # same initial weights on every process and every run
        in_channels = 3
        if config.space == "latent":
            from .latents import FrozenVAE

            # chunks of 4 keep the sample-grid decode (16 images) small next to the training state on a T4
            self.vae = FrozenVAE(config.vae, device=self.device, dtype=vae_dtype(self.device), chunk_size=4)
            in_channels = self.vae.latent_channels
        model = LiquidDiffusionUNet.from_preset(config.preset, in_channels=in_channels, **self._class_config())
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=2 / 3,
                            foreach=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                      fused=self.device.type == "cuda")
        # Stepped by hand once per optimizer step: accelerate's prepared scheduler would step num_processes times.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps))
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.ema.to(self.device)
        if config.compile:
            if self.device.type == "cuda":
                self.model = torch.compile(self.model)
            elif self.is_main:
                print("note: --compile is only used on CUDA; training uncompiled on", self.device.type)
        self.step = 0
        self.batches_consumed = 0  # micro-batches drawn from this process's stream (the data position)
        self.images_skipped = 0  # undecodable images this process's stream skipped since this run (re)started
        self.images_skipped_before = 0  # all processes' skipped images up to the checkpoint resumed from
        self.generator = torch.Generator(self.device)
        self._pusher = None
        if config.eval_every and self.is_main:
            from .evaluate import TrainingEvaluator

            self.callbacks.append(TrainingEvaluator(config))

    @property
    def unwrapped_model(self) -> LiquidDiffusionUNet:
        """The model itself, without the DDP and ``torch.compile`` wrappers."""
        model = self.accelerator.unwrap_model(self.model)
        return getattr(model, "_orig_mod", model)

    # ------------------------------------------------------------------------------------------------------- data

    def _class_config(self) -> dict:
        """``num_classes`` and ``class_names`` of a class-conditional run, read from the dataset's labels ({} else)."""
        config = self.config
        if not config.class_conditional:
            return {}
        from .data import class_names, open_source

        dataset, _ = open_source(config.dataset, config.split, config.config_name, config.image_column,
                                 with_labels=True, label_column=config.label_column)
        names = class_names(dataset)
        if len(names) < 2:
            raise ValueError(f"dataset {config.dataset!r} has {len(names)} class; class-conditional training needs "
                             "at least 2 (or drop --class-conditional)")
        if self.is_main:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            print(f"class-conditional on {len(names)} classes: {shown}")
        return dict(num_classes=len(names), class_names=names)

    def _batches(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """This process's endless stream of model inputs (latents or pixels), resumed at ``batches_consumed``;
        ``(inputs, class ids)`` pairs in a class-conditional run."""
        config, state = self.config, self.accelerator.state
        common = dict(seed=config.seed, process_index=state.process_index, num_processes=state.num_processes,
                      start_batch=self.batches_consumed)
        from .data import ImageBatchStream, make_dataloader

        if config.cache_latents:
            from .latents import LatentBatchStream

            stream = LatentBatchStream(self._cache_dir(), config.batch_size, vae_id=config.vae,
                                       resolution=config.resolution, source=config.dataset,
                                       with_labels=config.class_conditional, **common)
            loader = make_dataloader(stream, num_workers=0)  # latents are in memory already
        else:
            stream = ImageBatchStream(
                config.dataset, config.resolution, config.batch_size, split=config.split,
                config_name=config.config_name, image_column=config.image_column, random_crop=config.random_crop,
                flip=config.flip, shuffle_buffer=config.shuffle_buffer, with_labels=config.class_conditional,
                label_column=config.label_column, **common,
            )
            loader = make_dataloader(stream, num_workers=config.num_workers)
        for batch in loader:
            labels = None
            if config.class_conditional:
                batch, labels = batch
            # Undecodable images are skipped by the stream: a batch comes short by their number (empty if all were).
            self.images_skipped += config.batch_size - batch.shape[0] if not config.cache_latents else 0
            self.batches_consumed += 1
            if batch.shape[0] == 0:
                continue
            if labels is not None:
                labels = labels.to(self.device, non_blocking=True)
            batch = batch.to(self.device, non_blocking=True)
            if self.vae is not None and not config.cache_latents:
                batch = self.vae.encode(batch)
            if self.device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            yield batch if labels is None else (batch, labels)

    def _cache_dir(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else self.output_dir / "latent-cache"

    def _prepare_latent_cache(self) -> None:
        """Builds the latent cache once (main process); the others wait, then all read it."""
        from .latents import build_latent_cache

        config = self.config
        if self.is_main:  # reuses a complete cache with the same settings, refuses a different one
            build_latent_cache(
                config.dataset, self.vae, self._cache_dir(), config.resolution,
                num_images=config.cache_num_images, flip=config.flip, split=config.split,
                config_name=config.config_name, image_column=config.image_column,
                random_crop=config.random_crop, num_workers=config.num_workers,
                with_labels=config.class_conditional, label_column=config.label_column,
            )
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------------- loop

    def train(self) -> Path:
        """Runs (or resumes) training to ``config.steps``; returns the final checkpoint directory."""
        config, accelerator = self.config, self.accelerator
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            stale = remove_stale_temporaries(self.output_dir)
            if stale:
                print(f"note: removed {len(stale)} unfinished checkpoint folder(s) left by an interrupted save")
        if config.resume:
            self._resume(config.resume)
        if self.is_main:  # records of steps after the one this run starts from belong to a run that was cut off
            dropped = _truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
            if dropped:
                print(f"note: dropped {dropped} metrics record(s) past step {self.step} from metrics.jsonl")
        if config.cache_latents:
            self._prepare_latent_cache()
        if config.push_to_hub and self.is_main:
            self._pusher = HubPusher(config.push_to_hub, private=config.hub_private)

        images_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
        batches = self._batches()
        batches = itertools.chain([next(batches)], batches)  # a bad data source fails here, before the bar
        progress = tqdm(total=config.steps, initial=self.step, disable=not (self.is_main and config.progress_bar),
                        desc="train", dynamic_ncols=True)
        stats = _IntervalStats(self.device)
        interval_start = time.perf_counter()

        def log_interval():
            nonlocal stats, interval_start
            elapsed = time.perf_counter() - interval_start
            record = self._log(stats, images_per_step * stats.steps / max(elapsed, 1e-9))
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.1f}", skipped=record["images_skipped"])
            stats, interval_start = _IntervalStats(self.device), time.perf_counter()

        try:
            with _GracefulStop() as stop:
                while self.step < config.steps:
                    self._train_step(batches, stats)
                    self.step += 1
                    progress.update(1)
                    if self.step % config.log_every == 0 or self.step == config.steps:
                        log_interval()
                    if self._agree(stop.requested is not None):  # asked after the log: a callback may stop too
                        if stats.steps:
                            log_interval()
                        progress.close()
                        checkpoint = self.save_checkpoint()
                        name = stop.requested or "a stop signal on another process"
                        if self.is_main:
                            print(f"\n{name} at step {self.step}: saved {checkpoint}; continue with --resume latest",
                                  file=sys.stderr)
                        raise TrainingInterrupted(name)
                    if config.sample_every and self.step % config.sample_every == 0 and self.step < config.steps:
                        self.write_samples()
                    if self.step % config.checkpoint_every == 0 and self.step < config.steps:
                        self.save_checkpoint()
            self.write_samples()
            return self.save_checkpoint()
        finally:
            progress.close()
            if self._pusher is not None:
                self._pusher.close()

    def _agree(self, requested: bool) -> bool:
        """Whether to stop now: with several processes, every one stops at the same step if any was signalled
        (one tiny all-reduce per step; a single process needs none)."""
        if self.accelerator.num_processes == 1:
            return requested
        flag = torch.tensor(float(requested), device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def _train_step(self, batches: Iterator[torch.Tensor], stats: "_IntervalStats") -> None:
        """One optimizer step over ``grad_accum`` micro-batches, with no host-device synchronisation."""
        config, accelerator = self.config, self.accelerator
        for micro in range(config.grad_accum):
            x0, labels = next(batches), None
            if isinstance(x0, tuple):
                x0, labels = x0
            # Noise and t depend only on (seed, process, step, micro-batch): resume needs no generator state.
            mixed = ((config.seed * 1_000_003 + accelerator.process_index) * 1_000_003 + self.step) * 256 + micro
            self.generator.manual_seed(mixed % 2**63)  # torch seeds are 64-bit; any --seed must work
            noise = torch.randn(x0.shape, generator=self.generator, device=self.device, dtype=x0.dtype)
            t = flow.sample_timesteps(x0.shape[0], config.timestep_sampling, device=self.device,
                                      generator=self.generator)
            velocity_fn = self.model
            if labels is not None:  # drawn after noise and t, so unconditional runs see the very same draws
                velocity_fn = functools.partial(self.model, class_labels=self._drop_labels(labels))
            with accelerator.accumulate(self.model):
                with accelerator.autocast():
                    per_sample = flow.flow_matching_loss(velocity_fn, x0, noise, t, reduction="none")
                loss = per_sample.mean()
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            stats.add(per_sample.detach(), t, grad_norm, self.step)
        if not self.optimizer.step_was_skipped:
            self.lr_scheduler.step()
        self.ema.step(accelerator.unwrap_model(self.model).parameters())
        stats.steps += 1

    def _drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance training: each label becomes the null class with probability ``class_dropout``,
        drawn from the step's seeded generator (so exact resume still holds)."""
        drop = torch.rand(labels.shape, generator=self.generator, device=self.device) < self.config.class_dropout
        null = self.unwrapped_model.null_class
        return torch.where(drop, torch.full_like(labels, null), labels)

    def _log(self, stats: "_IntervalStats", images_per_s: float) -> dict:
        """Reduces the interval's statistics over processes, checks for divergence, appends to metrics.jsonl.

        Under fp16 loss scaling a non-finite loss only skips its step (the scaler drops the update); anywhere else,
        or when every micro-batch of the interval was non-finite, training stops before anything is saved.
        """
        totals = stats.reduce(self.accelerator, self.images_skipped)
        record = stats.record(totals, self.step, self.lr_scheduler.get_last_lr()[0], images_per_s)
        record["images_skipped"] += self.images_skipped_before
        nonfinite, micro_batches = int(totals["nonfinite"][0]), int(totals["micro_batches"][0])
        if nonfinite and (self.accelerator.mixed_precision != "fp16" or nonfinite >= micro_batches):
            first_bad = totals["first_bad_step"][0]
            first_bad_step = int(first_bad) + 1 if math.isfinite(first_bad) else self.step
            raise NonFiniteLossError(
                f"loss became NaN/inf at step {first_bad_step}; try a lower --lr (now {self.config.lr:g}) or "
                f"--mixed-precision bf16/no, and resume from {self._newest_checkpoint_hint()}"
            )
        if nonfinite:
            record["skipped_nonfinite"] = nonfinite
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            for callback in self.callbacks:
                callback.on_log(self, record)
        return record

    # ------------------------------------------------------------------------------------------------------- samples

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """Samples a grid from the EMA weights (same noise every time) to ``samples/step-NNNNNN.png``."""
        if not self.is_main:
            return None
        config = self.config
        model = self.accelerator.unwrap_model(self.model)
        self.ema.store(model.parameters())
        self.ema.copy_to(model.parameters())
        try:
            model.eval()
            labels, columns = class_grid_labels(model, config.num_sample_images)
            images = generate(model, self.vae, len(labels) if labels is not None else config.num_sample_images,
                              config.sample_steps, "euler", seed=config.seed, resolution=config.resolution,
                              class_labels=labels, guidance_scale=config.guidance_scale)
        finally:
            self.ema.restore(model.parameters())
            model.train()
        path = self.output_dir / "samples" / f"step-{self.step:06d}.png"
        save_grid(images, path, columns)
        for callback in self.callbacks:
            callback.on_sample(self, self.step, path)
        return path

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[LiquidDiffusionUNet]:
        """The model with the EMA weights swapped in, in eval mode; the training weights come back afterwards."""
        model = self.accelerator.unwrap_model(self.model)
        self.ema.store(model.parameters())
        self.ema.copy_to(model.parameters())
        try:
            model.eval()
            yield model
        finally:
            self.ema.restore(model.parameters())
            model.train()

    # ------------------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoint-NNNNNN`` atomically (see ``checkpoints.write_checkpoint``) and prunes old ones.

        Every process calls it; the main process writes. A full disk ends training with a one-line
        ``CheckpointWriteError`` and leaves the previous checkpoints as they were.
        """
        self.accelerator.wait_for_everyone()
        final = None
        skipped = self._total_skipped()
        if self.is_main:
            model = self.unwrapped_model
            if not bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
                raise NonFiniteLossError(
                    f"weights became NaN/inf by step {self.step}; not saving them. Resume from "
                    f"{self._newest_checkpoint_hint()} with a lower --lr or --mixed-precision bf16/no"
                )
            final = write_checkpoint(self.output_dir, self.step, lambda folder: self._fill_checkpoint(folder, skipped))
            self._prune_checkpoints()
            for callback in self.callbacks:
                callback.on_checkpoint(self, self.step, final)
            every_nth = (self.step // self.config.checkpoint_every) % self.config.push_every == 0
            if self._pusher is not None and (every_nth or self.step >= self.config.steps):  # the final one always
                self._pusher.push(final)
        self.accelerator.wait_for_everyone()
        return final or self.output_dir / f"checkpoint-{self.step:06d}"

    def _fill_checkpoint(self, folder: Path, images_skipped: int) -> None:
        model = self.unwrapped_model
        model.save_pretrained(folder / "unet", safe_serialization=True)
        ema_model = LiquidDiffusionUNet.from_config(model.config)
        self.ema.copy_to(ema_model.parameters())
        ema_model.save_pretrained(folder / "unet_ema", safe_serialization=True)
        scaler = self.accelerator.scaler
        save_torch(
            {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"},
                "rng": _rng_state(),
            },
            folder / "training_state.pt",
        )
        (folder / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        (folder / "state.json").write_text(json.dumps(
            {"step": self.step, "batches_consumed": self.batches_consumed,
             "num_processes": self.accelerator.num_processes, "images_skipped": images_skipped}, indent=2))

    def _total_skipped(self) -> int:
        """Skipped images of all processes since the run began (a collective: every process must call it)."""
        local = torch.tensor(float(self.images_skipped), device=self.device)
        return self.images_skipped_before + int(self.accelerator.reduce(local, reduction="sum").item())

    def _prune_checkpoints(self) -> None:
        try:  # --eval-every's best checkpoint is kept
            best = json.loads((self.output_dir / "best.json").read_text()).get("checkpoint")
        except (OSError, ValueError):
            best = None
        for old in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
            if old.name != best:
                shutil.rmtree(old, ignore_errors=True)

    def _newest_checkpoint_hint(self) -> str:
        checkpoints = list_checkpoints(self.output_dir)
        return str(checkpoints[-1]) if checkpoints else "scratch (no checkpoint was saved yet)"

    def _resume(self, resume: str) -> None:
        """Restores model, EMA, optimizer, scheduler, loss scaler, step, data position and RNG.

        ``latest`` takes the newest checkpoint whose files all read back, saying which damaged ones it passed over;
        an explicit path must be intact (a damaged one is refused, naming the bad file).
        """
        report = print if self.is_main else (lambda line: None)
        if resume == "latest":
            checkpoint = newest_intact(self.output_dir, report=report)
            if checkpoint is None:
                report(f"no checkpoint in {self.output_dir} yet: starting from scratch")
                return
        else:
            checkpoint = read_checkpoint(resume)
        path, saved, state = checkpoint.path, checkpoint.train_config, checkpoint.state
        mismatched = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(self.config, k)]
        if mismatched:
            details = ", ".join(f"{k}={saved.get(k)!r} (now {getattr(self.config, k)!r})" for k in mismatched)
            raise ValueError(f"cannot resume {path}: it was trained with {details}; use the same values or a new "
                             "--output-dir")
        self._check_resume_classes(checkpoint)
        batches_consumed = state["batches_consumed"]
        changed = [k for k in RESUME_EXACT_ONLY_IF_SAME if saved.get(k) != getattr(self.config, k)]
        old_processes = state.get("num_processes", 1)
        if old_processes != self.accelerator.num_processes:
            changed.append("number of processes")
        if changed:
            # Continue at the same number of images seen per process, in the new data order.
            images_per_process = batches_consumed * saved["batch_size"] * old_processes / self.accelerator.num_processes
            batches_consumed = int(images_per_process // self.config.batch_size)
            report(f"note: {', '.join(changed)} changed since {path.name}: resuming, but not exactly "
                   "(the data order differs from an uninterrupted run)")
        model = self.unwrapped_model
        names = [name for name, _ in model.named_parameters()]
        try:
            check_format(checkpoint.unet[0])
        except ValueError as error:
            raise ValueError(f"cannot resume {path}: {error}; or start a new run with another --output-dir") from None
        try:
            model.load_state_dict(checkpoint.unet[1])
            ema_weights = (checkpoint.unet_ema or checkpoint.unet)[1]
            shadow = [ema_weights[name].to(self.device) for name in names]
        except (RuntimeError, KeyError) as error:
            raise ValueError(f"cannot resume {path}: its weights do not fit this version of LiquidDiffusion's "
                             f"{self.config.preset} model (the format changed: {str(error).splitlines()[0]}); "
                             "start a new run with another --output-dir") from None
        training = checkpoint.training
        self.ema.load_state_dict({**training["ema"], "shadow_params": shadow})
        self.optimizer.load_state_dict(training["optimizer"])
        self.lr_scheduler.load_state_dict(training["lr_scheduler"])
        if training["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(training["scaler"])
        _set_rng_state(training["rng"])
        self.step = checkpoint.step
        self.batches_consumed = batches_consumed
        self.images_skipped_before = int(state.get("images_skipped", 0))
        report(f"resumed from {path} at step {self.step}")

    def _check_resume_classes(self, checkpoint) -> None:
        """Refuses, in one line, to resume a checkpoint trained on another label set (or with/without labels)."""
        saved = checkpoint.unet[0].get("class_names")
        current = self.unwrapped_model.config.class_names
        if (saved or None) != (current or None):
            def describe(names):
                return f"classes [{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}]" if names else "no classes"

            raise ValueError(f"cannot resume {checkpoint.path}: it was trained with {describe(saved)}, this run has "
                             f"{describe(current)}; use the same dataset and labels or a new --output-dir")


def _truncate_metrics(path: Path, step: int) -> int:
    """Drops the records logged after ``step`` (by a run that was cut off), so curves never repeat steps; returns
    how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: drop it
            continue
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


class _IntervalStats:
    """Device-side accumulators for one logging interval (no host sync until ``record``)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        self.bin_sum = torch.zeros(NUM_T_BINS, device=device)
        self.bin_count = torch.zeros(NUM_T_BINS, device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.grad_norm_count = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), float("inf"), device=device)
        self.steps = 0
        self.micro_batches = 0

    def add(self, per_sample: torch.Tensor, t: torch.Tensor, grad_norm: torch.Tensor | None, step: int) -> None:
        per_sample = per_sample.float()
        finite = torch.isfinite(per_sample)
        bad = (~finite).any()
        self.nonfinite += bad.float()
        self.first_bad_step = torch.where(bad, self.first_bad_step.clamp(max=float(step)), self.first_bad_step)
        self.micro_batches += 1
        safe = torch.where(finite, per_sample, torch.zeros_like(per_sample))
        self.loss_sum += safe.sum()
        self.count += finite.sum()
        bins = (t * NUM_T_BINS).long().clamp_(0, NUM_T_BINS - 1)
        self.bin_sum.index_add_(0, bins, safe)
        self.bin_count.index_add_(0, bins, finite.float())
        if grad_norm is not None:
            grad_norm = torch.as_tensor(grad_norm, device=t.device).float()
            ok = torch.isfinite(grad_norm)
            self.grad_norm_sum += torch.where(ok, grad_norm, torch.zeros_like(grad_norm))
            self.grad_norm_count += ok.float()

    def fields(self, images_skipped: int) -> dict[str, torch.Tensor]:
        """This process's accumulators, each of shape [1, n] (one row per process once gathered)."""
        device = self.count.device
        fields = {
            "loss_sum": self.loss_sum, "count": self.count, "grad_norm_sum": self.grad_norm_sum,
            "grad_norm_count": self.grad_norm_count, "nonfinite": self.nonfinite,
            "micro_batches": torch.tensor(float(self.micro_batches), device=device),
            "images_skipped": torch.tensor(float(images_skipped), device=device),
            "bin_sum": self.bin_sum, "bin_count": self.bin_count, "first_bad_step": self.first_bad_step,
        }
        return {k: v.reshape(1, -1) for k, v in fields.items()}

    def reduce(self, accelerator: Accelerator, images_skipped: int) -> dict[str, list[float]]:
        """Every accumulator over all processes: sums, except ``first_bad_step`` (the earliest); host values."""
        gathered = accelerator.gather(self.fields(images_skipped))  # [processes, n] each
        return {k: (v.min(0).values if k == "first_bad_step" else v.sum(0)).cpu().tolist()
                for k, v in gathered.items()}

    @staticmethod
    def record(totals: dict[str, list[float]], step: int, lr: float, images_per_s: float) -> dict:
        """The metrics record of reduced ``totals``; ``first_bad_step`` is 1-based like ``step``."""
        (loss_sum,), (count,) = totals["loss_sum"], totals["count"]
        (gn_sum,), (gn_count,) = totals["grad_norm_sum"], totals["grad_norm_count"]
        return {
            "step": step,
            "loss": loss_sum / count if count else float("nan"),
            "lr": lr,
            "images_per_s": images_per_s,
            "grad_norm": gn_sum / gn_count if gn_count else float("nan"),
            "loss_t_bins": [(s / c) if c else None for s, c in zip(totals["bin_sum"], totals["bin_count"])],
            "images_skipped": int(totals["images_skipped"][0]),
        }


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C, SIGTERM, SIGHUP) after saving a checkpoint; ``args[0]`` names it."""


class _GracefulStop:
    """The first SIGINT (Ctrl-C), SIGTERM or SIGHUP -- what Colab, Slurm and Kubernetes send before they kill a job --
    only records its name in ``requested``, so the loop finishes its step, saves a checkpoint and exits. A second
    Ctrl-C interrupts at once. Outside the main thread it does nothing."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __enter__(self) -> "_GracefulStop":
        self.requested: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the trainer, the sample command and the notebook
# ----------------------------------------------------------------------------------------------------------------


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, named and documented from the dataclass."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"dest": f.name, "help": f"{f.metadata['help']} (default: {f.default})", "default": f.default}
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", metavar="PATH", **kwargs)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, **kwargs)


def _run_train(args: argparse.Namespace) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    config.validate()
    try:
        checkpoint = Trainer(config).train()
    except TrainingInterrupted as stop:  # saved; the exit status says which signal (130 Ctrl-C, 143 SIGTERM)
        return 128 + getattr(signal, stop.args[0], signal.SIGINT) if stop.args else 130
    except KeyboardInterrupt:
        return 130
    except CheckpointWriteError as error:
        print(f"error: {error.strerror}", file=sys.stderr)
        return 1
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(f"done: {checkpoint}")
    return 0


def add_train_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a LiquidDiffusion model with rectified flow",
        description="Train with rectified flow. Works the same under `accelerate launch` for several GPUs.",
    )
    _add_config_flags(parser)
    parser.set_defaults(func=_run_train)
