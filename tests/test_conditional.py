"""Specification of class-conditional training with classifier-free guidance (issue 14).

A two-class image folder (red discs vs blue squares, one sub-folder per class) trains a micro pixel-space model
conditionally; its samples of each class must land nearer that class's mean colour, while the model's unconditional
(null-class) samples from the same noise mix both classes. Around it: the label embedding, the guidance formula,
label detection, the latent cache, resume, the sample command, the pipeline and the model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from liquid_diffusion import LiquidDiffusionPipeline, evaluate, flow
from liquid_diffusion.__main__ import main
from liquid_diffusion.checkpoints import list_checkpoints
from liquid_diffusion.config import TrainConfig
from liquid_diffusion.data import ImageBatchStream
from liquid_diffusion.export import export_checkpoint
from liquid_diffusion.model import LiquidDiffusionUNet
from liquid_diffusion.sampling import generate, load_for_sampling
from liquid_diffusion.sources import LABEL_KEY, class_names, open_source
from liquid_diffusion.trainer import Trainer

CLASSES = ["blue_square", "red_disc"]  # imagefolder sorts the sub-folder names
RES = 8  # micro in pixel space needs a multiple of 4; colour is all these tests look at
# Version 3's FilterSkip fits the linear part of v first, and the label steers the colour later: after 80 steps on
# these 8x8 images the unguided samples were nearer their own class 44-69 % of the time (v2: 88-100 %), after 160
# 94-100 % (both versions: 100 % after 240). 160 steps keep the test about behaviour, not about the first few steps.
STEPS = 160


def _shape_image(kind: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A red disc or a blue square at a random place and size on a dark grey background, uint8 [size, size, 3]."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    image = np.full((size, size, 3), 0.35) + rng.uniform(-0.05, 0.05, 3)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.25, 0.35) * size
    if kind == "red_disc":
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = (0.9, 0.1, 0.1)
    else:
        image[(abs(xx - cx) < r) & (abs(yy - cy) < r)] = (0.1, 0.15, 0.9)
    return (image * 255).round().astype(np.uint8)


def write_class_folder(root: Path, kinds=("red_disc", "blue_square"), per_class: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = kind if kind in ("red_disc", "blue_square") else "blue_square"
            image = _shape_image(shape, rng)
            if kind not in ("red_disc", "blue_square"):  # any further class: a green square
                image = image[..., [1, 2, 0]]
            Image.fromarray(image).save(root / kind / f"{i:02d}.png")
    return root


def class_mean_colours(root: Path) -> torch.Tensor:
    """[2, 3] mean RGB in [-1, 1] of each class (rows in CLASSES order), as training sees them after resizing."""
    stream = ImageBatchStream(str(root), RES, 64, shuffle_buffer=0, flip=False, num_epochs=1, with_labels=True)
    pixels, labels = next(iter(stream))
    return torch.stack([pixels[labels == k].mean(dim=(0, 2, 3)) for k in range(len(CLASSES))])


def config(folder: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        dataset=str(folder),
        space="pixel",
        preset="micro",
        resolution=RES,
        batch_size=16,
        steps=STEPS,
        lr=3e-3,
        warmup_steps=10,
        ema_decay=0.99,
        log_every=20,
        sample_every=0,
        num_sample_images=4,
        sample_steps=4,
        checkpoint_every=1000,
        num_workers=0,
        output_dir=str(out),
        seed=0,
        class_conditional=True,
        class_dropout=0.2,
        progress_bar=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    return write_class_folder(tmp_path_factory.mktemp("two_classes"))


@pytest.fixture(scope="module")
def conditional_run(class_folder, tmp_path_factory) -> Path:
    """A micro pixel model trained conditionally for ``STEPS`` steps (~30-60 s on one CPU thread); its output dir."""
    out = tmp_path_factory.mktemp("conditional_run")
    Trainer(config(class_folder, out)).train()
    return out


def randomised(model: LiquidDiffusionUNet) -> LiquidDiffusionUNet:
    """Every weight drawn at random: the zero-initialised modulations would otherwise hide the label at init."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


