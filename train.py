"""Pretrain an encoder with a bottleneck projector ("Projection Head is Secretly an Information Bottleneck").

    python train.py                                   # CPU preset: SimCLR on Fashion-MNIST in 10 minutes, probe + kNN
    python train.py --config configs/cifar10_simclr.yaml --quantize-levels 30
    accelerate launch --num_processes 8 train.py --config configs/imagenet100_barlow_twins.yaml
    python train.py --output-dir runs/x --resume      # continue runs/x from its latest checkpoint, as configured

One Accelerate loop: data -> two-view augmentation on the device -> IBProjModel (backbone -> projector)
-> SSL loss + MI penalty; an online linear probe on detached encoder features, a kNN monitor every epoch,
the information-plane diagnostics of PAPER.md section 5, atomic checkpoints, and a run folder holding the
resolved config, seed, versions, metrics, plot, final model, exported backbone and final evaluation.
With `--time-budget MINUTES` the run measures its own step time and fixes its step count to end on time, then
corrects that count once halfway (or at the next epoch end), from the longer measurement and the kNN monitor's cost.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # the time budget counts from here (before the heavy imports)

import json  # noqa: E402
import sys  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed  # noqa: E402
from timm.optim import create_optimizer_v2, param_groups_weight_decay  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from hf_ibproj import IBProjModel  # noqa: E402
from hf_ibproj.augmentation import TwoViewAugmentation  # noqa: E402
from hf_ibproj.data import ImageData, StreamingImageDataset, load_image_data, stratified_indices  # noqa: E402
from hf_ibproj.diagnostics import label_free_diagnostics  # noqa: E402
from hf_ibproj.evaluation import (  # noqa: E402
    evaluate_features,
    extract_dataset_features,
    extract_features,
    format_table,
    knn_accuracy,
)
from hf_ibproj.hub import (  # noqa: E402
    PushError,
    check_push_access,
    download_run_checkpoint,
    export_backbone,
    push_checkpoint,
    push_to_hub,
)
from hf_ibproj.plotting import plot_information_plane  # noqa: E402
from hf_ibproj.runs import (  # noqa: E402
    MetricsLog,
    hardware_summary,
    latest_checkpoint,
    library_versions,
    save_checkpoint,
    write_json,
    write_yaml,
)
from hf_ibproj.train_config import RUN_CONFIG, TrainConfig, early_arguments, parse_train_config, read_preset  # noqa: E402

# Time budget: steps timed after MEASURE_SKIP warm-up steps, over MEASURE_STEPS steps; the plan aims at
# BUDGET_TARGET of the budget, and the final evaluation is taken to cost FINAL_EVAL_MARGIN x the random-init one
# extrapolated to the full splits (`evaluation_estimate`). Halfway through the planned steps, or at the first epoch
# end after that, the step count is corrected once (`revise_budget`): the step time over every step since the timing
# began, and, once a kNN monitor has run, the ratio of its measured cost to its extrapolation (the trained backbone,
# warm caches) in place of the margin for everything but the linear probe (`revised_estimate`).
# Measured on the default job (2-core EPYC, 2026-12-01): 20-step windows of this shared CPU vary by +-15% in img/s,
# so the plan averages 50 steps (the warm-up, longer than that by default, is not delayed by planning later); the
# steps after it still ran up to 4% faster or slower, which the revision corrects. The trained backbone's full-split
# evaluation took 0.60-0.96x the extrapolated random-init one (feature extraction alone 0.65-1.03x: the random-init
# backbone, evaluated first, mostly extracts slower per image; the L-BFGS probe 0.38-1.65x, by its iterations), so
# the margin is 0.7; with the monitor's ratio for the rest, the probe at 0.7 put the final phase within -10 / +7 s in
# six 10-minute runs (the probe at the ratio too: -6 / +21 s).
MEASURE_SKIP, MEASURE_STEPS = 10, 50
BUDGET_TARGET, FINAL_EVAL_MARGIN, FINAL_SAVE_SECONDS = 0.99, 0.7, 5.0
STREAMING_EVAL_TRAIN_SAMPLES = 20000  # final_eval_train_samples when streaming and unset
STATISTICS_SAMPLES = 10000  # images behind the channel mean / std
DIAGNOSTIC_SAMPLES = 1000  # the fixed held-out images of the label-free diagnostics (issue 15)


class NonFiniteLossError(RuntimeError):
    pass


class TrainingProgress:
    """Optimizer steps done and the schedule's plan; saved in every checkpoint, so `--resume` neither re-plans
    nor restarts an epoch (nanoGPT: on resume the run settings come from the checkpoint). A time budget's plan is
    whatever the checkpoint holds: resumed from before the revision, the run keeps the first plan."""

    def __init__(self, total_steps: int, warmup_steps: int, planned: bool) -> None:
        self.step, self.total_steps, self.warmup_steps, self.planned = 0, total_steps, warmup_steps, planned
        self.skipped_images = 0  # corrupt images replaced while streaming

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class StepTimer:
    """Seconds per optimizer step of this process since `start`, less the epoch-end monitors' time (`exclude`)."""

    def __init__(self) -> None:
        self.started_at, self.start_step, self.excluded = None, 0, 0.0

    def start(self, step: int) -> None:
        self.started_at, self.start_step = time.perf_counter(), step

    def steps(self, step: int) -> int:
        """Steps timed by `step`; -1 before the start."""
        return step - self.start_step if self.started_at is not None else -1

    def exclude(self, seconds: float) -> None:
        if self.started_at is not None:
            self.excluded += seconds

    def step_seconds(self, step: int) -> float:
        return (time.perf_counter() - self.started_at - self.excluded) / self.steps(step)


