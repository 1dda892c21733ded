"""Held-out validation: images training never sees, scored by the flow loss at a fixed grid of t with fixed noise.

    val_loss = mean_i mean || v(x_t_i, t_i) - (noise_i - x0_i) ||^2,   x_t_i = (1 - t_i) x0_i + t_i noise_i

Image ``i`` of the held-out set is scored at ``t_i = VALIDATION_T[i mod K]`` with ``noise_i`` drawn once from a fixed
seed, so every evaluation -- of this run, of a resumed run, of another seed or recipe -- sees the same
``(x0, t, noise)`` triples and two evaluations differ only by the model. One t per image (not every t for every image)
keeps an evaluation at two forward passes per held-out image (EMA and raw weights), a few training steps' worth.

Which images are held out (``choose_holdout``):

* a local image folder: the ``N`` files whose relative paths hash lowest (md5), at most ``MAX_FOLDER_FRACTION`` of
  the folder -- a fixed choice that needs no seed and does not move when files are added elsewhere in the ranking;
* a dataset with a ``validation`` or ``test`` split (other than the training split): that split, untouched;
* any other dataset: the rows whose content (image bytes, else path) hashes below a fraction, ``N`` rows' worth when
  the dataset's size is known.

Training streams and the latent cache exclude the held-out images (``Holdout.keeps``), so they never reach a
training batch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import flow
from .sources import image_files, resolve_source

VALIDATION_T = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
HELD_OUT_SPLITS = ("validation", "test")
# A folder gives at most this share of its images to validation: small folders keep training on most of them.
MAX_FOLDER_FRACTION = 0.1
# Held-out share of a dataset whose size is unknown (no split, no row count in its metadata).
UNKNOWN_SIZE_FRACTION = 0.01
NOISE_SEED = 0


def _hash_unit(text: bytes) -> float:
    """A stable number in [0, 1) from ``text`` (the first 8 hex digits of its md5)."""
    return int(hashlib.md5(text).hexdigest()[:8], 16) / 2**32


@dataclass(frozen=True)
class Holdout:
    """Which images of a source are held out for validation.

    ``kind``: ``"split"`` (the whole split ``split``), ``"files"`` (the local files ``files``, absolute paths) or
    ``"hashed"`` (rows whose content hashes below ``fraction``). ``description`` says which, for the log.
    """

    kind: str
    description: str
    split: str | None = None
    files: frozenset[str] = field(default_factory=frozenset)
    fraction: float = 0.0

    def is_held_out(self, value: dict) -> bool:
        """Whether the raw image value ``{"bytes", "path"}`` of a row belongs to the held-out set."""
        if self.kind == "files":
            return str(Path(value.get("path") or "").resolve()) in self.files
        if self.kind == "hashed":
            data = value.get("bytes") or (value.get("path") or "").encode()
            return _hash_unit(data) < self.fraction
        return False  # a held-out split is another split: no row of the training split belongs to it

    def key(self) -> str:
        """A short fingerprint of the choice, recorded in a latent cache's metadata."""
        if self.kind == "split":
            return f"split:{self.split}"
        if self.kind == "hashed":
            return f"hashed:{self.fraction:.6g}"
        return "files:" + hashlib.md5("\n".join(sorted(self.files)).encode()).hexdigest()[:16]


def choose_holdout(
    source: str, num_images: int, split: str = "train", config_name: str | None = None
) -> Holdout | None:
    """The held-out set of ``num_images`` images of ``source`` (see the module docstring); ``None`` when
    ``num_images`` is 0 or a folder is too small to spare one image."""
    if num_images <= 0:
        return None
    kind, target = resolve_source(source)
    if kind == "imagefolder":
        return _folder_holdout(Path(target), num_images)
    names = _split_names(target, kind, config_name)
    for held in HELD_OUT_SPLITS:
        if held in names and held != split:
            return Holdout("split", f"the {held!r} split of {source}", split=held)
    rows = _num_rows(source, target, kind, split, config_name)
    fraction = min(0.5, num_images / rows) if rows else UNKNOWN_SIZE_FRACTION
    size = f"{rows} rows" if rows else "rows of unknown number"
    return Holdout(
        "hashed",
        f"{fraction:.2%} of the {size} of {source} (split {split!r}) chosen by a hash of their "
        "content (it has no validation or test split)",
        fraction=fraction,
    )


