"""The run folder: the one place that knows its paths and records (its checkpoints: hf_ibproj.checkpoints).

    RUN/config.yaml               the resolved configuration (written once; `--resume` reads it)
    RUN/run_info.json             seed, versions, hardware, commands, the time budget, phases, wall time
    RUN/metrics.jsonl             one JSON object per logged step or epoch-end monitor
    RUN/random_init_eval.json     the random-init floor (linear probe + kNN of the untrained backbone)
    RUN/final_eval.json           the trained backbone's evaluation beside the floor
    RUN/information_plane.png     the plot of the information-plane diagnostics
    RUN/checkpoints/step_N/       model weights + config.json (a model folder), optimizer and random states,
                                  training_state.json: safetensors and JSON, never pickle
    RUN/model/                    the final IBProjModel (save_pretrained)
    RUN/backbone/                 the exported backbone (timm / transformers Hub folder)
    RUN/logs/                     accelerate trackers (TensorBoard, ...)
    RUN/.lock                     held by the process that writes the run (its PID)

"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import re
import shutil
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import CHECKPOINTS, checkpoint_dirs, checkpoint_path, latest_checkpoint

_PACKAGES = ("torch", "torchvision", "timm", "transformers", "datasets", "accelerate", "huggingface-hub",
             "safetensors", "kornia", "hf_ibproj")


class RunFolderInUseError(FileExistsError):
    """Another process holds the run folder's lock."""


def _in_folder(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"RUN/{name}")


class RunFolder:
    """Every path and record of one pretraining run's folder (see the module docstring for the layout)."""

    CONFIG = "config.yaml"
    INFO = "run_info.json"
    METRICS = "metrics.jsonl"
    RANDOM_INIT_EVAL = "random_init_eval.json"
    FINAL_EVAL = "final_eval.json"
    PLOT = "information_plane.png"
    MODEL = "model"
    BACKBONE = "backbone"
    LOGS = "logs"
    RECORDS = (CONFIG, INFO, METRICS, RANDOM_INIT_EVAL)  # what travels with a checkpoint pushed to the Hub
    LOCK = ".lock"  # held by the process that writes the run; holds its PID

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # paths
    config_file = _in_folder(CONFIG)
    info_file = _in_folder(INFO)
    random_init_eval_file = _in_folder(RANDOM_INIT_EVAL)
    final_eval_file = _in_folder(FINAL_EVAL)
    plot_file = _in_folder(PLOT)
    model_dir = _in_folder(MODEL)
    backbone_dir = _in_folder(BACKBONE)
    logs_dir = _in_folder(LOGS)
    checkpoints_dir = _in_folder(CHECKPOINTS)

    @cached_property
    def metrics(self) -> MetricsLog:
        return MetricsLog(self.path / self.METRICS)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one run: an OS lock on RUN/.lock, released when the block ends or the process dies
        (a crash included); a second holder is refused at once with RunFolderInUseError naming the first's PID."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / self.LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise RunFolderInUseError(
                    f"{self.path} is in use by PID {handle.read().strip() or '?'} (another run writes to it); wait "
                    "for it to end or choose another --output-dir.") from None
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield

    def entries(self) -> list[str]:
        """The names in the folder (none when it is absent), its lock file aside."""
        return [p.name for p in self.path.iterdir() if p.name != self.LOCK] if self.path.is_dir() else []

    def clear(self) -> None:
        """Delete everything in the folder but its lock file (`--overwrite-output-dir`; hold the lock)."""
        for name in self.entries():
            path = self.path / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    # checkpoints
    def checkpoints(self) -> list[Path]:
        return checkpoint_dirs(self.path)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def checkpoint_dir(self, step: int) -> Path:
        return checkpoint_path(self.path, step)

    # records
    def read_config(self) -> dict[str, Any]:
        """config.yaml as a dict ({} when absent or empty); a ValueError naming the file when it does not parse or
        is not a mapping."""
        try:
            values = read_yaml(self.config_file)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
            where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark and problem else error
            raise ValueError(f"{self.config_file} is not valid YAML ({' '.join(str(where).split())}); restore it "
                             "(train.py writes it when a run starts).") from None
        if not isinstance(values, dict):
            raise ValueError(f"{self.config_file} holds a {type(values).__name__}, not a mapping of settings; "
                             "restore it (train.py writes it when a run starts).")
        return values

    def write_config(self, values: dict[str, Any]) -> None:
        write_yaml(self.config_file, values)

    def read_info(self) -> dict[str, Any]:
        return read_json(self.info_file)

    def write_info(self, values: dict[str, Any]) -> None:
        write_json(self.info_file, values)

    def update_info(self, **values: Any) -> None:
        self.write_info({**self.read_info(), **values})

    def append_info(self, key: str, entry: Any) -> None:
        """Add `entry` to the list `key` of run_info.json (resumes, push failures)."""
        self.update_info(**{key: [*self.read_info().get(key, []), entry]})

    def read_random_init_eval(self) -> dict[str, Any] | None:
        return read_json(self.random_init_eval_file) or None

    def write_random_init_eval(self, result: dict[str, Any]) -> None:
        write_json(self.random_init_eval_file, result)

    def read_final_eval(self) -> dict[str, Any]:
        return read_json(self.final_eval_file)

    def write_final_eval(self, result: dict[str, Any]) -> None:
        write_json(self.final_eval_file, result)


def remove_abandoned_staging(parent: Path, staging_name: re.Pattern) -> None:
    """Delete the folders of `parent` named as `staging_name` says (its first group: the writer's PID on this
    machine) whose writer is gone: what a write killed midway left behind. A running writer's folder stays."""
    if not parent.is_dir():
        return
    for folder in parent.iterdir():
        match = staging_name.fullmatch(folder.name)
        if match and folder.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_name() -> str:
    """This CPU's model name (Linux: /proc/cpuinfo's "model name"), else its architecture as `platform` knows it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware_summary(device: Any, num_processes: int) -> str:
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} CPU, {os.cpu_count()} cores"
    return f"{num_processes} x {name}"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def write_yaml(path: Path, values: dict[str, Any]) -> None:
    write_atomically(path, yaml.safe_dump(values, sort_keys=False))


def write_json(path: Path, values: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(values, indent=2) + "\n")


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a crash never leaves a half-written file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class MetricsLog:
    """Appends one JSON object per record to RUN/metrics.jsonl (kept across resumes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run logs those steps again)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
