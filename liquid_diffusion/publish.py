"""Publishing to the Hugging Face Hub: push an export (``export.py`` writes it) from the command line, a notebook,
or in the background during training.

1. Pushing    -- ``check_can_push`` (before any work), ``push_to_hub`` (export to a temporary folder, upload it) and
                 ``HubPusher`` (the same on one background worker, for training).
2. CLI        -- the ``push`` sub-command.

Only the trainer and the command line import this module; loading from the Hub is ``hub.py``'s. Hub errors a user
can fix (no token, no write access, a bad id) become one-line PermissionError / ValueError that say what to do. The
Hub token is passed to ``HfApi`` and nowhere else (never logged, printed or written into the exported folder).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

from huggingface_hub import HfApi, get_token

from .checkpoints import find_checkpoint, read_json
from .errors import PERMANENT_ERRORS, check_repo_id, first_line, report_failure
from .export import export_checkpoint, is_exported_pipeline
from .hub import LOGIN_HINT, friendly_hub_error
from .model_card import latest_sample_grid

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# 1. Pushing
# ----------------------------------------------------------------------------------------------------------------


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """Validates ``repo_id`` and that a Hub token is at hand (given, logged in, or HF_TOKEN), before any work is done.

    Raises ValueError (bad repo id) or PermissionError ("not logged in", with how to log in).
    """
    check_repo_id(repo_id)
    if not (token or get_token()):
        raise PermissionError(
            f"not logged in to the Hugging Face Hub, so nothing can be pushed to {repo_id!r}: {LOGIN_HINT}"
        )
    return repo_id


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Creates ``repo_id`` if needed (``exist_ok``) and uploads ``folder`` as one commit; returns the repo URL.

    Raises PermissionError (no/invalid token, no write access), ValueError (bad repo id); other Hub or network
    errors propagate unchanged.
    """
    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=Path(folder),
            commit_message=commit_message or "Upload LiquidDiffusion pipeline",
        )
    except Exception as error:  # noqa: BLE001 -- mapped to a user-facing error or re-raised unchanged
        friendly = friendly_hub_error(error, repo_id)
        if friendly is error:
            raise
        raise friendly from error
    return str(url)


