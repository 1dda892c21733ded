"""The Hugging Face Hub round trip: export a training checkpoint as a diffusers pipeline with a model card, push it
(from the CLI, a notebook or in the background during training), and resolve Hub ids or local paths for loading.

Layers, read top to bottom:

1. Finding checkpoints   -- ``find_checkpoint`` (a ``checkpoint-NNNNNN`` dir, or the newest complete one in an
                            output dir) and ``resolve_checkpoint`` (local path or Hub id -> local folder).
2. Pipelines             -- ``build_pipeline`` (training checkpoint -> ``LiquidDiffusionPipeline``) and
                            ``load_pipeline`` (any checkpoint, export folder or Hub id -> pipeline).
3. Export                -- ``export_checkpoint``: exactly the folder that is uploaded, model card included.
4. Push                  -- ``push_to_hub`` (blocking) and ``HubPusher`` (background thread, for training).
5. CLI                   -- ``export`` and ``push`` sub-commands.

The exported folder (what a Hub repo holds)::

    model_index.json            LiquidDiffusionPipeline: unet + scheduler (+ vae in latent space)
    unet/                       EMA weights (the model the pipeline uses), safetensors
    unet_raw/                   raw (non-EMA) weights, safetensors
    vae/                        the frozen VAE (latent space only), safetensors
    scheduler/                  FlowMatchEulerDiscreteScheduler config
    train_config.json           the training configuration (secrets removed)
    samples.png                 the latest EMA sample grid        (when the run wrote one)
    loss_curve.png              training loss from metrics.jsonl  (when the run logged any)
    README.md                   model card (huggingface_hub ModelCard + ModelCardData)

Security: weights are only read and written as safetensors; the Hub token is passed to ``HfApi`` and nowhere else
(never logged, printed or written into the exported folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .checkpoints import CHECKPOINT_PATTERN, CorruptCheckpointError, read_unet_folder
from .data import looks_like_local_path
from .pipeline import WEIGHTS_AND_CONFIGS

logger = logging.getLogger(__name__)

SAMPLE_PATTERN = re.compile(r"^step-(\d+)\.png$")
# What ``resolve_checkpoint`` downloads from a Hub repo: the pipeline's weights (safetensors only) and configs, plus
# the model card and its images.
HUB_ALLOW_PATTERNS = [*WEIGHTS_AND_CONFIGS, "*.png", "*.md"]
MODEL_CARD_TAGS = ["liquid-diffusion", "unconditional-image-generation", "rectified-flow", "attention-free"]
PIPELINE_TAG = "unconditional-image-generation"
LOGIN_HINT = (
    "log in with `hf auth login` (or `huggingface-cli login`), with `from huggingface_hub import notebook_login; "
    "notebook_login()` in a notebook, or set the HF_TOKEN environment variable"
)
# train_config.json keys that must never leave the machine.
_SECRET_KEY = re.compile(r"token|secret|password|api[_-]?key|credential", re.IGNORECASE)
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")

# ----------------------------------------------------------------------------------------------------------------
# 1. Finding checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A training checkpoint the trainer finished writing: ``state.json``, ``train_config.json`` and ``unet/`` (and
    ``unet_ema/`` when present) each with ``config.json`` + safetensors weights."""
    path = Path(path)
    if not ((path / "state.json").is_file() and (path / "train_config.json").is_file() and _has_weights(path / "unet")):
        return False
    return not (path / "unet_ema").exists() or _has_weights(path / "unet_ema")


