"""Fine-tune a pretrained backbone for image classification with transformers' TimmWrapper and Accelerate.

    accelerate launch finetune.py --backbone runs/simclr/backbone --dataset fashion_mnist --mode linear --output-dir ft
    accelerate launch --multi_gpu --num_processes 2 finetune.py ...        # DDP; on CPUs set ACCELERATE_USE_CPU=true

The backbone is any timm Hub folder or Hub id (an `hf-ibproj export` folder, `timm/resnet18.a1_in1k`, ...). It is
loaded with `AutoModelForImageClassification` (TimmWrapperForImageClassification) with a fresh classifier, trained
with standard augmentation (random resized crop, horizontal flip) in `--mode linear` (frozen backbone in eval mode,
only the classifier trains) or `--mode full` (everything trains), evaluated on the test split, and saved so that
`transformers.pipeline("image-classification", model=OUTPUT_DIR)` loads it, with a model card naming the backbone
as base_model. Importing hf_ibproj registers its small-image ResNets with timm, so their exports load here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env, set_seed
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from transformers import AutoImageProcessor, AutoModelForImageClassification, get_cosine_schedule_with_warmup

import hf_ibproj  # noqa: F401  (registers resnet18_small & co. with timm, so exported hf_ibproj backbones load)
from hf_ibproj.data import ImageData, load_image_data
from hf_ibproj.evaluation import check_labels

DEFAULT_LR = {"linear": 1e-3, "full": 1e-4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="timm Hub folder or Hub id of the pretrained backbone")
    parser.add_argument("--dataset", required=True, help="labeled dataset: Hub id, image folder or save_to_disk folder")
    parser.add_argument("--output-dir", required=True, type=Path, help="where the fine-tuned model is saved")
    parser.add_argument("--mode", choices=("linear", "full"), default="linear",
                        help="linear: frozen backbone, train the classifier only; full: train everything")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--image-column", default=None, help="default: detected (image, img, ...)")
    parser.add_argument("--label-column", default=None, help="default: detected (label, labels, ...)")
    parser.add_argument("--max-samples", type=int, default=None, help="use the first N rows of each split")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate; default {DEFAULT_LR}")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of the steps spent warming up")
    parser.add_argument("--min-crop-scale", type=float, default=0.5, help="RandomResizedCrop scale lower bound")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.mode]
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be positive")
    if not 0 < args.min_crop_scale <= 1:
        parser.error("--min-crop-scale must be in (0, 1]")
    return args


class TransformedImages(Dataset):
    """uint8 (C, H, W) images with their labels, passed through a per-sample transform."""

    def __init__(self, data: ImageData, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = data.images, data.labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def load_splits(args: argparse.Namespace, channels: int, image_size: int) -> tuple[ImageData, ImageData, list[str]]:
    """Train and test splits at the backbone's input size; they must be labeled with the same classes."""
    splits = [
        load_image_data(args.dataset, split, image_column=args.image_column, label_column=args.label_column,
                        channels=channels, image_size=image_size, max_samples=args.max_samples)
        for split in (args.train_split, args.test_split)
    ]
    train, test = splits
    num_classes = check_labels(train, test)  # both labeled, with the same classes
    class_names = train.class_names or test.class_names or [str(i) for i in range(num_classes)]
    return train, test, list(class_names)


def set_train_mode(model: torch.nn.Module, mode: str) -> None:
    """Train mode, except a frozen backbone stays in eval mode (BatchNorm statistics are part of it)."""
    model.train()
    if mode == "linear":
        model.timm_model.eval()
        model.timm_model.get_classifier().train()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Top-1 accuracy in percent over the whole split (all processes)."""
    model.eval()
    correct = total = 0
    for pixel_values, labels in loader:
        predictions = model(pixel_values=pixel_values).logits.argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += (predictions == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def write_model_card(args: argparse.Namespace, accuracy: float, class_names: list[str]) -> None:
    dataset_is_hub_id = not Path(args.dataset).expanduser().exists()
    card_data = ModelCardData(
        model_name=args.output_dir.name,
        base_model=args.backbone,
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "hf_ibproj", f"{args.mode}-fine-tuning"],
        datasets=[args.dataset] if dataset_is_hub_id else None,
        metrics=["accuracy"],
        eval_results=[EvalResult(
            task_type="image-classification", dataset_type=args.dataset, dataset_name=args.dataset,
            dataset_split=args.test_split, metric_type="accuracy", metric_name="top-1 accuracy (%)",
            metric_value=round(accuracy, 2),
        )],
    )
    what = "a linear classifier on the frozen backbone" if args.mode == "linear" else "the whole network"
    content = f"""---
{card_data.to_yaml()}
---