def push_to_hub(
    checkpoint: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Exports ``checkpoint`` (a checkpoint or output dir) to a temporary folder and uploads it to ``repo_id``; an
    exported pipeline folder (``export``'s, or reflow's ``OUTPUT_DIR/pipeline``) is uploaded as it is.

    Returns the repo URL. Raises PermissionError with how to log in for a missing/invalid token or a repo without
    write access, ValueError for a bad repo id, FileNotFoundError for a missing checkpoint.
    """
    check_can_push(repo_id, token)
    if is_exported_pipeline(checkpoint):  # already the folder a Hub repo holds: published unchanged
        folder = Path(checkpoint).expanduser()
        url = upload_folder(
            folder,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message or f"LiquidDiffusion pipeline {folder.name}",
        )
        logger.info("pushed %s to %s", folder, url)
        return url
    checkpoint = find_checkpoint(checkpoint)
    if commit_message is None:
        step = read_json(checkpoint / "state.json").get("step", "?")
        preset = read_json(checkpoint / "train_config.json").get("preset", "")
        commit_message = f"LiquidDiffusion {preset} checkpoint at step {step}".replace("  ", " ")
    with tempfile.TemporaryDirectory(prefix="liquid-diffusion-export-") as tmp:
        folder = export_checkpoint(checkpoint, Path(tmp) / "export", repo_id=repo_id, token=token)
        url = upload_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)
    logger.info("pushed %s to %s", checkpoint.name, url)
    return url


class HubPusher:
    """Pushes checkpoints to the Hub on one background worker, so training never waits for an upload.

    ``push(checkpoint_dir)`` returns at once: it hard-links the checkpoint's files into a private staging folder (so
    the trainer may prune the checkpoint meanwhile) and hands it to a single-worker ``ThreadPoolExecutor`` that
    exports and uploads. If checkpoints arrive faster than uploads finish, a push still waiting is cancelled by the
    next one: only the newest is pushed. A failed upload is retried ``max_attempts`` times in all with exponential
    backoff (``backoff_s``, doubled each time); errors a retry cannot fix (no token, no write access, bad repo id)
    fail at once. Failures are logged and passed to ``on_failure``; nothing is ever raised into the caller. Call
    ``close()`` (or ``wait()``) at the end of training; an upload still running when a ``close(timeout)`` gives up
    finishes before the interpreter exits.

    Why its own worker and not ``HfApi.upload_folder(..., run_as_future=True)``: that runs one upload call on the
    ``HfApi``'s single-worker pool, while a push here is a sequence -- export (reads and rewrites the weights and the
    model card: seconds to minutes, never on the training thread), create the repo, upload, retry with backoff,
    remove the staging folder, report -- so the export would need a worker of its own anyway; a superseded push must
    be cancelled before its export, not after; and ``HfApi``'s pool can be neither named nor shut down (``close``).

    Args:
        repo_id: ``USER/NAME`` (validated here: a ValueError at construction, before training starts).
        private: create the repo as private (an existing repo keeps its visibility).
        token: Hub token; ``None`` uses the logged-in token or HF_TOKEN. Kept in memory only.
        max_attempts: uploads tried per checkpoint (>= 1).
        backoff_s: seconds before the first retry.
        on_success: ``callback(checkpoint_dir: Path, url: str)``.
        on_failure: ``callback(checkpoint_dir: Path, error: BaseException)`` after the last failed attempt.
    """

    def __init__(
        self,
        repo_id: str,
        private: bool = False,
        token: str | None = None,
        *,
        max_attempts: int = 3,
        backoff_s: float = 30.0,
        on_success: Callable[[Path, str], None] | None = None,
        on_failure: Callable[[Path, BaseException], None] | None = None,
    ):
        self.repo_id = check_can_push(repo_id, token)
        self.private = private
        self._token = token
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_s = backoff_s
        self.on_success = on_success
        self.on_failure = on_failure
        self.pushed: list[tuple[Path, str]] = []  # (checkpoint, url) per successful push
        self.failures: list[tuple[Path, BaseException]] = []
        self._executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="liquid-diffusion-hub-push")
        self._newest: tuple[futures.Future, Path, Path | None] | None = None  # (future, checkpoint, staging folder)
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:  # never shows the token
        return f"HubPusher(repo_id={self.repo_id!r}, private={self.private})"

    @property
    def last_error(self) -> BaseException | None:
        return self.failures[-1][1] if self.failures else None

    def push(self, checkpoint_dir: str | os.PathLike) -> None:
        """Queues ``checkpoint_dir`` for export + upload and returns immediately. Never raises."""
        if self._closed:
            logger.warning("HubPusher is closed; not pushing %s", checkpoint_dir)
            return
        try:
            checkpoint = find_checkpoint(checkpoint_dir)
            staging = _stage(checkpoint)
            with self._lock:
                if self._newest is not None and self._newest[0].cancel():  # still waiting: superseded
                    logger.info("Hub push of %s skipped: superseded by %s", self._newest[1].name, checkpoint.name)
                    _remove(self._newest[2])
                self._newest = (self._executor.submit(self._push, checkpoint, staging), checkpoint, staging)
        except Exception as error:  # noqa: BLE001 -- never into training
            logger.error("could not queue Hub push of %s: %s", checkpoint_dir, error)
            self._report(self.on_failure, self.failures, Path(checkpoint_dir), error)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every queued push finished (or failed); False if ``timeout`` seconds passed first."""
        newest = self._newest
        # one worker runs the pushes in order, so the newest one done means all are
        return newest is None or not futures.wait([newest[0]], timeout).not_done

    def close(self, timeout: float | None = None) -> bool:
        """Waits for queued pushes (see ``wait``), then stops the worker. Further ``push`` calls are ignored."""
        done = self.wait(timeout)
        self._closed = True
        self._executor.shutdown(wait=done)
        return done

    def __enter__(self) -> HubPusher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _push(self, checkpoint: Path, staging: Path | None) -> None:
        """The worker's job: push with retries, report the outcome, remove the staging folder."""
        try:
            url = self._push_with_retries(staging or checkpoint, checkpoint.name)
        except Exception as error:  # noqa: BLE001 -- reported, never raised into training
            self._report(self.on_failure, self.failures, checkpoint, error)
        else:
            logger.info("pushed %s to %s", checkpoint.name, url)
            self._report(self.on_success, self.pushed, checkpoint, url)
        finally:
            _remove(staging)

    def _push_with_retries(self, source: Path, name: str) -> str:
        """``push_to_hub`` of ``source``; returns the repo URL or raises the last error."""
        for attempt in itertools.count(1):
            try:
                return push_to_hub(source, self.repo_id, private=self.private, token=self._token)
            except PERMANENT_ERRORS as error:
                logger.error("Hub push of %s to %s failed: %s", name, self.repo_id, error)
                raise
            except Exception as error:  # noqa: BLE001 -- network, server: retry
                reason = f"{type(error).__name__}: {first_line(error)}"
                if attempt == self.max_attempts:
                    logger.error(
                        "Hub push of %s to %s failed after %d attempts: %s", name, self.repo_id, attempt, reason
                    )
                    raise
                delay = self.backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "Hub push of %s failed (attempt %d/%d: %s); retrying in %.0f s",
                    name,
                    attempt,
                    self.max_attempts,
                    reason,
                    delay,
                )
                time.sleep(delay)

    @staticmethod
    def _report(callback: Callable | None, record: list, checkpoint: Path, outcome) -> None:
        record.append((checkpoint, outcome))
        if callback is not None:
            try:
                callback(checkpoint, outcome)
            except Exception:  # noqa: BLE001
                logger.exception("HubPusher callback %s failed", getattr(callback, "__name__", callback))


