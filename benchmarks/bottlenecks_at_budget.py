"""The paper's bottleneck projectors in the 10-minute default job: a verdict per bottleneck at the budget users run.

    python benchmarks/bottlenecks_at_budget.py                          # every objective, resumable, ~11 min per run
    python benchmarks/bottlenecks_at_budget.py --objectives simclr      # one objective
    python benchmarks/bottlenecks_at_budget.py --report-only            # the tables from the committed summaries
    python benchmarks/bottlenecks_at_budget.py --smoke                  # seconds, for CI

benchmarks/compare_bottlenecks.py compares the bottlenecks at 100 steps (half an epoch at width 8); this script asks
the same question of the run users actually start: `python train.py` with the objective's CPU preset and its
10-minute budget (training and final evaluation), where a bottleneck that costs step time pays for it in steps.

Protocol (the test split is never touched):
- Data: Fashion-MNIST's training split carved once (seed 0, class-stratified) into 50,000 pretraining images and a
  10,000-image validation split, as benchmarks/compare_bottlenecks.py carves it.
- Every run is `python train.py --time-budget 10 --dataset OUT/data --eval-split validation` on the objective's
  preset plus the run's flags, scored by train.py's own final evaluation (linear probe and kNN fit on the 50,000,
  scored on the 10,000) and its label-free diagnostics of the trained model (RankMe, alignment, uniformity,
  I(Z1;Z2), H(Z1), I(Z1;R) and the bounds; hf_ibproj.diagnostics, on held-out images and views drawn from the run's
  seed, so the same in every run of a seed).
- Stage 1, grid (seed 0): the standard projector and each bottleneck at each value of GRID, the paper's values
  included. The chosen value of a bottleneck has the highest validation linear top-1; a diverged value is never
  chosen.
- Stage 2, confirmation (seeds 1, 2, 3: fresh seeds, so the grid's choice does not flatter its winner): the chosen
  value of each bottleneck and the standard projector. Reported: mean +- std, the paired difference to the standard
  projector over the common seeds with its 95% t-interval, and a verdict (helps: interval above 0; hurts: below;
  otherwise no detectable difference), on linear and on kNN top-1.
- Label-free diagnostics: Spearman's rho with validation linear top-1 over an objective's grid runs (one seed) and
  over all its runs.

Machines: the figures depend on the machine (a CPU with bf16 units trains ~4x the steps), so the summaries go to
RESULTS/MACHINE (e.g. `2core-bf16`), and a comparison never mixes machines. Resumable: each finished run writes a
small JSON there (committed: the tables regenerate with --report-only) and is never run again; a run cut short starts
afresh (a timed run cannot be continued without distorting its budget). `touch OUT/PAUSE` holds the queue before the
next run (to keep a quiet machine for other work); removing it lets the queue go on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from compare_bottlenecks import (DIAGNOSTICS, SMOKE_SIZES, SMOKE_TRAIN_SAMPLES, Sizes, carve_dataset, mean_std,
                                 paired_difference)
from peer_accuracy import SMOKE_MINUTES, machine
from scipy import stats
from tune_default import SMOKE_BASE_FLAGS, result_name, run_candidate

from hf_ibproj.runs import write_json
from hf_ibproj.train_config import read_preset

ROOT = Path(__file__).resolve().parent.parent
MINUTES = 10.0
GRID_SEED, CONFIRM_SEEDS = 0, (1, 2, 3)
# The objective's CPU preset, as train.py flags: the default job (configs/fashion_mnist_cpu.yaml, SimCLR) and its
# Barlow Twins twin, whose projector is BARLOW_TWINS_WIDTH wide.
BARLOW_TWINS_PRESET = Path("configs") / "fashion_mnist_barlow_twins_cpu.yaml"  # train.py starts in ROOT
OBJECTIVES = {"simclr": [], "barlow_twins": ["--config", str(BARLOW_TWINS_PRESET)]}
BARLOW_TWINS_WIDTH = read_preset(ROOT / BARLOW_TWINS_PRESET)["projector_hidden_dims"][0]
# Each bottleneck's values, the paper's first (docs/method.md section 3): lambda 1e-4 (CIFAR) and 1e-2
# (ImageNet-100); L = 30 for SimCLR, 3 for Barlow Twins; k = 0.001 d_latent for SimCLR (of the 4096 latents the
# default preset suggests) and 0.2 d_latent for Barlow Twins.
GRID = {
    "simclr": {"mi_weight": ("1e-4", "1e-3", "1e-2"), "quantize_levels": ("30", "100", "10"),
               "sparse_topk": ("4", "41", "410")},
    "barlow_twins": {"mi_weight": ("1e-4", "1e-2", "1e-1"), "quantize_levels": ("3", "10", "30"),
                     "sparse_topk": tuple(str(round(ratio * BARLOW_TWINS_WIDTH)) for ratio in (0.2, 0.1, 0.4))},
}
# The sparse block's flags (docs/method.md section 3c): SimCLR's replaces the whole MLP; Barlow Twins' follows the
# projector's first [Linear-BN-ReLU] block, with as many latents as that block is wide.
SPARSE_FLAGS = {"simclr": ["--sparse-latent-dim", "4096"],
                "barlow_twins": ["--projector-hidden-dims", f"[{BARLOW_TWINS_WIDTH}]", "--projector-out-dim", "0",
                                 "--sparse-latent-dim", str(BARLOW_TWINS_WIDTH)]}
SMOKE_GRID = {"simclr": {"mi_weight": ("1e-3", "1e-2"), "sparse_topk": ("8",)},
              "barlow_twins": {"sparse_topk": ("8",)}}
SMOKE_SPARSE_FLAGS = {"simclr": ["--sparse-latent-dim", "64"], "barlow_twins": SPARSE_FLAGS["barlow_twins"]}
SMOKE_CONFIRM_SEEDS = (1, 2)
PAUSE_POLL_S = 10


@dataclass(frozen=True)
class RunSpec:
    """One run: stage ("grid" / "confirm"), objective, "standard" or "<bottleneck>=<value>", seed, train.py flags."""

    stage: str
    objective: str
    label: str
    seed: int
    flags: list[str] = field(default_factory=list)

    @property
    def cell(self) -> str:
        return f"{self.stage}-{self.objective}-{self.label.replace('_', '-')}"

    @property
    def name(self) -> str:
        return result_name(self.cell, self.seed)


def make_run(stage: str, objective: str, label: str, seed: int, sparse_flags: dict[str, list[str]]) -> RunSpec:
    flags = list(OBJECTIVES[objective])
    if label != "standard":
        bottleneck, value = label.split("=")
        if bottleneck == "sparse_topk":
            flags += sparse_flags[objective]
        flags += [f"--{bottleneck.replace('_', '-')}", value]
    return RunSpec(stage, objective, label, seed, flags)


def grid_runs(objective: str, grid: dict, sparse_flags: dict[str, list[str]]) -> list[RunSpec]:
    """Stage 1: the standard projector, then the bottlenecks' first values (the paper's), their second values, ..."""
    labels = ["standard"]
    for position in range(max(map(len, grid[objective].values()))):
        labels += [f"{b}={values[position]}" for b, values in grid[objective].items() if position < len(values)]
    return [make_run("grid", objective, label, GRID_SEED, sparse_flags) for label in labels]


def choose(objective: str, grid: dict, summaries: list[dict]) -> dict[str, str] | None:
    """bottleneck -> its value with the highest grid linear top-1 (ties: listed first); None until every grid run of
    the objective has finished. A bottleneck whose values all diverged is left out."""
    runs = {s["label"]: s for s in summaries if s["stage"] == "grid" and s["objective"] == objective}
    labels = [f"{b}={v}" for b, values in grid[objective].items() for v in values]
    if any(label not in runs for label in ["standard", *labels]):
        return None
    chosen = {}
    for bottleneck, values in grid[objective].items():
        finite = [v for v in values if not runs[f"{bottleneck}={v}"].get("diverged")]
        if finite:
            chosen[bottleneck] = max(finite, key=lambda v: runs[f"{bottleneck}={v}"]["validation"]["linear_top1"])
    return chosen


def confirm_runs(objective: str, chosen: dict[str, str], seeds: tuple[int, ...],
                 sparse_flags: dict[str, list[str]]) -> list[RunSpec]:
    """Stage 2, seed by seed (a partial confirmation covers every cell): standard and each chosen value."""
    labels = ["standard"] + [f"{b}={v}" for b, v in chosen.items()]
    return [make_run("confirm", objective, label, seed, sparse_flags) for seed in seeds for label in labels]


# ------------------------------------------------------------------------------------------------ runs


def machine_name(facts: dict | None = None) -> str:
    """The kind of a machine (this one by default), which names its results folder: its core count and whether its
    CPU computes bf16 natively."""
    facts = facts or machine()
    return f"{facts['cores']}core-{'bf16' if facts['native_bf16'] else 'nobf16'}"


def wait_while_paused(pause_file: Path) -> None:
    if pause_file.exists():
        print(f"paused: remove {pause_file} to go on", flush=True)
    while pause_file.exists():
        time.sleep(PAUSE_POLL_S)


def run_one(spec: RunSpec, data: Path, out: Path, base_flags: list[str]) -> dict:
    """train.py for `spec`; its summary (scores, label-free diagnostics, steps, machine), or diverged=True."""
    head = {"stage": spec.stage, "objective": spec.objective, "label": spec.label}
    started = time.gmtime()
    try:
        result = run_candidate(spec.cell, spec.flags, spec.seed, data, out, base_flags)
    except RuntimeError as error:  # train.py exits with 1 and one line when training diverged: a result
        stop = [line for line in str(error).splitlines() if "training diverged" in line]
        if "exited with 1;" not in str(error) or not stop:
            raise
        return {**head, "name": spec.name, "seed": spec.seed, "flags": spec.flags, "diverged": True,
                "error": stop[-1], "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", started)}
    return {**result, **head, "name": spec.name}


def run_queue(specs: list[RunSpec], data: Path, out: Path, results: Path, base_flags: list[str]) -> None:
    for spec in specs:
        path = results / f"{spec.name}.json"
        if path.is_file():
            continue
        wait_while_paused(out / "PAUSE")
        print(f"{spec.name}: {' '.join(spec.flags) or '(preset)'}", flush=True)
        summary = run_one(spec, data, out, base_flags)
        write_json(path, summary)
        print(f"{spec.name}: " + ("diverged" if summary.get("diverged") else
                                  f"validation linear {summary['validation']['linear_top1']:.2f}, kNN "
                                  f"{summary['validation']['knn_top1']:.2f}, {summary['steps']} steps "
                                  f"({summary['wall_time_s']:.0f} s)"), flush=True)


def read_summaries(results: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]


# ------------------------------------------------------------------------------------------------ report


def _cell(summaries: list[dict], objective: str, label: str, stage: str = "confirm") -> list[dict]:
    return sorted((s for s in summaries if s["stage"] == stage and s["objective"] == objective
                   and s["label"] == label), key=lambda s: s["seed"])


def _scores(runs: list[dict], metric: str) -> list[dict]:
    """The finished runs as paired_difference reads them: seed and `metric` as linear_top1."""
    return [{"seed": s["seed"], "linear_top1": s["validation"][metric]} for s in runs if not s.get("diverged")]


def _difference(cell: list[dict], standard: list[dict], metric: str) -> str:
    d = paired_difference(_scores(cell, metric), _scores(standard, metric))
    if d["low"] is None:
        return f"{d['verdict']}"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]: {d['verdict']}"


def report(summaries: list[dict], grid: dict, machine_folder: str) -> str:
    lines = [f"Machine: {machine_folder}; validation split carved from train (the test split is never used).", ""]
    for objective in grid:
        runs = [s for s in summaries if s["objective"] == objective]
        if not runs:
            continue
        cpus = sorted({s["machine"]["cpu"] for s in runs if "machine" in s})  # the kind can hold several models
        lines += [f"### {objective}: grid (seed {GRID_SEED}), validation top-1 (%)", "",
                  *([f"CPUs: {', '.join(cpus)}", ""] if cpus else []),
                  "| projector | linear | kNN | steps | epochs | img/s | wall s |", "|---|---|---|---|---|---|---|"]
        order = ["standard"] + [f"{b}={v}" for b, values in grid[objective].items() for v in values]
        grid_rows = [s for s in runs if s["stage"] == "grid" and s["label"] in order]
        for s in sorted(grid_rows, key=lambda s: order.index(s["label"])):
            if s.get("diverged"):
                lines.append(f"| {s['label']} | diverged | | | | | |")
                continue
            lines.append(f"| {s['label']} | {s['validation']['linear_top1']:.2f} | {s['validation']['knn_top1']:.2f} "
                         f"| {s['steps']} | {s['epochs']:.2f} | {s['img_per_s']:.0f} | {s['wall_time_s']:.0f} |")
        chosen = choose(objective, grid, summaries)
        lines += ["", f"Chosen on the grid: {chosen if chosen is not None else 'not yet (grid incomplete)'}", ""]
        standard = _cell(summaries, objective, "standard")
        if standard:
            seeds = ", ".join(map(str, sorted({s["seed"] for s in standard})))
            lines += [f"### {objective}: confirmation (seeds {seeds}), validation top-1 (%), paired differences to the "
                      "standard projector (95% CI)", "",
                      "| projector | seeds | linear | kNN | linear diff: verdict | kNN diff: verdict |",
                      "|---|---|---|---|---|---|"]
            for label in ["standard"] + [f"{b}={v}" for b, v in (chosen or {}).items()]:
                cell = _cell(summaries, objective, label)
                finite = [s for s in cell if not s.get("diverged")]
                diverged = len(cell) - len(finite)
                diff = ("-", "-") if label == "standard" else (
                    (f"diverged on {diverged} of {len(cell)} seeds",) * 2 if diverged else
                    (_difference(cell, standard, "linear_top1"), _difference(cell, standard, "knn_top1")))
                lines.append(f"| {label} | {len(cell)} | {mean_std([s['validation']['linear_top1'] for s in finite])} "
                             f"| {mean_std([s['validation']['knn_top1'] for s in finite])} | {diff[0]} | {diff[1]} |")
            lines.append("")
        lines += spearman_lines(objective, runs)
    return "\n".join(lines) + "\n"


def spearman_lines(objective: str, runs: list[dict]) -> list[str]:
    """Spearman rho (p) of each label-free diagnostic with validation linear top-1: over the grid's runs (one seed,
    so the same held-out images and views: train.py draws both from the run's seed) and over every run."""
    runs = [s for s in runs if not s.get("diverged") and s.get("label_free")]
    groups = {"grid runs (seed 0)": [s for s in runs if s["stage"] == "grid"], "every run": runs}
    groups = {name: group for name, group in groups.items() if len(group) >= 3}
    if not groups:
        return []
    lines = [f"### {objective}: label-free diagnostics against validation linear top-1, Spearman rho (p)", "",
             "| diagnostic (better when) | " + " | ".join(f"{name}, n={len(group)}" for name, group in groups.items())
             + " |", "|---|" + "---|" * len(groups)]
    for key, sign in DIAGNOSTICS.items():
        cells = [stats.spearmanr([s["label_free"][key] for s in group], [s["validation"]["linear_top1"] for s in group])
                 for group in groups.values()]
        lines.append(f"| {key} ({'higher' if sign > 0 else 'lower'}) | "
                     + " | ".join(f"{rho:+.2f} ({p:.2g})" for rho, p in cells) + " |")
    return lines + [""]


