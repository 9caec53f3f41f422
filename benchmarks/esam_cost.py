"""What ESAM's step costs against SGD and SAM, why, pass by pass, and what it buys on digits.

ESAM (Du et al., ICLR 2022) saves work in two places: stochastic weight perturbation (SWP,
``beta``) switches ``requires_grad`` off for a random part of the parameter tensors during the first
forward/backward, so their weight-gradient computations are skipped; sharpness-sensitive data
selection (SDS, ``gamma``) runs the second forward/backward on the ``ceil(gamma B)`` samples whose
loss rose most under the perturbation, found by an extra no-grad forward on the whole batch. The
paper's target is an ESAM step costing at most 1.4 SGD steps (SAM: about 2). This script measures
what the saving is on CPU, and accounts for it.

What is measured (random data from a fixed seed, CPU, ``torch.set_num_threads(--threads)``):

1. **Full steps**, side by side in one run, on a small CNN (conv 16/32/64 with BatchNorm2d, ReLU
   and pooling, a linear head, 3x32x32 inputs, batch 128) and an MLP (12 Linear layers of width
   384 with ReLU, batch 256). One step is what a training loop pays per minibatch: ``SGD``
   (``zero_grad``, forward, backward, ``step``, momentum 0.9), ``SAM`` (``opt.step(closure)``,
   rho 0.05), ``ESAM-SWP`` (beta 0.5, gamma 1), ``ESAM-SDS`` (beta 1, gamma 0.5), ``ESAM both``
   (beta 0.5, gamma 0.5) and, as a diagnostic, ``ESAM-SWP element`` (per-entry masks, beta 0.5,
   gamma 1: exactly unbiased, but the first backward is complete). Every ESAM step gets the
   per-sample closure ``closure(select=None)``. All configurations start from the same weights
   and are run round-robin in a fresh seeded random order every round, so that slow drifts of the
   machine and the caches left by the previous configuration hit all alike. The table gives the
   median time, its 25-75 percentile range, the ratio of medians to SGD and the paired ratio (the
   median over rounds of the ratio to SGD measured in the same round).

2. **Passes**, each timed alone on each model, in the same rounds as the full steps (so a burst
   of load hits a step and its parts alike): (i) a training-mode forward with grad on the full
   batch (loss included), (ii) its full backward, (ii') a backward without any weight gradient
   (every parameter frozen, the first layer's output made a leaf that requires grad: activation
   gradients only; (ii) - (ii') is the weight-gradient work, the most SWP could ever skip),
   (iii) the forward and backward with ``requires_grad`` off on the parameter tensors that ESAM's
   per-tensor mask drops (each tensor kept with probability beta = 0.5; the masks are the first
   ones ESAM itself draws with the same seed; each call runs the next two in turn, and the figure
   is the mean over masks of each mask's median), (iv) a no-grad forward on the full batch (SDS's
   scoring pass), (v) a forward and backward on ``ceil(gamma B)`` rows gathered from the batch
   (SDS's descent pass).

3. **Optimizer-side work** (no forward/backward, hot caches): every parameter gets a random
   ``.grad``, then ``first_step()`` and ``second_step()`` are timed with a second random gradient
   in between; for ``swp="tensor"`` the gradients are set inside ``masked_first_pass()`` (which
   draws the mask and toggles ``requires_grad``), so only the kept tensors are perturbed, saved and
   restored, as in a real step. ``second_step`` includes the base SGD step. SDS's selection
   (``Delta_i``, its finiteness check, the stable top-k) is timed alone.

4. **Predicted versus measured**: from the parts, each method's step is predicted as the sum of its
   passes and optimizer-side work, e.g. ``ESAM both = (iii) + (iv) + (v) + ESAM-SWP optimizer work
   + selection``. The unit is one SGD step counted from its parts, ``U = (i) + (ii) + SGD step``.
   The predicted ratio (in U) sits next to the measured ratio of full steps; the residual
   (measured - predicted, in ms) is what the parts miss: RNG save/restore, the BatchNorm guard's
   hook, Python glue, and caches that are colder inside a real step. Then the script says what the
   1.4x target would need, given the measured passes.

5. **Accuracy**: the bundled digits task with 20 % of the training labels flipped, via
   :func:`flatminima.bench.quick.run_quick` with labelled variants (SGD, SAM, ESAM-SWP, ESAM-SDS,
   ESAM both), seeds 0, 1, 2, the default 30 epochs; a Markdown table of mean ± std test accuracy,
   ms/step and time relative to SGD. Its model is tiny (0.3 ms per SGD step), so its time ratios
   measure per-step overheads, not the compute savings of parts 1-4.

How to read it: a ratio of 1.4 means the step costs 1.4 SGD steps. SWP saves only the weight
gradients of the dropped tensors (and, when the lowest layers are all dropped, the backward below
the lowest kept one), never the forward, the activation gradients, or the elementwise layers
(BatchNorm, ReLU, pooling), which dominate this CNN on CPU: its forward is about 60 % of an SGD
step and its weight gradients about 14 %. SDS pays a full no-grad forward to halve the second
forward/backward: a net saving of about 1/6 of a step when the forward is a third of it (the MLP),
a net loss when the forward is most of it (the CNN on CPU).

Timing notes: the garbage collector is off while timing; medians are used because single steps on
a shared machine have long tails; each measurement has a time budget, so a loaded machine cuts the
number of rounds (the tables say how many ran). When the spread says other processes were
competing for the cores, a note marks the ratios as noisy. ``--threads 1`` (the default) is much
steadier on a small shared box than two OpenMP threads. The default run takes about 3-5 minutes
on a 2-core machine; ``--quick`` runs fewer rounds and masks (about 30-60 s in all).

Usage::

    python benchmarks/esam_cost.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _timing import (
    Runner,
    Timings,
    Workload,
    bare_sgd_runner,
    bench_parser,
    closure_step_runner,
    finish,
    flat,
    interleave,
    machine_meta,
    make_cnn,
    make_mlp,
    ms,
    noise_note,
    opt_side_runner,
    random_batch,
    random_grad_pair,
    ratios,
    sam_step_runner,
    sgd_step_runner,
    summary,
    table,
)
from torch import Tensor, nn

import flatminima
from flatminima.bench.quick import DEFAULT_EPOCHS, format_table, run_quick, summarize
from flatminima.optim.esam import num_selected, select_top

SEED = 0
CLASSES = 10
CNN_BATCH = 128
MLP_BATCH = 256
MLP_LAYERS = 12
MLP_WIDTH = 384
LR = 0.01
MOMENTUM = 0.9
RHO = 0.05
BETA = 0.5
GAMMA = 0.5
PAPER_TARGET = 1.4  # ESAM step / SGD step

WARMUP_CAP_S = 1.0  # seconds of warm-up per configuration at most

ACC_LABEL_NOISE = 0.2
ACC_SEEDS = (0, 1, 2)

#: Full-step configurations: name -> ESAM options (``None``: SGD; ``{}``: SAM).
METHODS: dict[str, dict[str, Any] | None] = {
    "SGD": None,
    "SAM": {},
    "ESAM-SWP": {"beta": BETA, "gamma": 1.0},
    "ESAM-SDS": {"beta": 1.0, "gamma": GAMMA},
    "ESAM both": {"beta": BETA, "gamma": GAMMA},
    "ESAM-SWP element": {"beta": BETA, "gamma": 1.0, "swp": "element"},
}
DESCRIPTION = {
    "SGD": "momentum 0.9",
    "SAM": "rho 0.05",
    "ESAM-SWP": f"beta {BETA}, gamma 1",
    "ESAM-SDS": f"beta 1, gamma {GAMMA}",
    "ESAM both": f"beta {BETA}, gamma {GAMMA}",
    "ESAM-SWP element": f"swp=element, beta {BETA}, gamma 1; diagnostic",
}


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Rounds, masks and time budgets (seconds per measurement); ``quick`` is a smoke run."""

    warmup: int
    rounds: int
    min_rounds: int
    masks: int
    masks_per_call: int
    opt_iters_per_round: int
    micro_reps: int
    budget: dict[str, float]
    budget_opt: float
    budget_micro: float

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                warmup=1, rounds=15, min_rounds=4, masks=6, masks_per_call=2, opt_iters_per_round=5,
                micro_reps=20, budget={"cnn": 20.0, "mlp": 8.0}, budget_opt=1.0, budget_micro=0.5,
            )
        return cls(
            warmup=3, rounds=150, min_rounds=10, masks=16, masks_per_call=2,
            opt_iters_per_round=10, micro_reps=50, budget={"cnn": 180.0, "mlp": 70.0},
            budget_opt=5.0, budget_micro=2.0,
        )


