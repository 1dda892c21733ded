"""Specification of the validation loss: held-out images that training never sees, scored at fixed t and noise, in
metrics.jsonl, the progress line, best.json, the notebook's curves and the model card (issue: what users run is what
we measure)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_trainer import RES, pixel_config

from liquid_diffusion.latents import FrozenVAE, build_latent_cache, load_latent_cache
from liquid_diffusion.model_card import build_model_card, read_metrics
from liquid_diffusion.trainer import Trainer
from liquid_diffusion.validation import VALIDATION_T, Validator, choose_holdout

NUM_IMAGES = 60


def colour_of(index: int) -> tuple[int, int, int]:
    """A colour unique to image ``index`` (so a batch says which images it holds)."""
    return (index * 4 % 256, 40 + index * 3 % 200, 255 - index * 2)


def identify(batch: torch.Tensor) -> set[int]:
    """The indices of the solid-colour images in a [-1, 1] batch."""
    lookup = {colour_of(i): i for i in range(NUM_IMAGES)}
    pixels = ((batch[:, :, 0, 0] + 1) * 127.5).round().int().tolist()
    return {lookup[tuple(p)] for p in pixels}


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("colours")
    for i in range(NUM_IMAGES):
        Image.new("RGB", (RES, RES), colour_of(i)).save(folder / f"{i:03d}.png")
    return folder


def held_out_indices(folder: Path, count: int) -> set[int]:
    holdout = choose_holdout(str(folder), count)
    return {int(Path(path).stem) for path in holdout.files}


def val_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]


# ------------------------------------------------------------------------------------------------ the held-out set


def test_a_folder_holds_out_a_fixed_hashed_choice_of_at_most_a_tenth_of_its_images(colour_folder, tmp_path):
    first = choose_holdout(str(colour_folder), 256)
    assert first.kind == "files" and len(first.files) == NUM_IMAGES // 10  # capped at 10 % of the folder
    assert "6 of the 60 images" in first.description and "hash of their paths" in first.description
    assert choose_holdout(str(colour_folder), 256) == first  # no seed: the same choice every time
    assert len(choose_holdout(str(colour_folder), 3).files) == 3
    assert held_out_indices(colour_folder, 3) <= held_out_indices(colour_folder, 6)  # lowest hashes first
    assert choose_holdout(str(colour_folder), 0) is None
    small = tmp_path / "small"
    small.mkdir()
    for i in range(9):
        Image.new("RGB", (RES, RES), colour_of(i)).save(small / f"{i}.png")
    assert choose_holdout(str(small), 256) is None  # 10 % of 9 images is no image


def test_held_out_images_never_reach_a_training_batch_and_are_the_validation_set(colour_folder, tmp_path):
    config = pixel_config(colour_folder, tmp_path / "run", batch_size=8, validation_images=6)
    trainer = Trainer(config)
    trainer._start_run()
    held_out = held_out_indices(colour_folder, 6)
    seen = set()
    batches = trainer._batches()
    for _ in range(3 * NUM_IMAGES // 8):  # three epochs
        seen |= identify(next(batches))
    assert seen == set(range(NUM_IMAGES)) - held_out
    assert identify(trainer.validator.x0) == held_out
    assert len(trainer.validator) == 6


def test_a_latent_cache_leaves_the_held_out_images_out(colour_folder, tiny_vae_dir, tmp_path):
    vae = FrozenVAE(str(tiny_vae_dir))
    holdout = choose_holdout(str(colour_folder), 6)
    cache = build_latent_cache(
        str(colour_folder), vae, tmp_path / "cache", 32, flip=False, progress=False, holdout=holdout
    )
    latents, metadata = load_latent_cache(cache)
    assert metadata["num_images"] == NUM_IMAGES - 6 and len(latents) == NUM_IMAGES - 6
    assert metadata["held_out"] == holdout.key()
    every = build_latent_cache(str(colour_folder), vae, tmp_path / "all", 32, flip=False, progress=False)
    all_latents, _ = load_latent_cache(every)
    held_latents = vae.encode(
        torch.stack(
            [
                torch.tensor(colour_of(i), dtype=torch.float32)[:, None, None].expand(3, 32, 32) / 127.5 - 1
                for i in sorted(held_out_indices(colour_folder, 6))
            ]
        )
    )
    cached = latents.float()
    for latent in held_latents:  # no cached latent is a held-out image's
        assert (cached - latent).flatten(1).abs().max(1).values.min() > 1e-3
    assert len(all_latents) == NUM_IMAGES
    with pytest.raises(ValueError, match="held out: none"):  # a cache made without the hold-out is not reused
        build_latent_cache(str(colour_folder), vae, every, 32, flip=False, progress=False, holdout=holdout)


def test_a_dataset_with_a_test_split_holds_that_split_out(tmp_path):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    root = tmp_path / "hub_layout"
    (root / "data").mkdir(parents=True)
    features = Features({"image": ImageFeature()})
    for split, start in (("train", 0), ("test", 40)):
        images = [Image.new("RGB", (RES, RES), colour_of(i)) for i in range(start, start + 10)]
        Dataset.from_dict({"image": images}, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    holdout = choose_holdout(str(root), 256)
    assert holdout.kind == "split" and holdout.split == "test" and "'test' split" in holdout.description
    trainer = Trainer(pixel_config(root, tmp_path / "run", validation_images=4))
    trainer._start_run()
    assert identify(trainer.validator.x0) == {40, 41, 42, 43}
    assert identify(next(trainer._batches())) <= set(range(10))


def test_a_dataset_without_a_held_out_split_holds_out_rows_by_a_hash_of_their_content(parquet_dataset, tmp_path):
    holdout = choose_holdout(str(parquet_dataset), 3)
    assert holdout.kind == "hashed" and math.isclose(holdout.fraction, 0.3)
    from liquid_diffusion.sources import open_source

    train = [row["image"]["bytes"] for row in open_source(str(parquet_dataset), holdout=holdout)[0]]
    held = [row["image"]["bytes"] for row in open_source(str(parquet_dataset), holdout=holdout, part="validation")[0]]
    assert len(train) + len(held) == 10 and held and not set(train) & set(held)


# ------------------------------------------------------------------------------------------------ the loss


def test_the_validation_loss_is_the_flow_loss_at_fixed_t_and_noise():
    torch.manual_seed(0)
    x0 = torch.randn(16, 3, 8, 8)
    validator = Validator(x0, batch_size=16)
    assert sorted(set(validator.t.tolist())) == pytest.approx(sorted(VALIDATION_T))

    def perfect(x, t):  # v = noise - x0 exactly, for these images
        return validator.noise - x0

    loss, per_t = validator.loss(perfect)
    assert loss == pytest.approx(0.0, abs=1e-10) and len(per_t) == len(VALIDATION_T)
    validator.batch_size = 5  # in several forward passes
    zero = validator.loss(lambda x, t: torch.zeros_like(x))[0]
    assert zero == pytest.approx(((validator.noise - x0) ** 2).mean().item(), rel=1e-5)
    assert Validator(x0).noise.equal(validator.noise)  # the same noise in every run


def test_class_conditional_validation_scores_the_conditional_loss():
    x0 = torch.zeros(4, 3, 4, 4)
    labels = torch.tensor([0, 1, 0, 1])
    seen = []

    def model(x, t, class_labels=None):
        seen.append(class_labels)
        return torch.zeros_like(x)

    Validator(x0, labels, batch_size=2).loss(model)
    assert torch.cat(seen).tolist() == [0, 1, 0, 1]


def test_training_records_the_validation_loss_of_the_ema_and_raw_weights_and_picks_best_by_it(
    colour_folder, tmp_path, capsys
):
    out = tmp_path / "run"
    Trainer(
        pixel_config(colour_folder, out, steps=4, validation_every=2, checkpoint_every=2, keep_checkpoints=1)
    ).train()
    log = capsys.readouterr()
    assert "validation: 6 of the 60 images" in log.out and "never trained on" in log.out
    assert "val_loss=" in log.err  # on the progress line
    records = val_records(out)
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert set(record["val_loss_t"]) == {f"{t:g}" for t in VALIDATION_T[:6]}  # 6 images: the first 6 t
        assert record["val_images"] == 6 and record["val_loss"] > 0 and record["val_loss_raw"] > 0
        assert record["val_time_s"] >= 0
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "val_loss"
    best_record = min(records, key=lambda r: r["val_loss"])
    assert best["step"] == best_record["step"] and best["val_loss"] == best_record["val_loss"]
    assert (out / best["checkpoint"]).is_dir()  # kept by pruning (keep 1)


def test_a_resumed_run_draws_the_same_validation_curve_as_an_uninterrupted_one(colour_folder, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    Trainer(pixel_config(colour_folder, whole, steps=6, validation_every=2, checkpoint_every=2)).train()
    Trainer(pixel_config(colour_folder, split, steps=3, validation_every=2, checkpoint_every=2)).train()
    Trainer(
        pixel_config(colour_folder, split, steps=6, validation_every=2, checkpoint_every=2, resume="latest")
    ).train()
    curve = {r["step"]: (r["val_loss"], r["val_loss_raw"]) for r in val_records(whole)}
    resumed = {r["step"]: (r["val_loss"], r["val_loss_raw"]) for r in val_records(split) if r["step"] != 3}
    assert set(curve) == {2, 4, 6}
    assert resumed == curve  # exactly: same weights, same held-out images, same t and noise


def test_validation_off_or_impossible_never_stops_training(colour_folder, tmp_path, capsys):
    Trainer(pixel_config(colour_folder, tmp_path / "off", steps=2, validation_images=0)).train()
    assert val_records(tmp_path / "off") == []
    small = tmp_path / "small"
    small.mkdir()
    for i in range(8):
        Image.new("RGB", (RES, RES), colour_of(i)).save(small / f"{i}.png")
    Trainer(pixel_config(small, tmp_path / "small_run", steps=2, batch_size=4)).train()
    assert "validation is off" in capsys.readouterr().out
    assert val_records(tmp_path / "small_run") == []


def test_the_model_card_states_the_validation_loss_with_its_protocol():
    records = [
        {"step": 100, "loss": 0.5},
        {"step": 100, "val_loss": 0.41234, "val_loss_raw": 0.45, "val_images": 256},
        {"step": 200, "val_loss": 0.3, "val_loss_raw": 0.31, "val_images": 256},
    ]
    card = str(
        build_model_card(
            train_config={"space": "pixel", "resolution": 32}, step=150, num_parameters=10, records=records
        )
    )
    assert "0.4123 with the EMA weights, 0.4500 raw, at step 100" in card
    assert "256 held-out images never trained on" in card and "fixed noise" in card
    none = str(build_model_card(train_config={}, step=1, num_parameters=1, records=[]))
    assert "no validation was run" in none


def test_a_latent_cache_made_without_held_out_images_trains_with_validation_off(
    colour_folder, tiny_vae_dir, tmp_path, capsys
):
    vae = FrozenVAE(str(tiny_vae_dir))
    cache = build_latent_cache(str(colour_folder), vae, tmp_path / "old-cache", 32, progress=False)
    out = tmp_path / "run"
    Trainer(
        pixel_config(
            colour_folder,
            out,
            space="latent",
            vae=str(tiny_vae_dir),
            resolution=32,
            cache_latents=True,
            cache_dir=str(cache),
            steps=2,
        )
    ).train()
    assert "was made without held-out images, so validation is off for this run" in capsys.readouterr().out
    assert val_records(out) == []
