"""Backbone export: the folder timm / transformers load WITHOUT hf_ibproj, its config and its model card.

References are independent of hf_ibproj's export code: the trained IBProjModel's own encoder features, timm's own
state-dict keys, and loaders run in a fresh Python process that never imports hf_ibproj.
"""

from __future__ import annotations

import json
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

FINAL_EVAL = {"linear_top1": 88.7, "knn_top1": 82.9, "dataset": "fashion_mnist"}
TRAIN_CONFIG = {"dataset": "fashion_mnist", "eval_split": "test", "epochs": 3, "batch_size": 64, "lr": 0.3,
                "optimizer": "lars"}
RUN_INFO = {"hardware": "2 CPU cores", "wall_time_s": 90.0, "seed": 0}
PLOT_BYTES = b"\x89PNG\r\n\x1a\n fake plot bytes"


def make_model(backbone: str, in_chans: int, image_size: int, **backbone_kwargs) -> IBProjModel:
    """A tiny IBProjModel whose weights are perturbed away from the init, so BatchNorm stats and weights matter."""
    config = IBProjConfig(
        backbone=backbone, backbone_kwargs={"in_chans": in_chans, **backbone_kwargs}, image_size=image_size,
        projector_hidden_dims=[32], projector_out_dim=16, mi_weight=1e-4,
        image_mean=[0.4 + 0.05 * c for c in range(in_chans)], image_std=[0.2 + 0.05 * c for c in range(in_chans)],
    )
    torch.manual_seed(0)
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


_FRESH_LOADERS = textwrap.dedent("""
    import sys
    import timm, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
    folder, x_file, image_file, out_file = sys.argv[1:]
    x = torch.load(x_file)
    image = Image.open(image_file)
    out = {}
    with torch.no_grad():
        out["timm"] = timm.create_model("local-dir:" + folder, pretrained=True).eval()(x)
        out["auto_model"] = AutoModel.from_pretrained(folder).eval()(x).pooler_output
        classifier = AutoModelForImageClassification.from_pretrained(folder, num_labels=7).eval()
        out["classifier_logits_shape"] = torch.tensor(classifier(x).logits.shape)
        out["classifier_features"] = classifier.timm_model.forward_head(
            classifier.timm_model.forward_features(x), pre_logits=True)
        out["processed"] = AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]
        out["pipeline"] = pipeline("image-feature-extraction", model=folder)(image, pool=True, return_tensors=True)
    assert "hf_ibproj" not in sys.modules, "the fresh process imported hf_ibproj"
    torch.save(out, out_file)
""")


def _reference_preprocess(image: Image.Image, model: IBProjModel) -> torch.Tensor:
    """What the exported preprocessing must do for a same-size image: scale to [0, 1], then per-channel mean/std."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    array = array.permute(2, 0, 1) if array.dim() == 3 else array[None]
    mean = torch.tensor(model.config.image_mean)[:, None, None]
    std = torch.tensor(model.config.image_std)[:, None, None]
    return ((array - mean) / std)[None]


def test_stock_backbone_loads_in_fresh_process_without_hf_ibproj(stock, tmp_path):
    model, run = stock
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.save(x, tmp_path / "x.pt")
    image.save(tmp_path / "image.png")
    script = tmp_path / "load.py"
    script.write_text(_FRESH_LOADERS)
    subprocess.run([sys.executable, str(script), str(run / "backbone"), str(tmp_path / "x.pt"),
                    str(tmp_path / "image.png"), str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")

    expected = features(model, x)
    for name in ("timm", "auto_model", "classifier_features"):
        assert (out[name] - expected).abs().max() <= 1e-6, name
    assert out["classifier_logits_shape"].tolist() == [3, 7]
    processed = _reference_preprocess(image, model)
    assert torch.allclose(out["processed"], processed, atol=1e-6)
    assert (out["pipeline"] - features(model, processed)).abs().max() <= 1e-6


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
    assert "import hf_ibproj" in (folder / "README.md").read_text()


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


def test_card_metadata_and_training_summary(stock, small):
    card = ModelCard.load(stock[1] / "backbone" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "timm"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["fashion_mnist"]
    assert {"self-supervised", "simclr", "mi-regularization"} <= set(data["tags"])
    metrics = {m["name"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"Linear probe top-1 accuracy": 88.7, "kNN top-1 accuracy": 82.9}
    text = card.text
    for row in ("| Epochs | 3 |", "| Batch size | 64 |", "| Learning rate | 0.3 |", "| Hardware | 2 CPU cores |",
                "| Wall time | 1.5 min |", "| Backbone | resnet18 (in_chans=3) |", "88.70%", "82.90%"):
        assert row in text, row
    assert "arXiv" in text and "2503.00507" in text and "Projection Head is Secretly an Information Bottleneck" in text
    assert "Ouyang, Zhuo and Hu, Kaiwen and Zhang, Qi and Wang, Yifei and Wang, Yisen" in text
    assert "![" in text and (stock[1] / "backbone" / "information_plane.png").read_bytes() == PLOT_BYTES
    assert "import hf_ibproj" not in text  # stock timm architecture: no import needed

    # Exported from a bare instance: no run records, so no metrics, dataset, plot or run rows.
    small_card = ModelCard.load(small[1] / "README.md")
    assert "model-index" not in small_card.data.to_dict() and "datasets" not in small_card.data.to_dict()
    assert "Epochs" not in small_card.text and not (small[1] / "information_plane.png").exists()


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
