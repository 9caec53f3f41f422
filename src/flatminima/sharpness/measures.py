r"""Sharpness measures: worst-case, average and m-sharpness, plain or adaptive, over a user loss.

Notation: ``L(w)`` is the mean of ``loss_fn(model, batch)`` over the given batches, as a function of the
flat vector ``w`` of the measured parameters (all of them, or those chosen by ``params``), ``w`` is the
model's current value of that vector and ``n`` its length. Every measure is a *loss increase*
``L(w + delta) - L(w)`` for perturbations ``delta`` of size ``rho``:

* **worst-case sharpness** (Keskar et al. 2017; Foret et al. 2021):
  ``S_max(w) = max_{||delta|| <= rho} L(w + delta) - L(w)`` (:func:`worst_case_sharpness`);
* **average sharpness** (Jiang et al. 2020): ``S_avg(w) = E_delta[L(w + delta)] - L(w)`` with
  ``delta`` random of expected squared norm ``rho^2`` (:func:`average_sharpness`);
* **m-sharpness** (Foret et al. 2021; Andriushchenko & Flammarion 2022): the data split into
  sub-batches ``S`` of ``m`` samples, each with its *own* worst case, averaged:
  ``mean_S max_{||delta|| <= rho} [L_S(w + delta) - L_S(w)]`` (:func:`m_sharpness`);
* **adaptive** variants (``adaptive=True``; Kwon et al. 2021, Andriushchenko et al. 2023): the ball is
  measured relative to the weights, ``||delta / (|w| + eta)|| <= rho`` (element-wise division), i.e.
  ``delta = (|w| + eta) * u`` with ``||u|| <= rho``. With ``eta = 0`` the measure is invariant to the
  rescalings of the weights that leave the network's function unchanged (a ReLU layer times ``c``, the
  next one times ``1/c``), which plain sharpness is not; weights that are exactly zero are then never
  perturbed.

Every function works in the ``u`` coordinates (``u = delta`` when ``adaptive=False``), never writes to
the model (evaluations go through :class:`~flatminima.sharpness.LossFunction`), runs inside
:func:`~flatminima.sharpness.preserved` (weights, buffers, ``training`` flags and the global RNG come
back exactly as they were, also after an exception), takes an explicit ``mode`` and a ``seed``, checks
once that the loss is deterministic (:class:`~flatminima.sharpness.NonDeterministicLossWarning`), and
returns a frozen :class:`SharpnessResult`.

References:
    Keskar et al., "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp Minima",
    ICLR 2017. Jiang et al., "Fantastic Generalization Measures and Where to Find Them", ICLR 2020.
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021.
    Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep
    Neural Networks", ICML 2021. Andriushchenko & Flammarion, "Towards Understanding Sharpness-Aware
    Minimization", ICML 2022. Andriushchenko, Croce, Müller, Hein & Flammarion, "A Modern Look at the
    Relationship between Sharpness and Generalization", ICML 2023. Croce & Hein, "Reliable Evaluation
    of Adversarial Robustness with an Ensemble of Diverse Parameter-free Attacks", ICML 2020 (the
    ``2 rho`` initial step and step halving of the ascent).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._core import LossFn, LossFunction, ParamSelector, check_choice, check_int, check_mode, preserved

__all__ = ["SharpnessResult", "average_sharpness", "m_sharpness", "worst_case_sharpness"]

_NORMS = ("l2", "linf")
_DISTRIBUTIONS = ("gaussian", "sphere")



@dataclass(frozen=True)
class SharpnessResult:
    """The result of a sharpness measure (``float(result)`` is ``result.value``).

    Attributes:
        measure: ``"worst_case"``, ``"average"`` or ``"m_sharpness"``.
        value: the sharpness, ``perturbed_loss - loss`` (for the average and m-sharpness: the mean of
            the individual loss increases in ``values``, weighted as described there).
        loss: ``L(w)``, the loss at the model's weights.
        perturbed_loss: the loss at the perturbed weights: the best point found (worst case), the
            mean over the draws (average), the weighted mean over the sub-batches (m-sharpness).
        rho: the radius.
        adaptive, eta: whether the ball is relative to ``|w| + eta``.
        norm: the norm of the ball, ``"l2"`` or ``"linf"`` (always ``"l2"`` for the average).
        steps: ascent steps (worst case, m-sharpness); ``None`` for the average.
        num_samples: random draws (average) or sub-batches (m-sharpness); 1 for the worst case.
        distribution: ``"gaussian"`` or ``"sphere"`` for the average, else ``None``.
        m: the sub-batch size of m-sharpness (``None``: one sub-batch per given batch).
        std_error: the standard error of ``value`` (average only: the sample standard deviation of
            ``values`` over ``sqrt(num_samples)``; ``nan`` for one draw); ``None`` otherwise.
        values: the individual loss increases: per ascent iterate (worst case: ``values[0]`` is the
            first-order point), per draw (average), per sub-batch (m-sharpness).
        evaluations: calls of ``loss_fn`` spent (forward passes, with or without backward).
    """

    measure: str
    value: float
    loss: float
    perturbed_loss: float
    rho: float
    adaptive: bool
    eta: float
    norm: str
    steps: int | None
    num_samples: int
    distribution: str | None = None
    m: int | None = None
    std_error: float | None = None
    values: tuple[float, ...] = ()
    evaluations: int = 0

    def __float__(self) -> float:
        return self.value


# ----------------------------------------------------------------------------- validation
def _check_number(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite real ``value >= 0`` (``> 0`` when ``positive``), as a float."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    v = float(value) if ok else math.nan
    if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"invalid {name}: {value!r} (must be a finite real number {bound})")
    return v


def _check_common(rho: Any, eta: Any, mode: Any) -> tuple[float, float]:
    check_mode(mode)
    return _check_number("rho", rho), _check_number("eta", eta)


def _check_ascent(steps: Any, step_size: Any, norm: Any) -> tuple[int, float | None]:
    steps = check_int("steps", steps)
    if step_size is not None:
        step_size = _check_number("step_size", step_size, positive=True)
    check_choice("norm", norm, _NORMS)
    return steps, step_size


# ----------------------------------------------------------------------------- the ascent
def _scale(lf: LossFunction, adaptive: bool, eta: float) -> Tensor | None:
    """``T = |w| + eta`` (``delta = T * u``) when adaptive, else ``None`` (``delta = u``)."""
    return lf.w0.abs() + eta if adaptive else None


def _direction(h: Tensor, norm: str) -> Tensor:
    """The unit steepest-ascent direction for the gradient ``h``: ``h / ||h||_2`` (``0`` for ``h = 0``)
    or ``sign(h)``."""
    if norm == "linf":
        return torch.sign(h)
    peak = h.abs().max()
    if peak == 0:
        return torch.zeros_like(h)
    h = h / peak  # no overflow in the norm
    return h / torch.linalg.vector_norm(h)


def _project(u: Tensor, rho: float, norm: str) -> Tensor:
    """The Euclidean projection onto the ball ``||u|| <= rho`` of the given norm."""
    if norm == "linf":
        return u.clamp(-rho, rho)
    size = float(torch.linalg.vector_norm(u))
    return u * (rho / size) if size > rho else u


def _ascent(
    lf: LossFunction, scale: Tensor | None, rho: float, steps: int, step_size: float | None, norm: str
) -> tuple[float, float, list[float]]:
    """Projected normalized-gradient ascent on ``u -> L(w + T u)`` over ``||u|| <= rho``.

    Returns ``(L(w), best perturbed loss, [L(w + T u_t) - L(w) for each iterate])``.
    """
    w0 = lf.w0

    def point(u: Tensor) -> Tensor:
        return w0 + (u if scale is None else scale * u)

    def u_grad(g: Tensor) -> Tensor:  # chain rule: d/du L(w + T u) = T * grad L
        return g if scale is None else scale * g

    loss0, g = lf.grad(w0)
    u = rho * _direction(u_grad(g), norm)  # the first-order (SAM / ASAM) solution
    alpha = 2.0 * rho if step_size is None else step_size
    best_f, best_u, best_h = -math.inf, u, None
    trace: list[float] = []
    for t in range(steps):
        last = t == steps - 1
        if last:
            f, h = lf.loss(point(u)), None
        else:
            f, gu = lf.grad(point(u))
            h = u_grad(gu)
        trace.append(f - loss0)
        if t == 0 or f > best_f:
            best_f, best_u, best_h = f, u, h
        else:  # no progress: retry from the best point with half the step
            alpha /= 2.0
        if not last:
            u = _project(best_u + alpha * _direction(best_h, norm), rho, norm)
    return loss0, best_f, trace


# ----------------------------------------------------------------------------- measures
def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    rho: float,
    *,
    steps: int = 1,
    step_size: float | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    norm: str = "l2",
    seed: int | None = 0,
    mode: str = "eval",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
) -> SharpnessResult:
    r"""Worst-case sharpness ``max_{||u|| <= rho} L(w + T u) - L(w)`` (``T = 1``, or ``|w| + eta``).

    ``steps=1`` gives the first-order solution, SAM's perturbation: with ``h = T * grad L(w)``,
    ``u = rho h / ||h||_2`` (``norm="l2"``; ``delta = rho g / ||g||``, or ASAM's
    ``delta = rho T^2 g / ||T g||`` when adaptive) or ``u = rho sign(h)`` (``norm="linf"``). For a
    quadratic ``L`` with Hessian ``A`` this gives exactly ``rho ||g|| + rho^2/2 ghat^T A ghat``.

    ``steps > 1`` continues with projected gradient ascent from that point: each step moves the best
    point so far by ``step_size`` along ``h / ||h||_2`` (or ``sign(h)``) at that point, projects back
    onto the ball (rescaling for ``l2``, clipping for ``linf``) and keeps the new point when its loss is
    higher; otherwise the step size is halved and the next step starts again from the best point. The
    step size starts at ``step_size`` (default ``2 rho``, which can cross the ball). The result is the
    loss increase at the best point seen, never below the first-order value, and a lower bound of the
    true worst case (a local maximum, not a certificate); ``values`` traces every iterate. Each step
    costs one forward and backward pass; the last iterate needs only a forward pass.

    Args:
        model: the model (never written to).
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss tensor.
        batches: the batches ``L`` averages over (equal weights per batch; any structure).
        rho: the radius, ``>= 0``.
        steps: ascent steps, ``>= 1`` (1 = the first-order solution).
        step_size: the initial step of the ascent in the ``u`` coordinates (default ``2 rho``).
        adaptive: measure the ball relative to the weights, ``||delta / (|w| + eta)|| <= rho``.
        eta: the offset of the adaptive scaling (``eta = 0``: scale invariant).
        norm: ``"l2"`` or ``"linf"`` (sign-gradient steps and clipping; a heuristic local search).
        seed: seeds the global RNG for the measurement (dropout in ``mode="train"``); restored after.
        mode: ``"eval"`` or ``"train"``, explicit.
        params: which parameters to perturb (:data:`~flatminima.sharpness.ParamSelector`).
        dtype: dtype of the computation (default: the parameters').

    Returns:
        :class:`SharpnessResult` with ``measure="worst_case"``.

    Note: at a point where the gradient is exactly zero the first-order perturbation is zero and the
    ascent cannot leave it.

    References: Keskar et al. (ICLR 2017); Foret et al. (ICLR 2021); Kwon et al. (ICML 2021);
    Andriushchenko et al. (ICML 2023).
    """
    rho, eta = _check_common(rho, eta, mode)
    steps, step_size = _check_ascent(steps, step_size, norm)
    with preserved(model, seed):
        lf = LossFunction(model, loss_fn, batches, mode=mode, params=params, dtype=dtype)
        lf.check_deterministic()
        loss0, best, trace = _ascent(lf, _scale(lf, adaptive, eta), rho, steps, step_size, norm)
    return SharpnessResult(
        measure="worst_case",
        value=best - loss0,
        loss=loss0,
        perturbed_loss=best,
        rho=rho,
        adaptive=bool(adaptive),
        eta=eta,
        norm=norm,
        steps=steps,
        num_samples=1,
        values=tuple(trace),
        evaluations=lf.evaluations,
    )


def average_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    rho: float,
    *,
    num_samples: int = 10,
    adaptive: bool = False,
    eta: float = 0.0,
    distribution: str = "gaussian",
    seed: int | None = 0,
    mode: str = "eval",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
) -> SharpnessResult:
    r"""Average sharpness ``E_u[L(w + T u)] - L(w)``, estimated from ``num_samples`` random draws.

    ``distribution="gaussian"``: ``u ~ N(0, rho^2 I / n)``, so ``E ||u||^2 = rho^2`` and ``rho`` is
    comparable with the radius of :func:`worst_case_sharpness`; ``"sphere"``: ``u`` uniform on the
    sphere ``||u|| = rho``. Both have ``E[u u^T] = rho^2 I / n``, so for a quadratic with Hessian ``A``
    (non-adaptive) both estimate ``rho^2 tr(A) / (2 n)``; the sphere has the smaller variance. ``T`` is
    ``1`` or, when adaptive, ``|w| + eta`` (``delta = T * u``).

    Convention: ``rho`` is the root-mean-square *norm* of the perturbation, not the per-coordinate
    standard deviation ``sigma`` that some works use (tml-epfl/sharpness-vs-generalization's
    ``eval_average_sharpness`` draws ``sigma * T * N(0, I)``); to reproduce such a number pass
    ``rho = sigma * sqrt(n)`` with ``n`` the number of perturbed parameters.

    The draws come from a private generator seeded with ``seed`` (independent of the loss function's
    own use of the RNG). ``value`` is the mean of the ``num_samples`` loss increases ``values`` and
    ``std_error`` their sample standard deviation over ``sqrt(num_samples)`` (``nan`` for one draw).

    Args:
        model, loss_fn, batches, seed, mode, params, dtype: as in :func:`worst_case_sharpness`.
        rho: the root-mean-square norm of ``u``, ``>= 0``.
        num_samples: number of draws, ``>= 1`` (one forward pass over the batches each).
        adaptive, eta: scale the perturbation by ``|w| + eta``.
        distribution: ``"gaussian"`` or ``"sphere"``.

    Returns:
        :class:`SharpnessResult` with ``measure="average"``.

    References: Jiang et al. (ICLR 2020); Andriushchenko et al. (ICML 2023).
    """
    rho, eta = _check_common(rho, eta, mode)
    num_samples = check_int("num_samples", num_samples)
    check_choice("distribution", distribution, _DISTRIBUTIONS)
    with preserved(model, seed):
        lf = LossFunction(model, loss_fn, batches, mode=mode, params=params, dtype=dtype)
        lf.check_deterministic()
        scale = _scale(lf, adaptive, eta)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=lf.device)
            generator.manual_seed(seed)
        loss0 = lf.loss()
        perturbed: list[float] = []
        for _ in range(num_samples):
            z = torch.randn(lf.numel, generator=generator, dtype=lf.dtype, device=lf.device)
            if distribution == "gaussian":
                u = z * (rho / math.sqrt(lf.numel))
            else:
                u = z * (rho / float(torch.linalg.vector_norm(z)))
            perturbed.append(lf.loss(lf.w0 + (u if scale is None else scale * u)))
    values = [f - loss0 for f in perturbed]
    mean = math.fsum(values) / num_samples
    if num_samples > 1:
        var = math.fsum((v - mean) ** 2 for v in values) / (num_samples - 1)
        std_error = math.sqrt(var / num_samples)
    else:
        std_error = math.nan
    return SharpnessResult(
        measure="average",
        value=mean,
        loss=loss0,
        perturbed_loss=math.fsum(perturbed) / num_samples,
        rho=rho,
        adaptive=bool(adaptive),
        eta=eta,
        norm="l2",
        steps=None,
        num_samples=num_samples,
        distribution=distribution,
        std_error=std_error,
        values=tuple(values),
        evaluations=lf.evaluations,
    )


# ----------------------------------------------------------------------------- m-sharpness
def _split(batch: Any, m: int) -> list[tuple[Any, int]]:
    """``[(sub_batch, size)]``: ``batch`` cut along its leading dimension into chunks of ``m``."""

    def size_of(t: Any) -> int | None:
        return t.shape[0] if isinstance(t, Tensor) and t.dim() > 0 else None

    if isinstance(batch, Tensor):
        tensors, rebuild = [batch], lambda parts: parts[0]
    elif isinstance(batch, (tuple, list)) and batch and all(isinstance(t, Tensor) for t in batch):
        if hasattr(batch, "_fields"):  # a namedtuple

            def rebuild(parts):
                return type(batch)(*parts)
        else:

            def rebuild(parts):
                return type(batch)(parts)

        tensors = list(batch)
    elif isinstance(batch, Mapping) and batch and all(isinstance(t, Tensor) for t in batch.values()):
        keys = list(batch)
        tensors = [batch[k] for k in keys]

        def rebuild(parts):
            return dict(zip(keys, parts))
    else:
        raise TypeError(
            f"m_sharpness cannot split a batch of type {type(batch).__name__} into sub-batches of m "
            "samples: give tensors, tuples/lists or dicts of tensors with a leading batch dimension, "
            "or m=None (each given batch is one sub-batch)"
        )
    sizes = {size_of(t) for t in tensors}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"the tensors of a batch must share a leading batch dimension to be split into "
            f"sub-batches, got shapes {[tuple(t.shape) for t in tensors]}"
        )
    (size,) = sizes
    if size == 0:
        raise ValueError("a batch has 0 samples")
    chunks = [torch.split(t, m) for t in tensors]
    return [(rebuild(list(parts)), int(parts[0].shape[0])) for parts in zip(*chunks)]


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    rho: float,
    *,
    m: int | None,
    steps: int = 1,
    step_size: float | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    norm: str = "l2",
    seed: int | None = 0,
    mode: str = "eval",
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
) -> SharpnessResult:
    r"""m-sharpness: the mean over sub-batches ``S`` of their own worst-case sharpness,
    ``sum_S (|S| / N) max_{||u|| <= rho} [L_S(w + T u) - L_S(w)]``.

    The perturbation of each sub-batch comes from that sub-batch's gradient (as in SAM with data
    parallelism, where each worker of batch ``m`` perturbs with its own gradient) and is evaluated on
    that sub-batch; the maximization is :func:`worst_case_sharpness`'s (``steps``, ``step_size``,
    ``norm``, ``adaptive``, ``eta``), on ``L_S = loss_fn(model, S)``. Smaller ``m`` gives larger values;
    ``m`` equal to the whole data is the worst-case sharpness of the full loss.

    Sub-batches: with an int ``m``, every given batch must be a tensor, a tuple/list (namedtuples
    included) or a dict of tensors sharing a leading batch dimension; each is cut along that dimension
    into chunks of ``m`` samples (the last chunk of a batch may be smaller; sub-batches never mix two
    given batches), ``loss_fn`` receives the chunks in the same structure (a dict for a mapping), and
    each sub-batch is weighted by its number of samples, so that with equal sizes the result is the
    plain mean over sub-batches. With ``m=None`` each given batch, of any structure, is one sub-batch,
    and the batches have equal weights (as in :class:`~flatminima.sharpness.LossFunction`).

    Args:
        model, loss_fn, batches, rho, steps, step_size, adaptive, eta, norm, seed, mode, params,
        dtype: as in :func:`worst_case_sharpness`.
        m: samples per sub-batch (``>= 1``), or ``None`` for one sub-batch per given batch. Required.

    Returns:
        :class:`SharpnessResult` with ``measure="m_sharpness"``: ``loss``, ``perturbed_loss`` and
        ``value`` are the weighted means over the sub-batches, ``values`` the per-sub-batch
        sharpness (in data order) and ``num_samples`` the number of sub-batches.

    References: Foret et al. (ICLR 2021), Section 4.1; Andriushchenko & Flammarion (ICML 2022);
    Andriushchenko et al. (ICML 2023).
    """
    rho, eta = _check_common(rho, eta, mode)
    if m is not None:
        m = check_int("m", m)
    steps, step_size = _check_ascent(steps, step_size, norm)
    with preserved(model, seed):
        given = list(batches)
        if m is None:
            parts = [(b, 1) for b in given]
        else:
            parts = [part for b in given for part in _split(b, m)]
        lf = LossFunction(model, loss_fn, [b for b, _ in parts], mode=mode, params=params, dtype=dtype)
        lf.check_deterministic()
        scale = _scale(lf, adaptive, eta)
        evaluations = lf.evaluations
        losses, perturbed, values = [], [], []
        for sub_batch, _ in parts:
            sub = LossFunction(model, loss_fn, [sub_batch], mode=mode, params=params, dtype=dtype)
            loss0, best, _trace = _ascent(sub, scale, rho, steps, step_size, norm)
            evaluations += sub.evaluations
            losses.append(loss0)
            perturbed.append(best)
            values.append(best - loss0)
    weights = [wgt for _, wgt in parts]
    total = sum(weights)

    def mean(xs: list[float]) -> float:
        return math.fsum(wgt * x for wgt, x in zip(weights, xs)) / total

    return SharpnessResult(
        measure="m_sharpness",
        value=mean(values),
        loss=mean(losses),
        perturbed_loss=mean(perturbed),
        rho=rho,
        adaptive=bool(adaptive),
        eta=eta,
        norm=norm,
        steps=steps,
        num_samples=len(parts),
        m=m,
        values=tuple(values),
        evaluations=evaluations,
    )
