# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     name: LiquidDiffusion_Training.ipynb
#     provenance: []
#     toc_visible: true
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,language_info
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown] id="intro-md"
# # LiquidDiffusion: train an attention-free diffusion model in Colab
#
# Pick a dataset, pick a model size, press **Runtime → Run all**, and watch sample grids improve while it trains.
# At the end the model (EMA weights, config, model card and sample grid) goes to the Hugging Face Hub.
#
# **LiquidDiffusion** is a U-Net without any attention: every block is a *liquid* CfC gate (closed-form continuous-time
# cells) plus a depthwise convolution with a global channel gate, trained with **rectified flow** (t = 0 is data,
# t = 1 is noise) in the latent space of the frozen SD-VAE, or directly on pixels for small images.
#
# | step | what happens |
# |---|---|
# | 1 · Setup | installs the `liquid_diffusion` package and reports the GPU |
# | 2 · Outputs | optionally mounts Google Drive, so a disconnect loses nothing and a re-run resumes |
# | 3 · Choices | dataset, model size, resolution, steps, batch size, ... as form fields |
# | 4 · Preview | a grid of training images exactly as the model will see them |
# | 5 · Model | parameter count and expected GPU memory |
# | 6 · Train | one live panel: progress, latest sample grid, loss curves |
# | 7 · Final samples | Euler vs Heun at 25 and 50 steps; with class labels, a class picker and a guidance slider |
# | 8 · Hub | log in and push (skipped when no repo id is set) |
# | 9 · Load back | load the pushed model as any user would, and sample |
# | 10 · FID and KID | the quality numbers, against the training images |
#
# **Runtime:** *Runtime → Change runtime type → T4 GPU* (free tier) or better. On a CPU runtime the notebook switches
# to CPU-sized settings (the `micro` model on 32 px pixels), which show shapes emerging within about 10 minutes.
#
# **Headless use:** every choice can be overridden by an environment variable (`LD_DATASET`, `LD_PRESET`,
# `LD_RESOLUTION`, `LD_SPACE`, `LD_VAE`, `LD_STEPS`, `LD_BATCH_SIZE`, `LD_SAMPLE_EVERY`, `LD_OUTPUT_DIR`, `LD_HUB_REPO`;
# also `LD_LR`, `LD_NUM_SAMPLES`, `LD_MOUNT_DRIVE`, `LD_CACHE_LATENTS`, `LD_CLASS_CONDITIONAL`, `LD_GUIDANCE_SCALE`,
# `LD_GRADIENT_CHECKPOINTING`, `LD_REPORT_TO`, `LD_EVAL_EVERY`, `LD_EVAL_SAMPLES`, `LD_REFLOW`, `LD_REFLOW_PAIRS`,
# `LD_REFLOW_STEPS`, `LD_REFLOW_DISTILL_STEPS`, `LD_PACKAGE_SPEC`, `LD_SKIP_INSTALL`),
# so the notebook also runs unattended, e.g. `jupyter nbconvert --to notebook --execute`.
#
# **The code:** each cell is a few form fields and calls to `liquid_diffusion.notebook` (imported as `ld`), where the
# logic lives, documented and tested. This notebook is paired with `LiquidDiffusion_Training.py` by
# [jupytext](https://jupytext.readthedocs.io): edit either one, then run `jupytext --sync LiquidDiffusion_Training.py`.

# %% [markdown] id="setup-md"
# ## 1 · Setup
#
# Installs the package and checks the hardware. When this notebook sits in a checkout of the repository, the package is
# installed **editable from that checkout** (nothing is installed when its dependencies are already present). Otherwise
# (e.g. opened from GitHub in Colab) it is installed with pip from `PACKAGE_SPEC`, the project's repository (any pip
# spec works: a fork's git URL, a wheel, a version).
#
# From here on, a mistake (a bad choice, a Hub error, a cell run before the ones it needs) prints one line that says
# what to do, and stops *Run all* there.
#
# **Expect:** about a minute on a fresh Colab runtime, then one line with the GPU's name, memory and bf16 support.
# With no GPU you get one warning, and section 3 picks CPU-sized settings.

# %% id="setup-code"
# @title 1 · Setup: install LiquidDiffusion and check the GPU
PACKAGE_SPEC = "git+https://github.com/liquid-diffusion/LiquidDiffusion.git"  # @param {type:"string"}

