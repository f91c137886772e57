"""train.py end to end on tiny data: a full run, two processes, kill-and-resume, bad input."""

from __future__ import annotations

import json
import os
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/hub_server.py
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


def test_two_processes_scale_batch_and_lr_and_only_main_writes(tiny_dataset, tmp_path, free_port):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port)]
    result = run_train(["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(out),
                        "--tracker", "none", "--objective", "barlow_twins", *TINY],
                       env={"ACCELERATE_USE_CPU": "true"}, launcher=launcher)
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


def test_resume_refuses_flags_that_change_the_run(train_module, one_epoch_run, tmp_path):
    out = one_epoch_run
    stored = (out / "config.yaml").read_bytes()
    for flags, named in ((["--objective", "barlow_twins"], "--objective"), (["--lr", "0.5"], "--lr"),
                         (["--dataset", "fashion_mnist"], "--dataset"), (["--epochs", "5"], "--epochs"),
                         (["--crop-min-scale", "0.5"], "--crop-min-scale")):
        with pytest.raises(ValueError, match=f"{named} .*would change"):
            train_module.main(["--output-dir", str(out), "--resume", *flags])
    with pytest.raises(ValueError, match="drop --config"):
        train_module.main(["--output-dir", str(out), "--resume", "--config", "configs/cifar10_simclr.yaml"])
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        train_module.main(["--output-dir", str(tmp_path / "elsewhere"), "--resume"])
    assert (out / "config.yaml").read_bytes() == stored
    # the same value as stored, or a flag that changes nothing of the result, is accepted
    config, _ = train_module.parse_train_config(["--output-dir", str(out), "--resume", "--lr", "0.1",
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


def test_one_optimizer_step_per_training_step(train_module, tiny_dataset, tmp_path, monkeypatch):
    # Under fp16 every prepared optimizer's step() updates accelerate's grad scaler; fp16 cannot run on this CPU, so
    # count the prepared optimizers' steps: one per optimizer step means one scaler update per step.
    from accelerate.optimizer import AcceleratedOptimizer

    calls = []
    original = AcceleratedOptimizer.step
    monkeypatch.setattr(AcceleratedOptimizer, "step", lambda self, *a, **k: (calls.append(id(self)), original(self, *a, **k))[1])
    out = tmp_path / "run"
    assert train_module.main(["--dataset", str(tiny_dataset), "--epochs", "1", "--output-dir", str(out),
                              "--tracker", "none", "--no-final-eval", "--no-export-backbone", *TINY]) == 0
    assert len(calls) == 8 and len(set(calls)) == 1  # 128 images / 16 per step, one optimizer


def test_evaluation_estimate_extrapolates_the_random_init_evaluation_to_the_full_splits(train_module):
    random_init = {"seconds": {"feature_extraction": 6.0, "linear_probe": 2.0, "knn": 0.5, "label_free": 1.0},
                   "num_train": 1000, "num_test": 200}
    margin = train_module.FINAL_EVAL_MARGIN
    final, monitor = train_module.evaluation_estimate(random_init, (6000, 1000), (1000, 200))
    # 7000 of 1200 images extracted, a probe on 6x the rows, kNN on 6 x 5 = 30x the pairs, the same 1000 diagnostics
    assert final == pytest.approx(train_module.FINAL_SAVE_SECONDS + margin * (6.0 * 7000 / 1200 + 2.0 * 6 + 0.5 * 30
                                                                             + 1.0))
    assert monitor == pytest.approx(margin * (6.0 + 0.5 + 1.0))  # the floor ran on the monitor's subsets: no probe
    # a floor stored with other sizes (an older run folder: the full splits) is scaled down to the monitor's
    _, monitor = train_module.evaluation_estimate(random_init, (1000, 200), (500, 100))
    assert monitor == pytest.approx(margin * (6.0 * 600 / 1200 + 0.5 * 0.25 + 1.0))
    assert train_module.evaluation_estimate(None, (6000, 1000), (1000, 200)) == (train_module.FINAL_SAVE_SECONDS, 0.0)


def test_revised_estimate_takes_the_measured_monitor_in_place_of_the_margin(train_module):
    random_init = {"seconds": {"feature_extraction": 6.0, "linear_probe": 2.0, "knn": 0.5, "label_free": 1.0},
                   "num_train": 1000, "num_test": 200}
    margin = train_module.FINAL_EVAL_MARGIN
    # the monitor extrapolates to 6 + 0.5 + 1 = 7.5 s at ratio 1 and took 3 s: the final phase's extraction, kNN and
    # diagnostics are taken at 3 / 7.5, its probe (6x the rows) still at the margin
    final, monitor, ratio = train_module.revised_estimate(random_init, (6000, 1000), (1000, 200), 3.0)
    assert ratio == pytest.approx(0.4) and monitor == 3.0
    assert final == pytest.approx(train_module.FINAL_SAVE_SECONDS + 0.4 * (6.0 * 7000 / 1200 + 0.5 * 30 + 1.0)
                                  + margin * 2.0 * 6)
    # no floor (--no-final-eval): the monitors as measured, the final phase only the saving
    assert train_module.revised_estimate(None, (6000, 1000), (1000, 200), 3.0) == (
        train_module.FINAL_SAVE_SECONDS, 3.0, None)
    # a monitor that extrapolates to under a second is too short to time: the margin stays
    tiny = {"seconds": {"feature_extraction": 0.01, "linear_probe": 0.01, "knn": 0.0, "label_free": 0.0},
            "num_train": 1000, "num_test": 200}
    assert train_module.revised_estimate(tiny, (6000, 1000), (1000, 200), 0.5)[2] == margin


def test_time_budget_plan_fills_the_budget_with_a_fake_clock(train_module, monkeypatch):
    config = train_module.TrainConfig(time_budget=2.0, batch_size=256, warmup_epochs=1.25)
    progress = train_module.TrainingProgress(10**6, 50, planned=False)
    progress.step = 30
    monkeypatch.setattr(train_module, "PROCESS_START", 1000.0)
    monkeypatch.setattr(train_module.time, "time", lambda: 1030.0)  # 30 s since the process started

    class OneProcess:
        num_processes, is_main_process = 1, False

    monkeypatch.setattr(train_module, "broadcast_object_list", lambda values: values)
    train_module.fix_budget(progress, config, 0.25, (22.0, 1.1), 40, OneProcess(), None)
    # closed form: 0.99 * 120 s - 30 s elapsed - 22 s final = 66.8 s; each epoch end costs a 1.1 s kNN monitor;
    # 0.25 s per step, 40 steps per epoch
    available = 0.99 * 120 - 30 - 22.0
    steps = int(available / 0.25)
    for _ in range(3):
        epoch_ends = (30 + steps) // 40 - 30 // 40
        steps = int((available - epoch_ends * 1.1) / 0.25)
    assert progress.planned and progress.total_steps == 30 + steps and progress.warmup_steps == 50  # 1.25 epochs
    assert 30 + steps < 30 + int(available / 0.25)  # the kNN monitors took their share
    # a revision past the budget ends the run at its current step, never before it
    monkeypatch.setattr(train_module.time, "time", lambda: 1200.0)
    train_module.fix_budget(progress, config, 0.25, (22.0, 1.1), 40, OneProcess(), None, record="plan_revision")
    assert progress.total_steps == 30 and progress.warmup_steps == 30
    # a revision to more steps gives back the warm-up a shorter plan had cut
    monkeypatch.setattr(train_module.time, "time", lambda: 1030.0)
    train_module.fix_budget(progress, config, 0.25, (22.0, 1.1), 40, OneProcess(), None, record="plan_revision")
    assert progress.total_steps > 80 and progress.warmup_steps == 50


def test_revision_step_is_halfway_or_the_first_monitor_after_it(train_module):
    # the default job: planned at step 60 to 1,340, 937 steps per epoch; halfway is step 700
    assert train_module.revision_step(60, 1340, 937, monitored=True) == 937
    assert train_module.revision_step(60, 1340, 937, monitored=False) == 700  # no held-out split, no monitor
    assert train_module.revision_step(60, 430, 234, monitored=True) == 245  # the next epoch end, 468, is too late
    assert train_module.revision_step(60, 61, 234, monitored=True) is None  # nothing left to revise


def test_step_timer_excludes_the_monitors_and_counts_from_its_start(train_module, monkeypatch):
    clock = iter([100.0, 130.0, 160.0])
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock))
    timer = train_module.StepTimer()
    assert timer.steps(41) == -1
    timer.exclude(5.0)  # a monitor before the timing began is not its business
    timer.start(41)  # a run resumed at step 40 starts timing at the first step it takes
    timer.exclude(6.0)
    assert timer.steps(91) == 50 and timer.step_seconds(91) == pytest.approx((130.0 - 100.0 - 6.0) / 50)
    assert timer.step_seconds(101) == pytest.approx((160.0 - 100.0 - 6.0) / 60)