def make_scheduler(optimizer: torch.optim.Optimizer, progress: TrainingProgress) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine (PAPER.md section 6) per optimizer step, positioned at `progress.step`.

    Rebuilt rather than checkpointed: (step, warmup, total) determine it, and the time budget fixes the total
    only after the first steps. Each group's `initial_lr` is in the optimizer state, so this also works on resume.
    """
    return get_cosine_schedule_with_warmup(optimizer, progress.warmup_steps, progress.total_steps,
                                           last_epoch=progress.step - 1)


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


def fetch_run_from_hub(argv: list[str] | None, state: PartialState) -> None:
    """`--resume --push-to-hub REPO` on a machine without the run: download its records and last checkpoint."""
    early = early_arguments(argv)
    if not (early.resume and early.push_to_hub and early.output_dir) or latest_checkpoint(Path(early.output_dir)):
        return
    if state.is_main_process:
        checkpoint = download_run_checkpoint(early.push_to_hub, Path(early.output_dir))
        print(f"downloaded {checkpoint} from the Hub repo {early.push_to_hub}")
    state.wait_for_everyone()


def load_data(config: TrainConfig, accelerator: Accelerator) -> tuple[ImageData | StreamingImageDataset, object]:
    """Training and held-out data: decoded once in memory, or per-sample datasets for `--streaming`."""
    common = dict(image_column=config.image_column, label_column=config.label_column, channels=config.channels,
                  image_size=config.image_size)
    with accelerator.main_process_first():
        if config.streaming:
            train = StreamingImageDataset.from_source(config.dataset, config.train_split, **common)
            held_out = (StreamingImageDataset.from_source(config.dataset, config.eval_split, **common)
                        if config.eval_split else None)
            return train, held_out
        train = load_image_data(config.dataset, config.train_split, max_samples=config.max_samples,
                                seed=config.seed, **common)
        held_out = (load_image_data(config.dataset, config.eval_split, max_samples=config.eval_max_samples,
                                    seed=config.seed, **common) if config.eval_split else None)
    if train.skipped:
        accelerator.print(f"skipped {train.skipped} corrupt image(s) in {config.dataset}:{config.train_split}")
    return train, held_out


def labels_of(split) -> torch.Tensor | None:
    return split.labels if split is not None else None


def subset(split, count: int | None, seed: int) -> torch.Tensor:
    """A seeded, class-stratified selection of `count` rows of `split` (all rows when `count` is None)."""
    return stratified_indices(labels_of(split), len(split) if count is None else count, seed, num_rows=len(split))


def features_of(backbone: torch.nn.Module, split, indices: torch.Tensor, mean: list[float], std: list[float],
                config: TrainConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frozen-backbone features and labels of the rows `indices`; only the features are kept in memory."""
    if isinstance(split, ImageData):
        labels = split.labels[indices] if split.labels is not None else None
        return extract_features(backbone, split.images[indices], mean, std, progress=progress), labels
    return extract_dataset_features(backbone, split, indices.tolist(), mean, std, num_workers=config.num_workers,
                                    progress=progress)


def image_batches(split, indices: torch.Tensor, config: TrainConfig):
    """The uint8 images of the rows `indices`, in batches (decoded by DataLoader workers for a per-sample dataset)."""
    if isinstance(split, ImageData):
        yield split.images[indices]
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(split, indices.tolist()), batch_size=256,
                                         num_workers=config.num_workers)
    for images, *_ in loader:
        yield images


