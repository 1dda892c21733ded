"""The guided notebook: the committed file is clean, valid, Colab-ready and the same as its jupytext source
``LiquidDiffusion_Training.py``, and it runs top to bottom headless. Its logic, ``liquid_diffusion.notebook``, is
tested without a kernel in test_notebook_helpers.py.

The run uses the ``LD_*`` overrides the notebook documents: a local image folder, pixel space, the micro preset at
16 px, a handful of steps on the CPU, outputs in a temp dir and no Hub repo (so the push is skipped and the load-back
cell uses a local export).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "LiquidDiffusion_Training.ipynb"
SCRIPT = ROOT / "LiquidDiffusion_Training.py"  # the notebook's source as a jupytext percent script, paired with it

FORM_FIELDS = (
    "DATASET",
    "CUSTOM_DATASET",
    "PRESET",
    "RESOLUTION",
    "SPACE",
    "STEPS",
    "BATCH_SIZE",
    "LEARNING_RATE",
    "SAMPLE_EVERY",
    "HUB_REPO_ID",
    "MOUNT_DRIVE",
    "PACKAGE_SPEC",
    "GRADIENT_CHECKPOINTING",
    "REPORT_TO",
)
ENV_OVERRIDES = (
    "LD_DATASET",
    "LD_PRESET",
    "LD_RESOLUTION",
    "LD_SPACE",
    "LD_VAE",
    "LD_STEPS",
    "LD_BATCH_SIZE",
    "LD_SAMPLE_EVERY",
    "LD_OUTPUT_DIR",
    "LD_HUB_REPO",
    "LD_GRADIENT_CHECKPOINTING",
    "LD_REPORT_TO",
)


def _read() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)


def _source(notebook) -> str:
    return "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")


def _id(cell) -> str | None:
    """A cell's name (``setup-code``, ...): its metadata id, which the jupytext script carries."""
    return cell.metadata.get("id")


def test_committed_notebook_is_valid_clean_and_colab_ready():
    notebook = _read()
    assert notebook.nbformat == 4
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {_id(cell)} has committed outputs"
            assert cell.execution_count is None, f"cell {_id(cell)} has an execution count"
    assert notebook.metadata["accelerator"] == "GPU"
    assert "colab" in notebook.metadata
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    # every code cell is led by a markdown cell saying what it does
    for previous, cell in zip(notebook.cells, notebook.cells[1:]):
        if cell.cell_type == "code":
            assert previous.cell_type == "markdown", f"code cell {_id(cell)} has no markdown lead"
    ids = [_id(cell) for cell in notebook.cells]
    assert None not in ids and len(set(ids)) == len(ids), ids
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"


def test_notebook_has_forms_env_overrides_and_no_model_code():
    from liquid_diffusion import notebook as ld
    from liquid_diffusion.config import TrainConfig

    notebook = _read()
    source = _source(notebook)
    for name in FORM_FIELDS:
        assert any(line.startswith(f"{name} = ") and "# @param" in line for line in source.splitlines()), name
    for dataset in ("afhq", "celeba", "flowers", "pokemon", "anime", "cartoon", "custom"):
        assert f'"{dataset}"' in source
    overrides = {variable for variable, _ in ld.ENV_OVERRIDES.values()}
    for variable in ENV_OVERRIDES:  # the notebook's logic reads them (ld.ENV_OVERRIDES, ld.prepare, ld.output_root)
        assert variable in overrides or f'"{variable}"' in Path(ld.__file__).read_text(), variable
    intro = notebook.cells[0].source
    for variable in overrides:  # and the notebook's introduction lists them
        assert f"`{variable}`" in intro, variable
    # the form's learning rate is the trainer's default: one recipe
    (line,) = [line for line in source.splitlines() if line.startswith("LEARNING_RATE = ")]
    assert float(line.split("=")[1].split("#")[0]) == TrainConfig.__dataclass_fields__["lr"].default
    # every form field reaches the run: each is used after its definition (passed to ld.Choices, ...)
    fields = [line.split(" = ")[0] for line in source.splitlines() if "# @param" in line]
    assert set(FORM_FIELDS) <= set(fields)
    uses = "\n".join(line for line in source.splitlines() if "# @param" not in line)
    for name in fields:
        assert re.search(rf"\b{name}\b", uses), f"the form field {name} is never used"
    # the cells are a few lines: fields, a guard and calls into the package, which holds the logic
    for cell in notebook.cells:
        if cell.cell_type == "code":
            code = [
                line
                for line in cell.source.splitlines()
                if line.strip() and not line.lstrip().startswith("#") and "# @param" not in line
            ]
            assert len(code) <= 30 if _id(cell) == "setup-code" else len(code) <= 12, (_id(cell), len(code))
            assert "\ndef " not in cell.source and "\nclass " not in cell.source, _id(cell)
    # everything comes from the package: no network or training loop defined in the notebook
    for forbidden in ("nn.Module", "class LiquidDiffusion", "optimizer.step", ".backward(", "Conv2d("):
        assert forbidden not in source, forbidden


