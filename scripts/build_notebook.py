"""Writes ``LiquidDiffusion_Training.ipynb`` from the cell sources below, so the notebook stays reviewable as code.

    python scripts/build_notebook.py            # rewrite the notebook next to the repo root
    python scripts/build_notebook.py --check    # exit 1 if the committed notebook differs from this script

The notebook holds no model or training code: every cell imports ``liquid_diffusion``. Each code cell is led by a
markdown cell saying what it does and what to expect. Every choice can be overridden by an ``LD_*`` environment
variable, so ``tests/test_notebook.py`` runs it top to bottom on a CPU with nbclient.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from liquid_diffusion.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "LiquidDiffusion_Training.ipynb"
# Where a notebook opened from GitHub installs the package from: the repository named in pyproject.toml.
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
PACKAGE_SPEC = f"git+{REPOSITORY}.git"

# ----------------------------------------------------------------------------------------------------------------
# Cells: (id, markdown lead, code) in order. Code cells with ``# @param`` fields render as Colab forms.
# ----------------------------------------------------------------------------------------------------------------

INTRO = """\
# LiquidDiffusion: train an attention-free diffusion model in Colab

Pick a dataset, pick a model size, press **Runtime → Run all**, and watch sample grids improve while it trains.
At the end the model (EMA weights, config, model card and sample grid) goes to the Hugging Face Hub.

**LiquidDiffusion** is a U-Net without any attention: every block is a *liquid* CfC gate (closed-form continuous-time
cells) plus a depthwise convolution with a global channel gate, trained with **rectified flow** (t = 0 is data,
t = 1 is noise) in the latent space of the frozen SD-VAE, or directly on pixels for small images.

| step | what happens |
|---|---|
| 1 · Setup | installs the `liquid_diffusion` package and reports the GPU |
| 2 · Outputs | optionally mounts Google Drive, so a disconnect loses nothing and a re-run resumes |
| 3 · Choices | dataset, model size, resolution, steps, batch size, ... as form fields |
| 4 · Preview | a grid of training images exactly as the model will see them |
| 5 · Model | parameter count and expected GPU memory |
| 6 · Train | one live panel: progress, latest sample grid, loss curves |
| 7 · Final samples | Euler vs Heun at 25 and 50 steps; with class labels, a class picker and a guidance slider |
| 8 · Hub | log in and push (skipped when no repo id is set) |
| 9 · Load back | load the pushed model as any user would, and sample |
| 10 · FID and KID | the quality numbers, against the training images |

**Runtime:** *Runtime → Change runtime type → T4 GPU* (free tier) or better. On a CPU runtime the notebook switches
to CPU-sized settings (the `micro` model on 32 px pixels), which show shapes emerging within about 10 minutes.

**Headless use:** every choice can be overridden by an environment variable (`LD_DATASET`, `LD_PRESET`,
`LD_RESOLUTION`, `LD_SPACE`, `LD_VAE`, `LD_STEPS`, `LD_BATCH_SIZE`, `LD_SAMPLE_EVERY`, `LD_OUTPUT_DIR`, `LD_HUB_REPO`;
also `LD_LR`, `LD_NUM_SAMPLES`, `LD_MOUNT_DRIVE`, `LD_CACHE_LATENTS`, `LD_CLASS_CONDITIONAL`, `LD_GUIDANCE_SCALE`,
`LD_GRADIENT_CHECKPOINTING`, `LD_REPORT_TO`, `LD_PACKAGE_SPEC`, `LD_SKIP_INSTALL`), so the notebook also runs
unattended, e.g. `jupyter nbconvert --to notebook --execute`.
"""

SETUP_MD = """\
## 1 · Setup

Installs the package and checks the hardware. When this notebook sits in a checkout of the repository, the package is
installed **editable from that checkout** (nothing is installed when its dependencies are already present). Otherwise
(e.g. opened from GitHub in Colab) it is installed with pip from `PACKAGE_SPEC`, the project's repository (any pip
spec works: a fork's git URL, a wheel, a version).

From here on, a mistake (a bad choice, a Hub error, a cell run before the ones it needs) prints one line that says
what to do, and stops *Run all* there.

**Expect:** about a minute on a fresh Colab runtime, then one line with the GPU's name, memory and bf16 support.
With no GPU you get one warning, and section 3 picks CPU-sized settings.
"""

SETUP = '''\
# @title 1 · Setup: install LiquidDiffusion and check the GPU
PACKAGE_SPEC = "{PACKAGE_SPEC}"  # @param {type:"string"}

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

IN_COLAB = "google.colab" in sys.modules


def env(name, default, cast=str):
    """The value of environment variable ``name`` (cast), else ``default``: how a headless run overrides a field."""
    value = os.environ.get(name)
    if value is None or (value.strip() == "" and cast is not str):
        return default
    if cast is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    return cast(value.strip())


def find_checkout(start):
    """A repository checkout (holding pyproject.toml and liquid_diffusion/) at or above ``start``, or right below it
    (e.g. after ``!git clone ...`` in Colab's /content), else None."""
    for folder in (start, *start.parents, *sorted(p for p in start.iterdir() if p.is_dir())):
        if (folder / "pyproject.toml").is_file() and (folder / "liquid_diffusion" / "__init__.py").is_file():
            return folder
    return None


def pip_install(*args):
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"pip install {' '.join(args)} failed:\\n{result.stderr[-3000:]}")
    importlib.invalidate_caches()


PACKAGE_SPEC = env("LD_PACKAGE_SPEC", PACKAGE_SPEC)
DEPENDENCIES = ("torch", "diffusers", "accelerate", "datasets", "huggingface_hub", "safetensors", "PIL",
                "matplotlib", "ipywidgets", "tqdm", "torchmetrics")
missing = [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]
CHECKOUT = find_checkout(Path.cwd().resolve())
if CHECKOUT is not None:
    sys.path.insert(0, str(CHECKOUT))  # import the checkout itself, even before an editable install takes effect
    if missing and not env("LD_SKIP_INSTALL", False, bool):
        print(f"installing the checkout {CHECKOUT} (editable) and its dependencies ({', '.join(missing)}) ...")
        pip_install("-e", str(CHECKOUT))
    else:
        print(f"using the checkout {CHECKOUT} (its dependencies are installed)")
elif importlib.util.find_spec("liquid_diffusion") is None or missing:
    print(f"installing {PACKAGE_SPEC} ...")
    pip_install(PACKAGE_SPEC)
    print("installed (if Colab asks to restart the runtime, do so and run all cells again)")

import torch
from huggingface_hub.errors import HfHubHTTPError
from IPython import get_ipython
from IPython.display import HTML, display

