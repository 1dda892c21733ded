"""Benchmarks of LiquidDiffusion (speed, memory, data path, sampling, quality, the prepared GPU check).

Run each from the repository root as a module, e.g. ``python -m benchmarks.throughput --quick``; every script has
``--help`` and ``--quick``. Numbers depend on the machine and its load: BENCHMARKS.md names the machine of each.
Shared helpers (models of the comparison, timing, FLOPs, machine description) live in ``benchmarks.common``.
"""
