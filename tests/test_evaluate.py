"""FID and KID (issue 13): the metrics, the reference cache, ``python -m liquid_diffusion evaluate`` and
``--eval-every`` in training. All offline: a small stand-in replaces the Inception network through the feature-
extractor hook (``feature_extractor`` / ``--feature-extractor module:callable``), the way torchmetrics takes any
``nn.Module``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from liquid_diffusion import evaluate
from liquid_diffusion import features as feature_module
from liquid_diffusion.__main__ import main
from liquid_diffusion.checkpoints import list_checkpoints
from liquid_diffusion.config import TrainConfig
from liquid_diffusion.evaluate import fid_kid, update_best
from liquid_diffusion.export import export_checkpoint
from liquid_diffusion.features import reference_features
from liquid_diffusion.metrics import TrainerCallback
from liquid_diffusion.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RES = 16
STAND_IN = f"{__name__}:StandInFeatures"  # importable in this process under the name pytest gave this module


class StandInFeatures(nn.Module):
    """Offline stand-in for the Inception network: uint8 [B, 3, H, W] -> 19 features (per-channel mean and std of
    fixed random 3x3 filters, plus the mean colour). Counts its calls, so tests can tell a cache hit."""

    calls = 0

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(8, 3, 3, 3, generator=generator) / 3)
        self.name = "stand-in-19"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        StandInFeatures.calls += 1
        x = images.float() / 127.5 - 1
        h = torch.tanh(nn.functional.conv2d(x, self.weight, padding=1))
        return torch.cat([h.mean((2, 3)), h.std((2, 3)), x.mean((2, 3))], 1)


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Structured images in [-1, 1]: a random two-colour gradient with a square, optionally brightened by ``shift``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, RES, RES), np.float32)
    ramp = np.linspace(0, 1, RES)[None, :, None]
    for i in range(n):
        top, bottom = rng.uniform(-1, 1, (3, 1, 1)), rng.uniform(-1, 1, (3, 1, 1))
        out[i] = (1 - ramp) * top + ramp * bottom
        side = rng.integers(RES // 4, RES // 2)
        y, x = rng.integers(0, RES - side, 2)
        out[i, :, y : y + side, x : x + side] = rng.uniform(-1, 1, (3, 1, 1))
    return torch.from_numpy(out + shift).clamp(-1, 1)


def features(batch: torch.Tensor) -> torch.Tensor:
    return feature_module.extract_features(StandInFeatures(), batch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clean_image_folder) -> Path:
    """A micro pixel-space model trained for 2 steps at 16 px on the 32 clean images: an output dir."""
    out = tmp_path_factory.mktemp("evaluate-run")
    Trainer(pixel_config(clean_image_folder, out, steps=2)).train()
    return out


def pixel_config(folder: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        dataset=str(folder),
        space="pixel",
        preset="micro",
        resolution=RES,
        batch_size=8,
        steps=2,
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
        progress_bar=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # the stand-in lives in this file: the child process imports it as test_evaluate from tests/
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "liquid_diffusion", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


# ------------------------------------------------------------------------------------------------ the metrics


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    real = features(images(200, seed=0))
    same_distribution = features(images(200, seed=1))
    shifted = features(images(200, seed=1, shift=0.3))
    itself = fid_kid(real, real)["fid"]
    same = fid_kid(real, same_distribution)["fid"]
    moved = fid_kid(real, shifted)["fid"]
    assert abs(itself) < 1e-6, itself
    assert moved > 5 * same > 0, (same, moved)
    assert fid_kid(real, features(images(200, seed=1, shift=0.6)))["fid"] > moved  # more shift, larger FID


def test_kid_of_two_samples_of_one_distribution_is_near_zero():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=generator), torch.randn(400, 16, generator=generator)
    same = fid_kid(a, b, kid_subset_size=200)
    shifted = fid_kid(a, b + 0.5, kid_subset_size=200)
    assert abs(same["kid"]) < 0.05 * shifted["kid"], (same, shifted)
    assert shifted["kid"] > 5 * shifted["kid_std"] > 0
    assert fid_kid(a, b, kid_subset_size=200) == same  # subsets come from the seed: reproducible
    state = torch.get_rng_state()
    fid_kid(a, b, kid_subset_size=50)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (training's) is left alone


# ------------------------------------------------------------------------------------------------ reference cache


def test_reference_features_are_cached_reused_and_refused_on_mismatch(clean_image_folder, tmp_path):
    cache, extractor = tmp_path / "reference", feature_module.load_feature_extractor(StandInFeatures())
    first, metadata = reference_features(
        str(clean_image_folder), RES, extractor, 20, cache, batch_size=8, progress=False
    )
    assert first.shape == (20, 19) and metadata["num_images"] == 20 and not metadata["whole_dataset"]
    assert metadata["key"]["resolution"] == RES and metadata["key"]["feature_extractor"] == "stand-in-19"

    StandInFeatures.calls = 0
    again, _ = reference_features(str(clean_image_folder), RES, extractor, 20, cache, progress=False)
    fewer, _ = reference_features(str(clean_image_folder), RES, extractor, 5, cache, progress=False)
    assert StandInFeatures.calls == 0  # served from the cache
    assert torch.equal(again, first) and torch.equal(fewer, first[:5])

    more, metadata = reference_features(
        str(clean_image_folder), RES, extractor, 100, cache, batch_size=8, progress=False
    )  # more than cached: recomputed, and the dataset has 32
    assert StandInFeatures.calls > 0 and more.shape[0] == 32 and metadata["whole_dataset"]
    assert torch.allclose(more[:20], first, atol=1e-6)  # the same fixed shuffle: a prefix of the larger set

    with pytest.raises(ValueError, match=r"resolution=16 \(wanted 32\)"):
        reference_features(str(clean_image_folder), 32, extractor, 20, cache, progress=False)
    other = feature_module.load_feature_extractor(StandInFeatures())
    other.name = "another-extractor"
    with pytest.raises(ValueError, match="feature_extractor="):
        reference_features(str(clean_image_folder), RES, other, 20, cache, progress=False)
    with pytest.raises(ValueError, match="dataset="):
        reference_features(str(tmp_path), RES, extractor, 20, cache, progress=False)


def test_the_inception_extractor_says_in_one_line_what_to_do_offline(monkeypatch, tmp_path):
    import torchmetrics.image.fid as tm_fid
    import torchmetrics.utilities.imports as tm_imports

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ValueError, match=r"pip install 'liquid-diffusion\[eval\]'") as missing:
        feature_module.load_feature_extractor("inception")
    assert "\n" not in str(missing.value)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", no_network)
    with pytest.raises(ValueError, match="could not download the Inception weights") as offline:
        feature_module.load_feature_extractor("inception")
    message = str(offline.value)
    assert "\n" not in message and str(feature_module.inception_weights_path()) in message
    assert "--inception-weights" in message
    with pytest.raises(FileNotFoundError, match="no Inception weights at"):
        feature_module.load_feature_extractor("inception", weights=tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------------ evaluate command


def test_evaluate_command_end_to_end_on_a_micro_checkpoint(trained, tmp_path):
    start = time.perf_counter()
    result = run_cli(
        "evaluate",
        "--checkpoint",
        str(trained),
        "--num-samples",
        "100",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--feature-extractor",
        "test_evaluate:StandInFeatures",
        "--reference-dir",
        str(tmp_path / "reference"),
        "--out",
        str(tmp_path / "fid.json"),
    )
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    human, line = result.stdout.strip().splitlines()[-2:]
    report = json.loads(line)
    assert report == json.loads((tmp_path / "fid.json").read_text())
    # the dataset has 32 images: 32 samples instead of 100, with a warning
    assert "has only 32 images" in result.stderr
    assert report["num_samples"] == report["num_real"] == 32
    assert {
        "sampler": "euler",
        "steps": 2,
        "seed": 0,
        "resolution": RES,
        "weights": "ema",
        "feature_extractor": "stand-in-19",
        "guidance_scale": None,
    }.items() <= report.items()
    assert report["fid"] > 0 and report["kid_std"] >= 0 and 0 < report["wall_time_s"] < wall
    assert human.startswith(f"FID {report['fid']:.2f} · KID ") and "32 samples vs 32 real images" in human
    assert (tmp_path / "reference" / "metadata.json").is_file()
    print(f"evaluate CLI on a micro checkpoint: {wall:.1f} s in all, {report['wall_time_s']:.1f} s inside")


def test_evaluate_matches_itself_and_the_library_api(trained, tmp_path, capsys):
    """The in-process command is deterministic (same seed, same numbers) and equals the library call."""
    args = [
        "evaluate",
        "--checkpoint",
        str(trained),
        "--num-samples",
        "12",
        "--steps",
        "2",
        "--batch-size",
        "5",
        "--feature-extractor",
        STAND_IN,
        "--reference-dir",
        str(tmp_path / "ref"),
        "--no-progress",
    ]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first["fid"], first["kid"]) == (second["fid"], second["kid"])

    from liquid_diffusion.sampling import load_for_sampling

    unet, vae, resolution = load_for_sampling(str(trained))
    real, _ = reference_features(
        json.loads((list_checkpoints(trained)[-1] / "train_config.json").read_text())["dataset"],
        RES,
        StandInFeatures(),
        12,
        tmp_path / "ref",
        progress=False,
    )
    fake = evaluate.generated_features(
        unet, vae, StandInFeatures(), 12, resolution=resolution, steps=2, batch_size=5, progress=False
    )
    assert fid_kid(real, fake)["fid"] == pytest.approx(first["fid"], rel=1e-6)


def test_evaluate_an_export_folder_gives_the_checkpoints_numbers(trained, tmp_path):
    export = tmp_path / "export"
    export_checkpoint(list_checkpoints(trained)[-1], export)
    options = dict(
        num_samples=10,
        steps=2,
        batch_size=5,
        feature_extractor=StandInFeatures(),
        progress=False,
        reference_dir=tmp_path / "ref",
    )
    from_checkpoint = evaluate.evaluate_checkpoint(trained, **options)
    from_export = evaluate.evaluate_checkpoint(export, **options)
    assert from_export["dataset"] == from_checkpoint["dataset"] and from_export["resolution"] == RES
    assert from_export["fid"] == pytest.approx(from_checkpoint["fid"], rel=1e-5, abs=1e-8)
    assert from_checkpoint["step"] == 2


def test_evaluate_a_latent_space_model_decodes_through_its_vae(clean_image_folder, tiny_vae_dir, tmp_path):
    out = tmp_path / "latent-run"
    Trainer(
        pixel_config(
            clean_image_folder, out, space="latent", vae=str(tiny_vae_dir), resolution=32, steps=1, batch_size=4
        )
    ).train()
    result = evaluate.evaluate_checkpoint(
        out,
        num_samples=6,
        steps=2,
        batch_size=4,
        progress=False,
        feature_extractor=StandInFeatures(),
        reference_dir=tmp_path / "ref",
    )
    assert result["resolution"] == 32 and result["num_samples"] == 6 and result["fid"] > 0
    assert json.loads((tmp_path / "ref" / "metadata.json").read_text())["key"]["resolution"] == 32


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--resolution", "32"], "the model was trained at 16px, not 32px"),
        (["--dataset", "/no/such/folder"], "no such file or folder"),
    ],
)
def test_evaluate_errors_are_one_line(trained, tmp_path, capsys, extra, message):
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(trained),
            "--feature-extractor",
            STAND_IN,
            "--reference-dir",
            str(tmp_path / "ref"),
            "--no-progress",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_evaluate_without_a_dataset_is_one_line(trained, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-000002"
    shutil.copytree(list_checkpoints(trained)[-1], checkpoint)
    config = json.loads((checkpoint / "train_config.json").read_text())
    del config["dataset"]
    (checkpoint / "train_config.json").write_text(json.dumps(config))
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--feature-extractor", STAND_IN, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no dataset to compare with" in err and "--dataset" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ in training


def test_best_pointer_moves_only_when_the_score_improves(tmp_path):
    for name in ("checkpoint-000001", "checkpoint-000002", "checkpoint-000003", "checkpoint-000004"):
        (tmp_path / name).mkdir()
    moves = [
        update_best(tmp_path, {"step": s, "kid": kid, "checkpoint": f"checkpoint-{s:06d}"})
        for s, kid in [(1, 0.5), (2, 0.7), (3, 0.3), (4, 0.3)]
    ]
    assert moves == [True, False, True, False]
    best = evaluate.read_best(tmp_path)
    assert best["checkpoint"] == "checkpoint-000003" and best["kid"] == 0.3 and best["metric"] == "kid"
    shutil.rmtree(tmp_path / "checkpoint-000003")  # a best checkpoint deleted by hand no longer holds the place
    assert update_best(tmp_path, {"step": 4, "kid": 0.9, "checkpoint": "checkpoint-000004"})
    assert not list(tmp_path.glob(".*.tmp"))


def test_eval_every_logs_kid_and_fid_and_keeps_the_best_checkpoint(clean_image_folder, tmp_path):
    seen = []

    class Recorder(TrainerCallback):
        def on_eval(self, trainer, record):
            seen.append(record)

    config = pixel_config(
        clean_image_folder,
        tmp_path,
        steps=6,
        checkpoint_every=1,
        keep_checkpoints=1,
        log_every=2,
        eval_every=2,
        eval_samples=8,
        eval_feature_extractor=STAND_IN,
    )
    Trainer(config, callbacks=[Recorder()]).train()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "kid" in r]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in evals] == [2, 4, 6]  # every 2 steps, though checkpoints come every step
    assert seen == evals
    for record in evals:
        assert {"kid", "kid_std", "fid", "eval_samples", "eval_time_s", "checkpoint", "best"} <= record.keys()
        assert record["eval_samples"] == 8 and record["fid"] > 0
    kids = [r["kid"] for r in evals]
    assert [r["best"] for r in evals] == [k < min(kids[:i], default=float("inf")) for i, k in enumerate(kids)]
    best = evaluate.read_best(tmp_path)
    assert best["kid"] == min(kids) and best["checkpoint"] == f"checkpoint-{evals[kids.index(min(kids))]['step']:06d}"
    # keep_checkpoints=1 prunes everything but the newest ... and the best
    assert {p.name for p in list_checkpoints(tmp_path)} == {"checkpoint-000006", best["checkpoint"]}
    assert (tmp_path / "fid-reference").is_dir()


def test_eval_every_without_the_inception_weights_warns_and_trains_on(
    clean_image_folder, tmp_path, monkeypatch, capsys
):
    import torchmetrics.utilities.imports as tm_imports

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    Trainer(pixel_config(clean_image_folder, tmp_path, steps=2, eval_every=1)).train()
    assert "warning: --eval-every is off for this run" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and all("kid" not in r for r in records)
    with pytest.raises(ValueError, match="--eval-every must be at least 0"):
        pixel_config(clean_image_folder, tmp_path, eval_every=-1).validate()
