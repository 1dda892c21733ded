"""Rectified-flow training with accelerate: EMA, mixed precision, live sample grids and exact resume.

One ``Trainer`` serves the notebook, ``python -m liquid_diffusion train`` and ``accelerate launch`` alike::

    batches (pixels, latents or cached latents) -> flow_matching_loss -> AdamW (+ warmup, schedule, clipping) -> EMA
      held-out images (validation.py) -> val_loss -> metrics.jsonl / samples/step-N.png / checkpoint-N/

Output directory layout::

    metrics.jsonl               one JSON object per logged step, and one per validation (val_loss, ...)
    samples/step-000500.png     EMA sample grids, always from the same noise
    checkpoint-000500/          unet/ and unet_ema/ (safetensors), training_state.pt, state.json, train_config.json
    best.json                   the checkpoint with the best KID so far (--eval-every), else with the lowest
                                validation loss (kept when pruning)

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
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import flow
from .checkpoints import (
    CheckpointWriteError,
    checkpoint_step,
    fill_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
    restore_training_state,
    write_checkpoint,
)
from .config import (
    TrainConfig,
    add_config_flags,
    check_resolution,
    config_from_args,
    resolve_batch_size,
    resolve_mixed_precision,
    resume_position,
)
from .data import SEED_STRIDE, ImageBatchStream, make_dataloader
from .errors import ADVICE, DiskFullError, advice, check_not_a_file, option
from .evaluate import TrainingEvaluator, update_best
from .latents import (
    FrozenVAE,
    LatentBatchStream,
    build_latent_cache,
    read_metadata,
    vae_dtype,
)
from .metrics import (
    METRICS_FILE,
    IntervalStats,
    TrainerCallback,
    append_record,
    truncate_metrics,
)
from .model import LiquidDiffusionUNet
from .publish import HubPusher, check_can_push
from .resume import apply_optimizer_flags, find_resume_checkpoint, resume_notes
from .run_lock import RunLock, claim_output_dir
from .sampling import class_grid_labels, generate, save_grid
from .sources import class_names, describe_image_folder, open_source, resolve_source
from .stopping import (
    DivergenceCheck,
    GracefulStop,
    LossExplodedError,
    NonFiniteLossError,
    TrainingInterrupted,
    any_process,
    exit_status,
)
from .tracking import ExperimentTracker, accelerator_kwargs, check_report_to
from .validation import Validator, choose_holdout


def _check_writable(folder: Path) -> None:
    """Creates ``folder`` and proves it writable now, not at the first checkpoint an hour later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"cannot write to --output-dir {str(folder)!r} ({error.strerror or error}); pick a folder you can write to"
        ) from None


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
        check_not_a_file(self.output_dir, "--output-dir")
        if self._reads_dataset():
            resolve_source(config.dataset)
        if config.push_to_hub:
            check_can_push(config.push_to_hub)
        check_report_to(config.report_to)
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(config.mixed_precision),
            gradient_accumulation_steps=config.grad_accum,
            # accelerate only runs a multi-process job on CPUs (gloo) when told so; without this, torchrun or
            # `accelerate launch` on a GPU-less machine would give N independent single-process runs.
            cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
            **accelerator_kwargs(config.report_to, self.output_dir),
        )
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        resolve_batch_size(
            config, self.device, self._resumed_config(), report=print if self.is_main else (lambda line: None)
        )
        if self.is_main:
            _check_writable(self.output_dir)
        set_seed(config.seed)  # same initial weights on every process and every run
        model = self._build_model()
        self.ema = EMAModel(
            model.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=config.ema_power, foreach=True
        )
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
            fused=self.device.type == "cuda",
        )
        # Stepped by hand once per optimizer step: accelerate's prepared scheduler would step num_processes times.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            functools.partial(lr_factor, schedule=config.lr_schedule, warmup=config.warmup_steps, total=config.steps),
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
        self._pusher = self._tracker = None
        self._last_record: dict | None = None
        self.holdout = None  # which images validation holds out (validation.py); chosen when the run starts
        self.validator: Validator | None = None  # the held-out set, on the main process
        self.last_validation: dict | None = None
        self._saved: Path | None = None  # the checkpoint this run wrote last: never pruned
        self._divergence = DivergenceCheck()
        self._resumed_from: Path | None = None
        self.resume_hint = advice("resume")  # what the interrupt message advises (quickstart: rerun)
        if config.eval_every and self.is_main:
            self.callbacks.append(TrainingEvaluator(config))

    def _resumed_config(self) -> dict | None:
        """The train config of the checkpoint ``--resume`` names, if it can be read now (for ``--batch-size auto``)."""
        resume = self.config.resume
        if not resume:
            return None
        candidates = list_checkpoints(self.output_dir)[-1:] if resume == "latest" else [Path(resume)]
        try:
            return json.loads((candidates[0] / "train_config.json").read_text()) if candidates else None
        except (OSError, ValueError):
            return None

    def _build_model(self) -> LiquidDiffusionUNet:
        """Loads the frozen VAE (latent space) into ``self.vae`` and builds the U-Net for its latents (or pixels)."""
        config = self.config
        self.vae, in_channels = None, 3
        if config.space == "latent":
            # chunks of 4 keep the sample-grid decode (16 images) small next to the training state on a T4
            self.vae = FrozenVAE(config.vae, device=self.device, dtype=vae_dtype(self.device), chunk_size=4)
            check_resolution(config.resolution, config.preset, config.space, self.vae.downsample_factor)
            in_channels = self.vae.latent_channels
        model = LiquidDiffusionUNet.from_preset(config.preset, in_channels=in_channels, **self._class_config())
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        # channels_last on every device: the per-position LayerNorm and the depthwise convs want channels last (a
        # faster step on the CPU as well; docs/design.md: channels_last)
        return model.to(memory_format=torch.channels_last)

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
        dataset, _ = open_source(
            config.dataset,
            config.split,
            config.config_name,
            config.image_column,
            with_labels=True,
            label_column=config.label_column,
        )
        names = class_names(dataset)
        if len(names) < 2:
            raise ValueError(
                f"dataset {config.dataset!r} has {len(names)} class; class-conditional training needs "
                "at least 2 (or drop --class-conditional)"
            )
        if self.is_main:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            print(f"class-conditional on {len(names)} classes: {shown}")
        return dict(num_classes=len(names), class_names=names)

    def _batches(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """This process's endless stream of model inputs (latents or pixels), resumed at ``batches_consumed``;
        ``(inputs, class ids)`` pairs in a class-conditional run."""
        config, state = self.config, self.accelerator.state
        common = dict(
            seed=config.seed,
            process_index=state.process_index,
            num_processes=state.num_processes,
            start_batch=self.batches_consumed,
        )
        if config.cache_latents:
            stream = LatentBatchStream(
                self._cache_dir(),
                config.batch_size,
                vae_id=config.vae,
                resolution=config.resolution,
                source=config.dataset,
                with_labels=config.class_conditional,
                **common,
            )
            loader = make_dataloader(stream, num_workers=0)  # latents are in memory already (held-out ones never)
        else:
            stream = ImageBatchStream(
                config.dataset,
                config.resolution,
                config.batch_size,
                split=config.split,
                config_name=config.config_name,
                image_column=config.image_column,
                random_crop=config.random_crop,
                flip=config.flip,
                shuffle_buffer=config.shuffle_buffer,
                with_labels=config.class_conditional,
                label_column=config.label_column,
                holdout=self.holdout,
                **common,
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
            batch = batch.contiguous(memory_format=torch.channels_last)
            yield batch if labels is None else (batch, labels)

    def _reads_dataset(self) -> bool:
        """Whether this run reads the dataset itself (not only a latent cache that is already built)."""
        return not self.config.cache_latents or not (self._cache_dir() / "metadata.json").is_file()

    def _cache_dir(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else self.output_dir / "latent-cache"

    def _prepare_latent_cache(self) -> None:
        """Builds the latent cache once (main process); the others wait, then all read it.

        A complete cache made without held-out images (by a run without validation) is still used, with validation
        off for this run: its latents may hold any image, so none can be held out.
        """
        config = self.config
        try:
            metadata = read_metadata(self._cache_dir())
        except (OSError, ValueError):  # none yet, or damaged: built (again) below
            metadata = None
        if self.holdout is not None and metadata is not None and "held_out" not in metadata:
            if self.is_main:
                print(
                    f"note: the latent cache in {self._cache_dir()} was made without held-out images, so validation "
                    "is off for this run (a new --cache-dir makes a cache that leaves them out)"
                )
            self.holdout = None
        if self.is_main:  # reuses a complete cache with the same settings, refuses a different one
            build_latent_cache(
                config.dataset,
                self.vae,
                self._cache_dir(),
                config.resolution,
                num_images=config.cache_num_images,
                flip=config.flip,
                split=config.split,
                config_name=config.config_name,
                image_column=config.image_column,
                random_crop=config.random_crop,
                num_workers=config.num_workers,
                with_labels=config.class_conditional,
                label_column=config.label_column,
                holdout=self.holdout,
            )
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------------- loop

    def train(self) -> Path:
        """Runs (or resumes) training to ``config.steps``; returns the final checkpoint directory.

        The main process holds the output folder's lock (``run_lock``) throughout: one run per folder."""
        with RunLock(self.output_dir) if self.is_main else contextlib.nullcontext():
            return self._train()

    def _train(self) -> Path:
        config = self.config
        self._start_run()
        if self._resumed_from is not None and self.step >= config.steps:  # said by resume_notes
            return self._resumed_from
        batches = self._batches()
        batches = itertools.chain([next(batches)], batches)  # a bad data source fails here, before the bar
        progress = tqdm(
            total=config.steps,
            initial=self.step,
            disable=not (self.is_main and config.progress_bar),
            desc="train",
            dynamic_ncols=True,
        )
        self._stats, self._interval_start = IntervalStats(self.device), time.perf_counter()
        try:
            with GracefulStop() as stop:
                self._signals = stop
                while self.step < config.steps:
                    self._train_step(batches, self._stats)
                    self.step += 1
                    progress.update(1)
                    if self.step % config.log_every == 0 or self.step == config.steps:
                        self._log(progress)
                    # asked after the log: a callback may stop too
                    if any_process(self.accelerator, stop.requested is not None):
                        self._stop(stop.requested, progress)
                    every = config.validation_every
                    if (every and self.step % every == 0) or self.step == config.steps:
                        self.validate(progress)
                    if config.sample_every and self.step % config.sample_every == 0 and self.step < config.steps:
                        self.write_samples()
                    if self.step % config.checkpoint_every == 0 and self.step < config.steps:
                        self.save_checkpoint()
                # still inside GracefulStop: a signal during the final grid or save must not cost the final checkpoint
                if stop.requested is None:
                    self.write_samples()
                final = self.save_checkpoint()
                if any_process(self.accelerator, stop.requested is not None):
                    self._stopped(stop.requested, final)
            return final
        finally:
            progress.close()
            if self._pusher is not None:
                self._pusher.close()
            if self._tracker is not None:
                self._tracker.finish()

    def _start_run(self) -> None:
        """Clears what an interrupted run left, resumes, and prepares the latent cache and the Hub pusher."""
        config = self.config
        claim_output_dir(self.output_dir, resume=config.resume, overwrite=config.overwrite, delete=self.is_main)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            stale = remove_stale_temporaries(self.output_dir)
            if stale:
                print(f"note: removed {len(stale)} unfinished checkpoint folder(s) left by an interrupted save")
            if self._reads_dataset() and resolve_source(config.dataset)[0] == "imagefolder":
                print(describe_image_folder(config.dataset))
        self._choose_holdout()
        if config.resume:
            self._resume(config.resume)
        if self.is_main:  # records of steps after the one this run starts from belong to a run that was cut off
            dropped = truncate_metrics(self.output_dir / METRICS_FILE, self.step)
            if dropped:
                print(f"note: dropped {dropped} metrics record(s) past step {self.step} from {METRICS_FILE}")
        self._divergence.seed(self.output_dir / METRICS_FILE)
        if self._resumed_from is not None and self.step >= config.steps:
            return  # nothing to train
        if config.report_to != "none" and self.is_main:  # after the resume: its curves continue past its step
            self._tracker = ExperimentTracker(self)
            self.callbacks.append(self._tracker)
        if config.cache_latents:
            self._prepare_latent_cache()
        if self.holdout is not None and self.is_main:
            self._load_validation_set()
        if config.push_to_hub and self.is_main:
            self._pusher = HubPusher(config.push_to_hub, private=config.hub_private)

    def _stop(self, signal_name: str | None, progress: tqdm) -> NoReturn:
        """After a stop signal (on any process): logs the open interval, saves a checkpoint, raises
        ``TrainingInterrupted``."""
        if self._stats.steps:
            self._log(progress)
        progress.close()
        self._stopped(signal_name, self.save_checkpoint())

    def _stopped(self, signal_name: str | None, checkpoint: Path) -> NoReturn:
        name = signal_name or "a stop signal on another process"
        if self.is_main:
            print(f"\n{name} at step {self.step}: saved {checkpoint}; {self.resume_hint}", file=sys.stderr)
        raise TrainingInterrupted(name)

    def _train_step(self, batches: Iterator[torch.Tensor], stats: IntervalStats) -> None:
        """One optimizer step over ``grad_accum`` micro-batches, with no host-device synchronisation."""
        config, accelerator = self.config, self.accelerator
        for micro in range(config.grad_accum):
            x0, labels, paired_noise = _unpack_batch(next(batches))
            # Noise and t depend only on (seed, process, step, micro-batch): resume needs no generator state.
            mixed = ((config.seed * SEED_STRIDE + accelerator.process_index) * SEED_STRIDE + self.step) * 256 + micro
            self.generator.manual_seed(mixed % 2**63)  # torch seeds are 64-bit; any --seed must work
            noise = torch.randn(x0.shape, generator=self.generator, device=self.device, dtype=x0.dtype)
            if paired_noise is not None:  # reflow: the noise the teacher sampled x0 from (drawn above all the same)
                noise = paired_noise
            t = self._sample_timesteps(x0.shape[0])
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

    def _sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """The training times t [B] of a micro-batch, drawn from the step's seeded generator (reflow.py's trainer
        may fix them)."""
        config = self.config
        return flow.sample_timesteps(
            batch_size,
            config.timestep_sampling,
            device=self.device,
            generator=self.generator,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
        )

    def _drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance training: each label becomes the null class with probability ``class_dropout``,
        drawn from the step's seeded generator (so exact resume still holds)."""
        drop = torch.rand(labels.shape, generator=self.generator, device=self.device) < self.config.class_dropout
        null = self.unwrapped_model.null_class
        return torch.where(drop, torch.full_like(labels, null), labels)

    def _log(self, progress: tqdm) -> dict:
        """Reduces the interval's statistics over processes, checks for divergence, appends to metrics.jsonl, shows
        the record on the progress bar and starts the next interval.

        Under fp16 loss scaling a non-finite loss only skips its step (the scaler drops the update); anywhere else,
        or when every micro-batch of the interval was non-finite, training stops before anything is saved.
        """
        config, stats = self.config, self._stats
        images_per_step = config.batch_size * config.grad_accum * self.accelerator.num_processes
        images_per_s = images_per_step * stats.steps / max(time.perf_counter() - self._interval_start, 1e-9)
        totals = stats.reduce(self.accelerator, self.images_skipped)
        record = stats.record(totals, self.step, self.lr_scheduler.get_last_lr()[0], images_per_s)
        record["images_skipped"] += self.images_skipped_before
        nonfinite, micro_batches = int(totals["nonfinite"][0]), int(totals["micro_batches"][0])
        if nonfinite and (self.accelerator.mixed_precision != "fp16" or nonfinite >= micro_batches):
            first_bad = totals["first_bad_step"][0]
            first_bad_step = int(first_bad) + 1 if math.isfinite(first_bad) else self.step
            raise NonFiniteLossError(
                f"loss became NaN/inf at step {first_bad_step}; try a lower --lr (now {config.lr:g}) or "
                f"--mixed-precision bf16/no, and resume from {self._newest_checkpoint_hint()}"
            )
        if nonfinite:
            record["skipped_nonfinite"] = nonfinite
        # every process must agree (each keeps its own history): an exploded loss on any one stops them all
        if any_process(self.accelerator, self._divergence.exploded(self.step, record["loss"])):
            healthy = self._last_healthy_checkpoint()
            median = self._divergence.median
            raise LossExplodedError(
                f"loss exploded to {record['loss']:.3g} at step {self.step}"
                + (f" (median so far {median:.3g})" if median is not None else "")
                + f"; nothing saved past it. Resume with a lower {option('lr')} (now {config.lr:g}) "
                + (
                    f"from the last good checkpoint: {advice('resume_from', checkpoint=healthy)}"
                    if healthy
                    else "from scratch"
                )
            )
        if self.is_main:
            append_record(self.output_dir, record)
            for callback in self.callbacks:
                callback.on_log(self, record)
        self._show(progress, record)
        self._stats, self._interval_start = IntervalStats(self.device), time.perf_counter()
        return record

    def _show(self, progress: tqdm, record: dict) -> None:
        values = dict(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            img_s=f"{record['images_per_s']:.1f}",
            skipped=record["images_skipped"],
        )
        if self.last_validation is not None:
            values["val_loss"] = f"{self.last_validation['val_loss']:.4f}"
        progress.set_postfix(**values)
        self._last_record = record

    # ------------------------------------------------------------------------------------------------------- validation

    def _choose_holdout(self) -> None:
        """Chooses the held-out images (every process, the same choice: training streams leave them out)."""
        config = self.config
        if not config.validation_images:
            return
        try:
            self.holdout = choose_holdout(config.dataset, config.validation_images, config.split, config.config_name)
        except (ValueError, OSError) as error:  # a metric never stops training
            if self.is_main:
                print(f"warning: validation is off for this run: {error}", file=sys.stderr)
            return
        if self.is_main:
            if self.holdout is None:
                print(
                    f"note: validation is off: {config.dataset} is too small to hold out an image "
                    "(a folder gives at most 10 % of its images)"
                )
            else:
                every = f"every {config.validation_every} steps and " if config.validation_every else ""
                print(f"validation: {self.holdout.description}; never trained on, scored {every}at the end")

    def _load_validation_set(self) -> None:
        """Decodes the held-out images (and encodes them with the VAE in latent space) once, on the main process."""
        config = self.config
        stream = ImageBatchStream(
            config.dataset,
            config.resolution,
            config.batch_size,
            split=config.split,
            config_name=config.config_name,
            image_column=config.image_column,
            flip=False,
            shuffle_buffer=0,
            num_epochs=1,
            with_labels=config.class_conditional,
            label_column=config.label_column,
            holdout=self.holdout,
            part="validation",
        )
        inputs, labels, count = [], [], 0
        try:
            for batch in stream:
                if config.class_conditional:
                    batch, batch_labels = batch
                    labels.append(batch_labels)
                if batch.shape[0]:
                    inputs.append(self.vae.encode(batch.to(self.device)) if self.vae is not None else batch)
                count += batch.shape[0]
                if count >= config.validation_images:
                    break
        except ValueError as error:
            print(f"warning: validation is off for this run: {error}", file=sys.stderr)
            return
        if not inputs:
            print("warning: validation is off for this run: no held-out image could be decoded", file=sys.stderr)
            return
        x0 = torch.cat(inputs)[: config.validation_images].to(self.device).contiguous(memory_format=torch.channels_last)
        class_ids = torch.cat(labels)[: len(x0)].to(self.device) if labels else None
        self.validator = Validator(x0, class_ids, batch_size=max(2 * config.batch_size, 16))

    @torch.no_grad()
    def validate(self, progress: tqdm | None = None) -> dict | None:
        """Scores the EMA and the raw weights on the held-out set; appends ``{"step", "val_loss", "val_loss_raw",
        "val_loss_t", "val_loss_raw_t", "val_images", "val_time_s"}`` to metrics.jsonl (main process)."""
        if self.validator is None:
            self.accelerator.wait_for_everyone()  # the main process scores; the others wait for it
            return None
        start = time.perf_counter()
        model = self.unwrapped_model
        model.eval()
        try:
            raw, raw_t = self.validator.loss(model, self.accelerator.autocast)
        finally:
            model.train()
        with self.ema_weights() as ema_model:
            ema, ema_t = self.validator.loss(ema_model, self.accelerator.autocast)
        record = {
            "step": self.step,
            "val_loss": ema,
            "val_loss_raw": raw,
            "val_loss_t": ema_t,
            "val_loss_raw_t": raw_t,
            "val_images": len(self.validator),
            "val_time_s": time.perf_counter() - start,
        }
        self.last_validation = record
        append_record(self.output_dir, record)
        for callback in self.callbacks:
            callback.on_validation(self, record)
        if progress is not None and self._last_record is not None:
            self._show(progress, self._last_record)
        self.accelerator.wait_for_everyone()
        return record

    # ------------------------------------------------------------------------------------------------------- samples

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """Samples a grid from the EMA weights (same noise every time) to ``samples/step-NNNNNN.png``."""
        if not self.is_main:
            return None
        config = self.config
        with self.ema_weights() as model:
            labels, columns = class_grid_labels(model, config.num_sample_images)
            images = generate(
                model,
                self.vae,
                len(labels) if labels is not None else config.num_sample_images,
                config.sample_steps,
                "euler",
                seed=config.seed,
                resolution=config.resolution,
                class_labels=labels,
                guidance_scale=config.guidance_scale,
            )
        path = self.output_dir / "samples" / f"step-{self.step:06d}.png"
        try:
            save_grid(images, path, columns)
        except DiskFullError as error:  # a grid is feedback: the run goes on (a checkpoint then says if it cannot)
            print(f"warning: {error.strerror}: sample grid skipped, training goes on", file=sys.stderr)
            return None
        for callback in self.callbacks:
            callback.on_sample(self, self.step, path)
        return path

    def interruptible(self):
        """A context in which a stop signal interrupts at once (``GracefulStop.interruptible``): for callbacks' slow
        feedback work, such as an evaluation."""
        stop = getattr(self, "_signals", None)
        return stop.interruptible() if stop is not None else contextlib.nullcontext()

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
            state = {
                "step": self.step,
                "batches_consumed": self.batches_consumed,
                "num_processes": self.accelerator.num_processes,
                "images_skipped": skipped,
            }
            final = write_checkpoint(
                self.output_dir,
                self.step,
                functools.partial(
                    fill_checkpoint,
                    model=model,
                    ema=self.ema,
                    optimizer=self.optimizer,
                    lr_scheduler=self.lr_scheduler,
                    scaler=self.accelerator.scaler,
                    train_config=dataclasses.asdict(self.config),
                    state=state,
                ),
            )
            self._saved = final
            if not self.config.eval_every and self.last_validation and self.last_validation["step"] == self.step:
                update_best(
                    self.output_dir,
                    {"checkpoint": final.name, "step": self.step, "val_loss": self.last_validation["val_loss"]},
                    metric="val_loss",
                )
            self._prune_checkpoints()
            for callback in self.callbacks:
                callback.on_checkpoint(self, self.step, final)
            every_nth = (self.step // self.config.checkpoint_every) % self.config.push_every == 0
            if self._pusher is not None and (every_nth or self.step >= self.config.steps):  # the final one always
                self._pusher.push(final)
        self.accelerator.wait_for_everyone()
        return final or self.output_dir / f"checkpoint-{self.step:06d}"

    def _total_skipped(self) -> int:
        """Skipped images of all processes since the run began (a collective: every process must call it)."""
        local = torch.tensor(float(self.images_skipped), device=self.device)
        return self.images_skipped_before + int(self.accelerator.reduce(local, reduction="sum").item())

    def _prune_checkpoints(self) -> None:
        """Keeps the newest ``keep_checkpoints`` up to this run's step, and always the one this run wrote last,
        --eval-every's best and the newest written before the loss exploded (``DivergenceCheck``). Checkpoints past
        this run's step (damaged ones a resume passed over) are left for this run to replace."""
        try:  # the best checkpoint (best.json) is kept
            best = json.loads((self.output_dir / "best.json").read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            best = None
        kept = {best, getattr(self._saved, "name", None), getattr(self._last_healthy_checkpoint(), "name", None)}
        ours = [p for p in list_checkpoints(self.output_dir) if checkpoint_step(p) <= self.step]
        for old in ours[: -self.config.keep_checkpoints]:
            if old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)

    def _last_healthy_checkpoint(self) -> Path | None:
        """The newest checkpoint saved at or before the last step whose loss had not taken off (``DivergenceCheck``)."""
        healthy = self._divergence.healthy_step
        found = [p for p in list_checkpoints(self.output_dir) if healthy is not None and checkpoint_step(p) <= healthy]
        return found[-1] if found else None

    def _newest_checkpoint_hint(self) -> str:
        checkpoints = list_checkpoints(self.output_dir)
        return str(checkpoints[-1]) if checkpoints else "scratch (no checkpoint was saved yet)"

    def _resume(self, resume: str) -> None:
        """Restores model, EMA, optimizer, scheduler, loss scaler, step, data position and RNG.

        ``latest`` (or a run folder) takes the newest checkpoint whose files all read back, saying which damaged
        ones it passed over; an explicit checkpoint must be intact (a damaged one is refused, naming the bad file).
        This run's --lr, --weight-decay and --ema-decay win over the saved ones (``resume.py``, with a note)."""
        report = print if self.is_main else (lambda line: None)
        checkpoint = find_resume_checkpoint(resume, self.output_dir, report)
        if checkpoint is None:
            report(f"no checkpoint in {self.output_dir} yet: starting from scratch")
            return
        batches_consumed = resume_position(
            checkpoint, self.config, self.unwrapped_model.config.class_names, self.accelerator.num_processes, report
        )
        restore_training_state(
            checkpoint,
            model=self.unwrapped_model,
            ema=self.ema,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            scaler=self.accelerator.scaler,
        )
        apply_optimizer_flags(
            checkpoint,
            self.config,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            ema=self.ema,
            report=report,
        )
        resume_notes(checkpoint, self.config, report)
        self._resumed_from = checkpoint.path
        self.step = checkpoint.step
        self.batches_consumed = batches_consumed
        self.images_skipped_before = int(checkpoint.state.get("images_skipped", 0))
        report(f"resumed from {checkpoint.path} at step {self.step}")


def _unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(x0, class ids or None, noise or None)`` of a batch from ``Trainer._batches``: a tensor, an ``(x0, labels)``
    pair, or a dict with ``x0``, ``noise`` and ``labels`` (reflow.py's (teacher sample, its noise) pairs)."""
    if isinstance(batch, dict):
        return batch["x0"], batch.get("labels"), batch.get("noise")
    if isinstance(batch, tuple):
        return batch[0], batch[1], None
    return batch, None, None


def lr_factor(step: int, schedule: str = "constant", warmup: int = 0, total: int = 1) -> float:
    """The learning rate's multiplier at optimizer step ``step`` (0-based): a linear warmup over ``warmup`` steps,
    then ``constant`` (1), ``cosine`` (``(1 + cos(pi p)) / 2``) or ``linear`` (``1 - p``) decay to 0 at ``total``
    steps (``p``: the share of the post-warmup steps done), or ``rsqrt`` (``sqrt(warmup / step)``), which decays
    without a known end, so an open-ended run can be stopped, resumed or extended at any step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "rsqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    if schedule in ("cosine", "linear"):
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * done)) if schedule == "cosine" else 1.0 - done
    return 1.0


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> int:
    return train_to_exit_status(lambda: Trainer(config_from_args(args)))


def train_to_exit_status(make_trainer: Callable[[], Trainer]) -> int:
    """Builds a trainer and trains it for a command (``train``, ``reflow``); returns the exit status: 0 done, 128 +
    the signal after a graceful stop, 1 a full disk, 3 a diverged loss (each said in one line)."""
    try:
        checkpoint = make_trainer().train()
    except TrainingInterrupted as stop:  # saved; the exit status says which signal
        return exit_status(stop)
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
        "train",
        help="train a LiquidDiffusion model with rectified flow",
        description="Train with rectified flow. Works the same under `accelerate launch` for several GPUs.",
    )
    add_config_flags(parser)
    offline = ADVICE["offline"]["cli"]
    parser.set_defaults(func=_run_train, offline_advice={"dataset": offline, "vae": offline})
