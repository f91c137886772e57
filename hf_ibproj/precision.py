"""The `auto` mixed-precision choice shared by pretraining, fine-tuning and evaluation."""

from __future__ import annotations

import torch

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")  # accelerate's names; "no" is float32


def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: CUDA with bf16, or a CPU with AVX512-BF16 / AMX (else it is slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch exposes these CPU feature probes only as private helpers; absent means no
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """accelerate's `mixed_precision` for a `--mixed-precision` choice: `auto` is bf16 where it is native, else no."""
    if choice not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision={choice!r} is invalid; allowed values: {', '.join(MIXED_PRECISIONS)}.")
    if choice == "auto":
        return "bf16" if has_native_bf16(device) else "no"
    return choice