def _stage(checkpoint: Path) -> Path | None:
    """Hard-links (or copies) what an export reads into ``<output_dir>/.hub-push-XXXX/`` so the push survives
    checkpoint pruning; returns the staged checkpoint, or None to export from the original folder."""
    root = None
    try:
        root = Path(tempfile.mkdtemp(prefix=".hub-push-", dir=checkpoint.parent))
        staged = root / checkpoint.name
        for sub in ("unet", "unet_ema"):
            if (checkpoint / sub).is_dir():
                shutil.copytree(checkpoint / sub, staged / sub, copy_function=_link_or_copy)
        for name in ("train_config.json", "state.json"):
            shutil.copyfile(checkpoint / name, staged / name)
        if (checkpoint.parent / "metrics.jsonl").is_file():
            shutil.copyfile(checkpoint.parent / "metrics.jsonl", root / "metrics.jsonl")
        step = read_json(checkpoint / "state.json").get("step")
        grid = latest_sample_grid(checkpoint, step if isinstance(step, int) else None)
        if grid is not None:
            (root / "samples").mkdir()
            _link_or_copy(grid, root / "samples" / grid.name)
        return staged
    except Exception as error:  # noqa: BLE001 -- fall back to the original folder
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        logger.warning("could not stage %s for the Hub push (%s); exporting it in place", checkpoint, error)
        return None


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _remove(staged: Path | None) -> None:
    if staged is not None:
        shutil.rmtree(staged.parent, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# 2. The `push` command
# ----------------------------------------------------------------------------------------------------------------


def _run_push(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint) if is_exported_pipeline(args.checkpoint) else find_checkpoint(args.checkpoint)
    try:
        url = push_to_hub(
            checkpoint, args.repo_id, private=args.private, token=args.token or None, commit_message=args.commit_message
        )
    except Exception as error:  # noqa: BLE001 -- network or server trouble: one line, not a traceback
        return report_failure(f"push to {args.repo_id}", error)
    print(f"pushed {checkpoint} -> {url}")
    return 0


def add_push_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="export a checkpoint and upload it to the Hugging Face Hub",
        description="Exports a checkpoint (see `export`) to a temporary folder and uploads it to USER/NAME, creating "
        f"the repo if needed. Authentication: {LOGIN_HINT}.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint-NNNNNN folder or training output dir (exported "
        "then), or an exported pipeline folder (uploaded as it is, e.g. reflow's OUTPUT_DIR/pipeline)",
    )
    parser.add_argument("--repo-id", required=True, help="Hub model repo USER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument(
        "--token",
        default=None,
        help="Hub token with write access (default: the logged-in token or HF_TOKEN; prefer those, "
        "a token on the command line lands in the shell history)",
    )
    parser.add_argument("--commit-message", default=None, help="commit message (default: preset and step)")
    parser.set_defaults(func=_run_push)
