"""Small faults users notice: a checkpoint's card, an export killed midway, export permissions, skipped images."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_ibproj.data import OversizedImageError, StreamingImageDataset, decode_image, load_image_data
from hf_ibproj.export import export_backbone
from tiny import TINY, save_tiny_dataset

REPO = Path(__file__).resolve().parent.parent
FLAGS = [*TINY, "--diagnostics-every", "100", "--knn-train-samples", "32", "--knn-eval-samples", "16", "--tracker",
         "none", "--no-final-eval", "--no-export-backbone"]  # the tiny run (tests/tiny.py) without its final phase
SMALL_LIMIT = 1000  # PIL.Image.MAX_IMAGE_PIXELS in these tests: PIL refuses images over 2000 pixels
OVERSIZED = 64  # a 64 x 64 image (4096 pixels) is over it, the 16 x 16 ones are far below


def train(args: list[str], max_image_pixels: int | None = None) -> None:
    """train.py's main in a fresh process, with PIL's pixel limit set first when given."""
    limit = f"Image.MAX_IMAGE_PIXELS = {max_image_pixels}" if max_image_pixels else ""
    code = ("import sys; from PIL import Image; " + limit + "\nfrom hf_ibproj.pretrain_cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, *FLAGS, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run of 2 epochs x 4 steps, checkpoints every 2 steps (all kept), no final evaluation."""
    root = tmp_path_factory.mktemp("card")
    save_tiny_dataset(root / "data", 64, 32, ("a", "b"), learnable=False)
    train(["--dataset", str(root / "data"), "--epochs", "2", "--checkpoint-every", "2", "--keep-checkpoints", "10",
           "--output-dir", str(root / "run")])
    return root / "run"


def card_rows(folder: Path) -> dict[str, str]:
    """The training-summary table of an export's README.md."""
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", (folder / "README.md").read_text(), re.M))


def test_a_checkpoints_card_describes_the_checkpoint(run_dir, tmp_path):
    assert "wall_time_s" in json.loads((run_dir / "run_info.json").read_text())  # the run's, not step 2's
    export_backbone(run_dir / "checkpoints" / "step_00000002", tmp_path / "step2")
    rows = card_rows(tmp_path / "step2")
    assert rows["Training length"].startswith("2 steps (0.5 epochs)")  # 2 of 4 steps per epoch
    assert "Wall time" not in rows
    export_backbone(run_dir, tmp_path / "final")
    rows = card_rows(tmp_path / "final")
    assert rows["Training length"].startswith("8 steps") and "Wall time" in rows  # the whole run: 2 x 4 steps


_KILLED_OR_PAUSED_EXPORT = """
import os, signal, sys, time
from pathlib import Path
import hf_ibproj.export as export

source, out, mode = sys.argv[1:]
write = export.write_backbone_files

def write_then_stop(model, directory):
    write(model, directory)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    Path(out + ".paused").touch()
    while not Path(out + ".go").exists():
        time.sleep(0.05)

export.write_backbone_files = write_then_stop
export.export_backbone(source, out)
"""


def hidden_folders(parent: Path) -> set[str]:
    return {p.name for p in parent.iterdir() if p.is_dir() and p.name.startswith(".")}


