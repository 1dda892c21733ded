"""What ``--resume`` takes from the checkpoint and what from this run's flags, said in one line each.

* ``find_resume_checkpoint`` -- ``latest``, a ``checkpoint-NNNNNN`` folder, or a run folder (its newest intact one).
* ``apply_optimizer_flags`` -- ``--lr``, ``--weight-decay`` and ``--ema-decay`` win over the values saved in the
  optimizer and EMA state (so "resume with a lower --lr" does what it says), with a note naming the change; the new
  checkpoints' ``train_config.json`` then records what is really used.
* ``resume_notes`` -- data settings that change what training sees (``--flip``, ``--cache-latents``) and a ``--steps``
  the checkpoint already reached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .checkpoints import Checkpoint, checkpoint_step, newest_intact, read_checkpoint


def find_resume_checkpoint(resume: str, output_dir: Path, report: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint ``--resume`` names: ``latest`` is the newest intact one in ``output_dir`` (``None`` when there
    is none yet); a run folder (one holding ``checkpoint-NNNNNN`` folders) means its newest intact one; any other
    path must be an intact checkpoint (a damaged one is refused, naming the bad file)."""
    if resume == "latest":
        return newest_intact(output_dir, report=report)
    path = Path(resume).expanduser()
    if (
        path.is_dir()
        and not (path / "state.json").exists()
        and any(checkpoint_step(p) is not None for p in path.iterdir())
    ):
        checkpoint = newest_intact(path, report=report)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume {resume}: the run folder holds no finished checkpoint-NNNNNN "
                "(a save was cut off); start without --resume"
            )
        report(
            f"note: --resume {resume} is a run folder: resuming its newest intact checkpoint, {checkpoint.path.name}"
        )
        return checkpoint
    return read_checkpoint(resume)


def apply_optimizer_flags(
    checkpoint: Checkpoint, config, *, optimizer, lr_scheduler, ema, report: Callable[[str], None]
) -> None:
    """Puts this run's ``--lr``, ``--weight-decay``, ``--adam-beta1/2``, ``--ema-decay`` and ``--ema-power`` into the
    restored optimizer, learning-rate schedule and EMA, where they differ from the checkpoint's (a new
    ``--lr-schedule`` applies by itself: the schedule is a function of the step). The schedule keeps its position: the learning rate
    now is the new ``--lr`` times the schedule's factor at this step."""
    changes = []
    base_lrs = list(lr_scheduler.base_lrs)
    if any(base != config.lr for base in base_lrs):
        for group, base in zip(optimizer.param_groups, base_lrs):
            factor = group["lr"] / base if base else 1.0
            group["initial_lr"], group["lr"] = config.lr, config.lr * factor
        lr_scheduler.base_lrs = [config.lr] * len(base_lrs)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        changes.append(f"--lr {base_lrs[0]:g} -> {config.lr:g}")
    old_decay = optimizer.param_groups[0]["weight_decay"]
    if any(group["weight_decay"] != config.weight_decay for group in optimizer.param_groups):
        for group in optimizer.param_groups:
            group["weight_decay"] = config.weight_decay
        changes.append(f"--weight-decay {old_decay:g} -> {config.weight_decay:g}")
    betas = (config.adam_beta1, config.adam_beta2)
    old_betas = tuple(optimizer.param_groups[0]["betas"])
    if any(tuple(group["betas"]) != betas for group in optimizer.param_groups):
        for group in optimizer.param_groups:
            group["betas"] = betas
        changes.append(f"--adam-beta1/2 {old_betas[0]:g}/{old_betas[1]:g} -> {betas[0]:g}/{betas[1]:g}")
    if ema.decay != config.ema_decay:
        changes.append(f"--ema-decay {ema.decay:g} -> {config.ema_decay:g}")
        ema.decay = config.ema_decay
    if ema.power != config.ema_power:
        changes.append(f"--ema-power {ema.power:g} -> {config.ema_power:g}")
        ema.power = config.ema_power
    saved_schedule = checkpoint.train_config.get("lr_schedule", "constant")
    if saved_schedule != config.lr_schedule:  # the schedule is a function of the step: the new one applies from here
        changes.append(f"--lr-schedule {saved_schedule} -> {config.lr_schedule}")
    if changes:
        report(
            f"note: resuming {checkpoint.path.name} with {', '.join(changes)} (this run's flags win over the "
            "checkpoint's)"
        )


def resume_notes(checkpoint: Checkpoint, config, report: Callable[[str], None]) -> None:
    """One line for each setting whose change alters what the resumed run trains on, and for a ``--steps`` the
    checkpoint has already reached (nothing is trained or re-saved then)."""
    saved, name = checkpoint.train_config, checkpoint.path.name
    if saved.get("flip", True) != config.flip:
        report(
            f"note: {name} was trained {'with' if saved.get('flip', True) else 'without'} random flips; this run "
            f"goes on {'with' if config.flip else 'without'} them (--{'' if config.flip else 'no-'}flip)"
        )
    if saved.get("cache_latents", False) != config.cache_latents:
        report(
            f"note: {name} was trained on cached latents; this run encodes the images with the VAE as it reads "
            "them (the same data, more slowly; add --cache-latents to use the cache)"
            if saved.get("cache_latents")
            else f"note: {name} was trained without a latent cache; this run goes on from cached latents "
            "(--cache-latents)"
        )
    if checkpoint.step >= config.steps:
        report(
            f"note: {name} is at step {checkpoint.step} and --steps is {config.steps}: nothing to train, nothing "
            "re-saved; raise --steps to train on"
        )
