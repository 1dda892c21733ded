"""``liquid_diffusion.notebook``, the guided notebook's logic, tested without a kernel; and the messages' wording for
the notebook (``errors.set_audience``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("IPython")

from liquid_diffusion import errors
from liquid_diffusion import notebook as ld
from liquid_diffusion.config import TrainConfig


@pytest.fixture
def notebook_wording():
    """Messages worded for the notebook during the test, for the command line again after it."""
    errors.set_audience("notebook")
    yield
    errors.set_audience("cli")


@pytest.fixture
def no_overrides(monkeypatch):
    for variable, _ in ld.ENV_OVERRIDES.values():
        monkeypatch.delenv(variable, raising=False)
    for variable in ("LD_OUTPUT_DIR", "LD_MOUNT_DRIVE", "LD_EVAL_SAMPLES"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("LD_SKIP_INSTALL", "1")


class Handle:
    """Stands in for an IPython display handle: keeps what was shown last."""

    def __init__(self, shown):
        self.shown = [shown]

    def update(self, shown):
        self.shown.append(shown)


@pytest.fixture
def displays(monkeypatch):
    """What ``notebook`` displays, instead of a kernel's output: a ``Handle`` for each display updated in place."""
    shown = []

    def display(obj, display_id=False):
        shown.append(Handle(obj) if display_id else obj)
        return shown[-1] if display_id else None

    monkeypatch.setattr(ld, "display", display)
    return shown


# ---------------------------------------------------------------------------------------------------- choices


def test_env_casts_and_treats_blank_as_unset(monkeypatch):
    monkeypatch.setenv("LD_X", " 12 ")
    assert ld.env("LD_X", 3, int) == 12
    monkeypatch.setenv("LD_X", " ")
    assert ld.env("LD_X", 3, int) == 3 and ld.env("LD_X", "a") == ""  # a blank string is a value (no repo id)
    for text, value in (("1", True), ("yes", True), ("0", False), ("off", False)):
        monkeypatch.setenv("LD_X", text)
        assert ld.env("LD_X", not value, bool) is value
    monkeypatch.delenv("LD_X")
    assert ld.env("LD_X", 0.5, float) == 0.5


def test_choices_default_to_the_trainers_recipe():
    assert ld.Choices().learning_rate == TrainConfig.__dataclass_fields__["lr"].default


def test_resolve_choices_cpu_sizing_custom_dataset_and_env(no_overrides, monkeypatch):
    resolved = ld.resolve_choices(ld.Choices(dataset="custom", custom_dataset=" /data/cats ", steps=50000), "cpu")
    assert (
        resolved.dataset,
        resolved.preset,
        resolved.space,
        resolved.resolution,
        resolved.steps,
        resolved.sample_every,
    ) == ("/data/cats", "micro", "pixel", 32, 2000, 250)
    assert not resolved.cache_latents
    kept = ld.resolve_choices(ld.Choices(cpu_settings=False, resolution=" 512px ", cache_latents=True), "cpu")
    assert (kept.preset, kept.space, kept.resolution, kept.cache_latents) == ("tiny", "latent", 512, True)
    monkeypatch.setenv("LD_STEPS", "7")
    monkeypatch.setenv("LD_RESOLUTION", "64")
    monkeypatch.setenv("LD_CLASS_CONDITIONAL", "1")
    overridden = ld.resolve_choices(ld.Choices(), "cuda")  # the environment wins over the form
    assert (overridden.steps, overridden.resolution, overridden.class_conditional) == (7, 64, True)


@pytest.mark.parametrize(
    "choices, message",
    [
        (dict(dataset="custom"), "CUSTOM_DATASET is empty"),
        (dict(resolution="big"), "RESOLUTION must be a number of pixels"),
        (dict(gradient_checkpointing="maybe"), "GRADIENT_CHECKPOINTING must be auto, on or off"),
        (dict(hub_repo_id="my model"), "is not a Hub repo id"),
    ],
)
def test_resolve_choices_refuses_in_one_line_naming_the_field(no_overrides, choices, message):
    with pytest.raises(ValueError, match=message):
        ld.resolve_choices(ld.Choices(**choices), "cuda")


