"""Image features for FID and KID: the feature extractor and the cached features of the real images.

* **Extractor.** The default is torchmetrics' ``NoTrainInceptionV3`` with the ``inception-v3-compat`` weights of
  torch-fidelity (the TF-Inception used for FID since Heusel et al. 2017), 2048-d pool features. It takes uint8 images
  [B, 3, H, W] and resizes them to 299x299 itself with torch-fidelity's TF1-compatible bilinear resize
  (``antialias=False``), the resize of the original TF FID code, the same way for real and generated images. Any
  ``nn.Module`` with that contract can replace it (``feature_extractor`` / ``--feature-extractor module:callable``);
  the tests use a small stand-in.
* **Reference cache.** The real features of a dataset (by dataset id or path, split, configuration, resolution,
  crop and extractor) are computed once into ``features.safetensors`` + ``metadata.json``. The set is the first N
  images of a fixed-seed streaming shuffle; a cache with more images serves any smaller N (the same prefix), and a
  cache made with other settings is refused with a one-line message. For a class-conditional model the cache also
  holds each image's class (``labels`` + ``class_names``), so the generated images can ask for the same classes.

``evaluate.py`` compares them with the features of generated images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import ImageBatchStream, make_dataloader
from .errors import advice, first_line
from .sources import dataset_key

REFERENCE_FORMAT = "liquid-diffusion-reference-features"
REFERENCE_VERSION = 1
METADATA_FILE = "metadata.json"
FEATURES_FILE = "features.safetensors"
# The real set is the first N images of this fixed streaming shuffle, whatever N: a larger cache serves smaller N.
REFERENCE_SHUFFLE_BUFFER = 10_000
REFERENCE_SEED = 0
INCEPTION = "inception"
INCEPTION_NAME = "inception-v3-compat-2048 (torch-fidelity weights, TF1-compatible bilinear resize to 299)"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------------


def inception_weights_path() -> Path:
    """Where ``torch.hub`` keeps the downloaded Inception weights (``$TORCH_HOME/hub/checkpoints/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def inception_extractor(weights: str | os.PathLike | None = None) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` (2048-d pool features of the FID Inception, TF1-compatible resize to 299
    as in torch-fidelity), weights from ``weights`` or downloaded once by ``torch.hub`` (about 92 MB). Raises
    ``ValueError`` with one line saying what to do when torch-fidelity is missing or the weights cannot be
    downloaded."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ValueError(
            "the Inception feature extractor needs torch-fidelity: pip install 'liquid-diffusion[eval]' "
            "(or pip install torch-fidelity)"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"no Inception weights at {str(weights)!r}; download them from {INCEPTION_URL}")
    downloading = weights is None and not inception_weights_path().is_file()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's "Downloading ..." and progress bar
            module = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=None if weights is None else str(weights),
                antialias=False,
            )
    except Exception as error:  # no connection, a proxy, a truncated download: one line, cause kept
        raise ValueError(
            f"could not download the Inception weights ({first_line(error)}); for offline use put {INCEPTION_URL} at "
            f"{inception_weights_path()} ({advice('inception_weights')})"
        ) from error
    if downloading:
        print(f"downloaded the Inception weights to {inception_weights_path()}", file=sys.stderr)
    module.name = INCEPTION_NAME
    return module


def fid_pip_args() -> list[str]:
    """The ``pip install`` arguments for torch-fidelity (the FID Inception) that never touch the installed torch.

    torch-fidelity needs torchvision, and an unpinned install lets pip replace torch with the release the newest
    torchvision wants (a multi-GB download, and a kernel left with mismatched binaries). Pinning torch to the
    installed build makes pip take the torchvision built for it, from PyTorch's own index for a ``+cpu`` /
    ``+cuXXX`` build, or fail."""
    version = importlib.metadata.version("torch")
    args = ["torch-fidelity", f"torch=={version}"]
    if importlib.util.find_spec("torchvision") is None:
        args.append("torchvision")
    local = version.partition("+")[2]
    if local:
        args += ["--extra-index-url", f"https://download.pytorch.org/whl/{local}"]
    return args


def install_fid_support(pip_install) -> bool:
    """Installs torch-fidelity with ``pip_install(*args)`` (``fid_pip_args``: the installed torch stays); when pip
    cannot do that, says in one line what to install by hand and returns ``False`` (FID off)."""
    args = fid_pip_args()
    try:
        pip_install(*args)
    except Exception:  # noqa: BLE001 -- any pip failure: FID is optional, the run is not
        command = " ".join(f"'{a}'" if "=" in a else a for a in args)
        print(
            f"FID is off for this run: torch-fidelity could not be installed without replacing torch "
            f"{importlib.metadata.version('torch')}; to measure FID, run `pip install {command}` and run this cell "
            "again"
        )
        return False
    return True


def load_feature_extractor(spec: str | nn.Module = INCEPTION, weights: str | os.PathLike | None = None) -> nn.Module:
    """An extractor from ``"inception"``, ``"module.path:callable"`` (called with no argument) or an ``nn.Module``.

    The contract (torchmetrics' ``feature=`` hook): uint8 images [B, 3, H, W] in 0..255 -> features [B, D]. Its
    ``name`` attribute (else its spec or class name) keys the reference cache.
    """
    if isinstance(spec, nn.Module):
        module = spec
    elif spec == INCEPTION:
        return inception_extractor(weights)
    elif isinstance(spec, str) and re.fullmatch(r"[\w.]+:[\w.]+", spec):
        module_name, attribute = spec.split(":")
        try:
            target = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load the feature extractor {spec!r}: {error}") from None
        module = target()
        if not isinstance(module, nn.Module):
            raise ValueError(f"feature extractor {spec!r} gave a {type(module).__name__}, not a torch nn.Module")
        if not getattr(module, "name", None):
            module.name = spec
    else:
        raise ValueError(f"unknown feature extractor {spec!r}; use 'inception' or 'module.path:callable'")
    if not getattr(module, "name", None):
        module.name = f"{type(module).__module__}.{type(module).__qualname__}"
    return module.eval().requires_grad_(False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 in 0..255, quantised exactly as a saved PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Features [B, D] (float32, on the CPU) of images [B, 3, H, W] in [-1, 1]."""
    device = torch.device(device)
    extractor.to(device)
    features = extractor(to_uint8(images).to(device))
    return features.reshape(len(images), -1).float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# Reference features (of the real images), cached
# ----------------------------------------------------------------------------------------------------------------


def reference_key(
    dataset: str,
    resolution: int,
    extractor_name: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    random_crop: bool = False,
) -> dict:
    """What fixes a reference set: the dataset (canonical id or absolute path), split, configuration, resolution,
    crop, the fixed shuffle and the feature extractor."""
    return dict(
        dataset=dataset_key(dataset),
        split=split,
        config_name=config_name,
        resolution=resolution,
        random_crop=random_crop,
        flip=False,
        shuffle_buffer=REFERENCE_SHUFFLE_BUFFER,
        seed=REFERENCE_SEED,
        feature_extractor=extractor_name,
    )


def default_reference_dir(root: str | os.PathLike, key: dict) -> Path:
    """``root/<dataset>-<split>-<R>px-<hash of the key>``: one folder per reference setting."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(str(key["dataset"]).rstrip("/")).name).strip("-").lower() or "data"
    return Path(root).expanduser() / f"{slug}-{key['split']}-{key['resolution']}px-{digest}"


def default_cache_root() -> Path:
    """``$LD_CACHE/fid-reference``, else ``~/.cache/liquid_diffusion/fid-reference``."""
    return Path(os.environ.get("LD_CACHE", Path.home() / ".cache" / "liquid_diffusion")).expanduser() / "fid-reference"


def _read_reference(cache_dir: Path, key: dict) -> tuple[dict | None, torch.Tensor | None]:
    path = cache_dir / METADATA_FILE
    if not path.is_file():
        return None, None
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return _damaged(path, error)
    if not isinstance(metadata, dict) or metadata.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"{str(cache_dir)!r} is not a LiquidDiffusion reference-feature cache; use another folder")
    different = [k for k, v in key.items() if metadata.get("key", {}).get(k) != v]
    if different:
        details = ", ".join(f"{k}={metadata['key'].get(k)!r} (wanted {key[k]!r})" for k in different)
        raise ValueError(f"reference cache {str(cache_dir)!r} was made with {details}; use another folder or delete it")
    try:
        return metadata, load_file(str(cache_dir / FEATURES_FILE))["features"]
    except Exception as error:  # noqa: BLE001 -- missing, truncated or zero-filled safetensors
        return _damaged(cache_dir / FEATURES_FILE, error)


def _damaged(path: Path, error: BaseException) -> tuple[None, None]:
    """A damaged reference cache is only a cache: say which file, and let the caller compute it again."""
    print(
        f"note: the reference cache file {path} is damaged ({first_line(error)}): computing the real features again",
        file=sys.stderr,
    )
    return None, None


def reference_features(
    dataset: str,
    resolution: int,
    extractor: nn.Module,
    num_images: int,
    cache_dir,
    *,
    split: str = "train",
    config_name: str | None = None,
    image_column: str | None = None,
    random_crop: bool = False,
    batch_size: int = 50,
    num_workers: int = 0,
    with_labels: bool = False,
    label_column: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Real features [n, D] (``n = min(num_images, dataset size)``) and the cache metadata.

    Read from ``cache_dir`` when it holds at least ``num_images`` (or the whole dataset) for the same settings (and,
    ``with_labels``, the images' classes: ``reference_labels``); computed and written there otherwise (features
    first, ``metadata.json`` last, so a cache is complete or absent). A cache made with other settings is refused
    (``ValueError``); so is a dataset without a ``ClassLabel`` column when ``with_labels`` asks for one.
    """
    cache_dir = Path(cache_dir)
    key = reference_key(
        dataset, resolution, extractor.name, split=split, config_name=config_name, random_crop=random_crop
    )
    metadata, features = _read_reference(cache_dir, key)
    if (
        metadata is not None
        and (metadata["num_images"] >= num_images or metadata["whole_dataset"])
        and (not with_labels or metadata.get("class_names"))
    ):
        return features[:num_images], metadata

    stream = ImageBatchStream(
        dataset,
        resolution,
        batch_size,
        split=split,
        config_name=config_name,
        image_column=image_column,
        random_crop=random_crop,
        flip=False,
        shuffle_buffer=REFERENCE_SHUFFLE_BUFFER,
        seed=REFERENCE_SEED,
        num_epochs=1,
        with_labels=with_labels,
        label_column=label_column,
    )
    chunks, labels, count = [], [], 0
    with tqdm(total=num_images, unit="img", desc="real features", disable=not progress) as bar:
        for batch in make_dataloader(stream, num_workers):
            pixels, batch_labels = batch if with_labels else (batch, None)
            pixels = pixels[: num_images - count]
            chunks.append(extract_features(extractor, pixels, device))
            if with_labels:
                labels.append(batch_labels[: len(pixels)])
            count += len(pixels)
            bar.update(len(pixels))
            if count >= num_images:
                break
    if count == 0:
        raise ValueError(f"dataset {dataset!r} gave no image to compare with")
    features = torch.cat(chunks)
    tensors = {"features": features.contiguous(), **({"labels": torch.cat(labels)} if with_labels else {})}
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / METADATA_FILE).unlink(missing_ok=True)  # incomplete until the new metadata is written
    save_file(tensors, str(cache_dir / FEATURES_FILE))
    metadata = dict(
        format=REFERENCE_FORMAT,
        version=REFERENCE_VERSION,
        key=key,
        source=dataset,
        image_column=stream.image_column,
        num_images=count,
        whole_dataset=count < num_images,
        num_features=features.shape[1],
        class_names=stream.class_names,
        stats=None if num_workers else dataclasses.asdict(stream.stats),
    )
    tmp = cache_dir / f".{METADATA_FILE}.tmp"
    tmp.write_text(json.dumps(metadata, indent=2))
    os.replace(tmp, cache_dir / METADATA_FILE)
    return features, metadata


def reference_labels(cache_dir, num_images: int) -> tuple[torch.Tensor, list[str]]:
    """The class ids [n] of the first ``num_images`` reference images and the class names, from a cache that
    ``reference_features(..., with_labels=True)`` wrote."""
    metadata = json.loads((Path(cache_dir) / METADATA_FILE).read_text())
    if not metadata.get("class_names"):
        raise ValueError(f"reference cache {str(cache_dir)!r} holds no class labels")
    with safe_open(str(Path(cache_dir) / FEATURES_FILE), framework="pt") as tensors:  # not the features again
        labels = tensors.get_slice("labels")[:num_images]
    return labels, metadata["class_names"]
