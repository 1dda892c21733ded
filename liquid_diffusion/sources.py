"""Where data comes from: a short name, a Hub id or a local path, opened as a stream of undecoded images.

* ``DATASETS`` -- the six verified datasets of the model card, by short name (``DEFAULT_DATASET``: afhq).
* ``local_path`` -- the one answer to "local path or Hub id?" for datasets, VAEs, checkpoints and pipelines: an
  existing path is local, a name only a path can have (``./x``, ``/x``, ``~/x``, ``a/b/c``) must exist, anything
  else is a Hub id. ``dataset_key`` names a source canonically; ``hub_reachable`` checks the Hub before a download.
* ``open_source`` -- a short name of ``DATASETS``, any Hub id, a local folder of images (``imagefolder``) or a local
  dataset directory in the Hub's layout (parquet / arrow shards), all opened with
  ``datasets.load_dataset(..., streaming=True)``. The image column (found from the features) is cast to
  ``Image(decode=False)``, so the stream carries raw bytes and every consumer decodes only what it uses.

``data.py`` decodes and batches the stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import HubUnreachableError, advice, audience, first_line

# ``datasets`` is imported inside the functions that use it: loading a pipeline (``import liquid_diffusion``) never
# needs it, and it adds about half a second to every import.

# The verified datasets of the model card, by short name.
DATASETS: dict[str, str] = {
    "afhq": "huggan/AFHQv2",
    "celeba": "nielsr/CelebA-faces",
    "flowers": "huggan/flowers-102-categories",
    "pokemon": "reach-vb/pokemon-blip-captions",
    "anime": "huggan/anime-faces",
    "cartoon": "Norod78/cartoon-blip-captions",
}
DEFAULT_DATASET = DATASETS["afhq"]

# Column names tried, in order, when the features declare no ``Image`` column.
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "photo", "pixel_values")
# Files that make a local folder a dataset in the Hub's layout rather than a plain folder of images.
DATASET_FILE_SUFFIXES = (".parquet", ".arrow")
# The column name class labels get in an opened labelled stream, whatever the dataset calls it.
LABEL_KEY = "label"


# ----------------------------------------------------------------------------------------------------------------
# Local path or Hub id
# ----------------------------------------------------------------------------------------------------------------


def looks_like_local_path(text: str) -> bool:
    """``./x``, ``/x``, ``~/x``, ``a/b/c`` or a Windows path: never a Hub id (which is ``name`` or ``namespace/name``)."""
    return (
        text.startswith((".", "/", "~")) or text.count("/") >= 2 or "\\" in text or (len(text) > 1 and text[1] == ":")
    )


def local_path(name: str | os.PathLike, missing: str | None = None) -> Path | None:
    """Local path or Hub id? The local path ``name`` names (``~`` expanded), or ``None`` for a Hub id.

    An existing file or folder is local. A name only a path can have (``looks_like_local_path``) that does not exist
    raises ``FileNotFoundError(missing)``, or is returned as a path when no ``missing`` message is given.
    """
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_local_path(text):
        if missing is not None:
            raise FileNotFoundError(missing)
        return path
    return None


def canonical_name(name: str) -> str:
    """``name`` however it was spelled: the absolute path of an existing local path, else ``name`` (a Hub id)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def dataset_key(source: str) -> str:
    """A canonical name of a data source: the Hub id for short names and ids, the absolute path for local ones."""
    return canonical_name(DATASETS.get(source, source))


def resolve_source(source: str) -> tuple[str, str]:
    """Says what ``source`` is: ``("hub", id)``, ``("imagefolder", dir)``, ``("dataset_dir", dir)`` or
    ``("dataset_file", file)``. A path that exists locally is local; otherwise it must be a Hub id."""
    if not source:
        raise ValueError(f"no dataset given; use a short name ({', '.join(DATASETS)}), a Hub id or a local folder")
    if source in DATASETS:
        return "hub", DATASETS[source]
    path = local_path(source, f"no such file or folder: {source!r}; check the path (or pass a Hub id namespace/name)")
    if path is not None and path.is_dir():
        if any(p.suffix in DATASET_FILE_SUFFIXES for p in path.rglob("*") if p.is_file()):
            return "dataset_dir", str(path)
        return "imagefolder", str(path)
    if path is not None:
        if path.suffix in DATASET_FILE_SUFFIXES:
            return "dataset_file", str(path)
        raise ValueError(f"{source!r} is a single file; pass a folder of images or a dataset directory / .parquet file")
    if "/" not in source:
        raise ValueError(
            f"unknown dataset {source!r}; use a short name ({', '.join(DATASETS)}), a Hub id (namespace/name) "
            "or an existing local folder"
        )
    return "hub", source


