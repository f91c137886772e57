"""`seeded`: a block with torch's generators seeded, the caller's random state left untouched."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """The CPU generator (and that of a CUDA `device`) seeded with `seed` inside, restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
