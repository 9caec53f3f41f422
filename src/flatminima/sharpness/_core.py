r"""The functional core of :mod:`flatminima.sharpness`: a loss over a fixed set of batches as a function
of a flat parameter vector, evaluated without ever writing to the user's model.

Every measurement in this package goes through :class:`LossFunction`:

* the user gives ``loss_fn(model, batch) -> scalar loss`` and an iterable of batches of any structure
  (tensors, tuples, dicts, graph objects); the loss of the model is the mean of ``loss_fn`` over the
  batches (equal weights per batch);
* the parameters being measured (all of them, or a subset chosen by name: a layer, a block) become a
  flat vector ``w``; :meth:`LossFunction.loss`, :meth:`~LossFunction.grad` and
  :meth:`~LossFunction.hvp` take any ``w`` and run ``loss_fn`` through
  :func:`torch.func.functional_call`, which swaps the tensors in for the duration of the call only;
  buffers are passed as copies, so BatchNorm in train mode cannot update the model's statistics;
* ``mode`` (``"eval"`` or ``"train"``) is explicit: the model's ``training`` flags are set for the
  evaluation and put back afterwards, module by module;
* :func:`preserved` snapshots parameters, buffers, ``training`` flags and the global RNG and puts them
  back on exit, also after an exception; each public function of the package runs inside it;
* :meth:`LossFunction.check_deterministic` evaluates the first batch twice and warns when the two
  losses differ (dropout in train mode, or a random loss).
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
from torch.func import functional_call

__all__ = [
    "LossFn",
    "LossFunction",
    "NonDeterministicLossWarning",
    "ParamSelector",
    "check_choice",
    "check_int",
    "check_mode",
    "preserved",
    "select_parameters",
]

#: The user's loss: ``loss_fn(model, batch) -> scalar tensor``.
LossFn = Callable[[nn.Module, Any], Tensor]

#: Which parameters to measure: ``None`` (all that require grad), a name prefix (``"layer3."``),
#: a sequence of names or prefixes, or a predicate ``(name, parameter) -> bool``.
ParamSelector = None | str | Sequence[str] | Callable[[str, nn.Parameter], bool]

_MODES = ("eval", "train")


class NonDeterministicLossWarning(UserWarning):
    """The same batch at the same weights gave two different losses."""


def check_mode(mode: str) -> str:
    """Validate the explicit evaluation mode (``"eval"`` or ``"train"``)."""
    if mode not in _MODES:
        raise ValueError(f"invalid mode: {mode!r} (must be 'eval' or 'train', chosen explicitly)")
    return mode


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer ``value >= minimum`` (``ValueError`` naming it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"invalid {name}: {value!r} (must be an integer >= {minimum})")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Validate that ``value`` is one of ``choices`` (``ValueError`` naming it)."""
    if value not in choices:
        raise ValueError(f"invalid {name}: {value!r} (must be one of {', '.join(map(repr, choices))})")
    return value


def select_parameters(model: nn.Module, params: ParamSelector = None) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of ``model`` chosen by ``params`` (see :data:`ParamSelector`),
    in ``named_parameters`` order; ``ValueError`` when nothing matches."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        prefixes = [params] if isinstance(params, str) else list(params)
        chosen = [(n, p) for n, p in named if any(n == q or n.startswith(q) for q in prefixes)]
    if not chosen:
        raise ValueError(
            f"params={params!r} selects no parameter of the model; names are e.g. "
            f"{[n for n, _ in named[:6]]}"
        )
    return chosen