import liquid_diffusion
from liquid_diffusion.checkpoints import CheckpointWriteError
from liquid_diffusion.config import resolve_mixed_precision
from liquid_diffusion.errors import USER_ERRORS, first_line
from liquid_diffusion.latents import native_bf16
from liquid_diffusion.stopping import NonFiniteLossError


class RunStopped(Exception):
    """Stops *Run all* at this cell with one line and no traceback: the cells below must not run."""

    def _render_traceback_(self):
        return [f"stopped: {self}"]


def one_line_error(shell, etype, value, tb, tb_offset=None):
    """Mistakes a user can fix print as one line (the cell still fails, so *Run all* stops there)."""
    hint = ": run the cells above this one first" if etype is NameError else ""
    print(f"error: {first_line(value)}{hint}", file=sys.stderr)


if get_ipython() is not None:
    get_ipython().set_custom_exc(
        USER_ERRORS + (NameError, HfHubHTTPError, NonFiniteLossError, CheckpointWriteError), one_line_error)

print(f"liquid_diffusion {liquid_diffusion.__version__} from {Path(liquid_diffusion.__file__).parent}")
print(f"torch {torch.__version__}")
if torch.cuda.is_available():
    DEVICE = "cuda"
    properties = torch.cuda.get_device_properties(0)
    GPU_MEMORY_GIB = properties.total_memory / 2**30
    NATIVE_BF16 = native_bf16()  # not a T4's slow emulated bf16: a T4 trains in fp16 with loss scaling instead
    MIXED_PRECISION = resolve_mixed_precision("auto")
    print(f"GPU: {properties.name} · {GPU_MEMORY_GIB:.1f} GiB · bf16: {'yes' if NATIVE_BF16 else 'no'} · "
          f"mixed precision: {MIXED_PRECISION}")
else:
    DEVICE = "cpu"
    GPU_MEMORY_GIB = 0.0
    MIXED_PRECISION = "no"
    warning = ("No GPU found: section 3 switches to CPU-sized settings (the micro model, 32 px pixels). For the real "
               "thing in Colab: Runtime -> Change runtime type -> T4 GPU, then run all cells again.")
    display(HTML(f'<div style="padding:8px;border:2px solid #d33;color:#d33;font-weight:bold">{warning}</div>'))
'''

SETUP = SETUP.replace('"{PACKAGE_SPEC}"', f'"{PACKAGE_SPEC}"')  # the repository of pyproject.toml

OUTPUTS_MD = """\
## 2 · Where to keep outputs

Checkpoints (the two newest are kept), sample grids and `metrics.jsonl` go to one output folder per run. In Colab,
tick `MOUNT_DRIVE` to keep it on Google Drive (`MyDrive/<DRIVE_FOLDER>/<run name>`): Colab runtimes disconnect, and
whatever sits on the runtime's disk is then lost. **Re-running the notebook with the same choices resumes from the newest checkpoint found there**,
exactly where it stopped (same data position, optimizer and EMA state).

**Expect:** in Colab, a Google authorisation prompt the first time; elsewhere outputs go to `./outputs/`.
"""

OUTPUTS = '''\
# @title 2 · Where to keep outputs
MOUNT_DRIVE = True  # @param {type:"boolean"}
DRIVE_FOLDER = "LiquidDiffusion"  # @param {type:"string"}

MOUNT_DRIVE = env("LD_MOUNT_DRIVE", MOUNT_DRIVE, bool)
if IN_COLAB and MOUNT_DRIVE:
    from google.colab import drive

    drive.mount("/content/drive")
    OUTPUT_ROOT = Path("/content/drive/MyDrive") / DRIVE_FOLDER
    print(f"outputs go to Google Drive: {OUTPUT_ROOT}")
elif IN_COLAB:
    OUTPUT_ROOT = Path("/content/outputs")
    print(f"outputs go to {OUTPUT_ROOT} on the runtime's disk: a disconnect loses them (tick MOUNT_DRIVE to keep them)")
else:
    OUTPUT_ROOT = Path("outputs").resolve()
    print(f"not in Colab: outputs go to {OUTPUT_ROOT}")
'''

CHOICES_MD = """\
## 3 · Choices

| field | meaning |
|---|---|
| `DATASET` | one of the six verified datasets, or `custom` with `CUSTOM_DATASET` = any Hub id (`user/name`) or a folder of images (e.g. on your Drive) |
| `PRESET` | model size: `tiny` (~23M parameters, T4-friendly), `small` (~68M), `base` (~153M); `micro` (2M) for CPU demos |
| `RESOLUTION` | training size in pixels; 256 or 512 in latent space, 64 in pixel space for the 64x64 anime faces |
| `SPACE` | `latent` (through the frozen SD-VAE, for 256/512 px) or `pixel` (no VAE, small images) |
| `STEPS` | optimizer steps in total (a resumed run continues up to this number) |
| `BATCH_SIZE` | `0` = automatic (`--batch-size auto`): the largest that fits this GPU by the memory estimate, capped by its class; a resumed run keeps its own |
| `LEARNING_RATE` | AdamW learning rate at batch 8 (after a linear warmup); with `BATCH_SIZE` 0 it is scaled by sqrt(batch / 8) |
| `SAMPLE_EVERY` | steps between live sample grids |
| `EVAL_EVERY` | steps between KID/FID measurements of the EMA weights on 1,000 samples, plotted under the loss (`best.json` names the best checkpoint); `0` = off (env: `LD_EVAL_EVERY`) |
| `CACHE_LATENTS` | latent space only: encode every image once with the VAE, then train on latents alone (much faster per step, a one-off wait that grows with the dataset) |
| `CLASS_CONDITIONAL` | when the dataset has class labels (a `ClassLabel` column, or a folder with one sub-folder per class), train a class-conditional model with classifier-free guidance, so you can ask for a class; the cell says when the dataset has labels; ignored for datasets without them |
| `GUIDANCE_SCALE` | classifier-free guidance of the sample grids (1 = none; higher = more typical of the class, less varied) |
| `HUB_REPO_ID` | `user/name` to push to at the end; leave empty to skip the Hub |
| `RUN_NAME` | output sub-folder; empty = derived from the choices, so the same choices resume the same run |
| `CPU_SETTINGS` | on a CPU runtime, replace the model choices by CPU-sized ones (micro, pixel space, 32 px, 2,000 steps) |
| `GRADIENT_CHECKPOINTING` | recompute each block's activations in the backward pass instead of keeping them: far less GPU memory, slower steps; `auto` = on when the memory estimate says the batch does not fit this GPU without it (env: `LD_GRADIENT_CHECKPOINTING`) |
| `REPORT_TO` | also log to TensorBoard (shown inline above the training panel) and/or Weights & Biases (run `wandb login` first, or set `WANDB_MODE=offline`); `none` = the notebook's own panel only (env: `LD_REPORT_TO`) |

**Expect:** a summary of the run, the suggested batch size, and whether a checkpoint will be resumed.
"""

CHOICES = '''\
# @title 3 · Choices
DATASET = "afhq"  # @param ["afhq", "celeba", "flowers", "pokemon", "anime", "cartoon", "custom"]
CUSTOM_DATASET = ""  # @param {type:"string"}
PRESET = "tiny"  # @param ["micro", "tiny", "small", "base"]
RESOLUTION = "256"  # @param ["64", "256", "512"] {allow-input: true}
SPACE = "latent"  # @param ["latent", "pixel"]
STEPS = 20000  # @param {type:"integer"}
BATCH_SIZE = 0  # @param {type:"integer"}
LEARNING_RATE = {DEFAULT_LR}  # @param {type:"number"}
SAMPLE_EVERY = 500  # @param {type:"integer"}
EVAL_EVERY = 2000  # @param {type:"integer"}
CACHE_LATENTS = False  # @param {type:"boolean"}
CLASS_CONDITIONAL = False  # @param {type:"boolean"}
GUIDANCE_SCALE = 2.0  # @param {type:"slider", min:1, max:8, step:0.5}
VAE = "stabilityai/sd-vae-ft-mse"  # @param {type:"string"}
HUB_REPO_ID = ""  # @param {type:"string"}
HUB_PRIVATE = False  # @param {type:"boolean"}
RUN_NAME = ""  # @param {type:"string"}
CPU_SETTINGS = True  # @param {type:"boolean"}
GRADIENT_CHECKPOINTING = "auto"  # @param ["auto", "on", "off"]
REPORT_TO = "none"  # @param ["none", "tensorboard", "wandb", "all"]

