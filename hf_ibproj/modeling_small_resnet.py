"""The small-image ResNets of docs/method.md section 6 (3x3 stride-1 stem, no max-pool) for timm and transformers.

No stock timm architecture with JSON model_args expresses this stem, so this file travels with every exported
small-ResNet backbone (and every saved IBProjModel): transformers loads it from the folder with
`trust_remote_code=True` through config.json's `auto_map`, where hf_ibproj is not installed. It therefore imports
only torch, timm and transformers, never hf_ibproj.

Importing it registers `resnet18_small`, `resnet34_small` and `resnet50_small` with timm, so that
`timm.create_model("resnet18_small", in_chans=1, channels=(32, 64, 128, 256))` works, and defines the transformers
classes of an exported folder: the stock `TimmWrapper*` classes under their own model type.
"""

from __future__ import annotations

from typing import Any, Callable

import timm
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TimmWrapperModel,
)

# Each small-image variant is the stock timm ResNet of the same blocks and depths with only the stem changed.
STOCK_RESNETS = {"resnet18_small": "resnet18", "resnet34_small": "resnet34", "resnet50_small": "resnet50"}
SMALL_RESNETS = tuple(STOCK_RESNETS)
DEFAULT_CHANNELS = (64, 128, 256, 512)


def stem_sizing_kwargs(channels: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """The stock ResNet kwargs that size the stem output (and layer1's input) to channels[0].

    timm's single-conv stem is always 64 wide; only its deep-stem path sizes the stem, as 2 * stem_width.
    `SmallStemResNet` builds that path and then replaces its three convs by the single small-image conv.
    """
    if channels[0] % 2:
        raise ValueError(f"channels[0]={channels[0]} (the stem width) is invalid; allowed: an even integer.")
    return {"stem_type": "deep", "stem_width": channels[0] // 2}


class SmallStemResNet(ResNet):
    """timm ResNet with the CIFAR stem: one 3x3 stride-1 convolution, no max-pool (32x32 -> 4x4 at layer4)."""

    def __init__(self, *args: Any, channels: tuple[int, ...] = DEFAULT_CHANNELS, **kwargs: Any) -> None:
        super().__init__(*args, channels=channels, **stem_sizing_kwargs(channels), **kwargs)
        self.conv1 = nn.Conv2d(self.in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # The stem no longer reduces resolution: every stage's reduction is 4x smaller.
        for info in self.feature_info:
            info["reduction"] = max(1, info["reduction"] // 4)


def _small_cfg() -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "conv1",
        "classifier": "fc",
    }


default_cfgs = generate_default_cfgs({name: _small_cfg() for name in SMALL_RESNETS})


def _create_small_resnet(variant: str, pretrained: bool, block: type, layers: tuple, **kwargs: Any) -> SmallStemResNet:
    kwargs["channels"] = tuple(kwargs.get("channels", DEFAULT_CHANNELS))
    return build_model_with_cfg(SmallStemResNet, variant, pretrained, block=block, layers=layers, **kwargs)


def _register_once(entrypoint: Callable[..., SmallStemResNet]) -> Callable[..., SmallStemResNet]:
    """timm's `register_model`, skipped when the name is taken: transformers imports this file again from every
    folder that carries it, and re-registering would only warn."""
    return entrypoint if timm.is_model(entrypoint.__name__) else register_model(entrypoint)


@_register_once
def resnet18_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """ResNet-18 with the small-image stem (the paper's CIFAR backbone, 512-d features)."""
    return _create_small_resnet("resnet18_small", pretrained, BasicBlock, (2, 2, 2, 2), **kwargs)


@_register_once
def resnet34_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """ResNet-34 with the small-image stem."""
    return _create_small_resnet("resnet34_small", pretrained, BasicBlock, (3, 4, 6, 3), **kwargs)


@_register_once
def resnet50_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """ResNet-50 with the small-image stem (2048-d features at default width)."""
    return _create_small_resnet("resnet50_small", pretrained, Bottleneck, (3, 4, 6, 3), **kwargs)


# --------------------------------------------------------------------------------------------------------------
# transformers: an exported folder's config.json is a timm config (architecture, model_args, pretrained_cfg) with
# this model type; TimmWrapper builds `architecture` through timm.create_model, which the registration above serves.
# --------------------------------------------------------------------------------------------------------------
class SmallResNetConfig(TimmWrapperConfig):
    """`TimmWrapperConfig` of a small-image ResNet; its own model type makes transformers ask for this code."""

    model_type = "ibproj_small_resnet"


class SmallResNetModel(TimmWrapperModel):
    """Pooled features of a small-image ResNet (`pooler_output`), as `TimmWrapperModel`."""

    config_class = SmallResNetConfig


class SmallResNetForImageClassification(TimmWrapperForImageClassification):
    """A small-image ResNet with a linear classifier (`num_labels`), as `TimmWrapperForImageClassification`."""

    config_class = SmallResNetConfig


# Exported small-image ResNets load without trust_remote_code once this module is imported (their code is this one).
AutoConfig.register(SmallResNetConfig.model_type, SmallResNetConfig, exist_ok=True)
AutoModel.register(SmallResNetConfig, SmallResNetModel, exist_ok=True)
AutoModelForImageClassification.register(SmallResNetConfig, SmallResNetForImageClassification, exist_ok=True)
