"""Projection heads and the two structural bottlenecks of docs/method.md section 3.

Composed in the paper's forward order: MLP -> top-k sparse block -> FSQ quantizer. The sparse block and
the quantizer are the paper's own constructions, so they are written here by hand.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn

from .configuration_ibproj import IBProjConfig


class MLPHead(nn.Sequential):
    """[Linear - (BatchNorm1d) - ReLU] per hidden width, then an optional plain Linear (docs/method.md section 4)."""

    def __init__(self, in_dim: int, hidden_dims: list[int], out_dim: int = 0, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers.append(nn.Linear(in_dim, width, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            in_dim = width
        if out_dim:
            layers.append(nn.Linear(in_dim, out_dim))
            in_dim = out_dim
        super().__init__(*layers)
        self.out_dim = in_dim


class TopKSparseBlock(nn.Module):
    """Top-k sparse autoencoder block without reconstruction loss (docs/method.md section 3c).

        u = ReLU(W_enc (h - b_pre) + b_enc);  s = top-k(u) per row;  z2 = W_dec s + b_dec + b_pre
    """

    def __init__(self, dim: int, latent_dim: int, k: int) -> None:
        super().__init__()
        if not 0 < k <= latent_dim:
            raise ValueError(f"k={k} is invalid for latent_dim={latent_dim}; allowed: 1 <= k <= latent_dim.")
        self.k = k
        self.pre_bias = nn.Parameter(torch.zeros(dim))
        self.encoder = nn.Linear(dim, latent_dim)
        self.decoder = nn.Linear(latent_dim, dim)
        self.out_dim = dim

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.pre_bias)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Sparse codes s with exactly k active (kept) latents per row."""
        u = torch.relu(self.encoder(h - self.pre_bias))
        values, indices = u.topk(self.k, dim=-1)
        return torch.zeros_like(u).scatter(-1, indices, values)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(h)) + self.pre_bias


class FSQuantizer(nn.Module):
    """Finite scalar quantization of every dimension to `levels` values with a straight-through estimator.

    docs/method.md section 3b; `atanh` for the even-L shift as the paper intends (the released code writes `tan`).
    Odd L gives {-1, ..., 0, ..., 1} in steps of 1/(L//2).
    """

    def __init__(self, levels: int) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels={levels} is invalid; allowed: an integer >= 2 (0 in the config turns it off).")
        self.levels = levels
        self.half = (levels - 1) * (1 - 1e-3) / 2
        self.offset = 0.5 if levels % 2 == 0 else 0.0
        # atanh puts level 0 at z = 0 (b(0) = 0); for L = 2 its argument exceeds 1 (undefined), so L = 2 uses
        # the released code's tan, which gives the same two levels {-1, 0}.
        ratio = self.offset / self.half
        self.shift = math.atanh(ratio) if ratio < 1 else math.tan(ratio)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """The smooth map b = tanh(z + shift) * half - offset whose rounding gives the levels."""
        return torch.tanh(z + self.shift) * self.half - self.offset

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b = self.bound(z)
        q = b + (torch.round(b) - b).detach()
        return q / (self.levels // 2)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class Projector(nn.Sequential):
    """The bottleneck projector g of the paper: MLP -> sparse block -> quantizer, each present when configured."""

    def __init__(self, config: IBProjConfig, in_dim: int) -> None:
        modules: dict[str, nn.Module] = {}  # Sequential keeps the names: mlp, sparse, quantizer
        mlp = MLPHead(in_dim, config.projector_hidden_dims, config.projector_out_dim, config.projector_batch_norm)
        out_dim = mlp.out_dim
        if len(mlp):
            modules["mlp"] = mlp
        if config.sparse_latent_dim:
            modules["sparse"] = TopKSparseBlock(out_dim, config.sparse_latent_dim, config.sparse_topk)
        if config.quantize_levels:
            modules["quantizer"] = FSQuantizer(config.quantize_levels)
        super().__init__(OrderedDict(modules))
        self.out_dim = out_dim
