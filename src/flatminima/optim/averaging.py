r"""Weight averaging around any optimizer: SWA, and WASAM when the optimizer is SAM-family.

Stochastic Weight Averaging (Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, UAI 2018, "Averaging
Weights Leads to Wider Optima and Better Generalization", arXiv 1803.05407) keeps, next to the
trained weights ``w``, the equal average of the iterates visited after a start point:

.. math::

    w_{swa} \leftarrow w_{swa} + \frac{w - w_{swa}}{n + 1}, \qquad n \leftarrow n + 1

(the first averaged iterate is copied), taken at regular points (classically once per epoch over
the last 25 % of the budget) while training goes on. The average lies in a flatter region than the
iterates; its BatchNorm running statistics are recomputed with one pass over training data
(:func:`update_bn`) before it is evaluated. With ``ema_decay`` the average is exponential instead:
``w_ema <- decay w_ema + (1 - decay) w``.

WASAM (Kaddour, Liu, Silva, Kusner, NeurIPS 2022, "When do flat minima optimizers work?",
arXiv 2202.00661) is SWA of SAM iterates: wrap a SAM-family optimizer. The averaged points are the
iterates ``w`` after each step, never the perturbed ``w + e`` (the engine restores ``w`` before the
base step). In that study WASAM beat both SWA and SAM in 39 of 42 tasks.

The running mean itself is :class:`torch.optim.swa_utils.AveragedModel`'s; this module adds the
schedule (start, every, skipped AMP steps), an optional annealing of the learning rate to
``swa_lr``, evaluation with the averaged weights in the live model, checkpoints, and an
:func:`update_bn` for any batch structure.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .engine import SharpnessAwareOptimizer, check_number

__all__ = ["SWA", "WeightAveraging", "update_bn"]

_STATE_KEY = "flatminima_swa"
_STATE_VERSION = 1
_ANNEAL = ("cos", "linear")


# ----------------------------------------------------------------------------- update_bn
def _move(batch: Any, device: torch.device | str | None) -> Any:
    """``batch`` with its tensors on ``device``: tensors, (named) tuples, lists and dicts are walked;
    any other object with a ``.to`` method (a graph batch, ...) is moved with it."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)((k, _move(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"update_bn cannot feed a batch of type {type(batch).__name__} to the model; pass "
        "forward_fn(model, batch) that runs the forward for it"
    )


def _tracked_norm_layers(model: nn.Module) -> list[_NormBase]:
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


