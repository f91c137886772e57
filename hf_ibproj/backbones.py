"""timm backbone factory; the small-image ResNets of docs/method.md section 6 live in `modeling_small_resnet`.

Importing this module registers those variants (`resnet18_small`, `resnet34_small`, `resnet50_small`) with timm;
after that import, `timm.create_model("resnet18_small", in_chans=1, channels=(32, 64, 128, 256))` works anywhere.
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from .modeling_small_resnet import SMALL_RESNETS  # importing it registers the small-image ResNets with timm


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A timm model with its classifier removed, returning globally pooled features of size `num_features`."""
    if not timm.is_model(name):
        raise ValueError(
            f"backbone={name!r} is not a timm architecture; use a name from timm.list_models() "
            f"or one of hf_ibproj's small-image ResNets: {', '.join(SMALL_RESNETS)}."
        )
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
