"""``python -m liquid_diffusion preview``: a grid of what training sees, the read/skipped/upscaled counts, and
one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import IMAGE_FOLDER_CORRUPT, IMAGE_FOLDER_GOOD, IMAGE_FOLDER_TINY
from liquid_diffusion.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def test_preview_writes_a_grid_and_prints_the_counts(image_folder, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["preview", "--dataset", str(image_folder), "--resolution", "32", "--num", "16", "--out", str(out),
                 "--vae", str(tiny_vae_dir)]) == 0
    printed = capsys.readouterr().out
    assert (f"read {IMAGE_FOLDER_GOOD + IMAGE_FOLDER_CORRUPT} images, skipped {IMAGE_FOLDER_CORRUPT} (undecodable), "
            f"upscaled {IMAGE_FOLDER_TINY}") in printed
    assert Image.open(out).size == (4 * 32, 4 * 32)


@pytest.mark.parametrize("dataset, message", [("afhqq", "unknown dataset 'afhqq'"), ("./no/such/dir", "no such")])
def test_preview_errors_are_one_line_without_traceback(dataset, message, capsys):
    assert main(["preview", "--dataset", dataset, "--out", "unused.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_preview_cli_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "liquid_diffusion", "preview", "--dataset", str(tmp_path / "x")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: no such file or folder: '{tmp_path / 'x'}'; check the "
                                                  "path (or pass a Hub id namespace/name)"]
