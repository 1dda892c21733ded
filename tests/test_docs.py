"""Every example in the docs is run by a test or by CI.

* Each command line in a fenced shell block (``bash``, ``sh``, ``console``, ``shell`` or untagged) of README.md,
  BENCHMARKS.md, CHANGELOG.md and docs/*.md that runs ``-m liquid_diffusion ...`` or ``-m benchmarks.NAME ...``
  (after ``python``, ``accelerate launch`` or ``torchrun``) is parsed by that program's own argument parser, without
  running it. Blocks tagged ``text`` are records of earlier commits (docs/experiments.md) and are not checked.
* The README's python blocks run, with a micro pipeline standing in for a Hub model.
* The README's install and test commands are the ones CI (``.ci/run``) runs.
* Relative links between the docs point at files and headings that exist.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_TAGS = {"", "bash", "sh", "console", "shell"}
OPERATORS = {";", "&&", "||", "|", "&", "(", ")"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def fenced_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(tag, first line number, lines) of every fenced block in a Markdown file."""
    blocks, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if current is None and match:
            current = (match.group(3).lower(), number + 1, [], match.group(2))
        elif current is not None and line.strip().startswith(current[3]):
            blocks.append(current[:3])
            current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, f"{path.name}: a fence opened at line {current[1] - 1} is never closed"
    return blocks


def shell_lines(lines: list[str]) -> list[str]:
    """Logical lines: continuations joined, console prompts dropped."""
    joined, pending = [], ""
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    if pending:
        joined.append(pending)
    return joined


REDIRECTION = re.compile(r"(?<!\S)\d*(?:>>?|<)&?\s*[^\s;&|]*")


def program_calls(line: str) -> list[tuple[str, list[str]]]:
    """(module, argv) of each ``-m liquid_diffusion`` / ``-m benchmarks.NAME`` call in one shell line."""
    lexer = shlex.shlex(REDIRECTION.sub(" ", line), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    calls, segment = [], []
    for token in list(lexer) + [";"]:
        if token in OPERATORS:
            calls += _call(segment)
            segment = []
        else:
            segment.append(token)
    return calls


def _call(tokens: list[str]) -> list[tuple[str, list[str]]]:
    for index, token in enumerate(tokens[:-1]):
        module = tokens[index + 1]
        if token == "-m" and (module == "liquid_diffusion" or module.startswith("benchmarks.")):
            return [(module, tokens[index + 2 :])]
    return []


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, argv) of every checked command in the docs."""
    found = []
    for path in DOCS:
        if not path.is_file():
            continue
        for tag, start, lines in fenced_blocks(path):
            if tag not in SHELL_TAGS:
                continue
            for line in shell_lines(lines):
                for module, argv in program_calls(line):
                    found.append((f"{path.relative_to(ROOT)}:{start}: {line.strip()[:90]}", module, argv))
    return found


COMMANDS = doc_commands()


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once the arguments are parsed: nothing runs."""


def test_the_docs_show_the_commands_they_should():
    modules = {module for _, module, _ in COMMANDS}
    readme = [where for where, module, _ in COMMANDS if where.startswith("README.md") and module == "liquid_diffusion"]
    assert len(readme) >= 15, readme  # train, sample, preview, export, push, evaluate, quickstart ...
    assert {"benchmarks.throughput", "benchmarks.sampling", "benchmarks.checkpointing", "benchmarks.recipe"} <= modules


@pytest.mark.parametrize("where, module, argv", COMMANDS, ids=[c[0].split(": ")[0] for c in COMMANDS])
def test_doc_command_parses(where, module, argv, monkeypatch, capsys):
    """The program's own parser accepts the command (``main`` runs up to its ``parse_args`` and stops there)."""
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    program = importlib.import_module("liquid_diffusion.__main__" if module == "liquid_diffusion" else module)
    entry = getattr(program, "parse_args", None) or program.main
    try:
        entry(argv)
    except _Parsed:
        return
    except SystemExit as exit_:
        assert exit_.code == 0, f"{where}\n{capsys.readouterr().err}"  # --help exits 0
        return
    pytest.fail(f"{where}: {module} returned without parsing its arguments")


def test_readme_install_and_test_commands_are_what_ci_runs():
    """.ci/run executes "the README's install command" and "the README's test command": the same lines."""
    readme = {line for _, _, lines in fenced_blocks(ROOT / "README.md") for line in shell_lines(lines)}
    readme = {line.split("#")[0].strip() for line in readme}
    ci = {line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")}
    for command in ('pip install -e ".[test]"', "python -m pytest -q -n 2"):
        assert command in readme, f"README lacks {command!r}"
        assert command in ci, f".ci/run lacks {command!r}"


def _standin_pipeline():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from liquid_diffusion import LiquidDiffusionPipeline, LiquidDiffusionUNet

    torch.manual_seed(0)
    unet = LiquidDiffusionUNet.from_preset("micro", in_channels=3, num_classes=3, class_names=["cat", "dog", "wild"])
    return LiquidDiffusionPipeline(
        unet=unet.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), resolution=8, guidance_scale=2.0
    )


PYTHON_BLOCKS = [
    (start, "\n".join(lines)) for tag, start, lines in fenced_blocks(ROOT / "README.md") if tag == "python"
]


@pytest.mark.parametrize("start, code", PYTHON_BLOCKS, ids=[f"README.md:{start}" for start, _ in PYTHON_BLOCKS])
def test_readme_python_block_runs(start, code, monkeypatch):
    """Each block runs as written; a Hub id loads a micro class-conditional pipeline at 8 px, and .to() stays put."""
    from liquid_diffusion import LiquidDiffusionPipeline

    pipe = _standin_pipeline()
    monkeypatch.setattr(LiquidDiffusionPipeline, "from_pretrained", classmethod(lambda cls, *args, **kwargs: pipe))
    monkeypatch.setattr(LiquidDiffusionPipeline, "to", lambda self, *args, **kwargs: self)
    exec(compile(code, f"README.md:{start}", "exec"), {"__name__": "readme_example"})


def test_every_python_block_compiles():
    for path in DOCS:
        if path.is_file():
            for tag, start, lines in fenced_blocks(path):
                if tag == "python":
                    compile("\n".join(lines), f"{path.name}:{start}", "exec")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen, inside = set(), {}, False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside and line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_relative_links_point_at_files_and_headings():
    broken = []
    for path in DOCS:
        if not path.is_file():
            continue
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
