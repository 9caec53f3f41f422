"""Sharpness measures: worst-case (first order and ascent), average, adaptive and m-sharpness, proved
against closed forms on quadratics, trust-region maxima, hand computations and reparametrizations."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import statistics
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_batch, make_mlp, state_equal
from torch import nn

from flatminima.optim import asam_perturbation, sam_perturbation
from flatminima.sharpness import NonDeterministicLossWarning
from flatminima.sharpness.measures import (
    SharpnessResult,
    average_sharpness,
    m_sharpness,
    worst_case_sharpness,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
class Quadratic(nn.Module):
    """``L(w) = 1/2 w^T A w - b^T w`` with one parameter vector ``w``."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.register_buffer("A", A.clone())
        self.register_buffer("b", b.clone())


def quad_loss(model: Quadratic, batch) -> torch.Tensor:
    w = model.w
    return 0.5 * w @ model.A @ w - model.b @ w


def quad_value(A, b, w) -> float:
    return float(0.5 * w @ A @ w - b @ w)


def random_quadratic(n: int, seed: int, shift: float = 0.5):
    """A symmetric positive definite ``A`` (eigenvalues >= shift), ``b`` and a point ``w``."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=F64)
    A = M @ M.T / n + shift * torch.eye(n, dtype=F64)
    return A, torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def trust_region_max(A: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """``max_{||d|| <= rho} g^T d + d^T A d / 2`` for positive definite ``A``: the maximizer is
    ``d = (lam I - A)^{-1} g`` on the sphere, with ``lam > lambda_max(A)`` solving the secular equation
    ``||(lam I - A)^{-1} g|| = rho`` (found by bisection)."""
    lam, Q = torch.linalg.eigh(A)
    c = Q.T @ g
    lo, hi = float(lam.max()), float(lam.max()) + float(c.norm()) / rho + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((c / (mid - lam)).norm()) > rho:
            lo = mid
        else:
            hi = mid
    d = Q @ (c / ((lo + hi) / 2 - lam))
    assert abs(float(d.norm()) - rho) < 1e-12 * max(rho, 1.0)
    return float(g @ d + 0.5 * d @ A @ d)


def mse_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)


def regression_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)


def first_order_by_hand(model, loss_fn, batch, rho, names=None) -> float:
    """SAM's first-order sharpness on a copy of the model, by autograd and in-place perturbation."""
    model = copy.deepcopy(model)
    chosen = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, [p for _, p in chosen])
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for (_, p), g in zip(chosen, grads):
            p.add_(g * (rho / norm))
        return float(loss_fn(model, batch)) - float(loss)


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def rr(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------- worst case
@pytest.mark.parametrize("rho", [0.01, 0.3, 2.0])
def test_first_order_worst_case_of_a_quadratic_is_the_closed_form(rho):
    A, b, w = random_quadratic(8, seed=1)
    g = A @ w - b
    ghat = g / g.norm()
    expected = rho * float(g.norm()) + 0.5 * rho**2 * float(ghat @ A @ ghat)
    r = worst_case_sharpness(Quadratic(A, b, w), quad_loss, [None], rho)
    assert r.measure == "worst_case" and r.steps == 1 and r.num_samples == 1
    assert rr(r.value, expected) < 1e-12
    assert r.loss == pytest.approx(quad_value(A, b, w), rel=1e-14)
    assert r.perturbed_loss == pytest.approx(quad_value(A, b, w + rho * ghat), rel=1e-13)
    assert r.values == (r.value,) and float(r) == r.value
    assert r.std_error is None
    assert r.evaluations == 4  # determinism check (2), gradient at w, loss at w + delta


def test_first_order_linf_is_the_sign_vertex():
    A, b, w = random_quadratic(8, seed=2)
    g, rho = A @ w - b, 0.2
    s = torch.sign(g)
    expected = rho * float(g.abs().sum()) + 0.5 * rho**2 * float(s @ A @ s)
    r = worst_case_sharpness(Quadratic(A, b, w), quad_loss, [None], rho, norm="linf")
    assert rr(r.value, expected) < 1e-12 and r.norm == "linf"


@pytest.mark.parametrize("eta", [0.0, 0.01, 0.5])
def test_first_order_points_are_the_librarys_sam_and_asam_perturbations(eta):
    A, b, w = random_quadratic(8, seed=3)
    model = Quadratic(A, b, w)
    g, rho = A @ w - b, 0.4
    (e_sam,) = sam_perturbation([w], [g], rho, foreach=False)
    (e_asam,) = asam_perturbation([w], [g], rho, eta=eta, foreach=False)
    plain = worst_case_sharpness(model, quad_loss, [None], rho)
    adaptive = worst_case_sharpness(model, quad_loss, [None], rho, adaptive=True, eta=eta)
    assert rr(plain.perturbed_loss, quad_value(A, b, w + e_sam)) < 1e-12
    assert rr(adaptive.perturbed_loss, quad_value(A, b, w + e_asam)) < 1e-12
    assert adaptive.adaptive and adaptive.eta == eta


@pytest.mark.parametrize("rho", [0.1, 1.0, 3.0])
def test_ascent_converges_to_the_trust_region_maximum(rho):
    A, b, w = random_quadratic(10, seed=1)
    g = A @ w - b
    true_max = trust_region_max(A, g, rho)
    model = Quadratic(A, b, w)
    first = worst_case_sharpness(model, quad_loss, [None], rho).value
    r = worst_case_sharpness(model, quad_loss, [None], rho, steps=100)
    assert rr(r.value, true_max) < 1e-10
    assert r.value <= true_max * (1 + 1e-12)  # never outside the ball
    assert r.value > first  # strictly better than the first-order point here
    assert r.values[0] == first and max(r.values) == r.value and len(r.values) == 100
    assert r.evaluations == 2 + 100 + 1  # check, 100 gradients (the first at w), last loss


@pytest.mark.parametrize(
    "A, g, rho",
    [
        ([[3.0, 1.0], [1.0, 0.5]], [0.3, -0.2], 1.0),  # indefinite: maximum on the circle
        ([[1.0, 0.0], [0.0, 4.0]], [0.5, 0.1], 2.0),  # convex, near the hard case
        ([[-2.0, 0.5], [0.5, -1.0]], [0.3, 0.4], 1.0),  # concave: maximum inside the disk
    ],
)
def test_ascent_in_2d_matches_a_dense_search_over_the_disk(A, g, rho):
    A, g = torch.tensor(A, dtype=F64), torch.tensor(g, dtype=F64)
    # L(w) = 1/2 w^T A w - b^T w at w = 0 has gradient -b: take b = -g.
    model = Quadratic(A, -g, torch.zeros(2, dtype=F64))
    theta = torch.linspace(0, 2 * math.pi, 4001, dtype=F64)
    radius = rho * torch.linspace(0, 1, 801, dtype=F64).sqrt()
    d = torch.stack([torch.cos(theta), torch.sin(theta)], 1)[:, None, :] * radius[None, :, None]
    grid = (d @ g + 0.5 * torch.einsum("ari,ij,arj->ar", d, A, d)).max().item()
    r = worst_case_sharpness(model, quad_loss, [None], rho, steps=60)
    assert r.value >= grid - 1e-6 * max(1.0, abs(grid))
    assert r.value <= grid + 1e-4 * max(1.0, abs(grid))  # the grid is within ~1e-5 of the maximum


def test_linf_ascent_improves_on_the_vertex_and_stays_in_the_box():
    # First-order vertex sign(g) = (1, -1) is a poor corner of the square; the global one is (1, 1).
    A, g, rho = torch.tensor([[1.0, 3.0], [3.0, 10.0]], dtype=F64), torch.tensor([1.0, -0.1], dtype=F64), 1.0
    model = Quadratic(A, -g, torch.zeros(2, dtype=F64))
    first = worst_case_sharpness(model, quad_loss, [None], rho, norm="linf")
    r = worst_case_sharpness(model, quad_loss, [None], rho, norm="linf", steps=20)
    assert first.value == pytest.approx(1.1 + 0.5 * 5.0, rel=1e-14)
    # A convex quadratic attains its maximum over the box at a vertex.
    vertices = [torch.tensor(v, dtype=F64) * rho for v in itertools.product([-1.0, 1.0], repeat=2)]
    best_vertex = max(float(g @ v + 0.5 * v @ A @ v) for v in vertices)
    assert first.value + 1.0 < r.value <= best_vertex + 1e-12


def test_linf_ascent_in_8d_is_bounded_by_the_best_vertex():
    A, b, w = random_quadratic(8, seed=5)
    g, rho = A @ w - b, 0.7
    model = Quadratic(A, b, w)
    first = worst_case_sharpness(model, quad_loss, [None], rho, norm="linf").value
    r = worst_case_sharpness(model, quad_loss, [None], rho, norm="linf", steps=30)
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=8)), dtype=F64) * rho
    best = float((vertices @ g + 0.5 * torch.einsum("vi,ij,vj->v", vertices, A, vertices)).max())
    assert first <= r.value <= best + 1e-12


