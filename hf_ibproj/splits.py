"""The splits of a pretraining run: loaded once, read in stratified subsets, and scored with a frozen backbone.

A split is either decoded once into memory (`ImageData`, the fast path for small images) or decoded per sample by
DataLoader workers (`StreamingImageDataset`, `--streaming`); every function here takes either.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .data import ImageData, StreamingImageDataset, load_image_data, stratified_indices
from .diagnostics import label_free_diagnostics
from .evaluation import evaluate_features, extract_dataset_features, extract_features, knn_accuracy

SplitData = ImageData | StreamingImageDataset
STATISTICS_SAMPLES = 10000  # images behind the channel mean / std


def load_splits(config, main_process_first) -> tuple[SplitData, SplitData | None]:
    """The training split and the held-out one (None with `eval_split: none`), as `config` (a TrainConfig) says.

    `main_process_first` is accelerate's context manager: the first process prepares the dataset cache alone.
    """
    common = dict(image_column=config.image_column, label_column=config.label_column, channels=config.channels,
                  image_size=config.image_size)
    with main_process_first():
        if config.streaming:
            train = StreamingImageDataset.from_source(config.dataset, config.train_split, **common)
            held_out = (StreamingImageDataset.from_source(config.dataset, config.eval_split, **common)
                        if config.eval_split else None)
            return train, held_out
        train = load_image_data(config.dataset, config.train_split, max_samples=config.max_samples,
                                seed=config.seed, **common)
        held_out = (load_image_data(config.dataset, config.eval_split, max_samples=config.eval_max_samples,
                                    seed=config.seed, **common) if config.eval_split else None)
    return train, held_out


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
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(split, indices.tolist()), batch_size=256,
                                         num_workers=num_workers)
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
    """Scores a frozen backbone on stratified subsets of a run's splits, with the run's normalization."""

    def __init__(self, train: SplitData, held_out: SplitData | None, mean: list[float], std: list[float], seed: int,
                 num_workers: int) -> None:
        self.train, self.held_out, self.mean, self.std = train, held_out, mean, std
        self.seed, self.num_workers = seed, num_workers

    def features(self, backbone: torch.nn.Module, split: SplitData, count: int | None,
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and labels of `count` stratified rows (None: all); only the features are kept in memory."""
        indices = subset(split, count, self.seed)
        if isinstance(split, ImageData):
            labels = split.labels[indices] if split.labels is not None else None
            return extract_features(backbone, split.images[indices], self.mean, self.std, progress=progress), labels
        return extract_dataset_features(backbone, split, indices.tolist(), self.mean, self.std,
                                        num_workers=self.num_workers, progress=progress)

    def evaluate(self, backbone: torch.nn.Module, name: str, train_samples: int | None,
                 eval_samples: int | None) -> dict:
        """Linear probe + kNN (hf_ibproj.evaluation) on `train_samples` / `eval_samples` rows, with each phase's time."""
        print(f"evaluating the {name} backbone (linear probe + kNN)", flush=True)
        started = time.perf_counter()
        train_features, train_labels = self.features(backbone, self.train, train_samples, progress=True)
        test_features, test_labels = self.features(backbone, self.held_out, eval_samples, progress=True)
        extraction = round(time.perf_counter() - started, 2)
        result = evaluate_features(train_features, train_labels, test_features, test_labels,
                                   class_names=self.train.class_names, seed=self.seed)
        result["seconds"]["feature_extraction"] = extraction
        return result

    def knn_top1(self, backbone: torch.nn.Module, bank_samples: int, query_samples: int) -> float:
        """kNN top-1 of stratified held-out queries against a stratified training memory bank."""
        bank, bank_labels = self.features(backbone, self.train, bank_samples, progress=False)
        queries, query_labels = self.features(backbone, self.held_out, query_samples, progress=False)
        return knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=self.train.num_classes)["top1"]

    def label_free(self, model, images: torch.Tensor | None, augment, batch_size: int) -> dict[str, float]:
        """RankMe, alignment, uniformity, I(Z1;Z2), H(Z1) and the bounds on fixed held-out images, with the run's
        batch size and augmentation (hf_ibproj.diagnostics); {} without a held-out split."""
        if images is None or len(images) < 2:
            return {}
        return label_free_diagnostics(model, images, self.mean, self.std, augment=augment, batch_size=batch_size,
                                      seed=self.seed)
