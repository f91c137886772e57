"""hf_ibproj.train_config: the model settings, the flags, the shared checks, the Python API and --help."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import torch
import yaml

from hf_ibproj.arguments import ArgumentParser
from hf_ibproj.configuration_ibproj import IBProjConfig
from hf_ibproj.precision import has_native_bf16
from hf_ibproj.resources import CONFIG_DIR
from hf_ibproj.runs import RunFolder
from hf_ibproj.train_config import (
    DEFAULT_PRESET,
    MODEL_FIELDS,
    RESUMABLE_FIELDS,
    ModelSettings,
    TrainConfig,
    build_arg_parser,
    explicit_flags,
    parse_train_config,
    read_preset,
)

PRESET = yaml.safe_load(DEFAULT_PRESET.read_text())  # the default preset, read here independently
CIFAR10_SIMCLR = CONFIG_DIR / "cifar10_simclr.yaml"  # sets no projector_batch_norm and epochs: 200
# The IBProjConfig fields a run sets; the pretraining loop fills in the others.
EXPECTED_MODEL_FIELDS = {
    "backbone", "backbone_kwargs", "objective", "num_views", "projector_hidden_dims", "projector_out_dim",
    "projector_batch_norm", "mi_weight", "mi_alpha", "quantize_levels", "sparse_latent_dim", "sparse_topk",
    "nt_xent_tau", "barlow_lambda", "barlow_scale", "image_size",
}
FILLED_BY_THE_LOOP = {"gather_distributed", "image_mean", "image_std", "interpolation"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _words(text: str) -> str:
    """`text` without whitespace: --help wraps lines, also after a hyphen."""
    return "".join(text.split())


# 1. The model settings are written out, with IBProjConfig's defaults and types.

def test_model_settings_are_ibprojconfigs_settings_with_its_defaults_and_types():
    own = inspect.get_annotations(IBProjConfig, eval_str=True)  # IBProjConfig's own fields
    assert set(MODEL_FIELDS) == EXPECTED_MODEL_FIELDS == set(own) - FILLED_BY_THE_LOOP
    ours = typing.get_type_hints(ModelSettings)
    for field in dataclasses.fields(ModelSettings):
        assert field.default == getattr(IBProjConfig, field.name), field.name
        theirs = own[field.name]
        if any(typing.get_origin(t) in (list, dict) for t in typing.get_args(theirs)):  # also YAML text
            assert set(typing.get_args(ours[field.name])) == set(typing.get_args(theirs)) | {str}, field.name
        else:
            assert ours[field.name] == theirs, field.name
        assert isinstance(field.metadata.get("help"), str) and field.metadata["help"].strip(), field.name
    assert [f.name for f in dataclasses.fields(TrainConfig)][:len(MODEL_FIELDS)] == list(MODEL_FIELDS)


def test_every_model_flag_has_its_fields_help():
    text = _words(build_arg_parser().format_help())
    for field in dataclasses.fields(ModelSettings):
        assert _words(field.metadata["help"]) in text, field.name


def test_model_config_builds_the_same_ibprojconfig():
    assert TrainConfig().model_config().to_dict() == IBProjConfig(backbone_kwargs={"in_chans": 3}).to_dict()
    config = TrainConfig.from_preset(objective="barlow_twins", mi_weight=1e-3, quantize_levels=3,
                                     projector_hidden_dims=[64], projector_out_dim=32, image_size=20)
    expected = IBProjConfig(
        backbone="resnet18_small", backbone_kwargs={"in_chans": 1, "channels": [16, 32, 64, 128]},
        objective="barlow_twins", num_views=2, projector_hidden_dims=[64], projector_out_dim=32,
        projector_batch_norm=True, mi_weight=1e-3, mi_alpha=2.0, quantize_levels=3, sparse_latent_dim=0,
        sparse_topk=None, nt_xent_tau=0.2, barlow_lambda=0.0051, barlow_scale=0.1, image_size=20,
    )
    assert config.model_config().to_dict() == expected.to_dict()


# 2. One --flag / --no-flag mechanism, and the flags given found by parsing.

@dataclasses.dataclass
class _Booleans:
    off: bool = dataclasses.field(default=False, metadata={"help": "defaults to False"})
    on: bool = dataclasses.field(default=True, metadata={"help": "defaults to True"})
    maybe: bool | None = dataclasses.field(default=None, metadata={"help": "None: decided later"})
    two_words: bool = dataclasses.field(default=False, metadata={"help": "an underscore in the name"})


@dataclasses.dataclass
class _Required:
    repo_id: str = dataclasses.field(metadata={"help": "no default"})
    share: float = dataclasses.field(default=0.1, metadata={"help": "about 10% of it"})


def test_every_boolean_is_flag_and_no_flag():
    parser = ArgumentParser(_Booleans)
    assert vars(parser.parse_args([])) == {"off": False, "on": True, "maybe": None, "two_words": False}
    assert vars(parser.parse_args(["--off", "--no-on", "--maybe", "--two-words"])) == {
        "off": True, "on": False, "maybe": True, "two_words": True}
    assert vars(parser.parse_args(["--no-off", "--on", "--no-maybe", "--no-two-words"])) == {
        "off": False, "on": True, "maybe": False, "two_words": False}
    assert parser.parse_args(["--maybe", "false"]).maybe is False
    assert parser.parse_args(["--two_words"]).two_words is True  # the underscore spelling is still accepted
    assert parser.parse_args(["--no_on"]).on is False
    text = parser.format_help()
    for flag in ("--off", "--no-off", "--on", "--no-on", "--maybe", "--no-maybe", "--two-words", "--no-two-words"):
        assert flag in text
    assert "_" not in "".join(word for word in text.split() if word.startswith("--"))


def test_suppressed_defaults_give_only_the_flags_given():
    parser = ArgumentParser(_Booleans, argument_default=argparse.SUPPRESS)
    assert vars(parser.parse_args([])) == {}
    assert vars(parser.parse_args(["--no-on", "--maybe", "true"])) == {"on": False, "maybe": True}


def test_required_flags_and_percent_in_help():
    parser = ArgumentParser(_Required)
    assert parser.parse_args(["--repo_id", "me/x"]).repo_id == "me/x"
    with pytest.raises(SystemExit):
        parser.parse_args([])
    text = _words(parser.format_help())
    assert _words("about 10% of it (default: 0.1)") in text and "--repo-id" in text and "--repo_id" not in text
    assert "default:None" not in text and "SUPPRESS" not in text


def test_train_flags_for_booleans():
    assert parse_train_config(["--no-projector-batch-norm"])[0].projector_batch_norm is False  # preset: true
    assert parse_train_config(["--projector-batch-norm", "no"])[0].projector_batch_norm is False
    assert parse_train_config(["--config", str(CIFAR10_SIMCLR)])[0].projector_batch_norm is None
    assert parse_train_config(["--config", str(CIFAR10_SIMCLR), "--projector-batch-norm"])[0].projector_batch_norm
    config = parse_train_config(["--no-final-eval", "--hub-private", "--streaming", "--no-channels-last"])[0]
    assert (config.final_eval, config.hub_private, config.streaming, config.channels_last) == (False, True, True, False)
    config = parse_train_config(["--no-hub-private", "--no-streaming", "--final-eval"])[0]
    assert (config.final_eval, config.hub_private, config.streaming) == (True, False, False)


def test_explicit_flags_are_the_ones_given_whatever_their_spelling_or_value():
    assert explicit_flags([]) == set()
    argv = ["--lr", "0.4", "--no-final-eval", "--epochs=3", "--mi_weight", "0.1", "--config", "elsewhere.yaml",
            "--resume", "--projector-batch-norm", "--backbone-kwargs", "{}"]
    assert explicit_flags(argv) == {"lr", "final_eval", "epochs", "mi_weight", "config", "resume",
                                    "projector_batch_norm", "backbone_kwargs"}


def test_a_length_flag_replaces_the_presets_length():
    assert PRESET["time_budget"] == 10
    config = parse_train_config(["--epochs", "3"])[0]
    assert (config.epochs, config.time_budget, config.length) == (3, None, ("epochs", 3))
    config = parse_train_config(["--time-budget", "10"])[0]  # the preset's own value, still given
    assert config.length == ("time_budget", 10)
    assert parse_train_config(["--lr", "0.3"])[0].length == ("time_budget", 10)


# 3. The shared checks: repo id, resume refusal, mixed precision, the run folder.

def test_push_to_hub_must_be_a_repo_id():
    assert TrainConfig(push_to_hub="me/model").push_to_hub == "me/model"
    for bad in ("model", "me/model/extra", "me/bad name"):
        with pytest.raises(ValueError, match="--push-to-hub"):
            TrainConfig(push_to_hub=bad)
    with pytest.raises(ValueError, match="--push-to-hub"):
        parse_train_config(["--push-to-hub", "no-slash"])


def test_resolve_mixed_precision():
    cpu = torch.device("cpu")
    for choice in ("no", "bf16", "fp16"):
        assert TrainConfig(mixed_precision=choice).resolve_mixed_precision(cpu) == choice
    assert TrainConfig().resolve_mixed_precision(cpu) == ("bf16" if has_native_bf16(cpu) else "no")
    assert TrainConfig(mixed_precision=False).mixed_precision == "no"  # YAML's reading of a bare `no`
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")


@pytest.fixture
def stored_run(tmp_path) -> tuple[Path, dict]:
    """A run folder whose stored configuration is not the preset's (as the pretraining loop writes it)."""
    run = tmp_path / "run"
    run.mkdir()
    values = dict(TrainConfig().to_dict(), **PRESET)  # every setting: a stored run lacks none
    values.update(epochs=2, time_budget=None, lr=0.5, projector_hidden_dims=[32], objective="simclr",
                  output_dir=str(tmp_path / "where-it-ran"))
    (run / "config.yaml").write_text(yaml.safe_dump({**values, "global_batch_size": 64, "scaled_lr": 0.125}))
    return run, values


