"""Specification of few-step generation by reflow (issue 32): ``python -m liquid_diffusion reflow`` turns a trained
teacher into a 1-4 step model through the Trainer (pair cache, exact resume, SIGTERM), and its result is an ordinary
pipeline folder that samples in one step, says so in its card and is pushed unchanged."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_faults import error_lines, logged_steps, wait_for
from test_hub import fake_hub, files_in  # noqa: F401 -- fake_hub is a fixture
from test_trainer import REPO, RES, pixel_config, synthetic_folder, weights

from liquid_diffusion import LiquidDiffusionPipeline
from liquid_diffusion.__main__ import main
from liquid_diffusion.checkpoints import list_checkpoints, read_checkpoint
from liquid_diffusion.reflow import PAIR_CACHE, ReflowConfig, ReflowTrainer
from liquid_diffusion.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny pixel-space teacher run (micro preset, 16 px, a few steps on synthetic images)."""
    root = tmp_path_factory.mktemp("reflow_teacher")
    (root / "images").mkdir()
    images = synthetic_folder(root / "images", 24, seed=5)
    Trainer(pixel_config(images, root / "run", steps=3, validation_images=0)).train()
    return root / "run"


def reflow_config(teacher: Path, out: Path, **overrides) -> ReflowConfig:
    values = dict(
        teacher=str(teacher),
        output_dir=str(out),
        pairs=24,
        shard_size=8,
        teacher_steps=2,
        teacher_sampler="heun",
        batch_size=8,
        steps=4,
        lr=1e-3,
        warmup_steps=1,
        log_every=1,
        sample_every=0,
        num_sample_images=4,
        checkpoint_every=1000,
        num_workers=0,
        progress_bar=False,
    )
    values.update(overrides)
    return ReflowConfig(**values)


