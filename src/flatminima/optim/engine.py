r"""The two-pass engine shared by every SAM-family optimizer.

A SAM-family step on a minibatch ``B``:

1. ``g = \nabla L_B(w)`` (first pass: the closure's forward and backward at ``w``);
2. ``e = rule(w, g, rho, ...)`` (the only thing that differs between SAM, ASAM and Monge-SAM; see
   :mod:`flatminima.optim.perturbations`), computed under ``no_grad`` (``e`` is a constant);
3. ``g_adv = \nabla L_B(w + e)`` (second pass, same minibatch, same dropout masks, BatchNorm running
   statistics left as the first pass made them);
4. ``w`` is restored bit-for-bit from a copy saved in step 2, then the base optimizer steps with
   ``g_adv`` (momentum, weight decay, Adam moments and the learning rate all live in the base).

:class:`SharpnessAwareOptimizer` implements this once, with the parts of real training loops that
copies of the 70-line reference file leave to the user: ``step(closure)`` in the torch convention,
``first_step`` / ``second_step`` for manual loops, ``torch.amp.GradScaler``, BatchNorm statistics,
dropout-mask replay, gradient accumulation, clipping of the final gradient, complete checkpoints,
clear errors that leave the weights untouched, and free per-step statistics.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .perturbations import global_norm

__all__ = ["SharpnessAwareOptimizer", "accepts_select"]

_STATE_KEY = "flatminima"
_STATE_VERSION = 1


def check_number(name: str, value: Any, *, low: float = 0.0, low_inclusive: bool = True) -> float:
    """Validate a finite real hyperparameter ``value >= low`` (or ``> low``); return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v >= low if low_inclusive else v > low)
    if not ok:
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"invalid {name}: {value!r} (must be finite and {op} {low})")
    return v


def _loss_tensor(loss: Any, which: str) -> Tensor:
    if loss is None:
        raise TypeError(
            f"the closure returned None in the {which} pass; it must run forward and backward and "
            "return the loss (e.g. `loss.backward(); return loss`)"
        )
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)} "
                f"in the {which} pass"
            )
        return loss.detach().reshape(())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.tensor(float(loss))
    raise TypeError(f"the closure must return the loss (a Tensor or float), got {type(loss)!r}")


