"""User-facing errors: what counts as the user's mistake, and the one-line checks and messages for it."""

from __future__ import annotations

import math

# Exceptions that mean "the user asked for something that cannot be done", not "the program is broken": the command
# line prints them as one line (``error: ...``, exit status 2) instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError,
               ConnectionError)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_number(options, name: str, minimum: float, inclusive: bool = True) -> None:
    """Raises a one-line ValueError naming the flag ``--name`` when ``options.<name>`` is not a finite number
    ``>= minimum`` (``> minimum`` when not ``inclusive``). ``options``: a config dataclass or argparse namespace."""
    value = getattr(options, name)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= minimum if inclusive else value > minimum))
    if not ok:
        relation = f"at least {minimum}" if inclusive else f"greater than {minimum}"
        raise ValueError(f"--{name.replace('_', '-')} must be {relation}, got {value}")
