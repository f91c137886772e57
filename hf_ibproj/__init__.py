"""hf_ibproj: "Projection Head is Secretly an Information Bottleneck" (ICLR 2025) for the Hugging Face ecosystem.

Importing the package registers the small-image ResNets with timm and `IBProjConfig` / `IBProjModel`
with transformers' AutoConfig / AutoModel.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from . import backbones  # noqa: F401  (registers resnet18_small, resnet34_small, resnet50_small with timm)
from .configuration_ibproj import IBProjConfig
from .export import export_backbone
from .hub import push_to_hub
from .information import matrix_joint_entropy, matrix_mutual_information, matrix_renyi_entropy
from .modeling_ibproj import IBProjModel, IBProjModelOutput
from .modeling_small_resnet import SmallResNetConfig, SmallResNetForImageClassification, SmallResNetModel
from .objectives import BarlowTwinsLoss, NTXentLoss, barlow_twins_loss, nt_xent_loss
from .pretrain import PretrainResult, pretrain
from .runs import RunFolder
from .sources import Source, resolve_source
from .train_config import TrainConfig

AutoConfig.register(IBProjConfig.model_type, IBProjConfig, exist_ok=True)
AutoModel.register(IBProjConfig, IBProjModel, exist_ok=True)
# Exported small-image ResNets load without trust_remote_code once hf_ibproj is imported (their code is this package's).
AutoConfig.register(SmallResNetConfig.model_type, SmallResNetConfig, exist_ok=True)
AutoModel.register(SmallResNetConfig, SmallResNetModel, exist_ok=True)
AutoModelForImageClassification.register(SmallResNetConfig, SmallResNetForImageClassification, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "BarlowTwinsLoss",
    "IBProjConfig",
    "IBProjModel",
    "IBProjModelOutput",
    "NTXentLoss",
    "PretrainResult",
    "RunFolder",
    "Source",
    "TrainConfig",
    "barlow_twins_loss",
    "export_backbone",
    "matrix_joint_entropy",
    "matrix_mutual_information",
    "matrix_renyi_entropy",
    "nt_xent_loss",
    "pretrain",
    "push_to_hub",
    "resolve_source",
]
