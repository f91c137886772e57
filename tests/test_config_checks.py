"""Bad settings are refused before a run writes anything: damaged presets and stored configurations, settings that
do not fit together or the data, and a failed start leaves no folder behind (issue 23)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hf_ibproj import TrainConfig, pretrain
from hf_ibproj.augmentation import TwoViewAugmentation
from hf_ibproj.pretrain_cli import main
from tiny import TINY, save_tiny_dataset

REPO = Path(__file__).resolve().parent.parent
FLAGS = [*TINY, "--knn-train-samples", "32", "--knn-eval-samples", "16", "--tracker", "none", "--max-steps", "2",
         "--no-export-backbone"]  # two steps of the tiny run (tests/tiny.py)


def _gray_images(rng, count: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def noise_dataset(tmp_path_factory) -> Path:
    """32 + 16 noise images in two classes."""
    return save_tiny_dataset(tmp_path_factory.mktemp("data") / "noise", 32, 16, ("a", "b"), learnable=False)


@pytest.fixture(scope="module")
def stored_run(noise_dataset, tmp_path_factory) -> Path:
    """A finished two-step run (batch 16, lr 0.1, seed 3; no final evaluation), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("stored") / "run"
    assert main(["--dataset", str(noise_dataset), "--output-dir", str(out), "--seed", "3", "--no-final-eval",
                 *FLAGS]) == 0
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# 1. Presets (--config) and stored configurations (config.yaml, read by --resume)

BAD_PRESETS = [
    ("lr: [0.1\nbatch_size: 8\n", r"is not valid YAML \(.* at line 2, column \d+\)"),
    ("- lr\n- 0.1\n", r"holds list, not a mapping of settings"),
    ("", r"holds nothing, not a mapping of settings .*`\{\}` for the defaults"),
    ("lr: 0.1\nlearning_rate: 0.1\n", r"unknown key\(s\) learning_rate;"),
    ("lr: fast\n", r"lr='fast' is invalid; it must be a number"),
    ("epochs: [1]\nbatch_size: eight\n", r"batch_size='eight' is invalid; it must be an integer"),
]


@pytest.mark.parametrize("text, problem", BAD_PRESETS, ids=["syntax", "list", "empty", "unknown-key", "bad-float",
                                                            "bad-int"])
def test_a_bad_preset_is_refused_in_one_line_naming_the_file_and_key(tmp_path, text, problem):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    with pytest.raises(ValueError, match=problem) as error:
        TrainConfig.from_preset(preset)
    assert f"preset {str(preset)!r}" in _one_line(error)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=problem):
        main(["--config", str(preset), "--output-dir", str(out)])
    assert not out.exists()


def test_a_preset_may_leave_out_any_setting(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("{}\n")
    assert TrainConfig.from_preset(preset) == TrainConfig()
    preset.write_text("lr: 0.3\n")
    config = TrainConfig.from_preset(preset)
    assert (config.lr, config.batch_size, config.dataset) == (0.3, 256, "fashion_mnist")  # the paper's defaults


def test_a_stored_run_resumes_with_exactly_its_stored_settings(stored_run, noise_dataset):
    config = TrainConfig.from_run(stored_run)
    assert (config.batch_size, config.lr, config.seed, config.max_steps) == (16, 0.1, 3, 2)  # the flags it ran with
    assert (config.dataset, config.image_size, config.final_eval) == (str(noise_dataset), 16, False)


def _damaged_copy(stored_run: Path, tmp_path: Path, damage) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stored_run, run)
    config_file = run / "config.yaml"
    config_file.write_text(damage(config_file.read_text()))
    return run


def _without(text: str, *names: str) -> str:
    values = yaml.safe_load(text)
    return yaml.safe_dump({k: v for k, v in values.items() if k not in names}, sort_keys=False)


DAMAGED_CONFIGS = [
    (lambda text: text + "lr: [0.3\n", r"config\.yaml is not valid YAML \(.* at line \d+, column \d+\)"),
    (lambda text: "- lr\n- 0.3\n", r"config\.yaml holds a list, not a mapping of settings"),
    (lambda text: _without(text, "batch_size", "lr"), r"config\.yaml lacks the setting\(s\) batch_size, lr: "
                                                       r"--resume .* never with defaults"),
    (lambda text: "", r"config\.yaml lacks the setting\(s\) backbone, backbone_kwargs, .* in all\)"),
    (lambda text: text + "learning_rate: 0.3\n", r"config\.yaml has unknown key\(s\) learning_rate;"),
    (lambda text: text.replace("\nlr: 0.1\n", "\nlr: fast\n"), r"config\.yaml: lr='fast' is invalid"),
]


@pytest.mark.parametrize("damage, problem", DAMAGED_CONFIGS, ids=["syntax", "list", "missing-keys", "empty",
                                                                  "unknown-key", "bad-float"])
def test_a_damaged_stored_configuration_is_refused_on_resume_and_nothing_is_written(stored_run, tmp_path, damage,
                                                                                      problem):
    run = _damaged_copy(stored_run, tmp_path, damage)
    before = _snapshot(run)
    with pytest.raises(ValueError, match=problem) as error:
        main(["--output-dir", str(run), "--resume"])
    assert str(run / "config.yaml") in _one_line(error)
    with pytest.raises(ValueError, match=problem):
        TrainConfig.from_run(run)
    # from Python, with settings of its own: still refused, no default stands in for a stored setting
    with pytest.raises(ValueError, match=problem):
        pretrain(TrainConfig(output_dir=str(run), batch_size=16, lr=0.1, mixed_precision="no"), resume=True)
    assert _snapshot(run) == before


