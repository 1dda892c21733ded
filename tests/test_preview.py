"""``python -m liquid_diffusion preview``: a grid of what training sees, the read/skipped/upscaled counts, and
one-line errors."""

from __future__ import annotations

import re

import pytest
from PIL import Image
from test_trainer import cli_help, help_entries

from conftest import IMAGE_FOLDER_CORRUPT, IMAGE_FOLDER_GOOD, IMAGE_FOLDER_TINY
from liquid_diffusion.__main__ import main


def test_preview_writes_a_grid_and_prints_the_counts(image_folder, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "preview",
                "--dataset",
                str(image_folder),
                "--resolution",
                "32",
                "--num",
                "16",
                "--out",
                str(out),
                "--vae",
                str(tiny_vae_dir),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        f"read {IMAGE_FOLDER_GOOD + IMAGE_FOLDER_CORRUPT} images, skipped {IMAGE_FOLDER_CORRUPT} (undecodable), "
        f"upscaled {IMAGE_FOLDER_TINY}"
    ) in printed
    assert Image.open(out).size == (4 * 32, 4 * 32)


@pytest.mark.parametrize("dataset, message", [("afhqq", "unknown dataset 'afhqq'"), ("./no/such/dir", "no such")])
def test_preview_errors_are_one_line_without_traceback(dataset, message, capsys):
    assert main(["preview", "--dataset", dataset, "--out", "unused.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_preview_of_a_missing_folder_is_exactly_one_line(tmp_path, capsys):
    assert main(["preview", "--dataset", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no such file or folder: '{tmp_path / 'x'}'; check the path (or pass a Hub id namespace/name)"
    ]


def test_every_preview_flag_has_help(capsys):
    entries = help_entries(cli_help("preview", capsys))
    assert {
        "--split SPLIT",
        "--resolution RESOLUTION",
        "--random-crop",
        "--no-flip",
        "--shuffle-buffer SHUFFLE_BUFFER",
        "--seed SEED",
    } <= set(entries)
    for flags, description in entries.items():
        assert len(description) > 10, flags


@pytest.mark.parametrize("needs", ["dataset", "vae"])
def test_preview_offline_advice_names_only_flags_preview_has(image_folder, tmp_path, monkeypatch, capsys, needs):
    from liquid_diffusion import latents, sources

    for module in (sources, latents):
        monkeypatch.setattr(module, "hub_reachable", lambda *args, **kwargs: False)
    source = ["--dataset", "afhq"] if needs == "dataset" else ["--dataset", str(image_folder), "--vae", "me/no-vae"]
    assert main(["preview", *source, "--resolution", "32", "--out", str(tmp_path / "grid.png")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "Hub is unreachable" in line and "to preview without the Hub" in line
    named = set(re.findall(r"--[a-z][a-z-]*", line))
    assert named and named <= set(re.findall(r"--[a-z][a-z-]*", cli_help("preview", capsys))), line
    assert not (tmp_path / "grid.png").exists()