# ----------------------------------------------------------------------------- adaptive
@pytest.mark.parametrize(
    "measure",
    [
        lambda m, **k: worst_case_sharpness(m, quad_loss, [None], 0.3, **k),
        lambda m, **k: worst_case_sharpness(m, quad_loss, [None], 0.3, steps=25, **k),
        lambda m, **k: worst_case_sharpness(m, quad_loss, [None], 0.3, steps=10, norm="linf", **k),
        lambda m, **k: average_sharpness(m, quad_loss, [None], 0.3, num_samples=20, **k),
    ],
    ids=["first-order", "ascent", "linf", "average"],
)
def test_adaptive_equals_plain_sharpness_of_the_reparametrized_problem(measure):
    # w = S v with S = diag(|w0|): L~(v) = 1/2 v^T (S A S) v - (S b)^T v at v0 = sign(w0); the adaptive
    # ball ||delta / |w0| || <= rho at w0 is the plain ball ||dv|| <= rho at v0.
    A, b, w = random_quadratic(8, seed=4)
    S = torch.diag(w.abs())
    adaptive = measure(Quadratic(A, b, w), adaptive=True, eta=0.0)
    plain = measure(Quadratic(S @ A @ S, S @ b, torch.sign(w)))
    assert rr(adaptive.value, plain.value) < 1e-10
    assert rr(adaptive.loss, plain.loss) < 1e-12
    differs = measure(Quadratic(A, b, w))  # and the plain measure at w0 is something else
    assert rr(differs.value, plain.value) > 1e-2


