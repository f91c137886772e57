"""hf-ibproj finetune (hf_ibproj/finetune.py, and the repository's finetune.py): linear and full fine-tuning, exact
resume, any backbone on any data, Hub push, a small-stem result that loads without hf_ibproj, and a 2-process run."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from hf_ibproj import IBProjConfig, IBProjModel, export_backbone, finetune, finetune_cli, resolve_source
from test_export import run_without_hf_ibproj

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def color_image(rgb, rng, size=32):
    """A size x size image of one dominant color, with pixel noise and a random darker square."""
    pixels = np.array(rgb, dtype=np.float32) + rng.normal(0, 25, (size, size, 3))
    top, left = rng.integers(0, size - 12, 2)
    pixels[top : top + 12, left : left + 12] *= 0.6
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def save_colors(path, sizes, image_size=32, mode="RGB"):
    rng = np.random.default_rng(0)
    names = list(COLORS)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def split(n):
        labels = [i % len(names) for i in range(n)]
        images = [color_image(COLORS[names[label]], rng, image_size).convert(mode) for label in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    datasets.DatasetDict({name: split(n) for name, n in sizes.items()}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def color_dataset(tmp_path_factory):
    """save_to_disk folder, 3 classes of noisy colored 32 px images: 150 train, 60 test."""
    return save_colors(tmp_path_factory.mktemp("colors") / "dataset", {"train": 150, "test": 60})


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory):
    """An untrained tiny small-stem ResNet exported as a timm Hub folder (what `hf-ibproj export` writes)."""
    torch.manual_seed(0)
    config = IBProjConfig(backbone="resnet18_small", backbone_kwargs={"channels": [8, 16, 32, 64]}, image_size=32)
    return export_backbone(IBProjModel(config), tmp_path_factory.mktemp("backbone") / "tiny-resnet")


def flags(backbone, dataset, out, *extra):
    return ["--model", str(backbone), "--dataset", str(dataset), "--output-dir", str(out), "--batch-size", "32",
            "--num-workers", "0", "--mixed-precision", "no", *extra]


def run(backbone, dataset, out, *extra):
    """finetune.finetune on the parsed flags: its results; bad input raises."""
    return finetune.finetune(finetune_cli.parse_args(flags(backbone, dataset, out, *extra)))


def test_linear_and_full_fine_tuning_learn_and_the_saved_model_runs_in_a_pipeline(
    color_dataset, backbone_folder, tmp_path
):
    for mode, lr, epochs in (("linear", 3e-2, 6), ("full", 3e-3, 4)):
        out = tmp_path / mode
        returned = run(backbone_folder, color_dataset, out, "--mode", mode, "--epochs", str(epochs), "--lr", str(lr))
        results = json.loads((out / "results.json").read_text())
        assert json.loads(json.dumps(returned)) == results  # what it returns is what it wrote
        assert results["eval_accuracy"] >= 90, (mode, results)
        assert results["steps"] == epochs * 5  # ceil(150 / 32) steps per epoch

        # The saved folder is a transformers image classifier: the pipeline agrees with the colors.
        classifier = pipeline("image-classification", model=str(out))
        rng = np.random.default_rng(1)
        hits = [classifier(color_image(rgb, rng), top_k=1)[0]["label"] == name
                for name, rgb in COLORS.items() for _ in range(5)]
        assert sum(hits) >= 13, (mode, hits)

        metadata = yaml.safe_load((out / "README.md").read_text().split("---")[1])
        assert "base_model" not in metadata  # it started from a local folder, which is no base_model
        assert metadata["pipeline_tag"] == "image-classification"
        kept = sorted(p.name for p in (out / "checkpoints").iterdir())  # the last 2 (--keep-checkpoints) epoch ends
        assert kept == [f"step_{(epochs - 1) * 5:08d}", f"step_{epochs * 5:08d}"], kept

    # linear mode kept the backbone exactly as exported; full mode changed it.
    exported = load_file(backbone_folder / "model.safetensors")
    for mode, same in (("linear", True), ("full", False)):
        tuned = load_file(tmp_path / mode / "model.safetensors")
        tuned = {k.removeprefix("timm_model."): v for k, v in tuned.items()}
        assert torch.equal(tuned["conv1.weight"], exported["conv1.weight"]) is same, mode
        assert torch.equal(tuned["bn1.running_mean"], exported["bn1.running_mean"]) is same, mode
    # The result is itself a source (its classifier dropped), e.g. to fine-tune or evaluate it again.
    assert torch.equal(resolve_source(tmp_path / "full").backbone.state_dict()["conv1.weight"], tuned["conv1.weight"])


def test_small_stem_result_loads_without_hf_ibproj(color_dataset, backbone_folder, tmp_path):
    """The fine-tuned resnet18_small carries its code: a process that cannot import hf_ibproj runs its pipeline
    (trust_remote_code=True) with the scores of this process's pipeline, which uses hf_ibproj's own classes."""
    out = tmp_path / "ft"
    run(backbone_folder, color_dataset, out, "--epochs", "1", "--max-samples", "30", "--eval-max-samples", "15")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ibproj_small_resnet" and "AutoModelForImageClassification" in config["auto_map"]
    code = (ROOT / "hf_ibproj" / "modeling_small_resnet.py").read_bytes()
    assert (out / "modeling_small_resnet.py").read_bytes() == code
    assert "trust_remote_code=True" in (out / "README.md").read_text()

    rng = np.random.default_rng(3)
    paths = []
    for name, rgb in COLORS.items():
        paths.append(tmp_path / f"{name}.png")
        color_image(rgb, rng).save(paths[-1])
    expected = [pipeline("image-classification", model=str(out))(str(path), top_k=3) for path in paths]
    run_without_hf_ibproj("""
        import json, sys
        from transformers import pipeline
        classifier = pipeline("image-classification", model=sys.argv[1], trust_remote_code=True)
        json.dump([classifier(path, top_k=3) for path in sys.argv[3:]], open(sys.argv[2], "w"))
    """, out, tmp_path / "scores.json", *paths, cwd=tmp_path)
    fresh = json.loads((tmp_path / "scores.json").read_text())
    for want, got in zip(expected, fresh, strict=True):
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(want, got)) <= 1e-5


def test_resume_continues_exactly_from_a_mid_epoch_checkpoint(color_dataset, backbone_folder, tmp_path):
    common = ["--mode", "full", "--epochs", "2", "--lr", "3e-3", "--max-samples", "96", "--checkpoint-every", "2",
              "--keep-checkpoints", "10"]
    straight = tmp_path / "straight"
    run(backbone_folder, color_dataset, straight, *common)
    steps = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000003", "step_00000004", "step_00000006"]  # 3 steps per epoch

    # A run interrupted after step 2 (mid-epoch): what it had written by then.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copy(straight / "finetune_args.json", interrupted)
    shutil.copytree(straight / "checkpoints" / "step_00000002", interrupted / "checkpoints" / "step_00000002")
    # Resumed with other DataLoader workers: the augmentation is seeded per sample, so nothing changes.
    run(backbone_folder, color_dataset, interrupted, *common, "--num-workers", "2", "--resume")
    expected, resumed = (load_file(folder / "model.safetensors") for folder in (straight, interrupted))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    accuracy = [json.loads((folder / "results.json").read_text())["eval_accuracy"] for folder in (straight, interrupted)]
    assert accuracy[0] == accuracy[1]


def test_output_dir_and_resume_errors(color_dataset, backbone_folder, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        run(backbone_folder, color_dataset, out, "--resume")
    run(backbone_folder, color_dataset, out, "--epochs", "1", "--max-samples", "30")
    with pytest.raises(FileExistsError, match="pass --resume"):
        run(backbone_folder, color_dataset, out, "--epochs", "1", "--max-samples", "30")
    # The command (finetune.py, hf-ibproj finetune): one line naming the problem and the fix, exit status 2.
    capsys.readouterr()
    assert finetune_cli.main(flags(backbone_folder, color_dataset, out, "--epochs", "1", "--max-samples", "30")) == 2
    assert capsys.readouterr().err == (f"hf-ibproj finetune: error: --output-dir {out} is not empty; pass --resume "
                                       "to continue the run in it or choose another --output-dir.\n")
    with pytest.raises(ValueError, match=r"--epochs \(1 -> 2\)"):
        run(backbone_folder, color_dataset, out, "--epochs", "2", "--max-samples", "30", "--resume")
    record = json.loads((out / "finetune_args.json").read_text())
    assert record["num_processes"] == 1  # this test runs one process
    (out / "finetune_args.json").write_text(json.dumps({**record, "num_processes": 2}))  # as a 2-process run
    with pytest.raises(ValueError, match=r"trained with 2 process\(es\), this launch has 1"):
        run(backbone_folder, color_dataset, out, "--epochs", "1", "--max-samples", "30", "--resume")
    for bad, message in ((["--epochs", "0"], "--epochs must be a positive integer"),
                           (["--min-crop-scale", "1.5"], "--min-crop-scale must be in"),
                           (["--push-to-hub", "not a/valid id"],
                            "--push-to-hub 'not a/valid id' is not a Hub repository id")):
        with pytest.raises(ValueError, match=message):
            run(backbone_folder, color_dataset, tmp_path / "never", *bad)
    assert not (tmp_path / "never").exists()


def test_unlabeled_dataset_is_a_clear_error(backbone_folder, tmp_path):
    unlabeled = datasets.Dataset.from_dict({"image": [Image.new("RGB", (32, 32))] * 4})
    datasets.DatasetDict({"train": unlabeled, "test": unlabeled}).save_to_disk(str(tmp_path / "unlabeled"))
    with pytest.raises(ValueError, match="the train split has no labels"):
        run(backbone_folder, tmp_path / "unlabeled", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_docstring_example_stock_timm_backbone_at_224_px_on_32_px_data(color_dataset, tmp_path, monkeypatch):
    """`finetune.py --model timm/resnet18.a1_in1k` on 32 px data, the repository served by the fake Hub (offline)."""
    from huggingface_hub import HfApi

    from test_sources import fake_hub_session

    torch.manual_seed(0)
    stock = tmp_path / "resnet18.a1_in1k"  # what the Hub repository holds: timm's own save_for_hf folder
    timm.models.save_for_hf(timm.create_model("resnet18.a1_in1k", pretrained=False), stock, safe_serialization=True)
    out = tmp_path / "ft"
    with fake_hub_session(monkeypatch, tmp_path / "cache"):
        HfApi().create_repo("timm/resnet18.a1_in1k")
        HfApi().upload_folder(repo_id="timm/resnet18.a1_in1k", folder_path=stock)
        run("timm/resnet18.a1_in1k", color_dataset, out, "--epochs", "1", "--max-samples", "24",
            "--eval-max-samples", "12", "--batch-size", "12")
    results = json.loads((out / "results.json").read_text())
    # The backbone's own preprocessing (resnet18.a1_in1k: 224 px, bicubic, crop_pct 0.95, ImageNet mean/std).
    assert results["data_config"]["input_size"] == [3, 224, 224] and results["base_model"] == "timm/resnet18.a1_in1k"
    assert results["data_config"]["crop_pct"] == 0.95 and results["data_config"]["interpolation"] == "bicubic"
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 224, 224]
    metadata = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert metadata["base_model"] == "timm/resnet18.a1_in1k"
    prediction = pipeline("image-classification", model=str(out))(color_image(COLORS["red"], np.random.default_rng(2)))
    assert {p["label"] for p in prediction} == set(COLORS)


def test_push_to_hub_names_the_hub_id_it_started_from_as_base_model(backbone_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hf_ibproj.hub import push_to_hub
    from test_sources import fake_hub_session

    gray = save_colors(tmp_path / "gray28", {"train": 30, "test": 15}, image_size=28, mode="L")  # unlike the backbone
    with fake_hub_session(monkeypatch, tmp_path / "cache") as hub:
        push_to_hub(backbone_folder, "tester/tiny-backbone")
        run("tester/tiny-backbone", gray, tmp_path / "ft", "--epochs", "1", "--push-to-hub", "tester/tiny-classifier")
        uploaded = hub.files("tester/tiny-classifier")
    assert {"config.json", "model.safetensors", "README.md", "results.json"} <= set(uploaded)
    assert not any(name.startswith("checkpoints/") for name in uploaded)
    metadata = yaml.safe_load(uploaded["README.md"].decode().split("---")[1])
    assert metadata["base_model"] == "tester/tiny-backbone"
    assert uploaded["model.safetensors"] == (tmp_path / "ft" / "model.safetensors").read_bytes()
    results = json.loads(uploaded["results.json"])
    assert results["data_config"]["input_size"] == [3, 32, 32]  # gray 28 px data brought to the RGB 32 px backbone

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match="needs a Hugging Face token"):
        run(backbone_folder, gray, tmp_path / "never", "--push-to-hub", "tester/x")


def test_help_shows_one_flag_style_with_defaults(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        finetune_cli.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    # The repository's finetune.py is the same command.
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "finetune.py"), run_name="__main__")
    assert exit_info.value.code == 0 and " ".join(capsys.readouterr().out.split()) == shown
    for flag in ("--model", "--train-split", "--eval-split", "--image-column", "--label-column", "--max-samples",
                 "--eval-max-samples", "--image-size", "--batch-size", "--seed", "--output-dir", "--num-workers",
                 "--mixed-precision {auto,no,bf16,fp16}", "--resume", "--no-resume", "--push-to-hub",
                 "--hub-private", "--no-hub-private", "--mode {linear,full}"):
        assert flag in shown, flag
    assert "--test-split" not in shown and "--backbone" not in shown and "--train_split" not in shown
    assert "(default: linear)" in shown and "(default: 128)" in shown


def test_two_process_gloo_run_completes(color_dataset, backbone_folder, tmp_path, free_port):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port)]
    command = [*launcher, "-m", "hf_ibproj.finetune", "--model", str(backbone_folder), "--dataset",
               str(color_dataset), "--mode", "linear", "--output-dir", str(out), "--epochs", "1", "--batch-size", "16",
               "--num-workers", "0", "--mixed-precision", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2  # one gloo process group, not two independent runs
    assert results["steps"] == 5  # ceil(150 / (2 processes x 16)) steps per process
    assert result.stdout.count("accuracy (test)") == 1  # printed by the main process only