def test_resume_refuses_what_would_change_the_run(stored_run):
    run, stored = stored_run
    assert RESUMABLE_FIELDS == ("output_dir", "tracker", "num_workers", "log_every", "keep_checkpoints",
                                "push_to_hub", "hub_strategy", "hub_private", "ddp_timeout")
    with pytest.raises(ValueError, match=r"--lr \(0\.5 -> 0\.4\) would change it.*Flags allowed on resume: "
                                         r"--output-dir, --tracker"):
        TrainConfig.from_run(run, lr=0.4)
    for argv, named in ((["--objective", "barlow_twins"], "--objective"), (["--epochs", "5"], "--epochs"),
                        (["--crop-min-scale", "0.5"], "--crop-min-scale"), (["--dataset", "x"], "--dataset"),
                        (["--projector-hidden-dims", "[64]"], "--projector-hidden-dims")):
        with pytest.raises(ValueError, match=f"{named} .*would change"):
            parse_train_config(["--output-dir", str(run), "--resume", *argv])
    with pytest.raises(ValueError, match="drop --config"):
        parse_train_config(["--output-dir", str(run), "--resume", "--config", str(CIFAR10_SIMCLR)])
    with pytest.raises(ValueError, match="--resume needs --output-dir"):
        parse_train_config(["--resume"])


