"""hf_ibproj.sources: every kind of model reference resolves to the same weights and preprocessing, or a clear error."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from huggingface_hub import ModelCard, ModelCardData
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

import hf_ibproj.backbones  # noqa: F401  (registers the small-image ResNets with timm)
from hf_ibproj import IBProjConfig, IBProjModel
from hf_ibproj.sources import SourceError, load_source, resolve_source

TINY = {"in_chans": 1, "channels": [8, 16, 32, 64]}
MEAN, STD = 0.3, 0.2


@pytest.fixture(scope="module")
def trained_model():
    torch.manual_seed(0)
    config = IBProjConfig(backbone="resnet18_small", backbone_kwargs=TINY, image_size=12, image_mean=[MEAN],
                          image_std=[STD], interpolation="bilinear")
    model = IBProjModel(config)
    with torch.no_grad():  # make the weights unlike any fresh initialization
        for parameter in model.backbone.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def features(backbone, images, mean=MEAN, std=STD):
    """A plain forward of the normalized images (the reference every route must reproduce)."""
    with torch.no_grad():
        return backbone.eval()((images.float() / 255 - mean) / std)


def write_run(model, run, final_eval=True):
    model.save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"dataset": "fashion_mnist", "epochs": 3}))
    (run / "run_info.json").write_text(json.dumps({"wall_time_s": 60}))
    if final_eval:
        (run / "final_eval.json").write_text(json.dumps({"linear_top1": 80.0}))
    (run / "information_plane.png").write_bytes(b"png")
    return run


def write_checkpoint(model, folder):
    """What train.py writes: accelerate's save_state folder plus the model's config.json."""
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(model)
    accelerator.save_state(str(folder))
    model.config.save_pretrained(folder)
    return folder


def test_run_model_checkpoint_and_timm_folders_give_the_same_backbone(trained_model, images, tmp_path):
    run = write_run(trained_model, tmp_path / "run")
    write_checkpoint(trained_model, run / "checkpoints" / "step_00000007")
    timm.models.save_for_hf(trained_model.backbone, tmp_path / "timm", safe_serialization=True,
                            data_config={"input_size": (1, 12, 12), "mean": (MEAN,), "std": (STD,),
                                         "interpolation": "bilinear", "crop_pct": 1.0})
    # finetune.py's output: a TimmWrapper image classifier saved by transformers ("timm_model."-prefixed keys)
    wrapper_config = TimmWrapperConfig(architecture="resnet18_small", model_args=TINY, num_labels=3)
    wrapper_config.pretrained_cfg = {"input_size": [1, 12, 12], "mean": [MEAN], "std": [STD],
                                     "interpolation": "bilinear", "crop_pct": 1.0}
    wrapper = TimmWrapperForImageClassification(wrapper_config)
    wrapper.timm_model.load_state_dict(trained_model.backbone.state_dict(), strict=False)
    wrapper.save_pretrained(tmp_path / "classifier")

    expected = features(trained_model.backbone, images)
    routes = {
        str(run): "run", str(run / "model"): "model", str(run / "checkpoints" / "step_00000007"): "checkpoint",
        str(tmp_path / "timm"): "timm folder", f"local-dir:{tmp_path / 'classifier'}": "timm folder",
    }
    for reference, kind in routes.items():
        source = resolve_source(reference)
        assert source.kind == kind, reference
        config = source.data_config()
        assert config["input_size"] == (1, 12, 12) and config["interpolation"] == "bilinear", reference
        assert tuple(config["mean"]) == pytest.approx((MEAN,)) and tuple(config["std"]) == pytest.approx((STD,))
        assert config["crop_pct"] == 1.0
        torch.testing.assert_close(features(source.backbone, images), expected, rtol=1e-4, atol=1e-4,
                                   msg=reference)
        assert source.base_model is None  # local folders without a card naming one

    # Run records: the final model carries all of them, a checkpoint only those describing its run so far.
    full, checkpoint, bare = (resolve_source(r) for r in (run, run / "checkpoints" / "step_00000007", run / "model"))
    assert (full.run_dir, full.model_dir) == (run, run / "model")
    assert full.train_config == {"dataset": "fashion_mnist", "epochs": 3} and full.run_info == {"wall_time_s": 60}
    assert full.final_eval == {"linear_top1": 80.0} and full.plot == run / "information_plane.png"
    assert checkpoint.run_dir == run and checkpoint.train_config == full.train_config
    assert checkpoint.final_eval == {} and checkpoint.plot is None
    assert isinstance(checkpoint.model, IBProjModel)
    assert bare.run_dir is None and bare.train_config == {} and bare.plot is None
    # export needs an IBProjModel: a timm folder is refused with the kinds it accepts
    assert load_source(run).model is not None
    with pytest.raises(SourceError, match="no IBProjModel"):
        load_source(tmp_path / "timm")


def test_an_instance_resolves_without_files(trained_model, images):
    source = resolve_source(trained_model)
    assert source.model is trained_model and source.kind == "model" and source.model_dir is None
    assert source.data_config()["input_size"] == (1, 12, 12)
    torch.testing.assert_close(features(source.backbone, images), features(trained_model.backbone, images))


def test_random_init_is_the_same_architecture_with_fresh_seeded_weights(trained_model, tmp_path):
    write_run(trained_model, tmp_path / "run")
    trained = trained_model.backbone.state_dict()
    fresh = resolve_source(tmp_path / "run", random_init=True)
    again = resolve_source(tmp_path / "run", random_init=True)
    other_seed = resolve_source(tmp_path / "run", random_init=True, seed=1)
    assert fresh.model is None and fresh.train_config == {} and fresh.data_config()["input_size"] == (1, 12, 12)
    assert {k: v.shape for k, v in fresh.backbone.state_dict().items()} == {k: v.shape for k, v in trained.items()}
    assert not torch.equal(fresh.backbone.conv1.weight, trained["conv1.weight"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.backbone.state_dict().values(),
                                                 again.backbone.state_dict().values()))
    assert not torch.equal(fresh.backbone.conv1.weight, other_seed.backbone.conv1.weight)
    state = torch.random.get_rng_state()
    resolve_source(tmp_path / "run", random_init=True)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random state is untouched


def test_timm_name_and_the_image_size_override():
    source = resolve_source("resnet18_small", random_init=True)
    assert source.kind == "timm name" and source.backbone.num_classes == 0 and source.backbone.num_features == 512
    assert source.data_config() == {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3,
                                    "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "center"}
    assert source.data_config(image_size=48)["input_size"] == (3, 48, 48)
    with pytest.raises(SourceError, match="no pretrained weights"):
        resolve_source("resnet18_small")
    # A backbone with a fixed input size (position embeddings) refuses another size, naming the flag.
    vit = resolve_source("vit_tiny_patch16_224", random_init=True)
    assert vit.data_config()["input_size"] == (3, 224, 224) and vit.data_config()["crop_pct"] == 0.9
    with pytest.raises(SourceError, match="requires .224, 224.*--image-size"):
        vit.data_config(image_size=32)


def test_base_model_comes_from_a_local_card_never_from_a_path(trained_model, tmp_path):
    folder = tmp_path / "export"
    timm.models.save_for_hf(trained_model.backbone, folder, safe_serialization=True)
    assert resolve_source(folder).base_model is None
    ModelCard.from_template(ModelCardData(base_model="someone/pretrained-backbone")).save(folder / "README.md")
    assert resolve_source(folder).base_model == "someone/pretrained-backbone"
    assert resolve_source(folder, random_init=True).base_model is None


def test_errors_name_what_was_expected(tmp_path, monkeypatch, trained_model):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(SourceError, match="could not be fetched"):
        resolve_source("nobody/no-such-backbone")
    assert time.monotonic() - start < 10
    with pytest.raises(SourceError, match="does not resolve"):
        resolve_source("not_a_timm_model_or_folder")
    with pytest.raises(SourceError, match="does not resolve"):
        resolve_source(str(tmp_path / "missing-run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no model: no IBProjModel"):
        resolve_source(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SourceError, match="neither an IBProjModel"):
        resolve_source(tmp_path / "other")
    trained_model.config.save_pretrained(tmp_path / "no_weights")
    with pytest.raises(SourceError, match="no model.safetensors"):
        resolve_source(tmp_path / "no_weights")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SourceError, match="is a file"):
        resolve_source(tmp_path / "file.txt")
    # A run still training: no model/ yet, only checkpoints. The error names the latest one and how to finish.
    unfinished = tmp_path / "unfinished"
    for step in (3, 12):
        write_checkpoint(trained_model, unfinished / "checkpoints" / f"step_{step:08d}")
    with pytest.raises(SourceError, match=r"no final model.*step_00000012.*--resume"):
        resolve_source(unfinished)


@contextlib.contextmanager
def fake_hub_session(monkeypatch, cache_dir):
    """tests/hub_server.py's FakeHub, with huggingface_hub pointed at it, an empty cache and a token."""
    from huggingface_hub import constants

    from hub_server import FakeHub

    with FakeHub() as hub:
        for name, value in (("ENDPOINT", hub.endpoint), ("HF_HUB_DISABLE_XET", True), ("HF_HUB_OFFLINE", False),
                            ("HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
                            ("HF_HUB_CACHE", str(cache_dir))):
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        yield hub


def test_hub_ids_resolve_through_the_hub_with_their_id_as_base_model(trained_model, images, tmp_path, monkeypatch):
    from hf_ibproj.export import export_backbone
    from hf_ibproj.hub import push_to_hub

    export_backbone(trained_model, tmp_path / "backbone")
    with fake_hub_session(monkeypatch, tmp_path / "cache") as hub:
        push_to_hub(tmp_path / "backbone", "tester/tiny-backbone")
        for reference in ("tester/tiny-backbone", "hf-hub:tester/tiny-backbone"):
            source = resolve_source(reference)
            assert source.kind == "hub" and source.base_model == "tester/tiny-backbone"
            assert source.data_config()["input_size"] == (1, 12, 12)
            torch.testing.assert_close(features(source.backbone, images), features(trained_model.backbone, images),
                                       rtol=1e-4, atol=1e-4)
        assert any("/resolve/" in request.path for request in hub.requests)  # really downloaded
        assert resolve_source("tester/tiny-backbone", random_init=True).base_model is None
