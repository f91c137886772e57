"""The command line of `hf-ibproj finetune` (and of finetune.py, `accelerate launch -m hf_ibproj.finetune`).

Only the flags live here; `hf_ibproj.finetune` (the loop, and its model stack) is imported when the command runs,
so `hf-ibproj --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Literal

from . import cli
from .arguments import DataArguments, arguments_from_namespace, check_repo_id, flag_name

DEFAULT_LR = {"linear": 1e-3, "full": 1e-4}
# Arguments a resumed run may change (a moved folder, other workers, where to push): they change nothing computed.
RESUMABLE_CHANGES = ("output_dir", "resume", "num_workers", "push_to_hub", "hub_private")


@dataclass(kw_only=True)
class FinetuneArguments(DataArguments):
    """The flags of `hf-ibproj finetune` (and of finetune.py, the same command)."""

    model: str = field(metadata={"help": "what to fine-tune: run folder, IBProjModel or checkpoint folder, timm "
                                         "folder (an export), timm name with pretrained weights, or Hub id"})
    output_dir: str = field(metadata={"help": "where checkpoints and the fine-tuned model are written"})
    mode: Literal["linear", "full"] = field(default="linear", metadata={
        "help": "linear: frozen backbone, train the classifier only; full: train everything"})
    epochs: int = field(default=10, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=128, metadata={"help": "images per process and step"})
    lr: float | None = field(default=None, metadata={
        "help": f"AdamW learning rate; None: {DEFAULT_LR['linear']:g} (linear) or {DEFAULT_LR['full']:g} (full)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming up"})
    min_crop_scale: float = field(default=0.5, metadata={"help": "RandomResizedCrop scale lower bound, in (0, 1]"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "auto: bf16 where the hardware computes it natively, fp16 on an older CUDA GPU, else no (float32)"})
    checkpoint_every: int = field(default=500, metadata={
        "help": "steps between checkpoints; one is also written at the end of every epoch"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in OUTPUT_DIR/checkpoints"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --output-dir from its latest checkpoint (same arguments)"})
    push_to_hub: str | None = field(default=None, metadata={
        "help": "Hub repository REPO_ID ('username/model-name') to upload the fine-tuned model to"})
    hub_private: bool = field(default=False, metadata={"help": "create the --push-to-hub repository as private"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        for name in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag_name(name)} must be a positive integer, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}.")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"--min-crop-scale must be in (0, 1], got {self.min_crop_scale}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`hf-ibproj finetune --model SRC --dataset DATA --output-dir OUT ...`."""
    subparsers.add_parser(
        "finetune",
        dataclass_types=[FinetuneArguments],
        help="fine-tune a backbone for image classification (linear or full)",
        description="Fine-tune a pretrained backbone for image classification (transformers' TimmWrapper, "
        "Accelerate): a new linear classifier on the frozen backbone (--mode linear) or the whole network "
        "(--mode full).",
    ).set_defaults(func=_command)


def _command(namespace: argparse.Namespace) -> int:
    from .finetune import finetune
    from .hub import PushError

    try:
        finetune(arguments_from_namespace(FinetuneArguments, namespace))
    except PushError as error:
        print(f"hf-ibproj finetune: error: {error}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> FinetuneArguments:
    """The flags of `hf-ibproj finetune` (default: sys.argv[1:]) as FinetuneArguments; bad values raise ValueError."""
    namespace = cli.build_parser().parse_args(["finetune", *(sys.argv[1:] if argv is None else argv)])
    return arguments_from_namespace(FinetuneArguments, namespace)


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m hf_ibproj.finetune ARGS` and finetune.py: `hf-ibproj finetune ARGS`, exit status 2
    for bad input and 1 for a failed push (after the result is saved)."""
    return cli.main(["finetune", *(sys.argv[1:] if argv is None else argv)])


# --------------------------------------------------------------------------------------------- data and model
