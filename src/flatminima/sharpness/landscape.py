r"""Loss landscapes: the loss along the segment between two solutions and on 1-D / 2-D slices
around one solution, in random filter-normalized directions.

Every function evaluates the loss through :class:`~flatminima.sharpness._core.LossFunction`
(``L(w) = mean_b loss_fn(model[w], b)`` over the given batches, equal weight per batch), so:

* the model is never written to: each function runs inside
  :func:`~flatminima.sharpness._core.preserved`, which puts weights, buffers, every module's
  ``training`` flag and the global RNG back, also when ``loss_fn`` raises;
* ``mode`` (``"eval"`` or ``"train"``) is explicit, default ``"eval"`` (running BatchNorm statistics,
  no dropout). In ``"train"`` mode BatchNorm normalizes with batch statistics but its running
  statistics are not updated (the buffers are passed as copies), and a model with active dropout
  gives a noisy landscape: :meth:`~flatminima.sharpness._core.LossFunction.check_deterministic`
  runs once per call and warns (:class:`~flatminima.sharpness._core.NonDeterministicLossWarning`);
* ``params`` chooses the parameters that move (a layer, a block; see
  :data:`~flatminima.sharpness._core.ParamSelector`); the others stay at the model's values;
* ``seed`` makes the call reproducible: random directions come from a private
  :class:`torch.Generator` seeded with it (the same on every device), and the global RNG is
  seeded with it for the duration of the call (then restored).

Functions:

* :func:`interpolate`: ``L((1 - α) w_a + α w_b)`` on a grid of ``α`` (Goodfellow et al., "Qualitatively
  characterizing neural network optimization problems", ICLR 2015);
* :func:`random_direction`: a Gaussian direction with filter normalization (Li et al., "Visualizing
  the Loss Landscape of Neural Nets", NeurIPS 2018): each filter of the direction gets the norm of
  the corresponding filter of the weights, so that the scale of a slice is comparable across
  networks and insensitive to the scale invariance of ReLU / BatchNorm networks;
* :func:`slice_1d`: ``L(w + t d)`` on a grid of ``t``;
* :func:`slice_2d`: ``L(w + a d_1 + b d_2)`` on a grid of ``(a, b)``.

They return :class:`LossLine` and :class:`LossSurface` (float64 tensors); plots are in
:mod:`flatminima.plotting` (matplotlib, optional).

Differences from the reference implementations (tomgoldstein/loss-landscape, loss-landscapes):
the caller's model is never left perturbed, directions are Gaussian (as in Li et al.), the second
2-D direction is orthogonalized *after* normalization (so the two are exactly orthogonal), and 1-D
parameters are normalized once per tensor, never repeatedly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._core import LossFn, LossFunction, ParamSelector, check_mode, preserved, select_parameters

__all__ = [
    "LossLine",
    "LossSurface",
    "interpolate",
    "random_direction",
    "slice_1d",
    "slice_2d",
]

#: A direction: a flat vector over the selected parameters (the order of
#: :attr:`LossFunction.names`), or ``{name: tensor}`` (missing parameters: zero).
Direction = Tensor | Mapping[str, Tensor]

_NORMALIZATIONS = ("filter", "layer", None)
_IGNORES = ("biasbn", None)


# ---------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LossLine:
    r"""The loss along a line ``w(t) = w_origin + t · direction``.

    Attributes:
        coords: the ``t`` values, float64, shape ``(n,)`` (``α`` for an interpolation).
        losses: ``L(w(t))``, float64, shape ``(n,)``.
        kind: ``"interpolation"`` (``w_origin = w_a``, ``direction = w_b − w_a``; the points are
            evaluated as ``(1 − α) w_a + α w_b``) or ``"slice"`` (``w_origin`` = the model's weights).
        direction: the flat direction over ``names`` (on the parameters' device).
        names: the parameters that move, in the order of ``direction``.
        mode: ``"eval"`` or ``"train"``.
        seed: the seed of the call.
    """

    coords: Tensor
    losses: Tensor
    kind: str
    direction: Tensor
    names: tuple[str, ...]
    mode: str
    seed: int

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(coords, losses)`` as float64 numpy arrays."""
        return self.coords.numpy(), self.losses.numpy()


@dataclass(frozen=True)
class LossSurface:
    r"""The loss on a plane ``w(a, b) = w + a d_1 + b d_2``.

    Attributes:
        x: the ``a`` values, float64, shape ``(nx,)``.
        y: the ``b`` values, float64, shape ``(ny,)``.
        losses: float64, shape ``(nx, ny)``: ``losses[i, j] = L(w + x[i] d_1 + y[j] d_2)``
            (transpose it for ``matplotlib.contour(x, y, Z)``, which wants ``Z[j, i]``).
        directions: ``(d_1, d_2)``, flat vectors over ``names``.
        names: the parameters that move.
        mode, seed: as given.
    """

    x: Tensor
    y: Tensor
    losses: Tensor
    directions: tuple[Tensor, Tensor]
    names: tuple[str, ...]
    mode: str
    seed: int

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x, y, losses)`` as float64 numpy arrays."""
        return self.x.numpy(), self.y.numpy(), self.losses.numpy()


# ---------------------------------------------------------------------------------------- helpers
def _check_steps(steps: int, what: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"{what} must be an integer >= 2, got {steps!r}")
    return steps


def _check_span(span: Sequence[float], what: str = "span") -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in span)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair (low, high), got {span!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{what} must be finite with low < high, got {span!r}")
    return lo, hi


def _grid(lo: float, hi: float, n: int) -> Tensor:
    """``n`` evenly spaced float64 points from ``lo`` to ``hi`` (both exact); a point within
    rounding of 0 is set to exactly 0, so that a grid through the origin evaluates ``L(w)``
    itself."""
    k = torch.arange(n, dtype=torch.float64)
    g = (lo * (n - 1 - k) + hi * k) / (n - 1)  # exact for integer spans: 0.3, not 0.30000000000000004
    g[0], g[-1] = lo, hi
    g[g.abs() <= 1e-12 * (hi - lo)] = 0.0
    return g


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def _flat_direction(lf: LossFunction, direction: Direction, what: str = "direction") -> Tensor:
    """A user direction as a flat vector of ``lf``'s dtype and device."""
    if isinstance(direction, Mapping):
        unknown = sorted(set(direction) - set(lf.names))
        if unknown:
            raise ValueError(
                f"{what}: names {unknown} are not among the selected parameters {lf.names[:6]}..."
            )
        parts: list[Tensor | None] = []
        for name, shape in zip(lf.names, lf.shapes):
            t = direction.get(name)
            if t is not None and tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"{what}[{name!r}] has shape {tuple(t.shape)}, the parameter {tuple(shape)}"
                )
            parts.append(None if t is None else t.detach().to(lf.device))
        return lf.flatten(parts)
    if not isinstance(direction, Tensor):
        raise TypeError(f"{what} must be a flat tensor or a {{name: tensor}} mapping, got {direction!r}")
    if direction.dim() != 1 or direction.numel() != lf.numel:
        raise ValueError(
            f"{what} must be a flat vector of {lf.numel} numbers (the selected parameters "
            f"{list(lf.names[:6])}...), got shape {tuple(direction.shape)}"
        )
    return direction.detach().to(device=lf.device, dtype=lf.dtype)


