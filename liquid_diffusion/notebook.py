"""The guided notebook's logic: every code cell of ``LiquidDiffusion_Training.ipynb`` is a few lines that call this.

In the order of the notebook's sections:

1. ``setup``: notebook wording for messages, one-line errors, the GPU (``Hardware``).
2. ``output_root``: Google Drive or the local disk.
3. ``Choices`` (the form's fields) and ``prepare``: the ``LD_*`` environment overrides, checks of the choices, the
   batch size and gradient checkpointing for this GPU, the ``TrainConfig``, a summary (``NotebookRun``).
4. ``preview``: the first training images as the model sees them.
5. ``describe_model``: parameters and the expected GPU memory.
6. ``train``: the live panel (``LiveDashboard``) around ``Trainer``; returns ``Trained``.
7. ``compare_samplers`` (Euler vs Heun) and ``class_picker`` (class-conditional models).
8. ``push``: Hub login and upload. 9. ``load_back``: the pipeline as a user loads it. 10. ``evaluate``: FID and KID.

Every form field can be overridden by an environment variable (``ENV_OVERRIDES``, e.g. ``LD_DATASET``), so tests and
``jupyter nbconvert --execute`` run the notebook headless.
"""

from __future__ import annotations

import dataclasses
import gc
import html
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from huggingface_hub.errors import HfHubHTTPError
from IPython import get_ipython
from IPython.display import HTML, display
from IPython.display import Image as ImageDisplay
from matplotlib.figure import Figure

from .checkpoints import CheckpointWriteError, list_checkpoints
from .config import RESUME_MUST_MATCH, TrainConfig, resolve_batch_size, resolve_mixed_precision
from .errors import USER_ERRORS, check_repo_id, first_line, set_audience
from .memory import estimate_training_memory_gib, needs_gradient_checkpointing
from .metrics import METRICS_FILE, TrainerCallback
from .stopping import NonFiniteLossError
from .tracking import check_report_to, trackers

IN_COLAB = "google.colab" in sys.modules
DEFAULT_LR = TrainConfig.__dataclass_fields__["lr"].default  # the form's learning rate: the trainer's recipe


# ---------------------------------------------------------------------------------------------------- 1 · setup


def env(name: str, default, cast=str):
    """The value of environment variable ``name`` (cast), else ``default``: how a headless run overrides a field.

    A blank value counts as unset except for strings; ``bool`` reads 1/true/yes/on as True."""
    value = os.environ.get(name)
    if value is None or (value.strip() == "" and cast is not str):
        return default
    if cast is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    return cast(value.strip())


def pip_install(*args: str) -> None:
    """``pip install -q ARGS`` into this kernel's Python; a failure raises RuntimeError with pip's last words."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    importlib.invalidate_caches()


def skip_install() -> bool:
    """``LD_SKIP_INSTALL``: install nothing (tests, offline machines)."""
    return env("LD_SKIP_INSTALL", False, bool)


class RunStopped(Exception):
    """Stops *Run all* at this cell with one line and no traceback: the cells below must not run."""

    def _render_traceback_(self):
        return [f"stopped: {self}"]


class RunFirst(Exception):
    """A cell was run before the cells it needs: one line saying which to run first."""

    def _render_traceback_(self):
        return [f"error: {self}"]


# Errors the notebook prints as one line: the user's mistakes and trouble they can act on.
NOTEBOOK_ERRORS = USER_ERRORS + (NameError, HfHubHTTPError, NonFiniteLossError, CheckpointWriteError)


def one_line_error(shell, etype, value, tb, tb_offset=None):
    """IPython's custom exception handler: mistakes a user can fix print as one line (the cell still fails, so *Run
    all* stops there); a NameError adds that the cells above come first."""
    hint = ": run the cells above this one first" if etype is NameError else ""
    print(f"error: {first_line(value)}{hint}", file=sys.stderr)


@dataclasses.dataclass
class Hardware:
    """What training runs on: ``"cuda"`` or ``"cpu"``, the GPU's memory (0 without one) and the mixed precision."""

    device: str
    gpu_memory_gib: float = 0.0
    mixed_precision: str = "no"


NO_GPU_WARNING = (
    "No GPU found: section 3 switches to CPU-sized settings (the micro model, 32 px pixels). For the "
    "real thing in Colab: Runtime -> Change runtime type -> T4 GPU, then run all cells again."
)


def setup() -> Hardware:
    """Section 1, after the install: messages advise the notebook's fields (``errors.set_audience``), the user's
    mistakes print as one line, and the versions and the GPU (or a red no-GPU warning) are shown."""
    import liquid_diffusion

    from .latents import native_bf16

    set_audience("notebook")
    if get_ipython() is not None:
        get_ipython().set_custom_exc(NOTEBOOK_ERRORS, one_line_error)
    print(f"liquid_diffusion {liquid_diffusion.__version__} from {Path(liquid_diffusion.__file__).parent}")
    print(f"torch {torch.__version__}")
    if not torch.cuda.is_available():
        display(
            HTML(f'<div style="padding:8px;border:2px solid #d33;color:#d33;font-weight:bold">{NO_GPU_WARNING}</div>')
        )
        return Hardware("cpu")
    properties = torch.cuda.get_device_properties(0)
    hardware = Hardware("cuda", properties.total_memory / 2**30, resolve_mixed_precision("auto"))
    # not a T4's slow emulated bf16: a T4 trains in fp16 with loss scaling instead
    print(
        f"GPU: {properties.name} · {hardware.gpu_memory_gib:.1f} GiB · bf16: {'yes' if native_bf16() else 'no'} · "
        f"mixed precision: {hardware.mixed_precision}"
    )
    return hardware


# ---------------------------------------------------------------------------------------------------- 2 · outputs


