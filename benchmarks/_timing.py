"""Shared harness of the benchmark scripts (``step_overhead.py``, ``esam_cost.py``).

What it holds, so that every script times things the same way:

* the round-robin timing loop :func:`interleave` (warm-up, seeded random order every round, time
  budget, garbage collector off while timing) and the ``Timings`` / ``Runner`` types it runs;
* statistics on its samples: :func:`flat`, :func:`per_round_median`, :func:`quantile`,
  :func:`summary`, :func:`ratios` (ratio of medians and paired ratio to a reference), :func:`ms`;
* the benchmark models :func:`make_mlp` and :func:`make_cnn`, the :class:`Workload` (a model with
  its fixed random minibatch) and :func:`random_batch`;
* runners shared by the scripts: full ``SGD`` and ``opt.step(closure)`` steps, the optimizer-side
  work of a SAM-family optimizer (``first_step`` / ``second_step`` on preset gradients), a bare SGD
  step, and the random gradients / cloned parameters these use;
* output helpers: :func:`cpu_name`, :func:`machine_meta`, the Markdown :func:`table`,
  :func:`noise_note` (spread above ``NOISY_SPREAD``), the command line parser :func:`bench_parser`
  and :func:`finish` (total time, JSON).

The scripts are run as ``python benchmarks/<script>.py``, so this folder is ``sys.path[0]`` and they
import this module as ``_timing``. Nothing here picks sizes, seeds or budgets: those stay in the
scripts and are passed in.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import flatminima

NOISY_SPREAD = 1.25  # p75 / median above this for any config prints a noise warning

Timings = dict[str, float]
Runner = Callable[[], Timings]


# ---------------------------------------------------------------------------------------- harness
def interleave(
    runners: dict[str, Runner],
    *,
    warmup: int,
    rounds: int,
    per_round: int,
    budget_s: float,
    min_rounds: int,
    warmup_cap_s: float,
    seed: int = 0,
) -> dict[str, list[list[Timings]]]:
    """Run every runner ``warmup`` times, then up to ``rounds`` rounds of ``per_round`` calls each,
    in a fresh random order every round (seeded with ``seed``), so that neither slow drifts of the
    machine nor the configuration that ran just before (caches, allocator state) favour one of them.

    Stops early once the rounds have taken ``budget_s`` seconds (after at least ``min_rounds``
    rounds; after 2 rounds once they have taken 1.5x the budget), so that a loaded machine cuts
    rounds instead of never finishing. Warm-up stops for a runner after ``warmup_cap_s`` seconds (at
    least one call). The garbage collector is off during the rounds. Returns, per runner, the
    timings of each round."""
    names = list(runners)
    for name in names:
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1)):
            runners[name]()
            if time.perf_counter() - t0 > warmup_cap_s:
                break
    out: dict[str, list[list[Timings]]] = {n: [] for n in names}
    order_rng = random.Random(seed)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    try:
        for r in range(rounds):
            for name in order_rng.sample(names, len(names)):
                out[name].append([runners[name]() for _ in range(per_round)])
            elapsed = time.perf_counter() - start
            if (r + 1 >= min_rounds and elapsed > budget_s) or (
                r + 1 >= 2 and elapsed > 1.5 * budget_s
            ):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


# ------------------------------------------------------------------------------------- statistics
def flat(samples: list[list[Timings]], key: str) -> list[float]:
    """All timings of ``key`` over all rounds, in order."""
    return [t[key] for rnd in samples for t in rnd]


def per_round_median(samples: list[list[Timings]], key: str) -> list[float]:
    """The median of ``key`` within each round."""
    return [statistics.median(t[key] for t in rnd) for rnd in samples]


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` with linear interpolation between order statistics."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ms(seconds: float) -> float:
    return seconds * 1e3


def summary(samples: list[list[Timings]], key: str) -> dict[str, float]:
    """Median, 25-75 percentile range (ms), spread (p75 / median) and counts of ``key``."""
    xs = flat(samples, key)
    med = statistics.median(xs)
    return {
        "median_ms": ms(med),
        "p25_ms": ms(quantile(xs, 0.25)),
        "p75_ms": ms(quantile(xs, 0.75)),
        "spread": quantile(xs, 0.75) / med if med > 0 else math.nan,
        "rounds": float(len(samples)),
        "samples": float(len(xs)),
    }


def ratios(
    samples: list[list[Timings]], reference: list[list[Timings]], key: str
) -> tuple[float, float]:
    """``(ratio of medians, paired ratio)`` of ``samples`` to ``reference`` (timed in the same
    rounds); the paired ratio is the median over rounds of the ratio of the per-round medians."""
    ratio = statistics.median(flat(samples, key)) / statistics.median(flat(reference, key))
    paired = statistics.median(
        a / b
        for a, b in zip(
            per_round_median(samples, key), per_round_median(reference, key), strict=True
        )
    )
    return ratio, paired


# ----------------------------------------------------------------------------------------- models
def make_mlp(layers: int, width: int, classes: int) -> nn.Module:
    """``layers`` Linear layers (width ``width``, the last one to ``classes``) with ReLU,
    He-initialized, zero biases."""
    mods: list[nn.Module] = []
    for _ in range(layers - 1):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods.append(nn.Linear(width, classes))
    for m in mods:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*mods)


def make_cnn(classes: int) -> nn.Module:
    """Conv 16/32/64 (3x3) with BatchNorm2d + ReLU + pooling, then a linear head (3x32x32 in)."""

    def block(c_in: int, c_out: int, pool: nn.Module) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            pool,
        ]

    return nn.Sequential(
        *block(3, 16, nn.MaxPool2d(2)),
        *block(16, 32, nn.MaxPool2d(2)),
        *block(32, 64, nn.AdaptiveAvgPool2d(1)),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


def random_batch(
    gen: torch.Generator, batch: int, shape: Sequence[int], classes: int
) -> tuple[Tensor, Tensor]:
    """``batch`` standard normal inputs of ``shape`` and uniform labels, both drawn from ``gen``."""
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return x, y


@dataclass
class Workload:
    """A model with its fixed random minibatch; ``key`` is an optional short label (for column
    headers and per-model settings)."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    key: str = ""

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def tensors(self) -> int:
        return sum(1 for _ in self.model.parameters())