@contextlib.contextmanager
def preserved(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Leave ``model`` (parameters, buffers, every module's ``training`` flag) and the global RNG
    exactly as they were, whatever happens inside; with ``seed``, seed the RNG inside the block."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = [(m, m.training) for m in model.modules()]
    devices = [d for d in {t.device for t in state.values()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            yield
        finally:
            with torch.no_grad():
                current = model.state_dict(keep_vars=True)
                for k, v in state.items():
                    if current[k] is not v and current[k].data_ptr() != v.data_ptr():
                        current[k].detach().copy_(v)
            for m, flag in flags:
                m.training = flag


class _Bound(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that functional_call reaches the model's tensors
    while the user's loss function calls the model."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class LossFunction:
    r"""``L(w) = mean_b loss_fn(model[w], b)`` over fixed ``batches``, as a function of the flat vector
    ``w`` of the selected parameters (the others and the buffers stay at the model's values).

    Args:
        model: the model (never written to).
        loss_fn: ``loss_fn(model, batch)`` returning a scalar tensor.
        batches: the batches (materialized once into a list).
        mode: ``"eval"`` or ``"train"`` (explicit; the model's flags are restored by :func:`preserved`).
        params: which parameters form ``w`` (:data:`ParamSelector`).
        dtype: dtype of ``w`` and of every computation (default: the selected parameters' dtype).

    Attributes:
        names, shapes, numel: the selected parameters' names, shapes and total size ``n``.
        w0: the model's current values of the selected parameters, flat (a copy).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        batches: Iterable[Any],
        *,
        mode: str,
        params: ParamSelector = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        self.model = model
        self.mode = check_mode(mode)
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("batches is empty: give at least one batch")
        chosen = select_parameters(model, params)
        self.names = [n for n, _ in chosen]
        self.shapes = [p.shape for _, p in chosen]
        self.sizes = [p.numel() for _, p in chosen]
        self.numel = sum(self.sizes)
        self.dtype = dtype or chosen[0][1].dtype
        self.device = chosen[0][1].device
        self.w0 = torch.cat([p.detach().reshape(-1) for _, p in chosen]).to(self.dtype).clone()
        self._bound = _Bound(model, loss_fn)
        #: Buffer values used instead of the model's, by buffer name (e.g. interpolated BatchNorm
        #: statistics); never written into the model. ``None``: the model's own buffers.
        self.buffer_values: dict[str, Tensor] | None = None
        self.evaluations = 0  #: calls of loss_fn so far (for benchmarks)

    # ------------------------------------------------------------------ vectors
    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        """``{name: tensor}`` views of the flat ``w`` with the parameters' shapes."""
        out, i = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = w[i : i + size].view(shape)
            i += size
        return out

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors (``None`` = zeros) into one flat vector."""
        parts = [
            torch.zeros(s, dtype=self.dtype, device=self.device)
            if t is None
            else t.reshape(-1).to(self.dtype)
            for t, s in zip(tensors, self.sizes)
        ]
        return torch.cat(parts)

    def _tensors(self, w: Tensor) -> dict[str, Tensor]:
        tensors = {f"model.{k}": v for k, v in self.unflatten(w).items()}
        # Buffers as copies: BatchNorm in train mode updates these, never the model's.
        for name, buf in self.model.named_buffers():
            value = self.buffer_values.get(name, buf) if self.buffer_values else buf
            tensors[f"model.{name}"] = value.detach().clone()
        return tensors

    def evaluate(self, w: Tensor, batch: Any) -> Tensor:
        """``loss_fn(model[w], batch)`` as a scalar tensor, differentiable in ``w`` (the building
        block of every other evaluation; counts in :attr:`evaluations`)."""
        self.model.train(self.mode == "train")
        self.evaluations += 1
        out = functional_call(self._bound, self._tensors(w), (batch,), strict=False)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise TypeError(
                f"loss_fn(model, batch) must return a scalar tensor, got "
                f"{type(out).__name__ if not isinstance(out, Tensor) else tuple(out.shape)}"
            )
        return out.reshape(())

    # ------------------------------------------------------------------ evaluations
    def loss(self, w: Tensor | None = None) -> float:
        """``L(w)`` (default ``w0``), mean over the batches."""
        w = self.w0 if w is None else w
        with torch.no_grad():
            total = sum(float(self.evaluate(w, b)) for b in self.batches)
        return total / len(self.batches)

    def batch_losses(self, w: Tensor | None = None) -> list[float]:
        """``loss_fn`` on each batch at ``w`` (for m-sharpness and diagnostics)."""
        w = self.w0 if w is None else w
        with torch.no_grad():
            return [float(self.evaluate(w, b)) for b in self.batches]

    def grad(self, w: Tensor | None = None, batches: Sequence[Any] | None = None) -> tuple[float, Tensor]:
        """``(L(w), \\nabla L(w))`` as a float and a flat vector (mean over ``batches``, default all)."""
        w = (self.w0 if w is None else w).detach()
        batches = self.batches if batches is None else batches
        total, g = 0.0, torch.zeros_like(w)
        for b in batches:
            wv = w.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self.evaluate(wv, b)
                (gb,) = torch.autograd.grad(loss, wv, allow_unused=True)
            total += float(loss.detach())
            if gb is not None:
                g += gb
        return total / len(batches), g / len(batches)

    def hvp(self, v: Tensor, w: Tensor | None = None) -> Tensor:
        """``H(w) v`` (Hessian of ``L`` at ``w``, default ``w0``) by double backward, mean over the
        batches."""
        w = (self.w0 if w is None else w).detach()
        v = v.to(self.dtype)
        out = torch.zeros_like(w)
        for b in self.batches:
            wv = w.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self.evaluate(wv, b)
                (g,) = torch.autograd.grad(loss, wv, create_graph=True)
                (hv,) = torch.autograd.grad(g @ v, wv, allow_unused=True)
            if hv is not None:
                out += hv.detach()
        return out / len(self.batches)

    def check_deterministic(self, w: Tensor | None = None, *, rtol: float = 1e-6) -> bool:
        """Evaluate the first batch twice; warn (:class:`NonDeterministicLossWarning`) and return
        ``False`` when the losses differ by more than ``rtol``."""
        w = self.w0 if w is None else w
        with torch.no_grad():
            a, b = float(self.evaluate(w, self.batches[0])), float(self.evaluate(w, self.batches[0]))
        if math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)):
            return True
        warnings.warn(
            f"the loss is not deterministic for a fixed batch in mode={self.mode!r} ({a!r} then "
            f"{b!r}): dropout or another random layer is active; measurements will be noisy. Use "
            "mode='eval' or a deterministic loss_fn",
            NonDeterministicLossWarning,
            stacklevel=3,
        )
        return False
