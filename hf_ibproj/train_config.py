"""The training configuration of train.py: a YAML preset (`--config`) plus command-line overrides."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import torch
import yaml

from .configuration_ibproj import IBProjConfig
from .runs import has_native_bf16

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "fashion_mnist_cpu.yaml"

# The IBProjConfig fields a run sets by flag or preset (the model is rebuilt from them); train.py fills in the
# others (image statistics, interpolation, distributed gathering) itself.
MODEL_FIELDS = (
    "backbone", "backbone_kwargs", "objective", "num_views", "projector_hidden_dims", "projector_out_dim",
    "projector_batch_norm", "mi_weight", "mi_alpha", "quantize_levels", "sparse_latent_dim", "sparse_topk",
    "nt_xent_tau", "barlow_lambda", "barlow_scale", "image_size",
)


def _model_settings() -> type:
    """A dataclass of MODEL_FIELDS with IBProjConfig's own types and defaults, so the two cannot drift apart."""
    types = inspect.get_annotations(IBProjConfig, eval_str=True)  # its own fields, not PreTrainedConfig's
    defaults = {field.name: field.default for field in dataclasses.fields(IBProjConfig)}
    fields = [(name, types[name], dataclasses.field(default=defaults[name])) for name in MODEL_FIELDS]
    namespace = {"__module__": __name__, "__doc__": "The IBProjConfig settings of a pretraining run (MODEL_FIELDS)."}
    return dataclasses.make_dataclass("ModelSettings", fields, namespace=namespace)


ModelSettings = _model_settings()


@dataclasses.dataclass
class TrainConfig(ModelSettings):
    """Every setting of a pretraining run. Paper defaults (PAPER.md section 6) unless a preset says otherwise.

    The model settings (MODEL_FIELDS: backbone, objective, projector and bottleneck settings, ...) are inherited
    from IBProjConfig; the fields below are the data, optimization, monitoring and output settings.
    """

    # data
    dataset: str = "fashion_mnist"  # a Hub id, an image folder, a save_to_disk folder or a built-in name
    train_split: str = "train"
    eval_split: str | None = "test"  # held-out split for the kNN monitor and the final evaluation
    image_column: str | None = None
    label_column: str | None = None
    channels: int = 3
    max_samples: int | None = None  # cap on the training split
    eval_max_samples: int | None = None  # cap on the held-out split
    streaming: bool = False  # decode per sample in DataLoader workers (datasets that do not fit in memory)
    num_workers: int = 2
    augmentation: str | None = None  # "simclr" or "barlow_twins"; None follows the objective
    # optimization
    epochs: int = 200
    batch_size: int = 256  # per process and per micro-step; global = batch_size * processes * accumulation
    gradient_accumulation_steps: int = 1
    optimizer: str = "lars"  # "lars", "sgd" or "adamw"
    lr: float = 0.4  # for a global batch of 256, scaled linearly by global_batch / 256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lars_eta: float = 0.02
    warmup_epochs: float = 10.0
    mixed_precision: str = "auto"  # "auto" (bf16 where the hardware computes it natively, else "no"), "no", "bf16", "fp16"
    channels_last: bool = True
    seed: int = 0
    # monitoring
    log_every: int = 50
    diagnostics_every: int = 50
    online_probe_lr: float = 1e-3
    knn_train_samples: int = 10000  # memory bank of the per-epoch kNN monitor
    knn_eval_samples: int = 2000
    tracker: str = "tensorboard"
    # checkpoints and outputs
    checkpoint_every: int = 500  # steps; a checkpoint is also written at every epoch end
    keep_checkpoints: int = 2
    output_dir: str | None = None
    final_eval: bool = True
    export_backbone: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        _choice("optimizer", self.optimizer, ("lars", "sgd", "adamw"))
        _choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        if self.augmentation is not None:
            _choice("augmentation", self.augmentation, ("simclr", "barlow_twins"))
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "image_size", "log_every",
                     "diagnostics_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; it must be a positive integer.")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} is invalid; it must be > 0.")
        self.model_config()  # the model settings fail here, before any data is loaded

    def model_config(self) -> IBProjConfig:
        kwargs = {name: getattr(self, name) for name in MODEL_FIELDS}
        kwargs["backbone_kwargs"] = {"in_chans": self.channels, **(self.backbone_kwargs or {})}
        return IBProjConfig(**kwargs)

    def resolve_mixed_precision(self, device: torch.device) -> str:
        """`"auto"` becomes `"bf16"` where the hardware computes bf16 natively (else it is slower) and `"no"` elsewhere."""
        if self.mixed_precision == "auto":
            return "bf16" if has_native_bf16(device) else "no"
        return self.mixed_precision

    @property
    def augmentation_preset(self) -> str:
        return self.augmentation or self.objective

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; allowed values: {', '.join(allowed)}.")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _parse_value(name: str, text: str) -> Any:
    """Command-line text to the field's type (YAML for lists, dicts and null)."""
    field_type = _field_types()[name]
    if text.strip().lower() in ("null", "none", "~"):
        return None
    base = [t for t in typing.get_args(field_type) if t is not type(None)] or [field_type]
    target = typing.get_origin(base[0]) or base[0]
    if target is str:
        return text
    value = yaml.safe_load(text)
    if target is float:
        return float(text)
    if target is bool and isinstance(value, str):
        raise ValueError(f"--{name.replace('_', '-')} expects true or false, got {text!r}.")
    if target is int and not isinstance(value, int):
        raise ValueError(f"--{name.replace('_', '-')} expects an integer, got {text!r}.")
    return value


def read_preset(path: str | Path) -> dict[str, Any]:
    """A YAML preset as a dict, rejecting keys that are not TrainConfig fields."""
    path = Path(path)
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"preset {str(path)!r} does not exist; the presets in configs/ are: {available}.")
    values = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"preset {str(path)!r} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}."
        )
    return values


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain an encoder with a bottleneck projector (PAPER.md). "
        "Settings come from --config, then the flags below override them.",
    )
    parser.add_argument("--config", default=str(DEFAULT_PRESET), help="YAML preset (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None, metavar="VALUE")
    return parser


def parse_train_config(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Preset values, then command-line overrides, validated as one TrainConfig."""
    args = build_arg_parser().parse_args(argv)
    values = read_preset(args.config)
    for field in dataclasses.fields(TrainConfig):
        text = getattr(args, field.name)
        if text is not None:
            values[field.name] = _parse_value(field.name, text)
    return TrainConfig(**values), args