def output_root(mount_drive: bool, drive_folder: str) -> Path:
    """Section 2: the folder that holds one sub-folder per run. In Colab, Google Drive when ``mount_drive`` (env
    ``LD_MOUNT_DRIVE``), else the runtime's disk; elsewhere ``./outputs``."""
    mount_drive = env("LD_MOUNT_DRIVE", mount_drive, bool)
    if IN_COLAB and mount_drive:
        from google.colab import drive

        drive.mount("/content/drive")
        root = Path("/content/drive/MyDrive") / drive_folder
        print(f"outputs go to Google Drive: {root}")
    elif IN_COLAB:
        root = Path("/content/outputs")
        print(f"outputs go to {root} on the runtime's disk: a disconnect loses them (tick MOUNT_DRIVE to keep them)")
    else:
        root = Path("outputs").resolve()
        print(f"not in Colab: outputs go to {root}")
    return root


# ---------------------------------------------------------------------------------------------------- 3 · choices


@dataclasses.dataclass
class Choices:
    """The form's fields of section 3 (the notebook's markdown explains each), with the form's defaults."""

    dataset: str = "afhq"
    custom_dataset: str = ""
    preset: str = "tiny"
    resolution: str = "256"
    space: str = "latent"
    steps: int = 20000
    batch_size: int = 0
    learning_rate: float = DEFAULT_LR
    sample_every: int = 500
    eval_every: int = 2000
    cache_latents: bool = False
    class_conditional: bool = False
    guidance_scale: float = 2.0
    vae: str = "stabilityai/sd-vae-ft-mse"
    hub_repo_id: str = ""
    hub_private: bool = False
    run_name: str = ""
    cpu_settings: bool = True
    gradient_checkpointing: str = "auto"
    report_to: str = "none"
    num_samples: int = 16  # images per sample grid (live and final); no form field, env LD_NUM_SAMPLES


# field -> (environment variable, cast): the variable wins over the form
ENV_OVERRIDES = {
    "dataset": ("LD_DATASET", str),
    "preset": ("LD_PRESET", str),
    "resolution": ("LD_RESOLUTION", str),
    "space": ("LD_SPACE", str),
    "vae": ("LD_VAE", str),
    "steps": ("LD_STEPS", int),
    "batch_size": ("LD_BATCH_SIZE", int),
    "learning_rate": ("LD_LR", float),
    "sample_every": ("LD_SAMPLE_EVERY", int),
    "eval_every": ("LD_EVAL_EVERY", int),
    "cache_latents": ("LD_CACHE_LATENTS", bool),
    "hub_repo_id": ("LD_HUB_REPO", str),
    "report_to": ("LD_REPORT_TO", str),
    "num_samples": ("LD_NUM_SAMPLES", int),
    "guidance_scale": ("LD_GUIDANCE_SCALE", float),
    "class_conditional": ("LD_CLASS_CONDITIONAL", bool),
    "gradient_checkpointing": ("LD_GRADIENT_CHECKPOINTING", str),
}


def resolve_choices(choices: Choices, device: str) -> Choices:
    """The choices the run uses: CPU-sized ones on a CPU (``cpu_settings``), the custom dataset for ``"custom"``,
    then the environment overrides; checks the values a form cannot (a one-line ValueError naming the field)."""
    c = dataclasses.replace(choices)
    if device == "cpu" and c.cpu_settings:  # a GPU preset would take hours per grid on a CPU
        c.preset, c.space, c.resolution, c.steps, c.sample_every = "micro", "pixel", "32", min(c.steps, 2000), 250
    if c.dataset == "custom":
        c.dataset = c.custom_dataset.strip()
    for field, (variable, cast) in ENV_OVERRIDES.items():
        setattr(c, field, env(variable, getattr(c, field), cast))
    if not c.dataset:
        raise ValueError("DATASET is 'custom' but CUSTOM_DATASET is empty: enter a Hub id (user/name) or a folder path")
    if not re.fullmatch(r"\s*\d+\s*(px)?\s*", str(c.resolution)):
        raise ValueError(f"RESOLUTION must be a number of pixels such as 256, got {c.resolution!r}")
    c.resolution = int(re.sub(r"\D", "", str(c.resolution)))
    if c.gradient_checkpointing not in ("auto", "on", "off"):
        raise ValueError(f"GRADIENT_CHECKPOINTING must be auto, on or off, got {c.gradient_checkpointing!r}")
    c.cache_latents = c.cache_latents and c.space == "latent"
    c.hub_repo_id = c.hub_repo_id.strip()
    if c.hub_repo_id:
        check_repo_id(c.hub_repo_id)  # now, not after an hour of training
    return c


def dataset_classes(dataset: str, wanted: bool) -> list[str]:
    """The dataset's class names (a ClassLabel column, or one sub-folder per class); [] when it has none, and then,
    when ``wanted``, one line saying the model will be unconditional. A tip when it has classes and they are unused."""
    from .sources import class_names, open_source

    try:
        names = class_names(open_source(dataset, with_labels=True)[0])
    except ValueError as error:  # none (or the dataset cannot be read: the preview will say so)
        if wanted:
            print(f"class labels: none usable ({str(error).split(';')[0]}): training an unconditional model")
        return []
    if len(names) >= 2 and not wanted:
        print(
            f"tip: this dataset has {len(names)} classes ({shown(names, 6)}): tick CLASS_CONDITIONAL to train a "
            "model you can ask for a class"
        )
    return names


