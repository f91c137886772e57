"""The settings of a pretraining run: a YAML preset (`--config`) plus overrides, or on `--resume` the stored
settings of the run to continue.

From Python: `TrainConfig.from_preset(preset, **overrides)` and `TrainConfig.from_run(output_dir, **overrides)`.
train.py's command line, `parse_train_config(argv)`, is built on them.

The flags come from the `TrainConfig` dataclass fields through hf_ibproj.arguments' ArgumentParser (transformers'
HfArgumentParser: `--foo-bar` for field `foo_bar`, help from the field's metadata, booleans as `--flag / --no-flag`),
the convention of every command. Two things are added here: the defaults come from the preset (so `--help` shows
the preset's values), and list/dict fields are YAML text (HfArgumentParser has no dict type, and a list flag of
`nargs="+"` cannot say "no hidden layers").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from transformers.hf_argparser import string_to_bool

from .arguments import ArgumentParser, check_repo_id, flag_name, refuse_resume_changes
from .augmentation import CROP_MIN_SCALE, check_blur_kernel_size, check_crop_min_scale, default_blur_kernel_size
from .precision import MIXED_PRECISIONS, resolve_mixed_precision
from .resources import CONFIG_DIR  # the presets, in the installed package or the source checkout
from .runs import RunFolder

if TYPE_CHECKING:
    import torch

    from .configuration_ibproj import IBProjConfig

DEFAULT_PRESET = CONFIG_DIR / "fashion_mnist_cpu.yaml"
# Settings `--resume` may change: they change what is logged or kept, never the trained weights.
RESUMABLE_FIELDS = ("output_dir", "tracker", "num_workers", "log_every", "keep_checkpoints", "push_to_hub",
                    "hub_strategy", "hub_private", "ddp_timeout")
# What a run's config.yaml records beside its settings (derived from them and the machine; written by
# hf_ibproj.pretraining.write_start_records, ignored on --resume).
RECORDED_KEYS = ("num_processes", "global_batch_size", "scaled_lr", "steps_per_epoch", "total_steps", "image_mean",
                 "image_std", "model")
# How long a run trains: the first one set wins (max_steps, then epochs, then time_budget; the paper's 200 epochs
# if none).
LENGTH_FIELDS = ("max_steps", "epochs", "time_budget")
DEFAULT_EPOCHS = 200


def _arg(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ModelSettings:
    """The IBProjConfig settings a run sets by flag or preset (MODEL_FIELDS), with IBProjConfig's defaults; the
    model is rebuilt from them. The pretraining loop fills in the others (image statistics, interpolation,
    distributed gathering) itself.

    The list and dict settings also take YAML text, their command-line form (TrainConfig parses it).
    """

    backbone: str = _arg("resnet18_small", "timm architecture name: stock timm, or the small-image ResNets "
                                           "resnet18_small, resnet34_small, resnet50_small that hf_ibproj registers")
    backbone_kwargs: dict[str, Any] | str | None = _arg(
        None, "keyword arguments of timm.create_model, as YAML (e.g. {channels: [32, 64, 128, 256]}); in_chans "
              "comes from --channels")
    objective: str = _arg("simclr", "simclr (NT-Xent) or barlow_twins")
    num_views: int = _arg(2, "augmented views per image (>= 2)")
    projector_hidden_dims: list[int] | str | None = _arg(
        None, "widths of the projector's [Linear-(BN)-ReLU] blocks, as YAML (e.g. [2048, 2048]; [] for none); "
              "none: the objective's paper default")
    projector_out_dim: int | None = _arg(
        None, "width of the projector's final plain Linear; 0: none; none: the objective's paper default")
    projector_batch_norm: bool | None = _arg(
        None, "BatchNorm in the projector's hidden blocks; none: the objective's paper default")
    mi_weight: float = _arg(0.0, "lambda of the matrix-MI penalty lambda * I_alpha(Z1;Z2) (docs/method.md section 3a; "
                                 "paper: 1e-4 on CIFAR); 0: off")
    mi_alpha: float = _arg(2.0, "Renyi order alpha of the MI penalty (paper: 2)")
    quantize_levels: int = _arg(0, "FSQ levels L per projector dimension (docs/method.md section 3b); 0: off; "
                                   "paper: 30 for simclr, 3 for barlow_twins")
    sparse_latent_dim: int = _arg(0, "latent size of the top-k sparse block (docs/method.md section 3c); 0: off")
    sparse_topk: int | None = _arg(None, "active latents k of the sparse block; none: the paper ratio (0.001 for "
                                         "simclr, 0.2 for barlow_twins)")
    nt_xent_tau: float = _arg(0.2, "NT-Xent temperature (paper: 0.2)")
    barlow_lambda: float = _arg(0.0051, "weight of the off-diagonal Barlow Twins term (paper: 0.0051)")
    barlow_scale: float = _arg(0.1, "overall Barlow Twins loss scale (paper: 0.1)")
    image_size: int = _arg(32, "input side in pixels (images of other sizes are resized to it)")


MODEL_FIELDS = tuple(field.name for field in dataclasses.fields(ModelSettings))


@dataclasses.dataclass
class TrainConfig(ModelSettings):
    """Every setting of a pretraining run. Paper defaults (docs/method.md section 6) unless a preset says otherwise.

    The model settings (MODEL_FIELDS: backbone, objective, projector and bottleneck settings, ...) are inherited
    from ModelSettings; the fields below are the data, optimization, monitoring and output settings.
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
    decoded_cache_side: int | None = _arg(
        None, "streaming: decode the training images once into a memory-mapped uint8 cache (beside the datasets "
              "cache, reused by later runs), their shorter side capped at this many pixels (>= --image-size; e.g. "
              "256 for 224 px), and crop from it; none: decode every sample from its file at full resolution")
    augmentation: str | None = _arg(None, "augmentation recipe, simclr or barlow_twins (default: the objective's)")
    crop_min_scale: float = _arg(CROP_MIN_SCALE, "smallest area fraction of the random resized crop (docs/method.md "
                                                 "section 6); larger is a weaker augmentation")
    blur_kernel_size: int | None = _arg(None, "Gaussian-blur kernel of the simclr recipe (barlow_twins has no blur), "
                                              "odd (default: ~10% of the image side, at least 3); sigma 0.1-2 px")
    # optimization
    max_steps: int | None = _arg(None, "optimizer steps to train (wins over --epochs and --time-budget)")
    epochs: int | None = _arg(None, f"epochs to train (wins over --time-budget; {DEFAULT_EPOCHS} when no length "
                                    "is set)")
    time_budget: float | None = _arg(
        None, "minutes for the whole run, training and final evaluation: the step count is planned from the "
              "measured step time, and planned again every few steps")
    batch_size: int = _arg(256, "per process and micro-step; global = batch_size x processes x accumulation")
    gradient_accumulation_steps: int = _arg(1, "micro-steps per optimizer step")
    optimizer: str = _arg("lars", "lars, sgd or adamw (timm's implementations)")
    lr: float = _arg(0.4, "learning rate for a global batch of 256, scaled linearly by global_batch / 256")
    weight_decay: float = _arg(1e-4, "weight decay (not on biases and norm parameters)")
    momentum: float = _arg(0.9, "momentum (lars, sgd)")
    lars_eta: float = _arg(0.02, "LARS trust coefficient (with clipping)")
    warmup_epochs: float = _arg(10.0, "linear warm-up length in epochs, then cosine decay")
    mixed_precision: str = _arg("auto", "auto (bf16 where the hardware computes it natively, fp16 on an older CUDA GPU, "
                                          "else no), no, bf16, fp16")
    channels_last: bool = _arg(True, "channels_last memory format")
    sync_batchnorm: bool | None = _arg(None, "BatchNorm statistics over the global batch (SyncBatchNorm, SimCLR's "
                                             "global BN; GPUs only); none: on when training on GPUs with more than "
                                             "one process")
    ddp_timeout: int = _arg(3600, "seconds a process waits for the others (e.g. while the main one prepares the "
                                  "data or evaluates the floor) before the run stops")
    seed: int = _arg(0, "seed of the weights, the data order and the augmentations")
    # monitoring
    log_every: int = _arg(50, "log loss, learning rate and throughput every N steps")
    diagnostics_every: int = _arg(50, "log the information-plane quantities (docs/method.md section 5) every N steps")
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
    overwrite_output_dir: bool = _arg(False, "start anew in a non-empty --output-dir, deleting what is in it (a "
                                             "fresh run otherwise refuses such a folder)")
    final_eval: bool = _arg(True, "linear probe and kNN of the trained backbone at the end, and of the random-init "
                                  "one (on the kNN monitor's subsets) at the start")
    export_backbone: bool = _arg(True, "export the backbone as a timm / transformers Hub folder at the end")
    push_to_hub: str | None = _arg(None, "Hub repo id to push the exported backbone and its card to")
    hub_strategy: str = _arg("end", "end: push when the run ends; checkpoint: also push every checkpoint "
                                    "(resumable from the Hub)")
    hub_private: bool = _arg(False, "create the Hub repo as private")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, _normalized(field.name, getattr(self, field.name)))
        _choice("optimizer", self.optimizer, ("lars", "sgd", "adamw"))
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _choice("hub_strategy", self.hub_strategy, ("end", "checkpoint"))
        if self.augmentation is not None:
            _choice("augmentation", self.augmentation, ("simclr", "barlow_twins"))
        for name in ("batch_size", "gradient_accumulation_steps", "image_size", "log_every", "diagnostics_every",
                     "ddp_timeout",
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
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub)
        self._check_combinations()
        self.model_config()  # the model settings fail here, before any data is loaded

    def _check_combinations(self) -> None:
        """Settings valid alone that do not fit together, refused here rather than once data and model are built."""
        in_chans = (self.backbone_kwargs or {}).get("in_chans", self.channels)
        if in_chans != self.channels:
            raise ValueError(f"--backbone-kwargs sets in_chans: {in_chans} but --channels is {self.channels} (images "
                             "are converted to --channels, which also sets in_chans); drop in_chans from "
                             f"--backbone-kwargs, or pass --channels {in_chans}.")
        if self.decoded_cache_side is not None and not (self.streaming and self.decoded_cache_side >= self.image_size):
            raise ValueError(f"--decoded-cache-side {self.decoded_cache_side} caches the streamed training images "
                             f"for crops of --image-size {self.image_size}: it needs --streaming and a side of at "
                             "least the image size (in-memory datasets are decoded once already).")
        if self.augmentation_preset == "simclr" and self.blur_kernel_size is None:
            smallest = default_blur_kernel_size(self.image_size) // 2 + 1  # reflect padding needs pad < side
            if self.image_size < smallest:
                raise ValueError(f"--image-size {self.image_size} is too small for the simclr augmentation: its "
                                 f"Gaussian blur needs images of at least {smallest} px; pass --image-size {smallest} "
                                 "or more, or --augmentation barlow_twins (which has no blur).")

    @classmethod
    def from_preset(cls, preset: str | Path = DEFAULT_PRESET, **overrides: Any) -> TrainConfig:
        """A preset's settings (a YAML file, e.g. one of configs/) with `overrides`, as train.py's flags would
        give them: a length (max_steps, epochs or time_budget) replaces the preset's length."""
        _check_names(overrides, "TrainConfig.from_preset")
        values = read_preset(preset)
        if set(overrides) & set(LENGTH_FIELDS):
            values = {name: value for name, value in values.items() if name not in LENGTH_FIELDS}
        return cls(**{**values, **overrides})

    @classmethod
    def from_run(cls, output_dir: str | Path, /, **overrides: Any) -> TrainConfig:
        """The stored settings of the run in `output_dir`, to resume it; `overrides` may change only what
        RESUMABLE_FIELDS names (any other setting that differs from the stored one is refused, as on `--resume`).
        The setting output_dir is `output_dir` (the run may have been moved or downloaded) unless overridden."""
        _check_names(overrides, "TrainConfig.from_run")
        stored = cls(**read_run_config(output_dir))
        requested = {name: _normalized(name, value)
                     for name, value in {"output_dir": str(output_dir), **overrides}.items()}
        refuse_resume_changes(stored.to_dict(), requested, RESUMABLE_FIELDS, output_dir)
        return dataclasses.replace(stored, **requested)

    def model_config(self) -> IBProjConfig:
        from .configuration_ibproj import IBProjConfig  # the model stack: not needed to parse flags

        kwargs = {name: getattr(self, name) for name in MODEL_FIELDS}
        kwargs["backbone_kwargs"] = {"in_chans": self.channels, **(self.backbone_kwargs or {})}
        return IBProjConfig(**kwargs)

    def resolve_mixed_precision(self, device: torch.device) -> str:
        """accelerate's mixed_precision on `device` (hf_ibproj.precision.resolve_mixed_precision of this choice)."""
        return resolve_mixed_precision(self.mixed_precision, device)

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