# {args.output_dir.name}

An image classifier fine-tuned from [`{args.backbone}`]({args.backbone}) on `{args.dataset}`: {what} was trained
for {args.epochs} epochs (AdamW, lr {args.lr}, cosine schedule, random resized crop + horizontal flip) with
hf_ibproj's `finetune.py`. Test accuracy (`{args.test_split}` split): **{accuracy:.2f}%**.
Classes: {", ".join(class_names)}.

```python
from transformers import pipeline
classifier = pipeline("image-classification", model="{args.output_dir.name}")
```
If the backbone is one of hf_ibproj's small-image ResNets (`resnet18_small`, ...), `import hf_ibproj` first.
"""
    ModelCard(content).save(args.output_dir / "README.md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Without cpu=True on a machine without GPUs, `accelerate launch --multi_gpu` starts independent runs
    # instead of one gloo process group (DESIGN.md, Distributed).
    use_cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=args.mixed_precision)
    set_seed(args.seed)

    processor = AutoImageProcessor.from_pretrained(args.backbone)
    data_config = processor.data_config  # timm's pretrained_cfg of the backbone: input size, mean, std
    channels, height, width = data_config["input_size"]
    if height != width:
        raise ValueError(f"the backbone expects {height}x{width} inputs; finetune.py handles square inputs only.")
    train, test, class_names = load_splits(args, channels, height)

    model = AutoModelForImageClassification.from_pretrained(
        args.backbone,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: index for index, name in enumerate(class_names)},
        ignore_mismatched_sizes=True,  # the backbone's own classifier (if any) is replaced
    )
    if args.mode == "linear":
        model.requires_grad_(False)
        model.timm_model.get_classifier().requires_grad_(True)

    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data_config["mean"], data_config["std"])]
    train_transform = v2.Compose([
        v2.RandomResizedCrop(height, scale=(args.min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        *normalize,
    ])
    loader_kwargs = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    train_loader = DataLoader(TransformedImages(train, train_transform), shuffle=True, drop_last=False, **loader_kwargs)
    test_loader = DataLoader(TransformedImages(test, v2.Compose(normalize)), **loader_kwargs)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay
    )
    total_steps = args.epochs * len(train_loader)  # before sharding: the prepared scheduler steps once per process
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    accelerator.print(
        f"fine-tuning {args.backbone} ({args.mode}) on {args.dataset}: {len(train)} train / {len(test)} test images, "
        f"{len(class_names)} classes, {accelerator.num_processes} process(es) on {accelerator.device}"
    )

    for epoch in range(args.epochs):
        set_train_mode(accelerator.unwrap_model(model), args.mode)
        for pixel_values, labels in train_loader:
            loss = model(pixel_values=pixel_values, labels=labels).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        accelerator.print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}")

    accuracy = evaluate(model, test_loader, accelerator)
    accelerator.print(f"test accuracy ({args.test_split}): {accuracy:.2f}%")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # TimmWrapper keeps the preprocessing (timm's pretrained_cfg) in config.json, so this one call also makes
        # AutoImageProcessor and pipeline("image-classification") work from the folder.
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        write_model_card(args, accuracy, class_names)
        results = {"test_accuracy": accuracy, "mode": args.mode, "backbone": args.backbone, "dataset": args.dataset,
                   "num_processes": accelerator.num_processes, "epochs": args.epochs}
        (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as error:  # bad arguments, missing files, a backbone id that does not resolve
        print(f"finetune.py: error: {error}", file=sys.stderr)
        sys.exit(2)
