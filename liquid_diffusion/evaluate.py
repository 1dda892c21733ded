"""FID and KID of a model against its training data, on demand (``python -m liquid_diffusion evaluate``) and during
training (``--eval-every``).

Data flows one way through this file::

    real images (data.ImageBatchStream: training resolution, no flip) --feature extractor--> reference cache
    model (sampling.load_for_sampling) --sampling.generate, in batches--> images --feature extractor--> features
    reference features + generated features --torchmetrics--> FID, KID (mean and std over subsets)

* **Features** (``features.py``): an extractor (the FID Inception by default, or any ``nn.Module`` taking uint8
  images [B, 3, H, W]) and the cached features of the real images, computed once per dataset and setting.
* **Metrics.** torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` compute the numbers, fed
  through their own ``feature=`` hook with a pass-through module, so each image goes through the extractor once,
  the FID and KID share its features, and the real features can be cached::

      FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))
      KID = mean over subsets of the unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3

  KID is unbiased, so it is the honest number at a few thousand images (pokemon has 833); FID is biased upward at
  small N and only comparable at equal N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import SEED_STRIDE
from .errors import first_line, option
from .features import (
    INCEPTION,
    INCEPTION_URL,
    default_cache_root,
    default_reference_dir,
    extract_features,
    load_feature_extractor,
    reference_features,
    reference_key,
    reference_labels,
)
from .flow import DEFAULT_GUIDANCE_SCALE, check_sampler
from .hub import resolve_checkpoint
from .metrics import TrainerCallback, append_record
from .pipeline import DEFAULT_STEPS
from .sampling import CHECKPOINT_OFFLINE_ADVICE, generate, load_for_sampling
from .sources import NoClassLabelsError
from .stopping import StopRequested

DEFAULT_NUM_SAMPLES = 10_000
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# torchmetrics is imported where it is used (``fid_kid``, ``features.inception_extractor``): the other commands, which
# import this module through the trainer, never need it.


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Pass-through "feature extractor" for torchmetrics: the inputs already are features [B, num_features]."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict:
    """``{"fid", "kid", "kid_std"}`` of two feature sets [N, D] and [M, D] (torchmetrics, in float64).

    KID averages the unbiased MMD^2 over ``kid_subsets`` random subsets of ``min(kid_subset_size, N/2, M/2)``
    features each (at least 2), drawn from ``seed`` (the global torch RNG is left untouched); ``kid_std`` is the std
    over the subsets. Capping at half the set keeps the subsets different, so the std means something at N <= 1000
    (with subsets of all N it would be 0); the mean is unbiased at any subset size.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID and KID need at least 2 real and 2 generated images (got {len(real)} and {len(fake)})")
    real, fake = real.double(), fake.double()
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with warnings.catch_warnings():  # "KID will save all extracted features": they are already in memory
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]),
            subsets=kid_subsets,
            subset_size=max(2, min(kid_subset_size, len(real) // 2, len(fake) // 2)),
        )
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


# ----------------------------------------------------------------------------------------------------------------
# Generated features and the whole evaluation
# ----------------------------------------------------------------------------------------------------------------


# Class-conditional models: the labels of the generated images come from their own stream, apart from the noise's.
LABEL_SEED_SALT = 0x6C61_6265_6C73  # "labels"


def _label_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * SEED_STRIDE + LABEL_SEED_SALT) % 2**63)


def sample_labels(num_classes: int, num_samples: int, seed: int = 0) -> torch.Tensor:
    """The classes [num_samples] that ``generated_features`` asks a class-conditional model for by default: uniform
    over the ``num_classes`` classes, drawn from ``seed`` (so a run is reproducible)."""
    return torch.randint(num_classes, (num_samples,), generator=_label_generator(seed))


def labels_like_reference(
    reference_ids: torch.Tensor, reference_names: list[str], model_names, num_classes: int, seed: int = 0
) -> torch.Tensor | None:
    """The classes for the generated images: those of the reference images, in the model's ids and shuffled from
    ``seed``, so both sets hold each class equally often (FID compares distributions: on an imbalanced dataset
    uniform labels would be scored against a set they do not match). ``None`` when the reference's classes are not
    the model's (by name; by count where the model has no names)."""
    if model_names:
        if not set(reference_names) <= set(model_names):
            return None
        ids = torch.tensor([model_names.index(name) for name in reference_names])[reference_ids]
    elif len(reference_names) == num_classes:
        ids = reference_ids
    else:
        return None
    return ids[torch.randperm(len(ids), generator=_label_generator(seed))]