if "IN_COLAB" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run section 1 · Setup first (run the cells above this one)")
import json
import re

from liquid_diffusion import LiquidDiffusionUNet
from liquid_diffusion.checkpoints import list_checkpoints
from liquid_diffusion.config import RESUME_MUST_MATCH, TrainConfig, resolve_batch_size
from liquid_diffusion.errors import check_repo_id
from liquid_diffusion.features import install_fid_support
from liquid_diffusion.latents import VAE_DOWNSAMPLE_FACTOR, vae_dtype
from liquid_diffusion.memory import estimate_training_memory_gib, needs_gradient_checkpointing
from liquid_diffusion.sources import class_names, open_source
from liquid_diffusion.tracking import check_report_to, trackers

CPU_SIZED = DEVICE == "cpu" and CPU_SETTINGS
if CPU_SIZED:  # a GPU preset would take hours per grid on a CPU
    PRESET, SPACE, RESOLUTION, STEPS, SAMPLE_EVERY = "micro", "pixel", "32", min(STEPS, 2000), 250

# Environment variables win over the form, so the notebook runs headless.
if DATASET == "custom":
    DATASET = CUSTOM_DATASET.strip()
DATASET = env("LD_DATASET", DATASET)
if not DATASET:
    raise ValueError("DATASET is 'custom' but CUSTOM_DATASET is empty: enter a Hub id (user/name) or a folder path")
PRESET = env("LD_PRESET", PRESET)
RESOLUTION = str(env("LD_RESOLUTION", RESOLUTION))
if not re.fullmatch(r"\\s*\\d+\\s*(px)?\\s*", RESOLUTION):
    raise ValueError(f"RESOLUTION must be a number of pixels such as 256, got {RESOLUTION!r}")
RESOLUTION = int(re.sub(r"\\D", "", RESOLUTION))
SPACE = env("LD_SPACE", SPACE)
VAE = env("LD_VAE", VAE)
STEPS = env("LD_STEPS", STEPS, int)
BATCH_SIZE = env("LD_BATCH_SIZE", BATCH_SIZE, int)
LEARNING_RATE = env("LD_LR", LEARNING_RATE, float)
SAMPLE_EVERY = env("LD_SAMPLE_EVERY", SAMPLE_EVERY, int)
EVAL_EVERY = env("LD_EVAL_EVERY", EVAL_EVERY, int)
if EVAL_EVERY and importlib.util.find_spec("torch_fidelity") is None and not env("LD_SKIP_INSTALL", False, bool):
    if not install_fid_support(pip_install):  # the FID Inception network, never at the cost of the installed torch
        EVAL_EVERY = 0
CACHE_LATENTS = env("LD_CACHE_LATENTS", CACHE_LATENTS, bool) and SPACE == "latent"
HUB_REPO_ID = env("LD_HUB_REPO", HUB_REPO_ID).strip()
if HUB_REPO_ID:
    check_repo_id(HUB_REPO_ID)  # now, not after an hour of training
REPORT_TO = env("LD_REPORT_TO", REPORT_TO)
for tracker in trackers(REPORT_TO):  # TensorBoard comes with Colab, wandb does not
    if importlib.util.find_spec(tracker) is None and not env("LD_SKIP_INSTALL", False, bool):
        pip_install(tracker)
check_report_to(REPORT_TO)  # a missing package or W&B login: one line now, not when training starts
NUM_SAMPLE_IMAGES = env("LD_NUM_SAMPLES", 16, int)  # images per sample grid (live and final)
GUIDANCE_SCALE = env("LD_GUIDANCE_SCALE", GUIDANCE_SCALE, float)
CLASS_CONDITIONAL = env("LD_CLASS_CONDITIONAL", CLASS_CONDITIONAL, bool)
try:  # does the dataset have class labels? (a ClassLabel column, or one sub-folder per class)
    CLASS_NAMES = class_names(open_source(DATASET, with_labels=True)[0])
except ValueError as error:  # none (or the dataset cannot be read: the preview below will say so)
    CLASS_NAMES = []
    if CLASS_CONDITIONAL:
        print(f"class labels: none usable ({str(error).split(';')[0]}): training an unconditional model")
if len(CLASS_NAMES) >= 2 and not CLASS_CONDITIONAL:
    shown = ", ".join(CLASS_NAMES[:6]) + (", ..." if len(CLASS_NAMES) > 6 else "")
    print(f"tip: this dataset has {len(CLASS_NAMES)} classes ({shown}): tick CLASS_CONDITIONAL to train a model "
          "you can ask for a class")
CLASS_CONDITIONAL = CLASS_CONDITIONAL and len(CLASS_NAMES) >= 2

