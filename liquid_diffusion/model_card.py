"""The model card of an export and what it shows: the training configuration without secrets, the loss curve from
``metrics.jsonl``, the newest sample grid, and the card itself (``huggingface_hub`` ``ModelCard`` + ``ModelCardData``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import check_repo_id
from .flow import DEFAULT_GUIDANCE_SCALE
from .sources import DATASETS, local_path

SAMPLE_PATTERN = re.compile(r"^step-(\d+)\.png$")
MODEL_CARD_TAGS = ["liquid-diffusion", "unconditional-image-generation", "rectified-flow", "attention-free"]
PIPELINE_TAG = "unconditional-image-generation"
# train_config.json keys that must never leave the machine.
_SECRET_KEY = re.compile(r"token|secret|password|api[_-]?key|credential", re.IGNORECASE)
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")


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


def validation_points(records: list[dict]) -> list[tuple[int, float, float]]:
    """``(step, val_loss, val_loss_raw)`` of the validation records, in step order."""
    return sorted(
        (r["step"], r["val_loss"], r.get("val_loss_raw", float("nan"))) for r in records if _finite(r.get("val_loss"))
    )


def plot_loss_curve(records: list[dict], path: str | os.PathLike) -> Path | None:
    """Writes the training loss against the step (raw and smoothed, log scale when positive) with the validation
    losses (EMA and raw weights) over it, and, when a record has ``loss_t_bins``, the newest per-noise-level (t)
    losses. Returns ``None`` when no record has a finite loss.

    Uses matplotlib's object API with the Agg canvas (no pyplot), so it is safe on a background thread.
    """
    points = [(r["step"], r["loss"]) for r in records if _finite(r.get("loss"))]
    if not points:
        return None
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
    validation = validation_points(records)
    if validation:
        val_steps, val_ema, val_raw = zip(*validation, strict=True)
        axis.plot(val_steps, val_ema, color="tab:green", marker="o", linewidth=2, label="validation (EMA)")
        axis.plot(
            val_steps,
            val_raw,
            color="tab:green",
            marker="o",
            linewidth=1,
            alpha=0.5,
            linestyle="--",
            label="validation (raw)",
        )
        axis.legend()
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
    if not dataset:
        return None
    dataset = DATASETS.get(dataset.lower(), dataset)  # the trainer's short names (afhq, ...) -> Hub ids
    if local_path(dataset) is not None:
        return None
    try:
        return check_repo_id(dataset)
    except ValueError:
        return None


def _format_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


_CARD_BODY = """
# {name}

