"""Backbone export: the folder timm / transformers load WITHOUT hf_ibproj, its config and its model card.

References are independent of hf_ibproj's export code: the trained IBProjModel's own encoder features, timm's own
state-dict keys, and loaders run in a fresh Python process where `import hf_ibproj` fails (BLOCK_HF_IBPROJ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

from hf_ibproj import IBProjConfig, IBProjModel, export_backbone
from hf_ibproj.cli import main as cli_main

# As train.py writes it: the top-1 accuracies at the top, the whole evaluation (top-5 too) under "trained".
FINAL_EVAL = {"dataset": "fashion_mnist", "eval_split": "test", "linear_top1": 88.7, "knn_top1": 82.9,
              "trained": {"linear_top1": 88.7, "linear_top5": 99.4, "knn_top1": 82.9, "knn_top5": 98.1}}
TRAIN_CONFIG = {"dataset": "fashion_mnist", "eval_split": "test", "epochs": 3, "batch_size": 64, "lr": 0.3,
                "optimizer": "lars"}
RUN_INFO = {"hardware": "2 CPU cores", "wall_time_s": 90.0, "seed": 0}
PLOT_BYTES = b"\x89PNG\r\n\x1a\n fake plot bytes"


def make_model(backbone: str, in_chans: int, image_size: int, seed: int = 0, **backbone_kwargs) -> IBProjModel:
    """A tiny IBProjModel whose weights are perturbed away from the init, so BatchNorm stats and weights matter."""
    config = IBProjConfig(
        backbone=backbone, backbone_kwargs={"in_chans": in_chans, **backbone_kwargs}, image_size=image_size,
        projector_hidden_dims=[32], projector_out_dim=16, mi_weight=1e-4,
        image_mean=[0.4 + 0.05 * c for c in range(in_chans)], image_std=[0.2 + 0.05 * c for c in range(in_chans)],
    )
    torch.manual_seed(seed)
    model = IBProjModel(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn_like(tensor))
    return model.eval()


def make_run_folder(root: Path, model: IBProjModel) -> Path:
    """The run-folder layout train.py writes (common brief), with hand-made records."""
    run = root / "run"
    model.save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump(TRAIN_CONFIG))
    (run / "run_info.json").write_text(json.dumps(RUN_INFO))
    (run / "final_eval.json").write_text(json.dumps(FINAL_EVAL))
    (run / "information_plane.png").write_bytes(PLOT_BYTES)
    return run


# Prepended to every fresh-process script: `import hf_ibproj` fails there, as on a machine that never installed it
# (a meta-path finder in front of every other one, so neither the editable install nor sys.path can provide it).
BLOCK_HF_IBPROJ = textwrap.dedent("""
    import sys

    class _BlockHfIbproj:
        def find_spec(self, name, path=None, target=None):
            if name == "hf_ibproj" or name.startswith("hf_ibproj."):
                raise ImportError(name + " is blocked: this process stands for a machine without hf_ibproj")

    sys.meta_path.insert(0, _BlockHfIbproj())
    try:
        import hf_ibproj
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let `import hf_ibproj` through")
""")


def run_without_hf_ibproj(script: str, *args: object, cwd: Path, env: dict[str, str | None] | None = None) -> None:
    """Run `script` in a fresh Python process that cannot import hf_ibproj, with its own empty HF_HOME.

    `env` adds variables to this process's environment (None removes one); by default the process is offline.
    """
    path = cwd / "fresh_script.py"
    path.write_text(BLOCK_HF_IBPROJ + textwrap.dedent(script))
    merged = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}), "HF_HOME": str(cwd / "hf_home")}
    subprocess.run([sys.executable, str(path), *map(str, args)], check=True, cwd=cwd,
                   env={key: value for key, value in merged.items() if value is not None})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def features(model: IBProjModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_image_features(x)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """Stock timm resnet18 (3 channels, 32 px) from a run folder, exported to RUN/backbone."""
    root = tmp_path_factory.mktemp("stock")
    model = make_model("resnet18", 3, 32)
    run = make_run_folder(root, model)
    export_backbone(run, run / "backbone")
    return model, run


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """hf_ibproj's small-image resnet18_small (1 channel, 28 px, tiny widths), exported from an instance."""
    model = make_model("resnet18_small", 1, 28, channels=(8, 16, 32, 64))
    out = tmp_path_factory.mktemp("small") / "backbone"
    export_backbone(model, out)
    return model, out


