"""Few-step generation by reflow (Liu et al., "Flow Straight and Fast", ICLR 2023): a trained model (the teacher)
becomes a model that samples in 1-4 Euler steps.

1. Pairs: the teacher integrates its ODE from noise z to a sample x = ODE(z) (``--teacher-sampler``,
   ``--teacher-steps``); the (z, x) pairs (and the class label of a conditional teacher) are cached on disk in
   ``OUTPUT_DIR/pair-cache/`` as safetensors shards with a ``metadata.json`` naming the teacher (its weights' SHA-256)
   and the sampler settings. A resumed run reuses every shard that reads back and generates only the missing ones.
2. Reflow: a student initialised from the teacher's EMA weights trains with the ordinary rectified-flow loss on
   x_t = (1 - t) x + t z with target v = z - x, where (z, x) is a *pair* instead of independent noise and data: the
   paths no longer cross, so they straighten and few Euler steps follow them. It is a ``Trainer`` run (the pair cache
   is its data source): checkpoints, exact ``--resume``, SIGTERM/SIGHUP saves, the run lock, EMA and progress are
   train's own. ``--distill-t 1`` trains at t = 1 only (a 1-step distillation stage, run on a reflow student).
3. Output: ``OUTPUT_DIR/pipeline/``, the same export as ``export`` writes, with ``recommended_steps`` in the
   pipeline config (its default ``num_inference_steps``) and a model card saying it was made for few steps.

Class-conditional teachers: each pair stores its label (a share ``--unconditional-pairs`` of the pairs the null
class, the teacher's unguided sample). The teacher's guidance is *baked in*: x is the teacher's guided sample at
``--pair-guidance-scale`` (default: the teacher's recommended scale), the student trains on the labels without
dropout and samples at guidance scale 1 (recorded as its recommended scale), one model call per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import flow
from .checkpoints import WEIGHTS_NAME, list_checkpoints, read_json
from .config import TrainConfig, _help, add_config_flags
from .data import SEED_STRIDE
from .errors import check_number, first_line
from .export import export_checkpoint, is_exported_pipeline
from .latents import FrozenVAE, vae_downsample_factor, vae_dtype
from .model import LiquidDiffusionUNet
from .sampling import class_grid_labels, save_grid
from .stopping import GracefulStop, StopRequested, TrainingInterrupted
from .trainer import Trainer, train_to_exit_status

PAIR_CACHE = "pair-cache"
PIPELINE_DIR = "pipeline"
CACHE_FORMAT = 1
GRID_STEPS = (1, 2, 4)  # the sample grids: one row per number of Euler steps, from the same noise
# Settings a pair cache is made with: another value of any of them is another cache.
CACHE_KEYS = (
    "format",
    "teacher_sha256",
    "teacher_sampler",
    "teacher_steps",
    "pair_guidance_scale",
    "unconditional_pairs",
    "num_pairs",
    "shard_size",
    "shape",
    "seed",
    "num_classes",
)
# TrainConfig fields a reflow run takes from its teacher (no flags).
FROM_TEACHER = (
    "dataset",
    "split",
    "config_name",
    "image_column",
    "resolution",
    "flip",
    "random_crop",
    "shuffle_buffer",
    "class_conditional",
    "label_column",
    "preset",
    "space",
    "vae",
    "cache_latents",
    "cache_dir",
    "cache_num_images",
    "validation_images",
    "validation_every",
    "eval_every",
    "eval_samples",
    "eval_feature_extractor",
    "class_dropout",
    "guidance_scale",
    "timestep_sampling",
    "logit_mean",
    "logit_std",
)
# Filled in by the run itself (no flags): who the teacher is.
RECORDED = ("teacher_sha256", "teacher_step", "teacher_name")
_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass
class ReflowConfig(TrainConfig):
    """A ``TrainConfig`` whose data is the teacher's (noise, sample) pairs; see the module docstring. Its defaults
    differ from train's where a fine-tuning run wants it (steps, lr, warmup, grid and checkpoint intervals)."""

    steps: int = dataclasses.field(default=2000, metadata=_TRAIN_FIELDS["steps"].metadata)
    lr: float = dataclasses.field(default=2e-4, metadata=_TRAIN_FIELDS["lr"].metadata)
    warmup_steps: int = dataclasses.field(default=100, metadata=_TRAIN_FIELDS["warmup_steps"].metadata)
    sample_every: int = dataclasses.field(default=500, metadata=_TRAIN_FIELDS["sample_every"].metadata)
    checkpoint_every: int = dataclasses.field(default=500, metadata=_TRAIN_FIELDS["checkpoint_every"].metadata)
    output_dir: str = dataclasses.field(
        default="outputs/liquid-diffusion-reflow", metadata=_TRAIN_FIELDS["output_dir"].metadata
    )
    teacher: str = _help(
        "the teacher: a training run or checkpoint, an exported pipeline folder or a Hub id", default=""
    )
    pairs: int = _help("(noise, teacher sample) pairs to generate and train on", default=4000)
    teacher_sampler: str = _help("the teacher's ODE sampler for the pairs: euler or heun", default="heun")
    teacher_steps: int = _help("the teacher's integration steps per pair (heun: two model calls each)", default=50)
    pair_guidance_scale: float | None = _help(
        "class-conditional teachers: the guidance scale of the stored teacher "
        "samples, baked into the student (default: the teacher's recommended "
        "scale)",
        default=None,
    )
    unconditional_pairs: float = _help(
        "class-conditional teachers: the share of pairs sampled for the null class (keeps unconditional sampling)",
        default=0.1,
    )
    pair_batch_size: int = _help("teacher samples per forward pass while generating pairs", default=64)
    shard_size: int = _help("pairs per safetensors shard of the pair cache", default=256)
    pair_cache_dir: str | None = _help(
        "the pair cache's folder (default: OUTPUT_DIR/pair-cache); another run's cache "
        "of the same teacher and settings is reused",
        default=None,
    )
    init: str | None = _help(
        "start the student from this model's weights instead of the teacher's (e.g. a reflow "
        "run's result, for a --distill-t stage on the same pairs)",
        default=None,
    )
    distill_t: float | None = _help(
        "train at this one t only (1: a 1-step distillation stage) instead of t drawn as --timestep-sampling says",
        default=None,
    )
    recommended_steps: int = _help(
        "the number of Euler steps the result is made for: the pipeline's default "
        "num_inference_steps, named in the model card",
        default=2,
    )
    teacher_sha256: str = _help("SHA-256 of the teacher's weights (recorded)", default="")
    teacher_step: int | None = _help("the teacher's training step (recorded)", default=None)
    teacher_name: str = _help("the teacher as given (recorded)", default="")

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError("--checkpoint is required: the teacher (a training run, checkpoint, export or Hub id)")
        for name in ("pairs", "teacher_steps", "pair_batch_size", "shard_size", "recommended_steps"):
            check_number(self, name, minimum=1)
        flow.check_sampler(self.teacher_sampler)
        if not 0 <= self.unconditional_pairs < 1:
            raise ValueError(f"--unconditional-pairs must lie in [0, 1), got {self.unconditional_pairs}")
        if self.pair_guidance_scale is not None:
            check_number(self, "pair_guidance_scale", minimum=0)
        if self.distill_t is not None and not 0 < self.distill_t <= 1:
            raise ValueError(f"--distill-t must lie in (0, 1], got {self.distill_t}")
        super().validate()