def is_exported_pipeline(path: str | os.PathLike) -> bool:
    """A folder written by ``export_checkpoint`` (or any saved ``LiquidDiffusionPipeline``)."""
    return (Path(path) / "model_index.json").is_file()


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Returns ``path`` if it is a complete training checkpoint, else the newest complete ``checkpoint-NNNNNN`` in it.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no complete checkpoint.
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
        ((int(m.group(1)), p) for p in path.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, candidate in candidates:
        if is_complete_checkpoint(candidate):
            return candidate
    if candidates:
        raise FileNotFoundError(
            f"{str(path)!r} holds {len(candidates)} checkpoint-NNNNNN folder(s) but none is complete "
            "(state.json, train_config.json and unet/ with safetensors weights)"
        )
    raise FileNotFoundError(
        f"{str(path)!r} is not a LiquidDiffusion checkpoint (no state.json + unet/) and holds no checkpoint-NNNNNN"
    )


def check_repo_id(repo_id: str) -> str:
    """Validates a Hub model repo id of the form ``USER/NAME``; raises ValueError with the rule it breaks."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"{repo_id!r} is not a Hub repo id of the form USER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id (USER/NAME): {error}") from None
    return repo_id


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    token: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Local folder for a checkpoint given as a local path or a Hub repo id.

    * An existing local path is returned as is; an output dir (holding ``checkpoint-NNNNNN``) resolves to its newest
      complete checkpoint. Any folder with ``model_index.json`` (an export) or a complete checkpoint is accepted.
    * Otherwise ``USER/NAME`` is downloaded with ``huggingface_hub.snapshot_download`` (only ``*.safetensors``,
      ``*.json``, ``*.png``, ``*.md``) and the snapshot folder is returned.

    Raises:
        FileNotFoundError: not a local path and not a valid repo id, no such Hub repo, or the Hub is unreachable.
        PermissionError: missing/invalid token for a private or gated repo (with how to log in).
    """
    text = os.fspath(path_or_repo_id)
    local = Path(text).expanduser()
    if local.exists():
        if local.is_dir() and (is_exported_pipeline(local) or is_complete_checkpoint(local)):
            return local
        return find_checkpoint(local)
    if looks_like_local_path(text):
        raise FileNotFoundError(f"checkpoint path {text!r} does not exist")
    try:
        repo_id = check_repo_id(text)
    except ValueError:
        raise FileNotFoundError(
            f"{text!r} is neither an existing local path nor a Hub repo id of the form USER/NAME"
        ) from None
    try:
        folder = snapshot_download(
            repo_id,
            repo_type="model",
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=HUB_ALLOW_PATTERNS,
        )
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
    except GatedRepoError:
        raise PermissionError(f"Hub repo {repo_id!r} is gated: request access on its page, then {LOGIN_HINT}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{text!r} is not a local path and no Hub repo {repo_id!r} was found (if it is private, {LOGIN_HINT})"
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{text!r} is not a local path and the Hub could not be reached to download {repo_id!r} "
            "(check the connection, or pass a local checkpoint folder)"
        ) from None
    except HfHubHTTPError as error:
        raise _friendly_hub_error(error, repo_id, action="download") from None
    folder = Path(folder)
    if not (is_exported_pipeline(folder) or is_complete_checkpoint(folder)):
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} holds no LiquidDiffusion pipeline (no model_index.json; "
            "was it pushed with `python -m liquid_diffusion push`?)"
        )
    return folder


