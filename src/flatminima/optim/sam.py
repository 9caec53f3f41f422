"""SAM, ASAM and Monge-SAM: the two-pass engine with one perturbation rule each.

A :class:`PerturbationRule` bundles a rule's per-group options, their validation and the map
``(w, g) -> e``; the optimizer classes here are the engine plus one rule, and
:class:`~flatminima.optim.esam.ESAM` composes any rule (by name, :data:`RULES`) with its own savings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .engine import SharpnessAwareOptimizer, check_number, per_tensor, shared_option
from .perturbations import asam_perturbation, monge_perturbation, sam_perturbation

__all__ = ["ASAM", "MSAM", "RULES", "SAM", "MongeSAM", "PerturbationRule"]


class PerturbationRule:
    r"""One rule of the SAM family: ``e_i = rho_i D_i(w, g) / s(n)``, ``n`` a global norm.

    ``perturb`` takes the per-tensor radii explicitly and a ``norm_scale`` that multiplies the
    rule's normalizer ``n`` (``||g||``, or ``||T g||`` for ASAM): ESAM's per-tensor weight
    perturbation sees only the kept tensors and passes ``norm_scale = 1 / sqrt(beta)`` to turn their
    norm into an estimate of the full one. ``norm`` gives ``||e||`` in closed form when it has one.
    """

    name: str = ""
    #: The default radius of the rule.
    rho: float = 0.05
    #: Per-group options besides ``rho`` and their defaults.
    options: dict[str, Any] = {}

    def validate(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming an invalid option of ``group``."""

    def perturb(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        rhos: Sequence[float],
        groups: Sequence[dict[str, Any]],
        names: Sequence[str | None],
        grad_norm: Tensor,
        *,
        eps: float,
        foreach: bool,
        norm_scale: float = 1.0,
    ) -> list[Tensor]:
        raise NotImplementedError

    def norm(self, grad_norm: Tensor, groups: Sequence[dict[str, Any]], eps: float) -> Tensor | None:
        return None

    def __repr__(self) -> str:
        return f"<perturbation rule {self.name!r}>"


class _SAMRule(PerturbationRule):
    name = "sam"

    def perturb(self, params, grads, rhos, groups, names, grad_norm, *, eps, foreach, norm_scale=1.0):
        n = grad_norm if norm_scale == 1.0 else grad_norm * norm_scale
        return sam_perturbation(params, grads, rhos, grad_norm=n, eps=eps, foreach=foreach)

    def norm(self, grad_norm, groups, eps):
        rho = shared_option(groups, "rho")
        return None if rho is None else rho * grad_norm / (grad_norm + eps)


_ASAM_SCOPES = ("weights", "all")


def _is_adaptive(param: Tensor, name: str | None, scope: str) -> bool:
    if scope == "all":
        return True
    if name is not None:
        return name.endswith("weight")
    return param.dim() >= 2


class _ASAMRule(PerturbationRule):
    name = "asam"
    rho = 0.5
    options = {"eta": 0.01, "scope": "weights"}

    def validate(self, group):
        if "eta" in group:
            check_number("eta", group["eta"])
        if "scope" in group and group["scope"] not in _ASAM_SCOPES:
            raise ValueError(f"invalid scope: {group['scope']!r} (must be one of {_ASAM_SCOPES})")

    def perturb(self, params, grads, rhos, groups, names, grad_norm, *, eps, foreach, norm_scale=1.0):
        # ASAM measures its own normalizer ||T g||; scaling it by c is dividing the radius by c.
        if norm_scale != 1.0:
            rhos = [r / norm_scale for r in rhos]
        adaptive = [_is_adaptive(p, n, g["scope"]) for p, n, g in zip(params, names, groups)]
        return asam_perturbation(
            params, grads, rhos, eta=per_tensor(groups, "eta"), adaptive=adaptive, eps=eps,
            foreach=foreach,
        )


class _MongeRule(PerturbationRule):
    name = "monge"
    options = {"alpha": 1.0}

    def validate(self, group):
        if "alpha" in group:
            check_number("alpha", group["alpha"])

    def perturb(self, params, grads, rhos, groups, names, grad_norm, *, eps, foreach, norm_scale=1.0):
        n = grad_norm if norm_scale == 1.0 else grad_norm * norm_scale
        return monge_perturbation(
            params, grads, rhos, alpha=per_tensor(groups, "alpha"), grad_norm=n, eps=eps,
            foreach=foreach,
        )

    def norm(self, grad_norm, groups, eps):
        rho, alpha = shared_option(groups, "rho"), shared_option(groups, "alpha")
        if rho is None or alpha is None:
            return None
        return rho * grad_norm / (grad_norm * torch.sqrt(1.0 + alpha * alpha * grad_norm**2) + eps)


#: The rules by name (``"msam"`` is an alias of ``"monge"``).
RULES: dict[str, PerturbationRule] = {"sam": _SAMRule(), "asam": _ASAMRule(), "monge": _MongeRule()}
RULES["msam"] = RULES["monge"]


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

    _rule = RULES["sam"]

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

    _rule = RULES["asam"]

    @staticmethod
    def is_adaptive(param: Tensor, name: str | None, scope: str) -> bool:
        """Whether ``T = |w| + eta`` applies to this tensor under ``scope``."""
        return _is_adaptive(param, name, scope)


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

    _rule = RULES["monge"]


#: Short alias of :class:`MongeSAM`.
MSAM = MongeSAM