# --- expected GPU memory: an estimate, not a measurement (the measured peak is printed after training) ----------
MEMORY_OPTIONS = dict(mixed_precision=MIXED_PRECISION, vae_dtype=vae_dtype(torch.device(DEVICE)),
                      cache_latents=CACHE_LATENTS)

# --- the run's folder; a checkpoint there is resumed ------------------------------------------------------------
slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(DATASET.rstrip("/")).name).strip("-").lower() or "data"
RUN_NAME = RUN_NAME.strip() or f"{slug}-{PRESET}-{SPACE}-{RESOLUTION}px" + ("-cond" if CLASS_CONDITIONAL else "")
OUTPUT_DIR = Path(env("LD_OUTPUT_DIR", str(OUTPUT_ROOT / RUN_NAME))).expanduser()
checkpoints = list_checkpoints(OUTPUT_DIR)
saved_config = json.loads((checkpoints[-1] / "train_config.json").read_text()) if checkpoints else None
SUGGESTED = BATCH_SIZE <= 0 and not saved_config


def chosen_batch(checkpointing):
    """BATCH_SIZE 0: the trainer's --batch-size auto for this GPU; a resumed run keeps its batch size and rate."""
    probe = TrainConfig(preset=PRESET, space=SPACE, resolution=RESOLUTION, cache_latents=CACHE_LATENTS,
                        mixed_precision=MIXED_PRECISION, gradient_checkpointing=checkpointing, lr=LEARNING_RATE,
                        batch_size=BATCH_SIZE if BATCH_SIZE > 0 else "auto")
    resolve_batch_size(probe, torch.device(DEVICE), saved_config, report=lambda line: None)
    return probe.batch_size, probe.lr


BATCH_SIZE, LEARNING_RATE = chosen_batch(False)
# --- gradient checkpointing: "auto" turns it on when the batch does not fit this GPU without it ------------------
CHECKPOINTING_CHOICE = env("LD_GRADIENT_CHECKPOINTING", GRADIENT_CHECKPOINTING)
if CHECKPOINTING_CHOICE not in ("auto", "on", "off"):
    raise ValueError(f"GRADIENT_CHECKPOINTING must be auto, on or off, got {CHECKPOINTING_CHOICE!r}")
GRADIENT_CHECKPOINTING = CHECKPOINTING_CHOICE == "on" or CHECKPOINTING_CHOICE == "auto" and (
    needs_gradient_checkpointing(GPU_MEMORY_GIB, PRESET, SPACE, RESOLUTION, BATCH_SIZE, **MEMORY_OPTIONS))
MEMORY_OPTIONS["gradient_checkpointing"] = GRADIENT_CHECKPOINTING
if GRADIENT_CHECKPOINTING and SUGGESTED:  # with checkpointing a larger batch may fit
    BATCH_SIZE, LEARNING_RATE = chosen_batch(True)

