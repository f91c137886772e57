"""Projector bottlenecks compared (PAPER.md sections 3 and 7) at a fixed CPU budget on Fashion-MNIST.

    python benchmarks/compare_bottlenecks.py              # 44 runs (~2 min each, 2 side by side: ~45 min here)
    python benchmarks/compare_bottlenecks.py --jobs 1     # one train.py at a time
    python benchmarks/compare_bottlenecks.py --report-only  # tables and plots of the runs finished so far
    python benchmarks/compare_bottlenecks.py --smoke      # seconds, for CI (tiny data, one step, temp dir)

For SimCLR and Barlow Twins, each of five projector settings (standard, MI regularizer, discretized, sparse,
all three) is trained with several seeds by train.py (main() in a forked process per run: Accelerate keeps
global state), and evaluated by train.py's final frozen-backbone evaluation (hf_ibproj.evaluation: linear
probe and kNN).
Two SimCLR sweeps follow (MI weight, quantizer levels), reusing the grid's runs where they coincide.

Outputs: every run in OUT/<name>/ (a train.py run folder); OUT/summary.json (all runs), the markdown tables
(PLOTS/compare_bottlenecks.md) and the plots (PLOTS/accuracy_vs_mi.png, PLOTS/sweep_mi_weight.png,
PLOTS/sweep_quantize_levels.png). Resumable: a run whose final_eval.json exists is not redone; a run cut
short with a checkpoint continues with --resume; one cut short before its first checkpoint starts afresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (train.py at the repository root)
from hf_ibproj.runs import latest_checkpoint  # noqa: E402

# The fixed CPU budget of every run (train.py flags on top of configs/fashion_mnist_cpu.yaml).
# Width-8 small-stem ResNet-18 (64-d features), 28 px, the first 2,560 training images (also the probe's and
# kNN's training set), evaluated on the full 10,000-image test split, 2 epochs of batch 128 (40 LARS steps),
# the per-epoch kNN monitor on 500 images, fp32: this CPU has no native bf16 (no AMX / avx512_bf16) and bf16
# autocast measured 2x SLOWER than fp32 here.
BUDGET = {
    "backbone-kwargs": "{channels: [8, 16, 32, 64]}",
    "max-samples": "2560",
    "epochs": "2",
    "batch-size": "128",
    "mixed-precision": "no",
    "knn-train-samples": "500",
    "knn-eval-samples": "500",
    "log-every": "10",
    "diagnostics-every": "10",  # 40 steps: the last diagnostics land on the last step
    "tracker": "none",
    "export-backbone": "false",
    "final-eval": "true",
}
SMOKE_BUDGET = {**BUDGET, "backbone-kwargs": "{channels: [8, 8, 16, 16]}", "max-samples": "64", "epochs": "1",
                "batch-size": "64", "log-every": "1", "diagnostics-every": "1", "knn-train-samples": "64",
                "knn-eval-samples": "64"}

# Per-objective settings. The paper's values (PAPER.md section 3) where they fit this scale:
#   quantizer L = 30 (SimCLR) / 3 (Barlow Twins), the paper's own choices;
#   MI weight 1e-3 for both (paper: 1e-4 CIFAR, 1e-2 ImageNet-100; the SimCLR sweep covers 1e-4 ... 1e-1);
#   sparse block with 1024-2048 latents instead of 100k: SimCLR k = 16 of 2048 (the paper's 0.001 * d would
#   keep 2 latents), Barlow Twins k = 0.2 * d as in the paper.
# Barlow Twins runs at projector width 1024 (paper 2048: at this backbone width the 2048^2 layers cost more
# than the whole encoder) and LARS lr 0.9 (paper ratio 0.3 / 0.4 to SimCLR's preset lr 1.2).
OBJECTIVES = {
    "simclr": {
        "base": {},
        "mi_weight": "1e-3", "quantize_levels": "30", "sparse": {"sparse-latent-dim": "2048", "sparse-topk": "16"},
    },
    "barlow_twins": {
        "base": {"lr": "0.9", "projector-hidden-dims": "[1024, 1024]", "projector-out-dim": "1024"},
        "mi_weight": "1e-3", "quantize_levels": "3",
        # the sparse block follows the first [Linear-BN-ReLU] block (PAPER.md 3c)
        "sparse": {"sparse-latent-dim": "1024", "sparse-topk": "205", "projector-hidden-dims": "[1024]",
                   "projector-out-dim": "0"},
    },
}
SETTINGS = ("standard", "mi", "quantized", "sparse", "combined")
MI_SWEEP = ("0", "1e-4", "1e-3", "1e-2", "1e-1")
LEVELS_SWEEP = ("0", "3", "5", "10", "30", "100")


@dataclass
class RunSpec:
    """One train.py run: its folder name, what it belongs to, and its flags."""

    name: str
    objective: str
    seed: int
    flags: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # grid settings and sweep points this run stands for


def setting_flags(objective: str, setting: str) -> dict[str, str]:
    spec = OBJECTIVES[objective]
    flags = {"objective": objective, **spec["base"]}
    if setting in ("mi", "combined"):
        flags["mi-weight"] = spec["mi_weight"]
    if setting in ("quantized", "combined"):
        flags["quantize-levels"] = spec["quantize_levels"]
    if setting in ("sparse", "combined"):
        flags.update(spec["sparse"])
    return flags


def plan_runs(seeds: int, sweep_seeds: int, objectives: tuple[str, ...], settings: tuple[str, ...],
              mi_sweep: tuple[str, ...], levels_sweep: tuple[str, ...]) -> list[RunSpec]:
    """The grid then the SimCLR sweeps, seed by seed (a partial result covers every cell); no run is repeated."""
    runs: dict[str, RunSpec] = {}

    def add(objective: str, label: str, seed: int, flags: dict[str, str]) -> None:
        # the name is the flags themselves, so a sweep point equal to a grid run is the same folder
        name = "-".join([objective] + [f"{k}={v}" for k, v in sorted(flags.items()) if k != "objective"]
                        + [f"seed{seed}"]).replace(" ", "").replace("[", "").replace("]", "").replace(",", "_")
        runs.setdefault(name, RunSpec(name, objective, seed, flags)).labels.append(label)

    for seed in range(seeds):
        for objective in objectives:
            for setting in settings:
                add(objective, setting, seed, setting_flags(objective, setting))
    for seed in range(sweep_seeds):
        for weight in mi_sweep:
            flags = setting_flags("simclr", "standard")
            if float(weight):
                flags["mi-weight"] = weight
            add("simclr", f"mi_weight={weight}", seed, flags)
        for levels in levels_sweep:
            flags = setting_flags("simclr", "standard")
            if int(levels):
                flags["quantize-levels"] = levels
            add("simclr", f"quantize_levels={levels}", seed, flags)
    return list(runs.values())


def run_one(spec: RunSpec, budget: dict[str, str], out_dir: Path, threads: int) -> str:
    """Train + evaluate one run unless its final_eval.json exists; returns 'done', 'skipped' or 'failed (...)'."""
    run_dir = out_dir / spec.name
    if (run_dir / "final_eval.json").exists():
        return "skipped"
    resume = latest_checkpoint(run_dir) is not None if run_dir.exists() else False
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # cut short before its first checkpoint: start afresh
    flags = {**budget, **spec.flags, "seed": str(spec.seed), "output-dir": str(run_dir)}
    argv = [a for k, v in flags.items() for a in (f"--{k}", v)] + (["--resume"] if resume else [])
    log_path = out_dir / f"{spec.name}.log"
    # A forked child per run: a fresh process (Accelerate keeps global state) that skips re-importing
    # torch/timm/transformers, which took ~12 s of the ~40 s a tiny run cost on this loaded 2-core machine.
    child = multiprocessing.get_context("fork").Process(target=_train_in_child, args=(argv, log_path, threads))
    child.start()
    child.join()
    if child.exitcode != 0:
        return f"failed (exit {child.exitcode}, see {log_path})"
    return "done"


def _train_in_child(argv: list[str], log_path: Path, threads: int) -> None:
    """train.py's main in this (forked) process, its output to `log_path`; exits with train.py's status."""
    with log_path.open("w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # One thread per run and `jobs` runs side by side: on 2 shared cores, 2-thread OpenMP runs next to
        # other processes spin at barriers and ran ~5x slower than single-threaded ones here.
        torch.set_num_threads(threads)
        try:
            code = train.main(argv)
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            print(f"train.py: error: {error}", file=sys.stderr)
            code = 2
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def collect(spec: RunSpec, out_dir: Path) -> dict | None:
    """Accuracies, the final information quantities and the wall time of a finished run."""
    run_dir = out_dir / spec.name
    if not (run_dir / "final_eval.json").exists():
        return None
    final = json.loads((run_dir / "final_eval.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    diagnostics = [r for r in records if "I(Z1;Z2)" in r]
    last = diagnostics[-1] if diagnostics else {}
    info = json.loads((run_dir / "run_info.json").read_text())
    return {
        "name": spec.name, "objective": spec.objective, "labels": spec.labels, "seed": spec.seed,
        "flags": spec.flags, "linear_top1": final["linear_top1"], "knn_top1": final["knn_top1"],
        "random_init_linear_top1": final["random_init"]["linear_top1"],
        "random_init_knn_top1": final["random_init"]["knn_top1"],
        "I(Z1;Z2)": last.get("I(Z1;Z2)"), "I(Z1;R)": last.get("I(Z1;R)"), "H(Z1)": last.get("H(Z1)"),
        "diagnostics_step": last.get("step"), "wall_time_s": info.get("wall_time_s"),
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_tables(results: list[dict], settings_by_objective: dict[str, list[str]],
                    sweeps: dict[str, list[str]]) -> str:
    """The comparison table (mean +- std, per-seed values, delta to standard), the per-run table and the sweeps."""
    lines = ["### Linear probe and kNN top-1 (%), mean +- std over seeds", "",
             "| objective | projector | seeds | linear top-1 | delta vs standard | per-seed linear | kNN top-1 | "
             "per-seed kNN | I(Z1;Z2) mean | I(Z1;R) mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for objective, settings in settings_by_objective.items():
        cells = {s: [r for r in results if r["objective"] == objective and s in r["labels"]] for s in settings}
        base = [r["linear_top1"] for r in cells.get("standard", [])]
        for setting in settings:
            runs = sorted(cells[setting], key=lambda r: r["seed"])
            linear = [r["linear_top1"] for r in runs]
            knn = [r["knn_top1"] for r in runs]
            delta = f"{statistics.mean(linear) - statistics.mean(base):+.2f}" if linear and base else "-"
            mi = [r["I(Z1;Z2)"] for r in runs if r["I(Z1;Z2)"] is not None]
            izr = [r["I(Z1;R)"] for r in runs if r["I(Z1;R)"] is not None]
            lines.append(
                f"| {objective} | {setting} | {len(runs)} | {mean_std(linear)} | {delta} | "
                f"{', '.join(f'{v:.2f}' for v in linear)} | {mean_std(knn)} | {', '.join(f'{v:.2f}' for v in knn)} | "
                f"{_fmt(statistics.mean(mi) if mi else None, 3)} | {_fmt(statistics.mean(izr) if izr else None, 3)} |"
            )
    random_init = [r["random_init_linear_top1"] for r in results]
    random_knn = [r["random_init_knn_top1"] for r in results]
    if random_init:
        lines += ["", f"Untrained (random-init) backbones, same evaluation, all runs: linear {mean_std(random_init)}, "
                      f"kNN {mean_std(random_knn)}."]
    for sweep, points in sweeps.items():
        lines += ["", f"### SimCLR sweep over {sweep}", "",
                  f"| {sweep} | seeds | linear top-1 | per-seed linear | kNN top-1 | per-seed kNN | I(Z1;Z2) mean |",
                  "|---|---|---|---|---|---|---|"]
        for point in points:
            runs = sorted((r for r in results if f"{sweep}={point}" in r["labels"]), key=lambda r: r["seed"])
            linear, knn = [r["linear_top1"] for r in runs], [r["knn_top1"] for r in runs]
            mi = [r["I(Z1;Z2)"] for r in runs if r["I(Z1;Z2)"] is not None]
            lines.append(f"| {point} | {len(runs)} | {mean_std(linear)} | {', '.join(f'{v:.2f}' for v in linear)} | "
                         f"{mean_std(knn)} | {', '.join(f'{v:.2f}' for v in knn)} | "
                         f"{_fmt(statistics.mean(mi) if mi else None, 3)} |")
    lines += ["", "### Every run: final I(Z1;Z2) and I(Z1;R) (nats, last diagnostics step), accuracies, wall time", "",
              "| run | linear | kNN | I(Z1;Z2) | I(Z1;R) | H(Z1) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['linear_top1']:.2f} | {r['knn_top1']:.2f} | {_fmt(r['I(Z1;Z2)'], 4)} | "
                     f"{_fmt(r['I(Z1;R)'], 3)} | {_fmt(r['H(Z1)'], 3)} | {_fmt(r['wall_time_s'], 0)} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_mi(results: list[dict], settings_by_objective: dict[str, list[str]], path: Path) -> None:
    """The paper's Figure 3 analogue: linear top-1 against the final I(Z1;Z2), one point per run."""
    fig, axes = plt.subplots(1, len(settings_by_objective), figsize=(5.5 * len(settings_by_objective), 4.2),
                             squeeze=False, constrained_layout=True)
    for ax, (objective, settings) in zip(axes[0], settings_by_objective.items()):
        for setting in settings:
            runs = [r for r in results if r["objective"] == objective and setting in r["labels"]
                    and r["I(Z1;Z2)"] is not None]
            ax.scatter([r["I(Z1;Z2)"] for r in runs], [r["linear_top1"] for r in runs], label=setting, s=28)
        ax.set(xlabel="final I(Z1;Z2) (nats)", ylabel="linear top-1 (%)", title=objective)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(results: list[dict], sweep: str, points: list[str], path: Path) -> None:
    """Linear and kNN top-1 (mean +- std over seeds, every seed as a dot) against the swept value."""
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    x = list(range(len(points)))
    for key, marker in (("linear_top1", "o"), ("knn_top1", "s")):
        means, stds = [], []
        for i, point in enumerate(points):
            values = [r[key] for r in results if f"{sweep}={point}" in r["labels"]]
            ax.scatter([i] * len(values), values, s=10, alpha=0.4, marker=marker)
            means.append(statistics.mean(values) if values else math.nan)
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.errorbar(x, means, yerr=stds, marker=marker, capsize=3, label=key.replace("_top1", " top-1"))
    ax.set_xticks(x, points)
    ax.set(xlabel=f"{sweep} (0 = off)", ylabel="top-1 (%)", title=f"SimCLR, sweep over {sweep}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="run folders (default benchmarks/out/compare)")
    parser.add_argument("--plots", type=Path, default=None, help="tables and PNGs (default benchmarks/plots)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per grid cell")
    parser.add_argument("--sweep-seeds", type=int, default=2, help="seeds per sweep point not in the grid")
    parser.add_argument("--jobs", type=int, default=2, help="train.py runs side by side")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per run")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny data, one step, a temp dir")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tables and plots from the runs finished so far")
    args = parser.parse_args(argv)

    budget, objectives, settings = BUDGET, tuple(OBJECTIVES), SETTINGS
    mi_sweep, levels_sweep = MI_SWEEP, LEVELS_SWEEP
    if args.smoke:  # 3 runs: both objectives with all three bottlenecks, SimCLR standard (the sweeps' 0 point)
        temp = Path(tempfile.mkdtemp(prefix="compare_smoke_"))
        args.out, args.plots = args.out or temp / "runs", args.plots or temp / "plots"
        args.seeds, args.sweep_seeds = 1, 1
        budget, settings, mi_sweep, levels_sweep = SMOKE_BUDGET, ("combined",), ("0",), ("0",)
    args.out = args.out or ROOT / "benchmarks" / "out" / "compare"
    args.plots = args.plots or ROOT / "benchmarks" / "plots"
    for name in ("seeds", "sweep_seeds", "jobs", "threads"):
        if getattr(args, name) < (0 if name == "sweep_seeds" else 1):
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    args.out.mkdir(parents=True, exist_ok=True)
    args.plots.mkdir(parents=True, exist_ok=True)

    runs = plan_runs(args.seeds, args.sweep_seeds, objectives, settings, mi_sweep, levels_sweep)
    print(f"{len(runs)} runs in {args.out} ({args.jobs} side by side, {args.threads} thread(s) each); budget: "
          + " ".join(f"--{k} {v!r}" for k, v in budget.items()), flush=True)
    started = time.perf_counter()

    def run_and_report(spec: RunSpec) -> str:
        run_started = time.perf_counter()
        status = run_one(spec, budget, args.out, args.threads)
        print(f"[{time.perf_counter() - started:7.0f}s] {spec.name}: {status} "
              f"({time.perf_counter() - run_started:.0f}s)", flush=True)
        return status

    if args.report_only:
        statuses = ["not run"] * len(runs)
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            statuses = list(pool.map(run_and_report, runs))
    wall = time.perf_counter() - started

    results = [r for r in (collect(spec, args.out) for spec in runs) if r is not None]
    settings_by_objective = {o: list(settings) for o in objectives}
    sweeps = {"mi_weight": list(mi_sweep), "quantize_levels": list(levels_sweep)}
    (args.out / "summary.json").write_text(json.dumps({"budget": budget, "objectives": OBJECTIVES, "runs": results},
                                                      indent=2))
    tables = markdown_tables(results, settings_by_objective, sweeps)
    (args.plots / "compare_bottlenecks.md").write_text(tables)
    plot_accuracy_vs_mi(results, settings_by_objective, args.plots / "accuracy_vs_mi.png")
    plot_sweep(results, "mi_weight", sweeps["mi_weight"], args.plots / "sweep_mi_weight.png")
    plot_sweep(results, "quantize_levels", sweeps["quantize_levels"], args.plots / "sweep_quantize_levels.png")
    print(tables)
    failed = [s for s in statuses if s.startswith("failed")]
    print(f"{len(results)}/{len(runs)} runs finished ({len(failed)} failed) in {wall / 60:.1f} min this invocation; "
          f"summary {args.out / 'summary.json'}, tables and plots in {args.plots}")
    return 1 if len(results) < len(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
