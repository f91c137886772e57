"""Model cards (README.md) of what hf_ibproj publishes, rendered from model_cards/ with huggingface_hub's
`ModelCard.from_template`.

    backbone_card     the exported encoder: metadata, training summary, evaluation, plot, timm/transformers usage
    full_model_card   the whole IBProjModel (encoder + projector), to continue pretraining
    classifier_card   a `hf-ibproj finetune` result: its base model, the fine-tuning recipe and its accuracy
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import modeling_small_resnet as small_resnet
from .backbones import SMALL_RESNETS
from .configuration_ibproj import IBProjConfig
from .resources import TEMPLATE_DIR
from .checkpoints import TRAINING_STATE, checkpoint_step
from .runs import RunFolder, read_json
from .sources import Source, ibproj_data_config

if TYPE_CHECKING:
    from .finetune_cli import FinetuneArguments

BACKBONE_TEMPLATE = "backbone.md"
FULL_MODEL_TEMPLATE = "full_model.md"
CLASSIFIER_TEMPLATE = "classifier.md"
# Rendered into cards written before the repo id is known; `hub.push_to_hub` fills it in.
REPO_ID_PLACEHOLDER = "<your-username>/<repo-name>"
LICENSE = "apache-2.0"

PAPER_BIBTEX = """@inproceedings{ouyang2025projection,
  title     = {Projection Head is Secretly an Information Bottleneck},
  author    = {Ouyang, Zhuo and Hu, Kaiwen and Zhang, Qi and Wang, Yifei and Wang, Yisen},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  eprint    = {2503.00507},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2503.00507}
}"""

_OBJECTIVE_NAMES = {"simclr": "SimCLR (NT-Xent)", "barlow_twins": "Barlow Twins"}
# Evaluation protocols of final_eval.json: key prefix -> (model-index task type, name). huggingface_hub files the
# metrics that share a task type and dataset under one task, so each protocol has its own type: the linear probe
# trains an image classifier on the frozen features, kNN scores the feature extractor itself with no trained head.
_PROTOCOLS = {"linear": ("image-classification", "Linear probe"), "knn": ("image-feature-extraction", "kNN")}


def _template(name: str) -> Path:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {str(path)!r} is missing: this hf_ibproj installation lacks its package data "
            "(model_cards/). Reinstall it from a wheel or a source checkout (pip install .)."
        )
    return path


def _bottleneck(config: IBProjConfig) -> tuple[str, list[str]]:
    """Human description and Hub tags of the projector bottleneck (docs/method.md section 3)."""
    parts, tags = [], []
    if config.mi_weight > 0:
        parts.append(f"matrix-MI penalty, weight {config.mi_weight:g}, alpha {config.mi_alpha:g}")
        tags.append("mi-regularization")
    if config.quantize_levels:
        parts.append(f"FSQ quantization, {config.quantize_levels} levels")
        tags.append("quantized-projector")
    if config.sparse_latent_dim:
        parts.append(f"top-k sparse block, k={config.sparse_topk} of {config.sparse_latent_dim} latents")
        tags.append("sparse-projector")
    if not parts:
        return "none (baseline projector)", ["no-bottleneck"]
    return "; ".join(parts), ["information-bottleneck", *tags]


def _format_accuracy(value: float | None) -> str:
    """final_eval.json holds accuracies in percent (hf_ibproj.evaluation's convention)."""
    return "" if value is None else f"{value:.2f}%"


def _dataset(source: Source) -> str | None:
    return source.final_eval.get("dataset") or source.train_config.get("dataset")


def _summary_rows(source: Source, bottleneck: str) -> list[tuple[str, str]]:
    """The training summary table: model settings always, run records when present."""
    config = source.model.config
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(config.backbone_kwargs.items()))
    projector = [*config.projector_hidden_dims, *([config.projector_out_dim] if config.projector_out_dim else [])]
    rows = [
        ("Backbone", f"{config.backbone} ({kwargs})" if kwargs else config.backbone),
        ("Objective", _OBJECTIVE_NAMES[config.objective]),
        ("Projector widths", " - ".join(map(str, projector)) or "none"),
        ("Bottleneck", bottleneck),
        ("Input", f"{config.backbone_kwargs.get('in_chans', 3)} x {config.image_size} x {config.image_size}"),
    ]
    train, info = source.train_config, source.run_info
    checkpoint = source.kind == "checkpoint"  # the run's length and wall time are not the checkpoint's
    for label, value in (
        ("Dataset", _dataset(source)),
        ("Training length", _checkpoint_length(source) if checkpoint else _training_length(train, info)),
        ("Batch size", train.get("batch_size")),
        ("Learning rate", train.get("lr")),
        ("Optimizer", train.get("optimizer")),
        ("Hardware", info.get("hardware")),
        ("Wall time", None if checkpoint or "wall_time_s" not in info else f"{info['wall_time_s'] / 60:.1f} min"),
    ):
        if value is not None:
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            rows.append((label, str(value)))
    return rows


