"""Backbone export as a Hub folder, its model card, publishing to the Hub, and run checkpoints on the Hub.

The ladder, in the spirit of timm's `models/_hub.py` and of transformers' Trainer (`push_to_hub`, `hub_strategy`):
    load_source              an IBProjModel, its folder, a run folder or a checkpoint -> `Source`
    export_backbone          Source -> Hub folder that timm and transformers load without hf_ibproj
                             (config.json, model.safetensors, README.md, plot; the small-image ResNets add their code)
    push_to_hub              an exported folder (or the full IBProjModel) -> a Hub repo, through huggingface_hub
    push_checkpoint          a run's latest checkpoint -> the repo's last-checkpoint/, with the run's records
    download_run_checkpoint  that checkpoint and records -> a local run folder that `train.py --resume` continues
    register_cli             `hf-ibproj export SRC OUT` and `hf-ibproj push SRC --repo-id ID`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from timm.models import save_for_hf

from . import modeling_small_resnet as small_resnet
from .arguments import arguments_from_namespace
from .backbones import SMALL_RESNETS, create_backbone
from .configuration_ibproj import IBProjConfig
from .modeling_ibproj import IBProjModel
from .resources import TEMPLATE_DIR
from .runs import CHECKPOINT_PREFIX, latest_checkpoint
from .sources import PLOT_NAME, Source, is_exported_folder, is_ibproj_folder, load_source

logger = logging.getLogger(__name__)

BACKBONE_TEMPLATE = "backbone.md"
FULL_MODEL_TEMPLATE = "full_model.md"
# Rendered into cards written before the repo id is known; `push_to_hub` fills it in.
REPO_ID_PLACEHOLDER = "<your-username>/<repo-name>"
LICENSE = "apache-2.0"
# Checkpoints on the Hub, as transformers' Trainer with hub_strategy="checkpoint": the latest one in last-checkpoint/,
# the run's records at the top, and a record of the checkpoint's local folder name (its step).
HUB_CHECKPOINT_FOLDER = "last-checkpoint"
HUB_CHECKPOINT_RECORD = "last_checkpoint.json"
RUN_RECORDS = ("config.yaml", "run_info.json", "metrics.jsonl")

PAPER_BIBTEX = """@inproceedings{ouyang2025projection,
  title     = {Projection Head is Secretly an Information Bottleneck},
  author    = {Ouyang, Zhuo and Hu, Kaiwen and Zhang, Qi and Wang, Yifei and Wang, Yisen},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  eprint    = {2503.00507},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2503.00507}
}"""

# pretrained_cfg keys that describe the exported weights themselves. Everything else timm copies from the base
# architecture's default cfg (url, hf_hub_id, tag, license, paper ids, test sizes, ...) describes an ImageNet
# checkpoint that these weights are not.
_OWN_PRETRAINED_CFG_KEYS = (
    "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
    "num_classes", "pool_size", "first_conv", "classifier", "custom_load",
)
_OBJECTIVE_NAMES = {"simclr": "SimCLR (NT-Xent)", "barlow_twins": "Barlow Twins"}
# The transformers Auto classes an exported small-image ResNet maps to the code it carries (config.json auto_map).
_SMALL_RESNET_AUTO_CLASSES = {
    "AutoConfig": small_resnet.SmallResNetConfig,
    "AutoModel": small_resnet.SmallResNetModel,
    "AutoModelForImageClassification": small_resnet.SmallResNetForImageClassification,
}
# Evaluation protocols of final_eval.json: key prefix -> (model-index task type, name). huggingface_hub files the
# metrics that share a task type and dataset under one task, so each protocol has its own type: the linear probe
# trains an image classifier on the frozen features, kNN scores the feature extractor itself with no trained head.
_PROTOCOLS = {"linear": ("image-classification", "Linear probe"), "knn": ("image-feature-extraction", "kNN")}


class PushError(RuntimeError):
    """The Hub refused or failed an upload (or the upload could not be prepared); nothing local was changed."""


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------
def export_backbone(model_or_dir: IBProjModel | str | Path, out_dir: str | Path) -> Path:
    """Write the encoder as a Hub folder that timm and transformers load without hf_ibproj (DESIGN.md).

    `out_dir` gets config.json (architecture, num_features, model_args, pretrained_cfg describing this model),
    model.safetensors (bare timm keys), README.md (the model card), from a run folder the information-plane plot,
    and for the small-image ResNets the code transformers runs with `trust_remote_code=True`.
    `out_dir` must be absent, empty or a previous export; it is replaced only once the new folder is complete.
    """
    source = load_source(model_or_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (is_exported_folder(out_dir) or not any(out_dir.iterdir()))):
        raise ValueError(
            f"output folder {str(out_dir)!r} exists and is not an empty folder or a previous export; "
            "choose a new path so nothing of yours is overwritten."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write_backbone_files(source.model, staging)
        if source.plot:
            shutil.copy2(source.plot, staging / PLOT_NAME)
        backbone_card(source).save(staging / "README.md")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def write_backbone_files(model: IBProjModel, directory: Path) -> None:
    """config.json + model.safetensors through timm's `save_for_hf`, then fix what it gets wrong for us."""
    config = model.config
    backbone = create_backbone(config.backbone, **config.backbone_kwargs)
    # A fresh timm model holds contiguous float32 CPU copies whatever the trained model's device, dtype or memory
    # format (safetensors refuses channels_last tensors).
    backbone.load_state_dict(model.backbone.state_dict())
    save_for_hf(backbone.eval(), directory, safe_serialization=True, data_config=_data_config(config))
    config_file = Path(directory) / "config.json"
    hf_config = json.loads(config_file.read_text())
    # timm records num_classes in model_args; TimmWrapper passes its own num_classes and would get it twice.
    hf_config.get("model_args", {}).pop("num_classes", None)
    pretrained_cfg = hf_config["pretrained_cfg"]
    own_cfg = {key: pretrained_cfg[key] for key in _OWN_PRETRAINED_CFG_KEYS if key in pretrained_cfg}
    hf_config["pretrained_cfg"] = {**own_cfg, "num_classes": 0}
    if config.backbone in SMALL_RESNETS:
        hf_config.update(carry_small_resnet_code(Path(directory)))
    config_file.write_text(json.dumps(hf_config, indent=2))