# ----------------------------------------------------------------------------------------------------------------
# 2. Pipelines
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_vae(source: str | os.PathLike, token: str | None = None):
    """``AutoencoderKL`` from a Hub id or local folder (its root, or a ``vae/`` subfolder), safetensors only, fp32."""
    import torch
    from diffusers import AutoencoderKL

    text = os.fspath(source)
    local = Path(text).expanduser()
    kwargs = dict(use_safetensors=True, torch_dtype=torch.float32)
    if local.exists():
        if (local / "config.json").is_file():
            return AutoencoderKL.from_pretrained(local, **kwargs)
        if (local / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(local, subfolder="vae", **kwargs)
        raise FileNotFoundError(f"VAE folder {text!r} holds no config.json (nor vae/config.json)")
    try:
        return AutoencoderKL.from_pretrained(text, token=token, **kwargs)
    except EnvironmentError as root_error:
        try:  # a full pipeline repo keeps its VAE in vae/
            return AutoencoderKL.from_pretrained(text, subfolder="vae", token=token, **kwargs)
        except EnvironmentError:
            raise root_error from None


def build_pipeline(checkpoint: str | os.PathLike, *, use_ema: bool = True, vae=None, token: str | None = None):
    """``LiquidDiffusionPipeline`` from a training checkpoint (or an output dir: its newest complete checkpoint).

    Args:
        checkpoint: ``checkpoint-NNNNNN`` folder or output dir.
        use_ema: use ``unet_ema/`` (falls back to ``unet/`` when the checkpoint has no EMA weights).
        vae: an ``AutoencoderKL`` to use instead of loading ``train_config["vae"]`` (latent space only).
        token: Hub token for downloading a private VAE.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .pipeline import LiquidDiffusionPipeline

    checkpoint = find_checkpoint(checkpoint)
    config = _read_json(checkpoint / "train_config.json")
    unet_dir = checkpoint / "unet_ema" if use_ema and _has_weights(checkpoint / "unet_ema") else checkpoint / "unet"
    unet = _unet_from_folder(unet_dir)
    space = config.get("space", "latent" if unet.config.in_channels == 4 else "pixel")
    if space == "latent":
        if vae is None:
            if not config.get("vae"):
                raise ValueError(f"{checkpoint / 'train_config.json'} has space 'latent' but names no vae")
            vae = load_vae(config["vae"], token=token)
        vae = vae.eval()
        vae.requires_grad_(False)
    elif space == "pixel":
        vae = None
    else:
        raise ValueError(f"train_config.json has space {space!r}; expected 'latent' or 'pixel'")
    return LiquidDiffusionPipeline(
        unet=unet, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, resolution=config.get("resolution"),
        guidance_scale=config.get("guidance_scale") if unet.config.num_classes else None,
    )


def _unet_from_folder(folder: Path):
    """The U-Net saved in ``folder``, read from local files only and verified (a damaged file is named)."""
    from .model import LiquidDiffusionUNet

    config, weights = read_unet_folder(folder)
    unet = LiquidDiffusionUNet.from_config(config)
    try:
        unet.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"{folder} holds weights of another LiquidDiffusion architecture (the format changed: "
                         f"{error.args[0].splitlines()[0]})") from None
    return unet.eval()


def load_pipeline(path_or_repo_id: str | os.PathLike, *, use_ema: bool = True, token: str | None = None, **kwargs):
    """``LiquidDiffusionPipeline`` from anything: an exported folder, a training checkpoint, an output dir or a Hub id.

    ``use_ema=False`` loads the raw weights (``unet_raw/`` of an export, ``unet/`` of a training checkpoint).
    Extra keyword arguments (e.g. ``torch_dtype``) go to ``LiquidDiffusionPipeline.from_pretrained`` for exports.
    """
    from .model import LiquidDiffusionUNet
    from .pipeline import LiquidDiffusionPipeline

    folder = resolve_checkpoint(path_or_repo_id, token=token)
    if not is_exported_pipeline(folder):
        return build_pipeline(folder, use_ema=use_ema, token=token)
    try:
        pipe = LiquidDiffusionPipeline.from_pretrained(folder, use_safetensors=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:  # truncated or garbage files: one line naming the folder
        raise CorruptCheckpointError(f"could not load the pipeline in {str(folder)!r}: {_first_line(error)}") from None
    if not use_ema:
        if not _has_weights(folder / "unet_raw"):
            raise FileNotFoundError(f"{path_or_repo_id!s} has no raw weights (unet_raw/); drop use_ema=False")
        pipe.unet = LiquidDiffusionUNet.from_pretrained(folder / "unet_raw", use_safetensors=True).to(
            device=pipe.unet.device, dtype=pipe.unet.dtype
        )
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# 3. Export
# ----------------------------------------------------------------------------------------------------------------


def sanitize_train_config(config: dict) -> dict:
    """``train_config`` without anything secret: keys that name a token/secret/password and values that look like
    a Hub token are dropped (recursively)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not _SECRET_KEY.search(str(k)) and not _is_secret(v)}
        if isinstance(value, list):
            return [clean(v) for v in value if not _is_secret(v)]
        return value

    return clean(config)