def cli_reflow(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "liquid_diffusion",
        "reflow",
        "--checkpoint",
        str(teacher),
        "--output-dir",
        str(out),
        "--pairs",
        "24",
        "--shard-size",
        "8",
        "--teacher-steps",
        "2",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--sample-every",
        "0",
        "--warmup-steps",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> ReflowTrainer:
    trainer = ReflowTrainer(reflow_config(teacher, tmp_path_factory.mktemp("reflow_student") / "run", sample_every=2))
    trainer.train()
    return trainer


# ------------------------------------------------------------------------------------------------ the pair cache


def test_pairs_are_the_teachers_samples_cached_in_shards_with_its_identity(student, teacher):
    cache = student.output_dir / PAIR_CACHE
    metadata = json.loads((cache / "metadata.json").read_text())
    assert metadata["num_pairs"] == 24 and metadata["teacher_sampler"] == "heun" and metadata["teacher_steps"] == 2
    assert len(metadata["teacher_sha256"]) == 64 and metadata["shape"] == [3, RES, RES]
    shards = sorted(cache.glob("pairs-*.safetensors"))
    assert len(shards) == 3
    first = load_file(shards[0])
    assert first["noise"].shape == first["sample"].shape == (8, 3, RES, RES)
    # x = ODE(z) with the teacher's EMA weights and the recorded sampler
    from liquid_diffusion import flow
    from liquid_diffusion.reflow import load_teacher

    unet = load_teacher(str(teacher)).unet
    expected = flow.sample(unet, first["noise"][:2], 2, "heun")
    assert torch.allclose(first["sample"][:2], expected, atol=1e-5)


def test_the_pair_cache_is_made_once_and_a_resumed_run_only_makes_missing_shards(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    ReflowTrainer(reflow_config(teacher, out, steps=2)).train()
    cache = out / PAIR_CACHE
    shards = sorted(cache.glob("pairs-*.safetensors"))
    before = {p.name: {k: v.clone() for k, v in load_file(p).items()} for p in shards}  # not mmapped: overwritten
    mtime = shards[1].stat().st_mtime_ns
    shards[0].unlink()  # lost
    shards[2].write_bytes(b"garbage")  # damaged
    capsys.readouterr()
    ReflowTrainer(reflow_config(teacher, out, steps=4, resume="latest")).train()
    assert "2 shard(s) (1 cached)" in capsys.readouterr().out
    assert shards[1].stat().st_mtime_ns == mtime  # untouched
    for path in shards:  # regenerated identically: noise from (seed, shard), the same teacher
        after, old = load_file(path), before[path.name]
        assert torch.equal(after["noise"], old["noise"])
        assert torch.allclose(after["sample"], old["sample"], atol=1e-5), (after["sample"] - old["sample"]).abs().max()
    ReflowTrainer(reflow_config(teacher, out, steps=5, resume="latest")).train()
    assert "reusing the 24 pairs" in capsys.readouterr().out


def test_a_pair_cache_of_other_settings_is_refused_in_one_line_or_regenerated_with_overwrite(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    ReflowTrainer(reflow_config(teacher, out, steps=1)).train()
    capsys.readouterr()
    code = main(
        [
            "reflow",
            "--checkpoint",
            str(teacher),
            "--output-dir",
            str(out),
            "--pairs",
            "24",
            "--shard-size",
            "8",
            "--teacher-steps",
            "3",
            "--batch-size",
            "8",
            "--resume",
            "--steps",
            "2",
            "--no-progress-bar",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "differs in teacher_steps" in err and "--overwrite" in err
    ReflowTrainer(reflow_config(teacher, out, steps=1, teacher_steps=3, overwrite=True)).train()
    assert json.loads((out / PAIR_CACHE / "metadata.json").read_text())["teacher_steps"] == 3


# ------------------------------------------------------------------------------------------------ a training run


def test_a_reflow_run_trains_on_the_pairs_and_resumes_exactly(teacher, tmp_path):
    straight = reflow_config(teacher, tmp_path / "straight", steps=6, pair_cache_dir=str(tmp_path / "pairs"))
    ReflowTrainer(straight).train()
    split = reflow_config(teacher, tmp_path / "split", steps=3, pair_cache_dir=str(tmp_path / "pairs"))
    ReflowTrainer(split).train()
    split.steps, split.resume = 6, "latest"
    ReflowTrainer(split).train()
    for name in ("unet", "unet_ema"):
        a = weights(tmp_path / "straight" / "checkpoint-000006" / name)
        b = weights(tmp_path / "split" / "checkpoint-000006" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    teacher_weights = weights(read_checkpoint(list_checkpoints(teacher)[-1]).path / "unet_ema")
    assert any(not torch.equal(a[k], teacher_weights[k]) for k in a)  # it did train
    saved = json.loads((tmp_path / "straight" / "checkpoint-000006" / "train_config.json").read_text())
    assert saved["teacher"] == str(teacher) and saved["preset"] == "micro" and saved["resolution"] == RES


def test_sigterm_saves_and_exits_like_train(teacher, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli_reflow(teacher, out, "--steps", "100000"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_for(lambda: len(logged_steps(out)) >= 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "--resume latest" in stderr
    (checkpoint,) = list_checkpoints(out)
    assert read_checkpoint(checkpoint).step == logged_steps(out)[-1]


def test_the_sample_grids_show_1_2_and_4_steps_from_the_same_noise(student):
    from PIL import Image

    grid = Image.open(student.output_dir / "samples" / "step-000002.png")
    assert grid.size == (4 * RES, 3 * RES)  # rows: 1, 2 and 4 Euler steps; num_sample_images (4) per row
    rows = torch.from_numpy(np.array(grid)).float().split(RES, dim=0)
    assert not torch.equal(rows[0], rows[2])  # other step counts, other images (from the same noise)


# ------------------------------------------------------------------------------------------------ the result


def test_the_result_is_a_pipeline_folder_that_samples_in_one_step(student):
    folder = student.pipeline_dir
    pipe = LiquidDiffusionPipeline.from_pretrained(folder)
    assert pipe.config.recommended_steps == 2
    images = [
        pipe(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(7), output_type="pt").images
        for _ in range(2)
    ]
    assert images[0].shape == (2, 3, RES, RES) and torch.equal(images[0], images[1])
    default = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="pt").images
    two = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert torch.equal(default, two)  # recommended_steps is the default
    card = (folder / "README.md").read_text()
    assert "made for 1-4 steps by reflow from" in card and "few-step" in card
    assert "num_inference_steps=2" in card


def test_sample_and_evaluate_default_to_the_steps_the_model_was_made_for(student, tmp_path):
    from PIL import Image
    from test_evaluate import StandInFeatures

    from liquid_diffusion.evaluate import evaluate_checkpoint

    def grid(*flags):
        out = tmp_path / f"grid{'-'.join(flags)}.png"
        assert (
            main(["sample", "--checkpoint", str(student.pipeline_dir), "--num-images", "2", "--out", str(out), *flags])
            == 0
        )
        return np.array(Image.open(out))

    assert np.array_equal(grid(), grid("--steps", "2"))  # its recommended_steps
    assert not np.array_equal(grid(), grid("--steps", "25"))
    result = evaluate_checkpoint(
        str(student.pipeline_dir), num_samples=4, feature_extractor=StandInFeatures(), batch_size=4, progress=False
    )
    assert result["steps"] == 2


def test_push_publishes_the_pipeline_folder_unchanged(student, fake_hub):  # noqa: F811
    folder = student.pipeline_dir
    assert main(["push", "--checkpoint", str(folder), "--repo-id", "me/few-step"]) == 0
    (api,) = fake_hub.instances
    (upload,) = api.uploads
    assert set(upload["files"]) == files_in(folder)
    assert all(content == (folder / name).read_bytes() for name, content in upload["files"].items())


def test_a_distillation_stage_trains_at_t_1_from_a_reflow_result(student, teacher, tmp_path):
    trainer = ReflowTrainer(
        reflow_config(
            teacher,
            tmp_path / "distill",
            steps=2,
            init=str(student.pipeline_dir),
            distill_t=1.0,
            pair_cache_dir=str(student.output_dir / PAIR_CACHE),
        )
    )
    seen = []
    original = trainer._sample_timesteps
    trainer._sample_timesteps = lambda n: seen.append(original(n)) or seen[-1]
    trainer.train()
    assert all(bool((t == 1).all()) for t in seen) and seen
    assert LiquidDiffusionPipeline.from_pretrained(trainer.pipeline_dir).config.recommended_steps == 1


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_are_one_line(teacher, tmp_path, capsys):
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    (not_a_model / "cat.png").write_bytes(b"not an image")
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(teacher), "--pairs", "0"], "--pairs must be at least 1"),
        ([str(not_a_model)], "not a LiquidDiffusion checkpoint"),
        ([str(teacher), "--output-dir", str(teacher)], "holds a training run, not a reflow run"),
        ([str(teacher), "--teacher-sampler", "rk4"], "unknown sampler"),
    ]
    for args, message in cases:
        argv = ["reflow", "--checkpoint", *args]
        if "--output-dir" not in args:
            argv += ["--output-dir", str(tmp_path / "out")]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert len(error_lines(err)) == 1 and message in err, (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list_checkpoints(tmp_path / "out")


# ------------------------------------------------------------------------------------------------ conditional teachers


def test_a_conditional_teacher_gives_labelled_pairs_with_guidance_baked_in(tmp_path):
    from test_conditional import config as conditional_config
    from test_conditional import write_class_folder

    folder = write_class_folder(tmp_path / "classes", per_class=4)
    Trainer(conditional_config(folder, tmp_path / "teacher", steps=6, validation_images=0)).train()
    trainer = ReflowTrainer(
        reflow_config(
            tmp_path / "teacher",
            tmp_path / "student",
            pairs=64,
            shard_size=64,
            steps=2,
            lr=1e-4,
            unconditional_pairs=0.25,
        )
    )
    trainer.train()
    metadata = json.loads((trainer.output_dir / PAIR_CACHE / "metadata.json").read_text())
    assert metadata["num_classes"] == 2 and metadata["pair_guidance_scale"] == 2.0  # the teacher's recommended
    labels = load_file(trainer.output_dir / PAIR_CACHE / "pairs-00000.safetensors")["labels"]
    assert set(labels.tolist()) == {0, 1, 2} and 4 <= int((labels == 2).sum()) <= 28  # 2: the null class
    pipe = LiquidDiffusionPipeline.from_pretrained(trainer.pipeline_dir)
    assert pipe.config.guidance_scale == 1.0 and pipe.unet.config.class_names == ["blue_square", "red_disc"]
    images = pipe(class_labels="red_disc", batch_size=2, num_inference_steps=1, output_type="pt").images
    assert images.shape == (2, 3, pipe.config.resolution, pipe.config.resolution)
    assert "guidance (w = 2) is baked in" in (trainer.pipeline_dir / "README.md").read_text()


def test_a_latent_space_teacher_given_as_an_export_makes_latent_pairs_and_a_latent_pipeline(latent_export, tmp_path):
    trainer = ReflowTrainer(
        reflow_config(latent_export, tmp_path / "student", pairs=8, shard_size=8, batch_size=4, steps=2, sample_every=2)
    )
    trainer.train()
    metadata = json.loads((trainer.output_dir / PAIR_CACHE / "metadata.json").read_text())
    pipe = LiquidDiffusionPipeline.from_pretrained(trainer.pipeline_dir)
    factor = pipe.vae_scale_factor
    assert metadata["shape"] == [4, 32 // factor, 32 // factor] and pipe.vae is not None
    images = pipe(batch_size=1, num_inference_steps=1, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    assert (trainer.output_dir / "samples" / "step-000002.png").is_file()


# ------------------------------------------------------------------------------------------------ the benchmark


def test_the_reflow_benchmark_scores_each_model_against_the_teachers_ode_and_on_held_out_images(teacher, tmp_path):
    from benchmarks import reflow as benchmark

    out = tmp_path / "out"
    argv = ["--teacher", str(teacher), "--work-dir", str(tmp_path / "work"), "--out", str(out), "--pairs", "8"]
    argv += ["--teacher-steps", "2", "--reflow-steps", "2", "--batch-size", "4", "--eval-noises", "4"]
    assert benchmark.main([*argv, "--reference-steps", "2", "--grid-images", "2"]) == 0
    result = json.loads((out / "reflow.json").read_text())
    rows = {(r["model"], r["sampler"], r["model_calls"]): r for r in result["rows"]}
    assert {("teacher", "euler", 1), ("teacher", "heun", 2), ("reflow", "euler", 1), ("reflow", "euler", 4)} <= set(
        rows
    )
    assert rows[("teacher", "euler", 1)]["mse"] > 0
    held_out = result["held_out"]
    assert held_out["images"] == 2  # the teacher run's own held-out images (10 % of its 24)
    assert set(held_out) == {"images", "teacher", "reflow"}
    assert held_out["teacher"]["val_loss"] != held_out["reflow"]["val_loss"]
    assert (out / "teacher25_vs_student.png").is_file()
