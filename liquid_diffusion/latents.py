"""Latent space: the frozen SD-VAE and an on-disk latent cache, so training can read latents instead of images.

* ``load_vae`` -- the one VAE loader (training, preview, export, sampling): a local folder or Hub id, cache first.
* ``FrozenVAE`` -- that VAE (default ``stabilityai/sd-vae-ft-mse``), frozen, encodes [-1, 1] pixels to
  ``latent * scaling_factor`` and decodes back (``unscale_latents``, shared with the pipeline), in chunks, in fp32
  or bf16 (never fp16).
* ``build_latent_cache`` -- encodes a source once (all images or the first N, plus flipped copies) into
  safetensors shards and a ``metadata.json`` (source, VAE, resolution, count).
* ``load_latent_cache`` -- reads it back, refusing a cache made for another VAE or resolution
  (``load_latent_labels``: the class ids of a cache built ``with_labels``).
* ``LatentBatchStream`` -- the latent counterpart of ``data.ImageBatchStream``: same batch, seed, process and
  ``start_batch`` semantics, over cached latents with a seeded permutation per epoch.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import SEED_STRIDE, ImageBatchStream, make_dataloader, worker_share
from .errors import DiskFullError, HubUnreachableError, disk_full, first_line
from .sources import (
    canonical_name,
    dataset_key,
    folder_fingerprint,
    hub_reachable,
    local_path,
    offline_advice_for,
    resolve_source,
)

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# SD-VAE's spatial downsampling, ``2 ** (len(block_out_channels) - 1)``: what a setting is checked against before any
# VAE is loaded (``FrozenVAE.downsample_factor`` reads the loaded VAE's own).
VAE_DOWNSAMPLE_FACTOR = 8
CACHE_FORMAT = "liquid-diffusion-latent-cache"
CACHE_VERSION = 1
METADATA_FILE = "metadata.json"


def native_bf16() -> bool:
    """True on GPUs with bf16 in hardware (compute capability 8.0+: A100, L4, H100). ``is_bf16_supported()`` alone
    also says yes for a T4's slow emulated bf16."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def vae_dtype(device: torch.device) -> torch.dtype:
    """The SD-VAE overflows in fp16: bf16 where the GPU has it natively, else fp32."""
    return torch.bfloat16 if device.type == "cuda" and native_bf16() else torch.float32


def vae_latent_scale(vae) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of an ``AutoencoderKL``: the model sees ``(z - shift) * scaling``, so a
    sample goes back to the VAE as ``latent / scaling + shift`` (0.18215 and no shift for SD-VAE)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_downsample_factor(vae) -> int:
    """Pixels per latent cell of an ``AutoencoderKL``: ``2 ** (number of stages - 1)`` (8 for SD-VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """What the VAE decodes from latents as the model sees them: ``latents / scaling_factor + shift_factor``, the
    inverse of ``FrozenVAE.encode``'s ``(z - shift_factor) * scaling_factor``."""
    scaling, shift = vae_latent_scale(vae)
    return latents / scaling + shift