def other_machine(summaries: list[dict]) -> str | None:
    """The first run that came from another kind of machine (core count, native bf16) than this one, or None."""
    here = machine_name()
    return next((s["name"] for s in summaries if machine_name(s["machine"]) != here), None)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=None, help=f"which (default: all): {', '.join(GRID)}")
    parser.add_argument("--out", type=Path, default=None, help="run folders and the carved data "
                        "(default: benchmarks/out/bottlenecks_at_budget)")
    parser.add_argument("--results", type=Path, default=None, help="one JSON per finished run, committed (default: "
                        "benchmarks/bottleneck_results/MACHINE, MACHINE as in the docstring)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: the tables from --results")
    parser.add_argument("--smoke", action="store_true", help="tiny data and budget in a temporary folder (CI)")
    args = parser.parse_args(argv)

    grid, sparse_flags, seeds, minutes, sizes, train_samples, base_flags = (
        GRID, SPARSE_FLAGS, CONFIRM_SEEDS, MINUTES, Sizes(), None, [])
    if args.smoke:
        if args.out is None or args.results is None:
            temp = Path(tempfile.mkdtemp(prefix="bottlenecks_smoke_"))
            args.out, args.results = args.out or temp / "out", args.results or temp / "results"
        grid, sparse_flags, seeds, minutes = SMOKE_GRID, SMOKE_SPARSE_FLAGS, SMOKE_CONFIRM_SEEDS, SMOKE_MINUTES
        sizes, train_samples = SMOKE_SIZES, SMOKE_TRAIN_SAMPLES
        base_flags = SMOKE_BASE_FLAGS
    unknown = sorted(set(args.objectives or ()) - set(grid))
    if unknown:
        parser.error(f"unknown objective(s) {', '.join(unknown)}: choose from {', '.join(grid)}")
    objectives = args.objectives or list(grid)
    machine_folder = args.results.name if args.results else machine_name()
    args.results = args.results or ROOT / "benchmarks" / "bottleneck_results" / machine_folder
    args.out = args.out or ROOT / "benchmarks" / "out" / "bottlenecks_at_budget"
    args.results.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        foreign = other_machine(read_summaries(args.results))
        if foreign is not None:
            parser.error(f"{args.results} holds runs of another kind of machine ({foreign}); a comparison never mixes "
                         "machines: pass --results with a folder of this machine's")
        args.out.mkdir(parents=True, exist_ok=True)
        data = carve_dataset(args.out / "data", train_samples, sizes)
        base_flags = ["--time-budget", str(minutes), *base_flags]
        for objective in objectives:
            run_queue(grid_runs(objective, grid, sparse_flags), data, args.out, args.results, base_flags)
            chosen = choose(objective, grid, read_summaries(args.results))
            print(f"{objective}: chosen on the grid {chosen}", flush=True)
            run_queue(confirm_runs(objective, chosen, seeds, sparse_flags), data, args.out, args.results,
                      base_flags)
    summaries = [s for s in read_summaries(args.results) if s["objective"] in objectives]
    print(report(summaries, {o: grid[o] for o in objectives}, machine_folder) if summaries
          else f"no results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
