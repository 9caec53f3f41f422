"""DistributedDataParallel on CPU (gloo, 2 processes): per-replica and synchronized perturbations,
and ESAM's per-tensor weight masks and data selection under ``no_sync``."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flatminima import ESAM, SAM

WORLD = 2
LR, RHO = 0.1, 0.2
BETA, GAMMA, SEED = 0.5, 0.5, 4


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).double()


def _shard(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _worker(rank: int, init_file: str, per_replica: bool, out: str, esam: bool = False) -> None:
    torch.set_num_threads(1)  # deterministic reductions, as in the parent process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        context = ddp.no_sync if per_replica else None
        x, y = _shard(rank)
        if esam:
            opt = ESAM(ddp.parameters(), torch.optim.SGD, rho=RHO, beta=BETA, gamma=GAMMA, seed=SEED,
                       lr=LR, first_pass_context=context)

            def closure(select=None):
                xb, yb = (x, y) if select is None else (x[select], y[select])
                return F.cross_entropy(ddp(xb), yb, reduction="none")
        else:
            opt = SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=LR, first_pass_context=context)

            def closure():
                loss = _loss(ddp, x, y)
                loss.backward()
                return loss

        opt.step(closure)
        torch.save([p.detach() for p in model.parameters()], f"{out}.{rank}")
        open(f"{out}.{rank}.done", "w").close()  # written after the result file is complete
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _spawn(args: tuple, out: str) -> list[list[torch.Tensor]]:
    """Run the workers and load what each rank saved. gloo sometimes aborts in its C++ teardown
    (``terminate called without an active exception``) after the ranks finished and saved their
    results; such an exit is tolerated only when every rank's result file is complete."""
    try:
        mp.spawn(_worker, args=args, nprocs=WORLD)
    except mp.ProcessExitedException:
        if not all(os.path.exists(f"{out}.{r}.done") for r in range(WORLD)):
            raise
    return [torch.load(f"{out}.{r}") for r in range(WORLD)]


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
        results = _spawn((os.path.join(tmp, "init"), per_replica, out), out)
    for a, b in zip(*results):
        assert torch.equal(a, b)  # replicas stay identical
    expected = _reference(per_replica)
    for got, ref in zip(results[0], expected):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # The two choices really differ (so each assertion above has teeth).
    other = _reference(not per_replica)
    assert any(not torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(expected, other))


def _esam_reference() -> tuple[list[torch.Tensor], list[bool]]:
    """One per-replica ESAM step by hand: per-tensor mask from the seeded generator, e on the kept
    tensors with the normalizer ||m g|| / sqrt(beta), top-k rows by Delta per replica, the descent
    gradients averaged over replicas."""
    model = _model()
    params = list(model.parameters())
    probe = ESAM(params, torch.optim.SGD, beta=BETA, seed=SEED, lr=LR)
    kept_ids = probe._draw_tensor_mask()
    kept = [id(p) in kept_ids for p in params]
    w0 = [p.detach().clone() for p in params]
    adv = []
    for x, y in (_shard(r) for r in range(WORLD)):
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
        clean = F.cross_entropy(model(x), y, reduction="none")
        g = torch.autograd.grad(clean.mean(), [p for p, k in zip(params, kept) if k])
        n_hat = torch.cat([t.reshape(-1) for t in g]).norm() / BETA**0.5
        it = iter(g)
        with torch.no_grad():
            for p, w, k in zip(params, w0, kept):
                p.copy_(w + RHO / BETA * next(it) / n_hat if k else w)
            delta = F.cross_entropy(model(x), y, reduction="none") - clean
        k_rows = int(GAMMA * len(y))
        rows = sorted(sorted(range(len(y)), key=lambda i: (-float(delta[i]), i))[:k_rows])
        adv.append(torch.autograd.grad(F.cross_entropy(model(x[rows]), y[rows]), params))
    return [w - LR * sum(gs) / WORLD for w, gs in zip(w0, zip(*adv))], kept


@pytest.mark.slow
def test_data_parallel_esam_with_tensor_masks_and_selection_matches_the_hand_computed_step():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "params")
        results = _spawn((os.path.join(tmp, "init"), True, out, True), out)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    expected, kept = _esam_reference()
    assert 0 < sum(kept) < len(kept)  # the mask of this seed is partial: the test has teeth
    for got, ref in zip(results[0], expected):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
