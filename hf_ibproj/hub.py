"""Backbone export as a timm Hub folder, its model card, and publishing to the Hub (DESIGN.md, Contracts).

The ladder, in the spirit of timm's `models/_hub.py`:
    load_source      (hf_ibproj.sources) an IBProjModel, its folder, a run folder or a checkpoint -> `Source`
    export_backbone  Source -> timm Hub folder (config.json, model.safetensors, README.md, plot)
    push_to_hub      an exported folder (or the full IBProjModel) -> a Hub repo, through huggingface_hub
    register_cli     `hf-ibproj export SRC OUT` and `hf-ibproj push SRC --repo-id ID`
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.models import save_for_hf

from .backbones import SMALL_RESNETS, create_backbone
from .configuration_ibproj import IBProjConfig
from .modeling_ibproj import IBProjModel
from .sources import PLOT_NAME, Source, is_exported_folder, is_ibproj_folder, load_source

# The design card fixes a top-level model_cards/ directory; the package loads its templates from there.
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_cards"
BACKBONE_TEMPLATE = "backbone.md"
FULL_MODEL_TEMPLATE = "full_model.md"
# Rendered into cards written before the repo id is known; `push_to_hub` fills it in.
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

# pretrained_cfg keys that describe the exported weights themselves. Everything else timm copies from the base
# architecture's default cfg (url, hf_hub_id, tag, license, paper ids, test sizes, ...) describes an ImageNet
# checkpoint that these weights are not.
_OWN_PRETRAINED_CFG_KEYS = (
    "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
    "num_classes", "pool_size", "first_conv", "classifier", "custom_load",
)
_OBJECTIVE_NAMES = {"simclr": "SimCLR (NT-Xent)", "barlow_twins": "Barlow Twins"}


class PushError(RuntimeError):
    """The Hub refused or failed an upload; nothing local was changed."""


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------
def export_backbone(model_or_dir: IBProjModel | str | Path, out_dir: str | Path) -> Path:
    """Write the encoder as a timm Hub folder that timm and transformers load without hf_ibproj (DESIGN.md).

    `out_dir` gets config.json (architecture, num_features, model_args, pretrained_cfg describing this model),
    model.safetensors (bare timm keys), README.md (the model card) and, from a run folder, the information-plane plot.
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
    channels = config.backbone_kwargs.get("in_chans", 3)
    data_config = {
        "input_size": (channels, config.image_size, config.image_size),
        "mean": tuple(config.image_mean),
        "std": tuple(config.image_std),
        "interpolation": config.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    save_for_hf(backbone.eval(), directory, safe_serialization=True, data_config=data_config)
    config_file = Path(directory) / "config.json"
    hf_config = json.loads(config_file.read_text())
    # timm records num_classes in model_args; TimmWrapper passes its own num_classes and would get it twice.
    hf_config.get("model_args", {}).pop("num_classes", None)
    pretrained_cfg = hf_config["pretrained_cfg"]
    own_cfg = {key: pretrained_cfg[key] for key in _OWN_PRETRAINED_CFG_KEYS if key in pretrained_cfg}
    hf_config["pretrained_cfg"] = {**own_cfg, "num_classes": 0}
    config_file.write_text(json.dumps(hf_config, indent=2))


# --------------------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------------------
def _template(name: str) -> Path:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {str(path)!r} is missing; hf_ibproj reads its templates from the repository's "
            "model_cards/ folder, so install it from a source checkout (pip install -e .)."
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


def _format_accuracy(value: float) -> str:
    """final_eval.json holds accuracies in percent (hf_ibproj.evaluation's convention)."""
    return f"{value:.2f}%"


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
        ("Epochs", train.get("epochs")),
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


def _eval_results(source: Source) -> tuple[list[EvalResult], list[tuple[str, str, str]]]:
    """model-index entries and table rows for the linear probe and kNN accuracies in final_eval.json."""
    dataset = _dataset(source) or "unknown"
    split = source.final_eval.get("split") or source.train_config.get("eval_split")
    results, rows = [], []
    for key, protocol in (("linear_top1", "Linear probe"), ("knn_top1", "kNN")):
        value = source.final_eval.get(key)
        if value is None:
            continue
        results.append(EvalResult(
            task_type="image-classification", task_name=f"{protocol} on frozen features",
            dataset_type=dataset, dataset_name=dataset, dataset_split=split,
            metric_type="accuracy", metric_name=f"{protocol} top-1 accuracy", metric_value=value,
        ))
        rows.append((protocol, f"{dataset} ({split})" if split else dataset, _format_accuracy(value)))
    return results, rows


def _card(source: Source, template: str, library_name: str, repo_id: str, extra_tags: list[str]) -> ModelCard:
    config = source.model.config
    bottleneck, bottleneck_tags = _bottleneck(config)
    model_name = repo_id.split("/")[-1] if repo_id != REPO_ID_PLACEHOLDER else f"{config.backbone}-{config.objective}"
    eval_results, eval_rows = _eval_results(source)
    dataset = _dataset(source)
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
        needs_import=config.backbone in SMALL_RESNETS,
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
        plot=source.plot is not None,
        bibtex=PAPER_BIBTEX,
    )