def test_prepare_builds_the_config_prints_the_run_and_its_terminal_command(
    no_overrides, monkeypatch, tmp_path, clean_image_folder, capsys
):
    monkeypatch.setenv("LD_DATASET", str(clean_image_folder))
    choices = ld.Choices(steps=40, eval_every=0, batch_size=0, hub_repo_id="")
    run = ld.prepare(choices, ld.Hardware("cpu"), tmp_path)
    out = capsys.readouterr().out
    config = run.config
    assert (config.preset, config.space, config.resolution, config.steps) == ("micro", "pixel", 32, 40)
    assert config.batch_size > 0 and config.resume == "latest" and not config.progress_bar
    assert run.output_dir == tmp_path / "clean-images0-micro-pixel-32px"  # RUN_NAME from the choices
    assert "CPU runtime: CPU-sized settings" in out and "hub         (none: the push is skipped)" in out
    command = ld.terminal_command(run)
    assert command.startswith("python -m liquid_diffusion train --dataset ") and command.endswith("--resume latest")
    assert f"--batch-size {config.batch_size} " in command and "--vae" not in command
    assert command in out
    with pytest.raises(ld.RunFirst, match="run the training cell"):  # nothing trained yet
        run.trained_checkpoint()


def test_prepare_warns_when_the_checkpoint_to_resume_was_trained_otherwise(
    no_overrides, monkeypatch, tmp_path, clean_image_folder, capsys
):
    monkeypatch.setenv("LD_DATASET", str(clean_image_folder))
    monkeypatch.setenv("LD_OUTPUT_DIR", str(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoint-000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_config.json").write_text(json.dumps({"preset": "tiny", "batch_size": 3, "lr": 1e-4}))
    (checkpoint / "state.json").write_text(json.dumps({"step": 10}))
    run = ld.prepare(ld.Choices(eval_every=0), ld.Hardware("cpu"), tmp_path)
    out = capsys.readouterr().out
    assert "resume      from checkpoint-000010" in out
    assert "WARNING: that checkpoint was trained with preset='tiny'" in out  # the form's own choices are micro
    assert run.config.batch_size == 3  # BATCH_SIZE 0: a resumed run keeps its batch size


# ---------------------------------------------------------------------------------------------------- live panel


def test_live_dashboard_shows_a_resumed_history_and_updates_in_place(tmp_path, displays):
    config = TrainConfig(output_dir=str(tmp_path), steps=100, log_every=10, sample_every=50)
    records = [
        {"step": 10, "loss": 1.0, "loss_t_bins": [0.5, None, 0.2]},
        {"step": 20, "val_loss": 0.9, "val_loss_raw": 0.95},
        {"step": 20, "kid": 0.1, "kid_std": 0.01, "fid": 50.0, "eval_samples": 100},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dashboard = ld.LiveDashboard(config)
    status, grid, curves = displays
    assert "the first sample grid appears at step 50" in grid.shown[0].data
    assert len(curves.shown) == 2  # the history, drawn at once
    assert len(dashboard.figure().axes) == 4  # loss, loss per t, KID, FID
    dashboard.on_log(None, {"step": 30, "loss": 0.8, "lr": 1e-4, "grad_norm": 1.0, "images_per_s": 5.0})
    dashboard.on_checkpoint(None, 30, tmp_path)
    dashboard.finish(30, stopped=True)
    assert set(dashboard.losses) == {10, 30}
    assert "stopped at step 30" in status.shown[-1].data and "last checkpoint: step 30" in status.shown[-1].data
    assert isinstance(ld.png(dashboard.figure()), bytes)


def test_live_dashboard_drops_steps_redone_after_a_resume(tmp_path, displays):
    config = TrainConfig(output_dir=str(tmp_path), steps=100, log_every=10)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30)))
    dashboard = ld.LiveDashboard(config)
    dashboard.on_log(None, {"step": 20, "loss": 0.5, "lr": 1e-4, "grad_norm": 1.0, "images_per_s": 5.0})
    assert dashboard.losses == {10: 1.0, 20: 0.5}
    assert len(dashboard.figure().axes) == 2  # no evaluations: one row


