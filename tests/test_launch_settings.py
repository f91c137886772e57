"""Several processes as users launch them: SyncBatchNorm, the process group's timeout, the process count on resume
and gradient accumulation (CPU processes in one gloo group; what needs GPUs is faked or refused)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from tiny import TINY, TINY_SETTINGS
from torch import nn

from hf_ibproj import IBProjConfig, IBProjModel, TrainConfig, export_backbone
from hf_ibproj.pretraining import batchnorm_is_synced
from hf_ibproj.pretrain_cli import main

_NOTEBOOK_CELL = """
import time
from accelerate import notebook_launcher
import hf_ibproj.pretraining as pretraining
from hf_ibproj import TrainConfig, pretrain

evaluate_floor = pretraining.evaluate_floor

def slow_on_the_main_process(run, resume):  # as a main process that decodes a large dataset alone
    if run.accelerator.is_main_process:
        time.sleep({slow_s})
    return evaluate_floor(run, resume)

pretraining.evaluate_floor = slow_on_the_main_process
config = TrainConfig(dataset={dataset!r}, epochs=1, output_dir={out!r}, tracker="none", export_backbone=False,
                     ddp_timeout={timeout_s}, **{settings!r})
notebook_launcher(pretrain, (config,), num_processes=2)
"""


def _two_processes_with_a_slow_main_one(dataset, out, slow_s: int, timeout_s: int) -> subprocess.CompletedProcess:
    cell = _NOTEBOOK_CELL.format(dataset=str(dataset), out=str(out), slow_s=slow_s, timeout_s=timeout_s,
                                 settings=TINY_SETTINGS)
    return subprocess.run([sys.executable, "-c", cell], capture_output=True, text=True, timeout=300)


def test_a_slow_main_process_within_the_timeout_passes_and_resume_keeps_the_process_count(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    # pretrain from a notebook's cell: two CPU processes forked by accelerate's notebook_launcher, one gloo group
    result = _two_processes_with_a_slow_main_one(tiny_dataset, out, slow_s=8, timeout_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["num_processes"] == 2 and resolved["steps_per_epoch"] == 128 // 32
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]  # the main process alone writes
    assert (out / "model" / "model.safetensors").exists() and (out / "final_eval.json").exists()
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ValueError, match=r"trained with 2 process\(es\), this launch has 1.*--num_processes 2"):
        main(["--output-dir", str(out), "--resume"])
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_main_process_slower_than_the_timeout_stops_the_run_naming_the_setting(tiny_dataset, tmp_path):
    result = _two_processes_with_a_slow_main_one(tiny_dataset, tmp_path / "run", slow_s=25, timeout_s=5)
    assert result.returncode != 0
    assert "ProcessGroupTimeoutError: process 1 timed out waiting for the other processes" in result.stderr
    assert "Timed out waiting 5000ms" in result.stderr and "Raise --ddp-timeout" in result.stderr  # gloo's own words


def test_gradient_accumulation_warns_once_that_the_contrastive_batch_stays_small(tiny_dataset, tmp_path, capsys):
    main(["--dataset", str(tiny_dataset), "--max-steps", "2", "--gradient-accumulation-steps", "2", "--tracker",
          "none", "--no-final-eval", "--no-export-backbone", *TINY, "--output-dir", str(tmp_path / "run")])
    warnings = [line for line in capsys.readouterr().out.splitlines() if "--gradient-accumulation-steps" in line]
    assert len(warnings) == 1 and "micro-batches of 16" in warnings[0], warnings


def _barlow_twins_model() -> IBProjModel:
    torch.manual_seed(0)
    config = IBProjConfig(backbone="resnet18_small", objective="barlow_twins", projector_hidden_dims=[32, 32],
                          projector_out_dim=16, backbone_kwargs={"in_chans": 1, "channels": [8, 16, 32, 64]},
                          image_size=16, image_mean=[0.5], image_std=[0.25])
    model = IBProjModel(config).train()
    with torch.no_grad():  # running statistics that are not the initial ones
        model(torch.rand(8, 2, 1, 16, 16))
    return model


def test_sync_batchnorm_model_saves_and_exports_as_plain_batchnorm(tmp_path):
    model = _barlow_twins_model()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    synced.save_pretrained(tmp_path / "model")
    reloaded = IBProjModel.from_pretrained(tmp_path / "model")
    plain = [m for m in reloaded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(plain) == len(norms) and not any(isinstance(m, nn.SyncBatchNorm) for m in plain)
    expected = synced.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    export_backbone(tmp_path / "model", tmp_path / "backbone")
    backbone = timm.create_model(f"local-dir:{tmp_path / 'backbone'}", pretrained=True)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules())
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, expected[f"backbone.{key}"]), key


@pytest.mark.parametrize("setting, device, processes, synced", [
    (None, "cuda", 2, True), (None, "cuda", 1, False), (None, "cpu", 2, False),
    (False, "cuda", 2, False), (True, "cuda", 1, True),
])
def test_sync_batchnorm_default_is_on_for_several_gpu_processes(setting, device, processes, synced):
    accelerator = SimpleNamespace(device=torch.device(device), num_processes=processes)
    assert batchnorm_is_synced(TrainConfig(sync_batchnorm=setting), accelerator) is synced


def test_sync_batchnorm_on_cpus_is_refused_before_anything_is_written(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="--sync-batchnorm needs GPU processes"):
        main(["--dataset", str(tiny_dataset), "--max-steps", "2", "--sync-batchnorm", "--tracker", "none", *TINY,
              "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_streaming_keeps_the_rows_that_max_samples_selects_in_memory(tiny_dataset):
    import contextlib

    from hf_ibproj.splits import load_splits

    settings = dict(dataset=str(tiny_dataset), channels=1, image_size=16, max_samples=40, eval_max_samples=10, seed=3)
    in_memory, held_out_in_memory, _ = load_splits(TrainConfig(**settings), contextlib.nullcontext)
    streamed, held_out_streamed, _ = load_splits(TrainConfig(streaming=True, **settings), contextlib.nullcontext)
    assert (len(streamed), len(held_out_streamed)) == (40, 10)
    assert streamed.labels.bincount().tolist() == [20, 20]  # the tiny dataset's two classes, stratified
    images = torch.stack([streamed[i][0] for i in range(len(streamed))])
    assert torch.equal(streamed.labels, in_memory.labels) and torch.equal(images, in_memory.images)
    assert torch.equal(held_out_streamed.labels, held_out_in_memory.labels)


def test_the_knn_monitor_decodes_its_streamed_rows_once_per_run(tiny_dataset, monkeypatch):
    import contextlib

    from hf_ibproj.data import StreamingImageDataset
    from hf_ibproj.splits import SplitScorer, load_splits

    decoded = []
    get_item = StreamingImageDataset.__getitem__
    monkeypatch.setattr(StreamingImageDataset, "__getitem__", lambda self, i: decoded.append(i) or get_item(self, i))
    config = TrainConfig(dataset=str(tiny_dataset), channels=1, image_size=16, streaming=True)
    train, held_out, _ = load_splits(config, contextlib.nullcontext)
    scorer = SplitScorer(train, held_out, [0.5], [0.25], seed=0, num_workers=0)
    backbone = _barlow_twins_model().backbone
    floor = scorer.evaluate(backbone, "random-init", 64, 32, keep=True)
    first = scorer.knn_top1(backbone, 64, 32)
    assert len(decoded) == 64 + 32  # the floor decoded the monitor's rows; the monitor reused them
    assert scorer.knn_top1(backbone, 64, 32) == first == floor["knn_top1"]
    assert len(decoded) == 64 + 32
    reference = SplitScorer(train, held_out, [0.5], [0.25], seed=0, num_workers=0)  # per-sample decoding throughout
    assert reference.knn_top1(backbone, 64, 32) == first


def test_decoding_streamed_rows_outside_training_leaves_the_training_random_stream_alone(tiny_dataset):
    # the floor and the first kNN monitor decode on the main process; a resumed run must not see them shift its
    # augmentation draws (DataLoader iteration would otherwise draw its workers' base seed from the global generator)
    from hf_ibproj.data import StreamingImageDataset
    from hf_ibproj.splits import images_of

    stream = StreamingImageDataset.from_source(str(tiny_dataset), "train", channels=1, image_size=16)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    images_of(stream, torch.arange(8), num_workers=0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("seed", [0, 123456789, 2**70])
def test_every_run_seed_gives_per_sample_seeds_torch_accepts(seed):
    from hf_ibproj.seeding import sample_seed

    seeds = {sample_seed(seed, epoch, index) for epoch in (0, 1, 10**6) for index in (0, 1, 10**9)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    for s in seeds:
        torch.manual_seed(s)