class FrozenVAE:
    """A frozen ``diffusers.AutoencoderKL``: pixels in [-1, 1] <-> scaled latents, in chunks, without gradients.

    ``encode`` takes the **mean** of the latent posterior, not a sample: the cache must be deterministic (the same
    image always gives the same latent, so a cached run equals an uncached one) and SD-VAE's posterior std is tiny
    next to the latent scale, so sampling would only add reproducibility problems, not useful augmentation.
    Latents are ``(mean - shift_factor) * scaling_factor`` with both read from the VAE config (0.18215 and no shift
    for SD-VAE), which puts them near unit variance for the flow model; ``decode`` inverts that.

    The VAE runs in fp32 or bf16 and always outside any autocast: SD-VAE in fp16 overflows to NaN.

    Args:
        pretrained: Hub id or local directory (``save_pretrained`` layout), or an ``AutoencoderKL`` instance.
        device, dtype: where and in which precision (``torch.float32`` or ``torch.bfloat16``) the VAE runs.
        chunk_size: images per VAE call, to bound activation memory.
    """

    def __init__(self, pretrained=DEFAULT_VAE, device="cpu", dtype: torch.dtype = torch.float32, chunk_size: int = 16):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the VAE runs in torch.float32 or torch.bfloat16, not {dtype} (fp16 SD-VAE gives NaNs)")
        if isinstance(pretrained, AutoencoderKL):
            vae, name = pretrained, pretrained.config.get("_name_or_path") or "custom AutoencoderKL"
        else:
            vae, name = load_vae(str(pretrained), dtype), str(pretrained)
        if vae.dtype != dtype:
            vae = vae.to(dtype=dtype)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.name, self.device, self.dtype, self.chunk_size = name, torch.device(device), dtype, chunk_size
        config = self.vae.config
        self.scaling_factor, self.shift_factor = vae_latent_scale(self.vae)
        self.latent_channels: int = int(config.latent_channels)
        self.downsample_factor: int = vae_downsample_factor(self.vae)

    def _chunks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        for chunk in x.split(self.chunk_size):
            yield chunk.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> float32 latents [B, C, H/f, W/f] (posterior mean, shifted and scaled)."""
        if (
            pixels.ndim != 4
            or pixels.shape[1] != 3
            or pixels.shape[-1] % self.downsample_factor
            or pixels.shape[-2] % self.downsample_factor
        ):
            raise ValueError(
                f"encode takes [B, 3, H, W] with H, W divisible by {self.downsample_factor}, got {tuple(pixels.shape)}"
            )
        out = []
        with torch.autocast(self.device.type, enabled=False):  # never fp16, even inside a caller's autocast
            for chunk in self._chunks(pixels):
                mean = self.vae.encode(chunk).latent_dist.mean
                out.append(((mean - self.shift_factor) * self.scaling_factor).float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, h, w] -> float32 pixels [B, 3, h*f, w*f] in [-1, 1]."""
        out = []
        with torch.autocast(self.device.type, enabled=False):
            for chunk in self._chunks(latents):
                pixels = self.vae.decode(unscale_latents(self.vae, chunk)).sample
                out.append(pixels.float().clamp(-1, 1))
        return torch.cat(out)


def load_vae(
    name: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    *,
    token: str | None = None,
    use_safetensors: bool | None = None,
) -> AutoencoderKL:
    """``AutoencoderKL`` from a local folder or a Hub id: the VAE's own folder or repo, or a pipeline's ``vae/``.

    A Hub id is read from the local cache first (no network needed), then downloaded if the Hub is reachable
    (``ConnectionError`` saying how to work offline when it is not). A missing folder, or one that holds no VAE,
    raises ``FileNotFoundError``; files that do not load raise ``ValueError`` naming the VAE (cause kept).
    ``token`` reads a private repo; ``use_safetensors=True`` refuses pickled weights.
    """
    text = os.fspath(name)
    local = local_path(text, f"VAE folder {text!r} does not exist; check the path (or pass a Hub id)")
    options = dict(torch_dtype=dtype, use_safetensors=use_safetensors)
    try:
        if local is not None:
            if (local / "config.json").is_file():
                return AutoencoderKL.from_pretrained(local, **options)
            if (local / "vae" / "config.json").is_file():
                return AutoencoderKL.from_pretrained(local, subfolder="vae", **options)
            raise FileNotFoundError(f"VAE folder {text!r} holds no config.json (nor vae/config.json)")
        try:  # already downloaded: no network needed
            return _vae_from_hub(text, local_files_only=True, **options)
        except OSError:
            pass
        if not hub_reachable():
            raise HubUnreachableError(
                f"the Hugging Face Hub is unreachable, so the VAE {text!r} cannot be downloaded",
                "vae",
                offline_advice_for("vae"),
            )
        return _vae_from_hub(text, token=token, **options)
    except (ConnectionError, FileNotFoundError):
        raise
    except Exception as error:  # bad id / corrupt files: one clear line, cause kept
        raise ValueError(f"could not load the VAE {text!r}: {first_line(error)}") from error


def _vae_from_hub(repo_id: str, **options) -> AutoencoderKL:
    """The VAE of Hub repo ``repo_id``: at its root (a VAE repo), else in ``vae/`` (a pipeline repo)."""
    try:
        return AutoencoderKL.from_pretrained(repo_id, **options)
    except OSError as root_error:
        try:
            return AutoencoderKL.from_pretrained(repo_id, subfolder="vae", **options)
        except OSError:
            raise root_error from None


