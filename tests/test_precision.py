"""The `auto` precision choice (bf16 only where the hardware computes it, fp16 on older GPUs) and a bf16 CPU run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from tiny import TINY_SETTINGS

from hf_ibproj import TrainConfig, pretrain
from hf_ibproj.precision import has_native_bf16, resolve_mixed_precision

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), "fp16"),  # V100: bf16 only emulated (torch.cuda.is_bf16_supported() still says True)
    ((7, 5), "fp16"),  # T4
    ((8, 0), "bf16"),  # A100
    ((9, 0), "bf16"),  # H100
])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert has_native_bf16(CUDA) == (expected == "bf16")
    assert resolve_mixed_precision("auto", CUDA) == expected
    for explicit in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(explicit, CUDA) == explicit


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_the_cpu_follows_its_bf16_units(monkeypatch, native):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    assert resolve_mixed_precision("auto", torch.device("cpu")) == ("bf16" if native else "no")


def test_a_cpu_run_in_bf16_trains_under_autocast_and_stores_float32(tiny_dataset, tmp_path, monkeypatch):
    conv_output_dtypes = set()
    conv2d = F.conv2d

    def recording_conv2d(input, weight, *args, **kwargs):
        output = conv2d(input, weight, *args, **kwargs)
        if torch.is_grad_enabled() and weight.requires_grad:  # the model's training steps (not kornia's blur)
            conv_output_dtypes.add(output.dtype)
        return output

    monkeypatch.setattr(torch.nn.modules.conv.F, "conv2d", recording_conv2d)
    config = TrainConfig.from_preset(dataset=str(tiny_dataset), epochs=1, tracker="none", export_backbone=False,
                                     output_dir=str(tmp_path / "run"), **{**TINY_SETTINGS, "mixed_precision": "bf16"})
    result = pretrain(config)
    assert conv_output_dtypes == {torch.bfloat16}
    weights = load_file(result.run_dir / "model" / "model.safetensors")
    floats = [t for t in weights.values() if t.is_floating_point()]
    assert len(floats) > len(weights) / 2 and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats)
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["mixed_precision"] == "bf16"
    assert 0 <= result.final_eval["linear_top1"] <= 100
