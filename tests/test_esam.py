"""ESAM: stochastic weight perturbation, sharpness-sensitive data selection, and the SAM contract."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_batch, make_closure, make_mlp, state_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import flatminima
from flatminima import ESAM, SAM, MongeSAM
from flatminima.optim import ASAM, num_selected, select_top


def sample_closure(model, x, y, calls=None):
    """The per-sample closure; records the ``select`` argument of each call in ``calls``."""

    def closure(select=None):
        if calls is not None:
            calls.append(None if select is None else select.clone())
        xb, yb = (x, y) if select is None else (x[select], y[select])
        return F.cross_entropy(model(xb), yb, reduction="none")

    return closure


def mean_closure(model, x, y):
    """A standard closure whose loss is the mean of the per-sample losses (same ops as above)."""

    def closure():
        loss = F.cross_entropy(model(x), y, reduction="none").mean()
        loss.backward()
        return loss

    return closure


def tiny_model(dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7, bias=bias), torch.nn.Tanh(), torch.nn.Linear(7, 3, bias=bias)
    ).to(dtype)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 0.0}, "beta: 0.0"),
        ({"beta": -0.5}, "beta: -0.5"),
        ({"beta": 1.5}, "beta: 1.5"),
        ({"beta": float("nan")}, "beta: nan"),
        ({"beta": True}, "beta: True"),
        ({"gamma": 0}, "gamma: 0"),
        ({"gamma": 2.0}, "gamma: 2.0"),
        ({"gamma": "half"}, "gamma: 'half'"),
        ({"rho": -0.1}, "rho: -0.1"),
        ({"swp": "layer"}, "swp: 'layer'"),
        ({"perturbation": "fisher"}, "perturbation: 'fisher'"),
        ({"perturbation": "monge", "alpha": -1.0}, "alpha: -1.0"),
        ({"perturbation": "asam", "scope": "some"}, "scope: 'some'"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_the_value(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        ESAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_rule_options_and_defaults_reach_the_param_groups():
    model = tiny_model()
    opt = ESAM(model.parameters(), torch.optim.SGD, perturbation="asam", eta=0.0, lr=0.1)
    group = opt.param_groups[0]
    assert (group["rho"], group["eta"], group["scope"]) == (0.5, 0.0, "weights")  # ASAM's radius
    opt = ESAM(model.parameters(), torch.optim.SGD, perturbation="msam", alpha=2.0, lr=0.1)
    group = opt.param_groups[0]
    assert (opt.perturbation, group["alpha"], group["rho"]) == ("monge", 2.0, 0.05)
    with pytest.raises(TypeError, match="eta"):  # an option of another rule goes to the base
        ESAM(model.parameters(), torch.optim.SGD, perturbation="sam", eta=0.1, lr=0.1)


# ----------------------------------------------------------------------------- beta = gamma = 1
SAM_EQUIVALENTS = [
    ({"perturbation": "sam"}, lambda p, **kw: SAM(p, torch.optim.SGD, **kw)),
    ({"perturbation": "asam", "eta": 0.01}, lambda p, **kw: ASAM(p, torch.optim.SGD, **kw)),
    ({"perturbation": "monge", "alpha": 2.0}, lambda p, **kw: MongeSAM(p, torch.optim.SGD, alpha=2.0, **kw)),
]


@pytest.mark.parametrize("rule_kw, make_sam", SAM_EQUIVALENTS, ids=["sam", "asam", "monge"])
@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "standard"])
@pytest.mark.parametrize("swp", ["tensor", "element"])
def test_beta_gamma_one_is_the_sam_optimizer_bit_for_bit(rule_kw, make_sam, per_sample, swp):
    model_a = make_mlp(bn=True, dropout=0.3)
    model_b = copy.deepcopy(model_a)
    kw = {"rho": 0.2, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    opt_a = ESAM(model_a.parameters(), torch.optim.SGD, beta=1.0, gamma=1.0, swp=swp, **rule_kw, **kw)
    opt_b = make_sam(model_b.parameters(), **kw)
    losses_a, losses_b = [], []
    for model, opt, losses in ((model_a, opt_a, losses_a), (model_b, opt_b, losses_b)):
        torch.manual_seed(1)
        for i in range(8):
            x, y = make_batch(seed=i)
            closure = sample_closure(model, x, y) if per_sample else mean_closure(model, x, y)
            losses.append(opt.step(closure))
    assert state_equal(model_a, model_b)
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sb)
    assert opt_a.stats["selected"] == 1.0 and opt_a.stats["swp_kept"] == 1.0
    assert math.isnan(opt_a.stats["delta_mean"])  # no scoring forward ran


def test_a_per_sample_closure_on_sam_equals_the_standard_closure_bit_for_bit():
    model_a = make_mlp(bn=True, dropout=0.3)
    model_b = copy.deepcopy(model_a)
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for model, opt, make in ((model_a, opt_a, sample_closure), (model_b, opt_b, mean_closure)):
        torch.manual_seed(3)
        for i in range(5):
            opt.step(make(model, *make_batch(seed=i)))
    assert state_equal(model_a, model_b)


def test_rho_zero_with_weight_masks_is_the_base_optimizer_exactly():
    """With e = 0 the masks must not disturb anything: the descent gradient is complete."""
    model_a = make_mlp(bn=True, dropout=0.3)
    model_b = copy.deepcopy(model_a)
    opt_a = ESAM(model_a.parameters(), torch.optim.SGD, rho=0.0, beta=0.5, gamma=1.0, lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(5)
    for i in range(8):
        opt_a.step(sample_closure(model_a, *make_batch(seed=i)))
    torch.manual_seed(5)
    for i in range(8):
        opt_b.zero_grad()
        mean_closure(model_b, *make_batch(seed=i))()
        opt_b.step()
    assert state_equal(model_a, model_b)


# ----------------------------------------------------------------------------- SWP
def _fixed_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def _draw_perturbations(opt, model, grads, draws, masked=False):
    """Run first_step on fixed gradients ``draws`` times; return each draw's e as flat tensors."""
    params = list(model.parameters())
    out = []
    for _ in range(draws):
        w0 = [p.detach().clone() for p in params]
        if masked:  # the step's per-tensor path: masked tensors get no gradient
            with opt.masked_first_pass():
                kept = {id(p) for p in params if p.requires_grad}
            for p, g in zip(params, grads):
                p.grad = g.clone() if id(p) in kept else None
        else:
            for p, g in zip(params, grads):
                p.grad = g.clone()
        opt.first_step()
        out.append(torch.cat([(p.detach() - w).reshape(-1) for p, w in zip(params, w0)]))
        opt.cancel_step()
        assert all(torch.equal(p, w) for p, w in zip(params, w0))
    return torch.stack(out)


