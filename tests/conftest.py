"""Shared fixtures, and one torch thread per pytest-xdist worker.

`make test` runs the suite on two xdist workers (most of a test's time is the single-threaded start-up of the
train.py / benchmark processes it launches). Two 2-thread OpenMP pools on 2 cores spin at their barriers and run
several times slower (benchmarks/compare_bottlenecks.py measured ~5x), so each worker and every process it starts
computes on one thread; a plain `pytest tests` keeps torch's default.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from tiny import save_tiny_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):  # set by xdist in each worker before this file is imported
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch at import, here and in every subprocess


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """128 + 64 learnable 16 px images in two classes (tests/tiny.py), made once per worker."""
    return save_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")
