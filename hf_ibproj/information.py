"""Matrix-based Renyi entropy and mutual information (PAPER.md section 2).

Written by hand: these estimators are the paper's own quantities, no maintained library provides them.
All math runs in float32 or better, whatever the autocast dtype. Values are in nats.
"""

from __future__ import annotations

import torch

_TINY = torch.finfo(torch.float32).tiny


def _float_at_least_32(z: torch.Tensor) -> torch.Tensor:
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def normalize_rows(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rows scaled to unit L2 norm; rows with norm <= eps (e.g. an all-zero FSQ code) become 0 with ZERO gradient.

    F.normalize divides a zero row by its eps, so the gradient reaching that row is multiplied by 1 / eps
    (1e12): one all-zero quantized projection then blows the weights up in a single step.
    """
    norm = z.norm(dim=-1, keepdim=True)
    # per-row scale 1/norm, or 0; the clamp keeps the unselected branch finite so its zero gradient is not NaN
    scale = torch.where(norm > eps, norm.clamp_min(eps).reciprocal(), 0)
    return z * scale  # one pass over z; the rest works on (n, 1) vectors


def _normalized_gram(z: torch.Tensor) -> torch.Tensor:
    """K = Zh Zh^T with Zh the row-normalized Z (step 1-2 of section 2); an all-zero row stays zero."""
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
    k12 = k1 * k2
    if alpha == 2:
        # The three H_2 closed forms folded into one log: I = log(t1^2 t2^2 ||K12||^2 / (||K1||^2 ||K2||^2 t12^2)),
        # t the traces; a handful of ops beyond the two Gram products (per-op overhead dominates at n ~ 512).
        traces = torch.stack([k1.diagonal().sum(), k2.diagonal().sum(), k12.diagonal().sum()])
        norms = torch.stack([_squared_frobenius(k1), _squared_frobenius(k2), _squared_frobenius(k12)])
        numerator = traces[0] * traces[1] / traces[2].clamp_min(_TINY)
        ratio = numerator.square() * norms[2] / (norms[0] * norms[1]).clamp_min(_TINY)
        mutual_information = torch.log(ratio.clamp_min(_TINY))
        nonconstant = (traces[:2] > 0).all()
    else:
        mutual_information = _entropy_of_gram(k1, alpha) + _entropy_of_gram(k2, alpha) - _entropy_of_gram(k12, alpha)
        nonconstant = (k1.diagonal().sum() > 0) & (k2.diagonal().sum() > 0)
    # A constant variable (every row zero) shares no information.
    return torch.where(nonconstant, mutual_information, 0)


def _squared_frobenius(k: torch.Tensor) -> torch.Tensor:
    flat = k.flatten()
    return torch.dot(flat, flat)
