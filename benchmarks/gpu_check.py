"""The prepared GPU check: the paper's presets on one CUDA device, on synthetic data made here (no network needed).

    python benchmarks/gpu_check.py --out benchmarks/out/gpu_check    # one CUDA device: sized for a few minutes
    python benchmarks/gpu_check.py --smoke                          # tiny sizes, under a minute on the CPU (CI)

It writes into OUT (data reused when already there, runs redone every time):
- OUT/data: a CIFAR-10-shaped `save_to_disk` folder (20,000 32x32 RGB PNGs, 10 classes) and an ImageNet-100-shaped
  image folder (100 classes x 80 JPEGs of 300-500 px a side, non-square); each image is its class's smooth colour
  pattern, randomly shifted, mixed with a per-image pattern and pixel noise, so the online probe has a class to learn;
- OUT/runs: `hf_ibproj.pretraining` runs of configs/cifar10_simclr.yaml for 300 steps in bf16 and in fp16, and of
  configs/imagenet100_simclr.yaml (224 px, streamed by 8 DataLoader workers) for 50 steps, less than one epoch.
  Every run switches off its evaluation phases (eval_split none: no random-init floor, kNN monitor or final
  evaluation; no export, no tracker): they time the training loop alone;
- OUT/gpu_check.json: the table below, the sizes and the machine (GPU, capability, torch / CUDA versions, cores).

It prints one row per run:
- full step img/s: the median of the run's metrics.jsonl `img_per_s` windows, the first window (start-up) left out;
- model step img/s: forward + backward + optimizer step alone, on views augmented beforehand
  (benchmarks/train_throughput.py's model-only step), in the run's precision through accelerate;
- data wait: the share of the training loop's time spent waiting for the next batch, the device's queued work
  finished first (so it is time the device sits idle for data; the step's loss check synchronizes anyway);
- loader img/s: the training DataLoader alone (the streamed run only; the CIFAR runs index decoded images in memory);
- peak GiB: torch.cuda.max_memory_allocated over the run; setup s: the run's time before its first step;
  probe top-1: the online linear probe's last training accuracy (chance: 10% and 1%).

Targets: full step >= 90% of the model step (benchmarks/train_throughput.py's pipeline target), and at 224 px the
loader must not set the speed: the DataLoader alone at least as fast as the model step, so the data wait stays near
zero. The --smoke figures mean nothing; it runs every part of the check at tiny sizes (width-8 backbone, 3 steps,
precisions no and bf16 in place of bf16 and fp16).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from timm.optim import create_optimizer_v2

import hf_ibproj.pretraining as pretrain_module
from hf_ibproj import IBProjModel, RunFolder, TrainConfig
from hf_ibproj.augmentation import TwoViewAugmentation
from hf_ibproj.pretraining import pretrain
from hf_ibproj.resources import CONFIG_DIR
from hf_ibproj.runs import library_versions
from hf_ibproj.splits import images_of, load_splits, subset, training_crops

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = {"backbone_kwargs": {"channels": [8, 16, 32, 64]}}


@dataclasses.dataclass(frozen=True)
class Sizes:
    cifar_images: int
    cifar_steps: int
    precisions: tuple[str, ...]  # of the CIFAR-10 runs
    folder_classes: int
    folder_per_class: int
    folder_sides: tuple[int, int]  # the range of each JPEG side
    folder_steps: int  # fewer than an epoch: the run's DataLoader starts once
    model_steps: int  # timed model steps
    loader_batches: int  # timed DataLoader batches
    warmup: int  # untimed model steps, and batches left out of the data wait
    cifar: dict  # overrides of the CIFAR-10 preset
    folder: dict  # overrides of the ImageNet-100 preset


REAL = Sizes(cifar_images=20000, cifar_steps=300, precisions=("bf16", "fp16"), folder_classes=100,
             folder_per_class=80, folder_sides=(300, 500), folder_steps=50, model_steps=30, loader_batches=40,
             warmup=5, cifar={"log_every": 10}, folder={"log_every": 5})
SMOKE = Sizes(cifar_images=256, cifar_steps=3, precisions=("no", "bf16"), folder_classes=10, folder_per_class=12,
              folder_sides=(30, 50), folder_steps=3, model_steps=2, loader_batches=3, warmup=1,
              cifar={"log_every": 1, "batch_size": 16, **TINY},
              folder={"log_every": 1, "batch_size": 16, "image_size": 24, "num_workers": 2, **TINY})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="data, runs and gpu_check.json (default: benchmarks/out/gpu_check, "
                                                 "gpu_check_smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on the CPU where there is no GPU (CI)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else REAL
    out = args.out or Path(__file__).parent / "out" / ("gpu_check_smoke" if args.smoke else "gpu_check")
    device = pretrain_module.process_state().device
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: the check needs one (--smoke runs it at tiny sizes on the CPU)")
    started = time.perf_counter()
    cifar = cifar_like(out / "data", sizes.cifar_images)
    folder = imagenet_like(out / "data", sizes.folder_classes, sizes.folder_per_class, sizes.folder_sides)
    common = {"eval_split": None, "final_eval": False, "export_backbone": False, "tracker": "none",
              "overwrite_output_dir": True}
    configs = {f"cifar10-{precision}": TrainConfig.from_preset(
        CONFIG_DIR / "cifar10_simclr.yaml", dataset=str(cifar), mixed_precision=precision,
        max_steps=sizes.cifar_steps, output_dir=str(out / "runs" / f"cifar10-{precision}"), **common, **sizes.cifar)
        for precision in sizes.precisions}
    configs["imagenet100"] = TrainConfig.from_preset(
        CONFIG_DIR / "imagenet100_simclr.yaml", dataset=str(folder), max_steps=sizes.folder_steps,
        output_dir=str(out / "runs" / "imagenet100"), **common, **sizes.folder)
    rows = [measure(name, config, sizes, device) for name, config in configs.items()]
    report = {"machine": machine(device), "sizes": dataclasses.asdict(sizes), "runs": rows,
              "wall_time_s": round(time.perf_counter() - started, 1)}
    print_report(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {out / 'gpu_check.json'} (wall time {report['wall_time_s'] / 60:.1f} min)")


# ------------------------------------------------------------------------------------------- synthetic data


def class_image(label: int, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `label`: the class's smooth colour pattern (the same for every image of the class),
    rolled by a random offset, mixed with a smooth pattern of its own and pixel noise."""
    def smooth(generator: np.random.Generator) -> np.ndarray:
        grid = Image.fromarray(generator.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        return np.asarray(grid.resize((width, height), Image.BICUBIC), dtype=np.float32)

    pattern = np.roll(smooth(np.random.default_rng(label)), (rng.integers(height), rng.integers(width)), axis=(0, 1))
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 12
    return Image.fromarray((0.6 * pattern + 0.4 * smooth(rng) + noise).clip(0, 255).astype(np.uint8))


def cifar_like(data_dir: Path, count: int) -> Path:
    """A CIFAR-10-shaped save_to_disk folder (uoft-cs/cifar10's columns `img`, `label`; a train split of `count`
    32x32 images in 10 balanced classes); reused when present."""
    path = data_dir / f"cifar10-{count}"
    if path.exists():
        print(f"data: reusing {path}")
        return path

    def write(partial: Path) -> None:
        rng = np.random.default_rng(0)
        labels = [index % 10 for index in range(count)]
        features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_CLASSES)})
        train = datasets.Dataset.from_dict({"img": [class_image(label, 32, 32, rng) for label in labels],
                                            "label": labels}, features=features)
        datasets.DatasetDict({"train": train}).save_to_disk(str(partial))

    return publish(path, write)


