"""Images in, training batches out: a source (``sources.py``) streamed into [-1, 1] pixel batches.

Data flows one way through this file:

1. **Source** (``sources.open_source``): a short name, Hub id or local folder, opened as a stream of raw image bytes.
2. **Decode + transform** (``load_image``, ``to_rgb``, ``transform_image``): PIL decode inside ``try``/``except``
   (corrupt files are skipped and counted, never fatal), any mode to RGB (alpha composited on white, 16-bit scaled
   down), shorter side resized to the resolution, center (or random) crop, random horizontal flip, [-1, 1].
3. **Batches** (``ImageBatchStream``): an endless, deterministic stream of [B, 3, R, R] tensors -- streaming shuffle
   with a seed, ``set_epoch`` per epoch, ``split_dataset_by_node`` across processes, DataLoader workers that split
   batches instead of duplicating them, and exact resume from any batch index (``start_batch``).
4. **Grids** (``image_grid``): [-1, 1] batches to one PIL image, for previews and samples.

The frozen VAE and the latent cache build on this in ``latents.py``; ``preview.py`` shows what training sees.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .sources import LABEL_KEY, class_names, open_source

# Mixes several integers into one seed, ``(seed * SEED_STRIDE + i)``: a prime larger than any index it is mixed with,
# so distinct tuples give distinct seeds (the latent stream's epochs, the trainer's steps, evaluation batches).
SEED_STRIDE = 1_000_003
WHITE = (255, 255, 255, 255)


# ----------------------------------------------------------------------------------------------------------------
# 2. Decode + transform
# ----------------------------------------------------------------------------------------------------------------


def load_image(value: dict | str, resolution: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decodes one raw image value (``{"bytes", "path"}`` or a path/URL) to an RGB PIL image.

    Raises (any exception) if the file cannot be decoded; callers skip and count those. Returns the image and its
    original ``(width, height)``: with ``resolution``, JPEGs are decoded at a reduced DCT scale that still keeps
    both sides >= ``resolution`` (``Image.draft``), which is several times faster for large photos.
    """
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if path is None:
            raise ValueError("image value has neither bytes nor path")
        if os.path.exists(path):
            data = Path(path).read_bytes()
        else:  # a remote file of a streamed Hub dataset (hf://, https://)
            from datasets.utils.file_utils import xopen

            with xopen(path, "rb") as f:
                data = f.read()
    image = Image.open(io.BytesIO(data))
    original_size = image.size
    if resolution and image.format == "JPEG":
        image.draft(image.mode, (resolution, resolution))
    image.load()  # decode now, inside the caller's try/except: truncated files raise here
    image = ImageOps.exif_transpose(image)
    return to_rgb(image), original_size


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency composited on white, 16-bit / 32-bit grey scaled to 8 bit, CMYK converted."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or pixels.max() > 255:
            pixels = pixels / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def transform_image(
    image: Image.Image, resolution: int, *, random_crop: bool = False, flip: bool = False, rng=None
) -> torch.Tensor:
    """RGB PIL image -> [3, R, R] float tensor in [-1, 1]: shorter side resized to R (bicubic, antialiased),
    center crop (or a random crop drawn from ``rng``), horizontal flip with probability 1/2 when ``flip``."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    rng = rng if rng is not None else np.random.default_rng(0)
    if random_crop:
        left, top = int(rng.integers(0, size[0] - resolution + 1)), int(rng.integers(0, size[1] - resolution + 1))
    else:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # numpy, not torch: per-image torch ops pay intra-op threading overhead that dominates at this size.
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(pixels))


# ----------------------------------------------------------------------------------------------------------------
# 3. Batches
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageStats:
    """Counters of one stream, kept in the process that decodes (the main one when ``num_workers=0``).

    ``read``: items this process tried to decode; ``skipped``: those that failed; ``upscaled``: good images whose
    shorter side was below the resolution."""

    read: int = 0
    skipped: int = 0
    upscaled: int = 0

    def __str__(self) -> str:
        return f"read {self.read}, skipped {self.skipped}, upscaled {self.upscaled}"


def worker_share() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the current DataLoader worker ((0, 1) in the main process).

    Worker ``w`` of ``W`` produces the batches ``b >= start_batch`` with ``(b - start_batch) % W == w``: the
    DataLoader's round-robin over workers then yields start_batch, start_batch + 1, ... in order, no duplicates.
    """
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ImageBatchStream(torch.utils.data.IterableDataset):
    """Endless, deterministic stream of pixel batches, tensors [B, 3, R, R] in [-1, 1] (with ``with_labels``:
    ``(pixels, labels)`` pairs, labels int64 class ids [B], names in ``class_names``).

    Batch ``b`` holds items ``[b*B, (b+1)*B)`` of this process's endless item stream: epoch 0, 1, 2, ... of the
    (shuffled, node-split) dataset one after another, ``set_epoch(e)`` reshuffling each epoch (``num_epochs`` stops
    after that many). Undecodable items are skipped and counted, so a batch may be shorter; a batch with no good
    image is not yielded. Random crops and flips are drawn per item from ``(seed, process_index, item index)``,
    so the same ``seed`` and ``start_batch`` give the same batches, whichever the number of workers.

    Use ``make_dataloader(stream, num_workers)``: every worker iterates the raw (undecoded) stream and decodes only
    its own batches (see ``worker_share``).

    Args:
        source: short name (``DATASETS``), Hub id, local image folder or local dataset directory / parquet file.
        resolution: output side R.
        batch_size: B.
        split, config_name, image_column: passed to the source (see ``open_source``).
        random_crop: random instead of center crop. flip: random horizontal flips.
        shuffle_buffer: streaming shuffle buffer (``IterableDataset.shuffle``); 0 or 1 keeps the source order.
        seed: shuffle and augmentation seed.
        process_index, num_processes: this process's rank and the world size (``split_dataset_by_node``).
        start_batch: the first batch to yield, for exact resume. Skipping reads (never decodes) the items before
            it once; with one process, later epochs are skipped by counting since they have the same length.
        num_epochs: stop after this many epochs (``None``: endless).
        with_labels, label_column: yield class labels too, from this ``ClassLabel`` column (see ``open_source``).
        holdout, part: leave out the held-out images (``part="train"``) or keep only them (``"validation"``); see
            ``validation.py``.
    """

    def __init__(
        self,
        source: str,
        resolution: int,
        batch_size: int,
        *,
        split: str = "train",
        config_name: str | None = None,
        image_column: str | None = None,
        random_crop: bool = False,
        flip: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        start_batch: int = 0,
        num_epochs: int | None = None,
        with_labels: bool = False,
        label_column: str | None = None,
        holdout=None,
        part: str = "train",
    ):
        super().__init__()
        if resolution < 1 or batch_size < 1 or start_batch < 0:
            raise ValueError(
                f"need resolution >= 1, batch_size >= 1, start_batch >= 0 (got {resolution}, "
                f"{batch_size}, {start_batch})"
            )
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} must lie in [0, num_processes={num_processes})")
        self.source, self.split, self.resolution, self.batch_size = source, split, resolution, batch_size
        self.random_crop, self.flip, self.seed = random_crop, flip, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.start_batch, self.num_epochs = start_batch, num_epochs

        dataset, self.image_column = open_source(
            source,
            split,
            config_name,
            image_column,
            with_labels=with_labels,
            label_column=label_column,
            holdout=holdout,
            part=part,
        )
        self.with_labels = with_labels
        self.class_names = class_names(dataset) if with_labels else None
        if shuffle_buffer > 1:  # same seed on every process, so the node split below stays disjoint
            # Interleaving shards only helps with several; with one it costs a 5 s thread-shutdown sleep per epoch
            # in datasets' parquet reader (datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN).
            interleave = min(10, dataset.num_shards)
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer, max_buffer_input_shards=interleave)
        if num_processes > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        self.dataset = dataset
        self.stats = ImageStats()
        self._epoch_lengths: dict[int, int] = {}

    def _epoch_length(self, epoch: int) -> int | None:
        if epoch in self._epoch_lengths:
            return self._epoch_lengths[epoch]
        # One process sees the whole dataset every epoch; node shares may change size as shards get reshuffled.
        if self.num_processes == 1 and self._epoch_lengths:
            return next(iter(self._epoch_lengths.values()))
        return None

    def raw_items(self) -> Iterator[tuple[int, int, int, dict, int | None]]:
        """``(item index, epoch, position in epoch, raw image value, class id or None)`` of this process's endless
        item stream, from item ``start_batch * batch_size`` on."""
        # A private copy: the dataset's epoch lives in shared memory, which forked DataLoader workers would share.
        dataset = copy.deepcopy(self.dataset)
        start = self.start_batch * self.batch_size
        index, epoch = 0, 0
        while self.num_epochs is None or epoch < self.num_epochs:
            length = self._epoch_length(epoch)
            if length is not None and index + length <= start:  # the whole epoch lies before start_batch
                index, epoch = index + length, epoch + 1
                continue
            dataset.set_epoch(epoch)
            count = 0
            # .iter() rather than iter(): the latter would shard the data across DataLoader workers by itself.
            for chunk in dataset.iter(batch_size=256):
                values = chunk[self.image_column]
                labels = chunk[LABEL_KEY] if self.with_labels else [None] * len(values)
                for value, label in zip(values, labels):
                    if index >= start:
                        yield index, epoch, count, value, label
                    index, count = index + 1, count + 1
            if count == 0:
                raise ValueError(
                    f"dataset {self.source!r} (split {self.split!r}) has no rows"
                    + (f" for process {self.process_index} of {self.num_processes}" if self.num_processes > 1 else "")
                )
            self._epoch_lengths[epoch] = count
            epoch += 1

    def _decode(self, index: int, value: dict) -> torch.Tensor | None:
        self.stats.read += 1
        try:
            image, (width, height) = load_image(value, self.resolution)
        except Exception:  # corrupt, truncated or not an image at all: skip, never crash a long run
            self.stats.skipped += 1
            return None
        if min(width, height) < self.resolution:
            self.stats.upscaled += 1
        rng = np.random.default_rng((self.seed, self.process_index, index))
        return transform_image(image, self.resolution, random_crop=self.random_crop, flip=self.flip, rng=rng)

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, num_workers = worker_share()
        # A source with no decodable image must fail, not spin forever: after every epoch seen from its start,
        # check that some image of it decoded (probing other workers' items until one does).
        usable_seen, whole_epoch, current_epoch = False, False, None
        for batch_index, items in itertools.groupby(self.raw_items(), key=lambda item: item[0] // self.batch_size):
            mine = (batch_index - self.start_batch) % num_workers == worker
            pixels, labels = [], []
            for index, epoch, position, value, label in items:
                if epoch != current_epoch:
                    if whole_epoch and not usable_seen:
                        self._no_usable_image()
                    current_epoch, whole_epoch = epoch, position == 0
                if mine:
                    tensor = self._decode(index, value)
                    if tensor is not None:
                        pixels.append(tensor)
                        labels.append(label)
                        usable_seen = True
                elif not usable_seen:  # other workers' items: probe them only until one good image is seen
                    usable_seen = _decodable(value)
            if mine:  # empty when every image of the batch was undecodable: keeps batch indices exact for resume
                batch = (
                    torch.from_numpy(np.stack([p.numpy() for p in pixels]))
                    if pixels
                    else torch.empty(0, 3, self.resolution, self.resolution)
                )
                yield (batch, torch.tensor(labels, dtype=torch.long)) if self.with_labels else batch
        if whole_epoch and not usable_seen:
            self._no_usable_image()

    def _no_usable_image(self):
        raise ValueError(
            f"dataset {self.source!r} (split {self.split!r}) yielded no usable image ({self.stats}); "
            "check that it holds images PIL can open"
        )


def _decodable(value) -> bool:
    try:
        load_image(value)
        return True
    except Exception:
        return False


class BatchLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker errors surface as the original one-line error (``ValueError: no usable image``)
    rather than as the worker's whole traceback wrapped in "Caught ValueError in DataLoader worker process 0"."""

    def __iter__(self):
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as error:
                text = str(error).strip()
                if not (text.startswith("Caught ") and "Original Traceback" in text):
                    raise
                last, prefix = text.splitlines()[-1], f"{type(error).__name__}: "
                try:
                    clean = type(error)(last.removeprefix(prefix))
                except Exception:  # noqa: BLE001 -- an exception type that takes other arguments: keep it whole
                    raise error from None
                raise clean from None
            yield batch


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader worker's ``worker_init_fn``: Ctrl-C, SIGTERM and SIGHUP sent to the whole process group (Slurm's
    ``scancel``, a closed SSH session) must not kill the workers before the main process has saved; the main process
    decides. SIGTERM and SIGHUP are taken by a thread that reads who sent them: from the main process itself (its
    DataLoader or ``multiprocessing`` ending the worker) they end the worker at once, from anyone else they are
    ignored. (Where ``sigwaitinfo`` is missing, macOS, only Ctrl-C is ignored.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    stops, parent = {signal.SIGTERM, signal.SIGHUP}, os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # before the thread starts: it inherits the mask

    def wait_for_stop_signals() -> None:
        while True:
            if signal.sigwaitinfo(stops).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_stop_signals, name="stop-signals", daemon=True).start()


def make_dataloader(stream: torch.utils.data.IterableDataset, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over a batch stream (``ImageBatchStream`` / ``LatentBatchStream``): batches pass through as
    they are (``batch_size=None``), in order, with ``num_workers`` decoding processes (which ignore stop signals:
    ``ignore_stop_signals``)."""
    return BatchLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# 4. Grids
# ----------------------------------------------------------------------------------------------------------------


def image_grid(pixels: torch.Tensor, columns: int | None = None) -> Image.Image:
    """[N, 3, H, W] in [-1, 1] -> one PIL image, ``columns`` per row (default: a near-square grid)."""
    n, _, h, w = pixels.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * h, columns * w)
    for i, image in enumerate(pixels.float().clamp(-1, 1)):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    array = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")
