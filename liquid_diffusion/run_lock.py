"""One training run per output folder: a lock on ``OUTPUT_DIR/.liquid-diffusion.lock`` held for the whole run.

Two runs writing one folder drop each other's metrics and prune each other's checkpoints, so the second live run is
refused in one line naming the holder (pid and host). The lock is an ``flock`` on the file, which the kernel drops
when its process ends however it ends (``kill -9`` included): a dead run never blocks the next one. The file itself
stays (it only records who holds the lock while it is held). On a file system without ``flock`` (some network and
FUSE mounts), the run says so in one line and goes on unguarded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoints import CHECKPOINT_PATTERN, list_checkpoints

try:
    import fcntl
except ImportError:  # Windows: filelock's msvcrt lock does the same job, without the holder's name
    fcntl = None

LOCK_FILE = ".liquid-diffusion.lock"


class OutputDirInUseError(FileExistsError):
    """Another live run holds the output folder's lock; the message names it."""


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that did not say who it is"


class RunLock:
    """``with RunLock(output_dir):`` holds the folder's lock (``OutputDirInUseError`` when another run has it)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None
        self._fallback = None

    def acquire(self) -> RunLock:
        if fcntl is None:
            from filelock import FileLock, Timeout

            self._fallback = FileLock(str(self.path), timeout=0)
            try:
                self._fallback.acquire()
            except Timeout:
                raise self._busy("another process") from None
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise self._busy(_holder(text)) from None
        except OSError as error:  # no flock here (some network / FUSE file systems): run, but say so
            os.close(fd)
            print(
                f"note: cannot lock {self.output_dir} ({error.strerror or error}): nothing stops a second run "
                "from writing into it at the same time",
                file=sys.stderr,
            )
            return self
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        self._fd = fd
        return self

    def _busy(self, holder: str) -> OutputDirInUseError:
        return OutputDirInUseError(
            f"--output-dir {str(self.output_dir)!r} is in use by another training run "
            f"({holder}); wait for it to end or stop it, or pick another --output-dir"
        )

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._fallback is not None:
            self._fallback.release()
            self._fallback = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim_output_dir(
    output_dir: str | os.PathLike,
    *,
    resume: str | None,
    overwrite: bool,
    delete: bool,
    report: Callable[[str], None] = print,
) -> None:
    """A fresh run (no ``resume``) in a folder that already holds a run's checkpoints is refused in one line
    (``FileExistsError``) unless ``overwrite``; with it, ``delete`` (the main process) removes that run's
    checkpoints, metrics, sample grids and ``best.json`` first, so nothing of it is taken for this run's."""
    output_dir = Path(output_dir)
    if resume or not list_checkpoints(output_dir):
        return
    if not overwrite:
        newest = list_checkpoints(output_dir)[-1].name
        raise FileExistsError(
            f"--output-dir {str(output_dir)!r} already holds a run (newest: {newest}); continue it "
            "with --resume, start over there with --overwrite (deletes that run), or pick another "
            "--output-dir"
        )
    if not delete:
        return
    old = [p for p in output_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(output_dir / "samples", ignore_errors=True)
    for name in ("metrics.jsonl", "best.json"):
        (output_dir / name).unlink(missing_ok=True)
    report(
        f"note: --overwrite: deleted the earlier run in {output_dir} ({len(old)} checkpoint(s), its metrics, "
        "sample grids and best.json)"
    )
