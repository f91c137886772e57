"""The command-line conventions shared by train.py, `hf-ibproj evaluate` and finetune.py.

Flags come from dataclass fields through transformers' HfArgumentParser: `--foo-bar` for field foo_bar, help text
from the field's metadata, every default shown in --help, choices from Literal types. `ArgumentParser` makes every
boolean `--flag / --no-flag` (see its docstring). `DataArguments` holds the dataset flags of `hf-ibproj evaluate`
and finetune.py (spelled as in train.py) and opens a split at a backbone's preprocessing.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

if TYPE_CHECKING:
    from .data import StreamingImageDataset

T = TypeVar("T")


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser, with for every dataclass field:

    - a boolean (`bool` or `bool | None`) as `--flag [VALUE] / --no-flag`: a bare `--flag` is true (HfArgumentParser
      adds `--no-flag` only to booleans defaulting to True, and makes a `bool | None` flag need a value);
    - only the dash spelling in --help (the `--foo_bar` spelling HfArgumentParser adds is still accepted);
    - its help shown as written: a `%` in it is not an argparse format;
    - `argument_default=argparse.SUPPRESS` honored (HfArgumentParser passes every field's default): such a parser's
      `parse_args` returns only the flags the command line gives.
    """

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        boolean = field.type in (bool, bool | None)  # read first: HfArgumentParser rewrites field.type
        flags = _FieldFlags(parser)
        HfArgumentParser._parse_dataclass_field(flags, field)
        if boolean:
            dash = field.name.replace("_", "-")
            flags.add(f"--no_{field.name}", f"--no-{dash}", action="store_false", dest=field.name,
                      default=argparse.SUPPRESS, help=f"turn --{dash} off")


class _FieldFlags:
    """A parser as `HfArgumentParser._parse_dataclass_field` sees it: its `add_argument` calls, adjusted as
    `ArgumentParser` says."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action | None:
        if kwargs.get("action") == "store_false":
            return None  # its --no-flag of a boolean defaulting to True: ArgumentParser adds one to every boolean
        if kwargs.get("type") is string_to_bool:
            kwargs.update(nargs="?", const=True)  # as it does for a boolean with a default
        return self.add(*flags, **kwargs)

    def add(self, *flags: str, **kwargs: Any) -> argparse.Action:
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = kwargs["help"].replace("%", "%%")
        if kwargs.get("required") or self.parser.argument_default is argparse.SUPPRESS:
            kwargs["default"] = argparse.SUPPRESS  # and no "(default: None)" in --help on a required flag
        action = self.parser.add_argument(*flags, **kwargs)
        action.option_strings = [flag for flag in flags if "_" not in flag]  # what --help and errors show
        return action


def arguments_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """The dataclass `cls` from a namespace parsed by an `ArgumentParser` built on it (e.g. as a sub-command)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init})


def flag_name(field_name: str) -> str:
    """The command-line spelling of a dataclass field: `--foo-bar` for `foo_bar`."""
    return f"--{field_name.replace('_', '-')}"


def check_repo_id(repo_id: str, flag: str = "--push-to-hub") -> None:
    """A Hub repository id 'username/name' (huggingface_hub's own rules), or ValueError naming `flag`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise ValueError(f"{flag} {repo_id!r} is not a Hub repository id; expected 'username/model-name'.")


def refuse_resume_changes(stored: dict[str, Any], requested: dict[str, Any], resumable: tuple[str, ...],
                          output_dir: str | Path) -> None:
    """`--resume` continues a run as it was configured: refuse any setting outside `resumable` that differs from
    the stored one, naming each flag with its stored and requested values (train.py and finetune share this)."""
    changed = [name for name in requested if name not in resumable and name in stored
               and requested[name] != stored[name]]
    if changed:
        details = "; ".join(f"{flag_name(n)} ({stored[n]!r} -> {requested[n]!r})" for n in changed)
        raise ValueError(
            f"--resume continues the run in {output_dir} as it was configured, but {details} would change it. Drop "
            f"the flag(s), or start a new run in another --output-dir. Flags allowed on resume: "
            f"{', '.join(flag_name(n) for n in resumable)}."
        )


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(kw_only=True)
class DataArguments:
    """The dataset flags of `hf-ibproj evaluate` and finetune.py (names as in train.py)."""

    dataset: str = field(metadata=_help(
        "Hub dataset id, image folder (class sub-folders), save_to_disk folder, or the built-in fashion_mnist"))
    train_split: str = field(default="train", metadata=_help("split the probe / classifier is trained on"))
    eval_split: str = field(default="test", metadata=_help("split the accuracy is measured on"))
    image_column: str | None = field(default=None, metadata=_help("image column; None: detected (image, img, ...)"))
    label_column: str | None = field(default=None,
                                     metadata=_help("label column; None: detected (label, labels, ...)"))
    max_samples: int | None = field(default=None, metadata=_help(
        "use a seeded, class-stratified subset of this many training images; None: all"))
    eval_max_samples: int | None = field(default=None, metadata=_help(
        "use a seeded, class-stratified subset of this many evaluation images; None: all"))
    image_size: int | None = field(default=None, metadata=_help(
        "input size in pixels; None: the backbone's own (its pretrained_cfg input_size). Images of any size "
        "are resized (up or down) and center-cropped as timm's eval transform does, with the backbone's "
        "interpolation and crop_pct"))
    num_workers: int = field(default=2, metadata=_help("DataLoader worker processes that decode the images"))
    seed: int = field(default=0, metadata=_help("seed of the subsets, the random-init backbone and the fits"))

    def __post_init__(self) -> None:
        for name in ("max_samples", "eval_max_samples", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be 0 or more, got {self.num_workers}.")

    def open_splits(self, data_config: dict[str, Any]) -> tuple[Split, Split]:
        """The train and eval splits at a backbone's preprocessing, decoded per sample (any dataset size).

        `data_config` is a timm data config (hf_ibproj.sources.Source.data_config): images are decoded to its
        channels (gray <-> RGB) and resized + center-cropped to its square input size with its interpolation and
        crop_pct. Rows: all of them, or a stratified subset of --max-samples / --eval-max-samples chosen from the
        labels alone (no image is decoded to choose them).
        """
        from .data import StreamingImageDataset, stratified_indices  # datasets: loaded when a command runs, not for --help

        channels, height, width = data_config["input_size"]
        if height != width:
            raise ValueError(f"the backbone expects {height}x{width} inputs; pass --image-size S for S x S inputs.")
        if data_config.get("crop_mode", "center") != "center":
            warnings.warn(f"the backbone's crop_mode {data_config['crop_mode']!r} is not supported; "
                          "images are resized and center-cropped instead.")
        splits = []
        for split, count in ((self.train_split, self.max_samples), (self.eval_split, self.eval_max_samples)):
            stream = StreamingImageDataset.from_source(
                self.dataset, split, image_column=self.image_column, label_column=self.label_column,
                channels=channels, image_size=height, interpolation=data_config["interpolation"],
                crop_pct=data_config["crop_pct"],
            )
            labels = stream.labels  # the label column alone: no image is decoded to choose the rows
            indices = torch.arange(len(stream)) if count is None else stratified_indices(
                labels, count, self.seed, num_rows=None if labels is not None else len(stream))
            splits.append(Split(stream, indices, None if labels is None else labels[indices]))
        return splits[0], splits[1]


@dataclass
class Split:
    """Rows `indices` of a per-sample dataset and their labels (None for an unlabeled dataset)."""

    dataset: StreamingImageDataset
    indices: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.indices)
