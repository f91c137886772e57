"""Data-pipeline efficiency of the CPU preset: end-to-end training img/s against the model-only step.

    python benchmarks/train_throughput.py            # the CPU preset (configs/fashion_mnist_cpu.yaml)
    python benchmarks/train_throughput.py --smoke    # seconds, for CI

End to end = take a batch of decoded uint8 images, augment two views on the device (train.py's path), then the
training step; model-only = the same step on views augmented beforehand (the same batches). Both run
interleaved in one process, so machine noise hits both alike. Target: end-to-end >= 90% of model-only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timm.optim import create_optimizer_v2

from hf_ibproj import IBProjModel
from hf_ibproj.augmentation import TwoViewAugmentation
from hf_ibproj.data import load_image_data
from hf_ibproj.train_config import DEFAULT_PRESET, TrainConfig, read_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_PRESET))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=4, help="interleaved blocks of each kind")
    parser.add_argument("--smoke", action="store_true", help="tiny model and batch, one step per block")
    args = parser.parse_args()

    values = read_preset(args.config)
    if args.smoke:
        values.update(batch_size=16, backbone_kwargs={"channels": [8, 16, 32, 64]}, max_samples=256)
        args.steps, args.blocks = 1, 1
    config = TrainConfig(**values)
    data = load_image_data(config.dataset, config.train_split, channels=config.channels,
                           image_size=config.image_size, max_samples=config.max_samples or 20 * config.batch_size)
    torch.manual_seed(0)
    model = IBProjModel(config.model_config()).to(memory_format=torch.channels_last).train()
    optimizer = create_optimizer_v2(model, config.optimizer, lr=0.1, weight_decay=config.weight_decay,
                                    trust_coeff=config.lars_eta, trust_clip=True)
    augment = TwoViewAugmentation(config.augmentation_preset, config.image_size, config.channels,
                                  model.config.image_mean, model.config.image_std, num_views=config.num_views,
                                  crop_min_scale=config.crop_min_scale, blur_kernel_size=config.blur_kernel_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.resolve_mixed_precision(torch.device("cpu")) == "bf16")
    batches = [torch.randint(0, len(data), (config.batch_size,)) for _ in range(args.steps)]

    def train_step(views: torch.Tensor) -> None:
        with autocast:
            loss = model(views).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def end_to_end() -> float:
        start = time.perf_counter()
        for indices in batches:
            train_step(augment(data.images[indices]))
        return time.perf_counter() - start

    def model_only(views: list[torch.Tensor]) -> float:
        start = time.perf_counter()
        for v in views:
            train_step(v)
        return time.perf_counter() - start

    train_step(augment(data.images[batches[0]]))  # warm-up
    e2e_rates, model_rates = [], []
    images_per_block = args.steps * config.batch_size
    for _ in range(args.blocks):
        e2e_rates.append(images_per_block / end_to_end())
        prepared = [augment(data.images[indices]) for indices in batches]
        model_rates.append(images_per_block / model_only(prepared))
    e2e, model_rate = statistics.median(e2e_rates), statistics.median(model_rates)
    print(f"preset {args.config}: batch {config.batch_size} x {config.num_views} views, "
          f"{config.backbone} {config.backbone_kwargs}, precision {config.mixed_precision}, "
          f"{torch.get_num_threads()} threads")
    print(f"end-to-end        {e2e:8.1f} img/s")
    print(f"model-only step   {model_rate:8.1f} img/s")
    print(f"pipeline efficiency (end-to-end / model-only): {100 * e2e / model_rate:.1f}%  (target >= 90%)")


if __name__ == "__main__":
    main()