# ---------------------------------------------------------------------------------------- runners
def closure_step_runner(opt: torch.optim.Optimizer, closure: Callable[..., Tensor]) -> Runner:
    """Times ``opt.step(closure)`` as ``{"step": seconds}``."""

    def run() -> Timings:
        t0 = time.perf_counter()
        opt.step(closure)
        return {"step": time.perf_counter() - t0}

    return run


def sgd_step_runner(w: Workload, *, lr: float, momentum: float, passes: int = 1) -> Runner:
    """A training-loop SGD step on a copy of the model: ``passes`` times ``zero_grad``, forward and
    backward (cross-entropy), then one ``step``; timed as ``{"step": seconds}``."""
    model = copy.deepcopy(w.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def run() -> Timings:
        t0 = time.perf_counter()
        for _ in range(passes):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(w.x), w.y).backward()
        opt.step()
        return {"step": time.perf_counter() - t0}

    return run


def sam_step_runner(
    w: Workload, cls: type[flatminima.SharpnessAwareOptimizer], *, lr: float, momentum: float,
    **kw: Any,
) -> Runner:
    """``opt.step(closure)`` of a SAM-family optimizer over SGD on a copy of the model, with the
    mean cross-entropy closure; timed as ``{"step": seconds}``."""
    model = copy.deepcopy(w.model).train()
    opt = cls(model.parameters(), torch.optim.SGD, lr=lr, momentum=momentum, **kw)

    def closure() -> Tensor:
        loss = nn.functional.cross_entropy(model(w.x), w.y)
        loss.backward()
        return loss

    return closure_step_runner(opt, closure)


def random_grads(params: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """A standard normal tensor like each parameter, drawn from ``gen`` (on the CPU)."""
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]


def clone_params(model: nn.Module) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in model.parameters()]


