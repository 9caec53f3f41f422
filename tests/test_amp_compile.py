"""Mixed precision (GradScaler, bfloat16 autocast) and torch.compile with the SAM family."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_batch, make_mlp, state_equal
from _helpers import make_closure as _plain_closure

from flatminima import SAM, MongeSAM

INIT_SCALE = 2.0**12


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)


def _scaled_closure(model, x, y, scaler, poison_call=None, calls=None):
    calls = [0] if calls is None else calls

    def closure():
        calls[0] += 1
        loss = F.cross_entropy(model(x), y)
        if calls[0] == poison_call:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        return loss

    return closure


@pytest.mark.parametrize("rule", [SAM, MongeSAM])
def test_grad_scaler_steps_equal_unscaled_steps(rule):
    model_a = make_mlp(bn=True, dropout=0.2)
    model_b = copy.deepcopy(model_a)
    opt_a = rule(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = rule(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = _scaler()
    torch.manual_seed(0)
    for i in range(5):
        x, y = make_batch(seed=i)
        opt_a.step(_scaled_closure(model_a, x, y, scaler), scaler=scaler)
        scaler.update()
    torch.manual_seed(0)
    for i in range(5):
        x, y = make_batch(seed=i)
        opt_b.step(_plain_closure(model_b, x, y))
    # Scaling by a power of two and unscaling is exact: the norm, e and the step are unchanged.
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    assert opt_a.stats["grad_norm"] == pytest.approx(opt_b.stats["grad_norm"], rel=1e-5)
    assert opt_a.stats["skipped"] == 0.0
    assert scaler.get_scale() == INIT_SCALE


@pytest.mark.parametrize("poison_call", [1, 2])
def test_inf_in_either_pass_skips_the_whole_step_and_lowers_the_scale(poison_call):
    model = make_mlp(bn=True, dropout=0.0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = _scaler()
    x, y = make_batch()
    w0 = copy.deepcopy(model.state_dict())
    loss = opt.step(_scaled_closure(model, x, y, scaler, poison_call), scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, w0[k]) for k, p in model.named_parameters())
    assert len(opt.state) == 0  # the base optimizer did not step
    assert scaler.get_scale() == INIT_SCALE * 0.5
    assert opt.stats["skipped"] == 1.0
    assert torch.isfinite(loss) != (poison_call == 1)
    bn = model[1]  # statistics of the clean pass only, never NaN
    assert int(bn.num_batches_tracked) == 1 and torch.isfinite(bn.running_var).all()
    # The next, clean step proceeds normally with the lowered scale.
    opt.step(_scaled_closure(model, x, y, scaler), scaler=scaler)
    scaler.update()
    assert opt.stats["skipped"] == 0.0 and len(opt.state) > 0
    assert not torch.equal(model[0].weight, w0["0.weight"])


def test_grad_scaler_with_the_manual_api_and_clipping():
    model_a = make_mlp(bn=False, dropout=0.0)
    model_b = copy.deepcopy(model_a)
    x, y = make_batch()
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, max_grad_norm=0.05)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, max_grad_norm=0.05)
    scaler = _scaler()
    for _ in range(3):
        loss = F.cross_entropy(model_a(x), y)
        scaler.scale(loss).backward()
        opt_a.first_step(loss=loss, scaler=scaler)
        loss_adv = F.cross_entropy(model_a(x), y)
        scaler.scale(loss_adv).backward()
        opt_a.second_step(loss=loss_adv, scaler=scaler)
        scaler.update()
        opt_a.zero_grad()
        opt_b.step(_plain_closure(model_b, x, y))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt_a.stats["adv_grad_norm"] > 0.05  # clipping was active on the unscaled gradient


def test_nan_loss_under_a_scaler_skips_instead_of_raising():
    model = make_mlp(bn=False, dropout=0.0)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=0.1)
    scaler = _scaler()
    x, y = make_batch()
    w0 = copy.deepcopy(model.state_dict())

    def closure():
        loss = F.cross_entropy(model(x), y) * float("nan")
        scaler.scale(loss).backward()
        return loss

    opt.step(closure, scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, w0[k]) for k, p in model.named_parameters())
    assert scaler.get_scale() == INIT_SCALE * 0.5


def test_bfloat16_autocast():
    model_a = make_mlp(bn=True, dropout=0.0)
    model_b = copy.deepcopy(model_a)
    model_c = copy.deepcopy(model_a)
    x, y = make_batch()

    def bf16_closure(model):
        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    # rho = 0 under autocast is the base optimizer under autocast, bit for bit.
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    for _ in range(3):
        opt_a.step(bf16_closure(model_a))
        opt_b.zero_grad()
        bf16_closure(model_b)()
        opt_b.step()
    assert state_equal(model_a, model_b)
    # rho > 0: the master weights stay float32 and the step is close to the float32 SAM step.
    model_d = copy.deepcopy(model_c)
    opt_c = SAM(model_c.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    opt_d = SAM(model_d.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    opt_c.step(bf16_closure(model_c))
    opt_d.step(_plain_closure(model_d, x, y))
    assert all(p.dtype == torch.float32 for p in model_c.parameters())
    assert opt_c.stats["perturbation_norm"] == pytest.approx(0.2, rel=1e-5)
    for a, b in zip(model_c.parameters(), model_d.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)


def _small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 3),
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_torch_compile_one_step_matches_eager(how):
    torch._dynamo.reset()
    model = _small_cnn()
    eager = copy.deepcopy(model)
    if how == "torch.compile":
        run = torch.compile(model)
    else:
        model.compile()
        run = model
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_e = SAM(eager.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.step(_plain_closure(run, x, y))
        opt_e.step(_plain_closure(eager, x, y))
    sd, sde = model.state_dict(), eager.state_dict()
    for k in sde:
        torch.testing.assert_close(sd[k], sde[k], rtol=1e-5, atol=1e-6, msg=k)
    assert int(model[1].num_batches_tracked) == 2  # the guard reached the compiled BatchNorm
    assert opt.stats["perturbation_norm"] == pytest.approx(0.1, rel=1e-5)


@pytest.mark.slow
def test_compiled_dropout_masks_are_replayed():
    """Inductor draws its random seeds from the global generator, so the replay holds compiled."""
    torch._dynamo.reset()

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 3)
        )

    model_a, model_b = mlp(), mlp()
    run_a, run_b = torch.compile(model_a), torch.compile(model_b)
    x, y = make_batch()
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    torch.manual_seed(5)
    for _ in range(3):
        opt_a.step(_plain_closure(run_a, x, y))
    torch.manual_seed(5)
    for _ in range(3):
        opt_b.zero_grad()
        _plain_closure(run_b, x, y)()
        opt_b.step()
    assert state_equal(model_a, model_b)
    assert opt_a.stats["cos"] == pytest.approx(1.0, abs=1e-6)
