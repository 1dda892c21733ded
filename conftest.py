"""Test-wide settings, applied before any test module imports torch.

One torch thread per process: the tests use tiny models, where a second thread gains little, while OpenMP's
spin-waiting makes a 2-thread process 10-25x slower as soon as the two cores are shared (pytest-xdist workers,
CLI subprocesses, a notebook kernel). Subprocesses inherit the setting through the environment.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
