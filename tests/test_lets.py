"""LETS: the hypergradient of the squared train/validation gap against finite differences of real
steps, the estimators' signs, the update of rho, and the training-loop contract."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_batch, make_closure, make_mlp, state_equal

from flatminima import ESAM, LETS, SAM, MongeSAM
from flatminima.optim import ASAM


def tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    xv = torch.randn(16, 5, generator=g, dtype=torch.float64) * 1.5
    yv = torch.randint(0, 3, (16,), generator=g)
    return x, y, xv, yv


def closures(model, x, y, xv, yv):
    def closure(select=None):
        xb, yb = (x, y) if select is None else (x[select], y[select])
        return F.cross_entropy(model(xb), yb, reduction="none")

    def val_closure():
        loss = F.cross_entropy(model(xv), yv)
        loss.backward()
        return loss

    return closure, val_closure


RULES = {
    "sam": lambda p, rho: SAM(p, torch.optim.SGD, rho=rho, lr=0.5),
    "asam": lambda p, rho: ASAM(p, torch.optim.SGD, rho=rho, lr=0.5),
    "monge": lambda p, rho: MongeSAM(p, torch.optim.SGD, rho=rho, alpha=2.0, lr=0.5),
    "esam-masks": lambda p, rho: ESAM(p, torch.optim.SGD, rho=rho, beta=0.5, gamma=1.0, seed=4, lr=0.5),
    "sgd-momentum-nesterov": lambda p, rho: SAM(
        p, torch.optim.SGD, rho=rho, lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
}


def objective_after_step(make, rho, seed):
    """F(rho) = 1/2 (L_val - L_tr)^2 at the weights after one real step with radius rho."""
    model = tiny(seed)
    x, y, xv, yv = data(seed + 1)
    opt = make(model.parameters(), rho)
    closure, _ = closures(model, x, y, xv, yv)
    opt.step(closure)
    with torch.no_grad():
        gap = F.cross_entropy(model(xv), yv) - F.cross_entropy(model(x), y)
    return 0.5 * float(gap) ** 2


def lets_hypergradient(make, rho, seed, estimator):
    model = tiny(seed)
    x, y, xv, yv = data(seed + 1)
    opt = make(model.parameters(), rho)
    closure, val_closure = closures(model, x, y, xv, yv)
    lets = LETS(opt, val_closure, lr=0.0, estimator=estimator)
    lets.step(closure)
    return lets.stats["hypergrad"]


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_hypergradient_equals_a_central_difference_of_real_steps(rule, seed):
    make, rho, h = RULES[rule], 0.3, 1e-5
    fd = (objective_after_step(make, rho + h, seed) - objective_after_step(make, rho - h, seed)) / (2 * h)
    exact = lets_hypergradient(make, rho, seed, "exact")
    assert abs(fd) > 1e-7  # the test has teeth
    assert exact == pytest.approx(fd, rel=1e-3)


@pytest.mark.parametrize("estimator", ["secant", "diagonal"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cheap_estimators_have_the_sign_of_the_true_hypergradient(estimator, seed):
    make, rho, h = RULES["sam"], 0.3, 1e-5
    fd = (objective_after_step(make, rho + h, seed) - objective_after_step(make, rho - h, seed)) / (2 * h)
    est = lets_hypergradient(make, rho, seed, estimator)
    assert est * fd > 0


def test_secant_is_exact_on_a_quadratic():
    """L_tr = 1/2 w^T A w - b^T w: (g_s - g) / rho = A d exactly, so secant == exact."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    a = a @ a.T + torch.eye(6, dtype=torch.float64)
    b, c = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    results = {}
    for estimator in ("secant", "exact"):
        w = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
        opt = SAM([w], torch.optim.SGD, rho=0.2, lr=0.05)

        def closure(select=None, w=w):
            return (0.5 * w @ a @ w - b @ w).reshape(1)

        def val_closure(w=w):
            loss = 0.5 * w @ a @ w - c @ w + 0.3 * (w**3).sum()
            loss.backward()
            return loss

        lets = LETS(opt, val_closure, lr=0.0, estimator=estimator)
        lets.step(closure)
        results[estimator] = lets.stats["hypergrad"]
    assert results["secant"] == pytest.approx(results["exact"], rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_update_lowers_the_objective_of_the_step(seed):
    """rho moves toward a smaller train/validation gap: F(rho_new) < F(rho_old) from the same w."""
    make, rho = RULES["sam"], 0.3
    model = tiny(seed)
    x, y, xv, yv = data(seed + 1)
    opt = make(model.parameters(), rho)
    closure, val_closure = closures(model, x, y, xv, yv)
    lets = LETS(opt, val_closure, lr=0.2, update="sgd", estimator="exact")
    # a "sgd" update of log rho by lr * rho * dF/drho: scale lr so the step is 5 % of log rho
    grad = lets_hypergradient(make, rho, seed, "exact")
    lets.lr = 0.05 / abs(rho * grad)
    lets.step(closure)
    new_rho = lets.rho[0]
    assert new_rho != rho and (new_rho < rho) == (grad > 0)
    assert objective_after_step(make, new_rho, seed) < objective_after_step(make, rho, seed)


def test_lr_zero_trains_exactly_like_the_wrapped_optimizer_with_bn_and_dropout():
    model_a = make_mlp(bn=True, dropout=0.3)
    model_b = copy.deepcopy(model_a)
    xv, yv = make_batch(seed=100)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    lets = LETS(opt_a, make_closure(model_a, xv, yv), lr=0.0)
    torch.manual_seed(0)
    for i in range(6):
        lets.step(make_closure(model_a, *make_batch(seed=i)))
    torch.manual_seed(0)
    for i in range(6):
        opt_b.step(make_closure(model_b, *make_batch(seed=i)))
    assert state_equal(model_a, model_b)  # weights and BatchNorm statistics
    assert lets.stats["lets_updates"] == 6.0 and lets.rho == [0.1]


def test_every_per_group_clamp_and_history():
    model = make_mlp(bn=False, dropout=0.0)
    groups = [
        {"params": list(model[0].parameters()), "rho": 0.05},
        {"params": [p for m in list(model)[1:] for p in m.parameters()], "rho": 0.2},
    ]
    opt = SAM(groups, torch.optim.SGD, lr=0.1)
    xv, yv = make_batch(seed=50)
    lets = LETS(opt, make_closure(model, xv, yv), lr=0.5, every=3, rho_min=0.04, rho_max=0.21)
    seen = []
    for i in range(7):
        lets.step(make_closure(model, *make_batch(seed=i)))
        seen.append(tuple(lets.rho))
    assert [s for s, _ in lets.history] == [1, 4, 7]
    assert seen[1] == seen[0] and seen[2] == seen[0] and seen[4] == seen[3]
    for r in seen:  # shared factor (until a clamp binds) and clamping
        assert 0.04 <= r[0] <= 0.21 and 0.04 <= r[1] <= 0.21
    ratio0 = seen[0][1] / seen[0][0]
    assert ratio0 == pytest.approx(0.2 / 0.05) or 0.04 in seen[0] or 0.21 in seen[0]
    per = LETS(SAM(copy.deepcopy(groups), torch.optim.SGD, lr=0.1), make_closure(model, xv, yv),
               per_group=True)
    assert len(per._m) == 2


def test_resume_is_identical_including_the_learned_rho():
    def run(steps, resume_at=None):
        model = make_mlp(bn=True, dropout=0.2)
        xv, yv = make_batch(seed=77)

        def build(m):
            sam = SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
            return LETS(sam, make_closure(m, xv, yv), lr=0.1, every=2)

        lets = build(model)
        torch.manual_seed(3)
        for i in range(steps):
            if i == resume_at:
                ckpt = copy.deepcopy({"m": model.state_dict(), "o": lets.state_dict(),
                                      "rng": torch.get_rng_state()})
                model = make_mlp(bn=True, dropout=0.2, seed=9)
                lets = build(model)
                model.load_state_dict(ckpt["m"])
                lets.load_state_dict(ckpt["o"])
                torch.set_rng_state(ckpt["rng"])
            lets.step(make_closure(model, *make_batch(seed=i)))
        return model, lets

    (m1, l1), (m2, l2) = run(10), run(10, resume_at=5)
    assert state_equal(m1, m2)
    assert l1.rho == l2.rho and l1.rho != [0.1]
    assert l1.history == l2.history


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": -1.0}, ValueError, "lr: -1.0"),
        ({"every": 0}, ValueError, "every: 0"),
        ({"estimator": "hutchinson"}, ValueError, "estimator: 'hutchinson'"),
        ({"update": "rmsprop"}, ValueError, "update: 'rmsprop'"),
        ({"rho_min": 0.0}, ValueError, "rho_min: 0.0"),
        ({"rho_min": 0.1, "rho_max": 0.05}, ValueError, "rho_max: 0.05"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]: 1.0"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(kwargs, error, match):
    model = tiny()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(error, match=match):
        LETS(opt, lambda: None, **kwargs)


def test_bad_pairings_are_refused_early():
    model = tiny()
    with pytest.raises(TypeError, match="SAM-family"):
        LETS(torch.optim.SGD(model.parameters(), lr=0.1), lambda: None)
    with pytest.raises(ValueError, match="rho > 0"):
        LETS(SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1), lambda: None)
    x, y, xv, yv = data()
    lets = LETS(SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1),
                closures(model, x, y, xv, yv)[1], estimator="exact")
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="per-sample closure"):
        lets.step(make_closure(model, x, y))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def _one_lets_step(per_sample, scaler):
    model = tiny()
    x, y, xv, yv = data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.5)

    def scaled(loss):
        return scaler.scale(loss) if scaler is not None else loss

    def closure(select=None):
        return F.cross_entropy(model(x), y, reduction="none")

    def standard():
        loss = F.cross_entropy(model(x), y)
        scaled(loss).backward()
        return loss

    def val_closure():
        loss = F.cross_entropy(model(xv), yv)
        scaled(loss).backward()
        return loss

    lets = LETS(opt, val_closure, lr=0.1)
    lets.step(closure if per_sample else standard, scaler=scaler)
    return lets.stats["hypergrad"], lets.rho[0]


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "standard"])
def test_grad_scaler_gives_the_unscaled_hypergradient(per_sample):
    """A power-of-two loss scale is exact: the same hypergradient and rho with and without it."""
    plain = _one_lets_step(per_sample, None)
    scaled = _one_lets_step(per_sample, torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert scaled[0] == pytest.approx(plain[0], rel=1e-9)
    assert scaled[1] == pytest.approx(plain[1], rel=1e-12)
