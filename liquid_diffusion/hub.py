"""Loading from the Hugging Face Hub: resolve a Hub id (or local path) to a folder and load its pipeline.

``resolve_checkpoint`` (local path or Hub id -> local folder) and ``load_pipeline`` (-> pipeline) serve ``sample``,
``evaluate`` and the notebook; publishing (``push``, background pushes during training) is ``publish.py``'s job, so
nothing that only loads imports the uploader.

Hub errors a user can fix (no token, a bad id, a gated or missing repo) become one-line PermissionError /
FileNotFoundError / ValueError that say what to do (``friendly_hub_error``, shared with ``publish.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .checkpoints import find_checkpoint, is_complete_checkpoint
from .errors import check_repo_id
from .export import is_exported_pipeline, pipeline_from_folder
from .pipeline import WEIGHTS_AND_CONFIGS
from .sources import local_path

# What ``resolve_checkpoint`` downloads from a Hub repo: the pipeline's weights (safetensors only) and configs, plus
# the model card and its images.
HUB_ALLOW_PATTERNS = [*WEIGHTS_AND_CONFIGS, "*.png", "*.md"]
LOGIN_HINT = (
    "log in with `hf auth login` (or `huggingface-cli login`), with `from huggingface_hub import notebook_login; "
    "notebook_login()` in a notebook, or set the HF_TOKEN environment variable"
)


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    token: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Local folder for a checkpoint given as a local path or a Hub repo id.

    * An existing local path (relative ones from the working directory, ``./`` or not) is local; an output dir
      (holding ``checkpoint-NNNNNN``) resolves to its newest complete checkpoint. Any folder with
      ``model_index.json`` (an export) or a complete checkpoint is accepted.
    * A name only a path can have (``./x``, ``/x``, ``~/x``, ``a/b/c``) that does not exist is not found locally:
      FileNotFoundError, nothing is downloaded.
    * Otherwise ``USER/NAME`` is downloaded with ``huggingface_hub.snapshot_download`` (only ``*.safetensors``,
      ``*.json``, ``*.png``, ``*.md``) and the snapshot folder is returned.

    Raises:
        FileNotFoundError: not a local path and not a valid repo id, no such Hub repo, or the Hub is unreachable.
        PermissionError: missing/invalid token for a private or gated repo (with how to log in).
    """
    text = os.fspath(path_or_repo_id)
    where = "" if os.path.isabs(os.path.expanduser(text)) else f" (relative to {os.getcwd()})"
    local = local_path(
        text, f"checkpoint path {text!r} does not exist locally{where}; check the path (a Hub id is USER/NAME)"
    )
    if local is not None:
        return local if is_exported_pipeline(local) else find_checkpoint(local)
    try:
        repo_id = check_repo_id(text)
    except ValueError:
        raise FileNotFoundError(
            f"{text!r} is neither an existing local path nor a Hub repo id of the form USER/NAME"
        ) from None
    folder = _download(repo_id, token=token, revision=revision, cache_dir=cache_dir)
    if not (is_exported_pipeline(folder) or is_complete_checkpoint(folder)):
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} holds no LiquidDiffusion pipeline (no model_index.json; "
            "was it pushed with `python -m liquid_diffusion push`?)"
        )
    return folder


def _download(repo_id: str, *, token: str | None, revision: str | None, cache_dir) -> Path:
    """``snapshot_download`` of ``HUB_ALLOW_PATTERNS``, its errors as one line that says what to do."""
    try:
        return Path(
            snapshot_download(
                repo_id,
                repo_type="model",
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                allow_patterns=HUB_ALLOW_PATTERNS,
            )
        )
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except GatedRepoError:
        raise PermissionError(f"Hub repo {repo_id!r} is gated: request access on its page, then {LOGIN_HINT}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and no Hub repo {repo_id!r} was found (if it is private, {LOGIN_HINT})"
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and the Hub could not be reached to download {repo_id!r} "
            "(check the connection, or pass a local checkpoint folder)"
        ) from None
    except HfHubHTTPError as error:
        raise friendly_hub_error(error, repo_id, action="download") from None


def load_pipeline(path_or_repo_id: str | os.PathLike, *, use_ema: bool = True, token: str | None = None, **kwargs):
    """``LiquidDiffusionPipeline`` from anything: an exported folder, a training checkpoint, an output dir or a Hub id.

    ``use_ema=False`` loads the raw weights (``unet_raw/`` of an export, ``unet/`` of a training checkpoint).
    Extra keyword arguments (e.g. ``torch_dtype``) go to ``LiquidDiffusionPipeline.from_pretrained`` for exports.
    """
    folder = resolve_checkpoint(path_or_repo_id, token=token)
    return pipeline_from_folder(folder, use_ema=use_ema, token=token, **kwargs)


def friendly_hub_error(error: BaseException, repo_id: str, action: str = "push") -> BaseException:
    """Maps Hub errors a user can fix to one-line PermissionError/FileNotFoundError/ValueError; returns any other
    error unchanged (network trouble, server errors: worth a retry)."""
    if isinstance(error, LocalTokenNotFoundError):
        return PermissionError(f"no Hugging Face token found: {LOGIN_HINT}")
    if isinstance(error, HFValidationError):
        return ValueError(f"{repo_id!r} is not a valid Hub repo id (USER/NAME): {error}")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return PermissionError(
            f"the Hub rejected the credentials (missing or invalid token) for {repo_id!r}: {LOGIN_HINT}"
        )
    if status == 403:
        namespace = repo_id.split("/")[0]
        return PermissionError(
            f"no write access to {repo_id!r}: the token is read-only or may not write to '{namespace}'; create a token "
            f"with write access at https://huggingface.co/settings/tokens, then {LOGIN_HINT}"
            if action == "push"
            else f"access to {repo_id!r} was refused (403): {LOGIN_HINT} with a token that may read it"
        )
    if isinstance(error, RepositoryNotFoundError):
        return FileNotFoundError(f"Hub repo {repo_id!r} not found or not visible with this token ({LOGIN_HINT})")
    return error
