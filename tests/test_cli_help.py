"""A newcomer's first commands: every entry point's --help exits 0 and lists every flag (fresh processes)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from hf_ibproj.arguments import flag_name
from hf_ibproj.evaluate_cli import EvaluateArguments
from hf_ibproj.finetune_cli import FinetuneArguments
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


# Libraries a command needs only once it runs: none of them may load for --help, a bad flag or `import hf_ibproj`.
HEAVY = ("datasets", "pyarrow", "timm", "accelerate", "torchvision", "transformers.modeling_utils")
_REPORT_HEAVY = """
import runpy, sys
sys.argv = {argv!r}
try:
    {command}
except SystemExit:
    pass
print("heavy imports:", [name for name in {heavy!r} if name in sys.modules])
"""
TRAIN_PY = f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')"
CLI_MAIN = "runpy.run_module('hf_ibproj.cli', run_name='__main__')"


@pytest.mark.parametrize("command, argv", [
    ("import hf_ibproj", ["python"]),
    (CLI_MAIN, ["hf-ibproj", "--help"]),
    (CLI_MAIN, ["hf-ibproj", "evaluate", "--help"]),
    (TRAIN_PY, ["train.py", "--help"]),
    (TRAIN_PY, ["train.py", "--no-such-flag"]),
])
def test_help_and_bad_flags_do_not_load_the_model_or_data_stack(command, argv):
    script = _REPORT_HEAVY.format(argv=argv, command=command, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "heavy imports: []", result.stdout[-500:]


_REGISTERS_ON_IMPORT = """
import sys
import hf_ibproj
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "ibproj" not in CONFIG_MAPPING and "timm" not in sys.modules, "import hf_ibproj alone must stay light"
from hf_ibproj import IBProjModel, SmallResNetModel
import timm
assert CONFIG_MAPPING["ibproj"].__module__ == "hf_ibproj.configuration_ibproj"
assert CONFIG_MAPPING["ibproj_small_resnet"].__module__ == "hf_ibproj.modeling_small_resnet"
assert timm.is_model("resnet18_small")
"""


def test_importing_a_model_class_registers_it_with_transformers_and_timm():
    result = subprocess.run([sys.executable, "-c", _REGISTERS_ON_IMPORT], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


_PUBLIC_NAMES_AFTER_EVERY_SUBMODULE = """
import importlib, pkgutil, types
import hf_ibproj
for module in pkgutil.iter_modules(hf_ibproj.__path__):
    importlib.import_module(f"hf_ibproj.{module.name}")  # each sets an attribute of the package named after itself
shadowed = [name for name in hf_ibproj.__all__ if isinstance(getattr(hf_ibproj, name), types.ModuleType)]
assert not shadowed, f"a submodule shadows the public name(s) {shadowed}"
from hf_ibproj import pretrain, TrainConfig
assert callable(pretrain) and pretrain.__name__ == "pretrain"
"""


def test_public_names_are_not_shadowed_by_submodules_once_these_are_imported():
    result = subprocess.run([sys.executable, "-c", _PUBLIC_NAMES_AFTER_EVERY_SUBMODULE], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
