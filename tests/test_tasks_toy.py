"""The 2-D toy losses and trajectories: gradients against autograd and closed forms, trajectories
against hand recursions, and only mathematically guaranteed facts about the saddle."""

from __future__ import annotations

import math

import pytest
import torch

from flatminima.bench.tasks.toy import (
    TOY_LOSSES,
    escape_step,
    escapes_saddle,
    monge_toy_grad,
    monge_toy_loss,
    quadratic_bowl,
    run_trajectory,
    saddle_comparison,
    saddle_grad,
    saddle_loss,
)

POINTS = [(0.0, 0.0), (0.5, -1.5), (2.0, 0.5), (-0.3, 0.7), (1.0, 1.0)]


def _autograd(fn, point):
    theta = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(theta), theta)
    return g


@pytest.mark.parametrize("point", POINTS)
def test_monge_toy_gradient_matches_autograd_and_the_closed_form(point):
    t1, t2 = point
    r = 1.0 - t1 * t2
    by_hand = torch.tensor([-2.0 * r * t2, -2.0 * r * t1], dtype=torch.float64)
    theta = torch.tensor(point, dtype=torch.float64)
    assert float(monge_toy_loss(theta)) == pytest.approx(r * r, abs=1e-15)
    torch.testing.assert_close(_autograd(monge_toy_loss, point), by_hand, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(monge_toy_grad(theta), by_hand, rtol=1e-14, atol=1e-14)
    q = 0.5
    torch.testing.assert_close(saddle_grad(theta, q), _autograd(saddle_loss, point), rtol=1e-14, atol=1e-14)
    assert float(saddle_loss(theta, q)) == pytest.approx(t1**2 - t2**2 + q * t2**4, abs=1e-15)


def test_toy_losses_work_on_batches_and_have_the_documented_critical_points():
    grid = torch.tensor(POINTS, dtype=torch.float64)
    assert monge_toy_loss(grid).shape == (len(POINTS),)
    torch.testing.assert_close(monge_toy_grad(grid)[2], monge_toy_grad(grid[2]))
    # the valley theta_1 theta_2 = 1 is a set of minima with loss 0; the origin a saddle
    valley = torch.tensor([[2.0, 0.5], [-4.0, -0.25]], dtype=torch.float64)
    assert torch.equal(monge_toy_loss(valley), torch.zeros(2, dtype=torch.float64))
    origin = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(monge_toy_grad(origin), origin) and torch.equal(saddle_grad(origin), origin)
    hess = torch.autograd.functional.hessian(monge_toy_loss, origin)
    torch.testing.assert_close(torch.linalg.eigvalsh(hess), torch.tensor([-2.0, 2.0], dtype=torch.float64))
    hess = torch.autograd.functional.hessian(saddle_loss, origin)
    torch.testing.assert_close(hess, torch.diag(torch.tensor([2.0, -2.0], dtype=torch.float64)))
    for q in (0.5, 2.0):  # minima (0, +-1/sqrt(2q)) with loss -1/(4q), bounded below there
        m = torch.tensor([0.0, 1.0 / math.sqrt(2 * q)], dtype=torch.float64)
        assert float(saddle_loss(m, q)) == pytest.approx(-1 / (4 * q))
        assert float(saddle_grad(m, q).abs().max()) < 1e-12
        cloud = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
        assert float(saddle_loss(cloud, q).min()) >= -1 / (4 * q)
    with pytest.raises(ValueError, match="quartic"):
        saddle_loss(origin, 0.0)
    with pytest.raises(ValueError, match="last dimension"):
        monge_toy_loss(torch.zeros(3))


def test_sgd_trajectory_on_a_quadratic_bowl_matches_the_hand_recursion():
    h, lr, steps = (1.0, 10.0), 0.05, 25
    start = (1.0, -0.5)
    # plain gradient descent: theta_{t+1} = (1 - lr h) theta_t, coordinatewise
    expected = torch.tensor([[start[0] * (1 - lr * h[0]) ** t, start[1] * (1 - lr * h[1]) ** t]
                             for t in range(steps + 1)], dtype=torch.float64)
    by_name = run_trajectory("bowl", "sgd", start, steps, lr)
    by_factory = run_trajectory(quadratic_bowl, torch.optim.SGD, start, steps, lr)
    assert by_name.shape == (steps + 1, 2) and by_name.dtype == torch.float64
    torch.testing.assert_close(by_name, expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(by_name, by_factory)
    # heavy ball as torch implements it: b <- mu b + g, theta <- theta - lr b
    mu = 0.9
    theta, buf, rows = torch.tensor(start, dtype=torch.float64), None, []
    rows.append(theta.clone())
    hvec = torch.tensor(h, dtype=torch.float64)
    for _ in range(steps):
        g = hvec * theta
        buf = g.clone() if buf is None else mu * buf + g
        theta = theta - lr * buf
        rows.append(theta.clone())
    torch.testing.assert_close(run_trajectory("bowl", "sgd", start, steps, lr, momentum=mu),
                               torch.stack(rows), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["sam_sgd", "msam_sgd"])
@pytest.mark.parametrize("loss, grad", [("bowl", None), ("saddle", saddle_grad), ("monge", monge_toy_grad)])
def test_sam_and_monge_sam_trajectories_match_the_hand_recursion(name, loss, grad):
    if grad is None:
        def grad(t):
            return torch.tensor([1.0, 10.0], dtype=torch.float64) * t
    rho, alpha, lr, steps = 0.05, 3.0, 0.05, 30
    start = (0.2, 0.1)
    theta, rows = torch.tensor(start, dtype=torch.float64), []
    rows.append(theta.clone())
    for _ in range(steps):
        g = grad(theta)
        n = float(g.norm())
        radius = rho if name == "sam_sgd" else rho / math.sqrt(1 + alpha**2 * n**2)
        e = radius * g / n
        theta = theta - lr * grad(theta + e)
        rows.append(theta.clone())
    kw = {"rho": rho} if name == "sam_sgd" else {"rho": rho, "alpha": alpha}
    torch.testing.assert_close(run_trajectory(loss, name, start, steps, lr, **kw), torch.stack(rows),
                               rtol=1e-10, atol=1e-12)


def test_sgd_near_the_saddle_moves_along_the_unstable_direction_and_escapes():
    # saddle loss with lr <= 1/4: theta_1 shrinks exactly by (1 - 2 lr) per step, and
    # theta_2 -> theta_2 (1 + 2 lr (1 - theta_2^2)) grows monotonically towards the minimum at 1
    lr, steps, start = 0.05, 300, (0.05, 1e-3)
    traj = run_trajectory("saddle", "sgd", start, steps, lr)
    t = torch.arange(steps + 1, dtype=torch.float64)
    torch.testing.assert_close(traj[:, 0], start[0] * (1 - 2 * lr) ** t, rtol=1e-10, atol=1e-300)
    rising = traj[1:, 1] - traj[:-1, 1]
    assert bool((rising >= 0).all()) and bool((rising[traj[:-1, 1] < 0.999] > 0).all())
    assert float(traj[:, 1].max()) <= 1.0 + 1e-12
    assert float(traj[-1, 1]) == pytest.approx(1.0, abs=1e-6)
    first = escape_step(traj, 0.5)
    assert first is not None and escapes_saddle(traj, 0.5)
    assert float(traj[first].norm()) > 0.5 >= float(traj[first - 1].norm())
    # the Monge toy loss: the unstable coordinate u = (theta_1 + theta_2)/sqrt 2 grows at first
    traj = run_trajectory("monge", "sgd", start, steps, lr)
    u = traj.sum(dim=1) / math.sqrt(2)
    assert float(u[1]) > float(u[0]) and escapes_saddle(traj, 0.5)
    assert float(monge_toy_loss(traj[-1])) < 1e-12  # it reached the valley of minima


def test_saddle_comparison_returns_reproducible_numbers():
    first = saddle_comparison("saddle", ("sgd", "sam_sgd", "msam_sgd"), steps=150)
    again = saddle_comparison("saddle", ("sgd", "sam_sgd", "msam_sgd"), steps=150)
    for name, res in first.items():
        assert torch.equal(res["trajectory"], again[name]["trajectory"])
        assert res["trajectory"].shape == (151, 2)
        assert set(res) >= {"final", "final_distance", "final_loss", "max_distance", "escape_step",
                            "escaped", "min_unstable", "final_unstable"}
        assert res["escaped"] == escapes_saddle(res["trajectory"], 0.5)
    assert first["sgd"]["escaped"]  # guaranteed (previous test); no claim about SAM or Monge-SAM
    direct = run_trajectory("saddle", "msam_sgd", (0.05, 1e-3), 150, 0.05, rho=0.05, alpha=1.0)
    assert torch.equal(first["msam_sgd"]["trajectory"], direct)
    # with gradient noise the runs depend on the seed only
    a = saddle_comparison("monge", ("sgd", "msam_sgd"), steps=50, noise=0.1, seed=1)
    b = saddle_comparison("monge", ("sgd", "msam_sgd"), steps=50, noise=0.1, seed=1)
    c = saddle_comparison("monge", ("sgd", "msam_sgd"), steps=50, noise=0.1, seed=2)
    for name in a:
        assert torch.equal(a[name]["trajectory"], b[name]["trajectory"])
        assert not torch.equal(a[name]["trajectory"], c[name]["trajectory"])


def test_escape_helpers_and_argument_checks():
    traj = torch.tensor([[0.1, 0.0], [0.3, 0.4], [0.6, 0.0], [0.2, 0.1]])
    assert escape_step(traj, 0.5) == 2 and not escapes_saddle(traj, 0.5)
    assert escape_step(traj, 0.7) is None and escapes_saddle(traj, 0.15)
    assert escape_step(traj, 0.5, center=(1.0, 0.0)) == 0 and escape_step(traj, 1.0, (1.0, 0.0)) is None
    with pytest.raises(ValueError, match="shape"):
        escape_step(torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="unknown toy loss"):
        run_trajectory("rosenbrock", "sgd", (0.0, 0.0), 1, 0.1)
    with pytest.raises(ValueError, match="2 numbers"):
        run_trajectory("bowl", "sgd", (0.0, 0.0, 0.0), 1, 0.1)
    with pytest.raises(ValueError, match="steps"):
        run_trajectory("bowl", "sgd", (0.0, 0.0), -1, 0.1)
    assert run_trajectory("bowl", "sgd", (1.0, 2.0), 0, 0.1).tolist() == [[1.0, 2.0]]
    assert set(TOY_LOSSES) == {"monge", "saddle", "bowl"}
