"""Matrix-based Renyi entropy and mutual information (docs/method.md section 2).

Written by hand: these estimators are the paper's own quantities, no maintained library provides them.
All math runs in float32 or better, whatever the autocast dtype. Values are in nats.
"""

from __future__ import annotations

import torch

_TINY = torch.finfo(torch.float32).tiny
_EPS = 1e-6  # rows of norm <= _EPS count as zero rows


def _float_at_least_32(z: torch.Tensor) -> torch.Tensor:
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def normalize_rows(z: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Rows scaled to unit L2 norm; rows with norm <= eps (e.g. an all-zero FSQ code) become 0 with ZERO gradient.

    F.normalize divides a zero row by its eps, so the gradient reaching that row is multiplied by 1 / eps
    (1e12): one all-zero quantized projection then blows the weights up in a single step.
    """
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    # per-row scale 1/norm, or 0 (the boolean mask is a constant: no gradient); the clamp keeps it finite
    return z * ((norm > eps) / norm.clamp_min(eps))  # one pass over z; the rest works on (n, 1) vectors


def _normalized_gram(z: torch.Tensor) -> torch.Tensor:
    """K = Zh Zh^T with Zh the row-normalized Z (step 1-2 of section 2), in float32 or better; a zero row stays 0."""
    zh = normalize_rows(_float_at_least_32(z.flatten(1)))
    return zh @ zh.T


def _entropy_of_gram(k: torch.Tensor, alpha: float) -> torch.Tensor:
    """H_alpha(A) for A = K / tr(K) (section 2, steps 2-3); 0 for a constant variable (every row zero)."""
    trace = k.diagonal().sum()
    if alpha == 2:
        # H_2(A) = -log ||A||_F^2 = log(tr(K)^2 / ||K||_F^2): no matrix power, no eigendecomposition, and
        # not even A = K / tr(K): one read of K (a dot product), no n x n temporary.
        entropy = torch.log(trace.square().clamp_min(_TINY) / _squared_frobenius(k).clamp_min(_TINY))
    else:
        a = k / trace.clamp_min(_TINY)
        eigenvalues = torch.linalg.eigvalsh(a)
        # A is PSD: eigenvalues below the rounding noise of eigvalsh (matrix_rank's tolerance) are zero. Counting
        # that noise as mass would bias alpha < 1 (l^alpha amplifies tiny l) whenever n > rank, e.g. n > d.
        tolerance = eigenvalues[-1].detach() * a.shape[0] * torch.finfo(a.dtype).eps
        positive = eigenvalues > tolerance
        safe = torch.where(positive, eigenvalues, torch.ones_like(eigenvalues))  # finite gradients at 0
        if alpha == 1:
            # von Neumann entropy -sum(l log l)
            entropy = -torch.where(positive, safe * torch.log(safe), 0).sum()
        else:
            power_sum = torch.where(positive, safe.pow(alpha), 0).sum()
            entropy = torch.log(power_sum.clamp_min(_TINY)) / (1 - alpha)
    return torch.where(trace > 0, entropy, 0)


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} is invalid; the matrix Renyi entropy needs alpha > 0 (paper: 2).")


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def matrix_renyi_entropy(z: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Matrix Renyi entropy H_alpha of a batch of rows `z` (n, d); at most log(n)."""
    _check_alpha(alpha)
    return _entropy_of_gram(_normalized_gram(z), alpha)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def matrix_joint_entropy(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Joint entropy H_alpha(A1, A2) through the Hadamard product of the two Gram matrices (section 2, step 4)."""
    _check_alpha(alpha)
    return _entropy_of_gram(_normalized_gram(z1) * _normalized_gram(z2), alpha)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def matrix_mutual_information(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """I_alpha(Z1;Z2) = H(A1) + H(A2) - H(A1, A2) (section 2, step 5); rows of z1 and z2 are paired."""
    _check_alpha(alpha)
    if z1.shape[0] != z2.shape[0]:
        raise ValueError(f"z1 and z2 must have the same number of rows, got {z1.shape[0]} and {z2.shape[0]}.")
    k1, k2 = _normalized_gram(z1), _normalized_gram(z2)
    joint = k1 * k2
    mutual_information = _entropy_of_gram(k1, alpha) + _entropy_of_gram(k2, alpha) - _entropy_of_gram(joint, alpha)
    # No row non-zero in both inputs (a constant variable, or zero rows at disjoint places): nothing is shared.
    # Then tr(K1 o K2) = 0 and H(A1, A2) is 0, so the sum above would be H(A1) + H(A2) > min(H(A1), H(A2)).
    return torch.where(joint.diagonal().sum() > 0, mutual_information, 0)


def _squared_frobenius(k: torch.Tensor) -> torch.Tensor:
    flat = k.flatten()
    return torch.dot(flat, flat)