def relu_net_and_rescaled(c: float):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(F64)
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[0].weight.mul_(c)
        other[0].bias.mul_(c)
        other[2].weight.div_(c)
    return net, other


@pytest.mark.parametrize(
    "measure",
    [
        lambda m, b, **k: worst_case_sharpness(m, mse_loss, b, 0.5, **k),
        lambda m, b, **k: worst_case_sharpness(m, mse_loss, b, 0.5, steps=5, **k),
        lambda m, b, **k: average_sharpness(m, mse_loss, b, 0.5, num_samples=5, **k),
        lambda m, b, **k: m_sharpness(m, mse_loss, b, 0.5, m=4, **k),
    ],
    ids=["first-order", "ascent", "average", "m-sharpness"],
)
def test_adaptive_sharpness_is_invariant_to_relu_rescaling_and_plain_is_not(measure):
    net, rescaled = relu_net_and_rescaled(4.0)  # a power of two: the forward passes agree exactly
    batches = [regression_batch(8, seed=0), regression_batch(8, seed=1)]
    x = batches[0][0]
    assert torch.equal(net(x), rescaled(x))
    a, a2 = measure(net, batches, adaptive=True), measure(rescaled, batches, adaptive=True)
    assert a.value != 0 and rr(a2.value, a.value) < 1e-10
    p, p2 = measure(net, batches), measure(rescaled, batches)
    assert rr(p2.value, p.value) > 0.05


