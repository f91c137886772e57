"""hf_ibproj.data: every kind of source, colour modes, resizing, labels, subsets, bad input and the streaming
path, checked against pixels computed independently in the test (struct-parsed idx files, PIL's documented
luma formula, torchvision's Resize + CenterCrop, timm's eval transform) and subsets against closed forms and a
naive largest-remainder apportionment."""

import gzip
import logging
import math
import struct
import time
from collections import Counter
from pathlib import Path
from unittest.mock import patch

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms_factory import transforms_imagenet_eval

import hf_ibproj.data
from hf_ibproj.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    NO_LABEL,
    ImageData,
    StreamingImageDataset,
    decode_image,
    load_image_data,
    open_image_dataset,
    stratified_indices,
)
from tiny import write_idx


@pytest.fixture(autouse=True)
def _offline_with_private_cache(tmp_path, monkeypatch):
    """No Hub access (a Hub id must fail at once, not after retries) and a datasets cache inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def _rng(seed=0):
    return np.random.default_rng(seed)


# -------------------------------------------------------------------------------- built-in Fashion-MNIST

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


def _idx_image(images_file, index):
    """Image `index` of an idx3 file, read with struct (header: magic 2051, count, rows, cols)."""
    with gzip.open(FASHION_MNIST_DIR / images_file, "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        assert magic == 2051
        f.seek(16 + index * rows * cols)
        return np.array(struct.unpack(f"{rows * cols}B", f.read(rows * cols)), dtype=np.uint8).reshape(rows, cols)


def _idx_label(labels_file, index):
    return _idx_labels(labels_file)[index]


def _idx_labels(labels_file):
    """Every label of an idx1 file, read with struct (header: magic 2049, count)."""
    with gzip.open(FASHION_MNIST_DIR / labels_file, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        assert magic == 2049
        return list(struct.unpack(f"{count}B", f.read(count)))


@needs_fashion_mnist
def test_fashion_mnist_from_debian_idx_files():
    train = load_image_data("fashion_mnist", "train", channels=1)  # the idx files, read directly (~1 s)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and len(train) == 60000
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert train.class_names == FASHION_MNIST_CLASSES and train.num_classes == 10 and train.skipped == 0
    for index in (0, 1, 31_337, 59_999):
        assert np.array_equal(train.images[index, 0].numpy(), _idx_image("train-images-idx3-ubyte.gz", index))
        assert train.labels[index] == _idx_label("train-labels-idx1-ubyte.gz", index)

    # max_samples: the same stratified selection as every other source (1000 test images per class: 5 each)
    test = load_image_data("fashion_mnist", "test", channels=3, max_samples=50, seed=3)
    assert test.images.shape == (50, 3, 28, 28)
    assert Counter(test.labels.tolist()) == {c: 5 for c in range(10)}
    all_labels = _idx_labels("t10k-labels-idx1-ubyte.gz")
    rows = stratified_indices(torch.tensor(all_labels), 50, seed=3)
    for position in (0, 49):
        index = int(rows[position])
        for channel in range(3):  # gray -> RGB repeats the gray value
            assert np.array_equal(test.images[position, channel].numpy(), _idx_image("t10k-images-idx3-ubyte.gz", index))
        assert test.labels[position] == all_labels[index]
    assert torch.equal(load_image_data("fashion_mnist", "test", channels=3, max_samples=50, seed=3).images, test.images)
    assert len(load_image_data("fashion_mnist", "test", channels=1)) == 10000


@needs_fashion_mnist
def test_fashion_mnist_resized_and_streamed():
    streaming = StreamingImageDataset.from_source("fashion_mnist", "test", channels=1, image_size=28)
    assert len(streaming) == 10000 and streaming.class_names == FASHION_MNIST_CLASSES
    image, label, skipped = streaming[7]
    assert np.array_equal(image[0].numpy(), _idx_image("t10k-images-idx3-ubyte.gz", 7))
    assert label == _idx_label("t10k-labels-idx1-ubyte.gz", 7) and skipped == 0
    assert streaming.labels.tolist() == _idx_labels("t10k-labels-idx1-ubyte.gz")

    # resized (and its crop_pct arithmetic) on the fast path; the subset is the one the stream's labels give
    for image_size, crop_pct in ((14, 1.0), (28, 0.875)):
        small = load_image_data("fashion_mnist", "test", channels=1, image_size=image_size, max_samples=3,
                                seed=1, crop_pct=crop_pct)
        index = int(stratified_indices(streaming.labels, 3, seed=1)[2])
        scale = math.floor(image_size / crop_pct)
        expected = TF.resize(Image.fromarray(_idx_image("t10k-images-idx3-ubyte.gz", index)), scale,
                             TF.InterpolationMode.BICUBIC)
        assert small.images.shape == (3, 1, image_size, image_size)
        assert np.array_equal(small.images[2, 0].numpy(), np.asarray(TF.center_crop(expected, image_size)))
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['train', 'test'\]"):
        load_image_data("fashion_mnist", "validation")


# ------------------------------------------------------------------------------------ local image folder


def _luma(rgb):
    """PIL's documented RGB -> L conversion, L = R * 299/1000 + G * 587/1000 + B * 114/1000."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _mixed_mode_folder(root: Path):
    """Two classes of 12x12 PNGs in modes L, RGB, RGBA, P, LA and I;16; returns [(class index, expected RGB float)]."""
    rng = _rng()
    expected = []

    def save(label, name, image, rgb):
        (root / ["cats", "dogs"][label]).mkdir(parents=True, exist_ok=True)
        image.save(root / ["cats", "dogs"][label] / f"{name}.png")
        expected.append((label, np.asarray(rgb, dtype=np.float64)))

    gray = rng.integers(0, 256, (12, 12), dtype=np.uint8)
    save(0, "gray", Image.fromarray(gray, "L"), np.stack([gray] * 3, -1))
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    save(0, "rgb", Image.fromarray(rgb, "RGB"), rgb)
    rgba = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
    save(1, "rgba", Image.fromarray(rgba, "RGBA"), rgba[..., :3])  # alpha dropped
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    indices = rng.integers(0, 4, (12, 12), dtype=np.uint8)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.flatten().tolist())
    save(1, "palette", paletted, palette[indices])
    gray_alpha = np.stack([rng.integers(0, 256, (12, 12)), np.full((12, 12), 90)], -1).astype(np.uint8)
    save(1, "gray_alpha", Image.fromarray(gray_alpha, "LA"), np.stack([gray_alpha[..., 0]] * 3, -1))
    deep = rng.integers(0, 65536, (12, 12), dtype=np.uint16)
    eight_bit = np.round(deep / 65535 * 255)  # 16-bit scaled to 8-bit, not clipped at 255
    save(0, "sixteen_bit", Image.fromarray(deep), np.stack([eight_bit] * 3, -1))
    return expected


