"""`hf-ibproj finetune`: fine-tune a pretrained backbone for image classification with transformers' TimmWrapper
and Accelerate.

    hf-ibproj finetune --model timm/resnet18.a1_in1k --dataset uoft-cs/cifar10 --output-dir ft/resnet18
    accelerate launch -m hf_ibproj.finetune --model runs/simclr --dataset fashion_mnist --mode full --output-dir ft/s
    accelerate launch finetune.py ... --output-dir ft/s --resume    # the repository's script: the same command
    accelerate launch --multi_gpu --num_processes 2 -m hf_ibproj.finetune ...  # DDP; CPUs: ACCELERATE_USE_CPU=true

The model is anything hf_ibproj.sources resolves: a training run, IBProjModel or checkpoint folder, a timm folder
(an `hf-ibproj export`, a fine-tuned model), a timm name with pretrained weights or a Hub id. Its backbone gets a
fresh linear classifier (transformers' TimmWrapperForImageClassification) and trains in `--mode linear` (frozen
backbone in eval mode, only the classifier trains) or `--mode full` (everything trains), with AdamW, a cosine
schedule and random resized crop + horizontal flip. Images are brought to the backbone's own preprocessing
(pretrained_cfg: input size, interpolation, crop_pct, mean/std, channels) as timm's eval transform does, whatever
their size and mode; `--image-size` overrides the size. Checkpoints (safetensors and JSON, written atomically)
let `--resume` continue exactly where a run stopped; every augmentation draw is seeded by (seed, epoch, sample),
so the result does not depend on interruptions or on the number of DataLoader workers. The result is saved so that
`transformers.pipeline("image-classification", model=OUTPUT_DIR)` loads it, with a model card whose base_model is
the Hub id it started from (a local path never is one), and `--push-to-hub REPO_ID` uploads it. A fine-tuned
small-image ResNet (resnet18_small, ...) carries its code as `hf-ibproj export` does, so
`pipeline("image-classification", model=OUTPUT_DIR, trust_remote_code=True)` loads it without hf_ibproj.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, parse_flag_from_env, set_seed
from huggingface_hub import ModelCard
from timm.data.transforms import str_to_interp_mode
from timm.models import get_model_args
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, get_cosine_schedule_with_warmup

from .arguments import Split, refuse_resume_changes
from .backbones import SMALL_RESNETS
from .cards import classifier_card
from .evaluation import check_labels, shared_class_names
from .export import carry_small_resnet_code
from .finetune_cli import RESUMABLE_CHANGES, FinetuneArguments, main
from .hub import check_push_access, push_folder
from .precision import resolve_mixed_precision
from .progress import progress_bar
from .checkpoints import CHECKPOINTS, checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint
from .runs import write_json
from .seeding import sample_seed, seeded
from .sources import Source, resolve_source

ARGUMENTS_FILE = "finetune_args.json"  # the arguments of the run in OUTPUT_DIR, checked by --resume
RESULTS_FILE = "results.json"


class SeededTransformSplit(Dataset):
    """(float pixel_values, label) of a split's rows through a transform whose random draws are seeded per sample.

    The seed is a function of (seed, epoch, position), so an epoch's augmentation is the same whichever process
    or DataLoader worker draws it, and after a resume; set `epoch` before each pass.
    """

    def __init__(self, split: Split, transform: v2.Transform, seed: int) -> None:
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        image, label = self.split.dataset[int(self.split.indices[position])][:2]
        with seeded(sample_seed(self.seed, self.epoch, position)):
            return self.transform(image), label


def build_classifier(source: Source, data_config: dict[str, Any], class_names: list[str]) -> torch.nn.Module:
    """The source's backbone under a fresh linear classifier, as a TimmWrapperForImageClassification.

    The config carries the architecture and model_args timm rebuilds it from, and as pretrained_cfg the
    preprocessing it is fine-tuned with (what AutoImageProcessor and the image-classification pipeline apply).
    """
    backbone = source.backbone
    config = TimmWrapperConfig(
        architecture=backbone.pretrained_cfg["architecture"],
        model_args={k: v for k, v in get_model_args(backbone).items() if k != "num_classes"},  # num_labels sets it
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: index for index, name in enumerate(class_names)},
    )
    config.pretrained_cfg = {**data_config, "num_classes": len(class_names)}
    model = TimmWrapperForImageClassification(config)
    missing, unexpected = model.timm_model.load_state_dict(backbone.state_dict(), strict=False)
    classifier = {id(p) for p in model.timm_model.get_classifier().parameters()}
    new = {name for name, p in model.timm_model.named_parameters() if id(p) in classifier}
    if unexpected or set(missing) != new:
        raise RuntimeError(f"the backbone's weights do not fit its architecture: missing {missing}, "
                           f"unexpected {unexpected}.")
    return model


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
    for pixel_values, labels in progress_bar(loader, desc="evaluation", unit="batch", leave=False,
                                             disable=not accelerator.is_local_main_process):
        predictions = model(pixel_values=pixel_values).logits.argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += (predictions == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


# --------------------------------------------------------------------------------------------- run folder


def check_output_dir(args: FinetuneArguments, num_processes: int) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses to overwrite a run or to resume a different one,
    also with another process count (the batches per step and the epoch's sharding would change)."""
    output_dir = Path(args.output_dir)
    checkpoint = latest_checkpoint(output_dir)
    if not args.resume:
        if output_dir.exists() and any(output_dir.iterdir()):
            raise FileExistsError(f"--output-dir {output_dir} is not empty; pass --resume to continue the run in it "
                                  "or choose another --output-dir.")
        return None
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: {output_dir} has no checkpoint to resume from; check --output-dir.")
    saved = json.loads((output_dir / ARGUMENTS_FILE).read_text())
    refuse_resume_changes(saved, dataclasses.asdict(args), RESUMABLE_CHANGES, output_dir)
    if saved.get("num_processes", num_processes) != num_processes:
        raise ValueError(f"--resume: the run in {output_dir} trained with {saved['num_processes']} process(es), this "
                         f"launch has {num_processes}; launch it with accelerate launch --num_processes "
                         f"{saved['num_processes']}.")
    return checkpoint