@torch.no_grad()
def update_bn(
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    *,
    model: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> int:
    r"""Recompute the running statistics of the normalization layers of ``model`` with one pass.

    Like :func:`torch.optim.swa_utils.update_bn`, for any batch structure: every BatchNorm (and
    InstanceNorm with ``track_running_stats``) layer has its statistics reset and its ``momentum``
    set to ``None`` (cumulative average: after ``B`` batches ``running_mean`` is the mean of the
    ``B`` batch means and ``running_var`` that of the ``B`` unbiased batch variances), the model
    runs in training mode under ``no_grad`` on every batch, then each layer's ``momentum`` and each
    module's ``training`` flag are put back. After an exception, or when ``batches`` is empty
    (``ValueError``), the statistics are also put back as they were.

    Args:
        batches: an iterable of batches (a ``DataLoader`` over training data, a list, ...).
        forward_fn: ``forward_fn(model, batch)`` runs the forward on one batch (its return value is
            ignored), e.g. ``lambda m, b: m(b["input_ids"], attention_mask=b["mask"])``. Default:
            ``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list,
            ``model(**batch)`` for a dict.
        model: the model whose statistics are recomputed (required; keyword-only so that torch's
            ``update_bn(loader, model)`` order cannot be mistaken for a forward function).
        device: move each batch there first (tensors inside tuples, lists and dicts, and any object
            with a ``.to`` method).

    Returns:
        The number of batches run (0, with no pass, when the model has no such layer).

    Dropout and other train-mode behaviour are active during the pass, as in torch's version.
    """
    if isinstance(forward_fn, nn.Module):
        raise TypeError(
            "update_bn(batches, forward_fn, *, model=...): forward_fn is a function "
            "forward_fn(model, batch), got a Module; pass the model as model=..."
        )
    if model is None:
        raise TypeError("update_bn needs the model: update_bn(batches, forward_fn, model=model)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"update_bn: model must be a torch.nn.Module, got {type(model)!r}")
    forward = _default_forward if forward_fn is None else forward_fn
    layers = _tracked_norm_layers(model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    saved = [
        {k: b.clone() for k, b in m._buffers.items() if isinstance(b, Tensor)} for m in layers
    ]
    flags = [(m, m.training) for m in model.modules()]
    done = False
    count = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in batches:
            forward(model, _move(batch, device))
            count += 1
        if count == 0:
            raise ValueError("update_bn got no batches; the running statistics were left as they were")
        done = True
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        for m, flag in flags:
            m.training = flag
        if not done:
            for m, bufs in zip(layers, saved):
                for k, b in bufs.items():
                    m._buffers[k].copy_(b)
    return count


# ----------------------------------------------------------------------------- SWA
def _schedule_number(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"invalid {name}: {value!r} (must be an int >= {low})")
    return int(value)


class SWA(Optimizer):
    r"""Average the weights of ``model`` over the iterates of ``optimizer`` (SWA; WASAM when the
    optimizer is SAM-family). Alias: :data:`WeightAveraging`.

    A ``torch.optim.Optimizer`` that shares ``param_groups`` and ``state`` with the wrapped
    optimizer, so LR schedulers, ``zero_grad`` and ``add_param_group`` work on it. Its
    :meth:`step` runs the wrapped optimizer's step and then, at the averaging points, folds the
    weights of ``model`` into :attr:`averaged_model` (a
    :class:`torch.optim.swa_utils.AveragedModel`): ``w_swa <- w_swa + (w - w_swa) / (n + 1)``, or
    with ``ema_decay`` ``w_ema <- decay w_ema + (1 - decay) w`` (the first point is copied).

    The schedule counts the calls of :meth:`step` (step indices ``0, 1, 2, ...``). Steps with index
    ``>= start`` form the averaging phase; the average is updated after the steps with index
    ``start + every - 1``, ``start + 2 every - 1``, ... (``every=1``: after every step of the
    phase). For SWA's "once per epoch over the last 25 %", pass ``start=0.75``,
    ``total_steps=epochs * steps_per_epoch`` and ``every=steps_per_epoch``: the average is taken at
    the end of each of the last quarter of the epochs.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (a plain one, or a SAM-family one from this
            library; SAM-family steps need a closure, as without the wrapper).
        model: the module whose parameters are averaged (normally the one ``optimizer`` trains).
        start: a float in ``(0, 1)``: the fraction of ``total_steps`` after which averaging starts
            (step index ``floor(start * total_steps)``); or an int ``>= 0``: that step index.
        total_steps: the number of optimizer steps of the run; required when ``start`` is a
            fraction. When given, the first averaging point must fall within it.
        every: average every this many steps of the averaging phase (``>= 1``).
        ema_decay: ``None`` (default) for the equal average, or a decay in ``(0, 1)`` for an
            exponential moving average (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`).
        device: where the averaged copy lives (e.g. ``"cpu"`` to spare accelerator memory);
            default: with the model.
        swa_lr: ``None`` (default) leaves the learning rate alone. Otherwise a float, or one per
            param group: from step index ``start`` on, the learning rate of each group goes from
            its value at that moment, ``lr_0``, to ``swa_lr`` over ``anneal_steps`` steps and then
            stays there: the step with index ``start + k`` runs with
            ``swa_lr * a + lr_0 * (1 - a)``, ``a = f(min(1, k / anneal_steps))`` (``a = 1`` when
            ``anneal_steps`` is 0), ``f(t) = (1 - cos(pi t)) / 2`` for ``"cos"`` or ``t`` for
            ``"linear"``: the sequence of :class:`torch.optim.swa_utils.SWALR` stepped once per
            step. The value is written into ``group["lr"]`` right before every step of the phase,
            so it overrides whatever another scheduler wrote; that scheduler may go on stepping
            (its own counters advance, its learning rates are ignored) or be stopped. Before the
            phase the learning rate is untouched.
        anneal_steps: length of the annealing, in steps (int ``>= 0``; needs ``swa_lr``).
        anneal_strategy: ``"cos"`` (default) or ``"linear"``.
        use_buffers: average the buffers too (BatchNorm statistics, ...), as ``AveragedModel``'s
            ``use_buffers``; by default the averaged model's buffers are copied from ``model`` at
            each averaging point and :meth:`update_bn` recomputes them.

    Mixed precision. A SAM-family step that a ``GradScaler`` skipped (``stats["skipped"] == 1``)
    is not an averaging point: the averaging point moves to the next step that is not skipped (the
    later points stay on their grid). This reads the stats (a host sync) at averaging points only.
    For a plain optimizer, call ``scaler.step(swa)``: the scaler does not call :meth:`step` when it
    skips, so the skipped step is neither counted nor averaged. Calling ``swa.step()`` after a
    ``scaler.step(inner)`` that skipped cannot be detected without a host sync and averages the
    (unchanged) weights.

    Evaluation. :meth:`update_bn` recomputes the averaged model's BatchNorm statistics;
    ``with swa.swapped(): evaluate(model)`` runs the live model with the averaged weights and puts
    the trained ones back bit for bit; :meth:`swap` keeps the averaged weights at the end.

    Checkpoints. :meth:`state_dict` is the wrapped optimizer's ``state_dict`` plus an entry
    ``"flatminima_swa"`` with the step counter, the averaged model's ``state_dict`` (including
    ``n_averaged``) and the annealing state; a run resumed from it continues identically.

    Example::

        opt = flatminima.SWA(flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.05,
                                            momentum=0.9, rho=0.05),
                             model, start=0.75, total_steps=epochs * len(loader), every=len(loader))
        for epoch in range(epochs):
            for x, y in loader:
                opt.step(closure)            # SAM step, then the average when due
        opt.update_bn(loader)                # BatchNorm statistics of the averaged weights
        with opt.swapped():
            evaluate(model)                  # the averaged weights, in the live model
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        *,
        start: float | int = 0.75,
        total_steps: int | None = None,
        every: int = 1,
        ema_decay: float | None = None,
        device: torch.device | str | None = None,
        swa_lr: float | Sequence[float] | None = None,
        anneal_steps: int = 0,
        anneal_strategy: str = "cos",
        use_buffers: bool = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"SWA wraps a torch.optim.Optimizer instance, got {type(optimizer)!r}")
        if isinstance(optimizer, SWA):
            raise TypeError("SWA: the optimizer is already wrapped in SWA")
        if not isinstance(model, nn.Module):
            raise TypeError(f"SWA: model must be a torch.nn.Module, got {type(model)!r}")
        if total_steps is not None:
            total_steps = _schedule_number("total_steps", total_steps, 1)
        if isinstance(start, float):
            if not (math.isfinite(start) and 0.0 < start < 1.0):
                raise ValueError(
                    f"invalid start: {start!r} (a float start is a fraction of total_steps in "
                    "(0, 1); give a step index as an int)"
                )
            if total_steps is None:
                raise ValueError(
                    f"start={start!r} is a fraction of the run: pass total_steps=<optimizer steps "
                    "in the run>, or give start as an int step index"
                )
            start_step = math.floor(round(start * total_steps, 9))
        else:
            start_step = _schedule_number("start", start, 0)
        self.every = _schedule_number("every", every, 1)
        if total_steps is not None and start_step + self.every > total_steps:
            raise ValueError(
                f"invalid start/every: start={start!r} (step index {start_step}) and "
                f"every={every!r} put the first averaging point after step index "
                f"{start_step + self.every - 1}, beyond total_steps={total_steps} (indices 0 to "
                f"{total_steps - 1})"
            )
        if ema_decay is not None:
            ok = isinstance(ema_decay, (int, float)) and not isinstance(ema_decay, bool)
            if not (ok and 0.0 < float(ema_decay) < 1.0):
                raise ValueError(f"invalid ema_decay: {ema_decay!r} (must be a number in (0, 1))")
            ema_decay = float(ema_decay)
        if anneal_strategy not in _ANNEAL:
            raise ValueError(f"invalid anneal_strategy: {anneal_strategy!r} (must be 'cos' or 'linear')")
        anneal_steps = _schedule_number("anneal_steps", anneal_steps, 0)
        swa_lrs: list[float] | None = None
        if swa_lr is not None:
            if isinstance(swa_lr, (list, tuple)):
                if len(swa_lr) != len(optimizer.param_groups):
                    raise ValueError(
                        f"invalid swa_lr: {swa_lr!r} (one value per param group: "
                        f"{len(optimizer.param_groups)} groups)"
                    )
                swa_lrs = [check_number("swa_lr", v) for v in swa_lr]
            else:
                swa_lrs = [check_number("swa_lr", swa_lr)] * len(optimizer.param_groups)
        elif anneal_steps:
            raise ValueError(f"anneal_steps={anneal_steps!r} needs swa_lr (the rate to anneal to)")
        if not isinstance(use_buffers, bool):
            raise ValueError(f"invalid use_buffers: {use_buffers!r} (must be a bool)")

        super().__init__(optimizer.param_groups, {})
        self.optimizer = optimizer
        self._link()
        self.defaults = optimizer.defaults
        self.model = model
        self.start = start
        self.start_step = start_step
        self.total_steps = total_steps
        self.ema_decay = ema_decay
        self.swa_lrs = swa_lrs
        self.anneal_steps = anneal_steps
        self.anneal_strategy = anneal_strategy
        self.use_buffers = use_buffers
        multi = None if ema_decay is None else get_ema_multi_avg_fn(ema_decay)
        #: The :class:`torch.optim.swa_utils.AveragedModel` (its ``module`` holds the average).
        self.averaged_model = AveragedModel(model, device=device, multi_avg_fn=multi, use_buffers=use_buffers)
        self._step = 0  # completed calls of step()
        self._pending = False  # an averaging point fell on a skipped step
        self._lr_start: list[float] | None = None
        self._stats_fresh = True  # averaged buffers recomputed (or averaged) since the last point
        self._warned_stats = False

    # ------------------------------------------------------------------ plumbing
    def _link(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the wrapped optimizer (and so to this one)."""
        if "optimizer" not in self.__dict__:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        if self.swa_lrs is not None:
            self.swa_lrs.append(self.swa_lrs[-1])
            if self._lr_start is not None:
                self._lr_start.append(float(param_group["lr"]))

    # ------------------------------------------------------------------ schedule
    @property
    def n_averaged(self) -> int:
        """How many iterates the average holds."""
        return int(self.averaged_model.n_averaged)

    @property
    def averaging(self) -> bool:
        """Whether the averaging phase has begun (the step with index :attr:`start_step` has run)."""
        return self._step > self.start_step

    @property
    def steps(self) -> int:
        """Completed calls of :meth:`step`."""
        return self._step

    def _is_point(self, i: int) -> bool:
        return i >= self.start_step and (i - self.start_step + 1) % self.every == 0

    def _anneal_lr(self, i: int) -> None:
        """Write the annealed learning rate of step ``i`` into the groups (phase steps only)."""
        if self.swa_lrs is None or i < self.start_step:
            return
        if self._lr_start is None:
            self._lr_start = [float(g["lr"]) for g in self.param_groups]
        k = i - self.start_step
        t = 1.0 if self.anneal_steps == 0 else min(1.0, k / self.anneal_steps)
        a = (1.0 - math.cos(math.pi * t)) / 2.0 if self.anneal_strategy == "cos" else t
        for group, lr0, swa_lr in zip(self.param_groups, self._lr_start, self.swa_lrs):
            lr = swa_lr * a + lr0 * (1.0 - a)
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _skipped(self) -> bool:
        """Whether a GradScaler skipped the last SAM-family step (host sync; averaging points only)."""
        if not isinstance(self.optimizer, SharpnessAwareOptimizer):
            return False
        return self.optimizer.stats.get("skipped", 0.0) == 1.0

    def step(self, closure: Callable[..., Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Step the wrapped optimizer (``closure`` and keyword arguments such as ``scaler=`` are
        passed on), then update the average if this step is an averaging point. Returns what the
        wrapped step returns."""
        i = self._step
        self._anneal_lr(i)
        if closure is None:
            out = self.optimizer.step(**kwargs)
        else:
            out = self.optimizer.step(closure, **kwargs)
        self._step = i + 1
        if self._pending or self._is_point(i):
            if self._skipped():
                self._pending = True
            else:
                self.update_average()
        return out

    def update_average(self) -> None:
        """Fold the current weights of ``model`` into the average now (what :meth:`step` does at
        the averaging points; for manual schedules)."""
        self.averaged_model.update_parameters(self.model)
        self._pending = False
        self._stats_fresh = self.use_buffers or not _tracked_norm_layers(self.model)

    # ------------------------------------------------------------------ evaluation
    def update_bn(
        self,
        batches: Iterable[Any],
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        *,
        model: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> int:
        """:func:`update_bn` on the averaged weights (``averaged_model.module``, which is what
        ``forward_fn`` receives) unless ``model`` is given. Returns the number of batches run."""
        target = self.averaged_model.module if model is None else model
        n = update_bn(batches, forward_fn, model=target, device=device)
        if target is self.averaged_model.module or target is self.averaged_model:
            self._stats_fresh = True
        return n

    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(live tensor, averaged tensor) for every parameter and buffer, matched by name."""
        avg = self.averaged_model.module
        pairs = []
        for kind in ("named_parameters", "named_buffers"):
            live = dict(getattr(self.model, kind)())
            avgd = dict(getattr(avg, kind)())
            if live.keys() != avgd.keys():
                raise RuntimeError(
                    f"the model's {kind[6:]} no longer match the averaged copy's "
                    f"({sorted(live.keys() ^ avgd.keys())[:4]} differ)"
                )
            pairs += [(live[k], avgd[k]) for k in live]
        return pairs

    def _check_swappable(self) -> list[tuple[Tensor, Tensor]]:
        if self.n_averaged == 0:
            raise RuntimeError(
                f"nothing averaged yet ({self._step} steps taken; the first averaging point is "
                f"after step index {self.start_step + self.every - 1})"
            )
        if not self._stats_fresh and not self._warned_stats:
            self._warned_stats = True
            warnings.warn(
                "the averaged model's BatchNorm statistics are the live model's at the last "
                "averaging point; call update_bn(train_batches) first to recompute them for the "
                "averaged weights",
                UserWarning,
                stacklevel=3,
            )
        return self._pairs()

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Context manager: the live ``model`` holds the averaged parameters and buffers inside the
        block (yields it); on exit, also after an exception, its own are put back bit for bit.

        ``with swa.swapped(): acc = evaluate(model)``. Do not step the optimizer inside."""
        pairs = self._check_swappable()
        with torch.no_grad():
            saved = [live.detach().clone() for live, _ in pairs]
        try:
            with torch.no_grad():
                for live, avg in pairs:
                    live.copy_(avg)
            yield self.model
        finally:
            with torch.no_grad():
                for (live, _), s in zip(pairs, saved):
                    live.copy_(s)

    #: Another name for :meth:`swapped`.
    averaged_weights = swapped

    def swap(self) -> None:
        """Copy the averaged parameters and buffers into the live ``model`` for good (the end of
        training). The optimizer state (momentum, ...) is left as it is."""
        pairs = self._check_swappable()
        with torch.no_grad():
            for live, avg in pairs:
                live.copy_(avg)

    # ------------------------------------------------------------------ stats and checkpoints
    @property
    def stats(self) -> dict[str, float]:
        """The wrapped optimizer's ``stats`` (SAM family; empty for a plain optimizer) plus
        ``n_averaged`` and ``averaging`` (1.0 or 0.0)."""
        inner = getattr(self.optimizer, "stats", None)
        out = dict(inner) if isinstance(inner, dict) else {}
        out.update({"n_averaged": float(self.n_averaged), "averaging": float(self.averaging)})
        return out

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` plus this wrapper's entry ``"flatminima_swa"``:
        the step counter, the averaged model's ``state_dict`` (with ``n_averaged``) and the
        annealing state."""
        sd = self.optimizer.state_dict()
        sd[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "step": self._step,
            "start_step": self.start_step,
            "every": self.every,
            "pending": self._pending,
            "lr_start": None if self._lr_start is None else list(self._lr_start),
            "stats_fresh": self._stats_fresh,
            "averaged_model": self.averaged_model.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`. A plain ``state_dict`` of the wrapped optimizer
        (without the ``"flatminima_swa"`` entry) loads into it and leaves the averaging state as
        it is. The schedule options (``start``, ``every``, ...) are the constructor's."""
        sd = dict(state_dict)
        own = sd.pop(_STATE_KEY, None)
        self.optimizer.load_state_dict(sd)
        self._link()
        if own is None:
            return
        self.averaged_model.load_state_dict(own["averaged_model"])
        self._step = int(own["step"])
        self._pending = bool(own["pending"])
        self._lr_start = None if own["lr_start"] is None else [float(v) for v in own["lr_start"]]
        self._stats_fresh = bool(own.get("stats_fresh", True))

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy keeps the wrapper whole
        return dict(self.__dict__)

    def __repr__(self) -> str:
        opts = f"start_step={self.start_step}, every={self.every}"
        if self.ema_decay is not None:
            opts += f", ema_decay={self.ema_decay}"
        if self.swa_lrs is not None:
            opts += f", swa_lr={self.swa_lrs}, anneal_steps={self.anneal_steps}"
        return f"SWA({opts}, optimizer={self.optimizer!r})"


#: Another name for :class:`SWA`.
WeightAveraging = SWA
