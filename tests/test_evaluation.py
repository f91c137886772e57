"""Frozen-backbone evaluation: kNN against a naive loop, linear probe against scikit-learn, feature extraction against
a manual forward, and `hf-ibproj evaluate` on datasets unlike the backbone (size, channels) against timm's transform."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import hf_ibproj.backbones  # noqa: F401  (registers the small-image ResNets with timm)
from hf_ibproj import IBProjConfig, IBProjModel
from hf_ibproj.data import ImageData
from hf_ibproj.evaluation import (
    evaluate_backbone,
    evaluate_features,
    extract_dataset_features,
    extract_features,
    format_table,
    knn_accuracy,
    knn_predict,
    linear_probe,
)

TINY = {"in_chans": 1, "channels": [8, 16, 32, 64]}


# ------------------------------------------------------------------------------------------------ kNN


def naive_knn_scores(train, train_labels, test, num_classes, k, temperature):
    """Weighted kNN written as loops over plain Python floats (solo-learn / lightly's definition)."""
    scores = []
    for query in test.tolist():
        similarities = []
        for index, point in enumerate(train.tolist()):
            dot = sum(a * b for a, b in zip(query, point))
            norm = math.sqrt(sum(a * a for a in query)) * math.sqrt(sum(b * b for b in point))
            similarities.append((dot / norm, index))
        similarities.sort(reverse=True)
        votes = [0.0] * num_classes
        for similarity, index in similarities[:k]:
            votes[int(train_labels[index])] += math.exp(similarity / temperature)
        scores.append(votes)
    return torch.tensor(scores)


@pytest.mark.parametrize("k, chunk_size", [(10, 3), (200, 1024)])  # 200 > 60 training points: all neighbours
def test_knn_predict_equals_naive_loop(k, chunk_size):
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=generator)
    labels = torch.randint(0, 5, (60,), generator=generator)
    test = torch.randn(7, 8, generator=generator)
    scores = knn_predict(train, labels, test, num_classes=5, k=k, temperature=0.1, chunk_size=chunk_size)
    expected = naive_knn_scores(train, labels, test, 5, min(k, 60), 0.1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)


def test_knn_accuracy_counts_top1_and_top5():
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(80, 6, generator=generator)
    train_labels = torch.randint(0, 8, (80,), generator=generator)
    test = torch.randn(30, 6, generator=generator)
    test_labels = torch.randint(0, 8, (30,), generator=generator)
    expected = naive_knn_scores(train, train_labels, test, 8, 20, 0.1)
    ranked = [sorted(range(8), key=lambda c: -row[c]) for row in expected.tolist()]
    top1 = 100 * np.mean([r[0] == y for r, y in zip(ranked, test_labels.tolist())])
    top5 = 100 * np.mean([y in r[:5] for r, y in zip(ranked, test_labels.tolist())])
    result = knn_accuracy(train, train_labels, test, test_labels, 8, k=20, temperature=0.1)
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == pytest.approx(top5)
    # With 5 classes or fewer, top-5 is meaningless and not reported.
    assert "top5" not in knn_accuracy(train, train_labels % 4, test, test_labels % 4, 4, k=20)


# ------------------------------------------------------------------------------------------------ linear probe