def random_grad_pair(model: nn.Module, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """Two random gradients for the parameters of ``model`` (a first and a second pass), drawn one
    after the other from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    g1 = random_grads(params, gen)
    g2 = random_grads(params, gen)
    return g1, g2


def opt_side_runner(
    w: Workload, cls: type[flatminima.SharpnessAwareOptimizer], g1: list[Tensor],
    g2: list[Tensor], *, lr: float, momentum: float, time_grad_setup: bool, **kw: Any,
) -> Runner:
    """The optimizer-side work of a SAM-family optimizer over SGD, without forward/backward, on
    cloned parameters: they get ``g1`` as gradients, ``first_step()`` is timed, they get ``g2`` (the
    "second pass"), ``second_step()`` is timed (it includes the base SGD step). An optimizer with a
    ``masked_first_pass`` (ESAM's per-tensor SWP) gets ``g1`` inside it, only on the tensors the
    mask keeps, as in a real step. With ``time_grad_setup`` the first timing also covers setting
    the first gradients (and drawing the mask). Timed as ``{"first", "second", "total"}``."""
    params = clone_params(w.model)
    opt = cls(params, torch.optim.SGD, lr=lr, momentum=momentum, **kw)
    masked = getattr(opt, "masked_first_pass", None)
    # second_step adds g_adv into the first-pass gradient (for cos), so work on a scratch copy.
    g1_work = [g.clone() for g in g1]

    def run() -> Timings:
        for g, src in zip(g1_work, g1, strict=True):
            g.copy_(src)
        t0 = time.perf_counter()
        if masked is not None:
            with masked():
                for p, g in zip(params, g1_work, strict=True):
                    p.grad = g if p.requires_grad else None
        else:
            for p, g in zip(params, g1_work, strict=True):
                p.grad = g
        if not time_grad_setup:
            t0 = time.perf_counter()
        opt.first_step()
        t1 = time.perf_counter()
        for p, g in zip(params, g2, strict=True):
            p.grad = g
        t2 = time.perf_counter()
        opt.second_step()
        t3 = time.perf_counter()
        return {"first": t1 - t0, "second": t3 - t2, "total": (t1 - t0) + (t3 - t2)}

    return run


def bare_sgd_runner(w: Workload, grads: list[Tensor], *, lr: float, momentum: float) -> Runner:
    """``torch.optim.SGD.step()`` alone on cloned parameters whose ``.grad`` is ``grads``; timed as
    ``{"total": seconds}``."""
    params = clone_params(w.model)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    for p, g in zip(params, grads, strict=True):
        p.grad = g

    def run() -> Timings:
        t0 = time.perf_counter()
        opt.step()
        return {"total": time.perf_counter() - t0}

    return run


# ------------------------------------------------------------------------------------------ output
def cpu_name() -> str:
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.machine()


def machine_meta(
    quick: bool, settings: dict[str, Any], loadavg: list[float] | None = None
) -> dict[str, Any]:
    """Versions, threads and machine of the run (for the header line and the JSON); the load
    average at the start is included when given."""
    meta: dict[str, Any] = {
        "torch": torch.__version__,
        "flatminima": flatminima.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if loadavg is not None:
        meta["loadavg_at_start"] = loadavg
    meta.update({"platform": platform.platform(), "quick": quick, "settings": settings})
    return meta


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    aligns = ["<"] + [">"] * (len(header) - 1)

    def fmt(cells: Sequence[str]) -> str:
        padded = [f"{c:{a}{wd}}" for c, a, wd in zip(cells, aligns, widths, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rules = [
        "-" * (wd + 1) + ":" if a == ">" else ":" + "-" * (wd + 1)
        for a, wd in zip(aligns, widths, strict=True)
    ]
    sep = "|" + "|".join(rules) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def noise_note(
    spread: float, *, during: str = "", digits: int = 2,
    advice: str = "Rerun on a quiet machine or with --threads 1.",
) -> None:
    """Print a note that the machine was noisy when ``spread`` (p75 / median) is above
    ``NOISY_SPREAD``; ``during`` names what was being timed, ``digits`` the spread's decimals."""
    if spread > NOISY_SPREAD:
        where = f" during {during}" if during else ""
        print(
            f"\nNOTE: noisy machine{where} (a p75 is {spread:.{digits}f}x its median): other "
            "processes are competing for the cores; the ratios carry several percent of noise. "
            f"{advice}"
        )


def bench_parser(
    description: str, *, quick_help: str, threads_default: int | None, threads_help: str
) -> argparse.ArgumentParser:
    """The common command line: ``--quick``, ``--threads N`` and ``--json PATH``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--threads", type=int, default=threads_default, help=threads_help)
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the numbers as JSON")
    return ap


def finish(t_start: float, json_path: str | None, payload: dict[str, Any]) -> None:
    """Print the total benchmark time since ``t_start``; with ``json_path``, also write ``payload``
    with ``elapsed_s`` added as JSON there."""
    elapsed = time.perf_counter() - t_start
    print(f"\n(total benchmark time {elapsed:.1f} s)")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({**payload, "elapsed_s": elapsed}, f, indent=2, default=str)
        print(f"wrote {json_path}")
