"""Experiment tracking (``--report-to``): the run's metrics, sample grids and settings in TensorBoard and/or Weights &
Biases, through accelerate's trackers, as diffusers' training examples do.

What is sent, on the main process only:

* every numeric field of every ``metrics.jsonl`` record (``loss``, ``lr``, ``images_per_s``, ``grad_norm``, the
  validation and ``--eval-every`` KID/FID fields, whatever a record holds) as a scalar at the record's step; a list
  field such as ``loss_t_bins`` as one scalar per entry (``loss_t_bins/3``: the fourth tenth of t), a dict field as
  one per key; ``None``, strings and booleans are left out;
* each sample grid (``samples/step-N.png``) as the image ``samples`` at its step;
* the run's ``TrainConfig`` as hyper-parameters.

A resumed run continues the same curves: TensorBoard writes into the same folder, ``OUTPUT_DIR/logs/liquid-diffusion``,
and hides what an interrupted run logged past the checkpoint (``purge_step``); W&B continues the same run (its id is
kept in ``OUTPUT_DIR/logs/wandb-run-id``; it never takes a step twice, so what an interrupted run logged past the
checkpoint stays there until the resumed run passes it); records of steps up to the resumed one are not sent again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from .errors import option
from .metrics import TrainerCallback

REPORT_TO = ("none", "tensorboard", "wandb", "all")
TRACKERS = ("tensorboard", "wandb")
INSTALL_HINT = 'pip install "liquid-diffusion[tracking]"'
PROJECT_NAME = "liquid-diffusion"
LOGS_FOLDER = "logs"
WANDB_RUN_ID_FILE = "wandb-run-id"


def trackers(report_to: str) -> list[str]:
    """The trackers ``--report-to`` names: none, one, or (``all``) both."""
    if report_to not in REPORT_TO:
        raise ValueError(f"{option('report_to')} must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    return list(TRACKERS) if report_to == "all" else [] if report_to == "none" else [report_to]


def check_report_to(report_to: str) -> None:
    """Refuses in one line, before anything is loaded, a tracker whose package is missing, and W&B without a login
    (or offline mode): training would otherwise fail, or wait for a login prompt, only once it starts."""
    for name in trackers(report_to):
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"{option('report_to')} {report_to} needs the {name} package: {INSTALL_HINT}")
    if "wandb" in trackers(report_to) and not _wandb_can_log():
        raise ValueError(
            f"{option('report_to')} wandb: not logged in to Weights & Biases; run `wandb login` (or set "
            "WANDB_API_KEY), or log offline with WANDB_MODE=offline (upload later with `wandb sync`)"
        )


def _wandb_can_log() -> bool:
    """Whether wandb would start without asking for a key: offline or disabled, or a key in the environment or in
    the netrc file ``wandb login`` writes."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def accelerator_kwargs(report_to: str, output_dir: Path) -> dict:
    """``Accelerator`` keywords for ``--report-to``: the trackers and, for TensorBoard, ``OUTPUT_DIR/logs``."""
    names = trackers(report_to)
    return dict(log_with=names, project_dir=str(output_dir / LOGS_FOLDER)) if names else {}


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a metrics record, flat (``step`` itself excluded): lists and dicts one entry each."""
    flat = {}

    def add(key: str, value) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            flat[key] = float(value)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                add(f"{key}/{i}", item)
        elif isinstance(value, dict):
            for name, item in value.items():
                add(f"{key}/{name}", item)

    for key, value in record.items():
        if key != "step":
            add(key, value)
    return flat


def hyperparameters(config) -> dict:
    """A ``TrainConfig`` as tracker hyper-parameters: bools, numbers and strings, ``None`` as ``"none"``."""
    return {
        k: "none" if v is None else v if isinstance(v, (bool, int, float, str)) else str(v)
        for k, v in dataclasses.asdict(config).items()
    }


class ExperimentTracker(TrainerCallback):
    """Starts the ``--report-to`` trackers for a trainer that has resumed to ``trainer.step``, and sends them every
    record and sample grid of later steps. The trainer makes it on the main process only and calls ``finish`` at the
    end of training."""

    def __init__(self, trainer):
        self.accelerator, self.start_step = trainer.accelerator, trainer.step
        names = trackers(trainer.config.report_to)
        logs = trainer.output_dir / LOGS_FOLDER
        init_kwargs = {}
        if "tensorboard" in names:  # hide what an interrupted run logged past the checkpoint it resumes
            init_kwargs["tensorboard"] = {"purge_step": self.start_step + 1} if self.start_step else {}
        if "wandb" in names:
            init_kwargs["wandb"] = dict(
                id=_wandb_run_id(logs), resume="allow", dir=str(logs), name=trainer.output_dir.name
            )
        self.accelerator.init_trackers(PROJECT_NAME, config=hyperparameters(trainer.config), init_kwargs=init_kwargs)

    def on_log(self, trainer, record: dict) -> None:
        if record["step"] > self.start_step:
            self.accelerator.log(scalars(record), step=record["step"])

    def on_eval(self, trainer, record: dict) -> None:
        self.on_log(trainer, record)

    def on_validation(self, trainer, record: dict) -> None:
        self.on_log(trainer, record)

    def on_sample(self, trainer, step: int, path: Path) -> None:
        if step <= self.start_step:
            return
        grid = np.asarray(Image.open(path).convert("RGB"))
        if _has(self.accelerator, "tensorboard"):
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("samples", grid, step, dataformats="HWC")
            writer.flush()
        if _has(self.accelerator, "wandb"):
            import wandb

            self.accelerator.get_tracker("wandb", unwrap=True).log({"samples": wandb.Image(grid)}, step=step)

    def finish(self) -> None:
        """Closes the trackers (not ``Accelerator.end_training``, which would also end the process group)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _has(accelerator, name: str) -> bool:
    return any(tracker.name == name for tracker in accelerator.trackers)


def _wandb_run_id(logs: Path) -> str:
    """The W&B run id of this output folder, made up and written down by its first run, so a resume continues it."""
    path = logs / WANDB_RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    logs.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id