def accepts_select(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` follows the per-sample contract ``closure(select=None)`` (it has a
    parameter named ``select``) rather than the torch convention ``closure()``."""
    try:
        return "select" in inspect.signature(closure).parameters
    except (TypeError, ValueError):  # builtins and other objects without a signature
        return False


def _sample_losses(out: Any, which: str, rows: int | None = None) -> Tensor:
    """Check what a per-sample closure returned: a 1-D tensor with ``rows`` entries."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"a closure(select=None) must return the per-sample losses as a 1-D Tensor, got "
            f"{type(out)!r} in the {which} pass"
        )
    if out.dim() != 1 or out.numel() == 0:
        raise ValueError(
            f"a closure(select=None) must return a non-empty 1-D tensor of per-sample losses "
            f"(e.g. F.cross_entropy(..., reduction='none')), got shape {tuple(out.shape)} in the "
            f"{which} pass"
        )
    if rows is not None and out.numel() != rows:
        raise ValueError(
            f"the closure returned {out.numel()} per-sample losses in the {which} pass, expected "
            f"{rows} (one per selected row)"
        )
    return out


@contextlib.contextmanager
def _quiet_global_hook_warning() -> Any:
    # Our BatchNorm guard is a global hook; torch warns about it for compiled modules.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using `torch\.compile\(module\)` when")
        yield


class _RNGState:
    """Snapshot of the global torch generators (CPU and the parameters' accelerators)."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.devices: list[tuple[Any, torch.device, Tensor]] = []
        for d in devices:
            if d.type in ("cpu", "meta"):
                continue
            try:
                mod = torch.get_device_module(d.type)
                self.devices.append((mod, d, mod.get_rng_state(d)))
            except (AttributeError, RuntimeError):  # a backend without a global generator
                continue

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for mod, d, state in self.devices:
            mod.set_rng_state(state, d)


class _RunningStatsGuard:
    """Freeze the running statistics of every normalization layer run while the guard is active.

    A global forward pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``) sees
    every module called, so the optimizer needs no handle on the model. The first time a module is
    called, the guard walks its submodules (``module.modules()``) and copies ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` of each one that tracks running statistics; walking
    the tree also reaches the layers inside a ``torch.compile``-d model (whose inner modules no longer
    call hooks) or a ``DistributedDataParallel`` wrapper. :meth:`restore` writes the copies back and
    removes the hook. This is exact for every momentum, including ``momentum=None`` (cumulative
    average), where the ``momentum = 0`` trick of the reference code does not apply.
    """

    _BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self) -> None:
        self.visited: set[int] = set()
        self.saved: list[tuple[Tensor, Tensor]] = []
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        if id(module) in self.visited:
            return
        for m in module.modules():
            if id(m) in self.visited:
                continue
            self.visited.add(id(m))
            # __dict__/_buffers lookups: nn.Module.__getattr__ raises (slowly) for missing names.
            if m.__dict__.get("track_running_stats", False):
                for name in self._BUFFERS:
                    b = m._buffers.get(name)
                    if isinstance(b, Tensor):
                        self.saved.append((b, b.detach().clone()))

    def restore(self) -> None:
        self.handle.remove()
        with torch.no_grad():
            for buf, copy in self.saved:
                buf.copy_(copy)
        self.saved.clear()
        self.visited.clear()


class _Pending:
    """What ``first_step`` leaves for ``second_step``: only alive inside one step."""

    __slots__ = ("params", "saved", "grads", "grad_norm", "guard")

    def __init__(self, params, saved, grads, grad_norm, guard) -> None:
        self.params: list[Tensor] = params
        self.saved: list[Tensor] = saved
        self.grads: list[Tensor] = grads
        self.grad_norm: Tensor = grad_norm
        self.guard: _RunningStatsGuard | None = guard


class SharpnessAwareOptimizer(Optimizer):
    r"""Base class of the SAM family: a ``torch.optim.Optimizer`` that wraps a base optimizer.

    Subclasses give the per-group defaults, their validation and the perturbation rule; everything
    else (the two passes, exact restore, AMP, BatchNorm, dropout, checkpoints, stats) lives here.

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of param-group dicts
            (per-group ``rho`` and rule options are honoured; the gradient norm is global).
        base_optimizer: a ``torch.optim.Optimizer`` *class*, built on the same param groups with
            ``**base_kwargs``.
        base: an already built optimizer *instance* (instead of ``params`` and ``base_optimizer``);
            its param groups are shared and get the rule's defaults.
        foreach: use the ``torch._foreach_*`` kernels for the perturbation, save and restore
            (default ``True``); ``False`` runs the per-tensor reference loop.
        replay_rng: replay the global torch RNG state for the second closure call, so that dropout
            draws the same masks at ``w + e`` as at ``w``; afterwards the RNG continues from where the
            first pass left it, exactly as with the base optimizer (default ``True``).
        restore_running_stats: the second pass leaves the running statistics of normalization layers
            (BatchNorm, InstanceNorm with ``track_running_stats``) as the first pass made them
            (default ``True``).
        max_grad_norm: clip the final (second-pass, unscaled) gradient to this global norm before
            the base step (default ``None``: no clipping).
        check_finite: raise ``FloatingPointError`` when a pass gives a non-finite loss or gradient
            (one host sync per pass). Under a ``GradScaler`` the scaler's skip replaces the error.
        first_pass_context: a callable returning a context manager entered around the first closure
            call of :meth:`step`. With ``DistributedDataParallel`` pass ``ddp_model.no_sync``: the
            first pass (forward and backward) is then not all-reduced, so each replica perturbs with
            its own gradient (m-sharpness, the paper's default); the second pass is synchronized as
            usual. Leave it ``None`` for a perturbation from the all-reduced gradient.
        eps: added to the norm in the perturbation (a zero gradient gives ``e = 0``).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    Attributes:
        base_optimizer: the wrapped optimizer (``param_groups`` and ``state`` are shared with it).
        stats: the last step's loss at ``w`` and at ``w + e``, ``||g||``, ``||e||``,
            ``cos(g, g_adv)``, ``rho`` and more, as floats (see :attr:`stats`).
    """

    #: Per-group defaults of the rule (set by subclasses), e.g. ``{"rho": 0.05}``.
    _rule_defaults: dict[str, Any] = {}
    #: The perturbation rule (set by subclasses; ``None`` means ``_perturbation`` is overridden).
    _rule: Any = None
    #: An object told about each step's internals (``perturbed(params, e, groups)`` after the
    #: move to ``w + e``, ``second_pass(params, g, g_adv)`` with both unscaled gradients before the
    #: base step); :class:`~flatminima.optim.lets.LETS` uses it. ``None``: nobody listens.
    _observer: Any = None
    #: Closure calls per step and whether ``step`` needs a closure (registry flags).
    passes: int = 2
    needs_closure: bool = True

    def __init__(
        self,
        params: Iterable[Any] | None = None,
        base_optimizer: type[Optimizer] | None = None,
        *,
        base: Optimizer | None = None,
        group_defaults: dict[str, Any],
        foreach: bool | None = None,
        replay_rng: bool = True,
        restore_running_stats: bool = True,
        max_grad_norm: float | None = None,
        check_finite: bool = True,
        first_pass_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        eps: float = 1e-12,
        **base_kwargs: Any,
    ) -> None:
        self._group_defaults = dict(group_defaults)
        self._validate_group(self._group_defaults)
        if max_grad_norm is not None:
            max_grad_norm = check_number("max_grad_norm", max_grad_norm, low_inclusive=False)
        self.max_grad_norm = max_grad_norm
        self.eps = check_number("eps", eps)
        self.foreach = True if foreach is None else bool(foreach)
        self.replay_rng = bool(replay_rng)
        self.restore_running_stats = bool(restore_running_stats)
        self.check_finite = bool(check_finite)
        if first_pass_context is not None and not callable(first_pass_context):
            raise TypeError(
                f"first_pass_context must be callable (e.g. ddp_model.no_sync), got {first_pass_context!r}"
            )
        self.first_pass_context = first_pass_context
        self._pending: _Pending | None = None
        self._step_count_sam = 0
        self._stats: dict[str, Tensor | float] = {}

        name = type(self).__name__
        if base is not None:
            if params is not None or base_optimizer is not None or base_kwargs:
                raise ValueError(
                    f"{name}: give either base=<optimizer instance> alone, or params and a "
                    f"base_optimizer class with its keyword arguments, not both "
                    f"(got extra {sorted(base_kwargs) or 'params/base_optimizer'})"
                )
            if not isinstance(base, Optimizer):
                raise TypeError(f"{name}: base must be a torch.optim.Optimizer, got {type(base)!r}")
            if isinstance(base, SharpnessAwareOptimizer):
                raise TypeError(f"{name}: base is already a SAM-family optimizer ({type(base).__name__})")
            super().__init__(base.param_groups, dict(self._group_defaults))
            self.base_optimizer = base
        else:
            if params is None:
                raise TypeError(f"{name}: params is required (or pass base=<optimizer instance>)")
            if base_optimizer is None:
                raise TypeError(
                    f"{name}: base_optimizer is required, e.g. {name}(model.parameters(), "
                    f"torch.optim.SGD, lr=0.1, momentum=0.9), or pass base=<optimizer instance>"
                )
            if isinstance(base_optimizer, Optimizer):
                raise TypeError(
                    f"{name}: base_optimizer must be a class; to wrap an optimizer instance use "
                    f"{name}(base=optimizer, ...)"
                )
            if not (inspect.isclass(base_optimizer) and issubclass(base_optimizer, Optimizer)):
                raise TypeError(
                    f"{name}: base_optimizer must be a torch.optim.Optimizer subclass, "
                    f"got {base_optimizer!r}"
                )
            if issubclass(base_optimizer, SharpnessAwareOptimizer):
                raise TypeError(f"{name}: base_optimizer is already a SAM-family optimizer")
            super().__init__(params, dict(self._group_defaults))
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._link()
        self.defaults = {**self.base_optimizer.defaults, **self._group_defaults}
        for group in self.param_groups:
            self._validate_group(group)

    # ------------------------------------------------------------------ groups and validation
    def _link(self) -> None:
        """Share ``param_groups`` and ``state`` with the base optimizer (schedulers see one list)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the offending value; subclasses extend this."""
        if "rho" in group:
            check_number("rho", group["rho"])
        if self._rule is not None:
            self._rule.validate(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to both this optimizer and the base (with the rule's defaults)."""
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        for k, v in self._group_defaults.items():
            param_group.setdefault(k, v)
        self._validate_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    # ------------------------------------------------------------------ the rule
    def _perturbation(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        groups: list[dict[str, Any]],
        names: list[str | None],
        grad_norm: Tensor,
    ) -> list[Tensor]:
        """Return ``e`` for the tensors ``params`` (one group dict and name per tensor); by default
        the class's :class:`~flatminima.optim.sam.PerturbationRule` ``_rule``."""
        if self._rule is None:
            raise NotImplementedError(f"{type(self).__name__} has no perturbation rule")
        return self._rule.perturb(
            params, grads, per_tensor(groups, "rho"), groups, names, grad_norm,
            eps=self.eps, foreach=self.foreach,
        )

    def _perturbation_norm(self, grad_norm: Tensor, groups: list[dict[str, Any]]) -> Tensor | None:
        """``||e||`` in closed form from ``||g||`` when the rule has one (saves a pass over ``e``);
        ``None`` makes the engine measure it."""
        return None if self._rule is None else self._rule.norm(grad_norm, groups, self.eps)

    # ------------------------------------------------------------------ helpers
    def _collect(self) -> tuple[list[Tensor], list[Tensor], list[dict], list[str | None]]:
        params, grads, groups, names = [], [], [], []
        for group in self.param_groups:
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (parameter "
                        f"{group_names[i] if group_names else i} of shape {tuple(p.shape)}); "
                        "use a dense embedding (sparse=False) or a separate optimizer for it"
                    )
                params.append(p)
                grads.append(p.grad)
                groups.append(group)
                names.append(group_names[i] if group_names else None)
        return params, grads, groups, names

    def _devices(self) -> set[torch.device]:
        return {p.device for g in self.param_groups for p in g["params"]}

    @staticmethod
    def _unscale_(grads: list[Tensor], scaler: Any) -> None:
        """Divide the first-pass gradients by the scaler's scale (no host sync)."""
        scale = getattr(scaler, "_scale", None)
        if scale is None:
            scale = torch.tensor(scaler.get_scale())
        inv = scale.double().reciprocal().float()
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, gs in by_device.items():
            torch._foreach_mul_(gs, inv.to(device))

    @staticmethod
    def _scaler_active(scaler: Any) -> bool:
        return scaler is not None and scaler.is_enabled()

    def _rho_stat(self) -> float:
        return float(self.param_groups[0]["rho"]) if "rho" in self.param_groups[0] else math.nan

    # ------------------------------------------------------------------ the two steps
    @torch.no_grad()
    def first_step(self, *, loss: Tensor | float | None = None, scaler: Any = None) -> None:
        r"""Move to ``w + e`` using the gradients now in ``.grad`` (the first pass at ``w``).

        Saves a copy of the perturbed tensors for the exact restore, moves the first-pass gradients
        out of ``.grad`` (so the next backward starts from zero) and, unless disabled, starts
        protecting normalization running statistics until :meth:`second_step`.

        Args:
            loss: the first-pass loss, for :attr:`stats` and the finiteness check (optional).
            scaler: the ``torch.amp.GradScaler`` that scaled the backward; the gradients are unscaled
                before the norm, and a non-finite pass makes the perturbation NaN so that the whole
                step is skipped by ``scaler.step`` in :meth:`second_step` (no host sync).
        """
        if self._pending is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(); call cancel_step() to undo the "
                "pending perturbation"
            )
        params, grads, groups, names = self._collect()
        loss_t = None if loss is None else _loss_tensor(loss, "first")
        scaled = self._scaler_active(scaler)
        if scaled:
            self._unscale_(grads, scaler)
        grad_norm = global_norm(grads, foreach=self.foreach)
        if params:
            # One probe for the loss and the gradient: the sum is non-finite if either is.
            probe = grad_norm if loss_t is None else grad_norm + loss_t.to(grad_norm.device)
            if scaled:
                # No host sync: a non-finite pass makes ||g|| (so e, so the second pass) NaN, and
                # scaler.step then skips the whole step in second_step.
                grad_norm = grad_norm + 0.0 * probe
            elif self.check_finite and not bool(torch.isfinite(probe)):
                raise FloatingPointError(
                    f"non-finite first pass (loss {float(loss_t) if loss_t is not None else 'n/a'}, "
                    f"gradient norm {float(grad_norm)}); the weights were not changed"
                )
        e = self._perturbation(params, grads, groups, names, grad_norm) if params else []
        e_norm = self._perturbation_norm(grad_norm, groups) if e else torch.zeros(())
        if e_norm is None:
            e_norm = global_norm(e, foreach=self.foreach)
        if self.foreach and params:
            saved = torch._foreach_clone(params)
        else:
            saved = [p.clone() for p in params]
        if self.foreach and params:
            torch._foreach_add_(params, e)
        else:
            for p, ei in zip(params, e):
                p.add_(ei)
        if self._observer is not None:
            self._observer.perturbed(params, e, groups)
        del e
        for p in params:  # the first-pass gradient is kept only for cos(g, g_adv)
            p.grad = None
        guard = _RunningStatsGuard() if self.restore_running_stats else None
        self._pending = _Pending(params, saved, grads, grad_norm, guard)
        self._stats = {
            "loss": loss_t if loss_t is not None else math.nan,
            "grad_norm": grad_norm,
            "perturbation_norm": e_norm,
            "rho": self._rho_stat(),
        }

    def _undo(self) -> _Pending:
        pend = self._pending
        assert pend is not None
        self._pending = None
        try:
            if pend.guard is not None:
                pend.guard.restore()
        finally:
            with torch.no_grad():
                if self.foreach and pend.params:
                    torch._foreach_copy_(pend.params, pend.saved)
                else:
                    for p, s in zip(pend.params, pend.saved):
                        p.copy_(s)
        return pend

    def cancel_step(self) -> None:
        """Undo a pending :meth:`first_step`: put back the weights (bit-for-bit) and the running
        statistics, leave the base optimizer untouched. A no-op when nothing is pending."""
        if self._pending is not None:
            self._undo()

    @torch.no_grad()
    def second_step(self, *, loss: Tensor | float | None = None, scaler: Any = None) -> None:
        r"""Restore ``w`` exactly and step the base optimizer with the gradient now in ``.grad``
        (the second pass at ``w + e``), clipped to ``max_grad_norm`` if set.

        Args:
            loss: the second-pass loss, for :attr:`stats` and the finiteness check (optional).
            scaler: the ``GradScaler`` of the loop: the gradients are unscaled with
                ``scaler.unscale_`` and the base optimizer is stepped with ``scaler.step`` (which
                skips it if either pass was non-finite); call ``scaler.update()`` afterwards.
        """
        if self._pending is None:
            raise RuntimeError("second_step() called without a pending first_step()")
        pend = self._undo()
        loss_t = None if loss is None else _loss_tensor(loss, "second")
        scaled = self._scaler_active(scaler)
        if scaled:
            scaler.unscale_(self.base_optimizer)
        adv = [p.grad for p in pend.params]
        if self._observer is not None:
            self._observer.second_pass(pend.params, pend.grads, adv)
        present = [(g, a) for g, a in zip(pend.grads, adv) if a is not None]
        adv_norm = global_norm([a for _, a in present], foreach=self.foreach)
        probe = adv_norm if loss_t is None else adv_norm + loss_t.to(adv_norm.device)
        if not scaled and self.check_finite and not bool(torch.isfinite(probe)):
            raise FloatingPointError(
                f"non-finite second pass (loss {float(loss_t) if loss_t is not None else 'n/a'}, "
                f"gradient norm {float(adv_norm)}) at w + e; the weights were restored and the "
                "base optimizer did not step"
            )
        # For cos(g, g_adv), computed lazily in `stats`: <g, a> = (|g + a|^2 - |g|^2 - |a|^2) / 2.
        sum_norm: Tensor | float = math.nan
        if present:
            gs = [g for g, _ in present]
            if self.foreach:
                torch._foreach_add_(gs, [a for _, a in present])
            else:
                for g, a in present:
                    g.add_(a)
            sum_norm = global_norm(gs, foreach=self.foreach)
        pend_norm = pend.grad_norm
        del pend
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.param_groups for p in g["params"] if p.grad is not None],
                self.max_grad_norm,
            )
        if scaled:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._step_count_sam += 1
        self._stats.update(
            {
                "loss_adv": loss_t if loss_t is not None else math.nan,
                "adv_grad_norm": adv_norm,
                "_sum_norm": sum_norm,
                "_probe": probe + pend_norm.to(probe.device) if scaled else 0.0,
                "step": float(self._step_count_sam),
            }
        )

    # ------------------------------------------------------------------ torch-convention step
    def _run_closure(
        self,
        closure: Callable[..., Any],
        per_sample: bool,
        scaler: Any,
        which: str,
        select: Tensor | None = None,
        rows: int | None = None,
    ) -> tuple[Any, Tensor, Tensor | None]:
        """Call the closure once with grad enabled; return (value for the caller, the scalar loss
        detached, the per-sample losses detached or ``None``).

        A per-sample closure only runs the forward; the mean of its losses is backpropagated here
        (through ``scaler.scale`` when a scaler is active)."""
        if not per_sample:
            out = closure()
            return out, _loss_tensor(out, which), None
        losses = _sample_losses(closure(select=select), which, rows)
        loss = losses.mean()
        (scaler.scale(loss) if self._scaler_active(scaler) else loss).backward()
        loss = loss.detach()
        return loss, loss, losses.detach()

    def _first_pass(
        self, closure: Callable[..., Any], per_sample: bool, scaler: Any
    ) -> tuple[Any, Tensor, Tensor | None]:
        """Forward and backward at ``w`` (inside ``first_pass_context``); return the value the step
        returns, the scalar loss and the per-sample losses (``None`` for a standard closure)."""
        ctx = self.first_pass_context() if self.first_pass_context else contextlib.nullcontext()
        with torch.enable_grad(), ctx:
            return self._run_closure(closure, per_sample, scaler, "first")

    def _second_pass(
        self,
        closure: Callable[..., Any],
        per_sample: bool,
        scaler: Any,
        rng: _RNGState | None,
        clean_losses: Tensor | None,
    ) -> Tensor:
        """Forward and backward at ``w + e`` with the first pass's RNG state replayed; return the
        scalar loss. ``clean_losses`` (the first pass's per-sample losses) serve subclasses that
        select data."""
        if rng is not None:
            rng.restore()
        with torch.enable_grad(), _quiet_global_hook_warning():
            return self._run_closure(closure, per_sample, scaler, "second")[1]

    def step(  # type: ignore[override]
        self, closure: Callable[..., Any] | None = None, *, scaler: Any = None
    ) -> Any:
        r"""One SAM-family step; returns the loss at ``w`` (the first closure call's value).

        ``closure`` runs the forward and backward on the minibatch and returns the loss (it may but
        need not zero the gradients: the step clears them before each call). It is called twice:
        at ``w`` and at ``w + e``. Gradient accumulation over micro-batches belongs inside it. With
        a ``GradScaler``, the closure backpropagates ``scaler.scale(loss)``; pass ``scaler=`` here
        and call ``scaler.update()`` after the step.

        A closure with a parameter named ``select`` follows the per-sample contract instead:
        ``closure(select=None)`` runs only the forward and returns the 1-D tensor of per-sample
        losses of the batch (of the rows ``select`` when given); the optimizer backpropagates their
        mean itself (scaled by ``scaler``) and returns that mean. SAM, ASAM and Monge-SAM always
        pass ``select=None``; :class:`~flatminima.optim.esam.ESAM` uses it for data selection.

        After an exception in either pass the weights and running statistics are those from before
        the step and the base optimizer has not stepped.
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that runs forward and backward and "
                "returns the loss (it is called at w and at w + e); for a manual loop use "
                "first_step() / second_step()"
            )
        if self._pending is not None:
            raise RuntimeError("step() called while a first_step() is pending; call cancel_step()")
        per_sample = accepts_select(closure)
        devices = self._devices() if self.replay_rng else ()
        self.zero_grad(set_to_none=True)
        rng0 = _RNGState(devices) if self.replay_rng else None
        out, loss_t, clean_losses = self._first_pass(closure, per_sample, scaler)
        self.first_step(loss=loss_t, scaler=scaler)
        rng1 = _RNGState(devices) if self.replay_rng else None
        try:
            loss_adv_t = self._second_pass(closure, per_sample, scaler, rng0, clean_losses)
        except BaseException:
            self.cancel_step()
            raise
        finally:
            if rng1 is not None:
                rng1.restore()
        self.second_step(loss=loss_adv_t, scaler=scaler)
        return out

    # ------------------------------------------------------------------ stats and checkpoints
    @property
    def stats(self) -> dict[str, float]:
        r"""The last step's measurements, as floats (read lazily: no host sync until accessed).

        ``loss`` (at ``w``), ``loss_adv`` (at ``w + e``), ``sharpness`` (``loss_adv - loss``),
        ``grad_norm`` (``||g||``, unscaled), ``perturbation_norm`` (``||e||``), ``adv_grad_norm``
        (``||g_adv||``, before clipping), ``cos`` (``cos(g, g_adv)``), ``rho`` (of the first param
        group), ``skipped`` (1.0 when a GradScaler skipped the step), ``step`` (steps taken).
        Losses are NaN when the manual API was not given them.
        """
        raw = {k: float(v) for k, v in self._stats.items()}
        out = {k: v for k, v in raw.items() if not k.startswith("_")}
        if "loss" in out and "loss_adv" in out:
            out["sharpness"] = out["loss_adv"] - out["loss"]
        if "_sum_norm" in raw:
            g, a, s = out["grad_norm"], out["adv_grad_norm"], raw["_sum_norm"]
            cos = (s * s - g * g - a * a) / 2 / max(g * a, 1e-30)
            out["cos"] = min(1.0, max(-1.0, cos)) if math.isfinite(cos) else math.nan
            out["skipped"] = 0.0 if math.isfinite(raw["_probe"]) else 1.0
        return out

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` (its ``state`` and ``param_groups``, which carry the
        rule's options such as ``rho``) plus this wrapper's own entries under ``"flatminima"``."""
        if self._pending is not None:
            raise RuntimeError("state_dict() called between first_step() and second_step()")
        sd = self.base_optimizer.state_dict()
        sd[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "optimizer": type(self).__name__,
            "step": self._step_count_sam,
            **self._extra_state(),
        }
        return sd

    def _extra_state(self) -> dict[str, Any]:
        """Subclass entries for the ``"flatminima"`` part of :meth:`state_dict`."""
        return {}

    def _load_extra_state(self, own: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved (``own`` is empty for a plain base dict)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (or a plain base-optimizer ``state_dict``: the rule's
        options then keep their current defaults)."""
        if self._pending is not None:
            raise RuntimeError("load_state_dict() called between first_step() and second_step()")
        sd = dict(state_dict)
        own = sd.pop(_STATE_KEY, None)
        self.base_optimizer.load_state_dict(sd)
        self._link()
        for group in self.param_groups:
            for k, v in self._group_defaults.items():
                group.setdefault(k, v)
            self._validate_group(group)
        self._step_count_sam = int(own["step"]) if own else 0
        self._load_extra_state(dict(own or {}))

    def __getstate__(self) -> dict[str, Any]:
        if self._pending is not None:
            raise RuntimeError("cannot copy or pickle an optimizer between first_step and second_step")
        return dict(self.__dict__)

    def __repr__(self) -> str:
        rule = ", ".join(f"{k}={v!r}" for k, v in self._group_defaults.items())
        return f"{type(self).__name__}({rule}, base={self.base_optimizer!r})"


def per_tensor(groups: Sequence[dict[str, Any]], key: str) -> list[Any]:
    """``[group[key] for each tensor]``: the per-tensor view of a per-group option."""
    return [g[key] for g in groups]


def shared_option(groups: Sequence[dict[str, Any]], key: str) -> Any | None:
    """The value of ``key`` if every group has the same one, else ``None``."""
    first = groups[0][key]
    return first if all(g[key] == first for g in groups) else None