def test_resume_without_a_stored_config_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist.*--output-dir"):
        parse_train_config(["--output-dir", str(tmp_path / "new"), "--resume"])
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist"):
        TrainConfig.from_run(tmp_path)
    RunFolder(tmp_path).write_config({**TrainConfig().to_dict(), "lr": 0.2})  # written by the run folder
    assert TrainConfig.from_run(tmp_path).lr == 0.2
    RunFolder(tmp_path).write_config({"lr": 0.2})  # the other settings missing: refused, never defaulted
    with pytest.raises(ValueError, match="config.yaml lacks the setting"):
        TrainConfig.from_run(tmp_path)


# 4. The Python API: from_preset and from_run, the command line built on them.

def test_from_preset_is_the_preset():
    config = TrainConfig.from_preset()
    for name, value in PRESET.items():
        assert getattr(config, name) == value, name
    defaults = TrainConfig()
    for name in ("seed", "max_steps", "epochs", "output_dir", "final_eval", "push_to_hub", "crop_min_scale"):
        assert getattr(config, name) == getattr(defaults, name), name
    assert TrainConfig.from_preset(CIFAR10_SIMCLR).dataset == "uoft-cs/cifar10"
    assert parse_train_config([])[0] == config


def test_from_preset_overrides_as_the_command_line_does():
    config = TrainConfig.from_preset(epochs=3, projector_hidden_dims=[32], lr=0.1, eval_split=None)
    assert (config.epochs, config.time_budget, config.projector_hidden_dims, config.lr) == (3, None, [32], 0.1)
    assert config.eval_split is None
    argv = ["--epochs", "3", "--projector-hidden-dims", "[32]", "--lr", "0.1", "--eval-split", "none"]
    assert parse_train_config(argv)[0] == config
    assert TrainConfig.from_preset(max_steps=7).length == ("max_steps", 7)
    assert TrainConfig.from_preset(CIFAR10_SIMCLR, time_budget=5).length == ("time_budget", 5)
    assert TrainConfig.from_preset(CIFAR10_SIMCLR, max_steps=None).length == ("epochs", 200)  # what --help says
    assert TrainConfig.from_preset(lr=0.1).length == ("time_budget", 10)
    assert TrainConfig.from_preset(projector_hidden_dims="[16, 8]").projector_hidden_dims == [16, 8]  # YAML text