# ------------------------------------------------------------------------------------------------ the model


def test_unconditional_models_are_unchanged_and_refuse_labels():
    model = LiquidDiffusionUNet.from_preset("micro", in_channels=4)
    assert sum(p.numel() for p in model.parameters()) == 1_966_372  # the README's count: no label embedding
    assert model.class_embedder is None and model.null_class is None
    assert model.config.num_classes == 0 and model.config.class_names is None
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional"):
        model.class_ids("cat")


def test_label_embedding_has_a_null_class_and_names_resolve():
    model = randomised(
        LiquidDiffusionUNet.from_preset("micro", in_channels=3, num_classes=3, class_names=["cat", "dog", "wild"])
    )
    embed_dim = model.config.time_embed_dim or 4 * model.config.widths[0]
    assert tuple(model.class_embedder.weight.shape) == (4, embed_dim)  # K + 1 rows, the last one null
    assert model.null_class == 3
    x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 0.4)
    with torch.no_grad():
        by_class = model(x, t, torch.tensor([0, 1, 2])).sample
        unconditional = model(x, t).sample
        null = model(x, t, torch.full((3,), 3)).sample
    assert torch.equal(unconditional, null)  # no labels = the null class
    assert (by_class - null).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every label changes the prediction
    assert model.class_ids("dog").tolist() == [1]
    assert model.class_ids(["wild", 0, "1"]).tolist() == [2, 0, 1]
    for bad in ("horse", 3, -1):
        with pytest.raises(ValueError, match="unknown class"):
            model.class_ids(bad)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        model(x, t, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="match"):
        LiquidDiffusionUNet.from_preset("micro", num_classes=2, class_names=["only-one"])


# ------------------------------------------------------------------------------------------------ guidance