def test_the_notebook_is_what_jupytext_makes_of_its_script():
    """``LiquidDiffusion_Training.py`` is the notebook's source: an edit to one without the other fails here. After
    editing either, run ``jupytext --sync LiquidDiffusion_Training.py`` and commit both."""
    import jupytext  # in the test extra: without it this check must fail, not skip (pip install -e ".[test]")

    script = jupytext.read(SCRIPT)
    notebook = _read()

    def cells(nb):
        return [(cell.cell_type, _id(cell), cell.metadata.get("cellView"), cell.source) for cell in nb.cells]

    assert cells(script) == cells(notebook), "run jupytext --sync LiquidDiffusion_Training.py and commit both files"
    for key in ("accelerator", "colab", "kernelspec"):
        assert script.metadata[key] == notebook.metadata[key], key


def _outputs_with(notebook, mime: str) -> list[str]:
    return [
        _id(cell)
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if mime in output.get("data", {})
    ]


def test_notebook_runs_headless_on_cpu_and_resumes(tmp_path, monkeypatch, clean_image_folder):
    output_dir = tmp_path / "run"
    overrides = {
        "LD_DATASET": str(clean_image_folder),
        "LD_SPACE": "pixel",
        "LD_PRESET": "micro",
        "LD_RESOLUTION": "16",
        "LD_STEPS": "4",
        "LD_BATCH_SIZE": "4",
        "LD_SAMPLE_EVERY": "2",
        "LD_NUM_SAMPLES": "4",
        "LD_OUTPUT_DIR": str(output_dir),
        "LD_HUB_REPO": "",
        "LD_EVAL_EVERY": "0",  # no Inception download where the internet is reachable
        "LD_MOUNT_DRIVE": "0",
        "LD_SKIP_INSTALL": "1",
        "LD_REFLOW": "1",  # section 11: a few-step model by reflow, then its t = 1 stage, each a resumable run
        "LD_REFLOW_PAIRS": "8",
        "LD_REFLOW_STEPS": "2",
        "LD_REFLOW_DISTILL_STEPS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",  # tiny tensors: one thread is fastest, and oversubscribed shared cores crawl
    }
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the push must be skipped for want of a repo id, not a token

    notebook = _read()
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()

    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    images = _outputs_with(notebook, "image/png")
    assert "train-code" in images, "the live panel showed no sample grid"
    assert {"preview-code", "samples-code", "load-code", "reflow-code"} <= set(images), images

    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    assert "skipping the push" in text
    html = "".join(
        o.get("data", {}).get("text/html", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert html.count("No GPU found") == 1 and "No GPU found" not in text  # said once
    # the run really trained, sampled, checkpointed and exported where LD_OUTPUT_DIR said
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4
    assert (output_dir / "checkpoint-000004" / "state.json").exists()
    assert (output_dir / "samples" / "step-000002.png").exists()
    for sampler in ("euler", "heun"):
        for steps in (25, 50):
            assert (output_dir / "samples" / f"final-{sampler}-{steps}.png").exists()
    assert (output_dir / "export" / "checkpoint-000004" / "model_index.json").exists()
    for stage, steps in (("reflow", 2), ("1step", 1)):  # the few-step pipelines, each made for its step count
        pipeline = Path(f"{output_dir}-{stage}-000004") / "pipeline"
        assert json.loads((pipeline / "model_index.json").read_text())["recommended_steps"] == steps
    # the train cell updated its panel in place: one output per display handle, not one per sample or log
    train_cell = next(cell for cell in notebook.cells if _id(cell) == "train-code")
    assert len([o for o in train_cell.outputs if "image/png" in o.get("data", {})]) == 2  # grid + curves

    # Running it again with more steps resumes from the newest checkpoint in the output folder.
    monkeypatch.setenv("LD_STEPS", "6")
    monkeypatch.setenv("LD_BATCH_SIZE", "0")  # "suggested": a resumed run keeps the checkpoint's batch size
    notebook = _read()
    nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    ).execute()
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    assert "resume      from checkpoint-000004" in text
    assert "resumed from" in text and "at step 4" in text
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 6
    assert (output_dir / "export" / "checkpoint-000006" / "model_index.json").exists()


def test_notebook_runs_headless_in_latent_space(tmp_path, monkeypatch, clean_image_folder, tiny_vae_dir):
    """The Colab default path (frozen VAE, preview round trip, export with the VAE), with a tiny random VAE; with
    gradient checkpointing and W&B (offline) switched on."""
    output_dir = tmp_path / "run"
    overrides = {
        "LD_DATASET": str(clean_image_folder),
        "LD_SPACE": "latent",
        "LD_VAE": str(tiny_vae_dir),
        "LD_PRESET": "micro",
        "LD_RESOLUTION": "32",
        "LD_STEPS": "2",
        "LD_BATCH_SIZE": "2",
        "LD_SAMPLE_EVERY": "1",
        "LD_NUM_SAMPLES": "2",
        "LD_OUTPUT_DIR": str(output_dir),
        "LD_HUB_REPO": "",
        "LD_EVAL_EVERY": "0",
        "LD_MOUNT_DRIVE": "0",
        "LD_SKIP_INSTALL": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "LD_GRADIENT_CHECKPOINTING": "on",
        "LD_REPORT_TO": "wandb",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    if importlib.util.find_spec("wandb") is None:  # the rest of the path still runs
        overrides["LD_REPORT_TO"] = "none"
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    notebook = _read()
    nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    ).execute()
    images = _outputs_with(notebook, "image/png")
    assert {"preview-code", "train-code", "samples-code", "load-code"} <= set(images), images
    export = output_dir / "export" / "checkpoint-000002"
    assert (export / "model_index.json").exists() and (export / "vae" / "config.json").exists()
    choices = _text(next(cell for cell in notebook.cells if _id(cell) == "choices-code"))
    assert "gradient checkpointing" in choices and "--gradient-checkpointing" in choices
    saved = json.loads((output_dir / "checkpoint-000002" / "train_config.json").read_text())
    assert saved["gradient_checkpointing"] and saved["report_to"] == overrides["LD_REPORT_TO"]
    if overrides["LD_REPORT_TO"] == "wandb":
        assert list((output_dir / "logs" / "wandb").glob("offline-run-*"))


# ------------------------------------------------------------------------------------------------ mistakes


def _run_cells(sources: list[str], monkeypatch, **env) -> tuple[nbformat.NotebookNode, bool]:
    """Runs code cells like *Run all* in a fresh kernel; returns the notebook and whether it stopped at an error."""
    for name, value in {
        "LD_SKIP_INSTALL": "1",
        "LD_MOUNT_DRIVE": "0",
        "LD_EVAL_EVERY": "0",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        **env,
    }.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError:
        return notebook, True
    return notebook, False


def _text(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("traceback", [])) for o in cell.outputs)


