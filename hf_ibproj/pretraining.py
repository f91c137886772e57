"""Pretraining as one function call: `pretrain(config)` runs one Accelerate loop and returns what comes next.

    from hf_ibproj import TrainConfig, pretrain

    result = pretrain(TrainConfig.from_preset(time_budget=2, output_dir="runs/quick"))
    result.run_dir, result.model, result.final_eval["linear_top1"]

data -> two-view augmentation on the device -> IBProjModel (backbone -> projector) -> SSL loss + MI penalty, and an
online linear probe on detached encoder features; at every epoch end a kNN monitor and the held-out label-free
diagnostics (docs/method.md section 5); atomic checkpoints; at the end the final model, the plot, the frozen-backbone
evaluation beside the random-init floor and the exported backbone, all in the run folder (hf_ibproj.runs). It runs
the same under `accelerate launch` and accelerate's `notebook_launcher`; `train.py` is its command line.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from transformers import get_cosine_schedule_with_warmup

from .arguments import refuse_resume_changes
from .augmentation import TwoViewAugmentation, to_model_input
from .budget import TimeBudget, evaluation_estimate, planned_warmup, revised_estimate
from .data import FullImageCrops, ImageData
from .evaluation import format_table
from .export import export_backbone
from .hub import PushError, check_push_access, download_run_checkpoint, push_checkpoint, push_to_hub
from .modeling_ibproj import IBProjModel
from .plotting import plot_information_plane
from .progress import progress_bar
from .precision import resolve_mixed_precision
from .checkpoints import MODEL_WEIGHTS, TRAINING_STATE, latest_checkpoint, load_checkpoint, save_checkpoint
from .runs import RunFolder, RunFolderInUseError, hardware_summary, library_versions
from .splits import (
    SplitData,
    SplitScorer,
    channel_statistics,
    images_of,
    labels_of,
    load_splits,
    subset,
    training_crops,
)
from .train_config import RESUMABLE_FIELDS, TrainConfig, read_run_config

STREAMING_EVAL_TRAIN_SAMPLES = 20000  # final_eval_train_samples when streaming and unset
DIAGNOSTIC_SAMPLES = 1000  # the fixed held-out images of the label-free diagnostics
PROVISIONAL_EPOCHS = 1000  # a time budget's length before its first plan (only the warm-up runs before it)


class NonFiniteLossError(RuntimeError):
    """Training diverged (a NaN / infinite loss, weights or held-out features); the run stopped without writing a
    checkpoint of that state."""


class ProcessGroupTimeoutError(TimeoutError):
    """A process waited for the others longer than `ddp_timeout`."""


@dataclass
class TrainingProgress:
    """The loop's position and schedule, stored as JSON in every checkpoint (training_state.json), so `--resume`
    neither re-plans nor restarts an epoch (nanoGPT: on resume the run settings come from the checkpoint)."""

    step: int
    total_steps: int
    warmup_steps: int
    planned: bool  # False while a time budget has not fixed the total yet
    skipped_images: int = 0  # corrupt images replaced while streaming, summed over the processes


@dataclass
class PretrainResult:
    """What `pretrain` returns: the run folder, the trained model and its final evaluation (None without one)."""

    run_dir: Path
    model: IBProjModel
    final_eval: dict[str, Any] | None


@dataclass
class Run:
    """One run's working set, built by `start_run`; what the loop's parts share instead of long signatures."""

    config: TrainConfig
    folder: RunFolder
    accelerator: Accelerator
    model: torch.nn.Module  # prepared for the accelerator (DDP-wrapped when distributed)
    probe: torch.nn.Module
    optimizer: torch.optim.Optimizer
    augment: TwoViewAugmentation
    train: SplitData
    held_out: SplitData | None
    scorer: SplitScorer
    progress: TrainingProgress
    steps_per_epoch: int
    started_at: float
    train_views: FullImageCrops | None = None  # a per-sample split's training items (crops of whole images)
    diagnostic_images: torch.Tensor | None = None
    random_init: dict | None = None
    budget: TimeBudget | None = None
    scheduler: Any = None
    bar: Any = None
    window: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    state_checked_at: int | None = None  # the step whose weights `check_state` found finite
    skips_to_count: int = 0  # this process's corrupt draws not yet in progress.skipped_images

    @property
    def unwrapped(self) -> IBProjModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def evaluable(self) -> bool:
        return self.config.final_eval and self.train.num_classes > 0 and labels_of(self.held_out) is not None

    @property
    def final_train_rows(self) -> int | None:
        """Training rows behind the final linear probe and kNN bank (None: all of them)."""
        return self.config.final_eval_train_samples or (STREAMING_EVAL_TRAIN_SAMPLES if self.config.streaming
                                                        else None)

    def since_start(self) -> float:
        return round(time.time() - self.started_at, 1)

    def estimate(self, monitor_seconds: float | None = None) -> tuple[float, float]:
        """(final phase, one kNN monitor) in seconds, from the floor and, once measured, the latest monitor."""
        held_out = len(self.held_out) if self.held_out is not None else 0
        final_rows = (min(self.final_train_rows or len(self.train), len(self.train)), held_out)
        monitor_rows = (min(self.config.knn_train_samples, len(self.train)),
                        min(self.config.knn_eval_samples, held_out))
        if monitor_seconds is None:
            return evaluation_estimate(self.random_init, final_rows, monitor_rows)
        return revised_estimate(self.random_init, final_rows, monitor_rows, monitor_seconds)[:2]


def pretrain(config: TrainConfig, *, resume: bool = False, started_at: float | None = None) -> PretrainResult:
    """Pretrain as `config` says into its run folder (`resume`: continue that folder's run from its last checkpoint).

    `started_at` (a `time.time()`) is when a time budget starts counting; default: now. Raises ValueError /
    OSError on bad input before anything is written, NonFiniteLossError when the loss diverges.
    """
    started_at = time.time() if started_at is None else started_at
    state = process_state(config.ddp_timeout)
    if config.push_to_hub:
        check_push_access(config.push_to_hub)  # a bad repo id or no token fails now, not after hours of training
    config = replace(config, mixed_precision=resolve_mixed_precision(config.mixed_precision, state.device))
    folder = resolve_run_folder(config, resume)
    if resume:  # as --resume: nothing that would change the stored run (TrainConfig.from_run gives its settings)
        refuse_resume_changes(folder.read_config(), config.to_dict(), RESUMABLE_FIELDS, folder.path)
    with run_folder_lock(folder, state):  # one run writes to a folder
        if config.overwrite_output_dir and state.is_main_process:
            folder.clear()
        with named_timeout():
            run = start_run(config, folder, resume, started_at)
            try:
                train_loop(run)
                run.accelerator.wait_for_everyone()
            finally:
                run.bar.close()
                for tracker in run.accelerator.trackers:  # not end_training(): the process group stays for the next
                    tracker.finish()
        final_eval = finish_run(run) if run.accelerator.is_main_process else None
    return PretrainResult(run.folder.path, run.unwrapped, final_eval)


@contextlib.contextmanager
def run_folder_lock(folder: RunFolder, state: PartialState):
    """The folder's lock (RunFolder.lock), taken by the main process; every process learns whether it was refused,
    so that all of them stop at once instead of the others waiting for the main one at their first collective."""
    with contextlib.ExitStack() as held:
        refusal = None
        if state.is_main_process:
            try:
                held.enter_context(folder.lock())
            except RunFolderInUseError as error:
                refusal = str(error)
        if state.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise RunFolderInUseError(refusal)
        yield


def process_state(timeout_s: float | None = None) -> PartialState:
    """accelerate's process state; on a machine without CUDA, CPU processes (one gloo group under `accelerate
    launch --multi_gpu`, where a plain state would start independent runs). The first call creates the process
    group, with `timeout_s` (`--ddp-timeout`) as the longest a process waits for the others."""
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    return PartialState(cpu=not torch.cuda.is_available(), **timeout)


@contextlib.contextmanager
def named_timeout():
    """A collective that timed out (gloo raises a RuntimeError saying so) as one line naming --ddp-timeout. Under
    NCCL the watchdog ends the process itself, with its own message."""
    try:
        yield
    except RuntimeError as error:
        if "timed out" not in str(error).lower():
            raise
        reported = str(error).strip().splitlines()[0][-120:]  # the backend's own words, with the timeout in force
        raise ProcessGroupTimeoutError(
            f"process {PartialState().process_index} timed out waiting for the other processes ({reported}); the "
            "main process prepares the dataset and evaluates the random-init floor alone. Raise --ddp-timeout (it "
            "takes effect where the process group is created: the first pretrain call of a process), or prepare the "
            "dataset once beforehand."
        ) from error


def batchnorm_is_synced(config: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether BatchNorm normalizes with the global batch's statistics (SimCLR's global BN; `--sync-batchnorm`):
    by default on GPUs with more than one process; refused where torch's SyncBatchNorm cannot run (CPUs)."""
    on_gpu = accelerator.device.type in ("cuda", "xpu", "hpu")
    if config.sync_batchnorm and not on_gpu:
        raise ValueError(f"--sync-batchnorm needs GPU processes (torch's SyncBatchNorm does not run on "
                         f"{accelerator.device.type}); drop the flag: BatchNorm then uses each process's batch.")
    return on_gpu and accelerator.num_processes > 1 if config.sync_batchnorm is None else config.sync_batchnorm


def check_launch(config: TrainConfig, accelerator: Accelerator, folder: RunFolder, resume: bool) -> None:
    """Refuse resuming with another process count (the global batch, lr and data order would change); warn once
    that gradient accumulation does not enlarge a contrastive batch."""
    if resume:
        stored = folder.read_config().get("num_processes")
        if stored is not None and stored != accelerator.num_processes:
            raise ValueError(
                f"--resume: the run in {folder.path} trained with {stored} process(es), this launch has "
                f"{accelerator.num_processes}; the global batch, the scaled lr and the data order would change. "
                f"Launch it with {stored} process(es) (accelerate launch --num_processes {stored}).")
    if config.gradient_accumulation_steps > 1:
        accelerator.print(
            f"warning: --gradient-accumulation-steps {config.gradient_accumulation_steps} sums gradients of "
            f"separate micro-batches of {config.batch_size * accelerator.num_processes}: the negatives, the "
            "BatchNorm statistics and the MI term each see one micro-batch, not the global batch the lr is scaled for.")


def train_loop(run: Run) -> None:
    """Optimizer steps from the current one to the total, with logging, monitors, the time budget and checkpoints."""
    config, progress, accelerator = run.config, run.progress, run.accelerator
    run.model.train()
    while progress.step < progress.total_steps:
        for images, labels, skipped in epoch_batches(run):
            run.skips_to_count += skipped
            output, diagnose = train_step(run, images, labels)
            if not accelerator.sync_gradients:
                continue
            run.scheduler.step()
            progress.step += 1
            run.bar.update(1)
            if progress.step % config.log_every == 0 or diagnose:
                log_step(run, output, diagnose)
            if run.budget is not None:
                follow_budget(run)
            if progress.step % run.steps_per_epoch == 0 and run.held_out is not None:
                epoch_monitor(run)
            checkpoint_if_due(run)
            if progress.step >= progress.total_steps:
                break


# --------------------------------------------------------------------------------------------------- the step


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor | None):
    """One micro-step: augment, forward, SSL + MI loss, the online probe's loss, backward, optimizer step."""
    config, accelerator = run.config, run.accelerator
    views = run.augment(images)
    with accelerator.accumulate(run.model, run.probe):
        diagnose = (run.progress.step + 1) % config.diagnostics_every == 0 and accelerator.sync_gradients
        output = run.model(views, return_diagnostics=diagnose)
        loss = output.loss
        if labels is not None:
            # Online linear probe on DETACHED encoder features: no gradient reaches the encoder.
            logits = run.probe(output.encoder_features.detach().float())
            targets = labels.repeat(config.num_views)
            loss = loss + F.cross_entropy(logits, targets)
            run.window["probe_hits"] += (logits.argmax(1) == targets).sum().item()
            run.window["probe_seen"] += targets.numel()
        check_finite(run, output.loss)
        accelerator.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.window["images"] += images.shape[0] * accelerator.num_processes
    return output, diagnose


def check_finite(run: Run, loss: torch.Tensor) -> None:
    """Stop every process together (DDP would hang otherwise) on a NaN / infinite loss, before the update."""
    non_finite = (~torch.isfinite(loss)).float()
    if run.accelerator.num_processes > 1:
        non_finite = run.accelerator.reduce(non_finite, "max")
    if non_finite.item():
        raise diverged(run, f"non-finite loss in step {run.progress.step + 1}, before its update")


def check_state(run: Run) -> None:
    """Stop every process together when the weights (model and online probe, buffers included) or, with a held-out
    split, the features they give are non-finite: run before a checkpoint is written and before the epoch-end
    monitors (the loss of the step was checked before its update); once per step."""
    if run.state_checked_at == run.progress.step:
        return
    model_state = run.unwrapped.state_dict()
    probe_state = run.accelerator.unwrap_model(run.probe).state_dict()
    tensors = {**model_state, **{f"online_probe.{name}": value for name, value in probe_state.items()}}
    names = [name for name, value in tensors.items() if value.is_floating_point()]
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names])
    features_bad = run.accelerator.is_main_process and not held_out_features_finite(run)
    flags = torch.stack([~finite.all(), torch.tensor(features_bad, device=finite.device)]).float()
    if run.accelerator.num_processes > 1:
        flags = run.accelerator.reduce(flags, "max")
    weights_bad, features_bad = flags.tolist()
    step = run.progress.step
    if weights_bad:
        bad = [name for name, ok in zip(names, finite.tolist()) if not ok]
        raise diverged(run, f"non-finite weights after the update of step {step} ({len(bad)} of {len(names)} "
                            f"tensors: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    if features_bad:
        raise diverged(run, f"the weights after the update of step {step} give non-finite held-out features")
    run.state_checked_at = step


def held_out_features_finite(run: Run) -> bool:
    """Whether the encoder and projector features of the held-out diagnostic images are finite, computed in eval
    mode as the monitors and the final evaluation compute them (True without those images)."""
    if run.diagnostic_images is None:
        return True
    model, device = run.unwrapped, run.accelerator.device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for chunk in run.diagnostic_images.split(run.config.batch_size):
                features = model.get_image_features(to_model_input(chunk.to(device), run.scorer.mean,
                                                                   run.scorer.std))
                if not (torch.isfinite(features).all() and torch.isfinite(model.projector(features)).all()):
                    return False
    finally:
        model.train(was_training)
    return True


def diverged(run: Run, what: str) -> NonFiniteLossError:
    """The one-line stop of a diverged run: what went non-finite and the newest checkpoint with finite weights."""
    checkpoint = last_finite_checkpoint(run.folder)
    keep = (f"The newest checkpoint with finite weights is {checkpoint}: evaluate or export it as a model folder "
            f"(hf-ibproj evaluate --model {checkpoint}, hf-ibproj export {checkpoint} OUT)." if checkpoint else
            "No checkpoint with finite weights was written.")
    return NonFiniteLossError(f"training diverged: {what}; stopped without writing a checkpoint of it. {keep} "
                              "Resuming would only repeat the divergence: start a new run with a lower --lr (or "
                              "--mi-weight; --online-probe-lr when only online_probe tensors are named).")


def last_finite_checkpoint(folder: RunFolder) -> Path | None:
    """The newest checkpoint whose model weights read and are all finite (its model.safetensors loaded to check)."""
    for checkpoint in reversed(folder.checkpoints()):
        try:
            weights = load_file(checkpoint / MODEL_WEIGHTS)
        except (OSError, SafetensorError):
            continue
        if all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point()):
            return checkpoint
    return None


def epoch_batches(run: Run):
    """(uint8 images on the device, labels or None, images skipped as corrupt) for the rest of the current epoch:
    (B, C, H, W) images in memory, (B, V, C, S, S) crops of whole images for a per-sample split (`FullImageCrops`).

    The epoch's order, and a per-sample split's crops, are a function of (seed, epoch), sharded over the processes,
    so a resumed run sees the same batches as an uninterrupted one."""
    config, accelerator, device = run.config, run.accelerator, run.accelerator.device
    epoch, start_step = divmod(run.progress.step, run.steps_per_epoch)
    micro_batches = run.steps_per_epoch * config.gradient_accumulation_steps
    generator = torch.Generator().manual_seed(config.seed * 100003 + epoch)
    shard = torch.randperm(len(run.train), generator=generator)[accelerator.process_index::accelerator.num_processes]
    order = shard[: micro_batches * config.batch_size].view(micro_batches, config.batch_size)
    order = order[start_step * config.gradient_accumulation_steps:]
    if isinstance(run.train, ImageData):
        for indices in order:
            labels = run.train.labels[indices].to(device) if run.train.labels is not None else None
            yield run.train.images[indices].to(device, non_blocking=True), labels, 0
        return
    run.train_views.epoch = epoch  # before the workers start: they copy the dataset
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(run.train_views, order.flatten().tolist()),
                                         batch_size=config.batch_size, num_workers=config.num_workers,
                                         pin_memory=device.type == "cuda", generator=generator)
    for images, labels, skipped in loader:
        labels = None if run.train.labels is None else labels.to(device)
        yield images.to(device, non_blocking=True), labels, int(skipped.sum())


# --------------------------------------------------------------------------------- logging, monitors, budget


def log_step(run: Run, output, diagnose: bool) -> None:
    """Loss, learning rate, throughput, online-probe accuracy and (when computed) the section-5 diagnostics."""
    accelerator, window = run.accelerator, run.window
    elapsed = time.perf_counter() - window["start"]
    record = {"step": run.progress.step, "epoch": run.progress.step / run.steps_per_epoch,
              "loss": accelerator.reduce(output.loss.detach(), "mean").item(),
              "ssl_loss": accelerator.reduce(output.ssl_loss.detach(), "mean").item(),
              "lr": run.scheduler.get_last_lr()[0], "img_per_s": window["images"] / max(elapsed, 1e-9)}
    if output.mi_loss is not None:
        record["mi_loss"] = accelerator.reduce(output.mi_loss.detach(), "mean").item()
    if diagnose:
        record.update({k: accelerator.reduce(v.float(), "mean").item() for k, v in output.diagnostics.items()})
    if window["probe_seen"]:
        record["online_probe_top1"] = 100.0 * window["probe_hits"] / window["probe_seen"]
    count_skipped_images(run)
    if run.progress.skipped_images:
        record["skipped_images"] = run.progress.skipped_images
    reset_window(run)
    accelerator.log(record, step=run.progress.step)
    if accelerator.is_main_process:
        run.folder.metrics.append(record)
        run.bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")


def count_skipped_images(run: Run) -> None:
    """Add every process's corrupt draws since the last call to `progress.skipped_images`: each process streams
    its own shard, so the run's count is their sum (a collective: every process calls this)."""
    pending = torch.tensor(run.skips_to_count, device=run.accelerator.device)
    run.progress.skipped_images += int(run.accelerator.reduce(pending, "sum"))
    run.skips_to_count = 0


def reset_window(run: Run) -> None:
    run.window.update(start=time.perf_counter(), images=0, probe_hits=0, probe_seen=0)


def epoch_monitor(run: Run) -> None:
    """At an epoch end, once `check_state` passes: the kNN monitor (labelled held-out split) and the held-out
    label-free diagnostics."""
    check_state(run)
    started = time.perf_counter()
    if run.accelerator.is_main_process:
        record = {"step": run.progress.step, "epoch": run.progress.step // run.steps_per_epoch}
        if run.train.num_classes and labels_of(run.held_out) is not None:
            record["knn_top1"] = run.scorer.knn_top1(run.unwrapped.backbone, run.config.knn_train_samples,
                                                     run.config.knn_eval_samples)
            run.bar.write(f"epoch {record['epoch']}: kNN top-1 {record['knn_top1']:.2f}%")
        diagnostics = run.scorer.label_free(run.unwrapped, run.diagnostic_images, run.augment, run.config.batch_size)
        record.update({f"heldout/{key}": value for key, value in diagnostics.items()})
        run.accelerator.log(record, step=run.progress.step)
        run.folder.metrics.append(record)
    run.accelerator.wait_for_everyone()
    if run.budget is not None:
        run.budget.monitor_done(run.estimate(time.perf_counter() - started))
    reset_window(run)


def follow_budget(run: Run) -> None:
    """Time the step and, when a plan is due, set the total step count the time budget allows (the main process
    decides, every process follows); the schedule is rebuilt for it."""
    run.budget.step_done()
    if not run.budget.plan_due(run.progress.step):
        return
    first = not run.progress.planned
    total = broadcast_object_list([run.budget.plan(run.progress.step)])[0]
    progress = run.progress
    progress.total_steps, progress.planned = total, True
    progress.warmup_steps = planned_warmup(round(run.config.warmup_epochs * run.steps_per_epoch), total)
    run.scheduler = make_scheduler(run.optimizer, progress)
    run.bar.total = total
    if first:
        run.bar.set_description("pretrain")
    if first and run.accelerator.is_main_process:
        plan = run.budget.latest
        run.folder.update_info(plan=plan)
        run.bar.write(f"time budget: {plan['total_steps']} steps ({plan['epochs']} epochs) at "
                      f"{plan['img_per_s']:.0f} img/s, {plan['final_phase_s']:.0f} s kept for the final evaluation; "
                      f"re-planned every few steps")


def make_scheduler(optimizer: torch.optim.Optimizer, progress: TrainingProgress) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine (docs/method.md section 6) per optimizer step, positioned at `progress.step`.

    Rebuilt rather than checkpointed: (step, warmup, total) determine it, and a time budget changes the total.
    Each group's `initial_lr` is in the optimizer state, so this also works on resume.
    """
    return get_cosine_schedule_with_warmup(optimizer, progress.warmup_steps, progress.total_steps,
                                           last_epoch=progress.step - 1)


def checkpoint_if_due(run: Run) -> None:
    """A checkpoint (and its push) at an epoch end, every `checkpoint_every` steps and at the last step, once
    `check_state` passes; run_info.json then names the images skipped so far."""
    config, progress = run.config, run.progress
    if progress.step % run.steps_per_epoch and progress.step % config.checkpoint_every and \
            progress.step < progress.total_steps:
        return
    check_state(run)
    record_skipped_files(run)
    count_skipped_images(run)
    state = {"progress": asdict(progress), "budget": run.budget.state_dict() if run.budget else None}
    checkpoint = save_checkpoint(run.accelerator, run.folder.path, progress.step, config.keep_checkpoints,
                                 model_config=run.unwrapped.config, state=state)
    if run.accelerator.is_main_process and config.push_to_hub and config.hub_strategy == "checkpoint":
        try:
            push_checkpoint(run.folder.path, checkpoint, config.push_to_hub, private=config.hub_private)
        except PushError as error:  # never stops the run: the next checkpoint pushes again
            run.bar.write(f"warning: {error} (retried at the next checkpoint)")
            run.folder.append_info("push_failures", {"step": progress.step, "error": str(error)})


def record_skipped_files(run: Run, gather: bool = True) -> None:
    """Name every image left out so far (corrupt or oversized) in run_info.json's `skipped_files`, per split, beside
    those recorded before a resume; each process streams its own shard, so the training split's come from all
    (`gather`: every process calls this; without it, the main process records what it skipped)."""
    held_out = run.held_out.skipped_files if run.held_out is not None else []
    skipped = {"train": run.train.skipped_files, "eval": held_out}
    if gather and run.accelerator.num_processes > 1:
        skipped["train"] = gather_object(skipped["train"])
    if not run.accelerator.is_main_process or not any(skipped.values()):
        return
    recorded, merged = run.folder.read_info().get("skipped_files", {}), {}
    for name, records in skipped.items():
        by_row = {record["row"]: record for record in [*recorded.get(name, []), *records]}  # once per row
        if by_row:
            merged[name] = [by_row[row] for row in sorted(by_row)]
    run.folder.update_info(skipped_files=merged)


# --------------------------------------------------------------------------------------------- start and end


def start_run(config: TrainConfig, folder: RunFolder, resume: bool, started_at: float) -> Run:
    """Everything the loop needs: accelerator, data, model, optimizer, resumed state, floor, budget. A fresh start
    that fails before its records are written leaves no run folder behind (nothing but the lock is in it then)."""
    try:
        # accelerate keeps one precision and accumulation setting per process and refuses another; each call of
        # `pretrain` (a sweep in one notebook) starts with its own (the process group stays). Private, no public reset.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        accelerator = Accelerator(
            cpu=process_state().device.type == "cpu", mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=None if config.tracker == "none" else config.tracker,
            project_config=ProjectConfiguration(project_dir=str(folder.path), logging_dir=str(folder.logs_dir)),
        )
        check_launch(config, accelerator, folder, resume)
        sync_batchnorm = batchnorm_is_synced(config, accelerator)
        train, held_out, note = load_splits(config, accelerator.local_main_process_first)
        if note:
            accelerator.print(note)
        if isinstance(train, ImageData) and train.skipped:
            accelerator.print(f"skipped {train.skipped} unreadable or oversized image(s) in "
                              f"{config.dataset}:{config.train_split} (named in run_info.json)")
        mean, std = channel_statistics(train, config.seed, config.num_workers)
        train_views = training_crops(train, config, accelerator.local_main_process_first)

        torch.manual_seed(config.seed)  # identical initial weights on every process and every run of a seed
        model_config = config.model_config()
        model_config.image_mean, model_config.image_std = mean, std
        model = IBProjModel(model_config)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if sync_batchnorm:  # before prepare, as DDP requires; saved weights are those of plain BatchNorm
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        augment = TwoViewAugmentation(config.augmentation_preset, config.image_size, config.channels, mean, std,
                                      num_views=config.num_views, crop_min_scale=config.crop_min_scale,
                                      blur_kernel_size=config.blur_kernel_size).to(accelerator.device)
        probe = torch.nn.Linear(model.num_features, max(train.num_classes, 1))
        set_seed(config.seed, device_specific=True)  # from here on, a different augmentation stream on each process

        # docs/method.md section 6: lr scaled by the global batch / 256, warm-up then cosine per optimizer step.
        global_batch = config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        steps_per_epoch = len(train) // global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"{len(train)} training samples do not fill one global batch of {global_batch}; "
                             "lower --batch-size or use more data.")
        optimizer = build_optimizer(model, probe, config, config.lr * global_batch / 256)
        model, probe, optimizer = accelerator.prepare(model, probe, optimizer)
        run = Run(config, folder, accelerator, model, probe, optimizer, augment, train, held_out,
                  SplitScorer(train, held_out, mean, std, config.seed, config.num_workers),
                  initial_progress(config, steps_per_epoch), steps_per_epoch, started_at, train_views)
        budget_state = restore_checkpoint(run) if resume else None
    except BaseException:
        if not resume and process_state().is_main_process and not folder.entries():
            (folder.path / RunFolder.LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # e.g. a mount point: an empty folder stays
                folder.path.rmdir()
        raise
    write_start_records(run, resume, global_batch)
    record_skipped_files(run)
    if config.tracker != "none":
        accelerator.init_trackers("ibproj", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                    for k, v in run.folder.read_config().items()})
    evaluate_floor(run, resume)
    if config.length[0] == "time_budget":
        run.budget = TimeBudget(config.time_budget * 60, started_at=started_at, steps_per_epoch=steps_per_epoch,
                                images_per_step=global_batch, estimate=run.estimate(),
                                used_s=(budget_state or {}).get("used_s", 0.0), plan=(budget_state or {}).get("plan"))
    run.scheduler = make_scheduler(optimizer, run.progress)
    run.phases["training_start_s"] = run.since_start()
    run.bar = progress_bar(total=run.progress.total_steps if run.progress.planned else None,
                           initial=run.progress.step, disable=not accelerator.is_main_process, unit="step",
                           desc="pretrain" if run.progress.planned else "pretrain (time budget: planning)")
    reset_window(run)
    return run


def resolve_run_folder(config: TrainConfig, resume: bool) -> RunFolder:
    """The run folder, the same on every process. A fresh run starts only in an absent or empty folder (or, with
    `overwrite_output_dir`, one it may empty); a resumed one only where a checkpoint and a complete stored
    configuration are. Nothing is written here: the folder's lock creates it."""
    name = config.output_dir or f"runs/{config.objective}-{datetime.now():%Y%m%d-%H%M%S}"
    folder = RunFolder(broadcast_object_list([name])[0])
    has_checkpoint = folder.latest_checkpoint() is not None
    if resume and config.overwrite_output_dir:
        raise ValueError("--resume continues the run in --output-dir; --overwrite-output-dir would delete it. Pass "
                         "one of them.")
    if resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: {folder.path} has no checkpoint to resume from; check --output-dir.")
    if resume:
        read_run_config(folder.path)  # a config.yaml that lacks or garbles a setting is refused, never defaulted
    if not resume and not config.overwrite_output_dir and has_checkpoint:
        raise FileExistsError(f"{folder.path} already holds a run; pass --resume to continue it, choose another "
                              "--output-dir, or pass --overwrite-output-dir to delete it and start anew.")
    entries = sorted(folder.entries())
    if not resume and not config.overwrite_output_dir and entries:
        raise FileExistsError(f"{folder.path} is not empty ({', '.join(entries[:5])}) and holds no "
                              "run to resume; choose another --output-dir, or pass --overwrite-output-dir to delete "
                              "what is there and start anew.")
    return folder


def fetch_run_from_hub(output_dir: str | Path, repo_id: str, timeout_s: float | None = None) -> None:
    """Resuming from a Hub repo on a machine without the run: download its records and last checkpoint first."""
    state = process_state(timeout_s)
    if latest_checkpoint(Path(output_dir)) is None and state.is_main_process:
        checkpoint = download_run_checkpoint(repo_id, Path(output_dir))
        print(f"downloaded {checkpoint} from the Hub repo {repo_id}")
    state.wait_for_everyone()


def initial_progress(config: TrainConfig, steps_per_epoch: int) -> TrainingProgress:
    """Step 0 of the run's length: fixed steps or epochs, or a provisional length until a time budget plans."""
    kind, value = config.length
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if kind == "time_budget":
        return TrainingProgress(0, PROVISIONAL_EPOCHS * steps_per_epoch, warmup, planned=False)
    total = int(value) * steps_per_epoch if kind == "epochs" else int(value)
    return TrainingProgress(0, total, warmup, planned=True)


def restore_checkpoint(run: Run) -> dict | None:
    """Load the newest intact checkpoint (checkpoints.load_checkpoint: a damaged one is named and skipped) into the
    prepared objects and the progress; returns its time-budget state."""
    checkpoint, stored = load_checkpoint(run.accelerator, run.folder.path)
    try:
        run.progress = TrainingProgress(**stored["progress"])
    except (KeyError, TypeError):
        raise ValueError(f"{checkpoint / TRAINING_STATE} holds no training progress (an older hf_ibproj wrote it); "
                         "the run cannot be resumed. Evaluate or export the checkpoint as a model folder.") from None
    run.accelerator.print(f"resumed from {checkpoint} at step {run.progress.step} of {run.progress.total_steps}")
    if run.accelerator.is_main_process:
        run.folder.metrics.truncate_after(run.progress.step)
    return stored.get("budget")


def build_optimizer(model: IBProjModel, probe: torch.nn.Module, config: TrainConfig, lr: float):
    """One timm optimizer: the model's groups (no weight decay or LARS adaptation on biases and norms, docs/method.md
    section 6) plus the online probe as its own group (no weight decay, so no LARS adaptation either; solo-learn's
    layout). One optimizer means one fp16 grad-scaler update per step."""
    groups = param_groups_weight_decay(model, config.weight_decay)
    groups.append({"params": list(probe.parameters()), "lr": config.online_probe_lr, "weight_decay": 0.0})
    extra = {"trust_coeff": config.lars_eta, "trust_clip": True} if config.optimizer == "lars" else {}
    momentum = {"momentum": config.momentum} if config.optimizer != "adamw" else {}
    return create_optimizer_v2(groups, config.optimizer, lr=lr, weight_decay=config.weight_decay, **momentum, **extra)


def write_start_records(run: Run, resume: bool, global_batch: int) -> None:
    """config.yaml (written once: a resumed run keeps it) and run_info.json (seed, versions, hardware, commands);
    prints a short summary (the full configuration is in config.yaml)."""
    accelerator, config, folder = run.accelerator, run.config, run.folder
    if not accelerator.is_main_process:
        return
    start = {"command": " ".join(sys.argv), "started": datetime.now().isoformat(timespec="seconds")}
    resolved = {**config.to_dict(), "num_processes": accelerator.num_processes, "global_batch_size": global_batch,
                "scaled_lr": config.lr * global_batch / 256, "steps_per_epoch": run.steps_per_epoch,
                "total_steps": run.progress.total_steps if run.progress.planned else "planned by time_budget",
                "image_mean": run.scorer.mean, "image_std": run.scorer.std,
                "model": run.unwrapped.config.to_diff_dict()}
    if resume:
        folder.append_info("resumes", start)
        print(f"run folder: {folder.path} (resumed with its stored configuration)")
    else:
        folder.write_config(resolved)
        folder.write_info({"seed": config.seed, "versions": library_versions(),
                           "hardware": hardware_summary(accelerator.device, accelerator.num_processes), **start})
        print(f"run folder: {folder.path}")
    derived = ("mixed_precision", "num_processes", "global_batch_size", "scaled_lr", "steps_per_epoch", "total_steps")
    print("  " + ", ".join(f"{key}: {resolved[key]}" for key in derived) + f"\n  full configuration: {folder.config_file}")


def evaluate_floor(run: Run, resume: bool) -> None:
    """The random-init floor: the run's own initial backbone, evaluated on the kNN monitor's subsets (its times size
    the final evaluation's and the monitors' shares of a time budget); a resumed run reads the one it wrote (none
    when its folder came from the Hub without it)."""
    accelerator, config, folder = run.accelerator, run.config, run.folder
    if run.held_out is not None and accelerator.is_main_process:
        indices = subset(run.held_out, DIAGNOSTIC_SAMPLES, config.seed)
        run.diagnostic_images = images_of(run.held_out, indices, config.num_workers)
    if run.evaluable and accelerator.is_main_process and not resume:  # a resumed run's weights are not initial
        result = run.scorer.evaluate(run.unwrapped.backbone, "random-init", config.knn_train_samples,
                                     config.knn_eval_samples, keep=True)  # the kNN monitor's rows
        started = time.perf_counter()
        result["label_free"] = run.scorer.label_free(run.unwrapped, run.diagnostic_images, run.augment,
                                                     config.batch_size)
        result["seconds"]["label_free"] = round(time.perf_counter() - started, 2)
        folder.write_random_init_eval(result)
    accelerator.wait_for_everyone()
    run.random_init = folder.read_random_init_eval()


def finish_run(run: Run) -> dict | None:
    """Final model, plot, frozen-backbone evaluation next to the random-init backbone, exported backbone, push."""
    config, folder, model, phases = run.config, run.folder, run.unwrapped, run.phases
    phases["training_end_s"] = run.since_start()
    model.save_pretrained(folder.model_dir)
    plot_information_plane(folder.metrics.read(), folder.plot_file, title=f"{config.objective} on {config.dataset}")
    final = None
    if run.evaluable:
        trained = run.scorer.evaluate(model.backbone, "trained", run.final_train_rows, None)
        started = time.perf_counter()
        trained["label_free"] = run.scorer.label_free(model, run.diagnostic_images, run.augment, config.batch_size)
        trained["seconds"]["label_free"] = round(time.perf_counter() - started, 2)
        final = {"dataset": config.dataset, "train_split": config.train_split, "eval_split": config.eval_split,
                 "linear_top1": trained["linear_top1"], "knn_top1": trained["knn_top1"],
                 "trained": trained, "random_init": run.random_init}
        folder.write_final_eval(final)
        print(f"\nFrozen-backbone evaluation on {config.dataset} ({config.eval_split} split):")
        print(format_table({f"{name} ({result['num_train']:,} / {result['num_test']:,} images)": result
                            for name, result in (("trained", trained), ("random-init", run.random_init)) if result}))
    phases["evaluation_end_s"] = run.since_start()
    record_skipped_files(run, gather=False)  # the held-out rows the final evaluation skipped
    budget = {"plan": run.budget.latest} if run.budget is not None and run.budget.latest else {}
    folder.update_info(wall_time_s=phases["evaluation_end_s"], total_steps=run.progress.total_steps,
                       skipped_images=run.progress.skipped_images, phases=phases, **budget)  # the card shows them
    if config.export_backbone or config.push_to_hub:
        export_backbone(folder.path, folder.backbone_dir)
    phases["export_end_s"] = run.since_start()
    folder.update_info(wall_time_s=run.since_start(), phases=phases)
    if config.push_to_hub:
        try:
            print(f"pushed to {push_to_hub(folder.path, config.push_to_hub, private=config.hub_private)}")
        except PushError as error:
            print(f"warning: {error}; push later with `hf-ibproj push {folder.path} --repo-id {config.push_to_hub}`",
                  file=sys.stderr)
    print(f"\nrun folder: {folder.path} (wall time {run.since_start() / 60:.1f} min)")
    return final
