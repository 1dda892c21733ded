"""Training checkpoints on disk: the one place that writes, lists, finds, verifies and reads them.

Layout of ``OUTPUT_DIR/checkpoint-NNNNNN/``::

    unet/                 config.json + diffusion_pytorch_model.safetensors (raw weights)
    unet_ema/             the same for the EMA weights (a model folder, as `LiquidDiffusionUNet.from_pretrained` reads)
    training_state.pt     optimizer, lr scheduler, loss scaler, EMA counters, RNG (loads with weights_only=True)
    train_config.json     the run's TrainConfig
    state.json            step, data position, number of processes, images skipped

A checkpoint is written into a hidden ``.tmp-checkpoint-NNNNNN-PID`` folder and renamed into place only when every
file is complete, so a kill in mid-save never leaves a half-written ``checkpoint-NNNNNN``. A failed save (a full
disk, say) removes its temporary folder and keeps the previous checkpoints. Reading verifies every file, so a
checkpoint damaged after the fact (a truncated upload, a disk error) is reported by name and resume falls back to
the newest intact one.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import DiskFullError, advice, disk_full, first_line
from .model import check_format

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
UNET_FOLDERS = ("unet", "unet_ema")


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing or unreadable; the message names the file."""


class CheckpointWriteError(DiskFullError):
    """A checkpoint could not be written (for example: no space left on device); nothing partial was left."""


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:06d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The N of a ``checkpoint-N`` folder name (``None`` for other names)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints (``checkpoint-NNNNNN`` with a ``state.json``) in ``output_dir``, oldest first.

    Cheap (no file is read): use ``read_checkpoint`` or ``newest_intact`` to know that the files are sound.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (step, p)
        for p in output_dir.iterdir()
        if (step := checkpoint_step(p)) is not None and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def has_unet_weights(folder: Path) -> bool:
    """``folder`` holds a saved U-Net: ``config.json`` and the safetensors weights (cheap: nothing is read)."""
    return (folder / "config.json").is_file() and (folder / WEIGHTS_NAME).is_file()


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint the trainer finished writing: ``state.json``, ``train_config.json`` and ``unet/`` (and
    ``unet_ema/`` when present) with their weights. Cheap (nothing is read): ``read_checkpoint`` verifies the files."""
    path = Path(path)
    if not (
        (path / "state.json").is_file() and (path / "train_config.json").is_file() and has_unet_weights(path / "unet")
    ):
        return False
    return not (path / "unet_ema").exists() or has_unet_weights(path / "unet_ema")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Returns ``path`` if it is a complete checkpoint, else the newest ``checkpoint-NNNNNN`` in it whose weights read
    back (each damaged newer one is passed over with a one-line warning).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no complete checkpoint.
        CorruptCheckpointError: every complete checkpoint in ``path`` is damaged.
        NotADirectoryError: ``path`` is a file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint path {str(path)!r} is a file, not a checkpoint directory")
    if is_complete_checkpoint(path):
        return path
    candidates = sorted(
        ((step, p) for p in path.iterdir() if (step := checkpoint_step(p)) is not None and p.is_dir()), reverse=True
    )
    damaged = []
    for _, candidate in candidates:  # the newest whose files read back, as `train --resume` takes
        if is_complete_checkpoint(candidate):
            try:
                read_checkpoint(candidate, with_training_state=False)
                return candidate
            except CorruptCheckpointError as error:
                damaged.append(str(error))
                print(f"warning: skipping damaged {candidate.name}: {error}", file=sys.stderr)
    if damaged:
        raise CorruptCheckpointError(f"no intact checkpoint in {str(path)!r}: {damaged[0]}")
    if candidates:
        raise FileNotFoundError(
            f"{str(path)!r} holds {len(candidates)} checkpoint-NNNNNN folder(s) but none is complete "
            "(state.json, train_config.json and unet/ with safetensors weights)"
        )
    raise FileNotFoundError(
        f"{str(path)!r} is not a LiquidDiffusion checkpoint (no state.json + unet/) and holds no checkpoint-NNNNNN"
    )


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Removes the ``.tmp-checkpoint-*`` folders that killed saves left in ``output_dir``; returns them.

    Call it once at the start of a run, on the main process only, before that run saves anything.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    stale = [p for p in output_dir.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_checkpoint(output_dir: str | os.PathLike, step: int, fill: Callable[[Path], None]) -> Path:
    """Creates ``checkpoint-NNNNNN`` atomically: ``fill(folder)`` writes every file into a temporary folder, which is
    then renamed into place (replacing an older save of the same step only once the new one is complete).

    Raises:
        CheckpointWriteError: the disk is full (one line, saying so); the temporary folder is removed.
        Any other error of ``fill``, after removing the temporary folder.
    """
    final = checkpoint_path(output_dir, step)
    tmp = Path(output_dir) / f"{TMP_PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if final.exists():  # the same step saved again (interrupted right after a save): swap, then delete
            old = tmp.with_name(tmp.name + "-replaced")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(error):
            raise CheckpointWriteError(
                errno.ENOSPC,
                f"no space left on device while saving {final.name}; free space and {advice('resume')} "
                f"(the earlier checkpoints in {str(output_dir)!r} are intact)",
            ) from None
        raise
    return final


def save_torch(obj, path: Path) -> None:
    """``torch.save`` through a Python file object, so that a write error is an ``OSError`` with its errno."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def rng_state() -> dict:
    """The global torch, CUDA and Python RNG states (what ``set_rng_state`` restores on resume)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fill_checkpoint(
    folder: Path, *, model, ema, optimizer, lr_scheduler, scaler, train_config: dict, state: dict
) -> None:
    """Writes every file of the layout above into ``folder`` (the ``fill`` of ``write_checkpoint``).

    ``model``: the bare ``LiquidDiffusionUNet``; ``ema``: its ``diffusers.training_utils.EMAModel``. The EMA weights
    are saved through ``model`` itself (swapped in, then the training weights are put back exactly), so no second
    model is built; ``EMAModel.save_pretrained`` is not used because it writes the EMA counters into the model's
    ``config.json``, which every loader of ``unet_ema/`` would then warn about. The counters go to
    ``training_state.pt`` (``EMAModel.state_dict`` without the weights).
    """
    model.save_pretrained(folder / "unet", safe_serialization=True)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        model.save_pretrained(folder / "unet_ema", safe_serialization=True)
    finally:
        ema.restore(model.parameters())
    save_torch(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": {k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
            "rng": rng_state(),
        },
        folder / "training_state.pt",
    )
    (folder / "train_config.json").write_text(json.dumps(train_config, indent=2))
    (folder / "state.json").write_text(json.dumps(state, indent=2))


# ----------------------------------------------------------------------------------------------------------------
# Reading and verifying
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, read and verified.

    ``unet`` and ``unet_ema`` are ``(config, state_dict)`` pairs; ``unet_ema`` is ``None`` when the checkpoint has no
    EMA weights; ``training`` is the ``training_state.pt`` dict (``None`` when ``with_training_state=False``)."""

    path: Path
    step: int
    state: dict
    train_config: dict
    unet: tuple[dict, dict]
    unet_ema: tuple[dict, dict] | None
    training: dict | None


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; a missing or unreadable file is a ``CorruptCheckpointError`` naming it."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing") from None
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path} is unreadable ({first_line(error)})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{path} is unreadable (not a JSON object)")
    return value


