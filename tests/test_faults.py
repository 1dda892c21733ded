"""Specification of what a fault costs: preemption signals, kills, corrupt files, a full disk and bad flags lose no
work and end in one line that says what to do (issue: green on a fresh install, nothing lost)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from test_trainer import REPO, RES, pixel_config, run_cli, synthetic_folder, weights

from liquid_diffusion import checkpoints, publish
from liquid_diffusion.__main__ import main
from liquid_diffusion.checkpoints import CheckpointWriteError, list_checkpoints, read_checkpoint
from liquid_diffusion.metrics import IntervalStats
from liquid_diffusion.model import FORMAT_VERSION
from liquid_diffusion.trainer import Trainer


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return synthetic_folder(tmp_path_factory.mktemp("fault_images"), 24, seed=3)


def cli_train(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "liquid_diffusion",
        "train",
        "--dataset",
        str(images),
        "--space",
        "pixel",
        "--preset",
        "micro",
        "--resolution",
        str(RES),
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--sample-every",
        "0",
        "--num-workers",
        "0",
        "--shuffle-buffer",
        "16",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "1",
        "--output-dir",
        str(out),
        *extra,
    ]


def wait_for(condition, timeout: float = 120.0, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["step"] for r in records if "loss" in r]  # training records (validation ones have no loss)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------------ preemption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_preemption_signal_finishes_the_step_saves_and_exits(images, tmp_path, signum):
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli_train(images, out, "--steps", "100000"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert wait_for(lambda: len(logged_steps(out)) >= 2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "--resume latest" in stderr
    (checkpoint,) = list_checkpoints(out)
    assert read_checkpoint(checkpoint).step == logged_steps(out)[-1]  # the last finished step: nothing lost


def test_two_processes_stop_at_the_same_step_when_one_is_terminated(images, tmp_path):
    out = tmp_path / "run"
    command = cli_train(images, out, "--steps", "100000")
    command[1:3] = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "liquid_diffusion",
    ]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: len(logged_steps(out)) >= 2, timeout=180)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "liquid_diffusion" in p.cmdline()]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGTERM)  # one rank only, as when a node is preempted
    _, stderr = launcher.communicate(timeout=120)  # a rank that went on alone would hang in its next all-reduce
    (checkpoint,) = list_checkpoints(out)
    assert read_checkpoint(checkpoint).step == logged_steps(out)[-1], stderr[-2000:]
    assert read_checkpoint(checkpoint).state["num_processes"] == 2


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(images, tmp_path):
    steps = ["--steps", "18", "--checkpoint-every", "3", "--keep-checkpoints", "2", "--batch-size", "2"]
    reference = tmp_path / "reference"
    subprocess.run(cli_train(images, reference, *steps), cwd=REPO, check=True, capture_output=True, timeout=300)

    out, rng, kills_in_save = tmp_path / "killed", random.Random(0), 0
    for attempt in range(4):
        process = subprocess.Popen(
            cli_train(images, out, *steps, "--resume"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if attempt % 2 == 0:  # kill inside a save: as soon as a new temporary checkpoint folder appears
            # (first, while the run is surely unfinished; a folder left by an earlier kill does not count)
            stale = set(out.glob(".tmp-checkpoint-*"))
            saving = lambda: bool(set(out.glob(".tmp-checkpoint-*")) - stale)
            kills_in_save += (
                wait_for(lambda: saving() or process.poll() is not None, timeout=60, interval=0.001)
                and process.poll() is None
            )
        else:
            time.sleep(rng.uniform(3.0, 10.0))  # anywhere: start-up, resume, a step, a save
        process.kill()
        process.wait()
    subprocess.run(cli_train(images, out, *steps, "--resume"), cwd=REPO, check=True, capture_output=True, timeout=300)

    assert kills_in_save >= 1
    assert not list(out.glob(".tmp-checkpoint-*"))
    for name in ("unet", "unet_ema"):
        a, b = weights(reference / "checkpoint-000018" / name), weights(out / "checkpoint-000018" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs from the uninterrupted run"
    assert logged_steps(out) == list(range(1, 19))  # no step logged twice, none missing


# ------------------------------------------------------------------------------------------------ damaged checkpoints


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated-ema-weights": (lambda c: truncate(c / "unet_ema" / checkpoints.WEIGHTS_NAME), "unet_ema"),
    "garbage-training-state": (lambda c: (c / "training_state.pt").write_bytes(b"not a pickle"), "training_state.pt"),
    "deleted-unet": (lambda c: __import__("shutil").rmtree(c / "unet"), "unet"),
}


@pytest.fixture
def two_checkpoints(images, tmp_path) -> Path:
    out = tmp_path / "run"
    Trainer(pixel_config(images, out, steps=4, checkpoint_every=2)).train()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002", "checkpoint-000004"]
    return out


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_resume_passes_over_a_damaged_newest_checkpoint_naming_the_file(images, two_checkpoints, damage, capsys):
    out = two_checkpoints
    corrupt, bad_file = DAMAGE[damage]
    corrupt(out / "checkpoint-000004")
    capsys.readouterr()
    trainer = Trainer(pixel_config(images, out, steps=5, resume="latest"))
    trainer.train()
    printed = capsys.readouterr().out
    assert f"checkpoint-000004/{bad_file}" in printed and "resumed from" in printed and "checkpoint-000002" in printed
    assert read_checkpoint(out / "checkpoint-000005").step == 5


def test_resume_from_an_explicit_damaged_checkpoint_is_one_line_naming_the_file(two_checkpoints, images):
    DAMAGE["garbage-training-state"][0](two_checkpoints / "checkpoint-000004")
    result = run_cli(
        *cli_train(images, two_checkpoints, "--steps", "6", "--resume", str(two_checkpoints / "checkpoint-000004"))[3:]
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "checkpoint-000004/training_state.pt is unreadable" in line


def test_stale_temporary_checkpoints_are_removed_by_the_next_run(images, tmp_path):
    out = tmp_path / "run"
    for name in (".tmp-checkpoint-000002-4242", ".tmp-checkpoint-000004-4243"):
        (out / name / "unet").mkdir(parents=True)
        (out / name / "unet" / "junk.bin").write_bytes(b"x" * 1000)
    Trainer(pixel_config(images, out, steps=1)).train()
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001"]


# ------------------------------------------------------------------------------------------------ full disk


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_says_so(images, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = checkpoints.save_torch

    def save_until_the_disk_fills(obj, path):
        if "checkpoint-000004" in path.parent.name:
            path.write_bytes(b"\0" * 4096)  # a partial file, as a full disk leaves it
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoints, "save_torch", save_until_the_disk_fills)
    with pytest.raises(CheckpointWriteError, match="no space left on device while saving checkpoint-000004; free"):
        Trainer(pixel_config(images, out, steps=4, checkpoint_every=2)).train()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002"]
    assert not list(out.glob(".tmp-checkpoint-*"))  # the partial folder is gone
    monkeypatch.setattr(checkpoints, "save_torch", real_save)
    Trainer(pixel_config(images, out, steps=4, checkpoint_every=2, resume="latest")).train()  # space freed: resume
    assert read_checkpoint(out / "checkpoint-000004").step == 4


def test_a_real_full_disk_ends_in_one_line_and_leaves_no_partial_folder(images, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the simulated full-disk test covers the logic")
    try:
        out = disk / "run"  # one micro checkpoint (~33 MB) fits, a second does not
        result = subprocess.run(
            cli_train(images, out, "--steps", "4", "--checkpoint-every", "2"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        (line,) = error_lines(result.stderr)
        assert "no space left on device while saving checkpoint-000004" in line
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002"]
        assert not list(out.glob(".tmp-checkpoint-*"))
        assert read_checkpoint(out / "checkpoint-000002").step == 2
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------------------------ metrics and data


def test_metrics_after_a_resume_never_repeat_a_step(images, tmp_path):
    out = tmp_path / "run"
    Trainer(pixel_config(images, out, steps=5, checkpoint_every=2)).train()  # checkpoints 2, 4, 5
    import shutil

    shutil.rmtree(out / "checkpoint-000005")  # as if killed after logging step 5 but before saving it
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "lo')  # a line cut short by the kill
    Trainer(pixel_config(images, out, steps=7, checkpoint_every=2, resume="latest")).train()
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6, 7]


def test_skipped_images_are_counted_in_metrics_and_checkpoints(image_folder, tmp_path):
    # image_folder: 13 decodable images and 2 corrupt ones; 6 steps x 5 images = 30 items = two epochs
    out = tmp_path / "run"
    Trainer(pixel_config(image_folder, out, steps=6, batch_size=5, log_every=3, shuffle_buffer=0)).train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "loss" in r][-1]["images_skipped"] == 4
    assert read_checkpoint(out / "checkpoint-000006").state["images_skipped"] == 4


def test_an_all_corrupt_folder_with_workers_is_one_line(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not a png at all")
    result = run_cli(
        "train",
        "--dataset",
        str(folder),
        "--space",
        "pixel",
        "--preset",
        "micro",
        "--resolution",
        str(RES),
        "--steps",
        "2",
        "--num-workers",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "yielded no usable image" in line


# ------------------------------------------------------------------------------------------------ one clean line


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-grad-norm", "-1", "--max-grad-norm must be greater than 0"),
        ("--ema-decay", "-1", "--ema-decay must lie in [0, 1)"),
        ("--ema-decay", "2", "--ema-decay must lie in [0, 1)"),
        ("--warmup-steps", "-10", "--warmup-steps must be at least 0"),
        ("--sample-every", "-1", "--sample-every must be at least 0"),
        ("--lr", "nan", "--lr must be greater than 0"),
        ("--weight-decay", "-0.1", "--weight-decay must be at least 0"),
        ("--num-workers", "-2", "--num-workers must be at least 0"),
        ("--cache-num-images", "0", "--cache-num-images must be at least 1"),
        ("--seed", "-5", "--seed must be at least 0"),
    ],
)
def test_train_rejects_nonsense_numbers_in_one_line(images, tmp_path, capsys, flag, value, message):
    code = main(
        [
            "train",
            "--dataset",
            str(images),
            "--space",
            "pixel",
            "--preset",
            "micro",
            "--resolution",
            str(RES),
            "--output-dir",
            str(tmp_path / "out"),
            flag,
            value,
        ]
    )
    assert code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert message in line
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def test_an_unwritable_output_dir_is_refused_before_training(images, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(
        [
            "train",
            "--dataset",
            str(images),
            "--space",
            "pixel",
            "--preset",
            "micro",
            "--resolution",
            str(RES),
            "--output-dir",
            str(blocker / "run"),
        ]
    )
    assert code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "cannot write to --output-dir" in line


def test_offline_default_train_says_the_hub_is_unreachable_at_once(tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # never touch the network
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "liquid_diffusion", "train", "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert time.time() - started < 60
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "Hub is unreachable" in line and "--space pixel" in line and "--vae PATH" in line


@pytest.fixture(scope="module")
def pixel_checkpoint(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample_run")
    Trainer(pixel_config(images, out, steps=2)).train()
    return out / "checkpoint-000002"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-images", "0"], "--num-images must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--resolution", "18"], "--resolution 18 must be a multiple of 4"),
    ],
)
def test_sample_rejects_nonsense_numbers_in_one_line(pixel_checkpoint, capsys, args, message):
    assert main(["sample", "--checkpoint", str(pixel_checkpoint), *args]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert message in line


def test_sample_into_an_existing_folder_is_one_line_and_leaves_nothing(pixel_checkpoint, tmp_path, capsys):
    target = tmp_path / "grids"
    target.mkdir()
    assert main(["sample", "--checkpoint", str(pixel_checkpoint), "--out", str(target)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "is a folder" in line and "grid.png" in line
    assert list(tmp_path.iterdir()) == [target] and not list(target.iterdir())


def test_sample_shows_progress_and_corrupt_ema_weights_are_one_line(pixel_checkpoint, tmp_path):
    result = run_cli(
        "sample",
        "--checkpoint",
        str(pixel_checkpoint),
        "--num-images",
        "2",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "grid.png"),
    )
    assert result.returncode == 0 and "sampling" in result.stderr and "3/3" in result.stderr
    damaged = tmp_path / "damaged"
    __import__("shutil").copytree(pixel_checkpoint, damaged)
    truncate(damaged / "unet_ema" / checkpoints.WEIGHTS_NAME)
    result = run_cli("sample", "--checkpoint", str(damaged), "--out", str(tmp_path / "bad.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert f"{damaged / 'unet_ema' / checkpoints.WEIGHTS_NAME} is unreadable" in line


def test_push_without_a_token_says_not_logged_in_before_any_upload(pixel_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    monkeypatch.setattr(publish, "get_token", lambda: None)
    monkeypatch.setattr(publish, "HfApi", lambda *a, **k: pytest.fail("nothing may be uploaded without a token"))
    assert main(["push", "--checkpoint", str(pixel_checkpoint), "--repo-id", "me/liquid"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "not logged in" in line and "hf auth login" in line


def test_export_overwrite_keeps_the_old_export_until_the_new_one_is_complete(pixel_checkpoint, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(pixel_checkpoint), "--out", str(export)]) == 0
    before = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}

    assert main(["export", "--checkpoint", str(tmp_path / "typo"), "--out", str(export), "--overwrite"]) == 2
    damaged = tmp_path / "damaged"
    __import__("shutil").copytree(pixel_checkpoint, damaged)
    truncate(damaged / "unet_ema" / checkpoints.WEIGHTS_NAME)
    assert main(["export", "--checkpoint", str(damaged), "--out", str(export), "--overwrite"]) == 2
    assert len(error_lines(capsys.readouterr().err)) == 2
    assert {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left

    assert main(["export", "--checkpoint", str(pixel_checkpoint), "--out", str(export), "--overwrite"]) == 0
    assert (export / "model_index.json").is_file()


# ------------------------------------------------------------------------------------------------ quickstart


def test_quickstart_trains_offline_on_built_in_shapes_and_writes_a_progress_strip(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "liquid_diffusion",
            "quickstart",
            "--output-dir",
            str(tmp_path),
            "--steps",
            "3",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "shapes").glob("*.png"))) == 1024
    grids = sorted((tmp_path / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == [f"step-{s:06d}.png" for s in range(1, 4)]  # a grid every max(1, steps // 5)
    strip = Image.open(tmp_path / "samples" / "progress.png")
    one = Image.open(grids[0])
    assert strip.width == 3 * one.width + 2 * 6 and strip.height > one.height
    assert "progress.png" in result.stdout


def test_quickstart_sets_aside_a_run_of_another_architecture_version_and_starts_afresh(tmp_path, capsys):
    out = tmp_path / "quickstart"
    assert main(["quickstart", "--output-dir", str(out), "--steps", "2", "--batch-size", "4"]) == 0
    old = out / "checkpoint-000002"
    for part in ("unet", "unet_ema"):  # the run of a release whose architecture was version 4
        config = json.loads((old / part / "config.json").read_text())
        (old / part / "config.json").write_text(json.dumps({**config, "format_version": 4}))
    capsys.readouterr()

    assert main(["quickstart", "--output-dir", str(out), "--steps", "2", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    kept = tmp_path / "quickstart-version4"
    assert f"kept it as {kept}" in printed
    assert json.loads((kept / "checkpoint-000002" / "unet" / "config.json").read_text())["format_version"] == 4
    assert (kept / "samples" / "progress.png").is_file()  # the old run is whole
    fresh = json.loads((out / "checkpoint-000002" / "unet" / "config.json").read_text())
    assert fresh["format_version"] == FORMAT_VERSION and (out / "samples" / "progress.png").is_file()

    # a run of this version resumes (here: is already done) and is not moved
    assert main(["quickstart", "--output-dir", str(out), "--steps", "2", "--batch-size", "4"]) == 0
    assert not (tmp_path / "quickstart-version5").exists() and "kept it as" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ multi-process stats


def test_interval_stats_sum_over_processes_but_report_the_earliest_bad_step():
    class TwoProcesses:  # gathers this process's fields and a second process's, as accelerate's gather would
        def __init__(self, other):
            self.other = other

        def gather(self, fields):
            return {k: torch.cat([v, self.other[k]]) for k, v in fields.items()}

    def stats(loss, bad_step):
        s = IntervalStats(torch.device("cpu"))
        s.add(torch.tensor([loss, loss]), torch.tensor([0.05, 0.95]), torch.tensor(1.0), step=0)
        s.add(torch.tensor([float("nan"), loss]), torch.tensor([0.5, 0.5]), None, step=bad_step)
        return s

    rank1_fields = stats(3.0, bad_step=4).fields(images_skipped=5)
    totals = stats(1.0, bad_step=9).reduce(TwoProcesses(rank1_fields), images_skipped=2)
    assert totals["first_bad_step"] == [4.0]  # the earliest of 9 and 4, not their sum
    assert totals["nonfinite"] == [2.0] and totals["micro_batches"] == [4.0] and totals["images_skipped"] == [7.0]
    record = IntervalStats.record(totals, step=10, lr=1e-4, images_per_s=1.0)
    assert record["loss"] == pytest.approx((3 * 1.0 + 3 * 3.0) / 6)  # finite losses of both processes
    assert record["images_skipped"] == 7