def test_element_masks_are_exactly_unbiased_for_sam():
    model = tiny_model()
    grads = _fixed_grads(model)
    beta, rho, draws = 0.4, 0.3, 4000
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=rho, beta=beta, swp="element", lr=0.1, seed=0)
    e = _draw_perturbations(opt, model, grads, draws)
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    e_sam = rho * flat_g / flat_g.norm()
    # Every entry of every draw is 0 or e_sam / beta (the rule on the full gradient, rescaled).
    on = e != 0
    torch.testing.assert_close(e[on], (e_sam / beta).expand_as(e)[on], rtol=1e-9, atol=1e-15)
    assert abs(on.double().mean().item() - beta) < 4 * math.sqrt(beta * (1 - beta) / on.numel())
    # Unbiased: the mean over draws is e_sam within 5 standard errors, entry by entry.
    sem = e_sam.abs() * math.sqrt((1 - beta) / beta) / math.sqrt(draws)
    assert ((e.mean(0) - e_sam).abs() <= 5 * sem + 1e-15).all()


@pytest.mark.parametrize("rule, kw", [("asam", {"eta": 0.01}), ("monge", {"alpha": 3.0})])
def test_element_masks_rescale_any_rule_by_one_over_beta(rule, kw):
    model = tiny_model()
    grads = _fixed_grads(model, seed=1)
    beta = 0.5
    ref = ESAM(model.parameters(), torch.optim.SGD, rho=0.3, beta=1.0, perturbation=rule, lr=0.1, **kw)
    e_rule = _draw_perturbations(ref, model, grads, 1)[0]
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.3, beta=beta, swp="element",
               perturbation=rule, lr=0.1, **kw)
    e = _draw_perturbations(opt, model, grads, 50)
    on = e != 0
    torch.testing.assert_close(e[on], (e_rule / beta).expand_as(e)[on], rtol=1e-9, atol=1e-15)