# ----------------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    unet: LiquidDiffusionUNet  # EMA weights, eval mode
    vae: object | None  # the diffusers AutoencoderKL (latent space) or None
    train_config: dict
    sha256: str
    step: int | None
    folder: Path


def load_teacher(name: str) -> Teacher:
    """The teacher named by ``--checkpoint``: a run folder (its newest intact checkpoint), a checkpoint, an export or a
    Hub id. Anything else is refused in one line (``FileNotFoundError`` / ``ValueError``)."""
    from .hub import load_pipeline, resolve_checkpoint

    folder = resolve_checkpoint(name)
    weights = folder / ("unet" if is_exported_pipeline(folder) else "unet_ema") / WEIGHTS_NAME
    if not weights.is_file():
        weights = folder / "unet" / WEIGHTS_NAME
    config_path = folder / "train_config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{name!r} has no train_config.json: reflow needs a LiquidDiffusion training run, checkpoint "
            "or export as its teacher"
        )
    train_config = read_json(config_path)
    pipe = load_pipeline(folder, use_ema=True)
    step = None
    if (folder / "state.json").is_file():
        step = read_json(folder / "state.json").get("step")
    elif isinstance(train_config.get("steps"), int):
        step = train_config["steps"]
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return Teacher(pipe.unet.eval(), getattr(pipe, "vae", None), train_config, digest.hexdigest(), step, folder)


