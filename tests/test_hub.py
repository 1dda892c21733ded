"""Specification of the Hub round trip: the diffusers pipeline, export with a model card, push, background pushes and
resolving Hub ids -- all offline.

The Hub itself is replaced at its boundary only: a fake ``HfApi`` (create_repo + upload_folder) and a fake
``snapshot_download``; everything up to those calls is the real code. Checkpoints are built here exactly as the
trainer writes them (``unet/``, ``unet_ema/``, ``train_config.json``, ``state.json``; ``metrics.jsonl`` and
``samples/`` beside them), with a micro U-Net in pixel space and, in latent space, the tiny VAE of ``conftest.py``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx2
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from PIL import Image
from safetensors.torch import load_file

from liquid_diffusion import LiquidDiffusionPipeline, LiquidDiffusionUNet, flow, hub
from liquid_diffusion.__main__ import main

FAKE_TOKEN = "hf_FAKEtokenFAKEtokenFAKEtoken1234"
MICRO = dict(widths=(8, 16), depths=(1, 1), bottleneck_depth=1)  # downsample factor 2
REQUIRED_EXPORT_FILES = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet_raw/config.json",
    "unet_raw/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "train_config.json",
    "samples.png",
    "loss_curve.png",
    "README.md",
}
VAE_FILES = {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: fake training runs in the trainer's exact layout
# ---------------------------------------------------------------------------------------------------------------


def micro_unet(in_channels: int, seed: int) -> LiquidDiffusionUNet:
    """A micro U-Net whose zero-initialised layers are perturbed, so its velocity is not identically zero."""
    torch.manual_seed(seed)
    unet = LiquidDiffusionUNet(in_channels=in_channels, **MICRO).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return unet


def write_checkpoint(output_dir: Path, step: int, config: dict, in_channels: int) -> Path:
    checkpoint = output_dir / f"checkpoint-{step:06d}"
    micro_unet(in_channels, seed=step).save_pretrained(checkpoint / "unet", safe_serialization=True)
    micro_unet(in_channels, seed=step + 1).save_pretrained(checkpoint / "unet_ema", safe_serialization=True)
    (checkpoint / "train_config.json").write_text(json.dumps(config, indent=2))
    (checkpoint / "state.json").write_text(json.dumps({"step": step, "batches_consumed": step}))
    (checkpoint / "training_state.pt").write_bytes(b"optimizer state: never read by the hub module")
    return checkpoint


def make_run(output_dir: Path, *, space: str, vae: str, dataset: str, resolution: int) -> Path:
    """An output dir with metrics, two sample grids, complete checkpoints 250 and 500 and a half-written 750."""
    config = dict(
        dataset=dataset,
        preset="micro",
        resolution=resolution,
        space=space,
        vae=vae,
        steps=1000,
        batch_size=4,
        lr=1e-4,
        seed=0,
        timestep_sampling="uniform",
        sample_steps=25,
        push_to_hub="me/liquid",
        hub_token=FAKE_TOKEN,  # a careless config: must never reach the export
    )
    in_channels = 4 if space == "latent" else 3
    output_dir.mkdir(parents=True)
    with open(output_dir / "metrics.jsonl", "w") as handle:
        for step in range(50, 801, 50):
            bins = [1.0 - 0.05 * i for i in range(10)] if step % 100 == 0 else None
            record = dict(
                step=step, loss=1.0 / (1 + step / 100), lr=1e-4, images_per_s=100.0, grad_norm=0.5, loss_t_bins=bins
            )
            handle.write(json.dumps(record) + "\n")
        handle.write('{"step": 850, "loss": 0.1')  # a line being written when the export runs
    (output_dir / "samples").mkdir()
    for step, colour in ((250, "red"), (500, "blue"), (750, "green")):
        Image.new("RGB", (64, 64), colour).save(output_dir / "samples" / f"step-{step:06d}.png")
    write_checkpoint(output_dir, 250, config, in_channels)
    write_checkpoint(output_dir, 500, config, in_channels)
    half = output_dir / "checkpoint-000750"  # no state.json yet: incomplete
    micro_unet(in_channels, seed=750).save_pretrained(half / "unet", safe_serialization=True)
    return output_dir


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory) -> Path:
    return make_run(
        tmp_path_factory.mktemp("pixel") / "run",
        space="pixel",
        vae="stabilityai/sd-vae-ft-mse",
        dataset="anime",
        resolution=16,
    )


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, tiny_vae_dir) -> Path:
    return make_run(
        tmp_path_factory.mktemp("latent") / "run",
        space="latent",
        vae=str(tiny_vae_dir),
        dataset="huggan/AFHQv2",
        resolution=32,
    )


@pytest.fixture(scope="module")
def pixel_export(pixel_run, tmp_path_factory) -> Path:
    return hub.export_checkpoint(pixel_run, tmp_path_factory.mktemp("exports") / "pixel", repo_id="me/liquid-anime")


@pytest.fixture(scope="module")
def latent_export(latent_run, tmp_path_factory) -> Path:
    return hub.export_checkpoint(latent_run, tmp_path_factory.mktemp("exports") / "latent")


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def same_weights(folder_a: Path, folder_b: Path) -> bool:
    a = load_file(folder_a / "diffusion_pytorch_model.safetensors")
    b = load_file(folder_b / "diffusion_pytorch_model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def http_error(cls, status: int, url: str = "https://huggingface.co/api/repos/create"):
    response = httpx2.Response(status, request=httpx2.Request("POST", url))
    return cls(f"{status} Client Error for url {url}", response=response)


class FakeHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records calls and copies what upload_folder was given."""

    instances: list["FakeHfApi"] = []
    upload_errors: list[BaseException] = []  # raised by upload_folder, one per call, before succeeding
    create_error: BaseException | None = None
    gate: threading.Event | None = None  # upload_folder waits on it when set

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
        if FakeHfApi.gate is not None:
            assert FakeHfApi.gate.wait(30)
        if FakeHfApi.upload_errors:
            raise FakeHfApi.upload_errors.pop(0)
        folder = Path(folder_path)
        snapshot = {name: (folder / name).read_bytes() for name in files_in(folder)}
        self.uploads.append(dict(repo_id=repo_id, files=snapshot, commit_message=commit_message, kwargs=kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.instances, FakeHfApi.upload_errors, FakeHfApi.create_error, FakeHfApi.gate = [], [], None, None
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # "logged in"
    return FakeHfApi


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_an_output_dir_resolves_to_its_newest_complete_checkpoint(pixel_run):
    assert hub.find_checkpoint(pixel_run) == pixel_run / "checkpoint-000500"  # 750 has no state.json yet
    assert hub.find_checkpoint(pixel_run / "checkpoint-000250") == pixel_run / "checkpoint-000250"
    assert hub.resolve_checkpoint(str(pixel_run)) == pixel_run / "checkpoint-000500"
    assert hub.resolve_checkpoint(pixel_run / "checkpoint-000250") == pixel_run / "checkpoint-000250"
    only_incomplete = pixel_run.parent / "only-incomplete"
    (only_incomplete / "checkpoint-000001" / "unet").mkdir(parents=True, exist_ok=True)
    with pytest.raises(FileNotFoundError, match="none is complete"):
        hub.find_checkpoint(only_incomplete)


def test_missing_paths_and_bad_ids_give_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.find_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.resolve_checkpoint("./outputs/nope")
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor a Hub repo id"):
        hub.resolve_checkpoint("not a repo id!")
    with pytest.raises(FileNotFoundError, match="not a LiquidDiffusion checkpoint"):
        hub.resolve_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Export: the folder that is uploaded, and its model card
# ---------------------------------------------------------------------------------------------------------------


def test_export_writes_the_pipeline_with_ema_as_unet_and_raw_weights_alongside(pixel_run, pixel_export):
    files = files_in(pixel_export)
    assert REQUIRED_EXPORT_FILES <= files
    assert not files & VAE_FILES  # pixel space: no VAE
    # weights only as safetensors; no optimizer state, no pickles
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    checkpoint = pixel_run / "checkpoint-000500"
    assert same_weights(pixel_export / "unet", checkpoint / "unet_ema")
    assert same_weights(pixel_export / "unet_raw", checkpoint / "unet")
    # the newest sample grid at or before the checkpoint's step (500, not 750)
    assert (pixel_export / "samples.png").read_bytes() == (pixel_run / "samples" / "step-000500.png").read_bytes()
    assert Image.open(pixel_export / "loss_curve.png").size[0] > 100
    model_index = json.loads((pixel_export / "model_index.json").read_text())
    assert model_index["_class_name"] == "LiquidDiffusionPipeline"
    assert model_index["unet"] == ["liquid_diffusion.model", "LiquidDiffusionUNet"]  # importable by diffusers
    assert model_index["vae"] == [None, None]
    assert model_index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert model_index["resolution"] == 16


def test_export_drops_secrets_from_the_training_config(pixel_export):
    config = json.loads((pixel_export / "train_config.json").read_text())
    assert "hub_token" not in config and config["dataset"] == "anime" and config["push_to_hub"] == "me/liquid"
    for name in files_in(pixel_export):
        assert FAKE_TOKEN.encode() not in (pixel_export / name).read_bytes(), name


def test_model_card_metadata_and_contents(pixel_export):
    card = ModelCard.load(pixel_export / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit"
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert {"liquid-diffusion", "unconditional-image-generation", "rectified-flow", "attention-free"} <= set(
        data["tags"]
    )
    assert data["datasets"] == ["huggan/anime-faces"]  # the trainer's short name, mapped to its Hub id
    unet = LiquidDiffusionUNet.from_pretrained(pixel_export / "unet")
    parameters = sum(p.numel() for p in unet.parameters())
    text = card.text
    assert "](samples.png)" in text and "](loss_curve.png)" in text
    assert f"{parameters:,}" in text
    assert "| steps trained | 500 |" in text
    assert 'LiquidDiffusionPipeline.from_pretrained("me/liquid-anime")' in text
    assert "python -m liquid_diffusion sample --checkpoint me/liquid-anime" in text


def test_export_refuses_to_write_into_a_non_empty_folder(pixel_run, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        hub.export_checkpoint(pixel_run, tmp_path)


def test_a_failed_export_leaves_nothing_behind(pixel_run, tmp_path):
    import shutil

    checkpoint = shutil.copytree(pixel_run / "checkpoint-000500", tmp_path / "run" / "checkpoint-000500")
    (tmp_path / "empty-vae").mkdir()
    config = json.loads((checkpoint / "train_config.json").read_text())
    config.update(space="latent", vae=str(tmp_path / "empty-vae"))
    (checkpoint / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.export_checkpoint(checkpoint, tmp_path / "exports" / "out")
    assert list((tmp_path / "exports").iterdir()) == []  # no half-written export, no staging folder


def test_latent_export_includes_the_vae_and_the_card_omits_local_datasets(latent_run, latent_export, tiny_vae_dir):
    files = files_in(latent_export)
    assert REQUIRED_EXPORT_FILES - {"unet_raw/config.json"} <= files and VAE_FILES <= files
    assert json.loads((latent_export / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    assert same_weights(latent_export / "vae", Path(tiny_vae_dir))
    card = ModelCard.load(latent_export / "README.md")
    assert card.data.to_dict()["datasets"] == ["huggan/AFHQv2"]
    assert 'from_pretrained("USER/NAME")' in card.text  # no repo id given: a placeholder


# ---------------------------------------------------------------------------------------------------------------
# The pipeline: sampling, round trips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, reference", [("euler", flow.euler_sample), ("heun", flow.heun_sample)])
def test_pipeline_sampling_equals_the_package_sampler_from_the_same_noise(pixel_export, sampler, reference):
    pipe = LiquidDiffusionPipeline.from_pretrained(pixel_export)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    expected = reference(pipe.unet, noise.clone(), 6)
    # from the noise itself and from the same generator
    x = pipe(latents=noise.clone(), num_inference_steps=6, sampler=sampler, output_type="latent").images
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    images = pipe(
        batch_size=2,
        num_inference_steps=6,
        sampler=sampler,
        output_type="pt",
        generator=torch.Generator().manual_seed(7),
    ).images
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_pipeline_returns_pil_numpy_or_tensors(pixel_export):
    pipe = LiquidDiffusionPipeline.from_pretrained(pixel_export)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 3 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
    array = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert array.shape == (2, 16, 16, 3) and array.min() >= 0 and array.max() <= 1
    assert pipe(batch_size=1, num_inference_steps=2, height=32, width=48, output_type="pt").images.shape == (
        1,
        3,
        32,
        48,
    )
    with pytest.raises(ValueError, match="sampler"):
        pipe(num_inference_steps=2, sampler="rk4")
    with pytest.raises(ValueError, match="divisible"):
        pipe(num_inference_steps=2, height=15)
    # any other flow-matching scheduler runs its own loop
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    heun = pipe(batch_size=1, num_inference_steps=3, output_type="pt").images
    assert heun.shape == (1, 3, 16, 16) and torch.isfinite(heun).all()


def test_pixel_pipeline_save_and_load_round_trip(pixel_run, tmp_path):
    pipe = hub.build_pipeline(pixel_run)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "saved")
    assert not list((tmp_path / "saved").rglob("*.bin"))
    loaded = LiquidDiffusionPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and loaded.config.resolution == 16
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    a = pipe(batch_size=2, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(1))
    b = loaded(batch_size=2, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(1))
    # weights bit-exact; images to a tight tolerance (memory-mapped weights take other CPU kernel paths, ~1e-7)
    a_state, b_state = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
    # weights are read from safetensors only: a pickled save does not load
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert list((tmp_path / "pickled").rglob("*.bin"))
    with pytest.raises(EnvironmentError):
        LiquidDiffusionPipeline.from_pretrained(tmp_path / "pickled")


def test_latent_pipeline_decodes_through_the_vae_and_round_trips(latent_run, latent_export):
    pipe = LiquidDiffusionPipeline.from_pretrained(latent_export)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae_scale_factor == 8
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))  # 32 px / 8
    latents = flow.euler_sample(pipe.unet, noise.clone(), 4)
    expected = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    images = pipe(latents=noise.clone(), num_inference_steps=4, output_type="pt").images
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    # the same checkpoint built directly (without export) samples the same images
    built = hub.build_pipeline(latent_run)
    built.set_progress_bar_config(disable=True)
    again = built(latents=noise.clone(), num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(again, images, atol=1e-5, rtol=0)
    # an fp16 VAE is upcast before decoding, never run in fp16
    pipe.vae.to(torch.float16)
    pipe(batch_size=1, num_inference_steps=1, output_type="pt")
    assert pipe.vae.dtype == torch.float32


def test_load_pipeline_takes_exports_checkpoints_and_raw_weights(pixel_run, pixel_export):
    from_export = hub.load_pipeline(pixel_export)
    from_checkpoint = hub.load_pipeline(pixel_run)
    raw = hub.load_pipeline(pixel_export, use_ema=False)
    state = lambda pipe: pipe.unet.state_dict()  # noqa: E731
    assert all(torch.equal(v, state(from_checkpoint)[k]) for k, v in state(from_export).items())
    raw_reference = LiquidDiffusionUNet.from_pretrained(pixel_run / "checkpoint-000500" / "unet").state_dict()
    assert all(torch.equal(v, raw_reference[k]) for k, v in state(raw).items())


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
    url = hub.push_to_hub(pixel_run, "me/liquid-anime", private=True, token=FAKE_TOKEN)
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
        hub.push_to_hub(pixel_run, "me/liquid-anime", token=FAKE_TOKEN)
    assert FAKE_TOKEN not in str(info.value) and "\n" not in str(info.value)


def test_push_rejects_bad_repo_ids_before_any_work(fake_hub, pixel_run):
    for bad in ("no-namespace", "a/b/c", "me/bad--name"):
        with pytest.raises(ValueError, match="USER/NAME"):
            hub.push_to_hub(pixel_run, bad)
    assert fake_hub.instances == []


# ---------------------------------------------------------------------------------------------------------------
# Background pushes during training
# ---------------------------------------------------------------------------------------------------------------


def test_hub_pusher_retries_with_backoff_and_then_succeeds(fake_hub, pixel_run):
    fake_hub.upload_errors = [ConnectionError("network down"), ConnectionError("still down")]
    successes = []
    pusher = hub.HubPusher(
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
    pusher = hub.HubPusher(
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
    pusher = hub.HubPusher("me/liquid", backoff_s=0)
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
    from liquid_diffusion.trainer import TrainConfig, Trainer

    config = TrainConfig(dataset=str(clean_image_folder), space="pixel", preset="micro", resolution=16, batch_size=4,
                         steps=6, checkpoint_every=2, push_to_hub="me/liquid-micro", push_every=2, log_every=2,
                         sample_every=2, num_sample_images=4, sample_steps=2, num_workers=0, shuffle_buffer=8,
                         output_dir=str(tmp_path), progress_bar=False)
    Trainer(config).train()  # returns only after the background pusher has finished

    uploads = [upload for api in fake_hub.instances for upload in api.uploads]
    # checkpoints at steps 2, 4 and 6: every 2nd one (step 4) and always the final one (step 6); when the upload of
    # step 4 is still queued as step 6 arrives, only the newest is pushed
    pushed = [int(u["commit_message"].rsplit(" ", 1)[-1]) for u in uploads]
    assert pushed in ([4, 6], [6]), pushed
    assert all(u["repo_id"] == "me/liquid-micro" for u in uploads)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md"} <= set(uploads[0]["files"])
    assert not list(tmp_path.glob(".hub-push-*"))  # staging folders cleaned up