def imagenet_like(data_dir: Path, classes: int, per_class: int, sides: tuple[int, int]) -> Path:
    """An ImageNet-100-shaped image folder (train/CLASS/N.jpg, JPEG quality 90), each side drawn from `sides`;
    written by one process per core, reused when present."""
    path = data_dir / f"imagenet100-{classes}x{per_class}-{sides[0]}to{sides[1]}px"
    if path.exists():
        print(f"data: reusing {path}")
        return path

    def write(partial: Path) -> None:
        with ProcessPoolExecutor() as pool:
            list(pool.map(write_class, itertools.repeat(partial / "train"), range(classes),
                          itertools.repeat(per_class), itertools.repeat(sides)))

    return publish(path, write)


def write_class(root: Path, label: int, count: int, sides: tuple[int, int]) -> None:
    folder = root / f"class{label:03d}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng([1, label])
    for index in range(count):
        height, width = (int(side) for side in rng.integers(sides[0], sides[1] + 1, 2))
        class_image(label, height, width, rng).save(folder / f"{index:04d}.jpg", quality=90)


def publish(path: Path, write) -> Path:
    """`write(partial)` into PATH.partial, then rename it to `path`: a present `path` is always complete."""
    started = time.perf_counter()
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted invocation
    write(partial)
    partial.rename(path)
    print(f"data: wrote {path} in {time.perf_counter() - started:.1f} s")
    return path


