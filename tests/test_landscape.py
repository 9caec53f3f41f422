"""Loss landscapes (flatminima.sharpness.landscape) and their plots (flatminima.plotting).

Every test checks numbers against an independent computation: losses of hand-built models called
directly, closed forms on a quadratic model, norms of filters. float64 throughout.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.sharpness import LossFunction, NonDeterministicLossWarning
from flatminima.sharpness.landscape import (
    LossLine,
    LossSurface,
    interpolate,
    random_direction,
    slice_1d,
    slice_2d,
)

DT = torch.float64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- builders
def mlp(seed: int = 0, bn: bool = True, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 10)]
    if bn:
        layers.append(nn.BatchNorm1d(10))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(10, 3)]
    return nn.Sequential(*layers).to(DT)


def convnet(seed: int = 0) -> nn.Sequential:
    """Conv (4-D weight) + BatchNorm2d + Linear (2-D) + LayerNorm: every kind of tensor."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5), nn.LayerNorm(5), nn.Linear(5, 3),
    ).to(DT)


def batches(n_batches: int = 2, n: int = 12, seed: int = 0, image: bool = False) -> list:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 6, 6) if image else (n, 6)
    return [
        (torch.randn(shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for _ in range(n_batches)
    ]


def ce(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def direct_loss(model: nn.Module, bs, mode: str = "eval") -> float:
    """The loss computed the plain way: call loss_fn on a copy of the model (mean over batches)."""
    m = copy.deepcopy(model).train(mode == "train")
    with torch.no_grad():
        return sum(float(ce(m, b)) for b in bs) / len(bs)


def with_params(model: nn.Module, values: dict[str, torch.Tensor], buffers=None) -> nn.Module:
    """A copy of ``model`` with some parameters (and buffers) replaced."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in values:
                p.copy_(values[n])
        for n, b in m.named_buffers():
            if buffers and n in buffers:
                b.copy_(buffers[n])
    return m


def fill_bn_stats(model: nn.Module, seed: int, image: bool = False) -> nn.Module:
    """Give the BatchNorm layers non-trivial running statistics (different per seed)."""
    model.train()
    with torch.no_grad():
        for x, _ in batches(3, 16, seed=seed, image=image):
            model(x * (1 + seed) + seed)
    return model.eval()


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:  # bit for bit
        assert torch.equal(now[k], state[k]), k
        assert now[k].dtype == state[k].dtype
    assert [m.training for m in model.modules()] == flags


# ----------------------------------------------------------------------------- interpolate
def test_interpolation_endpoints_are_the_two_models_and_midpoint_the_averaged_model():
    a, b = fill_bn_stats(mlp(0), 0), fill_bn_stats(mlp(1), 1)
    bs = batches()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())

    res = interpolate(a, b, ce, bs, steps=5, interpolate_buffers=True)
    assert isinstance(res, LossLine) and res.kind == "interpolation"
    assert res.coords.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res.losses.dtype == DT
    # Endpoints: exactly the losses of the two models, computed independently.
    assert float(res.losses[0]) == direct_loss(a, bs)
    assert float(res.losses[-1]) == direct_loss(b, bs)
    # Midpoint: a hand-built model with averaged parameters and (float) buffers.
    avg_p = {n: 0.5 * pa[n].detach() + 0.5 * pb[n].detach() for n in pa}
    avg_b = {n: 0.5 * ba[n] + 0.5 * bb[n] for n in ba if ba[n].is_floating_point()}
    mid = with_params(a, avg_p, avg_b)
    assert float(res.losses[2]) == pytest.approx(direct_loss(mid, bs), rel=1e-13, abs=0)
    assert torch.equal(res.direction, torch.cat([(pb[n] - pa[n]).detach().reshape(-1) for n in pa]))


def test_interpolation_uses_model_a_buffers_by_default():
    a, b = fill_bn_stats(mlp(0), 0), fill_bn_stats(mlp(1), 1)
    bs = batches()
    res = interpolate(a, b, ce, bs, steps=3)
    # alpha = 1: b's parameters with a's BatchNorm statistics, which is not model b.
    b_params_a_stats = with_params(a, {n: p.detach() for n, p in b.named_parameters()})
    assert float(res.losses[-1]) == pytest.approx(direct_loss(b_params_a_stats, bs), rel=1e-13)
    assert abs(float(res.losses[-1]) - direct_loss(b, bs)) > 1e-3
    assert float(res.losses[0]) == direct_loss(a, bs)
    # In train mode (batch statistics) the buffers do not matter: alpha = 1 is model b.
    res_t = interpolate(a, b, ce, bs, steps=3, mode="train")
    assert float(res_t.losses[-1]) == pytest.approx(direct_loss(b, bs, "train"), rel=1e-13)


def test_interpolation_grid_extrapolation_and_explicit_alphas():
    a, b = mlp(0, bn=False), mlp(1, bn=False)
    bs = batches()
    res = interpolate(a, b, ce, bs, steps=5, extrapolate=0.5)
    assert res.coords.tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    res2 = interpolate(a, b, ce, bs, alphas=[2.0, -1.0])
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for k, alpha in enumerate([2.0, -1.0]):
        hand = with_params(a, {n: (1 - alpha) * pa[n].detach() + alpha * pb[n].detach() for n in pa})
        assert float(res2.losses[k]) == pytest.approx(direct_loss(hand, bs), rel=1e-13)
    # Extrapolation that is not a multiple of the spacing: both ends exact, 0 and 1 on the grid.
    res3 = interpolate(a, b, ce, bs, steps=3, extrapolate=0.3)
    assert res3.coords[0] == -0.3 and res3.coords[-1] == 1.3
    assert {0.0, 0.5, 1.0} <= set(res3.coords.tolist())


def test_interpolation_of_a_subset_moves_only_that_subset():
    a, b = mlp(0, bn=False), mlp(1, bn=False)
    bs = batches()
    res = interpolate(a, b, ce, bs, steps=3, params="2.")
    assert res.names == ("2.weight", "2.bias")
    hand = with_params(a, {n: p.detach() for n, p in b.named_parameters() if n.startswith("2.")})
    assert float(res.losses[-1]) == direct_loss(hand, bs)


def test_interpolation_rejects_models_of_different_structure():
    a = mlp(0, bn=False)
    wider = nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 3)).to(DT)
    with pytest.raises(ValueError, match="same parameter shapes: '0.weight' is \\(10, 6\\)"):
        interpolate(a, wider, ce, batches())
    with pytest.raises(ValueError, match="same parameter names"):
        interpolate(a, mlp(0, bn=True), ce, batches())
    with pytest.raises(ValueError, match="extrapolate"):
        interpolate(a, a, ce, batches(), extrapolate=-1)
    with pytest.raises(ValueError, match="steps"):
        interpolate(a, a, ce, batches(), steps=1)
    with pytest.raises(ValueError, match="invalid mode"):
        interpolate(a, a, ce, batches(), mode="inference")


# ----------------------------------------------------------------------------- directions
def _per_param(model, d, params=None):
    return LossFunction(model, ce, [None], mode="eval", params=params).unflatten(d)


def test_filter_normalization_matches_each_filter_norm_and_zeros_biases_and_norm_layers():
    model = convnet()
    d = random_direction(model, seed=3)
    parts = _per_param(model, d)
    params = dict(model.named_parameters())
    assert {p.dim() for p in params.values()} == {1, 2, 4}  # conv, linear, biases / BN / LN
    for name, dp in parts.items():
        w = params[name].detach()
        if w.dim() <= 1:
            assert torch.count_nonzero(dp) == 0, name  # ignore="biasbn"
            continue
        dn = dp.reshape(w.shape[0], -1).norm(dim=1)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(dn, wn, rtol=1e-12, atol=1e-12)
        cos = float((dp * w).sum() / (dp.norm() * w.norm()))
        assert abs(cos) < 0.9, name  # random, not the weights themselves
    # ignore=None: 1-D tensors are normalized as one unit (‖d‖ = ‖w‖), not zeroed.
    parts_all = _per_param(model, random_direction(model, seed=3, ignore=None))
    for name, dp in parts_all.items():
        w = params[name].detach()
        if w.dim() == 1:
            assert float(dp.norm()) == pytest.approx(float(w.norm()), rel=1e-12)
        else:
            torch.testing.assert_close(dp, parts[name], rtol=0, atol=0)  # same draw


def test_layer_and_no_normalization():
    model = convnet()
    params = dict(model.named_parameters())
    # The raw draw: one standard normal tensor per parameter, from a CPU generator seeded with seed.
    gen = torch.Generator().manual_seed(5)
    raw = {n: torch.randn(p.shape, generator=gen, dtype=DT) for n, p in params.items()}
    none = _per_param(model, random_direction(model, seed=5, normalization=None, ignore=None))
    for n in params:
        assert torch.equal(none[n], raw[n])
    layer = _per_param(model, random_direction(model, seed=5, normalization="layer"))
    for n, p in params.items():
        if p.dim() >= 2:
            assert float(layer[n].norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
            torch.testing.assert_close(layer[n] / layer[n].norm(), raw[n] / raw[n].norm())
        else:
            assert torch.count_nonzero(layer[n]) == 0


def test_direction_seeds_selection_and_validation():
    model = convnet()
    d0, d0b, d1 = (random_direction(model, seed=s) for s in (0, 0, 1))
    assert torch.equal(d0, d0b)
    assert not torch.allclose(d0, d1)
    # A sub-selection gives the same numbers as the whole-model direction on those parameters.
    sub = random_direction(model, seed=0, params="4.")
    full = _per_param(model, d0)
    assert torch.equal(sub, torch.cat([full["4.weight"].reshape(-1), full["4.bias"].reshape(-1)]))
    # The global RNG is not consumed.
    state = torch.get_rng_state()
    random_direction(model, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="normalization"):
        random_direction(model, seed=0, normalization="model")
    with pytest.raises(ValueError, match="ignore"):
        random_direction(model, seed=0, ignore="bn")
    with pytest.raises(TypeError, match="seed"):
        random_direction(model, seed=None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- slices
def test_slice_1d_center_is_the_loss_and_points_are_hand_built_models():
    model = fill_bn_stats(convnet(), 0, image=True)
    bs = batches(image=True)
    res = slice_1d(model, ce, bs, seed=2, steps=21)
    assert res.kind == "slice" and res.coords[10] == 0.0
    assert float(res.losses[10]) == direct_loss(model, bs)
    assert torch.equal(res.direction, random_direction(model, seed=2))
    d = _per_param(model, res.direction)
    for k in (0, 3, 20):
        t = float(res.coords[k])
        hand = with_params(model, {n: p.detach() + t * d[n] for n, p in model.named_parameters()})
        assert float(res.losses[k]) == pytest.approx(direct_loss(hand, bs), rel=1e-12)
    # A direction given per parameter (missing ones: zero) equals the same flat direction.
    only_conv = {"0.weight": d["0.weight"]}
    flat = torch.cat([d["0.weight"].reshape(-1), torch.zeros(res.direction.numel() - d["0.weight"].numel(),
                                                              dtype=DT)])
    r1 = slice_1d(model, ce, bs, direction=only_conv, steps=5)
    r2 = slice_1d(model, ce, bs, direction=flat, steps=5)
    assert torch.equal(r1.losses, r2.losses)
    with pytest.raises(ValueError, match="flat vector of"):
        slice_1d(model, ce, bs, direction=flat[:-1])
    with pytest.raises(ValueError, match="not among the selected"):
        slice_1d(model, ce, bs, direction={"nope": flat})


def test_slice_seeds_reproduce_and_differ():
    model = mlp(0)
    bs = batches()
    a, b, c = (slice_1d(model, ce, bs, seed=s, steps=5) for s in (4, 4, 5))
    assert torch.equal(a.losses, b.losses) and torch.equal(a.direction, b.direction)
    assert not torch.equal(a.direction, c.direction)
    assert not torch.equal(a.losses, c.losses)


class Affine(nn.Module):
    """``f(x) = W x + b`` with the squared loss: ``L`` is an exact quadratic in the weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3).to(DT)

    def forward(self, x):
        return self.lin(x)


def sq(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()


def quad_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT))
            for _ in range(2)]


