"""A newcomer's first commands: every entry point's --help exits 0 and lists every flag (fresh processes)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from hf_ibproj.arguments import flag_name
from hf_ibproj.evaluate_cli import EvaluateArguments
from hf_ibproj.finetune import FinetuneArguments
from hf_ibproj.hub_cli import PushArguments
from hf_ibproj.train_config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "hf_ibproj.cli"]


@pytest.mark.parametrize("command, arguments", [
    ([sys.executable, str(REPO / "train.py")], TrainConfig),
    ([sys.executable, str(REPO / "finetune.py")], FinetuneArguments),
    ([*CLI, "finetune"], FinetuneArguments),
    ([*CLI, "evaluate"], EvaluateArguments),
    ([*CLI, "push"], PushArguments),
    ([*CLI, "export"], None),
    (CLI, None),
])
def test_help_exits_0_and_lists_every_flag(command, arguments):
    result = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
    if arguments is not None:
        missing = [flag_name(f.name) for f in dataclasses.fields(arguments) if flag_name(f.name) not in result.stdout]
        assert not missing, missing
    if command == CLI:
        assert all(name in result.stdout for name in ("export", "push", "evaluate", "finetune"))
