"""Checkpoints of a run or fine-tuning folder (OUTPUT/checkpoints/step_N), written atomically and read without
unpickling anything: safetensors and JSON only.

    model.safetensors (+ config.json)   the model: every checkpoint is also a model folder
    model_1.safetensors, ...            further prepared models (pretraining: the online probe)
    optimizer.json + .safetensors       optimizers, lr schedulers, the fp16 loss scale; tensors by name
    random_states_K.json                process K's python, numpy, torch CPU and CUDA generators
    training_state.json                 the loop's state (step, schedule, time budget)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TRAINING_STATE = "training_state.json"  # a checkpoint's loop state (step, schedule, time budget)
# Checkpoints are written and read here, not by accelerate's save_state / load_state: load_state unpickles
# (optimizer.bin, scheduler.bin and random_states_N.pkl through torch.load, registered objects'
# custom_checkpoint_N.pkl with weights_only=False), so a planted file would run code on `--resume`.
MODEL_WEIGHTS = "model.safetensors"  # the first prepared model; model_1.safetensors, ... the others
OPTIMIZER_STATE = "optimizer.json"  # optimizers, lr schedulers, fp16 loss scale; their tensors by name in:
OPTIMIZER_TENSORS = "optimizer.safetensors"
RANDOM_STATES = "random_states_{}.json"  # one per process: python, numpy, torch CPU and CUDA generators
_TENSOR = "__tensor__"  # {"__tensor__": NAME} in optimizer.json stands for the tensor NAME of optimizer.safetensors
DAMAGED_PREFIX = "damaged-"  # a checkpoint a resume found damaged, renamed out of the rotation
_CHECKPOINT_NAME = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)")


class DamagedFileError(ValueError):
    """A file of a checkpoint or model folder that is missing or does not read; the message names it."""

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def checkpoint_step(folder: Path) -> int | None:
    """N of a folder named step_N; None for any other name."""
    match = _CHECKPOINT_NAME.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:08d}"


def is_checkpoint_dir(folder: Path) -> bool:
    """OUTPUT/checkpoints/step_N, written by `save_checkpoint`."""
    folder = Path(folder)
    return folder.parent.name == CHECKPOINTS and checkpoint_step(folder) is not None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run or fine-tuning folder, oldest first (an interrupted save's folder is hidden)."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, keep: int, model_config: Any = None,
                    state: dict[str, Any] | None = None) -> Path:
    """Write the accelerator's prepared objects and every process's random states as a checkpoint (safetensors
    and JSON: MODEL_WEIGHTS, OPTIMIZER_STATE + OPTIMIZER_TENSORS, RANDOM_STATES, TRAINING_STATE) into a temporary
    folder, renamed into place once complete; keeps the last `keep`.

    With `model_config` (the model's PretrainedConfig) its config.json goes beside the model's model.safetensors,
    so every checkpoint is also a model folder (`from_pretrained`, `hf-ibproj evaluate --model`, export). `state`
    (the loop's step, schedule and time budget) goes to training_state.json. Every process must call this (each
    saves its random states); only the main process writes the rest and renames.
    """
    final = checkpoint_path(output_dir, step)
    temporary = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    (temporary / RANDOM_STATES.format(accelerator.process_index)).write_text(json.dumps(_random_states()))
    if accelerator.is_main_process:
        for index, model in enumerate(accelerator._models):
            save_model(accelerator.unwrap_model(model), str(temporary / _model_file(index)), metadata={"format": "pt"})
        tensors: dict[str, torch.Tensor] = {}
        optimizer_state = {
            "optimizers": [_split_tensors(o.state_dict(), tensors, f"optimizer{i}") for i, o in
                           enumerate(accelerator._optimizers)],
            "schedulers": [_split_tensors(s.state_dict(), tensors, f"scheduler{i}") for i, s in
                           enumerate(accelerator._schedulers)],
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "step": accelerator.step,  # accelerate's micro-step count (gradient accumulation)
        }
        save_file(tensors, temporary / OPTIMIZER_TENSORS)
        (temporary / OPTIMIZER_STATE).write_text(json.dumps(optimizer_state))  # the folder is renamed when complete
        (temporary / TRAINING_STATE).write_text(json.dumps({"step": step, **(state or {})}))
        if model_config is not None:
            model_config.save_pretrained(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, output_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Restore the newest intact checkpoint of `output_dir` into the accelerator's prepared objects and this
    process's random states; returns the checkpoint and its training_state.json.

    Every file is read (and so checked) before anything is restored. A checkpoint with a missing or unreadable
    file is skipped with one line naming the file and renamed DAMAGED_PREFIX + its name (kept for inspection, out of
    the rotation: the checkpoints written next would otherwise count it as newer and delete themselves); DamagedFileError
    (a ValueError) names it when no checkpoint is intact, and ValueError names a file that does not fit the run. Every
    process decides alike (each reads all processes' random states). Nothing is unpickled.
    """
    damaged: list[DamagedFileError] = []
    for checkpoint in reversed(checkpoint_dirs(output_dir)):
        try:
            contents = _read_checkpoint(checkpoint, len(accelerator._models), accelerator.num_processes)
        except DamagedFileError as error:
            damaged.append(error)
            continue
        for error in damaged:
            accelerator.print(f"warning: {error}; skipping {error.checkpoint.name} (renamed "
                              f"{DAMAGED_PREFIX}{error.checkpoint.name}), resuming from {checkpoint.name}")
        accelerator.wait_for_everyone()  # every process has chosen before the damaged ones are moved aside
        if accelerator.is_main_process:
            for error in damaged:
                os.replace(error.checkpoint, error.checkpoint.with_name(DAMAGED_PREFIX + error.checkpoint.name))
        _restore(accelerator, checkpoint, contents)
        return checkpoint, contents[TRAINING_STATE]
    if not damaged:
        raise FileNotFoundError(f"{output_dir} has no checkpoint to resume from; check --output-dir.")
    raise DamagedFileError(f"{damaged[0]}, and no other checkpoint in {Path(output_dir) / CHECKPOINTS} is intact, "
                           "so the run cannot be resumed.", damaged[0].checkpoint)


@contextlib.contextmanager
def reading(path: Path, checkpoint: Path | None = None) -> Iterator[None]:
    """Turn a missing or unreadable `path` (truncated, not JSON or safetensors) into a DamagedFileError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DamagedFileError(f"{path} is missing", checkpoint) from None
    except (OSError, ValueError, SafetensorError) as error:
        raise DamagedFileError(f"{path} is damaged ({type(error).__name__}: {error})", checkpoint) from None


def check_safetensors(path: Path) -> None:
    """DamagedFileError naming `path` unless it is a complete safetensors file (its header covers its size)."""
    with reading(path), safe_open(path, framework="pt"):
        pass


def _model_file(index: int) -> str:
    return MODEL_WEIGHTS if index == 0 else MODEL_WEIGHTS.replace(".", f"_{index}.")


def _read_checkpoint(checkpoint: Path, num_models: int, num_processes: int) -> dict[str, Any]:
    """Every file of a checkpoint by name, parsed (config.json too, when present); DamagedFileError names the
    first that is missing or does not read."""
    names = [*(_model_file(i) for i in range(num_models)), OPTIMIZER_TENSORS, OPTIMIZER_STATE, TRAINING_STATE,
             *(RANDOM_STATES.format(i) for i in range(num_processes))]
    if (checkpoint / "config.json").exists():
        names.append("config.json")
    contents = {}
    for name in names:
        path = checkpoint / name
        with reading(path, checkpoint):
            if name == OPTIMIZER_TENSORS:
                contents[name] = load_file(path)
            elif name.endswith(".safetensors"):  # model weights: their header checked here, loaded by _restore
                with safe_open(path, framework="pt"):
                    pass
            else:
                contents[name] = json.loads(path.read_bytes())
    return contents


def _restore(accelerator: Any, checkpoint: Path, contents: dict[str, Any]) -> None:
    """Load what `_read_checkpoint` read into the prepared objects and this process's random generators."""
    with _fitting(checkpoint / OPTIMIZER_STATE):
        state = _join_tensors(contents[OPTIMIZER_STATE], contents[OPTIMIZER_TENSORS])
        for optimizer, saved in zip(accelerator._optimizers, state["optimizers"], strict=True):
            # JSON keys are strings; an optimizer's state is keyed by parameter index
            optimizer.load_state_dict({**saved, "state": {int(k): v for k, v in saved["state"].items()}})
        for scheduler, saved in zip(accelerator._schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        accelerator.step = state["step"]
    for index, model in enumerate(accelerator._models):
        with _fitting(checkpoint / _model_file(index)):
            load_model(accelerator.unwrap_model(model), checkpoint / _model_file(index))
    with _fitting(checkpoint / RANDOM_STATES.format(accelerator.process_index)):
        _set_random_states(contents[RANDOM_STATES.format(accelerator.process_index)])


@contextlib.contextmanager
def _fitting(path: Path) -> Iterator[None]:
    """A file that read but does not fit the run (another model, optimizer or layout): ValueError naming it."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} does not fit this run ({type(error).__name__}: {str(error)[:300]})") from None


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor], name: str) -> Any:
    """`value` (a state_dict) for JSON: each tensor moved into `tensors` under its path and replaced by a reference."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(value, dict):
        return {str(key): _split_tensors(item, tensors, f"{name}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(item, tensors, f"{name}.{i}") for i, item in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_split_tensors` (tuples come back as lists)."""
    if isinstance(value, dict):
        if value.keys() == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {key: _join_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_join_tensors(item, tensors) for item in value]
    return value


def _random_states() -> dict[str, Any]:
    """This process's random generators as JSON: python `random`, numpy's global one, torch CPU and CUDA."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(internal), gauss],
              "numpy": [kind, keys.tolist(), position, has_gauss, cached],
              "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():  # this process's device only: another CUDA_VISIBLE_DEVICES still fits
        states["cuda"] = torch.cuda.get_rng_state().tolist()
    return states


def _set_random_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8))
