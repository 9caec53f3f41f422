"""SWA / WASAM: the average of the iterates, EMA, update_bn, swapping, checkpoints, the lr anneal."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_batch, make_closure, make_mlp, state_equal
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

import flatminima
from flatminima import SAM, SWA, WeightAveraging, update_bn
from flatminima.optim import registry


def tiny_model(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 8)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(8))
    layers += [torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers).double()


def batch(i, n=16):
    x, y = make_batch(n=n, seed=i, dtype=torch.float64)
    return x, y


def plain_step(model, opt, i):
    opt.zero_grad()
    x, y = batch(i)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def averaged_flat(swa):
    return torch.cat([p.detach().reshape(-1) for p in swa.averaged_model.module.parameters()])


def points(start_step, every, steps):
    """Indices of the steps after which the average is taken (the documented schedule)."""
    return [i for i in range(steps) if i >= start_step and (i - start_step + 1) % every == 0]


# ----------------------------------------------------------------------------- the average
@pytest.mark.parametrize(
    "start, total_steps, every, start_step",
    [(0.5, 12, 1, 6), (3, None, 1, 3), (2, 13, 3, 2), (0.75, 16, 4, 12), (0, None, 2, 0)],
    ids=["fraction", "step", "every3", "once-per-epoch", "from0-every2"],
)
def test_equal_average_is_the_mean_of_the_averaged_iterates(start, total_steps, every, start_step):
    model = tiny_model(bn=True)
    swa = SWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
              start=start, total_steps=total_steps, every=every)
    steps = total_steps or 12
    assert swa.start_step == start_step
    expected_points = points(start_step, every, steps)
    recorded = []
    for i in range(steps):
        assert swa.averaging == (i > start_step)
        plain_step(model, swa, i)
        if i in expected_points:
            recorded.append(flat(model))
        assert swa.n_averaged == len(recorded)
    assert len(recorded) >= 1
    torch.testing.assert_close(averaged_flat(swa), torch.stack(recorded).mean(0), rtol=1e-12, atol=1e-14)
    if every > 1 and steps - 1 not in expected_points:  # the live weights moved on since the last point
        assert not torch.equal(averaged_flat(swa), flat(model))
    # Without use_buffers the BatchNorm buffers are the live model's at the last averaging point.
    bn_avg, bn_live = swa.averaged_model.module[1], model[1]
    assert int(bn_avg.num_batches_tracked) == expected_points[-1] + 1
    if expected_points[-1] == steps - 1:
        assert torch.equal(bn_avg.running_mean, bn_live.running_mean)


def test_once_per_epoch_over_the_last_quarter():
    """start=0.75, total=epochs*S, every=S: one point at the end of each of the last epochs."""
    epochs, per_epoch = 8, 5
    model = tiny_model()
    swa = SWA(torch.optim.SGD(model.parameters(), lr=0.1), model, start=0.75,
              total_steps=epochs * per_epoch, every=per_epoch)
    ends = []
    for epoch in range(epochs):
        for j in range(per_epoch):
            plain_step(model, swa, epoch * per_epoch + j)
        ends.append(flat(model))
    assert swa.n_averaged == 2  # the ends of epochs 7 and 8 (the last quarter)
    torch.testing.assert_close(averaged_flat(swa), (ends[6] + ends[7]) / 2, rtol=1e-12, atol=1e-14)


def test_ema_equals_the_hand_computed_ema():
    decay = 0.7
    model = tiny_model()
    swa = SWA(torch.optim.SGD(model.parameters(), lr=0.2), model, start=2, every=2, ema_decay=decay)
    ema = None
    for i in range(11):
        plain_step(model, swa, i)
        if i in points(2, 2, 11):
            w = flat(model)
            ema = w.clone() if ema is None else decay * ema + (1 - decay) * w
    assert swa.n_averaged == 4
    torch.testing.assert_close(averaged_flat(swa), ema, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
@pytest.mark.parametrize("use_buffers", [False, True])
def test_matches_averaged_model_driven_by_hand_bit_for_bit(ema_decay, use_buffers):
    model_a = make_mlp(bn=True, dropout=0.0)
    model_b = copy.deepcopy(model_a)
    swa = WeightAveraging(torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9), model_a,
                          start=3, every=2, ema_decay=ema_decay, device="cpu", use_buffers=use_buffers)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    multi = None if ema_decay is None else get_ema_multi_avg_fn(ema_decay)
    avg_b = AveragedModel(model_b, device="cpu", multi_avg_fn=multi, use_buffers=use_buffers)
    for i in range(12):
        for model, opt in ((model_a, swa), (model_b, opt_b)):
            opt.zero_grad()
            make_closure(model, *make_batch(seed=i))()
            opt.step()
        if i >= 3 and (i - 3 + 1) % 2 == 0:
            avg_b.update_parameters(model_b)
    assert state_equal(model_a, model_b)  # the wrapper does not touch the trajectory
    assert state_equal(swa.averaged_model, avg_b)  # includes n_averaged
    assert swa.n_averaged == 4


# ----------------------------------------------------------------------------- WASAM
def test_wasam_averages_the_sam_iterates_not_the_perturbed_points():
    model_a = make_mlp(bn=True, dropout=0.3)
    model_b = copy.deepcopy(model_a)
    swa = SWA(SAM(model_a.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9), model_a,
              start=2, every=1)
    sam_b = SAM(model_b.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    iterates, perturbed = [], []

    def closure_a(x, y):
        calls = [0]

        def closure():
            calls[0] += 1
            if calls[0] == 2:  # the second pass runs at w + e
                perturbed.append(torch.cat([p.detach().reshape(-1) for p in model_a.parameters()]))
            loss = F.cross_entropy(model_a(x), y)
            loss.backward()
            return loss

        return closure

    torch.manual_seed(0)
    for i in range(6):
        swa.step(closure_a(*make_batch(seed=i)))
        if i >= 2:
            iterates.append(torch.cat([p.detach().reshape(-1) for p in model_a.parameters()]))
    torch.manual_seed(0)
    for i in range(6):
        sam_b.step(make_closure(model_b, *make_batch(seed=i)))
    assert state_equal(model_a, model_b)  # SWA(SAM) trains exactly like SAM
    avg = torch.cat([p.detach().reshape(-1) for p in swa.averaged_model.module.parameters()])
    torch.testing.assert_close(avg, torch.stack(iterates).mean(0), rtol=1e-6, atol=1e-7)
    wrong = torch.stack(perturbed[2:]).mean(0)
    assert (avg - wrong).abs().max() > 1e-3  # far from the mean of the w + e points
    stats = swa.stats
    assert stats["n_averaged"] == 4.0 and stats["averaging"] == 1.0 and stats["skipped"] == 0.0


def test_a_skipped_amp_step_is_not_an_averaging_point():
    model = tiny_model().float()
    swa = SWA(SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1), model, start=0, every=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    kept = []
    for i in range(4):
        x, y = make_batch(n=16, seed=i)

        def closure(x=x, y=y, i=i):
            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss * (float("inf") if i == 1 else 1.0)).backward()
            return loss

        swa.step(closure, scaler=scaler)
        scaler.update()
        kept.append(flat(model))
    # Points are after steps 1 and 3; step 1 was skipped, so its point moved to step 2.
    assert swa.steps == 4 and swa.n_averaged == 2
    torch.testing.assert_close(averaged_flat(swa), (kept[2] + kept[3]) / 2)

    # A plain optimizer under scaler.step(swa): the skipped step never reaches SWA.
    model = tiny_model().float()
    swa = SWA(torch.optim.SGD(model.parameters(), lr=0.1), model, start=0, every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(3):
        swa.zero_grad()
        x, y = make_batch(n=16, seed=i)
        scaler.scale(F.cross_entropy(model(x), y) * (float("inf") if i == 1 else 1.0)).backward()
        scaler.step(swa)
        scaler.update()
    assert swa.steps == 2 and swa.n_averaged == 2


# ----------------------------------------------------------------------------- update_bn
class DictNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = torch.nn.Linear(5, 4).double()
        self.bn1 = torch.nn.BatchNorm1d(4, momentum=0.3).double()
        self.drop = torch.nn.Dropout(0.0)
        self.lin2 = torch.nn.Linear(4, 3).double()
        self.bn2 = torch.nn.BatchNorm1d(3).double()

    def forward(self, x, scale=1.0):
        return self.bn2(self.lin2(self.drop(torch.relu(self.bn1(self.lin1(x * scale))))))


def dict_batches():
    g = torch.Generator().manual_seed(1)
    # Unequal sizes: the cumulative average weighs batches, not samples.
    return [{"x": torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 1, "scale": 2.0}
            for n in (7, 12, 5)]


def test_update_bn_with_a_forward_fn_on_dict_batches_equals_the_hand_computation():
    net = DictNet()
    net.eval()
    net.drop.train()  # a mixed state must survive
    for m in (net.bn1, net.bn2):
        m.running_mean.fill_(5.0)
    batches = dict_batches()
    n = update_bn(batches, lambda m, b: m(b["x"], scale=b["scale"]), model=net)
    assert n == 3
    # bn1 by hand: the mean of the per-batch means and of the unbiased per-batch variances.
    with torch.no_grad():
        hs = [net.lin1(b["x"] * 2.0) for b in batches]
    mean = torch.stack([h.mean(0) for h in hs]).mean(0)
    var = torch.stack([h.var(0, unbiased=True) for h in hs]).mean(0)
    torch.testing.assert_close(net.bn1.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.bn1.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(net.bn1.num_batches_tracked) == 3
    # Every layer: a manual pass with momentum=None from reset statistics, bit for bit.
    ref = DictNet()
    ref.load_state_dict(net.state_dict())
    ref.train()
    with torch.no_grad():
        for m in (ref.bn1, ref.bn2):
            m.reset_running_stats()
            m.momentum = None
        for b in batches:
            ref(b["x"], scale=b["scale"])
    assert state_equal(net, ref)
    # Flags and momenta are put back.
    assert not net.training and net.drop.training and not net.bn1.training and not net.bn2.training
    assert (net.bn1.momentum, net.bn2.momentum) == (0.3, 0.1)
    # The default forward for dict batches is model(**batch): same result.
    net2 = DictNet()
    net2.load_state_dict(net.state_dict())
    update_bn(batches, model=net2)
    assert state_equal(net, net2)


def test_update_bn_default_forward_tuples_and_device_and_errors():
    model = make_mlp(bn=True, dropout=0.0)
    data = [make_batch(n=8, seed=i) for i in range(3)]
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(data, ref)  # torch's own, on (x, y) tuples
    update_bn(data, model=model, device="cpu")
    assert state_equal(model, ref)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no batches"):
        update_bn([], model=model)
    with pytest.raises(RuntimeError, match="boom"):
        update_bn(data, lambda m, b: (m(b[0]), (_ for _ in ()).throw(RuntimeError("boom"))), model=model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # statistics restored after errors
    assert model.training and model[1].momentum == 0.1
    with pytest.raises(TypeError, match="forward_fn is a function"):
        update_bn(data, model)
    with pytest.raises(TypeError, match="needs the model"):
        update_bn(data)
    assert update_bn(data, model=tiny_model()) == 0  # no normalization layer: no pass


# ----------------------------------------------------------------------------- swapping
def _trained_swa(steps=8):
    model = make_mlp(bn=True, dropout=0.0)
    swa = SWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, start=2)
    for i in range(steps):
        swa.zero_grad()
        make_closure(model, *make_batch(seed=i))()
        swa.step()
    return model, swa


def test_swapped_evaluates_with_the_averaged_weights_and_restores_bit_for_bit():
    model, swa = _trained_swa()
    x, _ = make_batch(n=8, seed=99)
    assert swa.update_bn([make_batch(seed=i) for i in range(4)]) == 4
    live = copy.deepcopy(model.state_dict())
    model.eval()
    swa.averaged_model.eval()
    with torch.no_grad():
        expected = swa.averaged_model(x)
        with swa.swapped() as m:
            assert m is model
            assert state_equal(model, swa.averaged_model.module)  # parameters and buffers
            assert torch.equal(model(x), expected)
    now = model.state_dict()
    assert all(torch.equal(live[k], now[k]) for k in live)
    with pytest.raises(KeyError, match="inside"):
        with swa.averaged_weights():
            assert state_equal(model, swa.averaged_model.module)
            raise KeyError("inside")
    now = model.state_dict()
    assert all(torch.equal(live[k], now[k]) for k in live)
    swa.swap()
    assert state_equal(model, swa.averaged_model.module)


def test_swapping_before_any_average_raises_and_stale_bn_stats_warn():
    model = make_mlp(bn=True, dropout=0.0)
    swa = SWA(torch.optim.SGD(model.parameters(), lr=0.1), model, start=5)
    with pytest.raises(RuntimeError, match="nothing averaged yet"):
        with swa.swapped():
            pass
    model, swa = _trained_swa()
    with pytest.warns(UserWarning, match="update_bn"):
        with swa.swapped():
            pass


# ----------------------------------------------------------------------------- checkpoints
def _run(kind, steps, resume_at=None):
    def build(model):
        if kind == "sam":
            inner = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        else:
            inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return SWA(inner, model, start=3, every=2, swa_lr=0.02, anneal_steps=3)

    model = make_mlp(bn=True, dropout=0.0)
    swa = build(model)
    for i in range(steps):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": swa.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = make_mlp(bn=True, dropout=0.0, seed=123)  # a fresh process
            swa = build(model)
            model.load_state_dict(ckpt["model"])
            swa.load_state_dict(ckpt["opt"])
        closure = make_closure(model, *make_batch(seed=i))
        if kind == "sam":
            swa.step(closure)
        else:
            swa.zero_grad()
            closure()
            swa.step()
    return model, swa


@pytest.mark.parametrize("kind", ["sam", "adamw"])
@pytest.mark.parametrize("resume_at", [2, 4, 5])
def test_resume_from_a_checkpoint_is_identical_to_an_uninterrupted_run(kind, resume_at):
    model_a, swa_a = _run(kind, 10)
    model_b, swa_b = _run(kind, 10, resume_at=resume_at)
    assert state_equal(model_a, model_b)
    assert state_equal(swa_a.averaged_model, swa_b.averaged_model)
    assert swa_a.n_averaged == swa_b.n_averaged == 3 and swa_b.steps == 10
    assert swa_a.param_groups[0]["lr"] == swa_b.param_groups[0]["lr"] == 0.02


# ----------------------------------------------------------------------------- swa_lr
def _anneal(a_fn, lr0, swa_lr, start, anneal, steps, before):
    out = list(before)
    for k in range(steps - start):
        t = 1.0 if anneal == 0 else min(1.0, k / anneal)
        a = a_fn(t)
        out.append(swa_lr * a + lr0 * (1 - a))
    return out


COS = lambda t: (1 - math.cos(math.pi * t)) / 2  # noqa: E731
LIN = lambda t: t  # noqa: E731


@pytest.mark.parametrize("strategy, fn, anneal", [("cos", COS, 4), ("linear", LIN, 4), ("cos", COS, 0)])
def test_swa_lr_anneals_from_the_start_and_overrides_another_scheduler(strategy, fn, anneal):
    model = tiny_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = SWA(inner, model, start=3, swa_lr=0.01, anneal_steps=anneal, anneal_strategy=strategy)
    sched = torch.optim.lr_scheduler.StepLR(swa, step_size=1, gamma=0.5)  # keeps stepping
    used = []
    inner.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    for i in range(10):
        plain_step(model, swa, i)
        sched.step()
    expected = _anneal(fn, 0.0125, 0.01, 3, anneal, 10, before=[0.1, 0.05, 0.025])
    assert used == pytest.approx(expected, rel=1e-15, abs=0)
    assert used[-1] == 0.01
    if anneal:
        # Same sequence as torch's SWALR built at the start and stepped once per step.
        ref_model = tiny_model()
        ref = torch.optim.SGD(ref_model.parameters(), lr=0.0125)
        swalr = SWALR(ref, swa_lr=0.01, anneal_epochs=anneal, anneal_strategy=strategy)
        seq = []
        for i in range(7):
            seq.append(ref.param_groups[0]["lr"])
            plain_step(ref_model, ref, i)
            swalr.step()
        assert seq == pytest.approx(expected[3:], rel=1e-12)


def test_swa_lr_per_param_group():
    model = tiny_model()
    inner = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.2},
                             {"params": model[2].parameters()}], lr=0.1)
    swa = SWA(inner, model, start=1, swa_lr=[0.02, 0.05], anneal_steps=2, anneal_strategy="linear")
    for i in range(4):
        plain_step(model, swa, i)
    assert [g["lr"] for g in swa.param_groups] == [0.02, 0.05]
    assert swa.param_groups is inner.param_groups and swa.state is inner.state
    clone = copy.deepcopy(swa)
    assert clone.param_groups is clone.optimizer.param_groups and clone.optimizer is not inner
    assert clone.param_groups[0]["params"][0] is next(clone.model.parameters())
    plain_step(clone.model, clone, 4)
    assert clone.steps == 5 and swa.steps == 4 and clone.n_averaged == 4 and swa.n_averaged == 3


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start": 1.5, "total_steps": 10}, "start: 1.5"),
        ({"start": 0.0, "total_steps": 10}, "start: 0.0"),
        ({"start": float("nan"), "total_steps": 10}, "start: nan"),
        ({"start": -1}, "start: -1"),
        ({"start": True}, "start: True"),
        ({"start": "half"}, "start: 'half'"),
        ({"start": 0.5}, r"start=0\.5 is a fraction"),
        ({"start": 0, "total_steps": 0}, "total_steps: 0"),
        ({"start": 0, "every": 0}, "every: 0"),
        ({"start": 0, "every": 2.0}, "every: 2.0"),
        ({"start": 10, "total_steps": 10}, "start=10"),
        ({"start": 0.9, "total_steps": 10, "every": 2}, "every=2"),
        ({"start": 0, "ema_decay": 1.0}, "ema_decay: 1.0"),
        ({"start": 0, "ema_decay": 0}, "ema_decay: 0"),
        ({"start": 0, "swa_lr": -0.1}, "swa_lr: -0.1"),
        ({"start": 0, "swa_lr": [0.1, 0.2]}, r"swa_lr: \[0.1, 0.2\]"),
        ({"start": 0, "swa_lr": 0.1, "anneal_steps": -1}, "anneal_steps: -1"),
        ({"start": 0, "anneal_steps": 5}, "anneal_steps=5 needs swa_lr"),
        ({"start": 0, "swa_lr": 0.1, "anneal_strategy": "exp"}, "anneal_strategy: 'exp'"),
        ({"start": 0, "use_buffers": "yes"}, "use_buffers: 'yes'"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_value(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        SWA(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


def test_wrong_types_raise_type_error():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="Optimizer instance"):
        SWA(torch.optim.SGD, model, start=0)
    with pytest.raises(TypeError, match="nn.Module"):
        SWA(opt, model.parameters(), start=0)
    with pytest.raises(TypeError, match="already wrapped"):
        SWA(SWA(opt, model, start=0), model, start=0)


# ----------------------------------------------------------------------------- registry
def test_registry_sam_sgd_swa_builds_swa_around_sam():
    model = tiny_model()
    opt = flatminima.create("sam_sgd+swa", model.parameters(), model=model, lr=0.1, momentum=0.9,
                            rho=0.2, start=0.5, total_steps=20, every=5, ema_decay=0.9)
    assert isinstance(opt, SWA) and isinstance(opt.optimizer, SAM)
    assert isinstance(opt.optimizer.base_optimizer, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["rho"]) == (0.1, 0.9, 0.2)
    assert (opt.start_step, opt.every, opt.ema_decay, opt.model) == (10, 5, 0.9, model)
    info, inner = flatminima.optimizer_info("sam_sgd+swa"), flatminima.optimizer_info("sam_sgd")
    assert info.averaging and not inner.averaging
    for field in ("passes", "needs_closure", "per_sample", "family", "base"):
        assert getattr(info, field) == getattr(inner, field)
    assert info.description == inner.description + " + SWA"
    assert type(flatminima.create("sgd+swa", model.parameters(), model=model, lr=0.1, start=0).optimizer) \
        is torch.optim.SGD
    with pytest.raises(TypeError, match="model=model"):
        flatminima.create("sam_sgd+swa", model.parameters(), lr=0.1, start=0)
    names = flatminima.list_optimizers()
    plain = [n for n in names if not n.endswith("+swa")]
    assert sorted(n + "+swa" for n in plain) == flatminima.list_optimizers("*+swa")
    assert "esam_adamw+swa" in names


def test_registering_a_name_registers_its_swa_twin(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    info = flatminima.OptimizerInfo("mysgd", torch.optim.SGD, 1, False, "base", "sgd", "custom")
    flatminima.register_optimizer(info)
    twin = flatminima.optimizer_info("mysgd+swa")
    assert twin.averaging and twin.description == "custom + SWA"
    model = tiny_model()
    opt = flatminima.create("mysgd+swa", model.parameters(), model=model, lr=0.1, start=0)
    plain_step(model, opt, 0)
    assert opt.n_averaged == 1