def _folder_holdout(folder: Path, num_images: int) -> Holdout | None:
    files = [Path(path) for path in image_files(folder)[0]]  # the files training reads, no others
    count = min(num_images, math.floor(len(files) * MAX_FOLDER_FRACTION))
    if count == 0:
        return None
    ranked = sorted(files, key=lambda p: (_hash_unit(p.relative_to(folder).as_posix().encode()), p.as_posix()))
    chosen = frozenset(str(p.resolve()) for p in ranked[:count])
    capped = f" (at most {MAX_FOLDER_FRACTION:.0%} of a folder)" if count < num_images else ""
    return Holdout(
        "files",
        f"{count} of the {len(files)} images of {folder}{capped}, chosen by a hash of their paths",
        files=chosen,
    )


def _split_names(target: str, kind: str, config_name: str | None) -> list[str]:
    if kind == "dataset_file":
        return []
    try:
        from datasets import get_dataset_split_names

        return list(get_dataset_split_names(target, config_name))
    except Exception:  # noqa: BLE001 -- unknown splits: fall back to a hashed choice of rows
        return []


def _num_rows(source: str, target: str, kind: str, split: str, config_name: str | None) -> int | None:
    """The split's number of rows: counted for a local dataset, from the dataset's metadata for a Hub one."""
    if kind != "hub":
        from .sources import _stream

        return sum(len(chunk[next(iter(chunk))]) for chunk in _stream(source, split, config_name).iter(1024)) or None
    try:
        from datasets import load_dataset_builder

        splits = load_dataset_builder(target, config_name).info.splits or {}
        return int(splits[split].num_examples) or None
    except Exception:  # noqa: BLE001 -- no size in the metadata
        return None


class Validator:
    """The held-out set on the device, with its fixed t and noise, and the loss of a model on it.

    Args:
        x0: held-out model inputs (latents or pixels) [N, ...].
        labels: their class ids [N] for a class-conditional model (the conditional loss is scored), or ``None``.
        batch_size: images per forward pass.
    """

    def __init__(self, x0: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 32):
        self.x0, self.labels, self.batch_size = x0, labels, batch_size
        grid = torch.tensor(VALIDATION_T)
        self.t = grid[torch.arange(len(x0)) % len(grid)].to(x0.device)
        # Drawn on the CPU, so the same noise on every device.
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
        self.noise = noise.to(x0.device, x0.dtype).contiguous(memory_format=_memory_format(x0))

    def __len__(self) -> int:
        return len(self.x0)

    @torch.no_grad()
    def loss(self, model, autocast=None) -> tuple[float, dict[str, float]]:
        """``(mean loss, {t: mean loss at t})`` of ``model`` (``v = model(x_t, t[, class_labels])``)."""
        per_sample = []
        for start in range(0, len(self.x0), self.batch_size):
            part = slice(start, start + self.batch_size)
            velocity_fn = model
            if self.labels is not None:
                labels = self.labels[part]
                velocity_fn = lambda x, t, labels=labels: model(x, t, class_labels=labels)  # noqa: E731
            with autocast() if autocast is not None else torch.autocast(self.x0.device.type, enabled=False):
                per_sample.append(
                    flow.flow_matching_loss(
                        velocity_fn, self.x0[part], self.noise[part], self.t[part], reduction="none"
                    ).float()
                )
        losses = torch.cat(per_sample).cpu()
        t = self.t.cpu()
        per_t = {f"{value:g}": losses[t == value].mean().item() for value in VALIDATION_T if (t == value).any()}
        return losses.mean().item(), per_t


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