class CountingModel(torch.nn.Module):
    """Records the batch size and labels of every forward pass of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x.shape[0], None if class_labels is None else class_labels.tolist()))
        return self.model(x, t, class_labels)


def test_guidance_one_is_the_conditional_prediction_and_the_formula_covers_every_channel():
    model = randomised(LiquidDiffusionUNet.from_preset("micro", in_channels=4, num_classes=2))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.7, 0.2])
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        v_cond = model(x, t, labels).sample
        v_uncond = model(x, t, torch.full((2,), model.null_class)).sample
        assert torch.equal(flow.guided_velocity(model, labels, 1.0, model.null_class)(x, t), v_cond)
        # guidance runs one batched [cond; uncond] pass, and CPU kernels round differently per batch size
        # (5.7e-6 seen): the formula is checked against the same batched pass, the batch-of-2 results loosely
        nulls = torch.full((2,), model.null_class)
        b_cond, b_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, nulls])).sample.chunk(2)
        torch.testing.assert_close(b_uncond, v_uncond, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            flow.guided_velocity(model, labels, 0.0, model.null_class)(x, t), b_uncond, atol=1e-6, rtol=0
        )
        guided = flow.guided_velocity(model, labels, 3.0, model.null_class)(x, t)
    torch.testing.assert_close(guided, b_uncond + 3.0 * (b_cond - b_uncond), atol=1e-5, rtol=0)
    for channel in range(4):  # all channels guided, the 4th latent channel included
        assert (guided - v_cond)[:, channel].abs().max() > 1e-3, f"channel {channel} is not guided"

    counting = CountingModel(model)
    with torch.no_grad():
        flow.euler_sample(flow.guided_velocity(counting, labels, 3.0, model.null_class), x, 3)
    assert counting.calls == [(4, [0, 1, 2, 2])] * 3  # one batched pass per step: [cond; uncond]
    counting.calls.clear()
    with torch.no_grad():
        flow.heun_sample(flow.guided_velocity(counting, labels, 1.0, model.null_class), x, 2)
    assert counting.calls == [(2, [0, 1])] * 4  # w = 1: plain conditional passes only
    with pytest.raises(ValueError, match="null class"):
        flow.guided_velocity(model, labels, 2.0)


# ------------------------------------------------------------------------------------------------ data


def test_class_label_columns_are_found_or_named(tmp_path, parquet_dataset, class_folder):
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(1)
    rows = {
        "picture": [Image.fromarray(_shape_image("red_disc", rng)) for _ in range(4)],
        "index": [0, 1, 2, 3],
        "species": [0, 1, 1, 0],
    }
    features = Features(
        {"picture": ImageFeature(), "index": Value("int64"), "species": ClassLabel(names=["cat", "dog"])}
    )
    (tmp_path / "data").mkdir()
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))

    dataset, image_column = open_source(str(tmp_path), with_labels=True)
    assert image_column == "picture" and class_names(dataset) == ["cat", "dog"]
    assert [row[LABEL_KEY] for row in dataset] == [0, 1, 1, 0]
    dataset, _ = open_source(str(tmp_path), with_labels=True, label_column="species")
    assert class_names(dataset) == ["cat", "dog"]
    with pytest.raises(ValueError, match="'index' .* is not a ClassLabel column"):
        open_source(str(tmp_path), with_labels=True, label_column="index")
    with pytest.raises(ValueError, match="no column 'kind'"):
        open_source(str(tmp_path), with_labels=True, label_column="kind")
    with pytest.raises(ValueError, match="has no class labels"):
        open_source(str(parquet_dataset), with_labels=True)
    assert list(open_source(str(tmp_path))[0].features) == ["picture"]  # unconditional: the image column only

    # an image folder with one sub-folder per class: names from the folders, labels that match the pictures
    stream = ImageBatchStream(str(class_folder), RES, 8, shuffle_buffer=64, num_epochs=1, with_labels=True)
    assert stream.class_names == CLASSES
    pixels, labels = next(iter(stream))
    red_minus_blue = pixels[:, 0].mean(dim=(1, 2)) - pixels[:, 2].mean(dim=(1, 2))
    assert set(labels.tolist()) == {0, 1}
    assert torch.equal(red_minus_blue > 0, labels == CLASSES.index("red_disc"))


def test_class_conditional_without_labels_is_one_clean_line(clean_image_folder, tmp_path, capsys):
    code = main(
        [
            "train",
            "--dataset",
            str(clean_image_folder),
            "--space",
            "pixel",
            "--preset",
            "micro",
            "--resolution",
            "8",
            "--steps",
            "1",
            "--num-workers",
            "0",
            "--output-dir",
            str(tmp_path),
            "--class-conditional",
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error:") and "has no class labels" in lines[0] and "--class-conditional" in lines[0]
    for flags, message in (
        (["--class-dropout", "1"], "class_dropout < 1"),
        (["--label-column", "kind"], "add --class-conditional"),
    ):
        assert (
            main(
                [
                    "train",
                    "--dataset",
                    str(clean_image_folder),
                    "--space",
                    "pixel",
                    "--preset",
                    "micro",
                    "--resolution",
                    "8",
                    "--output-dir",
                    str(tmp_path),
                    *flags,
                ]
            )
            == 2
        )
        assert message in capsys.readouterr().err


def test_latent_cache_stores_labels_and_conditional_latent_training_runs(class_folder, tiny_vae_dir, tmp_path):
    from liquid_diffusion.latents import FrozenVAE, LatentBatchStream, build_latent_cache, load_latent_labels

    vae = FrozenVAE(str(tiny_vae_dir))
    cache = build_latent_cache(
        str(class_folder), vae, tmp_path / "cache", 32, with_labels=True, progress=False, batch_size=8, shard_size=12
    )
    metadata = json.loads((cache / "metadata.json").read_text())
    assert metadata["class_names"] == CLASSES and metadata["num_images"] == 32 and len(metadata["shards"]) == 2
    source = ImageBatchStream(str(class_folder), 32, 64, shuffle_buffer=0, flip=False, num_epochs=1, with_labels=True)
    expected = next(iter(source))[1]
    labels = load_latent_labels(cache)
    assert labels.dtype == torch.long and torch.equal(labels, torch.cat([expected, expected]))  # + flipped copies
    assert load_file(str(cache / "shard-00000.safetensors"))["labels"].dtype == torch.long

    stream = LatentBatchStream(cache, 8, seed=3, with_labels=True)
    latents, batch_labels = next(iter(stream))
    all_latents = torch.cat(
        [
            load_file(str(cache / s["file"]))[key].float()
            for key in ("latents", "latents_flipped")
            for s in metadata["shards"]
        ]
    )
    rows = [int(torch.argmin((all_latents - z).flatten(1).abs().sum(1))) for z in latents]
    assert batch_labels.tolist() == [labels[r].item() for r in rows]  # every latent keeps its own label
    with pytest.raises(ValueError, match="no class labels"):
        LatentBatchStream(
            build_latent_cache(str(class_folder), vae, tmp_path / "plain", 32, num_images=4, progress=False),
            2,
            with_labels=True,
        )

    run = config(
        class_folder,
        tmp_path / "run",
        space="latent",
        vae=str(tiny_vae_dir),
        resolution=32,
        cache_latents=True,
        cache_dir=str(cache),
        steps=2,
        batch_size=4,
        log_every=1,
    )
    checkpoint = Trainer(run).train()
    assert json.loads((checkpoint / "unet" / "config.json").read_text())["class_names"] == CLASSES
    assert Image.open(checkpoint.parent / "samples" / "step-000002.png").size == (2 * 32, 2 * 32)  # 2 rows x 2


# ------------------------------------------------------------------------------------------------ training


def test_conditional_samples_take_their_class_colour_and_unconditional_ones_cannot(conditional_run, class_folder):
    means = class_mean_colours(class_folder)
    unet, _, resolution = load_for_sampling(str(conditional_run))
    assert unet.config.class_names == CLASSES and resolution == RES

    def nearer_own_and_margin(images, label):
        colour = images.mean(dim=(2, 3))
        distance = torch.cdist(colour, means)  # [N, 2]
        own, other = distance[:, label], distance[:, 1 - label]
        return (own < other).float().mean().item(), (other - own).mean().item()

    n, measured = 16, {}
    for w in (1.0, flow.DEFAULT_GUIDANCE_SCALE, 4.0):
        for label in (0, 1):
            images = generate(
                unet,
                None,
                n,
                10,
                "euler",
                seed=1,
                resolution=RES,
                class_labels=torch.full((n,), label),
                guidance_scale=w,
            )
            measured[w, label] = nearer_own_and_margin(images, label)
    unconditional = generate(unet, None, n, 10, "euler", seed=1, resolution=RES)  # the null class, same noise
    share_blue = nearer_own_and_margin(unconditional, 0)[0]
    print(
        f"\n(fraction nearer own class mean, mean colour-distance margin) by (w, class): {measured}; "
        f"unconditional samples nearer blue_square: {share_blue:.2f}"
    )

    for label in (0, 1):
        fraction, margin = measured[flow.DEFAULT_GUIDANCE_SCALE, label]
        assert fraction >= 0.9 and margin > 0.2, (CLASSES[label], fraction, margin)
        assert measured[1.0, label][0] >= 0.75  # even unguided the label steers the colour
        assert measured[4.0, label][1] > measured[1.0, label][1]  # stronger guidance, further from the other class
    # Without a label, one noise gives one image whatever class is wanted: the same model's unconditional samples
    # are a mixture of both classes, so they cannot follow a request.
    assert 0.15 <= share_blue <= 0.85


def test_resume_with_another_label_set_is_refused(conditional_run, class_folder, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(list_checkpoints(conditional_run)[-1], out / f"checkpoint-{STEPS:06d}")
    three = write_class_folder(tmp_path / "three", kinds=("red_disc", "blue_square", "green_square"), per_class=2)
    with pytest.raises(ValueError, match=r"cannot resume .*blue_square, red_disc\].*green_square") as error:
        Trainer(config(three, out, steps=STEPS + 1, resume="latest")).train()
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"cannot resume .* this run has no classes"):
        Trainer(config(class_folder, out, steps=STEPS + 1, resume="latest", class_conditional=False)).train()


def test_conditional_resume_is_exact(class_folder, tmp_path):
    straight = config(class_folder, tmp_path / "straight", steps=4, batch_size=4, log_every=2, class_dropout=0.5)
    Trainer(straight).train()
    split = config(class_folder, tmp_path / "split", steps=2, batch_size=4, log_every=2, class_dropout=0.5)
    Trainer(split).train()
    split.steps, split.resume = 4, "latest"
    Trainer(split).train()
    for name in ("unet", "unet_ema"):
        a = load_file(str(tmp_path / "straight" / "checkpoint-000004" / name / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "split" / "checkpoint-000004" / name / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"


def test_class_dropout_replaces_that_fraction_with_the_null_class_from_the_step_generator(class_folder, tmp_path):
    trainer = Trainer(config(class_folder, tmp_path, class_dropout=0.25))
    labels = torch.arange(2).repeat(2000)
    trainer.generator.manual_seed(7)
    dropped = trainer._drop_labels(labels)
    trainer.generator.manual_seed(7)
    assert torch.equal(trainer._drop_labels(labels), dropped)  # seeded: resume replays the same drops
    is_null = dropped == 2
    assert 0.22 < is_null.float().mean().item() < 0.28
    assert torch.equal(dropped[~is_null], labels[~is_null])


def test_sample_grids_show_one_row_per_class(conditional_run):
    grid = Image.open(sorted((conditional_run / "samples").glob("step-*.png"))[-1])
    assert grid.size == (2 * RES, 2 * RES)  # 4 images: 2 classes x 2 columns
    pixels = np.asarray(grid, dtype=np.float32)
    rows = [pixels[i * RES : (i + 1) * RES] for i in range(2)]
    blue_row, red_row = (row[..., 2].mean() - row[..., 0].mean() for row in rows)
    assert blue_row > 0 > red_row  # row 0 is blue_square, row 1 red_disc


class MeanColour(torch.nn.Module):
    """A feature extractor for FID's code path: uint8 images [B, 3, H, W] -> their mean colour in [-1, 1], [B, 3]."""

    name = "mean-colour"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3)) / 127.5 - 1


