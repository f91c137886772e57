"""The training configuration of train.py: a YAML preset (`--config`) plus command-line overrides, or on `--resume`
the run's own stored configuration.

The flags come from the `TrainConfig` dataclass through hf_ibproj.arguments' ArgumentParser (transformers'
HfArgumentParser: `--foo-bar` for field `foo_bar`, help and default shown, booleans as `--flag / --no-flag`), the
convention of every command. Two things it cannot do are added here: the
defaults come from the preset (so `--help` shows the preset's values), and list/dict fields are YAML text (it has no
dict type, and a list flag of `nargs="+"` cannot say "no hidden layers").
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

import torch
import yaml
from .arguments import ArgumentParser
from .augmentation import CROP_MIN_SCALE, check_blur_kernel_size, check_crop_min_scale
from .configuration_ibproj import IBProjConfig
from .resources import CONFIG_DIR  # the presets, in the installed package or the source checkout
from .precision import has_native_bf16

DEFAULT_PRESET = CONFIG_DIR / "fashion_mnist_cpu.yaml"
RUN_CONFIG = "config.yaml"

# The IBProjConfig fields a run sets by flag or preset (the model is rebuilt from them); train.py fills in the
# others (image statistics, interpolation, distributed gathering) itself.
MODEL_FIELDS = (
    "backbone", "backbone_kwargs", "objective", "num_views", "projector_hidden_dims", "projector_out_dim",
    "projector_batch_norm", "mi_weight", "mi_alpha", "quantize_levels", "sparse_latent_dim", "sparse_topk",
    "nt_xent_tau", "barlow_lambda", "barlow_scale", "image_size",
)
# Settings `--resume` may change: they change what is logged or kept, never the trained weights.
RESUMABLE_FIELDS = ("output_dir", "tracker", "num_workers", "log_every", "keep_checkpoints", "push_to_hub",
                    "hub_strategy", "hub_private")
# How long a run trains: the first one set wins (max_steps, then epochs, then time_budget; PAPER's 200 epochs if none).
LENGTH_FIELDS = ("max_steps", "epochs", "time_budget")
DEFAULT_EPOCHS = 200


def _docstring_help(cls: type) -> dict[str, str]:
    """`name: text` entries of a Google-style `Args:` section (IBProjConfig's), as one line each."""
    args = (inspect.getdoc(cls) or "").split("Args:", 1)[-1]
    entries = re.findall(r"^    (\w+(?:, \w+)*): (.*?)(?=^    \w|\Z)", args, flags=re.M | re.S)
    return {name: " ".join(text.split()) for names, text in entries for name in names.split(", ")}


def _as_flag_type(annotation: Any) -> Any:
    """list/dict fields become YAML text for the parser (`X | str | None`, parsed in TrainConfig.__post_init__)."""
    members = [t for t in typing.get_args(annotation) if t is not type(None)]
    if members and typing.get_origin(members[0]) in (list, dict):
        return typing.Optional[typing.Union[members[0], str]]  # HfArgumentParser takes str from (X, str, None)
    return annotation


def _model_settings() -> type:
    """A dataclass of MODEL_FIELDS with IBProjConfig's own types, defaults and docs, so the two cannot drift apart."""
    types = inspect.get_annotations(IBProjConfig, eval_str=True)  # its own fields, not PreTrainedConfig's
    defaults = {field.name: field.default for field in dataclasses.fields(IBProjConfig)}
    helps = _docstring_help(IBProjConfig)
    fields = [(name, _as_flag_type(types[name]), dataclasses.field(default=defaults[name],
                                                                   metadata={"help": helps[name]}))
              for name in MODEL_FIELDS]
    namespace = {"__module__": __name__, "__doc__": "The IBProjConfig settings of a pretraining run (MODEL_FIELDS)."}
    return dataclasses.make_dataclass("ModelSettings", fields, namespace=namespace)


ModelSettings = _model_settings()


def _arg(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig(ModelSettings):
    """Every setting of a pretraining run. Paper defaults (PAPER.md section 6) unless a preset says otherwise.

    The model settings (MODEL_FIELDS: backbone, objective, projector and bottleneck settings, ...) are inherited
    from IBProjConfig; the fields below are the data, optimization, monitoring and output settings.
    """

    # data
    dataset: str = _arg("fashion_mnist", "a Hub dataset id, an image folder, a save_to_disk folder or fashion_mnist")
    train_split: str = _arg("train", "the split to pretrain on")
    eval_split: str | None = _arg("test", "held-out split of the kNN monitor and the final evaluation (none: off)")
    image_column: str | None = _arg(None, "image column (default: detected)")
    label_column: str | None = _arg(None, "label column (default: detected; the labels feed the monitors only)")
    channels: int = _arg(3, "1 (grayscale) or 3 (RGB): images are converted to it")
    max_samples: int | None = _arg(None, "pretrain on a seeded, class-stratified subset of this many images")
    eval_max_samples: int | None = _arg(None, "cap the held-out split (seeded, class-stratified)")
    final_eval_train_samples: int | None = _arg(
        None, "training images of the final linear probe / kNN (stratified; default: all, 20000 when streaming)")
    streaming: bool = _arg(False, "decode per sample in DataLoader workers (datasets that do not fit in memory)")
    num_workers: int = _arg(2, "DataLoader workers per process (streaming)")
    augmentation: str | None = _arg(None, "augmentation recipe, simclr or barlow_twins (default: the objective's)")
    crop_min_scale: float = _arg(CROP_MIN_SCALE, "smallest area fraction of the random resized crop (PAPER.md "
                                                 "section 6); larger is a weaker augmentation")
    blur_kernel_size: int | None = _arg(None, "Gaussian-blur kernel of the simclr recipe (barlow_twins has no blur), "
                                              "odd (default: ~10% of the image side, at least 3); sigma 0.1-2 px")
    # optimization
    max_steps: int | None = _arg(None, "optimizer steps to train (wins over --epochs and --time-budget)")
    epochs: int | None = _arg(None, f"epochs to train (wins over --time-budget; {DEFAULT_EPOCHS} when no length "
                                    "is set)")
    time_budget: float | None = _arg(
        None, "minutes for the whole run, training and final evaluation: the step count is fixed from the measured "
              "step time after a few steps")
    batch_size: int = _arg(256, "per process and micro-step; global = batch_size x processes x accumulation")
    gradient_accumulation_steps: int = _arg(1, "micro-steps per optimizer step")
    optimizer: str = _arg("lars", "lars, sgd or adamw (timm's implementations)")
    lr: float = _arg(0.4, "learning rate for a global batch of 256, scaled linearly by global_batch / 256")
    weight_decay: float = _arg(1e-4, "weight decay (not on biases and norm parameters)")
    momentum: float = _arg(0.9, "momentum (lars, sgd)")
    lars_eta: float = _arg(0.02, "LARS trust coefficient (with clipping)")
    warmup_epochs: float = _arg(10.0, "linear warm-up length in epochs, then cosine decay")
    mixed_precision: str = _arg("auto", "auto (bf16 where the hardware computes it natively, else no), no, bf16, fp16")
    channels_last: bool = _arg(True, "channels_last memory format")
    seed: int = _arg(0, "seed of the weights, the data order and the augmentations")
    # monitoring
    log_every: int = _arg(50, "log loss, learning rate and throughput every N steps")
    diagnostics_every: int = _arg(50, "log the information-plane quantities (PAPER.md section 5) every N steps")
    online_probe_lr: float = _arg(0.1, "learning rate of the online linear probe on detached encoder features "
                                       "(a parameter group without weight decay or LARS adaptation)")
    knn_train_samples: int = _arg(10000, "memory bank of the per-epoch kNN monitor and the random-init floor "
                                         "(stratified)")
    knn_eval_samples: int = _arg(2000, "held-out queries of the per-epoch kNN monitor and the random-init floor "
                                       "(stratified)")
    tracker: str = _arg("tensorboard", "accelerate tracker (tensorboard, wandb, ...) or none")
    # checkpoints and outputs
    checkpoint_every: int = _arg(500, "checkpoint every N steps; one is also written at every epoch end")
    keep_checkpoints: int = _arg(2, "checkpoints kept (the newest)")
    output_dir: str | None = _arg(None, "the run folder (default: runs/OBJECTIVE-TIMESTAMP)")
    final_eval: bool = _arg(True, "linear probe and kNN of the trained backbone at the end, and of the random-init "
                                  "one (on the kNN monitor's subsets) at the start")
    export_backbone: bool = _arg(True, "export the backbone as a timm / transformers Hub folder at the end")
    push_to_hub: str | None = _arg(None, "Hub repo id to push the exported backbone and its card to")
    hub_strategy: str = _arg("end", "end: push when the run ends; checkpoint: also push every checkpoint "
                                    "(resumable from the Hub)")
    hub_private: bool = _arg(False, "create the Hub repo as private")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str) and _allows(field.name, (list, dict)):
                setattr(self, field.name, _parse_yaml_flag(field.name, value))
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        _choice("optimizer", self.optimizer, ("lars", "sgd", "adamw"))
        _choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        _choice("hub_strategy", self.hub_strategy, ("end", "checkpoint"))
        if self.augmentation is not None:
            _choice("augmentation", self.augmentation, ("simclr", "barlow_twins"))
        for name in ("batch_size", "gradient_accumulation_steps", "image_size", "log_every", "diagnostics_every",
                     "keep_checkpoints", "checkpoint_every", "max_steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be a positive integer.")
        check_crop_min_scale(self.crop_min_scale)
        if self.blur_kernel_size is not None:
            check_blur_kernel_size(self.blur_kernel_size, self.image_size)
        for name in ("lr", "time_budget", "online_probe_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value!r} is invalid; it must be > 0.")
        if self.push_to_hub is not None and "/" not in self.push_to_hub:
            raise ValueError(f"push_to_hub={self.push_to_hub!r} is invalid; it must be a repo id 'username/name'.")
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

    @property
    def length(self) -> tuple[str, float]:
        """How long to train: ("max_steps" | "epochs" | "time_budget", value), the first one set (see LENGTH_FIELDS)."""
        for name in LENGTH_FIELDS:
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return "epochs", DEFAULT_EPOCHS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; allowed values: {', '.join(allowed)}.")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _allows(name: str, kinds: tuple[type, ...]) -> bool:
    """Whether TrainConfig's field `name` may hold a value of one of `kinds` (list, dict, NoneType, ...)."""
    annotation = typing.get_type_hints(TrainConfig)[name]
    members = typing.get_args(annotation) or (annotation,)
    return any((typing.get_origin(t) or t) in kinds for t in members)


def _parse_yaml_flag(name: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{_flag(name)} expects YAML (e.g. [2048, 2048] or {{channels: [32, 64, 128, 256]}}), "
                         f"got {text!r}: {error}") from None
    if value is not None and not _allows(name, (type(value),)):
        raise ValueError(f"{_flag(name)} expects a {typing.get_type_hints(TrainConfig)[name]}, got {text!r}.")
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


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The TrainConfig fields stored in RUN/config.yaml (the run's resolved configuration)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist, so the run's configuration is unknown; "
                                "check --output-dir (it must be the folder of the run to continue).")
    stored = yaml.safe_load(path.read_text()) or {}
    return {f.name: stored[f.name] for f in dataclasses.fields(TrainConfig) if f.name in stored}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_arg_parser(defaults: dict[str, Any] | None = None) -> ArgumentParser:
    """Every TrainConfig field as a flag (defaults: `defaults`, e.g. a preset), plus --config and --resume."""
    parser = ArgumentParser(TrainConfig, formatter_class=_HelpFormatter, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_PRESET), help="YAML preset of the settings")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its latest checkpoint, with its stored settings")
    for field in dataclasses.fields(TrainConfig):  # and for the optional booleans (projector_batch_norm)
        if _allows(field.name, (bool,)) and f"--no-{field.name.replace('_', '-')}" not in parser._option_string_actions:
            parser.add_argument(f"--no-{field.name.replace('_', '-')}", dest=field.name, action="store_false",
                                help=f"turn --{field.name.replace('_', '-')} off")
    if defaults:
        parser.set_defaults(**{name: _as_flag_default(value) for name, value in defaults.items()})
    return parser


