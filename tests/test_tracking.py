"""Specification of experiment tracking, ``--report-to`` (issue 31): TensorBoard and W&B through accelerate's
trackers, offline."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from test_trainer import pixel_config, synthetic_folder

from liquid_diffusion.config import TrainConfig
from liquid_diffusion.metrics import METRICS_FILE
from liquid_diffusion.tracking import check_report_to, scalars
from liquid_diffusion.trainer import Trainer

NEEDS_TENSORBOARD = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason='tensorboard is not installed: pip install -e ".[test]"'
)
NEEDS_WANDB = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason='wandb is not installed: pip install -e ".[test]"'
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return synthetic_folder(tmp_path_factory.mktemp("tracking_images"), 24, seed=4)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def tensorboard_events(out):
    """The TensorBoard run of ``out`` as TensorBoard reads it (what a resumed writer purged is gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "liquid-diffusion"), size_guidance={"scalars": 0, "images": 0})
    return events.Reload()


def curve(events, tag: str) -> dict[int, float]:
    """A scalar's values by step; each step must appear once."""
    steps = [event.step for event in events.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: steps repeat: {steps}"
    return {event.step: event.value for event in events.Scalars(tag)}


def test_every_numeric_field_of_a_record_is_a_scalar_and_lists_and_dicts_are_split():
    record = {
        "step": 7,
        "loss": 0.5,
        "lr": 1e-4,
        "images_skipped": 2,
        "val_loss": 0.25,
        "val_loss_raw": 0.3,
        "loss_t_bins": [0.1, None, 0.3],
        "val_loss_t": {"0.1": 0.2},
        "best": True,
        "checkpoint": "x",
        "fid": None,
    }
    assert scalars(record) == {
        "loss": 0.5,
        "lr": 1e-4,
        "images_skipped": 2.0,
        "val_loss": 0.25,
        "val_loss_raw": 0.3,
        "loss_t_bins/0": 0.1,
        "loss_t_bins/2": 0.3,
        "val_loss_t/0.1": 0.2,
    }


def test_an_unknown_tracker_is_refused_in_one_line(images, tmp_path):
    with pytest.raises(ValueError, match="--report-to must be one of none, tensorboard, wandb, all, got 'comet'"):
        pixel_config(images, tmp_path, report_to="comet").validate()
    assert TrainConfig().report_to == "none"


@pytest.mark.parametrize("report_to, missing", [("tensorboard", "tensorboard"), ("all", "wandb")])
def test_a_missing_tracker_package_names_the_extra_to_install_before_anything_loads(
    images, tmp_path, monkeypatch, report_to, missing
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    with pytest.raises(ValueError, match=rf'needs the {missing} package: pip install "liquid-diffusion\[tracking\]"'):
        Trainer(pixel_config(images, tmp_path / "out", report_to=report_to))
    assert not (tmp_path / "out").exists()


@NEEDS_WANDB
def test_wandb_without_a_login_says_how_to_log_in_or_log_offline(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no such file: never logged in
    with pytest.raises(ValueError, match="run `wandb login`.*or log offline with WANDB_MODE=offline"):
        check_report_to("wandb")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    check_report_to("wandb")  # what `wandb login` writes
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_report_to("wandb")


@NEEDS_TENSORBOARD
def test_tensorboard_gets_every_record_the_sample_grids_and_the_settings(images, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = pixel_config(images, tmp_path, steps=4, sample_every=2, report_to="tensorboard")
    Trainer(config).train()
    events, logged = tensorboard_events(tmp_path), records(tmp_path)
    validation = [r for r in logged if "val_loss" in r]
    logged = [r for r in logged if "loss" in r]
    assert curve(events, "loss") == pytest.approx({r["step"]: r["loss"] for r in logged}, rel=1e-6)
    assert curve(events, "val_loss") == pytest.approx({4: validation[-1]["val_loss"]}, rel=1e-6)  # at the end
    assert "val_loss_t/0.05" in events.Tags()["scalars"]
    for key in ("lr", "images_per_s", "grad_norm"):
        assert sorted(curve(events, key)) == [1, 2, 3, 4]
    bins = logged[-1]["loss_t_bins"]
    assert {f"loss_t_bins/{i}" for i, value in enumerate(bins) if value is not None} <= set(events.Tags()["scalars"])
    grids = events.Images("samples")
    assert [image.step for image in grids] == [2, 4] and grids[0].width > 0
    # the settings as hyper-parameters: accelerate writes them as a TensorBoard run of their own beside the curves
    (hparams_file,) = (tmp_path / "logs" / "liquid-diffusion").glob("*/events.out.tfevents.*")
    start = [
        plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
        for event in EventFileLoader(str(hparams_file)).Load()
        for value in event.summary.value
        if value.tag == "_hparams_/session_start_info"
    ]
    assert start[0].hparams["preset"].string_value == "micro" and start[0].hparams["steps"].number_value == 4


@NEEDS_TENSORBOARD
def test_a_resumed_run_continues_the_same_tensorboard_curves_without_repeating_any_step(images, tmp_path):
    config = pixel_config(images, tmp_path, steps=4, checkpoint_every=2, report_to="tensorboard")
    Trainer(config).train()
    # as if killed after logging steps 3 and 4 but before checkpoint-000004 was written
    shutil.rmtree(tmp_path / "checkpoint-000004")
    first_run = curve(tensorboard_events(tmp_path), "loss")
    config.steps, config.resume = 6, "latest"
    Trainer(config).train()
    loss = curve(tensorboard_events(tmp_path), "loss")
    logged = {r["step"]: r["loss"] for r in records(tmp_path) if "loss" in r}
    assert sorted(loss) == [1, 2, 3, 4, 5, 6] and loss == pytest.approx(logged, rel=1e-6)
    assert loss[1] == first_run[1] and loss[2] == first_run[2]  # the steps before the resume point are kept


@NEEDS_WANDB
def test_wandb_offline_writes_its_run_folder_and_a_resume_continues_the_same_run(images, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = pixel_config(images, tmp_path, steps=2, checkpoint_every=2, report_to="wandb")
    Trainer(config).train()
    run_id = (tmp_path / "logs" / "wandb-run-id").read_text().strip()
    (run,) = (tmp_path / "logs" / "wandb").glob(f"offline-run-*-{run_id}")
    assert (run / f"run-{run_id}.wandb").stat().st_size > 0  # the records, for `wandb sync`
    assert list((run / "files" / "media" / "images").glob("samples_2_*.png"))  # the final grid, at step 2
    config.steps, config.resume = 3, "latest"
    Trainer(config).train()
    runs = sorted((tmp_path / "logs" / "wandb").glob(f"offline-run-*-{run_id}"))  # the same run id, resumed
    assert len(runs) == 2 and list((runs[-1] / "files" / "media" / "images").glob("samples_3_*.png"))