def config_for_teacher(config: ReflowConfig, teacher: Teacher) -> ReflowConfig:
    """``config`` with the fields that come from the teacher filled in (``FROM_TEACHER``, ``RECORDED``)."""
    saved = teacher.train_config
    values = {name: saved[name] for name in FROM_TEACHER if name in saved}
    values.update(
        validation_images=0, validation_every=0, eval_every=0, cache_latents=False, cache_dir=None, class_dropout=0.0
    )
    if teacher.unet.config.num_classes:
        values["guidance_scale"] = 1.0  # guidance is baked into the pairs
        if config.pair_guidance_scale is None:
            values["pair_guidance_scale"] = float(saved.get("guidance_scale", flow.DEFAULT_GUIDANCE_SCALE))
    else:
        values["pair_guidance_scale"] = None
    if config.distill_t is not None:
        values["recommended_steps"] = 1
    values.update(
        teacher_sha256=teacher.sha256, teacher_step=teacher.step, teacher_name=config.teacher_name or config.teacher
    )
    return dataclasses.replace(config, **values)


# ----------------------------------------------------------------------------------------------------------------
# The pair cache
# ----------------------------------------------------------------------------------------------------------------


class PairCacheMismatch(ValueError):
    """The pair cache in the output folder was made by another teacher or with other settings."""


def cache_metadata(config: ReflowConfig, teacher: Teacher) -> dict:
    """What the pair cache of ``config`` holds: ``CACHE_KEYS`` plus the teacher's name and step (informative)."""
    unet = teacher.unet
    size = config.resolution // (vae_downsample_factor(teacher.vae) if teacher.vae is not None else 1)
    return {
        "format": CACHE_FORMAT,
        "teacher_sha256": teacher.sha256,
        "teacher_sampler": config.teacher_sampler,
        "teacher_steps": config.teacher_steps,
        "pair_guidance_scale": config.pair_guidance_scale,
        "unconditional_pairs": config.unconditional_pairs if unet.config.num_classes else 0.0,
        "num_pairs": config.pairs,
        "shard_size": config.shard_size,
        "shape": [unet.config.in_channels, size, size],
        "seed": config.seed,
        "num_classes": unet.config.num_classes or 0,
        "teacher": config.teacher_name,
        "teacher_step": teacher.step,
    }


def _describe(metadata: dict) -> str:
    guidance = metadata.get("pair_guidance_scale")
    return (
        f"teacher {str(metadata.get('teacher_sha256'))[:12]} ({metadata.get('teacher')}), "
        f"{metadata.get('teacher_sampler')} x {metadata.get('teacher_steps')} steps, "
        f"{metadata.get('num_pairs')} pairs of {metadata.get('shape')}, seed {metadata.get('seed')}"
        + (f", guidance {guidance:g}" if guidance is not None else "")
    )