def closed_form(model, bs, d1, d2, xs, ys):
    """``L(w + a D1 + b D2)`` expanded: with ``r = W x + b - y``, ``u = D1_W x + D1_b``,
    ``v = D2_W x + D2_b``: ``0.5 mean ||r + a u + b v||^2`` per batch, averaged over batches."""
    W, bias = model.lin.weight.detach(), model.lin.bias.detach()
    out = torch.zeros(len(xs), len(ys), dtype=DT)
    for x, y in bs:
        r = x @ W.T + bias - y
        u = x @ d1["lin.weight"].T + d1["lin.bias"]
        v = x @ d2["lin.weight"].T + d2["lin.bias"]
        rr, ru, rv = (r * r).sum(1).mean(), (r * u).sum(1).mean(), (r * v).sum(1).mean()
        uu, uv, vv = (u * u).sum(1).mean(), (u * v).sum(1).mean(), (v * v).sum(1).mean()
        a, b = xs[:, None], ys[None, :]
        out += 0.5 * (rr + 2 * a * ru + 2 * b * rv + a * a * uu + 2 * a * b * uv + b * b * vv)
    return out / len(bs)


@pytest.mark.parametrize("orthogonalize", [False, True])
def test_slice_2d_equals_the_closed_form_on_the_whole_grid(orthogonalize):
    model, bs = Affine(), quad_batches()
    res = slice_2d(model, sq, bs, seed=3, steps=(5, 7), span=((-1, 2), (-0.5, 0.5)),
                   orthogonalize=orthogonalize)
    assert isinstance(res, LossSurface) and res.losses.shape == (5, 7)
    assert res.x.tolist() == [-1.0, -0.25, 0.5, 1.25, 2.0]
    assert res.y[3] == 0.0 and res.y[0] == -0.5
    d1, d2 = res.directions
    assert torch.equal(d1, random_direction(model, seed=3))
    lf = LossFunction(model, sq, bs, mode="eval")
    p1, p2 = lf.unflatten(d1), lf.unflatten(d2)
    assert torch.count_nonzero(p1["lin.bias"]) == 0 and torch.count_nonzero(p2["lin.bias"]) == 0
    expected = closed_form(model, bs, p1, p2, res.x, res.y)
    torch.testing.assert_close(res.losses, expected, rtol=1e-12, atol=1e-13)
    raw2 = random_direction(model, seed=4)
    if orthogonalize:
        assert abs(float(d1 @ d2)) <= 1e-12 * float(d1.norm() * d2.norm())
        assert float(d2.norm()) == pytest.approx(float(raw2.norm()), rel=1e-12)
    else:
        assert torch.equal(d2, raw2)