def images_of(split, indices: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The uint8 images of the rows `indices` as one tensor."""
    return torch.cat(list(image_batches(split, indices, config)))


def held_out_diagnostics(model: IBProjModel, images: torch.Tensor | None, augment, mean, std,
                         config: TrainConfig) -> dict[str, float]:
    """Label-free diagnostics (RankMe, alignment, uniformity, I(Z1;Z2), H(Z1), the bounds) on the fixed held-out
    images, with the run's batch size and augmentation (hf_ibproj.diagnostics); {} without a held-out split."""
    if images is None or len(images) < 2:
        return {}
    return label_free_diagnostics(model, images, mean, std, augment=augment, batch_size=config.batch_size,
                                  seed=config.seed)


def channel_statistics(train, config: TrainConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of a stratified subset of the training images (written to the config)."""
    count, total, total_squares = 0, 0.0, 0.0
    for images in image_batches(train, subset(train, STATISTICS_SAMPLES, config.seed), config):  # bounded memory
        pixels = images.double().div_(255).transpose(0, 1).flatten(1)  # (C, pixels)
        count, total, total_squares = count + pixels.shape[1], total + pixels.sum(1), total_squares + pixels.square().sum(1)
    mean = total / count
    std = (total_squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def final_train_samples(config: TrainConfig) -> int | None:
    """Training rows behind the final linear probe and kNN bank (None: all of them)."""
    return config.final_eval_train_samples or (STREAMING_EVAL_TRAIN_SAMPLES if config.streaming else None)


def evaluate(backbone: torch.nn.Module, train, held_out, mean: list[float], std: list[float], config: TrainConfig,
             name: str, train_samples: int | None, eval_samples: int | None) -> dict:
    """Linear probe + kNN of the frozen backbone (hf_ibproj.evaluation) on stratified subsets of `train_samples`
    and `eval_samples` rows (None: all), with the time of each phase."""
    print(f"evaluating the {name} backbone (linear probe + kNN)", flush=True)
    started = time.perf_counter()
    train_features, train_labels = features_of(backbone, train, subset(train, train_samples, config.seed), mean, std,
                                               config, progress=True)
    test_features, test_labels = features_of(backbone, held_out, subset(held_out, eval_samples, config.seed), mean,
                                             std, config, progress=True)
    extraction = round(time.perf_counter() - started, 2)
    result = evaluate_features(train_features, train_labels, test_features, test_labels,
                               class_names=train.class_names, seed=config.seed)
    result["seconds"]["feature_extraction"] = extraction
    return result


def knn_monitor(backbone: torch.nn.Module, train, held_out, config: TrainConfig, mean: list[float],
                std: list[float]) -> float:
    """kNN top-1 of the current encoder: stratified held-out queries against a stratified training memory bank."""
    bank_features, bank_labels = features_of(backbone, train, subset(train, config.knn_train_samples, config.seed),
                                             mean, std, config, progress=False)
    query_features, query_labels = features_of(backbone, held_out,
                                               subset(held_out, config.knn_eval_samples, config.seed), mean, std,
                                               config, progress=False)
    result = knn_accuracy(bank_features, bank_labels, query_features, query_labels, num_classes=train.num_classes)
    return result["top1"]


def micro_batch_iterator(order: torch.Tensor, start: int, train, config: TrainConfig, device: torch.device):
    """(uint8 images on the device, labels or None, images skipped as corrupt) for the micro-batches from `start`."""
    if isinstance(train, ImageData):
        for indices in order[start:]:
            labels = train.labels[indices].to(device) if train.labels is not None else None
            yield train.images[indices].to(device, non_blocking=True), labels, 0
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(train, order[start:].flatten().tolist()),
        batch_size=order.shape[1], num_workers=config.num_workers, pin_memory=device.type == "cuda",
    )
    for images, labels, skipped in loader:
        labels = None if train.labels is None else labels.to(device)
        yield images.to(device, non_blocking=True), labels, int(skipped.sum())


def epoch_order(num_samples: int, seed: int, epoch: int, accelerator: Accelerator, micro_batches: int,
                batch_size: int) -> torch.Tensor:
    """This process's sample indices for an epoch, (micro_batches, batch_size); the same on every run of a seed."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    permutation = torch.randperm(num_samples, generator=generator)
    shard = permutation[accelerator.process_index :: accelerator.num_processes]
    return shard[: micro_batches * batch_size].view(micro_batches, batch_size)


def plan_length(config: TrainConfig, steps_per_epoch: int) -> tuple[int, bool]:
    """(total optimizer steps, whether they are fixed now); a time budget fixes them after the first steps."""
    kind, value = config.length
    if kind == "max_steps":
        return int(value), True
    if kind == "epochs":
        return int(value) * steps_per_epoch, True
    return steps_per_epoch * 1000, False  # provisional: only the warm-up runs before the budget is planned


def evaluation_estimate(random_init: dict | None, final_rows: tuple[int, int], monitor_rows: tuple[int, int],
                        ratio: float = FINAL_EVAL_MARGIN) -> tuple[float, float]:
    """(final phase, one kNN monitor) in seconds, from the random-init evaluation (same architecture and images).

    That evaluation runs on the kNN monitor's subsets; its times are extrapolated to (train, held-out) row counts,
    `final_rows` for the final evaluation and `monitor_rows` for a monitor (a ratio of 1 unless the stored floor
    has other sizes): extraction scales with the images, the L-BFGS probe with the training rows, kNN with their
    product; the label-free diagnostics use the same images every time. The probe is taken at FINAL_EVAL_MARGIN
    (its iterations depend on the features, not on the backbone's speed), the rest at `ratio`: the trained
    backbone's evaluation runs faster than the random-init one.
    """
    if random_init is None:
        return FINAL_SAVE_SECONDS, 0.0
    seconds, rows_train, rows_test = random_init["seconds"], random_init["num_train"], random_init["num_test"]

    def features_and_knn(num_train: int, num_test: int) -> float:
        return (seconds["feature_extraction"] * (num_train + num_test) / (rows_train + rows_test)
                + seconds["knn"] * num_train * num_test / (rows_train * rows_test) + seconds.get("label_free", 0.0))

    probe = FINAL_EVAL_MARGIN * seconds["linear_probe"] * final_rows[0] / rows_train
    return FINAL_SAVE_SECONDS + probe + ratio * features_and_knn(*final_rows), ratio * features_and_knn(*monitor_rows)


def revised_estimate(random_init: dict | None, final_rows: tuple[int, int], monitor_rows: tuple[int, int],
                     monitor_seconds: float) -> tuple[float, float, float | None]:
    """(final phase, one kNN monitor, ratio) in seconds once a monitor has run: the monitor as measured, the final
    phase extrapolated at the ratio of the measured monitor to its extrapolation. The ratio is None without a
    random-init floor (the final phase is then only the saving), and FINAL_EVAL_MARGIN where the monitor
    extrapolates to under a second (too short to time)."""
    if random_init is None:
        return FINAL_SAVE_SECONDS, monitor_seconds, None
    extrapolated = evaluation_estimate(random_init, final_rows, monitor_rows, ratio=1.0)[1]
    ratio = monitor_seconds / extrapolated if extrapolated >= 1.0 else FINAL_EVAL_MARGIN
    return evaluation_estimate(random_init, final_rows, monitor_rows, ratio)[0], monitor_seconds, ratio


def fix_budget(progress: TrainingProgress, config: TrainConfig, step_seconds: float, estimate: tuple[float, float],
               steps_per_epoch: int, accelerator: Accelerator, run_dir: Path, record: str = "plan",
               **details) -> None:
    """Fix the step count so that training, the kNN monitors and the final phase (`estimate`: their seconds, from
    `evaluation_estimate` or `revised_estimate`) end within the time budget; never below the current step. The main
    process decides; every process follows. The plan goes into run_info.json under `record`, with `details`."""
    final_seconds, knn_seconds = estimate
    elapsed = time.time() - PROCESS_START
    available = config.time_budget * 60 * BUDGET_TARGET - elapsed - final_seconds
    steps = 0
    for _ in range(3):  # the epoch ends crossed (each with a kNN monitor) depend on the steps: iterate to a fixed point
        epoch_ends = (progress.step + steps) // steps_per_epoch - progress.step // steps_per_epoch
        steps = max(0, int((available - epoch_ends * knn_seconds) / step_seconds))
    plan = broadcast_object_list([{
        "time_budget_min": config.time_budget, "planned_at_step": progress.step, "total_steps": progress.step + steps,
        "epochs": round((progress.step + steps) / steps_per_epoch, 2), "step_s": round(step_seconds, 4),
        "img_per_s": round(config.batch_size * accelerator.num_processes / step_seconds, 1),
        "knn_monitor_s": round(knn_seconds, 2), "final_phase_s": round(final_seconds, 1),
        "elapsed_at_plan_s": round(elapsed, 1), **details,
    }])[0]
    progress.total_steps, progress.planned = plan["total_steps"], True
    progress.warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), progress.total_steps)
    if accelerator.is_main_process:
        update_run_info(run_dir, **{record: plan})
        print(f"time budget{' revised' if record != 'plan' else ''}: {plan['total_steps']} steps "
              f"({plan['epochs']} epochs) at {plan['img_per_s']:.0f} img/s, "
              f"{plan['final_phase_s']:.0f} s kept for the final evaluation")