def _assert_each_expected_image_loaded_once(data: ImageData, expected, channels):
    assert len(data) == len(expected)
    loaded = data.images.double().numpy()
    for label, rgb in expected:
        reference = rgb.transpose(2, 0, 1) if channels == 3 else _luma(rgb)[None]
        matches = [
            row for row in range(len(data)) if np.abs(loaded[row] - reference).max() <= 1 and data.labels[row] == label
        ]
        assert len(matches) == 1, f"expected exactly one loaded image matching the {label=} reference"


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_with_mixed_modes(tmp_path, channels):
    expected = _mixed_mode_folder(tmp_path / "folder")
    data = load_image_data(str(tmp_path / "folder"), channels=channels)
    assert data.images.shape == (6, channels, 12, 12) and data.images.dtype == torch.uint8
    assert data.class_names == ["cats", "dogs"] and data.num_classes == 2
    assert data.labels.dtype == torch.int64
    _assert_each_expected_image_loaded_once(data, expected, channels)


def test_image_folder_resized_and_center_cropped_like_torchvision(tmp_path):
    rng = _rng(1)
    sizes = [(30, 41), (50, 30), (24, 24)]  # wide, tall, already square
    originals = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    root = tmp_path / "data"
    (root / "only").mkdir(parents=True)
    for i, image in enumerate(originals):
        image.save(root / "only" / f"{i}.png")
    for image_size in (24, 36):  # 36: every image is smaller on one side and is resized up
        data = load_image_data(str(root), channels=3, image_size=image_size)
        assert data.images.shape == (3, 3, image_size, image_size)
        for image in originals:
            reference = TF.center_crop(TF.resize(image, image_size, TF.InterpolationMode.BICUBIC), image_size)
            reference = torch.from_numpy(np.asarray(reference).transpose(2, 0, 1).copy())
            assert sum(torch.equal(reference, loaded) for loaded in data.images) == 1

    with pytest.raises(ValueError, match=r"differ in size.*--image-size"):
        load_image_data(str(root))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest", "lanczos"])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.9])
