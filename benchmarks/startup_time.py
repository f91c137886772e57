"""How long a newcomer waits for the first line: start-up of the commands against `python -c "import torch"`.

    python benchmarks/startup_time.py              # ~1 min on 2 CPU cores
    python benchmarks/startup_time.py --rounds 9

Each command runs in a fresh process, ROUNDS times, interleaved with the reference (so a noisy neighbour hits every
command alike); prints the median wall time of each and its ratio to the reference's median. Targets: `hf-ibproj
--help` and `python train.py --help` within 1.5x, `import hf_ibproj` within 2x. Also lists the heavy libraries each
command imported (none of datasets, pyarrow, timm, accelerate is needed to print help).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("datasets", "pyarrow", "timm", "accelerate", "torchvision", "transformers.modeling_utils")
REFERENCE = "import torch"
COMMANDS = {
    REFERENCE: ["-c", "import torch"],
    "import hf_ibproj": ["-c", "import hf_ibproj"],
    "hf-ibproj --help": ["-m", "hf_ibproj.cli", "--help"],
    "train.py --help": [str(ROOT / "train.py"), "--help"],
    "train.py --no-such-flag": [str(ROOT / "train.py"), "--no-such-flag"],
}
TARGETS = {"import hf_ibproj": 2.0, "hf-ibproj --help": 1.5, "train.py --help": 1.5}


def wall_time(arguments: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, check=False)
    return time.perf_counter() - start


def heavy_imports(arguments: list[str]) -> list[str]:
    """The HEAVY modules a command imported, read from `python -X importtime`."""
    result = subprocess.run([sys.executable, "-X", "importtime", *arguments], cwd=ROOT, capture_output=True, text=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    return [name for name in HEAVY if name in imported]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    for arguments in COMMANDS.values():
        wall_time(arguments)  # warm the file cache once
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, arguments in COMMANDS.items():
            times[name].append(wall_time(arguments))
    reference = statistics.median(times[REFERENCE])
    rows = []
    print(f"{'command':<26} {'median s':>8} {'x torch':>8} {'target':>7}  heavy imports")
    for name, arguments in COMMANDS.items():
        median = statistics.median(times[name])
        heavy = heavy_imports(arguments)
        target = TARGETS.get(name)
        rows.append({"command": name, "median_s": median, "ratio": median / reference, "target": target,
                     "heavy_imports": heavy})
        print(f"{name:<26} {median:8.2f} {median / reference:8.2f} {target or '':>7}  {', '.join(heavy) or '-'}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