def _training_length(train: dict[str, Any], info: dict[str, Any]) -> str | None:
    """Steps and epochs, and for a `--time-budget` run its last plan (run_info.json's `plan`)."""
    plan = info.get("plan")
    if plan:
        return (f"{plan['total_steps']} steps ({plan['epochs']} epochs), fixed by a {plan['time_budget_min']:g}-minute "
                f"time budget at a measured {plan['img_per_s']:.0f} img/s")
    steps, epochs = info.get("total_steps"), train.get("epochs")
    if steps:
        return f"{steps} steps" + (f" ({epochs} epochs)" if epochs else "")
    return f"{epochs} epochs" if epochs else None


def _checkpoint_length(source: Source) -> str:
    """A training checkpoint's own length: its step (and epochs), of the steps its run had planned by then."""
    step = checkpoint_step(source.model_dir)
    per_epoch = source.train_config.get("steps_per_epoch")
    length = f"{step} steps" + (f" ({round(step / per_epoch, 2):g} epochs)" if per_epoch else "")
    try:
        progress = read_json(source.model_dir / TRAINING_STATE).get("progress") or {}
    except (OSError, ValueError):  # a damaged training_state.json costs the card the planned total only
        progress = {}
    return length + (f" of {progress['total_steps']} planned" if progress.get("planned") else "")


def _eval_results(source: Source) -> tuple[list[EvalResult], list[tuple[str, str, str, str]]]:
    """model-index entries (one task per protocol) and table rows of the accuracies in final_eval.json.

    train.py writes the top-1 accuracies at the top of final_eval.json and the whole evaluation (top-5 too) under
    "trained"; the top level wins where both have a key.
    """
    final_eval = source.final_eval
    values = {**(final_eval.get("trained") or {}), **final_eval}
    dataset = _dataset(source) or "unknown"
    split = final_eval.get("eval_split") or final_eval.get("split") or source.train_config.get("eval_split")
    results, rows = [], []
    for prefix, (task_type, protocol) in _PROTOCOLS.items():
        accuracies = {k: values.get(f"{prefix}_top{k}") for k in (1, 5)}
        for k, value in accuracies.items():
            if value is not None:
                results.append(EvalResult(
                    task_type=task_type, task_name=f"{protocol} on frozen features",
                    dataset_type=dataset, dataset_name=dataset, dataset_split=split,
                    metric_type="accuracy", metric_name=f"{protocol} top-{k} accuracy", metric_value=value,
                ))
        if accuracies[1] is not None:
            where = f"{dataset} ({split})" if split else dataset
            rows.append((protocol, where, _format_accuracy(accuracies[1]), _format_accuracy(accuracies[5])))
    return results, rows


def _python_kwargs(values: dict[str, Any]) -> str:
    """Keyword arguments as Python source for the card's code (lists as tuples, strings in double quotes)."""
    def literal(value: Any) -> str:
        return json.dumps(value) if isinstance(value, str) else repr(tuple(value) if isinstance(value, list) else value)

    return ", ".join(f"{key}={literal(value)}" for key, value in values.items())


def _small_resnet_context(config: IBProjConfig) -> dict[str, Any]:
    """What the card's stock-timm recipe of a small-image ResNet needs: the stock model and its kwargs, the stem."""
    kwargs = {key: tuple(v) if isinstance(v, list) else v for key, v in config.backbone_kwargs.items()}
    channels = kwargs.get("channels", small_resnet.DEFAULT_CHANNELS)
    return {
        "stock_architecture": small_resnet.STOCK_RESNETS[config.backbone],
        "stock_kwargs": _python_kwargs({"num_classes": 0, **kwargs, **small_resnet.stem_sizing_kwargs(channels)}),
        "stem_channels": channels[0],
        "data_kwargs": _python_kwargs(ibproj_data_config(config)),
    }


