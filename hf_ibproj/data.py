"""Image datasets through Hugging Face `datasets`, decoded once to uint8 tensors.

Sources: a Hub dataset id, a local folder (`imagefolder` class sub-folders, or parquet/csv files), a
`save_to_disk` folder, or the built-in name `fashion_mnist` (Debian's package `dataset-fashion-mnist` when
installed, else the Hub copy). Two ways to read them:
  - `load_image_data`: decode every image once into one uint8 tensor (datasets that fit in memory);
  - `StreamingImageDataset`: decode row by row in DataLoader workers (datasets that do not).
Both share `open_image_dataset` (locating the split and its columns) and `decode_image` (one row to a
uint8 (C, H, W) array, timm's eval resize + center crop), so the two paths give identical pixels.
A streamed split trains on `FullImageCrops` (random resized crops of each whole image, drawn per sample in the
workers), optionally read from a `DecodedImageCache` (the images decoded once into memory-mapped files).
Subsets (max_samples, kNN banks, statistics) come from `stratified_indices`: seeded and class-stratified,
chosen from the label column alone before any image is decoded. Augmentation lives in `augmentation.py`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import v2

from .augmentation import TwoViewAugmentation, to_model_input  # noqa: F401  (re-exported: the data API)
from .progress import progress_bar
from .runs import remove_abandoned_staging
from .seeding import sample_seed, seeded

logger = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")
# Label given by StreamingImageDataset to rows of a dataset without labels.
NO_LABEL = -1

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_FILES = {  # split -> (images, labels) in FASHION_MNIST_DIR
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
BUILTIN_DATASETS = {"fashion_mnist": FASHION_MNIST_HUB_ID}

# "name" or "owner/name", the shape of a Hub dataset id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# PIL's convert() clips 16-bit values at 255 instead of rescaling them, so these modes are rescaled by hand.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# timm's names for PIL's resampling filters (pretrained_cfg["interpolation"]).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
SKIPS_NAMED_IN_WARNING = 5  # load_image_data's warning names these; ImageData.skipped_files names every one


@dataclass
class ImageData:
    """A decoded split: uint8 images of one size, optional int64 labels and class names."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None  # int64 (N,)
    class_names: list[str] | None
    skipped_files: list[dict] = field(default_factory=list)  # one `skip_record` per row left out

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def skipped(self) -> int:
        """Rows left out because their image could not be decoded or was oversized."""
        return len(self.skipped_files)

    @property
    def num_classes(self) -> int:
        return count_classes(self.labels, self.class_names)


def count_classes(labels: torch.Tensor | None, class_names: list[str] | None) -> int:
    """Number of classes: from the class names, else the largest label + 1, else 0 (no labels)."""
    if labels is None:
        return 0
    if class_names is not None:
        return len(class_names)
    return int(labels.max()) + 1 if len(labels) else 0


# --------------------------------------------------------------------------------------------- selection