def shown(names: list[str], most: int) -> str:
    """Up to ``most`` names, comma-separated, with ", ..." when there are more."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


@dataclasses.dataclass
class Trained:
    """What training left: its newest checkpoint, and whether training reached the last step."""

    checkpoint: Path
    complete: bool


@dataclasses.dataclass
class NotebookRun:
    """What the cells after section 3 need: the choices as used, the ``TrainConfig``, the hardware and the run."""

    choices: Choices
    config: TrainConfig
    hardware: Hardware
    class_names: list[str]
    memory_options: dict
    saved_config: dict | None = None  # the train config of the checkpoint a re-run resumes
    checkpointing_choice: str = "auto"
    expected_gib: float | None = None  # set by describe_model
    trained: Trained | None = None  # set by train, also when it was stopped

    def trained_checkpoint(self) -> Trained:
        """What training left; ``RunFirst`` when the training cell has not saved a checkpoint yet."""
        if self.trained is None:
            raise RunFirst("run the training cell (section 6) first: no checkpoint of this run was trained yet")
        return self.trained

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def device(self) -> str:
        return self.hardware.device


def _batch_and_lr(c: Choices, hardware: Hardware, saved_config: dict | None, checkpointing: bool) -> tuple[int, float]:
    """BATCH_SIZE 0: the trainer's --batch-size auto for this GPU; a resumed run keeps its batch size and rate."""
    probe = TrainConfig(
        preset=c.preset,
        space=c.space,
        resolution=c.resolution,
        cache_latents=c.cache_latents,
        mixed_precision=hardware.mixed_precision,
        gradient_checkpointing=checkpointing,
        lr=c.learning_rate,
        batch_size=c.batch_size if c.batch_size > 0 else "auto",
    )
    resolve_batch_size(probe, torch.device(hardware.device), saved_config, report=lambda line: None)
    return probe.batch_size, probe.lr


def prepare(choices: Choices, hardware: Hardware, root: Path) -> NotebookRun:
    """Section 3: turns the form's ``choices`` into the run's ``TrainConfig``, checked before anything is downloaded
    or trained (a one-line error with the fix), and prints a summary and the same run as a terminal command.

    Installs what the choices need when missing (the FID Inception for EVAL_EVERY, never at the cost of the installed
    torch; a tracker for REPORT_TO) unless ``LD_SKIP_INSTALL``. The run's folder is ``root/RUN_NAME`` (RUN_NAME
    derived from the choices when empty, so the same choices resume the same run) or ``LD_OUTPUT_DIR``."""
    from .features import install_fid_support
    from .latents import vae_dtype

    c = resolve_choices(choices, hardware.device)
    needs_fid = c.eval_every and importlib.util.find_spec("torch_fidelity") is None and not skip_install()
    if needs_fid and not install_fid_support(pip_install):  # says in one line why FID is off
        c.eval_every = 0
    for tracker in trackers(c.report_to):  # TensorBoard comes with Colab, wandb does not
        if importlib.util.find_spec(tracker) is None and not skip_install():
            pip_install(tracker)
    check_report_to(c.report_to)  # a missing package or W&B login: one line now, not when training starts
    names = dataset_classes(c.dataset, c.class_conditional)
    c.class_conditional = c.class_conditional and len(names) >= 2

    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(c.dataset.rstrip("/")).name).strip("-").lower() or "data"
    c.run_name = c.run_name.strip() or (
        f"{slug}-{c.preset}-{c.space}-{c.resolution}px" + ("-cond" if c.class_conditional else "")
    )
    output_dir = Path(env("LD_OUTPUT_DIR", str(root / c.run_name))).expanduser()
    checkpoints = list_checkpoints(output_dir)
    saved_config = json.loads((checkpoints[-1] / "train_config.json").read_text()) if checkpoints else None
    suggested = c.batch_size <= 0 and not saved_config

    # the expected GPU memory is an estimate, not a measurement (the measured peak is printed after training)
    memory_options = dict(
        mixed_precision=hardware.mixed_precision,
        vae_dtype=vae_dtype(torch.device(hardware.device)),
        cache_latents=c.cache_latents,
    )
    checkpointing_choice = c.gradient_checkpointing
    asked = dataclasses.replace(c)  # the form's batch size and rate, before the automatic choice
    c.batch_size, c.learning_rate = _batch_and_lr(asked, hardware, saved_config, False)
    checkpointing = (
        checkpointing_choice == "on"
        or checkpointing_choice == "auto"
        and needs_gradient_checkpointing(
            hardware.gpu_memory_gib, c.preset, c.space, c.resolution, c.batch_size, **memory_options
        )
    )
    memory_options["gradient_checkpointing"] = checkpointing
    if checkpointing and suggested:  # with checkpointing a larger batch may fit
        c.batch_size, c.learning_rate = _batch_and_lr(asked, hardware, saved_config, True)

    config = TrainConfig(
        dataset=c.dataset,
        resolution=c.resolution,
        preset=c.preset,
        space=c.space,
        vae=c.vae,
        cache_latents=c.cache_latents,
        batch_size=c.batch_size,
        steps=c.steps,
        lr=c.learning_rate,
        sample_every=c.sample_every,
        num_sample_images=c.num_samples,
        log_every=max(1, min(50, c.steps // 20)),
        eval_every=c.eval_every,
        checkpoint_every=min(1000, c.steps),
        keep_checkpoints=2,
        output_dir=str(output_dir),
        resume="latest",
        num_workers=2 if hardware.device == "cuda" else 0,
        mixed_precision=hardware.mixed_precision,
        progress_bar=False,
        class_conditional=c.class_conditional,
        guidance_scale=c.guidance_scale,
        gradient_checkpointing=checkpointing,
        report_to=c.report_to,
    )
    config.validate()  # a one-line error with the fix for values that cannot work
    run = NotebookRun(c, config, hardware, names, memory_options, saved_config, checkpointing_choice)
    print_summary(run, cpu_sized=hardware.device == "cpu" and choices.cpu_settings)
    print("\nsame run from a terminal:\n  " + terminal_command(run))
    return run


def print_summary(run: NotebookRun, cpu_sized: bool = False) -> None:
    """The run in a few aligned lines, with warnings about a checkpoint that will not resume and tips."""
    c, config = run.choices, run.config
    if cpu_sized:
        print(
            f"CPU runtime: CPU-sized settings ({c.preset} model, {c.space} space, {c.resolution} px, {c.steps} "
            "steps); expect blurry shapes after about 10 minutes. Untick CPU_SETTINGS to keep your own choices."
        )
    precision = config.mixed_precision if config.mixed_precision != "no" else "fp32"
    checkpointing = (
        " · gradient checkpointing"
        + (" (auto: the batch does not fit without it)" if run.checkpointing_choice == "auto" else "")
        if config.gradient_checkpointing
        else ""
    )
    print(f"dataset     {c.dataset}")
    print(
        f"model       {c.preset} in {c.space} space at {c.resolution}px"
        + (f" (VAE {c.vae})" if c.space == "latent" else "")
    )
    print(
        f"training    {c.steps} steps · batch {c.batch_size} · lr {c.learning_rate:g} · {precision}"
        + (" · cached latents" if c.cache_latents else "")
        + checkpointing
    )
    print(
        f"samples     {f'every {c.sample_every} steps' if c.sample_every else 'at the end only'} "
        f"({c.num_samples} images)"
    )
    if c.class_conditional:
        print(
            f"classes     {len(run.class_names)} ({shown(run.class_names, 12)}): class-conditional, guidance "
            f"{c.guidance_scale:g}, one grid row per class (up to 8)"
        )
    print(f"outputs     {run.output_dir}")
    print(f"hub         {c.hub_repo_id or '(none: the push is skipped)'}")
    if c.report_to != "none":
        print(
            f"tracking    {' and '.join(trackers(c.report_to))}"
            + (f" (TensorBoard logs in {run.output_dir / 'logs'})" if "tensorboard" in trackers(c.report_to) else "")
        )
    saved = run.saved_config
    if saved is not None:
        print(
            f"resume      from {list_checkpoints(run.output_dir)[-1].name} (delete it or change RUN_NAME to start over)"
        )
        conflicts = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(config, k)]
        if conflicts:
            print(
                "WARNING: that checkpoint was trained with "
                + ", ".join(f"{k}={saved.get(k)!r}" for k in conflicts)
                + ": use the same values or another RUN_NAME, or training will refuse to resume"
            )
        if saved.get("class_conditional", False) != c.class_conditional:
            print(
                "WARNING: that checkpoint was trained "
                + ("without" if c.class_conditional else "with")
                + " class labels: change CLASS_CONDITIONAL or RUN_NAME, or training will refuse to resume"
            )
    if c.dataset in ("anime", "huggan/anime-faces") and (c.space, c.resolution) != ("pixel", 64):
        print("tip: the anime faces are 64x64 images; SPACE='pixel' with RESOLUTION=64 suits them best")
    if run.device == "cpu" and c.preset != "micro":
        print(f"note: the {c.preset} preset is meant for a GPU; on this CPU each sample grid takes a long time")


def terminal_command(run: NotebookRun) -> str:
    """``python -m liquid_diffusion train ...`` with the flags that give the same run from a terminal."""
    c, config = run.choices, run.config
    flags = [
        ("dataset", c.dataset),
        ("preset", c.preset),
        ("space", c.space),
        ("resolution", c.resolution),
        ("batch_size", c.batch_size),
        ("steps", c.steps),
        ("lr", c.learning_rate),
        ("sample_every", c.sample_every),
        ("mixed_precision", config.mixed_precision),
        ("output_dir", run.output_dir),
    ]
    flags += [("vae", c.vae)] if c.space == "latent" else []
    flags += [("guidance_scale", c.guidance_scale)] if c.class_conditional else []
    flags += [("report_to", c.report_to)] if c.report_to != "none" else []
    switches = [
        name
        for name, on in (
            ("cache-latents", c.cache_latents),
            ("class-conditional", c.class_conditional),
            ("gradient-checkpointing", config.gradient_checkpointing),
        )
        if on
    ]
    return (
        "python -m liquid_diffusion train "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags)
        + "".join(f" --{name}" for name in switches)
        + " --resume latest"
    )


