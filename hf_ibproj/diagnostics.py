"""Label-free diagnostics of an IBProjModel on a fixed set of held-out images (no labels needed).

Which quantity, computed without labels, tells the better encoder? `label_free_diagnostics` returns:

- on the held-out images themselves (no augmentation; Z1 the encoder features, Z2 = g(Z1)):
    rankme      RankMe (Garrido et al. 2023, eq. 1): exp of the entropy of the singular values of Z1 (all N
                images) as a distribution, p_k = s_k / ||s||_1 + 1e-7 (their epsilon); higher = more dimensions used.
    uniformity  Wang & Isola 2020: log E_{i != j} exp(-2 ||x_i - x_j||^2) over all pairs of L2-normalized Z1
                rows, in [-8, 0]; lower = spread more evenly over the sphere.
    I(Z1;Z2), H(Z1), upper_bound = H(Z1) - I(Z1;Z2): docs/method.md section 5 (matrix Renyi order config.mi_alpha).
- with `augment` (the run's TwoViewAugmentation): positive pairs are two (or more) augmented views of each
  held-out image, drawn from a fixed seed, so every call and every run sees the same views (the global RNG
  state is saved and restored around them: a seeded training run is unaffected):
    alignment   Wang & Isola 2020: E ||x - x+||^2 over view pairs of L2-normalized Z1; lower = better aligned.
    I(Z1;R)     minus the run's SSL objective on the encoder features of the views (docs/method.md section 5).
    lower_bound I(Z1;R) - I(Z1;Z2).

The batch-level quantities (the matrix entropies and the objective) are computed on consecutive chunks of about
`batch_size` images, as the paper computes them on a training batch, and averaged over the chunks; their values
depend on that size (H_2 <= log n), so compare runs with the same images and batch size. The model runs in eval
mode (BatchNorm statistics are used, not updated) and in full precision even inside an autocast region, without
gathering across processes: call it from one process, with the unwrapped model.

Written by hand: these are a few lines of math each, and no library among the project's dependencies has them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .augmentation import to_model_input
from .information import matrix_mutual_information, matrix_renyi_entropy
from .modeling_ibproj import IBProjModel
from .seeding import seeded

RANKME_EPSILON = 1e-7  # Garrido et al. 2023
UNIFORMITY_T = 2.0  # Wang & Isola 2020, t = 2
ALIGNMENT_ALPHA = 2.0  # Wang & Isola 2020, alpha = 2


def rankme(features: torch.Tensor, epsilon: float = RANKME_EPSILON) -> float:
    """RankMe of a feature matrix (N, D): exp(-sum_k p_k log p_k), p_k = s_k / sum(s) + epsilon (float64)."""
    singular_values = torch.linalg.svdvals(features.double())
    p = singular_values / singular_values.sum() + epsilon
    return math.exp(-(p * p.log()).sum().item())


def uniformity(features: torch.Tensor, t: float = UNIFORMITY_T, chunk_size: int = 1024) -> float:
    """log E_{i != j} exp(-t ||x_i - x_j||^2) of the L2-normalized rows of `features` (N >= 2), in float64.

    All pairs, in row chunks so that memory stays at chunk_size x N; ||x - y||^2 = 2 - 2 x.y for unit rows.
    """
    x = F.normalize(features.double(), dim=1)
    n = len(x)
    log_sums = []
    for start in range(0, n, chunk_size):
        chunk = x[start : start + chunk_size]
        exponents = -t * (2 - 2 * chunk @ x.T).clamp_min(0)
        rows = torch.arange(len(chunk))
        exponents[rows, rows + start] = -math.inf  # i == j is not a pair
        log_sums.append(torch.logsumexp(exponents.flatten(), dim=0))
    return (torch.logsumexp(torch.stack(log_sums), dim=0) - math.log(n * (n - 1))).item()


def alignment(features_a: torch.Tensor, features_b: torch.Tensor, alpha: float = ALIGNMENT_ALPHA) -> float:
    """E ||x - y||^alpha over paired rows of the L2-normalized features (Wang & Isola 2020, alpha = 2)."""
    difference = F.normalize(features_a.double(), dim=1) - F.normalize(features_b.double(), dim=1)
    return difference.norm(dim=1).pow(alpha).mean().item()


def label_free_diagnostics(
    model: IBProjModel,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """The diagnostics of the module docstring for uint8 `images` (N >= 2, C, H, W), normalized with mean/std.

    `augment` maps a uint8 batch (B, C, H, W) to normalized views (B, V, C, S, S), e.g. the run's
    TwoViewAugmentation; without it, alignment, I(Z1;R) and lower_bound are not computed. `seed` fixes the views.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) < 2:
        raise ValueError(f"images must be a uint8 tensor (N >= 2, C, H, W); got {images.dtype} {tuple(images.shape)}.")
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size} is invalid; the batch-level quantities need at least 2 images.")
    device = next(model.parameters()).device
    alpha = model.config.mi_alpha
    chunks = images.tensor_split(math.ceil(len(images) / batch_size))  # near-equal sizes: comparable chunks
    with _diagnostic_mode(model), torch.inference_mode(), torch.autocast(device.type, enabled=False):
        z1 = [model.get_image_features(to_model_input(chunk.to(device), mean, std)) for chunk in chunks]
        z2 = [model.projector(z) for z in z1]
        i_z1_z2 = _mean(matrix_mutual_information(a, b, alpha) for a, b in zip(z1, z2))
        h_z1 = _mean(matrix_renyi_entropy(a, alpha) for a in z1)
        all_z1 = torch.cat(z1).float().cpu()
        results = {"rankme": rankme(all_z1), "uniformity": uniformity(all_z1), "I(Z1;Z2)": i_z1_z2, "H(Z1)": h_z1,
                   "upper_bound": h_z1 - i_z1_z2}
        if augment is not None:
            view_features, objectives = [], []
            with seeded(seed, device):
                for chunk in chunks:
                    views = augment(chunk.to(device)).transpose(0, 1)  # (V, B, C, S, S)
                    features = model.get_image_features(views.flatten(0, 1)).unflatten(0, views.shape[:2])
                    objectives.append(model.ssl_loss(features))
                    view_features.append(features.float().cpu())
            views_z1 = torch.cat(view_features, dim=1)  # (V, N, D)
            results["alignment"] = _mean(alignment(views_z1[a], views_z1[b]) for a in range(len(views_z1))
                                         for b in range(a + 1, len(views_z1)))
            results["I(Z1;R)"] = -_mean(objectives)
            results["lower_bound"] = results["I(Z1;R)"] - i_z1_z2
    return results


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


@contextlib.contextmanager
def _diagnostic_mode(model: IBProjModel) -> Iterator[None]:
    """eval() (BatchNorm statistics used, not updated) and the objective on this process alone; both restored."""
    was_training, gather = model.training, model.config.gather_distributed
    model.eval()
    model.config.gather_distributed = False
    try:
        yield
    finally:
        model.train(was_training)
        model.config.gather_distributed = gather
