"""Matrix-based Renyi entropy and mutual information (PAPER.md section 2).

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
    if alpha == 2:
        return _mutual_information_order_2(z1, z2)
    k1, k2 = _normalized_gram(z1), _normalized_gram(z2)
    mutual_information = _entropy_of_gram(k1, alpha) + _entropy_of_gram(k2, alpha) - _entropy_of_gram(k1 * k2, alpha)
    # A constant variable (every row zero) shares no information.
    return torch.where((k1.diagonal().sum() > 0) & (k2.diagonal().sum() > 0), mutual_information, 0)


def _gram_halves(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """G = Z Z^T as (C, D, h): C = Z A^T (every row against the first h rows A), D = B B^T (B the other rows).

    G = [[A A^T, A B^T], [B A^T, B B^T]] is symmetric: C holds the first block column, D the last diagonal block,
    and the missing A B^T is the transpose of C's lower part. That is 3/4 of the multiply-adds of Z @ Z^T, as
    BLAS syrk does (torch exposes no syrk).
    """
    half = z.shape[0] // 2
    rest = z[half:]
    return torch.mm(z, z[:half].T), torch.mm(rest, rest.T), half


def _column_normalized_gram_halves(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram blocks C, D of the RAW rows of `z` (see _gram_halves) with every column j divided by ||z_j||.

    Also returns s: s_i = 1 / ||z_i||, or 0 for a row of norm <= _EPS (as in normalize_rows). Row i of the
    normalized Gram K (section 2, steps 1-2) is s_i times row i of these blocks. The norms come free from the Gram
    diagonal: no normalized copy of Z is made, and every entry stays within ||z_i|| (no overflow).
    """
    c, d, half = _gram_halves(_float_at_least_32(z.flatten(1)))
    squared_norms = torch.cat([c[:half].diagonal(), d.diagonal()])
    # normalize_rows' rule on squared norms: the mask is a constant (a zero row gets zero gradient), the clamp
    # keeps 1 / ||z_i|| finite
    scale = (squared_norms > _EPS**2) * squared_norms.clamp_min(_EPS**2).rsqrt()
    return c * scale[:half], d * scale[half:], scale


def _block_row_norms(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.linalg.vector_norm(c, dim=1), torch.linalg.vector_norm(d, dim=1)])


def _mutual_information_order_2(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """I_2 = H_2(A1) + H_2(A2) - H_2(A1, A2), with H_2(A) = log(tr(K)^2 / ||K||_F^2) (no matrix power, no A = K/tr K).

    Folded into one sum of logs: I_2 = 2 log(t1 t2 / t12) + log(J / (F1 F2)), t the traces of K1, K2, K12 = K1 o K2
    (the numbers of non-zero rows, as K_ii is 1 or 0), F the squared Frobenius norms of K1, K2 and J that of K12.
    Each is a sum of squared row norms of the column-normalized Gram blocks, scaled by s_i^2; the rows of B A^T count
    twice for their mirror A B^T, which is never computed. Beyond the Gram products (3/4 of the two full ones, see
    _gram_halves) only a few passes over them remain: at n ~ 512 on a CPU every extra pass or op would show.
    """
    c1, d1, scale1 = _column_normalized_gram_halves(z1)
    c2, d2, scale2 = _column_normalized_gram_halves(z2)
    n, half = scale1.shape[0], c1.shape[1]
    scales = torch.stack([scale1, scale2, scale1 * scale2])  # K1, K2, K12
    row_norms = torch.stack([_block_row_norms(c1, d1), _block_row_norms(c2, d2), _block_row_norms(c1 * c2, d1 * d2)])
    squared_rows = (row_norms * torch.cat([scales, scales[:, half:]], dim=1)).square()  # the rows of C, then of D
    squared_norms = squared_rows.sum(1) + squared_rows[:, half:n].sum(1)
    traces = (scales > 0).sum(1, dtype=scales.dtype)
    t1, t2, t12, f1, f2, j = torch.cat([traces, squared_norms]).clamp_min(_TINY).log().unbind()
    mutual_information = 2 * (t1 + t2 - t12) + j - f1 - f2
    # A constant variable (every row zero) shares no information.
    return torch.where(traces[:2].all(), mutual_information, 0)


def _squared_frobenius(k: torch.Tensor) -> torch.Tensor:
    flat = k.flatten()
    return torch.dot(flat, flat)
