"""The splits of a pretraining run: loaded once, read in stratified subsets, and scored with a frozen backbone.

A split is either decoded once into memory (`ImageData`, the fast path for small images) or decoded per sample by
DataLoader workers (`StreamingImageDataset`, `--streaming`); every function here takes either.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import torch

from .data import (DecodedImageCache, FullImageCrops, ImageData, StreamingImageDataset, load_image_data,
                   stratified_indices)
from .diagnostics import label_free_diagnostics
from .evaluation import evaluate_features, extract_dataset_features, extract_features, knn_accuracy

SplitData = ImageData | StreamingImageDataset
STATISTICS_SAMPLES = 10000  # images behind the channel mean / std


def load_splits(config, main_process_first) -> tuple[SplitData, SplitData | None, str | None]:
    """The training split, the held-out one (None with `eval_split: none`), and a note when their labels cannot
    score a backbone (None when they can), as `config` (a TrainConfig) says.

    Labels feed only the online probe, the kNN monitor and the frozen-backbone evaluation, which need two or more
    classes: without labels, or with a single class (its labels are dropped), the note says what is skipped and
    why. A held-out split that cannot be loaded is refused naming `--eval-split SPLIT|none`.
    `main_process_first` is accelerate's context manager: the first process prepares the dataset cache alone.
    """
    common = dict(image_column=config.image_column, label_column=config.label_column, channels=config.channels,
                  image_size=config.image_size)

    def load(split: str, max_samples: int | None) -> SplitData:
        if not config.streaming:
            return load_image_data(config.dataset, split, max_samples=max_samples, seed=config.seed, **common)
        stream = StreamingImageDataset.from_source(config.dataset, split, **common)
        if max_samples is None:
            return stream
        # the rows load_image_data keeps, chosen from the label column alone (datasets' select decodes nothing)
        labels = stream.labels
        rows = stratified_indices(labels, max_samples, config.seed, num_rows=None if labels is not None else len(stream))
        return _restreamed(stream, stream.dataset.select(rows.tolist()), labeled=True)

    with main_process_first():
        train = load(config.train_split, config.max_samples)
        held_out = None
        if config.eval_split:
            try:
                held_out = load(config.eval_split, config.eval_max_samples)
            except ValueError as error:
                raise ValueError(f"{error} (--eval-split SPLIT|none: the held-out split of the kNN monitor and the "
                                 "final evaluation, or none to pretrain without one)") from error
    train, note = _scorable(train, f"the {config.train_split!r} split of {config.dataset}",
                            "the online probe, the kNN monitor and the frozen-backbone evaluation")
    if note is None and held_out is not None:
        held_out, note = _scorable(held_out, f"the --eval-split {config.eval_split!r} split of {config.dataset}",
                                   "the kNN monitor and the frozen-backbone evaluation")
    return train, held_out, note


def training_crops(train: SplitData, config, main_process_first) -> FullImageCrops | None:
    """What the loop trains on for a per-sample split: crops of each whole image (`FullImageCrops`), read from the
    decoded cache `config.decoded_cache_side` asks for (built once per node, by the process `main_process_first`
    lets go first); None for an in-memory split, which `TwoViewAugmentation` crops on the device. Evaluation reads
    the split itself: center-fitted images."""
    if isinstance(train, ImageData):
        return None
    cache = None
    if config.decoded_cache_side is not None:
        with main_process_first():
            cache = DecodedImageCache.open_or_build(train, config.decoded_cache_side, config.num_workers)
    return FullImageCrops(train, config.image_size, config.num_views, config.crop_min_scale, config.seed, cache=cache)


def _scorable(split: SplitData, name: str, uses: str) -> tuple[SplitData, str | None]:
    """`split`, unlabeled when it has a single class, and a note saying why its labels cannot score (None: they can)."""
    if split.labels is None:
        return split, (f"note: {name} has no labels (none detected: --label-column NAME names the column; an image "
                       f"folder is labeled by two or more class sub-folders), so {uses} are skipped; pretraining "
                       "itself needs no labels.")
    classes = split.labels.unique().tolist()
    if len(classes) > 1:
        return split, None
    only = split.class_names[classes[0]] if split.class_names else classes[0]
    return _unlabeled(split), (f"note: {name} has a single class ({only}), so {uses}, which need two or more, are "
                               "skipped; pretraining itself needs no labels.")


def _unlabeled(split: SplitData) -> SplitData:
    if isinstance(split, ImageData):
        return dataclasses.replace(split, labels=None, class_names=None)
    return _restreamed(split, split.dataset, labeled=False)


def _restreamed(stream: StreamingImageDataset, dataset, labeled: bool) -> StreamingImageDataset:
    """`stream`'s settings on the rows of `dataset` (a datasets.Dataset), with or without its labels."""
    return StreamingImageDataset(dataset, stream.image_column, stream.label_column if labeled else None,
                                 channels=stream.channels, image_size=stream.image_size,
                                 class_names=stream.class_names if labeled else None,
                                 interpolation=stream.interpolation, crop_pct=stream.crop_pct)


def labels_of(split: SplitData | None) -> torch.Tensor | None:
    return split.labels if split is not None else None


