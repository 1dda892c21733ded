"""Specification of what a fault costs, round two (issue 29): signals to the whole process group, one run per
folder, resume that obeys its flags, folders read as they are, and one line for every fault left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_evaluate import STAND_IN, StandInFeatures
from test_faults import cli_train, error_lines, logged_steps, truncate, wait_for
from test_trainer import REPO, RES, pixel_config, synthetic_folder

from liquid_diffusion import checkpoints, flow
from liquid_diffusion.__main__ import main
from liquid_diffusion.checkpoints import list_checkpoints, read_checkpoint
from liquid_diffusion.run_lock import RunLock
from liquid_diffusion.stopping import GracefulStop, NonFiniteLossError
from liquid_diffusion.trainer import Trainer


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return synthetic_folder(tmp_path_factory.mktemp("round2_images"), 24, seed=5)


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory) -> Path:
    """A run folder with checkpoints 1 and 2 (lr 1e-3, default weight and EMA decay)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(pixel_config(images, out, steps=2, checkpoint_every=1)).train()
    return out


def copy_run(run: Path, to: Path) -> Path:
    __import__("shutil").copytree(run, to)
    return to


# ------------------------------------------------------------------------------------------------ 1, 2: signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_whole_process_group_with_dataloader_workers_saves_and_exits(images, tmp_path, signum):
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli_train(images, out, "--steps", "100000", "--num-workers", "2"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert wait_for(lambda: len(logged_steps(out)) >= 2)
    os.killpg(process.pid, signum)  # as Slurm's scancel or a closed SSH session deliver it: to every process
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "DataLoader worker" not in stderr and "Traceback" not in stderr
    (checkpoint,) = list_checkpoints(out)
    assert read_checkpoint(checkpoint).step == logged_steps(out)[-1]


SIGNAL_DURING_FINAL_GRID = """
import os, signal, sys
from liquid_diffusion import trainer
from liquid_diffusion.__main__ import main

real_save_grid = trainer.save_grid

def save_grid_then_sigterm(*args, **kwargs):  # the signal arrives while the final grid is being drawn
    path = real_save_grid(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return path

trainer.save_grid = save_grid_then_sigterm
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_after_the_last_step_still_saves_the_final_checkpoint(images, tmp_path):
    out = tmp_path / "run"
    command = cli_train(
        images, out, "--steps", "3", "--checkpoint-every", "2", "--num-sample-images", "1", "--sample-steps", "1"
    )
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_FINAL_GRID, *command[3:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "saved" in result.stderr
    assert [p.name for p in list_checkpoints(out)][-1] == "checkpoint-000003"
    assert read_checkpoint(out / "checkpoint-000003").step == 3


def test_the_quickstart_interrupt_hint_names_its_own_command(tmp_path, monkeypatch, capsys):
    class StopAtOnce(GracefulStop):  # as if Ctrl-C came during the first step
        def __enter__(self):
            super().__enter__()
            self.requested = "SIGINT"
            return self

    monkeypatch.setattr("liquid_diffusion.trainer.GracefulStop", StopAtOnce)
    assert main(["quickstart", "--output-dir", str(tmp_path / "q"), "--steps", "3", "--batch-size", "2"]) == 130
    err = capsys.readouterr().err
    assert "saved" in err and "run the same quickstart command again" in err and "--resume" not in err


# ------------------------------------------------------------------------------------------------ 3: one run per folder


def test_a_second_live_run_on_one_output_dir_is_refused_naming_the_holder(finished_run, images, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    with RunLock(out):  # a live run holds the folder
        code = main(cli_train(images, out, "--steps", "4", "--resume")[3:])
        assert code == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert "in use by another training run" in line and f"pid {os.getpid()}" in line
    assert logged_steps(out) == [1, 2]  # the refused run touched nothing

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from liquid_diffusion.run_lock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # kill -9: the lock of a dead run never blocks the next one
    holder.wait()
    assert main(cli_train(images, out, "--steps", "3", "--resume")[3:]) == 0
    assert logged_steps(out) == [1, 2, 3]


def test_a_fresh_run_on_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(
    finished_run, images, tmp_path, capsys
):
    out = copy_run(finished_run, tmp_path / "run")
    assert main(cli_train(images, out, "--steps", "1")[3:]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001", "checkpoint-000002"]

    assert main(cli_train(images, out, "--steps", "1", "--overwrite")[3:]) == 0
    assert "--overwrite: deleted the earlier run" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001"] and logged_steps(out) == [1]
    assert main(cli_train(images, out, "--steps", "1", "--overwrite", "--resume")[3:]) == 2  # contradictory


def test_pruning_never_deletes_the_checkpoint_just_written_and_done_names_one_that_exists(
    finished_run, images, tmp_path, capsys
):
    out = copy_run(finished_run, tmp_path / "run")
    stray = copy_run(out / "checkpoint-000002", out / "checkpoint-000090")  # a higher-numbered, damaged checkpoint
    (stray / "state.json").write_text(json.dumps({"step": 90, "batches_consumed": 90}))
    truncate(stray / "unet" / checkpoints.WEIGHTS_NAME)
    code = main(cli_train(images, out, "--steps", "3", "--resume", "--keep-checkpoints", "1")[3:])
    assert code == 0
    done = capsys.readouterr().out.splitlines()[-1]
    assert done == f"done: {out / 'checkpoint-000003'}" and (out / "checkpoint-000003").is_dir()
    assert read_checkpoint(out / "checkpoint-000003").step == 3


# ------------------------------------------------------------------------------------------------ 4: finite divergence


def test_a_loss_that_explodes_but_stays_finite_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, monkeypatch):
    out, calls, real_loss = tmp_path / "run", [], flow.flow_matching_loss

    def exploding_after_step_5(*args, **kwargs):  # what a too-high learning rate does, deterministically
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * 1e5 if len(calls) > 5 else loss

    monkeypatch.setattr(flow, "flow_matching_loss", exploding_after_step_5)
    config = pixel_config(images, out, steps=10, checkpoint_every=2, keep_checkpoints=1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"loss exploded to .* at step 6.*lower --lr .*--resume "
        r".*checkpoint-000004",
    ) as error:
        Trainer(config).train()
    assert "\n" not in str(error.value)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000004"]  # nothing saved past the explosion
    assert logged_steps(out) == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------ 6, 10: resume


def test_resume_applies_new_lr_weight_decay_and_ema_decay_and_records_them(finished_run, images, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    Trainer(pixel_config(images, out, steps=3, resume="latest", lr=1e-4, weight_decay=0.01, ema_decay=0.99)).train()
    printed = capsys.readouterr().out
    assert (
        "note: resuming checkpoint-000002 with --lr 0.001 -> 0.0001, --weight-decay 0 -> 0.01, --ema-decay "
        "0.9999 -> 0.99"
    ) in printed
    state = torch.load(out / "checkpoint-000003" / "training_state.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-4) and group["weight_decay"] == 0.01
    assert state["lr_scheduler"]["base_lrs"] == [1e-4] and state["ema"]["decay"] == 0.99
    assert json.loads((out / "checkpoint-000003" / "train_config.json").read_text())["lr"] == 1e-4
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in logs if "loss" in r][-1]["lr"] == pytest.approx(1e-4)


def test_resume_with_steps_already_reached_says_so_and_re_saves_nothing(finished_run, images, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = (out / "checkpoint-000002" / "train_config.json").read_text()
    final = Trainer(pixel_config(images, out, steps=1, resume="latest")).train()
    assert "checkpoint-000002 is at step 2 and --steps is 1: nothing to train" in capsys.readouterr().out
    assert final == out / "checkpoint-000002"
    assert (out / "checkpoint-000002" / "train_config.json").read_text() == before  # still says steps: 2


def test_resume_says_in_one_line_when_the_data_settings_changed(finished_run, images, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    saved = out / "checkpoint-000002" / "train_config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "cache_latents": True}))  # as a cached run saves
    Trainer(pixel_config(images, out, steps=3, resume="latest", flip=False)).train()
    printed = capsys.readouterr().out.splitlines()
    assert "note: checkpoint-000002 was trained with random flips; this run goes on without them (--no-flip)" in printed
    assert any(
        line.startswith(
            "note: checkpoint-000002 was trained on cached latents; this run encodes the images with the VAE"
        )
        for line in printed
    )


def test_resume_pointed_at_the_run_folder_means_its_newest_intact_checkpoint(finished_run, images, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    truncate(out / "checkpoint-000002" / "unet_ema" / checkpoints.WEIGHTS_NAME)
    Trainer(pixel_config(images, out, steps=3, resume=f"{out}/")).train()
    printed = capsys.readouterr().out
    assert "is a run folder: resuming its newest intact checkpoint, checkpoint-000001" in printed
    assert "resumed from" in printed and read_checkpoint(out / "checkpoint-000003").step == 3


# ------------------------------------------------------------------------------------------------ 5: evaluation


class SlowFeatures(StandInFeatures):
    """The stand-in extractor at the speed of a big one on a slow machine: 4 s a batch. Touches $SLOW_MARKER when it
    starts, so a test knows an evaluation is under way."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        Path(os.environ["SLOW_MARKER"]).touch()
        time.sleep(4)
        return super().forward(images)


SLOW_FEATURES = f"{__name__}:SlowFeatures"


def child_env(**extra: str) -> dict:
    """The environment of a child process that imports this module's extractors (from tests/)."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("damage", ["truncated-features", "garbage-metadata"])
def test_a_damaged_fid_reference_never_stops_training(images, tmp_path, capsys, damage):
    out = tmp_path / "run"
    options = dict(eval_every=1, eval_samples=8, eval_feature_extractor=STAND_IN, checkpoint_every=1)
    Trainer(pixel_config(images, out, steps=1, **options)).train()
    (reference,) = (out / "fid-reference").iterdir()
    if damage == "truncated-features":
        bad = reference / "features.safetensors"
        truncate(bad)
    else:
        bad = reference / "metadata.json"
        bad.write_bytes(b"\0" * 100)
    capsys.readouterr()
    Trainer(pixel_config(images, out, steps=2, resume="latest", **options)).train()
    err = capsys.readouterr().err
    assert f"{bad} is damaged" in err and "Traceback" not in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "kid" in r] == [1, 2]  # the reference was computed again


def test_an_evaluation_that_fails_is_skipped_in_one_line_and_training_goes_on(images, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr("liquid_diffusion.evaluate.evaluate_model", broken)
    out = tmp_path / "run"
    Trainer(
        pixel_config(
            images, out, steps=2, eval_every=1, eval_samples=8, eval_feature_extractor=STAND_IN, checkpoint_every=1
        )
    ).train()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "evaluation" in line]
    assert len(warnings) == 2 and "failed and was skipped (RuntimeError: CUDA error" in warnings[0]
    assert read_checkpoint(out / "checkpoint-000002").step == 2


def test_sigterm_during_an_in_training_evaluation_saves_and_exits_within_seconds(images, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "evaluating"
    command = cli_train(
        images,
        out,
        "--steps",
        "100000",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "2",
        "--eval-samples",
        "64",
        "--eval-feature-extractor",
        SLOW_FEATURES,
    )
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(SLOW_MARKER=str(marker)),
    )
    assert wait_for(marker.exists, timeout=180)
    process.send_signal(signal.SIGTERM)
    started = time.time()
    _, stderr = process.communicate(timeout=180)
    assert time.time() - started < 10, stderr[-2000:]  # the evaluation (about 40 s) is cut short
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    assert "evaluation at step 2 was cut short" in stderr
    assert read_checkpoint(list_checkpoints(out)[-1]).step == logged_steps(out)[-1]


# ------------------------------------------------------------------------------------------------ 7, 8: folders


def write_images(folder: Path, names: list[str], seed: int = 0) -> Path:
    from PIL import Image
    from test_trainer import synthetic_images

    for name, pixels in zip(names, synthetic_images(len(names), seed)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / name)
    return folder


def count_images(folder: Path, **kwargs) -> int:
    from liquid_diffusion.data import ImageBatchStream

    stream = ImageBatchStream(str(folder), RES, 64, shuffle_buffer=0, num_epochs=1, flip=False, **kwargs)
    return sum(len(batch[0] if kwargs.get("with_labels") else batch) for batch in stream)


def test_an_image_folder_is_read_as_the_files_it_holds_whatever_their_names(tmp_path, capsys):
    folder = write_images(
        tmp_path / "photos",
        [f"train_{i:03d}.png" for i in range(10)]
        + [f"img_{i:02d}.png" for i in range(19)]
        + ["test.png", "deep/er/validation.png"],
    )
    (folder / "training_notes.txt").write_text("not an image")
    assert count_images(folder) == 31

    out = folder / "run"  # an output dir inside the dataset folder: its sample grids are no training data
    Trainer(pixel_config(folder, out, steps=1, sample_every=1)).train()
    assert (
        f"dataset: 31 image files in {folder} (all of them, recursively); 1 other file(s) ignored"
        in capsys.readouterr().out
    )
    Trainer(pixel_config(folder, out, steps=2, resume="latest")).train()
    assert f"skipped the training output folder(s) {out}" in capsys.readouterr().out
    assert read_checkpoint(out / "checkpoint-000002").step == 2

    classes = write_images(tmp_path / "classes", ["cats/train_001.png", "cats/a.png", "dogs/test.png", "dogs/b.png"])
    from liquid_diffusion.sources import class_names, open_source

    assert class_names(open_source(str(classes), with_labels=True)[0]) == ["cats", "dogs"]
    assert count_images(classes, with_labels=True) == 4


@pytest.fixture(scope="module")
def vae(tiny_vae_dir):
    from liquid_diffusion.latents import FrozenVAE

    return FrozenVAE(str(tiny_vae_dir))


def test_a_latent_cache_is_built_again_when_its_dataset_folder_changed(vae, tmp_path, capsys):
    from liquid_diffusion.latents import build_latent_cache, load_latent_cache

    folder = write_images(tmp_path / "photos", [f"{i}.png" for i in range(4)])
    cache = build_latent_cache(str(folder), vae, tmp_path / "cache", 32, flip=False, progress=False)
    write_images(folder, [f"more-{i}.png" for i in range(4)], seed=1)
    build_latent_cache(str(folder), vae, cache, 32, flip=False, progress=False)
    assert (
        f"the dataset folder {folder} changed since its latent cache was built (4 image files then, 8 now): "
        "building the cache again"
    ) in capsys.readouterr().err
    assert load_latent_cache(cache)[1]["num_images"] == 8
    build_latent_cache(str(folder), vae, cache, 32, flip=False, progress=False)
    assert "changed" not in capsys.readouterr().err  # unchanged: reused


DAMAGED_CACHE = {
    "truncated-shard": ("shard-00000.safetensors", lambda p: truncate(p)),
    "zero-filled-shard": ("shard-00000.safetensors", lambda p: p.write_bytes(b"\0" * p.stat().st_size)),
    "truncated-metadata": ("metadata.json", lambda p: truncate(p)),
}


@pytest.mark.parametrize("damage", DAMAGED_CACHE, ids=list(DAMAGED_CACHE))
def test_a_damaged_latent_cache_is_named_in_one_line_and_built_again(vae, images, tmp_path, capsys, damage):
    from liquid_diffusion.latents import build_latent_cache, load_latent_cache

    cache = build_latent_cache(str(images), vae, tmp_path / "cache", 32, num_images=4, progress=False)
    name, spoil = DAMAGED_CACHE[damage]
    spoil(cache / name)
    with pytest.raises(ValueError, match=f"latent cache file {cache / name} is unreadable") as error:
        load_latent_cache(cache)
    assert "\n" not in str(error.value)
    capsys.readouterr()
    build_latent_cache(str(images), vae, cache, 32, num_images=4, progress=False)
    assert f"{cache / name} is unreadable" in capsys.readouterr().err
    assert load_latent_cache(cache)[0].shape[0] == 8


def test_a_full_disk_while_building_the_latent_cache_is_one_line(images, tiny_vae_dir, tmp_path, monkeypatch, capsys):
    from liquid_diffusion import latents

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(latents, "save_file", full)
    code = main(
        [
            "train",
            "--dataset",
            str(images),
            "--space",
            "latent",
            "--vae",
            str(tiny_vae_dir),
            "--cache-latents",
            "--preset",
            "micro",
            "--resolution",
            "32",
            "--steps",
            "1",
            "--num-workers",
            "0",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "no space left on device while writing the latent cache" in line
    assert not list((tmp_path / "run" / "latent-cache").glob("shard-*"))


class FullDiskGrid:
    def save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")


def test_a_full_disk_while_writing_a_sample_grid_in_training_warns_and_trains_on(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("liquid_diffusion.sampling.image_grid", lambda *args: FullDiskGrid())
    out = tmp_path / "run"
    Trainer(pixel_config(images, out, steps=2, sample_every=1)).train()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]  # after a progress bar
    assert len(warnings) == 2 and "no space left on device while writing" in warnings[0]
    assert read_checkpoint(out / "checkpoint-000002").step == 2
    assert not list((out / "samples").iterdir())  # no temporary file left


# ------------------------------------------------------------------------------------------------ sample, export


@pytest.fixture(scope="module")
def damaged_newest(finished_run, tmp_path_factory) -> Path:
    """``finished_run`` whose newest checkpoint (2) has truncated EMA weights."""
    out = copy_run(finished_run, tmp_path_factory.mktemp("damaged_newest") / "run")
    truncate(out / "checkpoint-000002" / "unet_ema" / checkpoints.WEIGHTS_NAME)
    return out


def test_sample_export_and_evaluate_fall_back_past_a_damaged_newest_checkpoint(damaged_newest, tmp_path, capsys):
    from liquid_diffusion.evaluate import evaluate_checkpoint

    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(damaged_newest),
                "--num-images",
                "1",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "grid.png"),
            ]
        )
        == 0
    )
    assert main(["export", "--checkpoint", str(damaged_newest), "--out", str(tmp_path / "export")]) == 0
    result = evaluate_checkpoint(
        damaged_newest,
        num_samples=4,
        steps=1,
        batch_size=4,
        feature_extractor=StandInFeatures(),
        reference_root=tmp_path / "ref",
        progress=False,
    )
    assert result["step"] == 1
    err = capsys.readouterr().err
    assert err.count("warning: skipping damaged checkpoint-000002") == 3 and "unet_ema" in err


def test_sample_into_a_read_only_folder_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], capture_output=True
    ).returncode:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        readonly.chmod(0o555)  # not root: the permission bits are enough
    try:
        monkeypatch.chdir(readonly)
        code = main(["sample", "--checkpoint", str(finished_run), "--num-images", "1", "--steps", "1"])
    finally:
        monkeypatch.chdir(tmp_path)
        subprocess.run(["umount", str(readonly)], capture_output=True)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    (line,) = error_lines(err)
    assert "cannot write grid.png" in line and "--out" in line


def test_two_samples_writing_one_out_at_once_never_collide(tmp_path, monkeypatch):
    from PIL import Image

    from liquid_diffusion import sampling

    out, targets = tmp_path / "grid.png", []

    class SecondWriterMidway:  # while this grid is written, another `sample` writes the same --out
        def __init__(self, colour):
            self.colour = colour

        def save(self, target, **kwargs):
            targets.append(getattr(target, "name", target))
            if self.colour == "red":
                sampling.save_grid(torch.zeros(1, 3, 4, 4), out)
            Image.new("RGB", (4, 4), self.colour).save(target, **kwargs)

    colours = iter(["red", "blue"])
    monkeypatch.setattr(sampling, "image_grid", lambda *args: SecondWriterMidway(next(colours)))
    assert sampling.save_grid(torch.zeros(1, 3, 4, 4), out) == out
    assert len(set(map(str, targets))) == 2  # each writer its own temporary file
    assert Image.open(out).getpixel((0, 0)) == (255, 0, 0) and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_export_removes_the_staging_folders_of_interrupted_exports(finished_run, tmp_path, capsys):
    stale, live = tmp_path / ".export.partial-99999999-x1y2", tmp_path / f".export.partial-{os.getpid()}-busy"
    for folder in (stale, live):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "junk.bin").write_bytes(b"x" * 1000)
    assert main(["export", "--checkpoint", str(finished_run), "--out", str(tmp_path / "export")]) == 0
    assert not stale.exists() and live.exists()  # another export still running keeps its folder
    assert f"removed {stale.name}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ flags


def test_a_relative_dataset_path_from_another_working_dir_says_it_does_not_exist(tmp_path, monkeypatch, capsys):
    from liquid_diffusion import sources

    monkeypatch.setattr(sources, "hub_reachable", lambda *args, **kwargs: False)  # offline: never touch the network
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "train",
                "--dataset",
                "data/photos",
                "--space",
                "pixel",
                "--preset",
                "micro",
                "--resolution",
                str(RES),
                "--output-dir",
                "run",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert f"no such local folder 'data/photos' (relative to {os.getcwd()})" in line


def test_a_nan_guidance_scale_is_refused_in_one_line(images, finished_run, tmp_path, capsys):
    assert main(cli_train(images, tmp_path / "run", "--steps", "1", "--guidance-scale", "nan")[3:]) == 2
    assert (
        main(["sample", "--checkpoint", str(finished_run), "--guidance-scale", "nan", "--out", str(tmp_path / "g.png")])
        == 2
    )
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 2 and "nan" in lines[0] and "--guidance-scale must be at least 0, got nan" in lines[1]
    assert not (tmp_path / "run").exists()
