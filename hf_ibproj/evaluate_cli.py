"""`hf-ibproj evaluate`: linear probe and kNN accuracy of any backbone on any labeled image dataset.

    hf-ibproj evaluate --model runs/simclr --dataset fashion_mnist --random-init
    hf-ibproj evaluate --model timm/resnet18.a1_in1k --dataset uoft-cs/cifar10 --output-dir eval/resnet18

The model is anything hf_ibproj.sources resolves (run folder, IBProjModel or checkpoint folder, timm folder, timm
name, Hub id); the dataset is brought to the backbone's own preprocessing (pretrained_cfg: input size,
interpolation, crop_pct, mean/std, channels), as timm's eval transform would. Images are decoded per sample in
DataLoader workers and only the features are kept, so any dataset size fits in memory. The evaluation's modules are
imported when it runs, so `hf-ibproj --help` does not load them.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .arguments import DataArguments, Split, arguments_from_namespace
from .runs import write_json

RESULTS_FILE = "eval_results.json"


@dataclass(kw_only=True)
class EvaluateArguments(DataArguments):
    """The flags of `hf-ibproj evaluate`."""

    model: str = field(metadata={"help": "run folder, IBProjModel or checkpoint folder, timm folder (an export), "
                                         "timm name with pretrained weights, or Hub id"})
    random_init: bool = field(default=False, metadata={
        "help": "also evaluate the same architecture untrained (the floor) and print both rows"})
    batch_size: int = field(default=512, metadata={"help": "feature-extraction batch size"})
    mixed_precision: Literal["auto", "no", "bf16"] = field(default="auto", metadata={
        "help": "feature-extraction precision; auto: bf16 where the hardware computes it natively, fp16 on an older CUDA GPU, "
                "else float32"})
    device: str | None = field(default=None, metadata={"help": "feature-extraction device; None: cuda if available, else cpu"})
    output_dir: str | None = field(default=None, metadata={"help": f"write the results to OUTPUT_DIR/{RESULTS_FILE}; None: print only"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {self.batch_size}.")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser(
        "evaluate",
        dataclass_types=[EvaluateArguments],
        help="linear probe and kNN accuracy of a frozen backbone",
        description="Extract features once, then a linear probe (logistic regression, weight decay chosen on a "
        "validation split of train) and a weighted kNN (cosine, k=200, T=0.1). Accuracies in percent.",
    ).set_defaults(func=_command)


def _command(namespace: argparse.Namespace) -> int:
    evaluate(arguments_from_namespace(EvaluateArguments, namespace))
    return 0


def evaluate(args: EvaluateArguments) -> dict[str, Any]:
    """Run the evaluation: print the table, write OUTPUT_DIR/eval_results.json when asked, return that report."""
    from .evaluation import check_labels, evaluate_features, format_table, shared_class_names
    from .sources import resolve_source

    source = resolve_source(args.model)
    data_config = source.data_config(args.image_size)
    train, test = args.open_splits(data_config)
    class_names = shared_class_names(train.dataset.class_names, test.dataset.class_names)
    check_labels(train.labels, test.labels, class_names)  # before any image is decoded
    backbones = {"trained": source.backbone}
    if args.random_init:
        backbones["random-init"] = resolve_source(args.model, random_init=True, seed=args.seed).backbone
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for name, backbone in backbones.items():
        features = [_features(backbone, split, data_config, args, device) for split in (train, test)]
        (train_features, train_labels), (test_features, test_labels) = features
        results[name] = evaluate_features(train_features, train_labels, test_features, test_labels,
                                          class_names=class_names, seed=args.seed)
    print(format_table(results))
    report = {"model": args.model, "dataset": args.dataset, "train_split": args.train_split,
              "eval_split": args.eval_split, "data_config": data_config, "arguments": asdict(args),
              "results": results}
    if args.output_dir is not None:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.output_dir) / RESULTS_FILE, report)
    return report


def _features(
    backbone: torch.nn.Module, split: Split, data_config: dict[str, Any], args: EvaluateArguments, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    from .evaluation import extract_dataset_features

    return extract_dataset_features(
        backbone, split.dataset, split.indices.tolist(), data_config["mean"], data_config["std"],
        batch_size=args.batch_size, num_workers=args.num_workers, device=device, precision=args.mixed_precision,
    )