def _class_quotas(sizes: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Rows to take per class, summing to `count`: shares proportional to `sizes` by largest remainder, at least
    one per class when count allows, never more than a class holds; ties go in a seeded random order."""
    exact = sizes.double() * count / sizes.sum()
    quotas = exact.floor().long()
    if count >= len(sizes):
        quotas.clamp_(min=1)
    tie_order = torch.randperm(len(sizes), generator=generator)
    while (excess := int(quotas.sum()) - count) != 0:
        below_share = (exact - quotas)[tie_order]  # argmax/argmin take the first of equals: the seeded order
        if excess < 0:  # one more row for the class furthest below its share that still has rows left
            pick = torch.where(quotas[tie_order] < sizes[tie_order], below_share, -math.inf).argmax()
            quotas[tie_order[pick]] += 1
        else:  # one row less for the class furthest above its share that keeps at least one
            pick = torch.where(quotas[tie_order] > 1, below_share, math.inf).argmin()
            quotas[tie_order[pick]] -= 1
    return quotas


def stratified_indices(
    labels: torch.Tensor | None, count: int, seed: int, num_rows: int | None = None
) -> torch.Tensor:
    """Sorted int64 indices of a seeded random subset of `count` rows, class-stratified when `labels` are given.

    Each class gets a share of `count` proportional to its frequency (largest remainder), and every class at
    least one row when count >= the number of classes; the rows of a class, and of unlabeled data
    (labels=None, then `num_rows` says how many rows there are), are drawn uniformly at random. The same
    labels, count and seed always give the same subset; count >= the number of rows gives every row.
    """
    if labels is not None:
        if labels.dim() != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {tuple(labels.shape)}")
        if num_rows is not None and num_rows != len(labels):
            raise ValueError(f"num_rows={num_rows} but {len(labels)} labels were given: pass one or the other")
        num_rows = len(labels)
    elif num_rows is None:
        raise ValueError("stratified_indices needs labels or, for unlabeled data, num_rows")
    if count < 1:
        raise ValueError(f"the number of rows to select must be a positive integer, got {count!r}")
    if count >= num_rows:
        return torch.arange(num_rows)
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(num_rows, generator=generator)
    if labels is None:
        return shuffled[:count].sort().values
    _, class_of_row, sizes = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
    quotas = _class_quotas(sizes, count, generator)
    # Group the shuffled rows by class (a stable sort keeps them shuffled within a class), keep each quota's first.
    grouped = shuffled[torch.argsort(class_of_row[shuffled], stable=True)]
    group = class_of_row[grouped]
    rank_in_class = torch.arange(num_rows) - (torch.cumsum(sizes, 0) - sizes)[group]
    return grouped[rank_in_class < quotas[group]].sort().values


# ----------------------------------------------------------------------------------------------- opening


def _fashion_mnist_is_local(source: str) -> bool:
    return source == "fashion_mnist" and all((FASHION_MNIST_DIR / f).is_file() for f in FASHION_MNIST_FILES["train"])


def read_idx_ubyte(path: Path) -> np.ndarray:
    """Read a uint8 idx file, gzipped (`.gz`) or not (the MNIST format: 2 zero bytes, type 0x08, ndim, big-endian
    int32 dims, then the bytes).

    Parsed by hand with numpy because `datasets` has no reader for it, and this is ~50x faster than
    building a `datasets.Dataset` from the arrays.
    """
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 idx file (header {raw[:4]!r}, expected b'\\x00\\x00\\x08' and the "
                         "number of dimensions): pass the file as the MNIST site ships it")
    ndim = raw[3]
    shape = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    if len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(raw) - 4 - 4 * ndim} bytes of data where its header announces shape "
                         f"{shape.tolist()}: the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Debian's Fashion-MNIST idx files -> (uint8 images (N, 28, 28), uint8 labels (N,))."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown split {split!r} for fashion_mnist: available splits are {list(FASHION_MNIST_FILES)}")
    images_file, labels_file = FASHION_MNIST_FILES[split]
    return read_idx_ubyte(FASHION_MNIST_DIR / images_file), read_idx_ubyte(FASHION_MNIST_DIR / labels_file)


def _fashion_mnist_dataset(split: str) -> datasets.Dataset:
    """The Debian files as a `datasets.Dataset` (image: 28x28 uint8 nested lists, label: ClassLabel), for streaming."""
    images, labels = _read_fashion_mnist(split)
    _, height, width = images.shape
    rows = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), width)
    table = pa.table({"image": pa.FixedSizeListArray.from_arrays(rows, height), "label": labels.astype(np.int64)})
    features = datasets.Features(
        {
            "image": datasets.List(datasets.List(datasets.Value("uint8"), length=width), length=height),
            "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES),
        }
    )
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _select_split(splits: datasets.DatasetDict | datasets.Dataset, split: str, source: str) -> datasets.Dataset:
    if isinstance(splits, datasets.Dataset):  # a save_to_disk folder holding one split; "train" when unnamed
        splits = datasets.DatasetDict({str(splits.split or "train"): splits})
    if split not in splits:
        raise ValueError(
            f"unknown split {split!r} in {source!r}: available splits are {list(splits)}; pass one of them"
        )
    return splits[split]


def _load_split(source: str, split: str) -> datasets.Dataset:
    """Find `source` (built-in name, local folder, save_to_disk folder or Hub id) and return its `split`."""
    if _fashion_mnist_is_local(source):
        return _fashion_mnist_dataset(split)
    source = BUILTIN_DATASETS.get(source, source)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _select_split(datasets.load_from_disk(str(path)), split, source)
        try:  # an image folder (class sub-folders give the labels) or a folder of parquet/csv/json files
            return _select_split(datasets.load_dataset(str(path)), split, source)
        except FileNotFoundError as error:  # datasets' EmptyDatasetError / DataFilesNotFoundError
            raise FileNotFoundError(
                f"no dataset files found in folder {source!r} ({error}): put images in class sub-folders "
                "(imagefolder layout) or pass a save_to_disk folder"
            ) from error
    if path.exists():
        raise ValueError(f"dataset source {source!r} is a file: pass the folder that contains it")
    if not _HUB_ID.match(source):
        raise FileNotFoundError(f"dataset folder {source!r} does not exist: check the path")
    try:
        return datasets.load_dataset(source, split=split)
    except ValueError as error:  # an unknown split or a missing config name; datasets lists the choices
        raise ValueError(f"could not load split {split!r} of Hub dataset {source!r}: {error}") from error
    except OSError as error:  # not found, gated, no network, offline mode (all OSError subclasses)
        raise FileNotFoundError(
            f"could not find or load dataset {source!r}: no local folder of that name exists and loading it from "
            f"the Hugging Face Hub failed ({type(error).__name__}: {error}). Pass a local image folder, a "
            f"save_to_disk folder, or a built-in name ({', '.join(BUILTIN_DATASETS)})"
        ) from error


def _is_pixel_array(feature: Any) -> bool:
    array_features = (datasets.List, datasets.Sequence, datasets.LargeList, datasets.Array2D, datasets.Array3D)
    return isinstance(feature, array_features)


def _find_image_column(ds: datasets.Dataset, image_column: str | None) -> str:
    columns = list(ds.features)
    if image_column is not None:
        if image_column not in ds.features:
            raise ValueError(f"image column {image_column!r} not found: the columns are {columns}")
        feature = ds.features[image_column]
        if not (isinstance(feature, datasets.Image) or _is_pixel_array(feature)):
            raise ValueError(
                f"column {image_column!r} holds {feature}, not images: pick an image column from {columns}"
            )
        return image_column
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMN_NAMES:
        if name in ds.features:
            return name
    raise ValueError(f"no image column found among the columns {columns}: pass image_column (--image-column)")


def _find_label_column(ds: datasets.Dataset, label_column: str | None) -> str | None:
    if label_column is not None:
        if label_column not in ds.features:
            raise ValueError(f"label column {label_column!r} not found: the columns are {list(ds.features)}")
        return label_column
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    return next((name for name in LABEL_COLUMN_NAMES if name in ds.features), None)


def _class_labels(ds: datasets.Dataset, label_column: str) -> tuple[datasets.Dataset, list[str] | None]:
    """Make the label column integer class ids: ClassLabel and integers as they are, strings encoded (sorted)."""
    feature = ds.features[label_column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        ds = ds.class_encode_column(label_column)
        feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return ds, list(feature.names)
    if isinstance(feature, datasets.Value) and pa.types.is_integer(feature.pa_type):
        return ds, None
    raise ValueError(
        f"label column {label_column!r} holds {feature}: expected integer class ids or class-name strings; "
        "pass another label_column (--label-column)"
    )


def open_image_dataset(
    source: str, split: str = "train", *, image_column: str | None = None, label_column: str | None = None
) -> tuple[datasets.Dataset, str, str | None, list[str] | None]:
    """Open `split` of `source` without decoding: (dataset, image column, label column or None, class names or None).

    An image column of the `datasets.Image` feature is cast to `decode=False`, so `decode_image` receives the raw
    bytes/path and one corrupt file does not abort a whole batch. Labels come out as integer class ids.
    """
    ds = _load_split(source, split)
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {source!r} is empty: pick another split")
    image_column = _find_image_column(ds, image_column)
    label_column = _find_label_column(ds, label_column)
    class_names = None
    if label_column is not None:
        ds, class_names = _class_labels(ds, label_column)
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds, image_column, label_column, class_names


def read_labels(ds: datasets.Dataset, label_column: str) -> torch.Tensor:
    """The int64 label column alone, read through Arrow (no image is touched; ~1 ms per million rows)."""
    column = ds.with_format("arrow")[label_column]
    if column.null_count:
        raise ValueError(
            f"label column {label_column!r} has {column.null_count} missing labels: fill them or pass "
            "another label_column (--label-column)"
        )
    return torch.from_numpy(column.to_numpy().astype(np.int64))


# ---------------------------------------------------------------------------------------------- decoding


class CorruptImageError(ValueError):
    """A row's image bytes could not be decoded."""


class OversizedImageError(CorruptImageError):
    """A row's image is over PIL's decompression-bomb limit (twice `PIL.Image.MAX_IMAGE_PIXELS`): intact, refused."""


def _file_of(value: Any) -> str | None:
    """The file an image cell came from (None for embedded bytes without a name or pixel arrays)."""
    return value.get("path") if isinstance(value, dict) else None


def skip_record(row: int, value: Any, error: CorruptImageError) -> dict:
    """How a skipped row is named in a run's records: its row, its file, whether corrupt or oversized, the error."""
    reason = "oversized" if isinstance(error, OversizedImageError) else "corrupt"
    return {"row": row, "file": _file_of(value), "reason": reason, "error": str(error)}


class SkipLog:
    """The rows a per-sample dataset skipped, collected across the DataLoader worker processes that decode it: each
    appends a JSON line to one temporary file, removed when the process that made the log drops it."""

    def __init__(self) -> None:
        handle, name = tempfile.mkstemp(prefix="hf_ibproj-skipped-", suffix=".jsonl")
        os.close(handle)
        self.path = Path(name)
        weakref.finalize(self, _remove_own_file, self.path, os.getpid())

    def add(self, record: dict) -> None:
        with self.path.open("a") as handle:  # one short append: whole lines even with several writers
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """One record per skipped row (a row drawn again is not repeated), in row order."""
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return sorted({r["row"]: r for r in map(json.loads, lines)}.values(), key=lambda r: r["row"])


def _remove_own_file(path: Path, owner: int) -> None:
    if os.getpid() == owner:  # a forked worker holding a copy of the log leaves the file alone
        path.unlink(missing_ok=True)


def _open_cell(value: Any) -> Image.Image:
    """One cell of an image column: {"bytes", "path"} (Image feature, decode=False), a PIL image or a pixel array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    pixels = np.asarray(value)
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.integer) or pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(f"pixel arrays must hold 8-bit values (0-255), got {pixels.dtype}: store images instead")
        pixels = pixels.astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (3, 4))):
        raise ValueError(f"pixel arrays must be (H, W) or (H, W, 3 or 4), PIL's layout; got shape {pixels.shape}")
    return Image.fromarray(pixels)


def _convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> "L" (channels=1) or "RGB" (channels=3)."""
    target = "L" if channels == 1 else "RGB"
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray(((wide + 128) // 257).astype(np.uint8))  # 0..65535 -> 0..255, rounded
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # resolves the palette and its transparency
    return image if image.mode == target else image.convert(target)


def check_resize_options(interpolation: str, crop_pct: float) -> None:
    """Reject an interpolation timm does not name or a crop_pct outside (0, 1], before any image is decoded."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1] (the fraction of the resized image kept), got {crop_pct}")


def _fit_size(image: Image.Image, image_size: int, interpolation: str, crop_pct: float) -> Image.Image:
    """timm's eval transform (crop_mode "center"): the shorter side to floor(image_size / crop_pct), up or down,
    with `interpolation`, then a center crop of image_size x image_size."""
    # Same arithmetic as timm.data.transforms_imagenet_eval = torchvision Resize(scale) + CenterCrop(image_size).
    scale = math.floor(image_size / crop_pct)
    width, height = image.size
    if width <= height:
        new_size = (scale, int(scale * height / width))
    else:
        new_size = (int(scale * width / height), scale)
    if new_size != image.size:
        image = image.resize(new_size, str_to_pil_interp(interpolation))
    left = int(round((new_size[0] - image_size) / 2.0))
    top = int(round((new_size[1] - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size))


def decode_image(
    value: Any,
    channels: int = 3,
    image_size: int | None = None,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
) -> np.ndarray:
    """One image cell -> uint8 array (C, H, W) with `channels` channels, fitted to `image_size` when given.

    Fitting is timm's eval transform: resize the shorter side to floor(image_size / crop_pct) with
    `interpolation` (larger and smaller images alike), center-crop image_size x image_size; without
    image_size the image keeps its size. Raises CorruptImageError when the bytes cannot be decoded, and its subclass
    OversizedImageError for an image over PIL's decompression-bomb limit.
    """
    check_resize_options(interpolation, crop_pct)
    image = _decoded_cell(value, channels)
    if image_size is not None:
        image = _fit_size(image, image_size, interpolation, crop_pct)
    return _chw_array(image)


def decode_capped(value: Any, channels: int = 3, max_side: int | None = None, interpolation: str = "bicubic"
                  ) -> np.ndarray:
    """One image cell -> uint8 array (C, H, W), the WHOLE image: nothing is cropped, so training crops can reach its
    borders. With `max_side`, an image whose shorter side is longer is first scaled down (aspect ratio kept, as
    `_fit_size` rounds) to a shorter side of max_side; smaller images keep their size. Raises as `decode_image`."""
    check_resize_options(interpolation, 1.0)
    image = _decoded_cell(value, channels)
    width, height = image.size
    if max_side is not None and min(width, height) > max_side:
        if width <= height:
            size = (max_side, int(max_side * height / width))
        else:
            size = (int(max_side * width / height), max_side)
        image = image.resize(size, str_to_pil_interp(interpolation))
    return _chw_array(image)


def _chw_array(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.uint8)
    return np.array(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1), order="C")  # a writable copy


def _decoded_cell(value: Any, channels: int) -> Image.Image:
    """One image cell decoded (not lazily) to a PIL image in mode "L" (channels=1) or "RGB" (channels=3); a file
    PIL cannot decode raises CorruptImageError, one over its decompression-bomb limit OversizedImageError."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    try:
        image = _open_cell(value)
        image.load()  # PIL decodes lazily: a truncated file fails here, not later in resize or asarray
        image = _convert_mode(image, channels)
    except Image.DecompressionBombError as error:
        raise OversizedImageError(
            f"oversized image ({_file_of(value) or 'embedded bytes'}): {error} That limit is twice "
            f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}); for files you trust, raise it in Python "
            "before loading (PIL.Image.MAX_IMAGE_PIXELS = None lifts it), or downscale the file"
        ) from error
    except (OSError, SyntaxError) as error:  # PIL's errors for broken files
        raise CorruptImageError(f"cannot decode image ({_file_of(value) or 'embedded bytes'}): {error}") from error
    return image


# ---------------------------------------------------------------------------------------------- in memory


def _fashion_mnist_image_data(
    split: str, channels: int, image_size: int | None, max_samples: int | None, seed: int, interpolation: str,
    crop_pct: float,
) -> ImageData:
    """The Debian idx files straight into tensors (< 1 s for 60k images at their own 28x28 size)."""
    images, labels = _read_fashion_mnist(split)
    labels = torch.from_numpy(labels.astype(np.int64))
    if max_samples is not None:
        rows = stratified_indices(labels, max_samples, seed)
        images, labels = images[rows.numpy()], labels[rows]
    if image_size is None or (image_size == images.shape[-1] and crop_pct == 1):
        tensor = torch.from_numpy(images.copy()).unsqueeze(1)
        if channels == 3:
            tensor = tensor.expand(-1, 3, -1, -1).contiguous()  # what PIL's "L" -> "RGB" does: copy the gray value
    else:
        tensor = torch.from_numpy(
            np.stack([decode_image(image, channels, image_size, interpolation, crop_pct) for image in images])
        )
    return ImageData(tensor, labels, list(FASHION_MNIST_CLASSES))


def load_image_data(
    source: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    channels: int = 3,
    image_size: int | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
) -> ImageData:
    """Load `split` of `source` and decode all its images once into a uint8 (N, C, H, W) tensor.

    Without `image_size` all images must share one size; with it, every image goes through timm's eval
    resize + center crop (`decode_image`: `interpolation`, `crop_pct`) to image_size x image_size.
    `max_samples` keeps a seeded, class-stratified random subset (`stratified_indices` with `seed`), chosen
    from the label column before decoding, so only those images are decoded. Rows whose image cannot be
    decoded (corrupt or oversized) are skipped, each named in `ImageData.skipped_files` and in one warning.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer, got {max_samples}")
    check_resize_options(interpolation, crop_pct)
    if _fashion_mnist_is_local(source) and image_column in (None, "image") and label_column in (None, "label"):
        return _fashion_mnist_image_data(split, channels, image_size, max_samples, seed, interpolation, crop_pct)

    ds, image_column, label_column, class_names = open_image_dataset(
        source, split, image_column=image_column, label_column=label_column
    )
    labels = None if label_column is None else read_labels(ds, label_column)
    rows = torch.arange(len(ds))  # the source row of each row of ds
    if max_samples is not None and max_samples < len(ds):
        rows = stratified_indices(labels, max_samples, seed, num_rows=len(ds))
        ds = ds.select(rows.tolist())
        labels = None if labels is None else labels[rows]
    images, kept, skipped = [], [], []
    for position, value in enumerate(ds[image_column]):
        try:
            pixels = decode_image(value, channels, image_size, interpolation, crop_pct)
        except CorruptImageError as error:
            skipped.append(skip_record(int(rows[position]), value, error))
            continue
        if images and pixels.shape != images[0].shape:
            raise ValueError(
                f"images in {source!r} differ in size ({images[0].shape[1:]} in row {int(rows[kept[0]])}, "
                f"{pixels.shape[1:]} in row {int(rows[position])}): pass image_size (--image-size) to resize and "
                "center-crop them to one size"
            )
        images.append(pixels)
        kept.append(position)
    if skipped:
        named = "; ".join(r["error"] for r in skipped[:SKIPS_NAMED_IN_WARNING])
        more = len(skipped) - SKIPS_NAMED_IN_WARNING
        logger.warning("skipped %d of %d rows of %r (split %r), corrupt or oversized: %s%s", len(skipped), len(ds),
                       source, split, named, f"; and {more} more" if more > 0 else "")
    if not images:
        raise ValueError(f"no image of split {split!r} of {source!r} could be decoded: check the files")
    if labels is not None:
        labels = labels[kept]
    return ImageData(torch.from_numpy(np.stack(images)), labels, class_names, skipped)


# ---------------------------------------------------------------------------------------------- streaming


class StreamingImageDataset(torch.utils.data.Dataset):
    """Decode one row at a time (in DataLoader workers) for datasets that do not fit in memory.

    Items are (uint8 image (C, image_size, image_size), int label, int skipped): the label is NO_LABEL
    without a label column; with image_size=None the images are not resized and must already share one size
    (otherwise `decode_image`'s resize + center crop, `interpolation` and `crop_pct`). A row whose image cannot
    be decoded is replaced by the next decodable row (with a warning), so one bad file does not stop a long run,
    and its item says so with skipped=1 (0 otherwise): DataLoader workers are separate processes, so the count
    travels in the batch; summing the batches' third tensor counts the undecodable rows drawn, and `skipped_files`
    names each such row once (from every worker, through a `SkipLog`). These center-fitted items are what
    evaluation reads; training reads `FullImageCrops` of the split. `labels` reads the label column alone, for
    `stratified_indices`.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        label_column: str | None = None,
        *,
        channels: int = 3,
        image_size: int | None,
        class_names: list[str] | None = None,
        interpolation: str = "bicubic",
        crop_pct: float = 1.0,
    ) -> None:
        check_resize_options(interpolation, crop_pct)
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.channels, self.image_size, self.class_names = channels, image_size, class_names
        self.interpolation, self.crop_pct = interpolation, crop_pct
        self.skip_log = SkipLog()

    @classmethod
    def from_source(
        cls,
        source: str,
        split: str = "train",
        *,
        image_column: str | None = None,
        label_column: str | None = None,
        channels: int = 3,
        image_size: int | None,
        interpolation: str = "bicubic",
        crop_pct: float = 1.0,
    ) -> StreamingImageDataset:
        """Open `split` of `source` with `open_image_dataset` (same sources and column detection as load_image_data)."""
        ds, image_column, label_column, class_names = open_image_dataset(
            source, split, image_column=image_column, label_column=label_column
        )
        return cls(ds, image_column, label_column, channels=channels, image_size=image_size, class_names=class_names,
                   interpolation=interpolation, crop_pct=crop_pct)

    def __len__(self) -> int:
        return len(self.dataset)

    @functools.cached_property
    def labels(self) -> torch.Tensor | None:
        """Every row's int64 label from the label column alone (no image decoded, read once); None without labels."""
        return None if self.label_column is None else read_labels(self.dataset, self.label_column)

    @property
    def num_classes(self) -> int:
        return count_classes(self.labels, self.class_names)

    @property
    def skipped_files(self) -> list[dict]:
        """One `skip_record` per row skipped so far, in any process that decoded this dataset."""
        return self.skip_log.records()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        pixels, label, skipped = self.first_decodable(index, self._fitted_row)
        return torch.from_numpy(pixels), label, skipped

    def _fitted_row(self, position: int) -> tuple[np.ndarray, int]:
        row = self.dataset[position]
        pixels = decode_image(row[self.image_column], self.channels, self.image_size, self.interpolation, self.crop_pct)
        return pixels, NO_LABEL if self.label_column is None else int(row[self.label_column])

    def first_decodable(self, index: int, read: Callable[[int], tuple[np.ndarray, int]]) -> tuple[np.ndarray, int, int]:
        """(pixels, label, skipped) of `read(index)`, where `read(row)` -> (pixels, label) raises CorruptImageError
        for an undecodable row: such a row is logged and replaced by the next one that reads (skipped=1)."""
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            try:
                pixels, label = read(position)
            except CorruptImageError as error:
                logger.warning("row %d: %s; using the next row instead", position, error)
                self.skip_log.add(skip_record(position, self.dataset[position][self.image_column], error))
                continue
            return pixels, label, int(offset > 0)
        raise ValueError("no image in this dataset could be decoded: check the files")


# ------------------------------------------------------------------------------ training crops of whole images


class FullImageCrops(torch.utils.data.Dataset):
    """The training items of a per-sample split: `num_views` random resized crops of each WHOLE image.

    docs/method.md section 6's crop (area crop_min_scale-1, aspect ratio 3/4-4/3, bicubic) is drawn per sample in the
    DataLoader worker by torchvision's RandomResizedCrop (antialiased) on the image as decoded (`decode_capped`), not on
    `decode_image`'s center square, so crops reach the image's borders and keep its resolution, as the paper's code
    crops. Items are (uint8 views (V, C, image_size, image_size), label, skipped), rows replaced as `stream` replaces
    them; `TwoViewAugmentation` applies the rest of the recipe to such (B, V, C, S, S) batches without cropping
    again. Images come from `cache` (a `DecodedImageCache`) when given, else are decoded per sample, with their
    shorter side capped at `max_side` (None: full resolution). Each view's crop is seeded by (seed, epoch, row), so
    the crops do not depend on the number of workers or processes, nor on a resume; set `epoch` before each pass.
    """

    def __init__(self, stream: StreamingImageDataset, image_size: int, num_views: int, crop_min_scale: float,
                 seed: int, *, max_side: int | None = None, cache: DecodedImageCache | None = None) -> None:
        self.stream, self.num_views, self.seed, self.epoch = stream, num_views, seed, 0
        self.max_side, self.cache = max_side, cache
        self.crop = v2.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0),
                                         interpolation=v2.InterpolationMode.BICUBIC)

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        pixels, label, skipped = self.stream.first_decodable(index, self._whole_image)
        image = torch.from_numpy(pixels)  # cropped as a uint8 tensor: ~3x faster than through a PIL image
        with seeded(sample_seed(self.seed, self.epoch, index)):
            return torch.stack([self.crop(image) for _ in range(self.num_views)]), label, skipped

    def _whole_image(self, position: int) -> tuple[np.ndarray, int]:
        stream = self.stream
        if self.cache is not None:  # the label column alone: reading the row would read the encoded image too
            return self.cache.image(position), NO_LABEL if stream.labels is None else int(stream.labels[position])
        row = stream.dataset[position]
        pixels = decode_capped(row[stream.image_column], stream.channels, self.max_side, stream.interpolation)
        return pixels, NO_LABEL if stream.label_column is None else int(row[stream.label_column])