# ----------------------------------------------------------------------------- average
def test_average_sharpness_of_a_quadratic_within_four_standard_errors():
    n, rho = 12, 0.8
    A, b, w = random_quadratic(n, seed=6)
    g = A @ w - b
    expected = 0.5 * float(torch.trace(A)) * rho**2 / n
    r = average_sharpness(Quadratic(A, b, w), quad_loss, [None], rho, num_samples=400, seed=1)
    assert r.measure == "average" and r.distribution == "gaussian" and r.num_samples == 400
    assert abs(r.value - expected) < 4 * r.std_error
    # The standard error is the true one: Var = sigma^2 ||g||^2 + sigma^4 tr(A^2) / 2, sigma^2 = rho^2/n.
    s2 = rho**2 / n
    true_se = math.sqrt((s2 * float(g @ g) + s2**2 * float(torch.trace(A @ A)) / 2) / 400)
    assert r.std_error == pytest.approx(true_se, rel=0.15)
    assert len(r.values) == 400 and r.value == pytest.approx(sum(r.values) / 400, rel=1e-12)
    assert r.std_error == pytest.approx(statistics.stdev(r.values) / math.sqrt(400), rel=1e-12)
    assert r.perturbed_loss - r.loss == pytest.approx(r.value, rel=1e-10)


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
def test_average_sharpness_at_a_minimum_is_close_with_many_samples(distribution):
    n, rho = 12, 0.8
    A, b, _ = random_quadratic(n, seed=6)
    w = torch.linalg.solve(A, b)  # g = 0: only the curvature term is left
    expected = 0.5 * float(torch.trace(A)) * rho**2 / n
    r = average_sharpness(
        Quadratic(A, b, w), quad_loss, [None], rho, num_samples=3000, distribution=distribution
    )
    assert abs(r.value - expected) < 4 * r.std_error
    assert rr(r.value, expected) < 0.02
    assert r.evaluations == 2 + 1 + 3000


def test_sphere_draws_have_norm_rho_and_gaussian_draws_have_mean_square_rho_squared():
    n, rho, a = 20, 0.5, 3.0
    A = a * torch.eye(n, dtype=F64)
    model = Quadratic(A, torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64))
    # L(w + u) - L(w) = a ||u||^2 / 2: every sphere draw gives exactly a rho^2 / 2.
    sphere = average_sharpness(model, quad_loss, [None], rho, num_samples=50, distribution="sphere")
    assert all(v == pytest.approx(a * rho**2 / 2, rel=1e-12) for v in sphere.values)
    assert sphere.std_error < 1e-12
    gauss = average_sharpness(model, quad_loss, [None], rho, num_samples=2000)
    # ||u||^2 n / rho^2 ~ chi^2_n: mean rho^2, relative std sqrt(2/n) per draw.
    assert abs(gauss.value - a * rho**2 / 2) < 4 * gauss.std_error
    assert gauss.std_error == pytest.approx(a * rho**2 / 2 * math.sqrt(2 / n / 2000), rel=0.1)


def test_adaptive_average_sharpness_of_a_quadratic():
    n, rho, eta = 10, 0.6, 0.1
    A, b, _ = random_quadratic(n, seed=7)
    w = torch.linalg.solve(A, b)
    s2 = (w.abs() + eta) ** 2
    expected = 0.5 * rho**2 / n * float((torch.diagonal(A) * s2).sum())
    r = average_sharpness(
        Quadratic(A, b, w), quad_loss, [None], rho, num_samples=2000, adaptive=True, eta=eta
    )
    assert abs(r.value - expected) < 4 * r.std_error and rr(r.value, expected) < 0.03


def test_average_sharpness_is_reproducible_by_seed_and_one_draw_has_no_standard_error():
    A, b, w = random_quadratic(6, seed=8)
    model = Quadratic(A, b, w)
    r1 = average_sharpness(model, quad_loss, [None], 0.5, seed=3)
    r2 = average_sharpness(model, quad_loss, [None], 0.5, seed=3)
    r3 = average_sharpness(model, quad_loss, [None], 0.5, seed=4)
    assert r1 == r2 and r1.value != r3.value
    one = average_sharpness(model, quad_loss, [None], 0.5, num_samples=1)
    assert math.isnan(one.std_error) and one.values == (one.value,)