def _tensor_mask_expectation(grads, rho, beta):
    """E[e] of the per-tensor mask by enumerating all 2^T masks (the documented estimator:
    e_t = rho g_t / (beta * ||m g|| / sqrt(beta)) for kept t, e = 0 when nothing is kept)."""
    sq = [float(g.pow(2).sum()) for g in grads]
    expect = [torch.zeros_like(g) for g in grads]
    for mask in itertools.product([0, 1], repeat=len(grads)):
        k = sum(mask)
        if k == 0:
            continue
        prob = beta**k * (1 - beta) ** (len(grads) - k)
        n_hat = math.sqrt(sum(s for s, m in zip(sq, mask) if m) / beta)
        for t, m in enumerate(mask):
            if m:
                expect[t] += prob * rho * grads[t] / (beta * n_hat)
    return torch.cat([e.reshape(-1) for e in expect])


@pytest.mark.parametrize("masked", [True, False], ids=["step-path", "manual-without-mask-context"])
def test_tensor_masks_match_the_enumerated_expectation_and_are_nearly_unbiased(masked):
    model = tiny_model()
    grads = _fixed_grads(model, seed=2)
    beta, rho, draws = 0.5, 0.2, 3000
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=rho, beta=beta, swp="tensor", lr=0.1, seed=3)
    e = _draw_perturbations(opt, model, grads, draws, masked=masked)
    # Each draw: whole tensors on or off, the kept ones rho g / (beta * ||m g|| / sqrt(beta)).
    sizes = [g.numel() for g in grads]
    for row in e[:200]:
        parts = row.split(sizes)
        kept = [bool(p.abs().sum() > 0) for p in parts]
        if any(kept):
            n_hat = math.sqrt(sum(float(g.pow(2).sum()) for g, k in zip(grads, kept) if k) / beta)
            for p, g, k in zip(parts, grads, kept):
                want = rho * g.reshape(-1) / (beta * n_hat) if k else torch.zeros_like(p)
                torch.testing.assert_close(p, want, rtol=1e-10, atol=1e-15)
    exact = _tensor_mask_expectation(grads, rho, beta)
    spread = e.std(0) / math.sqrt(draws)
    assert ((e.mean(0) - exact).abs() <= 5 * spread + 1e-15).all()
    # Against SAM: the ratio bias of 1 / n_hat is a few percent with 4 tensors.
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    e_sam = rho * flat_g / flat_g.norm()
    rel = (exact - e_sam).norm() / e_sam.norm()
    assert rel < 0.25


def test_tensor_mask_bias_shrinks_with_the_number_of_tensors():
    """Equal-norm tensors: E[e_t] / e_sam_t = E[sqrt(beta T / K) | t kept], K ~ 1 + Bin(T-1, beta)."""
    beta = 0.5
    biases = []
    for t in (2, 4, 8, 12):
        grads = [torch.full((3,), 1.0, dtype=torch.float64) for _ in range(t)]
        exact = _tensor_mask_expectation(grads, 1.0, beta)
        flat = torch.cat(grads)
        e_sam = flat / flat.norm()
        biases.append(float((exact / e_sam).mean()) - 1.0)
        closed = sum(
            math.comb(t - 1, j) * beta**j * (1 - beta) ** (t - 1 - j) * math.sqrt(beta * t / (j + 1))
            for j in range(t)
        )
        assert float((exact / e_sam).mean()) == pytest.approx(closed, rel=1e-12)
    assert all(abs(b1) > abs(b2) for b1, b2 in zip(biases, biases[1:]))
    assert abs(biases[-1]) < 0.05