def test_push_without_a_repo_id_is_skipped_in_one_line(tmp_path, capsys):
    run = ld.NotebookRun(
        ld.Choices(hub_repo_id=""),
        TrainConfig(output_dir=str(tmp_path)),
        ld.Hardware("cpu"),
        [],
        {},
        trained=ld.Trained(tmp_path / "checkpoint-000001", complete=True),
    )
    assert ld.push(run) is False
    assert "no HUB_REPO_ID set: skipping the push" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- wording


def test_the_notebooks_offline_error_names_its_fields_not_flags(notebook_wording, monkeypatch):
    from liquid_diffusion import sources

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(ConnectionError) as raised:
        sources.open_source("afhq")
    message = str(raised.value)
    assert 'DATASET = "custom"' in message and "CUSTOM_DATASET" in message and 'SPACE = "pixel"' in message
    assert "--" not in message


def test_the_command_line_keeps_its_flags_and_python_callers_get_no_flags(monkeypatch, tmp_path, capsys):
    from liquid_diffusion import sources
    from liquid_diffusion.__main__ import main

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(ConnectionError, match="use a local image folder as the dataset$"):
        sources.open_source("afhq")
    assert main(["train", "--dataset", "afhq", "--output-dir", str(tmp_path / "run")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "--space pixel with a local image folder (--dataset PATH)" in line


def test_advice_and_option_names_follow_the_audience(notebook_wording):
    assert "--" not in errors.advice("resume") and "run the notebook again" in errors.advice("resume")
    assert "--inception-weights" not in errors.advice("inception_weights")
    assert errors.option("lr") == "LEARNING_RATE" and errors.option("ema_decay") == "--ema-decay"
    with pytest.raises(ValueError, match="^LEARNING_RATE must be greater than 0"):
        TrainConfig(lr=0.0).validate()
    errors.set_audience("cli")
    assert errors.advice("resume") == "continue with --resume latest" and errors.option("lr") == "--lr"
    with pytest.raises(ValueError, match="^--lr must be greater than 0"):
        TrainConfig(lr=0.0).validate()
    with pytest.raises(ValueError, match="audience must be one of"):
        errors.set_audience("gui")


def test_the_trainers_stop_and_divergence_advice_in_the_notebooks_words(notebook_wording, tmp_path, clean_image_folder):
    from liquid_diffusion.trainer import Trainer

    config = TrainConfig(
        dataset=str(clean_image_folder),
        space="pixel",
        preset="micro",
        resolution=16,
        steps=1,
        batch_size=2,
        num_workers=0,
        output_dir=str(tmp_path / "run"),
    )
    hint = Trainer(config).resume_hint  # printed beside the notebook's "Run the notebook again" when stopped
    assert "--" not in hint and "run the notebook again" in hint
    advice = errors.advice("resume_from", checkpoint="checkpoint-000010")
    assert "--" not in advice and "after checkpoint-000010" in advice
    errors.set_audience("cli")
    assert errors.advice("resume_from", checkpoint="x/checkpoint-000010") == "--resume x/checkpoint-000010"


def test_setup_words_messages_for_the_notebook(displays):
    try:
        hardware = ld.setup()
        assert errors.advice("resume") == errors.ADVICE["resume"]["notebook"]
    finally:
        errors.set_audience("cli")
    assert hardware.device in ("cpu", "cuda")


def test_dataset_file_listing_hides_the_progress_bars_and_restores_them():
    import datasets

    from liquid_diffusion.sources import quiet_file_resolution

    assert datasets.is_progress_bar_enabled()
    with quiet_file_resolution():
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # bars the user turned off stay off
    try:
        with quiet_file_resolution():
            pass
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()


def test_the_notebook_module_needs_no_kernel():
    source = Path(ld.__file__).read_text()
    assert "notebook_login()" in source  # the Hub login of section 8
    assert 'run_line_magic("load_ext", "tensorboard")' in source  # TensorBoard inline with REPORT_TO
