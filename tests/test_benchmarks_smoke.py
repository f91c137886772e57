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


def run_smoke(script: str, *extra: str, timeout: int = 240, cwd: Path = ROOT) -> str:
    """stdout+stderr of `python benchmarks/SCRIPT --smoke` started in `cwd`, after checking that it exits with 0."""
    path = BENCHMARKS / script
    if not path.exists():
        pytest.fail(f"{path} does not exist")
    result = subprocess.run([sys.executable, str(path), "--smoke", *extra], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} --smoke exited with {result.returncode}:\n{output[-3000:]}"
    return output


def test_compare_bottlenecks_smoke(tmp_path):
    import numpy as np
    from scipy import stats

    out, results, plots = tmp_path / "runs", tmp_path / "results", tmp_path / "plots"
    dirs = ("--out", str(out), "--results", str(results), "--plots", str(plots))
    output = run_smoke("compare_bottlenecks.py", *dirs)
    assert "13 run summaries" in output and "(0 failed in this invocation" in output
    for name in ("compare_sweeps.png", "compare_diagnostics.png", "compare_accuracy_vs_mi.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    by_stage = {stage: [r for r in runs if r["stage"] == stage] for stage in ("search", "final", "untrained")}
    # stage 1 on the validation split only (128 carved images), stage 2 and the untrained backbones on the test split
    assert len(by_stage["search"]) == 3 and {r["split"] for r in by_stage["search"]} == {"validation"}
    assert len(by_stage["final"]) == 8 and {r["split"] for r in by_stage["final"] + by_stage["untrained"]} == {"test"}
    assert all(r["num_eval"] == 128 and r["num_train"] == 128 and 0 <= r["linear_top1"] <= 100 for r in runs)
    assert sorted(r["seed"] for r in by_stage["untrained"]) == [0, 1]
    for run in by_stage["search"] + by_stage["final"]:  # each summary holds its own run's records
        records = [json.loads(line) for line in (out / run["name"] / "metrics.jsonl").read_text().splitlines()]
        assert run["training_last"] == [r for r in records if "I(Z1;Z2)" in r][-1]
        assert set(run["label_free"]) >= {"rankme", "alignment", "uniformity", "I(Z1;Z2)", "lower_bound"}

    # the MI weight chosen on the validation split (highest mean, ties: the first listed) is the one the final runs use
    search = {r["label"]: r["linear_top1"] for r in by_stage["search"]}
    chosen = max(["1e-3", "1e-1"], key=lambda v: search[f"mi_weight={v}"])
    combined = [r for r in by_stage["final"] if r["objective"] == "simclr" and r["label"] == "combined"]
    assert len(combined) == 2 and all(r["flags"]["mi-weight"] == chosen for r in combined)

    # the paired difference and its 95% t-interval, recomputed from the per-seed summaries
    def top1(label):
        cell = [r for r in by_stage["final"] if r["objective"] == "simclr" and r["label"] == label]
        return np.array([r["linear_top1"] for r in sorted(cell, key=lambda r: r["seed"])])

    differences = top1("combined") - top1("standard")
    half = stats.t.ppf(0.975, 1) * differences.std(ddof=1) / np.sqrt(2)
    tables = (plots / "compare_bottlenecks.md").read_text()
    row = next(line for line in tables.splitlines() if line.startswith("| simclr | combined |"))
    assert f"{differences.mean():+.2f} [{differences.mean() - half:+.2f}, {differences.mean() + half:+.2f}]" in row
    verdict = ("helps" if differences.mean() - half > 0 else "hurts" if differences.mean() + half < 0
               else "no detectable difference")
    assert f"| {verdict} |" in row
    final = [r for r in by_stage["final"]]
    rho = stats.spearmanr([r["label_free"]["rankme"] for r in final], [r["linear_top1"] for r in final])[0]
    row = next(line for line in tables.splitlines() if line.startswith("| rankme (higher) |"))
    assert (f"{rho:+.2f} " if np.isfinite(rho) else "-, n=8") in row

    # resumable: a second invocation finds every summary and redoes nothing
    again = run_smoke("compare_bottlenecks.py", *dirs)
    assert again.count(": skipped") == 13 and "13 run summaries" in again
    # the committed summaries alone regenerate the same tables on any machine
    (plots / "compare_bottlenecks.md").unlink()
    run_smoke("compare_bottlenecks.py", "--report-only", "--results", str(results), "--plots", str(plots),
              "--out", str(tmp_path / "elsewhere"))
    assert (plots / "compare_bottlenecks.md").read_text() == tables
    assert not (tmp_path / "elsewhere" / "data").exists()  # nothing was loaded or trained


def test_compare_bottlenecks_choice_verdicts_and_diverged_runs():
    """The search choice, the inverted-U call and the verdicts on hand-made summaries, against closed forms."""
    import importlib

    import numpy as np
    from scipy import stats

    sys.path.insert(0, str(BENCHMARKS))
    compare = importlib.import_module("compare_bottlenecks")
    search = {"simclr": {"mi_weight": (("1e-3", "1e-2", "1e-1"), "sweep")}}
    planned = compare.search_runs(search, search_seeds=3, screen_seeds=1)
    validation = {"standard": [70, 71, 72], "mi_weight=1e-3": [71, 72, 73], "mi_weight=1e-2": [74, 75, 76.5],
                  "mi_weight=1e-1": [69, 70, 71]}

    def summary(spec, top1, diverged=False):
        return {"name": spec.name, "stage": spec.stage, "objective": spec.objective, "seed": spec.seed,
                "label": spec.label, "flags": spec.flags, "split": "x", "linear_top1": top1, "knn_top1": top1,
                "diverged": diverged}

    summaries = [summary(spec, validation[spec.label][spec.seed - 100]) for spec in planned]
    assert compare.choose(search, planned, summaries) == {"simclr": {"mi_weight": "1e-2"}}
    assert compare.choose(search, planned, summaries[:-1]) == {}  # a partial search chooses nothing
    assert compare.inverted_u(summaries, "simclr", "mi_weight", search["simclr"]["mi_weight"][0]).startswith(
        "shown (peak at 1e-2, +4.17 pp")
    # the best value diverged on one seed: it is never chosen, and the peak moves to the end of the sweep
    diverged = [dict(s, linear_top1=None, diverged=True) if s["label"] == "mi_weight=1e-2" and s["seed"] == 101
                else s for s in summaries]
    assert compare.choose(search, planned, diverged) == {"simclr": {"mi_weight": "1e-3"}}

    final = compare.final_runs({"simclr": {"mi_weight": "1e-2"}}, seeds=3, settings=("standard", "mi"))
    test = {"standard": [80.0, 81.5, 79.0], "mi": [81.0, 81.9, 80.6]}
    summaries = [summary(spec, test[spec.label][spec.seed]) for spec in final if spec.stage == "final"]
    assert {s["flags"].get("mi-weight") for s in summaries} == {None, "1e-2"}
    differences = np.array(test["mi"]) - np.array(test["standard"])
    half = stats.t.ppf(0.975, 2) * differences.std(ddof=1) / np.sqrt(3)
    d = compare.paired_difference(compare._runs_of(summaries, "final", "simclr", "mi"),
                                  compare._runs_of(summaries, "final", "simclr", "standard"))
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((differences.mean(), differences.mean() - half,
                                                              differences.mean() + half))
    assert d["verdict"] == ("helps" if differences.mean() - half > 0 else "no detectable difference")
    summaries[-1] = dict(summaries[-1], linear_top1=None, diverged=True)
    report = compare.markdown_report(summaries, search, {"simclr": {"mi_weight": "1e-2"}})
    row = next(line for line in report.splitlines() if line.startswith("| simclr | mi |"))
    assert "diverged on 1 of 3 seeds" in row and "| 2 |" in row


def test_tune_default_smoke(tmp_path):
    """A candidate is train.py on the carved data at each seed, scored on the validation split; the table gives the
    mean over the seeds; a rerun does not redo a finished seed. Folders given relative to where it starts."""
    out, results = tmp_path / "out", tmp_path / "results"
    output = run_smoke("tune_default.py", "--out", "out", "--results", "results", "--seeds", "0", "1", cwd=tmp_path)
    scores = []
    for run in ("warmup-0", "warmup-0-seed1"):
        result = json.loads((results / f"{run}.json").read_text())
        final_eval = json.loads((out / run / "final_eval.json").read_text())
        config = (out / run / "config.yaml").read_text()
        assert "eval_split: validation" in config and "warmup_epochs: 0.0" in config
        assert re.search(rf"^seed: {result['seed']}$", config, re.M)
        assert result["validation"] == {"linear_top1": final_eval["linear_top1"], "knn_top1": final_eval["knn_top1"]}
        scores.append((final_eval["linear_top1"], final_eval["knn_top1"]))
    (linear0, knn0), (linear1, knn1) = scores
    assert (f"| warmup-0 | `--warmup-epochs 0` | 2 | {(linear0 + linear1) / 2:.2f} | {(knn0 + knn1) / 2:.2f} "
            f"| 0: {linear0:.2f} / {knn0:.2f}, 1: {linear1:.2f} / {knn1:.2f} |") in output
    again = run_smoke("tune_default.py", "--out", str(out), "--results", str(results), "--seeds", "0", "1")
    assert "warmup-0: skipped" in again and "warmup-0-seed1: skipped" in again


def test_bottlenecks_at_budget_smoke(tmp_path):
    """Grid on seed 0, the grid's best value of each bottleneck and the standard projector on fresh seeds, every run
    train.py on the carved data scored on the validation split; the tables recomputed here from the run folders."""
    import numpy as np
    from scipy import stats

    out, results = tmp_path / "out", tmp_path / "results"
    queue = ("--objectives", "simclr")  # Barlow Twins' queue is the same code; its runs' settings are tested below
    output = run_smoke("bottlenecks_at_budget.py", *queue, "--out", str(out), "--results", str(results), timeout=600)
    runs = {r["name"]: r for r in (json.loads(p.read_text()) for p in results.glob("*.json"))}
    grid = {r["label"]: r for r in runs.values() if r["stage"] == "grid"}
    assert set(grid) == {"standard", "mi_weight=1e-3", "mi_weight=1e-2", "sparse_topk=8"}
    assert {r["seed"] for r in grid.values()} == {0}
    for name, run in runs.items():  # each summary holds its own run's final evaluation and diagnostics
        final_eval = json.loads((out / name / "final_eval.json").read_text())
        config = (out / name / "config.yaml").read_text()
        assert "eval_split: validation" in config and re.search(rf"^seed: {run['seed']}$", config, re.M)
        assert run["validation"] == {"linear_top1": final_eval["linear_top1"], "knn_top1": final_eval["knn_top1"]}
        assert run["label_free"] == final_eval["trained"]["label_free"]
        assert set(run["label_free"]) >= {"rankme", "alignment", "uniformity", "I(Z1;Z2)", "H(Z1)", "lower_bound"}
    assert "sparse_latent_dim: 64" in (out / "grid-simclr-sparse-topk=8" / "config.yaml").read_text()
    # the confirmation runs the grid's best MI weight (ties: the first listed), on fresh seeds 1 and 2
    best = max(["1e-3", "1e-2"], key=lambda v: grid[f"mi_weight={v}"]["validation"]["linear_top1"])
    confirm = [r for r in runs.values() if r["stage"] == "confirm"]
    assert sorted((r["label"], r["seed"]) for r in confirm) == sorted(
        (label, seed) for label in ("standard", f"mi_weight={best}", "sparse_topk=8") for seed in (1, 2))

    # the paired difference to the standard projector and its 95% t-interval, recomputed from the run folders
    def top1(label, metric):
        cell = sorted((r for r in confirm if r["label"] == label), key=lambda r: r["seed"])
        return np.array([json.loads((out / r["name"] / "final_eval.json").read_text())[metric] for r in cell])

    row = next(line for line in output.splitlines() if line.startswith(f"| mi_weight={best} | 2 |"))
    for metric in ("linear_top1", "knn_top1"):
        differences = top1(f"mi_weight={best}", metric) - top1("standard", metric)
        half = stats.t.ppf(0.975, 1) * differences.std(ddof=1) / np.sqrt(2)
        low, high = differences.mean() - half, differences.mean() + half
        verdict = "helps" if low > 0 else "hurts" if high < 0 else "no detectable difference"
        assert f"{differences.mean():+.2f} [{low:+.2f}, {high:+.2f}]: {verdict}" in row
    rhos = [stats.spearmanr([r["label_free"]["rankme"] for r in group], [r["validation"]["linear_top1"] for r in group])
            for group in (list(grid.values()), list(runs.values()))]  # the grid's seed, then every run
    assert (f"| rankme (higher) | {rhos[0][0]:+.2f} ({rhos[0][1]:.2g}) | {rhos[1][0]:+.2f} ({rhos[1][1]:.2g}) |"
            in output)

    # resumable: a second invocation trains nothing; the committed summaries alone give the same tables
    again = run_smoke("bottlenecks_at_budget.py", *queue, "--out", str(out), "--results", str(results))
    report = run_smoke("bottlenecks_at_budget.py", *queue, "--report-only", "--results", str(results),
                       "--out", str(tmp_path / "elsewhere"))
    assert "train.py" not in again and report in again and report in output
    assert report.startswith("Machine: results;") and not (tmp_path / "elsewhere").exists()


def test_bottlenecks_at_budget_choice_and_diverged_runs(tmp_path, monkeypatch, capsys):
    """The grid's choice, the queue order and diverged runs on hand-made summaries; a diverged train.py; the
    refusal of another machine's results."""
    import dataclasses
    import importlib

    sys.path.insert(0, str(BENCHMARKS))
    budget = importlib.import_module("bottlenecks_at_budget")
    grid = {"simclr": {"mi_weight": ("1e-4", "1e-2"), "quantize_levels": ("30", "10")}}
    specs = budget.grid_runs("simclr", grid, {"simclr": ["--sparse-latent-dim", "64"]})
    assert [s.label for s in specs] == ["standard", "mi_weight=1e-4", "quantize_levels=30", "mi_weight=1e-2",
                                        "quantize_levels=10"]  # the paper's values first
    assert specs[1].flags == ["--mi-weight", "1e-4"] and specs[0].flags == []
    top1 = {"standard": 80.0, "mi_weight=1e-4": 81.0, "mi_weight=1e-2": 82.0, "quantize_levels=30": 79.0,
            "quantize_levels=10": 78.0}

    def summary(spec, linear, diverged=False):
        head = {"name": spec.name, "stage": spec.stage, "objective": spec.objective, "label": spec.label,
                "seed": spec.seed}
        scores = {"validation": {"linear_top1": linear, "knn_top1": linear}, "steps": 100, "epochs": 1.0,
                  "img_per_s": 50.0, "wall_time_s": 590.0}
        return {**head, "diverged": True} if diverged else {**head, **scores}

    summaries = [summary(s, top1[s.label]) for s in specs]
    assert budget.choose("simclr", grid, summaries[:-1]) is None  # an unfinished grid chooses nothing
    assert budget.choose("simclr", grid, summaries) == {"mi_weight": "1e-2", "quantize_levels": "30"}
    diverged = [summary(s, None, diverged=True) if s.label == "mi_weight=1e-2" else x for s, x in zip(specs, summaries)]
    assert budget.choose("simclr", grid, diverged) == {"mi_weight": "1e-4", "quantize_levels": "30"}

    confirm = budget.confirm_runs("simclr", {"mi_weight": "1e-2"}, (1, 2, 3),
                                  {"simclr": ["--sparse-latent-dim", "64"]})
    assert [(s.label, s.seed) for s in confirm] == [(label, seed) for seed in (1, 2, 3)
                                                    for label in ("standard", "mi_weight=1e-2")]
    scores = {("standard", 1): 80.0, ("standard", 2): 81.0, ("standard", 3): 79.5, ("mi_weight=1e-2", 1): 81.0,
              ("mi_weight=1e-2", 2): 82.5}
    summaries += [summary(s, scores.get((s.label, s.seed)), diverged=(s.label, s.seed) not in scores)
                  for s in confirm]
    row = next(line for line in budget.report(summaries, grid, "m").splitlines()
               if line.startswith("| mi_weight=1e-2 | 3 |"))
    assert "diverged on 1 of 3 seeds" in row and "81.75 +- 1.06" in row

    # a run whose train.py stopped on divergence (exit 1, its one line) is a result; any other failure is raised
    spec = confirm[0]
    stop = "train.py: error: training diverged: non-finite loss in step 7, before its update; ..."
    outcomes = {"diverged": RuntimeError(f"train.py exited with 1; the end of LOG:\n{stop}\nsome warning"),
                "crashed": RuntimeError("train.py exited with 11; the end of LOG:\nSegmentation fault"),
                "refused": RuntimeError("train.py exited with 2; the end of LOG:\ntrain.py: error: no such flag")}

    def fake_run_candidate(name, flags, seed, data, out, base_flags):
        raise outcomes[name.split("-", 1)[0]]  # the run's stage names the outcome

    monkeypatch.setattr(budget, "run_candidate", fake_run_candidate)
    diverged = budget.run_one(dataclasses.replace(spec, stage="diverged"), Path("data"), Path("out"), [])
    assert diverged["diverged"] is True and diverged["error"] == stop and diverged["seed"] == spec.seed
    for kind in ("crashed", "refused"):
        with pytest.raises(RuntimeError, match="exited with"):
            budget.run_one(dataclasses.replace(spec, stage=kind), Path("data"), Path("out"), [])

    # summaries of another kind of machine in the results folder: refused, nothing run
    results = tmp_path / "results"
    results.mkdir()
    here = budget.machine()
    (results / "x.json").write_text(json.dumps({"name": "x", "machine": {"cores": here["cores"] + 1,
                                                                           "native_bf16": here["native_bf16"]}}))
    with pytest.raises(SystemExit) as refused:
        budget.main(["--smoke", "--results", str(results), "--out", str(tmp_path / "out")])
    assert refused.value.code == 2 and not (tmp_path / "out").exists()
    assert "another kind of machine (x)" in capsys.readouterr().err


def test_bottlenecks_at_budget_barlow_twins_smoke(tmp_path):
    """The Barlow Twins queue end to end, started from another folder: every run trains the Barlow Twins CPU preset,
    the sparse run with the top-k block after the preset projector's first block."""
    import yaml

    preset = yaml.safe_load((ROOT / "configs" / "fashion_mnist_barlow_twins_cpu.yaml").read_text())
    width = preset["projector_hidden_dims"][0]
    out, results = tmp_path / "out", tmp_path / "results"
    output = run_smoke("bottlenecks_at_budget.py", "--objectives", "barlow_twins", "--out", str(out), "--results",
                       str(results), timeout=600, cwd=tmp_path)
    runs = [json.loads(p.read_text()) for p in results.glob("*.json")]
    assert sorted((r["stage"], r["label"], r["seed"]) for r in runs) == [
        ("confirm", label, seed) for label in ("sparse_topk=8", "standard") for seed in (1, 2)] + [
        ("grid", "sparse_topk=8", 0), ("grid", "standard", 0)]
    for run in runs:
        config = yaml.safe_load((out / run["name"] / "config.yaml").read_text())
        assert (config["objective"], config["eval_split"]) == ("barlow_twins", "validation"), run["name"]
        projector = (config["projector_hidden_dims"], config["projector_out_dim"], config["sparse_latent_dim"],
                     config["sparse_topk"])
        assert projector == (([width], 0, width, 8) if run["label"] == "sparse_topk=8" else
                             (preset["projector_hidden_dims"], preset["projector_out_dim"], 0, None)), run["name"]
    assert "### barlow_twins: confirmation (seeds 1, 2)" in output


def test_bottlenecks_at_budget_barlow_twins_runs(monkeypatch):
    """Every Barlow Twins run is its CPU preset's 10-minute job plus one bottleneck, and its sparse run keeps only the
    preset projector's first [Linear-BN-ReLU] block in front of a top-k block as wide (docs/method.md section 3c)."""
    import importlib

    import torch
    import yaml

    from hf_ibproj import IBProjConfig, IBProjModel
    from hf_ibproj.projectors import TopKSparseBlock
    from hf_ibproj.train_config import parse_train_config

    sys.path.insert(0, str(BENCHMARKS))
    budget = importlib.import_module("bottlenecks_at_budget")
    preset = yaml.safe_load((ROOT / "configs" / "fashion_mnist_barlow_twins_cpu.yaml").read_text())
    width = preset["projector_hidden_dims"][0]
    monkeypatch.chdir(ROOT)  # train.py starts in the repository root
    runs = {spec.label: parse_train_config(spec.flags)[0]
            for spec in budget.grid_runs("barlow_twins", budget.GRID, budget.SPARSE_FLAGS)}
    for label, run in runs.items():
        assert (run.objective, run.time_budget, run.batch_size, run.lr) == (
            "barlow_twins", 10, preset["batch_size"], preset["lr"]), label
        bottleneck, value = label.split("=") if "=" in label else (None, None)
        assert (run.mi_weight, run.quantize_levels) == (float(value) if bottleneck == "mi_weight" else 0.0,
                                                       int(value) if bottleneck == "quantize_levels" else 0), label
        if bottleneck != "sparse_topk":  # the preset's projector, no sparse block
            assert (run.sparse_latent_dim, run.projector_hidden_dims) == (0, preset["projector_hidden_dims"]), label
    standard = IBProjModel(runs["standard"].model_config()).projector
    widths = [m.out_features for m in standard.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [*preset["projector_hidden_dims"], preset["projector_out_dim"]]
    for k in budget.GRID["barlow_twins"]["sparse_topk"]:
        projector = IBProjModel(runs[f"sparse_topk={k}"].model_config()).projector
        layers = [type(m).__name__ for m in projector.modules() if not list(m.children())]
        assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "Linear"], layers
        sparse = next(m for m in projector.modules() if isinstance(m, TopKSparseBlock))
        assert (sparse.encoder.in_features, sparse.encoder.out_features, sparse.k) == (width, width, int(k))
    paper_k = IBProjConfig(objective="barlow_twins", sparse_latent_dim=width).sparse_topk  # 0.2 d_latent
    assert budget.GRID["barlow_twins"]["sparse_topk"][0] == str(paper_k)  # the paper's value, listed first


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


def test_gpu_check_smoke(tmp_path):
    """The GPU check at tiny sizes on the CPU: both synthetic datasets, the CIFAR-10 preset in two precisions and the
    ImageNet-100 preset streaming JPEGs, each with its model-step and data-wait timings, in the table and the JSON;
    data already in the folder is reused."""
    import importlib

    import datasets
    from PIL import Image

    out = tmp_path / "gpu_check"
    output = run_smoke("gpu_check.py", "--out", str(out))
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["machine"]["torch"] and report["machine"]["cpu_cores"] >= 1
    rows = {row["name"]: row for row in report["runs"]}
    assert list(rows) == ["cifar10-no", "cifar10-bf16", "imagenet100"]
    for name, row in rows.items():
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == row["steps"] == 3  # each run trained, logging every step
        assert row["full_step_img_per_s"] > 0 and row["model_step_img_per_s"] > 0 and 0 <= row["data_wait_share"] < 1
        assert (row["loader_img_per_s"] is not None) == row["streaming"] == (name == "imagenet100")
        assert re.search(rf"^ *{name} +{row['precision']} +{row['batch_size']} +{row['image_size']} ", output, re.M)
    assert rows["imagenet100"]["loader_img_per_s"] > 0
    assert re.search(r"^imagenet100: DataLoader alone [\d,]+ img/s vs model step [\d,]+ img/s: the loader", output,
                     re.M)

    # the data: CIFAR-10's shape, and non-square JPEGs of varied sizes in class folders
    (cifar,) = (out / "data").glob("cifar10-*")
    train = datasets.load_from_disk(str(cifar))["train"]
    assert train.features["label"].num_classes == 10 and len(train) == 256
    assert train[0]["img"].size == (32, 32) and train[0]["img"].mode == "RGB"
    (folder,) = (out / "data").glob("imagenet100-*")
    jpegs = sorted(folder.glob("train/*/*.jpg"))
    sizes = {Image.open(path).size for path in jpegs}
    assert len(jpegs) == 120 and len({path.parent for path in jpegs}) == 10
    assert len(sizes) > 20 and all(30 <= side <= 50 for size in sizes for side in size)

    # a later invocation reuses the data as it is
    sys.path.insert(0, str(BENCHMARKS))
    gpu_check = importlib.import_module("gpu_check")
    stamps = {path: path.stat().st_mtime_ns for path in (out / "data").rglob("*")}
    smoke = gpu_check.SMOKE
    assert gpu_check.cifar_like(out / "data", smoke.cifar_images) == cifar
    assert gpu_check.imagenet_like(out / "data", smoke.folder_classes, smoke.folder_per_class,
                                   smoke.folder_sides) == folder
    assert {path: path.stat().st_mtime_ns for path in (out / "data").rglob("*")} == stamps

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


def test_decode_speed_smoke(tmp_path):
    report = tmp_path / "decode_speed.json"
    output = run_smoke("decode_speed.py", "--output", str(report))
    figures = json.loads(report.read_text())
    assert figures["images"] == 12 and figures["side"] == 256 and figures["cache_mb"] > 0
    for name in ("on-the-fly, full", "on-the-fly, capped"):  # the printed ratios are those of the printed rates
        printed = re.search(rf"^cache / {name}: decode ([\d.]+)x, item ([\d.]+)x", output, re.M).groups()
        rates = [figures["rates_per_worker"][mode][key] for mode in ("cache", name)
                 for key in ("decode_img_per_s", "item_img_per_s")]
        assert float(printed[0]) == pytest.approx(rates[0] / rates[2], abs=0.006)
        assert float(printed[1]) == pytest.approx(rates[1] / rates[3], abs=0.006)


def test_peer_accuracy_smoke(tmp_path):
    pytest.importorskip("lightly")
    import numpy as np
    import timm
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    import hf_ibproj.backbones  # noqa: F401  registers resnet18_small with timm: the lightly folders name it
    from hf_ibproj.data import load_image_data

    out = tmp_path / "peer"
    output = run_smoke("peer_accuracy.py", "--out", str(out), timeout=900)
    report = json.loads((out / "peer_accuracy.json").read_text())
    rows = {row["side"]: row for row in report["rows"]}
    # lightly's batch at width 32 and at the job's width, and the job's batch at its width (all scaled down)
    assert set(rows) == {"train_py", "lightly_8-16-32-64_batch64", "lightly_8-8-8-8_batch64", "lightly_8-8-8-8_batch32"}
    # train.py's backbone, rescored here, scores what train.py's own final evaluation (its own process) gave
    final = json.loads((out / "train_py" / "final_eval.json").read_text())
    assert rows["train_py"]["linear_top1"] == pytest.approx(final["linear_top1"], abs=0.5)
    assert rows["train_py"]["knn_top1"] == pytest.approx(final["knn_top1"], abs=0.5)
    # its phases add up to its wall time, measured outside the process (so at least what train.py measured inside)
    job = report["train_py"]
    assert sum(p["seconds"] for p in job["phases"]) == pytest.approx(job["wall_time_s"], abs=0.6)
    assert job["wall_time_s"] >= json.loads((out / "train_py" / "run_info.json").read_text())["wall_time_s"]
    scores = ("linear_top1", "knn_top1", "sklearn_linear_top1", "sklearn_knn_top1")
    lightly_rows = [row for row in rows.values() if row["side"] != "train_py"]
    lead = {k: min(rows["train_py"][k] - row[k] for row in lightly_rows) for k in scores}
    assert report["default_job_leads"] == pytest.approx(lead, abs=0.006)
    assert report["default_job_ahead"] == all(v > 0 for v in lead.values())
    assert report["knn_lead_target_met"] == (min(lead["knn_top1"], lead["sklearn_knn_top1"]) >= 1.0)
    budget = report["settings"]["minutes"] * 60
    for key in (k for k in rows if k.startswith("lightly_")):
        lightly = report["lightly"][key]
        assert lightly["training_s"] >= budget - 0.05  # trains until the budget is spent
        assert lightly["img_per_s"] == pytest.approx(lightly["steps"] * lightly["batch_size"] / lightly["training_s"],
                                                     rel=0.02)
        # the saved backbone is a timm folder at the side's width, normalized with the training images' statistics
        backbone = timm.create_model(f"local-dir:{out / key}", pretrained=True).eval()
        widths, batch = key.removeprefix("lightly_").split("_batch")
        channels = [int(c) for c in widths.split("-")]
        assert lightly["batch_size"] == int(batch) and lightly["lr"] == pytest.approx(0.06 * int(batch) / 128)
        assert backbone.num_features == channels[-1]
        train, test = (load_image_data("fashion_mnist", split, channels=1, image_size=report["settings"]["image_size"],
                                       max_samples=n, seed=0) for split, n in (("train", 512), ("test", 256)))
        pixels = train.images.numpy() / 255.0
        assert lightly["mean"][0] == pytest.approx(pixels.mean(), abs=1e-4)
        assert lightly["std"][0] == pytest.approx(pixels.std(), abs=1e-4)
        # its kNN top-1 against scikit-learn's weighted kNN (k=200, cosine, weights exp(similarity / 0.1))
        with torch.no_grad():
            features = [backbone((split.images.float() / 255 - lightly["mean"][0]) / lightly["std"][0]).numpy()
                        for split in (train, test)]
        knn = KNeighborsClassifier(200, metric="cosine", weights=lambda d: np.exp((1 - d) / 0.1), algorithm="brute")
        reference = 100 * knn.fit(features[0], train.labels.numpy()).score(features[1], test.labels.numpy())
        assert rows[key]["knn_top1"] == pytest.approx(reference, abs=1.6)  # 4 of 256 test images (bf16 features)
        # the second evaluator: scikit-learn's plain majority vote of the 20 nearest (cosine), and its logistic
        # regression on standardized features, on the features computed here in float32
        majority = KNeighborsClassifier(20, metric="cosine", algorithm="brute").fit(features[0], train.labels.numpy())
        reference = 100 * majority.score(features[1], test.labels.numpy())
        assert rows[key]["sklearn_knn_top1"] == pytest.approx(reference, abs=1.6)
        scaled = StandardScaler().fit(features[0])
        logistic = LogisticRegression(max_iter=1000).fit(scaled.transform(features[0]), train.labels.numpy())
        reference = 100 * logistic.score(scaled.transform(features[1]), test.labels.numpy())
        assert rows[key]["sklearn_linear_top1"] == pytest.approx(reference, abs=2.4)  # 6 of 256 (bf16 features)
    assert re.search(r"^default job ahead of every lightly row on every score: (yes|NO); by 1 pp or more on kNN "
                     r"\(both evaluators\): (yes|NO)$", output, re.M)
    assert "the default job's phases" in output and "final evaluation: linear probe" in output

    # resumable: a second invocation finds every side and score done and trains nothing
    again = run_smoke("peer_accuracy.py", "--out", str(out))
    assert again.count(": skipped") == 8 and "whole run" not in again
    assert json.loads((out / "peer_accuracy.json").read_text())["rows"] == report["rows"]
    # other options into the same folder are refused, not mixed in
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "peer_accuracy.py"), "--smoke", "--minutes", "0.06",
                              "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert refused.returncode == 2 and "holds results of other options" in refused.stderr