# ----------------------------------------------------------------------------- m-sharpness
@pytest.mark.parametrize("steps", [1, 4])
def test_m_sharpness_with_m_the_whole_batch_is_the_worst_case_sharpness(steps):
    net, batch = tiny_net(), regression_batch(8, seed=2)
    whole = worst_case_sharpness(net, mse_loss, [batch], 0.3, steps=steps)
    m = m_sharpness(net, mse_loss, [batch], 0.3, m=8, steps=steps)
    big = m_sharpness(net, mse_loss, [batch], 0.3, m=100, steps=steps)
    assert m.measure == "m_sharpness" and m.num_samples == 1 and m.m == 8
    for r in (m, big):
        assert r.value == pytest.approx(whole.value, rel=1e-13)
        assert r.loss == pytest.approx(whole.loss, rel=1e-13)
        assert r.perturbed_loss == pytest.approx(whole.perturbed_loss, rel=1e-13)


def test_m_sharpness_with_m_1_is_the_mean_of_per_sample_first_order_sharpness():
    net, (x, y) = tiny_net(), regression_batch(6, seed=3)
    by_hand = [first_order_by_hand(net, mse_loss, (x[i : i + 1], y[i : i + 1]), 0.2) for i in range(6)]
    r = m_sharpness(net, mse_loss, [(x, y)], 0.2, m=1)
    assert r.num_samples == 6
    assert all(rr(a, b) < 1e-10 for a, b in zip(r.values, by_hand))
    assert rr(r.value, sum(by_hand) / 6) < 1e-10
    # Per-sample worst cases exceed the worst case of the mean loss (smaller m: sharper).
    assert r.value > worst_case_sharpness(net, mse_loss, [(x, y)], 0.2).value


def test_m_sharpness_weights_uneven_sub_batches_by_size_and_m_none_uses_the_given_batches():
    net = tiny_net()
    b1, b2 = regression_batch(8, seed=4), regression_batch(5, seed=5)
    r = m_sharpness(net, mse_loss, [b1, b2], 0.3, m=3)  # chunks 3, 3, 2 | 3, 2
    chunks = [(b1[0][i : i + 3], b1[1][i : i + 3]) for i in (0, 3, 6)]
    chunks += [(b2[0][i : i + 3], b2[1][i : i + 3]) for i in (0, 3)]
    each = [worst_case_sharpness(net, mse_loss, [c], 0.3).value for c in chunks]
    sizes = [3, 3, 2, 3, 2]
    assert r.num_samples == 5 and all(rr(a, b) < 1e-12 for a, b in zip(r.values, each))
    assert rr(r.value, sum(s * v for s, v in zip(sizes, each)) / 13) < 1e-12
    per_batch = m_sharpness(net, mse_loss, [b1, b2], 0.3, m=None)
    expected = [worst_case_sharpness(net, mse_loss, [b], 0.3).value for b in (b1, b2)]
    assert per_batch.m is None and rr(per_batch.value, sum(expected) / 2) < 1e-12


def test_m_sharpness_splits_dicts_and_namedtuples_and_refuses_other_structures():
    net, (x, y) = tiny_net(), regression_batch(6, seed=6)
    Pair = namedtuple("Pair", "x y")
    seen = []

    def dict_loss(model, batch):
        seen.append(type(batch))
        return F.mse_loss(model(batch["x"]), batch["y"])

    def pair_loss(model, batch):
        seen.append(type(batch))
        return F.mse_loss(model(batch.x), batch.y)

    ref = m_sharpness(net, mse_loss, [(x, y)], 0.3, m=2)
    assert m_sharpness(net, dict_loss, [{"x": x, "y": y}], 0.3, m=2).value == pytest.approx(ref.value)
    assert m_sharpness(net, pair_loss, [Pair(x, y)], 0.3, m=2).value == pytest.approx(ref.value)
    assert set(seen) == {dict, Pair}
    with pytest.raises(TypeError, match="m=None"):
        m_sharpness(net, mse_loss, [[x, "label"]], 0.3, m=2)
    with pytest.raises(ValueError, match="leading batch dimension"):
        m_sharpness(net, mse_loss, [(x, y[:4])], 0.3, m=2)
    # m=None accepts any structure: each batch is one sub-batch.
    r = m_sharpness(net, lambda mod, b: mse_loss(mod, b["data"]), [{"data": (x, y)}], 0.3, m=None)
    assert r.value == pytest.approx(worst_case_sharpness(net, mse_loss, [(x, y)], 0.3).value)


