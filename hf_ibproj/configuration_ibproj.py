"""`IBProjConfig`: everything needed to rebuild an encoder + bottleneck projector (docs/method.md sections 3-4)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

OBJECTIVES = ("simclr", "barlow_twins")

# Paper defaults per objective (docs/method.md section 4 and 3c).
_PROJECTOR_DEFAULTS = {
    # SimCLR: Linear(d, 2048) - ReLU - Linear(2048, 256), no BatchNorm.
    "simclr": {"hidden_dims": [2048], "out_dim": 256, "batch_norm": False},
    # Barlow Twins: [Linear-BN-ReLU] x 2 at 2048, then Linear(2048, 2048).
    "barlow_twins": {"hidden_dims": [2048, 2048], "out_dim": 2048, "batch_norm": True},
}
# With the sparse block on, the released code replaces the whole SimCLR MLP by the block and keeps
# only the first [Linear-BN-ReLU] block of Barlow Twins in front of it (docs/method.md section 3c).
_SPARSE_PROJECTOR_DEFAULTS = {
    "simclr": {"hidden_dims": [], "out_dim": 0},
    "barlow_twins": {"hidden_dims": [2048], "out_dim": 0},
}
# Paper sparsity k = ratio * latent size (docs/method.md section 3c).
_SPARSE_TOPK_RATIO = {"simclr": 0.001, "barlow_twins": 0.2}


class IBProjConfig(PreTrainedConfig):
    r"""Configuration of [`IBProjModel`]: a timm backbone and a bottleneck projector.

    Args:
        backbone: timm architecture name (stock timm, or the small-image ResNets `resnet18_small`,
            `resnet34_small`, `resnet50_small` that `hf_ibproj` registers).
        backbone_kwargs: keyword arguments for `timm.create_model` (`in_chans`, `channels`, `img_size`, ...).
        objective: `"simclr"` (NT-Xent) or `"barlow_twins"`.
        num_views: views per image fed to `forward` (>= 2).
        projector_hidden_dims: widths of the [Linear-(BN)-ReLU] blocks; `None` takes the paper default.
        projector_out_dim: width of the final plain Linear; 0 means none; `None` takes the paper default.
        projector_batch_norm: BatchNorm in the hidden blocks; `None` takes the paper default.
        mi_weight: lambda of the matrix-MI penalty lambda * I_alpha(Z1;Z2) (docs/method.md 3a; paper 1e-4 CIFAR).
        mi_alpha: Renyi order alpha of that penalty (paper: 2).
        quantize_levels: FSQ levels L per projector dimension (docs/method.md 3b); 0 = off, paper 30 SimCLR / 3 BT.
        sparse_latent_dim: latent size of the top-k sparse block (docs/method.md 3c); 0 = off.
        sparse_topk: active latents k; `None` takes the paper ratio (0.001 SimCLR, 0.2 Barlow Twins).
        nt_xent_tau: NT-Xent temperature (paper 0.2). Not named `temperature`: transformers reserves it.
        barlow_lambda: weight of the off-diagonal Barlow Twins term (0.0051).
        barlow_scale: overall Barlow Twins loss scale (0.1).
        gather_distributed: gather negatives / average the cross-correlation across processes, with gradient.
        image_size, image_mean, image_std, interpolation: the preprocessing this model was trained with.
    """

    model_type = "ibproj"

    backbone: str = "resnet18_small"
    backbone_kwargs: dict[str, Any] | None = None
    objective: str = "simclr"
    num_views: int = 2
    projector_hidden_dims: list[int] | None = None
    projector_out_dim: int | None = None
    projector_batch_norm: bool | None = None
    mi_weight: float = 0.0
    mi_alpha: float = 2.0
    quantize_levels: int = 0
    sparse_latent_dim: int = 0
    sparse_topk: int | None = None
    nt_xent_tau: float = 0.2
    barlow_lambda: float = 0.0051
    barlow_scale: float = 0.1
    gather_distributed: bool = True
    image_size: int = 32
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    interpolation: str = "bicubic"

    def __post_init__(self, **kwargs):
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        self._validate()
        defaults = dict(_PROJECTOR_DEFAULTS[self.objective])
        if self.sparse_latent_dim:
            defaults.update(_SPARSE_PROJECTOR_DEFAULTS[self.objective])
            if self.sparse_topk is None:
                self.sparse_topk = max(1, round(_SPARSE_TOPK_RATIO[self.objective] * self.sparse_latent_dim))
        if self.projector_hidden_dims is None:
            self.projector_hidden_dims = list(defaults["hidden_dims"])
        if self.projector_out_dim is None:
            self.projector_out_dim = defaults["out_dim"]
        if self.projector_batch_norm is None:
            self.projector_batch_norm = defaults["batch_norm"]
        channels = self.backbone_kwargs.get("in_chans", 3)
        if self.image_mean is None:
            self.image_mean = [0.5] * channels
        if self.image_std is None:
            self.image_std = [0.5] * channels
        self._validate_resolved()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        """Reject bad settings at construction, naming the field and what it accepts."""
        import timm  # here, not at module level: the command-line help reads this module without the model stack

        from .backbones import SMALL_RESNETS  # importing it registers the small-image ResNets with timm

        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is unknown; allowed values: {', '.join(OBJECTIVES)}.")
        _require(
            isinstance(self.backbone, str) and timm.is_model(self.backbone),
            "backbone",
            self.backbone,
            f"a timm architecture name (timm.list_models()) or one of hf_ibproj's {', '.join(SMALL_RESNETS)}",
        )
        _require(self.num_views >= 2, "num_views", self.num_views, "an integer >= 2 (contrastive learning needs pairs)")
        _require(self.mi_weight >= 0, "mi_weight", self.mi_weight, "a float >= 0 (0 turns the MI penalty off)")
        _require(self.mi_alpha > 0, "mi_alpha", self.mi_alpha, "a float > 0 (the paper uses 2)")
        _require(
            self.quantize_levels == 0 or self.quantize_levels >= 2,
            "quantize_levels",
            self.quantize_levels,
            "0 (off) or an integer >= 2 (paper: 30 for SimCLR, 3 for Barlow Twins)",
        )
        _require(self.sparse_latent_dim >= 0, "sparse_latent_dim", self.sparse_latent_dim, "0 (off) or a positive integer")
        if self.sparse_topk is not None and self.sparse_latent_dim:
            _require(
                0 < self.sparse_topk <= self.sparse_latent_dim,
                "sparse_topk",
                self.sparse_topk,
                f"an integer in [1, sparse_latent_dim={self.sparse_latent_dim}]",
            )
        _require(self.nt_xent_tau > 0, "nt_xent_tau", self.nt_xent_tau, "a float > 0 (paper: 0.2)")
        _require(self.barlow_lambda >= 0, "barlow_lambda", self.barlow_lambda, "a float >= 0 (paper: 0.0051)")
        _require(self.barlow_scale > 0, "barlow_scale", self.barlow_scale, "a float > 0 (paper: 0.1)")
        _require(self.image_size > 0, "image_size", self.image_size, "a positive integer")

    def _validate_resolved(self) -> None:
        dims = list(self.projector_hidden_dims) + ([self.projector_out_dim] if self.projector_out_dim else [])
        _require(all(int(d) > 0 for d in dims), "projector_hidden_dims", dims, "positive integers")
        _require(self.projector_out_dim >= 0, "projector_out_dim", self.projector_out_dim, "0 (none) or a positive integer")
        channels = self.backbone_kwargs.get("in_chans", 3)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            _require(len(value) == channels, name, value, f"one value per input channel ({channels})")
        _require(all(s > 0 for s in self.image_std), "image_std", self.image_std, "positive values")


# Saved folders carry this file and config.json's auto_map, so AutoConfig loads them with trust_remote_code=True
# where hf_ibproj is not installed.
IBProjConfig.register_for_auto_class()
# Once this module is imported, AutoConfig reads those folders without remote code (AutoModel: modeling_ibproj).
AutoConfig.register(IBProjConfig.model_type, IBProjConfig, exist_ok=True)


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"IBProjConfig.{field}={value!r} is invalid; allowed: {allowed}.")
