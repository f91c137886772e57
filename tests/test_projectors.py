"""The bottleneck projectors of docs/method.md section 3 (FSQ quantizer, top-k sparse block) against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from hf_ibproj import IBProjConfig
from hf_ibproj.projectors import FSQuantizer, Projector, TopKSparseBlock


# ---- FSQ quantizer (docs/method.md 3b) ----

def expected_levels(levels: int) -> set[float]:
    """The values round(b) / (L // 2) can take, b = tanh(.) * half - offset ranging over [-half - offset, half - offset]."""
    half = (levels - 1) * (1 - 1e-3) / 2
    offset = 0.5 if levels % 2 == 0 else 0.0
    lowest, highest = round(-half - offset), round(half - offset)
    return {m / (levels // 2) for m in range(lowest, highest + 1)}


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 30])
def test_quantizer_level_sets(levels):
    z = torch.linspace(-20, 20, 100001)
    out = FSQuantizer(levels)(z)
    found = {round(v, 6) for v in out.unique().tolist()}
    assert found == {round(v, 6) for v in expected_levels(levels)}
    assert len(found) == levels
    assert out.min().item() >= -1 and out.max().item() <= 1
    if levels % 2:  # odd L: the symmetric grid {-1, ..., 0, ..., 1} in steps of 1 / (L // 2)
        step = 1 / (levels // 2)
        assert found == {round(-1 + i * step, 6) for i in range(levels)}


def test_quantizer_small_cases_written_out():
    grid = torch.linspace(-20, 20, 100001)
    assert set(FSQuantizer(3)(grid).unique().tolist()) == {-1.0, 0.0, 1.0}
    assert set(FSQuantizer(5)(grid).unique().tolist()) == {-1.0, -0.5, 0.0, 0.5, 1.0}
    assert set(FSQuantizer(2)(grid).unique().tolist()) == {-1.0, 0.0}
    assert set(FSQuantizer(4)(grid).unique().tolist()) == {-1.0, -0.5, 0.0, 0.5}


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 30])
def test_quantizer_straight_through_gradient(levels):
    z = (torch.randn(257, dtype=torch.float64) * 2).requires_grad_(True)
    FSQuantizer(levels)(z).sum().backward()
    half = (levels - 1) * (1 - 1e-3) / 2
    offset = 0.5 if levels % 2 == 0 else 0.0
    # docs/method.md 3b: atanh; for L = 2 (offset / half > 1, atanh undefined) the released code's tan
    shift = math.atanh(offset / half) if levels != 2 else math.tan(offset / half)
    # d/dz [tanh(z + shift) * half - offset] / (L // 2)
    expected = half * (1 - torch.tanh(z.detach() + shift) ** 2) / (levels // 2)
    torch.testing.assert_close(z.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("levels", [1, 0, -3])
def test_quantizer_rejects_fewer_than_two_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        FSQuantizer(levels)


# ---- top-k sparse block (docs/method.md 3c) ----

def _sparse_block(dim=6, latent=40, k=5, seed=0) -> TopKSparseBlock:
    torch.manual_seed(seed)
    block = TopKSparseBlock(dim, latent, k).double()
    with torch.no_grad():
        block.pre_bias.normal_()  # non-zero so that its two uses are checked
    return block


def _naive_sparse_forward(block: TopKSparseBlock, h: torch.Tensor) -> tuple[list[list[float]], torch.Tensor]:
    """u, s and z2 of docs/method.md 3c with Python loops."""
    w_enc, b_enc = block.encoder.weight.tolist(), block.encoder.bias.tolist()
    w_dec, b_dec = block.decoder.weight.tolist(), block.decoder.bias.tolist()
    b_pre = block.pre_bias.tolist()
    codes, outputs = [], []
    for row in h.tolist():
        centered = [x - p for x, p in zip(row, b_pre)]
        u = [max(0.0, sum(w * x for w, x in zip(w_row, centered)) + b) for w_row, b in zip(w_enc, b_enc)]
        keep = sorted(range(len(u)), key=lambda j: u[j], reverse=True)[: block.k]
        s = [u[j] if j in keep else 0.0 for j in range(len(u))]
        outputs.append([sum(w * x for w, x in zip(w_row, s)) + b + p for w_row, b, p in zip(w_dec, b_dec, b_pre)])
        codes.append(s)
    return codes, torch.tensor(outputs, dtype=torch.float64)


def test_sparse_block_matches_naive_formula_with_exactly_k_active():
    block = _sparse_block()
    h = torch.randn(7, 6, dtype=torch.float64)
    u = torch.relu(h.sub(block.pre_bias) @ block.encoder.weight.T + block.encoder.bias)
    assert ((u > 0).sum(dim=1) > block.k).all()  # the top-k really has to cut
    codes = block.encode(h)
    assert ((codes != 0).sum(dim=1) == block.k).all()
    naive_codes, naive_out = _naive_sparse_forward(block, h)
    torch.testing.assert_close(codes, torch.tensor(naive_codes, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block(h), naive_out, rtol=1e-12, atol=1e-12)


def test_sparse_block_latents_outside_top_k_get_no_gradient():
    block = _sparse_block()
    h = torch.randn(3, 6, dtype=torch.float64)
    u_grads = []

    def keep_gradient_of_output(module, args, output):
        output.register_hook(u_grads.append)

    block.encoder.register_forward_hook(keep_gradient_of_output)
    block(h).pow(2).sum().backward()
    kept = block.encode(h) != 0  # (rows, latents)
    # d loss / d (encoder pre-activation) is zero outside each row's top k
    assert (u_grads[0][~kept] == 0).all() and (u_grads[0][kept] != 0).all()
    # encoder rows and decoder columns of latents no row kept receive exactly zero gradient
    unused = ~kept.any(dim=0)
    assert unused.sum() > 0
    assert (block.encoder.weight.grad[unused] == 0).all() and (block.encoder.bias.grad[unused] == 0).all()
    assert (block.decoder.weight.grad[:, unused] == 0).all()
    assert (block.encoder.weight.grad[~unused].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("k", [0, -1, 41])
def test_sparse_block_rejects_invalid_k(k):
    with pytest.raises(ValueError, match="k="):
        TopKSparseBlock(6, 40, k)


# ---- composition ----

def test_projector_order_mlp_sparse_quantizer():
    cfg = IBProjConfig(
        projector_hidden_dims=[12], projector_out_dim=10, sparse_latent_dim=30, sparse_topk=3, quantize_levels=3
    )
    projector = Projector(cfg, in_dim=8)
    assert [name for name, _ in projector.named_children()] == ["mlp", "sparse", "quantizer"]
    x = torch.randn(5, 8)
    h = torch.relu(x @ projector.mlp[0].weight.T + projector.mlp[0].bias) @ projector.mlp[2].weight.T
    h = h + projector.mlp[2].bias
    sparse = projector.sparse
    u = torch.relu((h - sparse.pre_bias) @ sparse.encoder.weight.T + sparse.encoder.bias)
    top = u.topk(3, dim=1)
    s = torch.zeros_like(u).scatter(1, top.indices, top.values)
    z = s @ sparse.decoder.weight.T + sparse.decoder.bias + sparse.pre_bias
    expected = torch.round(torch.tanh(z) * (1 - 1e-3))  # L = 3: half = 0.999, no offset, L // 2 = 1
    torch.testing.assert_close(projector(x), expected)
    assert set(projector(torch.randn(50, 8)).unique().tolist()) <= {-1.0, 0.0, 1.0}