def _card(source: Source, template: str, library_name: str, repo_id: str, extra_tags: list[str]) -> ModelCard:
    config = source.model.config
    bottleneck, bottleneck_tags = _bottleneck(config)
    model_name = repo_id.split("/")[-1] if repo_id != REPO_ID_PLACEHOLDER else f"{config.backbone}-{config.objective}"
    eval_results, eval_rows = _eval_results(source)
    dataset = _dataset(source)
    small_stem = config.backbone in SMALL_RESNETS
    card_data = ModelCardData(
        model_name=model_name,
        library_name=library_name,
        license=LICENSE,
        pipeline_tag="image-feature-extraction",
        tags=["self-supervised", config.objective.replace("_", "-"), *bottleneck_tags, *extra_tags, "hf_ibproj"],
        datasets=[dataset] if dataset and not Path(dataset).exists() else None,
        eval_results=eval_results or None,
    )
    channels = config.backbone_kwargs.get("in_chans", 3)
    return ModelCard.from_template(
        card_data,
        template_path=str(_template(template)),
        model_name=model_name,
        repo_id=repo_id,
        architecture=config.backbone,
        small_stem=small_stem,
        trust=", trust_remote_code=True" if small_stem else "",
        num_features=source.model.num_features,
        in_chans=channels,
        image_size=config.image_size,
        num_views=config.num_views,
        mean=list(config.image_mean),
        std=list(config.image_std),
        pil_mode={1: "L", 3: "RGB"}.get(channels, "RGB"),
        pil_color=128 if channels == 1 else (128, 64, 32),
        pipeline_ok=channels == 3,
        objective_name=_OBJECTIVE_NAMES[config.objective],
        bottleneck=bottleneck,
        summary_rows=_summary_rows(source, bottleneck),
        eval_rows=eval_rows,
        show_top5=any(top5 for *_, top5 in eval_rows),
        plot=RunFolder.PLOT if source.plot else None,  # the plot's file name beside the card
        bibtex=PAPER_BIBTEX,
        **(_small_resnet_context(config) if small_stem else {}),
    )


def backbone_card(source: Source, repo_id: str = REPO_ID_PLACEHOLDER) -> ModelCard:
    """Card of the exported encoder: metadata, training summary, evaluation, plot, timm/transformers usage, BibTeX."""
    extra_tags = ["image-feature-extraction", "timm", "transformers"]
    if source.model.config.backbone in SMALL_RESNETS:
        extra_tags.append("custom_code")
    return _card(source, BACKBONE_TEMPLATE, "timm", repo_id, extra_tags)


def full_model_card(source: Source, repo_id: str) -> ModelCard:
    """Card of the whole IBProjModel (encoder + projector), which loads with `trust_remote_code=True`."""
    return _card(source, FULL_MODEL_TEMPLATE, "transformers", repo_id, ["transformers", "ibproj", "custom_code"])



def classifier_card(args: FinetuneArguments, source: Source, accuracy: float, class_names: list[str]) -> ModelCard:
    """Card of a `hf-ibproj finetune` result: base_model is the Hub id it started from (a local path never is one)."""
    repo_id = args.push_to_hub or Path(args.output_dir).name
    model_name = repo_id.split("/")[-1]
    dataset_is_hub_id = not Path(args.dataset).expanduser().exists()
    small_stem = source.backbone.pretrained_cfg["architecture"] in SMALL_RESNETS
    card_data = ModelCardData(
        model_name=model_name,
        base_model=source.base_model,
        library_name="timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "hf_ibproj", f"{args.mode}-fine-tuning"],
        datasets=[args.dataset] if dataset_is_hub_id else None,
        metrics=["accuracy"],
        eval_results=[EvalResult(
            task_type="image-classification", dataset_type=args.dataset, dataset_name=args.dataset,
            dataset_split=args.eval_split, metric_type="accuracy", metric_name="top-1 accuracy (%)",
            metric_value=round(accuracy, 2),
        )],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(_template(CLASSIFIER_TEMPLATE)),
        model_name=model_name,
        repo_id=repo_id,
        base_model=source.base_model if isinstance(source.base_model, str) else None,
        local_source=f"a {source.kind} (`{Path(args.model).name}`)",
        dataset=args.dataset,
        mode=args.mode,
        epochs=args.epochs,
        lr=f"{args.lr:g}",
        eval_split=args.eval_split,
        accuracy=f"{accuracy:.2f}",
        class_names=", ".join(class_names),
        small_stem=small_stem,
        trust=", trust_remote_code=True" if small_stem else "",
    )
