"""IBProjModel / IBProjConfig: checkpoints, initialization, validation, and the backbones (stock and small-image)."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_ibproj import IBProjConfig, IBProjModel

TINY = {"backbone": "resnet18_small", "backbone_kwargs": {"channels": (8, 16, 16, 16)}}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _config_fields(model: IBProjModel) -> dict:
    fields = json.loads(model.config.to_json_string())  # as stored in config.json (tuples become lists)
    fields.pop("_name_or_path", None)
    return fields


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# ---- checkpoints ----

def test_save_and_load_reproduce_every_tensor_and_output(tmp_path):
    torch.manual_seed(0)
    cfg = IBProjConfig(
        **TINY, objective="barlow_twins", projector_hidden_dims=[12], sparse_latent_dim=20, sparse_topk=4,
        quantize_levels=5, mi_weight=0.01,
    )
    model = IBProjModel(cfg)
    # a few training steps so that BatchNorm running statistics and every weight differ from initialization
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 2, 3, 8, 8)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path)
    x = torch.randn(3, 2, 3, 8, 8)
    expected = model(x, return_diagnostics=True)
    for loaded in (IBProjModel.from_pretrained(tmp_path), transformers.AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is IBProjModel
        assert _config_fields(loaded) == _config_fields(model)
        _assert_same_tensors(_state(loaded), _state(model))
        loaded.eval()
        out = loaded(x, return_diagnostics=True)
        for field in ("loss", "ssl_loss", "mi_loss", "encoder_features", "projections"):
            assert torch.equal(out[field], expected[field]), field
        assert out.diagnostics.keys() == expected.diagnostics.keys()
        assert all(torch.equal(out.diagnostics[k], expected.diagnostics[k]) for k in expected.diagnostics)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18_small", {"channels": (8, 16, 16, 16)}),
        ("resnet18", {"in_chans": 1}),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2}),
    ],
)
def test_fresh_model_keeps_timm_initialization(name, kwargs):
    torch.manual_seed(7)
    model = IBProjModel(IBProjConfig(backbone=name, backbone_kwargs=kwargs, projector_hidden_dims=[32]))
    torch.manual_seed(7)
    reference = timm.create_model(name, num_classes=0, **kwargs)
    _assert_same_tensors(_state(model.backbone), _state(reference))
    # ... and the projector keeps torch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), non-zero bias,
    # not transformers' N(0, 0.02) weights with zero biases
    first = model.projector.mlp[0]
    bound = 1 / math.sqrt(first.in_features)
    assert first.weight.abs().max() <= bound
    assert first.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert (first.bias != 0).all()


def test_fresh_resnet_is_not_the_transformers_default_initialization():
    torch.manual_seed(0)
    backbone = IBProjModel(IBProjConfig(**TINY, projector_hidden_dims=[8])).backbone
    conv = backbone.layer2[0].conv1.weight  # kaiming normal, fan_out: std sqrt(2 / (16 * 9)) = 0.118, not 0.02
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.15)
    assert torch.equal(backbone.layer1[0].bn2.weight, torch.zeros(8))  # timm's zero_init_last, not ones
    assert torch.equal(backbone.layer1[0].bn1.weight, torch.ones(8))


def test_keys_missing_from_a_checkpoint_are_initialized(tmp_path):
    torch.manual_seed(0)
    model = IBProjModel(IBProjConfig(**TINY, objective="barlow_twins", projector_hidden_dims=[24, 24],
                                     projector_out_dim=10))
    with torch.no_grad():  # make every tensor distinguishable from any initialization
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.5)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    missing = [
        "backbone.layer2.0.conv1.weight", "backbone.bn1.weight", "backbone.bn1.running_var",
        "projector.mlp.0.weight", "projector.mlp.1.running_var",
    ]
    kept = {k: v for k, v in saved.items() if k not in missing}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded, info = IBProjModel.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set(missing)
    state = loaded.state_dict()
    for key, value in kept.items():
        assert torch.equal(state[key], value), key
    for key in missing:
        assert not state[key].is_meta and torch.isfinite(state[key]).all(), key
    conv = state["backbone.layer2.0.conv1.weight"]  # (16, 8, 3, 3): timm's kaiming normal, fan_out = 16 * 9
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.2)
    assert conv.mean().abs() < 0.05 and not torch.equal(conv, saved["backbone.layer2.0.conv1.weight"])
    assert torch.equal(state["backbone.bn1.weight"], torch.ones(8))
    assert torch.equal(state["backbone.bn1.running_var"], torch.ones(8))
    assert torch.equal(state["projector.mlp.1.running_var"], torch.ones(24))
    linear = state["projector.mlp.0.weight"]  # torch's default: U(-1/sqrt(16), 1/sqrt(16))
    assert linear.abs().max() <= 0.25 and linear.std().item() == pytest.approx(0.25 / math.sqrt(3), rel=0.2)
    loaded.eval()
    assert torch.isfinite(loaded(torch.randn(2, 2, 3, 8, 8)).loss)


def test_missing_top_level_backbone_tensor_leaves_loaded_tensors_alone(tmp_path):
    # a ViT's pos_embed lives on the backbone module itself: initializing it must not re-run timm's whole
    # init_weights (its trunc_normal_ is not guarded by transformers and would overwrite the loaded weights)
    kwargs = {"img_size": 16, "patch_size": 4, "depth": 1}
    model = IBProjModel(IBProjConfig(backbone="vit_tiny_patch16_224", backbone_kwargs=kwargs, projector_hidden_dims=[8]))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    del saved["backbone.pos_embed"]
    save_file(saved, tmp_path / "model.safetensors", metadata={"format": "pt"})
    state = IBProjModel.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert state["backbone.pos_embed"].std().item() == pytest.approx(0.02, rel=0.3)  # timm's trunc_normal(0.02)


# ---- configuration validation ----

@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"objective": "byol"}, "objective", "simclr, barlow_twins"),
        ({"backbone": "resnet_does_not_exist"}, "backbone", "timm"),
        ({"quantize_levels": 1}, "quantize_levels", ">= 2"),
        ({"quantize_levels": -4}, "quantize_levels", ">= 2"),
        ({"sparse_latent_dim": 64, "sparse_topk": 0}, "sparse_topk", "[1, sparse_latent_dim=64]"),
        ({"sparse_latent_dim": 64, "sparse_topk": 65}, "sparse_topk", "[1, sparse_latent_dim=64]"),
        ({"mi_alpha": 0.0}, "mi_alpha", "> 0"),
        ({"mi_alpha": -2.0}, "mi_alpha", "> 0"),
        ({"nt_xent_tau": 0.0}, "nt_xent_tau", "> 0"),
        ({"mi_weight": -1e-4}, "mi_weight", ">= 0"),
        ({"barlow_lambda": -0.1}, "barlow_lambda", ">= 0"),
        ({"num_views": 1}, "num_views", ">= 2"),
    ],
)
def test_invalid_configuration_fails_at_construction(kwargs, field, allowed):
    with pytest.raises(ValueError) as error:
        IBProjConfig(**kwargs)
    message = str(error.value)
    assert field in message and allowed in message and repr(kwargs[field]) in message


def test_valid_edge_configurations_are_accepted():
    assert IBProjConfig(quantize_levels=2).quantize_levels == 2
    assert IBProjConfig(sparse_latent_dim=64, sparse_topk=64).sparse_topk == 64
    assert IBProjConfig(backbone="resnet50_small").backbone == "resnet50_small"


def test_forward_with_a_single_view_fails():
    model = IBProjModel(IBProjConfig(**TINY, projector_hidden_dims=[8]))
    with pytest.raises(ValueError, match="views"):
        model(torch.randn(2, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="views"):
        model([torch.randn(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="views"):
        model(torch.randn(2, 3, 8, 8))


# ---- backbones ----

@pytest.mark.parametrize(
    "name, in_chans, channels, expansion",
    [
        ("resnet18_small", 1, (8, 16, 24, 32), 1),
        ("resnet18_small", 3, (6, 8, 10, 12), 1),
        ("resnet34_small", 3, (4, 8, 8, 12), 1),
        ("resnet50_small", 2, (4, 8, 8, 16), 4),
    ],
)
def test_small_image_resnets(name, in_chans, channels, expansion):
    model = timm.create_model(name, num_classes=0, in_chans=in_chans, channels=channels)
    stem = model.conv1
    assert isinstance(stem, torch.nn.Conv2d)
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.padding == (1, 1)
    assert stem.in_channels == in_chans and stem.out_channels == channels[0]
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.num_features == channels[-1] * expansion
    features = model.forward_features(torch.randn(2, in_chans, 32, 32))
    assert features.shape == (2, channels[-1] * expansion, 4, 4)
    for stage, width in zip((model.layer1, model.layer2, model.layer3, model.layer4), channels):
        assert stage[-1].conv1.in_channels == width * expansion  # every stage has its configured width
    assert model(torch.randn(2, in_chans, 32, 32)).shape == (2, channels[-1] * expansion)


def test_small_resnet18_default_width_is_the_paper_backbone():
    model = timm.create_model("resnet18_small", num_classes=0)
    assert model.num_features == 512 and model.conv1.out_channels == 64
    # the CIFAR ResNet-18: 11.17M parameters without the classifier
    assert sum(p.numel() for p in model.parameters()) == 11_168_832


@pytest.mark.parametrize(
    "name, kwargs, num_features",
    [
        ("resnet18", {"in_chans": 1}, 512),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "in_chans": 1, "depth": 2}, 192),
    ],
)
def test_stock_timm_backbones_train_through_the_model(name, kwargs, num_features):
    model = IBProjModel(IBProjConfig(backbone=name, backbone_kwargs=kwargs, projector_hidden_dims=[16],
                                     projector_out_dim=8, mi_weight=1e-2))
    out = model(torch.randn(2, 2, 1, 32, 32))
    assert out.encoder_features.shape == (4, num_features) and out.projections.shape == (4, 8)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.get_image_features(torch.randn(3, 1, 32, 32)).shape == (3, num_features)
