"""train.py end to end on tiny data: a full run, two processes, kill-and-resume, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
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

from hf_ibproj import TrainConfig, pretrain
from hf_ibproj.budget import MIN_TIMED_STEPS, SKIP_STEPS
from hf_ibproj.pretrain_cli import main
from hf_ibproj.train_config import parse_train_config
from tiny import TINY, TINY_SETTINGS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/hub_server.py
def run_train(args: list[str], env: dict | None = None, launcher: list[str] | None = None, check: bool = True):
    command = (launcher or [sys.executable]) + [str(REPO / "train.py"), *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="module")
def one_epoch_run(tiny_dataset, tmp_path_factory) -> Path:
    """A finished one-epoch run (checkpoint at step 8, no final evaluation), shared read-only by the tests."""
    out = tmp_path_factory.mktemp("one_epoch") / "run"
    run_train(["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(out), "--tracker", "none",
               "--no-final-eval", "--no-export-backbone", *TINY])
    return out


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


def two_cpu_processes(port: int) -> list[str]:
    """`accelerate launch` of two CPU processes (gloo) on one machine, meeting on `port`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def test_two_processes_scale_batch_and_lr_and_only_main_writes(tiny_dataset, tmp_path, free_port):
    out = tmp_path / "ddp"
    result = run_train(["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(out),
                        "--tracker", "none", "--objective", "barlow_twins", *TINY],
                       env={"ACCELERATE_USE_CPU": "true"}, launcher=two_cpu_processes(free_port))
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["num_processes"] == 2
    assert resolved["global_batch_size"] == 32 and resolved["scaled_lr"] == pytest.approx(0.1 * 32 / 256)
    assert resolved["steps_per_epoch"] == 128 // 32
    assert result.stdout.count("full configuration:") == 1  # printed by the main process only
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]  # one writer: no duplicated records
    assert (out / "model" / "model.safetensors").exists()


def _kill_after_first_checkpoint(args: list[str], out: Path) -> None:
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--output-dir", str(out)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"