def test_b_staging_of_a_killed_export_is_removed_by_the_next(run_dir, tmp_path):
    out = tmp_path / "exports" / "backbone"
    out.parent.mkdir()
    (out.parent / ".mine").mkdir()  # a hidden folder of the user's own
    command = [sys.executable, "-c", _KILLED_OR_PAUSED_EXPORT, str(run_dir)]
    killed = subprocess.run([*command, str(out), "kill"], cwd=REPO, capture_output=True, timeout=300)
    assert killed.returncode == -9
    left = hidden_folders(out.parent) - {".mine"}
    assert len(left) == 1 and (out.parent / next(iter(left)) / "model.safetensors").is_file()  # full weights

    paused = subprocess.Popen([*command, str(out), "pause"], cwd=REPO)  # an export still running beside ours
    try:
        deadline = time.time() + 120
        while not Path(f"{out}.paused").exists():
            assert paused.poll() is None and time.time() < deadline
            time.sleep(0.1)
        live = hidden_folders(out.parent) - {".mine"} - left
        assert len(live) == 1
        export_backbone(run_dir, out)
        assert (out / "model.safetensors").is_file()
        assert hidden_folders(out.parent) == {".mine"} | live  # the killed export's staging is gone, not the live one's
    finally:
        Path(f"{out}.go").touch()
        assert paused.wait(timeout=120) == 0
    assert hidden_folders(out.parent) == {".mine"}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_c_export_follows_the_umask(run_dir, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = export_backbone(run_dir / "checkpoints" / "step_00000004", tmp_path / "backbone")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "README.md"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def image_folder(root: Path, per_class: int, broken: bool) -> dict[str, Path]:
    """root/{a,b}/*.png of 16 x 16 gray images; with `broken`, a corrupt file and an oversized (intact) image."""
    rng = np.random.default_rng(len(str(root)))
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / label / f"{i:02d}.png")
    if not broken:
        return {}
    (root / "a" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    Image.fromarray(np.full((OVERSIZED, OVERSIZED), 200, dtype=np.uint8)).save(root / "b" / "zz_large.png")
    return {"corrupt": root / "a" / "zz_corrupt.png", "oversized": root / "b" / "zz_large.png"}


def named(records: list[dict]) -> dict[str, str]:
    """file -> reason of skip records."""
    return {record["file"]: record["reason"] for record in records}


def test_d_oversized_images_are_named_as_oversized(tmp_path, monkeypatch, caplog):
    bad = image_folder(tmp_path / "folder", 3, broken=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SMALL_LIMIT)
    with pytest.raises(OversizedImageError) as raised:
        decode_image({"path": str(bad["oversized"]), "bytes": None}, channels=1)
    message = str(raised.value)
    assert "oversized" in message and "corrupt" not in message and str(bad["oversized"]) in message
    assert f"PIL.Image.MAX_IMAGE_PIXELS (now {SMALL_LIMIT})" in message and "MAX_IMAGE_PIXELS = None" in message

    with caplog.at_level(logging.WARNING, logger="hf_ibproj.data"):
        data = load_image_data(str(tmp_path / "folder"), channels=1)
    assert len(data) == 6 and data.skipped == 2
    assert named(data.skipped_files) == {str(bad["corrupt"]): "corrupt", str(bad["oversized"]): "oversized"}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(bad["corrupt"]) in warning and str(bad["oversized"]) in warning and "MAX_IMAGE_PIXELS" in warning

    streaming = StreamingImageDataset.from_source(str(tmp_path / "folder"), channels=1, image_size=16)
    loader = torch.utils.data.DataLoader(streaming, batch_size=4, num_workers=2)  # decoded in worker processes
    assert sum(int(skipped.sum()) for *_, skipped in loader) == 2
    assert named(streaming.skipped_files) == named(data.skipped_files)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the remedy the message names: the image is intact
    assert decode_image({"path": str(bad["oversized"]), "bytes": None}, channels=1).shape == (1, OVERSIZED, OVERSIZED)


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_e_every_skipped_file_is_named_in_the_run_records(tmp_path, streaming):
    data = tmp_path / "data"
    bad = image_folder(data / "train", 15, broken=True)  # 32 rows: every one drawn in each epoch when streaming
    image_folder(data / "test", 8, broken=False)
    (data / "test" / "a" / "zz_corrupt.png").write_bytes(b"broken")
    out = tmp_path / "run"
    train(["--dataset", str(data), "--epochs", "2", "--output-dir", str(out), *(["--streaming"] if streaming else [])],
          max_image_pixels=SMALL_LIMIT)
    skipped = json.loads((out / "run_info.json").read_text())["skipped_files"]
    assert named(skipped["train"]) == {str(bad["corrupt"]): "corrupt", str(bad["oversized"]): "oversized"}
    if not streaming:  # decoded at the start; streamed held-out rows are named once a monitor draws them
        assert named(skipped["eval"]) == {str(data / "test" / "a" / "zz_corrupt.png"): "corrupt"}
