"""Frozen-backbone evaluation (docs/method.md section 6): features extracted once, then a linear probe and a
weighted kNN.

The paper evaluates a linear classifier on FROZEN encoder features; the weighted kNN is the cheap monitor that
solo-learn and lightly report beside it. Both run on the same features, extracted once per backbone:

    source = resolve_source("runs/simclr")                      # hf_ibproj.sources: any model reference
    config = source.data_config()
    results = evaluate_backbone(source.backbone, train, test, config["mean"], config["std"])   # ImageData splits
    print(format_table({"trained": results}))

Datasets too large to decode into memory go through `extract_dataset_features` (a per-sample Dataset, e.g.
hf_ibproj.data.StreamingImageDataset, read by DataLoader workers; only the features are kept) and
`evaluate_features`. Accuracies are percentages (0-100); top-5 is reported only with more than 5 classes.
Feature extraction and the linear-probe fits show their progress (hf_ibproj.progress). `hf-ibproj evaluate` (hf_ibproj.evaluate_cli)
is the command-line face of this module; train.py calls `evaluate_backbone` at its end.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .augmentation import to_model_input
from .data import ImageData
from .precision import AUTOCAST_DTYPES, resolve_mixed_precision
from .progress import progress_bar

WEIGHT_DECAY_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
PRECISIONS = ("auto", "no", "bf16")  # accelerate's mixed_precision names; "no" is float32
KNN_K = 200
KNN_TEMPERATURE = 0.1
TOP5_MIN_CLASSES = 6  # top-5 accuracy means something only with more than 5 classes


# --------------------------------------------------------------------------------------------- features


def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """Pooled features (float32, N x D, on the CPU) of uint8 images (N x C x H x W), without gradient.

    Images are scaled to [0, 1] and normalized with `mean` / `std` per channel. `precision="bf16"` runs the
    backbone under bf16 autocast, `"no"` in float32, `"auto"` in bf16 where the hardware computes it natively
    (CUDA capability 8.0+, CPUs with AVX512-BF16 or AMX), fp16 on older CUDA GPUs and float32 on other CPUs (which
    emulate bf16, slower than float32: benchmarks/RESULTS.md). The backbone is moved to
    `device` (default: where its parameters are) in channels_last memory format and run in eval mode; its
    train/eval mode is restored afterwards. `progress` shows a progress bar (hf_ibproj.progress).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 tensor (N, C, H, W); got {images.dtype} {tuple(images.shape)}.")
    batches = images.split(batch_size)
    return _features(backbone, batches, len(batches), mean, std, device, precision, progress)


def extract_dataset_features(
    backbone: nn.Module,
    dataset: Dataset,
    indices: Iterable[int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 512,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    precision: str = "auto",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N x D float32), labels (N int64)) of the items `indices` (None: all) of a per-sample dataset.

    Items are (uint8 image (C, H, W), int label[, int skipped]), as hf_ibproj.data.StreamingImageDataset yields
    (label -1 for unlabeled rows, skipped 1 where an undecodable row was replaced by the next one: counted in a
    warning); they are decoded by `num_workers` DataLoader workers and only the features are kept, so memory
    stays bounded for any dataset size. Same preprocessing and precision as `extract_features`.
    """
    subset = dataset if indices is None else Subset(dataset, list(indices))
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    labels: list[torch.Tensor] = []
    skipped = 0

    def images() -> Iterable[torch.Tensor]:
        nonlocal skipped
        for batch in loader:
            labels.append(torch.as_tensor(batch[1], dtype=torch.int64))
            skipped += int(batch[2].sum()) if len(batch) > 2 else 0
            yield batch[0]

    features = _features(backbone, images(), len(loader), mean, std, device, precision, progress)
    if skipped:
        warnings.warn(f"{skipped} of {len(subset)} images could not be decoded; each was replaced by the next "
                      "decodable row of the dataset.")
    return features, torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)


def _features(
    backbone: nn.Module,
    batches: Iterable[torch.Tensor],
    num_batches: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None,
    precision: str,
    progress: bool,
) -> torch.Tensor:
    """The extraction loop shared by in-memory and per-sample data: uint8 batches -> float32 CPU features."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}.")
    if len(mean) != len(std):
        raise ValueError(f"mean and std have {len(mean)} and {len(std)} values; give one per channel to both.")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    backbone.to(device=device, memory_format=torch.channels_last)
    autocast_dtype = AUTOCAST_DTYPES.get(resolve_mixed_precision(precision, device))
    was_training = backbone.training
    backbone.eval()
    features = []
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            for batch in progress_bar(batches, total=num_batches, desc="features", unit="batch",
                                      disable=not progress, leave=False):
                if batch.shape[1] != len(mean):
                    raise ValueError(
                        f"images have {batch.shape[1]} channels but mean/std have {len(mean)} values; "
                        "load the data with as many channels as the backbone expects."
                    )
                batch = to_model_input(batch.to(device, non_blocking=True), mean, std)
                features.append(backbone(batch.contiguous(memory_format=torch.channels_last)).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features) if features else torch.empty(0, 0)


