"""What a model reference is: the one resolver behind `hf-ibproj export`, `hf-ibproj evaluate` and finetune.py.

    source = resolve_source("runs/simclr")              # any of the references below
    source.backbone                                     # timm model, no classifier: images -> pooled features
    source.data_config(image_size=None)                 # timm data config: input_size, interpolation, crop_pct, ...

A reference is, in this order:
  1. an IBProjModel instance;
  2. a local folder (`local-dir:` prefix optional):
       a training run folder (RUN/model/ holds the final IBProjModel; the run's records come along),
       an IBProjModel folder (config.json with model_type "ibproj" + model.safetensors), including a training
       checkpoint RUN/checkpoints/step_N (its run's config and run_info come along, not the final evaluation),
       a timm folder (config.json with "architecture": an `hf-ibproj export`, `timm.models.save_for_hf` or a
       finetune.py output, whose classifier is dropped);
  3. `hf-hub:owner/name`, a Hub id whose config.json decides between IBProjModel and timm;
  4. a timm architecture name with pretrained weights (`resnet18.a1_in1k`);
  5. `owner/name`: a Hub id as in 3.
The preprocessing is the backbone's own (timm's pretrained_cfg, or the IBProjConfig it was trained with) and
`data_config` resolves it against the model the way timm's own scripts do (timm.data.resolve_input_data_config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors import safe_open
from timm.data import resolve_input_data_config
from torch import nn
from transformers import AutoConfig, AutoModel

from .backbones import create_backbone
from .configuration_ibproj import IBProjConfig
from .modeling_ibproj import IBProjModel
from .checkpoints import MODEL_WEIGHTS, check_safetensors, is_checkpoint_dir, reading
from .runs import RunFolder
from .seeding import seeded

TIMM_WRAPPER_PREFIX = "timm_model."  # weight-name prefix of transformers' TimmWrapper models (finetune.py's output)


class SourceError(ValueError):
    """A model reference that does not resolve; the message names what was expected."""


@dataclass
class Source:
    """A resolved model reference: the backbone, its preprocessing and, for IBProj sources, the model + run records.

    `kind` is "model" (an IBProjModel instance or folder), "run", "checkpoint", "timm folder", "timm name" or
    "hub". `base_model` is the Hub id the weights came from (what a card of a model fine-tuned from them names as
    base_model); a local path never is one, so local folders carry only the base_model their own card records.
    """

    backbone: nn.Module
    pretrained_cfg: dict[str, Any]
    kind: str
    base_model: str | list[str] | None = None
    model: IBProjModel | None = None
    model_dir: Path | None = None
    run_dir: Path | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    run_info: dict[str, Any] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)

    @property
    def plot(self) -> Path | None:
        """The run's information-plane plot; a checkpoint's run plots steps after it, so it has none."""
        if self.run_dir is None or self.kind == "checkpoint":
            return None
        path = RunFolder(self.run_dir).plot_file
        return path if path.is_file() else None

    def data_config(self, image_size: int | None = None) -> dict[str, Any]:
        """timm data config (input_size (C, H, W), interpolation, crop_pct, crop_mode, mean, std) of the backbone.

        `image_size` overrides the input size as timm's `--img-size` does (crop_pct and the rest stay); a backbone
        with a fixed input size (e.g. a ViT's position embeddings) refuses another size.
        """
        args = {"img_size": image_size} if image_size is not None else None
        try:
            return resolve_input_data_config(self.backbone, args=args, pretrained_cfg=self.pretrained_cfg)
        except ValueError as error:
            raise SourceError(f"{error} Pass another --image-size, or none to use the backbone's own.") from None


def ibproj_data_config(config: IBProjConfig) -> dict[str, Any]:
    """The preprocessing an IBProjModel was trained with, as a timm data config (square input, no crop margin)."""
    channels = config.backbone_kwargs.get("in_chans", 3)
    return {
        "input_size": (channels, config.image_size, config.image_size),
        "interpolation": config.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": tuple(config.image_mean),
        "std": tuple(config.image_std),
    }


# --------------------------------------------------------------------------------------------- folders


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_ibproj_folder(folder: Path) -> bool:
    """A folder written by `IBProjModel.save_pretrained` (or a training checkpoint, which holds the same files)."""
    is_ibproj = _read_config(folder).get("model_type") == IBProjConfig.model_type
    return is_ibproj and (folder / "model.safetensors").is_file()


def is_exported_folder(folder: Path) -> bool:
    """A timm Hub folder (config.json with "architecture" + model.safetensors), e.g. written by `export_backbone`."""
    return "architecture" in _read_config(folder) and (folder / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- resolution


def resolve_source(reference: IBProjModel | str | Path, *, random_init: bool = False, seed: int = 0) -> Source:
    """Resolve `reference` (see the module docstring for the accepted forms and their order) to a `Source`.

    `random_init=True` builds the same architecture with fresh weights seeded by `seed` (the untrained floor of an
    evaluation; the caller's random state is left untouched); such a source has no model, records or base_model.
    Raises SourceError, naming what was expected, for anything that does not resolve.
    """
    if isinstance(reference, IBProjModel):
        return _ibproj_source(reference, "model", random_init, seed)
    name = str(reference).removeprefix("local-dir:")
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder_source(path, random_init, seed)
    if path.exists():
        raise SourceError(f"{name!r} is a file; pass the folder that holds config.json (or a training run folder).")
    if name.startswith("hf-hub:"):
        return _hub_source(name.removeprefix("hf-hub:"), random_init, seed)
    if timm.is_model(name):
        return _timm_name_source(name, random_init, seed)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _hub_source(name, random_init, seed)
    raise SourceError(
        f"{name!r} does not resolve: no such folder (a training run, an IBProjModel or checkpoint folder, a timm "
        "folder), not a timm architecture (timm.list_models()), and not a Hub id of the form owner/name."
    )


def load_source(reference: IBProjModel | str | Path) -> Source:
    """`resolve_source` restricted to IBProj sources (a model, run, checkpoint or Hub IBProjModel): what export needs."""
    source = resolve_source(reference)
    if source.model is None:
        raise SourceError(
            f"{str(reference)!r} is a {source.kind}, no IBProjModel: pass a training run folder, a folder written by "
            "IBProjModel.save_pretrained (config.json with model_type 'ibproj' + model.safetensors) or a checkpoint."
        )
    return source


def _folder_source(path: Path, random_init: bool, seed: int) -> Source:
    if is_ibproj_folder(path):
        if is_checkpoint_dir(path):
            source = _ibproj_source(path, "checkpoint", random_init, seed)
            return _with_run_records(source, path.parent.parent, final=False)
        return _ibproj_source(path, "model", random_init, seed)
    run = RunFolder(path)
    if is_ibproj_folder(run.model_dir):
        return _with_run_records(_ibproj_source(run.model_dir, "run", random_init, seed), path, final=True)
    config = _read_config(path)
    if "architecture" in config and (path / "model.safetensors").is_file():
        source = _timm_config_source(f"local-dir:{path}", str(path), path / "model.safetensors", random_init, seed)
        source.base_model = None if random_init else _card_base_model(path)
        return source
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None:
        raise SourceError(
            f"run folder {str(path)!r} has no final model ({run.model_dir}) yet: its training has not finished. Pass "
            f"a checkpoint ({checkpoint}) or finish the run with `train.py --output-dir {path} --resume`."
        )
    if config.get("model_type") == IBProjConfig.model_type or "architecture" in config:
        advice = "the checkpoint is damaged; pass another one" if is_checkpoint_dir(path) else "copy the weights too"
        raise SourceError(f"folder {str(path)!r} has a config.json but no model.safetensors ({path / MODEL_WEIGHTS} "
                          f"is missing); {advice}.")
    if config:
        raise SourceError(
            f"{path / 'config.json'} describes neither an IBProjModel (model_type 'ibproj') nor a timm model "
            "('architecture' key); pass a training run, an IBProjModel, a checkpoint or a timm folder."
        )
    raise SourceError(
        f"folder {str(path)!r} holds no model: no IBProjModel (config.json with model_type 'ibproj' + "
        f"model.safetensors), no training run ({RunFolder.MODEL}/), no timm folder (config.json with 'architecture')."
    )


def _hub_file(repo_id: str, filename: str) -> Path | None:
    try:
        return Path(hf_hub_download(repo_id, filename))
    except EntryNotFoundError:
        return None


def _hub_source(repo_id: str, random_init: bool, seed: int) -> Source:
    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except (OSError, ConnectionError, EntryNotFoundError, HFValidationError) as error:
        raise SourceError(
            f"{repo_id!r} is no local folder or timm architecture, and the Hub repository could not be fetched "
            f"({type(error).__name__}: {str(error).splitlines()[0]}). Check the path or id, the network or "
            "HF_ENDPOINT."
        ) from error
    if config.get("model_type") == IBProjConfig.model_type:
        source = _ibproj_source(repo_id, "hub", random_init, seed)
    elif "architecture" in config:
        source = _timm_config_source(f"hf-hub:{repo_id}", repo_id, _hub_file(repo_id, "model.safetensors"),
                                     random_init, seed)
        source.kind = "hub"
    else:
        raise SourceError(f"Hub repository {repo_id!r} holds neither an IBProjModel nor a timm model config.json.")
    source.base_model = None if random_init else repo_id
    return source


def _timm_name_source(name: str, random_init: bool, seed: int) -> Source:
    cfg = timm.models.get_pretrained_cfg(name)
    if not random_init and not (cfg and (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict)):
        raise SourceError(
            f"timm architecture {name!r} has no pretrained weights; pass a trained model (run folder, IBProjModel, "
            "checkpoint, timm folder or Hub id), or a tagged timm name such as 'resnet18.a1_in1k'."
        )
    backbone = _create_timm(name, random_init, seed)
    hub_id = cfg.hf_hub_id if cfg is not None and not random_init else None
    return Source(backbone, dict(backbone.pretrained_cfg), "timm name", base_model=hub_id or None)


# --------------------------------------------------------------------------------------------- builders


def _ibproj_source(weights: IBProjModel | Path | str, kind: str, random_init: bool, seed: int) -> Source:
    """An IBProj source from an instance, a local folder (Path) or a Hub id (str)."""
    if random_init:
        config = weights.config if isinstance(weights, IBProjModel) else IBProjConfig.from_pretrained(weights)
        with seeded(seed):
            backbone = create_backbone(config.backbone, **config.backbone_kwargs)
        return Source(backbone.eval(), ibproj_data_config(config), kind)
    if isinstance(weights, Path):
        check_safetensors(weights / MODEL_WEIGHTS)  # a damaged file is named, not a SafetensorError traceback
    model = weights if isinstance(weights, IBProjModel) else IBProjModel.from_pretrained(weights)
    model_dir = weights if isinstance(weights, Path) else None
    return Source(model.backbone, ibproj_data_config(model.config), kind, model=model.eval(), model_dir=model_dir)


def _timm_config_source(timm_name: str, where: str, weights: Path | None, random_init: bool, seed: int) -> Source:
    """A folder or Hub repo with a timm config.json; `weights` is its model.safetensors (None: not found)."""
    if weights is None or not _saved_by_transformers(weights):
        backbone = _create_timm(timm_name, random_init, seed)
        return Source(backbone, dict(backbone.pretrained_cfg), "timm folder")
    # Saved by transformers (TimmWrapper*.save_pretrained: finetune.py's output): its keys carry a "timm_model."
    # prefix timm does not load, and its preprocessing is in the config (transformers builds the timm model with
    # pretrained=False). AutoModel keeps the encoder and drops any classifier.
    config = AutoConfig.from_pretrained(where)
    with seeded(seed):
        wrapper = AutoModel.from_config(config) if random_init else AutoModel.from_pretrained(where)
    pretrained_cfg = getattr(config, "pretrained_cfg", None) or wrapper.timm_model.pretrained_cfg  # else the arch's
    return Source(wrapper.timm_model.eval(), dict(pretrained_cfg), "timm folder")


def _saved_by_transformers(weights: Path) -> bool:
    with reading(weights), safe_open(weights, framework="pt") as handle:
        return all(key.startswith(TIMM_WRAPPER_PREFIX) for key in handle.keys())  # noqa: SIM118 (no __iter__)


def _create_timm(name: str, random_init: bool, seed: int) -> nn.Module:
    try:
        with seeded(seed):
            return timm.create_model(name, pretrained=not random_init, num_classes=0).eval()
    except (OSError, ConnectionError, EntryNotFoundError) as error:
        raise SourceError(f"could not load the weights of {name!r}: {str(error).splitlines()[0]}") from error


def _with_run_records(source: Source, run_dir: Path, final: bool) -> Source:
    """Attach the run's configuration and run_info (and, for its final model, its final evaluation)."""
    if source.model is None:  # random init: nothing of the run describes fresh weights
        return source
    run = RunFolder(run_dir)
    source.run_dir = run.path
    source.train_config, source.run_info = run.read_config(), run.read_info()
    if final:
        source.final_eval = run.read_final_eval()
    return source


def _card_base_model(folder: Path) -> str | list[str] | None:
    readme = folder / "README.md"
    return ModelCard.load(readme).data.base_model if readme.is_file() else None