def test_masked_tensors_get_no_weight_gradient_and_no_flops_in_the_first_pass():
    torch.manual_seed(0)
    dims = [16, 32, 32, 32, 8]
    model = torch.nn.Sequential(*[torch.nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:])])
    x, y = torch.randn(64, dims[0]), torch.randint(0, 8, (64,))
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=1.0, lr=0.1, seed=1)
    calls = []

    def closure():
        with FlopCounterMode(display=False) as counter:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        calls.append(([p.grad is not None for p in model.parameters()], counter.get_total_flops()))
        return loss

    saw_partial = False
    for _ in range(6):
        opt.step(closure)
        (kept, flops1), (full, flops2) = calls[-2], calls[-1]
        assert all(full)  # the descent pass computes every gradient
        assert all(p.requires_grad for p in model.parameters())  # restored after the first pass
        layers = list(zip(dims, dims[1:]))
        fwd = sum(2 * 64 * a * b for a, b in layers)
        # input gradients are needed below the topmost kept layer (none for layer 0's input)
        first_kept = min((i for i, k in enumerate(kept) if k), default=len(layers))
        d_input = sum(2 * 64 * a * b for i, (a, b) in enumerate(layers) if i > first_kept)
        d_weight = sum(2 * 64 * a * b for (a, b), k in zip(layers, kept) if k)
        assert flops1 == fwd + d_input + d_weight
        assert flops2 == fwd + sum(2 * 64 * a * b for a, b in layers[1:]) + fwd
        saw_partial |= 0 < sum(kept) < len(kept)
    assert saw_partial


def test_frozen_parameters_stay_frozen_and_unperturbed():
    model = tiny_model(dtype=torch.float32)
    model[0].weight.requires_grad_(False)
    w0 = model[0].weight.detach().clone()
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=0.5, lr=0.1)
    x, y = make_batch(16, seed=0)[0][:, :5], make_batch(16, seed=0)[1]
    for _ in range(6):
        opt.step(sample_closure(model, x, y))
        assert not model[0].weight.requires_grad
        assert all(p.requires_grad for p in list(model.parameters())[1:])
    assert torch.equal(model[0].weight, w0)


def test_nothing_kept_gives_a_zero_perturbation_and_a_normal_step():
    model = tiny_model(dtype=torch.float32)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.5, beta=1e-9, gamma=1.0, lr=0.1)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.step(sample_closure(model, x, y))
    mean_closure(ref, x, y)()
    ref_opt.step()
    assert opt.stats["swp_kept"] == 0.0 and opt.stats["perturbation_norm"] == 0.0
    assert state_equal(model, ref)


# ----------------------------------------------------------------------------- SDS
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=40),
    st.floats(0.001, 1.0),
)
@settings(max_examples=200, deadline=None)
def test_select_top_equals_brute_force_with_deterministic_ties(values, gamma):
    delta = torch.tensor(values, dtype=torch.float64) / 4
    k = num_selected(gamma, len(values))
    brute = sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])
    assert select_top(delta, k).tolist() == brute


@given(st.integers(1, 2000), st.integers(1, 1000))
@settings(max_examples=300, deadline=None)
def test_num_selected_is_ceil_of_the_decimal_fraction_and_at_least_one(batch, permille):
    gamma = permille / 1000
    want = max(1, math.ceil(Fraction(permille, 1000) * batch))
    assert num_selected(gamma, batch) == min(batch, want)


