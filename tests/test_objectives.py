"""NT-Xent and Barlow Twins (docs/method.md section 4) against naive formulas, in one process and across two processes."""

from __future__ import annotations

import itertools
import math
from unittest.mock import patch

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_ibproj import IBProjConfig, IBProjModel, objectives
from hf_ibproj.objectives import barlow_twins_loss, nt_xent_loss


# ---- naive references (float64, Python loops) ----

def naive_nt_xent(views: torch.Tensor, tau: float) -> float:
    """Mean over (anchor, positive) of -log softmax over all other rows; positives: other views of the same image."""
    num_views, batch, _ = views.shape
    rows = [(v, i, views[v, i].double() / views[v, i].double().norm()) for v in range(num_views) for i in range(batch)]
    terms = []
    for a, (va, ia, za) in enumerate(rows):
        others = [(k, math.exp((za @ zk).item() / tau)) for k, (_, _, zk) in enumerate(rows) if k != a]
        denominator = sum(e for _, e in others)
        for k, (vk, ik, zk) in enumerate(rows):
            if ik == ia and vk != va:
                terms.append(-math.log(math.exp((za @ zk).item() / tau) / denominator))
    assert len(terms) == num_views * (num_views - 1) * batch
    return sum(terms) / len(terms)


def naive_barlow_twins(views: torch.Tensor, lambda_offdiag: float, scale: float) -> float:
    num_views, batch, dim = views.shape
    normalized = []
    for v in range(num_views):
        z = views[v].double()
        mean = z.mean(dim=0)
        var = ((z - mean) ** 2).mean(dim=0)  # biased variance, as BatchNorm normalizes with
        normalized.append((z - mean) / torch.sqrt(var + 1e-5))
    losses = []
    for a, b in itertools.combinations(range(num_views), 2):
        c = normalized[a].T @ normalized[b] / batch
        on = sum((1 - c[i, i].item()) ** 2 for i in range(dim))
        off = sum(c[i, j].item() ** 2 for i in range(dim) for j in range(dim) if i != j)
        losses.append(scale * (on + lambda_offdiag * off))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("num_views", [2, 4])
@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_nt_xent_matches_naive_loop(num_views, tau):
    views = torch.randn(num_views, 6, 5)
    assert nt_xent_loss(views, tau=tau).item() == pytest.approx(naive_nt_xent(views, tau), rel=1e-5)


def test_nt_xent_two_views_equals_simclr_cross_entropy():
    # second reference: SimCLR's usual formulation with torch cross_entropy over the 2B x 2B similarity matrix
    z = torch.nn.functional.normalize(torch.randn(2, 8, 4, dtype=torch.float64), dim=-1).reshape(16, 4)
    logits = (z @ z.T / 0.2).fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(8, 16), torch.arange(0, 8)])
    expected = torch.nn.functional.cross_entropy(logits, targets).item()
    assert nt_xent_loss(z.reshape(2, 8, 4), tau=0.2).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("num_views", [2, 4])
def test_barlow_twins_matches_naive_formula(num_views):
    views = torch.randn(num_views, 10, 6) * 3 + 1
    expected = naive_barlow_twins(views, lambda_offdiag=0.0051, scale=0.1)
    assert barlow_twins_loss(views).item() == pytest.approx(expected, rel=1e-5)
    expected = naive_barlow_twins(views, lambda_offdiag=0.3, scale=2.0)
    assert barlow_twins_loss(views, lambda_offdiag=0.3, scale=2.0).item() == pytest.approx(expected, rel=1e-5)
    # the per-view normalization is exactly BatchNorm1d(affine=False) in training mode
    bn = torch.nn.BatchNorm1d(6, affine=False)
    z = [bn(views[v]) for v in range(num_views)]
    c = z[0].T @ z[1] / 10
    pair01 = 0.1 * ((1 - c.diagonal()).pow(2).sum() + 0.0051 * (c.pow(2).sum() - c.diagonal().pow(2).sum()))
    if num_views == 2:
        assert barlow_twins_loss(views).item() == pytest.approx(pair01.item(), rel=1e-5)