def revision_step(planned_at: int, total_steps: int, steps_per_epoch: int, monitored: bool) -> int | None:
    """The step at which a plan is revised: halfway through its steps, or, where epoch ends run the kNN monitor, the
    first epoch end from there on if it comes before the end (that monitor then measures the evaluation's cost, e.g.
    step 937 of 1,340 for the default job); None for a plan too short to revise."""
    halfway = (planned_at + total_steps) // 2
    if halfway <= planned_at:
        return None
    epoch_end = -(-halfway // steps_per_epoch) * steps_per_epoch
    return epoch_end if monitored and epoch_end < total_steps else halfway


def revise_budget(progress: TrainingProgress, config: TrainConfig, step_seconds: float,
                  estimate: tuple[float, float, float | None], steps_per_epoch: int, accelerator: Accelerator,
                  run_dir: Path) -> None:
    """The one correction of a time budget's plan, at `revision_step` (run_info.json's `plan_revision`):
    `step_seconds` over every step since the timing began, less the monitors; `estimate` from `revised_estimate` on
    the latest monitor (the plan's own before any). A run resumed after its plan does not revise."""
    final_seconds, knn_seconds, ratio = estimate
    details = {"planned_total_steps": progress.total_steps}
    if ratio is not None:
        details["evaluation_ratio"] = round(ratio, 3)
    fix_budget(progress, config, step_seconds, (final_seconds, knn_seconds), steps_per_epoch, accelerator, run_dir,
               record="plan_revision", **details)


def main(argv: list[str] | None = None) -> int:
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    fetch_run_from_hub(argv, state)
    config, args = parse_train_config(argv)
    if config.push_to_hub:
        check_push_access(config.push_to_hub)  # a bad repo id or no token fails now, not after hours of training
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

    train, held_out = load_data(config, accelerator)
    num_classes = train.num_classes
    mean, std = channel_statistics(train, config)
    evaluable = config.final_eval and num_classes > 0 and labels_of(held_out) is not None

    torch.manual_seed(config.seed)  # identical initial weights on every process and every run of a seed
    model_config = config.model_config()
    model_config.image_mean, model_config.image_std = mean, std
    model = IBProjModel(model_config)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    augment = TwoViewAugmentation(config.augmentation_preset, config.image_size, config.channels, mean, std,
                                  num_views=config.num_views, crop_min_scale=config.crop_min_scale,
                                  blur_kernel_size=config.blur_kernel_size).to(device)
    probe = torch.nn.Linear(model.num_features, max(num_classes, 1))
    set_seed(config.seed, device_specific=True)  # from here on, a different augmentation stream on each process

    # PAPER.md section 6: lr scaled by the global batch / 256, warm-up then cosine per optimizer step.
    global_batch = config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    lr = config.lr * global_batch / 256
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train)} training samples do not fill one global batch of {global_batch}; "
                         "lower --batch-size or use more data.")
    micro_batches = steps_per_epoch * config.gradient_accumulation_steps
    optimizer = build_optimizer(model, probe, config, lr)
    model, probe, optimizer = accelerator.prepare(model, probe, optimizer)
    total_steps, planned = plan_length(config, steps_per_epoch)
    progress = TrainingProgress(total_steps, round(config.warmup_epochs * steps_per_epoch), planned)
    accelerator.register_for_checkpointing(progress)
    unwrapped = accelerator.unwrap_model(model)

    metrics = MetricsLog(run_dir / "metrics.jsonl")
    resolved = {**config.to_dict(), "num_processes": accelerator.num_processes, "global_batch_size": global_batch,
                "scaled_lr": lr, "steps_per_epoch": steps_per_epoch,
                "total_steps": progress.total_steps if progress.planned else "planned by time_budget (run_info.json)",
                "image_mean": mean, "image_std": std, "model": model_config.to_diff_dict()}
    if args.resume:
        checkpoint = latest_checkpoint(run_dir)
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {progress.step} of {progress.total_steps}")
        if accelerator.is_main_process:
            metrics.truncate_after(progress.step)
            forget_plans_after(run_dir, progress.step)
    if accelerator.is_main_process:
        start_records(run_dir, config, resolved, args, device, accelerator.num_processes)
    if config.tracker != "none":
        accelerator.init_trackers("ibproj", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                    for k, v in resolved.items()})

    # The random-init floor is the run's own initial backbone (same seed), evaluated first on the kNN monitor's
    # subsets (16-21 s against 86 s on the full splits for the default job); its times size the final evaluation's and
    # the monitors' shares of a time budget.
    random_init_file = run_dir / "random_init_eval.json"
    diagnostic_images = (images_of(held_out, subset(held_out, DIAGNOSTIC_SAMPLES, config.seed), config)
                         if held_out is not None and accelerator.is_main_process else None)
    if evaluable and accelerator.is_main_process and not random_init_file.is_file():
        result = evaluate(unwrapped.backbone, train, held_out, mean, std, config, "random-init",
                          config.knn_train_samples, config.knn_eval_samples)
        started = time.perf_counter()
        result["label_free"] = held_out_diagnostics(unwrapped, diagnostic_images, augment, mean, std, config)
        result["seconds"]["label_free"] = round(time.perf_counter() - started, 2)
        write_json(random_init_file, result)
    accelerator.wait_for_everyone()
    random_init = json.loads(random_init_file.read_text()) if random_init_file.is_file() else None
    num_held_out = len(held_out) if held_out is not None else 0
    final_rows = (min(final_train_samples(config) or len(train), len(train)), num_held_out)
    monitor_rows = (min(config.knn_train_samples, len(train)), min(config.knn_eval_samples, num_held_out))
    estimate = evaluation_estimate(random_init, final_rows, monitor_rows)

    scheduler = make_scheduler(optimizer, progress)
    phases = {"training_start_s": round(time.time() - PROCESS_START, 1)}  # seconds since the process started
    bar = tqdm(total=progress.total_steps, initial=progress.step, disable=not accelerator.is_main_process,
               desc="pretrain")
    window = {"start": time.perf_counter(), "images": 0, "probe_hits": 0, "probe_seen": 0}
    # The step time is timed from step MEASURE_SKIP (or the first step after it that a resumed, unplanned run sees);
    # the latest epoch-end monitor took `monitor_seconds`. A run resumed after its plan neither plans nor revises.
    timer, monitor_seconds, revise_at = StepTimer(), None, None
    model.train()
    try:
        while progress.step < progress.total_steps:
            epoch, start_step = divmod(progress.step, steps_per_epoch)
            order = epoch_order(len(train), config.seed, epoch, accelerator, micro_batches, config.batch_size)
            for images, labels, skipped in micro_batch_iterator(order, start_step * config.gradient_accumulation_steps,
                                                                train, config, device):
                progress.skipped_images += skipped
                output, diagnose = train_step(model, probe, optimizer, augment, images, labels, accelerator,
                                              config, progress, window, run_dir)
                window["images"] += images.shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                progress.step += 1
                bar.update(1)
                if not progress.planned and timer.started_at is None and progress.step >= MEASURE_SKIP:
                    timer.start(progress.step)
                if not progress.planned and timer.steps(progress.step) == MEASURE_STEPS:
                    fix_budget(progress, config, timer.step_seconds(progress.step), estimate, steps_per_epoch,
                               accelerator, run_dir)
                    scheduler, bar.total = make_scheduler(optimizer, progress), progress.total_steps
                    revise_at = revision_step(progress.step, progress.total_steps, steps_per_epoch,
                                              monitored=held_out is not None)
                if progress.step % config.log_every == 0 or diagnose:
                    log_step(output, diagnose, progress, steps_per_epoch, scheduler, window, accelerator, metrics, bar)
                if progress.step % steps_per_epoch == 0 and held_out is not None:
                    started = time.perf_counter()
                    epoch_monitor(progress, steps_per_epoch, config, accelerator, unwrapped, train, held_out, mean,
                                  std, metrics, bar, diagnostic_images, augment)
                    monitor_seconds = time.perf_counter() - started
                    timer.exclude(monitor_seconds)
                if progress.step == revise_at and progress.step < progress.total_steps:
                    revision = (estimate + (None,) if monitor_seconds is None else
                                revised_estimate(random_init, final_rows, monitor_rows, monitor_seconds))
                    revise_budget(progress, config, timer.step_seconds(progress.step), revision, steps_per_epoch,
                                  accelerator, run_dir)
                    scheduler, bar.total = make_scheduler(optimizer, progress), progress.total_steps
                checkpoint_if_due(progress, steps_per_epoch, config, accelerator, unwrapped, run_dir, bar)
                if progress.step >= progress.total_steps:
                    break
    except NonFiniteLossError as error:
        accelerator.end_training()
        if accelerator.is_main_process:
            print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        finish_run(config, unwrapped, run_dir, metrics, train, held_out, mean, std, progress, evaluable,
                   diagnostic_images, augment, phases)
    return 0


