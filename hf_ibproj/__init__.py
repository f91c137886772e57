"""hf_ibproj: "Projection Head is Secretly an Information Bottleneck" (ICLR 2025) for the Hugging Face ecosystem.

Importing the package is cheap: each public name is imported from its module on first use (the module
`__getattr__` of PEP 562, as transformers' `_LazyModule` does), so `hf-ibproj --help` and `train.py --help` do not
load datasets or the model stack. Importing a model class registers what it needs: `IBProjConfig` / `IBProjModel`
with transformers' AutoConfig / AutoModel, the small-image ResNets (`SmallResNetModel`, ...) with timm and the Auto
classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "configuration_ibproj": ["IBProjConfig"],
    "export": ["export_backbone"],
    "hub": ["push_to_hub"],
    "information": ["matrix_joint_entropy", "matrix_mutual_information", "matrix_renyi_entropy"],
    "modeling_ibproj": ["IBProjModel", "IBProjModelOutput"],
    "modeling_small_resnet": ["SmallResNetConfig", "SmallResNetForImageClassification", "SmallResNetModel"],
    "objectives": ["BarlowTwinsLoss", "NTXentLoss", "barlow_twins_loss", "nt_xent_loss"],
    "pretraining": ["PretrainResult", "pretrain"],
    "runs": ["RunFolder"],
    "sources": ["Source", "resolve_source"],
    "train_config": ["TrainConfig"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools and IDEs see
    from .configuration_ibproj import IBProjConfig
    from .export import export_backbone
    from .hub import push_to_hub
    from .information import matrix_joint_entropy, matrix_mutual_information, matrix_renyi_entropy
    from .modeling_ibproj import IBProjModel, IBProjModelOutput
    from .modeling_small_resnet import SmallResNetConfig, SmallResNetForImageClassification, SmallResNetModel
    from .objectives import BarlowTwinsLoss, NTXentLoss, barlow_twins_loss, nt_xent_loss
    from .pretraining import PretrainResult, pretrain
    from .runs import RunFolder
    from .sources import Source, resolve_source
    from .train_config import TrainConfig
