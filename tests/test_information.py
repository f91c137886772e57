"""Matrix-based Renyi entropy / mutual information (docs/method.md section 2) against independent float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hf_ibproj.modeling_ibproj
from hf_ibproj import IBProjConfig, IBProjModel
from hf_ibproj.information import matrix_joint_entropy, matrix_mutual_information, matrix_renyi_entropy

ALPHAS = (0.5, 1.0, 2.0, 3.0)


# ---- independent reference (float64; explicit matrix powers / numpy eigendecomposition) ----
# A Gram matrix K = Phi Phi^T is handled through its feature matrix Phi: the non-zero eigenvalues of K are those
# of the smaller Phi^T Phi, so a rank-deficient K (n > d) has no eigenvalue rounding noise in the reference.

def ref_features(z: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; an all-zero row stays zero."""
    z = np.asarray(z, dtype=np.float64)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)


def ref_joint_features(phi1: np.ndarray, phi2: np.ndarray) -> np.ndarray:
    """Row-wise Kronecker product: its Gram matrix is the Hadamard product K1 o K2."""
    return np.einsum("ni,nj->nij", phi1, phi2).reshape(len(phi1), -1)


def ref_entropy(phi: np.ndarray, alpha: float) -> float:
    k = phi @ phi.T
    a = k / np.trace(k)
    if float(alpha).is_integer() and alpha >= 2:
        # tr(A^alpha) by explicit repeated products
        power_trace = torch.linalg.matrix_power(torch.from_numpy(a), int(alpha)).trace().item()
        return math.log(power_trace) / (1 - alpha)
    small = phi.T @ phi if phi.shape[1] < phi.shape[0] else k
    eigenvalues = np.clip(np.linalg.eigvalsh(small / np.trace(k)), 0, None)
    if alpha == 1:
        nonzero = eigenvalues[eigenvalues > 0]
        return float(-(nonzero * np.log(nonzero)).sum())
    return math.log((eigenvalues**alpha).sum()) / (1 - alpha)


def ref_mi(z1: np.ndarray, z2: np.ndarray, alpha: float) -> float:
    phi1, phi2 = ref_features(z1), ref_features(z2)
    return ref_entropy(phi1, alpha) + ref_entropy(phi2, alpha) - ref_entropy(ref_joint_features(phi1, phi2), alpha)


def _pair(n: int, d1: int, d2: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d1, generator=g, dtype=torch.float64)
    # z2 depends on z1 (as a projector output does) plus noise: MI well inside (0, H)
    z2 = torch.tanh(z1[:, : min(d1, d2)] @ torch.randn(min(d1, d2), d2, generator=g, dtype=torch.float64))
    return z1, z2 + 0.3 * torch.randn(n, d2, generator=g, dtype=torch.float64)


