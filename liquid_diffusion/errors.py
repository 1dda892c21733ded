"""User-facing errors: what counts as the user's mistake, and the one-line checks and messages for it."""

from __future__ import annotations

import errno
import math
import os
import sys

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

# Exceptions that mean "the user asked for something that cannot be done", not "the program is broken": the command
# line prints them as one line (``error: ...``, exit status 2) instead of a traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
    ConnectionError,
)
# User errors that trying again cannot fix (a lost connection may come back).
PERMANENT_ERRORS = tuple(error for error in USER_ERRORS if error is not ConnectionError)

# Who reads the advice in messages: "cli" (the command line's flags, such as --dataset PATH) or "notebook" (the guided
# notebook's form fields and actions, such as DATASET = "custom"). The notebook's setup cell switches to "notebook".
AUDIENCES = ("cli", "notebook")
_audience = {"now": "cli"}
ADVICE = {
    "offline": {
        "cli": "to train without the Hub use --space pixel with a local image folder (--dataset PATH), or a local VAE "
        "folder (--vae PATH, written by AutoencoderKL.save_pretrained)",
        "notebook": 'to train without the Hub set DATASET = "custom" with CUSTOM_DATASET = a folder of images and '
        'SPACE = "pixel", or VAE = a local VAE folder (written by AutoencoderKL.save_pretrained)',
    },
    "inception_weights": {
        "cli": "or pass --inception-weights PATH",
        "notebook": "or set EVAL_EVERY = 0 to train without FID/KID",
    },
    "resume": {
        "cli": "continue with --resume latest",
        "notebook": "run the notebook again (Runtime -> Run all) to continue",
    },
    "resume_from": {
        "cli": "--resume {checkpoint}",
        "notebook": "delete the checkpoints after {checkpoint} in the run's folder, then run the notebook again",
    },
}
# The notebook's form field for a train option, where it has one (the others keep the command line's flag).
NOTEBOOK_FIELDS = {
    "dataset": "DATASET",
    "preset": "PRESET",
    "resolution": "RESOLUTION",
    "space": "SPACE",
    "steps": "STEPS",
    "batch_size": "BATCH_SIZE",
    "lr": "LEARNING_RATE",
    "sample_every": "SAMPLE_EVERY",
    "eval_every": "EVAL_EVERY",
    "cache_latents": "CACHE_LATENTS",
    "class_conditional": "CLASS_CONDITIONAL",
    "guidance_scale": "GUIDANCE_SCALE",
    "vae": "VAE",
    "report_to": "REPORT_TO",
    "gradient_checkpointing": "GRADIENT_CHECKPOINTING",
}


def set_audience(audience: str) -> None:
    """Words the advice of later messages for ``audience``: ``"cli"`` (the default) or ``"notebook"``."""
    if audience not in AUDIENCES:
        raise ValueError(f"audience must be one of {', '.join(AUDIENCES)}, got {audience!r}")
    _audience["now"] = audience


def audience() -> str:
    """Who reads the advice now: ``"cli"`` or ``"notebook"`` (``set_audience``)."""
    return _audience["now"]


def advice(key: str, **values) -> str:
    """The advice ``key`` (a key of ``ADVICE``) in the current audience's words, with ``values`` filled in."""
    text = ADVICE[key][_audience["now"]]
    return text.format(**values) if values else text


def option(name: str) -> str:
    """How the current audience sets the train option ``name``: the flag ``--name`` on the command line, the form
    field (``NOTEBOOK_FIELDS``) in the notebook, or the flag where the notebook has no field for it."""
    if _audience["now"] == "notebook" and name in NOTEBOOK_FIELDS:
        return NOTEBOOK_FIELDS[name]
    return f"--{name.replace('_', '-')}"


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached for what a run ``needs`` (``"dataset"`` or ``"vae"``).

    ``str()`` is ``reason`` plus ``advice`` (what to do, naming no command-line flag); the command line swaps the
    advice for its command's own (``offline_advice``), which names only flags that command has. Made from the
    message alone (as a DataLoader worker's error is made again in the main process) it is a plain ConnectionError."""

    def __init__(self, reason: str, needs: str | None = None, advice: str | None = None):
        super().__init__(f"{reason}; {advice}" if advice else reason)
        self.reason, self.needs = reason, needs


def offline_advice(error: BaseException, advice: dict[str, str] | None) -> str:
    """``error``'s message, with a ``HubUnreachableError``'s advice replaced by ``advice[error.needs]`` when the
    command gives one (``parser.set_defaults(offline_advice={"dataset": ..., "vae": ...})``)."""
    if isinstance(error, HubUnreachableError) and advice and error.needs in advice:
        return f"{error.reason}; {advice[error.needs]}"
    return str(error)


def check_not_a_file(path: str | os.PathLike, flag: str) -> None:
    """Raises a one-line NotADirectoryError when ``path`` (given as ``flag``, a folder to write) is an existing file."""
    if os.path.isfile(os.path.expanduser(path)):
        raise NotADirectoryError(
            f"{flag} {os.fspath(path)!r} is a file, not a folder; choose a folder (a new or existing directory) instead"
        )


class DiskFullError(OSError):
    """A file could not be written for want of space (``strerror``: one line saying what and what to do); nothing
    partial was left behind."""


def disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from) means no space left on the device or quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def report_failure(what: str, error: BaseException) -> int:
    """For trouble that is not the user's mistake (the network, the server, a download): prints ``error: WHAT failed:
    Type: first line`` and returns exit status 1. Re-raises user errors (``PERMANENT_ERRORS``, which the command line
    prints as one line with status 2) and, with ``LIQUID_DIFFUSION_DEBUG`` set, everything."""
    if isinstance(error, PERMANENT_ERRORS) or os.environ.get("LIQUID_DIFFUSION_DEBUG"):
        raise error
    print(f"error: {what} failed: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
    return 1


def check_number(options, name: str, minimum: float, inclusive: bool = True) -> None:
    """Raises a one-line ValueError naming the option (``option(name)``: the flag ``--name``) when ``options.<name>`` is not a finite number
    ``>= minimum`` (``> minimum`` when not ``inclusive``). ``options``: a config dataclass or argparse namespace."""
    value = getattr(options, name)
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= minimum if inclusive else value > minimum)
    )
    if not ok:
        relation = f"at least {minimum}" if inclusive else f"greater than {minimum}"
        raise ValueError(f"{option(name)} must be {relation}, got {value}")


def check_repo_id(repo_id: str) -> str:
    """Validates a Hub model repo id of the form ``USER/NAME``; raises ValueError with the rule it breaks."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form USER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id (USER/NAME): {error}") from None
    return repo_id
