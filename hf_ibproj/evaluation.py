"""Frozen-backbone evaluation (PAPER.md section 6): features extracted once, then a linear probe and a weighted kNN.

The paper evaluates a linear classifier on FROZEN encoder features; the weighted kNN is the cheap monitor that
solo-learn and lightly report beside it. Both run on the same features, extracted once per backbone:

    backbone, preprocessing = load_backbone("runs/simclr")        # run folder, saved model, export, timm/Hub id
    results = evaluate_backbone(backbone, train, test, preprocessing["mean"], preprocessing["std"])
    print(format_table({"trained": results}))

Accuracies are percentages (0-100). Top-5 is reported only when there are more than 5 classes.
`hf-ibproj evaluate` is the command-line face of this module; train.py calls `evaluate_backbone` at its end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from .augmentation import to_model_input
from .backbones import create_backbone
from .configuration_ibproj import IBProjConfig
from .data import ImageData, load_image_data
from .modeling_ibproj import IBProjModel
from .runs import has_native_bf16

WEIGHT_DECAY_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
PRECISIONS = ("auto", "bf16", "fp32")
KNN_K = 200
KNN_TEMPERATURE = 0.1
TOP5_MIN_CLASSES = 6  # top-5 accuracy means something only with more than 5 classes


# --------------------------------------------------------------------------------------------- features


def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Pooled features (float32, N x D, on the CPU) of uint8 images (N x C x H x W), without gradient.

    Images are scaled to [0, 1] and normalized with `mean` / `std` per channel. `precision="bf16"` runs the
    backbone under bf16 autocast, `"fp32"` in full precision, `"auto"` in bf16 where the hardware computes it
    natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX: 2-3x faster) and fp32 elsewhere (a CPU without bf16
    units emulates it: measured ~1.7x slower than fp32 on the project's AVX512 machine). The backbone is moved to
    `device` (default: where its parameters are) in channels_last memory format and run in eval mode; its
    train/eval mode is restored afterwards.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}.")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 tensor (N, C, H, W); got {images.dtype} {tuple(images.shape)}.")
    if images.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"images have {images.shape[1]} channels but mean/std have {len(mean)}/{len(std)} values; "
            "load the data with as many channels as the backbone expects."
        )
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    backbone.to(device=device, memory_format=torch.channels_last)
    use_bf16 = precision == "bf16" or (precision == "auto" and has_native_bf16(device))
    was_training = backbone.training
    backbone.eval()
    features = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for start in range(0, len(images), batch_size):
            batch = to_model_input(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
            batch = batch.contiguous(memory_format=torch.channels_last)
            features.append(backbone(batch).float().cpu())
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
) -> dict[str, float]:
    """Multinomial logistic regression on standardized frozen features; returns top1, top5, weight_decay.

    Features are standardized with the train mean and standard deviation. For each weight decay of the grid
    (largest first, each fit warm-started from the previous one, at most `select_max_iter` L-BFGS iterations)
    the model is fit on train minus a random `val_fraction` and scored on that held-out part; the best weight
    decay (ties: the larger) is then refit on all of train to convergence (at most `max_iter` iterations) and
    scored on test. The objective is mean cross-entropy + weight_decay / 2 * ||W||^2 (bias not penalized), i.e.
    scikit-learn's LogisticRegression with C = 1 / (weight_decay * n_train); it is convex and solved with
    full-batch L-BFGS in float32 (a few hundred iterations for 60k x 256 features, tens of seconds on 2 cores).
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
    if len(weight_decays) > 1:
        fit_index, val_index = _split_validation(len(x_train), val_fraction, seed)
        for weight_decay in sorted(weight_decays, reverse=True):
            params, _ = _fit_logistic_regression(
                x_train[fit_index], train_labels[fit_index], num_classes, weight_decay, params, select_max_iter
            )
            accuracy = _accuracy(x_train[val_index], train_labels[val_index], params)
            if accuracy > best_accuracy:
                best_accuracy, best_weight_decay, best_params = accuracy, weight_decay, params
    params, iterations = _fit_logistic_regression(
        x_train, train_labels, num_classes, best_weight_decay, best_params, max_iter
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
) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """((weight, bias), iterations) minimizing mean cross-entropy + weight_decay / 2 * ||weight||^2 (L-BFGS)."""
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
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    precision: str = "auto",
    knn_k: int = KNN_K,
    knn_temperature: float = KNN_TEMPERATURE,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear-probe and kNN accuracy (percent) of a frozen backbone; features are extracted once per split.

    Returns a flat dict: linear_top1, linear_top5, linear_weight_decay, knn_top1, knn_top5 (the top-5 keys only
    with more than 5 classes), num_classes, num_features, num_train, num_test.
    """
    num_classes = check_labels(train, test)
    train_features = extract_features(backbone, train.images, mean, std, batch_size, device, precision)
    test_features = extract_features(backbone, test.images, mean, std, batch_size, device, precision)
    if not (torch.isfinite(train_features).all() and torch.isfinite(test_features).all()):
        raise ValueError("the backbone produced non-finite features (NaN or inf): its weights have diverged; "
                         "evaluate an earlier checkpoint or retrain with a lower learning rate.")
    linear = linear_probe(train_features, train.labels, test_features, test.labels, num_classes, seed=seed)
    knn = knn_accuracy(train_features, train.labels, test_features, test.labels, num_classes, knn_k, knn_temperature)
    return {
        **{f"linear_{name}": value for name, value in linear.items()},
        **{f"knn_{name}": value for name, value in knn.items()},
        "num_classes": num_classes,
        "num_features": train_features.shape[1],
        "num_train": len(train_features),
        "num_test": len(test_features),
    }


def check_labels(train: ImageData, test: ImageData) -> int:
    """The number of classes, after checking both splits are labeled with the same set of classes."""
    for name, split in (("train", train), ("test", test)):
        if split.labels is None:
            raise ValueError(
                f"the {name} split has no labels; frozen-backbone evaluation needs a labeled dataset "
                "(pass --label-column NAME if the labels are in a column with another name)."
            )
        if len(split.labels) == 0:
            raise ValueError(f"the {name} split is empty.")
    if train.class_names and test.class_names and list(train.class_names) != list(test.class_names):
        raise ValueError(
            f"train and test splits name their classes differently: {train.class_names} vs {test.class_names}."
        )
    train_classes = set(train.labels.unique().tolist())
    test_classes = set(test.labels.unique().tolist())
    names = train.class_names or test.class_names
    if train_classes != test_classes:
        describe = lambda ids: ", ".join(names[i] if names else str(i) for i in sorted(ids))  # noqa: E731
        problems = []
        if train_classes - test_classes:
            problems.append(f"classes missing from test: {describe(train_classes - test_classes)}")
        if test_classes - train_classes:
            problems.append(f"classes missing from train: {describe(test_classes - train_classes)}")
        raise ValueError(
            f"train and test splits do not cover the same classes ({'; '.join(problems)}); use splits that "
            "both contain every class (or a larger --max-samples)."
        )
    return len(names) if names else max(train_classes) + 1


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


# --------------------------------------------------------------------------------------------- loading


def load_backbone(model: str, random_init: bool = False, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A pooled-feature backbone and its preprocessing (mean, std, input_size (C, H, W), interpolation).

    `model` is, in this order: a training run folder (with a `model/` subfolder), a saved IBProjModel folder
    (config.json with model_type "ibproj"), an exported timm backbone folder (config.json with "architecture"),
    a timm architecture name (with pretrained weights), or a Hub id (`owner/name` or `hf-hub:owner/name`, fetched
    from HF_ENDPOINT; its config.json decides between IBProjModel and timm). `random_init=True` builds the same
    architecture with fresh weights (seeded by `seed`): the untrained floor of the evaluation.
    """
    name = model.removeprefix("local-dir:")
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_from_folder(path, random_init, seed)
    if path.exists():
        raise ValueError(f"--model {model!r} is a file; pass the folder that holds config.json (or a run folder).")
    if name.startswith("hf-hub:"):
        return _load_from_hub(name.removeprefix("hf-hub:"), random_init, seed)
    if timm.is_model(name):
        return _load_timm(name, random_init, seed, require_weights=True)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _load_from_hub(name, random_init, seed)
    raise ValueError(
        f"--model {model!r} does not resolve: it is not an existing folder (run folder, saved IBProjModel, exported "
        "backbone), not a timm architecture (timm.list_models()), and not a Hub id of the form owner/name."
    )


