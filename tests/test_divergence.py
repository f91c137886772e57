"""Divergence stops honestly: no checkpoint of a non-finite state, no monitor on it, one line naming what is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_ibproj.pretraining import last_finite_checkpoint
from hf_ibproj.runs import RunFolder
from tiny import TINY, save_tiny_dataset

REPO = Path(__file__).resolve().parent.parent
# the tiny run (tests/tiny.py) with plain SGD, every step logged and every checkpoint kept, no final phase
FLAGS = [*TINY, "--log-every", "1", "--diagnostics-every", "100", "--knn-train-samples", "32", "--knn-eval-samples",
         "16", "--tracker", "none", "--no-final-eval", "--no-export-backbone", "--optimizer", "sgd", "--keep-checkpoints",
         "10"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """64 + 32 noise images in two classes (4 steps of 16 per epoch)."""
    return save_tiny_dataset(tmp_path_factory.mktemp("data") / "noise", 64, 32, ("a", "b"), learnable=False)


def diverge(args: list[str]) -> subprocess.CompletedProcess:
    """train.py with `args`; the warm-up makes the first update use lr 0, so the blow-up comes at step 2."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *FLAGS, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def finite_checkpoints(out: Path) -> dict[str, bool]:
    """Every checkpoint folder on disk -> whether its model.safetensors holds only finite values."""
    folders = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    return {folder.name: all(torch.isfinite(t).all().item() for t in load_file(folder / "model.safetensors").values())
            for folder in folders}


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "LinAlgError" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "--lr" in lines[0] and "--resume" not in lines[0] and "or resume" not in lines[0]
    return lines[0]


def test_blow_up_on_an_epoch_end_stops_before_the_monitors(dataset, tmp_path):
    """lr 1e6 (the reported setting): after step 2, an epoch end of 2 steps, the eval-mode features overflow while
    the weights stay finite; the label-free diagnostics would raise LinAlgError on them."""
    out = tmp_path / "run"
    line = error_line(diverge(["--dataset", str(dataset), "--max-samples", "32", "--epochs", "3",
                               "--warmup-epochs", "1", "--checkpoint-every", "1", "--lr", "1e6",
                               "--output-dir", str(out)]))
    on_disk = finite_checkpoints(out)
    assert on_disk == {"step_00000001": True}  # step 2's state was not written
    assert f"{out / 'checkpoints' / 'step_00000001'}:" in line
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and not any("knn_top1" in r for r in records)  # no monitor ran


def test_blow_up_on_a_checkpoint_step_writes_no_checkpoint_of_it(dataset, tmp_path):
    """lr 1e40: step 2's update makes weights infinite; step 2 is a checkpoint step (every 2) but no epoch end (4)."""
    out = tmp_path / "run"
    line = error_line(diverge(["--dataset", str(dataset), "--epochs", "2", "--warmup-epochs", "0.5",
                               "--checkpoint-every", "2", "--lr", "1e40", "--output-dir", str(out)]))
    assert finite_checkpoints(out) == {}
    assert "non-finite weights" in line and "No checkpoint with finite weights" in line
    assert "checkpoints/step_" not in line


def test_the_named_checkpoint_is_read_not_assumed(tmp_path):
    """The newest checkpoint with finite weights, passing over one holding NaN and one whose weights are truncated."""
    folder = RunFolder(tmp_path / "run")
    weights = {"w": torch.ones(4, 4), "b": torch.zeros(4), "steps": torch.tensor(3)}
    for step in (1, 2, 3):
        folder.checkpoint_dir(step).mkdir(parents=True)
        save_file(weights, folder.checkpoint_dir(step) / "model.safetensors")
    assert last_finite_checkpoint(folder) == folder.checkpoint_dir(3)
    save_file({**weights, "w": torch.full((4, 4), float("nan"))}, folder.checkpoint_dir(3) / "model.safetensors")
    truncated = folder.checkpoint_dir(2) / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:40])
    assert last_finite_checkpoint(folder) == folder.checkpoint_dir(1)
    (folder.checkpoint_dir(1) / "model.safetensors").unlink()
    assert last_finite_checkpoint(folder) is None
