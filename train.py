"""Pretrain an encoder with a bottleneck projector ("Projection Head is Secretly an Information Bottleneck").

    python train.py                                   # CPU preset: SimCLR on Fashion-MNIST, then probe + kNN
    python train.py --config configs/cifar10_simclr.yaml --quantize-levels 30
    accelerate launch --num_processes 8 train.py --config configs/imagenet100_barlow_twins.yaml
    python train.py --output-dir runs/x --resume      # continue from the latest checkpoint of runs/x

One Accelerate loop: data -> two-view augmentation on the device -> IBProjModel (backbone -> projector)
-> SSL loss + MI penalty; an online linear probe on detached encoder features, a kNN monitor every epoch,
the information-plane diagnostics of PAPER.md section 5, atomic checkpoints, and a run folder holding the
resolved config, seed, versions, metrics, plot, final model, exported backbone and final evaluation.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from hf_ibproj import IBProjModel
from hf_ibproj.augmentation import TwoViewAugmentation
from hf_ibproj.data import ImageData, StreamingImageDataset, load_image_data
from hf_ibproj.evaluation import evaluate_backbone, extract_features, format_table, knn_accuracy
from hf_ibproj.hub import export_backbone
from hf_ibproj.plotting import plot_information_plane
from hf_ibproj.runs import (
    MetricsLog,
    hardware_summary,
    latest_checkpoint,
    library_versions,
    save_checkpoint,
    write_json,
    write_yaml,
)
from hf_ibproj.train_config import TrainConfig, parse_train_config


class NonFiniteLossError(RuntimeError):
    pass


class TrainingProgress:
    """Optimizer steps done; saved in every checkpoint so `--resume` continues mid-epoch."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def resolve_run_dir(config: TrainConfig, state: PartialState, resume: bool) -> Path:
    """The output folder, the same on every process; refuses to overwrite a run unless resuming it."""
    name = config.output_dir or f"runs/{config.objective}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(broadcast_object_list([name])[0])
    has_checkpoint = latest_checkpoint(run_dir) is not None
    if resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from; check --output-dir.")
    if not resume and has_checkpoint:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output-dir.")
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_data(config: TrainConfig, accelerator: Accelerator) -> tuple[ImageData | None, ImageData | None, object]:
    """Training data (decoded once in memory, or a per-sample dataset for `--streaming`) and the held-out split."""
    common = dict(image_column=config.image_column, label_column=config.label_column, channels=config.channels,
                  image_size=config.image_size)
    with accelerator.main_process_first():
        held_out = None
        if config.eval_split:
            held_out = load_image_data(config.dataset, config.eval_split, max_samples=config.eval_max_samples, **common)
        if config.streaming:
            stream = StreamingImageDataset.from_source(
                config.dataset, config.train_split, image_column=config.image_column,
                label_column=config.label_column, channels=config.channels, image_size=config.image_size,
            )
            return None, held_out, stream
        train = load_image_data(config.dataset, config.train_split, max_samples=config.max_samples, **common)
    if train.skipped:
        accelerator.print(f"skipped {train.skipped} corrupt image(s) in {config.dataset}:{config.train_split}")
    return train, held_out, None