An **attention-free** {kind} image generator: a LiquidDiffusion U-Net (closed-form continuous-time, CfC,
gated "liquid" blocks; no attention anywhere) trained with **rectified flow** on {dataset_text}.
{few_step}
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
images = pipe(batch_size=4, num_inference_steps={steps}, generator=torch.Generator().manual_seed(0)).images
images[0].save("sample.png")
# second-order sampling: pipe(..., sampler="heun")
# raw (non-EMA) weights: liquid_diffusion.hub.load_pipeline("{load_id}", use_ema=False)
```

or from the command line: `python -m liquid_diffusion sample --checkpoint {load_id}{steps_flag}`.
{classes}
## Training

{loss_curve}
Objective (rectified flow, t = 0 data, t = 1 noise): `x_t = (1 - t) x0 + t noise`, the network predicts the velocity
`v = noise - x0` with an MSE loss; sampling integrates dx/dt = v from t = 1 to t = 0 (Euler by default).

## Files

{files}

## Lineage

CfC networks (Hasani et al., Nature Machine Intelligence 2022), LTC networks (AAAI 2021), LiquidTAD (parallel
liquid relaxation), USM (U-Net + SSM for diffusion, CVPR 2025), DiffuSSM (2023), DiCo (conv diffusion, 2025: the
block's conv module and the U shape), Rectified Flow (ICLR 2023).

License: MIT.
"""


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
    dataset_id = dataset_hub_id(train_config.get("dataset"))
    preset = train_config.get("preset", "custom")
    few_step = bool(train_config.get("teacher"))  # made by `python -m liquid_diffusion reflow` (reflow.py)
    steps = int(train_config.get("recommended_steps") or 1) if few_step else 25
    card_data = ModelCardData(
        license="mit",
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(MODEL_CARD_TAGS)
        + (["class-conditional", "classifier-free-guidance"] if class_names else [])
        + (["few-step", "reflow"] if few_step else []),
        datasets=[dataset_id] if dataset_id else None,
    )
    load_id = repo_id or "USER/NAME"
    dataset_text = f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id})" if dataset_id else "a local dataset"
    files = [
        "- `unet/`: " + ("EMA weights, used by the pipeline" if ema else "weights used by the pipeline"),
        *(["- `unet_raw/`: raw (non-EMA) weights"] if has_raw_weights and ema else []),
        *(["- `vae/`: the frozen VAE that decodes latents"] if train_config.get("space", "latent") == "latent" else []),
        "- `scheduler/`: `FlowMatchEulerDiscreteScheduler` (sigma = t)",
        "- `train_config.json`: the full training configuration",
    ]
    body = _CARD_BODY.format(
        name=repo_id.split("/")[-1] if repo_id else f"liquid-diffusion-{preset}",
        kind="class-conditional" if class_names else "unconditional",
        dataset_text=dataset_text,
        samples=(
            f"![Samples after {step:,} steps](samples.png)\n\n*EMA samples after {step:,} steps (Euler, "
            + (
                "rows: 1, 2 and 4 steps from the same noise"
                if few_step
                else f"{train_config.get('sample_steps', 25)} steps"
            )
            + ").*\n"
            if has_samples
            else "*No sample grid was written for this checkpoint.*\n"
        ),
        table=_model_table(train_config, step, num_parameters, records, has_raw_weights, ema),
        load_id=load_id,
        steps=steps,
        steps_flag=f" --steps {steps}" if few_step else "",
        few_step=_few_step_text(train_config, steps) if few_step else "",
        classes=_classes_section(class_names, train_config, load_id),
        loss_curve="![Training loss](loss_curve.png)\n" if has_loss_curve else "*No training metrics were logged.*\n",
        files="\n".join(files),
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _few_step_text(train_config: dict, steps: int) -> str:
    """The card's few-step paragraph: what a reflow student was made for, and from which teacher."""
    teacher = train_config.get("teacher_name") or train_config.get("teacher")
    at = f" (step {train_config['teacher_step']:,})" if isinstance(train_config.get("teacher_step"), int) else ""
    distill_t = train_config.get("distill_t")
    distill = f", then distilled at t = {distill_t:g} only" if distill_t is not None else ""
    guidance = (
        ""
        if train_config.get("pair_guidance_scale") is None
        else f" The teacher's classifier-free guidance (w = {train_config['pair_guidance_scale']:g}) is baked in: "
        "sample at guidance scale 1 (the pipeline's default for this model)."
    )
    return f"""
**Few-step model: made for 1-4 steps by reflow from {teacher}{at}** (Liu et al., "Flow Straight and Fast", ICLR
2023): trained on {train_config.get("pairs", "?"):,} (noise, teacher sample) pairs, the teacher's
{train_config.get("teacher_sampler", "?")} ODE with {train_config.get("teacher_steps", "?")} steps{distill}. Sample
with {steps} Euler step{"s" if steps != 1 else ""} (the pipeline's default `num_inference_steps`); 1-4 work.{guidance}
"""


def _model_table(
    train_config: dict, step: int, num_parameters: int, records: list[dict] | None, has_raw_weights: bool, ema: bool
) -> str:
    """The model card's table rows: architecture, size, data space and the training run."""
    losses = [r["loss"] for r in (records or []) if _finite(r.get("loss"))]
    final_loss = (
        f"{sum(losses[-20:]) / len(losses[-20:]):.4f} (mean of the last {len(losses[-20:])} logs)" if losses else "n/a"
    )
    space = train_config.get("space", "latent")
    rows = [
        ("architecture", "LiquidDiffusion U-Net (CfC-gated liquid blocks, no attention)"),
        ("preset", f"`{train_config.get('preset', 'custom')}`"),
        ("parameters", f"{_format_count(num_parameters)} ({num_parameters:,}, U-Net only)"),
        ("space", f"latent (frozen VAE `{train_config.get('vae')}`)" if space == "latent" else "pixel (no VAE)"),
        ("resolution", f"{train_config.get('resolution', 'n/a')} px"),
        ("steps trained", f"{step:,}"),
        ("batch size", train_config.get("batch_size", "n/a")),
        ("learning rate", train_config.get("lr", "n/a")),
        ("timestep sampling", train_config.get("timestep_sampling", "uniform")),
        ("final training loss", final_loss),
        ("validation loss", _validation_text(records, step, train_config)),
        ("weights", "EMA (`unet/`)" + (", raw (`unet_raw/`)" if has_raw_weights else "") if ema else "raw (`unet/`)"),
    ]
    return "\n".join(f"| {key} | {value} |" for key, value in rows)


def _validation_text(records: list[dict] | None, step: int, train_config: dict) -> str:
    """The newest validation loss at or before ``step``, with its protocol (see ``validation.py``)."""
    from .validation import VALIDATION_T

    latest = next((r for r in reversed(records or []) if _finite(r.get("val_loss")) and r["step"] <= step), None)
    if latest is None:
        return "n/a (no validation was run)"
    conditional = ", conditional on the class" if train_config.get("class_conditional") else ""
    return (
        f"{latest['val_loss']:.4f} with the EMA weights, {latest['val_loss_raw']:.4f} raw, at step "
        f"{latest['step']:,}: the flow loss on {latest.get('val_images', '?')} held-out images never trained on, "
        f"each at one t of {{{', '.join(f'{t:g}' for t in VALIDATION_T)}}} with fixed noise{conditional}"
    )


def _classes_section(class_names: list[str] | None, train_config: dict, load_id: str) -> str:
    """The model card's class list and guided-sampling snippet ('' for an unconditional model)."""
    if not class_names:
        return ""
    scale = train_config.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
    names = "\n".join(f"| {i} | {name} |" for i, name in enumerate(class_names))
    command = (
        f"python -m liquid_diffusion sample --checkpoint {load_id} --class {shlex.quote(class_names[0])} "
        f"--guidance-scale {scale:g}"
    )
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
