"""Smoke tests of the benchmark scripts: each ``--quick`` mode runs end to end on the CPU and writes its table.

No timing is asserted (timings on shared CI machines mean nothing); only that the scripts run, print the expected
table header and rows, and write their outputs. The scripts are run in-process through their ``main(argv)``.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common, sampling, throughput


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    """CPU only, and give back torch's thread count (the scripts' ``--threads 1`` sets it process-wide)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_common_models_share_one_velocity_interface():
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.05, 0.9])
    for name in ("liquid-micro", "liquid-micro-ablation", "unet2d"):
        model = common.build_model(name, 4, 16)
        assert model(x, t).shape == x.shape
    dit = common.build_model("dit-s2", 4, 16, hidden=64, depth=1, heads=1)
    assert dit(x, t).shape == x.shape
    assert 20.0 < common.count_params(common.build_model("unet2d", 4, 32)) < 23.0  # matched to liquid-tiny (~21.8M)


@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
def test_train_step_flops_count_a_convolution_three_times_its_forward_groups_included(groups):
    """Forward, input gradient and weight gradient each take the forward's multiply-adds. torch's own formula counts
    a depthwise convolution's weight gradient as dense (8x too many here), which made the liquid nets' GFLOP/img of
    earlier tables too high. (The input's own gradient is not needed, so the second conv alone has all three.)"""

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)
            self.second = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)

        def forward(self, x, t):
            return self.second(self.first(x))

    forward = 2 * 8 * (8 // groups) * 3 * 3 * 16 * 16  # one conv, one image, 16x16 output
    batch = 2
    assert common.train_step_flops(Conv(), torch.randn(batch, 8, 16, 16)) == batch * (2 + 3) * forward


def test_throughput_quick(tmp_path, capsys):
    out = tmp_path / "throughput.md"
    assert throughput.main(["--quick", "--threads", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert "| model | latent | variant | params (M) | GFLOP/img | images/s |" in text
    for name in ("liquid-micro", "liquid-tiny", "dit-s2", "unet2d"):
        assert f"| {name} | 4x16x16 | fp32 |" in text
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert all(r["images_per_s"] > 0 and r["x_dit-s2"] > 0 for r in rows)
    assert "images/s" in capsys.readouterr().out


def test_checkpointing_quick_measures_less_activation_memory_with_checkpointing(tmp_path, capsys):
    from benchmarks import checkpointing

    out = tmp_path / "checkpointing.json"
    assert checkpointing.main(["--quick", "--out", str(out)]) == 0
    assert "| micro | 64 px (8x8) |" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    plain, checkpointed = result["plain"], result["checkpointed"]
    assert plain["recomputed_mib"] == 0 and 0 < checkpointed["peak_mib"] < plain["peak_mib"]
    assert plain["step_s"] > 0 and checkpointed["step_s"] > 0
    assert checkpointed["gflop"] > plain["gflop"] > 0  # the blocks run forward twice


def test_sampling_quick(tmp_path):
    out = tmp_path / "sampling.md"
    assert sampling.main(["--quick", "--threads", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert "| model | latent | variant | params (M) | model only (s) |" in text
    rows = json.loads((tmp_path / "sampling.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"liquid-micro", "dit-s2", "unet2d"}
    assert all(r["seconds_with_vae"] > r["seconds"] > 0 for r in rows)


def test_synthetic_data_is_deterministic_and_in_range():
    a, b = common.make_shapes(4, seed=3), common.make_shapes(4, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, common.make_shapes(4, seed=4))


def test_op_count_counts_the_ops_that_launch_kernels_by_kind_and_not_views():
    from benchmarks import op_count

    class OneConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x, t):
            return self.conv(x.permute(0, 1, 3, 2).transpose(2, 3))  # two views: no kernel

    counts = op_count.count_step(OneConv(), torch.randn(2, 4, 8, 8))
    assert counts["forward"] == {"matmul/conv": 1, "other": 3}  # the conv, then the loss's sub, pow and mean
    assert counts["backward"]["matmul/conv"] == 1  # convolution_backward (the weight's gradient)
    assert counts["total"] == sum(counts["forward"].values()) + sum(counts["backward"].values())
    # a liquid net's step is counted whole: a norm per AdaLN, in both directions
    micro = op_count.count_step(common.build_model("liquid-micro", 4, 8), torch.randn(2, 4, 8, 8))
    assert micro["forward"]["norm"] == micro["backward"]["norm"] > 0


def test_op_count_quick_prints_a_table_and_refuses_an_unknown_model(capsys):
    from benchmarks import op_count

    assert op_count.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| liquid-micro |" in out and "| dit-s2 |" in out
    assert op_count.main(["--models", "liquid-tiny@nope"]) == 2
    assert capsys.readouterr().out.startswith("error: unknown model")


def test_the_recipe_study_trains_through_the_product_trainer_and_tables_seeds(tmp_path, monkeypatch):
    from test_trainer import synthetic_folder

    from benchmarks import recipe

    (tmp_path / "images").mkdir()
    folder = synthetic_folder(tmp_path / "images", 40, seed=0)
    monkeypatch.setattr(recipe, "prepare", lambda name, cache_dir: folder)
    monkeypatch.setattr(recipe, "RESOLUTION", 16)
    out = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    runs = [
        recipe.run(
            "today", {"lr": 1e-3}, "liquid-micro", 2, seed, "twemoji", "", out, validation_images=4, evaluations=2
        )
        for seed in (0, 1)
    ]
    peer = recipe.run("today", {}, "unet2d-micro", 2, 0, "twemoji", "", out, validation_images=4, evaluations=2)
    ablation = recipe.run("today", {}, "liquid-micro-ablation", 2, 0, "twemoji", "", out, validation_images=4)
    assert [step for step, _, _ in runs[0]["curve"]] == [1, 2]  # the trainer's own validation, every steps / 2
    assert runs[0]["config"]["lr"] == 1e-3 and runs[0]["images"] == 16 and runs[0]["val_images"] == 4
    assert peer["params_m"] != runs[0]["params_m"] and ablation["params_m"] < runs[0]["params_m"]
    assert "--set lr=0.001" in runs[0]["command"]
    table = recipe.table(recipe.collect(out))
    row = next(line for line in table.splitlines() if "today lr=0.001" in line)
    mean = (runs[0]["val_loss"] + runs[1]["val_loss"]) / 2
    assert "| 2 |" in row and f"{mean:.4f}" in row  # two seeds, one row, their mean

    # an equal wall-clock budget: the run ends, validated, at the first step past its minutes (steps only cap it)
    timed = recipe.run("today", {}, "unet2d-micro", 50, 0, "twemoji", "", out, validation_images=4, minutes=1e-4)
    assert timed["steps"] == 1 and timed["images"] == 8 and timed["curve"][-1][0] == 1
    assert "_m0.0001_" in timed["name"] and "--minutes 0.0001" in timed["command"]
    assert "| 0.0001 min | 8 | 1 |" in recipe.table(recipe.collect(out))


def test_a_recipe_run_cut_short_by_sigterm_resumes_from_its_checkpoint_to_the_same_curve(tmp_path, monkeypatch):
    import os
    import signal

    from test_trainer import synthetic_folder

    from benchmarks import recipe
    from liquid_diffusion.stopping import TrainingInterrupted

    (tmp_path / "images").mkdir()
    folder = synthetic_folder(tmp_path / "images", 40, seed=0)
    monkeypatch.setattr(recipe, "prepare", lambda name, cache_dir: folder)
    monkeypatch.setattr(recipe, "RESOLUTION", 16)
    args = ("today", {}, "liquid-micro", 4, 0, "twemoji", "")
    whole = recipe.run(*args, str(tmp_path / "whole"), validation_images=4, evaluations=2)
    assert not whole["resumed"]

    train_step = recipe.Trainer._train_step

    def preempted_after_step_3(self, batches, stats):
        train_step(self, batches, stats)
        if self.step == 2:  # counted from 0: the third step
            os.kill(os.getpid(), signal.SIGTERM)  # what a study's session end sends

    monkeypatch.setattr(recipe.Trainer, "_train_step", preempted_after_step_3)
    with pytest.raises(TrainingInterrupted):
        recipe.run(*args, str(tmp_path / "cut"), validation_images=4, evaluations=2)
    monkeypatch.setattr(recipe.Trainer, "_train_step", train_step)
    resumed = recipe.run(*args, str(tmp_path / "cut"), validation_images=4, evaluations=2)
    assert resumed["resumed"] and resumed["steps"] == 4
    assert resumed["curve"] == whole["curve"] and resumed["val_loss_t"] == whole["val_loss_t"]


def test_the_recipe_studys_equal_wall_clock_reads_its_curves_at_co_timed_speeds(monkeypatch):
    from benchmarks import recipe

    monkeypatch.setattr(recipe, "RESOLUTION", 16)
    rates = recipe.speed(["liquid-micro", "unet2d-micro"], batch=2, rounds=1, steps=1)
    assert set(rates) == {"liquid-micro", "unet2d-micro"} and all(r > 0 for r in rates.values())
    result = {"curve": [(250, 0.4, 0.5), (500, 0.3, 0.35), (1000, 0.2, 0.25)]}
    assert recipe.val_at_step(result, 100) is None  # before the first evaluation: unknown
    assert recipe.val_at_step(result, 750) == pytest.approx(0.25) and recipe.val_at_step(result, 250) == 0.4
    assert recipe.val_at_step(result, 5000) == 0.2