_FRESH_LOADERS = """
    import timm, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
    stock_folder, small_folder, inputs_file, out_file = sys.argv[1:]
    inputs = torch.load(inputs_file)
    image, gray = Image.open(inputs["image"]), Image.open(inputs["gray"])
    stock, small = {}, {}
    with torch.no_grad():
        x = inputs["x"]  # stock timm resnet18: timm and transformers load it as it is
        stock["timm"] = timm.create_model("local-dir:" + stock_folder, pretrained=True).eval()(x)
        stock["auto_model"] = AutoModel.from_pretrained(stock_folder).eval()(x).pooler_output
        classifier = AutoModelForImageClassification.from_pretrained(stock_folder, num_labels=7).eval()
        stock["classifier_logits_shape"] = torch.tensor(classifier(x).logits.shape)
        stock["classifier_features"] = classifier.timm_model.forward_head(
            classifier.timm_model.forward_features(x), pre_logits=True)
        stock["processed"] = AutoImageProcessor.from_pretrained(stock_folder)(image, return_tensors="pt")[
            "pixel_values"]
        stock["pipeline"] = pipeline("image-feature-extraction", model=stock_folder)(
            image, pool=True, return_tensors=True)

        x = inputs["small_x"]  # small-image ResNet: the folder's own code, with trust_remote_code=True only
        try:
            AutoModel.from_pretrained(small_folder, trust_remote_code=False)
        except ValueError as error:
            small["refusal"] = str(error)
        model = AutoModel.from_pretrained(small_folder, trust_remote_code=True).eval()
        small["auto_model_module"] = type(model).__module__
        small["auto_model"] = model(x).pooler_output
        classifier = AutoModelForImageClassification.from_pretrained(
            small_folder, num_labels=4, trust_remote_code=True).eval()
        small["classifier_logits_shape"] = torch.tensor(classifier(x).logits.shape)
        small["classifier_features"] = classifier.timm_model.forward_head(
            classifier.timm_model.forward_features(x), pre_logits=True)
        processor = AutoImageProcessor.from_pretrained(small_folder, trust_remote_code=True)
        small["processed"] = processor(gray, return_tensors="pt")["pixel_values"]
    torch.save({"stock": stock, "small": small}, out_file)
"""


