"""The default job's recipe tuned on a validation split carved from the training split (never on the test split).

    python benchmarks/tune_default.py                         # every candidate, ~10.5 min each on 2 CPU cores
    python benchmarks/tune_default.py --candidates preset warmup-0.1 --seeds 0 1
    python benchmarks/tune_default.py --report-only           # the table from the committed results
    python benchmarks/tune_default.py --report-only --results benchmarks/tune_results/round3
    python benchmarks/tune_default.py --smoke                 # seconds, for CI

Each candidate is `python train.py` on the default preset (configs/fashion_mnist_cpu.yaml) with its 10-minute
budget plus the candidate's flags, pretraining on 50,000 Fashion-MNIST training images and scored by train.py's
own final evaluation (hf_ibproj.evaluation: linear probe and kNN fit on those 50,000) on the other 10,000, carved
once (seeded, class-stratified) exactly as benchmarks/compare_bottlenecks.py carves them. Every candidate gets the
same wall-clock budget, so a wider or slower recipe pays for itself in fewer steps, as it would in the default job.

Resumable: each finished candidate and seed writes RESULTS/NAME.json (seed 0) or RESULTS/NAME-seedS.json (small,
committed) and is not run again; a run cut short starts afresh (a timed run cannot be continued without distorting its
budget). The table gives each candidate's mean over its seeds, and the seeds' scores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from compare_bottlenecks import SMOKE_SIZES, SMOKE_TRAIN_SAMPLES, Sizes, carve_dataset
from peer_accuracy import SMOKE_MINUTES, SMOKE_TRAIN_PY_FLAGS, machine, read_train_py_records, timed_train_py

from hf_ibproj.runs import write_json

ROOT = Path(__file__).resolve().parent.parent
MINUTES = 10.0
# name -> train.py flags on top of the preset. Round 1 (the table in RESULTS.md), round 2 (tune_results/round2/) and
# round 3 (tune_results/round3/) ran on the presets of their day, and are named against them; round 3 chose batch 64,
# so a next round's results start afresh in tune_results/.
CANDIDATES = {
    "preset": [],
    # round 3's preset, and the batch between: a quarter and half the optimizer steps in the same budget
    "batch-256": ["--batch-size", "256"],
    "batch-128": ["--batch-size", "128"],
    # twice the steps again (round 3: batch 64 gained on both metrics over 128 and 256)
    "batch-32": ["--batch-size", "32"],
    # round 2's winner against the preset it replaced (the paper's SimCLR projector has no BatchNorm)
    "no-projector-bn": ["--projector-batch-norm", "false"],
    # lightly's blur strength: PIL blurs sigma 2 fully, the default 3-px kernel cuts it to a box (round 2: even)
    "blur-13": ["--blur-kernel-size", "13"],
    # a weaker crop: 0.08 of a 28-px image is an 8-px patch (round 2's run was disturbed, see RESULTS.md)
    "crop-0.2": ["--crop-min-scale", "0.2"],
    # lightly's optimizer and schedule: SGD lr 0.06, momentum 0.9, wd 5e-4, no warm-up
    "sgd": ["--optimizer", "sgd", "--lr", "0.06", "--weight-decay", "5e-4", "--warmup-epochs", "0"],
    # lightly's weight decay alone (5x the preset's)
    "wd-5e-4": ["--weight-decay", "5e-4"],
    # a 0.5-epoch warm-up is a quarter of a ~1.8-epoch run: a shorter or a longer one (rounds 1 and 3: both worse)
    "warmup-0.1": ["--warmup-epochs", "0.1"],
    "warmup-1.0": ["--warmup-epochs", "1.0"],
    # a sharper or a softer softmax than the preset's 0.2 (the paper's; round 2: 0.1 cost kNN)
    "tau-0.1": ["--nt-xent-tau", "0.1"],
    "tau-0.3": ["--nt-xent-tau", "0.3"],
    # half the learning rate (LARS 1.2 is the preset's; solo-learn uses 0.4 at batch 256)
    "lr-0.6": ["--lr", "0.6"],
    # the paper's bottleneck on (docs/method.md section 3: lambda 1e-4 on CIFAR)
    "mi-1e-4": ["--mi-weight", "1e-4"],
    # twice the width: fewer steps in the same budget
    "width-32": ["--backbone-kwargs", "{channels: [32, 64, 128, 256]}"],
    # A Barlow Twins default job at the same budget (the preset with the objective switched; its own augmentation
    # recipe and the paper's 2048-wide projector unless a flag says otherwise): the paper's LARS lr 0.3, the 100-step
    # comparison's 0.9 (benchmarks/compare_bottlenecks.py), a 1024-wide projector that costs less per step, batch 256.
    "bt-lr-0.3": ["--objective", "barlow_twins", "--lr", "0.3"],
    "bt-lr-0.9": ["--objective", "barlow_twins", "--lr", "0.9"],
    "bt-lr-0.3-projector-1024": ["--objective", "barlow_twins", "--lr", "0.3", "--projector-hidden-dims",
                                 "[1024, 1024]", "--projector-out-dim", "1024"],
    "bt-lr-0.3-batch-256": ["--objective", "barlow_twins", "--lr", "0.3", "--batch-size", "256"],
    # Barlow Twins round 2, from round 1's winner (the 1024-wide projector): narrower again, round 1's higher lr on
    # it, and the SimCLR preset's stronger jitter with blur in place of Barlow Twins' own recipe.
    "bt-projector-512": ["--objective", "barlow_twins", "--lr", "0.3", "--projector-hidden-dims", "[512, 512]",
                         "--projector-out-dim", "512"],
    "bt-projector-1024-lr-0.9": ["--objective", "barlow_twins", "--lr", "0.9", "--projector-hidden-dims",
                                 "[1024, 1024]", "--projector-out-dim", "1024"],
    "bt-projector-1024-simclr-augmentation": ["--objective", "barlow_twins", "--lr", "0.3", "--projector-hidden-dims",
                                              "[1024, 1024]", "--projector-out-dim", "1024",
                                              "--augmentation", "simclr"],
    # round 3: narrower still, from round 2's winner (512): the backbone's 128 features and twice that
    "bt-projector-256": ["--objective", "barlow_twins", "--lr", "0.3", "--projector-hidden-dims", "[256, 256]",
                         "--projector-out-dim", "256"],
    "bt-projector-128": ["--objective", "barlow_twins", "--lr", "0.3", "--projector-hidden-dims", "[128, 128]",
                         "--projector-out-dim", "128"],
}
SMOKE_CANDIDATES = {"warmup-0": ["--warmup-epochs", "0"]}
SMOKE_BASE_FLAGS = [*SMOKE_TRAIN_PY_FLAGS, "--backbone-kwargs", "{channels: [8, 8, 8, 8]}"]  # under every smoke run


def result_name(name: str, seed: int) -> str:
    """A candidate's run and result name at a seed: seed 0 keeps the bare name (round 2's records)."""
    return name if seed == 0 else f"{name}-seed{seed}"


def run_candidate(name: str, flags: list[str], seed: int, data: Path, out: Path, base_flags: list[str]) -> dict:
    """`python train.py` on the carved data with the candidate's flags and seed; its records and validation scores.
    train.py starts in the repository root, so it is given absolute paths."""
    data, out = data.resolve(), out.resolve()
    run_dir = out / result_name(name, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.gmtime()
    command, wall_time = timed_train_py(["--dataset", str(data), "--eval-split", "validation", "--output-dir",
                                         str(run_dir), "--seed", str(seed), *base_flags, *flags],
                                        out / f"{run_dir.name}.log")
    records = read_train_py_records(run_dir, wall_time)
    return {"name": name, "seed": seed, "flags": flags, "command": command, "split": "validation",
            "validation": records.pop("own_evaluation"), **records, "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", started)}


def joined(runs: list[dict], key: str, spec: str) -> str:
    """Each seed's `key`, formatted with `spec`, joined by slashes."""
    return "/".join(spec.format(r[key]) for r in runs)