def build_optimizer(model: IBProjModel, probe: torch.nn.Module, config: TrainConfig, lr: float):
    """One timm optimizer: the model's groups (no weight decay or LARS adaptation on biases and norms, PAPER.md
    section 6) plus the online probe as its own group (no weight decay, so no LARS adaptation either; solo-learn's
    layout). One optimizer means one fp16 grad-scaler update per step."""
    groups = param_groups_weight_decay(model, config.weight_decay)
    groups.append({"params": list(probe.parameters()), "lr": config.online_probe_lr, "weight_decay": 0.0})
    extra = {"trust_coeff": config.lars_eta, "trust_clip": True} if config.optimizer == "lars" else {}
    momentum = {"momentum": config.momentum} if config.optimizer != "adamw" else {}
    return create_optimizer_v2(groups, config.optimizer, lr=lr, weight_decay=config.weight_decay, **momentum, **extra)


def train_step(model, probe, optimizer, augment, images, labels, accelerator: Accelerator, config: TrainConfig,
               progress: TrainingProgress, window: dict, run_dir: Path):
    """One micro-step: augment, forward, SSL + MI loss, the online probe's loss, backward, optimizer step."""
    views = augment(images)
    with accelerator.accumulate(model, probe):
        diagnose = (progress.step + 1) % config.diagnostics_every == 0 and accelerator.sync_gradients
        output = model(views, return_diagnostics=diagnose)
        loss = output.loss
        if labels is not None:
            # Online linear probe on DETACHED encoder features: no gradient reaches the encoder.
            logits = probe(output.encoder_features.detach().float())
            targets = labels.repeat(config.num_views)
            loss = loss + F.cross_entropy(logits, targets)
            window["probe_hits"] += (logits.argmax(1) == targets).sum().item()
            window["probe_seen"] += targets.numel()
        non_finite = (~torch.isfinite(output.loss)).float()
        if accelerator.num_processes > 1:  # every process stops together, or DDP would hang
            non_finite = accelerator.reduce(non_finite, "max")
        if non_finite.item():
            raise NonFiniteLossError(
                f"non-finite loss ({output.loss.item()}) at step {progress.step}; stopping. The last good checkpoint "
                f"is {latest_checkpoint(run_dir)} (a model folder: `hf-ibproj evaluate --model` reads it). Lower "
                "--lr or --mi-weight in a new run, or resume the run."
            )
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return output, diagnose