def save_result(model: torch.nn.Module, card: ModelCard, results: dict[str, Any], output_dir: Path) -> None:
    """save_pretrained + card + results into a staging folder, then each file renamed into OUTPUT_DIR.

    A small-image ResNet also gets its code and the config.json keys (model type, auto_map) that let transformers
    load it with `trust_remote_code=True` where hf_ibproj is not installed, as `hf-ibproj export` writes them.
    """
    staging = output_dir / ".result-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    # TimmWrapper keeps the preprocessing (timm's pretrained_cfg) in config.json, so this one call also makes
    # AutoImageProcessor and pipeline("image-classification") work from the folder.
    model.save_pretrained(staging)
    if model.config.architecture in SMALL_RESNETS:
        carry_small_resnet_code(staging)
    card.save(staging / "README.md")
    write_json(staging / RESULTS_FILE, results)
    for file in staging.iterdir():
        os.replace(file, output_dir / file.name)
    staging.rmdir()


def push_result(output_dir: Path, repo_id: str, private: bool) -> str:
    """Upload the fine-tuned model (not its checkpoints or hidden files); returns the commit URL."""
    return push_folder(
        output_dir, repo_id, private=private, commit_message="Upload fine-tuned classifier (hf-ibproj finetune)",
        ignore_patterns=[f"{CHECKPOINTS}/**", ".*"],
        retry=f"The fine-tuned model is saved in {output_dir}; push it again with `hf upload {repo_id} {output_dir}`.",
    )


# --------------------------------------------------------------------------------------------- main


