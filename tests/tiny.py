"""The tiny runs the tests train: a save_to_disk dataset of 16 px gray images and the settings of a small model;
and `write_idx`, the idx files of MNIST-like datasets written independently of hf_ibproj.

`TINY_SETTINGS` (TrainConfig fields) and `TINY` (the same as train.py flags): a width-8 small ResNet-18 at 16 px,
batch 16, float32, no DataLoader workers, so a step takes milliseconds. Later flags win: a test appends its changes.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import yaml

TINY_SETTINGS = dict(channels=1, image_size=16, backbone_kwargs={"channels": [8, 16, 32, 64]},
                     projector_hidden_dims=[32], projector_out_dim=16, batch_size=16, lr=0.1, warmup_epochs=0.5,
                     mixed_precision="no", log_every=2, diagnostics_every=2, knn_train_samples=64,
                     knn_eval_samples=32, num_workers=0)
TINY = [text for name, value in TINY_SETTINGS.items() for text in (
    f"--{name.replace('_', '-')}", yaml.safe_dump(value, default_flow_style=True).strip()
    if isinstance(value, (list, dict)) else str(value))]


def save_tiny_dataset(path: Path, train: int = 128, test: int = 64, class_names: tuple[str, ...] = ("top", "bottom"),
                      learnable: bool = True) -> Path:
    """A save_to_disk dataset of 16x16 gray images labeled round-robin. `learnable`: class k is bright in band k of
    the image (two classes: the top or the bottom half); otherwise uniform noise, which no model can classify."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    rng = np.random.default_rng(0)
    bands = np.array_split(np.arange(16), len(class_names))

    def split(n: int) -> Dataset:
        labels = [i % len(class_names) for i in range(n)]
        images = []
        for label in labels:
            if learnable:
                pixels = rng.integers(0, 60, (16, 16), dtype=np.uint8)
                pixels[bands[label]] += 150
            else:
                pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            images.append(pixels)
        return Dataset.from_dict({"image": images, "label": labels},
                                 features=Features({"image": Image(), "label": ClassLabel(names=list(class_names))}))

    DatasetDict({"train": split(train), "test": split(test)}).save_to_disk(str(path))
    return path


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 idx file written with struct, as the MNIST site describes it (2 zero bytes, type 0x08, the number of
    dimensions, each dimension big-endian); gzipped when `path` ends in .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