def test_fid_samples_ask_for_every_class_with_guidance(conditional_run, class_folder, tmp_path):
    """FID scores a conditional model as it is used: each sample asks for a class (here uniform, from the seed) with
    guidance; the null class's samples would follow no request (about half would match the asked class)."""
    means = class_mean_colours(class_folder)
    unet, _, _ = load_for_sampling(str(conditional_run))
    n = 32
    colours = evaluate.generated_features(
        unet, None, MeanColour(), n, resolution=RES, steps=10, seed=0, batch_size=12, progress=False
    )
    asked = evaluate.sample_labels(len(CLASSES), n, seed=0)
    assert torch.equal(asked, evaluate.sample_labels(len(CLASSES), n, seed=0))
    assert 0.25 <= asked.float().mean() <= 0.75  # both classes are asked for
    matched = (torch.cdist(colours, means).argmin(dim=1) == asked).float().mean().item()
    print(f"\nFID samples nearer the colour of the class they asked for: {matched:.2f}")
    assert matched >= 0.9

    options = dict(
        num_samples=8,
        steps=2,
        batch_size=4,
        feature_extractor=MeanColour(),
        progress=False,
        reference_root=tmp_path,
        device="cpu",
    )
    assert evaluate.evaluate_checkpoint(conditional_run, **options)["guidance_scale"] == flow.DEFAULT_GUIDANCE_SCALE
    result = evaluate.evaluate_checkpoint(conditional_run, guidance_scale=3.0, **options)
    assert result["guidance_scale"] == 3.0 and "classes as the reference, guidance 3" in evaluate.summary_line(result)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        evaluate.evaluate_checkpoint(conditional_run, guidance_scale=-1.0, **options)