@pytest.mark.parametrize("loss_fn", [nt_xent_loss, barlow_twins_loss])
def test_objectives_compute_in_float32_under_autocast_and_reject_single_view(loss_fn):
    views = torch.randn(2, 8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(views.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(views.bfloat16().float()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="views"):
        loss_fn(torch.randn(1, 8, 6))


# ---- two real processes vs one process on the whole batch ----

WORLD_SIZE = 2
BATCH, IN_DIM, OUT_DIM, VIEWS = 8, 6, 5, 3


def _data() -> tuple[torch.Tensor, torch.nn.Linear, IBProjModel, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(VIEWS, BATCH, IN_DIM)
    linear = torch.nn.Linear(IN_DIM, OUT_DIM)
    cfg = IBProjConfig(
        backbone="resnet18_small", backbone_kwargs={"channels": (4, 4, 4, 4)}, objective="barlow_twins",
        projector_hidden_dims=[8], projector_out_dim=6, num_views=2,
    )
    model = IBProjModel(cfg).eval()  # eval: BatchNorm uses running statistics, rows are independent
    images = torch.randn(BATCH, 2, 3, 8, 8)
    return x, linear, model, images


def _losses_and_grads(x, linear, model, images, rows, gather):
    """Per case: (loss, parameter gradients, gradient of the case's input rows with the batch first)."""
    results = {}
    cases = {
        "simclr": lambda z: nt_xent_loss(z, tau=0.3, gather_distributed=gather),
        "barlow_twins": lambda z: barlow_twins_loss(z, gather_distributed=gather),
    }
    for name, loss_fn in cases.items():
        linear.zero_grad()
        inputs = x[:, rows].clone().requires_grad_()
        loss = loss_fn(linear(inputs))
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in linear.parameters()], inputs.grad.transpose(0, 1))
    model.config.gather_distributed = gather
    model.zero_grad()
    pixels = images[rows].clone().requires_grad_()
    loss = model(pixels).loss
    loss.backward()
    results["model"] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], pixels.grad)
    return results


def _as_ddp_sees_them(results):
    """Per case: the loss and parameter gradients averaged over processes (what DDP does), and the input gradients
    of all processes concatenated along the batch, divided by the world size (each loss weighs 1/world in DDP)."""
    combined = {}
    for name, (loss, grads, input_grad) in results.items():
        for t in [loss, *grads]:
            dist.all_reduce(t)
            t /= WORLD_SIZE
        parts = [torch.empty_like(input_grad) for _ in range(WORLD_SIZE)]
        dist.all_gather(parts, input_grad.contiguous())
        combined[name] = (loss, grads, torch.cat(parts) / WORLD_SIZE)
    return combined


