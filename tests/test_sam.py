"""The SAM-family optimizers against hand-computed steps and against torch.optim."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_batch, make_closure, make_mlp, state_equal
from _helpers import make_closure as _closure
from hypothesis import given, settings
from hypothesis import strategies as st

import flatminima
from flatminima import ASAM, SAM, MongeSAM

RULES = [
    pytest.param(lambda p, b, **kw: SAM(p, b, **kw), id="sam"),
    pytest.param(lambda p, b, **kw: ASAM(p, b, **kw), id="asam"),
    pytest.param(lambda p, b, **kw: MongeSAM(p, b, alpha=3.0, **kw), id="msam"),
]
BASES = [
    pytest.param(
        torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4), id="sgd"
    ),
    pytest.param(torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2), id="adamw"),
]


# ---------------------------------------------------------------- one step against a hand computation
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("which", ["sam", "asam", "msam"])
def test_one_step_on_quadratic_equals_hand_computed(which, foreach):
    torch.manual_seed(0)
    n = 6
    q = torch.randn(n, n, dtype=torch.float64)
    A = q @ q.T + torch.eye(n, dtype=torch.float64)
    w0 = torch.randn(n, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    lr, rho, eta, alpha = 0.05, 0.3, 0.1, 2.0
    named = [("layer.weight", w)]
    if which == "sam":
        opt = SAM(named, torch.optim.SGD, rho=rho, lr=lr, foreach=foreach)
    elif which == "asam":
        opt = ASAM(named, torch.optim.SGD, rho=rho, eta=eta, lr=lr, foreach=foreach)
    else:
        opt = MongeSAM(named, torch.optim.SGD, rho=rho, alpha=alpha, lr=lr, foreach=foreach)

    seen = []

    def closure():
        seen.append(w.detach().clone())
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    loss = opt.step(closure)
    # Hand computation.
    g = A @ w0
    if which == "sam":
        e = rho * g / g.norm()
    elif which == "asam":
        t = w0.abs() + eta
        e = rho * t * t * g / (t * g).norm()
    else:
        e = rho * g / (g.norm() * math.sqrt(1 + alpha**2 * float(g.norm()) ** 2))
    g_adv = A @ (w0 + e)
    expected = w0 - lr * g_adv
    torch.testing.assert_close(w.detach(), expected, rtol=1e-13, atol=1e-15)
    assert torch.equal(seen[0], w0)
    torch.testing.assert_close(seen[1], w0 + e, rtol=1e-14, atol=1e-15)
    assert float(loss.detach()) == pytest.approx(float(0.5 * w0 @ A @ w0), rel=1e-14)
    s = opt.stats
    assert s["loss_adv"] == pytest.approx(float(0.5 * (w0 + e) @ A @ (w0 + e)), rel=1e-12)
    assert s["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert s["perturbation_norm"] == pytest.approx(float(e.norm()), rel=1e-12)
    assert s["adv_grad_norm"] == pytest.approx(float(g_adv.norm()), rel=1e-12)
    cos = float(g @ g_adv / (g.norm() * g_adv.norm()))
    assert s["cos"] == pytest.approx(cos, abs=1e-9)
    assert s["sharpness"] == pytest.approx(s["loss_adv"] - s["loss"])
    assert s["rho"] == rho and s["step"] == 1.0


# ---------------------------------------------------------------- rho = 0 is the base optimizer
@pytest.mark.parametrize("make", RULES)
@pytest.mark.parametrize("base_cls, base_kw", BASES)
def test_rho_zero_trains_bit_identically_to_base_with_dropout_and_bn(make, base_cls, base_kw):
    model_a = make_mlp(bn=True, dropout=0.3)
    model_b = copy.deepcopy(model_a)
    opt_a = make(model_a.parameters(), base_cls, rho=0.0, **base_kw)
    opt_b = base_cls(model_b.parameters(), **base_kw)
    torch.manual_seed(123)
    for i in range(20):
        x, y = make_batch(seed=i)
        opt_a.step(_closure(model_a, x, y))
    torch.manual_seed(123)
    for i in range(20):
        x, y = make_batch(seed=i)
        opt_b.zero_grad()
        F.cross_entropy(model_b(x), y).backward()
        opt_b.step()
    assert state_equal(model_a, model_b)
    sa, sb = opt_a.base_optimizer.state_dict()["state"], opt_b.state_dict()["state"]
    assert all(torch.equal(sa[k][n], sb[k][n]) for k in sb for n in sb[k])
    # The global RNG stream advanced exactly as with the base optimizer.
    assert opt_a.stats["perturbation_norm"] == 0.0


# ---------------------------------------------------------------- exact restore, BN, dropout
def test_weights_restored_bit_for_bit():
    model = make_mlp(bn=True, dropout=0.0)
    w0 = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)  # lr = 0: step changes nothing
    x, y = make_batch()
    opt.step(_closure(model, x, y))
    for k, v in model.named_parameters():
        assert torch.equal(v, w0[k]), k
    assert opt.stats["perturbation_norm"] == pytest.approx(0.5, rel=1e-6)
    # Manual API: first_step moves the weights, cancel_step puts them back exactly.
    _closure(model, x, y)()
    opt.first_step()
    assert not torch.equal(model[0].weight, w0["0.weight"])
    opt.cancel_step()
    assert all(torch.equal(v, w0[k]) for k, v in model.named_parameters())
    assert opt.state_dict()["flatminima"]["step"] == 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_statistics_come_from_the_clean_pass_only(momentum):
    model = make_mlp(bn=True, dropout=0.0)
    model[1].momentum = momentum
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=1.0, lr=0.1)
    x, y = make_batch()
    with torch.no_grad():
        reference(x)  # one clean forward in train mode
    opt.step(_closure(model, x, y))
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    # Without the guard, the perturbed pass moves them (so the test above can fail).
    model2 = make_mlp(bn=True, dropout=0.0)
    model2[1].momentum = momentum
    opt2 = SAM(model2.parameters(), torch.optim.SGD, rho=1.0, lr=0.1, restore_running_stats=False)
    opt2.step(_closure(model2, x, y))
    assert int(model2[1].num_batches_tracked) == 2
    assert not torch.equal(model2[1].running_mean, ref.running_mean)


def test_second_pass_sees_the_same_dropout_masks_and_rng_continues():
    model = make_mlp(bn=False, dropout=0.5)
    masks = []
    model[2].register_forward_hook(lambda m, i, o: masks.append((o != 0) | (i[0] == 0)))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    x, y = make_batch()
    torch.manual_seed(7)
    opt.step(_closure(model, x, y))
    after_sam = torch.rand(5)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    assert masks[0].float().mean() < 0.9  # dropout did drop
    # The RNG stream after the step is the one after a single forward.
    torch.manual_seed(7)
    model(x)
    assert torch.equal(torch.rand(5), after_sam)
    # replay_rng=False draws a new mask in the second pass.
    masks.clear()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, replay_rng=False)
    opt.step(_closure(model, x, y))
    assert not torch.equal(masks[0], masks[1])


# ---------------------------------------------------------------- API: groups, schedulers, base
def test_param_groups_shared_with_base_and_schedulers_work_on_either():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    assert opt.defaults["lr"] == 0.1 and opt.defaults["rho"] == 0.05
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batch()
    opt.step(_closure(model, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    sched_b = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    opt.step(_closure(model, x, y))
    sched_b.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert "momentum_buffer" in opt.state[model[0].weight]


def test_wrapping_an_instance_equals_building_from_the_class():
    model_a, x_y = make_mlp(dropout=0.0), make_batch()
    model_b = copy.deepcopy(model_a)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    opt_b = SAM(base=torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9), rho=0.2)
    assert opt_b.param_groups[0]["rho"] == 0.2
    for _ in range(3):
        opt_a.step(_closure(model_a, *x_y))
        opt_b.step(_closure(model_b, *x_y))
    assert state_equal(model_a, model_b)


def test_per_group_rho_with_one_global_norm():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = SAM([{"params": [a], "rho": 0.3}, {"params": [b]}], torch.optim.SGD, rho=0.1, lr=0.1)
    a0, b0 = a.detach().clone(), b.detach().clone()
    (a.pow(3).sum() + (a.sum() * b).pow(2).sum()).backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    n = torch.cat([ga, gb]).norm()
    opt.first_step()
    torch.testing.assert_close(a.detach() - a0, 0.3 * ga / n, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(b.detach() - b0, 0.1 * gb / n, rtol=1e-12, atol=1e-15)
    e_norm = float(torch.cat([0.3 * ga, 0.1 * gb]).norm() / n)
    assert opt.stats["perturbation_norm"] == pytest.approx(e_norm, rel=1e-12)
    opt.cancel_step()


def test_add_param_group_reaches_the_base_with_rule_defaults():
    model = make_mlp()
    extra = torch.nn.Parameter(torch.randn(3))
    opt = MongeSAM(list(model.parameters()), torch.optim.SGD, rho=0.05, alpha=2.0, lr=0.1)
    opt.add_param_group({"params": [extra], "rho": 0.2})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["alpha"] == 2.0 and opt.param_groups[1]["lr"] == 0.1
    with pytest.raises(ValueError, match="-1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "rho": -1.0})


def test_parameters_without_gradients_are_skipped():
    model = make_mlp(bn=False, dropout=0.0)
    unused = torch.nn.Parameter(torch.randn(5))
    u0 = unused.detach().clone()
    opt = SAM([*model.parameters(), unused], torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt.step(_closure(model, *make_batch()))
    assert torch.equal(unused, u0) and unused not in opt.state


# ---------------------------------------------------------------- ASAM specifics
def test_asam_scope_selects_tensors_by_name_or_dims():
    model = make_mlp(bn=True, dropout=0.0)
    named = list(model.named_parameters())
    by_name = [ASAM.is_adaptive(p, n, "weights") for n, p in named]
    by_dims = [ASAM.is_adaptive(p, None, "weights") for _, p in named]
    assert by_name == [n.endswith("weight") for n, _ in named]  # BN gamma included
    assert by_dims == [p.dim() >= 2 for _, p in named]  # BN gamma excluded
    assert all(ASAM.is_adaptive(p, n, "all") for n, p in named)
    opt = ASAM(named, torch.optim.SGD, lr=0.1)
    assert opt.param_groups[0]["param_names"][0] == "0.weight"
    assert opt.param_groups[0]["eta"] == 0.01 and opt.param_groups[0]["rho"] == 0.5


def test_asam_perturbed_gradient_is_invariant_to_relu_rescaling():
    torch.manual_seed(0)
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randn(20, 2, dtype=torch.float64)
    l1 = torch.nn.Linear(4, 8).double()
    l2 = torch.nn.Linear(8, 2).double()
    c = 3.7

    def run(rule, scale):
        m1, m2 = copy.deepcopy(l1), copy.deepcopy(l2)
        with torch.no_grad():
            m1.weight.mul_(scale)
            m1.bias.mul_(scale)
            m2.weight.div_(scale)
        model = torch.nn.Sequential(m1, torch.nn.ReLU(), m2)
        opt = rule(model.named_parameters())
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.first_step(loss=loss)
        loss_adv = F.mse_loss(model(x), y)
        loss_adv.backward()
        g_adv = [p.grad.clone() for p in model.parameters()]
        opt.second_step(loss=loss_adv)
        return float(loss.detach()), float(loss_adv.detach()), g_adv

    def asam(p):
        return ASAM(p, torch.optim.SGD, rho=0.5, eta=0.0, scope="all", lr=0.0)

    def sam(p):
        return SAM(p, torch.optim.SGD, rho=0.5, lr=0.0)

    l_a, la_a, g_a = run(asam, 1.0)
    l_b, la_b, g_b = run(asam, c)
    assert l_b == pytest.approx(l_a, rel=1e-12)
    assert la_b == pytest.approx(la_a, rel=1e-10)
    # g_adv transforms covariantly: dL/d(c W1) = (1/c) dL/dW1, dL/d(W2/c) = c dL/dW2.
    for got, ref, s in zip(g_b, g_a, [1 / c, 1 / c, c, 1.0]):
        torch.testing.assert_close(got, ref * s, rtol=1e-9, atol=1e-12)
    # SAM is not invariant: the same rescaling changes its perturbed loss.
    _, ls_a, _ = run(sam, 1.0)
    _, ls_b, _ = run(sam, c)
    assert abs(ls_b - ls_a) > 1e-3 * abs(ls_a)


# ---------------------------------------------------------------- accumulation and clipping
def test_gradient_accumulation_inside_the_closure_equals_the_full_batch():
    model_a = make_mlp(bn=False, dropout=0.0, dtype=torch.float64)
    model_b = copy.deepcopy(model_a)
    x, y = make_batch(n=32, dtype=torch.float64)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    def accumulated():
        total = 0.0
        for xb, yb in zip(x.chunk(4), y.chunk(4)):
            loss = F.cross_entropy(model_b(xb), yb) / 4
            loss.backward()
            total += loss.detach()
        return total

    for _ in range(3):
        la = opt_a.step(_closure(model_a, x, y))
        lb = opt_b.step(accumulated)
        assert float(lb) == pytest.approx(float(la.detach()), rel=1e-12)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-11, atol=1e-13)


def test_clipping_applies_to_the_final_second_pass_gradient():
    model = make_mlp(bn=False, dropout=0.0, dtype=torch.float64)
    ref = copy.deepcopy(model)
    x, y = make_batch(dtype=torch.float64)
    max_norm, lr, rho = 0.05, 0.5, 0.2
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, max_grad_norm=max_norm)
    opt.step(_closure(model, x, y))
    # Reference by hand: g at w, e, g_adv at w + e, clip g_adv, SGD step from w.
    params = list(ref.parameters())
    w0 = [p.detach().clone() for p in params]
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    n = torch.cat([t.reshape(-1) for t in g]).norm()
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(rho * gi / n)
    g_adv = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    n_adv = torch.cat([t.reshape(-1) for t in g_adv]).norm()
    assert n_adv > max_norm  # the clip is active
    coef = max_norm / (n_adv + 1e-6)  # torch.nn.utils.clip_grad_norm_'s convention
    for p, w, ga in zip(model.parameters(), w0, g_adv):
        torch.testing.assert_close(p.detach(), w - lr * ga * coef, rtol=1e-12, atol=1e-14)
    assert opt.stats["adv_grad_norm"] == pytest.approx(float(n_adv), rel=1e-10)


def test_manual_loop_with_clipping_between_the_passes_matches_the_closure_api():
    model_a = make_mlp(bn=True, dropout=0.0)
    model_b = copy.deepcopy(model_a)
    x, y = make_batch()
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, max_grad_norm=0.1)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for _ in range(3):
        opt_a.step(_closure(model_a, x, y))
        opt_b.zero_grad()
        F.cross_entropy(model_b(x), y).backward()
        opt_b.first_step()
        F.cross_entropy(model_b(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.1)
        opt_b.second_step()
    assert state_equal(model_a, model_b)  # BN statistics protected in the manual loop too


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-0.1), "-0.1"),
        (dict(rho=float("nan")), "nan"),
        (dict(rho="0.1"), "'0.1'"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(eps=-1.0), "eps"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_rule_specific_hyperparameters_are_validated():
    params = list(make_mlp().parameters())
    with pytest.raises(ValueError, match="eta.*-0.5"):
        ASAM(params, torch.optim.SGD, eta=-0.5, lr=0.1)
    with pytest.raises(ValueError, match="scope.*'bias'"):
        ASAM(params, torch.optim.SGD, scope="bias", lr=0.1)
    with pytest.raises(ValueError, match="alpha.*inf"):
        MongeSAM(params, torch.optim.SGD, alpha=float("inf"), lr=0.1)
    with pytest.raises(ValueError, match="-0.2"):
        SAM([{"params": params, "rho": -0.2}], torch.optim.SGD, lr=0.1)


def test_construction_errors_are_clear():
    params = list(make_mlp().parameters())
    base = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(TypeError, match="base="):
        SAM(params, base)
    with pytest.raises(ValueError, match="not both"):
        SAM(params, base=base)
    with pytest.raises(TypeError, match="base_optimizer is required"):
        SAM(params)
    with pytest.raises(TypeError, match="already a SAM-family"):
        SAM(base=SAM(params, torch.optim.SGD, lr=0.1))
    with pytest.raises(TypeError, match="Optimizer subclass"):
        SAM(params, dict)


def _poisoned(model, x, y, bad_call, value=float("nan"), returns_none=False):
    calls = [0]

    def closure():
        calls[0] += 1
        loss = F.cross_entropy(model(x), y)
        if calls[0] == bad_call:
            if returns_none:
                loss.backward()
                return None
            loss = loss * value
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize(
    "bad_call, returns_none, error",
    [
        (1, False, FloatingPointError),
        (2, False, FloatingPointError),
        (1, True, TypeError),
        (2, True, TypeError),
    ],
)
def test_bad_closure_raises_and_leaves_weights_and_base_untouched(bad_call, returns_none, error):
    model = make_mlp(bn=True, dropout=0.0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    x, y = make_batch()
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(error):
        opt.step(_poisoned(model, x, y, bad_call, returns_none=returns_none))
    assert all(torch.equal(v, w0[k]) for k, v in model.named_parameters())
    assert len(opt.state) == 0  # the base optimizer did not step
    assert int(model[1].num_batches_tracked) == 1  # only the clean pass counted
    opt.step(_closure(model, x, y))  # and the optimizer is usable afterwards
    assert opt.stats["step"] == 1.0


def test_exception_inside_the_second_pass_restores_weights_and_statistics():
    model = make_mlp(bn=True, dropout=0.0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = make_batch()
    w0 = copy.deepcopy(model.state_dict())
    calls = [0]

    def closure():
        calls[0] += 1
        out = model(x)
        if calls[0] == 2:
            raise KeyError("boom")
        loss = F.cross_entropy(out, y)
        loss.backward()
        return loss

    with pytest.raises(KeyError, match="boom"):
        opt.step(closure)
    ref = make_mlp(bn=True, dropout=0.0)
    ref.load_state_dict(w0)
    with torch.no_grad():
        ref(x)
    assert state_equal(model, ref)  # weights from before, BN statistics of the clean pass


def test_step_without_closure_and_misordered_manual_calls():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="without a pending first_step"):
        opt.second_step()
    _closure(model, *make_batch())()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError):
        opt.state_dict()
    opt.cancel_step()


def test_sparse_gradients_give_a_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    w0 = emb.weight.detach().clone()
    opt = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(closure)
    assert torch.equal(emb.weight, w0)


def test_non_scalar_loss_is_rejected():
    model = make_mlp(bn=False, dropout=0.0)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = make_batch()

    def closure():
        loss = F.cross_entropy(model(x), y, reduction="none")
        loss.mean().backward()
        return loss

    with pytest.raises(ValueError, match=r"scalar loss.*\(32,\)"):
        opt.step(closure)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("make", RULES)
@pytest.mark.parametrize("base_cls, base_kw", BASES)
def test_resume_from_checkpoint_is_identical_to_an_uninterrupted_run(make, base_cls, base_kw):
    import io

    def train(model, opt, steps):
        for i in steps:
            x, y = make_batch(seed=i)
            opt.step(_closure(model, x, y))

    model_a = make_mlp(bn=True, dropout=0.0)
    model_b = copy.deepcopy(model_a)
    opt_a = make(model_a.parameters(), base_cls, rho=0.05, **base_kw)
    train(model_a, opt_a, range(10))

    opt_b = make(model_b.parameters(), base_cls, rho=0.05, **base_kw)
    train(model_b, opt_b, range(5))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    sd = opt_b.state_dict()
    assert sd["state"] and sd["flatminima"]["step"] == 5 and sd["param_groups"][0]["rho"] == 0.05
    # Exactly the base optimizer's per-parameter state: no copy of the weights between steps.
    assert all(set(v) == set(opt_a.base_optimizer.state_dict()["state"][k]) for k, v in sd["state"].items())
    assert opt_b._pending is None
    del model_b, opt_b
    buf.seek(0)
    ckpt = torch.load(buf)
    model_c = make_mlp(bn=True, dropout=0.0, seed=99)  # different init, overwritten by the load
    opt_c = make(model_c.parameters(), base_cls, rho=0.3, **base_kw)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.param_groups[0]["rho"] == 0.05  # the checkpoint's rho
    assert opt_c.param_groups is opt_c.base_optimizer.param_groups
    train(model_c, opt_c, range(5, 10))
    assert state_equal(model_a, model_c)
    assert opt_c.stats["step"] == 10.0


def test_loading_a_plain_base_optimizer_checkpoint_keeps_the_rule_defaults():
    model_a = make_mlp(dropout=0.0)
    model_b = copy.deepcopy(model_a)
    sgd = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9)
    sgd.step(make_closure(model_a, *make_batch()))  # torch optimizers accept a closure too
    sam = SAM(model_b.parameters(), torch.optim.SGD, rho=0.07, lr=0.5, momentum=0.5)
    model_b.load_state_dict(model_a.state_dict())
    sam.load_state_dict(sgd.state_dict())
    g = sam.param_groups[0]
    assert (g["lr"], g["momentum"], g["rho"]) == (0.1, 0.9, 0.07)
    buf_a = sgd.state[model_a[0].weight]["momentum_buffer"]
    assert torch.equal(sam.state[model_b[0].weight]["momentum_buffer"], buf_a)
    sam.step(make_closure(model_b, *make_batch()))
    assert sam.stats["step"] == 1.0


def test_deepcopy_keeps_the_base_optimizer():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.step(_closure(model, *make_batch()))
    clone = copy.deepcopy(opt)
    assert clone.param_groups is clone.base_optimizer.param_groups
    assert clone.base_optimizer is not opt.base_optimizer


# ---------------------------------------------------------------- registry
def test_registry_builds_the_right_objects():
    names = flatminima.list_optimizers()
    for n in ("sgd", "adamw", "sam_sgd", "asam_sgd", "msam_adamw"):
        assert n in names
    params = list(make_mlp().parameters())
    opt = flatminima.create("msam_adamw", params, lr=1e-3, rho=0.1, alpha=0.5, weight_decay=0.1)
    assert isinstance(opt, MongeSAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["rho"], g["alpha"], g["lr"], g["weight_decay"]) == (0.1, 0.5, 1e-3, 0.1)
    assert type(flatminima.create("sgd", params, lr=0.1)) is torch.optim.SGD
    info = flatminima.optimizer_info("asam_sgd")
    assert (info.passes, info.needs_closure, info.family, info.base) == (2, True, "asam", "sgd")
    base_info = flatminima.optimizer_info("adamw")
    assert (base_info.passes, base_info.needs_closure) == (1, False)
    assert [i.name for i in flatminima.list_optimizers("sam_*", with_info=True)][0] == "sam_adagrad"
    with pytest.raises(KeyError, match="unknown optimizer"):
        flatminima.create("sam_lion", params)


# ---------------------------------------------------------------- property: engine == closed form
@settings(max_examples=30, deadline=None)
@given(
    rhos=st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.5, 2.0]), min_size=1, max_size=4),
    alphas=st.lists(st.sampled_from([0.0, 0.3, 1.0, 4.0]), min_size=4, max_size=4),
    which=st.sampled_from(["sam", "msam"]),
    foreach=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_engine_displacement_equals_the_closed_form_for_any_groups(rhos, alphas, which, foreach, seed):
    g = torch.Generator().manual_seed(seed)
    groups, params = [], []
    for i, rho in enumerate(rhos):
        ps = [torch.nn.Parameter(torch.randn(1 + i, 3, generator=g, dtype=torch.float64)) for _ in range(2)]
        groups.append({"params": ps, "rho": rho, "alpha": alphas[i]})
        params += [(p, rho, alphas[i]) for p in ps]
    if which == "sam":
        for grp in groups:
            grp.pop("alpha")
        opt = SAM(groups, torch.optim.SGD, lr=0.1, foreach=foreach)
    else:
        opt = MongeSAM(groups, torch.optim.SGD, lr=0.1, foreach=foreach)
    w0 = [p.detach().clone() for p, _, _ in params]
    for p, _, _ in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    grads = [p.grad.clone() for p, _, _ in params]
    n = float(torch.cat([t.reshape(-1) for t in grads]).norm())
    opt.first_step()
    expected_sq = 0.0
    for (p, rho, alpha), w, gr in zip(params, w0, grads):
        a = alpha if which == "msam" else 0.0
        e = rho * gr / (n * math.sqrt(1 + a * a * n * n))
        expected_sq += float(e.pow(2).sum())
        torch.testing.assert_close(p.detach() - w, e, rtol=1e-10, atol=1e-13)
    assert opt.stats["perturbation_norm"] == pytest.approx(math.sqrt(expected_sq), rel=1e-10, abs=1e-14)
    opt.cancel_step()
    assert all(torch.equal(p, w) for (p, _, _), w in zip(params, w0))