def gaussian_classes(n, num_classes=6, dim=24, seed=0):
    """Overlapping Gaussian classes with unequal feature scales: a linear probe gets well above chance, not 100%."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    scales = rng.uniform(0.1, 10, dim)
    features = (centers[labels] + 1.5 * rng.normal(size=(n, dim))) * scales + rng.normal(size=dim) * 5
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def test_linear_probe_matches_scikit_learn():
    x_all, y_all = gaussian_classes(4000, seed=0)
    x_train, y_train, x_test, y_test = x_all[:3000], y_all[:3000], x_all[3000:], y_all[3000:]
    scaler = StandardScaler().fit(x_train.numpy())
    reference = LogisticRegression(max_iter=10_000).fit(scaler.transform(x_train.numpy()), y_train.numpy())
    sklearn_top1 = 100 * reference.score(scaler.transform(x_test.numpy()), y_test.numpy())
    assert 40 < sklearn_top1 < 99  # a problem where the regularization matters

    result = linear_probe(x_train, y_train, x_test, y_test, num_classes=6)
    assert abs(result["top1"] - sklearn_top1) <= 1.0
    assert result["weight_decay"] in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    assert 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.parametrize("weight_decay", [1e-1, 1e-3])
def test_linear_probe_solves_the_same_objective_as_scikit_learn(weight_decay):
    """mean CE + wd/2 ||W||^2 is LogisticRegression(C = 1 / (wd * n)): converged solutions predict the same."""
    x_all, y_all = gaussian_classes(1500, num_classes=4, dim=10, seed=3)
    x_train, y_train, x_test, y_test = x_all[:1000], y_all[:1000], x_all[1000:], y_all[1000:]
    scaler = StandardScaler().fit(x_train.numpy())
    reference = LogisticRegression(C=1 / (weight_decay * 1000), tol=1e-10, max_iter=10_000)
    reference.fit(scaler.transform(x_train.numpy()), y_train.numpy())
    sklearn_top1 = 100 * reference.score(scaler.transform(x_test.numpy()), y_test.numpy())
    result = linear_probe(x_train, y_train, x_test, y_test, num_classes=4, weight_decays=(weight_decay,))
    assert result["top1"] == pytest.approx(sklearn_top1, abs=0.21)  # at most one test sample of 500 differs
    assert result["weight_decay"] == weight_decay
    assert "top5" not in result


# ------------------------------------------------------------------------------------------------ features


def test_extract_features_normalizes_and_batches_like_a_manual_forward():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18_small", num_classes=0, **TINY).train()
    images = torch.randint(0, 256, (10, 1, 12, 12), dtype=torch.uint8)
    expected = backbone.eval()((images.float() / 255 - 0.3) / 0.2).detach()
    backbone.train()
    features = extract_features(backbone, images, (0.3,), (0.2,), batch_size=4, precision="no")
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert backbone.training  # the caller's mode is restored
    reduced = extract_features(backbone, images, (0.3,), (0.2,), batch_size=4, precision="bf16")
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, expected, rtol=0.1, atol=0.05)
    with pytest.raises(ValueError, match="channels"):
        extract_features(backbone, images.expand(-1, 3, -1, -1), (0.3,), (0.2,))


class PairsDataset(torch.utils.data.Dataset):
    """(uint8 image, label) items, the protocol of hf_ibproj.data.StreamingImageDataset."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_extract_dataset_features_reads_the_given_rows_like_a_manual_forward(num_workers):
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18_small", num_classes=0, **TINY)
    images = torch.randint(0, 256, (13, 1, 12, 12), dtype=torch.uint8)
    labels = torch.arange(13) % 4
    rows = [11, 0, 5, 5, 7, 2, 12]  # any order, repeats allowed
    expected = backbone.eval()((images[rows].float() / 255 - 0.3) / 0.2).detach()
    features, got_labels = extract_dataset_features(backbone, PairsDataset(images, labels), rows, (0.3,), (0.2,),
                                                    batch_size=3, num_workers=num_workers, precision="no")
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert got_labels.dtype == torch.int64 and got_labels.tolist() == labels[rows].tolist()
    everything, _ = extract_dataset_features(backbone, PairsDataset(images, labels), None, (0.3,), (0.2,),
                                             batch_size=5, num_workers=0, precision="no", progress=False)
    assert everything.shape == (13, 64)


def test_extract_dataset_features_counts_replaced_undecodable_rows():
    """StreamingImageDataset items carry a third value, 1 where a corrupt row was replaced by the next one."""

    class WithSkipped(PairsDataset):
        def __getitem__(self, index):
            return (*super().__getitem__(index), int(index in (1, 4)))

    backbone = timm.create_model("resnet18_small", num_classes=0, **TINY)
    images = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="2 of 6 images could not be decoded"):
        features, labels = extract_dataset_features(backbone, WithSkipped(images, torch.arange(6)), None, (0.3,),
                                                    (0.2,), batch_size=4, num_workers=0, progress=False)
    assert features.shape == (6, 64) and labels.tolist() == list(range(6))


def test_progress_bars_show_extraction_and_probe_fits(capsys, monkeypatch):
    from hf_ibproj import progress

    monkeypatch.setattr(progress, "on_terminal", lambda: True)  # bars on a terminal (plain lines: test_progress.py)
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18_small", num_classes=0, **TINY)
    evaluate_backbone(backbone, color_dataset(40), color_dataset(20, seed=1), (0.5,), (0.5,), knn_k=5)
    shown = capsys.readouterr().err
    assert "features" in shown and "linear probe: refit at weight decay" in shown
    evaluate_backbone(backbone, color_dataset(40), color_dataset(20, seed=1), (0.5,), (0.5,), knn_k=5,
                      progress=False)
    assert capsys.readouterr().err == ""


