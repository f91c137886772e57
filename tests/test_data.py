"""hf_ibproj.data: every kind of source, colour modes, resizing, labels, bad input and the streaming path,
checked against pixels computed independently in the test (struct-parsed idx files, PIL's documented
luma formula, torchvision's Resize + CenterCrop)."""

import gzip
import logging
import struct
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from hf_ibproj.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    NO_LABEL,
    ImageData,
    StreamingImageDataset,
    load_image_data,
    open_image_dataset,
)


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
    with gzip.open(FASHION_MNIST_DIR / labels_file, "rb") as f:
        magic, _count = struct.unpack(">II", f.read(8))
        assert magic == 2049
        f.seek(8 + index)
        return f.read(1)[0]


@needs_fashion_mnist
def test_fashion_mnist_from_debian_idx_files():
    start = time.perf_counter()
    train = load_image_data("fashion_mnist", "train", channels=1)
    elapsed = time.perf_counter() - start
    assert elapsed < 15  # ~1 s when the machine is idle; the datasets row path would take minutes
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and len(train) == 60000
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert train.class_names == FASHION_MNIST_CLASSES and train.num_classes == 10 and train.skipped == 0
    for index in (0, 1, 31_337, 59_999):
        assert np.array_equal(train.images[index, 0].numpy(), _idx_image("train-images-idx3-ubyte.gz", index))
        assert train.labels[index] == _idx_label("train-labels-idx1-ubyte.gz", index)

    test = load_image_data("fashion_mnist", "test", channels=3, max_samples=50)
    assert test.images.shape == (50, 3, 28, 28)
    for index in (0, 49):
        for channel in range(3):  # gray -> RGB repeats the gray value
            assert np.array_equal(test.images[index, channel].numpy(), _idx_image("t10k-images-idx3-ubyte.gz", index))
        assert test.labels[index] == _idx_label("t10k-labels-idx1-ubyte.gz", index)
    assert len(load_image_data("fashion_mnist", "test", channels=1)) == 10000


@needs_fashion_mnist
def test_fashion_mnist_resized_and_streamed():
    small = load_image_data("fashion_mnist", "test", channels=1, image_size=14, max_samples=3)
    expected = TF.resize(Image.fromarray(_idx_image("t10k-images-idx3-ubyte.gz", 2)), 14, TF.InterpolationMode.BICUBIC)
    assert small.images.shape == (3, 1, 14, 14)
    assert np.array_equal(small.images[2, 0].numpy(), np.asarray(expected))

    streaming = StreamingImageDataset.from_source("fashion_mnist", "test", channels=1, image_size=28)
    assert len(streaming) == 10000 and streaming.class_names == FASHION_MNIST_CLASSES
    image, label = streaming[7]
    assert np.array_equal(image[0].numpy(), _idx_image("t10k-images-idx3-ubyte.gz", 7))
    assert label == _idx_label("t10k-labels-idx1-ubyte.gz", 7)
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
    data = load_image_data(str(root), channels=3, image_size=24)
    assert data.images.shape == (3, 3, 24, 24)
    for image in originals:
        reference = TF.center_crop(TF.resize(image, 24, TF.InterpolationMode.BICUBIC), 24)
        reference = torch.from_numpy(np.asarray(reference).transpose(2, 0, 1).copy())
        assert sum(torch.equal(reference, loaded) for loaded in data.images) == 1

    with pytest.raises(ValueError, match=r"differ in size.*--image-size"):
        load_image_data(str(root))
    with pytest.raises(ValueError, match=r"24x24 is smaller than the requested image size 25.*lower --image-size"):
        load_image_data(str(root), image_size=25)


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
    assert torch.equal(torch.cat([images for images, _ in batches]), in_memory.images)
    assert torch.equal(torch.cat([labels for _, labels in batches]), in_memory.labels)
    assert streaming.class_names == in_memory.class_names == ["a", "b", "c"]

    (folder / "a" / "0.png").write_bytes(b"broken")  # row 0: replaced by the next decodable row
    streaming = StreamingImageDataset.from_source(str(folder), channels=3, image_size=16)
    assert torch.equal(streaming[0][0], in_memory.images[1])


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
    assert gray.images.shape == (2, 1, 6, 6) and gray.labels.tolist() == [0, 1]
    assert np.abs(gray.images[1, 0].double().numpy() - _luma(np.asarray(train_images[1], dtype=np.float64))).max() <= 1
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