# The install comes first and cannot live in the package it installs: editable from a checkout of the repository
# (at, above or right below this folder), else PACKAGE_SPEC (env: LD_PACKAGE_SPEC); nothing when all is there.
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

here = Path.cwd().resolve()
CHECKOUT = next((folder for folder in (here, *here.parents, *sorted(p for p in here.iterdir() if p.is_dir()))
                 if (folder / "pyproject.toml").is_file() and (folder / "liquid_diffusion" / "__init__.py").is_file()),
                None)
if CHECKOUT is not None:
    sys.path.insert(0, str(CHECKOUT))  # import the checkout itself, even before an editable install takes effect
NEEDED = ("torch", "diffusers", "accelerate", "datasets", "huggingface_hub", "safetensors", "PIL", "matplotlib",
          "ipywidgets", "tqdm", "torchmetrics", "liquid_diffusion")
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if missing and os.environ.get("LD_SKIP_INSTALL", "").strip().lower() not in ("1", "true", "yes", "on"):
    target = ["-e", str(CHECKOUT)] if CHECKOUT else [os.environ.get("LD_PACKAGE_SPEC", "").strip() or PACKAGE_SPEC]
    print(f"installing {target[-1]} (missing: {', '.join(missing)}) ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *target], check=True)
    importlib.invalidate_caches()
    print("installed (if Colab asks to restart the runtime, do so and run all cells again)")

from liquid_diffusion import notebook as ld  # the notebook's logic: read it in liquid_diffusion/notebook.py

HARDWARE = ld.setup()  # from here on, a mistake prints one line and stops Run all

# %% [markdown] id="outputs-md"
# ## 2 · Where to keep outputs
#
# Checkpoints (the two newest are kept), sample grids and `metrics.jsonl` go to one output folder per run. In Colab,
# tick `MOUNT_DRIVE` to keep it on Google Drive (`MyDrive/<DRIVE_FOLDER>/<run name>`): Colab runtimes disconnect, and
# whatever sits on the runtime's disk is then lost. **Re-running the notebook with the same choices resumes from the newest checkpoint found there**,
# exactly where it stopped (same data position, optimizer and EMA state).
#
# **Expect:** in Colab, a Google authorisation prompt the first time; elsewhere outputs go to `./outputs/`.

# %% cellView="form" id="outputs-code"
# @title 2 · Where to keep outputs
MOUNT_DRIVE = True  # @param {type:"boolean"}
DRIVE_FOLDER = "LiquidDiffusion"  # @param {type:"string"}

OUTPUT_ROOT = ld.output_root(MOUNT_DRIVE, DRIVE_FOLDER)  # env: LD_MOUNT_DRIVE

# %% [markdown] id="choices-md"
# ## 3 · Choices
#
# | field | meaning |
# |---|---|
# | `DATASET` | one of the six verified datasets, or `custom` with `CUSTOM_DATASET` = any Hub id (`user/name`) or a folder of images (e.g. on your Drive) |
# | `PRESET` | model size: `tiny` (~23M parameters, T4-friendly), `small` (~68M), `base` (~153M); `micro` (2M) for CPU demos |
# | `RESOLUTION` | training size in pixels; 256 or 512 in latent space, 64 in pixel space for the 64x64 anime faces |
# | `SPACE` | `latent` (through the frozen SD-VAE, for 256/512 px) or `pixel` (no VAE, small images) |
# | `STEPS` | optimizer steps in total (a resumed run continues up to this number) |
# | `BATCH_SIZE` | `0` = automatic (`--batch-size auto`): the largest that fits this GPU by the memory estimate, capped by its class; a resumed run keeps its own |
# | `LEARNING_RATE` | AdamW learning rate at batch 8 (after a linear warmup); with `BATCH_SIZE` 0 it is scaled by sqrt(batch / 8) |
# | `SAMPLE_EVERY` | steps between live sample grids |
# | `EVAL_EVERY` | steps between KID/FID measurements of the EMA weights on 1,000 samples, plotted under the loss (`best.json` names the best checkpoint); `0` = off (env: `LD_EVAL_EVERY`) |
# | `CACHE_LATENTS` | latent space only: encode every image once with the VAE, then train on latents alone (much faster per step, a one-off wait that grows with the dataset) |
# | `CLASS_CONDITIONAL` | when the dataset has class labels (a `ClassLabel` column, or a folder with one sub-folder per class), train a class-conditional model with classifier-free guidance, so you can ask for a class; the cell says when the dataset has labels; ignored for datasets without them |
# | `GUIDANCE_SCALE` | classifier-free guidance of the sample grids (1 = none; higher = more typical of the class, less varied) |
# | `HUB_REPO_ID` | `user/name` to push to at the end; leave empty to skip the Hub |
# | `RUN_NAME` | output sub-folder; empty = derived from the choices, so the same choices resume the same run |
# | `CPU_SETTINGS` | on a CPU runtime, replace the model choices by CPU-sized ones (micro, pixel space, 32 px, 2,000 steps) |
# | `GRADIENT_CHECKPOINTING` | recompute each block's activations in the backward pass instead of keeping them: far less GPU memory, slower steps; `auto` = on when the memory estimate says the batch does not fit this GPU without it (env: `LD_GRADIENT_CHECKPOINTING`) |
# | `REPORT_TO` | also log to TensorBoard (shown inline above the training panel) and/or Weights & Biases (run `wandb login` first, or set `WANDB_MODE=offline`); `none` = the notebook's own panel only (env: `LD_REPORT_TO`) |
#
# **Expect:** a summary of the run, the suggested batch size, and whether a checkpoint will be resumed.

# %% cellView="form" id="choices-code"
# @title 3 · Choices
DATASET = "afhq"  # @param ["afhq", "celeba", "flowers", "pokemon", "anime", "cartoon", "custom"]
CUSTOM_DATASET = ""  # @param {type:"string"}
PRESET = "tiny"  # @param ["micro", "tiny", "small", "base"]
RESOLUTION = "256"  # @param ["64", "256", "512"] {allow-input: true}
SPACE = "latent"  # @param ["latent", "pixel"]
STEPS = 20000  # @param {type:"integer"}
BATCH_SIZE = 0  # @param {type:"integer"}
LEARNING_RATE = 0.001  # @param {type:"number"}
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

if "HARDWARE" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run section 1 · Setup first (run the cells above this one)")

# LD_* environment variables win over these fields (ld.ENV_OVERRIDES), so the notebook runs headless.
CHOICES = ld.Choices(
    dataset=DATASET, custom_dataset=CUSTOM_DATASET, preset=PRESET, resolution=RESOLUTION, space=SPACE, steps=STEPS,
    batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, sample_every=SAMPLE_EVERY, eval_every=EVAL_EVERY,
    cache_latents=CACHE_LATENTS, class_conditional=CLASS_CONDITIONAL, guidance_scale=GUIDANCE_SCALE, vae=VAE,
    hub_repo_id=HUB_REPO_ID, hub_private=HUB_PRIVATE, run_name=RUN_NAME, cpu_settings=CPU_SETTINGS,
    gradient_checkpointing=GRADIENT_CHECKPOINTING, report_to=REPORT_TO,
)
RUN = ld.prepare(CHOICES, HARDWARE, OUTPUT_ROOT)  # checks the choices, prints the run and its terminal command

# %% [markdown] id="preview-md"
# ## 4 · Preview the data
#
# The first images of the dataset exactly as training sees them (training reads them shuffled): resized,
# center-cropped, randomly flipped and, in latent space, after a round trip through the VAE (what the model can at best
# reproduce). The line below it counts images read,
# skipped (undecodable) and upscaled (smaller than the resolution).
#
# **Expect:** a few seconds for local folders; for Hub datasets the first shard streams in (up to a minute), and in latent
# space the VAE (~330 MB) downloads once.

# %% id="preview-code"
if "RUN" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run sections 1 to 3 first (run the cells above this one)")
ld.preview(RUN)

# %% [markdown] id="model-md"
# ## 5 · Build the model
#
# Builds the chosen preset to show its size, split by part of the U-Net, and the GPU memory training is expected to
# need at this batch size. The memory figure is an **estimate** (weights, gradients, AdamW and EMA state, the frozen VAE,
# and the activations counted in one small CPU forward pass, scaled to the resolution); the measured peak is printed
# after training. The trainer builds its own copy of the model, so this one is discarded.
#
# **Expect:** a small table; on a GPU, a warning if the estimate comes close to the GPU's memory.

# %% id="model-code"
if "RUN" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run sections 1 to 3 first (run the cells above this one)")
EXPECTED_GIB = ld.describe_model(RUN)

# %% [markdown] id="train-md"
# ## 6 · Train
#
# Trains with rectified flow (EMA weights, warmup, gradient clipping, mixed precision), writing a checkpoint every 1000
# steps to the output folder and resuming from the newest one there. One panel below updates in place: the progress
# line (step, loss, images/s, time left), the latest EMA sample grid (same noise every time, so you see the *same*
# images sharpen) and the loss curves: the loss over steps, and the loss per noise level t (t near 0 is where fine
# detail is decided).
#
# With `REPORT_TO` set to `tensorboard` (or `all`), TensorBoard opens inline above the panel (`%load_ext tensorboard`,
# `%tensorboard --logdir OUTPUT_DIR/logs`) with the same curves, the sample grids and the run's settings; with `wandb`
# the run appears in your Weights & Biases project `liquid-diffusion`.
#
# **Expect:** blobs of colour first, recognisable shapes after a few thousand steps on a GPU. Stop the cell at any
# time (■ or *Runtime → Interrupt*): the current step finishes, a checkpoint is saved, and running the notebook again
# resumes.

# %% id="train-code"
if "RUN" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run sections 1 to 4 first (run the cells above this one)")
TRAINED = ld.train(RUN)  # the live panel; ■ stops after a checkpoint, and running again resumes

# %% [markdown] id="samples-md"
# ## 7 · Final samples: Euler vs Heun, 25 vs 50 steps
#
# Samples the EMA weights of the final checkpoint from the same noise with both ODE solvers. Euler takes one model call
# per step; Heun (second order) takes two and usually gives cleaner images at the same step count. Each grid is also
# saved next to the checkpoint's samples.
#
# **Expect:** four grids in a 2x2 panel, each titled with its sampling time; on a GPU a few seconds each.

# %% id="samples-code"
if "RUN" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
ld.compare_samplers(RUN)

# %% [markdown] id="pick-md"
# ## 7b · Pick a class (class-conditional models)
#
# A class-conditional model samples the class you ask for. Guidance `w` mixes its conditional and unconditional
# predictions, `v = v_uncond + w (v_cond - v_uncond)`: `w = 1` is the plain conditional model, larger values give
# images more typical of the class and less varied. Pick a class and a guidance scale below and press *Run Interact*.
#
# **Expect:** a row of samples of the first class at `GUIDANCE_SCALE` right away, then one per pick; for a model
# without classes, one line saying so.

# %% id="pick-code"
if "RUN" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
ld.class_picker(RUN)

# %% [markdown] id="hub-md"
# ## 8 · Push to the Hugging Face Hub
#
# Exports the final checkpoint as a `LiquidDiffusionPipeline` (EMA weights as the model, raw weights alongside, the
# scheduler, the VAE in latent space, the training config, a model card with the loss curve and the latest sample grid)
# and uploads it to `HUB_REPO_ID`. Skipped with one line when no repo id is set.
#
# **Logging in.** If you are not logged in yet, `notebook_login()` shows a link to huggingface.co and a short code:
# open the link, sign in, enter the code and approve; the cell waits meanwhile and then says *Login successful*.
# (Older `huggingface_hub` versions show a token box instead: paste a **write** token from
# https://huggingface.co/settings/tokens.) Or add the token as the Colab secret `HF_TOKEN` before running the notebook.
# The token stays in this runtime's Hugging Face cache: it is never printed, and never written to the notebook, the
# output folder or the repository.
#
# Only a finished training run is pushed by *Run all*; after a stop, running this cell by hand pushes the newest
# checkpoint.
#
# **Expect:** the repo's URL after a minute or so (the upload size is about 4 bytes per parameter, twice, plus the VAE).

# %% id="hub-code"
if "RUN" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
PUSHED = ld.push(RUN)  # skipped without HUB_REPO_ID; logs in first when needed

# %% [markdown] id="load-md"
# ## 9 · Load it back and sample, as a user of the model would
#
# Loads the pushed repo (or, without a push, the same export written locally) with the two lines from the model card,
# and samples a grid. This is how anyone else will use your model:
#
# ```python
# from liquid_diffusion import LiquidDiffusionPipeline
# pipe = LiquidDiffusionPipeline.from_pretrained("USER/NAME")
# ```
#
# **Expect:** a grid matching the Euler 25-step grid above (same weights, different noise).

# %% id="load-code"
if "PUSHED" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run sections 6 to 8 first (run the cells above this one)")
ld.load_back(RUN, PUSHED)

# %% [markdown] id="evaluate-md"
# ## 10 · FID and KID
#
# Draws `EVAL_SAMPLES` images from the EMA weights of the best checkpoint (the one `best.json` names when
# `EVAL_EVERY` was on, else the final one) and compares them with as many training images at the training resolution,
# through the Inception network used for FID (torchmetrics with torch-fidelity's weights). **KID** (with its standard
# deviation) is unbiased, so it is the honest number for a few thousand images; **FID** is what papers report, but it is
# biased upward at small N: compare FIDs only at equal N (the protocol is in the README). The real images' features are
# cached in the output folder, so a second run only samples. The same from a terminal:
# `python -m liquid_diffusion evaluate --checkpoint OUTPUT_DIR --num-samples 10000` (`LD_EVAL_SAMPLES` overrides
# `EVAL_SAMPLES`).
#
# **Expect:** one line with FID, KID and the time taken (the first run downloads the Inception network, ~92 MB, and
# encodes the real images once). Without the internet it says so in one line and skips.

# %% id="evaluate-code"
# @title 10 · FID and KID
EVAL_SAMPLES = 2000  # @param {type:"integer"}

if "RUN" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
EVALUATION = ld.evaluate(RUN, EVAL_SAMPLES)  # env: LD_EVAL_SAMPLES

# %% [markdown] id="reflow-md"
# ## 11 · Few-step model (optional): reflow
#
# Every sample above costs 25-50 network calls. Reflow (Liu et al., "Flow Straight and Fast", ICLR 2023) makes the
# trained model (the teacher) into one that samples in 1-4 Euler steps: the teacher turns `REFLOW_PAIRS` noises into
# samples once (cached on disk), and a copy of it trains on those (noise, sample) pairs, whose paths no longer cross,
# so few steps follow them. With `REFLOW_DISTILL_STEPS` > 0 a second stage trains it at t = 1 only: the 1-step
# model. Both are training runs in folders beside the run's (`-reflow-STEP`, `-1step-STEP`, STEP the teacher's
# checkpoint): running the cell again resumes them.
# The same from a terminal: `python -m liquid_diffusion reflow --checkpoint OUTPUT_DIR --output-dir OUTPUT_DIR-reflow`
# (settings and measurements: `docs/reflow.md`). Env: `LD_REFLOW`, `LD_REFLOW_PAIRS`, `LD_REFLOW_STEPS`,
# `LD_REFLOW_DISTILL_STEPS`.
#
# **Expect:** off by default. On: the pairs take about as long as sampling that many images with 50 Heun steps, then
# the training steps; at the end the teacher's 25 steps beside the few-step model's 1, 2 and 4 from the same noise.

# %% id="reflow-code"
# @title 11 · Few-step model
REFLOW = False  # @param {type:"boolean"}
REFLOW_PAIRS = 4000  # @param {type:"integer"}
REFLOW_STEPS = 2000  # @param {type:"integer"}
REFLOW_DISTILL_STEPS = 500  # @param {type:"integer"}

if "RUN" not in globals():  # run out of order: say in one line which cells come first
    raise type("RunFirst", (Exception,), {"_render_traceback_": lambda e: [f"error: {e}"]})(
        "run the training cell (section 6) first (run the cells above this one)")
FEW_STEP = ld.few_step(RUN, REFLOW, REFLOW_PAIRS, REFLOW_STEPS, REFLOW_DISTILL_STEPS)

# %% [markdown] id="next-md"
# ## What next
#
# * Train longer: raise `STEPS` and run all again; it resumes from the newest checkpoint.
# * The same run from a terminal is printed in section 3; several GPUs: `accelerate launch -m liquid_diffusion train ...`.
# * Sample any checkpoint or Hub repo: `python -m liquid_diffusion sample --checkpoint USER/NAME --sampler heun`.
# * Push a checkpoint later: `python -m liquid_diffusion push --checkpoint OUTPUT_DIR --repo-id USER/NAME`.
