"""`IBProjModel`: a timm encoder f and a bottleneck projector g as a transformers `PreTrainedModel`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbones import create_backbone
from .configuration_ibproj import IBProjConfig
from .information import matrix_mutual_information, matrix_renyi_entropy
from .objectives import barlow_twins_loss, nt_xent_loss
from .projectors import Projector

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class IBProjModelOutput(ModelOutput):
    """Output of [`IBProjModel.forward`].

    Args:
        loss: total loss, `ssl_loss + mi_weight * mi_loss` (docs/method.md 3a).
        ssl_loss: the objective on the projections Z2.
        mi_loss: I_alpha(Z1;Z2) on the local batch; `None` when `mi_weight` is 0 (never computed then).
        encoder_features: Z1, pooled encoder features, (views * batch, num_features), views major.
        projections: Z2, projector outputs, (views * batch, projector dim), views major.
        diagnostics: on request, the information-plane quantities of docs/method.md section 5 (no gradient).
    """

    loss: torch.Tensor | None = None
    ssl_loss: torch.Tensor | None = None
    mi_loss: torch.Tensor | None = None
    encoder_features: torch.Tensor | None = None
    projections: torch.Tensor | None = None
    diagnostics: dict[str, torch.Tensor] | None = None


class IBProjPreTrainedModel(PreTrainedModel):
    config: IBProjConfig
    config_class = IBProjConfig
    base_model_prefix = "ibproj"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialize the tensors of `module` that a checkpoint did not provide, as their own library would.

        transformers' default draws N(0, 0.02) for every Linear/Conv; that would overwrite timm's scheme.
        A fresh model never gets here (`__init__` marks every tensor initialized). For keys missing from a
        checkpoint, backbone tensors are copied from a freshly built timm model: timm's own scheme, and safe,
        because timm's init functions (trunc_normal_ ...) are not guarded by transformers, so calling the
        backbone's `init_weights` would overwrite the loaded tensors too. Projector tensors get their module's
        torch default. transformers guards `init.*` and torch.nn.init here: loaded tensors are never touched.
        """
        backbone = getattr(self, "backbone", None)
        paths = {id(m): name for name, m in backbone.named_modules()} if backbone is not None else {}
        backbone_path = paths.get(id(module))
        if backbone_path is not None:
            fresh = create_backbone(self.config.backbone, **self.config.backbone_kwargs).get_submodule(backbone_path)
            fresh_tensors = {**dict(fresh.named_parameters(recurse=False)), **dict(fresh.named_buffers(recurse=False))}
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                init.copy_(tensor, fresh_tensors[name])
        elif isinstance(module, _NORMS):
            for name, fill in (("weight", init.ones_), ("bias", init.zeros_), ("running_mean", init.zeros_),
                               ("running_var", init.ones_), ("num_batches_tracked", init.zeros_)):
                if getattr(module, name, None) is not None:
                    fill(getattr(module, name))
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


class IBProjModel(IBProjPreTrainedModel):
    """Encoder (any timm model, pooled features Z1) + bottleneck projector (Z2) + SSL objective + MI penalty."""

    def __init__(self, config: IBProjConfig) -> None:
        super().__init__(config)
        self.backbone = create_backbone(config.backbone, **config.backbone_kwargs)
        self.projector = Projector(config, self.backbone.num_features)
        # timm and torch have initialized every tensor: keep that initialization (see `_init_weights`).
        # Not on the meta device (from_pretrained): there a flagged tensor counts as loaded, so a key missing
        # from the checkpoint would stay on meta instead of being initialized.
        for tensor in [*self.parameters(), *self.buffers()]:
            if not tensor.is_meta:
                tensor._is_hf_initialized = True
        self.post_init()

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features Z1 of a plain image batch (batch, C, H, W): what downstream tasks use."""
        return self.backbone(pixel_values)

    def ssl_loss(self, views: torch.Tensor) -> torch.Tensor:
        """The configured objective on features stacked as (views, batch, dim)."""
        if self.config.objective == "simclr":
            return nt_xent_loss(views, self.config.nt_xent_tau, self.config.gather_distributed)
        return barlow_twins_loss(
            views, self.config.barlow_lambda, self.config.barlow_scale, self.config.gather_distributed
        )

    def forward(
        self,
        pixel_values: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
        return_diagnostics: bool = False,
        return_dict: bool | None = None,
    ) -> IBProjModelOutput | tuple:
        """Encode every view, project, and return the total loss (docs/method.md 3a).

        Args:
            pixel_values: the views of a batch, a tensor (batch, views, C, H, W) or a list of (batch, C, H, W).
            return_diagnostics: also return the section-5 information quantities, computed without gradient.
        """
        views = _stack_views(pixel_values)
        num_views, batch = views.shape[:2]
        z1 = self.backbone(views.flatten(0, 1))
        z2 = self.projector(z1)
        ssl_loss = self.ssl_loss(z2.unflatten(0, (num_views, batch)))
        loss, mi_loss = ssl_loss, None
        if self.config.mi_weight > 0:
            mi_loss = matrix_mutual_information(z1, z2, self.config.mi_alpha)
            loss = ssl_loss + self.config.mi_weight * mi_loss
        diagnostics = self.information_diagnostics(z1, z2, num_views) if return_diagnostics else None
        output = IBProjModelOutput(loss, ssl_loss, mi_loss, z1, z2, diagnostics)
        use_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if use_dict else output.to_tuple()

    @torch.no_grad()
    def information_diagnostics(self, z1: torch.Tensor, z2: torch.Tensor, num_views: int) -> dict[str, torch.Tensor]:
        """docs/method.md section 5: I(Z1;R) as minus the SSL loss on the encoder features, I(Z1;Z2), H(Z1), the bounds."""
        alpha = self.config.mi_alpha
        i_z1_r = -self.ssl_loss(z1.unflatten(0, (num_views, -1)))
        i_z1_z2 = matrix_mutual_information(z1, z2, alpha)
        h_z1 = matrix_renyi_entropy(z1, alpha)
        return {
            "I(Z1;R)": i_z1_r,
            "I(Z1;Z2)": i_z1_z2,
            "H(Z1)": h_z1,
            "lower_bound": i_z1_r - i_z1_z2,
            "upper_bound": h_z1 - i_z1_z2,
        }


# save_pretrained copies this file and its relative imports next to the weights and records them in config.json's
# auto_map, so `AutoModel.from_pretrained(folder_or_repo, trust_remote_code=True)` works without hf_ibproj.
IBProjModel.register_for_auto_class("AutoModel")
AutoModel.register(IBProjConfig, IBProjModel, exist_ok=True)  # once this module is imported: no remote code needed


def _stack_views(pixel_values: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Views as one (views, batch, C, H, W) tensor."""
    if isinstance(pixel_values, (list, tuple)):
        if len(pixel_values) < 2:
            raise ValueError(f"forward needs at least 2 views per image, got a list of {len(pixel_values)}.")
        return torch.stack(list(pixel_values))
    if pixel_values.dim() != 5 or pixel_values.shape[1] < 2:
        raise ValueError(
            "pixel_values must be (batch, views >= 2, C, H, W) or a list of view tensors; "
            f"got shape {tuple(pixel_values.shape)}. For single images use get_image_features."
        )
    return pixel_values.transpose(0, 1)
