"""Build optimizers by name: ``create("msam_adamw", model.parameters(), lr=1e-3, rho=0.05)``.

Names are ``<base>`` for a plain ``torch.optim`` optimizer (``sgd``, ``adamw``, ...) and
``<rule>_<base>`` for a SAM-family wrapper around it (``sam_sgd``, ``asam_adamw``, ``msam_sgd``).
Every entry carries capability flags (passes per step, whether ``step`` needs a closure) so a
training loop can adapt to the optimizer it was handed.

Every name ``N`` also has a twin ``N+swa`` (``sam_sgd+swa``, ``sgd+swa``, ...): ``N`` wrapped in
:class:`~flatminima.optim.averaging.SWA`, which needs the model whose weights it averages:
``create("sam_sgd+swa", model.parameters(), model=model, lr=0.1, rho=0.05, start=0.75,
total_steps=n, every=steps_per_epoch)``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from .averaging import SWA
from .esam import ESAM
from .sam import ASAM, SAM, MongeSAM

__all__ = ["OptimizerInfo", "create", "list_optimizers", "optimizer_info", "register_optimizer"]


@dataclass(frozen=True)
class OptimizerInfo:
    """What the registry knows about a name."""

    name: str
    factory: Callable[..., Optimizer]
    passes: int  #: closure calls per step (1 for base optimizers, 2 for SAM, 3 for ESAM)
    needs_closure: bool  #: whether ``step`` must be given a closure
    family: str  #: ``"base"`` or the wrapper's rule (``"sam"``, ``"asam"``, ``"msam"``, ``"esam"``)
    base: str  #: the base optimizer's name
    description: str
    #: whether ``step`` makes use of a per-sample closure ``closure(select=None)`` (ESAM's data
    #: selection); every SAM-family optimizer accepts one, base optimizers do not
    per_sample: bool = False
    #: whether the optimizer is wrapped in :class:`~flatminima.optim.averaging.SWA` (the ``+swa``
    #: names; their factory needs ``model=``)
    averaging: bool = False


_BASES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
}

_RULES: dict[str, tuple[type, str]] = {
    "sam": (SAM, "SAM (Foret et al. 2021): e = rho g / ||g||"),
    "asam": (ASAM, "ASAM (Kwon et al. 2021): e = rho T^2 g / ||T g||, T = |w| + eta"),
    "msam": (MongeSAM, "Monge-SAM (Jacobsen & Arvanitidis 2025): SAM with rho / sqrt(1 + a^2 |g|^2)"),
    "esam": (ESAM, "ESAM (Du et al. 2022): any rule + weight masks (beta) + data selection (gamma)"),
}

_REGISTRY: dict[str, OptimizerInfo] = {}


#: The keyword arguments of ``create`` that go to :class:`SWA` for a ``+swa`` name.
SWA_OPTIONS = frozenset(
    {"start", "total_steps", "every", "ema_decay", "device", "swa_lr", "anneal_steps",
     "anneal_strategy", "use_buffers"}
)
_SWA_SUFFIX = "+swa"


def _swa_factory(name: str, inner: Callable[..., Optimizer]) -> Callable[..., Optimizer]:
    def factory(params: Iterable[Any], *, model: Any = None, **kwargs: Any) -> Optimizer:
        if model is None:
            raise TypeError(
                f"{name!r} averages the weights of a model: pass it, "
                f"create({name!r}, model.parameters(), model=model, ...)"
            )
        swa_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in SWA_OPTIONS}
        return SWA(inner(params, **kwargs), model, **swa_kwargs)

    return factory


def register_optimizer(info: OptimizerInfo, *, overwrite: bool = False) -> None:
    """Add a name to the registry (``ValueError`` if it exists and ``overwrite`` is false), and
    with it its twin ``<name>+swa`` (the optimizer wrapped in :class:`SWA`)."""
    if info.name in _REGISTRY and not overwrite:
        raise ValueError(f"optimizer {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    if not info.averaging and not info.name.endswith(_SWA_SUFFIX):
        twin = info.name + _SWA_SUFFIX
        _REGISTRY[twin] = dataclasses.replace(
            info, name=twin, factory=_swa_factory(twin, info.factory),
            description=info.description + " + SWA", averaging=True,
        )


def _wrapper_factory(rule_cls: type, base_cls: type[Optimizer]) -> Callable[..., Optimizer]:
    def factory(params: Iterable[Any], **kwargs: Any) -> Optimizer:
        return rule_cls(params, base_cls, **kwargs)

    return factory


for _bname, _bcls in _BASES.items():
    register_optimizer(
        OptimizerInfo(_bname, _bcls, 1, False, "base", _bname, f"torch.optim.{_bcls.__name__}")
    )
    for _rname, (_rcls, _rdesc) in _RULES.items():
        register_optimizer(
            OptimizerInfo(
                f"{_rname}_{_bname}", _wrapper_factory(_rcls, _bcls), _rcls.passes,
                _rcls.needs_closure, _rname, _bname, f"{_rdesc}, base torch.optim.{_bcls.__name__}",
                per_sample=_rcls is ESAM,
            )
        )


def list_optimizers(pattern: str = "*", *, with_info: bool = False) -> list[Any]:
    """Registered names matching the shell-style ``pattern`` (sorted), or their
    :class:`OptimizerInfo` records with ``with_info=True``."""
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))
    return [_REGISTRY[n] for n in names] if with_info else names


def optimizer_info(name: str) -> OptimizerInfo:
    """The :class:`OptimizerInfo` of ``name`` (``KeyError`` listing close names if unknown)."""
    key = name.lower()
    if key not in _REGISTRY:
        close = [n for n in _REGISTRY if key.split("_")[0] in n][:8]
        raise KeyError(f"unknown optimizer {name!r}; known names include {close or list_optimizers()[:8]}")
    return _REGISTRY[key]


def create(name: str, params: Iterable[Any], **kwargs: Any) -> Optimizer:
    """Build the optimizer registered as ``name`` on ``params``.

    Wrapper options (``rho``, ``eta``, ``scope``, ``alpha``, ``beta``, ``gamma``, ``perturbation``,
    ``max_grad_norm``, ...) and base options
    (``lr``, ``momentum``, ``weight_decay``, ...) are given together as keyword arguments.
    A ``+swa`` name also takes ``model=`` (required, ``TypeError`` without it) and the options of
    :class:`SWA` (:data:`SWA_OPTIONS`: ``start``, ``total_steps``, ``every``, ``ema_decay``, ...).
    """
    return optimizer_info(name).factory(params, **kwargs)