def test_fid_samples_ask_for_each_class_as_often_as_the_reference_images(
    conditional_run, tmp_path, monkeypatch, capsys
):
    """On an imbalanced dataset uniform labels would be scored against a set they do not match: the generated
    images take the reference images' classes (mapped by name, shuffled), and fall back to uniform with a warning
    when the dataset has no classes."""
    imbalanced = tmp_path / "imbalanced"
    write_class_folder(imbalanced, kinds=("red_disc",), per_class=12)
    write_class_folder(imbalanced, kinds=("blue_square",), per_class=4)
    asked = []
    original = evaluate.generated_features
    monkeypatch.setattr(
        evaluate,
        "generated_features",
        lambda *args, **kwargs: asked.append(kwargs["labels"]) or original(*args, **kwargs),
    )
    options = dict(
        num_samples=16,
        steps=2,
        batch_size=8,
        feature_extractor=MeanColour(),
        progress=False,
        reference_root=tmp_path / "references",
        device="cpu",
    )
    result = evaluate.evaluate_checkpoint(conditional_run, dataset=str(imbalanced), **options)
    red, blue = CLASSES.index("red_disc"), CLASSES.index("blue_square")
    assert result["classes"] == "as the reference" and "classes as the reference" in evaluate.summary_line(result)
    assert (asked[-1] == red).sum() == 12 and (asked[-1] == blue).sum() == 4
    assert not torch.equal(asked[-1], asked[-1].sort().values)  # shuffled, not one class after the other

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for path in sorted((imbalanced / "red_disc").iterdir())[:8]:
        (unlabelled / path.name).write_bytes(path.read_bytes())
    result = evaluate.evaluate_checkpoint(conditional_run, dataset=str(unlabelled), **{**options, "num_samples": 8})
    assert result["classes"] == "uniform" and asked[-1] is None
    assert "carry no classes of this model" in capsys.readouterr().err


