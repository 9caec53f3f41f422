"""DistributedDataParallel on CPU (gloo, 2 processes): per-replica and synchronized perturbations."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flatminima import SAM

WORLD = 2
LR, RHO = 0.1, 0.2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).double()


def _shard(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _worker(rank: int, init_file: str, per_replica: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = SAM(
            ddp.parameters(), torch.optim.SGD, rho=RHO, lr=LR,
            first_pass_context=ddp.no_sync if per_replica else None,
        )
        x, y = _shard(rank)

        def closure():
            loss = _loss(ddp, x, y)
            loss.backward()
            return loss

        opt.step(closure)
        torch.save([p.detach() for p in model.parameters()], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _reference(per_replica: bool) -> list[torch.Tensor]:
    """Single-process computation of one data-parallel SAM step, by hand."""
    model = _model()
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    shards = [_shard(r) for r in range(WORLD)]
    local = [torch.autograd.grad(_loss(model, *s), params) for s in shards]
    if not per_replica:
        mean = [sum(gs) / WORLD for gs in zip(*local)]
        local = [mean] * WORLD
    adv = []
    for (x, y), g in zip(shards, local):
        n = torch.cat([t.reshape(-1) for t in g]).norm()
        with torch.no_grad():
            for p, w, gi in zip(params, w0, g):
                p.copy_(w + RHO * gi / n)
        adv.append(torch.autograd.grad(_loss(model, x, y), params))
    return [w - LR * sum(gs) / WORLD for w, gs in zip(w0, zip(*adv))]


@pytest.mark.slow
@pytest.mark.parametrize("per_replica", [True, False], ids=["per-replica", "synchronized"])
def test_data_parallel_sam_matches_the_hand_computed_step(per_replica):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "params")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), per_replica, out), nprocs=WORLD)
        results = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for a, b in zip(*results):
        assert torch.equal(a, b)  # replicas stay identical
    expected = _reference(per_replica)
    for got, ref in zip(results[0], expected):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # The two choices really differ (so each assertion above has teeth).
    other = _reference(not per_replica)
    assert any(not torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(expected, other))