def _is_secret(value) -> bool:
    return isinstance(value, str) and bool(_TOKEN_VALUE.search(value))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of ``metrics.jsonl`` (unparseable lines, e.g. one being written, are skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_loss_curve(records: list[dict], path: str | os.PathLike) -> Path | None:
    """Writes the training loss against the step (raw and smoothed, log scale when positive) and, when a record has
    ``loss_t_bins``, the newest per-noise-level (t) losses. Returns ``None`` when no record has a finite loss.

    Uses matplotlib's object API with the Agg canvas (no pyplot), so it is safe on a background thread.
    """
    points = [(r["step"], r["loss"]) for r in records if _finite(r.get("loss"))]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = zip(*points, strict=True)
    binned = next((r for r in reversed(records) if isinstance(r.get("loss_t_bins"), list) and r["loss_t_bins"]), None)
    bins = [b if _finite(b) else float("nan") for b in binned["loss_t_bins"]] if binned else None
    figure = Figure(figsize=(10 if bins else 6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 2 if bins else 1, 1)
    window = len(losses) // 25  # a centred moving average over ~4% of the run, once there is enough to smooth
    if window >= 2:
        axis.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        half = window // 2
        smooth = [
            sum(losses[max(0, i - half) : i + half + 1]) / len(losses[max(0, i - half) : i + half + 1])
            for i in range(len(losses))
        ]
        axis.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"moving average ({2 * half + 1} logs)")
        axis.legend()
    else:
        axis.plot(steps, losses, color="tab:blue", linewidth=2, marker="." if len(losses) < 30 else None)
    if min(losses) > 0:
        axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("rectified-flow loss (MSE)")
    axis.set_title("training loss")
    axis.grid(alpha=0.3)
    if bins:
        axis = figure.add_subplot(1, 2, 2)
        width = 1.0 / len(bins)
        axis.bar([(i + 0.5) * width for i in range(len(bins))], bins, width=width * 0.9, color="tab:orange")
        axis.set_xlabel("t (0 = data, 1 = noise)")
        axis.set_ylabel("loss")
        axis.set_title(f"loss per t at step {binned['step']}")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


def latest_sample_grid(checkpoint: Path, step: int | None) -> Path | None:
    """The run's sample grid for ``step`` (``<output_dir>/samples/step-NNNNNN.png``), else the newest one written
    at or before ``step``, else the newest one; ``None`` when the run wrote none."""
    grids = []
    for folder in (checkpoint / "samples", checkpoint.parent / "samples"):
        if folder.is_dir():
            grids += [(int(m.group(1)), p) for p in folder.iterdir() if (m := SAMPLE_PATTERN.match(p.name))]
    if not grids:
        return None
    grids.sort()
    if step is not None:
        earlier = [g for g in grids if g[0] <= step]
        if earlier:
            return earlier[-1][1]
    return grids[-1][1]


def dataset_hub_id(dataset: str | None) -> str | None:
    """The Hub dataset id behind the trainer's ``dataset`` value (short name or id); ``None`` for local folders."""
    from .data import DATASETS  # the trainer's short names (afhq, celeba, ...) -> Hub ids

    if not dataset:
        return None
    dataset = DATASETS.get(dataset.lower(), dataset)
    if Path(dataset).expanduser().exists() or looks_like_local_path(dataset):
        return None
    try:
        return check_repo_id(dataset)
    except ValueError:
        return None


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def build_model_card(
    *,
    train_config: dict,
    step: int,
    num_parameters: int,
    repo_id: str | None = None,
    records: list[dict] | None = None,
    has_samples: bool = False,
    has_loss_curve: bool = False,
    has_raw_weights: bool = True,
    ema: bool = True,
    class_names: list[str] | None = None,
) -> ModelCard:
    """The model card: YAML metadata (``ModelCardData``) + a markdown body with samples, loss curve and usage
    (and, for a class-conditional model, its class list and recommended guidance scale)."""
    dataset = train_config.get("dataset")
    dataset_id = dataset_hub_id(dataset)
    preset = train_config.get("preset", "custom")
    space = train_config.get("space", "latent")
    name = repo_id.split("/")[-1] if repo_id else f"liquid-diffusion-{preset}"
    card_data = ModelCardData(
        license="mit",
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(MODEL_CARD_TAGS) + (["class-conditional", "classifier-free-guidance"] if class_names else []),
        datasets=[dataset_id] if dataset_id else None,
    )
    load_id = repo_id or "USER/NAME"
    dataset_text = f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id})" if dataset_id else "a local dataset"
    losses = [r["loss"] for r in (records or []) if _finite(r.get("loss"))]
    final_loss = (
        f"{sum(losses[-20:]) / len(losses[-20:]):.4f} (mean of the last {len(losses[-20:])} logs)" if losses else "n/a"
    )
    rows = [
        ("architecture", "LiquidDiffusion U-Net (CfC-gated liquid blocks, no attention)"),
        ("preset", f"`{preset}`"),
        ("parameters", f"{_format_count(num_parameters)} ({num_parameters:,}, U-Net only)"),
        ("space", f"latent (frozen VAE `{train_config.get('vae')}`)" if space == "latent" else "pixel (no VAE)"),
        ("resolution", f"{train_config.get('resolution', 'n/a')} px"),
        ("steps trained", f"{step:,}"),
        ("batch size", train_config.get("batch_size", "n/a")),
        ("learning rate", train_config.get("lr", "n/a")),
        ("timestep sampling", train_config.get("timestep_sampling", "uniform")),
        ("final training loss", final_loss),
        ("weights", "EMA (`unet/`)" + (", raw (`unet_raw/`)" if has_raw_weights else "") if ema else "raw (`unet/`)"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    samples = (
        f"![Samples after {step:,} steps](samples.png)\n\n*EMA samples after {step:,} steps (Euler, "
        f"{train_config.get('sample_steps', 25)} steps).*\n"
        if has_samples
        else "*No sample grid was written for this checkpoint.*\n"
    )
    loss_curve = "![Training loss](loss_curve.png)\n" if has_loss_curve else "*No training metrics were logged.*\n"
    files = [
        "- `unet/`: " + ("EMA weights, used by the pipeline" if ema else "weights used by the pipeline"),
        *(["- `unet_raw/`: raw (non-EMA) weights"] if has_raw_weights and ema else []),
        *(["- `vae/`: the frozen VAE that decodes latents"] if space == "latent" else []),
        "- `scheduler/`: `FlowMatchEulerDiscreteScheduler` (sigma = t)",
        "- `train_config.json`: the full training configuration",
    ]
    kind = "class-conditional" if class_names else "unconditional"
    body = f"""
# {name}

An **attention-free** {kind} image generator: a LiquidDiffusion U-Net (closed-form continuous-time, CfC,
gated "liquid" blocks; no attention anywhere) trained with **rectified flow** on {dataset_text}.

{samples}
## Model

| | |
|---|---|
{table}

## How to load

Install the `liquid_diffusion` package (it provides the pipeline and U-Net classes), then:

```python
import torch
from liquid_diffusion import LiquidDiffusionPipeline

pipe = LiquidDiffusionPipeline.from_pretrained("{load_id}")
pipe = pipe.to("cuda" if torch.cuda.is_available() else "cpu")
images = pipe(batch_size=4, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images
images[0].save("sample.png")
# second-order sampling: pipe(..., sampler="heun")
# raw (non-EMA) weights: liquid_diffusion.hub.load_pipeline("{load_id}", use_ema=False)
```

or from the command line: `python -m liquid_diffusion sample --checkpoint {load_id}`.
{_classes_section(class_names, train_config, load_id)}
## Training

{loss_curve}
Objective (rectified flow, t = 0 data, t = 1 noise): `x_t = (1 - t) x0 + t noise`, the network predicts the velocity
`v = noise - x0` with an MSE loss; sampling integrates dx/dt = v from t = 1 to t = 0 (Euler by default).

## Files

{chr(10).join(files)}

## Lineage

CfC networks (Hasani et al., Nature Machine Intelligence 2022), LTC networks (AAAI 2021), LiquidTAD (parallel
liquid relaxation), USM (U-Net + SSM for diffusion, CVPR 2025), DiffuSSM (2023), Rectified Flow (ICLR 2023).

License: MIT.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _classes_section(class_names: list[str] | None, train_config: dict, load_id: str) -> str:
    """The model card's class list and guided-sampling snippet ('' for an unconditional model)."""
    if not class_names:
        return ""
    import shlex

    from .flow import DEFAULT_GUIDANCE_SCALE

    scale = train_config.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
    names = "\n".join(f"| {i} | {name} |" for i, name in enumerate(class_names))
    command = (f"python -m liquid_diffusion sample --checkpoint {load_id} --class {shlex.quote(class_names[0])} "
               f"--guidance-scale {scale:g}")
    return f"""
## Classes and guidance

This model is class-conditional ({len(class_names)} classes) with classifier-free guidance: it was trained with
{train_config.get("class_dropout", 0.1):.0%} of the labels replaced by a null class, and samples with
`v = v_uncond + w (v_cond - v_uncond)`. **Recommended guidance scale: w = {scale:g}** (1 = no guidance; the pipeline
uses it by default).

```python
images = pipe(class_labels={json.dumps(class_names[0])}, batch_size=4, guidance_scale={scale:g}).images  # name or id
images = pipe(class_labels=[0, 1], guidance_scale={scale:g}).images  # one label per image
```

or from the command line:

```bash
{command}
```

| id | class |
|---|---|
{names}
"""


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
    replace = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if replace and not overwrite:
        raise FileExistsError(f"export folder {str(out)!r} already exists and is not empty (pass --overwrite)")
    if replace and not is_exported_pipeline(out):
        raise FileExistsError(f"refusing to overwrite {str(out)!r}: it is not a LiquidDiffusion export")
    if repo_id is not None:
        check_repo_id(repo_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
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


def _write_export(checkpoint: Path, out: Path, *, repo_id: str | None, vae, token: str | None) -> None:
    from .model import LiquidDiffusionUNet

    train_config = sanitize_train_config(_read_json(checkpoint / "train_config.json"))
    state = _read_json(checkpoint / "state.json")
    match = CHECKPOINT_PATTERN.match(checkpoint.name)
    step = int(state.get("step", match.group(1) if match else 0))
    ema = _has_weights(checkpoint / "unet_ema")
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
# 4. Push
# ----------------------------------------------------------------------------------------------------------------


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _friendly_hub_error(error: BaseException, repo_id: str, action: str = "push") -> BaseException:
    """Maps Hub errors a user can fix to one-line PermissionError/FileNotFoundError/ValueError; returns any other
    error unchanged (network trouble, server errors: worth a retry)."""
    if isinstance(error, LocalTokenNotFoundError):
        return PermissionError(f"no Hugging Face token found: {LOGIN_HINT}")
    if isinstance(error, HFValidationError):
        return ValueError(f"{repo_id!r} is not a valid Hub repo id (USER/NAME): {error}")
    status = _status_code(error)
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


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """Validates ``repo_id`` and that a Hub token is at hand (given, logged in, or HF_TOKEN), before any work is done.

    Raises ValueError (bad repo id) or PermissionError ("not logged in", with how to log in).
    """
    check_repo_id(repo_id)
    if not (token or get_token()):
        raise PermissionError(f"not logged in to the Hugging Face Hub, so nothing can be pushed to {repo_id!r}: "
                              f"{LOGIN_HINT}")
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
    folder = Path(folder)
    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            commit_message=commit_message or "Upload LiquidDiffusion pipeline",
        )
    except Exception as error:  # noqa: BLE001 -- mapped to a user-facing error or re-raised unchanged
        friendly = _friendly_hub_error(error, repo_id)
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
    """Exports ``checkpoint`` (a checkpoint or output dir) to a temporary folder and uploads it to ``repo_id``.

    Returns the repo URL. Raises PermissionError with how to log in for a missing/invalid token or a repo without
    write access, ValueError for a bad repo id, FileNotFoundError for a missing checkpoint.
    """
    check_can_push(repo_id, token)
    checkpoint = find_checkpoint(checkpoint)
    if commit_message is None:
        step = _read_json(checkpoint / "state.json").get("step", "?")
        preset = _read_json(checkpoint / "train_config.json").get("preset", "")
        commit_message = f"LiquidDiffusion {preset} checkpoint at step {step}".replace("  ", " ")
    with tempfile.TemporaryDirectory(prefix="liquid-diffusion-export-") as tmp:
        folder = export_checkpoint(checkpoint, Path(tmp) / "export", repo_id=repo_id, token=token)
        url = upload_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)
    logger.info("pushed %s to %s", checkpoint.name, url)
    return url


# Errors a retry cannot fix.
_PERMANENT_ERRORS = (PermissionError, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError)


class HubPusher:
    """Pushes checkpoints to the Hub on a background thread, so training never waits for an upload.

    ``push(checkpoint_dir)`` returns at once: it hard-links the checkpoint's files into a private staging folder (so
    the trainer may prune the checkpoint meanwhile) and queues it. One worker thread exports and uploads; if
    checkpoints arrive faster than uploads finish, only the newest queued one is pushed. A failed upload is
    retried ``max_attempts`` times in all with exponential backoff (``backoff_s``, doubled each time); errors a
    retry cannot fix (no token, no write access, bad repo id) fail at once. Failures are logged and passed to
    ``on_failure``; nothing is ever raised into the caller. Call ``close()`` (or ``wait()``) at the end of training.

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
        self._lock = threading.Condition()
        self._pending: tuple[Path, Path | None] | None = None  # (original checkpoint, staging folder)
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"HubPusher(repo_id={self.repo_id!r}, private={self.private})"

    @property
    def last_error(self) -> BaseException | None:
        return self.failures[-1][1] if self.failures else None

    def push(self, checkpoint_dir: str | os.PathLike) -> None:
        """Queues ``checkpoint_dir`` for export + upload and returns immediately. Never raises."""
        try:
            with self._lock:
                if self._closed:
                    logger.warning("HubPusher is closed; not pushing %s", checkpoint_dir)
                    return
            checkpoint = find_checkpoint(checkpoint_dir)
            staging = self._stage(checkpoint)
            with self._lock:
                if self._pending is not None:
                    logger.info("Hub push of %s skipped: superseded by %s", self._pending[0].name, checkpoint.name)
                    _remove(self._pending[1])
                self._pending = (checkpoint, staging)
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="liquid-diffusion-hub-push", daemon=True)
                    self._thread.start()
                self._lock.notify_all()
        except Exception as error:  # noqa: BLE001 -- never into training
            logger.error("could not queue Hub push of %s: %s", checkpoint_dir, error)
            self._report_failure(Path(checkpoint_dir), error)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every queued push finished (or failed); False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending is not None or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Waits for queued pushes (see ``wait``), then stops the worker. Further ``push`` calls are ignored."""
        done = self.wait(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if done and self._thread is not None:
            self._thread.join(timeout=5)
        return done

    def __enter__(self) -> "HubPusher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- worker ------------------------------------------------------------------------------------------------

    @staticmethod
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
            step = _read_json(checkpoint / "state.json").get("step")
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

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._lock.wait()
                if self._pending is None:
                    return
                (checkpoint, staging), self._pending = self._pending, None
                self._busy = True
            try:
                self._push_with_retries(checkpoint, staging)
            finally:
                _remove(staging)
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    def _push_with_retries(self, checkpoint: Path, staging: Path | None) -> None:
        source = staging if staging is not None else checkpoint
        for attempt in range(1, self.max_attempts + 1):
            try:
                url = push_to_hub(source, self.repo_id, private=self.private, token=self._token)
            except _PERMANENT_ERRORS as error:
                logger.error("Hub push of %s to %s failed: %s", checkpoint.name, self.repo_id, error)
                self._report_failure(checkpoint, error)
                return
            except Exception as error:  # noqa: BLE001 -- network, server: retry
                if attempt == self.max_attempts:
                    logger.error(
                        "Hub push of %s to %s failed after %d attempts: %s: %s",
                        checkpoint.name,
                        self.repo_id,
                        attempt,
                        type(error).__name__,
                        _first_line(error),
                    )
                    self._report_failure(checkpoint, error)
                    return
                delay = self.backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "Hub push of %s failed (attempt %d/%d: %s: %s); retrying in %.0f s",
                    checkpoint.name,
                    attempt,
                    self.max_attempts,
                    type(error).__name__,
                    _first_line(error),
                    delay,
                )
                time.sleep(delay)
            else:
                self.pushed.append((checkpoint, url))
                logger.info("pushed %s to %s", checkpoint.name, url)
                if self.on_success is not None:
                    try:
                        self.on_success(checkpoint, url)
                    except Exception:  # noqa: BLE001
                        logger.exception("HubPusher on_success callback failed")
                return

    def _report_failure(self, checkpoint: Path, error: BaseException) -> None:
        self.failures.append((checkpoint, error))
        if self.on_failure is not None:
            try:
                self.on_failure(checkpoint, error)
            except Exception:  # noqa: BLE001
                logger.exception("HubPusher on_failure callback failed")


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _remove(staged: Path | None) -> None:
    if staged is not None:
        shutil.rmtree(staged.parent, ignore_errors=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


# ----------------------------------------------------------------------------------------------------------------
# 5. CLI
# ----------------------------------------------------------------------------------------------------------------


def _run_export(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    checkpoint = find_checkpoint(args.checkpoint)
    try:
        export_checkpoint(checkpoint, out, repo_id=args.repo_id, overwrite=args.overwrite)
    except _PERMANENT_ERRORS:
        raise
    except OSError as error:  # e.g. the VAE could not be downloaded: one line, not a traceback
        if os.environ.get("LIQUID_DIFFUSION_DEBUG"):
            raise
        print(f"error: export of {checkpoint} failed: {type(error).__name__}: {_first_line(error)}", file=sys.stderr)
        return 1
    print(f"exported {checkpoint} -> {out}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    token = args.token or None
    checkpoint = find_checkpoint(args.checkpoint)
    try:
        url = push_to_hub(
            checkpoint, args.repo_id, private=args.private, token=token, commit_message=args.commit_message
        )
    except _PERMANENT_ERRORS:
        raise
    except Exception as error:  # noqa: BLE001 -- network or server trouble: one line, not a traceback
        if os.environ.get("LIQUID_DIFFUSION_DEBUG"):
            raise
        print(f"error: push to {args.repo_id} failed: {type(error).__name__}: {_first_line(error)}", file=sys.stderr)
        return 1
    print(f"pushed {checkpoint} -> {url}")
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


def add_push_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="export a checkpoint and upload it to the Hugging Face Hub",
        description="Exports a checkpoint (see `export`) to a temporary folder and uploads it to USER/NAME, creating "
        f"the repo if needed. Authentication: {LOGIN_HINT}.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint-NNNNNN folder or training output dir")
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
