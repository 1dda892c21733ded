"""How a training run stops early: on a signal, after finishing its step and saving a checkpoint, or when the loss
diverges. With several processes, every one stops at the same step."""

from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C, SIGTERM, SIGHUP) after saving a checkpoint; ``args[0]`` names it."""


class GracefulStop:
    """The first SIGINT (Ctrl-C), SIGTERM or SIGHUP -- what Colab, Slurm and Kubernetes send before they kill a job --
    only records its name in ``requested``, so the loop finishes its step, saves a checkpoint and exits. A second
    Ctrl-C interrupts at once. Outside the main thread it does nothing."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __enter__(self) -> "GracefulStop":
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