def _data_config(config: IBProjConfig) -> dict[str, Any]:
    """The preprocessing the model was trained with, as timm's data config."""
    return {
        "input_size": (config.backbone_kwargs.get("in_chans", 3), config.image_size, config.image_size),
        "mean": tuple(config.image_mean),
        "std": tuple(config.image_std),
        "interpolation": config.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def carry_small_resnet_code(directory: Path) -> dict[str, Any]:
    """Copy the small-image ResNet's code into the folder; return the config.json keys that make transformers run it.

    Its own model type makes transformers ask for `trust_remote_code=True` instead of failing inside TimmWrapper;
    the image processor is transformers' own TimmWrapperImageProcessor (it reads pretrained_cfg), which needs no code.
    """
    code = Path(small_resnet.__file__)
    shutil.copy2(code, directory / code.name)
    return {
        "model_type": small_resnet.SmallResNetConfig.model_type,
        "auto_map": {auto: f"{code.stem}.{cls.__name__}" for auto, cls in _SMALL_RESNET_AUTO_CLASSES.items()},
        "image_processor_type": "TimmWrapperImageProcessor",
    }


# --------------------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------------------
def _template(name: str) -> Path:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {str(path)!r} is missing: this hf_ibproj installation lacks its package data "
            "(model_cards/). Reinstall it from a wheel or a source checkout (pip install .)."
        )
    return path


def _bottleneck(config: IBProjConfig) -> tuple[str, list[str]]:
    """Human description and Hub tags of the projector bottleneck (PAPER.md section 3)."""
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
    for label, value in (
        ("Dataset", _dataset(source)),
        ("Training length", _training_length(train, info)),
        ("Batch size", train.get("batch_size")),
        ("Learning rate", train.get("lr")),
        ("Optimizer", train.get("optimizer")),
        ("Hardware", info.get("hardware")),
        ("Wall time", f"{info['wall_time_s'] / 60:.1f} min" if "wall_time_s" in info else None),
    ):
        if value is not None:
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            rows.append((label, str(value)))
    return rows


