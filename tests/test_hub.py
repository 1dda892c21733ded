"""Specification of the Hub side: resolving Hub ids, push, background pushes during training and the ``export`` /
``push`` commands -- all offline.

The Hub itself is replaced at its boundary only: a fake ``HfApi`` (create_repo + upload_folder) and a fake
``snapshot_download``; everything up to those calls is the real code. The fake training runs (``pixel_run``) and
their exports come from ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from conftest import FAKE_TOKEN, REQUIRED_EXPORT_FILES, files_in
from liquid_diffusion import LiquidDiffusionPipeline, LiquidDiffusionUNet, hub, publish
from liquid_diffusion.__main__ import main
from liquid_diffusion.checkpoints import find_checkpoint


def http_error(cls, status: int, url: str = "https://huggingface.co/api/repos/create"):
    response = httpx2.Response(status, request=httpx2.Request("POST", url))
    return cls(f"{status} Client Error for url {url}", response=response)


class FakeHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records calls and copies what upload_folder was given."""

    instances: list[FakeHfApi] = []
    upload_errors: list[BaseException] = []  # raised by upload_folder, one per call, before succeeding
    create_error: BaseException | None = None
    gate: threading.Event | None = None  # upload_folder waits on it when set
    entered: threading.Event | None = None  # set when upload_folder is called

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.created, self.uploads = [], []
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
        if FakeHfApi.create_error is not None:
            raise FakeHfApi.create_error
        self.created.append(dict(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **kwargs):
        if FakeHfApi.entered is not None:
            FakeHfApi.entered.set()
        if FakeHfApi.gate is not None:
            assert FakeHfApi.gate.wait(30)
        if FakeHfApi.upload_errors:
            raise FakeHfApi.upload_errors.pop(0)
        folder = Path(folder_path)
        snapshot = {name: (folder / name).read_bytes() for name in files_in(folder)}
        self.uploads.append(dict(repo_id=repo_id, files=snapshot, commit_message=commit_message, kwargs=kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.instances, FakeHfApi.upload_errors, FakeHfApi.create_error = [], [], None
    FakeHfApi.gate = FakeHfApi.entered = None
    monkeypatch.setattr(publish, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # "logged in"
    return FakeHfApi


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_an_output_dir_resolves_to_its_newest_complete_checkpoint(pixel_run):
    assert find_checkpoint(pixel_run) == pixel_run / "checkpoint-000500"  # 750 has no state.json yet
    assert find_checkpoint(pixel_run / "checkpoint-000250") == pixel_run / "checkpoint-000250"
    assert hub.resolve_checkpoint(str(pixel_run)) == pixel_run / "checkpoint-000500"
    assert hub.resolve_checkpoint(pixel_run / "checkpoint-000250") == pixel_run / "checkpoint-000250"
    only_incomplete = pixel_run.parent / "only-incomplete"
    (only_incomplete / "checkpoint-000001" / "unet").mkdir(parents=True, exist_ok=True)
    with pytest.raises(FileNotFoundError, match="none is complete"):
        find_checkpoint(only_incomplete)


def test_missing_paths_and_bad_ids_give_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.resolve_checkpoint("./outputs/nope")
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor a Hub repo id"):
        hub.resolve_checkpoint("not a repo id!")
    with pytest.raises(FileNotFoundError, match="not a LiquidDiffusion checkpoint"):
        hub.resolve_checkpoint(tmp_path)


def test_a_relative_checkpoint_path_without_dot_slash_is_local(pixel_run, pixel_export, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(pixel_run, tmp_path / "runs" / "x")
    shutil.copytree(pixel_export, tmp_path / "out" / "final")
    monkeypatch.chdir(tmp_path)
    downloads = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kwargs: downloads.append(repo_id) or pixel_export)
    assert hub.resolve_checkpoint("runs/x/checkpoint-000250") == Path("runs/x/checkpoint-000250")
    assert hub.resolve_checkpoint("out/final") == Path("out/final")  # USER/NAME-shaped, but here: local
    for checkpoint, grid in (("runs/x/checkpoint-000250", "a.png"), ("out/final", "b.png"), ("runs/x", "c.png")):
        assert main(["sample", "--checkpoint", checkpoint, "--num-images", "1", "--steps", "1", "--out", grid]) == 0
        assert (tmp_path / grid).is_file()
    assert downloads == []
    # a path that is not here says so in one line, and nothing is downloaded
    capsys.readouterr()
    assert main(["sample", "--checkpoint", "runs/x/checkpoint-000100"]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint path 'runs/x/checkpoint-000100' does not exist locally "
        f"(relative to {os.getcwd()}); check the path (a Hub id is USER/NAME)\n"
    )
    assert downloads == []
    # only USER/NAME that is not here is a Hub id
    assert hub.resolve_checkpoint("me/liquid-anime") == pixel_export and downloads == ["me/liquid-anime"]


def package_imports(module: str) -> set[str]:
    """The ``liquid_diffusion`` modules ``module`` imports when run, directly or through others (read from the
    source; ``if TYPE_CHECKING:`` imports left out)."""
    import ast

    package = Path(hub.__file__).parent
    seen, todo = set(), [module]
    while todo:
        tree = ast.parse((package / f"{todo.pop()}.py").read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                for name in names:
                    if name not in seen and (package / f"{name}.py").is_file():
                        seen.add(name)
                        todo.append(name)
    return seen


def test_loading_never_imports_the_publisher():
    for module in ("hub", "sampling", "evaluate", "export", "pipeline"):
        assert "publish" not in package_imports(module), module
    assert "publish" in package_imports("trainer") and "publish" in package_imports("__main__")


# ---------------------------------------------------------------------------------------------------------------
# Hub ids: download through snapshot_download (faked), clear errors
# ---------------------------------------------------------------------------------------------------------------


def test_hub_ids_download_only_safe_files_and_load(monkeypatch, pixel_export):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(pixel_export)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert hub.resolve_checkpoint("me/liquid-anime") == pixel_export
    repo_id, kwargs = calls[0]
    assert repo_id == "me/liquid-anime"
    assert set(kwargs["allow_patterns"]) == {"*.safetensors", "*.json", "*.png", "*.md"}
    pipe = hub.load_pipeline("me/liquid-anime")
    assert isinstance(pipe, LiquidDiffusionPipeline) and pipe.vae is None


def test_pipeline_from_pretrained_takes_hub_ids(monkeypatch, pixel_export):
    """diffusers' own Hub download rejects components from other libraries, so Hub ids go through a snapshot."""
    import liquid_diffusion.pipeline as pipeline_module

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(pixel_export)

    monkeypatch.setattr(pipeline_module, "snapshot_download", fake_snapshot_download)
    pipe = LiquidDiffusionPipeline.from_pretrained("me/liquid-anime", revision="main", token=FAKE_TOKEN)
    assert isinstance(pipe.unet, LiquidDiffusionUNet) and pipe.config.resolution == 16
    ((repo_id, kwargs),) = calls
    assert repo_id == "me/liquid-anime" and kwargs["revision"] == "main" and kwargs["token"] == FAKE_TOKEN
    assert set(kwargs["allow_patterns"]) == {"*.safetensors", "*.json"}


@pytest.mark.parametrize(
    "error, expected_type, expected_text",
    [
        (
            http_error(RepositoryNotFoundError, 404, "https://huggingface.co/api/models/me/x"),
            FileNotFoundError,
            "no Hub repo 'me/x' was found",
        ),
        (http_error(HfHubHTTPError, 401, "https://huggingface.co/api/models/me/x"), PermissionError, "hf auth login"),
    ],
)
def test_hub_download_errors_are_one_clear_line(monkeypatch, error, expected_type, expected_text):
    def failing_snapshot_download(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(hub, "snapshot_download", failing_snapshot_download)
    with pytest.raises(expected_type, match=expected_text) as info:
        hub.resolve_checkpoint("me/x")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Push (HfApi faked at its boundary)
# ---------------------------------------------------------------------------------------------------------------


def test_push_exports_then_uploads_that_folder_without_the_token(fake_hub, pixel_run, pixel_export):
    url = publish.push_to_hub(pixel_run, "me/liquid-anime", private=True, token=FAKE_TOKEN)
    assert url == "https://huggingface.co/me/liquid-anime"
    (api,) = fake_hub.instances
    assert api.token == FAKE_TOKEN  # handed to HfApi, and nowhere else
    assert api.created == [dict(repo_id="me/liquid-anime", repo_type="model", private=True, exist_ok=True)]
    (upload,) = api.uploads
    assert upload["repo_id"] == "me/liquid-anime" and "500" in upload["commit_message"]
    assert set(upload["files"]) == files_in(pixel_export)  # exactly what `export` writes
    for name, content in upload["files"].items():
        assert FAKE_TOKEN.encode() not in content, name
    assert (
        upload["files"]["unet/diffusion_pytorch_model.safetensors"]
        == (pixel_export / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )


@pytest.mark.parametrize(
    "status, expected_text",
    [(401, "missing or invalid token.*hf auth login.*HF_TOKEN"), (403, "no write access to 'me/liquid-anime'")],
)
def test_push_auth_errors_say_how_to_fix_them(fake_hub, pixel_run, status, expected_text):
    fake_hub.create_error = http_error(HfHubHTTPError, status)
    with pytest.raises(PermissionError, match=expected_text) as info:
        publish.push_to_hub(pixel_run, "me/liquid-anime", token=FAKE_TOKEN)
    assert FAKE_TOKEN not in str(info.value) and "\n" not in str(info.value)


def test_push_rejects_bad_repo_ids_before_any_work(fake_hub, pixel_run):
    for bad in ("no-namespace", "a/b/c", "me/bad--name"):
        with pytest.raises(ValueError, match="USER/NAME"):
            publish.push_to_hub(pixel_run, bad)
    assert fake_hub.instances == []


# ---------------------------------------------------------------------------------------------------------------
# Background pushes during training
# ---------------------------------------------------------------------------------------------------------------


def test_hub_pusher_retries_with_backoff_and_then_succeeds(fake_hub, pixel_run):
    fake_hub.upload_errors = [ConnectionError("network down"), ConnectionError("still down")]
    successes = []
    pusher = publish.HubPusher(
        "me/liquid",
        token=FAKE_TOKEN,
        max_attempts=3,
        backoff_s=0.01,
        on_success=lambda ckpt, url: successes.append((ckpt, url)),
    )
    pusher.push(pixel_run / "checkpoint-000500")
    assert pusher.close(timeout=60)
    assert len(fake_hub.instances) == 3  # two failures, one success
    assert successes == [(pixel_run / "checkpoint-000500", "https://huggingface.co/me/liquid")]
    assert FAKE_TOKEN not in repr(pusher)
    assert not list(pixel_run.glob(".hub-push-*"))  # staging cleaned up


def test_hub_pusher_reports_a_failure_and_never_raises(fake_hub, pixel_run, caplog):
    fake_hub.upload_errors = [ConnectionError("down")] * 5
    failures = []
    pusher = publish.HubPusher(
        "me/liquid", max_attempts=3, backoff_s=0.01, on_failure=lambda ckpt, error: failures.append((ckpt, error))
    )
    pusher.push(pixel_run / "does-not-exist")  # a bad path is reported, not raised
    assert [type(e) for _, e in failures] == [FileNotFoundError]
    pusher.push(pixel_run / "checkpoint-000500")  # returns at once
    assert pusher.wait(timeout=60)
    assert [type(e) for _, e in failures] == [FileNotFoundError, ConnectionError]
    assert len(fake_hub.instances) == 3
    assert any("failed after 3 attempts" in r.getMessage() for r in caplog.records)
    # errors a retry cannot fix fail at once
    fake_hub.instances.clear()
    fake_hub.upload_errors = []
    fake_hub.create_error = http_error(HfHubHTTPError, 403)
    pusher.push(pixel_run / "checkpoint-000500")
    assert pusher.close(timeout=60)
    assert len(fake_hub.instances) == 1 and isinstance(pusher.last_error, PermissionError)


def test_hub_pusher_does_not_block_and_survives_checkpoint_pruning(fake_hub, pixel_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pixel_run, run)
    fake_hub.gate = threading.Event()
    pusher = publish.HubPusher("me/liquid", backoff_s=0)
    start = time.perf_counter()
    pusher.push(run / "checkpoint-000250")
    pusher.push(run / "checkpoint-000500")  # queued behind the blocked upload (or superseding it)
    assert time.perf_counter() - start < 2.0  # training goes on
    shutil.rmtree(run / "checkpoint-000500")  # the trainer prunes while the upload waits
    fake_hub.gate.set()
    assert pusher.close(timeout=60)
    assert pusher.failures == []
    assert pusher.pushed[-1][0] == run / "checkpoint-000500"
    last_upload = fake_hub.instances[-1].uploads[-1]
    assert "| steps trained | 500 |" in last_upload["files"]["README.md"].decode()


def test_hub_pusher_pushes_only_the_newest_of_the_checkpoints_that_queued_meanwhile(fake_hub, pixel_run, tmp_path):
    import shutil

    run = shutil.copytree(pixel_run, tmp_path / "run")
    newest = shutil.copytree(run / "checkpoint-000500", run / "checkpoint-000600")
    (newest / "state.json").write_text(json.dumps({"step": 600, "batches_consumed": 600}))
    fake_hub.gate, fake_hub.entered = threading.Event(), threading.Event()
    pusher = publish.HubPusher("me/liquid", backoff_s=0)
    pusher.push(run / "checkpoint-000250")
    assert fake_hub.entered.wait(60)  # 250 is uploading (held at the gate)
    pusher.push(run / "checkpoint-000500")  # waits ...
    pusher.push(newest)  # ... and is superseded by 600
    assert not pusher.wait(timeout=0.1)  # still uploading: wait gives up at its timeout
    fake_hub.gate.set()
    assert pusher.close(timeout=60)
    assert [checkpoint.name for checkpoint, _ in pusher.pushed] == ["checkpoint-000250", "checkpoint-000600"]
    uploads = [upload for api in fake_hub.instances for upload in api.uploads]
    assert [u["commit_message"].rsplit(" ", 1)[-1] for u in uploads] == ["250", "600"]
    assert pusher.failures == [] and not list(run.glob(".hub-push-*"))  # the skipped push's staging is gone too
    pusher.push(newest)  # closed: ignored, not raised
    assert len(pusher.pushed) == 2


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def test_cli_export_and_push(fake_hub, pixel_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(pixel_run), "--out", str(out), "--repo-id", "me/liquid-anime"]) == 0
    assert REQUIRED_EXPORT_FILES <= files_in(out)
    assert main(["export", "--checkpoint", str(pixel_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(pixel_run), "--out", str(out), "--overwrite"]) == 0
    assert main(["push", "--checkpoint", str(pixel_run), "--repo-id", "me/liquid-anime", "--private"]) == 0
    assert fake_hub.instances[-1].created[0]["private"] is True


@pytest.mark.parametrize(
    "argv_tail, expected",
    [
        (["push", "--checkpoint", "{missing}", "--repo-id", "me/x"], "does not exist"),
        (["push", "--checkpoint", "{run}", "--repo-id", "not a repo"], "USER/NAME"),
        (["export", "--checkpoint", "{missing}", "--out", "{tmp}/o"], "does not exist"),
    ],
)
def test_cli_errors_are_one_clean_line(fake_hub, pixel_run, tmp_path, capsys, argv_tail, expected):
    argv = [a.format(missing=tmp_path / "missing", run=pixel_run, tmp=tmp_path) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err and "Traceback" not in err


def test_cli_push_without_login_says_how_to_log_in(fake_hub, pixel_run, capsys):
    fake_hub.create_error = http_error(HfHubHTTPError, 401)
    assert main(["push", "--checkpoint", str(pixel_run), "--repo-id", "me/x", "--token", FAKE_TOKEN]) == 2
    captured = capsys.readouterr()
    assert "hf auth login" in captured.err and "notebook_login" in captured.err
    assert FAKE_TOKEN not in captured.err + captured.out


def test_cli_push_network_failure_is_one_line(fake_hub, pixel_run, capsys):
    fake_hub.upload_errors = [ConnectionError("Name or service not known")]
    assert main(["push", "--checkpoint", str(pixel_run), "--repo-id", "me/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: push to me/x failed: ConnectionError: Name or service not known"


# ------------------------------------------------------------------------------------------------ training pushes


def test_training_pushes_every_n_checkpoints_in_the_background(fake_hub, clean_image_folder, tmp_path):
    from liquid_diffusion.config import TrainConfig
    from liquid_diffusion.trainer import Trainer

    config = TrainConfig(
        dataset=str(clean_image_folder),
        space="pixel",
        preset="micro",
        resolution=16,
        batch_size=4,
        steps=6,
        checkpoint_every=2,
        push_to_hub="me/liquid-micro",
        push_every=2,
        log_every=2,
        sample_every=2,
        num_sample_images=4,
        sample_steps=2,
        num_workers=0,
        shuffle_buffer=8,
        output_dir=str(tmp_path),
        progress_bar=False,
    )
    Trainer(config).train()  # returns only after the background pusher has finished

    uploads = [upload for api in fake_hub.instances for upload in api.uploads]
    # checkpoints at steps 2, 4 and 6: every 2nd one (step 4) and always the final one (step 6); when the upload of
    # step 4 is still queued as step 6 arrives, only the newest is pushed
    pushed = [int(u["commit_message"].rsplit(" ", 1)[-1]) for u in uploads]
    assert pushed in ([4, 6], [6]), pushed
    assert all(u["repo_id"] == "me/liquid-micro" for u in uploads)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md"} <= set(uploads[0]["files"])
    assert not list(tmp_path.glob(".hub-push-*"))  # staging folders cleaned up
