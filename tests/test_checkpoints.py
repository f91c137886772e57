"""Checkpoints hold no pickle and resuming unpickles nothing; a damaged checkpoint is named and skipped.

A planted file is a pickle whose loading creates a marker folder (what accelerate's load_state would have run); it
goes into every file of a checkpoint in turn, and beside them as accelerate's file names. Resumes run through
checkpoints.load_checkpoint on a tiny prepared model, and end to end through train.py, locally and from the local fake Hub
(tests/hub_server.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from huggingface_hub import constants
from safetensors.torch import load_file
from transformers import PretrainedConfig, get_cosine_schedule_with_warmup

from hf_ibproj.cli import main as cli_main
from hf_ibproj.hub import push_checkpoint
from hf_ibproj.checkpoints import DamagedFileError, load_checkpoint, save_checkpoint
from hub_server import FakeHub
from test_train import run_train
from tiny import TINY

# every file a checkpoint of two prepared models (a model and a probe) with a model config holds
CHECKPOINT_FILES = ["config.json", "model.safetensors", "model_1.safetensors", "optimizer.json",
                    "optimizer.safetensors", "random_states_0.json", "training_state.json"]
# what accelerate's save_state wrote, and load_state unpickled
ACCELERATE_FILES = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]


class Payload:
    """Unpickling it creates the folder `marker`: proof that a planted file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def plant(path: Path, marker: Path) -> None:
    """Replace (or create) `path` with a torch.save pickle of the payload, as accelerate's own files are written."""
    path.unlink(missing_ok=True)
    torch.save(Payload(marker), path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def checkpoint_number(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def test_the_planted_payload_runs_when_unpickled(tmp_path):
    marker = tmp_path / "payload-ran"
    plant(tmp_path / "optimizer.bin", marker)
    torch.load(tmp_path / "optimizer.bin", weights_only=False)  # as accelerate loads custom_checkpoint_N.pkl
    assert marker.is_dir()


# --------------------------------------------------------------------------------------------------------------
# checkpoints.load_checkpoint on a tiny prepared model
# --------------------------------------------------------------------------------------------------------------
class Trainer:
    """A model and a probe, AdamW and a warm-up + cosine schedule, prepared by accelerate on the CPU."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.accelerator = Accelerator(cpu=True)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
        probe = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=0.05)
        scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 10)
        self.model, self.probe, self.optimizer, self.scheduler = self.accelerator.prepare(
            model, probe, optimizer, scheduler)

    def train(self, steps: int) -> list[float]:
        """Losses of `steps` steps on inputs drawn from torch, numpy and python's generators."""
        losses = []
        for _ in range(steps):
            x = torch.randn(8, 6) + float(np.random.rand()) + random.random()
            loss = self.probe(self.model(x)).square().mean()
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in [*self.model.state_dict().items(), *self.probe.state_dict().items()]}

    def checkpoint(self, folder: Path, step: int) -> Path:
        return save_checkpoint(self.accelerator, folder, step, keep=5, model_config=PretrainedConfig(),
                               state={"note": "loop state"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with checkpoints at steps 2 and 4, and what the uninterrupted training did after each."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    trainer = Trainer()
    trainer.train(2)
    trainer.checkpoint(folder, 2)
    after_2 = trainer.train(2)
    weights_4 = trainer.weights()
    trainer.checkpoint(folder, 4)
    after_4 = trainer.train(2)
    return folder, {2: after_2, 4: after_4}, weights_4


def test_a_checkpoint_holds_only_safetensors_and_json(trained):
    folder, _, _ = trained
    for checkpoint in (folder / "checkpoints").iterdir():
        assert sorted(p.name for p in checkpoint.iterdir()) == CHECKPOINT_FILES
        for path in checkpoint.iterdir():
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                load_file(path)


@pytest.mark.parametrize("planted", CHECKPOINT_FILES + ACCELERATE_FILES)
def test_a_pickle_planted_in_any_file_never_runs(trained, tmp_path, capsys, planted):
    source, losses, weights_4 = trained
    marker = tmp_path / "payload-ran"
    folder = shutil.copytree(source, tmp_path / "run")
    latest = folder / "checkpoints" / "step_00000004"
    plant(latest / planted, marker)
    trainer = Trainer()
    checkpoint, state = load_checkpoint(trainer.accelerator, folder)
    printed = capsys.readouterr().out
    assert not marker.exists()
    if planted in ACCELERATE_FILES:  # never read: the latest checkpoint resumes
        assert checkpoint == latest and printed == ""
        assert all(torch.equal(v, weights_4[k]) for k, v in trainer.weights().items())
    else:  # the damaged checkpoint is named and skipped
        assert checkpoint == folder / "checkpoints" / "step_00000002"
        assert printed.count("\n") == 1 and f"{latest / planted} is damaged" in printed
    assert state == {"step": checkpoint_number(checkpoint), "note": "loop state"}
    assert trainer.train(2) == losses[checkpoint_number(checkpoint)]  # continues exactly as the uninterrupted run


@pytest.mark.parametrize("planted", CHECKPOINT_FILES)
def test_a_pickle_in_the_only_checkpoint_stops_with_one_line_naming_it(trained, tmp_path, planted):
    source, _, _ = trained
    marker = tmp_path / "payload-ran"
    folder = shutil.copytree(source, tmp_path / "run")
    shutil.rmtree(folder / "checkpoints" / "step_00000002")
    plant(folder / "checkpoints" / "step_00000004" / planted, marker)
    with pytest.raises(DamagedFileError) as error:
        load_checkpoint(Trainer().accelerator, folder)
    assert "\n" not in str(error.value) and f"{folder / 'checkpoints' / 'step_00000004' / planted}" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage, problem", [(truncate, "is damaged"), (Path.unlink, "is missing")])
def test_a_truncated_or_missing_model_file_falls_back_to_the_previous_checkpoint(trained, tmp_path, capsys, damage,
                                                                                problem):
    source, losses, _ = trained
    folder = shutil.copytree(source, tmp_path / "run")
    weights = folder / "checkpoints" / "step_00000004" / "model.safetensors"
    damage(weights)
    trainer = Trainer()
    checkpoint, _ = load_checkpoint(trainer.accelerator, folder)
    assert checkpoint == folder / "checkpoints" / "step_00000002"
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and f"{weights} {problem}" in printed and "step_00000002" in printed
    assert trainer.train(2) == losses[2]
    # the damaged checkpoint is kept under another name, out of the rotation: checkpoints written after the resume
    # (steps 3, 4, ...) would otherwise count it as the newest and delete themselves
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["damaged-step_00000004", "step_00000002"]

    weights = folder / "checkpoints" / "step_00000002" / "model.safetensors"
    damage(weights)  # none intact: one line naming the damaged file
    one_line = rf"^{re.escape(str(weights))} {problem}.*no other checkpoint.*is intact[^\n]*$"
    with pytest.raises(DamagedFileError, match=one_line):
        load_checkpoint(Trainer().accelerator, folder)


# --------------------------------------------------------------------------------------------------------------
# train.py --resume, locally and from the Hub; export and evaluate
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (8 steps per epoch) with checkpoints at steps 4, 8, 12 and 16."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(["--dataset", str(tiny_dataset), "--epochs", "2", "--checkpoint-every", "4", "--keep-checkpoints", "4",
               "--output-dir", str(out), "--tracker", "none", "--no-final-eval", "--no-export-backbone", *TINY])
    return out


def killed_after(finished_run: Path, step: int, folder: Path) -> Path:
    """A copy of the run as if it had been killed after the checkpoint at `step`."""
    shutil.copytree(finished_run, folder, ignore=shutil.ignore_patterns("model", ".lock"))
    for checkpoint in (folder / "checkpoints").iterdir():
        if checkpoint_number(checkpoint) > step:
            shutil.rmtree(checkpoint)
    return folder


def assert_same_final_weights(run: Path, reference: Path) -> None:
    expected, resumed = (load_file(folder / "model" / "model.safetensors") for folder in (reference, run))
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_train_resume_names_damaged_checkpoints_continues_from_an_intact_one_and_runs_no_pickle(finished_run,
                                                                                               tmp_path):
    marker = tmp_path / "payload-ran"
    run = killed_after(finished_run, 12, tmp_path / "run")
    checkpoints = run / "checkpoints"
    for path in (checkpoints / "step_00000012").iterdir():  # every file a pickle
        plant(path, marker)
    truncate(checkpoints / "step_00000008" / "model.safetensors")
    for name in ACCELERATE_FILES:  # intact, with accelerate's pickles beside its files
        plant(checkpoints / "step_00000004" / name, marker)
    result = run_train(["--output-dir", str(run), "--resume"])
    assert not marker.exists()
    output = result.stdout + result.stderr
    assert output.count(" is damaged ") == 2  # one line for each damaged checkpoint
    for damaged in ("step_00000012", "step_00000008"):
        assert f"{checkpoints / damaged / 'model.safetensors'} is damaged" in output
    assert f"resumed from {checkpoints / 'step_00000004'} at step 4" in output
    assert_same_final_weights(run, finished_run)


def test_train_resume_from_the_hub_runs_no_pickle(finished_run, tmp_path):
    marker = tmp_path / "payload-ran"
    with FakeHub() as hub, pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", hub.endpoint)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setenv("HF_TOKEN", "hf_test_token")
        strays = killed_after(finished_run, 8, tmp_path / "strays")
        for name in ACCELERATE_FILES:
            plant(strays / "checkpoints" / "step_00000008" / name, marker)
        push_checkpoint(strays, strays / "checkpoints" / "step_00000008", "me/strays")
        planted = killed_after(finished_run, 8, tmp_path / "planted")
        for path in (planted / "checkpoints" / "step_00000008").iterdir():
            plant(path, marker)
        push_checkpoint(planted, planted / "checkpoints" / "step_00000008", "me/planted")

        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        stopped = tmp_path / "from-planted"
        result = run_train(["--output-dir", str(stopped), "--resume", "--push-to-hub", "me/planted"], env=env,
                           check=False)
        assert not marker.exists()
        assert result.returncode == 2 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        damaged = stopped / "checkpoints" / "step_00000008" / "model.safetensors"
        assert len(errors) == 1 and errors[0].startswith(f"train.py: error: {damaged} is damaged")

        resumed = tmp_path / "from-strays"
        result = run_train(["--output-dir", str(resumed), "--resume", "--push-to-hub", "me/strays"], env=env)
        assert not marker.exists()
        assert f"resumed from {resumed / 'checkpoints' / 'step_00000008'} at step 8" in result.stdout
    assert_same_final_weights(resumed, finished_run)


def test_export_and_evaluate_name_a_damaged_or_missing_weights_file(finished_run, tiny_dataset, tmp_path, capsys):
    run = killed_after(finished_run, 8, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step_00000008"
    weights = checkpoint / "model.safetensors"
    commands = (["export", str(checkpoint), str(tmp_path / "exported")],
                ["evaluate", "--model", str(checkpoint), "--dataset", str(tiny_dataset), "--num-workers", "0"])
    for damage, problem in ((truncate, "is damaged"), (Path.unlink, "is missing")):
        damage(weights)
        for command in commands:
            assert cli_main(command) == 2
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and f"{weights} {problem}" in error, error
            assert "pytorch_model.bin" not in error
    assert not (tmp_path / "exported").exists()

    final = shutil.copytree(finished_run, tmp_path / "finished")  # a run folder's final model, truncated
    truncate(final / "model" / "model.safetensors")
    assert cli_main(["evaluate", "--model", str(final), "--dataset", str(tiny_dataset), "--num-workers", "0"]) == 2
    assert f"{final / 'model' / 'model.safetensors'} is damaged" in capsys.readouterr().err
