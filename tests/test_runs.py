"""The run folder's lock: one writer at a time, released when its holder ends, even by a crash; the hardware a run
records."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_ibproj.runs import RunFolder, RunFolderInUseError, hardware_summary


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        with pytest.raises(RunFolderInUseError, match=f"in use by PID {os.getpid()}.*--output-dir"):
            with RunFolder(tmp_path / "run").lock():
                pass
    with folder.lock():  # released at the end of the block
        pass


def test_a_killed_holder_releases_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from hf_ibproj.runs import RunFolder
with RunFolder({str(tmp_path / "run")!r}).lock():
    print("held", flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunFolderInUseError, match=f"PID {holder.pid}"):
        with RunFolder(tmp_path / "run").lock():
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    deadline = time.time() + 10
    while True:  # the OS drops the lock with the process
        try:
            with RunFolder(tmp_path / "run").lock():
                break
        except RunFolderInUseError:
            assert time.time() < deadline
            time.sleep(0.05)


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="needs lscpu (util-linux) to name the CPU independently")
def test_a_cpu_run_records_the_cpu_model_as_lscpu_names_it():
    if "model name" not in Path("/proc/cpuinfo").read_text():  # ARM: lscpu names the core from its own table
        pytest.skip("/proc/cpuinfo names no model here; the run records the architecture")
    listing = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    model = next((line.split(":", 1)[1].strip() for line in listing.splitlines() if line.startswith("Model name:")),
                 None)
    if model is None:
        pytest.skip("lscpu names no model here")
    assert hardware_summary(torch.device("cpu"), 2) == f"2 x {model} CPU, {os.cpu_count()} cores"