# ----------------------------------------------------------------------------------------- models
def make_workloads() -> list[Workload]:
    """The CNN (conv 16/32/64 with BatchNorm2d) and the MLP (``MLP_LAYERS`` Linear layers of width
    ``MLP_WIDTH`` with ReLU), each with its fixed random minibatch."""
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    cnn = make_cnn(CLASSES)
    x_cnn, y_cnn = random_batch(gen, CNN_BATCH, (3, 32, 32), CLASSES)
    torch.manual_seed(SEED)
    mlp = make_mlp(MLP_LAYERS, MLP_WIDTH, CLASSES)
    x_mlp, y_mlp = random_batch(gen, MLP_BATCH, (MLP_WIDTH,), CLASSES)
    n_cnn = sum(1 for _ in cnn.parameters())
    n_mlp = sum(1 for _ in mlp.parameters())
    return [
        Workload(f"CNN (conv 16/32/64 + BN, {n_cnn} tensors, batch {CNN_BATCH})", cnn, x_cnn,
                 y_cnn, key="cnn"),
        Workload(f"MLP ({MLP_LAYERS} Linear x {MLP_WIDTH}, {n_mlp} tensors, batch "
                 f"{MLP_BATCH})", mlp, x_mlp, y_mlp, key="mlp"),
    ]