def finetune(args: FinetuneArguments) -> dict[str, Any]:
    """Fine-tune as `args` say and save the result in OUTPUT_DIR (pushed with --push-to-hub); returns its results.

    Bad input raises ValueError / OSError before anything is written; a failed push raises PushError after the
    result is saved.
    """
    if args.push_to_hub is not None:
        check_push_access(args.push_to_hub)  # no token fails before any work, as `hf-ibproj push` does
    # Without cpu=True on a machine without GPUs, `accelerate launch --multi_gpu` starts independent runs
    # instead of one gloo process group.
    use_cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    mixed_precision = resolve_mixed_precision(args.mixed_precision, PartialState(cpu=use_cpu).device)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed_precision, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=args.seed))  # the epoch's order: a function of (seed, epoch)
    output_dir = Path(args.output_dir)
    checkpoint = check_output_dir(args, accelerator.num_processes)
    accelerator.wait_for_everyone()  # every process has checked OUTPUT_DIR before the main one writes to it
    set_seed(args.seed)

    source = resolve_source(args.model)
    data_config = source.data_config(args.image_size)
    train, test = args.open_splits(data_config)
    class_names = shared_class_names(train.dataset.class_names, test.dataset.class_names)
    num_classes = check_labels(train.labels, test.labels, class_names)  # both labeled, with the same classes
    class_names = class_names or [str(i) for i in range(num_classes)]
    model = build_classifier(source, data_config, class_names)
    if args.mode == "linear":
        model.requires_grad_(False)
        model.timm_model.get_classifier().requires_grad_(True)

    size = data_config["input_size"][-1]
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data_config["mean"], data_config["std"])]
    augment = v2.Compose([
        v2.RandomResizedCrop(size, scale=(args.min_crop_scale, 1.0), antialias=True,
                             interpolation=str_to_interp_mode(data_config["interpolation"])),
        v2.RandomHorizontalFlip(),
        *normalize,
    ])
    train_data = SeededTransformSplit(train, augment, args.seed)
    loader_kwargs = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    train_loader = DataLoader(train_data, shuffle=True, **loader_kwargs)
    test_loader = DataLoader(SeededTransformSplit(test, v2.Compose(normalize), args.seed), **loader_kwargs)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    total_steps = args.epochs * len(train_loader)  # before sharding: the prepared scheduler steps once per process
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    step = 0
    if checkpoint is not None:
        checkpoint, _ = load_checkpoint(accelerator, output_dir)  # the newest intact one
        step = checkpoint_step(checkpoint)
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / ARGUMENTS_FILE, {**dataclasses.asdict(args), "num_processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    steps_per_epoch = len(train_loader)
    accelerator.print(
        f"fine-tuning {args.model} ({source.kind}, {args.mode}) on {args.dataset}: {len(train)} train / "
        f"{len(test)} eval images at {tuple(data_config['input_size'])}, {num_classes} classes, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}"
        + (f"; resuming at step {step} from {checkpoint}" if checkpoint is not None else "")
    )

    progress = progress_bar(total=args.epochs * steps_per_epoch, initial=step, desc="fine-tuning", unit="step",
                            disable=not accelerator.is_local_main_process)
    start_epoch, skip = divmod(step, steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        set_train_mode(accelerator.unwrap_model(model), args.mode)
        train_data.epoch = epoch
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if epoch == start_epoch and skip else train_loader
        for pixel_values, labels in batches:
            loss = model(pixel_values=pixel_values, labels=labels).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            progress.update()
            progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", refresh=False)
            if step % args.checkpoint_every == 0 or step % steps_per_epoch == 0:
                save_checkpoint(accelerator, output_dir, step, args.keep_checkpoints)
    progress.close()

    accuracy = evaluate(model, test_loader, accelerator)
    accelerator.print(f"accuracy ({args.eval_split}): {accuracy:.2f}%")
    accelerator.wait_for_everyone()
    results = {"eval_accuracy": accuracy, "eval_split": args.eval_split, "mode": args.mode, "model": args.model,
               "base_model": source.base_model, "dataset": args.dataset, "data_config": data_config,
               "num_processes": accelerator.num_processes, "epochs": args.epochs, "steps": step}
    if accelerator.is_main_process:
        save_result(accelerator.unwrap_model(model), classifier_card(args, source, accuracy, class_names), results,
                    output_dir)
        if args.push_to_hub is not None:
            accelerator.print(f"pushed to {push_result(output_dir, args.push_to_hub, args.hub_private)}")
    accelerator.end_training()
    return results


if __name__ == "__main__":
    sys.exit(main())