def _reference_preprocess(image: Image.Image, model: IBProjModel) -> torch.Tensor:
    """What the exported preprocessing must do for a same-size image: scale to [0, 1], then per-channel mean/std."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    array = array.permute(2, 0, 1) if array.dim() == 3 else array[None]
    mean = torch.tensor(model.config.image_mean)[:, None, None]
    std = torch.tensor(model.config.image_std)[:, None, None]
    return ((array - mean) / std)[None]


def test_exports_load_in_a_fresh_process_without_hf_ibproj(stock, small, tmp_path):
    """Stock timm: timm, AutoModel, a new classifier head, AutoImageProcessor, pipeline. Small-image ResNet: the
    folder carries its code, which transformers runs with trust_remote_code=True and only then."""
    (stock_model, run), (small_model, small_folder) = stock, small
    torch.manual_seed(1)
    x, small_x = torch.randn(3, 3, 32, 32), torch.randn(3, 1, 28, 28)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    gray.save(tmp_path / "gray.png")
    torch.save({"x": x, "small_x": small_x, "image": str(tmp_path / "image.png"), "gray": str(tmp_path / "gray.png")},
               tmp_path / "inputs.pt")
    run_without_hf_ibproj(_FRESH_LOADERS, run / "backbone", small_folder, tmp_path / "inputs.pt",
                          tmp_path / "out.pt", cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")

    expected = features(stock_model, x)
    for name in ("timm", "auto_model", "classifier_features"):
        assert (out["stock"][name] - expected).abs().max() <= 1e-6, name
    assert out["stock"]["classifier_logits_shape"].tolist() == [3, 7]
    processed = _reference_preprocess(image, stock_model)
    assert torch.allclose(out["stock"]["processed"], processed, atol=1e-6)
    assert (out["stock"]["pipeline"] - features(stock_model, processed)).abs().max() <= 1e-6

    small_out = out["small"]
    assert "trust_remote_code=True" in small_out["refusal"]
    assert small_out["auto_model_module"].startswith("transformers_modules.")  # the folder's code, no package's
    expected = features(small_model, small_x)
    for name in ("auto_model", "classifier_features"):
        assert (small_out[name] - expected).abs().max() <= 1e-6, name
    assert small_out["classifier_logits_shape"].tolist() == [3, 4]
    assert torch.allclose(small_out["processed"], _reference_preprocess(gray, small_model), atol=1e-6)


def test_small_resnet_loads_after_import_hf_ibproj(small):
    model, folder = small
    x = torch.randn(2, 1, 28, 28)
    expected = features(model, x)
    with torch.no_grad():
        timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        auto_model = AutoModel.from_pretrained(folder).eval()
        classifier = AutoModelForImageClassification.from_pretrained(folder, num_labels=4).eval()
        assert (timm_model(x) - expected).abs().max() <= 1e-6
        assert (auto_model(x).pooler_output - expected).abs().max() <= 1e-6
        head_input = classifier.timm_model.forward_head(classifier.timm_model.forward_features(x), pre_logits=True)
        assert (head_input - expected).abs().max() <= 1e-6
        assert classifier(x).logits.shape == (2, 4)
        gray = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))
        processed = AutoImageProcessor.from_pretrained(folder)(gray, return_tensors="pt")["pixel_values"]
        assert torch.allclose(processed, _reference_preprocess(gray, model), atol=1e-6)


def test_config_describes_this_model_not_imagenet(stock, small):
    for model, folder in ((stock[0], stock[1] / "backbone"), (small[0], small[1])):
        config = json.loads((folder / "config.json").read_text())
        channels, size = model.config.backbone_kwargs["in_chans"], model.config.image_size
        assert config["architecture"] == model.config.backbone
        assert config["num_features"] == model.num_features
        assert "num_classes" not in config["model_args"]
        assert config["model_args"]["in_chans"] == channels
        cfg = config["pretrained_cfg"]
        assert cfg["input_size"] == [channels, size, size]
        assert cfg["mean"] == pytest.approx(model.config.image_mean)
        assert cfg["std"] == pytest.approx(model.config.image_std)
        assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"], cfg["num_classes"]) == (
            "bicubic", 1.0, "center", 0)
        for leftover in ("url", "hf_hub_id", "tag", "license", "paper_ids", "origin_url", "test_input_size"):
            assert leftover not in cfg
        # Bare timm keys and values: timm's own model of that architecture has exactly these keys.
        weights = load_file(folder / "model.safetensors")
        reference = timm.create_model(model.config.backbone, num_classes=0, **model.config.backbone_kwargs)
        assert set(weights) == set(reference.state_dict())
        assert all(torch.equal(weights[k], v) for k, v in model.backbone.state_dict().items())
    # The small-image ResNet is no stock architecture: its folder names its code, the stock one needs none.
    small_config = json.loads((small[1] / "config.json").read_text())
    assert small_config["model_type"] == "ibproj_small_resnet"
    assert set(small_config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert {ref.split(".")[0] for ref in small_config["auto_map"].values()} == {"modeling_small_resnet"}
    assert (small[1] / "modeling_small_resnet.py").is_file()
    stock_config = json.loads((stock[1] / "backbone" / "config.json").read_text())
    assert "auto_map" not in stock_config and "model_type" not in stock_config
    assert not list((stock[1] / "backbone").glob("*.py"))


def test_card_metadata_and_training_summary(stock, small):
    card = ModelCard.load(stock[1] / "backbone" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "timm"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["fashion_mnist"]
    assert {"self-supervised", "simclr", "mi-regularization"} <= set(data["tags"])
    # Each protocol is its own model-index task, as huggingface_hub parses the card back and writes it again.
    parsed = {(r.task_name, r.metric_name, r.metric_value, r.dataset_name, r.dataset_split)
              for r in card.data.eval_results}
    assert parsed == {
        ("Linear probe on frozen features", "Linear probe top-1 accuracy", 88.7, "fashion_mnist", "test"),
        ("Linear probe on frozen features", "Linear probe top-5 accuracy", 99.4, "fashion_mnist", "test"),
        ("kNN on frozen features", "kNN top-1 accuracy", 82.9, "fashion_mnist", "test"),
        ("kNN on frozen features", "kNN top-5 accuracy", 98.1, "fashion_mnist", "test"),
    }
    tasks = {r["task"]["name"]: [m["name"] for m in r["metrics"]] for r in data["model-index"][0]["results"]}
    assert tasks == {"Linear probe on frozen features": ["Linear probe top-1 accuracy", "Linear probe top-5 accuracy"],
                     "kNN on frozen features": ["kNN top-1 accuracy", "kNN top-5 accuracy"]}
    text = card.text
    for row in ("| Training length | 3 epochs |", "| Batch size | 64 |", "| Learning rate | 0.3 |", "| Hardware | 2 CPU cores |",
                "| Wall time | 1.5 min |", "| Backbone | resnet18 (in_chans=3) |",
                "| Linear probe | fashion_mnist (test) | 88.70% | 99.40% |", "| kNN | fashion_mnist (test) | 82.90% | 98.10% |"):
        assert row in text, row
    assert "arXiv" in text and "2503.00507" in text and "Projection Head is Secretly an Information Bottleneck" in text
    assert "Ouyang, Zhuo and Hu, Kaiwen and Zhang, Qi and Wang, Yifei and Wang, Yisen" in text
    assert "![" in text and (stock[1] / "backbone" / "information_plane.png").read_bytes() == PLOT_BYTES
    assert "hf_ibproj" not in text.split("## Usage")[1]  # stock timm architecture: loads as it is
    assert "trust_remote_code" not in text

    # Exported from a bare instance: no run records, so no metrics, dataset, plot or run rows.
    small_card = ModelCard.load(small[1] / "README.md")
    assert "model-index" not in small_card.data.to_dict() and "datasets" not in small_card.data.to_dict()
    assert "Training length" not in small_card.text and not (small[1] / "information_plane.png").exists()
    # The small stem: transformers with the carried code, timm from a stock resnet18, and no `pip install hf_ibproj`.
    usage = small_card.text.split("## Usage")[1]
    assert usage.count("trust_remote_code=True") == 2 and 'timm.create_model("resnet18", ' in usage
    assert "hf_ibproj" not in usage and "pip install hf_ibproj" not in small_card.text


def test_card_training_length_states_the_budget_plan():
    from hf_ibproj.cards import _training_length

    plan = {"time_budget_min": 10.0, "total_steps": 434, "epochs": 1.85, "img_per_s": 228.7}
    assert _training_length({"epochs": None}, {"plan": plan}) == (
        "434 steps (1.85 epochs), fixed by a 10-minute time budget at a measured 229 img/s")
    assert _training_length({"epochs": 3}, {"total_steps": 24}) == "24 steps (3 epochs)"  # a fixed-length run


def test_cli_export_and_bad_input_leave_folders_unchanged(stock, tmp_path, capsys):
    _, run = stock
    before = snapshot(run)
    assert cli_main(["export", str(run / "model"), str(tmp_path / "cli_out")]) == 0
    assert json.loads((tmp_path / "cli_out" / "config.json").read_text())["architecture"] == "resnet18"

    empty = tmp_path / "no_model"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    assert cli_main(["export", str(empty), str(tmp_path / "never")]) == 2
    assert "no IBProjModel" in capsys.readouterr().err
    assert not (tmp_path / "never").exists() and snapshot(empty) == {"notes.txt": b"not a model"}

    # A non-empty folder that is not a previous export is never overwritten.
    assert cli_main(["export", str(run), str(empty)]) == 2
    assert "not an empty folder or a previous export" in capsys.readouterr().err
    assert snapshot(empty) == {"notes.txt": b"not a model"}
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind
