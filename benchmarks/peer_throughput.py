"""End-to-end SimCLR pretraining img/s: train.py against lightly's SimCLR recipe, same backbone, batch, precision.

    pip install -e ".[bench]"                       # lightly is a benchmark-only dependency
    python benchmarks/peer_throughput.py            # the CPU preset (configs/fashion_mnist_cpu.yaml)
    python benchmarks/peer_throughput.py --smoke    # seconds, for CI

train.py side: train.py's own main() for a fixed number of steps on the preset (in-memory uint8 batches,
kornia two-view augmentation on the device, IBProjModel, LARS), img/s read from its metrics.jsonl.
lightly side (its documented SimCLR recipe, benchmarks/lightly_recipe.py): the Fashion-MNIST images as PIL through
lightly's SimCLRTransform in a torch DataLoader with the preset's workers, the same small-stem ResNet-18, lightly's
SimCLRProjectionHead and NTXentLoss, SGD; the same batch, precision (autocast) and channels_last. Both get 1-channel
28 px images: lightly's transform is given the data's 1-channel mean/std (its ImageNet default is 3-channel).
Each side runs in its own forked process, alternating, `--rounds` times; the first `--warmup` steps of every
run (start-up, worker spin-up) are not timed. Prints both medians and the ratio (target: train.py >= 1.5x),
and, as a third side, the model step alone (IBProjModel forward/backward/SGD step on views made beforehand, no
data at all): its img/s over lightly's bounds the ratio any data pipeline could reach on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hf_ibproj import IBProjModel  # noqa: E402
from hf_ibproj.data import load_image_data  # noqa: E402
from hf_ibproj.pretraining import pretrain  # noqa: E402
from hf_ibproj.runs import RunFolder  # noqa: E402
from hf_ibproj.train_config import DEFAULT_PRESET, TrainConfig, parse_train_config  # noqa: E402
from lightly_recipe import (  # noqa: E402
    LightlySimCLR, cpu_autocast, in_fresh_process, preset_uses_bf16, require_lightly)


def train_py_rate(config_argv: list[str], config: TrainConfig, steps: int, warmup: int, out_dir: Path) -> float:
    """img/s of train.py itself over `steps` steps after `warmup` untimed ones (per-step img_per_s of metrics.jsonl).

    Each logged window covers fetching the batch, augmenting it and the training step, as in lightly_rate.
    """
    argv = config_argv + ["--output-dir", str(out_dir), "--max-samples", str((warmup + steps) * config.batch_size),
                          "--epochs", "1", "--log-every", "1", "--diagnostics-every", "1000000", "--tracker", "none",
                          "--final-eval", "false", "--export-backbone", "false", "--eval-split", "none"]
    pretrain(parse_train_config(argv)[0])
    records = RunFolder(out_dir).metrics.read()
    seconds = sum(config.batch_size / r["img_per_s"] for r in records if "img_per_s" in r and r["step"] > warmup)
    return steps * config.batch_size / seconds


def lightly_rate(config: TrainConfig, steps: int, warmup: int) -> float:
    """img/s of lightly's SimCLR recipe (PIL transforms in DataLoader workers) over `steps` timed steps."""
    data = load_image_data(config.dataset, config.train_split, channels=config.channels,
                           image_size=config.image_size, max_samples=(warmup + steps) * config.batch_size)
    recipe = LightlySimCLR(data, config.backbone, config.model_config().backbone_kwargs, batch_size=config.batch_size,
                           num_workers=config.num_workers, bf16=preset_uses_bf16(config))
    started = None
    for step, (view_a, view_b) in enumerate(recipe.loader):
        recipe.step(view_a, view_b)
        if step == warmup - 1:  # the timed part fetches and trains the next `steps` batches
            started = time.perf_counter()
    return steps * config.batch_size / (time.perf_counter() - started)


def model_step_rate(config: TrainConfig, steps: int, warmup: int) -> float:
    """img/s of the training step alone on views made beforehand: an upper bound for train.py end to end."""
    model = IBProjModel(config.model_config()).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # cheaper than train.py's LARS
    views = torch.randn(config.batch_size, config.num_views, config.channels, config.image_size, config.image_size)
    views = [v.contiguous(memory_format=torch.channels_last) for v in views.unbind(1)]
    autocast = cpu_autocast(preset_uses_bf16(config))
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        with autocast:
            loss = model(views).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * config.batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_PRESET), help="train.py preset both sides follow")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
    parser.add_argument("--backbone-kwargs", default=None, help="override the preset's, e.g. '{channels: [16, 32, 64, 128]}'")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default=None, help="override the preset's")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone and batch, one timed step")
    args = parser.parse_args(argv)
    require_lightly()

    overrides: dict[str, str] = {}
    if args.backbone_kwargs:
        overrides["backbone_kwargs"] = args.backbone_kwargs
    if args.mixed_precision:
        overrides["mixed_precision"] = args.mixed_precision
    if args.smoke:
        overrides.update(backbone_kwargs="{channels: [8, 8, 8, 8]}", batch_size="16", num_workers="1")
        args.steps, args.warmup, args.rounds = 1, 1, 1
        torch.set_num_threads(1)
    for name in ("steps", "warmup", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer")
    config_argv = ["--config", args.config] + [a for k, v in overrides.items()
                                               for a in (f"--{k.replace('_', '-')}", v)]
    config, _ = parse_train_config(config_argv)
    if config.objective != "simclr":
        parser.error(f"the preset {args.config} trains {config.objective}; this benchmark compares SimCLR recipes")

    print(f"batch {config.batch_size} x 2 views, {config.backbone} {config.backbone_kwargs}, {config.channels}x"
          f"{config.image_size}px, precision {config.mixed_precision}, channels_last, {config.num_workers} loader "
          f"workers (lightly), {torch.get_num_threads()} threads; {args.steps} timed steps after {args.warmup}, "
          f"{args.rounds} round(s)", flush=True)
    ours, theirs, step_only = [], [], []
    with tempfile.TemporaryDirectory(prefix="peer_throughput_") as temp:
        for round_index in range(args.rounds):
            ours.append(in_fresh_process(train_py_rate, config_argv, config, args.steps, args.warmup,
                                         Path(temp) / f"run{round_index}"))
            theirs.append(in_fresh_process(lightly_rate, config, args.steps, args.warmup))
            step_only.append(in_fresh_process(model_step_rate, config, args.steps, args.warmup))
            print(f"round {round_index + 1}: train.py {ours[-1]:.1f} img/s, lightly {theirs[-1]:.1f} img/s, "
                  f"model step alone {step_only[-1]:.1f} img/s", flush=True)
    ours_rate, theirs_rate, step_rate = (statistics.median(r) for r in (ours, theirs, step_only))
    print(f"train.py  {ours_rate:8.1f} img/s")
    print(f"lightly   {theirs_rate:8.1f} img/s")
    print(f"ratio     {ours_rate / theirs_rate:8.2f}x (train.py / lightly; target >= 1.5x)")
    print(f"ceiling   {step_rate / theirs_rate:8.2f}x (model step alone, {step_rate:.1f} img/s, / lightly: the most any "
          f"data pipeline could give; train.py end to end is {100 * ours_rate / step_rate:.0f}% of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