# ----------------------------------------------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------------------------------------------


def _same_vae(a: str, b: str) -> bool:
    """Same Hub id, or the same local directory however it was spelled."""
    return canonical_name(a) == canonical_name(b)


class DamagedCacheError(ValueError):
    """A latent cache file is unreadable (truncated, zero-filled); the message names it."""


def _damaged(path: Path, reason: str) -> DamagedCacheError:
    return DamagedCacheError(
        f"latent cache file {path} is unreadable ({reason}); delete {str(path.parent)!r} and the "
        "next run builds the cache again"
    )


def read_metadata(cache_dir) -> dict:
    """The ``metadata.json`` of a complete cache; ``FileNotFoundError`` when there is none, ``DamagedCacheError``
    (naming it) when it does not read."""
    path = Path(cache_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no latent cache in {str(cache_dir)!r} ({METADATA_FILE} missing); build one with build_latent_cache"
        )
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _damaged(path, first_line(error)) from None
    if not isinstance(metadata, dict) or metadata.get("format") != CACHE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a LiquidDiffusion latent cache")
    return metadata


def _check(metadata: dict, cache_dir, vae_id: str | None, resolution: int | None, source: str | None) -> None:
    if source is not None and dataset_key(source) != metadata["dataset"]:
        raise ValueError(
            f"latent cache {str(cache_dir)!r} holds {metadata['source']!r}, not {source!r}; "
            "rebuild it for this dataset or use another cache directory"
        )
    if vae_id is not None and not _same_vae(metadata["vae"], str(vae_id)):
        raise ValueError(
            f"latent cache {str(cache_dir)!r} was made with VAE {metadata['vae']!r}, not {str(vae_id)!r}; "
            "rebuild it for this VAE or use another cache directory"
        )
    if resolution is not None and metadata["resolution"] != resolution:
        raise ValueError(
            f"latent cache {str(cache_dir)!r} was made at resolution {metadata['resolution']}, not {resolution}; "
            "rebuild it at this resolution or use another cache directory"
        )