def test_killed_run_resumes_from_its_own_configuration_to_the_same_weights(tiny_dataset, tmp_path):
    # Not the preset's settings: Barlow Twins, another width, a stratified subset, an MI penalty, a mid-epoch
    # checkpoint (6 steps per epoch, a checkpoint every 4 steps).
    args = ["--dataset", str(tiny_dataset), "--epochs", "3", "--checkpoint-every", "4", "--keep-checkpoints", "3",
            "--tracker", "none", "--no-final-eval", "--no-export-backbone", "--mi-weight", "1e-2",
            "--objective", "barlow_twins", "--max-samples", "96", *TINY, "--projector-hidden-dims", "[24]"]
    # (widths stay >= 8: oneDNN's strided 1x1 convolution backward with 4 input channels in channels_last is racy on
    # AVX2 CPUs, a library bug measured here, see benchmarks/RESULTS.md)
    reference = tmp_path / "uninterrupted"
    run_train([*args, "--output-dir", str(reference)])

    killed = tmp_path / "killed"
    _kill_after_first_checkpoint(args, killed)
    stored = (killed / "config.yaml").read_bytes()
    steps = sorted(int(p.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*"))
    assert steps and steps[-1] < 18

    run_train(["--output-dir", str(killed), "--resume"])  # nothing but the folder
    assert (killed / "config.yaml").read_bytes() == stored
    assert yaml.safe_load(stored)["objective"] == "barlow_twins"
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == sorted(set(logged)), "resumed metrics must not repeat steps"
    info = json.loads((killed / "run_info.json").read_text())
    assert info["command"].endswith(str(killed)) and len(info["resumes"]) == 1


def test_resume_refuses_flags_that_change_the_run(one_epoch_run, tmp_path):
    # each refusal is tested on the parser (tests/test_train_config.py); here: on a real run folder, before any write
    out = one_epoch_run
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="--objective .*would change"):
        main(["--output-dir", str(out), "--resume", "--objective", "barlow_twins"])
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        main(["--output-dir", str(tmp_path / "elsewhere"), "--resume"])
    # from Python too: a config that is not the stored one is refused, whichever way it was built
    with pytest.raises(ValueError, match=r"--lr \(0\.1 -> 0\.5\) would change"):
        pretrain(dataclasses.replace(TrainConfig.from_run(out), lr=0.5), resume=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same value as stored, or a flag that changes nothing of the result, is accepted
    config, _ = parse_train_config(["--output-dir", str(out), "--resume", "--lr", "0.1",
                                    "--tracker", "tensorboard", "--log-every", "1"])
    assert config.lr == 0.1 and config.tracker == "tensorboard" and config.batch_size == 16


def test_checkpoints_are_model_folders(one_epoch_run, tiny_dataset, tmp_path):
    from hf_ibproj import IBProjModel

    out = one_epoch_run
    checkpoint = out / "checkpoints" / "step_00000008"
    loaded = IBProjModel.from_pretrained(checkpoint)
    final = load_file(out / "model" / "model.safetensors")  # the last checkpoint holds the final weights
    state = loaded.state_dict()
    assert final.keys() == state.keys()
    for key in final:
        torch.testing.assert_close(state[key], final[key], rtol=0, atol=0, msg=key)
    # the commands read it too: export it, and evaluate it on the run's data
    from hf_ibproj.cli import main as cli_main

    assert cli_main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, final[f"backbone.{key}"], rtol=0, atol=0, msg=key)
    assert cli_main(["evaluate", "--model", str(checkpoint), "--dataset", str(tiny_dataset), "--output-dir",
                     str(tmp_path / "eval"), "--num-workers", "0"]) == 0
    assert (tmp_path / "eval" / "eval_results.json").is_file()


def test_one_optimizer_step_per_training_step(tiny_dataset, tmp_path, monkeypatch):
    # Under fp16 every prepared optimizer's step() updates accelerate's grad scaler; fp16 cannot run on this CPU, so
    # count the prepared optimizers' steps: one per optimizer step means one scaler update per step.
    from accelerate.optimizer import AcceleratedOptimizer

    calls = []
    original = AcceleratedOptimizer.step
    monkeypatch.setattr(AcceleratedOptimizer, "step", lambda self, *a, **k: (calls.append(id(self)), original(self, *a, **k))[1])
    out = tmp_path / "run"
    assert main(["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(out),
                              "--tracker", "none", "--no-final-eval", "--no-export-backbone", *TINY]) == 0
    assert len(calls) == 8 and len(set(calls)) == 1  # 128 images / 16 per step, one optimizer


def test_time_budget_run_ends_on_time_and_a_resume_spends_what_is_left(tiny_dataset, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "budget"
    result = run_train(["--dataset", str(tiny_dataset), "--time-budget", "1", "--checkpoint-every", "4",
                        "--keep-checkpoints", "1000", "--tracker", "none", "--output-dir", str(out), *TINY,
                        "--warmup-epochs", "4"])
    # its log, off a terminal: plain lines (no redrawn progress frames) with the plan, the monitors and the end
    log = result.stdout + result.stderr
    assert "\r" not in log and "time budget: " in log and "epoch 1: kNN top-1" in log
    assert re.search(r"^pretrain: \d+/\d+ step done", log, flags=re.M)
    info = json.loads((out / "run_info.json").read_text())
    plan = info["plan"]
    assert plan["planned_at_step"] == SKIP_STEPS + MIN_TIMED_STEPS  # the first plan, after the untimed steps
    assert plan["step_s"] > 0 and plan["final_phase_s"] > 5 and plan["time_budget_min"] == 1
    assert info["total_steps"] == plan["total_steps"] > plan["planned_at_step"] + 10  # more epochs fit the budget
    assert 45 <= info["wall_time_s"] <= 60 * 1.1  # the whole run, from process start to the end of the export
    final = json.loads((out / "final_eval.json").read_text())
    assert final["trained"]["num_test"] == 64 and final["random_init"]["num_test"] == 32  # the kNN monitor's subset
    checkpoints = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir())
    assert checkpoints[-1] == info["total_steps"]
    card = ModelCard.load(out / "backbone" / "README.md").text
    assert f"{info['total_steps']} steps" in card and "1-minute time budget" in card

    # As if killed halfway: the resumed run continues from its checkpoint's plan and spends only what the budget
    # has left (the checkpoint records the seconds spent up to it).
    middle = checkpoints[len(checkpoints) // 2]
    for step in checkpoints:
        if step > middle:
            shutil.rmtree(out / "checkpoints" / f"step_{step:08d}")
    shutil.rmtree(out / "model")
    state = json.loads((out / "checkpoints" / f"step_{middle:08d}" / "training_state.json").read_text())
    assert state["progress"]["step"] == middle and 0 < state["budget"]["used_s"] < 60
    left = 60 - state["budget"]["used_s"]
    run_train(["--output-dir", str(out), "--resume"])
    resumed = json.loads((out / "run_info.json").read_text())
    assert len(resumed["resumes"]) == 1 and resumed["total_steps"] > middle
    assert resumed["wall_time_s"] <= left * 1.1 + 5  # this process's own time: what was left, not a new minute
    assert (out / "checkpoints" / f"step_{resumed['total_steps']:08d}").is_dir() and (out / "model").is_dir()


def test_pretrain_from_python_gives_the_run_that_train_py_gives(tiny_dataset, tmp_path):
    flags = ["--dataset", str(tiny_dataset), "--epochs", "1", "--tracker", "none", "--no-export-backbone", *TINY]
    run_train([*flags, "--output-dir", str(tmp_path / "script")])
    config = TrainConfig.from_preset(dataset=str(tiny_dataset), epochs=1, tracker="none", export_backbone=False,
                                     output_dir=str(tmp_path / "api"), **TINY_SETTINGS)
    result = pretrain(config)
    assert result.run_dir == tmp_path / "api"
    expected = load_file(tmp_path / "script" / "model" / "model.safetensors")
    state = result.model.state_dict()
    assert expected.keys() == state.keys()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=1e-6, msg=key)
    script_eval = json.loads((tmp_path / "script" / "final_eval.json").read_text())
    assert result.final_eval == json.loads((tmp_path / "api" / "final_eval.json").read_text())
    for key in ("linear_top1", "knn_top1"):
        assert result.final_eval[key] == pytest.approx(script_eval[key], abs=1e-6)


def _class_sorted_image_folder(root: Path) -> dict[str, list[Path]]:
    """root/{train,test}/{dark,middle,bright}/*.png, 16 px gray images, a few 8 px ones, and corrupt files."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    corrupt = {}
    for split, per_class in (("train", 16), ("test", 8)):
        corrupt[split] = []
        for label, level in enumerate((40, 128, 215)):
            folder = root / split / ("dark", "middle", "bright")[label]
            folder.mkdir(parents=True)
            for i in range(per_class):
                path = folder / f"{i:02d}.png"
                if split == "train" and label < 2 and i == 5:  # two corrupt rows, far apart
                    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
                    corrupt[split].append(path)
                    continue
                size = 8 if i % 4 == 3 else 16  # smaller than --image-size: resized up
                pixels = np.clip(rng.normal(level, 20, (size, size)), 0, 255).astype(np.uint8)
                PILImage.fromarray(pixels, mode="L").save(path)
    return corrupt


def test_streaming_run_is_monitored_evaluated_and_survives_bad_images(tmp_path):
    data = tmp_path / "folder"
    corrupt = _class_sorted_image_folder(data)
    out = tmp_path / "stream"
    run_train(["--dataset", str(data), "--streaming", "--epochs", "2", "--output-dir", str(out), "--tracker", "none",
               *TINY, "--num-workers", "0"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in monitored] == [1, 2] and all("heldout/rankme" in r for r in monitored)
    # 48 training rows, 16 per step: every epoch draws each of the two corrupt rows once, each replaced and counted
    info = json.loads((out / "run_info.json").read_text())
    assert len(corrupt["train"]) == 2 and info["skipped_images"] == 2 * 2
    final = json.loads((out / "final_eval.json").read_text())
    assert final["trained"]["num_train"] == 48 and final["trained"]["num_test"] == 24
    assert final["random_init"]["num_classes"] == 3 and 0 <= final["linear_top1"] <= 100
    assert {"rankme", "alignment", "uniformity", "I(Z1;Z2)", "lower_bound"} <= set(final["trained"]["label_free"])
    card = (out / "backbone" / "README.md").read_text()
    assert f"{final['linear_top1']:.2f}%" in card and f"{final['knn_top1']:.2f}%" in card


def test_two_streaming_processes_count_the_corrupt_rows_each_drew(tmp_path, free_port):
    data = tmp_path / "folder"
    corrupt = _class_sorted_image_folder(data)
    out = tmp_path / "stream"
    # 48 training rows, a global batch of 2 x 24: each epoch draws every row once, each process streaming its own
    # half, so the run drew the 2 corrupt rows 2 x 2 times whichever process drew them
    run_train(["--dataset", str(data), "--streaming", "--epochs", "2", "--output-dir", str(out), "--tracker", "none",
               *TINY, "--batch-size", "24", "--no-final-eval", "--no-export-backbone"],
              env={"ACCELERATE_USE_CPU": "true"}, launcher=two_cpu_processes(free_port))
    info = json.loads((out / "run_info.json").read_text())
    assert info["skipped_images"] == 2 * 2
    assert sorted(record["file"] for record in info["skipped_files"]["train"]) == sorted(map(str, corrupt["train"]))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in logged if "loss" in r] == [2 * 2]  # one step an epoch, logged every 2


def test_push_to_hub_from_the_run_and_resume_on_another_machine(tiny_dataset, tmp_path):
    from hub_server import FakeHub

    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test_token_123", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        args = ["--dataset", str(tiny_dataset), "--epochs", "2", "--checkpoint-every", "4", "--tracker", "none",
                "--no-final-eval", *TINY, "--push-to-hub", "me/tiny-run", "--hub-strategy", "checkpoint"]
        first = tmp_path / "machine-a"
        process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--output-dir", str(first)],
                                   cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while "last_checkpoint.json" not in _repo_files(hub) and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # machine A dies after its first pushed checkpoint
        process.wait()
        pushed = json.loads(_repo_files(hub)["last_checkpoint.json"])
        assert pushed["step"] < 16 and not (first / "model").exists()

        second = tmp_path / "machine-b"  # nothing local: the records and the last checkpoint come from the Hub
        result = run_train(["--output-dir", str(second), "--resume", "--push-to-hub", "me/tiny-run"], env=env)
        assert "downloaded" in result.stdout
        assert (second / "config.yaml").read_bytes() == (first / "config.yaml").read_bytes()
        assert json.loads((second / "run_info.json").read_text())["resumes"]
        files = _repo_files(hub)
    assert "model.safetensors" in files and "README.md" in files  # the exported backbone pushed at the end
    assert json.loads(files["last_checkpoint.json"])["step"] == 16
    assert b"hf_test_token_123" not in b"".join(files.values())


def test_failed_pushes_never_stop_or_corrupt_the_run(tiny_dataset, tmp_path):
    from hub_server import FakeHub

    with FakeHub() as hub:
        hub.fail_commits = True  # every commit answered with HTTP 500
        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test_token_123", "HF_HUB_DISABLE_XET": "1"}
        out = tmp_path / "run"
        result = run_train(["--dataset", str(tiny_dataset), "--epochs", "1", "--checkpoint-every", "4", "--tracker",
                            "none", "--no-final-eval", *TINY, "--output-dir", str(out), "--push-to-hub", "me/down",
                            "--hub-strategy", "checkpoint"], env=env)
    failures = json.loads((out / "run_info.json").read_text())["push_failures"]
    assert [f["step"] for f in failures] == [4, 8]  # reported, and retried at the next checkpoint
    assert "retried at the next checkpoint" in result.stdout + result.stderr
    assert "hf-ibproj push" in result.stderr  # the final push failed too: the run says how to push later
    assert (out / "model" / "model.safetensors").exists() and (out / "backbone" / "README.md").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]


def _repo_files(hub) -> dict[str, bytes]:
    try:
        return hub.files("me/tiny-run")
    except KeyError:  # not created yet
        return {}


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--dataset", "/nonexistent/folder"], FileNotFoundError, "/nonexistent/folder"),
        (["--image-column", "pixels"], ValueError, "pixels"),
        (["--label-column", "klass"], ValueError, "klass"),
        (["--train-split", "validation"], ValueError, "validation"),
        (["--hub-strategy", "sometimes"], ValueError, "hub_strategy"),
        (["--optimizer", "rmsprop"], ValueError, "optimizer"),
        (["--quantize-levels", "1"], ValueError, "quantize_levels"),
        (["--projector-hidden-dims", "{a: 1}"], ValueError, "--projector-hidden-dims"),
    ],
)
def test_bad_input_fails_before_training(tiny_dataset, tmp_path, extra, error, message):
    args = ["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(tmp_path / "bad"), "--tracker",
            "none", *TINY, *extra]
    with pytest.raises(error, match=message):
        main(args)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_a_run_folder_in_use_is_refused_before_anything_is_written(tiny_dataset, tmp_path):
    from hf_ibproj.runs import RunFolder, RunFolderInUseError

    with RunFolder(tmp_path / "run").lock():  # as another run would hold it
        with pytest.raises(RunFolderInUseError, match=f"in use by PID {os.getpid()}"):
            main(["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(tmp_path / "run"), *TINY])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def test_a_fresh_run_refuses_a_folder_it_did_not_write_unless_told_to_empty_it(tiny_dataset, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a previous attempt's record
    (out / "random_init_eval.json").write_text("{}")
    args = ["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(out), "--tracker", "none",
            "--no-final-eval", "--no-export-backbone", *TINY]
    with pytest.raises(FileExistsError, match=f"{out} is not empty .*metrics.jsonl.*--overwrite-output-dir"):
        main(args)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "random_init_eval.json"]  # untouched
    with pytest.raises(ValueError, match="--overwrite-output-dir would delete it"):
        pretrain(TrainConfig(output_dir=str(out), overwrite_output_dir=True), resume=True)
    assert main([*args, "--overwrite-output-dir"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 2 and all(r.get("loss") != 9.0 for r in records)  # nothing of the old attempt
    assert not (out / "random_init_eval.json").exists()  # --no-final-eval writes no floor: the old one is gone


def test_existing_run_is_not_overwritten_without_resume(tiny_dataset, tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        main(["--dataset", str(tiny_dataset), "--output-dir", str(tmp_path / "run"), *TINY])
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist"):
        main(["--output-dir", str(tmp_path / "new"), "--resume"])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_dataset, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "nan"
    run_train(["--dataset", str(tiny_dataset), "--epochs", "2", "--checkpoint-every", "4", "--keep-checkpoints", "4",
               "--output-dir", str(out), "--tracker", "none", "--no-final-eval", "--no-export-backbone", *TINY])
    for later in ("step_00000008", "step_00000012", "step_00000016"):  # as if the run had been killed at step 4
        shutil.rmtree(out / "checkpoints" / later)
    # a diverged state: one weight of the last checkpoint becomes inf, so the first resumed step's loss is NaN
    weights_file = out / "checkpoints" / "step_00000004" / "model.safetensors"
    weights = load_file(weights_file)
    weights["backbone.conv1.weight"][0] = float("inf")
    save_file(weights, weights_file)
    before = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    result = run_train(["--output-dir", str(out), "--resume"], check=False)
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "non-finite loss" in error
    assert "No checkpoint with finite weights was written" in error  # step 4's weights are not: never named as good
    after = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before
