"""Two-view augmentation for contrastive pretraining, run on whole batches (docs/method.md section 6).

Augmentation is the hot path on a small machine: kornia augments a whole uint8 batch on the training device
with independent random parameters for every sample, several times faster than PIL per sample in loader workers
(benchmarks/RESULTS.md). torchvision v2 on a batched tensor draws ONE parameter set for the whole batch, which would
give every image of the batch the same crop, so it is not used here. kornia is imported where a pipeline is built, so
the setting checks (which the command-line help runs) do not load it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PRESETS = ("simclr", "barlow_twins")

# Solarize threshold 128 on 8-bit images (docs/method.md section 6), on images scaled to [0, 1].
SOLARIZE_THRESHOLD = 128 / 255
# Smallest area fraction of the random resized crop (docs/method.md section 6; SimCLR, lightly and solo-learn use it too).
CROP_MIN_SCALE = 0.08
# Barlow Twins solarizes the second view (and any later one) with this probability, never the first.
BARLOW_SOLARIZE_P = 0.2


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def _as_channel_tensor(values: Sequence[float], channels: int, name: str) -> torch.Tensor:
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values for {channels}-channel images: give one value per channel")
    return torch.tensor([float(v) for v in values]).view(1, channels, 1, 1)


def to_model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Evaluation / feature-extraction input: (B, C, H, W) uint8 -> float32 (x / 255 - mean) / std, no augmentation."""
    channels = images.shape[-3]
    mean_t = _as_channel_tensor(mean, channels, "mean").to(images.device)
    std_t = _as_channel_tensor(std, channels, "std").to(images.device)
    return (to_float_images(images) - mean_t) / std_t


def check_crop_min_scale(scale: float) -> None:
    """A ValueError naming crop_min_scale unless it is an area fraction in (0, 1]."""
    if not 0 < scale <= 1:
        raise ValueError(f"crop_min_scale={scale!r} is invalid; it must be in (0, 1].")


def check_blur_kernel_size(kernel: int, image_size: int) -> None:
    """A ValueError naming blur_kernel_size unless it is odd, >= 3 and padded (reflect) within the image."""
    if kernel < 3 or kernel % 2 == 0 or kernel // 2 >= image_size:
        raise ValueError(f"blur_kernel_size={kernel!r} is invalid; it must be an odd integer >= 3 and below twice "
                         f"the image size ({image_size}).")


def default_blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side, at least 3 (SimCLR: 23 px at 224 px)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _shared_view_pipeline(preset: str, image_size: int, channels: int, crop_min_scale: float,
                          blur_kernel: int) -> nn.Sequential:
    """The part of the recipe every view shares (docs/method.md section 6), with per-sample random parameters.

    With one channel only brightness and contrast jitter apply: saturation, hue and grayscale need colour.
    """
    import kornia.augmentation as K

    if preset == "simclr":
        brightness, contrast, saturation, hue = 0.8, 0.8, 0.8, 0.2
    else:  # barlow_twins
        brightness, contrast, saturation, hue = 0.4, 0.4, 0.2, 0.1
    colour = channels == 3
    ops: list[nn.Module] = [
        # "resample" crops the whole batch with one warp; kornia's default "slice" mode resizes sample by sample.
        K.RandomResizedCrop(
            (image_size, image_size), scale=(crop_min_scale, 1.0), resample="bicubic", cropping_mode="resample"
        ),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(brightness, contrast, saturation if colour else 0.0, hue if colour else 0.0, p=0.8),
    ]
    if colour:
        ops.append(K.RandomGrayscale(p=0.2))
    if preset == "simclr":
        ops.append(K.RandomGaussianBlur(blur_kernel, sigma=(0.1, 2.0), p=0.5))
    return nn.Sequential(*ops)


