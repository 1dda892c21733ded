"""Smoke tests of the benchmark scripts: each ``--quick`` mode runs end to end on the CPU and writes its table.

No timing is asserted (timings on shared CI machines mean nothing); only that the scripts run, print the expected
table header and rows, and write their outputs. The scripts are run in-process through their ``main(argv)``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import common, quality, quality_study, sampling, throughput
from benchmarks.legacy_v6 import V6UNet
from liquid_diffusion import PRESETS, LiquidDiffusionUNet
from liquid_diffusion.upgrade import upgrade_state_dict


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


def test_quality_quick(tmp_path):
    assert quality.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "quality.md").read_text()
    assert "held-out loss (mean over t)" in text and "t=0.05" in text
    for kind in ("liquid", "dit", "unet2d", "liquid-ablation"):
        assert f"| {kind} |" in text
        assert (tmp_path / f"samples_{kind}.png").stat().st_size > 0
    assert (tmp_path / "data.png").exists() and (tmp_path / "samples_side_by_side.png").stat().st_size > 0
    results = json.loads((tmp_path / "quality.json").read_text())["results"]
    assert all(0 < r["mean"] < 10 for r in results.values())
    # --quick scores after step 3 and after the last step (5) of the same run: one table row each
    assert all(sorted(r["at"]) == ["3", "5"] and r["at"]["5"]["mean"] == r["mean"] for r in results.values())
    assert "| liquid | 3 |" in text and "| liquid | 5 |" in text


def test_an_equal_time_schedule_warms_up_over_its_first_twentieth_and_decays_to_zero_at_the_budget():
    f = quality.lr_factor_by_time
    assert f(0.0) == 0.05 and f(0.025) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.025)))
    assert f(0.05) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.05)))  # the peak, then only the cosine
    decay = [f(d / 100) for d in range(5, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:])) and f(1.0) == 0.0 and f(2.0) == 0.0


def test_a_seconds_budget_trains_every_step_that_fits_and_scores_once_at_the_end():
    """With a clock on which every step takes 0.5 s, a 2 s budget makes exactly 4 steps, whatever --steps says."""
    ticks = iter(range(10_000))
    clock = lambda: next(ticks) * 0.5  # one call starts a step, the next ends it: 0.5 s per step
    args = quality.parse_args(["--quick", "--seconds", "2", "--steps", "100"])
    torch.manual_seed(0)
    model = quality.build("liquid", args)
    data = quality.make_shapes(8, seed=0)
    scored = []
    stats = quality.train(model, data, args, torch.device("cpu"), on_eval=lambda step, s: scored.append((step, s)),
                          clock=clock)
    assert stats["steps"] == 4 and stats["train_seconds"] == 2.0 and scored == [(4, 2.0)]
    slow = iter(range(10_000))
    stats = quality.train(model, data, args, torch.device("cpu"), clock=lambda: next(slow) * 5.0)
    assert stats["steps"] == 1  # a step longer than the budget still runs once: there is always a score


def test_a_seconds_run_is_refused_with_eval_at_or_a_budget_that_is_not_positive(capsys):
    for argv in (["--seconds", "10", "--eval-at", "5"], ["--seconds", "0"], ["--seconds", "nan"]):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
    assert "drop --eval-at" in capsys.readouterr().err


def test_an_equal_wall_clock_study_runs_each_model_alone_and_averages_seeds_that_ended_at_different_steps(tmp_path):
    args = quality_study.parse_args([*STUDY, "--seconds", "240", "--seeds", "0", "1", "--threads", "2",
                                     "--out-dir", str(tmp_path)])
    jobs = quality_study.plan_jobs(args)
    assert [j["name"] for j in jobs] == ["t240s_s0_liquid", "t240s_s0_dit", "t240s_s1_liquid", "t240s_s1_dit"]
    assert all(j["argv"][j["argv"].index("--seconds") + 1] == "240" and "--steps" not in j["argv"]
               and j["argv"][j["argv"].index("--threads") + 1] == "2" for j in jobs)
    for job, steps, mean in zip(jobs, (150, 60, 148, 61), (0.30, 0.40, 0.32, 0.44)):  # as a real run writes them
        at = {"mean": mean, "per_t": {"0.05": 2 * mean, "0.5": mean}, "train_seconds": 239.0}
        run = {"args": {"steps": 500, "seconds": 240.0, "seed": job["seed"]}, "machine": "cpu",
               "results": {job["models"][0]: {"params_m": 1.0, "gflop_per_img": 1.0, "steps": steps,
                                              "at": {str(steps): at}}}}
        (tmp_path / job["name"]).mkdir()
        (tmp_path / job["name"] / "quality.json").write_text(json.dumps(run))
    text = quality_study.summarize(str(tmp_path))
    assert "| 240 s | end (148-150) | liquid | 1 | 1 | 0,1 | **0.3100** (0.3000-0.3200) |" in text
    assert "| 240 s | end (60-61) | dit |" in text
    assert f"- 240 s of training each: liquid / dit: mean {0.31 / 0.42:.3f}" in text


STUDY = ["--preset", "micro", "--data", "shapes", "--models", "liquid", "dit", "--eval-size", "8", "--num-samples", "2",
         "--device", "cpu"]


def test_quality_study_runs_every_seed_in_its_own_process_and_averages_them(tmp_path):
    out = tmp_path / "study"
    argv = [*STUDY, "--budgets", "4", "--seeds", "0", "1", "--jobs", "2", "--out-dir", str(out),
            "--", "--train-size", "32", "--eval-batch", "8"]
    assert quality_study.main(argv) == 0
    runs = {s: json.loads((out / f"b4_s{s}" / "quality.json").read_text())["results"] for s in (0, 1)}
    assert runs[0]["liquid"]["mean"] != runs[1]["liquid"]["mean"]  # the seeds differ: different data order and noise
    records = json.loads((out / "summary.json").read_text())["records"]
    assert sorted((r["model"], r["seed"], r["step"]) for r in records) == sorted(
        (m, s, step) for m in ("liquid", "dit") for s in (0, 1) for step in (2, 4))  # scored half-way and at the end
    text = (out / "summary.md").read_text()
    for model in ("liquid", "dit"):
        mean = (runs[0][model]["mean"] + runs[1][model]["mean"]) / 2
        assert f"| 4 | 4 | {model} |" in text and f"**{mean:.4f}**" in text
    ratio = ((runs[0]["liquid"]["mean"] + runs[1]["liquid"]["mean"]) / (runs[0]["dit"]["mean"] + runs[1]["dit"]["mean"]))
    assert f"4 steps, scored at 4: liquid / dit: mean {ratio:.3f}" in text


def test_quality_study_stops_its_runs_at_the_deadline_and_says_so(tmp_path):
    out = tmp_path / "late"
    argv = [*STUDY, "--budgets", "100000", "2", "--seeds", "0", "--jobs", "1", "--deadline-s", "2",
            "--out-dir", str(out)]
    assert quality_study.main(argv) == 1
    status = json.loads((out / "summary.json").read_text())["status"]
    assert status == {"b100000_s0_liquid": "stopped at the deadline", "b100000_s0_dit": "not started (deadline)",
                      "b2_s0": "not started (deadline)"}
    assert "b100000_s0_liquid stopped at the deadline" in (out / "summary.md").read_text()


def test_a_run_stopped_part_way_is_left_out_of_merges_and_counted_once_in_summaries(tmp_path, capsys):
    done = tmp_path / "b5_s0"
    assert quality.main(["--quick", "--threads", "1", "--models", "liquid", "--out-dir", str(done)]) == 0
    run = json.loads((done / "quality.json").read_text())
    stopped = tmp_path / "b5_s0_dit"  # as a deadline leaves it: scored half-way (step 3), not at the end (step 5)
    stopped.mkdir()
    partial = {**run["results"]["liquid"], "at": {"3": run["results"]["liquid"]["at"]["3"]}}
    partial.pop("per_t")
    (stopped / "quality.json").write_text(json.dumps({**run, "results": {"dit": partial}}))
    assert quality.main(["--merge", str(done), str(stopped), "--out-dir", str(tmp_path / "merged")]) == 0
    assert "dit did not finish its 5 steps; left out" in capsys.readouterr().out
    text = (tmp_path / "merged" / "quality.md").read_text()
    assert "| liquid | 5 |" in text and "| dit |" not in text

    (tmp_path / "again").mkdir()  # the same run twice (a grouped run re-run per model) is one record per step
    (tmp_path / "again" / "quality.json").write_text((done / "quality.json").read_text())
    records = quality_study.collect(str(tmp_path))
    assert sorted((r["model"], r["step"]) for r in records) == [("dit", 3), ("liquid", 3), ("liquid", 5)]


def test_synthetic_data_is_deterministic_and_in_range():
    a, b = quality.make_shapes(4, seed=3), quality.make_shapes(4, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1 and not torch.equal(a, quality.make_shapes(4, seed=4))


def test_quality_merge_of_single_model_runs(tmp_path):
    for kind in ("liquid", "liquid-ablation"):
        assert quality.main(["--quick", "--threads", "1", "--models", kind, "--out-dir", str(tmp_path / kind)]) == 0
    merged = tmp_path / "merged"
    assert quality.main(["--merge", str(tmp_path / "liquid"), str(tmp_path / "liquid-ablation"),
                         "--out-dir", str(merged)]) == 0
    text = (merged / "quality.md").read_text()
    assert "| liquid |" in text and "| liquid-ablation |" in text and "liquid / liquid-ablation" in text
    assert "budget: 5 steps x batch 4" in text  # the runs' budget, not the merging call's defaults


def test_emoji_data_is_composited_on_white_and_split_by_file_name(tmp_path):
    """A stand-in for the npm tarball in the cache dir: nothing is downloaded when it is there."""
    import io
    import tarfile

    from PIL import Image

    name = quality.EMOJI_PACKAGE.replace("@", "-")
    with tarfile.open(tmp_path / f"{name}.tgz", "w:gz") as tar:
        for k in range(40):
            image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent: must come out white
            image.paste((200, 0, 0, 255), (0, 0, 32, 64))  # opaque red left half
            data = io.BytesIO()
            image.save(data, format="PNG")
            info = tarfile.TarInfo(f"package/img/twitter/64/{k:04x}.png")
            info.size = data.tell()
            data.seek(0)
            tar.addfile(info, data)
    train, held = quality.load_emoji(str(tmp_path))
    assert train.shape[1:] == (3, 32, 32) and train.shape[0] + held.shape[0] == 40 and 0 < held.shape[0] < 15
    assert torch.equal(train[0, :, :, 20:], torch.ones(3, 32, 12))  # white where transparent
    assert torch.allclose(train[0, :, :, :16], torch.tensor([200 / 127.5 - 1, -1.0, -1.0])[:, None, None].expand(3, 32, 16))
    again_train, again_held = quality.load_emoji(str(tmp_path))  # from the decoded cache, the same split
    assert torch.equal(again_train, train) and torch.equal(again_held, held)


def test_screened_block_variants_build_through_the_common_interface():
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.05, 0.9])
    for name in ("liquid-micro@seed", "liquid-micro@conv-k5-h2", "liquid-micro@v2-gated", "liquid-micro@v2-inskip",
                 "liquid-micro@v3-cfchead", "liquid-micro@v3-hires", "liquid-micro@v3-strip", "liquid-micro@dico",
                 "liquid-micro@v4-wide", "liquid-micro@v4-skipcfc", "liquid-micro@v4-ff4", "liquid-micro@v4-xavier",
                 "liquid-micro@v4-dec2x-d2-e2", "liquid-micro@v5-cfcff", "liquid-micro@v5-ff4",
                 "liquid-micro@v5-skipcfc", "liquid-micro@v5-pos", "liquid-micro@v5-pos-cfcff", "liquid-micro@v5-scan"):
        assert common.build_model(name, 4, 16)(x, t).shape == x.shape
    # "v4" is architecture version 4: the package's skeleton with a decoder as wide as its encoder
    assert common.build_model("liquid-micro@v4", 4, 16).net.decoder_widths == (32, 64, 128)
    assert common.build_model("liquid-micro", 4, 16).net.decoder_widths == (64, 64, 128)
    # "package" is the package's model; "seed" rebuilds the format-1 stem and head around the same blocks
    package, seed = common.build_model("liquid-micro@package", 4, 16), common.build_model("liquid-micro@seed", 4, 16)
    assert common.count_params(package) == common.count_params(common.build_model("liquid-micro", 4, 16))
    assert isinstance(seed.net.stem, torch.nn.Sequential) and isinstance(package.net.stem, torch.nn.Conv2d)
    # "v3" is architecture version 3 (its blocks live in benchmarks/legacy_blocks.py), the package's are version 4's
    v3 = common.build_model("liquid-micro@v3", 4, 16)
    assert {type(b).__module__ for b in v3.net.encoder[0]} == {"benchmarks.legacy_blocks"}
    assert {type(b).__module__ for b in package.net.encoder[0]} == {"liquid_diffusion.blocks"}
    with pytest.raises(ValueError, match="unknown variant 'nope'; valid: package, "):
        common.build_model("liquid-micro@nope", 4, 16)


def test_sixth_round_variants_keep_their_ablation_and_their_parts_do_what_they_say():
    from benchmarks import variants

    def weights(name):
        torch.manual_seed(0)
        return common.build_model(f"liquid-micro@{name}", 4, 16).net.state_dict()

    # the liquid GLU's ablation is version 5's ablation, weight for weight
    ablation, package_ablation = weights("v5-cfcff-ablation"), weights("v5-ablation")
    assert ablation.keys() == package_ablation.keys()
    assert all(torch.equal(ablation[k], package_ablation[k]) for k in ablation)
    # v5-pos, the variant of the 3(j) and 3(k) runs, is version 6 weight for weight, and v5 is version 6 without its
    # position embedder; version 6's weights load into the package (version 7), which computes the same velocity:
    # their numbers are the package's
    for variant, renamed in (("v5-pos", {"stem.stem.": "stem.", "stem.position.": "position_embedder."}),
                             ("v5-pos-ablation", {"stem.stem.": "stem.", "stem.position.": "position_embedder."}),
                             ("v5", {}), ("v6", {})):
        built = weights(variant)
        for old, new in renamed.items():
            built = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in built.items()}
        torch.manual_seed(0)
        extra = dict(position_frequencies=0) if variant == "v5" else {}
        version_6 = V6UNet(**{**PRESETS["micro"], "in_channels": 4, "liquid": "ablation" not in variant, **extra})
        assert built.keys() == version_6.state_dict().keys(), variant
        assert all(torch.equal(built[k], version_6.state_dict()[k]) for k in built), variant
        package = LiquidDiffusionUNet.from_preset("micro", in_channels=4, liquid="ablation" not in variant, **extra)
        with torch.no_grad():
            version_6.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in built.items()})
            package.load_state_dict(version_6.state_dict())
            x, t = torch.randn(2, 4, 16, 16), torch.rand(2)
            torch.testing.assert_close(package(x, t).sample, version_6(x, t).sample, rtol=1e-5, atol=1e-6)
    # v7-from-v6: the package (version 7) starting from version 6's initial weights for the seed, stacked
    version_6, version_7 = weights("v6"), weights("v7-from-v6")
    package = LiquidDiffusionUNet.from_preset("micro", in_channels=4)
    upgrade_state_dict(version_6, package.block_names(), package.modulation.kinds)
    assert version_6.keys() == version_7.keys() and all(torch.equal(version_6[k], version_7[k]) for k in version_7)
    # the parallel scan is the recursion h_i = a_i h_(i-1) + (1 - a_i) v_i, run both ways
    log_a = -torch.nn.functional.softplus(torch.randn(1, 2, 3, 12) * 2).clamp(min=-80 / 12)
    v = torch.randn(1, 2, 3, 12)
    forward, backward, h = torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v[..., 0])
    for i in range(12):
        h = log_a[..., i].exp() * h + (1 - log_a[..., i].exp()) * v[..., i]
        forward[..., i] = h
    h = torch.zeros_like(v[..., 0])
    for i in reversed(range(12)):
        h = log_a[..., i].exp() * h + (1 - log_a[..., i].exp()) * v[..., i]
        backward[..., i] = h
    torch.testing.assert_close(variants.EdgeAwareScan.scan(log_a, v, 3), forward + backward, rtol=1e-4, atol=1e-5)
    # position features: normalised coordinates, the same image-relative grid at any resolution; zero at init
    stem = variants.PositionStem(torch.nn.Conv2d(4, 8, 3, padding=1))
    small, large = stem.features(4, 4, torch.zeros(1)), stem.features(8, 8, torch.zeros(1))
    assert small.shape == (1, 18, 4, 4) and small[0, :2].abs().max() < 1 and small[0, 0, :, 0].mean().abs() < 1e-6
    torch.testing.assert_close(small[0, :2, 0, 0], torch.tensor([-0.75, -0.75]))
    torch.testing.assert_close(large[0, :2, 0, 0], torch.tensor([-0.875, -0.875]))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(stem(x), stem.stem(x))


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