CONFIG = TrainConfig(
    dataset=DATASET, resolution=RESOLUTION, preset=PRESET, space=SPACE, vae=VAE, cache_latents=CACHE_LATENTS,
    batch_size=BATCH_SIZE, steps=STEPS, lr=LEARNING_RATE,
    sample_every=SAMPLE_EVERY, num_sample_images=NUM_SAMPLE_IMAGES, log_every=max(1, min(50, STEPS // 20)),
    eval_every=EVAL_EVERY,
    checkpoint_every=min(1000, STEPS), keep_checkpoints=2, output_dir=str(OUTPUT_DIR), resume="latest",
    num_workers=2 if DEVICE == "cuda" else 0, mixed_precision=MIXED_PRECISION, progress_bar=False,
    class_conditional=CLASS_CONDITIONAL, guidance_scale=GUIDANCE_SCALE,
    gradient_checkpointing=GRADIENT_CHECKPOINTING, report_to=REPORT_TO,
)
CONFIG.validate()  # a one-line error with the fix for values that cannot work

if CPU_SIZED:
    print(f"CPU runtime: CPU-sized settings ({PRESET} model, {SPACE} space, {RESOLUTION} px, {STEPS} steps); expect "
          "blurry shapes after about 10 minutes. Untick CPU_SETTINGS to keep your own choices.")
print(f"dataset     {DATASET}")
print(f"model       {PRESET} in {SPACE} space at {RESOLUTION}px" + (f" (VAE {VAE})" if SPACE == "latent" else ""))
print(f"training    {STEPS} steps · batch {BATCH_SIZE} · "
      f"lr {LEARNING_RATE:g} · {MIXED_PRECISION if MIXED_PRECISION != 'no' else 'fp32'}"
      + (" · cached latents" if CACHE_LATENTS else "")
      + (" · gradient checkpointing" + (" (auto: the batch does not fit without it)"
                                          if CHECKPOINTING_CHOICE == "auto" else "") if GRADIENT_CHECKPOINTING else ""))
print(f"samples     {f'every {SAMPLE_EVERY} steps' if SAMPLE_EVERY else 'at the end only'} "
      f"({NUM_SAMPLE_IMAGES} images)")
if CLASS_CONDITIONAL:
    shown = ", ".join(CLASS_NAMES[:12]) + (", ..." if len(CLASS_NAMES) > 12 else "")
    print(f"classes     {len(CLASS_NAMES)} ({shown}): class-conditional, guidance {GUIDANCE_SCALE:g}, "
          "one grid row per class (up to 8)")
print(f"outputs     {OUTPUT_DIR}")
print(f"hub         {HUB_REPO_ID or '(none: the push is skipped)'}")
if REPORT_TO != "none":
    print(f"tracking    {' and '.join(trackers(REPORT_TO))}"
          + (f" (TensorBoard logs in {OUTPUT_DIR / 'logs'})" if "tensorboard" in trackers(REPORT_TO) else ""))
if checkpoints:
    print(f"resume      from {checkpoints[-1].name} (delete it or change RUN_NAME to start over)")
    conflicts = [k for k in RESUME_MUST_MATCH
                 if saved_config.get(k) != getattr(CONFIG, k)]
    if conflicts:
        print("WARNING: that checkpoint was trained with "
              + ", ".join(f"{k}={saved_config.get(k)!r}" for k in conflicts)
              + ": use the same values or another RUN_NAME, or training will refuse to resume")
    if saved_config.get("class_conditional", False) != CLASS_CONDITIONAL:
        print("WARNING: that checkpoint was trained " + ("without" if CLASS_CONDITIONAL else "with")
              + " class labels: change CLASS_CONDITIONAL or RUN_NAME, or training will refuse to resume")
if DATASET in ("anime", "huggan/anime-faces") and (SPACE, RESOLUTION) != ("pixel", 64):
    print("tip: the anime faces are 64x64 images; SPACE='pixel' with RESOLUTION=64 suits them best")
if DEVICE == "cpu" and PRESET != "micro":
    print(f"note: the {PRESET} preset is meant for a GPU; on this CPU each sample grid takes a long time")
flags = [("dataset", DATASET), ("preset", PRESET), ("space", SPACE), ("resolution", RESOLUTION),
         ("batch_size", BATCH_SIZE), ("steps", STEPS), ("lr", LEARNING_RATE), ("sample_every", SAMPLE_EVERY),
         ("mixed_precision", MIXED_PRECISION), ("output_dir", OUTPUT_DIR)]
flags += [("vae", VAE)] if SPACE == "latent" else []
flags += [("guidance_scale", GUIDANCE_SCALE)] if CLASS_CONDITIONAL else []
flags += [("report_to", REPORT_TO)] if REPORT_TO != "none" else []
print("\\nsame run from a terminal:\\n  python -m liquid_diffusion train "
      + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags)
      + (" --cache-latents" if CACHE_LATENTS else "") + (" --class-conditional" if CLASS_CONDITIONAL else "")
      + (" --gradient-checkpointing" if GRADIENT_CHECKPOINTING else "")
      + " --resume latest")
'''
# The form's learning rate is the trainer's default: one place (TrainConfig) defines the recipe.
CHOICES = CHOICES.replace("{DEFAULT_LR}", repr(TrainConfig.__dataclass_fields__["lr"].default))

PREVIEW_MD = """\
## 4 · Preview the data

The first images of the dataset exactly as training sees them (training reads them shuffled): resized,
center-cropped, randomly flipped and, in latent space, after a round trip through the VAE (what the model can at best
reproduce). The line below it counts images read,
skipped (undecodable) and upscaled (smaller than the resolution).

**Expect:** a few seconds for local folders; for Hub datasets the first shard streams in (up to a minute), and in latent
space the VAE (~330 MB) downloads once.
"""

PREVIEW = '''\
if "CONFIG" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run sections 1 to 3 first (run the cells above this one)")
import io

from IPython.display import Image as ImageDisplay

from liquid_diffusion.data import ImageBatchStream, image_grid

stream = ImageBatchStream(DATASET, RESOLUTION, NUM_SAMPLE_IMAGES, flip=CONFIG.flip, random_crop=CONFIG.random_crop,
                          shuffle_buffer=0, seed=CONFIG.seed, num_epochs=1)  # no shuffle buffer to fill first
pixels = next(iter(stream))
if SPACE == "latent":
    from liquid_diffusion.latents import FrozenVAE

    vae = FrozenVAE(VAE, device=DEVICE, dtype=vae_dtype(torch.device(DEVICE)))
    pixels = vae.decode(vae.encode(pixels)).cpu()
    del vae
preview = image_grid(pixels)
OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
preview.save(OUTPUT_DIR / "preview.png")
buffer = io.BytesIO()
preview.save(buffer, format="PNG")
display(ImageDisplay(data=buffer.getvalue(), width=min(768, max(256, preview.width))))
print(f"{DATASET}: {stream.stats} · {len(pixels)} images at {RESOLUTION}px"
      + (" after the VAE round trip" if SPACE == "latent" else ""))
'''

MODEL_MD = """\
## 5 · Build the model

Builds the chosen preset to show its size, split by part of the U-Net, and the GPU memory training is expected to
need at this batch size. The memory figure is an **estimate** (weights, gradients, AdamW and EMA state, the frozen VAE,
and the activations counted in one small CPU forward pass, scaled to the resolution); the measured peak is printed
after training. The trainer builds its own copy of the model, so this one is discarded.

**Expect:** a small table; on a GPU, a warning if the estimate comes close to the GPU's memory.
"""

MODEL = '''\
if "MEMORY_OPTIONS" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run sections 1 to 3 first (run the cells above this one)")
model = LiquidDiffusionUNet.from_preset(PRESET, in_channels=4 if SPACE == "latent" else 3,
                                        num_classes=len(CLASS_NAMES) if CLASS_CONDITIONAL else 0)
count = lambda module: sum(p.numel() for p in module.parameters())
total = count(model)
parts = {"encoder": count(model.encoder) + count(model.downsamples) + count(model.stem),
         "bottleneck": count(model.bottleneck),
         "decoder": count(model.decoder) + count(model.upsamples) + count(model.fusions) + count(model.head),
         "time embedding": count(model.time_embedder)}
if CLASS_CONDITIONAL:
    parts["label embedding"] = count(model.class_embedder)
print(f"LiquidDiffusionUNet '{PRESET}': {total / 1e6:.1f}M parameters, widths {tuple(model.config.widths)}, "
      f"depths {tuple(model.config.depths)}, decoder widths {model.decoder_widths}, no attention")
for name, n in parts.items():
    print(f"  {name:<15} {n / 1e6:6.2f}M")
latent_side = RESOLUTION // (VAE_DOWNSAMPLE_FACTOR if SPACE == "latent" else 1)
print(f"input: {model.config.in_channels} x {latent_side} x {latent_side}"
      + (f" latents of {RESOLUTION}px images" if SPACE == "latent" else " pixels"))
print("\\nexpected GPU memory for training (an estimate, not a measurement):")
for b in sorted({max(1, BATCH_SIZE // 2), BATCH_SIZE, BATCH_SIZE * 2}):
    mark = "  <- this run" if b == BATCH_SIZE else ""
    print(f"  batch {b:>3}: ~{estimate_training_memory_gib(PRESET, SPACE, RESOLUTION, b, **MEMORY_OPTIONS):.1f} GiB"
          f"{mark}")
EXPECTED_GIB = estimate_training_memory_gib(PRESET, SPACE, RESOLUTION, BATCH_SIZE, **MEMORY_OPTIONS)
if GRADIENT_CHECKPOINTING:
    without = estimate_training_memory_gib(PRESET, SPACE, RESOLUTION, BATCH_SIZE,
                                           **{**MEMORY_OPTIONS, "gradient_checkpointing": False})
    print(f"  (with gradient checkpointing; ~{without:.1f} GiB without it)")
if GPU_MEMORY_GIB and EXPECTED_GIB > 0.9 * GPU_MEMORY_GIB:
    print(f"WARNING: ~{EXPECTED_GIB:.1f} GiB is close to or above this GPU's {GPU_MEMORY_GIB:.1f} GiB: "
          "lower BATCH_SIZE or RESOLUTION" + ("" if GRADIENT_CHECKPOINTING else ", or set GRADIENT_CHECKPOINTING on,")
          + " if training runs out of memory")
elif not GPU_MEMORY_GIB:
    print("(no GPU here: the figures are what a GPU would need)")
del model
'''

TRAIN_MD = """\
## 6 · Train

Trains with rectified flow (EMA weights, warmup, gradient clipping, mixed precision), writing a checkpoint every 1000
steps to the output folder and resuming from the newest one there. One panel below updates in place: the progress
line (step, loss, images/s, time left), the latest EMA sample grid (same noise every time, so you see the *same*
images sharpen) and the loss curves: the loss over steps, and the loss per noise level t (t near 0 is where fine
detail is decided).

With `REPORT_TO` set to `tensorboard` (or `all`), TensorBoard opens inline above the panel (`%load_ext tensorboard`,
`%tensorboard --logdir OUTPUT_DIR/logs`) with the same curves, the sample grids and the run's settings; with `wandb`
the run appears in your Weights & Biases project `liquid-diffusion`.

**Expect:** blobs of colour first, recognisable shapes after a few thousand steps on a GPU. Stop the cell at any
time (■ or *Runtime → Interrupt*): the current step finishes, a checkpoint is saved, and running the notebook again
resumes.
"""

TRAIN = '''\
if "CONFIG" not in globals() or "ImageDisplay" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run sections 1 to 4 first (run the cells above this one)")
import gc
import html
import time

from matplotlib.figure import Figure

from liquid_diffusion.model_card import read_metrics
from liquid_diffusion.metrics import METRICS_FILE, TrainerCallback
from liquid_diffusion.trainer import Trainer


def png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


class LiveDashboard(TrainerCallback):
    """Progress, the latest sample grid and the loss curves, each in a display handle updated in place."""

    def __init__(self, config):
        self.config, self.losses, self.t_bins, self.started = config, {}, None, time.time()
        self.evals = {}  # step -> {"kid", "kid_std", "fid", ...} with EVAL_EVERY
        self.validation = {}  # step -> (val_loss of the EMA weights, of the raw weights)
        self.checkpoint, self.first_seen = "none yet", None  # (step, time) of this session's first log
        for record in read_metrics(Path(config.output_dir) / METRICS_FILE):  # a resumed run shows its whole history
            if "loss" in record:
                self.losses[record["step"]] = record["loss"]
                self.t_bins = record.get("loss_t_bins")
            if "kid" in record:
                self.evals[record["step"]] = record
            if "val_loss" in record:
                self.validation[record["step"]] = (record["val_loss"], record["val_loss_raw"])
        self.status = display(HTML("<b>starting ...</b> (streaming the first images" + (
            "; encoding the whole dataset into the latent cache first" if config.cache_latents else "") + ")"),
            display_id=True)
        samples = sorted((Path(config.output_dir) / "samples").glob("step-*.png"))
        first = f"at step {config.sample_every}" if config.sample_every else "at the end of training"
        self.grid = display(ImageDisplay(filename=str(samples[-1]), width=512) if samples else
                            HTML(f"<i>the first sample grid appears {first}</i>"), display_id=True)
        self.curves = display(HTML(""), display_id=True)
        if self.losses:  # also when the run is already finished and no new step will be logged
            self.draw_curves()

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
        self.status.update(HTML(
            f'<progress value="{step}" max="{steps}" style="width:60%"></progress> '
            f"<b>step {step}/{steps}</b> · loss {record['loss']:.4f} · lr {record['lr']:.2e} · "
            f"grad norm {record['grad_norm']:.2f} · {record['images_per_s']:.1f} img/s · "
            + (f"validation loss {self.validation[max(self.validation)][0]:.4f} · " if self.validation else "")
            + f"{left} · skipped images: {record.get('images_skipped', 0)} · last checkpoint: {self.checkpoint}"))
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

    def finish(self, step, stopped=False):
        minutes = (time.time() - self.started) / 60
        self.status.update(HTML(f'<progress value="{step}" max="{self.config.steps}" style="width:60%"></progress> '
                                f"<b>{'stopped' if stopped else 'finished'} at step {step}</b> · {minutes:.1f} min in "
                                f"this session · last checkpoint: {self.checkpoint} in "
                                f"{html.escape(str(self.config.output_dir))}"))

    def draw_curves(self):
        figure = Figure(figsize=(10, 6.4 if self.evals else 3.2))
        axes = figure.subplots(2 if self.evals else 1, 2)
        ax_loss, ax_t = axes[0] if self.evals else axes
        steps = sorted(self.losses)
        ax_loss.plot(steps, [self.losses[s] for s in steps], color="tab:blue", label="training")
        if self.validation:  # held-out images at fixed t and noise: it moves only when the model does
            val_steps = sorted(self.validation)
            ax_loss.plot(val_steps, [self.validation[s][0] for s in val_steps], color="tab:green", marker="o",
                         label="validation (EMA)")
            ax_loss.plot(val_steps, [self.validation[s][1] for s in val_steps], color="tab:green", marker="o",
                         alpha=0.5, linestyle="--", label="validation (raw)")
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
        if self.evals:  # under the loss: KID (with its std over subsets) and FID of the EMA weights
            steps = sorted(self.evals)
            axes[1, 0].errorbar(steps, [self.evals[s]["kid"] for s in steps],
                                yerr=[self.evals[s]["kid_std"] for s in steps], marker="o", color="tab:green")
            axes[1, 0].set(xlabel="step", ylabel="KID", title=f"KID ({self.evals[steps[-1]]['eval_samples']} samples)")
            axes[1, 1].plot(steps, [self.evals[s]["fid"] for s in steps], marker="o", color="tab:red")
            axes[1, 1].set(xlabel="step", ylabel="FID", title="FID (biased at this N: compare at equal N only)")
        figure.tight_layout()
        self.curves.update(ImageDisplay(data=png(figure)))


if "tensorboard" in trackers(REPORT_TO) and get_ipython() is not None:  # TensorBoard inline, above the panel
    get_ipython().run_line_magic("load_ext", "tensorboard")  # %load_ext tensorboard
    get_ipython().run_line_magic("tensorboard", f'--logdir "{OUTPUT_DIR / "logs"}"')  # %tensorboard --logdir ...
dashboard = LiveDashboard(CONFIG)
trainer = Trainer(CONFIG, callbacks=[dashboard])
if DEVICE == "cuda":
    torch.cuda.reset_peak_memory_stats()
TRAINING_COMPLETE = False
try:
    FINAL_CHECKPOINT = trainer.train()
    TRAINING_COMPLETE = True
    dashboard.finish(trainer.step)
    print(f"done: {FINAL_CHECKPOINT}")
except KeyboardInterrupt:
    dashboard.finish(trainer.step, stopped=True)
    FINAL_CHECKPOINT = list_checkpoints(OUTPUT_DIR)[-1] if list_checkpoints(OUTPUT_DIR) else None
    raise RunStopped(f"training stopped at step {trainer.step} and saved {Path(str(FINAL_CHECKPOINT)).name}. "
                     "Run the notebook again (Runtime -> Run all) to resume; nothing below ran or was pushed.") from None
if DEVICE == "cuda":
    print(f"measured peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated by PyTorch "
          f"(estimated ~{EXPECTED_GIB:.1f} GiB including the CUDA context)")
del trainer
gc.collect()
if DEVICE == "cuda":
    torch.cuda.empty_cache()
if FINAL_CHECKPOINT is None:
    raise RuntimeError("no checkpoint was saved, so there is nothing to sample from yet: run the training cell again")
'''

SAMPLES_MD = """\
## 7 · Final samples: Euler vs Heun, 25 vs 50 steps

Samples the EMA weights of the final checkpoint from the same noise with both ODE solvers. Euler takes one model call
per step; Heun (second order) takes two and usually gives cleaner images at the same step count. Each grid is also
saved next to the checkpoint's samples.

**Expect:** four grids in a 2x2 panel, each titled with its sampling time; on a GPU a few seconds each.
"""

SAMPLES = '''\
if "FINAL_CHECKPOINT" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
import numpy as np
from PIL import Image as PILImage

from liquid_diffusion.sampling import class_grid_labels, generate, load_for_sampling, save_grid

unet, sampling_vae, resolution = load_for_sampling(str(FINAL_CHECKPOINT), use_ema=True, device=DEVICE)
if sampling_vae is not None:
    sampling_vae.chunk_size = 4  # decode a few images at a time: 512px grids fit a T4 too
figure = Figure(figsize=(12, 12.6))
axes = figure.subplots(2, 2)
for row, sampler in enumerate(("euler", "heun")):
    for column, steps in enumerate((25, 50)):
        start = time.time()
        labels, columns = class_grid_labels(unet, NUM_SAMPLE_IMAGES)  # one row per class (None: unconditional)
        images = generate(unet, sampling_vae, NUM_SAMPLE_IMAGES if labels is None else len(labels), steps, sampler,
                          seed=0, resolution=resolution, class_labels=labels, guidance_scale=GUIDANCE_SCALE)
        seconds = time.time() - start
        path = save_grid(images, OUTPUT_DIR / "samples" / f"final-{sampler}-{steps}.png", columns)
        axes[row, column].imshow(np.asarray(PILImage.open(path)), interpolation="nearest")
        axes[row, column].set_title(f"{sampler.capitalize()}, {steps} steps ({seconds:.1f} s)")
        axes[row, column].axis("off")
figure.tight_layout()
figure.savefig(OUTPUT_DIR / "samples" / "final-comparison.png", dpi=90)
display(ImageDisplay(data=png(figure)))
del unet, sampling_vae
'''

PICK_MD = """\
## 7b · Pick a class (class-conditional models)

A class-conditional model samples the class you ask for. Guidance `w` mixes its conditional and unconditional
predictions, `v = v_uncond + w (v_cond - v_uncond)`: `w = 1` is the plain conditional model, larger values give
images more typical of the class and less varied. Pick a class and a guidance scale below and press *Run Interact*.

**Expect:** a row of samples of the first class at `GUIDANCE_SCALE` right away, then one per pick; for a model
without classes, one line saying so.
"""

PICK = '''\
if "FINAL_CHECKPOINT" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
import ipywidgets as widgets

if not CLASS_CONDITIONAL:
    print("this model is unconditional (the dataset has no class labels, or CLASS_CONDITIONAL is off): "
          "no class to pick")
else:
    unet, sampling_vae, resolution = load_for_sampling(str(FINAL_CHECKPOINT), use_ema=True, device=DEVICE)
    count = min(8, NUM_SAMPLE_IMAGES)

    def show_class(class_name, guidance_scale, seed=0):
        labels = unet.class_ids(class_name).expand(count)
        images = generate(unet, sampling_vae, count, 25, "euler", seed=seed, resolution=resolution,
                          class_labels=labels, guidance_scale=guidance_scale)
        grid = image_grid(images, columns=count)
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        display(ImageDisplay(data=buffer.getvalue(), width=min(1024, max(256, grid.width))))
        print(f"{class_name} · guidance {guidance_scale:g} · seed {seed}")

    show_class(CLASS_NAMES[0], GUIDANCE_SCALE)
    widgets.interact_manual(
        show_class,
        class_name=widgets.Dropdown(options=CLASS_NAMES, value=CLASS_NAMES[0], description="class"),
        guidance_scale=widgets.FloatSlider(value=GUIDANCE_SCALE, min=1.0, max=8.0, step=0.5, description="guidance"),
        seed=widgets.IntText(value=0, description="seed"),
    )
'''

HUB_MD = """\
## 8 · Push to the Hugging Face Hub

Exports the final checkpoint as a `LiquidDiffusionPipeline` (EMA weights as the model, raw weights alongside, the
scheduler, the VAE in latent space, the training config, a model card with the loss curve and the latest sample grid)
and uploads it to `HUB_REPO_ID`. Skipped with one line when no repo id is set.

**Logging in.** If you are not logged in yet, `notebook_login()` shows a link to huggingface.co and a short code:
open the link, sign in, enter the code and approve; the cell waits meanwhile and then says *Login successful*.
(Older `huggingface_hub` versions show a token box instead: paste a **write** token from
https://huggingface.co/settings/tokens.) Or add the token as the Colab secret `HF_TOKEN` before running the notebook.
The token stays in this runtime's Hugging Face cache: it is never printed, and never written to the notebook, the
output folder or the repository.

Only a finished training run is pushed by *Run all*; after a stop, running this cell by hand pushes the newest
checkpoint.

**Expect:** the repo's URL after a minute or so (the upload size is about 4 bytes per parameter, twice, plus the VAE).
"""

HUB = '''\
if "FINAL_CHECKPOINT" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
PUSHED = False
if not HUB_REPO_ID:
    print("no HUB_REPO_ID set: skipping the push to the Hub")
else:
    from huggingface_hub import get_token, notebook_login, whoami

    from liquid_diffusion.publish import push_to_hub

    if get_token() is None:
        notebook_login()
    if get_token() is None:
        print("not logged in yet: log in with the prompt above, then run this cell again")
    else:
        print(f"logged in as {whoami()['name']}")
        if not TRAINING_COMPLETE:
            print(f"training did not finish: pushing the newest checkpoint, {Path(str(FINAL_CHECKPOINT)).name}")
        url = push_to_hub(FINAL_CHECKPOINT, HUB_REPO_ID, private=HUB_PRIVATE)
        PUSHED = True
        print(f"pushed {Path(FINAL_CHECKPOINT).name} to {url}")
'''

LOAD_MD = """\
## 9 · Load it back and sample, as a user of the model would

Loads the pushed repo (or, without a push, the same export written locally) with the two lines from the model card,
and samples a grid. This is how anyone else will use your model:

```python
from liquid_diffusion import LiquidDiffusionPipeline
pipe = LiquidDiffusionPipeline.from_pretrained("USER/NAME")
```

**Expect:** a grid matching the Euler 25-step grid above (same weights, different noise).
"""

LOAD = '''\
if "PUSHED" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run sections 6 to 8 first (run the cells above this one)")
import shutil

from liquid_diffusion import LiquidDiffusionPipeline
from liquid_diffusion.export import export_checkpoint

if PUSHED:
    SOURCE = HUB_REPO_ID
else:
    SOURCE = OUTPUT_DIR / "export" / Path(FINAL_CHECKPOINT).name
    if not (SOURCE / "model_index.json").exists():
        shutil.rmtree(SOURCE, ignore_errors=True)  # an export interrupted half-way
        export_checkpoint(FINAL_CHECKPOINT, SOURCE, repo_id=HUB_REPO_ID or None)
    print(f"exported locally to {SOURCE} (the same folder a push uploads)")

pipe = LiquidDiffusionPipeline.from_pretrained(SOURCE).to(DEVICE)
count = min(8, NUM_SAMPLE_IMAGES)
labels = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(count)] if CLASS_CONDITIONAL else None  # names work
images = pipe(batch_size=count, num_inference_steps=25, generator=torch.Generator().manual_seed(1),
              class_labels=labels, output_type="pt").images  # the default output_type="pil" gives PIL images
grid = image_grid(images.cpu() * 2 - 1, columns=count)
buffer = io.BytesIO()
grid.save(buffer, format="PNG")
display(ImageDisplay(data=buffer.getvalue(), width=min(1024, max(256, grid.width))))
print(f"loaded {SOURCE}: {count} images at {images.shape[-1]}px")
'''

EVALUATE_MD = """\
## 10 · FID and KID

Draws `EVAL_SAMPLES` images from the EMA weights of the best checkpoint (the one `best.json` names when
`EVAL_EVERY` was on, else the final one) and compares them with as many training images at the training resolution,
through the Inception network used for FID (torchmetrics with torch-fidelity's weights). **KID** (with its standard
deviation) is unbiased, so it is the honest number for a few thousand images; **FID** is what papers report, but it is
biased upward at small N: compare FIDs only at equal N (the protocol is in the README). The real images' features are
cached in the output folder, so a second run only samples. The same from a terminal:
`python -m liquid_diffusion evaluate --checkpoint OUTPUT_DIR --num-samples 10000` (`LD_EVAL_SAMPLES` overrides
`EVAL_SAMPLES`).

**Expect:** one line with FID, KID and the time taken (the first run downloads the Inception network, ~92 MB, and
encodes the real images once). Without the internet it says so in one line and skips.
"""

EVALUATE = '''\
# @title 10 · FID and KID
EVAL_SAMPLES = 2000  # @param {type:"integer"}

if "FINAL_CHECKPOINT" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
from liquid_diffusion.evaluate import evaluate_checkpoint, read_best, summary_line

EVAL_SAMPLES = env("LD_EVAL_SAMPLES", EVAL_SAMPLES, int)
best = read_best(OUTPUT_DIR)
EVAL_CHECKPOINT = Path(FINAL_CHECKPOINT)
if best and (OUTPUT_DIR / best["checkpoint"]).is_dir():
    EVAL_CHECKPOINT = OUTPUT_DIR / best["checkpoint"]
try:
    EVALUATION = evaluate_checkpoint(EVAL_CHECKPOINT, num_samples=EVAL_SAMPLES, device=DEVICE,
                                     reference_root=OUTPUT_DIR / "fid-reference")
except ValueError as error:  # e.g. offline: the Inception weights cannot be downloaded
    EVALUATION = None
    print(f"skipping FID/KID: {error}")
else:
    (OUTPUT_DIR / "evaluation.json").write_text(json.dumps(EVALUATION, indent=2))
    print(f"{EVAL_CHECKPOINT.name}: {summary_line(EVALUATION)}")
if DEVICE == "cuda":
    torch.cuda.empty_cache()
'''

OUTRO = """\
## What next

* Train longer: raise `STEPS` and run all again; it resumes from the newest checkpoint.
* The same run from a terminal is printed in section 3; several GPUs: `accelerate launch -m liquid_diffusion train ...`.
* Sample any checkpoint or Hub repo: `python -m liquid_diffusion sample --checkpoint USER/NAME --sampler heun`.
* Push a checkpoint later: `python -m liquid_diffusion push --checkpoint OUTPUT_DIR --repo-id USER/NAME`.
"""

CELLS = [
    ("intro", INTRO, None),
    ("setup", SETUP_MD, SETUP),
    ("outputs", OUTPUTS_MD, OUTPUTS),
    ("choices", CHOICES_MD, CHOICES),
    ("preview", PREVIEW_MD, PREVIEW),
    ("model", MODEL_MD, MODEL),
    ("train", TRAIN_MD, TRAIN),
    ("samples", SAMPLES_MD, SAMPLES),
    ("pick", PICK_MD, PICK),
    ("hub", HUB_MD, HUB),
    ("load", LOAD_MD, LOAD),
    ("evaluate", EVALUATE_MD, EVALUATE),
    ("next", OUTRO, None),
]
FORM_CELLS = {"outputs", "choices"}  # shown as forms in Colab (code folded away, one click to see it)

METADATA = {
    "accelerator": "GPU",
    "colab": {"name": "LiquidDiffusion_Training.ipynb", "provenance": [], "gpuType": "T4", "toc_visible": True},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs, with stable cell ids (so rebuilding gives the same file)."""
    cells = []
    for name, markdown, code in CELLS:
        cells.append(new_markdown_cell(markdown.rstrip("\n"), id=f"{name}-md"))
        if code is not None:
            metadata = {"cellView": "form"} if name in FORM_CELLS else {}
            cells.append(new_code_cell(code.rstrip("\n"), id=f"{name}-code", metadata=metadata))
    notebook = new_notebook(cells=cells, metadata=METADATA)
    notebook.nbformat, notebook.nbformat_minor = 4, 5
    nbformat.validate(notebook)
    return notebook


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed notebook is up to date")
    parser.add_argument("--out", type=Path, default=NOTEBOOK)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run python scripts/build_notebook.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