def test_from_preset_names_unknown_settings():
    with pytest.raises(ValueError, match="unknown setting.*foo, learning_rate"):
        TrainConfig.from_preset(learning_rate=0.1, foo=1)


def test_preset_numbers_written_as_yaml_text_are_numbers(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("mi_weight: 1e-4\nlr: '0.3'\nepochs: 4\n")  # YAML reads 1e-4 (no dot) as a string
    for config in (TrainConfig.from_preset(preset), parse_train_config(["--config", str(preset)])[0]):
        assert config.mi_weight == pytest.approx(1e-4) and isinstance(config.mi_weight, float)
        assert config.lr == 0.3 and config.epochs == 4
    with pytest.raises(ValueError, match="epochs='two' is invalid; it must be an integer"):
        TrainConfig(epochs="two")


def test_from_run_is_the_stored_run_in_the_given_folder(stored_run):
    run, stored = stored_run
    config = TrainConfig.from_run(run)
    assert config.output_dir == str(run)  # the folder it is resumed in, not where it ran
    for name, value in stored.items():
        if name != "output_dir":
            assert getattr(config, name) == value, name
    assert config.length == ("epochs", 2)
    changed = TrainConfig.from_run(run, tracker="none", log_every=5, keep_checkpoints=4, hub_private=True)
    assert (changed.tracker, changed.log_every, changed.keep_checkpoints, changed.hub_private) == ("none", 5, 4, True)
    assert TrainConfig.from_run(run, lr=0.5, projector_hidden_dims="[32]").lr == 0.5  # the stored values
    with pytest.raises(ValueError, match="unknown setting.*bogus"):
        TrainConfig.from_run(run, bogus=1)
    args = ["--output-dir", str(run), "--resume", "--tracker", "none", "--log-every", "5", "--lr", "0.5"]
    config, namespace = parse_train_config(args)
    assert config == TrainConfig.from_run(run, tracker="none", log_every=5)
    assert namespace.resume is True and namespace.config == str(DEFAULT_PRESET)


# 5. --help, and the parser's own errors.

def test_help_lists_every_flag_and_formats():
    for parser in (build_arg_parser(), build_arg_parser(read_preset(DEFAULT_PRESET))):
        text = parser.format_help()
        for field in dataclasses.fields(TrainConfig):
            assert _flag(field.name) in text, field.name
        for flag in ("--config", "--resume", "--no-projector-batch-norm", "--no-final-eval", "--no-streaming"):
            assert flag in text
        assert _words("~10% of the image side") in _words(text)


def test_help_of_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_train_config(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--blur-kernel-size" in text and "(default: 64)" in text  # the preset's batch size


@pytest.mark.parametrize("argv, message", [
    (["--hub-strategy", "sometimes"], "hub_strategy"),
    (["--optimizer", "rmsprop"], "optimizer"),
    (["--quantize-levels", "1"], "quantize_levels"),
    (["--projector-hidden-dims", "{a: 1}"], "--projector-hidden-dims"),
    (["--backbone-kwargs", "[1, 2]"], "--backbone-kwargs"),
    (["--blur-kernel-size", "4"], "blur"),
])
def test_bad_values_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_train_config(argv)


def test_bad_presets_and_flags_are_named(tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_text("dataset: fashion_mnist\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate.*valid keys"):
        parse_train_config(["--config", str(preset)])
    with pytest.raises(FileNotFoundError, match="fashion_mnist_cpu"):
        parse_train_config(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        parse_train_config(["--epochs", "two"])
    assert "--epochs" in capsys.readouterr().err
