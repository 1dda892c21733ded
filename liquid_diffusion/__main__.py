"""Command line: ``python -m liquid_diffusion {preview,train,reflow,sample,export,push,evaluate,quickstart} ...``.

Each module owns its sub-command (``add_*_command(subparsers)`` sets ``func``, and ``offline_advice`` where the
command may need the Hub); this file only dispatches and turns user errors into one clean line (set
``LIQUID_DIFFUSION_DEBUG=1`` for the full traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import evaluate, export, preview, publish, quickstart, reflow, sampling, trainer
from .errors import USER_ERRORS, DiskFullError, offline_advice

# The sub-commands, in the order data flows.
COMMANDS = [
    preview.add_preview_command,
    trainer.add_train_command,
    reflow.add_reflow_command,
    sampling.add_sample_command,
    export.add_export_command,
    publish.add_push_command,
    evaluate.add_evaluate_command,
    quickstart.add_quickstart_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m liquid_diffusion",
        description="LiquidDiffusion: attention-free liquid U-Net trained with rectified flow.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DiskFullError as error:  # a full disk is no mistake of the user's, but one line says it all
        print(f"error: {error.strerror}", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        if os.environ.get("LIQUID_DIFFUSION_DEBUG"):
            raise
        print(f"error: {offline_advice(error, getattr(args, 'offline_advice', None))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
