"""Latent space: the frozen SD-VAE and an on-disk latent cache, so training can read latents instead of images.

* ``FrozenVAE`` -- ``AutoencoderKL.from_pretrained`` (default ``stabilityai/sd-vae-ft-mse``), frozen, encodes
  [-1, 1] pixels to ``latent * scaling_factor`` and decodes back, in chunks, in fp32 or bf16 (never fp16).
* ``build_latent_cache`` -- encodes a source once (all images or the first N, plus flipped copies) into
  safetensors shards and a ``metadata.json`` (source, VAE, resolution, count).
* ``load_latent_cache`` -- reads it back, refusing a cache made for another VAE or resolution
  (``load_latent_labels``: the class ids of a cache built ``with_labels``).
* ``LatentBatchStream`` -- the latent counterpart of ``data.ImageBatchStream``: same batch, seed, process and
  ``start_batch`` semantics, over cached latents with a seeded permutation per epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch

from .errors import first_line
from .data import (
    DATASETS,
    OFFLINE_HINT,
    SEED_STRIDE,
    ImageBatchStream,
    hub_reachable,
    looks_like_local_path,
    make_dataloader,
    worker_share,
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
        from diffusers import AutoencoderKL

        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the VAE runs in torch.float32 or torch.bfloat16, not {dtype} (fp16 SD-VAE gives NaNs)")
        if isinstance(pretrained, AutoencoderKL):
            vae, name = pretrained, pretrained.config.get("_name_or_path") or "custom AutoencoderKL"
        else:
            vae, name = _load_vae(str(pretrained), dtype), str(pretrained)
        if vae.dtype != dtype:
            vae = vae.to(dtype=dtype)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.name, self.device, self.dtype, self.chunk_size = name, torch.device(device), dtype, chunk_size
        config = self.vae.config
        self.scaling_factor, self.shift_factor = vae_latent_scale(self.vae)
        self.latent_channels: int = int(config.latent_channels)
        self.downsample_factor: int = 2 ** (len(config.block_out_channels) - 1)

    def _chunks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        for chunk in x.split(self.chunk_size):
            yield chunk.to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> float32 latents [B, C, H/f, W/f] (posterior mean, shifted and scaled)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-1] % self.downsample_factor or \
                pixels.shape[-2] % self.downsample_factor:
            raise ValueError(f"encode takes [B, 3, H, W] with H, W divisible by {self.downsample_factor}, "
                             f"got {tuple(pixels.shape)}")
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
                pixels = self.vae.decode(chunk / self.scaling_factor + self.shift_factor).sample
                out.append(pixels.float().clamp(-1, 1))
        return torch.cat(out)


def _load_vae(name: str, dtype: torch.dtype):
    """``AutoencoderKL`` from a local folder or a Hub id (the local cache first, then the Hub if it is reachable)."""
    from diffusers import AutoencoderKL

    local = Path(name).expanduser()
    if not local.exists() and looks_like_local_path(name):
        raise FileNotFoundError(f"VAE folder {name!r} does not exist; check the path (or pass a Hub id)")
    try:
        if local.exists():
            return AutoencoderKL.from_pretrained(local, torch_dtype=dtype)
        try:  # already downloaded: no network needed
            return AutoencoderKL.from_pretrained(name, torch_dtype=dtype, local_files_only=True)
        except OSError:
            pass
        if not hub_reachable():
            raise ConnectionError(f"the Hugging Face Hub is unreachable, so the VAE {name!r} cannot be downloaded; "
                                  + OFFLINE_HINT)
        return AutoencoderKL.from_pretrained(name, torch_dtype=dtype)
    except ConnectionError:
        raise
    except Exception as error:  # bad path / id / corrupt files: one clear line, cause kept
        raise ValueError(f"could not load the VAE {name!r}: {first_line(error)}") from error


# ----------------------------------------------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------------------------------------------


def _same_vae(a: str, b: str) -> bool:
    """Same Hub id, or the same local directory however it was spelled."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def dataset_key(source: str) -> str:
    """A canonical name of a data source: the Hub id for short names and ids, the absolute path for local ones."""
    source = DATASETS.get(source, source)
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def read_metadata(cache_dir) -> dict:
    """The ``metadata.json`` of a complete cache; ``FileNotFoundError`` when there is none."""
    path = Path(cache_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no latent cache in {str(cache_dir)!r} ({METADATA_FILE} missing); build one with build_latent_cache"
        )
    metadata = json.loads(path.read_text())
    if metadata.get("format") != CACHE_FORMAT:
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

    A complete cache with the same source, VAE, resolution, count, flip and crop is reused as is; a different one
    in ``cache_dir`` is refused (pick another directory or delete it).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    settings = dict(source=source, dataset=dataset_key(source), split=split, config_name=config_name, vae=vae.name,
                    resolution=resolution,
                    requested_images=num_images, flipped=flip, random_crop=random_crop)
    if with_labels:  # only then, so caches built before labels existed stay valid for unconditional training
        settings.update(labels=True, label_column=label_column)
    if (cache_dir / METADATA_FILE).is_file():
        existing = read_metadata(cache_dir)
        if all(existing.get(key) == value for key, value in settings.items()):
            return cache_dir
        raise ValueError(
            f"{str(cache_dir)!r} already holds a different latent cache ({existing['source']!r}, VAE "
            f"{existing['vae']!r}, {existing['resolution']}px); use another directory or delete it"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob("shard-*.safetensors"):  # leftovers of an interrupted build
        stale.unlink()

    stream = ImageBatchStream(source, resolution, batch_size, split=split, config_name=config_name,
                              image_column=image_column, random_crop=random_crop, flip=False, shuffle_buffer=0,
                              num_epochs=1, with_labels=with_labels, label_column=label_column)
    shards, pending, count = [], {"latents": [], "latents_flipped": [], "labels": []}, 0

    def flush():
        if pending["latents"]:
            tensors = {key: torch.cat(value).to(torch.long if key == "labels" else dtype).contiguous()
                       for key, value in pending.items() if value}
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(tensors, str(cache_dir / name))
            shards.append({"file": name, "count": len(tensors["latents"])})
            for value in pending.values():
                value.clear()

    with tqdm(total=num_images, unit="img", desc="encoding latents", disable=not progress) as bar:
        for pixels in make_dataloader(stream, num_workers):
            if with_labels:
                pixels, labels = pixels
            if len(pixels) == 0:  # every image of this batch was undecodable
                continue
            if with_labels:
                pending["labels"].append(labels[: len(pixels) if num_images is None else num_images - count])
            if num_images is not None:
                pixels = pixels[: num_images - count]
            pending["latents"].append(vae.encode(pixels).cpu())
            if flip:
                pending["latents_flipped"].append(vae.encode(pixels.flip(-1)).cpu())
            count += len(pixels)
            bar.update(len(pixels))
            if sum(len(x) for x in pending["latents"]) >= shard_size:
                flush()
            if num_images is not None and count >= num_images:
                break
    flush()
    if count == 0:
        raise ValueError(f"dataset {source!r} gave no image to cache")

    latent_size = resolution // vae.downsample_factor
    metadata = dict(
        format=CACHE_FORMAT, version=CACHE_VERSION, **settings, image_column=stream.image_column,
        num_images=count, num_latents=count * (2 if flip else 1),
        latent_shape=[vae.latent_channels, latent_size, latent_size], scaling_factor=vae.scaling_factor,
        shift_factor=vae.shift_factor, dtype=str(dtype).removeprefix("torch."), shards=shards,
        class_names=stream.class_names,
        # Decode counts live in the process that decodes: only known here without DataLoader workers.
        stats=None if num_workers else dict(read=stream.stats.read, skipped=stream.stats.skipped,
                                            upscaled=stream.stats.upscaled),
    )
    (cache_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return cache_dir


def load_latent_cache(cache_dir, *, vae_id: str | None = None, resolution: int | None = None,
                      source: str | None = None):
    """Reads a cache: ``(latents [N, C, h, w] in the stored dtype, metadata)``.

    Rows ``0..num_images-1`` are the images in source order; with flipped copies, row ``i + num_images`` is the
    mirror of row ``i`` (``N = num_latents``). ``vae_id`` / ``resolution`` / ``source`` (a short name, Hub id or
    path: compared by ``dataset_key``), when given, must match the cache's, else ``ValueError`` (latents of another
    VAE, size or dataset would silently train the wrong thing).
    """
    from safetensors.torch import load_file

    metadata = read_metadata(cache_dir)
    _check(metadata, cache_dir, vae_id, resolution, source)
    originals, flipped = [], []
    for shard in metadata["shards"]:
        tensors = load_file(str(Path(cache_dir) / shard["file"]))
        originals.append(tensors["latents"])
        if "latents_flipped" in tensors:
            flipped.append(tensors["latents_flipped"])
    return torch.cat(originals + flipped), metadata


def load_latent_labels(cache_dir, metadata: dict | None = None) -> torch.Tensor:
    """The int64 class ids [N] of a cache built ``with_labels``, row for row with ``load_latent_cache``'s latents
    (a flipped copy has its original's label); ``ValueError`` for a cache without labels."""
    from safetensors.torch import load_file

    metadata = metadata or read_metadata(cache_dir)
    if not metadata.get("labels"):
        raise ValueError(f"latent cache {str(cache_dir)!r} holds no class labels; rebuild it for class-conditional "
                         "training (another --cache-dir, or delete it)")
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

    def __init__(self, cache, batch_size: int, *, seed: int = 0, process_index: int = 0, num_processes: int = 1,
                 start_batch: int = 0, vae_id: str | None = None, resolution: int | None = None,
                 source: str | None = None, with_labels: bool = False, labels: torch.Tensor | None = None):
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
            raise ValueError(f"need batch_size >= 1, start_batch >= 0 and 0 <= process_index < num_processes "
                             f"(got {batch_size}, {start_batch}, {process_index}, {num_processes})")
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