def test_evaluate_features_checks_labels_and_class_names():
    train, train_labels = gaussian_classes(300, num_classes=3, dim=8, seed=4)
    test, test_labels = gaussian_classes(90, num_classes=3, dim=8, seed=5)
    result = evaluate_features(train, train_labels, test, test_labels, knn_k=10, progress=False)
    expected_linear = linear_probe(train, train_labels, test, test_labels, 3)
    assert result["linear_top1"] == expected_linear["top1"] and result["num_classes"] == 3
    assert result["knn_top1"] == knn_accuracy(train, train_labels, test, test_labels, 3, k=10)["top1"]
    # class names fix the number of classes even when the labels stop short of the last one
    assert evaluate_features(train, train_labels, test, test_labels, class_names=list("abcd"), knn_k=10,
                             progress=False)["num_classes"] == 4
    with pytest.raises(ValueError, match="no labels"):  # streaming datasets mark unlabeled rows with -1
        evaluate_features(train, torch.full_like(train_labels, -1), test, test_labels)
    with pytest.raises(ValueError, match="2 class names"):
        evaluate_features(train, train_labels, test, test_labels, class_names=["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_features(train * float("nan"), train_labels, test, test_labels)


def color_dataset(n, num_classes=3, size=12, seed=0, labeled=True):
    """Images whose mean brightness encodes the class, plus noise: separable by any reasonable features."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    base = 40 + 170 * labels.float() / max(1, num_classes - 1)
    images = base.view(-1, 1, 1, 1) + 20 * torch.randn(n, 1, size, size, generator=generator)
    images = images.clamp(0, 255).to(torch.uint8)
    names = [f"class{i}" for i in range(num_classes)]
    return ImageData(images, labels if labeled else None, names if labeled else None)


def test_evaluate_backbone_on_a_separable_problem():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18_small", num_classes=0, **TINY)
    result = evaluate_backbone(backbone, color_dataset(120), color_dataset(60, seed=1), (0.5,), (0.5,), knn_k=20)
    assert result["linear_top1"] >= 95 and result["knn_top1"] >= 95
    assert "linear_top5" not in result and result["num_features"] == 64
    assert (result["num_classes"], result["num_train"], result["num_test"]) == (3, 120, 60)
    table = format_table({"trained": result, "random-init": {"knn_top1": 12.345}})
    lines = table.splitlines()
    assert lines[0].split() == ["model", "linear", "top-1", "linear", "top-5", "kNN", "top-1", "kNN", "top-5"]
    assert lines[3].split() == ["random-init", "-", "-", "12.35", "-"]


def test_evaluate_backbone_rejects_unlabeled_data_and_missing_classes():
    backbone = timm.create_model("resnet18_small", num_classes=0, **TINY)
    with pytest.raises(ValueError, match="no labels"):
        evaluate_backbone(backbone, color_dataset(30, labeled=False), color_dataset(30), (0.5,), (0.5,))
    two_classes = color_dataset(30)
    two_classes = ImageData(two_classes.images[two_classes.labels < 2], two_classes.labels[two_classes.labels < 2],
                            two_classes.class_names)
    with pytest.raises(ValueError, match="classes missing from test: class2"):
        evaluate_backbone(backbone, color_dataset(30), two_classes, (0.5,), (0.5,))


# ------------------------------------------------------------------------------------------------ command line


def tiny_model(channels, image_size, mean, std):
    torch.manual_seed(0)
    config = IBProjConfig(backbone="resnet18_small", backbone_kwargs={"in_chans": channels, "channels": [8, 16, 32, 64]},
                          image_size=image_size, image_mean=[mean] * channels, image_std=[std] * channels)
    model = IBProjModel(config)
    with torch.no_grad():  # make the weights unlike any fresh initialization
        for parameter in model.backbone.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def save_dataset(path, splits, mode):
    """ImageData splits (one gray channel) as a save_to_disk folder of PIL images in `mode` (+ class labels)."""
    from PIL import Image

    def to_dataset(data):
        columns = {"image": [Image.fromarray(image[0].numpy(), mode="L").convert(mode) for image in data.images]}
        features = {"image": datasets.Image()}
        if data.labels is not None:
            columns["label"] = data.labels.tolist()
            features["label"] = datasets.ClassLabel(names=data.class_names)
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features))

    datasets.DatasetDict({name: to_dataset(data) for name, data in splits.items()}).save_to_disk(str(path))
    return str(path)


def timm_eval_features(backbone, dataset, split, data_config, mode):
    """Reference: the dataset through timm's own eval transform (resize floor(S / crop_pct), center crop S)."""
    transform = timm.data.create_transform(**data_config, is_training=False)
    images = datasets.load_from_disk(dataset)[split]["image"]
    batch = torch.stack([transform(image.convert(mode)) for image in images])
    with torch.no_grad():
        return backbone.eval()(batch)


@pytest.mark.parametrize(
    "backbone_channels, backbone_size, image_mode, image_size",
    [(3, 32, "L", 28), (1, 28, "RGB", 32)],  # RGB 32 px backbone on gray 28 px data, and the other way round
)
def test_evaluate_brings_any_dataset_to_the_backbone_like_timms_eval_transform(
    backbone_channels, backbone_size, image_mode, image_size, tmp_path, capsys
):
    from hf_ibproj.cli import main
    from hf_ibproj.evaluate_cli import EvaluateArguments, evaluate

    model = tiny_model(backbone_channels, backbone_size, mean=0.4, std=0.25)
    model.save_pretrained(tmp_path / "run" / "model")
    dataset = save_dataset(tmp_path / "data", {"train": color_dataset(60, size=image_size),
                                               "test": color_dataset(30, size=image_size, seed=1)}, image_mode)
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--dataset", dataset, "--num-workers", "0",
                 "--mixed-precision", "no", "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    data_config = report["data_config"]
    assert data_config["input_size"] == [backbone_channels, backbone_size, backbone_size]
    assert data_config["mean"] == [0.4] * backbone_channels and data_config["crop_pct"] == 1.0
    trained = report["results"]["trained"]
    assert (trained["num_train"], trained["num_test"], trained["num_features"]) == (60, 30, 64)
    assert trained["linear_top1"] >= 90  # brightness classes survive the resize and the channel conversion
    assert "linear top-1" in capsys.readouterr().out

    # The same numbers from features of timm's eval transform (PIL mode converted to the backbone's channels).
    pil_mode = "RGB" if backbone_channels == 3 else "L"
    timm_config = {**data_config, "input_size": tuple(data_config["input_size"])}
    train_features, test_features = (timm_eval_features(model.backbone, dataset, split, timm_config, pil_mode)
                                     for split in ("train", "test"))
    labels = color_dataset(60).labels, color_dataset(30, seed=1).labels
    expected = evaluate_features(train_features, labels[0], test_features, labels[1], progress=False)
    for key in ("linear_top1", "knn_top1", "linear_weight_decay"):
        assert trained[key] == pytest.approx(expected[key]), key

    # --image-size overrides the input size; the interpolation and crop_pct stay the backbone's.
    override = evaluate(EvaluateArguments(model=str(tmp_path / "run"), dataset=dataset, image_size=20,
                                          num_workers=0, mixed_precision="no"))
    assert override["data_config"]["input_size"] == (backbone_channels, 20, 20)


def test_evaluate_random_init_row_and_stratified_subsets(tmp_path):
    from hf_ibproj.evaluate_cli import EvaluateArguments, evaluate

    tiny_model(1, 12, mean=0.3, std=0.2).save_pretrained(tmp_path / "run" / "model")
    dataset = save_dataset(tmp_path / "gray", {"train": color_dataset(90, size=12),
                                               "test": color_dataset(45, size=12, seed=1)}, "L")
    report = evaluate(EvaluateArguments(model=str(tmp_path / "run"), dataset=dataset, random_init=True,
                                        max_samples=30, eval_max_samples=15, num_workers=0))
    assert set(report["results"]) == {"trained", "random-init"}
    for row in report["results"].values():
        assert row["linear_top1"] >= 90  # brightness classes: linearly separable for any features
        assert (row["num_train"], row["num_test"], row["num_classes"]) == (30, 15, 3)
    # k=200 > 30 training images: every image votes, and only distinct features keep the kNN accurate.
    assert report["results"]["trained"]["knn_top1"] != report["results"]["random-init"]["knn_top1"]


def test_evaluate_help_shows_one_flag_style_with_defaults(capsys):
    from hf_ibproj.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag in ("--train-split", "--eval-split", "--image-column", "--label-column", "--max-samples",
                 "--eval-max-samples", "--image-size", "--batch-size", "--seed", "--output-dir", "--num-workers",
                 "--mixed-precision {auto,no,bf16}", "--random-init", "--no-random-init"):
        assert flag in shown, flag
    assert "--split-train" not in shown and "--train_split" not in shown
    assert "(default: train)" in shown and "(default: 512)" in shown and "(default: False)" in shown


def test_evaluate_command_errors(tmp_path, capsys):
    from hf_ibproj.cli import main

    tiny_model(1, 12, mean=0.3, std=0.2).save_pretrained(tmp_path / "run" / "model")
    unlabeled = color_dataset(12, size=12, labeled=False)
    dataset = save_dataset(tmp_path / "unlabeled", {"train": unlabeled, "test": unlabeled}, "L")
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--dataset", dataset]) == 2
    assert "has no labels" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing-run"), "--dataset", dataset]) == 2
    assert "does not resolve" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--dataset", dataset, "--max-samples", "0"]) == 2
    assert "--max-samples must be a positive integer" in capsys.readouterr().err