def build_latent_cache(
    source: str,
    vae: FrozenVAE,
    cache_dir,
    resolution: int,
    num_images: int | None = None,
    flip: bool = True,
    *,
    split: str = "train",
    config_name: str | None = None,
    image_column: str | None = None,
    random_crop: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
    shard_size: int = 8192,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
    with_labels: bool = False,
    label_column: str | None = None,
    holdout=None,
) -> Path:
    """Encodes ``source`` once into ``cache_dir`` and returns it; training then never touches the VAE.

    One pass over the source in its own order (no shuffle; bad files skipped), the first ``num_images`` good
    images (all if ``None``), center crop (or a fixed random crop). With ``flip``, each image's mirror is encoded
    too (encoding the flipped pixels, since the VAE is not exactly flip-equivariant). Latents are stored as
    ``dtype`` (fp16 by default: half the disk and RAM, ~1e-3 relative error) in ``shard-XXXXX.safetensors`` files
    holding ``latents`` (and ``latents_flipped``), then ``metadata.json`` is written last, marking the cache complete.
    With ``with_labels`` each shard also holds ``labels`` (int64 class ids of its images, from the ``ClassLabel``
    column ``label_column`` or the first one) and the metadata ``class_names``; such a cache serves unconditional
    training too.

    With a ``holdout`` (``validation.Holdout``) its held-out images are left out of the cache, so no training batch
    ever holds one; the metadata's ``held_out`` records the choice.

    A complete cache with the same source, VAE, resolution, count, flip, crop and held-out images is reused as is; a
    different one in ``cache_dir`` is refused (pick another directory or delete it).
    """
    cache_dir = Path(cache_dir)
    settings = dict(
        source=source,
        dataset=dataset_key(source),
        split=split,
        config_name=config_name,
        vae=vae.name,
        resolution=resolution,
        requested_images=num_images,
        flipped=flip,
        random_crop=random_crop,
    )
    if with_labels:  # only then, so caches built before labels existed stay valid for unconditional training
        settings.update(labels=True, label_column=label_column)
    if holdout is not None:  # only then, so caches of runs without validation stay valid
        settings.update(held_out=holdout.key())
    folder = local_path(source)
    if folder is not None and folder.is_dir() and resolve_source(source)[0] == "imagefolder":
        settings["files"] = folder_fingerprint(folder)  # a folder that changed since is encoded again
    if _reusable(cache_dir, settings):
        return cache_dir
    stream = ImageBatchStream(
        source,
        resolution,
        batch_size,
        split=split,
        config_name=config_name,
        image_column=image_column,
        random_crop=random_crop,
        flip=False,
        shuffle_buffer=0,
        num_epochs=1,
        with_labels=with_labels,
        label_column=label_column,
        holdout=holdout,
    )
    shards = _ShardWriter(cache_dir, dtype, shard_size)
    with tqdm(total=num_images, unit="img", desc="encoding latents", disable=not progress) as bar:
        count = _encode_stream(stream, vae, shards, num_images, flip, num_workers, bar)
    if count == 0:
        raise ValueError(f"dataset {source!r} gave no image to cache")

    latent_size = resolution // vae.downsample_factor
    metadata = dict(
        format=CACHE_FORMAT,
        version=CACHE_VERSION,
        **settings,
        image_column=stream.image_column,
        num_images=count,
        num_latents=count * (2 if flip else 1),
        latent_shape=[vae.latent_channels, latent_size, latent_size],
        scaling_factor=vae.scaling_factor,
        shift_factor=vae.shift_factor,
        dtype=str(dtype).removeprefix("torch."),
        shards=shards.shards,
        class_names=stream.class_names,
        # Decode counts live in the process that decodes: only known here without DataLoader workers.
        stats=None if num_workers else dataclasses.asdict(stream.stats),
    )
    (cache_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return cache_dir


def _reusable(cache_dir: Path, settings: dict) -> bool:
    """True when ``cache_dir`` holds a complete cache made with ``settings``; a different one is refused
    (``ValueError``). Otherwise readies the folder for a new build (the shards of an interrupted one removed)."""
    if (cache_dir / METADATA_FILE).is_file():
        try:
            existing = read_metadata(cache_dir)
            _verify_shards(cache_dir, existing)
        except DamagedCacheError as error:  # only a cache: build it again
            print(f"note: {str(error).split('; delete')[0]}: building the latent cache again", file=sys.stderr)
            existing = None
        if existing is not None and all(
            existing.get(key) == value for key, value in settings.items() if key != "files"
        ):
            if "files" not in settings or existing.get("files") == settings["files"]:  # (a folder gone: no check)
                return True
            then = existing.get("files", {}).get("num_files", "an unrecorded number of")
            print(
                f"note: the dataset folder {settings['source']} changed since its latent cache was built ({then} "
                f"image files then, {settings['files']['num_files']} now): building the cache again",
                file=sys.stderr,
            )
        elif existing is not None:
            raise ValueError(
                f"{str(cache_dir)!r} already holds a different latent cache ({existing['source']!r}, VAE "
                f"{existing['vae']!r}, {existing['resolution']}px, held out: {existing.get('held_out', 'none')}); "
                "use another directory or delete it"
            )
        (cache_dir / METADATA_FILE).unlink()  # incomplete until the new build writes it again
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob("shard-*.safetensors"):  # leftovers of an interrupted (or replaced) build
        stale.unlink()
    return False


def _verify_shards(cache_dir: Path, metadata: dict) -> None:
    """Opens every shard's header (cheap: no tensor is read), so a truncated or zero-filled shard is found before
    training; ``DamagedCacheError`` names it."""
    for shard in metadata.get("shards", []):
        path = Path(cache_dir) / shard["file"]
        try:
            with safe_open(str(path), framework="pt") as tensors:
                rows = tensors.get_slice("latents").get_shape()[0]
        except Exception as error:  # noqa: BLE001 -- missing, truncated, garbage
            raise _damaged(path, first_line(error)) from None
        if rows != shard["count"]:
            raise _damaged(path, f"{rows} rows, not {shard['count']}")


def _encode_stream(
    stream: ImageBatchStream,
    vae: FrozenVAE,
    shards: _ShardWriter,
    num_images: int | None,
    flip: bool,
    num_workers: int,
    bar,
) -> int:
    """Encodes the stream's first ``num_images`` good images (all when ``None``; mirrored copies too with ``flip``)
    into ``shards``, flushing the last shard; returns how many images were encoded."""
    count = 0
    for pixels in make_dataloader(stream, num_workers):
        labels = None
        if stream.with_labels:
            pixels, labels = pixels
        if len(pixels) == 0:  # every image of this batch was undecodable
            continue
        if num_images is not None:
            pixels = pixels[: num_images - count]
        shards.add(
            latents=vae.encode(pixels).cpu(),
            latents_flipped=vae.encode(pixels.flip(-1)).cpu() if flip else None,
            labels=None if labels is None else labels[: len(pixels)],
        )
        count += len(pixels)
        bar.update(len(pixels))
        if num_images is not None and count >= num_images:
            break
    shards.flush()
    return count


class _ShardWriter:
    """Collects encoded rows and writes them as ``shard-XXXXX.safetensors`` files of about ``shard_size`` rows
    (latents as ``dtype``, labels as int64); ``shards`` lists the files written, for the metadata."""

    def __init__(self, cache_dir: Path, dtype: torch.dtype, shard_size: int):
        self.cache_dir, self.dtype, self.shard_size = cache_dir, dtype, shard_size
        self.shards: list[dict] = []
        self.pending: dict[str, list[torch.Tensor]] = {"latents": [], "latents_flipped": [], "labels": []}

    def add(self, **tensors: torch.Tensor | None) -> None:
        for key, value in tensors.items():
            if value is not None:
                self.pending[key].append(value)
        if sum(len(x) for x in self.pending["latents"]) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending["latents"]:
            return
        tensors = {
            key: torch.cat(value).to(torch.long if key == "labels" else self.dtype).contiguous()
            for key, value in self.pending.items()
            if value
        }
        name = f"shard-{len(self.shards):05d}.safetensors"
        try:
            save_file(tensors, str(self.cache_dir / name))
        except Exception as error:
            (self.cache_dir / name).unlink(missing_ok=True)
            if disk_full(error):
                raise DiskFullError(
                    errno.ENOSPC,
                    f"no space left on device while writing the latent cache in "
                    f"{self.cache_dir}; free space (or pass --cache-dir on a larger disk) and run "
                    "again",
                ) from None
            raise
        self.shards.append({"file": name, "count": len(tensors["latents"])})
        for value in self.pending.values():
            value.clear()


def load_latent_cache(
    cache_dir, *, vae_id: str | None = None, resolution: int | None = None, source: str | None = None
):
    """Reads a cache: ``(latents [N, C, h, w] in the stored dtype, metadata)``.

    Rows ``0..num_images-1`` are the images in source order; with flipped copies, row ``i + num_images`` is the
    mirror of row ``i`` (``N = num_latents``). ``vae_id`` / ``resolution`` / ``source`` (a short name, Hub id or
    path: compared by ``dataset_key``), when given, must match the cache's, else ``ValueError`` (latents of another
    VAE, size or dataset would silently train the wrong thing).
    """
    metadata = read_metadata(cache_dir)
    _check(metadata, cache_dir, vae_id, resolution, source)
    originals, flipped = [], []
    for shard in metadata["shards"]:
        path = Path(cache_dir) / shard["file"]
        try:
            tensors = load_file(str(path))
        except Exception as error:  # noqa: BLE001 -- truncated or zero-filled: name the file
            raise _damaged(path, first_line(error)) from None
        originals.append(tensors["latents"])
        if "latents_flipped" in tensors:
            flipped.append(tensors["latents_flipped"])
    return torch.cat(originals + flipped), metadata


def load_latent_labels(cache_dir, metadata: dict | None = None) -> torch.Tensor:
    """The int64 class ids [N] of a cache built ``with_labels``, row for row with ``load_latent_cache``'s latents
    (a flipped copy has its original's label); ``ValueError`` for a cache without labels."""
    metadata = metadata or read_metadata(cache_dir)
    if not metadata.get("labels"):
        raise ValueError(
            f"latent cache {str(cache_dir)!r} holds no class labels; rebuild it for class-conditional "
            "training (another --cache-dir, or delete it)"
        )
    labels = torch.cat([load_file(str(Path(cache_dir) / shard["file"]))["labels"] for shard in metadata["shards"]])
    return torch.cat([labels, labels]) if metadata["flipped"] else labels


class LatentBatchStream(torch.utils.data.IterableDataset):
    """Endless, deterministic stream of cached-latent batches [B, C, h, w] (float32), ``ImageBatchStream``'s twin.

    Epoch ``e`` is a permutation of all cached rows (originals and flipped copies) drawn from ``(seed, e)``;
    process ``p`` of ``P`` takes every P-th entry of it from ``p`` on (disjoint, covering). Batch ``b`` holds
    items ``[b*B, (b+1)*B)`` of this process's endless item stream; ``start_batch`` resumes exactly there, and
    DataLoader workers split batches the same way as ``ImageBatchStream`` (``data.worker_share``).

    Args:
        cache: a cache directory (read with ``load_latent_cache``, checked against ``vae_id`` / ``resolution`` /
            ``source``) or a latent tensor [N, C, h, w].
        batch_size, seed, process_index, num_processes, start_batch: as in ``ImageBatchStream``.
        with_labels: yield ``(latents, labels)`` (int64 class ids [B]) from a cache built ``with_labels``.
        labels: the class ids [N] when ``cache`` is a tensor and ``with_labels``.
    """

    def __init__(
        self,
        cache,
        batch_size: int,
        *,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        start_batch: int = 0,
        vae_id: str | None = None,
        resolution: int | None = None,
        source: str | None = None,
        with_labels: bool = False,
        labels: torch.Tensor | None = None,
    ):
        super().__init__()
        if torch.is_tensor(cache):
            self.latents, self.metadata = cache, {}
        else:
            self.latents, self.metadata = load_latent_cache(cache, vae_id=vae_id, resolution=resolution, source=source)
            labels = load_latent_labels(cache, self.metadata) if with_labels else None
        if with_labels and (labels is None or len(labels) != len(self.latents)):
            raise ValueError("with_labels needs one class id per cached latent")
        self.labels = labels if with_labels else None
        self.class_names = self.metadata.get("class_names")
        if batch_size < 1 or start_batch < 0 or not 0 <= process_index < num_processes:
            raise ValueError(
                f"need batch_size >= 1, start_batch >= 0 and 0 <= process_index < num_processes "
                f"(got {batch_size}, {start_batch}, {process_index}, {num_processes})"
            )
        if len(self.latents) < num_processes:
            raise ValueError(f"{len(self.latents)} cached latents cannot feed {num_processes} processes")
        self.batch_size, self.seed, self.start_batch = batch_size, seed, start_batch
        self.process_index, self.num_processes = process_index, num_processes
        # Items per epoch of this process (the first N % P processes get one more).
        self.epoch_length = math.ceil((len(self.latents) - process_index) / num_processes)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """Row indices of this process's share of epoch ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
        return torch.randperm(len(self.latents), generator=generator)[self.process_index :: self.num_processes]

    def batch(self, batch_index: int, permutations: dict | None = None):
        """Batch ``batch_index`` of this process's stream, as float32 (``permutations``: a per-iterator memo); with
        labels, ``(latents, labels)``."""
        permutations = {} if permutations is None else permutations
        rows = []
        position, end = batch_index * self.batch_size, (batch_index + 1) * self.batch_size
        while position < end:  # a batch may straddle an epoch boundary
            epoch, offset = divmod(position, self.epoch_length)
            if epoch not in permutations:
                permutations.clear()  # keep only the current epoch's permutation
                permutations[epoch] = self.epoch_indices(epoch)
            count = min(end - position, self.epoch_length - offset)
            rows.append(permutations[epoch][offset : offset + count])
            position += count
        rows = torch.cat(rows)
        if self.labels is not None:
            return self.latents[rows].float(), self.labels[rows]
        return self.latents[rows].float()

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, num_workers = worker_share()
        permutations: dict = {}
        batch_index = self.start_batch + worker
        while True:
            yield self.batch(batch_index, permutations)
            batch_index += num_workers