def _cell_source(cell_id: str) -> str:
    return next(cell.source for cell in _read().cells if _id(cell) == cell_id)


def test_notebook_installs_from_the_repository_named_in_pyproject():
    """pyproject.toml's [project.urls] Repository is the one place for the address: the install cell, in the script
    and the notebook, must name it (jupytext cannot fill it in)."""
    import tomllib

    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    line = f'PACKAGE_SPEC = "git+{url}.git"  # @param'
    assert line in _cell_source("setup-code")
    assert line in SCRIPT.read_text(), "change PACKAGE_SPEC in LiquidDiffusion_Training.py, then jupytext --sync it"
    assert "YOUR-USER" not in NOTEBOOK.read_text()


def test_a_bad_hub_repo_id_stops_run_all_at_the_choices_with_one_line(monkeypatch, tmp_path):
    cells = [_cell_source("setup-code"), _cell_source("outputs-code"), _cell_source("choices-code"), "print('ran')"]
    notebook, stopped = _run_cells(cells, monkeypatch, LD_HUB_REPO="my model", LD_OUTPUT_DIR=str(tmp_path))
    assert stopped and notebook.cells[3].outputs == []  # nothing after the mistake ran
    text = _text(notebook.cells[2])
    assert "error: 'my model' is not a Hub repo id" in text and "Traceback" not in text


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason='wandb is not installed: pip install -e ".[test]"'
)
def test_wandb_without_a_login_stops_run_all_at_the_choices_with_one_line(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    cells = [_cell_source("setup-code"), _cell_source("outputs-code"), _cell_source("choices-code"), "print('ran')"]
    notebook, stopped = _run_cells(
        cells, monkeypatch, LD_REPORT_TO="wandb", NETRC=str(tmp_path / "no-netrc"), LD_OUTPUT_DIR=str(tmp_path)
    )
    assert stopped and notebook.cells[3].outputs == []
    text = _text(notebook.cells[2])
    assert "error: REPORT_TO wandb: not logged in" in text and "wandb login" in text and "Traceback" not in text


def test_a_stopped_training_stops_run_all_with_one_line_and_a_resume_hint(monkeypatch):
    stop = 'raise ld.RunStopped("training stopped at step 7 and saved checkpoint-000007. Run the notebook again")'
    notebook, stopped = _run_cells([_cell_source("setup-code"), stop, "print('pushed')"], monkeypatch)
    assert stopped and notebook.cells[2].outputs == []
    (error,) = [o for o in notebook.cells[1].outputs if o.output_type == "error"]
    assert error.traceback == [
        "stopped: training stopped at step 7 and saved checkpoint-000007. Run the notebook again"
    ]


@pytest.mark.parametrize(
    "cell_id, needs", [("train-code", "run sections 1 to 4 first"), ("hub-code", "run the training cell")]
)
def test_a_cell_run_out_of_order_says_which_to_run_first(monkeypatch, cell_id, needs):
    notebook, stopped = _run_cells([_cell_source(cell_id)], monkeypatch)
    text = _text(notebook.cells[0])
    assert stopped and needs in text and "NameError" not in text and "Traceback (most recent" not in text


def test_the_fid_install_never_replaces_the_installed_torch(monkeypatch, tmp_path, clean_image_folder):
    """torch-fidelity's torchvision requirement once made pip swap the user's torch inside the running kernel: the
    install pins torch to the installed build, and when pip cannot honour that, FID is turned off in one line."""
    import importlib.metadata

    fake_pip = (
        "pip_calls = []\n"
        "def pip_install(*args):  # pip cannot keep this torch: refuses, as a resolver conflict does\n"
        "    pip_calls.append(args)\n"
        "    raise RuntimeError('ResolutionImpossible')\n"
        "ld.pip_install = pip_install"
    )
    cells = [
        _cell_source("setup-code"),
        fake_pip,
        _cell_source("outputs-code"),
        _cell_source("choices-code"),
        "print('EVAL_EVERY', RUN.config.eval_every, pip_calls)",
    ]
    notebook, stopped = _run_cells(
        cells,
        monkeypatch,
        LD_SKIP_INSTALL="0",
        LD_EVAL_EVERY="1000",
        LD_DATASET=str(clean_image_folder),
        LD_OUTPUT_DIR=str(tmp_path / "run"),
        LD_HUB_REPO="",
    )
    assert not stopped, [_text(cell) for cell in notebook.cells]
    torch_version = importlib.metadata.version("torch")
    (calls,) = [_text(notebook.cells[4])]
    assert calls.startswith("EVAL_EVERY 0 [(") and "'torch-fidelity'" in calls
    assert f"'torch=={torch_version}'" in calls  # the installed build, pinned: pip may not replace it
    (line,) = [line for line in _text(notebook.cells[3]).splitlines() if "FID is off" in line]
    assert f"without replacing torch {torch_version}" in line and f"'torch=={torch_version}'" in line