# ------------------------------------------------------------------------------------- full steps
def sample_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def esam_runner(w: Workload, **kw: Any) -> Runner:
    model = copy.deepcopy(w.model).train()
    opt = flatminima.ESAM(
        model.parameters(), torch.optim.SGD, rho=RHO, seed=SEED, lr=LR, momentum=MOMENTUM, **kw
    )
    x, y = w.x, w.y

    def closure(select: Tensor | None = None) -> Tensor:
        xb, yb = (x, y) if select is None else (x[select], y[select])
        return sample_losses(model, xb, yb)

    return closure_step_runner(opt, closure)


# ------------------------------------------------------------------------------------------ passes
def esam_masks(n_tensors: int, count: int) -> list[list[bool]]:
    """The first ``count`` per-tensor masks ESAM(seed=SEED, beta=BETA) draws (same generator, same
    draw: one float64 uniform per tensor, kept if below beta)."""
    gen = torch.Generator().manual_seed(SEED)
    masks = []
    for _ in range(count):
        u = torch.rand(n_tensors, generator=gen, dtype=torch.float64)
        masks.append((u < BETA).tolist())
    return masks


def pass_runners(w: Workload, masks: list[list[bool]], per_call: int) -> dict[str, Runner]:
    """The passes (i)-(v) on a copy of the model; the SWP runner runs ``per_call`` masks per call,
    cycling through ``masks``, and returns ``fwd<i>`` / ``bwd<i>`` per mask index ``i``."""
    model = copy.deepcopy(w.model).train()
    params = list(model.parameters())
    x, y = w.x, w.y
    k = num_selected(GAMMA, w.batch)
    gen = torch.Generator().manual_seed(SEED + 3)
    rows = select_top(torch.rand(w.batch, generator=gen), k)  # k random rows, ascending
    counter = [0]

    def fwd_bwd() -> Timings:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = sample_losses(model, x, y).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return {"fwd": t1 - t0, "bwd": t2 - t1}

    # (ii'): a copy with every parameter frozen whose first layer's output is made a leaf that
    # requires grad, so the backward computes every activation gradient down to that output and no
    # weight gradient; the real backward's first layer computes only weight gradients (the input
    # needs none), so (ii) - (ii') is exactly the weight-gradient work.
    frozen_model = copy.deepcopy(w.model).train().requires_grad_(False)
    first = next(iter(frozen_model.children()))
    first.register_forward_hook(lambda module, args, out: out.detach().requires_grad_(True))

    def bwd_activations_only() -> Timings:
        loss = sample_losses(frozen_model, x, y).mean()
        t0 = time.perf_counter()
        loss.backward()
        return {"t": time.perf_counter() - t0}

    def fwd_bwd_swp() -> Timings:
        out: Timings = {}
        for _ in range(per_call):
            i = counter[0] % len(masks)
            counter[0] += 1
            keep = masks[i]
            # As ESAM: nothing kept means nothing frozen (the backward must still run).
            frozen = [p for p, kp in zip(params, keep, strict=True) if not kp] if any(keep) else []
            model.zero_grad(set_to_none=True)
            for p in frozen:
                p.requires_grad_(False)
            try:
                t0 = time.perf_counter()
                loss = sample_losses(model, x, y).mean()
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            out[f"fwd{i}"], out[f"bwd{i}"] = t1 - t0, t2 - t1
        return out

    def nograd_fwd() -> Timings:
        t0 = time.perf_counter()
        with torch.no_grad():
            sample_losses(model, x, y)
        return {"t": time.perf_counter() - t0}

    def half_fwd_bwd() -> Timings:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        sample_losses(model, x[rows], y[rows]).mean().backward()
        return {"t": time.perf_counter() - t0}

    return {
        "(i)+(ii)": fwd_bwd, "(ii')": bwd_activations_only, "(iii)": fwd_bwd_swp,
        "(iv)": nograd_fwd, "(v)": half_fwd_bwd,
    }