# --------------------------------------------------------------------------------------------- kNN


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test x num_classes) of the weighted kNN classifier of solo-learn and lightly.

    Cosine similarity of L2-normalized features; each of the k most similar training samples votes for its
    class with weight exp(similarity / temperature) (Wu et al. 2018, "instance discrimination"). Test samples
    are processed in chunks so memory stays at chunk_size x N_train.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0; got k={k}, temperature={temperature}.")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for chunk in test.split(chunk_size):
        similarity, index = (chunk @ train.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, train_labels[index], weights))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> dict[str, float]:
    """Top-1 (and top-5 with more than 5 classes) accuracy in percent of `knn_predict`."""
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return _topk_accuracy(scores, test_labels, num_classes)


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels.view(-1, 1)
    result = {"top1": 100.0 * hits[:, 0].double().mean().item()}
    if num_classes >= TOP5_MIN_CLASSES:
        result["top5"] = 100.0 * hits[:, :5].any(dim=1).double().mean().item()
    return result


# --------------------------------------------------------------------------------------------- linear probe


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    weight_decays: tuple[float, ...] = WEIGHT_DECAY_GRID,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    select_max_iter: int = 150,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Multinomial logistic regression on standardized frozen features; returns top1, top5, weight_decay.

    Features are standardized with the train mean and standard deviation. For each weight decay of the grid
    (largest first, each fit warm-started from the previous one, at most `select_max_iter` L-BFGS iterations)
    the model is fit on train minus a random `val_fraction` and scored on that held-out part; the best weight
    decay (ties: the larger) is then refit on all of train to convergence (at most `max_iter` iterations) and
    scored on test. The objective is mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not penalized), i.e.
    scikit-learn's LogisticRegression with C = 1 / (weight_decay * n_train); it is convex and solved with
    full-batch L-BFGS in float32 (a few hundred iterations for 60k x 256 features, tens of seconds on 2 cores).
    `progress` shows a progress bar of the L-BFGS function evaluations of every fit.
    """
    if not weight_decays or min(weight_decays) <= 0:
        raise ValueError(f"weight_decays must be positive values; got {weight_decays}.")
    mean = train_features.double().mean(dim=0)
    std = train_features.double().std(dim=0, unbiased=False)
    std[std == 0] = 1.0  # constant features (e.g. dead ReLUs) stay 0 instead of NaN, as scikit-learn does
    x_train = ((train_features.double() - mean) / std).float()
    x_test = ((test_features.double() - mean) / std).float()

    params = None
    best_accuracy, best_weight_decay, best_params = -1.0, weight_decays[0], None
    with progress_bar(desc="linear probe", unit="step", disable=not progress, leave=False) as bar:
        if len(weight_decays) > 1:
            fit_index, val_index = _split_validation(len(x_train), val_fraction, seed)
            for weight_decay in sorted(weight_decays, reverse=True):
                bar.set_description(f"linear probe: weight decay {weight_decay:g}")
                params, _ = _fit_logistic_regression(
                    x_train[fit_index], train_labels[fit_index], num_classes, weight_decay, params, select_max_iter,
                    bar.update,
                )
                accuracy = _accuracy(x_train[val_index], train_labels[val_index], params)
                if accuracy > best_accuracy:
                    best_accuracy, best_weight_decay, best_params = accuracy, weight_decay, params
        bar.set_description(f"linear probe: refit at weight decay {best_weight_decay:g}")
        params, iterations = _fit_logistic_regression(
            x_train, train_labels, num_classes, best_weight_decay, best_params, max_iter, bar.update
        )
    if iterations >= max_iter:
        warnings.warn(f"linear probe: L-BFGS did not converge in {max_iter} iterations; raise max_iter.")
    weight, bias = params
    result = _topk_accuracy(x_test @ weight.T + bias, test_labels, num_classes)
    result["weight_decay"] = best_weight_decay
    return result


def _split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {fraction}.")
    num_val = max(1, round(n * fraction))
    if num_val >= n:
        raise ValueError(f"the train split has {n} samples, too few to carve a validation split from it.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[num_val:], order[:num_val]


def _fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    max_iter: int,
    on_evaluation: Callable[[], Any],
) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """((weight, bias), iterations) minimizing mean cross-entropy + weight_decay / 2 * ||weight||^2 (L-BFGS).

    `on_evaluation` is called at every function evaluation (the progress bar).
    """
    if init is None:
        weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    else:
        weight, bias = (p.clone() for p in init)
    one_hot = F.one_hot(y, num_classes).to(x.dtype)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=100,  # cheap (vectors of num_classes x dim) and about halves the iterations
        tolerance_grad=1e-5,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        # The closed-form gradient of softmax regression, (softmax - one_hot)^T x / n, written out because it is
        # about twice as fast as autograd through cross_entropy here, and this runs hundreds of times per fit.
        log_probs = torch.addmm(bias, x, weight.T).log_softmax(dim=1)
        residual = (log_probs.exp() - one_hot) / len(x)
        weight.grad = residual.T @ x + weight_decay * weight
        bias.grad = residual.sum(dim=0)
        on_evaluation()
        return -(log_probs * one_hot).sum() / len(x) + 0.5 * weight_decay * weight.square().sum()

    optimizer.step(closure)
    return (weight, bias), optimizer.state[weight]["n_iter"]


def _accuracy(x: torch.Tensor, y: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> float:
    weight, bias = params
    return (x @ weight.T + bias).argmax(dim=1).eq(y).double().mean().item()


# --------------------------------------------------------------------------------------------- both


def evaluate_backbone(
    backbone: nn.Module,
    train: ImageData,
    test: ImageData,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "auto",
    knn_k: int = KNN_K,
    knn_temperature: float = KNN_TEMPERATURE,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Linear-probe and kNN accuracy (percent) of a frozen backbone on in-memory splits (`evaluate_features`).

    Features are extracted once per split; `progress` shows progress bars for the extraction and the probe fits.
    """
    class_names = shared_class_names(train.class_names, test.class_names)
    check_labels(train.labels, test.labels, class_names)  # before the costly extraction
    train_features = extract_features(backbone, train.images, mean, std, batch_size, device, precision, progress)
    test_features = extract_features(backbone, test.images, mean, std, batch_size, device, precision, progress)
    return evaluate_features(train_features, train.labels, test_features, test.labels, class_names=class_names,
                             knn_k=knn_k, knn_temperature=knn_temperature, seed=seed, progress=progress)


