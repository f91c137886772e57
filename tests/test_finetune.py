"""finetune.py: linear and full fine-tuning of an exported backbone, pipeline loading, and a 2-process gloo run."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import pipeline

from hf_ibproj import IBProjConfig, IBProjModel, export_backbone

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("finetune", ROOT / "finetune.py")
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)
COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def color_image(rgb, rng):
    """A 32x32 image of one dominant color, with pixel noise and a random darker square."""
    pixels = np.array(rgb, dtype=np.float32) + rng.normal(0, 25, (32, 32, 3))
    top, left = rng.integers(0, 20, 2)
    pixels[top : top + 12, left : left + 12] *= 0.6
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def color_dataset(tmp_path_factory):
    """save_to_disk folder, 3 classes of noisy colored images: 150 train, 60 test."""
    rng = np.random.default_rng(0)
    names = list(COLORS)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def split(n):
        labels = [i % len(names) for i in range(n)]
        images = [color_image(COLORS[names[label]], rng) for label in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    path = tmp_path_factory.mktemp("colors") / "dataset"
    datasets.DatasetDict({"train": split(150), "test": split(60)}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory):
    """An untrained tiny small-stem ResNet exported as a timm Hub folder (what `hf-ibproj export` writes)."""
    torch.manual_seed(0)
    config = IBProjConfig(backbone="resnet18_small", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=32)
    return export_backbone(IBProjModel(config), tmp_path_factory.mktemp("backbone") / "tiny-resnet")


def test_linear_and_full_fine_tuning_learn_and_the_saved_model_runs_in_a_pipeline(
    color_dataset, backbone_folder, tmp_path
):
    for mode, lr, epochs in (("linear", 3e-2, 6), ("full", 3e-3, 4)):
        out = tmp_path / mode
        assert finetune.main(["--backbone", str(backbone_folder), "--dataset", str(color_dataset), "--mode", mode,
                              "--output-dir", str(out), "--epochs", str(epochs), "--batch-size", "32",
                              "--lr", str(lr), "--num-workers", "0"]) == 0
        accuracy = json.loads((out / "results.json").read_text())["test_accuracy"]
        assert accuracy >= 90, (mode, accuracy)

        # The saved folder is a transformers image classifier: the pipeline agrees with the colors.
        classifier = pipeline("image-classification", model=str(out))
        rng = np.random.default_rng(1)
        hits = [classifier(color_image(rgb, rng), top_k=1)[0]["label"] == name
                for name, rgb in COLORS.items() for _ in range(5)]
        assert sum(hits) >= 13, (mode, hits)

        card = (out / "README.md").read_text()
        metadata = yaml.safe_load(card.split("---")[1])
        assert metadata["base_model"] == str(backbone_folder)
        assert metadata["pipeline_tag"] == "image-classification"

    # linear mode kept the backbone exactly as exported; full mode changed it.
    from safetensors.torch import load_file

    exported = load_file(backbone_folder / "model.safetensors")
    for mode, same in (("linear", True), ("full", False)):
        tuned = load_file(tmp_path / mode / "model.safetensors")
        tuned = {k.removeprefix("timm_model."): v for k, v in tuned.items()}
        assert torch.equal(tuned["conv1.weight"], exported["conv1.weight"]) is same, mode
        assert torch.equal(tuned["bn1.running_mean"], exported["bn1.running_mean"]) is same, mode


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_run_completes(color_dataset, backbone_folder, tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    command = [*launcher, str(ROOT / "finetune.py"), "--backbone", str(backbone_folder), "--dataset",
               str(color_dataset), "--mode", "linear", "--output-dir", str(out), "--epochs", "1", "--batch-size", "16",
               "--num-workers", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2  # one gloo process group, not two independent runs
    assert result.stdout.count("test accuracy") == 1  # printed by the main process only


def test_unlabeled_dataset_is_a_clear_error(backbone_folder, tmp_path):
    unlabeled = datasets.Dataset.from_dict({"image": [Image.new("RGB", (32, 32))] * 4})
    unlabeled = datasets.DatasetDict({"train": unlabeled, "test": unlabeled})
    unlabeled.save_to_disk(str(tmp_path / "unlabeled"))
    with pytest.raises(ValueError, match="the train split has no labels"):
        finetune.main(["--backbone", str(backbone_folder), "--dataset", str(tmp_path / "unlabeled"),
                       "--output-dir", str(tmp_path / "out"), "--num-workers", "0"])
    assert not (tmp_path / "out").exists()