def _training_length(train: dict[str, Any], info: dict[str, Any]) -> str | None:
    """Steps and epochs, and for a `--time-budget` run the plan that fixed them (train.py's run_info.json)."""
    plan = info.get("plan_revision") or info.get("plan")  # the plan as revised during the run, when it was
    if plan:
        return (f"{plan['total_steps']} steps ({plan['epochs']} epochs), fixed by a {plan['time_budget_min']:g}-minute "
                f"time budget at a measured {plan['img_per_s']:.0f} img/s")
    steps, epochs = info.get("total_steps"), train.get("epochs")
    if steps:
        return f"{steps} steps" + (f" ({epochs} epochs)" if epochs else "")
    return f"{epochs} epochs" if epochs else None


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
        "data_kwargs": _python_kwargs(_data_config(config)),
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
        plot=source.plot is not None,
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


# --------------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------------
def check_push_access(repo_id: str) -> str:
    """The token for pushing to `repo_id` (HF_TOKEN or the login cache); ValueError on a bad id or no token.

    Cheap and offline: train.py calls it before training so a bad --push-to-hub fails at once, not at the end.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid Hub repository id {repo_id!r}: {error} Expected 'username/model-name'.") from None
    token = get_token()
    if token is None:
        raise ValueError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`.")
    return token


@contextlib.contextmanager
def _push_errors(what: str, repo_id: str, endpoint: str) -> Iterator[None]:
    """Any failure inside becomes a PushError naming the repo and the Hub (the cause stays chained)."""
    try:
        yield
    except Exception as error:
        raise PushError(
            f"{what} to {repo_id!r} on {endpoint} failed: {error}. Local folders are unchanged; retry the push."
        ) from error


def push_to_hub(
    source: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    full_model: bool = False,
    overwrite_readme: bool = False,
) -> str:
    """Create `repo_id` and upload the exported backbone (or, with `full_model`, the whole IBProjModel) to it.

    `source` is an exported folder, a saved IBProjModel folder or a run folder (its backbone/ is exported first
    when absent). A README.md on the Hub that differs from the card is kept (the rest is uploaded, and a warning
    says so) unless `overwrite_readme`. The token comes from HF_TOKEN or the login cache and is only sent in the
    Authorization header. The upload is staged in a temporary copy, so local folders are never modified. Returns
    the commit URL. Bad local input raises ValueError / FileNotFoundError before any request; a failure on the
    Hub's side raises PushError.
    """
    token = check_push_access(repo_id)
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {str(source)!r} does not exist.")
    candidates = (source, source / "backbone", source / "model")
    if not any(is_exported_folder(folder) or is_ibproj_folder(folder) for folder in candidates):
        load_source(source)  # raises the clear "no IBProjModel" error before any request

    with tempfile.TemporaryDirectory(prefix="hf-ibproj-push-") as staging:
        folder = _stage_upload(source, Path(staging) / "upload", repo_id, full_model)
        api = HfApi(token=token)
        message = commit_message or ("Upload IBProjModel" if full_model else "Upload backbone exported by hf_ibproj")
        with _push_errors("push", repo_id, api.endpoint):
            repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision not in (None, "main"):
                api.create_branch(repo, branch=revision, exist_ok=True)
            keep_readme = not overwrite_readme and _hub_readme_differs(api, repo, revision, folder / "README.md")
            commit = api.upload_folder(
                repo_id=repo, folder_path=folder, revision=revision, commit_message=message,
                ignore_patterns=["README.md"] if keep_readme else None,
            )
    if keep_readme:
        logger.warning(
            "kept the README.md of %s on the Hub: it differs from the generated model card (edited on the Hub?). "
            "Pass --overwrite-readme (overwrite_readme=True) to replace it.", repo_id,
        )
    return commit.commit_url


def _hub_readme_differs(api: HfApi, repo_id: str, revision: str | None, readme: Path) -> bool:
    """Whether the repo has a README.md other than `readme` (which the upload would replace)."""
    if not readme.is_file():
        return False
    with tempfile.TemporaryDirectory(prefix="hf-ibproj-readme-") as cache:
        try:
            hub_readme = Path(api.hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=cache))
        except EntryNotFoundError:
            return False
        return hub_readme.read_bytes() != readme.read_bytes()


def _stage_upload(source: Path, staging: Path, repo_id: str, full_model: bool) -> Path:
    """The folder to upload, in `staging`, with a card rendered for `repo_id`."""
    if full_model:
        loaded = load_source(source)
        # save_pretrained writes the weights and, through register_for_auto_class, the model's code + auto_map.
        loaded.model.save_pretrained(staging)
        if loaded.plot:
            shutil.copy2(loaded.plot, staging / PLOT_NAME)
        full_model_card(loaded, repo_id).save(staging / "README.md")
        return staging
    exported = source if is_exported_folder(source) else source / "backbone"
    if is_exported_folder(exported):
        shutil.copytree(exported, staging)
        readme = staging / "README.md"
        if readme.is_file():
            readme.write_text(readme.read_text().replace(REPO_ID_PLACEHOLDER, repo_id))
        return staging
    export_backbone(source, staging)
    return staging


# --------------------------------------------------------------------------------------------------------------
# Checkpoints on the Hub (transformers Trainer's hub_strategy="checkpoint")
# --------------------------------------------------------------------------------------------------------------
_CHECKPOINT_NAME = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)")


def push_checkpoint(run_dir: str | Path, checkpoint_dir: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload a run's checkpoint as the repo's last-checkpoint/, with the run's records, in one commit.

    `checkpoint_dir` is an accelerate `save_state` folder RUN/checkpoints/step_N (runs.save_checkpoint); it
    replaces last-checkpoint/ entirely, config.yaml, run_info.json and metrics.jsonl go to the top of the repo and
    last_checkpoint.json records the folder's name and step. Files are read in place, never modified. Returns the
    commit URL; any failure (bad input, no token, the Hub) raises PushError, so a training loop catches one type.
    """
    with _push_errors("checkpoint push", repo_id, HfApi().endpoint):
        token = check_push_access(repo_id)
        run_dir, checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
        match = _CHECKPOINT_NAME.fullmatch(checkpoint_dir.name)
        files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file()) if checkpoint_dir.is_dir() else []
        if match is None or not files:
            raise FileNotFoundError(
                f"{str(checkpoint_dir)!r} is not a checkpoint folder ({CHECKPOINT_PREFIX}N with the files of "
                "accelerate's save_state); pass one that runs.save_checkpoint wrote."
            )
        operations = [
            CommitOperationAdd(f"{HUB_CHECKPOINT_FOLDER}/{p.relative_to(checkpoint_dir).as_posix()}", str(p))
            for p in files
        ]
        # The records are small and may grow while the run goes on: send a snapshot of their bytes.
        operations += [
            CommitOperationAdd(name, (run_dir / name).read_bytes()) for name in RUN_RECORDS if (run_dir / name).is_file()
        ]
        record = {"name": checkpoint_dir.name, "step": int(match.group(1))}
        operations.append(CommitOperationAdd(HUB_CHECKPOINT_RECORD, json.dumps(record, indent=2).encode()))
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        uploaded = {operation.path_in_repo for operation in operations}
        stale = [
            CommitOperationDelete(path) for path in api.list_repo_files(repo)
            if path.startswith(f"{HUB_CHECKPOINT_FOLDER}/") and path not in uploaded
        ]
        commit = api.create_commit(repo, operations=[*stale, *operations],
                                   commit_message=f"Checkpoint {checkpoint_dir.name}")
    return commit.commit_url