def _normalize(d: Tensor, w: Tensor, normalization: str | None) -> Tensor:
    r"""Rescale ``d`` (float64) to the scale of ``w`` (float64), same shape.

    ``"filter"``: ``d_f ← d_f · ‖w_f‖ / ‖d_f‖`` for each filter ``f`` (slice along dim 0) of a
    tensor with ``dim ≥ 2``; a 0-D or 1-D tensor is one unit. ``"layer"``: ``d ← d · ‖w‖ / ‖d‖``.
    ``None``: unchanged. A zero ``w_f`` gives a zero ``d_f``."""
    if normalization is None:
        return d
    if normalization == "filter" and d.dim() >= 2:
        d2, w2 = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
        scale = w2.norm(dim=1, keepdim=True) / d2.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return (d2 * scale).reshape(d.shape)
    return d * (w.norm() / d.norm().clamp_min(1e-300))


def _evaluate_line(lf: LossFunction, origin: Tensor, direction: Tensor, coords: Tensor) -> Tensor:
    losses = [lf.loss(origin + float(t) * direction) for t in coords]
    return torch.tensor(losses, dtype=torch.float64)


# ---------------------------------------------------------------------------------------- API
def random_direction(
    model: nn.Module,
    *,
    seed: int,
    params: ParamSelector = None,
    normalization: str | None = "filter",
    ignore: str | None = "biasbn",
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""A random Gaussian direction over the selected parameters, normalized to the weights' scale.

    ``d ~ N(0, I)`` is drawn in float64 from a CPU :class:`torch.Generator` seeded with ``seed``
    (one draw per trainable parameter of ``model`` in ``named_parameters`` order, whatever
    ``params`` selects, so the direction of a layer does not depend on the selection nor on the
    device), then, per parameter tensor ``w``:

    * ``normalization="filter"`` (Li et al. 2018, eq. in §4): for each filter ``f`` of a tensor with
      ``dim ≥ 2`` (the slice ``w[f]`` along dim 0: an output channel of a convolution, an output
      row of a linear layer or an embedding row) ``d_f ← d_f · ‖w_f‖ / ‖d_f‖``, so ``‖d_f‖ = ‖w_f‖``;
      a 1-D tensor (not ignored) is normalized as one unit;
    * ``normalization="layer"``: ``d ← d · ‖w‖ / ‖d‖`` per tensor;
    * ``normalization=None``: the raw Gaussian;
    * ``ignore="biasbn"`` sets the direction of every tensor with ``dim ≤ 1`` to zero (biases,
      BatchNorm / LayerNorm weights), as ``--xignore biasbn`` in Li et al.'s code; ``None``
      keeps them.

    Args:
        model: read only.
        seed: the generator's seed (required: a direction is only meaningful with its seed).
        params: which parameters (:data:`~flatminima.sharpness._core.ParamSelector`).
        normalization: ``"filter"``, ``"layer"`` or ``None``.
        ignore: ``"biasbn"`` or ``None``.
        dtype: of the result (default: that of the first selected parameter).

    Returns:
        A flat vector in the order of ``LossFunction(model, ..., params=params).names``, on the
        parameters' device.
    """
    seed = _check_seed(seed)
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be 'filter', 'layer' or None, got {normalization!r}")
    if ignore not in _IGNORES:
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    with preserved(model, seed):
        chosen = {name for name, _ in select_parameters(model, params)}
        gen = torch.Generator(device="cpu").manual_seed(seed)
        parts: list[Tensor] = []
        first: Tensor | None = None
        for name, p in select_parameters(model, None):
            d = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name not in chosen:
                continue
            first = p if first is None else first
            w = p.detach().to(torch.float64)
            d = d.to(w.device)
            if ignore == "biasbn" and p.dim() <= 1:
                d = torch.zeros_like(d)
            else:
                d = _normalize(d, w, normalization)
            parts.append(d.reshape(-1))
        assert first is not None  # select_parameters raised otherwise
        return torch.cat(parts).to(dtype or first.dtype)


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    steps: int = 21,
    alphas: Sequence[float] | Tensor | None = None,
    mode: str = "eval",
    extrapolate: float = 0.0,
    params: ParamSelector = None,
    interpolate_buffers: bool = False,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> LossLine:
    r"""The loss on the segment between two solutions: ``L((1 − α) w_a + α w_b)`` for each ``α``.

    ``α = 0`` is ``model_a`` and ``α = 1`` is ``model_b`` exactly (the weights are formed as
    ``(1 − α) w_a + α w_b``, not ``w_a + α (w_b − w_a)``, so the endpoints are bit for bit the two
    models' weights). A barrier ``max_α L(α) − max(L(0), L(1))`` well above zero means that the
    two solutions are not linearly connected (Goodfellow et al. 2015; Frankle et al., "Linear Mode
    Connectivity and the Lottery Ticket Hypothesis", ICML 2020).

    Args:
        model_a, model_b: two models with the same parameter names and shapes (``ValueError``
            otherwise); never written to. The loss is evaluated with ``model_a``'s modules.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar tensor.
        batches: the batches; the loss is the mean of ``loss_fn`` over them.
        steps: number of evenly spaced ``α`` in ``[0, 1]`` (both included); with ``extrapolate =
            e > 0``, points at about the same spacing are added on ``[−e, 0)`` and ``(1, 1 + e]``
            (``−e`` and ``1 + e`` included).
        alphas: explicit ``α`` values (then ``steps`` and ``extrapolate`` are ignored).
        mode: ``"eval"`` (default) or ``"train"``, explicit (see the module docstring).
        extrapolate: how far to go beyond the segment on each side, ``≥ 0``.
        params: which parameters are interpolated; the others (and parameters with
            ``requires_grad=False``) keep ``model_a``'s values.
        interpolate_buffers: ``False`` (default): buffers (BatchNorm running statistics) are
            ``model_a``'s at every ``α``. ``True``: floating-point buffers are interpolated as
            ``(1 − α) b_a + α b_b`` too (integer buffers such as ``num_batches_tracked`` stay
            ``model_a``'s), so that ``α = 1`` is exactly ``model_b``. Neither is right in between:
            the BatchNorm statistics of an interpolated network are not the interpolation of the
            statistics. For a faithful curve with BatchNorm in eval mode, build the interpolated
            model at each ``α`` and recompute its statistics with
            :func:`flatminima.optim.averaging.update_bn` (as for SWA), or use ``mode="train"``
            (batch statistics).
        dtype: computation dtype (default: the parameters').
        seed: seeds the global RNG during the call (then restored).

    Returns:
        A :class:`LossLine` with ``kind="interpolation"``, ``coords`` = the ``α`` values and
        ``direction = w_b − w_a``.
    """
    seed = _check_seed(seed)
    check_mode(mode)
    if alphas is None:
        steps = _check_steps(steps)
        e = float(extrapolate)
        if not (math.isfinite(e) and e >= 0):
            raise ValueError(f"extrapolate must be a finite number >= 0, got {extrapolate!r}")
        coords = _grid(0.0, 1.0, steps)
        if e > 0:
            n_ext = max(1, math.ceil(e * (steps - 1) - 1e-9))
            coords = torch.cat([_grid(-e, 0.0, n_ext + 1)[:-1], coords, _grid(1.0, 1.0 + e, n_ext + 1)[1:]])
    else:
        coords = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu().reshape(-1).clone()
        if coords.numel() == 0 or not bool(torch.isfinite(coords).all()):
            raise ValueError(f"alphas must be a non-empty sequence of finite numbers, got {alphas!r}")

    _check_same_structure(model_a, model_b, buffers=interpolate_buffers)
    with preserved(model_a, seed), preserved(model_b):
        lf = LossFunction(model_a, loss_fn, batches, mode=mode, params=params, dtype=dtype)
        pb = dict(model_b.named_parameters())
        w_a = lf.w0
        w_b = lf.flatten([pb[n].detach().to(lf.device) for n in lf.names])
        pairs: list[tuple[str, Tensor, Tensor]] = []
        if interpolate_buffers:
            bb = dict(model_b.named_buffers())
            pairs = [
                (n, b.detach().clone(), bb[n].detach().to(b.device).clone())
                for n, b in model_a.named_buffers()
                if b.is_floating_point()
            ]
        lf.check_deterministic()
        losses: list[float] = []
        for alpha in coords.tolist():
            if pairs:
                lf.buffer_values = {n: (1 - alpha) * ba + alpha * bb_ for n, ba, bb_ in pairs}
            losses.append(lf.loss((1 - alpha) * w_a + alpha * w_b))
        return LossLine(
            coords=coords,
            losses=torch.tensor(losses, dtype=torch.float64),
            kind="interpolation",
            direction=w_b - w_a,
            names=tuple(lf.names),
            mode=mode,
            seed=seed,
        )


def slice_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    direction: Direction | None = None,
    seed: int = 0,
    steps: int = 21,
    span: tuple[float, float] = (-1.0, 1.0),
    mode: str = "eval",
    params: ParamSelector = None,
    normalization: str | None = "filter",
    ignore: str | None = "biasbn",
    dtype: torch.dtype | None = None,
) -> LossLine:
    r"""The loss on a line through the model's weights: ``L(w + t d)`` for ``steps`` evenly spaced
    ``t`` in ``span`` (a grid point within rounding of ``t = 0`` is exactly ``L(w)``).

    Args:
        model: never written to.
        loss_fn, batches: as in :class:`~flatminima.sharpness._core.LossFunction`.
        direction: a flat vector over the selected parameters or ``{name: tensor}``; default: a
            random direction ``random_direction(model, seed=seed, params=params,
            normalization=normalization, ignore=ignore)`` (filter-normalized, biases and norm
            layers fixed). A given direction is used as is (not normalized).
        seed: for the random direction and the global RNG during the call (restored after).
        steps, span: the grid of ``t`` (with filter normalization, ``t = ±1`` moves every filter
            by its own norm).
        mode: ``"eval"`` (default) or ``"train"``.
        params, normalization, ignore: see :func:`random_direction`.
        dtype: computation dtype (default: the parameters').

    Returns:
        A :class:`LossLine` with ``kind="slice"``.
    """
    seed = _check_seed(seed)
    check_mode(mode)
    coords = _grid(*_check_span(span), _check_steps(steps))
    with preserved(model, seed):
        lf = LossFunction(model, loss_fn, batches, mode=mode, params=params, dtype=dtype)
        if direction is None:
            d = random_direction(
                model, seed=seed, params=params, normalization=normalization, ignore=ignore,
                dtype=lf.dtype,
            )
        else:
            d = _flat_direction(lf, direction)
        lf.check_deterministic()
        return LossLine(
            coords=coords,
            losses=_evaluate_line(lf, lf.w0, d, coords),
            kind="slice",
            direction=d,
            names=tuple(lf.names),
            mode=mode,
            seed=seed,
        )


def slice_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    directions: tuple[Direction, Direction] | None = None,
    seed: int = 0,
    steps: int | tuple[int, int] = (21, 21),
    span: tuple[float, float] | tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-1.0, 1.0)),
    mode: str = "eval",
    params: ParamSelector = None,
    normalization: str | None = "filter",
    ignore: str | None = "biasbn",
    orthogonalize: bool = False,
    dtype: torch.dtype | None = None,
) -> LossSurface:
    r"""The loss on a plane through the model's weights: ``L(w + a d_1 + b d_2)`` on a grid.

    By default ``d_1`` and ``d_2`` are two independent random directions (:func:`random_direction`
    with seeds ``seed`` and ``seed + 1``, filter-normalized, biases and norm layers fixed). In high
    dimension they are nearly orthogonal already; ``orthogonalize=True`` makes them exactly so
    (Gram-Schmidt after normalization: ``d_2 ← d_2 − (d_2·d_1 / d_1·d_1) d_1``, then ``d_2`` is
    rescaled to its former norm, so ``d_1`` keeps its filter normalization and ``d_2`` keeps its
    overall scale, though not exactly its per-filter norms).

    Args:
        model: never written to.
        loss_fn, batches: as in :class:`~flatminima.sharpness._core.LossFunction`.
        directions: ``(d_1, d_2)``, each a flat vector or ``{name: tensor}``, used as given (also
            orthogonalized when asked).
        seed: seeds of the random directions (``seed``, ``seed + 1``) and of the global RNG during
            the call (restored after).
        steps: grid size ``(nx, ny)`` (an int for both).
        span: ``((a_lo, a_hi), (b_lo, b_hi))``, or one ``(lo, hi)`` for both axes.
        mode: ``"eval"`` (default) or ``"train"``.
        params, normalization, ignore: see :func:`random_direction`.
        orthogonalize: see above.
        dtype: computation dtype (default: the parameters').

    Returns:
        A :class:`LossSurface` with ``losses[i, j] = L(w + x[i] d_1 + y[j] d_2)``.
    """
    seed = _check_seed(seed)
    check_mode(mode)
    nx, ny = (steps, steps) if isinstance(steps, int) else tuple(steps)
    nx, ny = _check_steps(nx, "steps[0]"), _check_steps(ny, "steps[1]")
    span_t = tuple(span)
    if len(span_t) == 2 and all(isinstance(s, (int, float)) for s in span_t):
        span_x = span_y = _check_span(span_t)  # type: ignore[arg-type]
    elif len(span_t) == 2:
        span_x, span_y = _check_span(span_t[0], "span[0]"), _check_span(span_t[1], "span[1]")  # type: ignore[arg-type]
    else:
        raise ValueError(f"span must be (low, high) or ((a_low, a_high), (b_low, b_high)), got {span!r}")
    xs, ys = _grid(*span_x, nx), _grid(*span_y, ny)
    with preserved(model, seed):
        lf = LossFunction(model, loss_fn, batches, mode=mode, params=params, dtype=dtype)
        if directions is None:
            d1, d2 = (
                random_direction(
                    model, seed=s, params=params, normalization=normalization, ignore=ignore,
                    dtype=lf.dtype,
                )
                for s in (seed, seed + 1)
            )
        else:
            if len(directions) != 2:
                raise ValueError(f"directions must be a pair (d1, d2), got {len(directions)} items")
            d1 = _flat_direction(lf, directions[0], "directions[0]")
            d2 = _flat_direction(lf, directions[1], "directions[1]")
        if orthogonalize:
            d1_64, d2_64 = d1.to(torch.float64), d2.to(torch.float64)
            denom = float(d1_64 @ d1_64)
            if denom == 0.0:
                raise ValueError("cannot orthogonalize against a zero direction d1")
            proj = d2_64 - (float(d2_64 @ d1_64) / denom) * d1_64
            norm = float(proj.norm())
            if norm == 0.0:
                raise ValueError("d2 is parallel to d1: nothing is left after orthogonalization")
            d2 = (proj * (float(d2_64.norm()) / norm)).to(lf.dtype)
        lf.check_deterministic()
        losses = torch.empty(nx, ny, dtype=torch.float64)
        for i, a in enumerate(xs.tolist()):
            step_a = a * d1
            for j, b in enumerate(ys.tolist()):
                losses[i, j] = lf.loss(lf.w0 + (step_a + b * d2))
        return LossSurface(
            x=xs, y=ys, losses=losses, directions=(d1, d2), names=tuple(lf.names), mode=mode,
            seed=seed,
        )


# ---------------------------------------------------------------------------------------- internals
def _check_same_structure(model_a: nn.Module, model_b: nn.Module, *, buffers: bool) -> None:
    """``ValueError`` naming the first differences when the two models' parameters (and buffers,
    when they are interpolated) differ in names or shapes."""
    groups = [("parameter", dict(model_a.named_parameters()), dict(model_b.named_parameters()))]
    if buffers:
        groups.append(("buffer", dict(model_a.named_buffers()), dict(model_b.named_buffers())))
    for kind, ta, tb in groups:
        only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
        if only_a or only_b:
            raise ValueError(
                f"model_a and model_b must have the same {kind} names: only in model_a "
                f"{only_a[:5]}, only in model_b {only_b[:5]}"
            )
        shapes = [(n, tuple(ta[n].shape), tuple(tb[n].shape)) for n in ta if ta[n].shape != tb[n].shape]
        if shapes:
            n, sa, sb = shapes[0]
            raise ValueError(
                f"model_a and model_b must have the same {kind} shapes: {n!r} is {sa} in model_a "
                f"and {sb} in model_b ({len(shapes)} mismatches)"
            )