CACHE_FORMAT = 1  # bumped when the layout or decode_capped's output changes, so old caches are not read
CHUNKS_PER_WORKER = 8  # cache chunks per building worker: a slow chunk does not leave the others idle for long


def decoded_cache_root() -> Path:
    """Where decoded caches are kept: beside datasets' own cache (HF_DATASETS_CACHE, HF_HOME)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_ibproj-decoded"


class DecodedImageCache:
    """Every image of a per-sample split decoded once by `decode_capped` (shorter side at most `side`) into
    memory-mapped uint8 files, read back byte for byte as decoding would give them, and reused by later runs.

    Shorter side capped rather than a fixed S x S square: a square keeps the borders only by stretching the image,
    and the crop's aspect-ratio range would then be drawn on stretched pixels; a capped shorter side keeps the
    file's geometry, so crops are those of the whole image at (at most) that resolution. A crop of area fraction a
    spans about side x sqrt(a) px, upsampled to the training size when fewer: the cap trades that resolution
    (ImageNet's shorter sides are mostly 333-500 px) against space, about 3 x side^2 x aspect bytes per image
    (ImageNet-100 at 256: ~30 GB; at 384: ~70 GB).
    The folder's name hashes what was cached (the split's `datasets` fingerprint, which follows its files and row
    selection, rows, image column, side, channels, interpolation, CACHE_FORMAT), so a change builds a new cache.
    It holds chunk-K.u8 (rows K*R.. back to back, (C, H, W) C-order), index.npy (int64 (N, 3): offset in its chunk,
    height, width) and meta.json (the description, R, and the rows that could not be decoded with their errors).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.index = np.load(folder / "index.npy")
        self.chunks: dict[int, np.memmap] = {}  # opened on first read, in each process

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "chunks": {}}  # a pickled memmap would copy its file (spawned DataLoader workers)

    @classmethod
    def open_or_build(cls, stream: StreamingImageDataset, side: int, num_workers: int = 0,
                      root: Path | None = None) -> DecodedImageCache:
        """The cache of `stream`'s images at `side`, built first (in `num_workers` DataLoader workers) if absent."""
        description = {"fingerprint": stream.dataset._fingerprint, "rows": len(stream), "side": side,
                       "image_column": stream.image_column, "channels": stream.channels,
                       "interpolation": stream.interpolation, "format": CACHE_FORMAT,
                       "max_image_pixels": Image.MAX_IMAGE_PIXELS}  # a raised limit decodes what was refused
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]
        folder = (root or decoded_cache_root()) / key
        if not (folder / "meta.json").is_file():
            _build_cache(stream, description, folder, num_workers)
        return cls(folder)

    def image(self, row: int) -> np.ndarray:
        """Row `row`'s uint8 (C, H, W) image; CorruptImageError / OversizedImageError as decoding raised it."""
        failure = self.meta["failed"].get(str(row))
        if failure is not None:
            raise (OversizedImageError if failure["oversized"] else CorruptImageError)(failure["error"])
        chunk = row // self.meta["rows_per_chunk"]
        if chunk not in self.chunks:
            self.chunks[chunk] = np.memmap(self.folder / f"chunk-{chunk:06d}.u8", dtype=np.uint8, mode="r")
        offset, height, width = (int(v) for v in self.index[row])
        size = self.meta["channels"] * height * width
        return np.array(self.chunks[chunk][offset:offset + size]).reshape(-1, height, width)