# ----------------------------------------------------------------------------- params
def test_params_restricts_the_perturbation_to_the_selected_parameters():
    net, batch = tiny_net(), regression_batch(10, seed=7)
    names = {"0.weight", "0.bias"}
    by_hand = first_order_by_hand(net, mse_loss, batch, 0.3, names=names)
    r = worst_case_sharpness(net, mse_loss, [batch], 0.3, params="0.")
    assert rr(r.value, by_hand) < 1e-12
    full = worst_case_sharpness(net, mse_loss, [batch], 0.3)
    assert rr(full.value, first_order_by_hand(net, mse_loss, batch, 0.3)) < 1e-12
    assert rr(full.value, r.value) > 1e-2


def test_average_sharpness_with_params_draws_in_the_selected_coordinates_only():
    net, batch = tiny_net(), regression_batch(10, seed=8)
    chosen = [net[2].weight, net[2].bias]
    n = sum(p.numel() for p in chosen)
    gen = torch.Generator().manual_seed(5)
    expected = []
    base = float(mse_loss(net, batch).detach())
    for _ in range(3):  # the documented convention: u = rho z / sqrt(n), z ~ N(0, I) from the seed
        u = torch.randn(n, generator=gen, dtype=F64) * (0.4 / math.sqrt(n))
        other = copy.deepcopy(net)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(chosen) + u, [other[2].weight, other[2].bias]
            )
        expected.append(float(mse_loss(other, batch).detach()) - base)
    r = average_sharpness(net, mse_loss, [batch], 0.4, num_samples=3, params=["2.weight", "2.bias"], seed=5)
    assert all(rr(a, b) < 1e-12 for a, b in zip(r.values, expected))


# ----------------------------------------------------------------------------- model safety
MEASURES = {
    "worst_case": lambda m, f, b, **k: worst_case_sharpness(m, f, b, 0.1, steps=3, **k),
    "adaptive_linf": lambda m, f, b, **k: worst_case_sharpness(
        m, f, b, 0.1, steps=2, adaptive=True, eta=0.01, norm="linf", **k
    ),
    "average": lambda m, f, b, **k: average_sharpness(m, f, b, 0.1, num_samples=4, **k),
    "m_sharpness": lambda m, f, b, **k: m_sharpness(m, f, b, 0.1, m=8, steps=2, **k),
}


def snapshot(model):
    return copy.deepcopy(model), [m.training for m in model.modules()], torch.get_rng_state()


def assert_unchanged(model, snap):
    ref, flags, rng = snap
    assert state_equal(model, ref)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name", list(MEASURES))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_model_and_global_rng_are_unchanged(name, mode):
    model = make_mlp(bn=True, dropout=0.3, dtype=F64)
    model.train()
    model[1].eval()  # mixed flags
    batches = [make_batch(16, seed=s, dtype=F64) for s in range(2)]
    snap = snapshot(model)
    if mode == "train":
        with pytest.warns(NonDeterministicLossWarning):
            r1 = MEASURES[name](model, ce_loss, batches, mode=mode)
        with pytest.warns(NonDeterministicLossWarning):
            r2 = MEASURES[name](model, ce_loss, batches, mode=mode)
        assert r1 == r2  # the seed makes the dropout masks reproducible
    else:
        MEASURES[name](model, ce_loss, batches, mode=mode)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", list(MEASURES))