def test_a_resume_forgets_the_plans_its_checkpoint_predates(train_module, tmp_path):
    plan, revision = {"planned_at_step": 60, "total_steps": 400}, {"planned_at_step": 230, "total_steps": 390}
    (tmp_path / "run_info.json").write_text(json.dumps({"seed": 0, "plan": plan, "plan_revision": revision}))
    train_module.forget_plans_after(tmp_path, 230)  # the checkpoint holds the revision
    assert json.loads((tmp_path / "run_info.json").read_text())["plan_revision"] == revision
    train_module.forget_plans_after(tmp_path, 200)  # it predates the revision: the run follows the first plan
    assert json.loads((tmp_path / "run_info.json").read_text()) == {"seed": 0, "plan": plan}
    train_module.forget_plans_after(tmp_path, 40)  # it predates the plan: the run plans again
    assert json.loads((tmp_path / "run_info.json").read_text()) == {"seed": 0}


def test_time_budget_run_records_its_plan_and_resume_keeps_it(train_module, tiny_dataset, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "budget"
    run_train(["--dataset", str(tiny_dataset), "--time-budget", "1", "--checkpoint-every", "4",
               "--keep-checkpoints", "1000", "--tracker", "none", "--output-dir", str(out), *TINY,
               "--warmup-epochs", "4"])
    info = json.loads((out / "run_info.json").read_text())
    plan, revision = info["plan"], info["plan_revision"]
    assert plan["planned_at_step"] == train_module.MEASURE_SKIP + train_module.MEASURE_STEPS
    assert plan["step_s"] > 0 and plan["final_phase_s"] > 5
    assert plan["total_steps"] >= plan["planned_at_step"] + 10  # more epochs fit the budget
    # revised once, at the first epoch end (8 steps each) from halfway through the planned steps on, with the
    # measured cost of the monitor that ran there
    halfway = (plan["planned_at_step"] + plan["total_steps"]) // 2
    assert revision["planned_at_step"] == halfway + (-halfway) % 8
    assert revision["planned_total_steps"] == plan["total_steps"] and revision["evaluation_ratio"] > 0
    assert revision["knn_monitor_s"] > 0 and revision["step_s"] > 0
    assert info["total_steps"] == revision["total_steps"] >= revision["planned_at_step"]
    final = json.loads((out / "final_eval.json").read_text())
    assert final["trained"]["num_test"] == 64 and final["random_init"]["num_test"] == 32  # the kNN monitor's subset
    checkpoints = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir())
    assert checkpoints[-1] == revision["total_steps"]
    card = ModelCard.load(out / "backbone" / "README.md").text
    assert f"{revision['total_steps']} steps" in card and "1-minute time budget" in card

    # As if killed after the revision: a resumed run continues to the revised step count; it neither plans nor
    # revises again.
    later = [step for step in checkpoints if step > revision["planned_at_step"]]
    for step in later[1:]:
        shutil.rmtree(out / "checkpoints" / f"step_{step:08d}")
    shutil.rmtree(out / "model")
    run_train(["--output-dir", str(out), "--resume"])
    resumed = json.loads((out / "run_info.json").read_text())
    assert resumed["plan"] == plan and resumed["plan_revision"] == revision
    assert resumed["total_steps"] == revision["total_steps"]
    assert (out / "checkpoints" / f"step_{revision['total_steps']:08d}").is_dir() and (out / "model").is_dir()

    # As if killed before the plan (step 40): the resumed run times 50 steps of its own and plans, then revises.
    for path in (out / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > 40:
            shutil.rmtree(path)
    run_train(["--output-dir", str(out), "--resume"])
    replanned = json.loads((out / "run_info.json").read_text())
    assert replanned["plan"]["planned_at_step"] == 40 + 1 + train_module.MEASURE_STEPS
    assert replanned["plan_revision"]["planned_at_step"] > replanned["plan"]["planned_at_step"]
    assert replanned["total_steps"] == replanned["plan_revision"]["total_steps"]


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
        (["--hub-strategy", "sometimes"], ValueError, "hub_strategy"),
        (["--optimizer", "rmsprop"], ValueError, "optimizer"),
        (["--quantize-levels", "1"], ValueError, "quantize_levels"),
        (["--projector-hidden-dims", "{a: 1}"], ValueError, "--projector-hidden-dims"),
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
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist"):
        train_module.main(["--output-dir", str(tmp_path / "new"), "--resume"])


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
    assert result.returncode != 0 and "non-finite loss" in result.stderr + result.stdout
    assert "step_00000004" in result.stderr + result.stdout  # the error names the last good checkpoint
    after = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert after == before


def test_bad_flag_values_are_named_by_the_parser(train_module, capsys):
    with pytest.raises(SystemExit):
        train_module.main(["--epochs", "two"])
    assert "--epochs" in capsys.readouterr().err