def bench_model(w: Workload, s: Settings) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Full steps of every method and the passes (i)-(v), all in the same rounds (so that the
    machine's drifts hit the steps and their parts alike). Returns (full steps, passes)."""
    runners: dict[str, Runner] = {}
    for name, kw in METHODS.items():
        if kw is None:
            runners[name] = sgd_step_runner(w, lr=LR, momentum=MOMENTUM)
        elif not kw:
            runners[name] = sam_step_runner(w, flatminima.SAM, lr=LR, momentum=MOMENTUM, rho=RHO)
        else:
            runners[name] = esam_runner(w, **kw)
    masks = esam_masks(w.tensors, s.masks)
    passes = pass_runners(w, masks, s.masks_per_call)
    runners.update({f"pass {n}": r for n, r in passes.items()})
    samples = interleave(
        runners, warmup=s.warmup, rounds=s.rounds, per_round=1, budget_s=s.budget[w.key],
        min_rounds=s.min_rounds, warmup_cap_s=WARMUP_CAP_S,
    )

    full: dict[str, dict[str, float]] = {}
    for name in METHODS:
        r = summary(samples[name], "step")
        r["ratio_to_sgd"], r["paired_ratio_to_sgd"] = ratios(samples[name], samples["SGD"], "step")
        full[name] = r

    # (iii): per mask, the median of its forward and of its backward; then the mean over masks.
    swp_calls = [t for rnd in samples["pass (iii)"] for t in rnd]
    per_mask: list[tuple[float, float]] = []
    timed_masks: list[list[bool]] = []
    for i, m in enumerate(masks):
        f_i = [t[f"fwd{i}"] for t in swp_calls if f"fwd{i}" in t]
        if f_i:
            b_i = [t[f"bwd{i}"] for t in swp_calls if f"bwd{i}" in t]
            per_mask.append((statistics.median(f_i), statistics.median(b_i)))
            timed_masks.append(m)
    sizes = [p.numel() for p in w.model.parameters()]
    kept_entries = [
        sum(n for n, kp in zip(sizes, m, strict=True) if kp) / sum(sizes) for m in timed_masks
    ]
    first = [f + b for f, b in per_mask]
    full_pass = samples["pass (i)+(ii)"]
    res = {
        "fwd_ms": ms(statistics.median(flat(full_pass, "fwd"))),
        "bwd_ms": ms(statistics.median(flat(full_pass, "bwd"))),
        "bwd_activations_ms": ms(statistics.median(flat(samples["pass (ii')"], "t"))),
        "fwd_swp_ms": ms(statistics.fmean(f for f, _ in per_mask)),
        "bwd_swp_ms": ms(statistics.fmean(b for _, b in per_mask)),
        "nograd_fwd_ms": ms(statistics.median(flat(samples["pass (iv)"], "t"))),
        "half_fwd_bwd_ms": ms(statistics.median(flat(samples["pass (v)"], "t"))),
        "swp_first_pass_min_ms": ms(min(first)),
        "swp_first_pass_max_ms": ms(max(first)),
        "masks": float(len(per_mask)),
        "timings_per_mask_min": float(
            min(sum(f"fwd{i}" in t for t in swp_calls) for i in range(len(masks)))
        ),
        "kept_tensors_mean": statistics.fmean(sum(m) for m in timed_masks),
        "kept_entries_mean": statistics.fmean(kept_entries),
        "rows_half": float(num_selected(GAMMA, w.batch)),
        "rounds": float(len(full_pass)),
        "spread": max(
            [summary(samples[f"pass {n}"], "t")["spread"] for n in ("(ii')", "(iv)", "(v)")]
            + [summary(full_pass, k)["spread"] for k in ("fwd", "bwd")]
        ),
    }
    return full, res


# ---------------------------------------------------------------------------- optimizer-side work
def esam_side_runner(
    w: Workload, opt_cls: type[flatminima.SharpnessAwareOptimizer], g1: list[Tensor],
    g2: list[Tensor], **kw: Any,
) -> Runner:
    """``first_step`` (after gradients on the tensors the mask keeps) and ``second_step`` of a
    SAM-family optimizer, timed together; with ``swp="tensor"`` the mask is drawn and applied by
    ``masked_first_pass`` inside the timing, as in a real step."""
    return opt_side_runner(
        w, opt_cls, g1, g2, lr=LR, momentum=MOMENTUM, time_grad_setup=True, **kw
    )


def selection_runner(batch: int) -> Runner:
    gen = torch.Generator().manual_seed(SEED + 4)
    clean = torch.rand(batch, generator=gen)
    adv = clean + 0.01 * torch.randn(batch, generator=gen)
    k = num_selected(GAMMA, batch)

    def run() -> Timings:
        t0 = time.perf_counter()
        delta = adv - clean
        mean = delta.mean()
        ok = bool(torch.isfinite(mean))
        select_top(delta, k)
        t = time.perf_counter() - t0
        assert ok
        return {"total": t}

    return run


OPT_SIDE: dict[str, tuple[type[flatminima.SharpnessAwareOptimizer], dict[str, Any]]] = {
    "SAM": (flatminima.SAM, {"rho": RHO}),
    "ESAM beta=1": (flatminima.ESAM, {"rho": RHO, "beta": 1.0, "gamma": GAMMA, "seed": SEED}),
    "ESAM-SWP tensor": (flatminima.ESAM, {"rho": RHO, "beta": BETA, "gamma": 1.0, "seed": SEED}),
    "ESAM-SWP element": (
        flatminima.ESAM, {"rho": RHO, "beta": BETA, "gamma": 1.0, "swp": "element", "seed": SEED}
    ),
}


def bench_optimizer_side(w: Workload, s: Settings) -> dict[str, float]:
    g1, g2 = random_grad_pair(w.model, SEED + 1)
    runners: dict[str, Runner] = {"SGD step": bare_sgd_runner(w, g2, lr=LR, momentum=MOMENTUM)}
    for name, (cls, kw) in OPT_SIDE.items():
        runners[name] = esam_side_runner(w, cls, g1, g2, **kw)
    samples = interleave(
        runners, warmup=s.warmup, rounds=s.rounds, per_round=s.opt_iters_per_round,
        budget_s=s.budget_opt, min_rounds=s.min_rounds, warmup_cap_s=WARMUP_CAP_S,
    )
    res = {f"{n}_ms": ms(statistics.median(flat(smp, "total"))) for n, smp in samples.items()}
    sel = interleave(
        {"selection": selection_runner(w.batch)}, warmup=s.warmup, rounds=s.rounds,
        per_round=s.micro_reps, budget_s=s.budget_micro, min_rounds=s.min_rounds,
        warmup_cap_s=WARMUP_CAP_S,
    )
    res["selection_ms"] = ms(statistics.median(flat(sel["selection"], "total")))
    return res


# ------------------------------------------------------------------------------------- prediction
def predict(p: dict[str, float], o: dict[str, float]) -> dict[str, tuple[float, str]]:
    """Each method's step (ms) as the sum of its measured parts, with the formula."""
    full = p["fwd_ms"] + p["bwd_ms"]
    swp = p["fwd_swp_ms"] + p["bwd_swp_ms"]
    n, h, sel = p["nograd_fwd_ms"], p["half_fwd_bwd_ms"], o["selection_ms"]
    return {
        "SGD": (full + o["SGD step_ms"], "(i)+(ii) + SGD step"),
        "SAM": (2 * full + o["SAM_ms"], "2[(i)+(ii)] + SAM opt"),
        "ESAM-SWP": (swp + full + o["ESAM-SWP tensor_ms"], "(iii) + (i)+(ii) + SWP opt"),
        "ESAM-SDS": (full + n + h + o["ESAM beta=1_ms"] + sel,
                     "(i)+(ii) + (iv) + (v) + opt + sel"),
        "ESAM both": (swp + n + h + o["ESAM-SWP tensor_ms"] + sel,
                      "(iii) + (iv) + (v) + SWP opt + sel"),
        "ESAM-SWP element": (2 * full + o["ESAM-SWP element_ms"], "2[(i)+(ii)] + element opt"),
    }


def target_analysis(p: dict[str, float], o: dict[str, float], pred: dict[str, float]) -> dict:
    """What ESAM (beta = gamma = 0.5) would need to cost <= PAPER_TARGET SGD steps."""
    unit = pred["SGD"]
    full = p["fwd_ms"] + p["bwd_ms"]
    first = p["fwd_swp_ms"] + p["bwd_swp_ms"]
    opt = o["ESAM-SWP tensor_ms"] + o["selection_ms"]
    budget = PAPER_TARGET * unit
    cut = pred["ESAM both"] - budget  # ms to remove
    saving = full - first  # what SWP saves on the first pass now
    return {
        "unit_ms": unit,
        "budget_ms": budget,
        "esam_both_ms": pred["ESAM both"],
        "first_pass_u": first / unit,
        "scoring_u": p["nograd_fwd_ms"] / unit,
        "descent_u": p["half_fwd_bwd_ms"] / unit,
        "opt_u": opt / unit,
        "cut_ms": cut,
        "cut_u": cut / unit,
        "swp_saving_u": saving / unit,
        "swp_saving_needed_u": (saving + cut) / unit,
        "backward_u": p["bwd_ms"] / unit,
        "weight_grads_u": (p["bwd_ms"] - p["bwd_activations_ms"]) / unit,
        "scoring_needed_u": (p["nograd_fwd_ms"] - cut) / unit,
        # SWP or SDS alone, with free optimizer work: their floors in U.
        "swp_alone_floor_u": (first + full) / unit,
        "sds_alone_floor_u": (full + p["nograd_fwd_ms"] + p["half_fwd_bwd_ms"]) / unit,
    }


# ------------------------------------------------------------------------------------------ output
def print_full(w: Workload, res: dict[str, dict[str, float]]) -> None:
    sgd = res["SGD"]
    print(f"\n### Full optimizer step: {w.name} ({int(sgd['rounds'])} rounds)\n")
    rows = [
        [
            f"{name} ({DESCRIPTION[name]})",
            f"{r['median_ms']:.2f}",
            f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}",
            f"{r['ratio_to_sgd']:.3f}",
            f"{r['paired_ratio_to_sgd']:.3f}",
        ]
        for name, r in res.items()
    ]
    hdr = ["method", "ms/step (median)", "p25-p75 (ms)", "ratio to SGD", "paired ratio"]
    print(table(hdr, rows))
    noise_note(max(r["spread"] for r in res.values()), during="the full steps")


