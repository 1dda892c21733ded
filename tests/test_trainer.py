"""Specification of the trainer and the train / sample command line (issue: trainer and CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from liquid_diffusion import flow
from liquid_diffusion.__main__ import build_parser, main
from liquid_diffusion.checkpoints import list_checkpoints
from liquid_diffusion.config import TrainConfig, resolve_mixed_precision
from liquid_diffusion.export import export_checkpoint, pipeline_from_folder
from liquid_diffusion.metrics import TrainerCallback
from liquid_diffusion.model import FORMAT_VERSION, LiquidDiffusionUNet
from liquid_diffusion.stopping import NonFiniteLossError
from liquid_diffusion.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RES = 16  # pixel-space resolution for the micro model (divisible by its factor 4)


def synthetic_images(n: int, seed: int, size: int = RES) -> list[np.ndarray]:
    """Structured, learnable images: a coloured square on a two-colour vertical gradient."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        ramp = np.linspace(0, 1, size)[:, None, None]
        image = (1 - ramp) * top + ramp * bottom + np.zeros((size, size, 3))
        side = rng.integers(size // 4, size // 2)
        y, x = rng.integers(0, size - side, 2)
        image[y : y + side, x : x + side] = rng.uniform(0, 255, 3)
        images.append(image.astype(np.uint8))
    return images


def synthetic_folder(folder: Path, n: int, seed: int) -> Path:
    """``folder`` holding ``synthetic_images(n, seed)`` as 000.png, 001.png, ..."""
    for i, image in enumerate(synthetic_images(n, seed)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    return synthetic_folder(tmp_path_factory.mktemp("synthetic"), 48, seed=0)


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    images = np.stack(synthetic_images(16, seed=1))
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def pixel_config(folder: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        dataset=str(folder),
        space="pixel",
        preset="micro",
        resolution=RES,
        batch_size=8,
        steps=4,
        lr=1e-3,
        warmup_steps=1,
        log_every=1,
        sample_every=0,
        num_sample_images=4,
        sample_steps=2,
        checkpoint_every=1000,
        num_workers=0,
        shuffle_buffer=16,
        output_dir=str(out),
        seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def training_records(out: Path) -> list[dict]:
    """The training-loss records of ``out/metrics.jsonl`` (validation and evaluation records have no ``loss``)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def held_out_loss(model: LiquidDiffusionUNet, x0: torch.Tensor) -> float:
    """Flow loss on a fixed t grid with fixed noise: comparable across models and steps."""
    generator = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for t in torch.linspace(0.05, 0.95, 10):
            noise = torch.randn(x0.shape, generator=generator)
            losses.append(flow.flow_matching_loss(model, x0, noise, t.expand(len(x0))).item())
    return float(np.mean(losses))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "diffusion_pytorch_model.safetensors")


def run_cli(*args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "liquid_diffusion", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# The command line in-process (``__main__.main``; a subprocess only where a test needs one). Here, not in
# conftest.py: processes that the fault tests start import this module, and there ``conftest`` is the root one.
# ---------------------------------------------------------------------------------------------------------------


def cli_help(command: str, capsys) -> str:
    """``python -m liquid_diffusion COMMAND --help``'s text, as wide as it likes (no line wrapped)."""
    from unittest import mock

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, mock.patch.dict("os.environ", {"COLUMNS": "1000"}):
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """Each option of an argparse help text (its flags, as shown) -> its description, wrapped lines joined."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current, _, description = line.strip().partition("  ")
            entries[current] = description.strip()
        elif current is not None and line.startswith("    "):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


def command_names() -> list[str]:
    return [name for action in build_parser()._subparsers._group_actions for name in action.choices]


# ------------------------------------------------------------------------------------------------ learning


def test_micro_model_learns_held_out_flow_loss_falls_by_40_percent(train_folder, held_out, tmp_path):
    trainer = Trainer(
        pixel_config(train_folder, tmp_path, steps=300, log_every=50, lr=2e-3, warmup_steps=20, checkpoint_every=10_000)
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = held_out_loss(model, held_out)
    trainer.train()
    after = held_out_loss(model, held_out)
    assert after < 0.6 * before, (before, after)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in logs] == [50, 100, 150, 200, 250, 300]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [300]  # and the validation loss at the end


# ------------------------------------------------------------------------------------------------ feedback


def test_metrics_samples_and_callbacks(train_folder, tmp_path):
    seen = {"log": [], "sample": [], "checkpoint": []}

    class Recorder(TrainerCallback):
        def on_log(self, trainer, record):
            seen["log"].append(record)

        def on_sample(self, trainer, step, path):
            seen["sample"].append((step, path))

        def on_checkpoint(self, trainer, step, path):
            seen["checkpoint"].append((step, path))

    config = pixel_config(
        train_folder, tmp_path, steps=4, log_every=2, sample_every=2, checkpoint_every=2, keep_checkpoints=1
    )
    final = Trainer(config, callbacks=[Recorder()]).train()

    records = training_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert {"step", "loss", "lr", "images_per_s", "grad_norm", "loss_t_bins"} <= record.keys()
        assert len(record["loss_t_bins"]) == 10 and record["images_per_s"] > 0 and record["grad_norm"] > 0
        binned = [b for b in record["loss_t_bins"] if b is not None]
        assert binned and all(b > 0 for b in binned)
    assert seen["log"] == records

    grids = sorted((tmp_path / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[0]).size == (2 * RES, 2 * RES)  # 4 images in a 2x2 grid
    assert [s for s, _ in seen["sample"]] == [2, 4]

    assert final == tmp_path / "checkpoint-000004"
    assert list_checkpoints(tmp_path) == [final]  # keep_checkpoints=1 pruned checkpoint-000002
    assert [s for s, _ in seen["checkpoint"]] == [2, 4]
    for name in ("unet", "unet_ema"):
        assert (final / name / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((final / "state.json").read_text())["step"] == 4
    assert json.loads((final / "train_config.json").read_text())["preset"] == "micro"
    state = torch.load(final / "training_state.pt", weights_only=True)
    assert {"optimizer", "lr_scheduler", "scaler", "ema", "rng"} <= state.keys()


def test_samples_use_the_same_noise_every_time(train_folder, tmp_path):
    trainer = Trainer(pixel_config(train_folder, tmp_path, steps=1))
    first = np.asarray(Image.open(trainer.write_samples()))
    second = np.asarray(Image.open(trainer.write_samples()))
    assert np.array_equal(first, second)


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_exact(train_folder, tmp_path, grad_accum):
    straight = pixel_config(train_folder, tmp_path / "straight", steps=6, grad_accum=grad_accum, log_every=3)
    Trainer(straight).train()

    split = pixel_config(train_folder, tmp_path / "split", steps=3, grad_accum=grad_accum, log_every=3)
    Trainer(split).train()
    split.steps, split.resume = 6, "latest"
    Trainer(split).train()

    for name in ("unet", "unet_ema"):
        a = weights(tmp_path / "straight" / "checkpoint-000006" / name)
        b = weights(tmp_path / "split" / "checkpoint-000006" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    a = torch.load(tmp_path / "straight" / "checkpoint-000006" / "training_state.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint-000006" / "training_state.pt", weights_only=True)
    assert a["ema"] == b["ema"] and a["lr_scheduler"] == b["lr_scheduler"]
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])


def test_gradient_checkpointing_trains_as_without_it_and_resumes_exactly(train_folder, tmp_path):
    Trainer(pixel_config(train_folder, tmp_path / "plain", steps=4)).train()
    Trainer(pixel_config(train_folder, tmp_path / "straight", steps=4, gradient_checkpointing=True)).train()
    split = pixel_config(train_folder, tmp_path / "split", steps=2, gradient_checkpointing=True)
    trainer = Trainer(split)
    assert trainer.unwrapped_model.is_gradient_checkpointing
    trainer.train()
    split.steps, split.resume = 4, "latest"
    Trainer(split).train()
    plain, straight, resumed = (
        weights(tmp_path / run / "checkpoint-000004" / "unet") for run in ("plain", "straight", "split")
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # exact resume, as without checkpointing
    for name, value in plain.items():  # the same gradients: the same weights, up to float rounding
        torch.testing.assert_close(straight[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_latest_without_checkpoint_starts_fresh_and_mismatch_is_refused(train_folder, tmp_path):
    config = pixel_config(train_folder, tmp_path, steps=1, resume="latest")
    Trainer(config).train()
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-000001"]
    with pytest.raises(ValueError, match="preset='micro'"):
        Trainer(pixel_config(train_folder, tmp_path, preset="tiny", steps=2, resume="latest")).train()


def test_resuming_a_checkpoint_of_another_architecture_version_is_one_line(train_folder, tmp_path):
    Trainer(pixel_config(train_folder, tmp_path, steps=1)).train()
    checkpoint = tmp_path / "checkpoint-000001"
    for folder in ("unet", "unet_ema"):
        config = json.loads((checkpoint / folder / "config.json").read_text())
        del config["format_version"]  # as saved before the field existed (architecture version 1)
        (checkpoint / folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cannot resume .*architecture version 1.*format changed") as error:
        Trainer(pixel_config(train_folder, tmp_path, steps=2, resume=str(checkpoint))).train()
    assert "\n" not in str(error.value)


def test_a_run_of_the_previous_architecture_version_is_refused_in_one_line_by_resume_sample_and_export(
    train_folder, tmp_path
):
    """A version-6 run (the same parts, with every block's linear maps of t_emb kept apart) neither resumes nor
    samples nor exports: each says so in one line, naming what to do."""
    Trainer(pixel_config(train_folder, tmp_path, steps=1)).train()
    checkpoint = tmp_path / "checkpoint-000001"
    for folder in ("unet", "unet_ema"):
        config = json.loads((checkpoint / folder / "config.json").read_text())
        (checkpoint / folder / "config.json").write_text(json.dumps({**config, "format_version": FORMAT_VERSION - 1}))
    with pytest.raises(
        ValueError, match=f"cannot resume .*version {FORMAT_VERSION - 1}.*retrain it.*another --output-dir"
    ) as error:
        Trainer(pixel_config(train_folder, tmp_path, steps=2, resume="latest")).train()
    assert "\n" not in str(error.value)
    for read in (pipeline_from_folder, lambda folder: export_checkpoint(folder, tmp_path / "export")):
        with pytest.raises(ValueError, match=f"version {FORMAT_VERSION - 1}.*release that saved it") as error:
            read(checkpoint)  # the path of `sample` and `export`
        assert "\n" not in str(error.value)
    assert not (tmp_path / "export").exists()


def test_resume_with_another_batch_size_continues_at_the_same_number_of_images(train_folder, tmp_path, capsys):
    Trainer(pixel_config(train_folder, tmp_path, steps=2, batch_size=8)).train()  # 16 images seen
    trainer = Trainer(pixel_config(train_folder, tmp_path, steps=3, batch_size=4, resume="latest"))
    trainer.train()
    assert "batch_size changed" in capsys.readouterr().out
    assert json.loads((tmp_path / "checkpoint-000003" / "state.json").read_text())["batches_consumed"] == 4 + 1


def test_a_half_written_checkpoint_is_ignored(train_folder, tmp_path):
    Trainer(pixel_config(train_folder, tmp_path, steps=1)).train()
    (tmp_path / ".tmp-checkpoint-000002-999").mkdir()  # what a kill mid-save leaves behind
    (tmp_path / "checkpoint-000003").mkdir()  # no state.json: incomplete
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-000001"]
    trainer = Trainer(pixel_config(train_folder, tmp_path, steps=2, resume="latest"))
    trainer.train()
    assert json.loads((tmp_path / "checkpoint-000002" / "state.json").read_text())["step"] == 2


# ------------------------------------------------------------------------------------------------ faults


class PoisonAfterCheckpoint(TrainerCallback):
    """Makes the weights NaN right after the first checkpoint, as a diverging step would."""

    def on_checkpoint(self, trainer, step, path):
        with torch.no_grad():
            next(trainer.accelerator.unwrap_model(trainer.model).parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_naming_the_step_and_the_checkpoint_to_resume(train_folder, tmp_path):
    config = pixel_config(train_folder, tmp_path, steps=10, checkpoint_every=2, log_every=1)
    with pytest.raises(NonFiniteLossError, match=r"step 3; try a lower --lr.*checkpoint-000002"):
        Trainer(config, callbacks=[PoisonAfterCheckpoint()]).train()
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-000002"]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "checkpoint-000002" / "unet").values())


def test_diverged_weights_are_never_checkpointed(train_folder, tmp_path):
    config = pixel_config(train_folder, tmp_path, steps=10, checkpoint_every=2, log_every=100)
    with pytest.raises(NonFiniteLossError, match=r"not saving them.*checkpoint-000002"):
        Trainer(config, callbacks=[PoisonAfterCheckpoint()]).train()
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-000002"]


def test_ctrl_c_finishes_the_step_saves_and_exits(train_folder, tmp_path):
    class CtrlC(TrainerCallback):
        def on_log(self, trainer, record):
            if record["step"] == 2:
                os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, default_int_handler in a shell
    with pytest.raises(KeyboardInterrupt):
        Trainer(pixel_config(train_folder, tmp_path, steps=50), callbacks=[CtrlC()]).train()
    (checkpoint,) = list_checkpoints(tmp_path)
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2  # the completed step, nothing lost
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored


def test_any_seed_works(train_folder, tmp_path):
    assert Trainer(pixel_config(train_folder, tmp_path, steps=1, seed=123_456_789)).train().exists()


def test_mixed_precision_auto_is_fp32_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert resolve_mixed_precision("auto") == "no"
    assert resolve_mixed_precision("fp16") == "no"  # falls back cleanly instead of failing


# ------------------------------------------------------------------------------------------------ latent space


def test_latent_space_training_with_and_without_cache(train_folder, tiny_vae_dir, tmp_path):
    common = dict(space="latent", vae=str(tiny_vae_dir), resolution=32, steps=2, num_sample_images=1)
    streamed = Trainer(pixel_config(train_folder, tmp_path / "stream", **common))
    assert streamed.accelerator.unwrap_model(streamed.model).config.in_channels == 4
    streamed.train()
    grid = Image.open(tmp_path / "stream" / "samples" / "step-000002.png")
    assert grid.size == (32, 32)  # decoded back to pixels through the VAE

    cached = pixel_config(train_folder, tmp_path / "cached", cache_latents=True, cache_num_images=16, **common)
    Trainer(cached).train()
    assert (tmp_path / "cached" / "latent-cache").is_dir()
    assert list_checkpoints(tmp_path / "cached")


# ------------------------------------------------------------------------------------------------ multi-process


def test_two_process_run_keeps_ema_identical_and_writes_once(train_folder, tmp_path):
    script = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
            str(train_folder),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["num_processes"] == 2
    assert all(torch.equal(a, b) for a, b in zip(rank0["ema"], rank1["ema"]))
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"]))
    assert rank0["first_batch"].shape == rank1["first_batch"].shape
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])  # each process sees different images
    assert list_checkpoints(tmp_path / "out") == [tmp_path / "out" / "checkpoint-000003"]
    assert len(training_records(tmp_path / "out")) == 3  # main process only


# ------------------------------------------------------------------------------------------------ command line


def test_cli_train_then_sample(train_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            str(train_folder),
            "--space",
            "pixel",
            "--preset",
            "micro",
            "--resolution",
            str(RES),
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--log-every",
            "1",
            "--sample-every",
            "2",
            "--checkpoint-every",
            "2",
            "--num-workers",
            "0",
            "--num-sample-images",
            "4",
            "--sample-steps",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(training_records(out)) == 3
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-000002.png", "step-000003.png"]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002", "checkpoint-000003"]

    grid = tmp_path / "grid.png"
    for sampler in ("euler", "heun"):
        code = main(
            [
                "sample",
                "--checkpoint",
                str(out),
                "--num-images",
                "4",
                "--steps",
                "3",
                "--sampler",
                sampler,
                "--seed",
                "0",
                "--out",
                str(grid),
            ]
        )
        assert code == 0, capsys.readouterr().err
        assert Image.open(grid).size == (2 * RES, 2 * RES)


def test_cli_ctrl_c_saves_a_checkpoint(train_folder, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "liquid_diffusion",
            "train",
            "--dataset",
            str(train_folder),
            "--space",
            "pixel",
            "--preset",
            "micro",
            "--resolution",
            str(RES),
            "--batch-size",
            "4",
            "--steps",
            "100000",
            "--log-every",
            "1",
            "--sample-every",
            "0",
            "--num-workers",
            "0",
            "--output-dir",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume latest" in stderr
    assert list_checkpoints(out)


def test_help_documents_every_flag(capsys):
    train_help = cli_help("train", capsys)
    for flag in (
        "--dataset",
        "--preset",
        "--resolution",
        "--space",
        "--vae",
        "--batch-size",
        "--grad-accum",
        "--steps",
        "--lr",
        "--timestep-sampling",
        "--sample-every",
        "--checkpoint-every",
        "--output-dir",
        "--resume",
        "--mixed-precision",
        "--ema-decay",
        "--cache-latents",
        "--seed",
        "--compile",
        "--gradient-checkpointing",
        "--report-to",
    ):
        assert flag in train_help
    sample_help = cli_help("sample", capsys)
    for flag in ("--checkpoint", "--num-images", "--steps", "--sampler", "--seed", "--out"):
        assert flag in sample_help


@pytest.mark.parametrize("command", command_names())
def test_help_states_each_default_once(command, capsys):
    entries = help_entries(cli_help(command, capsys))
    assert "--help" not in entries and len(entries) > 2
    for flags, description in entries.items():
        assert description.count("(default") <= 1, (flags, description)
        assert "(default: None)" not in description, (flags, description)
    if command == "train":  # the two that were doubled, and a flag whose default argparse words itself
        assert entries["--cache-num-images CACHE_NUM_IMAGES"].endswith("(default: all)")
        assert entries["--cache-dir CACHE_DIR"].endswith("(default: OUTPUT_DIR/latent-cache)")
        assert entries["--flip, --no-flip"] == "random horizontal flips (default: True)"


@pytest.mark.parametrize("command", ["train", "quickstart"])
def test_an_output_dir_that_is_a_file_is_one_line(train_folder, tmp_path, capsys, command):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    argv = ["--output-dir", str(blocker)]
    if command == "train":
        argv += ["--dataset", str(train_folder), "--space", "pixel", "--preset", "micro", "--resolution", str(RES)]
    assert main([command, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: --output-dir '{blocker}' is a file, not a folder; choose a folder (a new or "
        "existing directory) instead\n"
    )
    assert blocker.read_text() == "not a folder" and list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution", "18"], "multiple of 4"),
        (["--preset", "huge"], "valid presets: micro, tiny, small, base"),
        (["--space", "voxel"], "space must be 'latent' or 'pixel'"),
        (["--dataset", "/no/such/folder"], "/no/such/folder"),
        (["--report-to", "comet"], "--report-to must be one of none, tensorboard, wandb, all"),
    ],
    ids=["resolution", "preset", "space", "dataset", "report-to"],
)
def test_cli_bad_values_give_one_clean_line(train_folder, tmp_path, capsys, args, message):
    base = [
        "train",
        "--dataset",
        str(train_folder),
        "--space",
        "pixel",
        "--preset",
        "micro",
        "--resolution",
        str(RES),
        "--steps",
        "1",
        "--num-workers",
        "0",
        "--output-dir",
        str(tmp_path),
    ]
    assert main([*base, *args]) != 0
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr


def test_cli_sample_from_a_missing_checkpoint_is_one_clean_line(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "nothing-here")]) != 0
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and stderr.startswith("error:")
