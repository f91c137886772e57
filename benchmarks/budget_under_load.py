"""Does the time budget hold when the machine is busy? The default job twice, quiet and with a busy first minute.

    python benchmarks/budget_under_load.py                  # ~21 min on 2 CPU cores: 2 x the 10-minute default job
    python benchmarks/budget_under_load.py --minutes 2      # shorter budgets

One after the other, on one machine: `python train.py --time-budget MINUTES` (the preset configs/fashion_mnist_cpu.yaml)
(a) on a quiet machine and (b) with BUSY_PROCESSES busy loops (one per core) sharing the CPU for its first
BUSY_SECONDS, as a laptop whose user does something else for a minute. Prints each run's wall time from process start
to exit against its budget, steps, training img/s and its own final evaluation; writes OUT/budget_under_load.json.
Resumable: a finished side (OUT/SIDE.json) is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from peer_accuracy import machine, read_train_py_records, timed_train_py

from hf_ibproj.runs import write_json

ROOT = Path(__file__).resolve().parent.parent
BUSY_PROCESSES, BUSY_SECONDS = 2, 40


def busy_loops(count: int, seconds: float) -> list[subprocess.Popen]:
    """`count` processes that spin on a core for `seconds` each."""
    spin = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]


def run_side(side: str, minutes: float, out: Path) -> dict:
    run_dir = out / side
    if run_dir.exists():  # an unfinished timed run cannot be continued without distorting its wall time
        shutil.rmtree(run_dir)
    loops = busy_loops(BUSY_PROCESSES, BUSY_SECONDS) if side == "busy_start" else []
    command, wall_time = timed_train_py(["--output-dir", str(run_dir), "--time-budget", str(minutes)],
                                        out / f"{side}.log")
    for loop in loops:
        loop.wait()
    records = read_train_py_records(run_dir, wall_time)
    return {"command": command, "busy": f"{len(loops)} busy loops for the first {BUSY_SECONDS} s" if loops else None,
            "budget_s": minutes * 60, "share_of_budget": round(wall_time / (minutes * 60), 3), **records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="the time budget of each run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "budget_under_load")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for side in ("quiet", "busy_start"):
        path = args.out / f"{side}.json"
        if not path.is_file():
            print(f"{side}: the default job with a {args.minutes:g}-minute budget", flush=True)
            write_json(path, run_side(side, args.minutes, args.out))
        results[side] = json.loads(path.read_text())
    print(f"\n{'run':<12} {'wall s':>8} {'of budget':>10} {'steps':>7} {'img/s':>7} {'linear':>7} {'kNN':>7}")
    for side, result in results.items():
        own = result["own_evaluation"]
        print(f"{side:<12} {result['wall_time_s']:>8.1f} {100 * result['share_of_budget']:>9.1f}% {result['steps']:>7} "
              f"{result['img_per_s']:>7.0f} {own['linear_top1']:>7.2f} {own['knn_top1']:>7.2f}")
    write_json(args.out / "budget_under_load.json", {"machine": machine(), "minutes": args.minutes, **results})
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