def test_num_selected_edge_cases():
    assert num_selected(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert num_selected(0.01, 32) == 1  # gamma * B < 1 still selects one
    assert num_selected(1.0, 7) == 7
    with pytest.raises(ValueError, match="at least one"):
        num_selected(0.5, 0)


def test_one_sds_step_equals_a_hand_computed_step():
    """beta = 1, gamma = 0.25: e from the full batch, Delta from one forward at w + e, the top-k
    rows' mean-loss gradient at w + e, one SGD step; all recomputed by hand in float64."""
    model = tiny_model()
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(5))
    rho, lr, gamma = 0.5, 0.3, 0.25
    params = [p.detach().clone() for p in model.parameters()]

    def f(ws, rows=None):
        xb, yb = (x, y) if rows is None else (x[rows], y[rows])
        h = torch.tanh(xb @ ws[0].T + ws[1])
        return F.cross_entropy(h @ ws[2].T + ws[3], yb, reduction="none")

    w = [p.clone().requires_grad_(True) for p in params]
    g = torch.autograd.grad(f(w).mean(), w)
    n = torch.sqrt(sum(gi.pow(2).sum() for gi in g))
    w_adv = [(wi + rho * gi / n).detach().requires_grad_(True) for wi, gi in zip(w, g)]
    with torch.no_grad():
        delta = f(w_adv) - f(w)
    k = math.ceil(gamma * 12)
    rows = sorted(sorted(range(12), key=lambda i: (-float(delta[i]), i))[:k])
    g_adv = torch.autograd.grad(f(w_adv, torch.tensor(rows)).mean(), w_adv)
    expected = [wi.detach() - lr * gi for wi, gi in zip(w, g_adv)]

    opt = ESAM(model.parameters(), torch.optim.SGD, rho=rho, beta=1.0, gamma=gamma, lr=lr, eps=0.0)
    calls = []
    loss = opt.step(sample_closure(model, x, y, calls))
    assert [c is None for c in calls] == [True, True, False]
    assert calls[2].tolist() == rows
    assert float(loss) == pytest.approx(float(f(params).mean()), rel=1e-14)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    assert opt.stats["selected"] == k / 12
    assert opt.stats["delta_mean"] == pytest.approx(float(delta.mean()), rel=1e-10)
    with torch.no_grad():
        adv_batch, adv_rows = float(f(w_adv).mean()), float(f(w_adv, torch.tensor(rows)).mean())
    assert opt.stats["loss_adv"] == pytest.approx(adv_batch, rel=1e-12)
    assert opt.stats["loss_selected"] == pytest.approx(adv_rows, rel=1e-12)
    assert opt.stats["sharpness"] == pytest.approx(opt.stats["delta_mean"], rel=1e-9)


def test_tiny_gamma_still_selects_one_sample():
    model = make_mlp(bn=False, dropout=0.0)
    x, y = make_batch(32)
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=1.0, gamma=0.01, lr=0.1)
    calls = []
    opt.step(sample_closure(model, x, y, calls))
    assert calls[2].numel() == 1 and opt.stats["selected"] == 1 / 32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batchnorm_statistics_are_updated_once_from_the_clean_pass():
    model = make_mlp(bn=True, dropout=0.0)
    ref = copy.deepcopy(model)
    x, y = make_batch(32)
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=0.5, lr=0.1)
    opt.step(sample_closure(model, x, y))
    with torch.no_grad():
        ref(x)  # one training-mode forward at w
    bn, bn_ref = model[1], ref[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)


def test_scoring_pass_replays_dropout_so_delta_is_zero_without_perturbation():
    model = make_mlp(bn=True, dropout=0.5)
    x, y = make_batch(32)
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.0, beta=1.0, gamma=0.5, lr=0.1)
    torch.manual_seed(0)
    opt.step(sample_closure(model, x, y))
    assert opt.stats["delta_mean"] == 0.0
    # ... and the global RNG continues as after the first pass only (as with the base optimizer).
    after_esam = torch.rand(3)
    ref = make_mlp(bn=True, dropout=0.5)
    torch.manual_seed(0)
    ref(x)
    assert torch.equal(torch.rand(3), after_esam)