def _worker(rank: int, port: int, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        x, linear, model, images = _data()
        half = BATCH // WORLD_SIZE
        rows = slice(rank * half, (rank + 1) * half)
        results = {"correct": _as_ddp_sees_them(_losses_and_grads(x, linear, model, images, rows, gather=True))}
        # The same collectives with their forward intact but no cross-process gradient (what a collective without a
        # registered backward gives): the comparison below must see the difference.
        own_rows = staticmethod(lambda ctx, grad: grad[rank * ctx.rows : (rank + 1) * ctx.rows])
        with patch.object(objectives._GatherAcrossProcesses, "backward", own_rows), \
                patch.object(objectives._SumAcrossProcesses, "backward", staticmethod(lambda ctx, grad: grad)):
            results["local_gradient"] = _as_ddp_sees_them(
                _losses_and_grads(x, linear, model, images, rows, gather=True)
            )
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path, free_port):
    """Losses, parameter gradients and per-sample input gradients of both objectives (and of the model) across two
    gloo processes equal one process on the global batch; a gradient-less collective would be caught."""
    result_file = str(tmp_path / "distributed.pt")
    mp.start_processes(_worker, args=(free_port, result_file), nprocs=WORLD_SIZE, join=True, start_method="spawn")
    results = torch.load(result_file)
    x, linear, model, images = _data()
    single = _losses_and_grads(x, linear, model, images, slice(None), gather=False)
    distributed = results["correct"]
    assert distributed.keys() == single.keys() == {"simclr", "barlow_twins", "model"}
    for name in single:
        (loss_d, grads_d, input_grad_d), (loss_s, grads_s, input_grad_s) = distributed[name], single[name]
        torch.testing.assert_close(loss_d, loss_s, rtol=1e-5, atol=1e-5, msg=f"{name} loss")
        assert len(grads_d) == len(grads_s) > 0
        for g_d, g_s in zip(grads_d, grads_s):
            torch.testing.assert_close(g_d, g_s, rtol=1e-5, atol=1e-5, msg=f"{name} gradient")
        assert input_grad_s.shape[0] == BATCH and input_grad_s.abs().max() > 0
        torch.testing.assert_close(input_grad_d, input_grad_s, rtol=1e-5, atol=1e-6, msg=f"{name} input gradient")
        # without the cross-process gradient the forward still matches but the gradients do not
        loss_l, grads_l, input_grad_l = results["local_gradient"][name]
        torch.testing.assert_close(loss_l, loss_s, rtol=1e-5, atol=1e-5)
        assert (input_grad_l - input_grad_s).abs().max() > 1e-2 * input_grad_s.abs().max(), name
    # the local (non-gathered) loss really differs: the test would notice a missing gather
    local = nt_xent_loss(linear(x[:, : BATCH // 2]), tau=0.3, gather_distributed=False)
    assert abs(local.item() - single["simclr"][0].item()) > 1e-3


# ---- loss modules (lightly-style criterion(z0, z1)) against the functional forms and the naive references ----


def test_nt_xent_module_equals_functional_form_and_naive_loop():
    from hf_ibproj.objectives import NTXentLoss

    z0 = torch.randn(6, 5, requires_grad=True)
    z1 = torch.randn(6, 5, requires_grad=True)
    criterion = NTXentLoss(tau=0.5)
    loss = criterion(z0, z1)
    functional = nt_xent_loss(torch.stack([z0, z1]), tau=0.5)
    assert loss.item() == pytest.approx(functional.item(), rel=1e-6)
    assert loss.item() == pytest.approx(naive_nt_xent(torch.stack([z0, z1]).detach(), 0.5), rel=1e-5)
    module_grads = torch.autograd.grad(loss, (z0, z1))
    functional_grads = torch.autograd.grad(functional, (z0, z1))
    for got, expected in zip(module_grads, functional_grads):
        torch.testing.assert_close(got, expected)
    views = torch.randn(3, 6, 5)  # a stacked views tensor: every other view is a positive
    assert criterion(views).item() == pytest.approx(naive_nt_xent(views, 0.5), rel=1e-5)
    assert NTXentLoss()(z0, z1).item() == pytest.approx(nt_xent_loss(torch.stack([z0, z1])).item())  # tau 0.2
    with pytest.raises(ValueError, match="z0 and z1"):
        criterion(z0, z1[:4])
    with pytest.raises(ValueError, match="tau"):
        NTXentLoss(tau=0)


def test_barlow_twins_module_equals_functional_form_and_naive_formula():
    from hf_ibproj.objectives import BarlowTwinsLoss

    z0 = (torch.randn(10, 6) * 3 + 1).requires_grad_()
    z1 = torch.randn(10, 6, requires_grad=True)
    criterion = BarlowTwinsLoss(lambda_offdiag=0.3, scale=2.0)
    loss = criterion(z0, z1)
    functional = barlow_twins_loss(torch.stack([z0, z1]), lambda_offdiag=0.3, scale=2.0)
    assert loss.item() == pytest.approx(functional.item(), rel=1e-6)
    expected = naive_barlow_twins(torch.stack([z0, z1]).detach(), lambda_offdiag=0.3, scale=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    for got, want in zip(torch.autograd.grad(loss, (z0, z1)), torch.autograd.grad(functional, (z0, z1))):
        torch.testing.assert_close(got, want)
    views = torch.randn(3, 10, 6)
    assert criterion(views).item() == pytest.approx(naive_barlow_twins(views, 0.3, 2.0), rel=1e-5)
    default = naive_barlow_twins(torch.stack([z0, z1]).detach(), lambda_offdiag=0.0051, scale=0.1)
    assert BarlowTwinsLoss()(z0, z1).item() == pytest.approx(default, rel=1e-5)  # paper defaults
    with pytest.raises(ValueError, match="scale"):
        BarlowTwinsLoss(scale=0)
