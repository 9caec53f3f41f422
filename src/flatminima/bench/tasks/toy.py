r"""2-D toy losses for looking at what SAM-family optimizers do near saddles and curved valleys.

Not a :class:`~flatminima.bench.tasks.base.Task`: plain functions on a parameter vector
``theta = (theta_1, theta_2)`` (any leading batch shape, last dimension 2).

* :func:`monge_toy_loss` ``(1 - theta_1 theta_2)^2``, the toy loss of Monge-SAM's Fig. 1
  (Jacobsen & Arvanitidis, arXiv 2502.08448): a curved valley of minima (loss 0) on the hyperbola
  ``theta_1 theta_2 = 1`` and a saddle at the origin (loss 1, Hessian ``[[0, -2], [-2, 0]]``:
  curvature ``-2`` along ``(1, 1) / sqrt 2``, the unstable direction that leads to the valley, and
  ``+2`` along ``(1, -1) / sqrt 2``);
* :func:`saddle_loss` ``theta_1^2 - theta_2^2 + q theta_2^4`` (``q = quartic > 0``, default 1/2): a
  saddle at the origin (loss 0, Hessian ``diag(2, -2)``, unstable direction ``theta_2``) whose
  quartic term makes the loss bounded below, ``>= -1 / (4 q)``, with the two minima
  ``(0, +-1 / sqrt(2 q))`` (``(0, +-1)``, loss ``-1/2``, for the default);
* :func:`quadratic_bowl` ``(h_1 theta_1^2 + h_2 theta_2^2) / 2``, a convex reference.

:func:`run_trajectory` runs any optimizer of the library (by registry name, e.g. ``"sgd"``,
``"sam_sgd"``, ``"msam_sgd"``, or a factory) on a 2-element ``nn.Parameter`` in float64 and returns
the iterates; :func:`escape_step` / :func:`escapes_saddle` read a trajectory, and
:func:`saddle_comparison` runs several optimizers from one start and returns the numbers.

A fact to keep in mind when reading those numbers (exact for the quadratic part of the saddle,
``H = diag(2, -2)``, and the leading-order behaviour of both toy saddles): SAM's gradient at
``theta + e``, ``e = rho g / ||g||``, ``g = H theta``, is ``H theta + rho H^2 theta / ||H theta||``.
``H^2 = 4 I`` is positive definite, so along the unstable direction the second term opposes the
first as soon as ``||g|| < 2 rho``: there SAM's step moves *towards* the saddle. Monge-SAM's
radius is ``rho / sqrt(1 + alpha^2 ||g||^2)``, which tends to ``rho`` as ``||g|| -> 0``, so close
to a saddle (where ``alpha ||g|| << 1``) it takes the same step as SAM; only where
``alpha ||g||`` is not small does its radius shrink. What this means over a whole trajectory is
measured by :func:`saddle_comparison`, not claimed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ...optim import create

__all__ = [
    "TOY_LOSSES",
    "escape_step",
    "escapes_saddle",
    "monge_toy_grad",
    "monge_toy_loss",
    "quadratic_bowl",
    "run_trajectory",
    "saddle_comparison",
    "saddle_grad",
    "saddle_loss",
]

LossFn = Callable[[Tensor], Tensor]


def _check_theta(theta: Tensor) -> Tensor:
    theta = torch.as_tensor(theta)
    if theta.dim() < 1 or theta.shape[-1] != 2:
        raise ValueError(f"theta must have a last dimension of size 2, got shape {tuple(theta.shape)}")
    return theta


def monge_toy_loss(theta: Tensor) -> Tensor:
    """``(1 - theta_1 theta_2)^2`` over the last dimension of ``theta``."""
    theta = _check_theta(theta)
    return (1.0 - theta[..., 0] * theta[..., 1]) ** 2


def monge_toy_grad(theta: Tensor) -> Tensor:
    """Closed-form gradient of :func:`monge_toy_loss`:
    ``-2 (1 - theta_1 theta_2) (theta_2, theta_1)``."""
    theta = _check_theta(theta)
    r = 1.0 - theta[..., 0] * theta[..., 1]
    return torch.stack((-2.0 * r * theta[..., 1], -2.0 * r * theta[..., 0]), dim=-1)


def saddle_loss(theta: Tensor, quartic: float = 0.5) -> Tensor:
    """``theta_1^2 - theta_2^2 + quartic * theta_2^4`` (``quartic > 0``): saddle at the origin,
    minima ``(0, +-1 / sqrt(2 quartic))`` with loss ``-1 / (4 quartic)``."""
    theta = _check_theta(theta)
    if not quartic > 0:
        raise ValueError(f"quartic must be > 0 (else the loss is unbounded below), got {quartic!r}")
    t1, t2 = theta[..., 0], theta[..., 1]
    return t1**2 - t2**2 + quartic * t2**4


def saddle_grad(theta: Tensor, quartic: float = 0.5) -> Tensor:
    """Closed-form gradient of :func:`saddle_loss`: ``(2 theta_1, -2 theta_2 + 4 q theta_2^3)``."""
    theta = _check_theta(theta)
    t1, t2 = theta[..., 0], theta[..., 1]
    return torch.stack((2.0 * t1, -2.0 * t2 + 4.0 * quartic * t2**3), dim=-1)


def quadratic_bowl(theta: Tensor, curvatures: Sequence[float] = (1.0, 10.0)) -> Tensor:
    """``(h_1 theta_1^2 + h_2 theta_2^2) / 2`` with ``(h_1, h_2) = curvatures``."""
    theta = _check_theta(theta)
    h = torch.as_tensor(curvatures, dtype=theta.dtype, device=theta.device)
    return 0.5 * (h * theta**2).sum(dim=-1)


#: The toy losses by name (for :func:`run_trajectory` and :func:`saddle_comparison`).
TOY_LOSSES: dict[str, LossFn] = {"monge": monge_toy_loss, "saddle": saddle_loss, "bowl": quadratic_bowl}
#: Unit vector of the unstable direction of the saddle at the origin, per toy loss.
_UNSTABLE = {"saddle": (0.0, 1.0), "monge": (2**-0.5, 2**-0.5)}


def _loss_fn(loss: str | LossFn) -> LossFn:
    if isinstance(loss, str):
        if loss not in TOY_LOSSES:
            raise ValueError(f"unknown toy loss: {loss!r} (must be one of {sorted(TOY_LOSSES)})")
        return TOY_LOSSES[loss]
    if not callable(loss):
        raise TypeError(f"loss must be a name in TOY_LOSSES or a callable theta -> scalar, got {loss!r}")
    return loss


def run_trajectory(
    loss: str | LossFn,
    optimizer: str | Callable[..., Optimizer],
    start: Sequence[float] | Tensor,
    steps: int,
    lr: float,
    *,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    **kwargs: Any,
) -> Tensor:
    """Iterates ``theta_0 = start, theta_1, ..., theta_steps`` of an optimizer on a 2-D loss.

    Args:
        loss: a name of :data:`TOY_LOSSES` or a callable mapping a ``(2,)`` tensor to a scalar.
        optimizer: a registry name for :func:`flatminima.create` (``"sgd"``, ``"sam_sgd"``,
            ``"msam_sgd"``, ``"asam_sgd"``, ``"adam"``, ...) or a factory called as
            ``optimizer([param], lr=lr, **kwargs)`` (e.g. ``torch.optim.SGD``).
        start: the initial point (2 numbers).
        steps: number of optimizer steps (>= 0).
        lr: learning rate.
        noise: standard deviation of a gradient-noise model: step ``t`` minimizes
            ``loss(theta) + <xi_t, theta>`` with ``xi_t ~ N(0, noise^2 I)`` drawn from a
            ``torch.Generator`` seeded with ``seed``; one ``xi_t`` per step, shared by every pass of
            that step (like SAM's two passes on one minibatch). ``0`` (default): deterministic,
            full-batch gradients.
        seed: the noise seed (the trajectory is a function of the arguments alone).
        dtype: of the parameter (default float64).
        **kwargs: optimizer options, e.g. ``rho``, ``alpha``, ``momentum``.

    Returns:
        a ``(steps + 1, 2)`` tensor of ``dtype``; row 0 is ``start``.

    Each step calls ``optimizer.zero_grad()`` then ``optimizer.step(closure)`` with the closure
    ``loss.backward(); return loss``, which base optimizers and SAM-family wrappers both accept.
    """
    fn = _loss_fn(loss)
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be finite and >= 0, got {noise!r}")
    theta0 = torch.as_tensor(start, dtype=dtype).detach().clone().reshape(-1)
    if theta0.numel() != 2:
        raise ValueError(f"start must hold 2 numbers, got {theta0.numel()}")
    param = nn.Parameter(theta0)
    opt = create(optimizer, [param], lr=lr, **kwargs) if isinstance(optimizer, str) else \
        optimizer([param], lr=lr, **kwargs)
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.empty(steps + 1, 2, dtype=dtype)
    out[0] = theta0
    for t in range(steps):
        xi = noise * torch.randn(2, generator=gen, dtype=dtype) if noise > 0 else None

        def closure(xi: Tensor | None = xi) -> Tensor:
            value = fn(param)
            if xi is not None:
                value = value + (xi * param).sum()
            value.backward()
            return value

        opt.zero_grad()
        opt.step(closure)
        out[t + 1] = param.detach()
    return out


def _distances(trajectory: Tensor, center: Sequence[float]) -> Tensor:
    trajectory = torch.as_tensor(trajectory)
    if trajectory.dim() != 2 or trajectory.shape[1] != 2:
        raise ValueError(f"trajectory must have shape (steps + 1, 2), got {tuple(trajectory.shape)}")
    c = torch.as_tensor(center, dtype=trajectory.dtype)
    return torch.linalg.vector_norm(trajectory - c, dim=1)


def escape_step(trajectory: Tensor, radius: float, center: Sequence[float] = (0.0, 0.0)) -> int | None:
    """The first index whose iterate lies strictly farther than ``radius`` from ``center`` (the
    saddle), or ``None`` if none does."""
    far = torch.nonzero(_distances(trajectory, center) > radius).flatten()
    return int(far[0]) if far.numel() else None


def escapes_saddle(trajectory: Tensor, radius: float, center: Sequence[float] = (0.0, 0.0)) -> bool:
    """Whether the trajectory *ends* strictly farther than ``radius`` from ``center`` (leaving the
    ball and coming back does not count; see :func:`escape_step` for the first exit)."""
    return bool(_distances(trajectory, center)[-1] > radius)


def saddle_comparison(
    loss: str | LossFn = "saddle",
    optimizers: Sequence[str] = ("sgd", "sam_sgd", "msam_sgd"),
    *,
    start: Sequence[float] = (0.05, 1e-3),
    steps: int = 300,
    lr: float = 0.05,
    rho: float = 0.05,
    alpha: float = 1.0,
    radius: float = 0.5,
    noise: float = 0.0,
    seed: int = 0,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run several optimizers from one start near the saddle at the origin; return the numbers.

    ``rho`` goes to every name containing ``"sam"`` and ``alpha`` to the Monge-SAM ones
    (``"msam_*"``); ``options`` adds per-name keyword arguments. For each name the result holds
    ``trajectory`` (the tensor), ``final`` (the last iterate as a tuple), ``final_distance`` from
    the saddle, ``final_loss``, ``max_distance``, ``escape_step`` and ``escaped``
    (:func:`escape_step`, :func:`escapes_saddle` with ``radius``), and ``min_unstable`` /
    ``final_unstable``: the smallest and the last ``|component|`` along the saddle's unstable
    direction (``theta_2`` for ``"saddle"``, ``(theta_1 + theta_2) / sqrt 2`` for ``"monge"``;
    absent for other losses).
    """
    fn = _loss_fn(loss)
    unstable = _UNSTABLE.get(loss) if isinstance(loss, str) else None
    results: dict[str, dict[str, Any]] = {}
    for name in optimizers:
        kw: dict[str, Any] = {}
        if "sam" in name:
            kw["rho"] = rho
        if name.startswith("msam"):
            kw["alpha"] = alpha
        kw.update((options or {}).get(name, {}))
        traj = run_trajectory(fn, name, start, steps, lr, noise=noise, seed=seed, **kw)
        dist = _distances(traj, (0.0, 0.0))
        res: dict[str, Any] = {
            "trajectory": traj,
            "final": tuple(float(v) for v in traj[-1]),
            "final_distance": float(dist[-1]),
            "final_loss": float(fn(traj[-1])),
            "max_distance": float(dist.max()),
            "escape_step": escape_step(traj, radius),
            "escaped": escapes_saddle(traj, radius),
        }
        if unstable is not None:
            u = (traj @ torch.tensor(unstable, dtype=traj.dtype)).abs()
            res["min_unstable"] = float(u.min())
            res["final_unstable"] = float(u[-1])
        results[name] = res
    return results