def test_slice_2d_with_given_directions_and_one_span():
    model, bs = Affine(), quad_batches()
    lf = LossFunction(model, sq, bs, mode="eval")
    e1 = {"lin.weight": torch.ones(3, 4, dtype=DT)}
    e2 = {"lin.bias": torch.tensor([1.0, 0.0, -1.0], dtype=DT)}
    res = slice_2d(model, sq, bs, directions=(e1, e2), steps=3, span=(-1, 1))
    zero = {"lin.weight": torch.zeros(3, 4, dtype=DT), "lin.bias": torch.zeros(3, dtype=DT)}
    expected = closed_form(model, bs, {**zero, **e1}, {**zero, **e2}, res.x, res.y)
    torch.testing.assert_close(res.losses, expected, rtol=1e-12, atol=1e-13)
    assert float(res.losses[1, 1]) == lf.loss()
    with pytest.raises(ValueError, match="parallel"):
        slice_2d(model, sq, bs, directions=(e1, e1), steps=3, orthogonalize=True)


# ----------------------------------------------------------------------------- the model is untouched
def _calls(model, other, loss_fn):
    bs = batches()
    return [
        lambda mode: interpolate(model, other, loss_fn, bs, steps=3, mode=mode, interpolate_buffers=True),
        lambda mode: interpolate(model, other, loss_fn, bs, steps=3, mode=mode),
        lambda mode: slice_1d(model, loss_fn, bs, steps=3, mode=mode),
        lambda mode: slice_2d(model, loss_fn, bs, steps=3, mode=mode, orthogonalize=True),
        lambda mode: random_direction(model, seed=1),
    ]


