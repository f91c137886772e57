"""Every benchmark script runs in its seconds-long --smoke mode (tiny data, one step), so none can rot.

The full benchmarks are not run here (see benchmarks/RESULTS.md for their commands and numbers).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def run_smoke(script: str, *extra: str, timeout: int = 240) -> str:
    """stdout+stderr of `python benchmarks/SCRIPT --smoke`, after checking that it exits with 0."""
    path = BENCHMARKS / script
    if not path.exists():
        pytest.fail(f"{path} does not exist")
    result = subprocess.run([sys.executable, str(path), "--smoke", *extra], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} --smoke exited with {result.returncode}:\n{output[-3000:]}"
    return output


def test_compare_bottlenecks_smoke(tmp_path):
    out, plots = tmp_path / "runs", tmp_path / "plots"
    output = run_smoke("compare_bottlenecks.py", "--out", str(out), "--plots", str(plots))
    assert "3/3 runs finished (0 failed)" in output
    for name in ("accuracy_vs_mi.png", "sweep_mi_weight.png", "sweep_quantize_levels.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert sorted(r["objective"] for r in runs) == ["barlow_twins", "simclr", "simclr"]
    for run in runs:  # values come from each run's own final_eval.json and metrics.jsonl
        final = json.loads((out / run["name"] / "final_eval.json").read_text())
        assert run["linear_top1"] == final["linear_top1"] and 0 <= run["knn_top1"] <= 100
        last = [json.loads(line) for line in (out / run["name"] / "metrics.jsonl").read_text().splitlines()
                if "I(Z1;Z2)" in line][-1]
        assert run["I(Z1;Z2)"] == last["I(Z1;Z2)"] and run["I(Z1;R)"] == last["I(Z1;R)"]
    combined = [r for r in runs if "combined" in r["labels"]]
    assert {r["objective"] for r in combined} == {"simclr", "barlow_twins"}
    assert all(r["flags"]["quantize-levels"] and r["flags"]["mi-weight"] and r["flags"]["sparse-latent-dim"]
               for r in combined)
    tables = (plots / "compare_bottlenecks.md").read_text()
    assert "| simclr | combined | 1 |" in tables and "### SimCLR sweep over mi_weight" in tables

    # resumable: a second invocation finds every final_eval.json and redoes nothing
    again = run_smoke("compare_bottlenecks.py", "--out", str(out), "--plots", str(plots))
    assert again.count(": skipped") == 3 and "3/3 runs finished" in again


def test_peer_throughput_smoke():
    pytest.importorskip("lightly")
    output = run_smoke("peer_throughput.py")
    rates = {name: float(value) for name, value in re.findall(r"^(train\.py|lightly)\s+([\d.]+) img/s$", output, re.M)}
    assert set(rates) == {"train.py", "lightly"} and all(v > 0 for v in rates.values())
    ratio = float(re.search(r"^ratio\s+([\d.]+)x", output, re.M).group(1))
    assert ratio == pytest.approx(rates["train.py"] / rates["lightly"], rel=0.02, abs=0.01)
    ceiling, step_rate = re.search(r"^ceiling\s+([\d.]+)x \(model step alone, ([\d.]+) img/s", output, re.M).groups()
    assert float(ceiling) == pytest.approx(float(step_rate) / rates["lightly"], rel=0.02, abs=0.01)


def test_train_throughput_smoke():
    output = run_smoke("train_throughput.py")
    assert re.search(r"end-to-end\s+[\d.]+ img/s", output)
    assert re.search(r"model-only step\s+[\d.]+ img/s", output)


def test_information_speed_smoke():
    output = run_smoke("information_speed.py")
    assert "matrix_mutual_information" in output
    plain_ms = float(re.search(r"^plain\s*:\s+([\d.]+) ms/step", output, re.M).group(1))
    mi_ms, percent = re.search(r"^MI regularizer alone .*: ([\d.]+) ms, ([\d.]+)% of the plain step", output, re.M).groups()
    # the overhead the target line judges is the MI term's own time over the plain step
    assert float(percent) == pytest.approx(100 * float(mi_ms) / plain_ms, rel=0.05, abs=0.01)
    assert re.search(rf"^target: MI regularizer overhead {re.escape(percent)}% ", output, re.M)


def test_eval_speed_smoke(tmp_path):
    report = tmp_path / "eval_speed.json"
    output = run_smoke("eval_speed.py", "--output", str(report))
    assert "total" in output
    figures = json.loads(report.read_text())
    assert figures["num_train"] == 512 and figures["num_test"] == 256
    assert 0 <= figures["linear"]["top1"] <= 100 and figures["total_s"] > 0
