"""Specification of the data path (issue 3), offline: sources, transforms, bad files, order and scale-out,
the frozen VAE, the latent cache and the ``preview`` command.

Fixtures (``image_folder``, ``parquet_dataset``, ``tiny_vae_dir``, ...) come from ``conftest.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_FOLDER_CORRUPT, IMAGE_FOLDER_GOOD, IMAGE_FOLDER_TINY
from liquid_diffusion.data import ImageBatchStream, load_image, make_dataloader, transform_image
from liquid_diffusion.latents import FrozenVAE, LatentBatchStream, build_latent_cache, load_latent_cache
from liquid_diffusion.sources import DATASETS, DEFAULT_DATASET, resolve_source


def one_epoch(source, resolution=32, **kwargs) -> torch.Tensor:
    """All images of one unshuffled, unflipped epoch as one tensor."""
    options = dict(shuffle_buffer=0, flip=False, num_epochs=1) | kwargs
    return torch.cat(list(ImageBatchStream(str(source), resolution, 64, **options)))


def take(stream, n: int) -> list[torch.Tensor]:
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


def fingerprints(pixels: torch.Tensor) -> list[float]:
    """One number per image, to compare which images a stream delivered (images are all distinct)."""
    return [round(float(x), 3) for x in pixels.double().flatten(1).mul(torch.arange(pixels[0].numel()) % 7).sum(1)]


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def test_the_six_verified_datasets_have_short_names_and_afhq_is_the_default():
    assert DATASETS == {
        "afhq": "huggan/AFHQv2",
        "celeba": "nielsr/CelebA-faces",
        "flowers": "huggan/flowers-102-categories",
        "pokemon": "reach-vb/pokemon-blip-captions",
        "anime": "huggan/anime-faces",
        "cartoon": "Norod78/cartoon-blip-captions",
    }
    assert DEFAULT_DATASET == "huggan/AFHQv2"
    assert resolve_source("celeba") == ("hub", "nielsr/CelebA-faces")
    assert resolve_source("someone/their-images") == ("hub", "someone/their-images")


def test_local_paths_are_local_and_unknown_names_are_user_errors(image_folder, parquet_dataset, tmp_path):
    assert resolve_source(str(image_folder)) == ("imagefolder", str(image_folder))
    assert resolve_source(str(parquet_dataset)) == ("dataset_dir", str(parquet_dataset))
    with pytest.raises(ValueError, match="afhq, celeba, flowers, pokemon, anime, cartoon"):
        resolve_source("afhqq")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no image files"):
        ImageBatchStream(str(tmp_path), 32, 4)  # an empty folder


def test_folder_with_mixed_modes_and_bad_files_streams_every_good_image(image_folder):
    stream = ImageBatchStream(str(image_folder), 32, 64, shuffle_buffer=0, num_epochs=1)
    (pixels,) = list(stream)  # notes.txt is not an image file and is never read
    assert pixels.shape == (IMAGE_FOLDER_GOOD, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert (stream.stats.read, stream.stats.skipped, stream.stats.upscaled) == (
        IMAGE_FOLDER_GOOD + IMAGE_FOLDER_CORRUPT,
        IMAGE_FOLDER_CORRUPT,
        IMAGE_FOLDER_TINY,
    )


def test_parquet_dataset_in_hub_layout_streams_through_load_dataset(parquet_dataset):
    pixels = one_epoch(parquet_dataset, 16)
    assert pixels.shape == (10, 3, 16, 16)
    assert len(set(fingerprints(pixels))) == 10


def test_image_column_comes_from_the_features_or_the_error_says_how_to_name_it(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    picture = tmp_path / "picture" / "data"
    picture.mkdir(parents=True)
    features = Features({"caption": Value("string"), "picture": ImageFeature()})
    images = [Image.new("RGB", (20, 20), (i * 40, 0, 0)) for i in range(3)]
    Dataset.from_dict({"caption": ["a", "b", "c"], "picture": images}, features=features).to_parquet(
        str(picture / "train-00000-of-00001.parquet")
    )
    stream = ImageBatchStream(str(picture.parent), 16, 8, shuffle_buffer=0, num_epochs=1)
    assert stream.image_column == "picture" and next(iter(stream)).shape == (3, 3, 16, 16)

    text_only = tmp_path / "text" / "data"
    text_only.mkdir(parents=True)
    Dataset.from_dict({"caption": ["a"], "label": [1]}).to_parquet(str(text_only / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"no image column \(columns: caption, label\).*--image-column"):
        ImageBatchStream(str(text_only.parent), 16, 8)
    with pytest.raises(ValueError, match="no column 'photo'"):
        ImageBatchStream(str(picture.parent), 16, 8, image_column="photo")


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


def test_any_mode_becomes_rgb_with_alpha_composited_on_white(image_folder):
    rgba, _ = load_image(str(image_folder / "rgba.png"))  # left half fully transparent
    assert rgba.mode == "RGB" and np.asarray(rgba)[:, :24].min() == 255
    gray16, _ = load_image(str(image_folder / "gray16.png"))  # 16-bit: scaled down, not clipped to white
    reference = np.asarray(Image.open(image_folder / "gray16.png"), dtype=np.float64) / 257
    assert np.abs(np.asarray(gray16)[..., 0] - reference).max() <= 1
    for name in ["cmyk.jpg", "dogs/palette.gif", "dogs/gray_alpha.png", "dogs/palette_transparent.png"]:
        assert load_image(str(image_folder / name))[0].mode == "RGB"


def test_shorter_side_resized_then_center_crop_then_seeded_flip():
    left_dark = np.zeros((40, 80, 3), np.uint8)
    left_dark[:, 40:] = 255  # 80x40, dark left half
    image = Image.fromarray(left_dark)
    center = transform_image(image, 20)  # -> 40x20, center crop keeps columns 10..30 of the resized image
    assert center.shape == (3, 20, 20)
    assert center[:, :, :8].max() == -1 and center[:, :, 12:].min() == 1
    flips = [transform_image(image, 20, flip=True, rng=np.random.default_rng(s))[0, 0, 0].item() for s in range(16)]
    assert set(flips) == {-1.0, 1.0}  # some flipped, some not, decided by the rng
    crops = {
        transform_image(image, 20, random_crop=True, rng=np.random.default_rng(s))[0].mean().item() for s in range(8)
    }
    assert len(crops) > 1


# ----------------------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------------------


def test_a_source_with_no_usable_image_fails_with_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "b.jpg").write_text("not a jpeg")
    with pytest.raises(ValueError, match=rf"{tmp_path.name}.*no usable image"):
        next(iter(ImageBatchStream(str(tmp_path), 32, 4)))  # endless stream: must fail, not spin


# ----------------------------------------------------------------------------------------------------------------
# Order and scale-out
# ----------------------------------------------------------------------------------------------------------------


def test_endless_epochs_reshuffle_and_cover_the_data(parquet_dataset):
    stream = ImageBatchStream(str(parquet_dataset), 16, 5, shuffle_buffer=100, flip=False, seed=3)
    batches = take(stream, 4)  # 10 images: batches 0-1 are epoch 0, 2-3 epoch 1
    epoch0, epoch1 = fingerprints(torch.cat(batches[:2])), fingerprints(torch.cat(batches[2:]))
    assert sorted(epoch0) == sorted(epoch1) == sorted(fingerprints(one_epoch(parquet_dataset, 16)))
    assert epoch0 != epoch1
    again = take(ImageBatchStream(str(parquet_dataset), 16, 5, shuffle_buffer=100, flip=False, seed=3), 4)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # same seed, same stream


@pytest.mark.parametrize("start_batch", [5, 13])  # inside epoch 1; epoch 3 (whole epochs skipped by counting)
def test_start_batch_resumes_exactly_across_epochs_with_flips_and_crops(image_folder, start_batch):
    options = dict(shuffle_buffer=100, seed=7, random_crop=True, flip=True)
    full = take(ImageBatchStream(str(image_folder), 24, 4, **options), start_batch + 4)  # 15 items per epoch
    resumed = take(ImageBatchStream(str(image_folder), 24, 4, start_batch=start_batch, **options), 4)
    assert all(torch.equal(a, b) for a, b in zip(full[start_batch:], resumed))


def test_node_splits_are_disjoint_and_cover_the_data(clean_image_folder):
    everything = fingerprints(one_epoch(clean_image_folder, 16))
    shares = [
        fingerprints(one_epoch(clean_image_folder, 16, process_index=rank, num_processes=3, shuffle_buffer=64, seed=1))
        for rank in range(3)
    ]
    assert sum(len(share) for share in shares) == len(everything) == 32
    assert sorted(sum(shares, [])) == sorted(everything)


def test_node_splits_by_shard_when_the_shards_divide_evenly(tmp_path):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    (tmp_path / "data").mkdir()
    for shard in range(2):
        images = [Image.new("RGB", (16, 16), (shard * 100 + i * 10, 50, 50)) for i in range(5)]
        Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()})).to_parquet(
            str(tmp_path / "data" / f"train-0000{shard}-of-00002.parquet")
        )
    shares = [fingerprints(one_epoch(tmp_path, 8, process_index=rank, num_processes=2)) for rank in range(2)]
    assert [len(share) for share in shares] == [5, 5]
    assert sorted(sum(shares, [])) == sorted(fingerprints(one_epoch(tmp_path, 8)))


def test_dataloader_workers_split_batches_without_duplicates(image_folder):
    options = dict(shuffle_buffer=100, seed=2)
    reference = take(ImageBatchStream(str(image_folder), 16, 3, start_batch=1, **options), 8)
    with_workers = take(make_dataloader(ImageBatchStream(str(image_folder), 16, 3, start_batch=1, **options), 2), 8)
    assert all(torch.equal(a, b) for a, b in zip(reference, with_workers))


# ----------------------------------------------------------------------------------------------------------------
# Frozen VAE and latent cache
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae(tiny_vae_dir):
    return FrozenVAE(str(tiny_vae_dir))


def test_frozen_vae_encodes_the_scaled_posterior_mean_never_in_fp16(vae, tiny_vae_dir):
    assert (vae.scaling_factor, vae.latent_channels, vae.downsample_factor) == (0.18215, 4, 8)
    assert not any(p.requires_grad for p in vae.vae.parameters()) and not vae.vae.training
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (3, 4, 4, 4) and latents.dtype == torch.float32
    with torch.no_grad():
        expected = vae.vae.encode(pixels).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, expected)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(vae.encode(pixels), latents)
    assert vae.decode(latents).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="float32 or torch.bfloat16"):
        FrozenVAE(str(tiny_vae_dir), dtype=torch.float16)


def test_cache_round_trip_equals_direct_encoding(vae, tiny_vae_dir, image_folder, tmp_path):
    cache = build_latent_cache(str(image_folder), vae, tmp_path / "fp32", 32, dtype=torch.float32, progress=False)
    latents, metadata = load_latent_cache(cache, vae_id=str(tiny_vae_dir), resolution=32)
    pixels = one_epoch(image_folder, 32)
    n = len(pixels)
    assert latents.shape == (2 * n, 4, 4, 4)
    assert torch.equal(latents[:n], vae.encode(pixels))
    assert torch.equal(latents[n:], vae.encode(pixels.flip(-1)))  # flipped copies
    assert metadata["num_images"] == n and metadata["resolution"] == 32 and metadata["vae"] == str(tiny_vae_dir)
    assert metadata["stats"] == {"read": n + IMAGE_FOLDER_CORRUPT, "skipped": IMAGE_FOLDER_CORRUPT, "upscaled": 1}

    first5, meta5 = load_latent_cache(
        build_latent_cache(str(image_folder), vae, tmp_path / "fp16", 32, num_images=5, flip=False, progress=False)
    )
    assert first5.dtype == torch.float16 and meta5["num_latents"] == 5
    torch.testing.assert_close(first5.float(), latents[:5], rtol=2e-3, atol=2e-3)


def test_cache_made_for_another_vae_or_resolution_is_refused(vae, image_folder, tmp_path):
    cache = build_latent_cache(str(image_folder), vae, tmp_path / "cache", 16, num_images=4, progress=False)
    with pytest.raises(ValueError, match="made with VAE .* not 'stabilityai/sd-vae-ft-mse'"):
        load_latent_cache(cache, vae_id="stabilityai/sd-vae-ft-mse")
    with pytest.raises(ValueError, match="resolution 16, not 32"):
        LatentBatchStream(cache, 2, resolution=32)
    with pytest.raises(ValueError, match="holds .* not 'afhq'"):
        load_latent_cache(cache, source="afhq")
    load_latent_cache(cache, source=str(image_folder) + "/", resolution=16)  # the same folder, spelled differently
    with pytest.raises(ValueError, match="already holds a different latent cache"):
        build_latent_cache(str(image_folder), vae, cache, 32, num_images=4, progress=False)
    assert build_latent_cache(str(image_folder), vae, cache, 16, num_images=4, progress=False) == cache  # reused
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        load_latent_cache(tmp_path / "nowhere")


def test_latent_stream_resumes_splits_processes_and_workers_like_the_image_stream():
    latents = torch.arange(11.0).view(11, 1, 1, 1).expand(11, 4, 2, 2).contiguous()
    ids = lambda batches: [int(x) for b in batches for x in b[:, 0, 0, 0]]  # noqa: E731
    full = take(LatentBatchStream(latents, 4, seed=5), 6)
    assert [len(b) for b in full] == [4] * 6 and full[0].dtype == torch.float32
    stream = ids(full)
    assert sorted(stream[:11]) == sorted(stream[11:22]) == list(range(11)) and stream[:11] != stream[11:22]
    assert ids(take(LatentBatchStream(latents, 4, seed=5, start_batch=3), 3)) == ids(full[3:])
    assert ids(take(make_dataloader(LatentBatchStream(latents, 4, seed=5, start_batch=1), 2), 5)) == ids(full[1:])
    shares = [
        ids(take(LatentBatchStream(latents, 1, seed=5, process_index=p, num_processes=3), 4 - (p == 2)))
        for p in range(3)
    ]
    assert sorted(sum(shares, [])) == list(range(11))
