"""What a training run reports: ``metrics.jsonl`` records, the interval statistics they are made of, and the
callbacks that receive them.

Every ``log_every`` steps the trainer appends one JSON object (a line) to ``OUTPUT_DIR/metrics.jsonl``: ``step``,
``loss`` (mean flow loss of the interval's finite samples, over all processes), ``lr``, ``images_per_s``,
``grad_norm`` (mean over the interval), ``loss_t_bins`` (the mean loss in each tenth of t in [0, 1], ``null`` where
no sample fell), ``images_skipped`` (undecodable images so far) and, when fp16 loss scaling skipped steps,
``skipped_nonfinite``.

Every ``validation_every`` steps and at the end, a record with ``val_loss`` (EMA weights), ``val_loss_raw``,
``val_loss_t`` and ``val_loss_raw_t`` (per t of the fixed grid) on the held-out images (see ``validation.py``).

``--eval-every`` appends records with ``kid``/``fid`` (see ``evaluate.py``) to the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

if TYPE_CHECKING:  # only for annotations: the trainer imports this module
    from .trainer import Trainer

METRICS_FILE = "metrics.jsonl"
NUM_T_BINS = 10


class TrainerCallback:
    """Hooks for the notebook (or any caller); every method is optional."""

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """Called on the main process after each metrics record is written."""

    def on_sample(self, trainer: Trainer, step: int, path: Path) -> None:
        """Called on the main process after a sample grid is written."""

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        """Called on the main process after a checkpoint is complete."""

    def on_validation(self, trainer: Trainer, record: dict) -> None:
        """Called on the main process after each validation (``record``: step, val_loss, val_loss_raw, ...)."""

    def on_eval(self, trainer: Trainer, record: dict) -> None:
        """Called on the main process after an ``--eval-every`` evaluation (``record``: step, kid, fid, ...)."""


def append_record(output_dir: str | os.PathLike, record: dict) -> None:
    """Appends ``record`` as one line to ``OUTPUT_DIR/metrics.jsonl``."""
    with open(Path(output_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> int:
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


class IntervalStats:
    """Device-side accumulators for one logging interval (no host sync until ``reduce``)."""

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
            "loss_sum": self.loss_sum,
            "count": self.count,
            "grad_norm_sum": self.grad_norm_sum,
            "grad_norm_count": self.grad_norm_count,
            "nonfinite": self.nonfinite,
            "micro_batches": torch.tensor(float(self.micro_batches), device=device),
            "images_skipped": torch.tensor(float(images_skipped), device=device),
            "bin_sum": self.bin_sum,
            "bin_count": self.bin_count,
            "first_bad_step": self.first_bad_step,
        }
        return {k: v.reshape(1, -1) for k, v in fields.items()}

    def reduce(self, accelerator: Accelerator, images_skipped: int) -> dict[str, list[float]]:
        """Every accumulator over all processes: sums, except ``first_bad_step`` (the earliest); host values."""
        gathered = accelerator.gather(self.fields(images_skipped))  # [processes, n] each
        return {k: (v.min(0).values if k == "first_bad_step" else v.sum(0)).cpu().tolist() for k, v in gathered.items()}

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