# ---------------------------------------------------------------------------------------------------- 4 · preview


def show_image(image, width: int = 1024) -> None:
    """Shows a PIL image in the cell's output, at most ``width`` and at least 256 pixels wide."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    display(ImageDisplay(data=buffer.getvalue(), width=min(width, max(256, image.width))))


def png(figure: Figure) -> bytes:
    """A matplotlib figure as PNG bytes (figures are drawn off-screen, so no backend or pyplot state is needed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def preview(run: NotebookRun) -> None:
    """Section 4: the first images of the dataset exactly as training sees them (resized, cropped, flipped and, in
    latent space, after a VAE round trip), saved as ``preview.png`` in the run's folder, and a line counting images
    read, skipped and upscaled."""
    from .data import ImageBatchStream, image_grid
    from .latents import FrozenVAE, vae_dtype

    c, config = run.choices, run.config
    stream = ImageBatchStream(
        c.dataset,
        c.resolution,
        c.num_samples,
        flip=config.flip,
        random_crop=config.random_crop,
        shuffle_buffer=0,
        seed=config.seed,
        num_epochs=1,
    )  # no shuffle buffer to fill first
    pixels = next(iter(stream))
    if c.space == "latent":
        vae = FrozenVAE(c.vae, device=run.device, dtype=vae_dtype(torch.device(run.device)))
        pixels = vae.decode(vae.encode(pixels)).cpu()
        del vae
    grid = image_grid(pixels)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    grid.save(run.output_dir / "preview.png")
    show_image(grid, width=768)
    print(
        f"{c.dataset}: {stream.stats} · {len(pixels)} images at {c.resolution}px"
        + (" after the VAE round trip" if c.space == "latent" else "")
    )


# ---------------------------------------------------------------------------------------------------- 5 · model


def describe_model(run: NotebookRun) -> float:
    """Section 5: the chosen preset's parameters by part of the U-Net, and the GPU memory training is expected to
    need at half, this and twice the batch size (an estimate); warns when it comes close to this GPU's memory.
    Returns the estimate for this run's batch size (also kept as ``run.expected_gib``)."""
    from . import LiquidDiffusionUNet
    from .latents import VAE_DOWNSAMPLE_FACTOR

    c, options = run.choices, run.memory_options
    model = LiquidDiffusionUNet.from_preset(
        c.preset,
        in_channels=4 if c.space == "latent" else 3,
        num_classes=len(run.class_names) if c.class_conditional else 0,
    )

    def count(*modules) -> int:
        return sum(p.numel() for module in modules for p in module.parameters())

    parts = {
        "encoder": count(model.encoder, model.downsamples, model.stem),
        "bottleneck": count(model.bottleneck),
        "decoder": count(model.decoder, model.upsamples, model.fusions, model.head),
        "time embedding": count(model.time_embedder),
    }
    if c.class_conditional:
        parts["label embedding"] = count(model.class_embedder)
    print(
        f"LiquidDiffusionUNet '{c.preset}': {count(model) / 1e6:.1f}M parameters, widths {tuple(model.config.widths)}"
        f", depths {tuple(model.config.depths)}, decoder widths {model.decoder_widths}, no attention"
    )
    for name, n in parts.items():
        print(f"  {name:<15} {n / 1e6:6.2f}M")
    side = c.resolution // (VAE_DOWNSAMPLE_FACTOR if c.space == "latent" else 1)
    print(
        f"input: {model.config.in_channels} x {side} x {side}"
        + (f" latents of {c.resolution}px images" if c.space == "latent" else " pixels")
    )

    def estimate(batch: int, **changes) -> float:
        return estimate_training_memory_gib(c.preset, c.space, c.resolution, batch, **{**options, **changes})

    print("\nexpected GPU memory for training (an estimate, not a measurement):")
    for b in sorted({max(1, c.batch_size // 2), c.batch_size, c.batch_size * 2}):
        print(f"  batch {b:>3}: ~{estimate(b):.1f} GiB" + ("  <- this run" if b == c.batch_size else ""))
    run.expected_gib = expected = estimate(c.batch_size)
    checkpointing = options["gradient_checkpointing"]
    if checkpointing:
        print(
            f"  (with gradient checkpointing; ~{estimate(c.batch_size, gradient_checkpointing=False):.1f} GiB "
            "without it)"
        )
    gpu = run.hardware.gpu_memory_gib
    if gpu and expected > 0.9 * gpu:
        print(
            f"WARNING: ~{expected:.1f} GiB is close to or above this GPU's {gpu:.1f} GiB: lower BATCH_SIZE or "
            "RESOLUTION"
            + ("" if checkpointing else ", or set GRADIENT_CHECKPOINTING on,")
            + " if training runs out of memory"
        )
    elif not gpu:
        print("(no GPU here: the figures are what a GPU would need)")
    return expected


# ---------------------------------------------------------------------------------------------------- 6 · train


class LiveDashboard(TrainerCallback):
    """The training cell's one panel, three display handles updated in place: the progress line (step, loss, lr,
    images/s, time left, last checkpoint), the latest EMA sample grid, and the curves (training and validation loss,
    the loss per noise level, and with EVAL_EVERY the KID and FID). A resumed run shows its whole history."""

    def __init__(self, config: TrainConfig):
        from .model_card import read_metrics

        self.config, self.losses, self.t_bins, self.started = config, {}, None, time.time()
        self.evals = {}  # step -> {"kid", "kid_std", "fid", ...} with EVAL_EVERY
        self.validation = {}  # step -> (val_loss of the EMA weights, of the raw weights)
        self.checkpoint, self.first_seen = "none yet", None  # (step, time) of this session's first log
        for record in read_metrics(Path(config.output_dir) / METRICS_FILE):
            if "loss" in record:
                self.losses[record["step"]] = record["loss"]
                self.t_bins = record.get("loss_t_bins")
            if "kid" in record:
                self.evals[record["step"]] = record
            if "val_loss" in record:
                self.validation[record["step"]] = (record["val_loss"], record["val_loss_raw"])
        self.status = display(
            HTML(
                "<b>starting ...</b> (streaming the first images"
                + ("; encoding the whole dataset into the latent cache first" if config.cache_latents else "")
                + ")"
            ),
            display_id=True,
        )
        samples = sorted((Path(config.output_dir) / "samples").glob("step-*.png"))
        first = f"at step {config.sample_every}" if config.sample_every else "at the end of training"
        self.grid = display(
            ImageDisplay(filename=str(samples[-1]), width=512)
            if samples
            else HTML(f"<i>the first sample grid appears {first}</i>"),
            display_id=True,
        )
        self.curves = display(HTML(""), display_id=True)
        if self.losses:  # also when the run is already finished and no new step will be logged
            self.draw_curves()

    def progress(self, step: int, text: str) -> HTML:
        """A progress bar at ``step`` of the run's steps, then ``text`` (HTML)."""
        return HTML(f'<progress value="{step}" max="{self.config.steps}" style="width:60%"></progress> {text}')

    def on_log(self, trainer, record):
        step, steps = record["step"], self.config.steps
        self.losses = {s: v for s, v in self.losses.items() if s < step}  # drop steps redone after a resume
        self.losses[step] = record["loss"]
        self.t_bins = record.get("loss_t_bins")
        # time left from this session's average pace, which includes sample grids and checkpoints (an interval's
        # images/s does not, and jumps whenever a grid is drawn)
        if self.first_seen is None:
            self.first_seen = (step - self.config.log_every, self.started)
        pace = (time.time() - self.first_seen[1]) / max(step - self.first_seen[0], 1)
        minutes = (steps - step) * pace / 60
        left = f"~{minutes:.0f} min left" if minutes >= 1 else "less than a minute left"
        validation = f"validation loss {self.validation[max(self.validation)][0]:.4f} · " if self.validation else ""
        self.status.update(
            self.progress(
                step,
                (
                    f"<b>step {step}/{steps}</b> · loss {record['loss']:.4f} · lr {record['lr']:.2e} · "
                    f"grad norm {record['grad_norm']:.2f} · {record['images_per_s']:.1f} img/s · {validation}{left} · "
                    f"skipped images: {record.get('images_skipped', 0)} · last checkpoint: {self.checkpoint}"
                ),
            )
        )
        self.draw_curves()

    def on_sample(self, trainer, step, path):
        self.grid.update(ImageDisplay(filename=str(path), width=512))

    def on_checkpoint(self, trainer, step, path):
        self.checkpoint = f"step {step}"

    def on_validation(self, trainer, record):
        self.validation = {s: v for s, v in self.validation.items() if s < record["step"]}
        self.validation[record["step"]] = (record["val_loss"], record["val_loss_raw"])
        self.draw_curves()

    def on_eval(self, trainer, record):
        self.evals = {s: r for s, r in self.evals.items() if s < record["step"]}
        self.evals[record["step"]] = record
        self.draw_curves()

    def finish(self, step: int, stopped: bool = False) -> None:
        """The progress line's last state: finished or stopped, minutes in this session, where the checkpoint is."""
        minutes = (time.time() - self.started) / 60
        self.status.update(
            self.progress(
                step,
                (
                    f"<b>{'stopped' if stopped else 'finished'} at step {step}</b> · {minutes:.1f} min in this session · "
                    f"last checkpoint: {self.checkpoint} in {html.escape(str(self.config.output_dir))}"
                ),
            )
        )

    def figure(self) -> Figure:
        """The curves: loss over steps (log scale when it spans more than 10x) with the validation loss, the loss per
        noise level t of the last interval, and under them, with evaluations, KID (with its std) and FID."""
        figure = Figure(figsize=(10, 6.4 if self.evals else 3.2))
        axes = figure.subplots(2 if self.evals else 1, 2)
        ax_loss, ax_t = axes[0] if self.evals else axes
        steps = sorted(self.losses)
        ax_loss.plot(steps, [self.losses[s] for s in steps], color="tab:blue", label="training")
        if self.validation:  # held-out images at fixed t and noise: it moves only when the model does
            val_steps = sorted(self.validation)
            ax_loss.plot(
                val_steps,
                [self.validation[s][0] for s in val_steps],
                color="tab:green",
                marker="o",
                label="validation (EMA)",
            )
            ax_loss.plot(
                val_steps,
                [self.validation[s][1] for s in val_steps],
                color="tab:green",
                marker="o",
                alpha=0.5,
                linestyle="--",
                label="validation (raw)",
            )
            ax_loss.legend()
        ax_loss.set(xlabel="step", ylabel="loss (MSE on velocity)", title="training and validation loss")
        values = [self.losses[s] for s in steps if self.losses[s] == self.losses[s]]  # finite ones
        if values and min(values) > 0 and max(values) > 10 * min(values):
            ax_loss.set_yscale("log")
        if self.t_bins:
            centers = [(i + 0.5) / len(self.t_bins) for i in range(len(self.t_bins))]
            values = [v if v is not None else float("nan") for v in self.t_bins]
            ax_t.bar(centers, values, width=0.9 / len(self.t_bins), color="tab:orange")
        ax_t.set(xlabel="t (0 = data, 1 = noise)", ylabel="loss", title="loss per noise level (last interval)")
        if self.evals:
            steps = sorted(self.evals)
            axes[1, 0].errorbar(
                steps,
                [self.evals[s]["kid"] for s in steps],
                yerr=[self.evals[s]["kid_std"] for s in steps],
                marker="o",
                color="tab:green",
            )
            axes[1, 0].set(xlabel="step", ylabel="KID", title=f"KID ({self.evals[steps[-1]]['eval_samples']} samples)")
            axes[1, 1].plot(steps, [self.evals[s]["fid"] for s in steps], marker="o", color="tab:red")
            axes[1, 1].set(xlabel="step", ylabel="FID", title="FID (biased at this N: compare at equal N only)")
        figure.tight_layout()
        return figure

    def draw_curves(self) -> None:
        self.curves.update(ImageDisplay(data=png(self.figure())))


def show_tensorboard(run: NotebookRun) -> None:
    """With REPORT_TO tensorboard (or all): TensorBoard inline, above the training panel."""
    shell = get_ipython()
    if "tensorboard" in trackers(run.choices.report_to) and shell is not None:
        shell.run_line_magic("load_ext", "tensorboard")  # %load_ext tensorboard
        shell.run_line_magic("tensorboard", f'--logdir "{run.output_dir / "logs"}"')  # %tensorboard --logdir ...


def train(run: NotebookRun) -> Trained:
    """Section 6: trains with the live panel, resuming from the newest checkpoint in the run's folder; the result is
    also kept as ``run.trained`` for the cells below.

    An interrupt (■) finishes the step, saves a checkpoint and raises ``RunStopped`` (one line: run the notebook again
    to resume), so *Run all* pushes nothing; the cells below, run by hand, use that checkpoint. On a GPU, prints the
    measured peak memory beside the estimate."""
    from .trainer import Trainer

    run.trained = None
    show_tensorboard(run)
    dashboard = LiveDashboard(run.config)
    trainer = Trainer(run.config, callbacks=[dashboard])
    cuda = run.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        checkpoint = trainer.train()
    except KeyboardInterrupt:
        dashboard.finish(trainer.step, stopped=True)
        saved = list_checkpoints(run.output_dir)
        run.trained = Trained(saved[-1], complete=False) if saved else None
        raise RunStopped(
            f"training stopped at step {trainer.step} and saved "
            f"{saved[-1].name if saved else 'no checkpoint'}. Run the notebook again (Runtime -> Run "
            "all) to resume; nothing below ran or was pushed."
        ) from None
    dashboard.finish(trainer.step)
    print(f"done: {checkpoint}")
    if cuda:
        estimated = run.expected_gib
        print(
            f"measured peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated by PyTorch"
            + ("" if estimated is None else f" (estimated ~{estimated:.1f} GiB including the CUDA context)")
        )
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if checkpoint is None:
        raise RuntimeError(
            "no checkpoint was saved, so there is nothing to sample from yet: run the training cell again"
        )
    run.trained = Trained(Path(checkpoint), complete=True)
    return run.trained


# ---------------------------------------------------------------------------------------------------- 7 · samples


def compare_samplers(run: NotebookRun) -> None:
    """Section 7: the EMA weights sampled from the same noise with Euler and Heun at 25 and 50 steps, in a 2x2
    panel titled with each sampling time; each grid saved under ``samples/`` (``final-SAMPLER-STEPS.png``)."""
    import numpy as np
    from PIL import Image

    from .sampling import class_grid_labels, generate, load_for_sampling, save_grid

    trained = run.trained_checkpoint()
    unet, vae, resolution = load_for_sampling(str(trained.checkpoint), use_ema=True, device=run.device)
    if vae is not None:
        vae.chunk_size = 4  # decode a few images at a time: 512px grids fit a T4 too
    count = run.choices.num_samples
    figure = Figure(figsize=(12, 12.6))
    axes = figure.subplots(2, 2)
    for row, sampler in enumerate(("euler", "heun")):
        for column, steps in enumerate((25, 50)):
            start = time.time()
            labels, columns = class_grid_labels(unet, count)  # one row per class (None: unconditional)
            images = generate(
                unet,
                vae,
                count if labels is None else len(labels),
                steps,
                sampler,
                seed=0,
                resolution=resolution,
                class_labels=labels,
                guidance_scale=run.choices.guidance_scale,
            )
            seconds = time.time() - start
            path = save_grid(images, run.output_dir / "samples" / f"final-{sampler}-{steps}.png", columns)
            axes[row, column].imshow(np.asarray(Image.open(path)), interpolation="nearest")
            axes[row, column].set_title(f"{sampler.capitalize()}, {steps} steps ({seconds:.1f} s)")
            axes[row, column].axis("off")
    figure.tight_layout()
    figure.savefig(run.output_dir / "samples" / "final-comparison.png", dpi=90)
    display(ImageDisplay(data=png(figure)))


def class_picker(run: NotebookRun) -> None:
    """Section 7b: for a class-conditional model, a row of the first class at GUIDANCE_SCALE, then a class dropdown,
    a guidance slider and a seed box that sample a row per *Run Interact*; for an unconditional model, one line."""
    import ipywidgets as widgets

    from .data import image_grid
    from .sampling import generate, load_for_sampling

    trained = run.trained_checkpoint()
    if not run.choices.class_conditional:
        print(
            "this model is unconditional (the dataset has no class labels, or CLASS_CONDITIONAL is off): "
            "no class to pick"
        )
        return
    unet, vae, resolution = load_for_sampling(str(trained.checkpoint), use_ema=True, device=run.device)
    count, names, guidance = min(8, run.choices.num_samples), run.class_names, run.choices.guidance_scale

    def show_class(class_name: str, guidance_scale: float, seed: int = 0) -> None:
        labels = unet.class_ids(class_name).expand(count)
        images = generate(
            unet,
            vae,
            count,
            25,
            "euler",
            seed=seed,
            resolution=resolution,
            class_labels=labels,
            guidance_scale=guidance_scale,
        )
        show_image(image_grid(images, columns=count))
        print(f"{class_name} · guidance {guidance_scale:g} · seed {seed}")

    show_class(names[0], guidance)
    widgets.interact_manual(
        show_class,
        class_name=widgets.Dropdown(options=names, value=names[0], description="class"),
        guidance_scale=widgets.FloatSlider(value=guidance, min=1.0, max=8.0, step=0.5, description="guidance"),
        seed=widgets.IntText(value=0, description="seed"),
    )


# ---------------------------------------------------------------------------------------------------- 8 · hub


def push(run: NotebookRun) -> bool:
    """Section 8: exports the checkpoint as a pipeline and uploads it to HUB_REPO_ID, logging in first when no token
    is found (``notebook_login``: a link and a code, or a token box); returns whether it was pushed. Skipped with one
    line when no repo id is set, and when the login did not complete."""
    trained, repo_id = run.trained_checkpoint(), run.choices.hub_repo_id
    if not repo_id:
        print("no HUB_REPO_ID set: skipping the push to the Hub")
        return False
    from huggingface_hub import get_token, notebook_login, whoami

    from .publish import push_to_hub

    if get_token() is None:
        notebook_login()
    if get_token() is None:
        print("not logged in yet: log in with the prompt above, then run this cell again")
        return False
    print(f"logged in as {whoami()['name']}")
    if not trained.complete:
        print(f"training did not finish: pushing the newest checkpoint, {trained.checkpoint.name}")
    url = push_to_hub(trained.checkpoint, repo_id, private=run.choices.hub_private)
    print(f"pushed {trained.checkpoint.name} to {url}")
    return True


# ---------------------------------------------------------------------------------------------------- 9 · load back


def load_back(run: NotebookRun, pushed: bool) -> None:
    """Section 9: loads the pushed repo (without a push, the same export written under ``export/``) with
    ``LiquidDiffusionPipeline.from_pretrained``, as any user would, and shows a row of samples (with classes, by
    name)."""
    from . import LiquidDiffusionPipeline
    from .data import image_grid
    from .export import export_checkpoint

    trained, repo_id = run.trained_checkpoint(), run.choices.hub_repo_id
    if pushed:
        source = repo_id
    else:
        source = run.output_dir / "export" / trained.checkpoint.name
        if not (source / "model_index.json").exists():
            shutil.rmtree(source, ignore_errors=True)  # an export interrupted half-way
            export_checkpoint(trained.checkpoint, source, repo_id=repo_id or None)
        print(f"exported locally to {source} (the same folder a push uploads)")
    pipe = LiquidDiffusionPipeline.from_pretrained(source).to(run.device)
    count, names = min(8, run.choices.num_samples), run.class_names
    labels = [names[i % len(names)] for i in range(count)] if run.choices.class_conditional else None  # names work
    images = pipe(
        batch_size=count,
        num_inference_steps=25,
        generator=torch.Generator().manual_seed(1),
        class_labels=labels,
        output_type="pt",
    ).images  # the default output_type="pil" gives PIL images
    show_image(image_grid(images.cpu() * 2 - 1, columns=count))
    print(f"loaded {source}: {count} images at {images.shape[-1]}px")


# ---------------------------------------------------------------------------------------------------- 11 · few-step


def few_step(run: NotebookRun, enabled: bool, pairs: int, steps: int, distill_steps: int) -> Path | None:
    """Section 11 (optional): the trained model made into a few-step one by reflow (``reflow.py``, docs/reflow.md)
    in ``OUTPUT_DIR-reflow-STEP``: ``pairs`` (noise, teacher sample) pairs cached on disk, ``steps`` reflow steps, then
    (``distill_steps`` > 0) a t = 1 stage in ``OUTPUT_DIR-1step-STEP`` on the same pairs, for 1-step sampling. Both are
    training runs: running the cell again resumes them. Shows the teacher's 25 Euler steps beside the result's 1, 2
    and 4 steps from the same noise; returns the result's pipeline folder (push it with ``push``)."""
    import numpy as np
    from PIL import Image

    from .reflow import ReflowConfig, ReflowTrainer
    from .sampling import generate, load_for_sampling, save_grid

    enabled = env("LD_REFLOW", enabled, bool)
    pairs, steps = env("LD_REFLOW_PAIRS", pairs, int), env("LD_REFLOW_STEPS", steps, int)
    distill_steps = env("LD_REFLOW_DISTILL_STEPS", distill_steps, int)
    if not enabled:
        print("few-step model: off (tick REFLOW to make one from the trained model)")
        return None
    teacher = run.trained_checkpoint().checkpoint
    tag = teacher.name.removeprefix("checkpoint-")  # a teacher trained on later is another teacher: its own folders
    base = dict(teacher=str(teacher), pairs=pairs, resume="latest", mixed_precision=run.config.mixed_precision)
    stages = [("reflow", ReflowConfig(output_dir=f"{run.output_dir}-reflow-{tag}", steps=steps, **base))]
    if distill_steps > 0:
        first = Path(stages[0][1].output_dir)
        stages.append(
            (
                "1-step",
                ReflowConfig(
                    output_dir=f"{run.output_dir}-1step-{tag}",
                    steps=distill_steps,
                    init=str(first / "pipeline"),
                    pair_cache_dir=str(first / "pair-cache"),
                    distill_t=1.0,
                    **base,
                ),
            )
        )
    for name, config in stages:
        print(f"{name}: {config.steps} steps on {pairs} pairs in {config.output_dir}")
        trainer = ReflowTrainer(config)
        try:
            trainer.train()
        except KeyboardInterrupt:
            raise RunStopped(
                f"{name} stopped at step {trainer.step} and saved a checkpoint; run this cell again to resume it"
            ) from None
        result = trainer.pipeline_dir
        del trainer
        gc.collect()

    figure = Figure(figsize=(16, 4.6))
    axes = figure.subplots(1, 4)
    count = run.choices.num_samples
    for axis, (label, folder, n, ema) in zip(
        axes,
        [("teacher, 25 steps", teacher, 25, True)]
        + [(f"few-step, {n} step{'s' * (n > 1)}", result, n, False) for n in (1, 2, 4)],
    ):
        unet, vae, resolution = load_for_sampling(str(folder), use_ema=ema, device=run.device)
        start = time.time()
        images = generate(unet, vae, count, n, "euler", seed=0, resolution=resolution)
        path = save_grid(images, Path(result).parent / "samples" / f"compare-{n}.png")
        axis.imshow(np.asarray(Image.open(path)), interpolation="nearest")
        axis.set_title(f"{label} ({time.time() - start:.1f} s)")
        axis.axis("off")
    figure.tight_layout()
    display(ImageDisplay(data=png(figure)))
    print(
        f"few-step pipeline: {result} (LiquidDiffusionPipeline.from_pretrained(...)(num_inference_steps=1..4); "
        f"push it with: python -m liquid_diffusion push --checkpoint {result} --repo-id USER/NAME)"
    )
    return Path(result)


# ---------------------------------------------------------------------------------------------------- 10 · FID, KID


def evaluate(run: NotebookRun, num_samples: int) -> dict | None:
    """Section 10: FID and KID of the best checkpoint (``best.json``, else the final one) on ``num_samples`` images
    (env ``LD_EVAL_SAMPLES``), written to ``evaluation.json``; one line and None when it cannot run (e.g. offline)."""
    from .evaluate import evaluate_checkpoint, read_best, summary_line

    trained = run.trained_checkpoint()
    num_samples = env("LD_EVAL_SAMPLES", num_samples, int)
    best = read_best(run.output_dir)
    checkpoint = trained.checkpoint
    if best and (run.output_dir / best["checkpoint"]).is_dir():
        checkpoint = run.output_dir / best["checkpoint"]
    try:
        evaluation = evaluate_checkpoint(
            checkpoint, num_samples=num_samples, device=run.device, reference_root=run.output_dir / "fid-reference"
        )
    except ValueError as error:  # e.g. offline: the Inception weights cannot be downloaded
        print(f"skipping FID/KID: {error}")
        return None
    finally:
        if run.device == "cuda":
            torch.cuda.empty_cache()
    (run.output_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
    print(f"{checkpoint.name}: {summary_line(evaluation)}")
    return evaluation
