"""Specification of the local export: a training checkpoint as a diffusers pipeline folder with a model card, and
the pipeline built or loaded back from checkpoints and exports -- all offline.

The fake training runs (``pixel_run``, ``latent_run``) and their exports come from ``conftest.py``: checkpoints in
the trainer's exact layout with a micro U-Net in pixel space and, in latent space, the tiny VAE of ``conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from conftest import FAKE_TOKEN, REQUIRED_EXPORT_FILES, VAE_FILES, files_in
from liquid_diffusion import LiquidDiffusionPipeline, LiquidDiffusionUNet, flow
from liquid_diffusion.export import build_pipeline, export_checkpoint, pipeline_from_folder


def same_weights(folder_a: Path, folder_b: Path) -> bool:
    a = load_file(folder_a / "diffusion_pytorch_model.safetensors")
    b = load_file(folder_b / "diffusion_pytorch_model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
        export_checkpoint(pixel_run, tmp_path)


def test_an_out_that_is_a_file_is_refused_in_one_line_and_kept_even_with_overwrite(pixel_run, tmp_path, capsys):
    from liquid_diffusion.__main__ import main

    target = tmp_path / "notes.txt"
    target.write_text("user data")
    for extra in ([], ["--overwrite"]):
        assert main(["export", "--checkpoint", str(pixel_run), "--out", str(target), *extra]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "user data"


def test_a_failed_export_leaves_nothing_behind(pixel_run, tmp_path):
    import shutil

    checkpoint = shutil.copytree(pixel_run / "checkpoint-000500", tmp_path / "run" / "checkpoint-000500")
    (tmp_path / "empty-vae").mkdir()
    config = json.loads((checkpoint / "train_config.json").read_text())
    config.update(space="latent", vae=str(tmp_path / "empty-vae"))
    (checkpoint / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_checkpoint(checkpoint, tmp_path / "exports" / "out")
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
    pipe = build_pipeline(pixel_run)
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
    built = build_pipeline(latent_run)
    built.set_progress_bar_config(disable=True)
    again = built(latents=noise.clone(), num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(again, images, atol=1e-5, rtol=0)
    # an fp16 VAE is upcast before decoding, never run in fp16
    pipe.vae.to(torch.float16)
    pipe(batch_size=1, num_inference_steps=1, output_type="pt")
    assert pipe.vae.dtype == torch.float32


def test_pipeline_from_folder_takes_exports_checkpoints_and_raw_weights(pixel_run, pixel_export):
    from_export = pipeline_from_folder(pixel_export)
    from_checkpoint = pipeline_from_folder(pixel_run)
    raw = pipeline_from_folder(pixel_export, use_ema=False)
    state = lambda pipe: pipe.unet.state_dict()  # noqa: E731
    assert all(torch.equal(v, state(from_checkpoint)[k]) for k, v in state(from_export).items())
    raw_reference = LiquidDiffusionUNet.from_pretrained(pixel_run / "checkpoint-000500" / "unet").state_dict()
    assert all(torch.equal(v, raw_reference[k]) for k, v in state(raw).items())