def test_idx_to_dataset_and_peer_accuracy_on_it(tmp_path):
    """idx files (plain or gzipped, written with struct) become a save_to_disk dataset whose images and labels are the
    files' own; peer_accuracy.py's --dataset sends train.py and lightly's side to it."""
    import importlib

    import datasets
    import numpy as np

    from hf_ibproj.data import load_image_data
    from tiny import write_idx

    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 3, 12)),
              "t10k": (rng.integers(0, 256, (6, 28, 28)), np.array([0, 1, 2, 2, 1, 0]))}
    idx = tmp_path / "idx"
    idx.mkdir()
    for prefix, (images, labels) in arrays.items():
        write_idx(idx / f"{prefix}-images-idx3-ubyte.gz", images)  # one gzipped, one plain
        write_idx(idx / f"{prefix}-labels-idx1-ubyte", labels)
    data = tmp_path / "data"
    command = [sys.executable, str(BENCHMARKS / "idx_to_dataset.py"), str(idx), str(data)]
    made = subprocess.run([*command, "--class-names", "a", "b", "c"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    splits = datasets.load_from_disk(str(data))
    assert sorted(splits) == ["test", "train"] and splits["train"].features["label"].names == ["a", "b", "c"]
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[prefix]
        assert [np.array(image).tolist() for image in splits[split]["image"]] == images.tolist()
        assert splits[split]["label"] == labels.tolist()
        loaded = load_image_data(str(data), split, channels=1)
        assert loaded.images[:, 0].tolist() == images.tolist() and loaded.labels.tolist() == labels.tolist()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)  # nothing is overwritten
    assert again.returncode == 2 and f"{data} exists: pass a new folder" in again.stderr
    (idx / "t10k-labels-idx1-ubyte").unlink()
    missing = subprocess.run([*command[:-1], str(tmp_path / "other")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "has no t10k-labels-idx1-ubyte (nor t10k-labels-idx1-ubyte.gz)" in missing.stderr
    assert not (tmp_path / "other").exists()

    sys.path.insert(0, str(BENCHMARKS))
    peer = importlib.import_module("peer_accuracy")
    settings = peer.make_settings(None, smoke=False, dataset=str(data))
    assert settings.dataset == str(data)
    assert settings.train_py_flags[settings.train_py_flags.index("--dataset") + 1] == str(data)
    assert "--dataset" not in peer.make_settings(None, smoke=False).train_py_flags
