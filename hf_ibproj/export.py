"""The encoder of an IBProjModel as a Hub folder that timm and transformers load without hf_ibproj.

    export_backbone          a model, run, IBProjModel or checkpoint folder -> config.json, model.safetensors,
                             README.md (the model card) and the run's plot, written as one complete folder
    write_backbone_files     config.json + model.safetensors alone (timm's save_for_hf, corrected)
    carry_small_resnet_code  the small-image ResNet's code + the config.json keys that make transformers run it
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from timm.models import save_for_hf

from . import modeling_small_resnet as small_resnet
from .backbones import SMALL_RESNETS, create_backbone
from .cards import backbone_card
from .modeling_ibproj import IBProjModel
from .runs import RunFolder, remove_abandoned_staging
from .sources import ibproj_data_config, is_exported_folder, load_source

# pretrained_cfg keys that describe the exported weights themselves. Everything else timm copies from the base
# architecture's default cfg (url, hf_hub_id, tag, license, paper ids, test sizes, ...) describes an ImageNet
# checkpoint that these weights are not.
_OWN_PRETRAINED_CFG_KEYS = (
    "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
    "num_classes", "pool_size", "first_conv", "classifier", "custom_load",
)
# The transformers Auto classes an exported small-image ResNet maps to the code it carries (config.json auto_map).
_SMALL_RESNET_AUTO_CLASSES = {
    "AutoConfig": small_resnet.SmallResNetConfig,
    "AutoModel": small_resnet.SmallResNetModel,
    "AutoModelForImageClassification": small_resnet.SmallResNetForImageClassification,
}


def export_backbone(model_or_dir: IBProjModel | str | Path, out_dir: str | Path) -> Path:
    """Write the encoder as a Hub folder that timm and transformers load without hf_ibproj.

    `out_dir` gets config.json (architecture, num_features, model_args, pretrained_cfg describing this model),
    model.safetensors (bare timm keys), README.md (the model card), from a run folder the information-plane plot,
    and for the small-image ResNets the code transformers runs with `trust_remote_code=True`.
    `out_dir` must be absent, empty or a previous export; it is replaced only once the new folder is complete.
    The folder is built in a hidden staging folder beside it; one left by an export that was killed is removed
    here. The export's folder and files get the permissions of the user's umask, as a plain mkdir / open would.
    """
    source = load_source(model_or_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (is_exported_folder(out_dir) or not any(out_dir.iterdir()))):
        raise ValueError(
            f"output folder {str(out_dir)!r} exists and is not an empty folder or a previous export; "
            "choose a new path so nothing of yours is overwritten."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # earlier exports into out_dir killed midway
    remove_abandoned_staging(out_dir.parent, re.compile(rf"\.{re.escape(out_dir.name)}\.staging-(\d+)-[a-z0-9_]+"))
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-{os.getpid()}-", dir=out_dir.parent))
    try:
        write_backbone_files(source.model, staging)
        if source.plot:
            shutil.copy2(source.plot, staging / RunFolder.PLOT)
        backbone_card(source).save(staging / "README.md")
        _apply_umask(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _apply_umask(folder: Path) -> None:
    """Give `folder` and all it holds the permissions of the user's umask (mkdtemp makes 0700, some writers 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_backbone_files(model: IBProjModel, directory: Path) -> None:
    """config.json + model.safetensors through timm's `save_for_hf`, then fix what it gets wrong for us."""
    config = model.config
    backbone = create_backbone(config.backbone, **config.backbone_kwargs)
    # A fresh timm model holds contiguous float32 CPU copies whatever the trained model's device, dtype or memory
    # format (safetensors refuses channels_last tensors).
    backbone.load_state_dict(model.backbone.state_dict())
    save_for_hf(backbone.eval(), directory, safe_serialization=True, data_config=ibproj_data_config(config))
    config_file = Path(directory) / "config.json"
    hf_config = json.loads(config_file.read_text())
    # timm records num_classes in model_args; TimmWrapper passes its own num_classes and would get it twice.
    hf_config.get("model_args", {}).pop("num_classes", None)
    pretrained_cfg = hf_config["pretrained_cfg"]
    own_cfg = {key: pretrained_cfg[key] for key in _OWN_PRETRAINED_CFG_KEYS if key in pretrained_cfg}
    hf_config["pretrained_cfg"] = {**own_cfg, "num_classes": 0}
    config_file.write_text(json.dumps(hf_config, indent=2))
    if config.backbone in SMALL_RESNETS:
        carry_small_resnet_code(Path(directory))


def carry_small_resnet_code(directory: Path) -> None:
    """Copy the small-image ResNet's code into a model folder and add the config.json keys that make transformers
    run it (an export, a fine-tuned classifier).

    Its own model type makes transformers ask for `trust_remote_code=True` instead of failing inside TimmWrapper;
    the image processor is transformers' own TimmWrapperImageProcessor (it reads pretrained_cfg), which needs no code.
    """
    code = Path(small_resnet.__file__)
    shutil.copy2(code, directory / code.name)
    config_file = directory / "config.json"
    config_file.write_text(json.dumps({
        **json.loads(config_file.read_text()),
        "model_type": small_resnet.SmallResNetConfig.model_type,
        "auto_map": {auto: f"{code.stem}.{cls.__name__}" for auto, cls in _SMALL_RESNET_AUTO_CLASSES.items()},
        "image_processor_type": "TimmWrapperImageProcessor",
    }, indent=2))