def _check_names(values: dict[str, Any], where: str) -> None:
    known = [field.name for field in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(known)}.")


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _allows(name: str, kinds: tuple[type, ...]) -> bool:
    """Whether TrainConfig's field `name` may hold a value of one of `kinds` (list, dict, NoneType, ...)."""
    annotation = _field_types()[name]
    members = typing.get_args(annotation) or (annotation,)
    return any((typing.get_origin(t) or t) in kinds for t in members)


def _normalized(name: str, value: Any) -> Any:
    """A setting's value as its field's type, from the text a flag or preset may give: YAML for a list or dict,
    a number or boolean as the command line converts it (a preset's `1e-4` is text to YAML)."""
    if name == "mixed_precision" and value is False:  # YAML reads a bare `no` as false
        return "no"
    if not isinstance(value, str):
        return value
    if _allows(name, (list, dict)):
        return _parse_yaml_flag(name, value)
    if _allows(name, (str,)):
        return value
    for kind, convert, expected in ((bool, string_to_bool, "a boolean"), (int, int, "an integer"),
                                    (float, float, "a number")):
        if _allows(name, (kind,)):
            try:
                return convert(value)
            except (ValueError, argparse.ArgumentTypeError):
                raise ValueError(f"{name}={value!r} is invalid; it must be {expected}.") from None
    return value