def read_unet_folder(folder: Path) -> tuple[dict, dict]:
    """``(config, state_dict)`` of a ``save_pretrained`` folder, read from local files only (never the Hub)."""
    config = read_json(folder / "config.json")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CorruptCheckpointError(f"{weights} is missing")
    try:
        state_dict = load_file(weights)
    except Exception as error:  # noqa: BLE001 -- truncated or garbage safetensors: name the file
        raise CorruptCheckpointError(f"{weights} is unreadable ({first_line(error)})") from None
    return config, state_dict


def read_checkpoint(path: str | os.PathLike, with_training_state: bool = True) -> Checkpoint:
    """Reads and verifies every file of the checkpoint at ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: a file is missing or unreadable (the message names it).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass a checkpoint-NNNNNN folder or --resume latest"
        )
    state = read_json(path / "state.json")
    train_config = read_json(path / "train_config.json")
    unet = read_unet_folder(path / "unet")
    unet_ema = read_unet_folder(path / "unet_ema") if (path / "unet_ema").exists() else None
    training = None
    if with_training_state:
        training_path = path / "training_state.pt"
        if not training_path.is_file():
            raise CorruptCheckpointError(f"{training_path} is missing")
        try:
            training = torch.load(training_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 -- truncated or garbage pickle: name the file
            raise CorruptCheckpointError(f"{training_path} is unreadable ({first_line(error)})") from None
    if "step" not in state:
        raise CorruptCheckpointError(f"{path / 'state.json'} has no 'step'")
    return Checkpoint(path, int(state["step"]), state, train_config, unet, unet_ema, training)


def newest_intact(
    output_dir: str | os.PathLike, report: Callable[[str], None] = print, with_training_state: bool = True
) -> Checkpoint | None:
    """The newest checkpoint in ``output_dir`` whose files all read back; each damaged newer one is reported in one
    line (``report``) naming the bad file. ``None`` when there is no checkpoint at all.

    Raises:
        CorruptCheckpointError: there are checkpoints, but none is intact.
    """
    checkpoints = list_checkpoints(output_dir)
    problems = []
    for path in reversed(checkpoints):
        try:
            return read_checkpoint(path, with_training_state)
        except CorruptCheckpointError as error:
            problems.append(str(error))
            report(f"warning: skipping damaged {path.name}: {error}")
    if problems:
        raise CorruptCheckpointError(
            f"no intact checkpoint in {str(output_dir)!r}: {problems[0]} (and "
            f"{len(problems) - 1} more); start a new run with another --output-dir"
        )
    return None


def restore_training_state(checkpoint: Checkpoint, *, model, ema, optimizer, lr_scheduler, scaler) -> None:
    """Loads the weights, EMA, optimizer, lr scheduler, loss scaler and RNG of a ``fill_checkpoint`` checkpoint (read
    with ``read_checkpoint``) into the live objects, bit-exactly (one without ``unet_ema/`` restarts the EMA from
    the raw weights).

    Raises:
        ValueError: the weights are of another architecture version or do not fit ``model`` (one line: the format
            changed).
    """
    device = next(model.parameters()).device
    try:
        check_format(checkpoint.unet[0])
    except ValueError as error:
        raise ValueError(
            f"cannot resume {checkpoint.path}: {error}; or start a new run with another --output-dir"
        ) from None
    training = checkpoint.training
    try:
        model.load_state_dict(checkpoint.unet[1])
        ema_weights = (checkpoint.unet_ema or checkpoint.unet)[1]
        shadow = [ema_weights[name].to(device) for name, _ in model.named_parameters()]
    except (RuntimeError, KeyError, ValueError) as error:
        raise ValueError(
            f"cannot resume {checkpoint.path}: its weights do not fit this version of LiquidDiffusion's "
            f"{checkpoint.train_config.get('preset')} model (the format changed: "
            f"{first_line(error)}); start a new run with another --output-dir"
        ) from None
    ema.load_state_dict({**training["ema"], "shadow_params": shadow})
    optimizer.load_state_dict(training["optimizer"])
    lr_scheduler.load_state_dict(training["lr_scheduler"])
    if training["scaler"] is not None and scaler is not None:
        scaler.load_state_dict(training["scaler"])
    set_rng_state(training["rng"])