# -------------------------------------------------------------------------------------------- measurements


def measure(name: str, config: TrainConfig, sizes: Sizes, device: torch.device) -> dict:
    """One run and the timings around it, as one row of the report."""
    print(f"\n=== {name}: {config.dataset}, batch {config.batch_size}, {config.max_steps} steps", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    waits = []
    with timed_batches(waits, device):
        run_dir = pretrain(config).run_dir
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    gc.collect()
    folder = RunFolder(run_dir)
    stored, records = folder.read_config(), folder.metrics.read()
    throughput = [record["img_per_s"] for record in records if "img_per_s" in record]
    probe = [record["online_probe_top1"] for record in records if "online_probe_top1" in record]
    train, _, _ = load_splits(config, contextlib.nullcontext)
    images = images_of(train, subset(train, 2 * config.batch_size, config.seed), config.num_workers)
    row = {"name": name, "precision": stored["mixed_precision"], "steps": config.max_steps,
           "batch_size": config.batch_size, "image_size": config.image_size, "streaming": config.streaming,
           "full_step_img_per_s": statistics.median(throughput[1:] or throughput),
           "model_step_img_per_s": model_step_rate(config, stored, images, device, sizes),
           "data_wait_share": data_wait_share(waits[sizes.warmup:]),
           "loader_img_per_s": loader_rate(training_crops(train, config, contextlib.nullcontext), config, device,
                                           sizes.loader_batches) if config.streaming else None,
           "peak_memory_gib": peak, "setup_s": folder.read_info()["phases"]["training_start_s"],
           "online_probe_top1": probe[-1] if probe else None, "run_dir": str(run_dir)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed_batches(waits: list, device: torch.device):
    """Append (start, end) of every wait for a training batch to `waits`: hf_ibproj/pretraining.py's epoch_batches,
    wrapped for the duration; the device's queued work is finished before each wait starts."""
    original = pretrain_module.epoch_batches

    def epoch_batches(run):
        batches = original(run)
        while True:
            synchronize(device)
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            waits.append((start, time.perf_counter()))
            yield batch

    pretrain_module.epoch_batches = epoch_batches
    try:
        yield
    finally:
        pretrain_module.epoch_batches = original


def data_wait_share(waits: list[tuple[float, float]]) -> float:
    """The share of the time from the first wait to the last (one step per wait) spent waiting."""
    return sum(end - start for start, end in waits[:-1]) / (waits[-1][0] - waits[0][0])


def model_step_rate(config: TrainConfig, stored: dict, images: torch.Tensor, device: torch.device,
                    sizes: Sizes) -> float:
    """Images/s of forward + backward + optimizer step alone on views of `images` augmented beforehand
    (benchmarks/train_throughput.py's model-only step), in the run's precision through accelerate, as
    hf_ibproj/pretraining.py's train_step runs it (an fp16 run's grad scaler included)."""
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=stored["mixed_precision"])
    torch.manual_seed(config.seed)
    model_config = config.model_config()
    model_config.image_mean, model_config.image_std = stored["image_mean"], stored["image_std"]
    model = IBProjModel(model_config)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, config.optimizer, lr=0.1, weight_decay=config.weight_decay,
                                    trust_coeff=config.lars_eta, trust_clip=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    augment = TwoViewAugmentation(config.augmentation_preset, config.image_size, config.channels,
                                  model_config.image_mean, model_config.image_std, num_views=config.num_views,
                                  crop_min_scale=config.crop_min_scale,
                                  blur_kernel_size=config.blur_kernel_size).to(device)
    views = [augment(batch.to(device)) for batch in images.split(config.batch_size)]

    def steps(count: int) -> None:
        for index in range(count):
            accelerator.backward(model(views[index % len(views)]).loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    steps(sizes.warmup)
    synchronize(device)
    start = time.perf_counter()
    steps(sizes.model_steps)
    synchronize(device)
    return sizes.model_steps * config.batch_size / (time.perf_counter() - start)


def loader_rate(train, config: TrainConfig, device: torch.device, batches: int) -> float:
    """Images/s of the training DataLoader alone (`train`: the crops of whole images the loop reads), built as
    hf_ibproj/pretraining.py's epoch_batches builds it; the first batch (the workers' start) is not timed."""
    loader = iter(torch.utils.data.DataLoader(train, batch_size=config.batch_size, shuffle=True,
                                              num_workers=config.num_workers, pin_memory=device.type == "cuda"))
    next(loader)
    start = time.perf_counter()
    for _ in itertools.islice(loader, batches):
        pass
    return batches * config.batch_size / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    info = {"device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "versions": library_versions()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                    gpu_memory_gib=round(properties.total_memory / 2**30, 1))
    return info


def print_report(report: dict) -> None:
    host = report["machine"]
    gpu = f"{host['gpu']} (capability {host['capability']})" if "gpu" in host else "no GPU"
    print(f"\n{gpu}, torch {host['torch']}, CUDA {host['cuda']}, {host['cpu_cores_usable']} cores")
    columns = [("run", "name", "{}"), ("precision", "precision", "{}"), ("batch", "batch_size", "{}"),
               ("px", "image_size", "{}"), ("full step img/s", "full_step_img_per_s", "{:,.0f}"),
               ("model step img/s", "model_step_img_per_s", "{:,.0f}"), ("data wait", "data_wait_share", "{:.1%}"),
               ("loader img/s", "loader_img_per_s", "{:,.0f}"), ("peak GiB", "peak_memory_gib", "{:.2f}"),
               ("setup s", "setup_s", "{:.1f}"), ("probe top-1", "online_probe_top1", "{:.1f}%")]
    cells = [[title for title, _, _ in columns]] + [
        ["-" if row[key] is None else form.format(row[key]) for _, key, form in columns] for row in report["runs"]]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    print()
    for row in report["runs"]:
        efficiency = row["full_step_img_per_s"] / row["model_step_img_per_s"]
        print(f"{row['name']}: full step {efficiency:.0%} of the model step (target >= 90%: "
              f"{'met' if efficiency >= 0.9 else 'NOT met'})")
        if row["loader_img_per_s"] is not None:
            sets = row["loader_img_per_s"] < row["model_step_img_per_s"]
            print(f"{row['name']}: DataLoader alone {row['loader_img_per_s']:,.0f} img/s vs model step "
                  f"{row['model_step_img_per_s']:,.0f} img/s: the loader {'SETS' if sets else 'does not set'} the "
                  f"speed (target: it does not); {row['data_wait_share']:.1%} of the step time waits for data")


if __name__ == "__main__":
    main()