def test_reference_labels_map_to_the_model_s_class_ids_by_name():
    ids = torch.tensor([0, 0, 1, 0])  # reference names ["b", "a"]: three b, one a
    mapped = evaluate.labels_like_reference(ids, ["b", "a"], ["a", "b", "c"], 3, seed=0)
    assert sorted(mapped.tolist()) == [0, 1, 1, 1]
    assert torch.equal(mapped, evaluate.labels_like_reference(ids, ["b", "a"], ["a", "b", "c"], 3, seed=0))
    assert evaluate.labels_like_reference(ids, ["b", "z"], ["a", "b"], 2) is None  # a class the model lacks
    assert sorted(evaluate.labels_like_reference(ids, ["x", "y"], None, 2).tolist()) == [0, 0, 0, 1]  # by count
    assert evaluate.labels_like_reference(ids, ["x", "y"], None, 3) is None


# ------------------------------------------------------------------------------------------------ CLI, pipeline


def test_cli_sample_takes_a_class_name_or_id_and_a_guidance_scale(conditional_run, tmp_path, capsys):
    out = tmp_path / "red.png"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(conditional_run),
                "--class",
                "red_disc",
                "--guidance-scale",
                "3",
                "--num-images",
                "4",
                "--steps",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    red = np.asarray(Image.open(out), dtype=np.float32)
    assert red.shape == (2 * RES, 2 * RES, 3) and red[..., 0].mean() > red[..., 2].mean()
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(conditional_run),
                "--class",
                "0",
                "--num-images",
                "4",
                "--steps",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    blue = np.asarray(Image.open(out), dtype=np.float32)
    assert blue[..., 2].mean() > blue[..., 0].mean()
    assert (
        main(["sample", "--checkpoint", str(conditional_run), "--num-images", "6", "--steps", "2", "--out", str(out)])
        == 0
    )
    assert Image.open(out).size == (3 * RES, 2 * RES)  # no class: one row per class
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(conditional_run), "--class", "purple", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: unknown class 'purple'") and "red_disc" in err


