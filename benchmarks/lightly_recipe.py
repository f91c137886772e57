"""lightly's SimCLR recipe on hf_ibproj's small-stem ResNets: the peer of benchmarks/peer_throughput.py (img/s) and
benchmarks/peer_accuracy.py (accuracy at a wall-clock budget). lightly is a benchmark-only dependency (the `bench`
extra: pip install -e ".[bench]").

The recipe lightly documents for CIFAR-10-sized images: its CIFAR-10 benchmark
(lightly-ai/lightly, docs/source/getting_started/benchmarks/cifar10_benchmark.py, the SimCLR model; read at commit
0351a522), with the defaults of lightly 1.6.0 where the benchmark gives none. Each hyper-parameter and its source:
- augmentation: `lightly.transforms.SimCLRTransform` with Gaussian blur off (the benchmark's `gaussian_blur=0.`,
  "disable blur for cifar10") and colour-jitter strength 0.5 (what the transform's docstring recommends for small
  images such as CIFAR); every other setting is the transform's default (crop scale 0.08-1, jitter p 0.8, grayscale
  p 0.2, horizontal flip p 0.5). Adapted: the input size is the data's (28 px for Fashion-MNIST, 32 in the
  benchmark) and the normalization the data's own per-channel mean / std (the default is ImageNet's, 3-channel);
- images as PIL through the transform in a torch DataLoader with worker processes (the benchmark's loader);
- projection head: `SimCLRProjectionHead(d, d, 128)` (the benchmark's (512, 512, 128) for its 512-d ResNet-18; d
  is the backbone's feature width here), with lightly 1.6.0's default BatchNorm;
- loss: `NTXentLoss()` at its default temperature 0.5;
- optimizer: SGD, momentum 0.9, weight decay 5e-4, lr 0.06 x batch / 128 (the benchmark's
  `lr_factor = batch_size / 128`), cosine annealing to 0 without warm-up (the benchmark's CosineAnnealingLR over its
  epochs; here over the wall-clock budget, `set_progress`);
- batch: 128 (the benchmark's), or the batch a caller passes, with the lr rule above.
Adapted to this machine: bf16 autocast where the CPU computes bf16 natively, else fp32; channels_last.
Both benchmarks run each side with `in_fresh_process`.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import sys

import torch

from hf_ibproj.backbones import create_backbone
from hf_ibproj.data import ImageData
from hf_ibproj.train_config import TrainConfig

BATCH_SIZE, BASE_LR, BASE_LR_BATCH = 128, 0.06, 128  # lr = BASE_LR x batch / BASE_LR_BATCH
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
HEAD_OUTPUT_DIM = 128
CJ_STRENGTH, GAUSSIAN_BLUR = 0.5, 0.0


def require_lightly() -> None:
    """Exit with the install command when lightly is missing."""
    try:
        import lightly  # noqa: F401
    except ImportError:
        sys.exit(f"{sys.argv[0]} needs lightly, a benchmark-only dependency: pip install -e '.[bench]' "
                 "(or pip install lightly).")


def in_fresh_process(function, *args):
    """`function(*args)` in a forked process of its own: a fresh Accelerate state, its memory and loader workers
    gone when it returns, its exception re-raised here (a crash raises BrokenProcessPool instead of hanging)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(function, *args).result()


def preset_uses_bf16(config: TrainConfig) -> bool:
    """Whether the preset's precision is bf16 on this CPU (`auto`: only where the CPU computes bf16 natively)."""
    return config.resolve_mixed_precision(torch.device("cpu")) == "bf16"


def cpu_autocast(bf16: bool) -> torch.autocast:
    """bf16 autocast on the CPU, or fp32 (autocast off)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def channel_statistics(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of uint8 images (N, C, H, W), as a user of the recipe computes them."""
    std, mean = torch.std_mean(images.transpose(0, 1).flatten(1).float().div_(255), dim=1)
    return mean.tolist(), std.tolist()


class _PILImages(torch.utils.data.Dataset):
    """The images of an ImageData as PIL images through `transform` (what lightly's datasets hand its transforms)."""

    def __init__(self, data: ImageData, transform) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        array = self.data.images[index].permute(1, 2, 0).squeeze(-1).numpy()  # H x W (gray) or H x W x 3
        return self.transform(Image.fromarray(array))


class LightlySimCLR:
    """The recipe, ready to train: `loader` yields [view_a, view_b] batches, `step(view_a, view_b)` trains on one.

    `backbone_kwargs` go to `create_backbone(backbone, ...)` (in_chans, channels, ...); `mean` / `std` (the
    transform's normalization, default: `channel_statistics` of the data) are kept for evaluating the backbone.
    The seed of the weights and the data order is the caller's (torch.manual_seed before construction).
    """

    def __init__(self, data: ImageData, backbone: str, backbone_kwargs: dict, *, batch_size: int, num_workers: int,
                 bf16: bool) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform

        if len(data) < batch_size:
            raise ValueError(f"{len(data)} images do not fill one batch of {batch_size}; lower the batch size.")
        self.mean, self.std = channel_statistics(data.images)
        transform = SimCLRTransform(input_size=data.images.shape[-1], cj_strength=CJ_STRENGTH,
                                    gaussian_blur=GAUSSIAN_BLUR, normalize={"mean": self.mean, "std": self.std})
        self.batch_size = batch_size
        self.loader = torch.utils.data.DataLoader(_PILImages(data, transform), batch_size=batch_size, shuffle=True,
                                                  drop_last=True, num_workers=num_workers,
                                                  persistent_workers=num_workers > 0)
        self.backbone = create_backbone(backbone, **backbone_kwargs)
        width = self.backbone.num_features
        head = SimCLRProjectionHead(width, width, HEAD_OUTPUT_DIM)
        self.model = torch.nn.Sequential(self.backbone, head).to(memory_format=torch.channels_last).train()
        self.criterion = NTXentLoss()
        self.lr = BASE_LR * batch_size / BASE_LR_BATCH
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)
        self.autocast = cpu_autocast(bf16)

    def set_progress(self, fraction: float) -> None:
        """Cosine-annealed learning rate (CosineAnnealingLR to 0) at `fraction` in [0, 1] of the training."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))

    def step(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        """One SGD step on a batch of view pairs; returns the (detached) NT-Xent loss."""
        with self.autocast:
            z = self.model(torch.cat([view_a, view_b]).contiguous(memory_format=torch.channels_last))
            loss = self.criterion(*z.float().chunk(2))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