def _as_flag_default(value: Any) -> Any:
    """A preset value as the parser's default: lists and dicts as the YAML text the flag takes."""
    return yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, (list, dict)) else value


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags that `argv` gives (`--x V`, `--x=V`, `--no-x`)."""
    given = set()
    for token in argv:
        action = parser._option_string_actions.get(token.split("=", 1)[0]) if token.startswith("--") else None
        if action is not None:
            given.add(action.dest)
    return given


def early_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags that decide where the settings come from: --config, --resume, --output-dir, --push-to-hub."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", default=str(DEFAULT_PRESET))
    early.add_argument("--resume", action="store_true")
    for name in ("output_dir", "push_to_hub"):
        early.add_argument(_flag(name), f"--{name}", dest=name)
    return early.parse_known_args(list(argv) if argv is not None else sys.argv[1:])[0]


def parse_train_config(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Preset values, then command-line overrides, validated as one TrainConfig; on --resume, the run's own values."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    known = early_arguments(argv)
    if known.resume:
        if known.output_dir is None:
            raise ValueError("--resume needs --output-dir, the folder of the run to continue.")
        defaults = read_run_config(known.output_dir)
    else:
        defaults = read_preset(known.config)
    parser = build_arg_parser(defaults)
    given = explicit_flags(parser, argv)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    for name, value in values.items():  # "none" / "null" on the command line clears an optional setting
        if name in given and isinstance(value, str) and value.lower() in ("none", "null") and _allows(name, (type(None),)):
            values[name] = None
    if known.resume:
        _refuse_changes_on_resume(TrainConfig(**values), TrainConfig(**defaults), given)
    elif given & set(LENGTH_FIELDS):  # a length on the command line replaces the preset's length
        values.update({name: None for name in set(LENGTH_FIELDS) - given})
    return TrainConfig(**values), args


def _refuse_changes_on_resume(requested: TrainConfig, stored: TrainConfig, given: set[str]) -> None:
    if "config" in given:
        raise ValueError("--resume continues a run with its own stored configuration; drop --config.")
    changed = [name for name in sorted(given - set(RESUMABLE_FIELDS) - {"resume"})
               if getattr(requested, name) != getattr(stored, name)]
    if changed:
        details = ", ".join(f"{_flag(n)} ({getattr(stored, n)!r} -> {getattr(requested, n)!r})" for n in changed)
        raise ValueError(
            f"--resume continues the run as it was configured, but {details} would change the model, the data or "
            f"the schedule. Drop the flag(s), or start a new run with another --output-dir. Flags allowed on resume: "
            f"{', '.join(_flag(n) for n in RESUMABLE_FIELDS)}."
        )