class _CacheChunk(torch.utils.data.Dataset):
    """Item K decodes rows K*R.. of `stream` into `folder`/chunk-K.u8: (first row, int64 (rows, 3) index, failures)."""

    def __init__(self, stream: StreamingImageDataset, side: int, folder: Path, rows_per_chunk: int) -> None:
        self.stream, self.side, self.folder, self.rows_per_chunk = stream, side, folder, rows_per_chunk

    def __len__(self) -> int:
        return math.ceil(len(self.stream) / self.rows_per_chunk)

    def __getitem__(self, chunk: int) -> tuple[int, np.ndarray, dict]:
        stream = self.stream
        start = chunk * self.rows_per_chunk
        rows = range(start, min(start + self.rows_per_chunk, len(stream)))
        index, failed, offset = np.zeros((len(rows), 3), dtype=np.int64), {}, 0
        with (self.folder / f"chunk-{chunk:06d}.u8").open("wb") as out:
            for row in rows:
                try:
                    pixels = decode_capped(stream.dataset[row][stream.image_column], stream.channels, self.side,
                                           stream.interpolation)
                except CorruptImageError as error:
                    failed[str(row)] = {"oversized": isinstance(error, OversizedImageError), "error": str(error)}
                    continue
                out.write(pixels.tobytes())
                index[row - start] = (offset, *pixels.shape[1:])
                offset += pixels.size
        return start, index, failed