def print_passes(
    works: Sequence[Workload], passes: dict[str, dict[str, float]],
    opt: dict[str, dict[str, float]], units: dict[str, float],
) -> None:
    print("\n### Pass by pass (each timed alone; U = one SGD step counted from its parts, "
          "(i) + (ii) + SGD step)\n")
    lines: list[tuple[str, Callable[[str], float]]] = [
        ("(i) forward with grad, full batch", lambda k: passes[k]["fwd_ms"]),
        ("(ii) its backward", lambda k: passes[k]["bwd_ms"]),
        ("(ii') backward without weight gradients", lambda k: passes[k]["bwd_activations_ms"]),
        ("weight-gradient work in (ii): (ii)-(ii')", lambda k: passes[k]["bwd_ms"]
         - passes[k]["bwd_activations_ms"]),
        ("(iii) forward, half the tensors frozen (SWP)", lambda k: passes[k]["fwd_swp_ms"]),
        ("(iii) backward, half the tensors frozen (SWP)", lambda k: passes[k]["bwd_swp_ms"]),
        ("SWP saving on the first pass: (i)+(ii)-(iii)", lambda k: passes[k]["fwd_ms"]
         + passes[k]["bwd_ms"] - passes[k]["fwd_swp_ms"] - passes[k]["bwd_swp_ms"]),
        ("(iv) no-grad forward, full batch (SDS scoring)", lambda k: passes[k]["nograd_fwd_ms"]),
        ("(v) forward + backward on half the batch", lambda k: passes[k]["half_fwd_bwd_ms"]),
        ("optimizer: SGD step", lambda k: opt[k]["SGD step_ms"]),
        ("optimizer: SAM first+second step", lambda k: opt[k]["SAM_ms"]),
        ("optimizer: ESAM beta=1 first+second step", lambda k: opt[k]["ESAM beta=1_ms"]),
        ("optimizer: ESAM-SWP tensor (mask + steps)", lambda k: opt[k]["ESAM-SWP tensor_ms"]),
        ("optimizer: ESAM-SWP element (masks + steps)", lambda k: opt[k]["ESAM-SWP element_ms"]),
        ("optimizer: SDS selection (Delta, top-k)", lambda k: opt[k]["selection_ms"]),
    ]
    hdr = ["part"]
    for w in works:
        hdr += [f"{w.key.upper()} (ms)", f"{w.key.upper()} (U)"]
    rows = []
    for label, fn in lines:
        row = [label]
        for w in works:
            v = fn(w.key)
            row += [f"{v:.3f}", f"{v / units[w.key]:.3f}"]
        rows.append(row)
    print(table(hdr, rows))
    for w in works:
        p = passes[w.key]
        print(
            f"\n{w.key.upper()}: SWP masks: {int(p['masks'])} (ESAM's first draws with seed {SEED}), "
            f"{p['kept_tensors_mean']:.1f} of {w.tensors} tensors kept on average "
            f"({100 * p['kept_entries_mean']:.0f} % of the entries); first pass (iii) over the "
            f"masks {p['swp_first_pass_min_ms']:.2f}-{p['swp_first_pass_max_ms']:.2f} ms "
            f"(full (i)+(ii): {p['fwd_ms'] + p['bwd_ms']:.2f} ms; at least "
            f"{int(p['timings_per_mask_min'])} timings per mask). (v) uses "
            f"{int(p['rows_half'])} of {w.batch} rows. Timed in the same {int(p['rounds'])} "
            "rounds as the full steps."
        )
        noise_note(p["spread"], during=f"the {w.key.upper()} passes")


