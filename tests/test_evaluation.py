"""Frozen-backbone evaluation: kNN against a naive loop, linear probe against scikit-learn, backbone resolution."""

from __future__ import annotations

import json
import math
import time

import datasets
import numpy as np
import pytest
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import hf_ibproj  # noqa: F401  (registers the small-image ResNets with timm)
from hf_ibproj import IBProjConfig, IBProjModel
from hf_ibproj.data import ImageData
from hf_ibproj.evaluation import (
    evaluate_backbone,
    extract_features,
    format_table,
    knn_accuracy,
    knn_predict,
    linear_probe,
    load_backbone,
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
    features = extract_features(backbone, images, (0.3,), (0.2,), batch_size=4, precision="fp32")
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert backbone.training  # the caller's mode is restored
    reduced = extract_features(backbone, images, (0.3,), (0.2,), batch_size=4, precision="bf16")
    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced, expected, rtol=0.1, atol=0.05)
    with pytest.raises(ValueError, match="channels"):
        extract_features(backbone, images.expand(-1, 3, -1, -1), (0.3,), (0.2,))


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


# ------------------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def trained_model():
    torch.manual_seed(0)
    config = IBProjConfig(backbone="resnet18_small", backbone_kwargs=TINY, image_size=12, image_mean=[0.3],
                          image_std=[0.2])
    model = IBProjModel(config)
    with torch.no_grad():  # make the weights unlike any fresh initialization
        for parameter in model.backbone.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def reference_features(model, images):
    return model.backbone((images.float() / 255 - 0.3) / 0.2).detach()


def test_load_backbone_resolves_run_folder_saved_model_and_exported_folder(trained_model, tmp_path):
    trained_model.save_pretrained(tmp_path / "run" / "model")
    trained_model.save_pretrained(tmp_path / "saved")
    timm.models.save_for_hf(  # timm's own Hub folder layout: config.json with architecture + model.safetensors
        trained_model.backbone, tmp_path / "exported", safe_serialization=True,
        data_config={"input_size": (1, 12, 12), "mean": (0.3,), "std": (0.2,)},
    )
    images = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8)
    expected = reference_features(trained_model, images)
    for folder in ("run", "saved", "exported"):
        backbone, preprocessing = load_backbone(str(tmp_path / folder))
        assert preprocessing["input_size"] == (1, 12, 12)
        assert tuple(preprocessing["mean"]) == pytest.approx((0.3,))
        assert tuple(preprocessing["std"]) == pytest.approx((0.2,))
        features = extract_features(backbone, images, preprocessing["mean"], preprocessing["std"], precision="fp32")
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4, msg=folder)


def test_load_backbone_random_init_is_the_same_architecture_with_fresh_seeded_weights(trained_model, tmp_path):
    trained_model.save_pretrained(tmp_path / "run" / "model")
    trained = trained_model.backbone.state_dict()
    fresh, preprocessing = load_backbone(str(tmp_path / "run"), random_init=True)
    again, _ = load_backbone(str(tmp_path / "run"), random_init=True)
    assert preprocessing["input_size"] == (1, 12, 12)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in trained.items()}
    assert not torch.equal(fresh.conv1.weight, trained["conv1.weight"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))


def test_load_backbone_timm_name():
    backbone, preprocessing = load_backbone("resnet18_small", random_init=True)
    assert backbone.num_features == 512 and backbone.num_classes == 0
    assert preprocessing["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="no pretrained weights"):
        load_backbone("resnet18_small")


def test_load_backbone_errors_are_clear_and_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ValueError, match="could not be fetched"):
        load_backbone("nobody/no-such-backbone")
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="does not resolve"):
        load_backbone("not_a_timm_model_or_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_backbone(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="neither an IBProjModel"):
        load_backbone(str(tmp_path / "other"))


# ------------------------------------------------------------------------------------------------ three routes, CLI


def test_run_folder_exported_folder_and_hub_id_give_identical_numbers(trained_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_ibproj.hub import export_backbone, push_to_hub
    from hub_server import FakeHub

    run = tmp_path / "run"
    trained_model.save_pretrained(run / "model")
    export_backbone(run, run / "backbone")
    train, test = color_dataset(90, size=12), color_dataset(45, size=12, seed=1)
    with FakeHub() as hub:
        for name, value in (("ENDPOINT", hub.endpoint), ("HF_HUB_DISABLE_XET", True), ("HF_HUB_OFFLINE", False),
                            ("HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
                            ("HF_HUB_CACHE", str(tmp_path / "cache"))):
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        push_to_hub(run / "backbone", "tester/eval-backbone")
        results = {}
        for route in (str(run), str(run / "backbone"), "tester/eval-backbone"):
            backbone, preprocessing = load_backbone(route)
            results[route] = evaluate_backbone(backbone, train, test, preprocessing["mean"], preprocessing["std"],
                                               knn_k=10, precision="fp32")
        assert any("/resolve/" in request.path for request in hub.requests)  # the Hub route really downloaded
    first, *others = results.values()
    assert all(other == first for other in others), results
    assert first["num_features"] == 64


def save_gray_dataset(path, splits):
    """ImageData splits as a save_to_disk folder of grayscale PIL images (+ class labels when present)."""
    from PIL import Image

    def to_dataset(data):
        columns = {"image": [Image.fromarray(image[0].numpy(), mode="L") for image in data.images]}
        features = {"image": datasets.Image()}
        if data.labels is not None:
            columns["label"] = data.labels.tolist()
            features["label"] = datasets.ClassLabel(names=data.class_names)
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features))

    datasets.DatasetDict({name: to_dataset(data) for name, data in splits.items()}).save_to_disk(str(path))
    return str(path)


def test_evaluate_command_prints_a_table_and_writes_json(trained_model, tmp_path, capsys):
    from hf_ibproj.cli import main

    trained_model.save_pretrained(tmp_path / "run" / "model")
    dataset = save_gray_dataset(tmp_path / "gray", {"train": color_dataset(90, size=12),
                                                    "test": color_dataset(45, size=12, seed=1)})
    output = tmp_path / "eval" / "results.json"
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--dataset", dataset, "--random-init",
                 "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert set(report["results"]) == {"trained", "random-init"}
    for row in report["results"].values():
        assert row["linear_top1"] >= 90  # brightness classes: linearly separable for any features
        assert (row["num_train"], row["num_test"], row["num_classes"]) == (90, 45, 3)
    # k=200 > 90 training images: every image votes, and only distinct features keep the kNN accurate.
    assert report["results"]["trained"]["knn_top1"] != report["results"]["random-init"]["knn_top1"]
    table = capsys.readouterr().out
    assert "random-init" in table and "linear top-1" in table


def test_evaluate_command_errors(tmp_path, capsys, trained_model):
    from hf_ibproj.cli import main

    trained_model.save_pretrained(tmp_path / "run" / "model")
    unlabeled = color_dataset(12, size=12, labeled=False)
    dataset = save_gray_dataset(tmp_path / "unlabeled", {"train": unlabeled, "test": unlabeled})
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--dataset", dataset]) == 2
    assert "has no labels" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing-run"), "--dataset", dataset]) == 2
    assert "does not resolve" in capsys.readouterr().err
