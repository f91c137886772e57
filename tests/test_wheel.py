"""The wheel works: built from the repository, installed non-editable into a fresh venv, used outside the checkout.

The venv reuses the installed dependencies (a .pth line pointing at this interpreter's site-packages, so nothing is
downloaded), and gets the wheel itself with `pip install --no-deps`. Every command then runs from a temporary
folder outside the repository, with no PYTHONPATH, and must import hf_ibproj from the venv: the console script's
`export` (through its entry point), `push` (to the local fake Hub), `evaluate` and `finetune`, and train.py's preset
lookup. References are the repository's own files (templates, presets, code) and the pushed/exported folders' contents.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hub_server import FakeHub
from test_export import make_model, make_run_folder

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TOKEN = "hf_wheel_test_token"


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin folder) with the wheel built from a copy of the repository's package files."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("hf_ibproj", "model_cards", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
          str(root / "dist"), str(source)], cwd=root, env=env)
    (wheel,) = (root / "dist").glob("hf_ibproj-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root, env=env).strip())
    (site / "_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the checkout's editable install is visible through the .pth; it is neither used nor touched
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--ignore-installed", str(wheel)], cwd=root, env=env)
    return python, venv / "bin", wheel, env


def test_wheel_ships_templates_and_presets_as_package_data(installed):
    _, _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"hf_ibproj/model_cards/{p.name}" for p in (REPO / "model_cards").glob("*.md")}
    expected |= {f"hf_ibproj/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert expected <= names and {"hf_ibproj/modeling_small_resnet.py", "hf_ibproj/finetune.py"} <= names
    assert not any(name.startswith(("model_cards/", "configs/", "tests/")) for name in names)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="the evaluate step reads the local Fashion-MNIST copy")
def test_installed_cli_exports_pushes_evaluates_and_finetunes_outside_the_repository(installed, tmp_path):
    python, bin_dir, _, env = installed
    env = {**env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}  # no network, no shared cache
    work = tmp_path / "elsewhere"
    work.mkdir()

    # One process (imports cost seconds here) checks that the package, its templates and train.py's presets come
    # from the venv, then runs `export` through the console script's own entry point (push and evaluate below run
    # the installed hf-ibproj script itself).
    run = make_run_folder(tmp_path, make_model("resnet18_small", 1, 28, channels=(4, 8, 8, 16)))
    paths = json.loads(_run([str(python), "-c", (
        "import json, hf_ibproj, hf_ibproj.resources as r, hf_ibproj.train_config as t\n"
        "from hf_ibproj.cli import main\n"
        f"assert main(['export', {str(run)!r}, 'exported']) == 0\n"
        "print(json.dumps({'package': hf_ibproj.__file__, 'templates': str(r.TEMPLATE_DIR), "
        "'preset': str(t.DEFAULT_PRESET), 'presets': sorted(p.name for p in t.CONFIG_DIR.glob('*.yaml'))}))"
    )], cwd=work, env=env).splitlines()[-1])
    venv = python.parent.parent
    for key in ("package", "templates", "preset"):
        assert Path(paths[key]).is_relative_to(venv), (key, paths[key])
    assert Path(paths["preset"]).read_bytes() == (REPO / "configs" / Path(paths["preset"]).name).read_bytes()
    assert paths["presets"] == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))

    exported = work / "exported"
    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "timm" and "## Usage" in card.text and "trust_remote_code=True" in card.text
    assert (exported / "modeling_small_resnet.py").is_file()

    with FakeHub() as hub:
        hub_env = {**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
                   "HF_HUB_OFFLINE": "0"}
        _run([str(bin_dir / "hf-ibproj"), "push", "exported", "--repo-id", "tester/from-wheel"], cwd=work,
             env=hub_env)
        uploaded = hub.files("tester/from-wheel")
    assert uploaded["model.safetensors"] == (exported / "model.safetensors").read_bytes()
    assert '"tester/from-wheel"' in uploaded["README.md"].decode()

    _run([str(bin_dir / "hf-ibproj"), "evaluate", "--model", "exported", "--dataset", "fashion_mnist",
          "--max-samples", "40", "--eval-max-samples", "20", "--num-workers", "0", "--output-dir", "eval"],
         cwd=work, env=env)
    results = json.loads((work / "eval" / "eval_results.json").read_text())
    assert results["dataset"] == "fashion_mnist" and results["data_config"]["input_size"] == [1, 28, 28]

    # A tiny linear fine-tuning run of the export (2 steps): the frozen backbone's weights are the export's, under a
    # new 10-class classifier, and the result carries the small stem's code (the repository's file, from the wheel).
    _run([str(bin_dir / "hf-ibproj"), "finetune", "--model", "exported", "--dataset", "fashion_mnist",
          "--max-samples", "20", "--eval-max-samples", "10", "--epochs", "1", "--batch-size", "10",
          "--num-workers", "0", "--mixed-precision", "no", "--output-dir", "ft"], cwd=work, env=env)
    results = json.loads((work / "ft" / "results.json").read_text())
    assert results["steps"] == 2 and results["data_config"]["input_size"] == [1, 28, 28]
    tuned = {k.removeprefix("timm_model."): v for k, v in load_file(work / "ft" / "model.safetensors").items()}
    backbone = load_file(exported / "model.safetensors")
    assert tuned.keys() - backbone.keys() == {"fc.weight", "fc.bias"} and tuned["fc.weight"].shape == (10, 16)
    assert all(torch.equal(tuned[key], value) for key, value in backbone.items())
    code = (REPO / "hf_ibproj" / "modeling_small_resnet.py").read_bytes()
    assert (work / "ft" / "modeling_small_resnet.py").read_bytes() == code
