"""timm backbone factory and the small-image ResNets of PAPER.md section 6 (3x3 stride-1 stem, no max-pool).

The small-image stem is not expressible with stock timm kwargs, so the variants are registered as timm
architectures (`resnet18_small`, `resnet34_small`, `resnet50_small`) when `hf_ibproj` is imported; after
that import, `timm.create_model("resnet18_small", in_chans=1, channels=(32, 64, 128, 256))` works anywhere.
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

SMALL_RESNETS = ("resnet18_small", "resnet34_small", "resnet50_small")


class SmallStemResNet(ResNet):
    """timm ResNet with the CIFAR stem: one 3x3 stride-1 convolution, no max-pool (32x32 -> 4x4 at layer4)."""

    def __init__(self, *args: Any, stem_width: int = 64, **kwargs: Any) -> None:
        # timm's single-conv stem is always 64 wide; only its deep-stem path sizes the stem (and layer1's input)
        # as 2 * stem_width. Build that path, then replace its three convs by the single small-image conv.
        if stem_width % 2:
            raise ValueError(f"stem_width={stem_width} (channels[0]) is invalid; allowed: an even integer.")
        super().__init__(*args, stem_width=stem_width // 2, stem_type="deep", **kwargs)
        self.conv1 = nn.Conv2d(self.in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
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
    channels = tuple(kwargs.pop("channels", (64, 128, 256, 512)))
    kwargs.setdefault("stem_width", channels[0])
    return build_model_with_cfg(
        SmallStemResNet, variant, pretrained, block=block, layers=layers, channels=channels, **kwargs
    )


@register_model
def resnet18_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """ResNet-18 with the small-image stem (the paper's CIFAR backbone, 512-d features)."""
    return _create_small_resnet("resnet18_small", pretrained, BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """ResNet-34 with the small-image stem."""
    return _create_small_resnet("resnet34_small", pretrained, BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50_small(pretrained: bool = False, **kwargs: Any) -> SmallStemResNet:
    """ResNet-50 with the small-image stem (2048-d features at default width)."""
    return _create_small_resnet("resnet50_small", pretrained, Bottleneck, (3, 4, 6, 3), **kwargs)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A timm model with its classifier removed, returning globally pooled features of size `num_features`."""
    if not timm.is_model(name):
        raise ValueError(
            f"backbone={name!r} is not a timm architecture; use a name from timm.list_models() "
            f"or one of hf_ibproj's small-image ResNets: {', '.join(SMALL_RESNETS)}."
        )
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
