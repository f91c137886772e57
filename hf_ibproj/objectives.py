"""Self-supervised objectives (docs/method.md section 4), correct under torch.distributed.

Written by hand because the distributed gradients are the point: NT-Xent gathers negatives from every
process WITH gradient, Barlow Twins reduces its batch statistics and cross-correlation WITH gradient
(a plain all_reduce gets the gradient wrong by the world size, the bug lightly fixed). Every process
returns a loss whose gradients with respect to its embeddings, averaged by DDP, equal those of one process on the
global batch. The whole training step equals the single-process one only when the network's BatchNorm layers see
the global batch too: SyncBatchNorm (`--sync-batchnorm`, on by default for multi-GPU runs) or BatchNorm in eval
mode; with per-process BatchNorm in train mode each process normalizes with its own batch's statistics.
Inputs are views stacked as (views, batch, dim); the math runs in float32 under any autocast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .information import normalize_rows

_BATCH_NORM_EPS = 1e-5  # nn.BatchNorm1d's default, as in the paper's BatchNorm1d(affine=False)


def _distributed(enabled: bool) -> bool:
    return enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# Written by hand (an autograd.Function over the plain c10d calls) because no library collective carries the
# gradient on every supported torch (pyproject: torch>=2.9): torch.distributed._functional_collectives got a
# backward for all_reduce / all_gather_single only with pytorch PR #168140 (opened Nov 2025, after 2.9), and
# before that the cross-process gradient silently disappears; torch.distributed.nn.functional is deprecated
# in favour of those functional collectives (a FutureWarning on every call).


class _SumAcrossProcesses(torch.autograd.Function):
    """y = sum over processes of x; dL/dx = sum over processes of dL_p/dy (every process's loss uses y)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


class _GatherAcrossProcesses(torch.autograd.Function):
    """Concatenate x of every process along dim 0 (rank order); dL/dx = this rank's rows of the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)  # the list form: supported by every backend (gloo, nccl, ...)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)  # not reduce_scatter: not every backend has it (torch.distributed.nn avoids it too)
        start = dist.get_rank() * ctx.rows
        return total[start : start + ctx.rows]


def _sum_across_processes(x: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) whose backward all-reduces the gradient."""
    return _SumAcrossProcesses.apply(x)


def _check_views(views: torch.Tensor) -> None:
    if views.dim() != 3 or views.shape[0] < 2:
        raise ValueError(f"views must be shaped (views >= 2, batch, dim), got {tuple(views.shape)}.")


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def nt_xent_loss(views: torch.Tensor, tau: float = 0.2, gather_distributed: bool = True) -> torch.Tensor:
    """NT-Xent over V >= 2 views: every other view of the same image is a positive, every other row a negative.

    loss = mean over (anchor a, positive p) of -log( exp(s_ap / tau) / sum_{k != a} exp(s_ak / tau) ),
    s the cosine similarity; for V = 2 this is SimCLR's loss (paper tau = 0.2).
    """
    _check_views(views)
    z = normalize_rows(views.float())
    num_views, batch, dim = z.shape
    candidates, offset = z, 0
    if _distributed(gather_distributed):
        # gather along the batch: (world * batch, views, dim), rows of this process start at rank * batch
        gathered = _GatherAcrossProcesses.apply(z.transpose(0, 1))
        candidates, offset = gathered.transpose(0, 1), dist.get_rank() * batch
    total = candidates.shape[1]
    logits = z.reshape(-1, dim) @ candidates.reshape(-1, dim).T / tau  # (V * batch, V * total)
    view = torch.arange(num_views, device=z.device)
    image = torch.arange(batch, device=z.device) + offset
    column = (view[:, None] * total + image[None, :]).reshape(-1)  # each anchor's own column
    logits = logits.scatter(1, column[:, None], float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    other_views = torch.stack([torch.cat([view[:v], view[v + 1 :]]) for v in range(num_views)])  # (V, V-1)
    positive_columns = (other_views[:, None, :] * total + image[None, :, None]).reshape(-1, num_views - 1)
    return -log_prob.gather(1, positive_columns).mean()


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def barlow_twins_loss(
    views: torch.Tensor, lambda_offdiag: float = 0.0051, scale: float = 0.1, gather_distributed: bool = True
) -> torch.Tensor:
    """Barlow Twins, averaged over all pairs of views.

    Each view is batch-normalized (no affine, global batch statistics), C = z_a^T z_b / N and
    loss = scale * [sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2]; paper scale 0.1, lambda 0.0051.
    """
    _check_views(views)
    z = views.float()
    distributed = _distributed(gather_distributed)
    reduce = _sum_across_processes if distributed else (lambda x: x)
    count = z.shape[1] * (dist.get_world_size() if distributed else 1)
    mean = reduce(z.sum(dim=1, keepdim=True)) / count
    var = reduce((z - mean).pow(2).sum(dim=1, keepdim=True)) / count
    z = (z - mean) / torch.sqrt(var + _BATCH_NORM_EPS)
    pair_losses = []
    for a in range(z.shape[0]):
        for b in range(a + 1, z.shape[0]):
            c = reduce(z[a].T @ z[b]) / count
            diagonal = torch.diagonal(c)
            on_diagonal = (1 - diagonal).pow(2).sum()
            off_diagonal = c.pow(2).sum() - diagonal.pow(2).sum()
            pair_losses.append(scale * (on_diagonal + lambda_offdiag * off_diagonal))
    return torch.stack(pair_losses).mean()


# --------------------------------------------------------------------------------------------- loss modules


def _stack_views(z0: torch.Tensor, z1: torch.Tensor | None) -> torch.Tensor:
    """(z0, z1) of shape (batch, dim) each -> (2, batch, dim); z0 alone is already (views, batch, dim)."""
    if z1 is None:
        return z0
    if z0.shape != z1.shape or z0.dim() != 2:
        raise ValueError(f"z0 and z1 must both be (batch, dim); got {tuple(z0.shape)} and {tuple(z1.shape)}.")
    return torch.stack([z0, z1])


class NTXentLoss(torch.nn.Module):
    """NT-Xent (SimCLR) as a module, for training loops in the style of lightly: `loss = criterion(z0, z1)`.

    `nt_xent_loss` with its hyper-parameters fixed: temperature `tau` (paper 0.2) and, under torch.distributed,
    negatives gathered from every process with their gradient. forward(z0, z1) takes the projections of two views
    (batch, dim) each; forward(views) takes V >= 2 views stacked as (V, batch, dim).

    Examples:
        >>> import torch
        >>> from hf_ibproj.objectives import NTXentLoss
        >>> criterion = NTXentLoss(tau=0.2)
        >>> z0, z1 = torch.randn(8, 16), torch.randn(8, 16)   # projector outputs of two views of 8 images
        >>> loss = criterion(z0, z1)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, tau: float = 0.2, gather_distributed: bool = True) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}.")
        self.tau, self.gather_distributed = tau, gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        return nt_xent_loss(_stack_views(z0, z1), self.tau, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, gather_distributed={self.gather_distributed}"


class BarlowTwinsLoss(torch.nn.Module):
    """Barlow Twins as a module, for training loops in the style of lightly: `loss = criterion(z0, z1)`.

    `barlow_twins_loss` with its hyper-parameters fixed: off-diagonal weight `lambda_offdiag` (paper 0.0051),
    overall `scale` (paper 0.1) and, under torch.distributed, batch statistics and cross-correlation reduced over
    every process with their gradient. forward(z0, z1) takes the projections of two views (batch, dim) each;
    forward(views) takes V >= 2 views stacked as (V, batch, dim) (the loss averages all pairs).

    Examples:
        >>> import torch
        >>> from hf_ibproj.objectives import BarlowTwinsLoss
        >>> criterion = BarlowTwinsLoss(lambda_offdiag=0.0051, scale=0.1)
        >>> z0, z1 = torch.randn(8, 16), torch.randn(8, 16)   # projector outputs of two views of 8 images
        >>> loss = criterion(z0, z1)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, lambda_offdiag: float = 0.0051, scale: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        if lambda_offdiag < 0 or scale <= 0:
            raise ValueError(f"need lambda_offdiag >= 0 and scale > 0; got {lambda_offdiag} and {scale}.")
        self.lambda_offdiag, self.scale, self.gather_distributed = lambda_offdiag, scale, gather_distributed

    def forward(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        return barlow_twins_loss(_stack_views(z0, z1), self.lambda_offdiag, self.scale, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"lambda_offdiag={self.lambda_offdiag}, scale={self.scale}, gather_distributed={self.gather_distributed}"