class PairCache:
    """``OUTPUT_DIR/pair-cache/``: ``metadata.json`` + ``pairs-NNNNN.safetensors`` shards (``noise``, ``sample``,
    ``labels`` for a conditional teacher). Shard i's noise and labels come from a generator seeded by (seed, i), so
    a shard generated again is the same shard."""

    def __init__(self, folder: Path, metadata: dict):
        self.folder, self.metadata = Path(folder), metadata
        self.num_shards = math.ceil(metadata["num_pairs"] / metadata["shard_size"])

    def shard_path(self, index: int) -> Path:
        return self.folder / f"pairs-{index:05d}.safetensors"

    def shard_len(self, index: int) -> int:
        return min(self.metadata["shard_size"], self.metadata["num_pairs"] - index * self.metadata["shard_size"])

    def check(self, overwrite: bool, report=print) -> None:
        """Reuses a cache of the same teacher and settings; a cache of others is refused in one line
        (``PairCacheMismatch``), or deleted with ``overwrite``; an unreadable ``metadata.json`` is started afresh."""
        path = self.folder / "metadata.json"
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as error:
            report(f"note: {path} is unreadable ({first_line(error)}): generating the pairs afresh")
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        differ = [k for k in CACHE_KEYS if saved.get(k) != self.metadata.get(k)]
        if not differ:
            return
        if not overwrite:
            raise PairCacheMismatch(
                f"the pair cache in {str(self.folder)!r} was made with {_describe(saved)}; this run asks for "
                f"{_describe(self.metadata)} (differs in {', '.join(differ)}): pass --overwrite to regenerate it, or "
                "pick another --output-dir"
            )
        report(f"note: --overwrite: deleting the pair cache of {_describe(saved)}")
        shutil.rmtree(self.folder, ignore_errors=True)

    def read_shard(self, index: int) -> dict[str, torch.Tensor] | None:
        """Shard ``index`` if it exists and reads back with the expected shapes, else ``None``."""
        path = self.shard_path(index)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
        except Exception:  # noqa: BLE001 -- truncated or garbage: generated again
            return None
        shape = [self.shard_len(index), *self.metadata["shape"]]
        ok = all(k in tensors and list(tensors[k].shape) == shape for k in ("noise", "sample"))
        if self.metadata["num_classes"]:
            ok = ok and "labels" in tensors and list(tensors["labels"].shape) == shape[:1]
        return tensors if ok else None

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if self.read_shard(i) is None]

    def shard_inputs(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shard ``index``'s noise [n, C, h, w] and class ids [n] (conditional teachers; the null class for a share
        ``unconditional_pairs`` of them), from a generator seeded by (seed, index)."""
        meta = self.metadata
        generator = torch.Generator().manual_seed((meta["seed"] * SEED_STRIDE + index) % 2**63)
        n = self.shard_len(index)
        noise = torch.randn(n, *meta["shape"], generator=generator)
        labels = None
        if meta["num_classes"]:
            labels = torch.randint(0, meta["num_classes"], (n,), generator=generator)
            null = torch.rand(n, generator=generator) < meta["unconditional_pairs"]
            labels = torch.where(null, torch.full_like(labels, meta["num_classes"]), labels)  # null class = K
        return noise, labels

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Writes shard ``index`` atomically (a temporary name, then a rename)."""
        path = self.shard_path(index)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_metadata(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".metadata.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.metadata, indent=2) + "\n")
        os.replace(tmp, self.folder / "metadata.json")

    def load(self) -> dict[str, torch.Tensor]:
        """All pairs in memory: ``noise``, ``sample`` (float32) and ``labels`` (int64) when conditional."""
        shards = [self.read_shard(i) for i in range(self.num_shards)]
        if any(s is None for s in shards):
            raise ValueError(f"the pair cache in {str(self.folder)!r} is incomplete; run again with --resume")
        return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


@torch.no_grad()
def teacher_samples(
    teacher: Teacher,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    sampler: str,
    steps: int,
    guidance_scale: float | None,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """The teacher's ODE samples x = ODE(noise) (guided at ``guidance_scale`` for labels other than the null class;
    the null class's samples are unguided), in batches of ``batch_size``; float32 on the CPU."""
    unet = teacher.unet
    out = []
    for start in range(0, len(noise), batch_size):
        z = noise[start : start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        velocity = unet
        if labels is not None:
            ids = labels[start : start + batch_size].to(device)
            guided = flow.guided_velocity(unet, ids, guidance_scale, unet.null_class)
            plain = flow.guided_velocity(unet, ids, 1.0)
            null = ids == unet.null_class

            def velocity(x, t, guided=guided, plain=plain, null=null):
                if guidance_scale == 1 or not null.any():
                    return guided(x, t)
                return torch.where(null.view(-1, 1, 1, 1), plain(x, t), guided(x, t))

        out.append(flow.sample(velocity, z, steps, sampler).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


class ReflowTrainer(Trainer):
    """``Trainer`` whose data source is the teacher's pair cache (module docstring). ``train()`` returns the final
    checkpoint; ``self.pipeline_dir`` is then the exported pipeline folder."""

    def __init__(self, config: ReflowConfig, callbacks=None, teacher: Teacher | None = None):
        config.validate()  # --pairs 0 and friends before the teacher is loaded
        self.teacher = teacher or load_teacher(config.teacher)
        config = config_for_teacher(config, self.teacher)
        self._check_output_dir(config)
        self.pairs: dict[str, torch.Tensor] | None = None
        self.pair_seconds = 0.0  # spent generating pairs in this run
        self.pipeline_dir = Path(config.output_dir).expanduser() / PIPELINE_DIR
        super().__init__(config, callbacks)

    @staticmethod
    def _check_output_dir(config: ReflowConfig) -> None:
        """An output folder holding another kind of run (train's) or a reflow run of another teacher is refused."""
        for checkpoint in reversed(list_checkpoints(Path(config.output_dir).expanduser())):
            try:
                saved = read_json(checkpoint / "train_config.json")
            except ValueError:
                continue
            if not saved.get("teacher"):
                raise FileExistsError(
                    f"--output-dir {config.output_dir!r} holds a training run, not a reflow run; "
                    "pick another --output-dir"
                )
            if saved.get("teacher_sha256") != config.teacher_sha256 and config.resume:
                raise FileExistsError(
                    f"--output-dir {config.output_dir!r} holds a reflow run of another teacher "
                    f"({saved.get('teacher_name')}); pick another --output-dir"
                )
            return

    def _reads_dataset(self) -> bool:
        return False

    def _build_model(self) -> LiquidDiffusionUNet:
        """The student: a copy of the teacher's EMA weights (the VAE too, in latent space, for the sample grids)."""
        teacher = self.teacher
        self.vae = None
        if teacher.vae is not None:
            self.vae = FrozenVAE(teacher.vae, device=self.device, dtype=vae_dtype(self.device), chunk_size=4)
        model = LiquidDiffusionUNet.from_config(teacher.unet.config)
        start = teacher.unet
        if self.config.init:
            start = load_teacher(self.config.init).unet
            shapes = {k: v.shape for k, v in start.state_dict().items()}
            if shapes != {k: v.shape for k, v in teacher.unet.state_dict().items()}:
                raise ValueError(
                    f"--init {self.config.init!r} is another architecture than the teacher's; give a "
                    "model made from this teacher (a reflow run's result)"
                )
        model.load_state_dict(start.state_dict())
        model.train()
        if self.config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.teacher.unet.to(self.device)
        return model.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------------------------------------------- pairs

    def _start_run(self) -> None:
        super()._start_run()
        if self._resumed_from is not None and self.step >= self.config.steps:
            return
        self._prepare_pairs()

    def _prepare_pairs(self) -> None:
        """Generates the missing shards of the pair cache (main process; a stop signal saves what is done and exits
        like train), then loads all pairs."""
        config = self.config
        folder = Path(config.pair_cache_dir).expanduser() if config.pair_cache_dir else self.output_dir / PAIR_CACHE
        cache = PairCache(folder, cache_metadata(config, self.teacher))
        if self.is_main:
            cache.check(config.overwrite)
            missing = cache.missing()
            if missing:
                cache.write_metadata()
                start = time.perf_counter()
                self._generate(cache, missing)
                self.pair_seconds = time.perf_counter() - start
            else:
                print(f"pairs: reusing the {cache.metadata['num_pairs']} pairs in {cache.folder}")
        self.accelerator.wait_for_everyone()
        self.pairs = cache.load()
        self.teacher.unet.to("cpu")  # not needed any more

    def _generate(self, cache: PairCache, missing: list[int]) -> None:
        config = self.config
        have = cache.num_shards - len(missing)
        pairs = sum(cache.shard_len(i) for i in missing)
        calls = config.teacher_steps * flow.MODEL_CALLS_PER_STEP[config.teacher_sampler]
        print(
            f"pairs: generating {pairs} (noise, teacher sample) pairs in {len(missing)} shard(s) "
            f"({have} cached) with the teacher's {config.teacher_sampler} x {config.teacher_steps} steps "
            f"({calls} model calls each) into {cache.folder}"
        )
        from tqdm.auto import tqdm

        bar = tqdm(total=pairs, desc="pairs", disable=not config.progress_bar, dynamic_ncols=True)
        try:
            with GracefulStop() as stop:
                for index in missing:
                    noise, labels = cache.shard_inputs(index)
                    try:  # a stop signal interrupts the shard at once: it is generated again on --resume
                        with stop.interruptible():
                            sample = teacher_samples(
                                self.teacher,
                                noise,
                                labels,
                                sampler=config.teacher_sampler,
                                steps=config.teacher_steps,
                                guidance_scale=config.pair_guidance_scale,
                                batch_size=config.pair_batch_size,
                                device=self.device,
                            )
                    except StopRequested:
                        break
                    tensors = {"noise": noise, "sample": sample}
                    if labels is not None:
                        tensors["labels"] = labels
                    cache.write_shard(index, tensors)
                    bar.update(len(noise))
                    if stop.requested is not None:
                        break
        finally:
            bar.close()
        if stop.requested is not None:
            done = cache.num_shards - len(cache.missing())
            print(
                f"\n{stop.requested} while generating pairs: {done} of {cache.num_shards} shard(s) saved in "
                f"{cache.folder}; {self.resume_hint}",
                file=sys.stderr,
            )
            raise TrainingInterrupted(stop.requested)

    def _batches(self) -> Iterator[dict]:
        """This process's endless stream of pair batches ``{"x0", "noise", "labels"}``, resumed at
        ``batches_consumed``: each epoch a seeded permutation of all pairs, cut into batches dealt round-robin to the
        processes (a remainder smaller than a batch per process is left out of that epoch)."""
        config, state = self.config, self.accelerator.state
        total = len(self.pairs["noise"])
        batch, processes = config.batch_size, state.num_processes
        per_epoch = total // (batch * processes)
        if per_epoch == 0:
            raise ValueError(
                f"--pairs {total} is fewer than one batch ({batch} x {processes} process(es)); use more "
                "--pairs or a smaller --batch-size"
            )
        position = self.batches_consumed
        while True:
            epoch, k = divmod(position, per_epoch)
            order = torch.randperm(
                total, generator=torch.Generator().manual_seed((config.seed * SEED_STRIDE + epoch) % 2**63)
            )
            start = (k * processes + state.process_index) * batch
            index = order[start : start + batch]
            item = {"x0": self.pairs["sample"][index], "noise": self.pairs["noise"][index]}
            if "labels" in self.pairs:
                item["labels"] = self.pairs["labels"][index].to(self.device)
            for key in ("x0", "noise"):
                item[key] = item[key].to(self.device).contiguous(memory_format=torch.channels_last)
            position += 1
            self.batches_consumed += 1
            yield item

    def _sample_timesteps(self, batch_size: int) -> torch.Tensor:
        t = super()._sample_timesteps(batch_size)  # drawn all the same: the generator's sequence stays train's
        if self.config.distill_t is not None:
            t = torch.full_like(t, self.config.distill_t)
        return t

    # ---------------------------------------------------------------------------------------------------- output

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """EMA sample grid ``samples/step-NNNNNN.png``: one row per number of Euler steps (1, 2, 4) from the same
        noise (the same every time)."""
        if not self.is_main:
            return None
        config = self.config
        with self.ema_weights() as model:
            labels, _ = class_grid_labels(model, config.num_sample_images)
            n = len(labels) if labels is not None else config.num_sample_images
            rows = [
                few_step_images(
                    model, self.vae, n, steps, seed=config.seed, resolution=config.resolution, class_labels=labels
                )
                for steps in GRID_STEPS
            ]
        path = self.output_dir / "samples" / f"step-{self.step:06d}.png"
        try:
            save_grid(torch.cat(rows), path, n)
        except OSError as error:
            print(f"warning: {first_line(error)}: sample grid skipped, training goes on", file=sys.stderr)
            return None
        for callback in self.callbacks:
            callback.on_sample(self, self.step, path)
        return path

    def train(self) -> Path:
        final = super().train()
        if self.is_main:
            export_checkpoint(final, self.pipeline_dir, overwrite=True)
            print(
                f"pipeline: {self.pipeline_dir} (made for {self.config.recommended_steps} step(s); "
                f"LiquidDiffusionPipeline.from_pretrained({str(self.pipeline_dir)!r}))"
            )
        self.accelerator.wait_for_everyone()
        return final


@torch.no_grad()
def few_step_images(
    model: LiquidDiffusionUNet,
    vae,
    num_images: int,
    steps: int,
    *,
    seed: int,
    resolution: int,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sampling.generate`` with Euler at ``steps`` and guidance 1 (a reflow student's guidance is baked in)."""
    from .sampling import generate

    return generate(
        model,
        vae,
        num_images,
        steps,
        "euler",
        seed=seed,
        resolution=resolution,
        class_labels=class_labels,
        guidance_scale=1.0,
    )


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def reflow_config_from_args(args: argparse.Namespace) -> ReflowConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReflowConfig) if hasattr(args, f.name)}
    values["teacher"] = args.checkpoint
    values["teacher_name"] = args.checkpoint
    return ReflowConfig(**values)


def _run_reflow(args: argparse.Namespace) -> int:
    return train_to_exit_status(lambda: ReflowTrainer(reflow_config_from_args(args)))


def add_reflow_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "reflow",
        help="make a trained model a few-step (1-4 Euler steps) model by reflow",
        description="Generates (noise, teacher sample) pairs with a trained model, cached in OUTPUT_DIR/pair-cache, "
        "then trains a student initialised from the teacher on them (a training run: --resume, checkpoints, "
        "SIGTERM saves); the result is the pipeline folder OUTPUT_DIR/pipeline. See docs/reflow.md.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_OR_CHECKPOINT",
        help="the teacher: a training run or checkpoint, an exported pipeline folder or a Hub id",
    )
    add_config_flags(parser, ReflowConfig, exclude=FROM_TEACHER + RECORDED + ("teacher", "num_workers", "sample_steps"))
    parser.set_defaults(func=_run_reflow)
