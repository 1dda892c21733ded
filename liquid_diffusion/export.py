"""Export: a training checkpoint as the folder a Hub repo holds -- a diffusers pipeline with a model card -- and
loading a pipeline back from a local checkpoint or export. Nothing here touches the network except diffusers'
own download of a VAE named by a Hub id; uploading is ``publish.py``'s job.

The exported folder::

    model_index.json            LiquidDiffusionPipeline: unet + scheduler (+ vae in latent space)
    unet/                       EMA weights (the model the pipeline uses), safetensors
    unet_raw/                   raw (non-EMA) weights, safetensors
    vae/                        the frozen VAE (latent space only), safetensors
    scheduler/                  FlowMatchEulerDiscreteScheduler config
    train_config.json           the training configuration (secrets removed)
    samples.png                 the latest EMA sample grid        (when the run wrote one)
    loss_curve.png              training loss from metrics.jsonl  (when the run logged any)
    README.md                   model card (huggingface_hub ModelCard + ModelCardData)

Security: weights are only read and written as safetensors; a Hub token is only used to download a private VAE and
is never logged, printed or written into the exported folder (nor is any secret in the training configuration).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler

from .checkpoints import (
    CorruptCheckpointError,
    checkpoint_step,
    find_checkpoint,
    has_unet_weights,
    read_json,
    read_unet_folder,
)
from .errors import check_not_a_file, check_repo_id, first_line, report_failure
from .latents import load_vae
from .model import LiquidDiffusionUNet, check_format
from .model_card import build_model_card, latest_sample_grid, plot_loss_curve, read_metrics, sanitize_train_config
from .pipeline import LiquidDiffusionPipeline

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# 1. Pipelines from local folders
# ----------------------------------------------------------------------------------------------------------------


def is_exported_pipeline(path: str | os.PathLike) -> bool:
    """A folder written by ``export_checkpoint`` (or any saved ``LiquidDiffusionPipeline``)."""
    return (Path(path) / "model_index.json").is_file()


def build_pipeline(checkpoint: str | os.PathLike, *, use_ema: bool = True, vae=None, token: str | None = None):
    """``LiquidDiffusionPipeline`` from a training checkpoint (or an output dir: its newest complete checkpoint).

    Args:
        checkpoint: ``checkpoint-NNNNNN`` folder or output dir.
        use_ema: use ``unet_ema/`` (falls back to ``unet/`` when the checkpoint has no EMA weights).
        vae: an ``AutoencoderKL`` to use instead of loading ``train_config["vae"]`` (latent space only).
        token: Hub token for downloading a private VAE.
    """
    checkpoint = find_checkpoint(checkpoint)
    config = read_json(checkpoint / "train_config.json")
    ema = use_ema and has_unet_weights(checkpoint / "unet_ema")
    unet_dir = checkpoint / "unet_ema" if ema else checkpoint / "unet"
    unet = _unet_from_folder(unet_dir)
    space = config.get("space", "latent" if unet.config.in_channels == 4 else "pixel")
    if space == "latent":
        if vae is None:
            if not config.get("vae"):
                raise ValueError(f"{checkpoint / 'train_config.json'} has space 'latent' but names no vae")
            vae = load_vae(config["vae"], token=token, use_safetensors=True)
        vae = vae.eval()
        vae.requires_grad_(False)
    elif space == "pixel":
        vae = None
    else:
        raise ValueError(f"train_config.json has space {space!r}; expected 'latent' or 'pixel'")
    return LiquidDiffusionPipeline(
        unet=unet,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        resolution=config.get("resolution"),
        guidance_scale=config.get("guidance_scale") if unet.config.num_classes else None,
        recommended_steps=config.get("recommended_steps") if config.get("teacher") else None,  # reflow.py's
    )


def _unet_from_folder(folder: Path):
    """The U-Net saved in ``folder``, read from local files only and verified (a damaged file is named)."""
    config, weights = read_unet_folder(folder)
    check_format(config)
    unet = LiquidDiffusionUNet.from_config(config)
    try:
        unet.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(
            f"{folder} holds weights of another LiquidDiffusion architecture (the format changed: {first_line(error)})"
        ) from None
    return unet.eval()


def pipeline_from_folder(folder: str | os.PathLike, *, use_ema: bool = True, token: str | None = None, **kwargs):
    """``LiquidDiffusionPipeline`` from a local folder: an export, a training checkpoint or an output dir.

    ``use_ema=False`` loads the raw weights (``unet_raw/`` of an export, ``unet/`` of a training checkpoint).
    Extra keyword arguments (e.g. ``torch_dtype``) go to ``LiquidDiffusionPipeline.from_pretrained`` for exports.
    ``hub.load_pipeline`` takes Hub ids as well.
    """
    folder = Path(folder).expanduser()
    if not is_exported_pipeline(folder):
        return build_pipeline(folder, use_ema=use_ema, token=token)
    try:
        pipe = LiquidDiffusionPipeline.from_pretrained(folder, use_safetensors=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:  # truncated or garbage files: one line naming the folder
        raise CorruptCheckpointError(f"could not load the pipeline in {str(folder)!r}: {first_line(error)}") from None
    if not use_ema:
        if not has_unet_weights(folder / "unet_raw"):
            raise FileNotFoundError(f"{str(folder)!r} has no raw weights (unet_raw/); drop use_ema=False")
        pipe.unet = LiquidDiffusionUNet.from_pretrained(folder / "unet_raw", use_safetensors=True).to(
            device=pipe.unet.device, dtype=pipe.unet.dtype
        )
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# 2. Export
# ----------------------------------------------------------------------------------------------------------------


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    repo_id: str | None = None,
    vae=None,
    token: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the folder that ``push`` uploads (see the module docstring) and returns it.

    The new export is built beside ``out`` and swapped in only when complete: with ``overwrite``, a previous export
    at ``out`` stays untouched until then (a bad checkpoint or a failed VAE download never costs the old export).

    Args:
        checkpoint: a ``checkpoint-NNNNNN`` folder or an output dir (its newest complete checkpoint is used).
        out: destination; must not exist or be empty.
        repo_id: the Hub repo the card's how-to-load snippet names (``USER/NAME`` placeholder when omitted).
        vae: an already loaded ``AutoencoderKL`` (latent space), to skip loading ``train_config["vae"]`` again.
        token: Hub token, only used to download a private VAE.
        overwrite: replace an existing export at ``out`` (only a LiquidDiffusion export is ever replaced).

    Raises:
        FileNotFoundError: no complete checkpoint at ``checkpoint``.
        FileExistsError: ``out`` exists and is not empty (and not ``overwrite``), or is not an export.
    """
    checkpoint = find_checkpoint(checkpoint)
    out = Path(out).expanduser()
    check_not_a_file(out, "--out")  # never replaced, even with --overwrite: it is not an export
    replace = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if replace and not overwrite:
        raise FileExistsError(f"export folder {str(out)!r} already exists and is not empty (pass --overwrite)")
    if replace and not is_exported_pipeline(out):
        raise FileExistsError(f"refusing to overwrite {str(out)!r}: it is not a LiquidDiffusion export")
    if repo_id is not None:
        check_repo_id(repo_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        _write_export(checkpoint, staging, repo_id=repo_id, vae=vae, token=token)
        staging.chmod(0o755)  # mkdtemp makes it private
        if replace:  # swap: the old export moves aside only now that the new one is complete
            old = staging.with_name(staging.name.replace(".partial-", ".replaced-"))
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(staging, out)  # all or nothing: a half-written export never sits at `out`
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _remove_stale_staging(out: Path) -> None:
    """Removes the ``.NAME.partial-PID-*`` (and ``.replaced-``) folders that interrupted exports to ``out`` left,
    unless their process still runs."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        kind, _, rest = path.name[len(out.name) + 2 :].partition("-")
        if kind not in ("partial", "replaced") or not path.is_dir():
            continue
        pid = rest.split("-")[0]
        if pid.isdigit() and _running(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"note: removed {path.name}, left by an interrupted export")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_export(checkpoint: Path, out: Path, *, repo_id: str | None, vae, token: str | None) -> None:
    train_config = sanitize_train_config(read_json(checkpoint / "train_config.json"))
    state = read_json(checkpoint / "state.json")
    step = int(state.get("step", checkpoint_step(checkpoint) or 0))
    ema = has_unet_weights(checkpoint / "unet_ema")
    if not ema:
        logger.warning("%s has no unet_ema/: exporting the raw weights as the model", checkpoint)

    pipe = build_pipeline(checkpoint, use_ema=True, vae=vae, token=token)
    num_parameters = sum(p.numel() for p in pipe.unet.parameters())
    class_names = pipe.unet.config.get("class_names")
    pipe.save_pretrained(out, safe_serialization=True)
    del pipe
    if ema:
        raw = LiquidDiffusionUNet.from_pretrained(checkpoint / "unet", use_safetensors=True)
        raw.save_pretrained(out / "unet_raw", safe_serialization=True)
        del raw
    (out / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")

    grid = latest_sample_grid(checkpoint, step)
    if grid is not None:
        shutil.copyfile(grid, out / "samples.png")
    records = [r for r in read_metrics(checkpoint.parent / "metrics.jsonl") if r["step"] <= step]
    has_loss_curve = plot_loss_curve(records, out / "loss_curve.png") is not None

    card = build_model_card(
        train_config=train_config,
        step=step,
        num_parameters=num_parameters,
        repo_id=repo_id,
        records=records,
        has_samples=grid is not None,
        has_loss_curve=has_loss_curve,
        has_raw_weights=ema,
        ema=ema,
        class_names=class_names,
    )
    card.save(out / "README.md")


# ----------------------------------------------------------------------------------------------------------------
# 3. The `export` command
# ----------------------------------------------------------------------------------------------------------------


def _run_export(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    checkpoint = find_checkpoint(args.checkpoint)
    try:
        export_checkpoint(checkpoint, out, repo_id=args.repo_id, overwrite=args.overwrite)
    except OSError as error:  # e.g. the VAE could not be downloaded: one line, not a traceback
        return report_failure(f"export of {checkpoint}", error)
    print(f"exported {checkpoint} -> {out}")
    return 0


def add_export_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as a diffusers pipeline folder with a model card (what push uploads)",
        description="Exports a training checkpoint (or the newest complete one in an output dir) as the folder that "
        "`push` uploads: LiquidDiffusionPipeline (EMA weights as unet/, raw weights as unet_raw/, vae/, scheduler/), "
        "train_config.json, samples.png, loss_curve.png and a README.md model card.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint-NNNNNN folder or training output dir")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--repo-id", default=None, help="USER/NAME to name in the card's how-to-load snippet")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.set_defaults(func=_run_export)