def test_the_model_is_unchanged_when_the_loss_raises_midway(name):
    model = make_mlp(bn=True, dropout=0.0, dtype=F64)
    batches = [make_batch(16, seed=s, dtype=F64) for s in range(2)]
    snap = snapshot(model)
    calls = []

    def failing(mod, batch):
        calls.append(None)
        if len(calls) == 6:
            raise RuntimeError("boom")
        return ce_loss(mod, batch)

    with pytest.raises(RuntimeError, match="boom"):
        MEASURES[name](model, failing, batches, mode="train")
    assert len(calls) == 6
    assert_unchanged(model, snap)


def test_deterministic_eval_mode_does_not_warn(recwarn):
    model = make_mlp(bn=True, dropout=0.3, dtype=F64)
    for measure in MEASURES.values():
        measure(model, ce_loss, [make_batch(16, dtype=F64)], mode="eval")
    assert not [w for w in recwarn if issubclass(w.category, NonDeterministicLossWarning)]


# ----------------------------------------------------------------------------- edge cases, validation
def test_rho_zero_gives_zero_and_results_are_frozen():
    A, b, w = random_quadratic(5, seed=9)
    model = Quadratic(A, b, w)
    results = [
        worst_case_sharpness(model, quad_loss, [None], 0.0, steps=3),
        average_sharpness(model, quad_loss, [None], 0.0, num_samples=3),
        m_sharpness(model, quad_loss, [None], 0.0, m=None),
    ]
    assert all(r.value == 0.0 and r.rho == 0.0 for r in results)
    with pytest.raises(dataclasses.FrozenInstanceError):
        results[0].value = 1.0
    assert isinstance(results[0], SharpnessResult)


def test_zero_gradient_gives_a_zero_first_order_perturbation():
    A, _, _ = random_quadratic(5, seed=10)
    zero = torch.zeros(5, dtype=F64)  # g = A 0 - 0 = 0 exactly (a rounded solve would not do)
    r = worst_case_sharpness(Quadratic(A, zero, zero), quad_loss, [None], 0.5, steps=3)
    assert r.values == (0.0, 0.0, 0.0)


INVALID = [
    (worst_case_sharpness, {"rho": -0.1}, "rho: -0.1"),
    (worst_case_sharpness, {"rho": float("nan")}, "rho: nan"),
    (worst_case_sharpness, {"rho": True}, "rho: True"),
    (worst_case_sharpness, {"steps": 0}, "steps: 0"),
    (worst_case_sharpness, {"steps": 2.0}, "steps: 2.0"),
    (worst_case_sharpness, {"step_size": 0.0}, "step_size: 0.0"),
    (worst_case_sharpness, {"eta": -1.0}, "eta: -1.0"),
    (worst_case_sharpness, {"norm": "l1"}, "norm: 'l1'"),
    (worst_case_sharpness, {"mode": "test"}, "mode: 'test'"),
    (average_sharpness, {"rho": -1}, "rho: -1"),
    (average_sharpness, {"num_samples": 0}, "num_samples: 0"),
    (average_sharpness, {"distribution": "uniform"}, "distribution: 'uniform'"),
    (average_sharpness, {"mode": "training"}, "mode: 'training'"),
    (m_sharpness, {"m": 0}, "m: 0"),
    (m_sharpness, {"m": -3}, "m: -3"),
    (m_sharpness, {"steps": -1}, "steps: -1"),
    (m_sharpness, {"norm": "L2"}, "norm: 'L2'"),
]


@pytest.mark.parametrize("fn, kwargs, match", INVALID)
def test_invalid_inputs_raise_value_error_naming_the_value(fn, kwargs, match):
    A, b, w = random_quadratic(3, seed=0)
    model = Quadratic(A, b, w)
    args = {"rho": 0.1, **({"m": None} if fn is m_sharpness else {}), **kwargs}
    rho = args.pop("rho")
    with pytest.raises(ValueError, match=match):
        fn(model, quad_loss, [None], rho, **args)
    with pytest.raises(ValueError, match="empty"):
        fn(model, quad_loss, [], 0.1, **({"m": 2} if fn is m_sharpness else {}))
