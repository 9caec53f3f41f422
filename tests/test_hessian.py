"""Hessian spectrum: Lanczos / power top-k, Hutch++ / Hutchinson trace, SLQ density, per-layer
blocks; every number is checked against the explicit Hessian, and the model is never touched."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_mlp, state_equal
from torch import nn
from torch.func import functional_call

from flatminima.sharpness import NonDeterministicLossWarning
from flatminima.sharpness.hessian import (
    HessianInfo,
    hessian_eigenvalues,
    hessian_trace,
    layerwise_top_eigenvalues,
    spectral_density,
)

D = torch.float64


# ----------------------------------------------------------------------------- fixtures
def tanh_mlp(seed: int = 0) -> nn.Sequential:
    """6-12-12-3 tanh MLP, 279 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    ).to(D)


def data(seed: int = 0, n: int = 40) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` samples split into 2 batches."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def ce_dict(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def explicit_hessian(model, batches, names=None, mode="eval"):
    """Hessian of the mean-over-batches cross-entropy w.r.t. the parameters ``names`` (all by
    default), built independently of the package: functional_call + autograd.functional.hessian."""
    ref = copy.deepcopy(model).train(mode == "train")
    params = dict(ref.named_parameters())
    names = list(params) if names is None else names
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(w):
        tensors, i = {}, 0
        for n in names:
            tensors[n] = w[i : i + params[n].numel()].view(params[n].shape)
            i += params[n].numel()
        return sum(F.cross_entropy(functional_call(ref, tensors, (x,)), y) for x, y in batches) / len(
            batches
        )

    return torch.autograd.functional.hessian(f, w0)


@pytest.fixture(scope="module")
def mlp_case():
    model, batches = tanh_mlp(), data()
    H = explicit_hessian(model, batches)
    return model, batches, H, torch.linalg.eigvalsh(H).flip(0)


class Quadratic(nn.Module):
    """``loss = 0.5 w^T A w``: Hessian exactly ``A``."""

    def __init__(self, A: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(A.shape[0], dtype=D))
        self.register_buffer("A", A)


def quad_loss(model, batch):
    return 0.5 * model.w @ model.A @ model.w * batch


def rotated(eigs, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=D))
    return q @ torch.diag(torch.tensor(eigs, dtype=D)) @ q.T


def snapshot(model):
    return copy.deepcopy(model), [m.training for m in model.modules()], torch.get_rng_state()


def assert_untouched(model, snap):
    ref, flags, rng = snap
    assert state_equal(model, ref)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_top_k_matches_explicit_hessian(mlp_case, k):
    model, batches, _, ev = mlp_case
    values, info = hessian_eigenvalues(model, ce, batches, k=k, mode="eval", return_info=True)
    assert values.shape == (k,) and values.dtype == D
    assert torch.all(values[:-1] >= values[1:])
    assert torch.allclose(values, ev[:k], rtol=1e-4, atol=0)
    assert (values - ev[:k]).abs().max() / ev[0] < 1e-8  # converged far below tol in practice
    assert info.converged and info.method == "lanczos"
    assert info.matvecs == info.iterations == len(info.history) < 60
    assert info.loss_evaluations == 2 + info.matvecs * len(batches)  # one determinism check


def test_power_method_top_1_and_2_match_explicit_hessian(mlp_case):
    model, batches, _, ev = mlp_case
    values, info = hessian_eigenvalues(
        model, ce, batches, k=2, method="power", max_iter=1000, tol=1e-7, return_info=True
    )
    assert info.converged and info.method == "power"
    assert torch.allclose(values, ev[:2], rtol=1e-4, atol=0)
    top = hessian_eigenvalues(model, ce, batches, k=1, method="power", max_iter=1000)
    assert abs(float(top[0]) - float(ev[0])) < 1e-4 * float(ev[0])


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigenvectors_satisfy_hv_equals_lambda_v(mlp_case, method):
    model, batches, H, _ = mlp_case
    k = 3 if method == "lanczos" else 1
    values, vectors = hessian_eigenvalues(
        model, ce, batches, k=k, method=method, max_iter=1000, tol=1e-8, return_eigenvectors=True
    )
    assert vectors.shape == (k, 279)
    assert torch.allclose(vectors @ vectors.T, torch.eye(k, dtype=D), atol=1e-8)
    residual = torch.linalg.vector_norm(H @ vectors.T - vectors.T * values, dim=0)
    assert torch.all(residual <= 1e-6 * values.abs())
    # deterministic sign: the largest entry of each vector is positive
    assert torch.all(vectors.gather(1, vectors.abs().argmax(1, keepdim=True)) > 0)


def test_largest_algebraic_not_largest_magnitude():
    """A dominant negative eigenvalue (-5): plain power iteration (PyHessian) would return it; both
    methods here return the largest algebraic eigenvalues 3 and 1."""
    model = Quadratic(rotated([-5.0, 3.0, 1.0, 0.5, -0.2, 0.1]))
    for method in ("lanczos", "power"):
        values = hessian_eigenvalues(model, quad_loss, [1.0], k=2, method=method, max_iter=500, tol=1e-9)
        assert torch.allclose(values, torch.tensor([3.0, 1.0], dtype=D), rtol=1e-6), method


def test_k_equals_n_with_multiple_eigenvalues_restarts_the_krylov_space():
    """Single-vector Lanczos sees each distinct eigenvalue once; when the Krylov space is invariant it
    restarts from a new random direction, so all n eigenvalues come out with their multiplicities."""
    eigs = [3.0, 3.0, 2.0, 1.0, 1.0, -1.0]
    model = Quadratic(rotated(eigs))
    values, info = hessian_eigenvalues(model, quad_loss, [1.0], k=6, return_info=True)
    assert torch.allclose(values, torch.tensor(eigs, dtype=D), atol=1e-10)
    assert info.converged and info.matvecs == 6
    power = hessian_eigenvalues(model, quad_loss, [1.0], k=3, method="power", max_iter=500, tol=1e-10)
    assert torch.allclose(power, torch.tensor(eigs[:3], dtype=D), atol=1e-8)


def test_params_restricts_to_the_diagonal_block(mlp_case):
    model, batches, _, _ = mlp_case
    names = ["2.weight", "2.bias"]
    block = torch.linalg.eigvalsh(explicit_hessian(model, batches, names)).flip(0)
    values = hessian_eigenvalues(model, ce, batches, k=2, params="2.")
    assert torch.allclose(values, block[:2], rtol=1e-6, atol=0)
    trace, se = hessian_trace(model, ce, batches, params="2.", num_matvecs=1000)
    assert se == 0.0 and math.isclose(trace, float(block.sum()), rel_tol=1e-10)


def test_layerwise_top_eigenvalues_are_the_blocks_top_eigenvalues(mlp_case):
    model, batches, _, _ = mlp_case
    values, infos = layerwise_top_eigenvalues(model, ce, batches, mode="eval", return_info=True)
    assert list(values) == ["0", "2", "4"]
    for name, value in values.items():
        block = explicit_hessian(model, batches, [f"{name}.weight", f"{name}.bias"])
        assert math.isclose(value, float(torch.linalg.eigvalsh(block)[-1]), rel_tol=1e-6)
        assert isinstance(infos[name], HessianInfo) and infos[name].converged


def test_dict_batches_give_the_same_spectrum_as_tuples(mlp_case):
    model, batches, _, _ = mlp_case
    dicts = [{"x": x, "y": y} for x, y in batches]
    a = hessian_eigenvalues(model, ce, batches, k=2)
    b = hessian_eigenvalues(model, ce_dict, dicts, k=2)
    assert torch.allclose(a, b, rtol=1e-12, atol=0)
    assert hessian_trace(model, ce, batches, num_matvecs=12) == pytest.approx(
        hessian_trace(model, ce_dict, dicts, num_matvecs=12), rel=1e-12
    )


def test_reused_graph_gives_the_same_numbers_with_fewer_loss_calls(mlp_case):
    """reuse_graph=True keeps each batch's gradient graph: one forward per batch in all, then one
    backward per product; the numbers are those of the fresh products. One batch reuses by default."""
    model, batches, _, ev = mlp_case
    fresh, i_fresh = hessian_eigenvalues(model, ce, batches, k=3, return_info=True)
    kept, i_kept = hessian_eigenvalues(model, ce, batches, k=3, return_info=True, reuse_graph=True)
    assert torch.allclose(fresh, kept, rtol=1e-12, atol=0) and i_fresh.matvecs == i_kept.matvecs
    assert i_fresh.loss_evaluations == 2 + len(batches) * i_fresh.matvecs
    assert i_kept.loss_evaluations == 2 + len(batches)
    t_fresh = hessian_trace(model, ce, batches, num_matvecs=12, reuse_graph=False)
    t_kept = hessian_trace(model, ce, batches, num_matvecs=12, reuse_graph=True)
    assert t_fresh == pytest.approx(t_kept, rel=1e-12)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    one, info = hessian_eigenvalues(model, ce, [(x, y)], k=3, return_info=True)  # one batch: reused
    assert info.loss_evaluations == 3
    assert torch.allclose(one, ev[:3], rtol=1e-8, atol=0)  # equal batch sizes: the same mean loss


def test_float32_model_converges_to_its_rounding_level(mlp_case):
    """In float32 a relative residual of 1e-6 may be out of reach: the test stops at the rounding
    level (100 eps ||H||) instead of running to max_iter, and the values agree with float64."""
    model, batches, _, ev = mlp_case
    m32 = copy.deepcopy(model).float()
    b32 = [(x.float(), y) for x, y in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for method in ("lanczos", "power"):
            values, info = hessian_eigenvalues(
                m32, ce, b32, k=2, method=method, max_iter=2000, return_info=True
            )
            assert info.converged, method
            assert torch.allclose(values, ev[:2], rtol=1e-4, atol=0), method
    est, se = hessian_trace(m32, ce, b32, num_matvecs=1000)
    assert se == 0.0 and est == pytest.approx(float(ev.sum()), rel=1e-4)


def test_not_converged_warns_and_says_so(mlp_case):
    model, batches, _, _ = mlp_case
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        _, info = hessian_eigenvalues(model, ce, batches, k=2, max_iter=3, tol=1e-12, return_info=True)
    assert not info.converged and info.matvecs == 3


# ----------------------------------------------------------------------------- trace
def test_hutchpp_with_n_matvecs_is_the_exact_trace(mlp_case):
    model, batches, H, _ = mlp_case
    estimate, se, info = hessian_trace(model, ce, batches, num_matvecs=279, return_info=True)
    assert abs(estimate - float(torch.trace(H))) <= 1e-8 * float(H.diagonal().abs().sum())
    assert se == 0.0 and info.method == "exact" and info.matvecs == 279


def test_trace_within_three_standard_errors_for_most_seeds(mlp_case):
    model, batches, H, _ = mlp_case
    exact = float(torch.trace(H))
    for method in ("hutch++", "hutchinson"):
        hits = 0
        for seed in range(20):
            est, se, info = hessian_trace(
                model, ce, batches, seed, method=method, num_matvecs=48, return_info=True
            )
            assert info.matvecs == 48 and se > 0
            hits += abs(est - exact) <= 3 * se
        assert hits >= 18, (method, hits)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    """Spectrum lambda_i = i^-1.5: Hutch++ captures the top part exactly, so at the same budget its
    error is several times smaller than Hutchinson's (Meyer et al. 2021: O(1/m) vs O(1/sqrt(m)))."""
    n = 200
    eigs = [(i + 1) ** -1.5 for i in range(n)]
    model = Quadratic(rotated(eigs, seed=1))
    exact = sum(eigs)
    errors: dict[str, list[float]] = {"hutch++": [], "hutchinson": []}
    for seed in range(20):
        for method in errors:
            est, _ = hessian_trace(model, quad_loss, [1.0], seed, method=method, num_matvecs=30)
            errors[method].append(abs(est - exact))
    mean = {m: sum(e) / len(e) for m, e in errors.items()}
    assert mean["hutch++"] < 0.5 * mean["hutchinson"], mean


def test_trace_is_reproducible_by_seed(mlp_case):
    model, batches, _, _ = mlp_case
    a = hessian_trace(model, ce, batches, 3, num_matvecs=12)
    assert a == hessian_trace(model, ce, batches, 3, num_matvecs=12)
    assert a != hessian_trace(model, ce, batches, 4, num_matvecs=12)


# ----------------------------------------------------------------------------- density
def test_slq_moments_match_the_explicit_hessian(mlp_case):
    """p = 0 is exact. For p = 1, 2 each run gives exactly v^T H^p v (Gauss quadrature is exact up to
    degree 2m - 1) with v = g / sqrt(n), g Rademacher: an unbiased estimate of tr(H^p) / n with variance
    2 (||A||_F^2 - sum_i A_ii^2) / n^2, A = H^p. The check is |estimate - exact| <= 4 standard errors,
    computed from the explicit Hessian."""
    model, batches, H, _ = mlp_case
    n, runs = H.shape[0], 16
    sd = spectral_density(model, ce, batches, num_runs=runs, lanczos_steps=8)
    assert sd.info.matvecs == runs * 8 and sd.nodes.shape == sd.weights.shape == (runs * 8,)
    assert sd.moments(0) == pytest.approx(1.0, abs=1e-12)
    assert all(float(w.sum()) == pytest.approx(1.0, abs=1e-12) for _, w in sd.per_run())
    for p in (1, 2):
        A = torch.linalg.matrix_power(H, p)
        var = 2 * (float((A * A).sum()) - float((A.diagonal() ** 2).sum())) / n**2
        se = math.sqrt(var / runs)
        assert abs(sd.moments(p) - float(torch.trace(A)) / n) <= 4 * se, (p, se)


def test_slq_quadrature_is_exact_up_to_degree_2m_minus_1(mlp_case):
    """The same start vectors (same seed) with 2 or 12 Lanczos steps give the same moments for
    p <= 3 = 2*2 - 1: the quadrature identity, to rounding."""
    model, batches, _, _ = mlp_case
    short = spectral_density(model, ce, batches, 5, num_runs=3, lanczos_steps=2)
    long = spectral_density(model, ce, batches, 5, num_runs=3, lanczos_steps=12)
    for p in range(4):
        assert short.moments(p) == pytest.approx(long.moments(p), rel=1e-10, abs=1e-14)
    assert short.moments(5) != pytest.approx(long.moments(5), rel=1e-6)


def test_slq_with_n_steps_puts_its_nodes_on_the_eigenvalues(mlp_case):
    model, batches, H, ev = mlp_case
    sd = spectral_density(model, ce, batches, num_runs=1, lanczos_steps=500)
    assert sd.lanczos_steps == 279
    heavy = sd.nodes[sd.weights > 1e-10]
    assert len(heavy) > 200
    assert (heavy[:, None] - ev[None, :]).abs().min(1).values.max() < 1e-8
    grid = sd.grid
    mass = float(torch.trapezoid(sd.density, grid))
    assert mass == pytest.approx(1.0, abs=1e-3)
    assert sd.density_on(grid, sd.sigma * 2).shape == grid.shape


# ----------------------------------------------------------------------------- the model is untouched
def _all_functions(mode="eval", **kw):
    return {
        "eigenvalues": lambda m, f, b: hessian_eigenvalues(m, f, b, k=2, mode=mode, **kw),
        "power": lambda m, f, b: hessian_eigenvalues(
            m, f, b, method="power", mode=mode, max_iter=5, tol=0.5, **kw
        ),
        "trace": lambda m, f, b: hessian_trace(m, f, b, mode=mode, num_matvecs=6, **kw),
        "density": lambda m, f, b: spectral_density(m, f, b, mode=mode, num_runs=2, lanczos_steps=3, **kw),
        "layerwise": lambda m, f, b: layerwise_top_eigenvalues(m, f, b, mode=mode, max_iter=4, tol=0.5, **kw),
    }


def bn_model():
    model = make_mlp(bn=True, dropout=0.0, dtype=D)
    model.train()
    model[1].eval()  # mixed flags: must come back exactly so
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("name", list(_all_functions()))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_flags_buffers_and_rng_are_untouched(name, mode):
    model, batches = bn_model(), data()
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonDeterministicLossWarning)  # BN alone is deterministic
        warnings.simplefilter("ignore", RuntimeWarning)
        _all_functions(mode)[name](model, ce, batches)
    assert_untouched(model, snap)


@pytest.mark.parametrize("name", list(_all_functions()))
@pytest.mark.parametrize("reuse_graph", [False, True])
def test_untouched_when_loss_fn_raises_on_the_third_call(name, reuse_graph):
    model, batches = bn_model(), data()
    snap = snapshot(model)
    calls = []

    def failing(m, batch):
        calls.append(None)
        if len(calls) == 3:
            m.eval()  # the loss function misbehaves before raising
            torch.rand(5)
            raise RuntimeError("boom")
        return ce(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        _all_functions("train", reuse_graph=reuse_graph)[name](model, failing, batches)
    assert len(calls) == 3
    assert_untouched(model, snap)


def test_train_mode_with_dropout_warns_nondeterministic():
    model = make_mlp(bn=False, dropout=0.3, dtype=D)
    with pytest.warns(NonDeterministicLossWarning):
        hessian_trace(model, ce, data(), mode="train", num_matvecs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonDeterministicLossWarning)
        hessian_trace(model, ce, data(), mode="eval", num_matvecs=4)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, b: hessian_eigenvalues(m, ce, b, k=0), "k: 0"),
        (lambda m, b: hessian_eigenvalues(m, ce, b, k=True), "k: True"),
        (lambda m, b: hessian_eigenvalues(m, ce, b, k=280), "k: 280"),
        (lambda m, b: hessian_eigenvalues(m, ce, b, k=5, max_iter=4), "max_iter: 4"),
        (lambda m, b: hessian_eigenvalues(m, ce, b, method="arnoldi"), "method: 'arnoldi'"),
        (lambda m, b: hessian_eigenvalues(m, ce, b, mode="training"), "mode: 'training'"),
        (lambda m, b: hessian_eigenvalues(m, ce, b, tol=0.0), "tol: 0.0"),
        (lambda m, b: hessian_trace(m, ce, b, method="xtrace"), "method: 'xtrace'"),
        (lambda m, b: hessian_trace(m, ce, b, mode=None), "mode: None"),
        (lambda m, b: hessian_trace(m, ce, b, num_matvecs=3), "num_matvecs: 3"),
        (lambda m, b: hessian_trace(m, ce, b, method="hutchinson", num_matvecs=1), "num_matvecs: 1"),
        (lambda m, b: spectral_density(m, ce, b, mode="test"), "mode: 'test'"),
        (lambda m, b: spectral_density(m, ce, b, num_runs=0), "num_runs: 0"),
        (lambda m, b: spectral_density(m, ce, b, sigma=-1.0), "sigma: -1.0"),
        (lambda m, b: layerwise_top_eigenvalues(m, ce, b, method="qr"), "method: 'qr'"),
        (lambda m, b: layerwise_top_eigenvalues(m, ce, b, mode="EVAL"), "mode: 'EVAL'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(call, match):
    model, batches = tanh_mlp(), data()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model, batches)
    assert_untouched(model, snap)