def _parse_yaml_flag(name: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{flag_name(name)} expects YAML (e.g. [2048, 2048] or {{channels: [32, 64, 128, 256]}}), "
                         f"got {text!r}: {error}") from None
    kinds = [t for t in typing.get_args(_field_types()[name]) if typing.get_origin(t) in (list, dict)]
    if value is not None and not isinstance(value, tuple(typing.get_origin(t) for t in kinds)):
        raise ValueError(f"{flag_name(name)} expects a {' or '.join(map(str, kinds))} as YAML, got {text!r}.")
    return value


def read_preset(path: str | Path) -> dict[str, Any]:
    """A YAML preset's settings. A preset needs no setting in particular: each one it omits takes TrainConfig's
    default (the paper's; `{}` is the paper's run). It must parse as a mapping (an empty file does not) of known
    settings whose values have their fields' types; otherwise one ValueError line names the file and the key."""
    path = Path(path)
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"preset {str(path)!r} does not exist; the presets in configs/ are: {available}.")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"preset {str(path)!r} is not valid YAML ({_yaml_problem(error)}); fix it or pass another "
                         "--config.") from None
    if not isinstance(values, dict):
        raise ValueError(f"preset {str(path)!r} holds {'nothing' if values is None else type(values).__name__}, "
                         "not a mapping of settings (`name: value` lines; `{}` for the defaults); fix it or pass "
                         "another --config.")
    return _known_settings(values, f"preset {str(path)!r}")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The settings a run stored in its config.yaml (RunFolder.config_file), for `--resume`. The file must hold
    every TrainConfig field (beside RECORDED_KEYS) with its field's type: a missing, unknown or malformed key is
    refused with one ValueError line naming the file and the key, so a resumed run never gets a default in place
    of a stored setting."""
    run = RunFolder(run_dir)
    if not run.config_file.is_file():
        raise FileNotFoundError(f"--resume: {run.config_file} does not exist, so the run's configuration is unknown; "
                                "check --output-dir (it must be the folder of the run to continue).")
    stored = run.read_config()
    values = _known_settings(stored, str(run.config_file), RECORDED_KEYS)
    missing = [field.name for field in dataclasses.fields(TrainConfig) if field.name not in stored]
    if missing:
        listed = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ValueError(f"{run.config_file} lacks the setting(s) {listed}: --resume continues a run with the "
                         "settings it stored, never with defaults in their place; restore the file (train.py writes "
                         "it when a run starts), or start a new run in another --output-dir.")
    return values


def _known_settings(values: dict[Any, Any], source: str, recorded: tuple[str, ...] = ()) -> dict[str, Any]:
    """The TrainConfig settings of `values` read from `source` (a preset or a run's config.yaml), as their fields'
    types; a ValueError naming `source` and the key for a key that is neither a setting nor in `recorded`, or a
    value a setting cannot take."""
    known = [field.name for field in dataclasses.fields(TrainConfig)]
    unknown = sorted(str(name) for name in set(values) - {*known, *recorded})
    if unknown:
        raise ValueError(f"{source} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}.")
    settings = {}
    for name in known:
        if name in values:
            try:
                settings[name] = _normalized(name, values[name])
            except ValueError as error:
                raise ValueError(f"{source}: {error}") from None
    return settings


def _yaml_problem(error: Exception) -> str:
    """A YAML parse (or text decoding) error in one line, with its line and column when known."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_arg_parser(defaults: dict[str, Any] | None = None, argument_default: Any = None) -> ArgumentParser:
    """Every TrainConfig field as a flag (defaults: `defaults`, e.g. a preset), plus --config and --resume.

    With `argument_default=argparse.SUPPRESS` no flag has a default: `parse_args` returns only the flags given.
    """
    parser = ArgumentParser(TrainConfig, formatter_class=_HelpFormatter, description=__doc__.split("\n\n")[0],
                            argument_default=argument_default)
    parser.add_argument("--config", help="YAML preset of the settings")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its latest checkpoint, with its stored settings")
    if argument_default is not argparse.SUPPRESS:
        values = {name: _as_flag_default(value) for name, value in (defaults or {}).items()}
        parser.set_defaults(config=str(DEFAULT_PRESET), **values)
    return parser


def _as_flag_default(value: Any) -> Any:
    """A preset value as the parser's default: lists and dicts as the YAML text the flag takes."""
    return yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, (list, dict)) else value


