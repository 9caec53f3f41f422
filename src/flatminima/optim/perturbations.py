r"""Perturbation rules of the SAM family, as pure functions over lists of tensors.

Every rule maps the parameters ``w`` and the gradient ``g = \nabla L_B(w)`` (one entry per tensor, all
parameter groups flattened into one list) to the ascent perturbation ``e``, which the two-pass engine
adds to ``w`` before the second forward/backward. The norms are **global**: one norm over every tensor
of every parameter group, as in the papers; only the radius ``rho`` (and the rule's options) may differ
per tensor, which is how per-parameter-group options reach these functions.

Each rule has two implementations selected by ``foreach``: a multi-tensor path built on
``torch._foreach_*`` kernels (the default; one kernel launch per op for all tensors of a device) and a
per-tensor reference path with a Python loop. Both compute the same formula and are tested against each
other and against the closed forms.

Rules (``n`` is a global norm, ``eps`` guards a zero gradient, which gives ``e = 0``):

* :func:`sam_perturbation` (Foret et al., ICLR 2021):
  ``e_i = rho_i g_i / (||g|| + eps)``.
* :func:`asam_perturbation` (Kwon et al., ICML 2021), with ``T_i = |w_i| + eta_i`` element-wise for the
  adaptive tensors and ``T_i = 1`` otherwise: ``e_i = rho_i T_i^2 g_i / (||T g|| + eps)``.
* :func:`monge_perturbation` (Jacobsen & Arvanitidis, arXiv 2502.08448), the first-order worst case in
  the metric ball ``e^T G e <= rho^2`` with ``G = I + alpha^2 g g^T``:
  ``e_i = rho_i g_i / (||g|| sqrt(1 + alpha_i^2 ||g||^2) + eps)``; ``alpha = 0`` is SAM.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "asam_perturbation",
    "global_norm",
    "monge_perturbation",
    "sam_perturbation",
]

ScalarOrSeq = float | Sequence[float]


def _per_tensor(value: float | Sequence, n: int, name: str) -> list:
    if isinstance(value, (int, float, bool)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} tensors")
    return values


def _norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[t.device].append(i)
    return groups


def _tensor_norms(tensors: Sequence[Tensor], foreach: bool) -> list[Tensor]:
    """Per-tensor 2-norms, accumulated and returned in at least float32."""
    dtype = _norm_dtype(tensors)
    if not foreach:
        return [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]
    norms: list[Tensor | None] = [None] * len(tensors)
    for idx in _by_device(tensors).values():
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, dtype=dtype)):
            norms[i] = n
    return norms  # type: ignore[return-value]


def global_norm(tensors: Sequence[Tensor], *, foreach: bool = True) -> Tensor:
    r"""The 2-norm of the concatenation of ``tensors``: ``sqrt(sum_i ||t_i||^2)``.

    Returned as a 0-dim tensor on the device of the first tensor, in at least float32 (float64 when a
    tensor is float64). An empty list has norm 0.
    """
    if len(tensors) == 0:
        return torch.zeros(())
    device = tensors[0].device
    if foreach and all(t.device == device for t in tensors):  # the common case: one fused call
        norms = torch._foreach_norm(tensors, 2, dtype=_norm_dtype(tensors))
        return torch.linalg.vector_norm(torch.stack(norms), 2)
    norms = _tensor_norms(tensors, foreach)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2)


def _scaled(
    tensors: Sequence[Tensor], scale: Tensor, rho: Sequence[float], foreach: bool
) -> list[Tensor]:
    """``[rho_i * scale * t_i]`` as new tensors (``scale`` is a 0-dim tensor); one multiply per
    tensor, grouped by (device, rho) for the foreach kernels."""
    if not foreach:
        return [t * (scale.to(t.device) * r) for t, r in zip(tensors, rho)]
    out: list[Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple[torch.device, float], list[int]] = defaultdict(list)
    for i, (t, r) in enumerate(zip(tensors, rho)):
        buckets[(t.device, float(r))].append(i)
    for (device, r), idx in buckets.items():
        ts = torch._foreach_mul([tensors[i] for i in idx], scale.to(device) * r)
        for i, t in zip(idx, ts):
            out[i] = t
    return out  # type: ignore[return-value]


def sam_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: ScalarOrSeq,
    *,
    grad_norm: Tensor | None = None,
    eps: float = 1e-12,
    foreach: bool = True,
) -> list[Tensor]:
    r"""SAM's ascent direction ``e_i = rho_i g_i / (||g||_2 + eps)`` with one global norm.

    Args:
        params: the parameters (unused by this rule; kept for one signature across rules).
        grads: ``g``, one tensor per parameter.
        rho: the radius, one float for all tensors or one per tensor.
        grad_norm: ``||g||`` if the caller already has it (saves one pass over the gradients).
        eps: added to the norm; a zero gradient gives a zero perturbation.
        foreach: use the ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Reference: Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently
    Improving Generalization", ICLR 2021.
    """
    rhos = _per_tensor(rho, len(grads), "rho")
    if len(grads) == 0:
        return []
    n = global_norm(grads, foreach=foreach) if grad_norm is None else grad_norm
    return _scaled(grads, 1.0 / (n + eps), rhos, foreach)


def asam_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: ScalarOrSeq,
    *,
    eta: ScalarOrSeq = 0.01,
    adaptive: bool | Sequence[bool] = True,
    eps: float = 1e-12,
    foreach: bool = True,
) -> list[Tensor]:
    r"""Adaptive SAM: ``e_i = rho_i T_i^2 g_i / (||T g||_2 + eps)`` with ``T_i = |w_i| + eta_i``.

    ``T_i`` is the element-wise normalization operator of ASAM for the tensors marked ``adaptive``;
    the others use ``T_i = 1`` (plain SAM direction) but still enter the one global norm ``||T g||``.

    Args:
        params: ``w``, one tensor per parameter (``T`` depends on the weights).
        grads: ``g``, one tensor per parameter.
        rho: the radius (ASAM's is about 10x SAM's; 0.5 with the official flavour).
        eta: the offset of ``T`` (0.01 in the official code, 0 in davda54/sam's ``adaptive=True``).
        adaptive: which tensors get ``T = |w| + eta`` (one bool or one per tensor).
        eps: added to the norm.
        foreach: use the ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Reference: Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks", ICML 2021.
    """
    n_t = len(grads)
    rhos = _per_tensor(rho, n_t, "rho")
    etas = _per_tensor(eta, n_t, "eta")
    adapt = _per_tensor(adaptive, n_t, "adaptive")
    if n_t == 0:
        return []
    a_idx = [i for i in range(n_t) if adapt[i]]
    p_idx = [i for i in range(n_t) if not adapt[i]]
    a_w = [params[i].detach() for i in a_idx]
    a_g = [grads[i] for i in a_idx]
    a_eta = [etas[i] for i in a_idx]
    if foreach and a_idx:
        t = torch._foreach_abs(a_w)
        if any(v != 0 for v in a_eta):
            torch._foreach_add_(t, a_eta)
        tg = torch._foreach_mul(t, a_g)  # T g
        t2g = torch._foreach_mul(tg, t)  # T^2 g
    else:
        t = [w.abs() + et for w, et in zip(a_w, a_eta)]
        tg = [ti * g for ti, g in zip(t, a_g)]
        t2g = [tgi * ti for tgi, ti in zip(tg, t)]
    # ||T g|| over every tensor: T g for the adaptive ones, g for the others.
    tg_all: list[Tensor | None] = [None] * n_t
    for i, v in zip(a_idx, tg):
        tg_all[i] = v
    for i in p_idx:
        tg_all[i] = grads[i]
    n = global_norm(tg_all, foreach=foreach)  # type: ignore[arg-type]
    direction: list[Tensor | None] = [None] * n_t
    for i, v in zip(a_idx, t2g):
        direction[i] = v
    for i in p_idx:
        direction[i] = grads[i]
    return _scaled(direction, 1.0 / (n + eps), rhos, foreach)  # type: ignore[arg-type]


def monge_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: ScalarOrSeq,
    *,
    alpha: ScalarOrSeq = 1.0,
    grad_norm: Tensor | None = None,
    eps: float = 1e-12,
    foreach: bool = True,
) -> list[Tensor]:
    r"""Monge-SAM: ``e_i = rho_i g_i / (||g|| sqrt(1 + alpha_i^2 ||g||^2) + eps)``.

    The worst case of the first-order loss within ``e^T G e <= rho^2`` under the Monge metric
    ``G = I + alpha^2 g g^T`` of the loss surface; by Sherman-Morrison ``G^{-1} g = g / (1 + alpha^2
    ||g||^2)``, so Monge-SAM is SAM with the radius shrunk to ``rho / sqrt(1 + alpha^2 ||g||^2)``: like
    gradient descent where the gradient is large (steep walls, saddles), like SAM near minima.
    ``alpha = 0`` is SAM exactly. Not invariant to the scale of the loss: unscale AMP gradients first,
    and treat ``alpha`` as the knob that absorbs the loss scale.

    Reference: Jacobsen & Arvanitidis, "Monge SAM: Robust Reparameterization-Invariant Sharpness-Aware
    Minimization Based on Loss Geometry", arXiv 2502.08448 (2025).
    """
    n_t = len(grads)
    rhos = _per_tensor(rho, n_t, "rho")
    alphas = _per_tensor(alpha, n_t, "alpha")
    if n_t == 0:
        return []
    n = global_norm(grads, foreach=foreach) if grad_norm is None else grad_norm
    # One scale per distinct alpha (usually one), folded into the per-tensor radius.
    out: list[Tensor | None] = [None] * n_t
    by_alpha: dict[float, list[int]] = defaultdict(list)
    for i, a in enumerate(alphas):
        by_alpha[float(a)].append(i)
    for a, idx in by_alpha.items():
        scale = 1.0 / (n * torch.sqrt(1.0 + (a * a) * n * n) + eps)
        part = _scaled([grads[i] for i in idx], scale, [rhos[i] for i in idx], foreach)
        for i, v in zip(idx, part):
            out[i] = v
    return out  # type: ignore[return-value]