def test_pipeline_round_trip_keeps_class_names_guidance_and_the_model_card(conditional_run, tmp_path):
    export = export_checkpoint(conditional_run, tmp_path / "export")
    pipe = LiquidDiffusionPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.class_names == CLASSES and pipe.unet.config.num_classes == 2
    assert pipe.config.guidance_scale == flow.DEFAULT_GUIDANCE_SCALE  # the training config's, recorded

    noise = torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 0])
    expected = flow.euler_sample(flow.guided_velocity(pipe.unet, labels, 3.0, pipe.unet.null_class), noise, 6)
    x = pipe(
        latents=noise,
        class_labels=["red_disc", "blue_square"],
        guidance_scale=3.0,
        num_inference_steps=6,
        output_type="latent",
    ).images
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)  # the pipeline and the package share one CFG
    heun = pipe(
        latents=noise,
        class_labels=["red_disc", "blue_square"],
        guidance_scale=3.0,
        num_inference_steps=3,
        sampler="heun",
        output_type="latent",
    ).images
    expected = flow.heun_sample(flow.guided_velocity(pipe.unet, labels, 3.0, pipe.unet.null_class), noise, 3)
    torch.testing.assert_close(heun, expected, atol=1e-6, rtol=0)
    default = pipe(latents=noise, class_labels=[1, 0], num_inference_steps=6, output_type="latent").images
    recorded = flow.euler_sample(
        flow.guided_velocity(pipe.unet, labels, pipe.config.guidance_scale, pipe.unet.null_class), noise, 6
    )
    torch.testing.assert_close(default, recorded, atol=1e-6, rtol=0)
    images = pipe(
        class_labels="red_disc",
        batch_size=3,
        num_inference_steps=6,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (3, 3, RES, RES) and images[:, 0].mean() > images[:, 2].mean()
    with pytest.raises(ValueError, match="unknown class 'purple'"):
        pipe(class_labels="purple")
    with pytest.raises(ValueError, match="3 class labels for 2 images"):
        pipe(latents=noise, class_labels=[0, 1, 0])

    resaved = tmp_path / "resaved"
    pipe.save_pretrained(resaved)
    again = LiquidDiffusionPipeline.from_pretrained(resaved)
    assert again.unet.config.class_names == CLASSES and again.config.guidance_scale == pipe.config.guidance_scale

    card = (export / "README.md").read_text()
    assert "class-conditional" in card and "Recommended guidance scale: w = 2" in card
    assert "| 0 | blue_square |" in card and "| 1 | red_disc |" in card
    assert 'class_labels="blue_square"' in card


def test_notebook_trains_class_conditionally_and_offers_a_class_picker(class_folder, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = Path(__file__).resolve().parents[1]
    output_dir = tmp_path / "run"
    overrides = {
        "LD_DATASET": str(class_folder),
        "LD_SPACE": "pixel",
        "LD_PRESET": "micro",
        "LD_RESOLUTION": str(RES),
        "LD_STEPS": "2",
        "LD_BATCH_SIZE": "4",
        "LD_SAMPLE_EVERY": "1",
        "LD_NUM_SAMPLES": "4",
        "LD_CLASS_CONDITIONAL": "1",
        "LD_GUIDANCE_SCALE": "3",
        "LD_OUTPUT_DIR": str(output_dir),
        "LD_HUB_REPO": "",
        "LD_MOUNT_DRIVE": "0",
        "LD_SKIP_INSTALL": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(root / "LiquidDiffusion_Training.ipynb", as_version=nbformat.NO_CONVERT)
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root)}}
    ).execute()
    cells = {cell.metadata.get("id"): cell for cell in notebook.cells if cell.cell_type == "code"}
    text = "".join(o.get("text", "") for cell in cells.values() for o in cell.outputs if o.output_type == "stream")
    assert "classes     2 (blue_square, red_disc): class-conditional, guidance 3" in text
    assert "--class-conditional" in text  # the same run from a terminal
    assert "blue_square · guidance 3 · seed 0" in text
    assert any("image/png" in o.get("data", {}) for o in cells["pick-code"].outputs)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cells["pick-code"].outputs)
    checkpoint = output_dir / "checkpoint-000002"
    assert json.loads((checkpoint / "unet" / "config.json").read_text())["class_names"] == CLASSES
    assert json.loads((checkpoint / "train_config.json").read_text())["guidance_scale"] == 3.0
    assert Image.open(output_dir / "samples" / "final-euler-25.png").size == (2 * RES, 2 * RES)  # a row per class