def print_prediction(
    w: Workload, pred: dict[str, tuple[float, str]], full: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    unit = pred["SGD"][0]
    sgd_meas = full["SGD"]["median_ms"]
    print(f"\n### Predicted from the parts vs measured: {w.name}\n")
    rows = []
    out: dict[str, dict[str, float]] = {}
    for name, (t, formula) in pred.items():
        meas = full[name]
        rows.append(
            [
                name,
                formula,
                f"{t:.2f}",
                f"{t / unit:.3f}",
                f"{meas['median_ms']:.2f}",
                f"{meas['ratio_to_sgd']:.3f}",
                f"{meas['paired_ratio_to_sgd']:.3f}",
                f"{meas['median_ms'] - t:+.2f}",
            ]
        )
        out[name] = {"predicted_ms": t, "predicted_u": t / unit, "measured_ms": meas["median_ms"],
                     "measured_ratio": meas["ratio_to_sgd"],
                     "residual_ms": meas["median_ms"] - t}
    hdr = ["method", "parts", "predicted (ms)", "predicted (U)", "measured (ms)",
           "measured / SGD", "paired", "measured - predicted (ms)"]
    print(table(hdr, rows))
    print(f"\n(U = {unit:.2f} ms counted from the parts; the measured SGD step is {sgd_meas:.2f} ms.)")
    return out


def print_target(w: Workload, t_raw: dict[str, float], measured_both: float) -> None:
    t = {k: round(v, 2) + 0.0 for k, v in t_raw.items()}  # no "-0.00"
    verdict = "MET" if measured_both <= PAPER_TARGET else "MISSED"
    print(
        f"- {w.key.upper()}: ESAM both measured {measured_both:.2f}x SGD: {verdict}. Counted from "
        f"the parts it is {t['first_pass_u']:.2f} U (first pass, (iii)) + {t['scoring_u']:.2f} U "
        f"(scoring, (iv)) + {t['descent_u']:.2f} U (descent on half the batch, (v)) + "
        f"{t['opt_u']:.2f} U (optimizer) = {t['esam_both_ms'] / t['unit_ms']:.2f} U."
    )
    if t["cut_ms"] <= 0:
        print(f"  It fits in {PAPER_TARGET} U with {-t['cut_u']:.2f} U to spare.")
        return
    need = t["swp_saving_needed_u"]
    if need > t["backward_u"]:
        how = f"more than the whole backward ({t['backward_u']:.2f} U): impossible"
    elif need > t["weight_grads_u"]:
        how = (
            f"more than all weight gradients together; only masks freezing the lower layers "
            f"wholesale, which cut the backward short, could approach it (backward "
            f"{t['backward_u']:.2f} U)"
        )
    else:
        how = f"out of {t['weight_grads_u']:.2f} U of weight gradients"
    scoring = (
        f"the scoring forward would have to cost {t['scoring_needed_u']:.2f} U "
        f"(now {t['scoring_u']:.2f} U)"
        if t["scoring_needed_u"] >= 0
        else f"even a free scoring forward (now {t['scoring_u']:.2f} U) would not suffice"
    )
    print(
        f"  {PAPER_TARGET}x needs {t['cut_u']:.2f} U less. With scoring and descent as measured, "
        f"SWP would have to save {need:.2f} U on the first pass (it saves "
        f"{t['swp_saving_u']:.2f} U; the weight gradients of all tensors together cost "
        f"{t['weight_grads_u']:.2f} U), {how}; with SWP as measured, {scoring}. Either alone cannot "
        f"get there: SWP alone costs at least {t['swp_alone_floor_u']:.2f} U and SDS alone "
        f"{t['sds_alone_floor_u']:.2f} U in passes."
    )


# -------------------------------------------------------------------------------------- accuracy
ACC_VARIANTS: list[Any] = [
    "sgd",
    "sam_sgd",
    ("esam_swp", "esam_sgd", {"beta": BETA, "gamma": 1.0}),
    ("esam_sds", "esam_sgd", {"beta": 1.0, "gamma": GAMMA}),
    ("esam_both", "esam_sgd", {"beta": BETA, "gamma": GAMMA}),
]


def bench_accuracy(threads: int) -> list[dict[str, Any]]:
    return run_quick(
        ACC_VARIANTS, epochs=DEFAULT_EPOCHS, seeds=ACC_SEEDS, label_noise=ACC_LABEL_NOISE,
        progress=False, threads=threads,
    )


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(
        __doc__.splitlines()[0], quick_help="fewer rounds and masks (~1-2 minutes)",
        threads_default=1, threads_help="torch.set_num_threads(N) (default 1)",
    )
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings.make(args.quick)
    t_start = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    meta = machine_meta(args.quick, s.__dict__, loadavg=list(load))
    print(
        f"# ESAM step cost | torch {meta['torch']} | threads {meta['threads']} | "
        f"{meta['processor']} | os.cpu_count() = {meta['cpu_count']} | load average "
        f"{load[0]:.2f} | {'quick' if args.quick else 'default'} run (up to {s.rounds} rounds, "
        f"{s.masks} SWP masks)"
    )
    works = make_workloads()

    print("\n## 1. Full optimizer steps, side by side")
    full, passes = {}, {}
    for w in works:
        full[w.key], passes[w.key] = bench_model(w, s)
        print_full(w, full[w.key])

    print("\n## 2. The gap, pass by pass")
    opt = {w.key: bench_optimizer_side(w, s) for w in works}
    preds = {w.key: predict(passes[w.key], opt[w.key]) for w in works}
    units = {k: v["SGD"][0] for k, v in preds.items()}
    print_passes(works, passes, opt, units)
    prediction = {w.key: print_prediction(w, preds[w.key], full[w.key]) for w in works}

    for w in works:
        esam = {k: v for k, v in full[w.key].items() if k.startswith("ESAM") and "element" not in k}
        best = min(esam, key=lambda k: esam[k]["median_ms"])
        print(
            f"\n{w.key.upper()}: the fastest ESAM variant is {best} ({DESCRIPTION[best]}) at "
            f"{esam[best]['ratio_to_sgd']:.3f}x SGD (paired {esam[best]['paired_ratio_to_sgd']:.3f}), "
            f"SAM {full[w.key]['SAM']['ratio_to_sgd']:.3f}x."
        )

    print(f"\n### What the paper's target (ESAM <= {PAPER_TARGET}x SGD) would need\n")
    targets = {}
    for w in works:
        t = target_analysis(passes[w.key], opt[w.key], {k: v[0] for k, v in preds[w.key].items()})
        targets[w.key] = t
        print_target(w, t, full[w.key]["ESAM both"]["ratio_to_sgd"])
    print(
        "- By FLOP count alone (backward = 2 forwards, half of it weight gradients; scoring forward "
        f"= 1 forward), ESAM with beta = gamma = 0.5 costs (1 + 1.5 + 1 + 1.5) / 3 = 1.67 SGD "
        f"steps: SWP saves 1/6 of a step, SDS saves 1/2 of the second pass but pays 1/3 for "
        f"scoring. Below {PAPER_TARGET}x, this pass structure needs (3.5 + 3 gamma) / 3 <= "
        f"{PAPER_TARGET}, i.e. gamma <= 0.23, or at gamma = 0.5 a scoring forward costing at most "
        "0.2 of a training forward."
    )

    print(
        f"\n## 3. Accuracy: digits MLP, {int(100 * ACC_LABEL_NOISE)} % label noise, seeds "
        f"{','.join(map(str, ACC_SEEDS))}, {DEFAULT_EPOCHS} epochs, batch 64, lr 0.05, "
        f"rho 0.05, {args.threads} thread(s)\n"
    )
    t_acc = time.perf_counter()
    acc = bench_accuracy(args.threads)
    print(format_table(acc))
    steps = {r["optimizer"]: r["steps"] for r in acc}
    print(
        f"\n(esam_swp: beta {BETA}, gamma 1; esam_sds: beta 1, gamma {GAMMA}; esam_both: beta "
        f"{BETA}, gamma {GAMMA}; {steps['sgd']} steps per run; ms/step is the mean over all steps "
        f"of a run; {time.perf_counter() - t_acc:.1f} s)"
    )

    payload = {
        "meta": meta,
        "full_step": full,
        "passes": passes,
        "optimizer_side": opt,
        "prediction": prediction,
        "target": targets,
        "accuracy_summary": summarize(acc),
        "accuracy_runs": acc,
    }
    finish(t_start, args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