# What to do without the Hub, per thing a run needs from it, naming no flag (Python callers); each command names
# its own flags instead (``parser.set_defaults(offline_advice=...)``, see ``errors.HubUnreachableError``).
OFFLINE_ADVICE = {
    "dataset": "use a local image folder as the dataset",
    "vae": "a VAE downloaded once is read from the Hugging Face cache; otherwise use a local VAE folder (written by "
    "AutoencoderKL.save_pretrained)",
}


def offline_advice_for(needs: str) -> str:
    """What to do without the Hub for what a run ``needs`` (``"dataset"`` or ``"vae"``): the notebook's fields in the
    notebook, else words naming no flag (each command of the command line puts its own flags in their place)."""
    return advice("offline") if audience() == "notebook" else OFFLINE_ADVICE[needs]


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request to the Hugging Face Hub (huggingface_hub's own session, so proxies and HF_ENDPOINT apply).

    Checked before a download, so that an offline machine gets one clear line at once instead of a minute of
    retries ending in "does not appear to have a file named config.json"."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 -- DNS, refused, timeout, proxy: all mean "not reachable now"
        return False
    return True


def _image_extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {ext.lower() for ext in ImageFolder.EXTENSIONS}


# Files that mark a LiquidDiffusion output folder (metrics, the run lock): its sample grids are no training data.
RUN_FOLDER_MARKERS = ("metrics.jsonl", ".liquid-diffusion.lock")


def image_files(folder: str | os.PathLike) -> tuple[list[str], int, list[str]]:
    """``(image files, number of other files, output folders skipped)`` of a local image folder: every image file
    under it, recursively and whatever its name (``datasets``' folder loader alone would take ``train``/``test`` in
    a name for a split), sorted; hidden files and folders, and LiquidDiffusion output folders inside it (their
    sample grids), are left out."""
    folder = Path(folder)
    extensions = _image_extensions()
    images, others, runs = [], 0, []
    for directory, subfolders, files in os.walk(folder, followlinks=True):
        here = Path(directory)
        if here != folder and any(name in files for name in RUN_FOLDER_MARKERS):
            runs.append(str(here))
            subfolders[:] = []
            continue
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in extensions:
                images.append(str(here / name))
            else:
                others += 1
    return images, others, runs


def describe_image_folder(folder: str | os.PathLike) -> str:
    """One line saying what training reads from an image folder."""
    images, others, runs = image_files(folder)
    return (
        f"dataset: {len(images)} image files in {folder} (all of them, recursively)"
        + (f"; {others} other file(s) ignored" if others else "")
        + (f"; skipped the training output folder(s) {', '.join(runs)}" if runs else "")
    )


def folder_fingerprint(folder: str | os.PathLike) -> dict:
    """The image files of a folder as ``{"num_files", "digest"}``: a digest of their relative paths, sizes and
    modification times, which changes when a file is added, removed, replaced or edited."""
    digest = hashlib.sha256()
    images, _, _ = image_files(folder)
    for path in images:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"num_files": len(images), "digest": digest.hexdigest()}


def open_source(
    source: str,
    split: str = "train",
    config_name: str | None = None,
    image_column: str | None = None,
    *,
    with_labels: bool = False,
    label_column: str | None = None,
    holdout=None,
    part: str = "train",
):
    """Opens ``source`` as a streaming ``datasets.IterableDataset`` holding only its image column, undecoded.

    Returns ``(dataset, image_column)``; each row is ``{image_column: {"bytes": ..., "path": ...}}``. The column is
    ``image_column`` if given, else the first ``Image`` feature, else the first of ``IMAGE_COLUMN_NAMES`` present.

    With ``with_labels`` the rows also hold ``LABEL_KEY`` (an int class id) from the ``ClassLabel`` column
    ``label_column``, else the first ``ClassLabel`` feature (see ``find_label_column``; an image folder with one
    sub-folder per class has one, named from the folders); ``class_names(dataset)`` gives the names.

    With a ``holdout`` (``validation.Holdout``), ``part="train"`` leaves its held-out images out and
    ``part="validation"`` keeps only them (a held-out split is opened instead of ``split``).
    """
    from datasets import Image as ImageFeature

    if part not in ("train", "validation"):
        raise ValueError(f"part must be 'train' or 'validation', got {part!r}")
    if holdout is not None and holdout.kind == "split" and part == "validation":
        split = holdout.split
    dataset = _stream(source, split, config_name)
    image_column = _image_column(dataset, source, image_column)
    if with_labels:
        label = find_label_column(dataset.features, source, label_column)
        dataset = dataset.select_columns([image_column, label])
        if label != LABEL_KEY:
            dataset = dataset.rename_column(label, LABEL_KEY)
    else:
        dataset = dataset.select_columns([image_column])
    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    if holdout is not None and holdout.kind != "split":
        wanted = part == "validation"
        dataset = dataset.filter(lambda row: holdout.is_held_out(row[image_column]) == wanted)
    return dataset, image_column