def test_standard_closure_turns_data_selection_off_with_one_warning():
    model = make_mlp(bn=False, dropout=0.0)
    x, y = make_batch(32)
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=1.0, gamma=0.5, lr=0.1)
    with pytest.warns(UserWarning, match="data selection .* is off"):
        opt.step(make_closure(model, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(make_closure(model, x, y))
        ESAM(model.parameters(), torch.optim.SGD, gamma=1.0, lr=0.1).step(make_closure(model, x, y))
    assert opt.stats["selected"] == 1.0


# ----------------------------------------------------------------------------- the SAM contract
@pytest.mark.parametrize("swp", ["tensor", "element"])
def test_resume_from_checkpoint_is_identical_including_the_mask_generator(swp):
    def run(steps, resume_at=None):
        model = make_mlp(bn=True, dropout=0.2)
        opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=0.5, swp=swp, seed=7,
                   lr=0.1, momentum=0.9)
        torch.manual_seed(11)
        for i in range(steps):
            if i == resume_at:
                ckpt = copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict(),
                                      "rng": torch.get_rng_state()})
                model = make_mlp(bn=True, dropout=0.2, seed=99)
                opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=0.5, swp=swp,
                           seed=123, lr=0.1, momentum=0.9)
                model.load_state_dict(ckpt["m"])
                opt.load_state_dict(ckpt["o"])
                torch.set_rng_state(ckpt["rng"])
            opt.step(sample_closure(model, *make_batch(seed=i)))
        return model

    assert state_equal(run(10), run(10, resume_at=5))


def test_the_mask_generator_state_matters_for_resume():
    """A checkpoint carries the generator: another seed draws other masks until it is loaded."""
    model = make_mlp(bn=False, dropout=0.0)
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=1.0, seed=7, lr=0.1)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["flatminima"]["generators"]) == {"cpu"}
    draws = [sorted(opt._draw_tensor_mask()) for _ in range(6)]
    other = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=1.0, seed=8, lr=0.1)
    assert [sorted(other._draw_tensor_mask()) for _ in range(6)] != draws
    other.load_state_dict(sd)
    assert other.seed == 7
    assert [sorted(other._draw_tensor_mask()) for _ in range(6)] == draws