def test_resuming_a_config_without_its_batch_and_lr_in_train_py_says_so_in_one_line(stored_run, tmp_path):
    run = _damaged_copy(stored_run, tmp_path, lambda text: _without(text, "batch_size", "lr"))
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--output-dir", str(run), "--resume"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"train.py: error: {run / 'config.yaml'} lacks the setting(s) batch_size, lr: --resume continues a run with "
        "the settings it stored, never with defaults in their place; restore the file (train.py writes it when a "
        "run starts), or start a new run in another --output-dir.")
    assert "resumed" not in result.stdout


# 2. Settings that do not fit together or the data: refused before anything is written, naming the flag


@pytest.mark.parametrize("extra, problem", [
    (["--channels", "3", "--backbone-kwargs", "{in_chans: 1}"],
     r"--backbone-kwargs sets in_chans: 1 but --channels is 3 .*pass --channels 1"),
    (["--image-size", "1"], r"--image-size 1 is too small for the simclr augmentation: .* at least 2 px"),
    (["--eval-split", "validation"], r"unknown split 'validation' .*\['train', 'test'\].*--eval-split SPLIT\|none"),
    (["--batch-size", "64"], r"32 training samples do not fill one global batch of 64; lower --batch-size"),
], ids=["in-chans", "image-size", "eval-split", "batch-size"])
def test_a_mismatch_is_refused_before_anything_is_written(noise_dataset, tmp_path, extra, problem):
    out = tmp_path / "runs" / "run"
    with pytest.raises(ValueError, match=problem) as error:
        main(["--dataset", str(noise_dataset), "--output-dir", str(out), *FLAGS, *extra])
    _one_line(error)
    assert not out.exists()  # a failed start leaves no folder behind


def test_a_failed_start_in_an_empty_folder_leaves_no_folder_behind(noise_dataset, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(ValueError, match="--eval-split SPLIT"):
        main(["--dataset", str(noise_dataset), "--output-dir", str(out), *FLAGS, "--eval-split", "validation"])
    assert not out.exists()


def test_the_smallest_image_size_accepted_is_the_smallest_the_augmentation_runs_at():
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="blur|kernel|small"):  # kornia's own refusal: a 3-px reflect blur on 1 px
        TwoViewAugmentation("simclr", 1, 1, [0.5], [0.25])(images)
    assert TwoViewAugmentation("simclr", 2, 1, [0.5], [0.25])(images).shape == (4, 2, 1, 2, 2)
    assert TrainConfig(image_size=2).image_size == 2
    assert TwoViewAugmentation("barlow_twins", 1, 1, [0.5], [0.25])(images).shape == (4, 2, 1, 1, 1)
    assert TrainConfig(image_size=1, objective="barlow_twins").image_size == 1  # no blur, no lower bound
    with pytest.raises(ValueError, match="--image-size 1 is too small"):
        TrainConfig(image_size=1, objective="barlow_twins", augmentation="simclr")


def test_in_chans_equal_to_channels_is_accepted():
    assert TrainConfig(channels=1, backbone_kwargs={"in_chans": 1}).model_config().backbone_kwargs["in_chans"] == 1


# 3. Labels the monitors cannot use: the run goes on label-free and says what it skips and why


@pytest.fixture(scope="module")
def single_class_dataset(tmp_path_factory) -> Path:
    return save_tiny_dataset(tmp_path_factory.mktemp("data") / "one", 32, 16, ("cat",), learnable=False)


@pytest.fixture(scope="module")
def single_class_image_folder(tmp_path_factory) -> Path:
    """root/{train,test}/cat/*.png: one class sub-folder, whose label `datasets` drops."""
    from PIL import Image

    root, rng = tmp_path_factory.mktemp("data") / "folder", np.random.default_rng(0)
    for split, count in (("train", 32), ("test", 16)):
        (root / split / "cat").mkdir(parents=True)
        for i, pixels in enumerate(_gray_images(rng, count)):
            Image.fromarray(pixels).save(root / split / "cat" / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("data, streaming, reason", [
    ("single_class_dataset", False, r"has a single class \(cat\)"),
    ("single_class_dataset", True, r"has a single class \(cat\)"),
    ("single_class_image_folder", False, r"has no labels \(none detected: --label-column NAME .* two or more class"),
], ids=["one-class", "one-class-streaming", "one-class-image-folder"])
def test_unusable_labels_skip_evaluation_with_one_line_saying_why(request, tmp_path, capsys, data, streaming,
                                                                  reason):
    dataset = request.getfixturevalue(data)
    out = tmp_path / "run"
    assert main(["--dataset", str(dataset), "--output-dir", str(out), *FLAGS,
                 *(["--streaming"] if streaming else [])]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, notes
    assert f"the 'train' split of {dataset} " in notes[0]
    assert notes[0].endswith("so the online probe, the kNN monitor and the frozen-backbone evaluation"
                             + (", which need two or more," if "single" in reason else "")
                             + " are skipped; pretraining itself needs no labels.")
    assert re.search(reason, notes[0]), notes[0]
    assert not (out / "final_eval.json").exists() and not (out / "random_init_eval.json").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("online_probe_top1" in r or "knn_top1" in r for r in records)
    assert any("heldout/rankme" in r for r in records)  # the label-free monitor still runs


def test_two_classes_are_evaluated_without_a_note(noise_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--dataset", str(noise_dataset), "--output-dir", str(out), *FLAGS]) == 0
    assert "note: " not in capsys.readouterr().out
    assert (out / "final_eval.json").exists() and (out / "random_init_eval.json").exists()
