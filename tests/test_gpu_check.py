"""``python -m benchmarks.gpu_check``: the prepared GPU check runs end to end on the CPU (``--dry-run``), so GPU minutes are
spent measuring, not debugging; a failing section is recorded and the next one runs; a spent budget skips with a note.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        CUDA_VISIBLE_DEVICES="",
    )
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out-dir", str(out), "--dry-run", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_dry_run_writes_every_section_with_finite_numbers_and_passing_checks(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    sections = {s["name"].split(":")[0]: s for s in report["sections"]}
    assert [s["status"] for s in report["sections"]] == ["ok"] * len(report["sections"])
    assert set(sections) == {
        "environment",
        "notebook",
        "memory",
        "cli",
        "sampling",
        "speed",
        "profile",
        "tests",
        "quality",
        "mfu",
        "targets",
    }

    memory = sections["memory"]["data"]
    assert len(memory) == 4 and {(r["data"], r["precision"][:4]) for r in memory} == {
        (d, p) for d in ("cached latents", "VAE in the loop") for p in ("fp16", "bf16")
    }
    assert all(_finite(r["mib"]) and r["mib"] > 0 and r["loss_finite"] for r in memory)

    # the Colab notebook, executed end to end in a kernel (latent space, mid-run grid, export); its outputs come back
    assert sections["notebook"]["data"]["failed"] == [] and _finite(*sections["notebook"]["data"]["losses"])
    assert (tmp_path / "notebook_executed.ipynb").stat().st_size > 10_000

    (cli,) = sections["cli"]["data"]  # the dry run's one chain: bf16 + compile + cached latents
    assert cli["name"] == "bf16+compile+cache" and cli["passed"] and not cli["failed_checks"]
    assert _finite(*cli["checks"]["_losses"])

    assert all(r["seconds_with_vae"] > r["seconds"] > 0 for r in sections["sampling"]["data"])

    speed = [r for s in report["sections"] if s["name"].startswith("speed") for r in s["data"]["rows"]]
    assert all(
        _finite(r["images_per_s"], r["gflop_per_img"], r["peak_mem_mib"]) and r["images_per_s"] > 0 for r in speed
    )
    compiled = [r for r in speed if r["variant"].endswith("+compile")]
    assert {r["model"] for r in compiled} == {"liquid-micro", "dit-s2"}
    assert all(r["graphs"] >= 1 and r["graph_breaks"] == 0 for r in compiled if r["model"] == "liquid-micro")
    assert {r["batch_kind"] for r in speed} == {"8", "max", "8+"}  # "8+": compiled rows only
    assert all(r["variant"].endswith("+compile") for r in speed if r["batch_kind"] == "8+")
    assert all(r["batch"] >= 2 for r in speed if r["batch_kind"] == "max")
    assert all(_finite(r["tflops"]) and r["tflops"] > 0 for r in sections["mfu"]["data"]["rows"])
    # the profile: wall time per step for each model, and the ops that take it (no kernels to count on the CPU)
    profiled = sections["profile"]["data"]
    assert [r["model"] for r in profiled["rows"]] == ["liquid-micro", "dit-s2"]
    assert all(_finite(r["wall_ms"]) and r["wall_ms"] > 0 for r in profiled["rows"])
    assert {op[0] for op in profiled["top_ops"]} == {"liquid-micro", "dit-s2"}
    assert all(op[1].startswith("aten::") and op[2] > 0 for op in profiled["top_ops"])
    assert _finite(sections["targets"]["data"]["speed_ratio"], sections["targets"]["data"]["tiny_cached_bf16_mib"])
    assert sections["tests"]["data"]["rc"] == 0 and "passed" in sections["tests"]["data"]["summary"]
    # equal minutes through the product's Trainer, scored by its validation loss, at one batch, the rate sqrt-scaled
    quality = sections["quality"]["data"]
    assert [r["model"] for r in quality] == ["liquid-micro", "dit-micro"]
    assert all(r["minutes"] == 0.02 and r["steps"] >= 1 and _finite(r["val_loss"], r["val_loss_raw"]) for r in quality)
    assert all(r["config"]["batch_size"] == 4 and math.isclose(r["config"]["lr"], 1e-3 * 0.5**0.5) for r in quality)

    text = (tmp_path / "report.md").read_text()
    assert "DRY RUN" in text and "| bf16+compile+cache | PASS |" in text
    for name in sections:
        assert f"## {name}" in text


def test_spent_budget_skips_the_remaining_sections_with_a_note(tmp_path):
    done = _run(tmp_path, "--budget-s", "0", "--sections", "environment", "memory", "cli", "mfu")
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = {
        s["name"]: (s["status"], s["error"]) for s in json.loads((tmp_path / "report.json").read_text())["sections"]
    }
    assert statuses["environment"] == ("ok", None)  # cheap sections run regardless
    for name in ("memory", "cli"):
        assert statuses[name][0] == "skipped" and "--budget-s 0" in statuses[name][1]
    assert statuses["mfu"][0] == "skipped"
    assert "| memory | skipped |" in (tmp_path / "report.md").read_text()


def test_a_failing_section_is_recorded_in_one_line_and_the_next_one_runs(tmp_path):
    report = gpu_check.Report(tmp_path, "# header", {})
    runner = gpu_check.Runner(report, budget_s=60, log=lambda *_: None)

    def broken():
        raise RuntimeError("CUDA error: out of memory\nlong details")

    runner.run("broken", broken)
    runner.run("fine", lambda: ("all good", {"x": 1.0}, "ok"))
    saved = json.loads((tmp_path / "report.json").read_text())["sections"]
    assert [(s["name"], s["status"]) for s in saved] == [("broken", "failed"), ("fine", "ok")]
    assert saved[0]["error"] == "RuntimeError: CUDA error: out of memory"
    assert "long details" in saved[0]["data"]["traceback"]
    text = (tmp_path / "report.md").read_text()
    assert "| broken | failed |" in text and "all good" in text


def test_models_flags_choose_what_is_timed_and_compiled_and_a_typo_fails_in_one_line(tmp_path):
    done = _run(
        tmp_path,
        "--sections",
        "environment",
        "speed",
        "targets",
        "--models",
        "liquid-micro-ablation",
        "dit-s2",
        "--compile-models",
        "liquid-micro-ablation",
        "--compile-mode",
        "reduce-overhead",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    rows = [r for s in report["sections"] if s["name"].startswith("speed") for r in s["data"]["rows"]]
    compiled = "fp32+compile(reduce-overhead)"  # --compile-mode names the rows it timed
    eager = {r["model"] for r in rows if r["variant"] != compiled}
    assert eager == {"liquid-micro-ablation", "dit-s2"}
    first = [r for r in rows if r["batch_kind"] == "8"]
    assert {r["model"] for r in first if r["variant"] == compiled} == {"liquid-micro-ablation"}
    # later settings compile only what --models selected: the dry run's "8+" setting lists dit-s2 (selected)
    assert {(r["model"], r["variant"]) for r in rows if r["batch_kind"] == "8+"} == {("dit-s2", compiled)}
    targets = next(s for s in report["sections"] if s["name"] == "targets")
    assert "liquid-micro-ablation >=" in targets["body"] and compiled in targets["body"]

    typo = _run(tmp_path / "typo", "--models", "liquid-micro@no-such-variant")
    assert typo.returncode == 2 and typo.stdout.strip().splitlines()[-1].startswith("error: unknown model")