def _load_from_folder(path: Path, random_init: bool, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    if (path / "model" / "config.json").is_file():  # a training run folder
        return _load_ibproj(str(path / "model"), random_init, seed)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"folder {str(path)!r} is not a training run (no model/config.json), nor a saved IBProjModel or "
            "exported backbone (no config.json); pass one of those."
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") == IBProjConfig.model_type:
        return _load_ibproj(str(path), random_init, seed)
    if "architecture" in config:
        return _load_timm(f"local-dir:{path}", random_init, seed)
    raise ValueError(
        f"{path / 'config.json'} describes neither an IBProjModel (model_type 'ibproj') nor a timm backbone "
        "('architecture' key); pass a run folder, a saved IBProjModel or an exported backbone folder."
    )


def _load_from_hub(repo_id: str, random_init: bool, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    try:
        config_file = hf_hub_download(repo_id, "config.json")
    except (OSError, ConnectionError, EntryNotFoundError, HFValidationError) as error:
        raise ValueError(
            f"--model {repo_id!r} is not a local folder or timm architecture, and the Hub repository could not be "
            f"fetched ({type(error).__name__}: {str(error).splitlines()[0]}). Check the id, the network or "
            "HF_ENDPOINT, or pass a local folder."
        ) from error
    config = json.loads(Path(config_file).read_text())
    if config.get("model_type") == IBProjConfig.model_type:
        return _load_ibproj(repo_id, random_init, seed)
    if "architecture" in config:
        return _load_timm(f"hf-hub:{repo_id}", random_init, seed)
    raise ValueError(f"Hub repository {repo_id!r} holds neither an IBProjModel nor a timm backbone config.json.")


def _load_ibproj(source: str, random_init: bool, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder of a saved IBProjModel (folder or Hub id); preprocessing from its config."""
    config = IBProjConfig.from_pretrained(source)
    if random_init:
        with _seeded(seed):
            backbone = create_backbone(config.backbone, **config.backbone_kwargs)
    else:
        backbone = IBProjModel.from_pretrained(source).backbone
    channels = config.backbone_kwargs.get("in_chans", 3)
    preprocessing = {
        "mean": tuple(config.image_mean),
        "std": tuple(config.image_std),
        "input_size": (channels, config.image_size, config.image_size),
        "interpolation": config.interpolation,
    }
    return backbone, preprocessing


def _load_timm(
    name: str, random_init: bool, seed: int, require_weights: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model without classifier (`local-dir:`, `hf-hub:` or registry name); preprocessing from pretrained_cfg."""
    if require_weights and not random_init and not _has_pretrained_weights(name):
        raise ValueError(
            f"timm architecture {name!r} has no pretrained weights to evaluate; pass a trained checkpoint "
            "(run folder, saved model, exported backbone or Hub id), or a tagged timm name such as 'resnet18.a1_in1k'."
        )
    try:
        with _seeded(seed):
            backbone = timm.create_model(name, pretrained=not random_init, num_classes=0)
    except (OSError, ConnectionError, EntryNotFoundError) as error:
        raise ValueError(f"could not load the weights of {name!r}: {str(error).splitlines()[0]}") from error
    data_config = timm.data.resolve_data_config(model=backbone)
    preprocessing = {key: data_config[key] for key in ("mean", "std", "input_size", "interpolation")}
    return backbone, preprocessing


def _has_pretrained_weights(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg is not None and bool(cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU generator seeded, leaving the caller's random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------- command line


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`hf-ibproj evaluate --model M --dataset D [--random-init]`: the table on stdout, the numbers as JSON."""
    parser = subparsers.add_parser(
        "evaluate",
        help="linear probe and kNN accuracy of a frozen backbone",
        description="Extract features once, then a linear probe (logistic regression, weight decay chosen on a "
        "validation split of train) and a weighted kNN (cosine, k=200, T=0.1). Accuracies in percent.",
    )
    parser.add_argument("--model", required=True,
                        help="run folder, saved IBProjModel folder, exported backbone folder, timm name or Hub id")
    parser.add_argument("--dataset", required=True, help="Hub id, image folder, save_to_disk folder or fashion_mnist")
    parser.add_argument("--split-train", default="train")
    parser.add_argument("--split-test", default="test")
    parser.add_argument("--image-column", default=None, help="default: detected (image, img, ...)")
    parser.add_argument("--label-column", default=None, help="default: detected (label, labels, ...)")
    parser.add_argument("--random-init", action="store_true",
                        help="also evaluate the same architecture untrained (the floor) and print both rows")
    parser.add_argument("--batch-size", type=int, default=512, help="feature-extraction batch size")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="feature-extraction precision")
    parser.add_argument("--device", default=None, help="feature-extraction device; default cuda when available")
    parser.add_argument("--max-samples", type=int, default=None, help="use the first N images of each split")
    parser.add_argument("--output", type=Path, default=None, help="write the results to this JSON file")
    parser.set_defaults(func=_evaluate_command)


def _evaluate_command(args: argparse.Namespace) -> int:
    backbone, preprocessing = load_backbone(args.model)
    channels, height, width = preprocessing["input_size"]
    if height != width:
        raise ValueError(f"the backbone expects {height}x{width} inputs; only square inputs are supported.")
    train, test = (
        load_image_data(args.dataset, split, image_column=args.image_column, label_column=args.label_column,
                        channels=channels, image_size=height, max_samples=args.max_samples)
        for split in (args.split_train, args.split_test)
    )
    models = {"trained": backbone}
    if args.random_init:
        models["random-init"] = load_backbone(args.model, random_init=True)[0]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        name: evaluate_backbone(model, train, test, preprocessing["mean"], preprocessing["std"],
                                batch_size=args.batch_size, device=device, precision=args.precision)
        for name, model in models.items()
    }
    print(format_table(results))
    if args.output is not None:
        report = {"model": args.model, "dataset": args.dataset, "split_train": args.split_train,
                  "split_test": args.split_test, "results": results}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0
