"""The perturbation rules against their closed forms, written independently with one flat vector."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatminima.optim.perturbations import (
    asam_perturbation,
    global_norm,
    monge_perturbation,
    sam_perturbation,
)

SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), (7, 1)]


def _tensors(seed: int, shapes=SHAPES, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: torch.Tensor, like) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def _assert_all_close(a, b, rtol=1e-12, atol=1e-14):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("foreach", [True, False])
def test_global_norm_is_norm_of_concatenation(foreach):
    ts = _tensors(0)
    expected = _flat(ts).norm()
    torch.testing.assert_close(global_norm(ts, foreach=foreach), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("foreach", [True, False])
def test_sam_closed_form(foreach):
    params, grads = _tensors(1), _tensors(2)
    rho = 0.07
    g = _flat(grads)
    expected = _unflat(rho * g / g.norm(), grads)
    _assert_all_close(sam_perturbation(params, grads, rho, eps=0.0, foreach=foreach), expected)
    # ||e|| = rho exactly (up to eps).
    e = sam_perturbation(params, grads, rho, foreach=foreach)
    assert math.isclose(float(_flat(e).norm()), rho, rel_tol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
def test_sam_per_tensor_rho_uses_one_global_norm(foreach):
    params, grads = _tensors(3), _tensors(4)
    rhos = [0.1, 0.0, 0.3, 0.05, 0.2]
    n = _flat(grads).norm()
    expected = [r * g / n for r, g in zip(rhos, grads)]
    _assert_all_close(sam_perturbation(params, grads, rhos, eps=0.0, foreach=foreach), expected)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.01, 0.5])
def test_asam_closed_form(foreach, eta):
    params, grads = _tensors(5), _tensors(6)
    rho = 0.5
    adaptive = [True, False, True, False, True]
    # T as one diagonal matrix over the flat vector.
    t = _flat([p.abs() + eta if a else torch.ones_like(p) for p, a in zip(params, adaptive)])
    g = _flat(grads)
    expected = _unflat(rho * t * t * g / (t * g).norm(), grads)
    got = asam_perturbation(params, grads, rho, eta=eta, adaptive=adaptive, eps=0.0, foreach=foreach)
    _assert_all_close(got, expected)
    # The constraint ||T^{-1} e|| = rho is active.
    assert math.isclose(float((_flat(got) / t).norm()), rho, rel_tol=1e-12)


def test_asam_with_all_tensors_adaptive_eta0_is_davda54_form():
    params, grads = _tensors(7), _tensors(8)
    w, g = _flat(params), _flat(grads)
    expected = _unflat(2.0 * w**2 * g / (w * g).norm(), grads)
    _assert_all_close(asam_perturbation(params, grads, 2.0, eta=0.0, adaptive=True, eps=0.0), expected)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 3.0])
def test_monge_closed_form_is_metric_ball_maximizer(foreach, alpha):
    params, grads = _tensors(9), _tensors(10)
    rho = 0.05
    g = _flat(grads)
    # Independent route: e = rho G^{-1} g / sqrt(g^T G^{-1} g) with the explicit metric G.
    G = torch.eye(g.numel(), dtype=g.dtype) + alpha**2 * torch.outer(g, g)
    ginv_g = torch.linalg.solve(G, g)
    expected = _unflat(rho * ginv_g / torch.sqrt(g @ ginv_g), grads)
    got = monge_perturbation(params, grads, rho, alpha=alpha, eps=0.0, foreach=foreach)
    _assert_all_close(got, expected, rtol=1e-10, atol=1e-14)
    # On the boundary of the metric ball: e^T G e = rho^2.
    e = _flat(got)
    assert math.isclose(float(e @ G @ e), rho**2, rel_tol=1e-10)


def test_monge_alpha_zero_is_sam_bit_for_bit():
    params, grads = _tensors(11, dtype=torch.float32), _tensors(12, dtype=torch.float32)
    for foreach in (True, False):
        a = monge_perturbation(params, grads, 0.05, alpha=0.0, foreach=foreach)
        b = sam_perturbation(params, grads, 0.05, foreach=foreach)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_monge_limits():
    params, base = _tensors(13), _tensors(14)
    rho = 0.1
    unit = [t / _flat(base).norm() for t in base]
    # ||g|| -> 0: Monge-SAM -> SAM.
    for scale in (1e-3, 1e-5, 1e-7):
        grads = [scale * u for u in unit]
        m = _flat(monge_perturbation(params, grads, rho, alpha=1.0, eps=0.0))
        s = _flat(sam_perturbation(params, grads, rho, eps=0.0))
        assert (m - s).norm() / s.norm() < 2 * scale**2  # relative gap = 1 - 1/sqrt(1+n^2)
    # ||g|| -> inf: ||e|| = rho / sqrt(1 + n^2) -> 0.
    for scale in (1e2, 1e4, 1e6):
        grads = [scale * u for u in unit]
        e = _flat(monge_perturbation(params, grads, rho, alpha=1.0, eps=0.0))
        assert math.isclose(float(e.norm()), rho / math.sqrt(1 + scale**2), rel_tol=1e-10)


@pytest.mark.parametrize("rule", [sam_perturbation, asam_perturbation, monge_perturbation])
def test_zero_gradient_gives_zero_perturbation(rule):
    params = _tensors(15)
    grads = [torch.zeros_like(p) for p in params]
    e = rule(params, grads, 0.1)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in e)
    assert rule([], [], 0.1) == []


def test_per_tensor_option_length_is_checked():
    params, grads = _tensors(16), _tensors(17)
    with pytest.raises(ValueError, match="rho has 2 entries for 5 tensors"):
        sam_perturbation(params, grads, [0.1, 0.2])


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6
    ),
    seed=st.integers(0, 2**31 - 1),
    rho=st.floats(0.0, 5.0),
    eta=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 10.0),
    grad_scale=st.floats(1e-4, 1e4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_foreach_and_per_tensor_paths_agree(shapes, seed, rho, eta, alpha, grad_scale, dtype):
    params = _tensors(seed, shapes, dtype)
    grads = [grad_scale * g for g in _tensors(seed + 1, shapes, dtype)]
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    adaptive = [i % 2 == 0 for i in range(len(shapes))]
    for rule, kw in (
        (sam_perturbation, {}),
        (asam_perturbation, {"eta": eta, "adaptive": adaptive}),
        (monge_perturbation, {"alpha": alpha}),
    ):
        a = rule(params, grads, rho, foreach=True, **kw)
        b = rule(params, grads, rho, foreach=False, **kw)
        for x, y in zip(a, b):
            assert x.dtype == dtype and x.shape == y.shape
            torch.testing.assert_close(x, y, **tol)


def test_half_precision_gradients_take_float32_norm():
    # A norm of 1e5 overflows float16 (max 65504); the rules accumulate it in float32.
    grads = [torch.full((4,), 5e4, dtype=torch.float16)]
    params = [torch.ones(4, dtype=torch.float16)]
    e = sam_perturbation(params, grads, 1.0)
    assert e[0].dtype == torch.float16
    torch.testing.assert_close(e[0].float(), torch.full((4,), 0.5), rtol=1e-3, atol=0)
