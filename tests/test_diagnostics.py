"""Label-free diagnostics against independent references: numpy/scipy closed forms and naive loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

import hf_ibproj.objectives
from hf_ibproj import IBProjConfig, IBProjModel, barlow_twins_loss, nt_xent_loss
from hf_ibproj.augmentation import TwoViewAugmentation
from hf_ibproj.diagnostics import alignment, label_free_diagnostics, rankme, uniformity

MEAN, STD = [0.3], [0.2]
EPSILON = 1e-7  # RankMe's epsilon (Garrido et al. 2023)


# ---- independent references (float64 numpy) ----

def ref_rankme(z: np.ndarray) -> float:
    s = np.linalg.svd(np.asarray(z, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + EPSILON
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_unit(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def ref_uniformity(z: np.ndarray) -> float:
    return float(np.log(np.mean(np.exp(-2 * pdist(ref_unit(z)) ** 2))))


def ref_alignment(a: np.ndarray, b: np.ndarray) -> float:
    a, b = ref_unit(a), ref_unit(b)
    return sum(float(np.sum((a[i] - b[i]) ** 2)) for i in range(len(a))) / len(a)


def ref_h2(gram: np.ndarray) -> float:
    a = gram / np.trace(gram)
    return float(-np.log((a**2).sum()))


def ref_mi_h2(z1: np.ndarray, z2: np.ndarray) -> tuple[float, float]:
    """(I_2(Z1;Z2), H_2(Z1)) from the explicit Gram matrices of the row-normalized features."""
    k1, k2 = ref_unit(z1) @ ref_unit(z1).T, ref_unit(z2) @ ref_unit(z2).T
    return ref_h2(k1) + ref_h2(k2) - ref_h2(k1 * k2), ref_h2(k1)


# ---- the single quantities ----

def test_rankme_matches_numpy_and_its_closed_forms():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 6, generator=g) @ torch.diag(torch.tensor([5.0, 3, 1, 0.5, 0.1, 0.01]))
    assert rankme(z) == pytest.approx(ref_rankme(z.numpy()), rel=1e-9)
    # equal singular values: p_k = 1/D + eps, RankMe ~ D; one direction (rank 1): ~ 1
    d = 8
    q = torch.linalg.qr(torch.randn(50, d, generator=g, dtype=torch.float64))[0] * 3.0
    p = 1 / d + EPSILON
    assert rankme(q) == pytest.approx(math.exp(-d * p * math.log(p)), rel=1e-9)
    rank_one = torch.randn(50, 1, generator=g, dtype=torch.float64) @ torch.randn(1, d, generator=g, dtype=torch.float64)
    expected = math.exp(-((1 + EPSILON) * math.log(1 + EPSILON) + (d - 1) * EPSILON * math.log(EPSILON)))
    assert rankme(rank_one) == pytest.approx(expected, rel=1e-6)


def test_uniformity_matches_scipy_pdist_in_chunks_and_its_extremes():
    z = torch.randn(23, 5, generator=torch.Generator().manual_seed(1))
    expected = ref_uniformity(z.numpy())
    for chunk_size in (1, 4, 23, 1000):
        assert uniformity(z, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-9)
    # antipodal points: ||x - y||^2 = 4, log exp(-8) = -8; identical directions (any scale): 0
    assert uniformity(torch.tensor([[1.0, 0], [-2.0, 0]])) == pytest.approx(-8.0, abs=1e-9)
    assert uniformity(torch.tensor([[1.0, 1], [3.0, 3], [0.5, 0.5]])) == pytest.approx(0.0, abs=1e-9)


def test_alignment_matches_a_naive_loop():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(17, 4, generator=g), torch.randn(17, 4, generator=g)
    assert alignment(a, b) == pytest.approx(ref_alignment(a.numpy(), b.numpy()), rel=1e-9)
    assert alignment(a, 3 * a) == pytest.approx(0.0, abs=1e-12)  # same directions
    assert alignment(a, -a) == pytest.approx(4.0, rel=1e-12)  # opposite directions


# ---- label_free_diagnostics on a tiny model ----

def _model(objective: str) -> IBProjModel:
    torch.manual_seed(0)
    config = IBProjConfig(
        backbone="resnet18_small", backbone_kwargs={"channels": (4, 8, 8, 8), "in_chans": 1}, objective=objective,
        projector_hidden_dims=[16], projector_out_dim=8,
    )
    return IBProjModel(config)


def _images(n: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def _reference_features(model: IBProjModel, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Z1, Z2 one image at a time, normalized by hand in numpy, in eval mode."""
    model.eval()
    pixels = (images.numpy().astype(np.float64) / 255 - MEAN[0]) / STD[0]
    with torch.no_grad():
        z1 = [model.backbone(torch.from_numpy(x[None]).float()) for x in pixels]
        z2 = [model.projector(z) for z in z1]
    return torch.cat(z1).numpy(), torch.cat(z2).numpy()


