"""`seeded`: a block with torch's generators seeded, the caller's random state left untouched; `sample_seed`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """The CPU generator (and that of a CUDA `device`) seeded with `seed` inside, restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One sample's seed in one epoch, from the run's seed: the same in any DataLoader worker and after a resume, and
    within torch.manual_seed's range (numpy's SeedSequence mixes the three, so any run seed works)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]) >> 1