def explicit_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags `argv` gives (`--x V`, `--x=V`, `--no-x`, an abbreviation, ...): what a parser
    without defaults returns."""
    return set(vars(build_arg_parser(argument_default=argparse.SUPPRESS).parse_args(argv)))


def early_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags that decide where the settings come from (--config, --resume, --output-dir, --push-to-hub), and
    --ddp-timeout, which the process group gets before a run from the Hub is downloaded."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", default=str(DEFAULT_PRESET))
    early.add_argument("--resume", action="store_true")
    early.add_argument("--ddp-timeout", "--ddp_timeout", type=int, dest="ddp_timeout",
                       default=TrainConfig.__dataclass_fields__["ddp_timeout"].default)
    for name in ("output_dir", "push_to_hub"):
        early.add_argument(flag_name(name), f"--{name}", dest=name)
    return early.parse_known_args(list(argv) if argv is not None else sys.argv[1:])[0]


def parse_train_config(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """train.py's command line (default: sys.argv[1:]): `TrainConfig.from_preset(--config, **flags given)`, or on
    --resume `TrainConfig.from_run(--output-dir, **flags given)`; and the parsed namespace (.config, .resume)."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    known = early_arguments(argv)
    if known.resume and known.output_dir is None:
        raise ValueError("--resume needs --output-dir, the folder of the run to continue.")
    defaults = read_run_config(known.output_dir) if known.resume else read_preset(known.config)
    args = build_arg_parser(defaults).parse_args(argv)  # --help, and the parser's errors on bad values
    given = explicit_flags(argv)
    overrides = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in given:
            value = getattr(args, field.name)
            if isinstance(value, str) and value.lower() in ("none", "null") and _allows(field.name, (type(None),)):
                value = None  # "none" / "null" on the command line clears an optional setting
            overrides[field.name] = value
    if not known.resume:
        return TrainConfig.from_preset(args.config, **overrides), args
    if "config" in given:
        raise ValueError("--resume continues a run with its own stored configuration; drop --config.")
    return TrainConfig.from_run(known.output_dir, **overrides), args