def format_table(results: list[dict]) -> str:
    """One row per candidate: the mean over its seeds of each score, then each seed's (seed: linear / kNN)."""
    lines = ["| candidate | flags | seeds | val linear top-1 | val kNN top-1 | per seed: linear / kNN | steps | img/s | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    for name, runs in by_name.items():
        runs.sort(key=lambda r: r.get("seed", 0))
        mean = {key: sum(r["validation"][key] for r in runs) / len(runs) for key in ("linear_top1", "knn_top1")}
        per_seed = ", ".join(f"{r.get('seed', 0)}: {r['validation']['linear_top1']:.2f} / "
                             f"{r['validation']['knn_top1']:.2f}" for r in runs)
        lines.append(f"| {name} | `{' '.join(runs[0]['flags']) or '(preset)'}` | {len(runs)} "
                     f"| {mean['linear_top1']:.2f} | {mean['knn_top1']:.2f} | {per_seed} "
                     f"| {joined(runs, 'steps', '{}')} | {joined(runs, 'img_per_s', '{:.0f}')} "
                     f"| {joined(runs, 'wall_time_s', '{:.0f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=None, help=f"which to run (default: all, in order): "
                        f"{', '.join(CANDIDATES)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.py --seed of each run "
                        "(default: 0)")
    parser.add_argument("--out", type=Path, default=None, help="run folders and the carved data "
                        "(default: benchmarks/out/tune_default)")
    parser.add_argument("--results", type=Path, default=None, help="one JSON per finished candidate, committed "
                        "(default: benchmarks/tune_results)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: the table from --results")
    parser.add_argument("--smoke", action="store_true", help="tiny data and budget in a temporary folder (CI)")
    args = parser.parse_args(argv)

    candidates, minutes, base_flags, sizes, train_samples = CANDIDATES, MINUTES, [], Sizes(), None
    if args.smoke:
        if args.out is None or args.results is None:
            temp = Path(tempfile.mkdtemp(prefix="tune_smoke_"))
            args.out, args.results = args.out or temp / "out", args.results or temp / "results"
        candidates, minutes, sizes, train_samples = SMOKE_CANDIDATES, SMOKE_MINUTES, SMOKE_SIZES, SMOKE_TRAIN_SAMPLES
        base_flags = SMOKE_BASE_FLAGS
    unknown = sorted(set(args.candidates or ()) - set(candidates))
    if unknown:
        parser.error(f"unknown candidate(s) {', '.join(unknown)}: choose from {', '.join(candidates)}")
    args.out = args.out or ROOT / "benchmarks" / "out" / "tune_default"
    args.results = args.results or ROOT / "benchmarks" / "tune_results"
    args.results.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        args.out.mkdir(parents=True, exist_ok=True)
        data = carve_dataset(args.out / "data", train_samples, sizes)
        for name in args.candidates or candidates:
            for seed in args.seeds:
                run = result_name(name, seed)
                path = args.results / f"{run}.json"
                if path.is_file():
                    print(f"{run}: skipped (done: {path})", flush=True)
                    continue
                print(f"{run}: {' '.join(candidates[name]) or '(preset)'}, seed {seed}, {minutes:g} min", flush=True)
                result = run_candidate(name, candidates[name], seed, data, args.out,
                                       ["--time-budget", str(minutes), *base_flags])
                write_json(path, result)
                print(f"{run}: validation linear {result['validation']['linear_top1']:.2f}, "
                      f"kNN {result['validation']['knn_top1']:.2f} ({result['wall_time_s']:.0f} s)", flush=True)
    results = [json.loads(path.read_text()) for path in sorted(args.results.glob("*.json"))]
    order = list(candidates)
    results.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    print(format_table(results) if results else f"no results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
