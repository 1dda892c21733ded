"""How a training run stops early: on a signal, after finishing its step and saving a checkpoint, or when the loss
diverges. With several processes, every one stops at the same step."""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


class LossExplodedError(NonFiniteLossError):
    """Training diverged: the loss is finite but exploded (``DivergenceCheck``)."""


class DivergenceCheck:
    """Finite divergence: a too-high learning rate can drive the loss to 1e4..1e9 without ever reaching inf.

    A logged loss above ``FACTOR`` times the median of the losses logged before it (or above ``LIMIT``: the flow loss
    of a model that predicts nothing at all is about 2) has exploded. ``healthy_step`` is the last logged step whose
    loss was within ``HEALTHY`` times that median: the checkpoints up to it are the ones to resume from (the trainer
    never prunes the newest of them)."""

    FACTOR, HEALTHY, LIMIT = 100.0, 10.0, 1e4

    def __init__(self):
        self.losses: list[float] = []  # sorted
        self.healthy_step: int | None = None

    def seed(self, metrics_path: Path) -> None:
        """Takes the losses a resumed run logged before (``metrics.jsonl``, already cut at the resumed step)."""
        try:
            lines = metrics_path.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                record = json.loads(line)
                self.exploded(int(record["step"]), float(record["loss"]))
            except (ValueError, KeyError, TypeError):
                continue  # eval records, a line cut short

    @property
    def median(self) -> float | None:
        return self.losses[len(self.losses) // 2] if self.losses else None

    def exploded(self, step: int, loss: float) -> bool:
        if not math.isfinite(loss):
            return False  # NaN/inf: the trainer's own check says so
        median = self.median
        if loss > self.LIMIT or (median is not None and loss > self.FACTOR * median):
            return True
        if median is None or loss <= self.HEALTHY * median:
            self.healthy_step = step
        bisect.insort(self.losses, loss)
        return False


class StopRequested(BaseException):
    """A stop signal interrupted ``GracefulStop.interruptible`` work; a ``BaseException`` so that no ``except
    Exception`` on the way (a skipped corrupt image, say) swallows it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C, SIGTERM, SIGHUP) after saving a checkpoint; ``args[0]`` names it."""


class GracefulStop:
    """The first SIGINT (Ctrl-C), SIGTERM or SIGHUP -- what Colab, Slurm and Kubernetes send before they kill a job --
    only records its name in ``requested``, so the loop finishes its step, saves a checkpoint and exits. A second
    Ctrl-C interrupts at once. Outside the main thread it does nothing."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __enter__(self) -> GracefulStop:
        self.requested: str | None = None
        self._interruptible = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(signum).name
        if self._interruptible:
            self._interruptible = False
            raise StopRequested(self.requested)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside, a stop signal (or one that came before) raises ``StopRequested`` at once: for work that only
        gives feedback, such as an in-training evaluation, which must not hold up the save a preempted job waits
        for (its grace period is short)."""
        if self.requested is not None:
            raise StopRequested(self.requested)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def any_process(accelerator: Accelerator, requested: bool) -> bool:
    """Whether any process asked to stop: with several processes, every one gets the same answer at the same step
    (one tiny all-reduce per call; a single process needs none)."""
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor(float(requested), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


def exit_status(stop: TrainingInterrupted) -> int:
    """The command line's exit status after a graceful stop: 128 + the signal's number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + getattr(signal, stop.args[0], signal.SIGINT) if stop.args else 130