def log_step(output, diagnose: bool, progress: TrainingProgress, steps_per_epoch: int, scheduler, window: dict,
             accelerator: Accelerator, metrics: MetricsLog, bar) -> None:
    """Loss, learning rate, throughput, online-probe accuracy and (when computed) the section-5 diagnostics."""
    elapsed = time.perf_counter() - window["start"]
    record = {"step": progress.step, "epoch": progress.step / steps_per_epoch,
              "loss": accelerator.reduce(output.loss.detach(), "mean").item(),
              "ssl_loss": accelerator.reduce(output.ssl_loss.detach(), "mean").item(),
              "lr": scheduler.get_last_lr()[0], "img_per_s": window["images"] / max(elapsed, 1e-9)}
    if output.mi_loss is not None:
        record["mi_loss"] = accelerator.reduce(output.mi_loss.detach(), "mean").item()
    if diagnose:
        record.update({k: accelerator.reduce(v.float(), "mean").item() for k, v in output.diagnostics.items()})
    if window["probe_seen"]:
        record["online_probe_top1"] = 100.0 * window["probe_hits"] / window["probe_seen"]
    if progress.skipped_images:
        record["skipped_images"] = progress.skipped_images
    window.update(start=time.perf_counter(), images=0, probe_hits=0, probe_seen=0)
    accelerator.log(record, step=progress.step)
    if accelerator.is_main_process:
        metrics.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")