@torch.no_grad()
def generated_features(
    unet,
    vae,
    extractor: nn.Module,
    num_samples: int,
    *,
    resolution: int,
    steps: int = 25,
    sampler: str = "euler",
    seed: int = 0,
    batch_size: int = 50,
    guidance_scale: float | None = None,
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Features [num_samples, D] of images drawn with ``sampling.generate`` in batches (VAE decode in the VAE's
    chunks); batch ``b`` draws its noise from seed ``seed * SEED_STRIDE + b``, so a run is reproducible.

    A class-conditional model is evaluated as it is used: image i asks for class ``labels[i]`` (default
    ``sample_labels``: uniform over the classes) with classifier-free guidance ``guidance_scale`` (default
    ``flow.DEFAULT_GUIDANCE_SCALE``); its unconditional (null-class) samples are not what FID should score.
    """
    if not unet.config.num_classes:
        labels = None
    else:
        labels = sample_labels(unet.config.num_classes, num_samples, seed) if labels is None else labels
        if len(labels) != num_samples:
            raise ValueError(f"{len(labels)} class labels for {num_samples} samples")
        guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    chunks = []
    with tqdm(total=num_samples, unit="img", desc=f"samples ({sampler}, {steps} steps)", disable=not progress) as bar:
        for index, start in enumerate(range(0, num_samples, batch_size)):
            count = min(batch_size, num_samples - start)
            images = generate(
                unet,
                vae,
                count,
                steps,
                sampler,
                seed=(seed * SEED_STRIDE + index) % 2**63,
                resolution=resolution,
                class_labels=None if labels is None else labels[start : start + count],
                guidance_scale=1.0 if guidance_scale is None else guidance_scale,
            )
            chunks.append(extract_features(extractor, images, device))
            bar.update(count)
    return torch.cat(chunks)


def evaluate_model(
    unet,
    vae,
    resolution: int,
    dataset: str,
    extractor: nn.Module,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    steps: int = 25,
    sampler: str = "euler",
    seed: int = 0,
    split: str = "train",
    config_name: str | None = None,
    image_column: str | None = None,
    random_crop: bool = False,
    reference_dir=None,
    reference_root=None,
    batch_size: int = 50,
    guidance_scale: float | None = None,
    label_column: str | None = None,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """FID and KID of ``unet`` (+ ``vae``) sampled at ``resolution`` against ``dataset`` at the same resolution.

    Draws ``num_samples`` images, or as many as the dataset has real images (with a warning) when it is smaller; a
    class-conditional model draws them class by class with guidance ``guidance_scale`` (``generated_features``),
    each class as often as among the reference images (``labels_like_reference``; the ``ClassLabel`` column
    ``label_column``, found automatically when omitted), or uniformly, with a warning, when the dataset has no
    class labels or other classes than the model.
    ``reference_dir``: the reference cache folder (default: one per setting under ``reference_root``, itself by
    default ``default_cache_root()``).
    Returns a JSON-ready dict: fid, kid, kid_std, num_samples, num_real, sampler, steps, seed, guidance_scale and
    classes ("as the reference" or "uniform"; both ``None`` for an unconditional model), resolution, dataset, split,
    feature_extractor, reference_dir, wall_time_s and sample_time_s.
    """
    if num_samples < 1:
        raise ValueError(
            f"the number of samples must be at least 1, got {num_samples} (the default is {DEFAULT_NUM_SAMPLES})"
        )
    check_sampler(sampler)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch size must be at least 1, got {steps} and {batch_size}")
    start = time.perf_counter()
    key = reference_key(
        dataset, resolution, extractor.name, split=split, config_name=config_name, random_crop=random_crop
    )
    reference_dir = Path(reference_dir or default_reference_dir(reference_root or default_cache_root(), key))
    conditional = bool(unet.config.num_classes)

    def reference(with_labels: bool):
        return reference_features(
            dataset,
            resolution,
            extractor,
            num_samples,
            reference_dir,
            split=split,
            config_name=config_name,
            image_column=image_column,
            random_crop=random_crop,
            batch_size=batch_size,
            num_workers=num_workers,
            with_labels=with_labels,
            label_column=label_column,
            device=device,
            progress=progress,
        )

    try:
        real, metadata = reference(conditional)
    except NoClassLabelsError:
        real, metadata = reference(False)
    if len(real) < num_samples:
        print(
            f"warning: {dataset} has only {len(real)} images, so {len(real)} samples are drawn instead of "
            f"{num_samples}: FID is biased upward at small N (compare FIDs only at equal N); KID is unbiased",
            file=sys.stderr,
        )
        num_samples = len(real)
    if num_samples < 2:
        raise ValueError(f"FID and KID need at least 2 images; {dataset!r} gave {len(real)}")
    if unet.config.num_classes:
        guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        if not 0 <= guidance_scale < float("inf"):  # NaN fails too
            raise ValueError(f"the guidance scale must be >= 0 (1: no guidance), got {guidance_scale}")
    else:
        guidance_scale = None  # an unconditional model has nothing to guide
    labels = classes = None
    if conditional:
        if metadata.get("class_names"):
            labels = labels_like_reference(
                *reference_labels(reference_dir, num_samples), unet.config.class_names, unet.config.num_classes, seed
            )
        classes = "as the reference" if labels is not None else "uniform"
        if labels is None:
            print(
                f"warning: the images of {dataset} carry no classes of this model, so the samples ask for its "
                f"{unet.config.num_classes} classes uniformly",
                file=sys.stderr,
            )
    sample_start = time.perf_counter()
    fake = generated_features(
        unet,
        vae,
        extractor,
        num_samples,
        resolution=resolution,
        steps=steps,
        sampler=sampler,
        seed=seed,
        batch_size=batch_size,
        guidance_scale=guidance_scale,
        labels=labels,
        device=device,
        progress=progress,
    )
    sample_time = time.perf_counter() - sample_start
    scores = fid_kid(real, fake, seed=seed)
    return dict(
        **scores,
        num_samples=num_samples,
        num_real=len(real),
        sampler=sampler,
        steps=steps,
        seed=seed,
        guidance_scale=guidance_scale,
        classes=classes,
        resolution=resolution,
        dataset=metadata["key"]["dataset"],
        split=split,
        feature_extractor=extractor.name,
        reference_dir=str(reference_dir),
        wall_time_s=round(time.perf_counter() - start, 3),
        sample_time_s=round(sample_time, 3),
    )


def summary_line(result: dict) -> str:
    """One human line: ``FID 12.3 · KID 0.0123 ± 0.0008 · 10000 samples vs 10000 real ... · 312.4 s``."""
    return (
        f"FID {result['fid']:.2f} · KID {result['kid']:.5f} ± {result['kid_std']:.5f} · "
        f"{result['num_samples']} samples vs {result['num_real']} real images of {result['dataset']} "
        f"({result['split']}, {result['resolution']}px) · {result['sampler']} {result['steps']} steps · "
        + (
            f"classes {result.get('classes') or 'uniform'}, guidance {result['guidance_scale']:g} · "
            if result.get("guidance_scale") is not None
            else ""
        )
        + f"seed {result['seed']} · {result['feature_extractor'].split(' (')[0]} · {result['wall_time_s']:.1f} s"
    )


# ----------------------------------------------------------------------------------------------------------------
# In training: --eval-every
# ----------------------------------------------------------------------------------------------------------------

BEST_FILE = "best.json"


def read_best(output_dir: str | os.PathLike) -> dict | None:
    """The ``best.json`` of a training output dir (``{"checkpoint", "step", "kid", ...}``), or ``None``."""
    path = Path(output_dir) / BEST_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def update_best(output_dir: str | os.PathLike, record: dict, metric: str = "kid") -> bool:
    """Points ``best.json`` at ``record["checkpoint"]`` if its ``metric`` beats the current best (or the current best
    checkpoint is gone); returns whether it moved. Written to a temporary file and renamed: atomic on local disks and
    on Google Drive, where symlinks do not exist."""
    best = read_best(output_dir)
    current = best is not None and (Path(output_dir) / best["checkpoint"]).is_dir()
    if current and best.get("metric", "kid") == metric and not record[metric] < best[metric]:
        return False
    tmp = Path(output_dir) / f".{BEST_FILE}.tmp"
    tmp.write_text(json.dumps({**record, "metric": metric}, indent=2))
    os.replace(tmp, Path(output_dir) / BEST_FILE)
    return True


class TrainingEvaluator(TrainerCallback):
    """A trainer callback for ``--eval-every N``: a cheaper KID/FID of the EMA weights on ``eval_samples`` samples
    (Euler, ``sample_steps`` steps) against as many real images, after the first checkpoint at or past every
    multiple of N steps and after the final one. It appends ``{"step", "kid", "kid_std", "fid", ...}`` to
    ``metrics.jsonl``, moves ``best.json`` to the checkpoint when KID improves (KID: unbiased at small N), and calls
    ``on_eval(trainer, record)`` on the trainer's callbacks. Runs on the main process only.

    When the feature extractor cannot be loaded (offline, torch-fidelity missing), it says so in one line and the
    run trains on without evaluations: a metric never stops a long run.
    """

    def __init__(self, config):
        self.config = config
        self.extractor = None
        try:
            self.extractor = load_feature_extractor(config.eval_feature_extractor)
        except (ValueError, FileNotFoundError) as error:
            print(f"warning: {option('eval_every')} is off for this run: {error}", file=sys.stderr)

    def due(self, step: int) -> bool:
        config = self.config
        if step >= config.steps:
            return True
        every, each = config.eval_every, config.checkpoint_every
        return step % each == 0 and step // every > (step - each) // every

    def on_checkpoint(self, trainer, step: int, path: Path) -> None:
        if self.extractor is None or not self.due(step):
            return
        config = self.config
        try:  # a metric never stops training; a stop signal cuts it short, not the save after it
            with trainer.interruptible(), trainer.ema_weights() as model:
                result = evaluate_model(
                    model,
                    trainer.vae,
                    config.resolution,
                    config.dataset,
                    self.extractor,
                    num_samples=config.eval_samples,
                    steps=config.sample_steps,
                    seed=config.seed,
                    split=config.split,
                    config_name=config.config_name,
                    image_column=config.image_column,
                    random_crop=config.random_crop,
                    reference_root=trainer.output_dir / "fid-reference",
                    guidance_scale=config.guidance_scale,
                    label_column=config.label_column,
                    batch_size=max(config.batch_size, 16),
                    device=trainer.device,
                    progress=False,
                )
        except StopRequested as stop:
            print(f"\n{stop.args[0]}: the evaluation at step {step} was cut short", file=sys.stderr)
            return
        except Exception as error:  # noqa: BLE001 -- whatever broke, the run trains on
            print(
                f"warning: the evaluation at step {step} failed and was skipped ({type(error).__name__}: "
                f"{first_line(error)}); training goes on",
                file=sys.stderr,
            )
            return
        record = {
            "step": step,
            "kid": result["kid"],
            "kid_std": result["kid_std"],
            "fid": result["fid"],
            "eval_samples": result["num_samples"],
            "eval_time_s": result["wall_time_s"],
            "checkpoint": Path(path).name,
        }
        record["best"] = update_best(trainer.output_dir, record)
        if record["best"]:
            trainer._prune_checkpoints()  # the previous best is no longer kept for being the best
        append_record(trainer.output_dir, record)
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "on_eval"):
                callback.on_eval(trainer, record)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    dataset: str | None = None,
    split: str | None = None,
    config_name: str | None = None,
    image_column: str | None = None,
    resolution: int | None = None,
    use_ema: bool = True,
    guidance_scale: float | None = None,
    feature_extractor: str | nn.Module = INCEPTION,
    inception_weights=None,
    device: str | None = None,
    num_workers: int | None = None,
    **options,
) -> dict:
    """``evaluate_model`` for a checkpoint, an output dir (its newest checkpoint), an export folder or a Hub id,
    against its training dataset, split and crop (from its ``train_config.json``) unless told otherwise.

    ``resolution`` may only repeat the training resolution. A class-conditional model samples every class with
    ``guidance_scale`` (default: the one its pipeline recommends, else ``flow.DEFAULT_GUIDANCE_SCALE``).
    ``options`` (steps, sampler, seed, batch_size, reference_dir, reference_root, progress) go to ``evaluate_model``.
    Returns its dict plus ``checkpoint``, ``step`` (of a training checkpoint; else the run's total steps) and
    ``weights`` ("ema" or "raw").
    """
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples} (default {DEFAULT_NUM_SAMPLES})")
    folder = resolve_checkpoint(checkpoint)
    config_path = folder / "train_config.json"
    trained = json.loads(config_path.read_text()) if config_path.is_file() else {}
    dataset = dataset or trained.get("dataset")
    if not dataset:
        raise ValueError(
            f"no dataset to compare with: {checkpoint} does not record its training dataset; pass "
            "--dataset (a short name, Hub id or folder of images)"
        )
    extractor = load_feature_extractor(feature_extractor, inception_weights)  # fails fast when offline
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_resolution(resolution, trained.get("resolution"))  # before loading anything
    unet, vae, trained_at, recommended = load_for_sampling(
        str(folder), use_ema=use_ema, device=device, with_recommended=True
    )
    if guidance_scale is None:
        guidance_scale = recommended.guidance_scale
    if options.get("steps") is None:
        options["steps"] = recommended.steps
    _check_resolution(resolution, trained_at)
    resolution = trained_at or resolution
    if not resolution:
        raise ValueError("the checkpoint does not record its resolution; pass --resolution")
    num_workers = num_workers if num_workers is not None else (2 if torch.cuda.is_available() else 0)
    result = evaluate_model(
        unet,
        vae,
        resolution,
        dataset,
        extractor,
        num_samples=num_samples,
        split=split or trained.get("split", "train"),
        config_name=config_name or trained.get("config_name"),
        image_column=image_column or trained.get("image_column"),
        random_crop=trained.get("random_crop", False),
        guidance_scale=guidance_scale,
        num_workers=num_workers,
        label_column=trained.get("label_column") if dataset == trained.get("dataset") else None,
        device=device,
        **options,
    )
    state = folder / "state.json"
    step = json.loads(state.read_text()).get("step") if state.is_file() else trained.get("steps")
    return {"checkpoint": str(checkpoint), "step": step, "weights": "ema" if use_ema else "raw", **result}


def _check_resolution(asked: int | None, trained_at: int | None) -> None:
    if asked and trained_at and asked != trained_at:
        raise ValueError(
            f"the model was trained at {trained_at}px, not {asked}px: FID compares at the training "
            "resolution (drop --resolution)"
        )


def _run_evaluate(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(
        args.checkpoint,
        num_samples=args.num_samples,
        dataset=args.dataset,
        split=args.split,
        config_name=args.config_name,
        image_column=args.image_column,
        resolution=args.resolution,
        use_ema=not args.raw,
        guidance_scale=args.guidance_scale,
        feature_extractor=args.feature_extractor,
        inception_weights=args.inception_weights,
        device=args.device,
        num_workers=args.num_workers,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        batch_size=args.batch_size,
        reference_dir=args.reference_dir,
        progress=not args.no_progress,
    )
    print(summary_line(result))
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_evaluate_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="FID and KID of a checkpoint against its training data",
        description="Draws N samples (EMA weights) and reports FID and KID (mean and std) against the training "
        "dataset at the training resolution, with the sampler, steps, N, seed and wall time: one human line, then "
        "one JSON line. Real-image features are cached per dataset, split, resolution, crop and feature extractor.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint-NNNNNN dir, a training output dir (newest checkpoint), an exported folder "
        "or a Hub id USER/NAME",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        help=f"N generated images, and as many real ones (default: {DEFAULT_NUM_SAMPLES}; fewer, with "
        "a warning, when the dataset is smaller)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"ODE integration steps (default: the model's recommended steps, e.g. 1-2 after reflow; else {DEFAULT_STEPS})",
    )
    parser.add_argument("--sampler", default="euler", help="euler or heun (default: euler)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per sampling batch (default: 50)")
    parser.add_argument("--dataset", default=None, help="real images (default: the checkpoint's training dataset)")
    parser.add_argument("--split", default=None, help="dataset split (default: the training split)")
    parser.add_argument("--config-name", default=None, help="dataset configuration (default: the training one)")
    parser.add_argument("--image-column", default=None, help="image column (default: the training one)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="must be the training resolution (default: read from the checkpoint)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="class-conditional models, which are sampled class by class (uniform over the "
        "classes): the classifier-free guidance scale (default: the model's recommended one)",
    )
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument(
        "--feature-extractor",
        default=INCEPTION,
        help="'inception' (default: FID Inception v3 via torchmetrics/torch-fidelity) or "
        "module.path:callable returning an nn.Module (uint8 [B,3,H,W] -> [B,D])",
    )
    parser.add_argument(
        "--inception-weights",
        default=None,
        help=f"local copy of {INCEPTION_URL.rsplit('/', 1)[1]} (default: downloaded once to the torch hub cache)",
    )
    parser.add_argument(
        "--reference-dir",
        default=None,
        help="folder of the cached real features (default: one per setting under "
        "$LD_CACHE/fid-reference or ~/.cache/liquid_diffusion/fid-reference)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers decoding real images (default: 2 on a GPU, 0 on a CPU)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(
        func=_run_evaluate,
        offline_advice={
            **CHECKPOINT_OFFLINE_ADVICE,
            "dataset": "to evaluate without the Hub pass a local folder of real images (--dataset PATH)",
        },
    )