def backbone_card(source: Source, repo_id: str = REPO_ID_PLACEHOLDER) -> ModelCard:
    """Card of the exported encoder: metadata, training summary, evaluation, plot, timm/transformers usage, BibTeX."""
    return _card(source, BACKBONE_TEMPLATE, "timm", repo_id, ["image-feature-extraction", "timm", "transformers"])


def full_model_card(source: Source, repo_id: str) -> ModelCard:
    """Card of the whole IBProjModel (encoder + projector), which loads only after `import hf_ibproj`."""
    return _card(source, FULL_MODEL_TEMPLATE, "transformers", repo_id, ["transformers", "ibproj"])


# --------------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------------
def push_to_hub(
    source: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    full_model: bool = False,
) -> str:
    """Create `repo_id` and upload the exported backbone (or, with `full_model`, the whole IBProjModel) to it.

    `source` is an exported folder, a saved IBProjModel folder or a run folder (its backbone/ is exported first
    when absent). The token comes from HF_TOKEN or the login cache and is only sent in the Authorization header.
    The upload is staged in a temporary copy, so local folders are never modified. Returns the commit URL.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid --repo-id {repo_id!r}: {error} Expected 'username/model-name'.") from None
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {str(source)!r} does not exist.")
    candidates = (source, source / "backbone", source / "model")
    if not any(is_exported_folder(folder) or is_ibproj_folder(folder) for folder in candidates):
        load_source(source)  # raises the clear "no IBProjModel" error before any request
    token = get_token()
    if token is None:
        raise ValueError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`.")

    with tempfile.TemporaryDirectory(prefix="hf-ibproj-push-") as staging:
        folder = _stage_upload(source, Path(staging) / "upload", repo_id, full_model)
        api = HfApi(token=token)
        message = commit_message or ("Upload IBProjModel" if full_model else "Upload backbone exported by hf_ibproj")
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_url.repo_id, folder_path=folder, revision=revision, commit_message=message
            )
        except HfHubHTTPError as error:
            raise PushError(
                f"push to {repo_id!r} on {api.endpoint} failed: {error}. Local folders are unchanged; retry the push."
            ) from None
    return commit.commit_url


def _stage_upload(source: Path, staging: Path, repo_id: str, full_model: bool) -> Path:
    """The folder to upload, in `staging`, with a card rendered for `repo_id`."""
    if full_model:
        loaded = load_source(source)
        shutil.copytree(loaded.model_dir, staging, ignore=shutil.ignore_patterns("README.md"))
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
# Command line
# --------------------------------------------------------------------------------------------------------------
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`hf-ibproj export SRC OUT` and `hf-ibproj push SRC --repo-id ID ...`."""
    export = subparsers.add_parser("export", help="export the encoder as a timm / transformers Hub folder")
    export.add_argument("src", help="training run folder or IBProjModel folder")
    export.add_argument("out", help="output folder (absent, empty, or a previous export)")
    export.set_defaults(func=_export_command)

    push = subparsers.add_parser("push", help="upload an exported backbone (or the full model) to the Hub")
    push.add_argument("src", help="exported backbone folder, training run folder or IBProjModel folder")
    push.add_argument("--repo-id", required=True, help="'username/model-name'")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--full-model", action="store_true",
                      help="push the whole IBProjModel (encoder + projector) to resume pretraining")
    push.set_defaults(func=_push_command)


def _export_command(args: argparse.Namespace) -> int:
    out = export_backbone(args.src, args.out)
    print(f"exported backbone to {out}")
    return 0


def _push_command(args: argparse.Namespace) -> int:
    try:
        url = push_to_hub(
            args.src, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, full_model=args.full_model,
        )
    except PushError as error:
        print(f"hf-ibproj push: error: {error}", file=sys.stderr)
        return 1
    print(f"pushed to {url}")
    return 0