def _discrete(n: int, dim: int, num_states: int, seed: int) -> torch.Tensor:
    """Rows drawn from `num_states` orthonormal vectors, each row scaled by a random positive factor."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0][:num_states]
    states = torch.randint(num_states, (n,), generator=g)
    scales = torch.rand(n, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    return basis[states] * scales


# ---- agreement with the reference ----

@pytest.mark.parametrize("alpha", ALPHAS)
# full rank, rank-deficient (n > d), and odd / single-row batches
@pytest.mark.parametrize("n, d1, d2", [(12, 20, 16), (24, 5, 3), (13, 6, 4), (1, 3, 2)])
def test_estimators_match_float64_reference(alpha, n, d1, d2):
    z1, z2 = _pair(n, d1, d2, seed=n + d1)
    phi1, phi2 = ref_features(z1.numpy()), ref_features(z2.numpy())
    expected_h1 = ref_entropy(phi1, alpha)
    expected_joint = ref_entropy(ref_joint_features(phi1, phi2), alpha)
    expected_mi = ref_mi(z1.numpy(), z2.numpy(), alpha)
    # float64 inputs: float64 math
    assert matrix_renyi_entropy(z1, alpha).item() == pytest.approx(expected_h1, rel=1e-9, abs=1e-9)
    assert matrix_joint_entropy(z1, z2, alpha).item() == pytest.approx(expected_joint, rel=1e-9, abs=1e-9)
    assert matrix_mutual_information(z1, z2, alpha).item() == pytest.approx(expected_mi, rel=1e-9, abs=1e-9)
    # float32 inputs: float32 math, same values to float32 accuracy
    assert matrix_renyi_entropy(z1.float(), alpha).item() == pytest.approx(expected_h1, rel=1e-4, abs=1e-4)
    assert matrix_mutual_information(z1.float(), z2.float(), alpha).item() == pytest.approx(expected_mi, abs=2e-4)


def test_alpha_two_is_minus_log_frobenius_and_bounded_by_log_n():
    n = 16
    z = torch.randn(n, 8, dtype=torch.float64)
    phi = ref_features(z.numpy())
    a = phi @ phi.T / n
    assert matrix_renyi_entropy(z, 2).item() == pytest.approx(-math.log((a**2).sum()), rel=1e-12)
    assert matrix_renyi_entropy(z, 2).item() <= math.log(n)
    # the extremes: orthogonal rows reach log(n), identical rows (up to scale) give 0
    assert matrix_renyi_entropy(torch.eye(n) * torch.arange(1, n + 1)[:, None], 2).item() == pytest.approx(math.log(n))
    assert matrix_renyi_entropy(torch.ones(n, 4) * torch.arange(1, n + 1)[:, None], 2).item() == pytest.approx(0, abs=1e-6)


# ---- structural properties ----

@pytest.mark.parametrize("alpha", ALPHAS)
def test_symmetry_and_invariance_to_positive_row_scaling(alpha):
    z1, z2 = _pair(20, 12, 6, seed=7)
    mi = matrix_mutual_information(z1, z2, alpha)
    assert matrix_mutual_information(z2, z1, alpha).item() == pytest.approx(mi.item(), rel=1e-10, abs=1e-12)
    s1 = torch.rand(20, 1, dtype=torch.float64) * 100 + 1e-3
    s2 = torch.rand(20, 1, dtype=torch.float64) * 100 + 1e-3
    assert matrix_mutual_information(z1 * s1, z2 * s2, alpha).item() == pytest.approx(mi.item(), rel=1e-8, abs=1e-10)
    assert matrix_renyi_entropy(z1 * s1, alpha).item() == pytest.approx(
        matrix_renyi_entropy(z1, alpha).item(), rel=1e-8, abs=1e-10
    )


def test_alpha_two_in_float32_is_accurate_for_row_norms_from_1e_minus_5_to_1e8():
    # squaring raw entries (||z||^4, ||z1||^2 ||z2||^2) would overflow or underflow float32 at these scales,
    # and the result must not depend on them at all.
    z1, z2 = _pair(48, 20, 16, seed=3)
    g = torch.Generator().manual_seed(4)
    s1 = torch.logspace(-5, 8, 48, dtype=torch.float64)[torch.randperm(48, generator=g)][:, None]
    s2 = torch.logspace(-5, 8, 48, dtype=torch.float64)[torch.randperm(48, generator=g)][:, None]
    expected_mi = ref_mi(z1.numpy(), z2.numpy(), 2)
    assert matrix_mutual_information((z1 * s1).float(), (z2 * s2).float(), 2).item() == pytest.approx(expected_mi, abs=2e-4)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_self_information_equals_entropy_for_discrete_representations(alpha):
    # K is a 0/1 block matrix, so K o K = K and I(Z;Z) = H(Z) exactly, whatever the positive row scaling.
    z = _discrete(n=30, dim=8, num_states=4, seed=1)
    z_rescaled = z * (torch.rand(30, 1, dtype=torch.float64) + 0.5)
    h = matrix_renyi_entropy(z, alpha).item()
    assert h == pytest.approx(ref_entropy(ref_features(z.numpy()), alpha), rel=1e-8)
    assert h > 0.5  # a non-trivial entropy (4 states)
    assert matrix_mutual_information(z, z_rescaled, alpha).item() == pytest.approx(h, rel=1e-8, abs=1e-8)
    assert matrix_joint_entropy(z, z_rescaled, alpha).item() == pytest.approx(h, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("seed", range(3))
def test_information_inequalities_on_continuous_data(alpha, seed):
    z1, z2 = _pair(32, 16, 8, seed=seed)
    h1, h2 = matrix_renyi_entropy(z1, alpha).item(), matrix_renyi_entropy(z2, alpha).item()
    mi = matrix_mutual_information(z1, z2, alpha).item()
    tol = 1e-9
    assert -tol <= mi <= min(h1, h2) + tol
    assert matrix_joint_entropy(z1, z2, alpha).item() >= max(h1, h2) - tol
    # with the Hadamard joint, I(Z;Z) <= H(Z) for continuous Z, and strictly here (K o K != K)
    assert matrix_mutual_information(z1, z1, alpha).item() < h1


def test_invalid_alpha_and_mismatched_rows_raise():
    z = torch.randn(4, 3)
    for alpha in (0, -1.0):
        with pytest.raises(ValueError, match="alpha"):
            matrix_renyi_entropy(z, alpha)
        with pytest.raises(ValueError, match="alpha"):
            matrix_mutual_information(z, z, alpha)
    with pytest.raises(ValueError, match="rows"):
        matrix_mutual_information(z, torch.randn(5, 3))


# ---- degenerate inputs, mixed precision, gradients ----

@pytest.mark.parametrize("alpha", ALPHAS)
def test_zero_rows_give_finite_values_and_gradients(alpha):
    z1, z2 = _pair(10, 6, 4, seed=3)
    z1 = z1.float()
    z2 = z2.float()
    z1[[2, 7]] = 0
    z2[[0, 7]] = 0
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    mi = matrix_mutual_information(z1, z2, alpha)
    mi.backward()
    assert torch.isfinite(mi)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    # the zero rows simply drop out of the trace: the reference does the same
    assert mi.item() == pytest.approx(ref_mi(z1.detach().numpy(), z2.detach().numpy(), alpha), abs=2e-4)

    # a constant variable: every row zero -> H = 0 and I = 0, still finite gradients
    zero = torch.zeros(10, 6, requires_grad=True)
    other = torch.randn(10, 4, requires_grad=True)
    mi = matrix_mutual_information(zero, other, alpha)
    h = matrix_renyi_entropy(zero, alpha)
    (mi + h).backward()
    assert mi.item() == 0 and h.item() == 0
    assert torch.isfinite(zero.grad).all() and torch.isfinite(other.grad).all()



@pytest.mark.parametrize("alpha", ALPHAS)
def test_no_row_non_zero_in_both_inputs_shares_nothing(alpha):
    # rows 0-2 are zero in z1, rows 3-5 in z2: tr(K1 o K2) = 0, nothing is observed jointly. Every alpha gives 0
    # (H(A1) + H(A2) would break I <= min(H(A1), H(A2))), with finite gradients.
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(6, 4, generator=g)
    z2 = torch.randn(6, 3, generator=g)
    z1[:3] = 0
    z2[3:] = 0
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert matrix_renyi_entropy(z1, alpha).item() > 0.1 and matrix_renyi_entropy(z2, alpha).item() > 0.1
    mi = matrix_mutual_information(z1, z2, alpha)
    mi.backward()
    assert mi.item() == 0
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()

@pytest.mark.parametrize("alpha", ALPHAS)
def test_autocast_bfloat16_computes_in_float32(alpha):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(16, 12)
    projector = torch.nn.Linear(12, 8)
    x = torch.randn(24, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1 = encoder(x)
        z2 = projector(z1)
        assert z1.dtype == torch.bfloat16  # the inputs really are low precision
        mi = matrix_mutual_information(z1, z2, alpha)
        h = matrix_renyi_entropy(z1, alpha)
    assert mi.dtype == torch.float32 and h.dtype == torch.float32
    mi.backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())
    # close to the float32 value (inputs differ only by bf16 rounding)
    z1_fp32 = encoder(x)
    expected = matrix_mutual_information(z1_fp32, projector(z1_fp32), alpha).item()
    assert mi.item() == pytest.approx(expected, rel=0.05, abs=0.02)
    assert h.item() == pytest.approx(matrix_renyi_entropy(z1_fp32, alpha).item(), rel=0.02)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 1.0, 0.5])
def test_gradcheck_float64(alpha):
    # n <= d: full-rank Gram matrices with distinct eigenvalues, so the eigenvalue paths are differentiable
    g = torch.Generator().manual_seed(11)
    z1 = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    z2 = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: matrix_mutual_information(a, b, alpha), (z1, z2))
    assert torch.autograd.gradcheck(lambda a: matrix_renyi_entropy(a, alpha), (z1,))


# ---- the model computes the MI term only when it is used ----

def _tiny_model(**overrides) -> IBProjModel:
    cfg = IBProjConfig(
        backbone="resnet18_small",
        backbone_kwargs={"channels": (4, 8, 8, 8)},
        projector_hidden_dims=[16],
        projector_out_dim=8,
        **overrides,
    )
    return IBProjModel(cfg)


def test_mi_term_not_computed_when_weight_is_zero(monkeypatch):
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(1)
        raise AssertionError("matrix_mutual_information must not be called when mi_weight == 0")

    monkeypatch.setattr(hf_ibproj.modeling_ibproj, "matrix_mutual_information", forbidden)
    x = torch.randn(3, 2, 3, 8, 8)
    out = _tiny_model(mi_weight=0.0)(x)
    assert out.mi_loss is None and torch.isfinite(out.loss)
    assert torch.equal(out.loss, out.ssl_loss)
    # the patch is effective: with a positive weight the same function is reached
    with pytest.raises(AssertionError, match="must not be called"):
        _tiny_model(mi_weight=1e-4)(x)
    assert calls == [1]


def test_mi_term_added_with_its_weight():
    torch.manual_seed(0)
    model = _tiny_model(mi_weight=0.5)
    out = model(torch.randn(3, 2, 3, 8, 8))
    expected_mi = ref_mi(out.encoder_features.detach().numpy(), out.projections.detach().numpy(), 2.0)
    assert out.mi_loss.item() == pytest.approx(expected_mi, abs=1e-4)
    assert out.loss.item() == pytest.approx(out.ssl_loss.item() + 0.5 * expected_mi, abs=1e-4)


def test_all_zero_rows_pass_no_exploding_gradient():
    """An all-zero projection (an FSQ code of zeros) must not multiply its gradient by 1 / eps (F.normalize's 1e12)."""
    from hf_ibproj import nt_xent_loss

    torch.manual_seed(0)
    z1 = torch.randn(8, 5, requires_grad=True)
    z2 = torch.randn(8, 4)
    z2[2] = 0
    z2.requires_grad_(True)
    matrix_mutual_information(z1, z2).backward()
    assert torch.all(z2.grad[2] == 0)
    assert z2.grad.abs().max() < 100 and z1.grad.abs().max() < 100
    views = torch.randn(2, 6, 4)
    views[1, 3] = 0
    views.requires_grad_(True)
    nt_xent_loss(views).backward()
    assert torch.all(views.grad[1, 3] == 0) and views.grad.abs().max() < 100