def epoch_monitor(progress: TrainingProgress, steps_per_epoch: int, config: TrainConfig, accelerator: Accelerator,
                  model: IBProjModel, train, held_out, mean, std, metrics: MetricsLog, bar,
                  diagnostic_images: torch.Tensor | None, augment) -> None:
    """At an epoch end: the kNN monitor (labelled held-out split) and the held-out label-free diagnostics."""
    if accelerator.is_main_process:
        record = {"step": progress.step, "epoch": progress.step // steps_per_epoch}
        if train.num_classes and labels_of(held_out) is not None:
            record["knn_top1"] = knn_monitor(model.backbone, train, held_out, config, mean, std)
            bar.write(f"epoch {record['epoch']}: kNN top-1 {record['knn_top1']:.2f}%")
        diagnostics = held_out_diagnostics(model, diagnostic_images, augment, mean, std, config)
        record.update({f"heldout/{key}": value for key, value in diagnostics.items()})
        accelerator.log(record, step=progress.step)
        metrics.append(record)
    accelerator.wait_for_everyone()


def checkpoint_if_due(progress: TrainingProgress, steps_per_epoch: int, config: TrainConfig,
                      accelerator: Accelerator, model: IBProjModel, run_dir: Path, bar) -> None:
    """A checkpoint (and its push) at an epoch end, every `checkpoint_every` steps and at the last step."""
    epoch_end = progress.step % steps_per_epoch == 0
    if epoch_end or progress.step % config.checkpoint_every == 0 or progress.step >= progress.total_steps:
        checkpoint = save_checkpoint(accelerator, run_dir, progress.step, config.keep_checkpoints,
                                     model_config=model.config)
        if accelerator.is_main_process and config.push_to_hub and config.hub_strategy == "checkpoint":
            try:
                push_checkpoint(run_dir, checkpoint, config.push_to_hub, private=config.hub_private)
            except PushError as error:  # never stops the run: the next checkpoint pushes again
                bar.write(f"warning: {error} (retried at the next checkpoint)")
                update_run_info(run_dir, push_failures=[*read_run_info(run_dir).get("push_failures", []),
                                                        {"step": progress.step, "error": str(error)}])


def read_run_info(run_dir: Path) -> dict:
    path = run_dir / "run_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_run_info(run_dir: Path, **values) -> None:
    write_json(run_dir / "run_info.json", {**read_run_info(run_dir), **values})


def forget_plans_after(run_dir: Path, step: int) -> None:
    """Drop a time budget's plan or revision made after the checkpoint a run resumes from: it is not in the
    checkpoint, so the resumed run does not follow it (and a plan made again replaces it)."""
    info = read_run_info(run_dir)
    stale = [key for key in ("plan", "plan_revision") if info.get(key, {}).get("planned_at_step", -1) > step]
    if stale:
        write_json(run_dir / "run_info.json", {k: v for k, v in info.items() if k not in stale})


def start_records(run_dir: Path, config: TrainConfig, resolved: dict, args, device, num_processes: int) -> None:
    """config.yaml (written once: a resumed run keeps it) and run_info.json (seed, versions, hardware, commands);
    prints a short summary (the full configuration is in config.yaml)."""
    start = {"command": " ".join(sys.argv), "started": datetime.now().isoformat(timespec="seconds")}
    if args.resume:
        update_run_info(run_dir, resumes=[*read_run_info(run_dir).get("resumes", []), start])
        print(f"run folder: {run_dir} (resumed with its stored configuration)")
    else:
        write_yaml(run_dir / RUN_CONFIG, resolved)
        write_json(run_dir / "run_info.json", {"seed": config.seed, "versions": library_versions(),
                                               "hardware": hardware_summary(device, num_processes), **start})
        preset = TrainConfig(**read_preset(args.config)).to_dict()
        changed = {k: v for k, v in config.to_dict().items() if v != preset[k] and k != "mixed_precision"}
        print(f"run folder: {run_dir}\npreset {args.config}, changed: {changed or 'nothing'}")
    derived = ("mixed_precision", "num_processes", "global_batch_size", "scaled_lr", "steps_per_epoch", "total_steps")
    print("  " + ", ".join(f"{key}: {resolved[key]}" for key in derived) + f"\n  full configuration: {run_dir / RUN_CONFIG}")


def finish_run(config: TrainConfig, model: IBProjModel, run_dir: Path, metrics: MetricsLog, train, held_out,
               mean: list[float], std: list[float], progress: TrainingProgress, evaluable: bool,
               diagnostic_images: torch.Tensor | None, augment, phases: dict[str, float]) -> None:
    """Final model, plot, frozen-backbone evaluation next to the random-init backbone, exported backbone, push."""
    phases["training_end_s"] = round(time.time() - PROCESS_START, 1)
    model.save_pretrained(run_dir / "model")
    plot_information_plane(metrics.read(), run_dir / "information_plane.png",
                           title=f"{config.objective} on {config.dataset}")
    if evaluable:
        trained = evaluate(model.backbone, train, held_out, mean, std, config, "trained", final_train_samples(config),
                           None)
        started = time.perf_counter()
        trained["label_free"] = held_out_diagnostics(model, diagnostic_images, augment, mean, std, config)
        trained["seconds"]["label_free"] = round(time.perf_counter() - started, 2)
        random_init = json.loads((run_dir / "random_init_eval.json").read_text())
        write_json(run_dir / "final_eval.json", {
            "dataset": config.dataset, "train_split": config.train_split, "eval_split": config.eval_split,
            "linear_top1": trained["linear_top1"], "knn_top1": trained["knn_top1"],
            "trained": trained, "random_init": random_init,
        })
        print(f"\nFrozen-backbone evaluation on {config.dataset} ({config.eval_split} split):")
        print(format_table({f"{name} ({result['num_train']:,} / {result['num_test']:,} images)": result
                            for name, result in (("trained", trained), ("random-init", random_init))}))
    phases["evaluation_end_s"] = round(time.time() - PROCESS_START, 1)
    update_run_info(run_dir, wall_time_s=phases["evaluation_end_s"], total_steps=progress.total_steps,
                    skipped_images=progress.skipped_images, phases=phases)  # before the export: the card shows it
    if config.export_backbone or config.push_to_hub:
        export_backbone(run_dir, run_dir / "backbone")
    phases["export_end_s"] = round(time.time() - PROCESS_START, 1)
    update_run_info(run_dir, wall_time_s=round(time.time() - PROCESS_START, 1), phases=phases)
    if config.push_to_hub:
        try:
            print(f"pushed to {push_to_hub(run_dir, config.push_to_hub, private=config.hub_private)}")
        except PushError as error:
            print(f"train.py: warning: {error}; push later with `hf-ibproj push {run_dir} --repo-id "
                  f"{config.push_to_hub}`", file=sys.stderr)
    print(f"\nrun folder: {run_dir} (wall time {(time.time() - PROCESS_START) / 60:.1f} min)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