class TwoViewAugmentation(nn.Module):
    """Batch -> `num_views` independently augmented, normalized views: (B, C, H, W) -> (B, V, C, S, S) float32.

    Presets (docs/method.md section 6):
      simclr        symmetric: crop 0.08-1 (bicubic), flip 0.5, ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8,
                    grayscale p=0.2, Gaussian blur p=0.5 (sigma 0.1-2, kernel ~10% of the side).
      barlow_twins  asymmetric: crop 0.08-1, flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale
                    p=0.2; solarize (threshold 128/255) p=0 on the first view, p=0.2 on every later view.
    `crop_min_scale` (default 0.08) is the crop's smallest area fraction: larger is a weaker augmentation.
    `blur_kernel_size` (odd; default `default_blur_kernel_size(image_size)`) bounds the blur: a 3-px kernel
    cuts sigma 2 to a 3x3 box, while 13 px (2 x 3 sigma + 1) blurs as PIL's GaussianBlur (lightly's) does.
    Every sample of every view draws its own parameters (the views are stacked into one batch of B*V).
    Input: uint8 in [0, 255] or float in [0, 1], either
      (B, C, H, W)     images of any size: every view is cropped here, from the whole (in-memory) image;
      (B, V, C, S, S)  views already cropped, one per view (`hf_ibproj.data.FullImageCrops` crops streamed images
                       from the whole decoded file, per sample): the crop is skipped, the rest of the recipe applies.
    """

    def __init__(
        self,
        preset: str,
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_views: int = 2,
        crop_min_scale: float = CROP_MIN_SCALE,
        blur_kernel_size: int | None = None,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}: choose one of {', '.join(PRESETS)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        if num_views < 2:
            raise ValueError(f"num_views must be at least 2 for contrastive views, got {num_views}")
        check_crop_min_scale(crop_min_scale)
        if blur_kernel_size is not None:
            check_blur_kernel_size(blur_kernel_size, image_size)
        self.preset, self.image_size, self.channels, self.num_views = preset, image_size, channels, num_views
        import kornia.augmentation as K
        self.shared = _shared_view_pipeline(preset, image_size, channels, crop_min_scale,
                                            blur_kernel_size or default_blur_kernel_size(image_size))
        # Applied to views 1.. only, so the first view is never solarized (Barlow Twins' asymmetry).
        self.later_views = (
            K.RandomSolarize(thresholds=(SOLARIZE_THRESHOLD, SOLARIZE_THRESHOLD), additions=0.0, p=BARLOW_SOLARIZE_P)
            if preset == "barlow_twins"
            else nn.Identity()
        )
        self.register_buffer("mean", _as_channel_tensor(mean, channels, "mean"), persistent=False)
        self.register_buffer("std", _as_channel_tensor(std, channels, "std"), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cropped = images.ndim == 5
        self._check_shape(images, cropped)
        batch = images.shape[0]
        x = to_float_images(images.to(self.mean.device))
        if cropped:  # the crop is the first op of `shared`; the others draw their parameters as they would after it
            views = self.shared[1:](x.transpose(0, 1).flatten(0, 1))  # (V*B, C, S, S), view-major
        else:
            views = self.shared(x.repeat(self.num_views, 1, 1, 1))  # (V*B, C, S, S), view-major
        views = views.clamp_(0, 1)  # bicubic resampling overshoots [0, 1] near edges, as PIL's uint8 output cannot
        views = torch.cat([views[:batch], self.later_views(views[batch:])])
        views = (views - self.mean) / self.std
        views = views.view(self.num_views, batch, self.channels, self.image_size, self.image_size)
        return views.transpose(0, 1).contiguous()

    def _check_shape(self, images: torch.Tensor, cropped: bool) -> None:
        side, views = self.image_size, self.num_views
        if cropped and images.shape[1:] != (views, self.channels, side, side):
            raise ValueError(f"expected cropped views of shape (B, {views}, {self.channels}, {side}, {side}), got "
                             f"{tuple(images.shape)}")
        if not cropped and (images.ndim != 4 or images.shape[1] != self.channels):
            raise ValueError(
                f"expected a batch of shape (B, {self.channels}, H, W), got {tuple(images.shape)}: "
                f"convert the images to {self.channels} channel(s) when loading them"
            )