def _build_cache(stream: StreamingImageDataset, description: dict, folder: Path, num_workers: int) -> None:
    """Decode `stream` into a staging folder of this host and process in parallel, then rename it to `folder`: a
    half-built cache is never read. A build that fails removes its staging folder; one killed midway leaves it, and
    the next build on the same host removes it (its process is gone). Builders on several nodes sharing the cache
    folder each build; the first rename wins and the others use its cache."""
    rows_per_chunk = max(1, math.ceil(len(stream) / (max(num_workers, 1) * CHUNKS_PER_WORKER)))
    host = socket.gethostname()
    builds_of_this_host = re.compile(rf"\.{re.escape(folder.name)}\.{re.escape(host)}-(\d+)\.partial")
    remove_abandoned_staging(folder.parent, builds_of_this_host)
    staging = folder.with_name(f".{folder.name}.{host}-{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        chunks = _CacheChunk(stream, description["side"], staging, rows_per_chunk)
        index, failed = np.zeros((len(stream), 3), dtype=np.int64), {}
        loader = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=num_workers)  # chunks in any order
        for start, chunk_index, chunk_failed in progress_bar(loader, desc=f"decoding to {folder}", unit="chunk"):
            index[start:start + len(chunk_index)] = chunk_index.numpy()
            failed.update(chunk_failed)
        np.save(staging / "index.npy", index)
        (staging / "meta.json").write_text(json.dumps({**description, "rows_per_chunk": rows_per_chunk,
                                                       "failed": failed}, indent=1))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "meta.json").is_file():  # not another builder's finished cache: a real failure
            raise
