r"""ESAM: Efficient Sharpness-Aware Minimization (Du et al., ICLR 2022, arXiv 2110.03141).

Two savings on top of any SAM-family perturbation rule:

* **Stochastic Weight Perturbation (SWP).** Only a random subset of the parameters is perturbed,
  each kept with probability ``beta`` and scaled by ``1 / beta``. With per-element masks (the
  paper's text, ``swp="element"``) the first backward is complete and
  ``e = m \odot e_rule / beta`` is exactly unbiased: ``E[e] = e_rule``. With per-tensor masks (the
  authors' code, ``swp="tensor"``, default) the masked tensors are excluded from the first backward
  (``requires_grad`` is switched off for them around the first closure call), which skips their
  weight-gradient computation; this is the only source of SWP's saving. Their gradient is then
  unknown, so the rule's normalizer is estimated from the kept tensors,
  ``n_hat^2 = ||m g||^2 / beta`` (unbiased for ``||g||^2``), and
  ``e_kept = rule(g_kept; normalizer n_hat) / beta``: unbiased up to the ratio bias of ``1/n_hat``,
  which vanishes as the number of tensors grows. The authors' code normalizes by ``||m g||`` itself,
  which inflates ``||e||`` to ``rho / beta`` (2 rho at beta = 0.5); ours has ``||e|| = rho /
  sqrt(beta)``. To reproduce the authors' radius ``rho_a``, use ``rho = rho_a / sqrt(beta)``.

* **Sharpness-sensitive Data Selection (SDS).** With a per-sample closure ``closure(select=None)``,
  the step scores each sample by ``Delta_i = l_i(w + e) - l_i(w)`` with one forward at ``w + e``
  under ``no_grad`` and computes the descent gradient on exactly ``k = max(1, ceil(gamma B))``
  samples with the largest ``Delta_i`` (ties broken by the lower index). ``gamma = 1`` skips the
  scoring forward.

A step therefore runs: forward + (partial) backward at ``w`` on the batch, a no-grad forward at
``w + e`` on the batch (SDS only), forward + backward at ``w + e`` on the ``k`` selected samples.
``beta = gamma = 1`` is the underlying SAM-family optimizer exactly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .engine import (
    SharpnessAwareOptimizer,
    _quiet_global_hook_warning,
    _RNGState,
    _sample_losses,
    per_tensor,
)
from .perturbations import global_norm
from .sam import RULES

__all__ = ["ESAM", "num_selected", "select_top"]

_SWP_MODES = ("tensor", "element")


def _fraction(name: str, value: Any) -> float:
    """Validate a fraction in ``(0, 1]``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < float(value) <= 1.0
    if not ok:
        raise ValueError(f"invalid {name}: {value!r} (must be a number in (0, 1])")
    return float(value)


def num_selected(gamma: float, batch: int) -> int:
    r"""``k = max(1, ceil(gamma B))`` samples kept by data selection, robust to float round-off
    (``gamma = 0.3``, ``B = 10`` gives 3, not 4)."""
    if batch < 1:
        raise ValueError(f"the batch must have at least one sample, got {batch}")
    k = math.ceil(round(gamma * batch, 9))
    return min(batch, max(1, k))