def download_run_checkpoint(repo_id: str, run_dir: str | Path) -> Path:
    """Fetch the checkpoint `push_checkpoint` left in `repo_id` into `run_dir`, so `train.py --resume` continues.

    Writes run_dir/config.yaml, run_info.json, metrics.jsonl (those the repo has), then run_dir/checkpoints/step_N/
    under its recorded name with one rename of a complete folder, so an interrupted download never leaves a partial
    checkpoint. Everything comes from one commit and is staged inside `run_dir` (no Hub cache is written). Returns
    the checkpoint folder. Raises FileNotFoundError when the repo or its checkpoint is missing, FileExistsError
    when `run_dir` already holds a checkpoint.
    """
    run_dir = Path(run_dir)
    existing = latest_checkpoint(run_dir)
    if existing is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoint {existing.name}; resume from it with `train.py --output-dir "
            f"{run_dir} --resume`, or download into another --output-dir."
        )
    api = HfApi()
    try:
        commit = api.model_info(repo_id).sha  # one commit for the record and the files
        has_checkpoint = HUB_CHECKPOINT_RECORD in api.list_repo_files(repo_id, revision=commit)
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} does not exist (or is private and no token is set: HF_TOKEN)."
        ) from None
    if not has_checkpoint:
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} holds no checkpoint ({HUB_CHECKPOINT_RECORD} is missing): push one with "
            f"`train.py --push-to-hub {repo_id} --hub-strategy checkpoint`."
        )
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hub-download-", dir=run_dir) as staging:
        api.snapshot_download(repo_id, revision=commit, local_dir=staging,
                              allow_patterns=[HUB_CHECKPOINT_RECORD, f"{HUB_CHECKPOINT_FOLDER}/*", *RUN_RECORDS])
        staging = Path(staging)
        name = json.loads((staging / HUB_CHECKPOINT_RECORD).read_text()).get("name", "")
        if _CHECKPOINT_NAME.fullmatch(name) is None:  # the name becomes a local path: accept only step_N
            raise ValueError(f"{HUB_CHECKPOINT_RECORD} of {repo_id!r} names {name!r}, not a {CHECKPOINT_PREFIX}N folder.")
        if not (staging / HUB_CHECKPOINT_FOLDER).is_dir():
            raise FileNotFoundError(f"Hub repository {repo_id!r} records {name} but has no {HUB_CHECKPOINT_FOLDER}/.")
        for record in RUN_RECORDS:
            if (staging / record).is_file():
                os.replace(staging / record, run_dir / record)
        target = checkpoints / name
        os.replace(staging / HUB_CHECKPOINT_FOLDER, target)
    return target


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class PushArguments:
    """The flags of `hf-ibproj push` (the source folder is its positional argument)."""

    repo_id: str = field(metadata={"help": "Hub repository 'username/model-name' (created if missing)"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to commit to, created if missing "
                                                                 "(None: main)"})
    commit_message: str | None = field(default=None, metadata={"help": "commit message (None: one that says what "
                                                                        "was uploaded)"})
    full_model: bool = field(default=False, metadata={
        "help": "push the whole IBProjModel (encoder + projector, loads with trust_remote_code=True) to continue "
                "pretraining, instead of the exported encoder"})
    overwrite_readme: bool = field(default=False, metadata={
        "help": "replace a README.md on the Hub that differs from the generated card, instead of keeping it"})


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`hf-ibproj export SRC OUT` and `hf-ibproj push SRC --repo-id ID ...`."""
    export = subparsers.add_parser("export", help="export the encoder as a timm / transformers Hub folder")
    export.add_argument("src", help="training run folder, IBProjModel folder or checkpoint folder")
    export.add_argument("out", help="output folder (absent, empty, or a previous export)")
    export.set_defaults(func=_export_command)

    push = subparsers.add_parser("push", dataclass_types=[PushArguments],
                                 help="upload an exported backbone (or the full model) to the Hub")
    push.add_argument("src", help="exported backbone folder, training run folder or IBProjModel folder")
    push.set_defaults(func=_push_command)


def _export_command(args: argparse.Namespace) -> int:
    out = export_backbone(args.src, args.out)
    print(f"exported backbone to {out}")
    return 0


def _push_command(namespace: argparse.Namespace) -> int:
    args = arguments_from_namespace(PushArguments, namespace)
    try:
        url = push_to_hub(
            namespace.src, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, full_model=args.full_model, overwrite_readme=args.overwrite_readme,
        )
    except PushError as error:
        print(f"hf-ibproj push: error: {error}", file=sys.stderr)
        return 1
    print(f"pushed to {url}")
    return 0