def _stream(source: str, split: str, config_name: str | None):
    """``datasets.load_dataset(..., streaming=True)`` of whatever ``resolve_source`` says ``source`` is; its failures
    (and an unreachable Hub, checked first) as one line that says what to do."""
    from datasets import load_dataset

    kind, target = resolve_source(source)
    if kind == "imagefolder":  # the files it holds, as an explicit list: no name is read as a split marker
        files, _, _ = image_files(target)
        if not files:
            raise ValueError(f"folder {source!r} holds no image files (png, jpg, webp, gif, bmp, ...)")
        args, kwargs = ("imagefolder",), dict(data_files={split: files})
    elif kind == "dataset_file":
        args, kwargs = (Path(target).suffix[1:],), dict(data_files=target)
    else:  # a Hub id or a local directory in the Hub's layout: the very same call
        args, kwargs = (target,), dict(name=config_name)
    if kind == "hub" and not hub_reachable():
        if source not in DATASETS and target not in DATASETS.values():  # perhaps a path from another working dir
            raise ConnectionError(
                f"no such local folder {source!r} (relative to {os.getcwd()}), and the Hugging "
                "Face Hub is unreachable, so it cannot be streamed as a Hub dataset either; check the "
                "path (or give an absolute one)"
            )
        raise HubUnreachableError(
            f"the Hugging Face Hub is unreachable, so dataset {target!r} cannot be streamed",
            "dataset",
            offline_advice_for("dataset"),
        )
    try:
        with quiet_file_resolution():
            return load_dataset(*args, split=split, streaming=True, **kwargs)
    except Exception as error:  # the Hub, the network or the files: tell the user in one line, keep the cause
        where = "the Hugging Face Hub" if kind == "hub" else "disk"
        raise ValueError(
            f"could not load dataset {target!r} (split {split!r}) from {where}: {first_line(error)} -- check the id, "
            "--split and --config-name, your connection and, for gated datasets, `huggingface-cli login`"
        ) from error


@contextlib.contextmanager
def quiet_file_resolution() -> Iterator[None]:
    """Hides the progress bars of ``datasets`` (its "Resolving data files" bar, shown for more than 16 files in a
    notebook or terminal) while the data files are listed, then puts them back as they were: the user's training
    progress is what should show."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _image_column(dataset, source: str, image_column: str | None) -> str:
    """``image_column`` if the dataset has it, else its first ``Image`` feature, else the first of
    ``IMAGE_COLUMN_NAMES`` it has (any case); ``ValueError`` naming its columns when there is none."""
    from datasets import Image as ImageFeature

    if dataset.features is not None:
        columns = list(dataset.features)
        image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, ImageFeature)]
    else:  # some streaming formats only know their columns once read
        columns = list(next(iter(dataset.take(1)), {}))
        image_columns = []
    if image_column is None:
        lowered = {name.lower(): name for name in columns}
        named = [lowered[name] for name in IMAGE_COLUMN_NAMES if name in lowered]
        image_column = (image_columns or named or [None])[0]
    if image_column is None or image_column not in columns:
        what = f"has no column {image_column!r}" if image_column else "has no image column"
        raise ValueError(
            f"dataset {source!r} {what} (columns: {', '.join(columns) or 'none'}); "
            "name the image column with --image-column (image_column=...)"
        )
    return image_column


class NoClassLabelsError(ValueError):
    """The dataset has no ``ClassLabel`` column at all (``find_label_column`` with no column named)."""


def find_label_column(features, source: str, label_column: str | None = None) -> str:
    """The class-label column: ``label_column`` if given (it must be a ``ClassLabel``), else the first ``ClassLabel``
    feature. ``ValueError`` with what to do when there is none."""
    from datasets import ClassLabel

    features = features or {}
    labels = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
    if label_column is not None:
        if label_column not in features:
            raise ValueError(
                f"dataset {source!r} has no column {label_column!r} (columns: "
                f"{', '.join(features) or 'unknown'}); fix --label-column"
            )
        if label_column not in labels:
            raise ValueError(
                f"column {label_column!r} of dataset {source!r} is not a ClassLabel column (it has no "
                "class names); pick a ClassLabel column with --label-column"
            )
        return label_column
    if not labels:
        raise NoClassLabelsError(
            f"dataset {source!r} has no class labels (no ClassLabel column among: {', '.join(features) or 'none'}); "
            "use a dataset with one, an image folder with one sub-folder per class, or drop --class-conditional"
        )
    return labels[0]


def class_names(dataset) -> list[str]:
    """The class names of a dataset opened ``with_labels`` (the ``ClassLabel`` names, in id order)."""
    return list(dataset.features[LABEL_KEY].names)
