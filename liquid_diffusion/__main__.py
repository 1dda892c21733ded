"""Command line: ``python -m liquid_diffusion {preview,train,sample,export,push,evaluate} ...``.

Each module owns its sub-command (``add_*_command(subparsers)`` sets ``func``); this file only dispatches and
turns user errors into one clean line (set ``LIQUID_DIFFUSION_DEBUG=1`` for the full traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import USER_ERRORS

# (module, registration function) per sub-command group, in the order data flows.
COMMANDS = [
    ("liquid_diffusion.data", "add_preview_command"),
    ("liquid_diffusion.trainer", "add_train_command"),
    ("liquid_diffusion.trainer", "add_sample_command"),
    ("liquid_diffusion.hub", "add_export_command"),
    ("liquid_diffusion.hub", "add_push_command"),
    ("liquid_diffusion.evaluate", "add_evaluate_command"),
    ("liquid_diffusion.quickstart", "add_quickstart_command"),
]

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m liquid_diffusion",
        description="LiquidDiffusion: attention-free liquid U-Net trained with rectified flow.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name, function_name in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # a module not written yet simply contributes no command
        getattr(module, function_name)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if os.environ.get("LIQUID_DIFFUSION_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
