"""SAM, ASAM and Monge-SAM: the two-pass engine with one perturbation rule each."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .engine import SharpnessAwareOptimizer, check_number, per_tensor, shared_option
from .perturbations import asam_perturbation, monge_perturbation, sam_perturbation

__all__ = ["ASAM", "MSAM", "SAM", "MongeSAM"]


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    Minimizes ``max_{||e|| <= rho} L_B(w + e)`` to first order: ``e = rho g / ||g||`` with
    ``g = \nabla L_B(w)`` and one global norm over every parameter group, then the base optimizer
    steps with ``\nabla L_B(w + e)`` taken at the perturbed point, ``e`` held constant.

    Build it on a base optimizer class (``SAM(model.parameters(), torch.optim.SGD, rho=0.05,
    lr=0.1, momentum=0.9)``) or wrap an instance (``SAM(base=torch.optim.AdamW(...), rho=0.05)``).
    ``param_groups`` and ``state`` are shared with the base, so LR schedulers, ``zero_grad`` and
    ``add_param_group`` work on either object. ``rho`` may be set per param group.

    Args:
        params: parameters, named parameters or param-group dicts.
        base_optimizer: a ``torch.optim.Optimizer`` subclass built with ``**kwargs``.
        rho: radius of the perturbation (>= 0; 0 reproduces the base optimizer exactly).
        base: an optimizer instance to wrap instead of ``params``/``base_optimizer``.
        **kwargs: the engine options of :class:`~flatminima.optim.engine.SharpnessAwareOptimizer`
            (``foreach``, ``replay_rng``, ``restore_running_stats``, ``max_grad_norm``,
            ``check_finite``, ``eps``); the rest go to ``base_optimizer``.

    Example::

        opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)       # calls closure at w, then at w + e
    """

    def __init__(
        self,
        params: Iterable[Any] | None = None,
        base_optimizer: type[Optimizer] | None = None,
        rho: float = 0.05,
        *,
        base: Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, base=base, group_defaults={"rho": rho}, **kwargs
        )

    def _perturbation_norm(self, grad_norm: Tensor, groups: list[dict[str, Any]]) -> Tensor | None:
        rho = shared_option(groups, "rho")
        return None if rho is None else rho * grad_norm / (grad_norm + self.eps)

    def _perturbation(self, params, grads, groups, names, grad_norm) -> list[Tensor]:
        return sam_perturbation(
            params, grads, per_tensor(groups, "rho"), grad_norm=grad_norm, eps=self.eps,
            foreach=self.foreach,
        )


_ASAM_SCOPES = ("weights", "all")


class ASAM(SharpnessAwareOptimizer):
    r"""Adaptive SAM (Kwon et al., ICML 2021): ``e = rho T^2 g / ||T g||``, ``T = |w| + eta``.

    The sharpness is measured in the coordinates normalized by ``T_w``, which makes it invariant to
    rescalings of the weights that leave the network's function unchanged (e.g. a ReLU layer's
    weights times ``c`` and the next layer's times ``1/c``).

    Two flavours exist in the wild, and their best ``rho`` differ about 4x:

    ================  =====================================  ======  ===============
    flavour           ``T`` applies to                        ``eta``  typical ``rho``
    ================  =====================================  ======  ===============
    official (ours)   ``scope="weights"``: tensors whose name   0.01    0.5 (CIFAR-10)
                      ends in ``weight`` when named parameters
                      are given, else tensors with >= 2 dims;
                      the others use ``T = 1``
    davda54/sam       ``scope="all"``: every tensor             0.0     2.0
    ================  =====================================  ======  ===============

    With ``eta = 0`` zero-initialized tensors (biases) are never perturbed. All tensors share the
    one global norm ``||T g||``.

    Args:
        params, base_optimizer, base, **kwargs: as for :class:`SAM`.
        rho: radius in the normalized coordinates (default 0.5).
        eta: offset of ``T`` (default 0.01), >= 0.
        scope: ``"weights"`` (default, official) or ``"all"`` (davda54's ``adaptive=True``).
    """

    def __init__(
        self,
        params: Iterable[Any] | None = None,
        base_optimizer: type[Optimizer] | None = None,
        rho: float = 0.5,
        *,
        eta: float = 0.01,
        scope: str = "weights",
        base: Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, base=base,
            group_defaults={"rho": rho, "eta": eta, "scope": scope}, **kwargs,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if "eta" in group:
            check_number("eta", group["eta"])
        if "scope" in group and group["scope"] not in _ASAM_SCOPES:
            raise ValueError(f"invalid scope: {group['scope']!r} (must be one of {_ASAM_SCOPES})")

    @staticmethod
    def is_adaptive(param: Tensor, name: str | None, scope: str) -> bool:
        """Whether ``T = |w| + eta`` applies to this tensor under ``scope``."""
        if scope == "all":
            return True
        if name is not None:
            return name.endswith("weight")
        return param.dim() >= 2

    def _perturbation(self, params, grads, groups, names, grad_norm) -> list[Tensor]:
        adaptive = [self.is_adaptive(p, n, g["scope"]) for p, n, g in zip(params, names, groups)]
        return asam_perturbation(
            params, grads, per_tensor(groups, "rho"), eta=per_tensor(groups, "eta"),
            adaptive=adaptive, eps=self.eps, foreach=self.foreach,
        )


class MongeSAM(SharpnessAwareOptimizer):
    r"""Monge-SAM (Jacobsen & Arvanitidis, arXiv 2502.08448): SAM under the loss-surface metric.

    The worst case within ``e^T G e <= rho^2`` for the Monge metric ``G = I + alpha^2 g g^T`` is
    ``e = rho g / (||g|| sqrt(1 + alpha^2 ||g||^2))``: SAM whose radius shrinks where the gradient
    is large (behaves like the base optimizer near saddles and on steep walls) and tends to ``rho``
    near minima. Same cost as SAM. ``alpha = 0`` is SAM exactly.

    The metric is not invariant to the scale of the loss (sum vs mean reduction, loss scaling):
    gradients are unscaled before the norm under a ``GradScaler``; ``alpha`` absorbs the loss scale.

    Args:
        params, base_optimizer, base, **kwargs: as for :class:`SAM`.
        rho: radius (default 0.05).
        alpha: scale of the metric's rank-one term (default 1.0, i.e. ``alpha^2 = 1``), >= 0.
    """

    def __init__(
        self,
        params: Iterable[Any] | None = None,
        base_optimizer: type[Optimizer] | None = None,
        rho: float = 0.05,
        *,
        alpha: float = 1.0,
        base: Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, base_optimizer, base=base, group_defaults={"rho": rho, "alpha": alpha},
            **kwargs,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if "alpha" in group:
            check_number("alpha", group["alpha"])

    def _perturbation_norm(self, grad_norm: Tensor, groups: list[dict[str, Any]]) -> Tensor | None:
        rho, alpha = shared_option(groups, "rho"), shared_option(groups, "alpha")
        if rho is None or alpha is None:
            return None
        return rho * grad_norm / (grad_norm * torch.sqrt(1.0 + alpha * alpha * grad_norm**2) + self.eps)

    def _perturbation(self, params, grads, groups, names, grad_norm) -> list[Tensor]:
        return monge_perturbation(
            params, grads, per_tensor(groups, "rho"), alpha=per_tensor(groups, "alpha"),
            grad_norm=grad_norm, eps=self.eps, foreach=self.foreach,
        )


#: Short alias of :class:`MongeSAM`.
MSAM = MongeSAM