def select_top(delta: Tensor, k: int) -> Tensor:
    r"""Indices (ascending) of the ``k`` largest entries of ``delta``; among equal values the lower
    index wins, so the choice is deterministic. ``delta`` is 1-D; the result is on its device."""
    if delta.dim() != 1 or not 1 <= k <= delta.numel():
        raise ValueError(f"select_top needs a 1-D tensor and 1 <= k <= {delta.numel()}, got k={k}")
    order = torch.sort(delta, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


class ESAM(SharpnessAwareOptimizer):
    r"""Efficient SAM (Du et al., ICLR 2022): stochastic weight perturbation and sharpness-sensitive
    data selection around any SAM-family rule (Euclidean, adaptive or Monge).

    Args:
        params, base_optimizer, base: as for :class:`~flatminima.SAM`.
        rho: radius of the rule (default: the rule's, 0.05 for SAM and Monge-SAM, 0.5 for ASAM).
        beta: SWP keep probability in ``(0, 1]`` (default 0.5; 1 perturbs every parameter).
        gamma: SDS fraction of the batch used for the descent gradient, in ``(0, 1]``
            (default 0.5; 1 uses the whole batch and skips the scoring forward).
        perturbation: the rule, ``"sam"`` (default), ``"asam"`` or ``"monge"`` (alias ``"msam"``);
            its options (``eta``, ``scope``, ``alpha``) are accepted as keyword arguments.
        swp: ``"tensor"`` (default; masks whole tensors and skips their weight gradients in the
            first backward) or ``"element"`` (masks single entries, exactly unbiased, no saving).
        seed: seed of the optimizer's own generators for the masks (default
            ``torch.initial_seed()``, so ``torch.manual_seed`` makes runs repeatable); their state
            is part of :meth:`state_dict`.
        **kwargs: the engine options (``foreach``, ``replay_rng``, ``restore_running_stats``,
            ``max_grad_norm``, ``check_finite``, ``first_pass_context``, ``eps``), then the base
            optimizer's.

    The closure. ``closure(select=None)`` runs only the forward and returns the per-sample losses
    (``reduction="none"``) of the batch, or of its rows ``select`` (a ``LongTensor`` on the losses'
    device) when given; the optimizer backpropagates their mean. A standard closure (forward,
    backward, scalar loss) also works, with data selection off (a warning says so once when
    ``gamma < 1``): use it for losses that do not split per sample (contrastive, ranking).

    Passes and their side effects: BatchNorm running statistics are updated once, by the first
    forward (the scoring and descent passes run under the running-statistics guard). The scoring
    forward replays the first pass's RNG state, so dropout masks are the same and ``Delta_i`` measures
    the weight change alone; the descent pass replays it too (identical masks when every sample is
    selected, masks of the subset's shape otherwise).

    Gradient accumulation: SDS ranks the whole batch, so a per-sample closure returns the losses of
    the whole batch at once (it may loop over micro-batches for the forward, keeping their graphs).
    To accumulate with bounded memory, use a standard closure with the accumulation inside; data
    selection is then off and SWP still applies.

    DDP: the masks come from the optimizer's seeded generator, so replicas with the same seed draw
    the same masks. With ``swp="tensor"`` pass ``first_pass_context=ddp_model.no_sync`` (the
    per-replica perturbation of the paper): a synchronized first backward would wait for gradients
    the masked tensors never produce.

    Example::

        opt = flatminima.ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5,
                              lr=0.1, momentum=0.9)

        def closure(select=None):
            xb, yb = (x, y) if select is None else (x[select], y[select])
            return F.cross_entropy(model(xb), yb, reduction="none")

        loss = opt.step(closure)
    """

    passes = 3

    def __init__(
        self,
        params: Iterable[Any] | None = None,
        base_optimizer: type[Optimizer] | None = None,
        rho: float | None = None,
        beta: float = 0.5,
        gamma: float = 0.5,
        *,
        perturbation: str = "sam",
        swp: str = "tensor",
        seed: int | None = None,
        base: Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if perturbation not in RULES:
            raise ValueError(f"invalid perturbation: {perturbation!r} (must be one of {sorted(RULES)})")
        if swp not in _SWP_MODES:
            raise ValueError(f"invalid swp: {swp!r} (must be one of {_SWP_MODES})")
        self.beta = _fraction("beta", beta)
        self.gamma = _fraction("gamma", gamma)
        self.swp = swp
        self._rule = RULES[perturbation]
        self.perturbation = self._rule.name
        defaults: dict[str, Any] = {"rho": self._rule.rho if rho is None else rho}
        for key, default in self._rule.options.items():
            defaults[key] = kwargs.pop(key, default)
        if seed is None:
            seed = torch.initial_seed()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._generator(torch.device("cpu"))  # always in the checkpoint, even before a draw
        self._kept: set[int] | None = None  # ids of the tensors kept by the current tensor mask
        self._kept_fraction: Tensor | float = 1.0
        self._warned_standard_closure = False
        super().__init__(params, base_optimizer, base=base, group_defaults=defaults, **kwargs)

    # ------------------------------------------------------------------ masks
    def _generator(self, device: torch.device) -> torch.Generator:
        key = "cpu" if device.type == "cpu" else str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=key).manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def _trainable(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _draw_tensor_mask(self) -> set[int]:
        """Draw the per-tensor mask (one uniform per trainable tensor, CPU generator, no sync)."""
        params = self._trainable()
        u = torch.rand(len(params), generator=self._generator(torch.device("cpu")), dtype=torch.float64)
        kept = {id(p) for p, keep in zip(params, (u < self.beta).tolist()) if keep}
        total = sum(p.numel() for p in params)
        self._kept_fraction = sum(p.numel() for p in params if id(p) in kept) / max(total, 1)
        return kept

    @contextlib.contextmanager
    def masked_first_pass(self) -> Iterator[None]:
        """Draw this step's per-tensor mask and switch ``requires_grad`` off for the masked tensors
        while the block runs, so that its backward computes no weight gradient for them.

        :meth:`step` does this itself; a manual loop wraps its first forward and backward::

            with opt.masked_first_pass():
                loss_fn(model(x), y).backward()
            opt.first_step()

        A no-op with ``swp="element"`` or ``beta = 1``. ``requires_grad`` is restored on exit, also
        after an exception; frozen parameters stay frozen.
        """
        if self.swp != "tensor" or self.beta == 1.0:
            yield
            return
        self._kept = self._draw_tensor_mask()
        # Nothing kept (probability (1 - beta)^T): e = 0, and the backward must still run.
        frozen = [p for p in self._trainable() if id(p) not in self._kept] if self._kept else []
        try:
            for p in frozen:
                p.requires_grad_(False)
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _perturbation(self, params, grads, groups, names, grad_norm) -> list[Tensor]:
        beta = self.beta
        if beta == 1.0:
            self._kept_fraction = 1.0
            return super()._perturbation(params, grads, groups, names, grad_norm)
        rhos = [r / beta for r in per_tensor(groups, "rho")]
        if self.swp == "tensor":
            kept = self._kept if self._kept is not None else self._draw_tensor_mask()
            self._kept = None
            idx = [i for i, p in enumerate(params) if id(p) in kept]
            e: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
            if len(idx) < len(params):  # a manual loop without masked_first_pass: drop the masked
                for i in set(range(len(params))) - set(idx):
                    e[i] = torch.zeros_like(params[i])
                grad_norm = global_norm([grads[i] for i in idx], foreach=self.foreach)
            part = self._rule.perturb(
                [params[i] for i in idx], [grads[i] for i in idx], [rhos[i] for i in idx],
                [groups[i] for i in idx], [names[i] for i in idx], grad_norm,
                eps=self.eps, foreach=self.foreach, norm_scale=beta**-0.5,
            ) if idx else []
            for i, v in zip(idx, part):
                e[i] = v
            return e
        e = self._rule.perturb(
            params, grads, rhos, groups, names, grad_norm, eps=self.eps, foreach=self.foreach
        )
        kept_count: Tensor | float = 0.0
        for ei in e:
            keep = torch.rand(ei.shape, generator=self._generator(ei.device), device=ei.device) < beta
            ei.mul_(keep)
            kept_count = kept_count + keep.sum().to(e[0].device)
        total = sum(ei.numel() for ei in e)
        self._kept_fraction = kept_count / max(total, 1) if e else 0.0
        return e

    def _perturbation_norm(self, grad_norm: Tensor, groups: list[dict[str, Any]]) -> Tensor | None:
        return super()._perturbation_norm(grad_norm, groups) if self.beta == 1.0 else None

    @torch.no_grad()
    def first_step(self, *, loss: Tensor | float | None = None, scaler: Any = None) -> None:
        super().first_step(loss=loss, scaler=scaler)
        self._stats["swp_kept"] = self._kept_fraction
        self._stats.setdefault("selected", 1.0)
        self._stats.setdefault("delta_mean", math.nan)

    def cancel_step(self) -> None:
        self._kept = None
        super().cancel_step()

    # ------------------------------------------------------------------ data selection
    def selection(self, clean_losses: Tensor, adv_losses: Tensor) -> Tensor:
        r"""The rows used for the descent gradient: the ``max(1, ceil(gamma B))`` largest
        ``Delta_i = adv_losses_i - clean_losses_i`` (a manual loop's helper; :meth:`step` uses it)."""
        delta = adv_losses.detach() - clean_losses.detach()
        return select_top(delta, num_selected(self.gamma, delta.numel()))

    def _first_pass(self, closure, per_sample, scaler):
        if not per_sample and self.gamma < 1.0 and not self._warned_standard_closure:
            self._warned_standard_closure = True
            warnings.warn(
                f"ESAM got a standard closure (no `select` parameter), so data selection (gamma="
                f"{self.gamma}) is off and every sample is used; write `closure(select=None)` "
                "returning per-sample losses to enable it",
                UserWarning,
                stacklevel=4,
            )
        with self.masked_first_pass():
            return super()._first_pass(closure, per_sample, scaler)

    def _second_pass(self, closure, per_sample, scaler, rng, clean_losses):
        if not per_sample or clean_losses is None:
            return super()._second_pass(closure, per_sample, scaler, rng, clean_losses)
        batch = clean_losses.numel()
        k = num_selected(self.gamma, batch)
        self._stats["selected"] = k / batch
        if k == batch:
            return super()._second_pass(closure, per_sample, scaler, rng, clean_losses)
        idx = self._score(closure, rng, clean_losses, scaler)
        if rng is not None:
            rng.restore()
        with torch.enable_grad(), _quiet_global_hook_warning():
            return self._run_closure(closure, True, scaler, "second", select=idx, rows=k)[1]

    def _score(
        self, closure: Callable[..., Any], rng: _RNGState | None, clean: Tensor, scaler: Any
    ) -> Tensor:
        """The no-grad forward at ``w + e``; return the selected rows (top ``Delta_i``)."""
        if rng is not None:
            rng.restore()
        with torch.no_grad(), _quiet_global_hook_warning():
            adv = _sample_losses(closure(select=None), "scoring", clean.numel())
        delta = adv.detach().to(clean.dtype) - clean
        mean = delta.mean()
        if self.check_finite and not self._scaler_active(scaler) and not bool(torch.isfinite(mean)):
            raise FloatingPointError(
                f"non-finite per-sample loss at w + e in the scoring pass (mean Delta {float(mean)}); "
                "the weights were restored and the base optimizer did not step"
            )
        self._stats["delta_mean"] = mean
        self._stats["_loss_adv_batch"] = adv.detach().mean()
        return select_top(delta, num_selected(self.gamma, delta.numel()))

    # ------------------------------------------------------------------ stats and checkpoints
    @property
    def stats(self) -> dict[str, float]:
        r"""Those of :class:`~flatminima.SharpnessAwareOptimizer` plus ``swp_kept`` (fraction of
        parameter entries perturbed), ``selected`` (fraction of the batch in the descent gradient)
        and ``delta_mean`` (mean ``Delta_i`` over the batch; NaN when no scoring pass ran).

        When a scoring pass ran, ``loss_adv`` is the whole batch's mean loss at ``w + e`` (so
        ``sharpness`` equals ``delta_mean``) and ``loss_selected`` the selected samples' mean loss
        at ``w + e``. With ``swp="tensor"``, ``grad_norm`` and ``cos`` are over the kept tensors."""
        out = super().stats
        full = self._stats.get("_loss_adv_batch")
        if full is not None and "loss_adv" in out:
            out["loss_selected"] = out["loss_adv"]
            out["loss_adv"] = float(full)
            out["sharpness"] = out["loss_adv"] - out["loss"]
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "gamma": self.gamma,
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def _load_extra_state(self, own: dict[str, Any]) -> None:
        if "seed" not in own:  # a plain base-optimizer checkpoint: keep our generators
            return
        self.seed = int(own["seed"])
        self._generators = {}  # devices without a saved state restart from the seed
        for key, state in own.get("generators", {}).items():
            self._generator(torch.device(key)).set_state(state)

    def __repr__(self) -> str:
        rule = ", ".join(f"{k}={v!r}" for k, v in self._group_defaults.items())
        return (
            f"ESAM(perturbation={self.perturbation!r}, {rule}, beta={self.beta}, gamma={self.gamma}, "
            f"swp={self.swp!r}, base={self.base_optimizer!r})"
        )
