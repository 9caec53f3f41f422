r"""LETS: learn the perturbation radius of any SAM-family optimizer by bilevel optimization.

Wang, Jiang, Fu, Zhang, "Enhancing Sharpness-Aware Minimization by Learning Perturbation Radius"
(arXiv 2408.08222, 2024): the radius ``rho`` is the upper-level variable of

.. math::

    \min_\rho F(\rho) = \tfrac12 \big(L_{val}(w_{t+1}(\rho)) - L_{tr}(w_{t+1}(\rho))\big)^2,

the squared generalization gap after the SAM step, whose lower level is the SAM step itself. We use
the one-step-unrolled hypergradient (the paper's method section was not available to us; this is
the derivation consistent with its summary: alternating updates, a Hessian term). The step is
``w_{t+1} = w_t - lr * g_s`` with ``g_s = \nabla L_{tr}(w_t + e)`` and ``e = rho d`` linear in ``rho``
for every rule of the library (SAM, ASAM, Monge-SAM, ESAM), so
``\partial w_{t+1} / \partial \rho = -lr H(w_t + e) d`` and

.. math::

    dF/d\rho = -(L_{val} - L_{tr}) \, (lr \odot v)^\top H d, \qquad
    v = \nabla L_{val}(w_{t+1}) - \nabla L_{tr}(w_{t+1}).

``H d`` comes from one of three estimators:

* ``"secant"`` (default): ``(g_s - g) / rho`` from the two gradients the SAM step computes anyway.
  Free, exact for quadratics, and by the mean-value theorem the Hessian averaged over the segment
  ``[w, w + e]``, which is the curvature the step actually sees.
* ``"exact"``: a Hessian-vector product by double backward at ``w_t + e``; needs the per-sample
  closure ``closure(select=None)`` (a loss that is still differentiable) and costs about two more
  passes. The reference for tests.
* ``"diagonal"``: ``diag(H) ~ g_s \odot g_s`` (the empirical Fisher diagonal) times ``d``. Free,
  always non-negative curvature; a rough, cheap fallback.

The base optimizer's update Jacobian enters as ``lr`` per group: exact for SGD (with momentum:
``lr (1 - dampening)``, times ``1 + momentum`` with Nesterov); for adaptive bases (Adam, ...) their
diagonal preconditioner is ignored, a first-order approximation.

``rho`` is optimized in log space (so it stays positive), clamped to ``[rho_min, rho_max]``, with its
own learning rate ``lr`` and interval ``every``; by default with a scalar Adam update, so that ``lr``
is the step of ``log rho`` (about the relative change of ``rho`` per update) whatever the scale of
the hypergradient. One ``rho`` for all groups (they move by the same factor) or one per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .engine import (
    SharpnessAwareOptimizer,
    _loss_tensor,
    _RNGState,
    _RunningStatsGuard,
    _sample_losses,
    accepts_select,
    check_number,
)

__all__ = ["LETS"]

_ESTIMATORS = ("secant", "exact", "diagonal")
_UPDATES = ("adam", "sgd")


class _StepRecorder:
    """Listens to one SAM step (the engine's observer) and keeps what the estimator needs."""

    def __init__(self, estimator: str, trainable: list[Tensor]) -> None:
        self.estimator = estimator
        self.trainable = trainable
        self.rho: dict[int, float] = {}
        self.d: dict[int, Tensor] = {}
        self.h: dict[int, Tensor] = {}
        self.w_adv: list[Tensor] | None = None

    @torch.no_grad()
    def perturbed(self, params: list[Tensor], e: list[Tensor], groups: list[dict[str, Any]]) -> None:
        for p, ei, g in zip(params, e, groups):
            rho = float(g["rho"])
            self.rho[id(p)] = rho
            if self.estimator != "secant" and rho > 0:
                self.d[id(p)] = ei / rho
        if self.estimator == "exact":  # w + e for the perturbed tensors, w for the others
            self.w_adv = [p.detach().clone() for p in self.trainable]

    @torch.no_grad()
    def second_pass(self, params: list[Tensor], g: list[Tensor], adv: list[Tensor | None]) -> None:
        if self.estimator == "exact":
            return
        for p, gi, a in zip(params, g, adv):
            rho = self.rho.get(id(p), 0.0)
            if a is None or rho <= 0:
                continue
            if self.estimator == "secant":
                self.h[id(p)] = (a - gi) / rho
            else:
                d = self.d.get(id(p))
                if d is not None:
                    self.h[id(p)] = a * a * d


class LETS:
    r"""Learn ``rho`` of a SAM-family optimizer from a validation closure (Wang et al. 2024).

    Args:
        optimizer: a :class:`~flatminima.SharpnessAwareOptimizer` (SAM, ASAM, MongeSAM, ESAM, ...);
            its groups' ``rho`` (all > 0) are the starting values and are updated in place.
        val_closure: the torch closure convention on a validation batch drawn from a held-out split
            of the training data (never the test set): zero grads, forward, backward, return the
            loss. A per-sample closure ``val_closure(select=None)`` returning per-sample losses
            (forward only) also works.
        lr: learning rate of ``log rho`` (default 0.01).
        every: update ``rho`` every this many steps (default 1); the steps in between are plain
            steps of ``optimizer`` with no extra cost.
        estimator: ``"secant"`` (default), ``"exact"`` or ``"diagonal"`` (see the module doc).
        per_group: one ``rho`` per param group instead of one shared factor.
        rho_min, rho_max: clamp of ``rho`` (default ``[1e-4, None]``).
        update: ``"adam"`` (default; scale-free steps of ``log rho``) or ``"sgd"``
            (``log rho -= lr * dF/dlog rho``).
        betas, eps: of the Adam update.

    Cost of an update step: the SAM step plus one forward/backward of the training closure and one
    of the validation closure at ``w_{t+1}`` (plus a Hessian-vector product for ``"exact"``).
    These extra passes leave BatchNorm statistics and the global RNG as they were, so
    ``lr = 0`` trains exactly like the wrapped optimizer.

    Example::

        sam = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        opt = flatminima.LETS(sam, val_closure, lr=0.01, every=10)
        for x, y in loader:
            opt.step(closure)          # closure on the training batch, as for SAM
        opt.stats["rho"], opt.history  # the learned radius and its trajectory
    """

    def __init__(
        self,
        optimizer: SharpnessAwareOptimizer,
        val_closure: Callable[..., Any],
        *,
        lr: float = 0.01,
        every: int = 1,
        estimator: str = "secant",
        per_group: bool = False,
        rho_min: float = 1e-4,
        rho_max: float | None = None,
        update: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,
    ) -> None:
        if not isinstance(optimizer, SharpnessAwareOptimizer):
            raise TypeError(
                f"LETS wraps a SAM-family optimizer (SAM, ASAM, MongeSAM, ESAM), got {type(optimizer)!r}"
            )
        if not callable(val_closure):
            raise TypeError(f"val_closure must be callable, got {val_closure!r}")
        self.lr = check_number("lr", lr)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"invalid every: {every!r} (must be an int >= 1)")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"invalid estimator: {estimator!r} (must be one of {_ESTIMATORS})")
        if update not in _UPDATES:
            raise ValueError(f"invalid update: {update!r} (must be one of {_UPDATES})")
        self.rho_min = check_number("rho_min", rho_min, low_inclusive=False)
        if rho_max is not None and check_number("rho_max", rho_max) <= self.rho_min:
            raise ValueError(f"invalid rho_max: {rho_max!r} (must be > rho_min = {self.rho_min})")
        self.rho_max = None if rho_max is None else float(rho_max)
        for name, b in zip(("betas[0]", "betas[1]"), betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"invalid {name}: {b!r} (must be in [0, 1))")
        self.eps = check_number("eps", eps)
        for i, g in enumerate(optimizer.param_groups):
            if float(g.get("rho", 0.0)) <= 0.0:
                raise ValueError(
                    f"LETS learns log(rho), so every group needs rho > 0; group {i} has "
                    f"rho={g.get('rho')!r}"
                )
        self.optimizer = optimizer
        self.val_closure = val_closure
        self.every = every
        self.estimator = estimator
        self.per_group = bool(per_group)
        self.update = update
        self.betas = (float(betas[0]), float(betas[1]))
        n = len(optimizer.param_groups) if self.per_group else 1
        self._m = [0.0] * n
        self._v = [0.0] * n
        self._t = 0  # updates of rho taken
        self._step = 0  # optimizer steps taken through LETS
        self._stats: dict[str, float] = {}
        self.history: list[tuple[int, list[float]]] = []  #: (step, rho per group) at each update

    # ------------------------------------------------------------------ delegation
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def rho(self) -> list[float]:
        """The current ``rho`` of each param group."""
        return [float(g["rho"]) for g in self.optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[..., Any] | None = None, *, scaler: Any = None) -> Any:
        """One step of the wrapped optimizer; every ``every`` steps, also one update of ``rho``.
        Returns what the wrapped optimizer's ``step`` returns."""
        opt = self.optimizer
        self._step += 1
        if (self._step - 1) % self.every != 0:
            return opt.step(closure, scaler=scaler)
        if closure is not None and self.estimator == "exact" and not accepts_select(closure):
            raise ValueError(
                "estimator='exact' needs a per-sample closure(select=None) that returns the "
                "per-sample losses without backward (the Hessian-vector product differentiates it "
                "twice); use estimator='secant' with a standard closure"
            )
        trainable = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        recorder = _StepRecorder(self.estimator, trainable)
        opt._observer = recorder
        try:
            out = opt.step(closure, scaler=scaler)
        finally:
            opt._observer = None
        if opt.stats.get("skipped", 0.0) == 1.0:
            return out  # a GradScaler skipped the step: nothing to learn from
        assert closure is not None  # opt.step raised otherwise
        self._update_rho(closure, scaler, recorder, trainable)
        return out

    def _loss_and_grads(
        self, closure: Callable[..., Any], scaler: Any, params: list[Tensor], which: str
    ) -> tuple[float, list[Tensor | None]]:
        """Loss and (unscaled) gradient of a closure at the current weights."""
        self.optimizer.zero_grad(set_to_none=True)
        per_sample = accepts_select(closure)
        with torch.enable_grad():
            if per_sample:  # we run the backward ourselves, unscaled
                loss_t = _sample_losses(closure(select=None), which).mean()
                loss_t.backward()
            else:
                loss_t = _loss_tensor(closure(), which)
        grads = [p.grad for p in params]
        if not per_sample and scaler is not None and scaler.is_enabled():  # closure scaled it
            inv = 1.0 / float(scaler.get_scale())
            grads = [None if g is None else g * inv for g in grads]
        return float(loss_t.detach()), grads

    def _lr_factor(self, group: dict[str, Any]) -> float:
        """``d w_{t+1} / d g_s`` of the base optimizer for this group (exact for SGD)."""
        lr = float(group["lr"])
        if isinstance(self.optimizer.base_optimizer, torch.optim.SGD):
            mom = float(group.get("momentum", 0.0))
            lr *= (1.0 - float(group.get("dampening", 0.0))) if mom else 1.0
            if group.get("nesterov", False):
                lr *= 1.0 + mom
        return lr

    def _update_rho(
        self, closure: Callable[..., Any], scaler: Any, rec: _StepRecorder, trainable: list[Tensor]
    ) -> None:
        opt = self.optimizer
        devices = {p.device for p in trainable}
        rng = _RNGState(devices)
        guard = _RunningStatsGuard()
        try:
            loss_tr, g_tr = self._loss_and_grads(closure, scaler, trainable, "LETS train")
            loss_val, g_val = self._loss_and_grads(self.val_closure, scaler, trainable, "LETS validation")
            gap = loss_val - loss_tr
            group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
            lr_of = [self._lr_factor(g) for g in opt.param_groups]
            u: list[Tensor] = []  # lr * (grad L_val - grad L_tr) at w_{t+1}
            for p, a, b in zip(trainable, g_val, g_tr):
                v = torch.zeros_like(p) if a is None else a.detach().clone()
                if b is not None:
                    v.sub_(b)
                u.append(v.mul_(lr_of[group_of[id(p)]]))
            if self.estimator == "exact":
                contrib = self._exact_terms(closure, rec, trainable, u)
            else:
                contrib = {
                    id(p): (ui * rec.h[id(p)]).sum() for p, ui in zip(trainable, u) if id(p) in rec.h
                }
            dfdrho = [0.0] * len(opt.param_groups)
            for pid, c in contrib.items():
                dfdrho[group_of[pid]] += -gap * float(c)
        finally:
            guard.restore()
            rng.restore()
            opt.zero_grad(set_to_none=True)
        self._apply(dfdrho)
        self._stats = {
            "hypergrad": sum(dfdrho) if not self.per_group else dfdrho[0],
            "gap": gap,
            "objective": 0.5 * gap * gap,
            "val_loss": loss_val,
            "train_loss_after": loss_tr,
        }
        self.history.append((self._step, self.rho))

    def _exact_terms(
        self, closure: Callable[..., Any], rec: _StepRecorder, trainable: list[Tensor], u: list[Tensor]
    ) -> dict[int, Tensor]:
        """``d_i (H u)_i`` per perturbed tensor, ``H`` by double backward at ``w_t + e``."""
        assert rec.w_adv is not None
        with torch.no_grad():
            now = [p.detach().clone() for p in trainable]
            for p, w in zip(trainable, rec.w_adv):
                p.copy_(w)
        try:
            with torch.enable_grad():
                loss = _sample_losses(closure(select=None), "LETS Hessian-vector product").mean()
                grads = torch.autograd.grad(loss, trainable, create_graph=True, allow_unused=True)
                dot = sum((g * ui).sum() for g, ui in zip(grads, u) if g is not None)
                if not isinstance(dot, Tensor) or not dot.requires_grad:
                    return {}
                hu = torch.autograd.grad(dot, trainable, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, w in zip(trainable, now):
                    p.copy_(w)
        return {
            id(p): (rec.d[id(p)] * h).sum()
            for p, h in zip(trainable, hu)
            if h is not None and id(p) in rec.d
        }

    def _apply(self, dfdrho: Sequence[float]) -> None:
        """One step of ``log rho`` (Adam or SGD), clamped to ``[rho_min, rho_max]``."""
        groups = self.optimizer.param_groups
        # d F / d log rho_g = rho_g * d F / d rho_g; shared: one factor moves every group.
        dlog = [float(g["rho"]) * d for g, d in zip(groups, dfdrho)]
        grads = dlog if self.per_group else [sum(dlog)]
        self._t += 1
        steps = []
        for k, gk in enumerate(grads):
            if not math.isfinite(gk):
                steps.append(0.0)
                continue
            if self.update == "sgd":
                steps.append(self.lr * gk)
                continue
            b1, b2 = self.betas
            self._m[k] = b1 * self._m[k] + (1 - b1) * gk
            self._v[k] = b2 * self._v[k] + (1 - b2) * gk * gk
            m_hat = self._m[k] / (1 - b1**self._t)
            v_hat = self._v[k] / (1 - b2**self._t)
            steps.append(self.lr * m_hat / (math.sqrt(v_hat) + self.eps))
        for i, g in enumerate(groups):
            step = steps[i] if self.per_group else steps[0]
            rho = float(g["rho"]) * math.exp(-step)
            rho = max(rho, self.rho_min)
            if self.rho_max is not None:
                rho = min(rho, self.rho_max)
            g["rho"] = rho

    # ------------------------------------------------------------------ stats and checkpoints
    @property
    def stats(self) -> dict[str, float]:
        """The wrapped optimizer's ``stats`` plus, from the last update of ``rho``: ``hypergrad``
        (``dF/drho``, summed over groups unless ``per_group``), ``gap`` (``L_val - L_tr`` at
        ``w_{t+1}``), ``objective`` (``F``), ``val_loss``, ``train_loss_after``, and ``rho`` now."""
        out = dict(self.optimizer.stats)
        out.update(self._stats)
        out["rho"] = self.rho[0]
        out["lets_updates"] = float(self._t)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` (its groups carry the current ``rho``) plus the
        LETS state (update moments, counters, history)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "lets": {
                "m": list(self._m),
                "v": list(self._v),
                "t": self._t,
                "step": self._step,
                "history": [(s, list(r)) for s, r in self.history],
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = state_dict["lets"]
        if len(own["m"]) != len(self._m):
            raise ValueError(
                f"the checkpoint learns {len(own['m'])} rho value(s), this LETS {len(self._m)} "
                "(per_group differs?)"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._m, self._v = list(own["m"]), list(own["v"])
        self._t, self._step = int(own["t"]), int(own["step"])
        self.history = [(int(s), list(r)) for s, r in own["history"]]

    def __repr__(self) -> str:
        return (
            f"LETS(lr={self.lr}, every={self.every}, estimator={self.estimator!r}, "
            f"per_group={self.per_group}, rho={self.rho}, optimizer={self.optimizer!r})"
        )
