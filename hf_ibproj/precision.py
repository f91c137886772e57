"""The `auto` mixed-precision choice shared by pretraining, fine-tuning and evaluation."""

from __future__ import annotations

import torch

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")  # accelerate's names; "no" is float32


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: a CUDA GPU of compute capability 8.0+ (Ampere or later), or a CPU with
    AVX512-BF16 / AMX; elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":  # not torch.cuda.is_bf16_supported(): by default it also counts emulated bf16 (T4, V100)
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":  # torch exposes these CPU feature probes only as private helpers; absent means no
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """accelerate's `mixed_precision` for a `--mixed-precision` choice. `auto`: bf16 where it is native; fp16 (with
    accelerate's gradient scaler when training) on an older CUDA GPU; else no (float32)."""
    if choice not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision={choice!r} is invalid; allowed values: {', '.join(MIXED_PRECISIONS)}.")
    if choice == "auto":
        if has_native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "no"
    return choice


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # accelerate's name -> the autocast dtype