@pytest.mark.parametrize("objective", ["simclr", "barlow_twins"])
def test_label_free_diagnostics_match_independent_references(objective):
    model, images, batch_size, seed = _model(objective), _images(20), 8, 5
    augment = TwoViewAugmentation(objective, 12, 1, MEAN, STD)
    result = label_free_diagnostics(model, images, MEAN, STD, augment=augment, batch_size=batch_size, seed=seed)

    z1, z2 = _reference_features(model, images)
    chunks = np.array_split(np.arange(20), math.ceil(20 / batch_size))  # 7, 7, 6 images
    per_chunk = [ref_mi_h2(z1[c], z2[c]) for c in chunks]
    i_z1_z2 = float(np.mean([mi for mi, _ in per_chunk]))
    h_z1 = float(np.mean([h for _, h in per_chunk]))
    assert result["rankme"] == pytest.approx(ref_rankme(z1), rel=1e-4)
    assert result["uniformity"] == pytest.approx(ref_uniformity(z1), rel=1e-4, abs=1e-5)
    assert result["I(Z1;Z2)"] == pytest.approx(i_z1_z2, rel=1e-3, abs=1e-5)
    assert result["H(Z1)"] == pytest.approx(h_z1, rel=1e-4, abs=1e-6)
    assert result["upper_bound"] == pytest.approx(h_z1 - i_z1_z2, rel=1e-3, abs=1e-5)

    # the views: the same seed, the same chunks, one augmentation call per chunk
    torch.manual_seed(seed)
    views = [augment(images[c]) for c in chunks]  # (B, 2, 1, 12, 12) each
    model.eval()
    with torch.no_grad():
        view_z1 = [torch.stack([model.backbone(v[:, k]) for k in range(2)]) for v in views]  # (2, B, D) each
    objective_fn = nt_xent_loss if objective == "simclr" else barlow_twins_loss
    i_z1_r = -float(np.mean([objective_fn(z).item() for z in view_z1]))
    first, second = (torch.cat([z[k] for z in view_z1]).numpy() for k in range(2))
    assert result["alignment"] == pytest.approx(ref_alignment(first, second), rel=1e-4)
    assert result["I(Z1;R)"] == pytest.approx(i_z1_r, rel=1e-4)
    assert result["lower_bound"] == pytest.approx(i_z1_r - i_z1_z2, rel=1e-4)


def test_diagnostics_leave_the_model_and_the_random_streams_as_they_were():
    model, images = _model("barlow_twins"), _images(12)
    model.train()
    running_means = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    rng = torch.get_rng_state()
    augment = TwoViewAugmentation("barlow_twins", 12, 1, MEAN, STD)
    first = label_free_diagnostics(model, images, MEAN, STD, augment=augment, batch_size=6)
    assert model.training and model.config.gather_distributed
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded training run draws the same numbers afterwards
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running_means, after))  # eval mode: statistics not updated
    torch.rand(3)  # a different global RNG state: the views are still the same
    assert label_free_diagnostics(model, images, MEAN, STD, augment=augment, batch_size=6) == first
    other_seed = label_free_diagnostics(model, images, MEAN, STD, augment=augment, batch_size=6, seed=1)
    assert other_seed["alignment"] != first["alignment"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # full precision inside a training step's autocast too
        assert label_free_diagnostics(model, images, MEAN, STD, augment=augment, batch_size=6) == first
    # without augmentation only the quantities of the images themselves
    plain = label_free_diagnostics(model, images, MEAN, STD, batch_size=6)
    assert set(plain) == {"rankme", "uniformity", "I(Z1;Z2)", "H(Z1)", "upper_bound"}
    assert all(plain[key] == first[key] for key in plain)


def test_objective_is_not_gathered_across_processes(monkeypatch):
    """Called from one process of a distributed run, a gathering objective would wait forever for the others."""
    class NoCollectives:
        def __getattr__(self, name):
            raise AssertionError(f"a collective was called: torch.distributed.{name}")

    monkeypatch.setattr(hf_ibproj.objectives, "_distributed", lambda enabled: enabled)  # as if world size > 1
    monkeypatch.setattr(hf_ibproj.objectives, "dist", NoCollectives())
    model, images = _model("simclr"), _images(8)
    augment = TwoViewAugmentation("simclr", 12, 1, MEAN, STD)
    result = label_free_diagnostics(model, images, MEAN, STD, augment=augment, batch_size=4)
    assert math.isfinite(result["I(Z1;R)"]) and model.config.gather_distributed
    with pytest.raises(AssertionError, match="collective"):  # the patch is effective on the model's own objective
        model.ssl_loss(torch.randn(2, 4, 8))


def test_bad_inputs_raise_clear_errors():
    model = _model("simclr")
    with pytest.raises(ValueError, match="uint8"):
        label_free_diagnostics(model, _images(4).float(), MEAN, STD)
    with pytest.raises(ValueError, match="N >= 2"):
        label_free_diagnostics(model, _images(1), MEAN, STD)
    with pytest.raises(ValueError, match="batch_size"):
        label_free_diagnostics(model, _images(4), MEAN, STD, batch_size=1)
    with pytest.raises(ValueError, match="mean has 3 values"):
        label_free_diagnostics(model, _images(4), [0.5] * 3, [0.2] * 3)
