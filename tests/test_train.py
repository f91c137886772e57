"""train.py end to end on tiny data: a full run, two processes, kill-and-resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--channels", "1", "--image-size", "16", "--backbone-kwargs", "{channels: [8, 16, 32, 64]}",
    "--projector-hidden-dims", "[32]", "--projector-out-dim", "16", "--batch-size", "16", "--lr", "0.1",
    "--warmup-epochs", "0.5", "--mixed-precision", "no", "--log-every", "2", "--diagnostics-every", "2",
    "--knn-train-samples", "64", "--knn-eval-samples", "32", "--num-workers", "0",
]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """A save_to_disk dataset of 16x16 gray images, two learnable classes (bright top half / bright bottom half)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    rng = np.random.default_rng(0)

    def split(n: int):
        images, labels = [], []
        for i in range(n):
            label = i % 2
            pixels = rng.integers(0, 60, (16, 16), dtype=np.uint8)
            rows = slice(0, 8) if label == 0 else slice(8, 16)
            pixels[rows] += 150
            images.append(pixels)
            labels.append(label)
        return Dataset.from_dict(
            {"image": images, "label": labels},
            features=Features({"image": Image(), "label": ClassLabel(names=["top", "bottom"])}),
        )

    path = tmp_path_factory.mktemp("data") / "tiny"
    DatasetDict({"train": split(128), "test": split(64)}).save_to_disk(str(path))
    return path


def run_train(args: list[str], env: dict | None = None, launcher: list[str] | None = None, check: bool = True):
    command = (launcher or [sys.executable]) + [str(REPO / "train.py"), *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def test_full_run_writes_the_run_folder(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    run_train(["--dataset", str(tiny_dataset), "--epochs", "2", "--output-dir", str(out), "--mi-weight", "1e-3",
               "--quantize-levels", "5", "--tracker", "tensorboard", *TINY])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["mi_weight"] == 1e-3 and resolved["quantize_levels"] == 5 and resolved["seed"] == 0
    assert resolved["global_batch_size"] == 16 and resolved["scaled_lr"] == pytest.approx(0.1 * 16 / 256)
    info = json.loads((out / "run_info.json").read_text())
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"].startswith("2.")
    assert info["wall_time_s"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(2, 17, 2))  # 2 epochs x 8 steps, logged every 2
    diagnosed = [r for r in steps if "I(Z1;Z2)" in r]
    assert diagnosed and all(r["lower_bound"] == pytest.approx(r["I(Z1;R)"] - r["I(Z1;Z2)"], abs=1e-5)
                             for r in diagnosed)
    assert all("mi_loss" in r and "online_probe_top1" in r for r in steps)
    assert [r["epoch"] for r in records if "knn_top1" in r] == [1, 2]
    assert (out / "information_plane.png").stat().st_size > 10_000
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard tracker wrote nothing"
    final = json.loads((out / "final_eval.json").read_text())
    assert 0 <= final["linear_top1"] <= 100 and "random_init" in final
    assert (out / "model" / "model.safetensors").exists() and (out / "backbone" / "config.json").exists()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000008", "step_00000016"]  # epoch ends, the last 2 kept


def test_two_processes_scale_batch_and_lr_and_only_main_writes(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29617"]
    result = run_train(["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(out),
                        "--tracker", "none", "--objective", "barlow_twins", *TINY],
                       env={"ACCELERATE_USE_CPU": "true"}, launcher=launcher)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["num_processes"] == 2
    assert resolved["global_batch_size"] == 32 and resolved["scaled_lr"] == pytest.approx(0.1 * 32 / 256)
    assert resolved["steps_per_epoch"] == 128 // 32
    assert result.stdout.count("resolved configuration:") == 1  # printed by the main process only
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]  # one writer: no duplicated records
    assert (out / "model" / "model.safetensors").exists()


def test_killed_run_resumes_to_the_same_weights(tiny_dataset, tmp_path):
    args = ["--dataset", str(tiny_dataset), "--epochs", "3", "--checkpoint-every", "1", "--keep-checkpoints", "3",
            "--tracker", "none", "--final-eval", "false", "--export-backbone", "false", "--mi-weight", "1e-2", *TINY]
    reference = tmp_path / "uninterrupted"
    run_train([*args, "--output-dir", str(reference)])

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--output-dir", str(killed)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step_*")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    steps = sorted(int(p.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*"))
    assert steps and steps[-1] < 24

    run_train([*args, "--output-dir", str(killed), "--resume"])
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == sorted(set(logged)), "resumed metrics must not repeat steps"


@pytest.fixture(scope="module")
def train_module():
    sys.path.insert(0, str(REPO))
    import train

    yield train
    sys.path.remove(str(REPO))


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--dataset", "/nonexistent/folder"], FileNotFoundError, "/nonexistent/folder"),
        (["--image-column", "pixels"], ValueError, "pixels"),
        (["--label-column", "klass"], ValueError, "klass"),
        (["--train-split", "validation"], ValueError, "validation"),
        (["--image-size", "64"], ValueError, "64"),
        (["--optimizer", "rmsprop"], ValueError, "optimizer"),
        (["--quantize-levels", "1"], ValueError, "quantize_levels"),
        (["--epochs", "two"], ValueError, "epochs"),
    ],
)
def test_bad_input_fails_before_training(train_module, tiny_dataset, tmp_path, extra, error, message):
    args = ["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(tmp_path / "bad"), "--tracker",
            "none", *TINY, *extra]
    with pytest.raises(error, match=message):
        train_module.main(args)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_unknown_preset_key_is_named(train_module, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("dataset: fashion_mnist\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate.*valid keys"):
        train_module.main(["--config", str(preset)])
    with pytest.raises(FileNotFoundError, match="fashion_mnist_cpu"):
        train_module.main(["--config", str(tmp_path / "missing.yaml")])


def test_existing_run_is_not_overwritten_without_resume(train_module, tiny_dataset, tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train_module.main(["--dataset", str(tiny_dataset), "--output-dir", str(tmp_path / "run"), *TINY])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_module.main(["--dataset", str(tiny_dataset), "--output-dir", str(tmp_path / "new"), "--resume", *TINY])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "nan"
    args = ["--dataset", str(tiny_dataset), "--epochs", "2", "--output-dir", str(out), "--tracker", "none",
            "--final-eval", "false", "--export-backbone", "false", *TINY]
    run_train([*args, "--epochs", "1"])
    before = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    # a temperature this small overflows float32 logits to inf, and inf - inf = nan on the first resumed step
    result = run_train([*args, "--resume", "--nt-xent-tau", "1e-40"], check=False)
    assert result.returncode != 0 and "non-finite loss" in result.stderr + result.stdout
    after = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before