def evaluate_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    class_names: Sequence[str] | None = None,
    knn_k: int = KNN_K,
    knn_temperature: float = KNN_TEMPERATURE,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Linear-probe and kNN accuracy (percent) of frozen features with their labels.

    Returns a flat dict: linear_top1, linear_top5, linear_weight_decay, knn_top1, knn_top5 (the top-5 keys only
    with more than 5 classes), num_classes (len(class_names) when given, else the largest label + 1),
    num_features, num_train, num_test.
    """
    num_classes = check_labels(train_labels, test_labels, class_names)
    if not (torch.isfinite(train_features).all() and torch.isfinite(test_features).all()):
        raise ValueError("the backbone produced non-finite features (NaN or inf): its weights have diverged; "
                         "evaluate an earlier checkpoint or retrain with a lower learning rate.")
    started = time.perf_counter()
    linear = linear_probe(train_features, train_labels, test_features, test_labels, num_classes, seed=seed,
                          progress=progress)
    probed = time.perf_counter()
    knn = knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, knn_k, knn_temperature)
    return {
        **{f"linear_{name}": value for name, value in linear.items()},
        **{f"knn_{name}": value for name, value in knn.items()},
        "num_classes": num_classes,
        "num_features": train_features.shape[1],
        "num_train": len(train_features),
        "num_test": len(test_features),
        "seconds": {"linear_probe": round(probed - started, 2), "knn": round(time.perf_counter() - probed, 2)},
    }


def check_labels(
    train_labels: torch.Tensor | None, test_labels: torch.Tensor | None, class_names: Sequence[str] | None = None
) -> int:
    """The number of classes, after checking both splits are labeled (no None, no -1) with the same classes."""
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if labels is None or (labels < 0).any():
            raise ValueError(
                f"the {name} split has no labels (or unlabeled rows); frozen-backbone evaluation needs a labeled "
                "dataset (pass --label-column NAME if the labels are in a column with another name)."
            )
        if len(labels) == 0:
            raise ValueError(f"the {name} split is empty.")
    train_classes = set(train_labels.unique().tolist())
    test_classes = set(test_labels.unique().tolist())
    if class_names and max(train_classes | test_classes) >= len(class_names):
        raise ValueError(f"labels go up to {max(train_classes | test_classes)} but there are {len(class_names)} "
                         "class names; check --label-column.")
    if train_classes != test_classes:
        describe = lambda ids: ", ".join(class_names[i] if class_names else str(i) for i in sorted(ids))
        problems = []
        if train_classes - test_classes:
            problems.append(f"classes missing from test: {describe(train_classes - test_classes)}")
        if test_classes - train_classes:
            problems.append(f"classes missing from train: {describe(test_classes - train_classes)}")
        raise ValueError(
            f"train and test splits do not cover the same classes ({'; '.join(problems)}); use splits that "
            "both contain every class (or a larger --max-samples / --eval-max-samples)."
        )
    return len(class_names) if class_names else max(train_classes) + 1


def shared_class_names(train_names: Sequence[str] | None, test_names: Sequence[str] | None) -> list[str] | None:
    """The class names of two splits (either may have none), which must agree where both have them."""
    if train_names and test_names and list(train_names) != list(test_names):
        raise ValueError(f"train and test splits name their classes differently: {train_names} vs {test_names}.")
    names = train_names or test_names
    return list(names) if names else None


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per model (e.g. trained, random-init), linear and kNN top-1 / top-5."""
    columns = [("linear top-1", "linear_top1"), ("linear top-5", "linear_top5"),
               ("kNN top-1", "knn_top1"), ("kNN top-5", "knn_top5")]
    name_width = max([len("model"), *map(len, results)])
    header = "model".ljust(name_width) + "".join(f"  {title:>12}" for title, _ in columns)
    lines = [header, "-" * len(header)]
    for name, row in results.items():
        cells = "".join(f"  {_percent(row.get(key)):>12}" for _, key in columns)
        lines.append(name.ljust(name_width) + cells)
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