def test_decode_image_is_timms_eval_transform(interpolation, crop_pct):
    """Larger, smaller, wide, tall and square images, RGB and gray: pixel for pixel timm's own eval transform."""
    rng = _rng(8)
    for height, width in ((30, 41), (50, 30), (9, 13), (20, 20), (7, 5), (16, 16)):
        for mode, shape in (("RGB", (height, width, 3)), ("L", (height, width))):
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
            reference = transforms_imagenet_eval(img_size=16, crop_pct=crop_pct, interpolation=interpolation,
                                                 use_prefetcher=True)(image)  # uint8 (C, H, W), not normalized
            decoded = decode_image(image, 3 if mode == "RGB" else 1, 16, interpolation, crop_pct)
            assert decoded.shape == tuple(reference.shape) == (3 if mode == "RGB" else 1, 16, 16)
            assert np.array_equal(decoded, reference.numpy()), (height, width, mode)


def test_bad_interpolation_and_crop_pct_are_refused_before_decoding(tmp_path):
    folder = tmp_path / "folder" / "only"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "0.png")
    with pytest.raises(ValueError, match=r"unknown interpolation 'cubic': choose one of nearest, bilinear, bicubic"):
        load_image_data(str(tmp_path / "folder"), image_size=8, interpolation="cubic")
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
        StreamingImageDataset.from_source(str(tmp_path / "folder"), image_size=8, crop_pct=1.2)
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
        decode_image(np.zeros((8, 8), dtype=np.uint8), 1, 8, crop_pct=0)


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "folder"
    for label, value in (("dark", 10), ("light", 240)):
        (folder / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(folder / label / f"{i}.png")
    (folder / "dark" / "garbage.png").write_bytes(b"this is not an image")
    valid_png = (folder / "light" / "0.png").read_bytes()
    (folder / "light" / "truncated.png").write_bytes(valid_png[: len(valid_png) // 2])
    with caplog.at_level(logging.WARNING, logger="hf_ibproj.data"):
        data = load_image_data(str(folder), channels=1)
    assert data.skipped == 2 and len(data) == 4
    assert data.class_names == ["dark", "light"]
    for image, label in zip(data.images, data.labels):  # the kept labels stay aligned with their images
        assert image.unique().tolist() == [[10, 240][label]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 of 6" in warnings[0]


def test_streaming_dataset_matches_load_image_data(tmp_path):
    folder = tmp_path / "folder"
    rng = _rng(2)
    for label in ("a", "b", "c"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            size = (20 + 3 * i, 17)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")
    in_memory = load_image_data(str(folder), channels=3, image_size=16)
    streaming = StreamingImageDataset.from_source(str(folder), channels=3, image_size=16)
    loader = torch.utils.data.DataLoader(streaming, batch_size=4, num_workers=0)
    batches = list(loader)
    assert torch.equal(torch.cat([images for images, _, _ in batches]), in_memory.images)
    assert torch.equal(torch.cat([labels for _, labels, _ in batches]), in_memory.labels)
    assert sum(skipped.sum().item() for _, _, skipped in batches) == 0
    assert streaming.class_names == in_memory.class_names == ["a", "b", "c"]
    assert torch.equal(streaming.labels, in_memory.labels)

    (folder / "a" / "0.png").write_bytes(b"broken")  # row 0: replaced by the next decodable row
    streaming = StreamingImageDataset.from_source(str(folder), channels=3, image_size=16)
    image, label, skipped = streaming[0]
    assert torch.equal(image, in_memory.images[1]) and label == 0 and skipped == 1


def test_streaming_resizes_small_images_and_counts_corrupt_rows_across_workers(tmp_path):
    """Too-small images are resized up (bicubic, like timm's eval transform), never fatal; each corrupt row
    drawn is reported once in the batches that two DataLoader worker processes send back."""
    folder = tmp_path / "folder"
    rng = _rng(9)
    originals = {}
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i, size in enumerate([(40, 36), (12, 9), (5, 7), (32, 32)]):  # two larger, two smaller than 32
            image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            image.save(folder / label / f"{i}.png")
            originals[(label, i)] = image
    (folder / "a" / "9_garbage.png").write_bytes(b"not a png at all")
    (folder / "b" / "9_truncated.png").write_bytes((folder / "b" / "0.png").read_bytes()[:60])
    streaming = StreamingImageDataset.from_source(str(folder), channels=3, image_size=32)
    assert len(streaming) == 10 and streaming.labels.tolist() == [0] * 5 + [1] * 5
    reference = transforms_imagenet_eval(img_size=32, crop_pct=1.0, interpolation="bicubic", use_prefetcher=True)
    expected = {key: reference(image) for key, image in originals.items()}

    loader = torch.utils.data.DataLoader(streaming, batch_size=3, num_workers=2, shuffle=False)
    images, labels, skipped = (torch.cat(parts) for parts in zip(*loader))
    assert images.shape == (10, 3, 32, 32) and skipped.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    for row in range(10):  # rows 4 and 9 (corrupt) hold the next decodable row: 5 ("b"/0) and 0 ("a"/0)
        label, i = {4: ("b", 0), 9: ("a", 0)}.get(row, (["a", "b"][row // 5], row % 5))
        assert torch.equal(images[row], expected[(label, i)]) and labels[row] == ["a", "b"].index(label)


# ------------------------------------------------------------------------------------------- subsets


def _naive_largest_remainder(sizes, count):
    """Hamilton's apportionment by hand: floor of each exact share, the rest to the largest fractional parts."""
    total = sum(sizes)
    exact = [size * count / total for size in sizes]
    quotas = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda c: exact[c] - quotas[c], reverse=True)
    for c in by_remainder[: count - sum(quotas)]:
        quotas[c] += 1
    return quotas


def _per_class(labels, rows):
    return Counter(labels[rows].tolist())


def test_stratified_indices_proportional_to_class_frequencies():
    # class-sorted, as an imagefolder: the first rows would all be class 0
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rows = stratified_indices(labels, 10, seed=0)
    assert rows.dtype == torch.int64 and rows.tolist() == sorted(set(rows.tolist()))
    assert _per_class(labels, rows) == {0: 5, 1: 3, 2: 2}  # exact shares
    assert torch.equal(stratified_indices(labels, 10, seed=0), rows)  # same seed, same subset
    assert not torch.equal(stratified_indices(labels, 10, seed=1), rows)
    assert torch.equal(stratified_indices(labels, 100, seed=0), torch.arange(100))
    assert torch.equal(stratified_indices(labels, 500, seed=0), torch.arange(100))

    # uneven shares against a hand-written largest-remainder apportionment (distinct remainders: no ties)
    rng = _rng(10)
    for _ in range(20):
        sizes = [int(size) for size in rng.integers(3, 60, size=6)]
        count = int(rng.integers(6, sum(sizes)))
        exact = [size * count / sum(sizes) for size in sizes]
        if len({round(share % 1, 9) for share in exact}) < len(sizes) or min(exact) < 1:
            continue
        shuffled_labels = torch.from_numpy(rng.permutation(np.repeat(np.arange(6), sizes)))
        rows = stratified_indices(shuffled_labels, count, seed=int(rng.integers(1000)))
        assert len(rows) == count
        assert [_per_class(shuffled_labels, rows)[c] for c in range(6)] == _naive_largest_remainder(sizes, count)


def test_stratified_indices_keep_every_class_when_count_allows():
    labels = torch.tensor([0] * 97 + [1, 2, 3])  # three rare classes
    assert _per_class(labels, stratified_indices(labels, 5, seed=0)) == {0: 2, 1: 1, 2: 1, 3: 1}
    assert _per_class(labels, stratified_indices(labels, 4, seed=0)) == {0: 1, 1: 1, 2: 1, 3: 1}
    sorted_labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    for seed in range(5):
        counts = _per_class(sorted_labels, stratified_indices(sorted_labels, 4, seed=seed))
        assert set(counts) == {0, 1, 2} and sorted(counts.values()) == [1, 1, 2]
    # fewer rows than classes: distinct classes, which ones depends on the seed
    chosen = {frozenset(_per_class(sorted_labels, stratified_indices(sorted_labels, 2, seed=s))) for s in range(30)}
    assert all(len(classes) == 2 for classes in chosen) and len(chosen) == 3
    # labels need not be 0..K-1
    assert _per_class(torch.tensor([7, 7, -1, -1, 40, 40]), stratified_indices(torch.tensor([7, 7, -1, -1, 40, 40]),
                                                                               3, seed=2)) == {7: 1, -1: 1, 40: 1}


def test_stratified_indices_draw_rows_uniformly():
    """Every row of a class (and of unlabeled data) is chosen about equally often over many seeds."""
    labels = torch.tensor([0] * 20 + [1] * 10)
    seeds = 3000
    hits = torch.zeros(30)
    unlabeled_hits = torch.zeros(30)
    for seed in range(seeds):
        hits[stratified_indices(labels, 6, seed=seed)] += 1  # 4 of class 0, 2 of class 1
        unlabeled = stratified_indices(None, 6, seed=seed, num_rows=30)
        assert len(unlabeled) == 6 == len(set(unlabeled.tolist()))
        unlabeled_hits[unlabeled] += 1
    expected = 0.2 * seeds  # 4/20 and 2/10; binomial std ~22, so 5 std ~ 110
    assert (hits - expected).abs().max() < 110 and (unlabeled_hits - expected).abs().max() < 110
    assert torch.equal(stratified_indices(None, 6, seed=4, num_rows=30), stratified_indices(None, 6, 4, 30))


def test_stratified_indices_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        stratified_indices(torch.tensor([0, 1]), 0, seed=0)
    with pytest.raises(ValueError, match="needs labels or, for unlabeled data, num_rows"):
        stratified_indices(None, 3, seed=0)
    with pytest.raises(ValueError, match="num_rows=5 but 2 labels"):
        stratified_indices(torch.tensor([0, 1]), 1, seed=0, num_rows=5)
    with pytest.raises(ValueError, match="one-dimensional"):
        stratified_indices(torch.zeros(2, 2), 1, seed=0)


def test_max_samples_on_a_class_sorted_folder_is_stratified_and_decodes_only_the_subset(tmp_path):
    folder = tmp_path / "folder"
    shades = {"ant": 20, "bee": 120, "cat": 220}  # each class its own gray value: images and labels must agree
    for name, shade in shades.items():
        (folder / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((6, 6), shade + i, dtype=np.uint8)).save(folder / name / f"{i}.png")
    with patch.object(hf_ibproj.data, "decode_image", wraps=decode_image) as decoded:
        four = load_image_data(str(folder), channels=1, max_samples=4, seed=0)
    assert decoded.call_count == 4  # chosen from the label column, then only these decoded
    assert len(four) == 4 and four.class_names == ["ant", "bee", "cat"]
    assert set(four.labels.tolist()) == {0, 1, 2} and four.labels.tolist() != [0, 0, 0, 0]
    for image, label in zip(four.images, four.labels):
        assert image.min() == image.max() and 0 <= image[0, 0, 0] - list(shades.values())[label] < 6
    again = load_image_data(str(folder), channels=1, max_samples=4, seed=0)
    assert torch.equal(again.images, four.images) and torch.equal(again.labels, four.labels)
    other_seeds = [load_image_data(str(folder), channels=1, max_samples=4, seed=s).images for s in range(1, 6)]
    assert any(not torch.equal(images, four.images) for images in other_seeds)
    # the stream's labels give the same subset without decoding anything
    streaming = StreamingImageDataset.from_source(str(folder), channels=1, image_size=None)
    with patch.object(hf_ibproj.data, "decode_image", wraps=decode_image) as decoded:
        rows = stratified_indices(streaming.labels, 4, seed=0)
    assert decoded.call_count == 0
    assert torch.equal(torch.stack([streaming[int(row)][0] for row in rows]), four.images)


# -------------------------------------------------------------------------------------- save_to_disk


def _images(count, size=6, seed=3):
    rng = _rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_save_to_disk_dataset_dict_with_class_labels(tmp_path):
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["x", "y", "z"])})
    train_images, test_images = _images(5), _images(3, seed=4)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"picture": train_images, "kind": [0, 1, 2, 1, 0]}, features=features),
            "test": datasets.Dataset.from_dict({"picture": test_images, "kind": [2, 2, 1]}, features=features),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    test = load_image_data(str(tmp_path / "saved"), "test", channels=3)
    assert test.class_names == ["x", "y", "z"] and test.labels.tolist() == [2, 2, 1]
    for loaded, original in zip(test.images, test_images):
        assert np.array_equal(loaded.numpy().transpose(1, 2, 0), np.asarray(original))
    gray = load_image_data(str(tmp_path / "saved"), "train", channels=1, max_samples=2)
    assert gray.images.shape == (2, 1, 6, 6)
    rows = stratified_indices(torch.tensor([0, 1, 2, 1, 0]), 2, seed=0)
    assert gray.labels.tolist() == [[0, 1, 2, 1, 0][row] for row in rows]
    assert set(gray.labels.tolist()) == {0, 1}  # classes 0 and 1 (2 rows each) before 2 (1 row)
    for loaded, row in zip(gray.images, rows):
        assert np.abs(loaded[0].double().numpy() - _luma(np.asarray(train_images[row], dtype=np.float64))).max() <= 1
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['train', 'test'\]"):
        load_image_data(str(tmp_path / "saved"), "validation")


def test_named_columns_string_labels_and_no_labels(tmp_path):
    first, second = _images(4, seed=5), _images(4, seed=6)
    features = datasets.Features(
        {
            "photo": datasets.Image(),
            "sketch": datasets.Image(),
            "coarse": datasets.ClassLabel(names=["p", "q"]),
            "species": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"photo": first, "sketch": second, "coarse": [0, 1, 0, 1], "species": ["owl", "cat", "owl", "bee"]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "two_columns"))
    path = str(tmp_path / "two_columns")

    detected = load_image_data(path)  # first Image column, first ClassLabel column
    assert np.array_equal(detected.images[3].numpy().transpose(1, 2, 0), np.asarray(first[3]))
    assert detected.labels.tolist() == [0, 1, 0, 1] and detected.class_names == ["p", "q"]

    named = load_image_data(path, image_column="sketch", label_column="species")
    assert np.array_equal(named.images[3].numpy().transpose(1, 2, 0), np.asarray(second[3]))
    assert named.class_names == ["bee", "cat", "owl"] and named.labels.tolist() == [2, 1, 2, 0]

    datasets.Dataset.from_dict({"img": first}, features=datasets.Features({"img": datasets.Image()})).save_to_disk(
        str(tmp_path / "unlabeled")
    )
    unlabeled = load_image_data(str(tmp_path / "unlabeled"))
    assert unlabeled.labels is None and unlabeled.class_names is None and unlabeled.num_classes == 0
    assert len(unlabeled) == 4
    streaming = StreamingImageDataset.from_source(str(tmp_path / "unlabeled"), image_size=6)
    assert streaming[2][1] == NO_LABEL and torch.equal(streaming[2][0], unlabeled.images[2])

    with pytest.raises(ValueError, match=r"image column 'drawing' not found.*'photo', 'sketch'"):
        load_image_data(path, image_column="drawing")
    with pytest.raises(ValueError, match=r"label column 'genus' not found.*'coarse', 'species'"):
        load_image_data(path, label_column="genus")


# ---------------------------------------------------------------------------------------------- errors


def test_missing_path_and_unreachable_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_data(str(tmp_path / "nowhere" / "images"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"could not find or load dataset 'someone/no-such-dataset'") as error:
        load_image_data("someone/no-such-dataset")
    assert "local image folder" in str(error.value) and "fashion_mnist" in str(error.value)
    assert time.perf_counter() - start < 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dataset files found in folder"):
        load_image_data(str(tmp_path / "empty"))


def test_empty_split_no_image_column_unknown_split_bad_channels(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"img": _images(2), "label": [0, 1]}, features=features),
            "test": datasets.Dataset.from_dict({"img": [], "label": []}, features=features),
        }
    ).save_to_disk(str(tmp_path / "with_empty"), num_shards={"train": 1, "test": 1})  # datasets can't reload 0 shards
    with pytest.raises(ValueError, match="split 'test' of .* is empty"):
        load_image_data(str(tmp_path / "with_empty"), "test")
    train = load_image_data(str(tmp_path / "with_empty"), "train")
    assert train.labels.tolist() == [0, 1] and train.class_names is None and train.num_classes == 2

    datasets.Dataset.from_dict({"text": ["a", "b"], "score": [1.0, 2.0]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(ValueError, match=r"no image column found among the columns \['text', 'score'\]"):
        load_image_data(str(tmp_path / "text"))
    with pytest.raises(ValueError, match=r"unknown split 'test'.*\['train'\]"):
        load_image_data(str(tmp_path / "text"), "test")
    with pytest.raises(ValueError, match="channels must be 1 .* or 3"):
        load_image_data(str(tmp_path / "with_empty"), channels=2)
    float_features = datasets.Features({"img": datasets.Image(), "score": datasets.Value("float32")})
    datasets.Dataset.from_dict({"img": _images(2), "score": [0.5, 1.5]}, features=float_features).save_to_disk(
        str(tmp_path / "float_labels")
    )
    with pytest.raises(ValueError, match="label column 'score' holds"):
        load_image_data(str(tmp_path / "float_labels"), label_column="score")


def test_pixel_array_column(tmp_path):
    pixels = _rng(7).integers(0, 256, (3, 5, 5), dtype=np.uint8)
    features = datasets.Features({"pixel_values": datasets.Array2D((5, 5), "uint8"), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"pixel_values": pixels, "label": [1, 0, 1]}, features=features).save_to_disk(
        str(tmp_path / "arrays")
    )
    data = load_image_data(str(tmp_path / "arrays"), channels=1)
    assert np.array_equal(data.images[:, 0].numpy(), pixels) and data.labels.tolist() == [1, 0, 1]
    _ds, image_column, label_column, class_names = open_image_dataset(str(tmp_path / "arrays"))
    assert (image_column, label_column, class_names) == ("pixel_values", "label", None)


def test_read_idx_ubyte_plain_and_gzipped_and_bad_files(tmp_path):
    images = _rng().integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels", labels)
    assert np.array_equal(hf_ibproj.data.read_idx_ubyte(tmp_path / "images.gz"), images)
    assert np.array_equal(hf_ibproj.data.read_idx_ubyte(tmp_path / "labels"), labels)

    (tmp_path / "int32").write_bytes(struct.pack(">HBBI", 0, 0x0C, 1, 2) + b"\0" * 8)  # int32 data: not uint8
    with pytest.raises(ValueError, match=r"int32 is not a uint8 idx file"):
        hf_ibproj.data.read_idx_ubyte(tmp_path / "int32")
    (tmp_path / "truncated").write_bytes((tmp_path / "labels").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"holds 4 bytes of data where its header announces shape \[5\]"):
        hf_ibproj.data.read_idx_ubyte(tmp_path / "truncated")