def subset(split: SplitData, count: int | None, seed: int) -> torch.Tensor:
    """A seeded, class-stratified selection of `count` rows of `split` (all rows when `count` is None)."""
    return stratified_indices(labels_of(split), len(split) if count is None else count, seed, num_rows=len(split))


def image_batches(split: SplitData, indices: torch.Tensor, num_workers: int) -> Iterator[torch.Tensor]:
    """The uint8 images of the rows `indices`, in batches (decoded by DataLoader workers for a per-sample dataset)."""
    if isinstance(split, ImageData):
        yield split.images[indices]
        return
    # its own generator: the workers' seeds are not drawn from the global one, which the training stream uses
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(split, indices.tolist()), batch_size=256,
                                         num_workers=num_workers, generator=torch.Generator())
    for images, *_ in loader:
        yield images


def images_of(split: SplitData, indices: torch.Tensor, num_workers: int) -> torch.Tensor:
    """The uint8 images of the rows `indices` as one tensor."""
    return torch.cat(list(image_batches(split, indices, num_workers)))


def channel_statistics(train: SplitData, seed: int, num_workers: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of a stratified subset of the training images."""
    count, total, total_squares = 0, 0.0, 0.0
    for images in image_batches(train, subset(train, STATISTICS_SAMPLES, seed), num_workers):  # bounded memory
        pixels = images.double().div_(255).transpose(0, 1).flatten(1)  # (C, pixels)
        count, total, total_squares = count + pixels.shape[1], total + pixels.sum(1), total_squares + pixels.square().sum(1)
    mean = total / count
    std = (total_squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()


class SplitScorer:
    """Scores a frozen backbone on stratified subsets of a run's splits, with the run's normalization.

    The kNN monitor's fixed subsets (bank and queries, also the random-init floor's) of a per-sample split are
    decoded once and kept in memory as uint8 images (10,000 images at 224 px: 1.5 GB), so the epoch-end monitor does
    not decode them again; other rows (the final evaluation's) are decoded per sample and only their features kept.
    """

    def __init__(self, train: SplitData, held_out: SplitData | None, mean: list[float], std: list[float], seed: int,
                 num_workers: int) -> None:
        self.train, self.held_out, self.mean, self.std = train, held_out, mean, std
        self.seed, self.num_workers = seed, num_workers
        self.kept_images: dict[tuple[int, int | None], ImageData] = {}  # (id of the split, count) -> its rows

    def features(self, backbone: torch.nn.Module, split: SplitData, count: int | None, progress: bool,
                 keep: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and labels of `count` stratified rows (None: all); `keep`: decode those rows once for the run."""
        if keep and not isinstance(split, ImageData):
            split = self._kept(split, count)
            count = None
        indices = subset(split, count, self.seed)
        if isinstance(split, ImageData):
            labels = split.labels[indices] if split.labels is not None else None
            return extract_features(backbone, split.images[indices], self.mean, self.std, progress=progress), labels
        return extract_dataset_features(backbone, split, indices.tolist(), self.mean, self.std,
                                        num_workers=self.num_workers, progress=progress)

    def _kept(self, split: StreamingImageDataset, count: int | None) -> ImageData:
        key = (id(split), count)
        if key not in self.kept_images:
            indices = subset(split, count, self.seed)
            labels = split.labels[indices] if split.labels is not None else None
            self.kept_images[key] = ImageData(images_of(split, indices, self.num_workers), labels, split.class_names)
        return self.kept_images[key]

    def evaluate(self, backbone: torch.nn.Module, name: str, train_samples: int | None,
                 eval_samples: int | None, keep: bool = False) -> dict:
        """Linear probe + kNN (hf_ibproj.evaluation) on `train_samples` / `eval_samples` rows, with each phase's time;
        `keep`: those rows are the kNN monitor's, decoded once for the run."""
        print(f"evaluating the {name} backbone (linear probe + kNN)", flush=True)
        started = time.perf_counter()
        train_features, train_labels = self.features(backbone, self.train, train_samples, progress=True, keep=keep)
        test_features, test_labels = self.features(backbone, self.held_out, eval_samples, progress=True, keep=keep)
        extraction = round(time.perf_counter() - started, 2)
        result = evaluate_features(train_features, train_labels, test_features, test_labels,
                                   class_names=self.train.class_names, seed=self.seed)
        result["seconds"]["feature_extraction"] = extraction
        return result

    def knn_top1(self, backbone: torch.nn.Module, bank_samples: int, query_samples: int) -> float:
        """kNN top-1 of stratified held-out queries against a stratified training memory bank."""
        bank, bank_labels = self.features(backbone, self.train, bank_samples, progress=False, keep=True)
        queries, query_labels = self.features(backbone, self.held_out, query_samples, progress=False, keep=True)
        return knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=self.train.num_classes)["top1"]

    def label_free(self, model, images: torch.Tensor | None, augment, batch_size: int) -> dict[str, float]:
        """RankMe, alignment, uniformity, I(Z1;Z2), H(Z1) and the bounds on fixed held-out images, with the run's
        batch size and augmentation (hf_ibproj.diagnostics); {} without a held-out split."""
        if images is None or len(images) < 2:
            return {}
        return label_free_diagnostics(model, images, self.mean, self.std, augment=augment, batch_size=batch_size,
                                      seed=self.seed)
