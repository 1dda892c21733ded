"""Specification of the training recipe's levers (learning-rate schedules, AdamW betas, EMA warm-up, t sampling) and
of ``--batch-size auto`` (issue: the default recipe chosen by measurement)."""

from __future__ import annotations

import re
import types

import pytest
import torch
from test_trainer import pixel_config, train_folder  # noqa: F401 -- a fixture

from liquid_diffusion.__main__ import build_parser
from liquid_diffusion.config import TrainConfig, config_from_args, resolve_batch_size
from liquid_diffusion.trainer import Trainer, lr_factor


def test_learning_rate_schedules():
    assert [lr_factor(s, "constant", 4, 100) for s in (0, 3, 50, 99)] == [0.25, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, "cosine", 4, 104) for s in range(104)]
    assert cosine[3] == 1.0 and cosine[54] == pytest.approx(0.5) and cosine[-1] < 1e-3
    assert all(a >= b for a, b in zip(cosine[3:], cosine[4:]))
    assert lr_factor(54, "linear", 4, 104) == pytest.approx(0.5)
    assert lr_factor(15, "rsqrt", 4, 10) == pytest.approx(0.5)  # sqrt(4 / 16), past --steps too
    assert lr_factor(0, "constant", 0, 1) == 1.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr_schedule", "step", "--lr-schedule must be one of constant, cosine, linear, rsqrt"),
        ("adam_beta2", 1.0, "--adam-beta2 must lie in [0, 1)"),
        ("ema_power", 0.0, "--ema-power must be greater than 0"),
        ("logit_std", -1.0, "--logit-std must be greater than 0"),
        ("validation_images", -1, "--validation-images must be at least 0"),
        ("logit_mean", float("nan"), "--logit-mean must be a finite number"),
    ],
)
def test_bad_recipe_values_are_refused_in_one_line(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{field: value}).validate()


def test_the_recipe_reaches_the_optimizer_ema_and_t_sampling(train_folder, tmp_path):  # noqa: F811 -- a fixture
    trainer = Trainer(
        pixel_config(
            train_folder,
            tmp_path / "run",
            adam_beta1=0.8,
            adam_beta2=0.95,
            ema_power=0.75,
            lr_schedule="cosine",
            steps=10,
            warmup_steps=2,
        )
    )
    assert trainer.optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert trainer.ema.power == 0.75
    assert trainer.lr_scheduler.lr_lambdas[0](6) == pytest.approx(0.5)
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)


def test_batch_size_auto_on_the_cpu_is_small_and_keeps_the_rate(capsys):
    config = TrainConfig(batch_size="auto", lr=2e-4)
    resolve_batch_size(config, torch.device("cpu"))
    assert (config.batch_size, config.lr) == (8, 2e-4)
    assert "batch size auto: 8 (a small batch on the CPU)" in capsys.readouterr().out


@pytest.mark.parametrize("gib, batch", [(15, 8), (40, 16), (80, 32)])
def test_batch_size_auto_on_a_gpu_fits_the_card_and_scales_the_rate_by_the_square_root(monkeypatch, capsys, gib, batch):
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=gib * 2**30)
    )
    monkeypatch.setattr("liquid_diffusion.latents.vae_dtype", lambda device: torch.float32)
    config = TrainConfig(batch_size="auto", lr=1e-4, preset="tiny", space="latent", resolution=256, cache_latents=True)
    resolve_batch_size(config, torch.device("cuda"))
    assert config.batch_size == batch
    assert config.lr == pytest.approx(1e-4 * (batch / 8) ** 0.5)
    assert f"batch size auto: {batch} (the largest that fits 75 % of this {gib} GiB GPU" in capsys.readouterr().out


def test_batch_size_auto_resumes_with_the_saved_batch_and_rate(train_folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    Trainer(pixel_config(train_folder, out, batch_size=4, lr=3e-3, steps=2)).train()
    config = pixel_config(train_folder, out, batch_size="auto", steps=3, resume="latest")
    trainer = Trainer(config)
    assert (config.batch_size, config.lr) == (4, 3e-3)
    trainer.train()


def test_the_batch_size_flag_takes_a_number_or_auto(capsys):
    parse = build_parser().parse_args
    assert config_from_args(parse(["train"])).batch_size == "auto"  # the default
    assert config_from_args(parse(["train", "--batch-size", "16"])).batch_size == 16
    with pytest.raises(SystemExit):
        parse(["train", "--batch-size", "many"])
    assert "expected a whole number or 'auto', got 'many'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        config_from_args(parse(["train", "--batch-size", "0"]))


def test_resume_applies_new_betas_ema_power_and_schedule_and_says_so(train_folder, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    Trainer(pixel_config(train_folder, out, steps=2)).train()
    capsys.readouterr()
    trainer = Trainer(
        pixel_config(train_folder, out, steps=3, resume="latest", adam_beta2=0.95, ema_power=0.75, lr_schedule="cosine")
    )
    trainer.train()
    assert (
        "--adam-beta1/2 0.9/0.999 -> 0.9/0.95, --ema-power 0.666667 -> 0.75, --lr-schedule constant -> cosine"
        in capsys.readouterr().out
    )
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.95) and trainer.ema.power == 0.75