@pytest.mark.parametrize("bad", ["raise", "shape", "rows"])
@pytest.mark.parametrize("at_call", [1, 2, 3])
def test_errors_in_any_pass_leave_weights_flags_and_base_untouched(bad, at_call):
    model = make_mlp(bn=True, dropout=0.0)
    x, y = make_batch(32)
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, gamma=0.5, lr=0.1, momentum=0.9)
    opt.step(sample_closure(model, x, y))
    w0 = copy.deepcopy(model.state_dict())
    base0 = copy.deepcopy(opt.state_dict())
    calls = [0]

    def closure(select=None):
        calls[0] += 1
        xb, yb = (x, y) if select is None else (x[select], y[select])
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        if calls[0] == at_call:
            if bad == "raise":
                raise KeyError("boom")
            return losses[:-1] if bad == "rows" else losses.reshape(-1, 1)
        return losses

    with pytest.raises((KeyError, ValueError)):
        opt.step(closure)
    assert all(torch.equal(p, w0[k]) for k, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    # the user's clean forward (call 1) updated BatchNorm once; the later passes did not
    assert int(model[1].num_batches_tracked) == int(w0["1.num_batches_tracked"]) + 1
    sd = opt.state_dict()
    assert sd["flatminima"]["step"] == base0["flatminima"]["step"]
    assert all(torch.equal(sd["state"][k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in base0["state"].items())


def test_non_finite_scoring_pass_raises_and_restores():
    model = make_mlp(bn=False, dropout=0.0)
    x, y = make_batch(32)
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=1.0, gamma=0.5, lr=0.1)
    w0 = copy.deepcopy(model.state_dict())
    calls = [0]

    def closure(select=None):
        calls[0] += 1
        losses = F.cross_entropy(model(x), y, reduction="none")
        return losses * float("nan") if calls[0] == 2 else losses

    with pytest.raises(FloatingPointError, match="scoring pass"):
        opt.step(closure)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


def test_grad_scaler_steps_equal_unscaled_steps_and_inf_skips():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    model_a = make_mlp(bn=True, dropout=0.2)
    model_b = copy.deepcopy(model_a)
    kw = {"beta": 0.5, "gamma": 0.5, "seed": 3, "lr": 0.1, "momentum": 0.9}
    opt_a = ESAM(model_a.parameters(), torch.optim.SGD, **kw)
    opt_b = ESAM(model_b.parameters(), torch.optim.SGD, **kw)
    for model, opt, sc in ((model_a, opt_a, scaler), (model_b, opt_b, None)):
        torch.manual_seed(0)
        for i in range(5):
            opt.step(sample_closure(model, *make_batch(seed=i)), scaler=sc)
            if sc is not None:
                sc.update()
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    assert scaler.get_scale() == 2.0**10
    # An inf in the descent pass: the whole step is skipped and the scale halves.
    w0 = copy.deepcopy(model_a.state_dict())
    x, y = make_batch(seed=9)

    def poisoned(select=None):
        losses = F.cross_entropy(model_a(x if select is None else x[select]),
                                 y if select is None else y[select], reduction="none")
        return losses * float("inf") if select is not None else losses

    opt_a.step(poisoned, scaler=scaler)
    scaler.update()
    assert opt_a.stats["skipped"] == 1.0 and scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, w0[k]) for k, p in model_a.named_parameters())


def test_manual_loop_equals_step():
    model_a = make_mlp(bn=False, dropout=0.0)
    model_b = copy.deepcopy(model_a)
    kw = {"beta": 0.5, "gamma": 0.5, "seed": 2, "lr": 0.1, "momentum": 0.9}
    opt_a = ESAM(model_a.parameters(), torch.optim.SGD, **kw)
    opt_b = ESAM(model_b.parameters(), torch.optim.SGD, **kw)
    for i in range(6):
        x, y = make_batch(seed=i)
        opt_a.step(sample_closure(model_a, x, y))
        opt_b.zero_grad()
        with opt_b.masked_first_pass():
            clean = F.cross_entropy(model_b(x), y, reduction="none")
            clean.mean().backward()
        opt_b.first_step(loss=clean.mean())
        with torch.no_grad():
            adv = F.cross_entropy(model_b(x), y, reduction="none")
        rows = opt_b.selection(clean, adv)
        F.cross_entropy(model_b(x[rows]), y[rows]).backward()
        opt_b.second_step()
    assert state_equal(model_a, model_b)


def test_registry_builds_esam_on_every_base_with_any_rule():
    model = tiny_model(dtype=torch.float32)
    names = flatminima.list_optimizers("esam_*")
    assert {"esam_sgd", "esam_adamw", "esam_adam"} <= set(names)
    info = flatminima.optimizer_info("esam_adamw")
    assert (info.family, info.passes, info.needs_closure, info.per_sample) == ("esam", 3, True, True)
    assert not flatminima.optimizer_info("sam_sgd").per_sample
    opt = flatminima.create("esam_adamw", model.parameters(), lr=1e-3, beta=0.6, gamma=0.4,
                            perturbation="monge", alpha=0.5)
    assert isinstance(opt, ESAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert (opt.beta, opt.gamma, opt.perturbation, opt.param_groups[0]["alpha"]) == (0.6, 0.4, "monge", 0.5)
    wrapped = ESAM(base=torch.optim.SGD(model.parameters(), lr=0.1), beta=0.7)
    assert wrapped.beta == 0.7 and wrapped.param_groups is wrapped.base_optimizer.param_groups