def channel_statistics(images: torch.Tensor, limit: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0, 1] (the model's normalization, written to its config)."""
    sample = images[:limit].float().div_(255)
    return sample.mean(dim=(0, 2, 3)).tolist(), sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def epoch_order(num_samples: int, seed: int, epoch: int, accelerator: Accelerator, micro_batches: int,
                batch_size: int) -> torch.Tensor:
    """This process's sample indices for an epoch, (micro_batches, batch_size); the same on every run of a seed."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    permutation = torch.randperm(num_samples, generator=generator)
    shard = permutation[accelerator.process_index :: accelerator.num_processes]
    return shard[: micro_batches * batch_size].view(micro_batches, batch_size)


def micro_batch_iterator(order: torch.Tensor, start: int, train: ImageData | None, stream, config: TrainConfig,
                         device: torch.device):
    """(uint8 images on the device, labels or None) for the micro-batches of `order` from index `start`."""
    if train is not None:
        for indices in order[start:]:
            labels = train.labels[indices].to(device) if train.labels is not None else None
            yield train.images[indices].to(device, non_blocking=True), labels
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(stream, order[start:].flatten().tolist()),
        batch_size=order.shape[1], num_workers=config.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for images, labels in loader:
        yield images.to(device, non_blocking=True), (None if stream.label_column is None else labels.to(device))


def knn_monitor(backbone: torch.nn.Module, train: ImageData, held_out: ImageData, config: TrainConfig,
                mean: list[float], std: list[float]) -> float:
    """kNN top-1 of the current encoder on a held-out subset (memory bank: a training subset)."""
    bank = slice(0, config.knn_train_samples)
    queries = slice(0, config.knn_eval_samples)
    bank_features = extract_features(backbone, train.images[bank], mean, std)
    query_features = extract_features(backbone, held_out.images[queries], mean, std)
    result = knn_accuracy(bank_features, train.labels[bank], query_features, held_out.labels[queries],
                          num_classes=held_out.num_classes)
    return result["top1"]


def main(argv: list[str] | None = None) -> int:
    config, args = parse_train_config(argv)
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    run_dir = resolve_run_dir(config, state, args.resume)
    config.mixed_precision = config.resolve_mixed_precision(state.device)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.tracker == "none" else config.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    device = accelerator.device

    train, held_out, stream = load_data(config, accelerator)
    if train is not None:
        num_samples, num_classes = len(train), (train.num_classes if train.labels is not None else 0)
    else:  # streaming: the online probe needs class names to size its head
        num_samples, num_classes = len(stream), len(stream.class_names or [])
    labeled = num_classes > 0
    reference = train if train is not None else held_out
    mean, std = channel_statistics(reference.images) if reference is not None else ([0.5] * config.channels,) * 2

    torch.manual_seed(config.seed)  # identical initial weights on every process and every run of a seed
    model_config = config.model_config()
    model_config.image_mean, model_config.image_std = mean, std
    model = IBProjModel(model_config)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    augment = TwoViewAugmentation(config.augmentation_preset, config.image_size, config.channels, mean, std,
                                  num_views=config.num_views).to(device)
    probe = torch.nn.Linear(model.num_features, max(num_classes, 1))
    set_seed(config.seed, device_specific=True)  # from here on, a different augmentation stream on each process

    # PAPER.md section 6: lr scaled by the global batch / 256, warm-up then cosine per optimizer step.
    global_batch = config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    lr = config.lr * global_batch / 256
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{num_samples} training samples do not fill one global batch of {global_batch}; "
                         "lower --batch-size or use more data.")
    total_steps = config.epochs * steps_per_epoch
    micro_batches = steps_per_epoch * config.gradient_accumulation_steps
    optimizer_kwargs = {"trust_coeff": config.lars_eta, "trust_clip": True} if config.optimizer == "lars" else {}
    optimizer = create_optimizer_v2(model, config.optimizer, lr=lr, weight_decay=config.weight_decay,
                                    momentum=config.momentum, **optimizer_kwargs)
    probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=config.online_probe_lr)
    # Not prepared: accelerate would step it once per process; it is stepped once per optimizer step.
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_epochs * steps_per_epoch), total_steps)
    model, optimizer, probe, probe_optimizer = accelerator.prepare(model, optimizer, probe, probe_optimizer)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress)

    metrics = MetricsLog(run_dir / "metrics.jsonl")
    resolved = {**config.to_dict(), "num_processes": accelerator.num_processes, "global_batch_size": global_batch,
                "scaled_lr": lr, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "image_mean": mean, "image_std": std, "model": model_config.to_diff_dict()}
    if args.resume:
        checkpoint = latest_checkpoint(run_dir)
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {progress.step}")
        if accelerator.is_main_process:
            metrics.truncate_after(progress.step)
    if accelerator.is_main_process:
        write_yaml(run_dir / "config.yaml", resolved)
        write_json(run_dir / "run_info.json", {
            "seed": config.seed, "versions": library_versions(),
            "hardware": hardware_summary(device, accelerator.num_processes),
            "command": " ".join(sys.argv), "started": datetime.now().isoformat(timespec="seconds"),
        })
        print(f"run folder: {run_dir}\nresolved configuration:")
        for key, value in resolved.items():
            print(f"  {key}: {value}")
    if config.tracker != "none":
        accelerator.init_trackers("ibproj", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                    for k, v in resolved.items()})

    unwrapped = accelerator.unwrap_model(model)
    started = time.perf_counter()
    window_start, window_images, probe_hits, probe_seen = time.perf_counter(), 0, 0, 0
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_main_process, desc="pretrain")
    model.train()
    try:
        while progress.step < total_steps:
            epoch, start_step = divmod(progress.step, steps_per_epoch)
            order = epoch_order(num_samples, config.seed, epoch, accelerator, micro_batches, config.batch_size)
            batches = micro_batch_iterator(order, start_step * config.gradient_accumulation_steps, train, stream,
                                           config, device)
            for images, labels in batches:
                views = augment(images)
                with accelerator.accumulate(model, probe):
                    diagnose = (progress.step + 1) % config.diagnostics_every == 0 and accelerator.sync_gradients
                    output = model(views, return_diagnostics=diagnose)
                    loss = output.loss
                    if labeled:
                        # Online linear probe on DETACHED encoder features: no gradient reaches the encoder.
                        logits = probe(output.encoder_features.detach().float())
                        targets = labels.repeat(config.num_views)
                        loss = loss + F.cross_entropy(logits, targets)
                        probe_hits += (logits.argmax(1) == targets).sum().item()
                        probe_seen += targets.numel()
                    non_finite = (~torch.isfinite(output.loss)).float()
                    if accelerator.num_processes > 1:  # every process stops together, or DDP would hang
                        non_finite = accelerator.reduce(non_finite, "max")
                    if non_finite.item():
                        raise NonFiniteLossError(
                            f"non-finite loss ({output.loss.item()}) at step {progress.step}; stopping. The last good "
                            f"checkpoint is {latest_checkpoint(run_dir)}. Lower --lr or --mi-weight and --resume."
                        )
                    accelerator.backward(loss)
                    optimizer.step()
                    probe_optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    probe_optimizer.zero_grad(set_to_none=True)
                window_images += images.shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                progress.step += 1
                bar.update(1)
                if progress.step % config.log_every == 0 or diagnose:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": progress.step, "epoch": progress.step / steps_per_epoch,
                              "loss": accelerator.reduce(output.loss.detach(), "mean").item(),
                              "ssl_loss": accelerator.reduce(output.ssl_loss.detach(), "mean").item(),
                              "lr": scheduler.get_last_lr()[0], "img_per_s": window_images / max(elapsed, 1e-9)}
                    if output.mi_loss is not None:
                        record["mi_loss"] = accelerator.reduce(output.mi_loss.detach(), "mean").item()
                    if diagnose:
                        record.update({k: accelerator.reduce(v.float(), "mean").item()
                                       for k, v in output.diagnostics.items()})
                    if probe_seen:
                        record["online_probe_top1"] = 100.0 * probe_hits / probe_seen
                    window_start, window_images, probe_hits, probe_seen = time.perf_counter(), 0, 0, 0
                    accelerator.log(record, step=progress.step)
                    if accelerator.is_main_process:
                        metrics.append(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")
                epoch_end = progress.step % steps_per_epoch == 0
                if epoch_end and train is not None and labeled and held_out is not None and held_out.labels is not None:
                    if accelerator.is_main_process:
                        top1 = knn_monitor(unwrapped.backbone, train, held_out, config, mean, std)
                        record = {"step": progress.step, "epoch": progress.step // steps_per_epoch, "knn_top1": top1}
                        accelerator.log(record, step=progress.step)
                        metrics.append(record)
                        bar.write(f"epoch {record['epoch']}: kNN top-1 {top1:.2f}%")
                    accelerator.wait_for_everyone()
                if epoch_end or progress.step % config.checkpoint_every == 0:
                    save_checkpoint(accelerator, run_dir, progress.step, config.keep_checkpoints)
                if progress.step >= total_steps:
                    break
    except NonFiniteLossError as error:
        accelerator.end_training()
        if accelerator.is_main_process:
            print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    bar.close()
    wall_time = time.perf_counter() - started
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        finish_run(config, unwrapped, run_dir, metrics, train, held_out, mean, std, wall_time)
    return 0


def finish_run(config: TrainConfig, model: IBProjModel, run_dir: Path, metrics: MetricsLog, train: ImageData | None,
               held_out: ImageData | None, mean: list[float], std: list[float], wall_time: float) -> None:
    """Final model, plot, frozen-backbone evaluation next to a random-init backbone, exported backbone."""
    model.save_pretrained(run_dir / "model")
    plot_information_plane(metrics.read(), run_dir / "information_plane.png",
                           title=f"{config.objective} on {config.dataset}")
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text())
    info["wall_time_s"] = round(wall_time, 1)
    write_json(info_path, info)
    can_evaluate = (config.final_eval and train is not None and train.labels is not None and held_out is not None
                    and held_out.labels is not None)
    if can_evaluate:
        torch.manual_seed(config.seed)
        random_backbone = IBProjModel(model.config).backbone
        results = {
            "trained": evaluate_backbone(model.backbone, train, held_out, mean, std),
            "random-init": evaluate_backbone(random_backbone, train, held_out, mean, std),
        }
        write_json(run_dir / "final_eval.json", {
            "dataset": config.dataset, "train_split": config.train_split, "eval_split": config.eval_split,
            "linear_top1": results["trained"]["linear_top1"], "knn_top1": results["trained"]["knn_top1"],
            "trained": results["trained"], "random_init": results["random-init"],
        })
        print(f"\nFrozen-backbone evaluation on {config.dataset} ({config.eval_split} split):")
        print(format_table(results))
    if config.export_backbone:
        export_backbone(run_dir, run_dir / "backbone")
    print(f"\nrun folder: {run_dir} (wall time {wall_time / 60:.1f} min)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