@pytest.mark.parametrize("which", range(5))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_models_are_unchanged_bit_for_bit(which, mode):
    model, other = fill_bn_stats(mlp(0, dropout=0.2), 0), fill_bn_stats(mlp(1, dropout=0.2), 1)
    model.train()
    model[1].eval()  # mixed flags must come back as they were
    snaps = snapshot(model), snapshot(other)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonDeterministicLossWarning)  # dropout in train mode
        _calls(model, other, ce)[which](mode)
    assert_unchanged(model, snaps[0])
    assert_unchanged(other, snaps[1])
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("which", range(4))
def test_models_are_unchanged_when_loss_fn_raises_midway(which):
    model, other = fill_bn_stats(mlp(0), 0), fill_bn_stats(mlp(1), 1)
    model.train()
    snaps = snapshot(model), snapshot(other)
    calls = {"n": 0}

    def failing(m, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # after the determinism check and a few grid points
            raise RuntimeError("boom")
        return ce(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        _calls(model, other, failing)[which]("eval")
    assert calls["n"] == 6
    assert_unchanged(model, snaps[0])
    assert_unchanged(other, snaps[1])


@pytest.mark.parametrize("which", range(4))
def test_nondeterministic_loss_warns_once_per_call(which):
    model, other = mlp(0, dropout=0.5), mlp(1, dropout=0.5)
    with pytest.warns(NonDeterministicLossWarning) as record:
        _calls(model, other, ce)[which]("train")
    assert sum(issubclass(r.category, NonDeterministicLossWarning) for r in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _calls(model, other, ce)[which]("eval")


# ----------------------------------------------------------------------------- plots
def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return img


def test_plots_write_valid_non_empty_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from flatminima.plotting import plot_contour, plot_line

    model, bs = Affine(), quad_batches()
    line = slice_1d(model, sq, bs, steps=9)
    inter = interpolate(mlp(0), mlp(1), ce, batches(), steps=5, extrapolate=0.5)
    surf = slice_2d(model, sq, bs, steps=(6, 5))
    out = [
        plot_line(line, tmp_path / "line.png"),
        plot_line(inter, tmp_path / "sub" / "interp.png", logy=True),
        plot_contour(surf, tmp_path / "contour.png", levels=12),
        plot_contour(surf, tmp_path / "contour_levels.png", levels=np.linspace(0, 20, 9)),
    ]
    assert out[1] == tmp_path / "sub" / "interp.png"
    for path in out:
        img = _read_png(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        rgb = img[..., :3].reshape(-1, 3)
        assert rgb.std() > 0.05  # not a blank canvas
        assert len(np.unique((rgb * 255).round(), axis=0)) > 20  # a curve / colour map was drawn
    with pytest.raises(ValueError, match=".png"):
        plot_line(line, tmp_path / "line.jpg")
    with pytest.raises(ValueError, match="shape"):
        plot_contour(LossSurface(surf.x, surf.y[:-1], surf.losses, surf.directions, surf.names, "eval", 0),
                     tmp_path / "bad.png")


def test_plotting_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    from flatminima.plotting import plot_line

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    line = slice_1d(Affine(), sq, quad_batches(), steps=3)
    with pytest.raises(ImportError, match=r"pip install 'flatminima\[plot\]'"):
        plot_line(line, tmp_path / "x.png")


def test_core_and_plotting_module_do_not_import_matplotlib():
    code = (
        "import sys, flatminima.sharpness.landscape, flatminima.plotting; "
        "assert not any(m.startswith('matplotlib') for m in sys.modules), 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
