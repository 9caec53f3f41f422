"""Step overhead of the SAM-family optimizers against plain SGD, measured side by side.

What is measured (all on random data from a fixed seed, CPU or whatever device torch defaults to):

1. **Full steps** on two models: a many-layer MLP (48 ``Linear(64, 64)``-sized layers with ReLU,
   96 parameter tensors, where per-tensor Python overhead matters) and a small CNN (three conv
   layers 16/32/64 with BatchNorm2d, ReLU and pooling, then a linear head, on 3x32x32 inputs).
   One "step" is what a training loop pays per minibatch:

   * ``SGD``: ``zero_grad``, forward, backward, ``step`` (momentum 0.9);
   * ``SGD, 2 fwd/bwd (floor)``: the same with two forward/backward passes and one step, i.e. the
     lowest cost any two-pass method can reach; its ratio to SGD is the floor for SAM's ratio;
   * ``SAM`` / ``ASAM`` / ``MongeSAM``: ``opt.step(closure)``, two forward/backward passes plus the
     SAM machinery (norm, perturbation, save/restore of the weights, BatchNorm guard, RNG replay,
     finiteness checks, statistics);
   * two diagnostic SAM variants: without the BatchNorm guard (``restore_running_stats=False``,
     which removes the global module forward pre-hook) and "lean" (guard, RNG replay and
     finiteness checks all off).

   All configurations start from the same weights. After a warm-up they are run round-robin (in a
   fresh seeded random order every round), a few steps per configuration per round, so that slow
   drifts of the machine, and whatever the previous configuration left in the caches, hit every
   configuration alike. Each step is timed with ``time.perf_counter``; the table
   gives the median over all timed steps, the 25-75 percentile range, the ratio of medians to SGD,
   the "paired" ratio (median over rounds of the ratio to SGD measured in the same round), and
   "above floor": median minus the floor's median, i.e. what the SAM machinery costs *in situ*.

2. **Optimizer-side work alone** (no forward/backward): every parameter gets a random ``.grad``,
   then ``first_step()`` is timed, ``.grad`` is set to a second preallocated random gradient (the
   "second pass"), and ``second_step()`` is timed; a bare ``torch.optim.SGD.step()`` on the same
   kind of gradients is timed in the same rounds. ``second_step`` includes the base SGD step, so
   the **SAM-side work** is ``first_step + second_step - SGD step``: norm, perturbation, save,
   perturb, restore and the statistics. It is reported for ``foreach=True`` and ``foreach=False``
   with the speedup ``per-tensor / foreach``. These are hot-cache numbers: inside a real loop the
   same work runs right after a forward/backward that evicted the caches and can cost several times
   more (compare with the "above floor" column of the full-step tables).

3. **Breakdown** of the SAM-side work on the MLP into the operations the engine runs, each timed
   alone with the library's own functions (``global_norm``, ``sam_perturbation``) or the same
   ``torch._foreach_*`` calls / per-tensor loops, with how many times one SAM step runs it. The sum
   of ``count x time`` should come close to the measured SAM-side work.

4. **BatchNorm guard**: one training-mode forward pass with and without the engine's running-stats
   guard active; the guard is a global module forward pre-hook, so it runs on every module call.

How to read it: a ratio of 2.0 for SAM means two SGD steps' worth of time. Because the base step is
paid once, the floor ratio is below 2; anything SAM costs above the floor is its own machinery. The
project targets (foreach >= 1.3x faster than per-tensor on the MLP's SAM-side work; SAM/SGD <= 2.05
on the CNN) are checked at the end and printed as met or missed with the numbers.

Timing notes: Python's garbage collector is disabled while timing (as ``timeit`` does); medians are
used because single steps on a shared machine have long tails. Each measurement also has a time
budget, so a loaded machine cuts the number of rounds (the tables say how many ran) rather than the
run never ending. When other processes compete for the cores, the script says so and marks the
target verdicts as unreliable; with few cores, ``--threads 1`` is much steadier than letting two
OpenMP threads fight other processes. ``--threads`` sets ``torch.set_num_threads`` (default:
torch's own choice); ``--quick`` runs fewer rounds (about 10-30 s instead of about 1-2 minutes).

Usage::

    python benchmarks/step_overhead.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from _timing import (
    NOISY_SPREAD,
    Runner,
    Timings,
    Workload,
    bare_sgd_runner,
    bench_parser,
    finish,
    flat,
    interleave,
    machine_meta,
    make_cnn,
    make_mlp,
    ms,
    noise_note,
    opt_side_runner,
    quantile,
    random_batch,
    random_grad_pair,
    random_grads,
    ratios,
    sam_step_runner,
    sgd_step_runner,
    table,
)
from torch import Tensor, nn

import flatminima
from flatminima.optim.perturbations import global_norm, sam_perturbation

SEED = 0
BATCH = 64
MLP_LAYERS = 48
MLP_WIDTH = 64
CLASSES = 10
LR = 0.01
MOMENTUM = 0.9

WARMUP_CAP_S = 0.5  # seconds of warm-up per configuration at most
TARGET_FOREACH_SPEEDUP = 1.3  # per-tensor / foreach, SAM-side work on the MLP
TARGET_CNN_SAM_RATIO = 2.05  # SAM (foreach) / SGD, full steps on the CNN

FLOOR = "SGD, 2 fwd/bwd (floor)"


# --------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Rounds, steps and time budgets (seconds per measurement); ``quick`` is a smoke run."""

    warmup: int
    rounds: int
    min_rounds: int
    steps_per_round: int
    opt_iters_per_round: int
    micro_reps: int
    budget_full_mlp: float
    budget_full_cnn: float
    budget_opt: float
    budget_micro: float
    budget_hook: float

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                warmup=1, rounds=8, min_rounds=3, steps_per_round=1, opt_iters_per_round=5,
                micro_reps=10, budget_full_mlp=2.5, budget_full_cnn=5.0, budget_opt=1.5,
                budget_micro=1.5, budget_hook=1.0,
            )
        return cls(
            warmup=5, rounds=30, min_rounds=5, steps_per_round=3, opt_iters_per_round=10,
            micro_reps=20, budget_full_mlp=20.0, budget_full_cnn=45.0, budget_opt=6.0,
            budget_micro=6.0, budget_hook=4.0,
        )


# ----------------------------------------------------------------------------------------- models
def make_workloads() -> list[Workload]:
    """The MLP (48 Linear layers: 47 of 64x64 and a 64x10 head, with ReLU) and the CNN (conv
    16/32/64 with BatchNorm2d), each with its fixed random minibatch."""
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    mlp = make_mlp(MLP_LAYERS, MLP_WIDTH, CLASSES)
    x_mlp, y_mlp = random_batch(gen, BATCH, (MLP_WIDTH,), CLASSES)
    torch.manual_seed(SEED)
    cnn = make_cnn(CLASSES)
    x_cnn, y_cnn = random_batch(gen, BATCH, (3, 32, 32), CLASSES)
    n_mlp = sum(1 for _ in mlp.parameters())
    n_cnn = sum(1 for _ in cnn.parameters())
    return [
        Workload(f"MLP ({MLP_LAYERS} Linear x {MLP_WIDTH}, {n_mlp} tensors)", mlp, x_mlp, y_mlp),
        Workload(f"CNN (conv 16/32/64 + BN, {n_cnn} tensors)", cnn, x_cnn, y_cnn),
    ]


# ------------------------------------------------------------------------------------- full steps
def sgd_runner(w: Workload, passes: int) -> Runner:
    return sgd_step_runner(w, lr=LR, momentum=MOMENTUM, passes=passes)


def sam_runner(w: Workload, cls: type[flatminima.SharpnessAwareOptimizer], **kw: Any) -> Runner:
    return sam_step_runner(w, cls, lr=LR, momentum=MOMENTUM, **kw)


def full_step_configs(w: Workload) -> dict[str, Runner]:
    lean = {"restore_running_stats": False, "replay_rng": False, "check_finite": False}
    return {
        "SGD": sgd_runner(w, 1),
        FLOOR: sgd_runner(w, 2),
        "SAM (foreach)": sam_runner(w, flatminima.SAM, rho=0.05, foreach=True),
        "SAM (per-tensor)": sam_runner(w, flatminima.SAM, rho=0.05, foreach=False),
        "ASAM (foreach)": sam_runner(w, flatminima.ASAM, rho=0.5, foreach=True),
        "MongeSAM (foreach)": sam_runner(w, flatminima.MongeSAM, rho=0.05, foreach=True),
        "SAM (foreach), no BN guard": sam_runner(
            w, flatminima.SAM, rho=0.05, foreach=True, restore_running_stats=False
        ),
        "SAM (foreach), lean": sam_runner(w, flatminima.SAM, rho=0.05, foreach=True, **lean),
    }


def bench_full_steps(w: Workload, s: Settings) -> dict[str, dict[str, float]]:
    budget = s.budget_full_cnn if w.name.startswith("CNN") else s.budget_full_mlp
    samples = interleave(
        full_step_configs(w), warmup=s.warmup, rounds=s.rounds, per_round=s.steps_per_round,
        budget_s=budget, min_rounds=s.min_rounds, warmup_cap_s=WARMUP_CAP_S,
    )
    floor_med = statistics.median(flat(samples[FLOOR], "step"))
    res: dict[str, dict[str, float]] = {}
    for name, smp in samples.items():
        xs = flat(smp, "step")
        ratio, paired = ratios(smp, samples["SGD"], "step")
        res[name] = {
            "median_ms": ms(statistics.median(xs)),
            "p25_ms": ms(quantile(xs, 0.25)),
            "p75_ms": ms(quantile(xs, 0.75)),
            "ratio_to_sgd": ratio,
            "above_floor_ms": ms(statistics.median(xs) - floor_med),
            "paired_ratio_to_sgd": paired,
            "rounds": float(len(smp)),
            "samples": float(len(xs)),
        }
    return res


# ---------------------------------------------------------------------------- optimizer-side work
def sam_side_runner(
    w: Workload, cls: type[flatminima.SharpnessAwareOptimizer], g1: list[Tensor],
    g2: list[Tensor], **kw: Any,
) -> Runner:
    """``first_step`` and ``second_step`` timed alone (gradients set outside the timings)."""
    return opt_side_runner(
        w, cls, g1, g2, lr=LR, momentum=MOMENTUM, time_grad_setup=False, **kw
    )


OPT_SIDE_RULES: list[tuple[str, type[flatminima.SharpnessAwareOptimizer], dict[str, Any]]] = [
    ("SAM", flatminima.SAM, {"rho": 0.05}),
    ("ASAM", flatminima.ASAM, {"rho": 0.5}),
    ("MongeSAM", flatminima.MongeSAM, {"rho": 0.05}),
]


def bench_optimizer_side(w: Workload, s: Settings) -> dict[str, dict[str, float]]:
    g1, g2 = random_grad_pair(w.model, SEED + 1)
    runners: dict[str, Runner] = {"SGD step": bare_sgd_runner(w, g2, lr=LR, momentum=MOMENTUM)}
    for rule, cls, kw in OPT_SIDE_RULES:
        runners[f"{rule} (foreach)"] = sam_side_runner(w, cls, g1, g2, foreach=True, **kw)
        runners[f"{rule} (per-tensor)"] = sam_side_runner(w, cls, g1, g2, foreach=False, **kw)
    samples = interleave(
        runners, warmup=s.warmup, rounds=s.rounds, per_round=s.opt_iters_per_round,
        budget_s=s.budget_opt, min_rounds=s.min_rounds, warmup_cap_s=WARMUP_CAP_S,
    )
    sgd = statistics.median(flat(samples["SGD step"], "total"))
    res: dict[str, dict[str, float]] = {"SGD step": {"total_ms": ms(sgd)}}
    for rule, _, _ in OPT_SIDE_RULES:
        for path in ("foreach", "per-tensor"):
            smp = samples[f"{rule} ({path})"]
            totals = flat(smp, "total")
            total = statistics.median(totals)
            res[f"{rule} ({path})"] = {
                "spread": quantile(totals, 0.75) / total,
                "first_ms": ms(statistics.median(flat(smp, "first"))),
                "second_ms": ms(statistics.median(flat(smp, "second"))),
                "total_ms": ms(total),
                "sgd_step_ms": ms(sgd),
                "sam_side_ms": ms(total - sgd),
            }
        fe, pt = res[f"{rule} (foreach)"], res[f"{rule} (per-tensor)"]
        speedup = pt["sam_side_ms"] / fe["sam_side_ms"] if fe["sam_side_ms"] > 0 else float("nan")
        fe["speedup_per_tensor_over_foreach"] = speedup
        pt["speedup_per_tensor_over_foreach"] = speedup
    return res


# -------------------------------------------------------------------------------------- breakdown
def breakdown_ops(
    params: list[Tensor], grads: list[Tensor], foreach: bool
) -> dict[str, tuple[int, Callable[[], object]]]:
    """The engine's SAM-side operations for plain SAM, each with its count per step."""
    n = global_norm(grads, foreach=foreach)
    e = sam_perturbation(params, grads, 0.05, grad_norm=n, foreach=foreach)
    saved = [p.clone() for p in params]
    scratch = [g.clone() for g in grads]
    if foreach:
        return {
            "global_norm (||g||, ||e||, ||g_adv||, ||g+g_adv||)": (
                4, lambda: global_norm(grads, foreach=True)
            ),
            "sam_perturbation (e = rho g / ||g||)": (
                1, lambda: sam_perturbation(params, grads, 0.05, grad_norm=n, foreach=True)
            ),
            "save w (clone)": (1, lambda: torch._foreach_clone(params)),
            "add_ (w += e; g += g_adv for cos)": (2, lambda: torch._foreach_add_(scratch, e)),
            "restore w (copy_)": (1, lambda: torch._foreach_copy_(params, saved)),
        }

    def add_loop() -> None:
        for t, ei in zip(scratch, e, strict=True):
            t.add_(ei)

    def copy_loop() -> None:
        for p, sv in zip(params, saved, strict=True):
            p.copy_(sv)

    return {
        "global_norm (||g||, ||e||, ||g_adv||, ||g+g_adv||)": (
            4, lambda: global_norm(grads, foreach=False)
        ),
        "sam_perturbation (e = rho g / ||g||)": (
            1, lambda: sam_perturbation(params, grads, 0.05, grad_norm=n, foreach=False)
        ),
        "save w (clone)": (1, lambda: [p.clone() for p in params]),
        "add_ (w += e; g += g_adv for cos)": (2, add_loop),
        "restore w (copy_)": (1, copy_loop),
    }


def bench_breakdown(w: Workload, s: Settings) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(SEED + 2)
    params = [p.detach().clone() for p in w.model.parameters()]
    grads = random_grads(params, gen)
    runners: dict[str, Runner] = {}
    counts: dict[str, int] = {}
    for path, fe in (("foreach", True), ("per-tensor", False)):
        for op, (count, fn) in breakdown_ops(params, grads, fe).items():
            counts[op] = count

            def run(fn: Callable[[], object] = fn) -> Timings:
                t0 = time.perf_counter()
                fn()
                return {"t": time.perf_counter() - t0}

            runners[f"{op}|{path}"] = run
    samples = interleave(
        runners, warmup=s.warmup, rounds=s.rounds, per_round=s.micro_reps, budget_s=s.budget_micro,
        min_rounds=s.min_rounds, warmup_cap_s=WARMUP_CAP_S,
    )
    res: dict[str, dict[str, float]] = {}
    for op, count in counts.items():
        fe_t = statistics.median(flat(samples[f"{op}|foreach"], "t"))
        pt_t = statistics.median(flat(samples[f"{op}|per-tensor"], "t"))
        res[op] = {"count": float(count), "foreach_us": fe_t * 1e6, "per_tensor_us": pt_t * 1e6}
    res["sum (count x time)"] = {
        "count": 0.0,
        "foreach_us": sum(v["count"] * v["foreach_us"] for v in res.values()),
        "per_tensor_us": sum(v["count"] * v["per_tensor_us"] for v in res.values()),
    }
    return res


def bench_guard_hook(w: Workload, s: Settings) -> dict[str, float] | None:
    """One training-mode forward with and without the engine's BatchNorm guard (its global module
    forward pre-hook) active; the hook runs on every module call, so the cost per call is given."""
    guard_cls = getattr(flatminima.optim.engine, "_RunningStatsGuard", None)
    if guard_cls is None:
        return None
    model = copy.deepcopy(w.model).train()
    calls = [0]

    def count(module: nn.Module, args: Any) -> None:
        calls[0] += 1

    handle = nn.modules.module.register_module_forward_pre_hook(count)
    try:
        model(w.x)
    finally:
        handle.remove()

    def plain() -> Timings:
        t0 = time.perf_counter()
        model(w.x)
        return {"t": time.perf_counter() - t0}

    def guarded() -> Timings:
        guard = guard_cls()
        try:
            t0 = time.perf_counter()
            model(w.x)
            t = time.perf_counter() - t0
        finally:
            guard.restore()
        return {"t": t}

    samples = interleave(
        {"plain": plain, "guarded": guarded}, warmup=s.warmup, rounds=s.rounds,
        per_round=s.micro_reps, budget_s=s.budget_hook, min_rounds=s.min_rounds,
        warmup_cap_s=WARMUP_CAP_S,
    )
    p = statistics.median(flat(samples["plain"], "t"))
    g = statistics.median(flat(samples["guarded"], "t"))
    return {
        "module_calls": float(calls[0]),
        "plain_ms": ms(p),
        "guarded_ms": ms(g),
        "delta_ms": ms(g - p),
        "per_call_us": (g - p) * 1e6 / max(calls[0], 1),
    }


# ------------------------------------------------------------------------------------------ output
def full_spread(res: dict[str, dict[str, float]]) -> float:
    """The largest p75 / median over the configurations of a full-step table."""
    return max(r["p75_ms"] / r["median_ms"] for r in res.values())


def print_full(name: str, res: dict[str, dict[str, float]]) -> None:
    sgd = res["SGD"]
    print(
        f"\n### Full step: {name}, batch {BATCH} "
        f"({int(sgd['rounds'])} rounds, {int(sgd['samples'])} timed steps per config)\n"
    )
    rows = [
        [
            cfg,
            f"{r['median_ms']:.3f}",
            f"{r['p25_ms']:.3f}-{r['p75_ms']:.3f}",
            f"{r['ratio_to_sgd']:.3f}",
            f"{r['paired_ratio_to_sgd']:.3f}",
            "" if cfg in ("SGD", FLOOR) else f"{r['above_floor_ms']:+.3f}",
        ]
        for cfg, r in res.items()
    ]
    hdr = [
        "config", "ms/step (median)", "p25-p75 (ms)", "ratio to SGD", "paired ratio",
        "above floor (ms)",
    ]
    print(table(hdr, rows))
    noise_note(
        full_spread(res), digits=1, advice="A quiet machine or --threads 1 gives steadier numbers."
    )


def print_opt_side(name: str, res: dict[str, dict[str, float]]) -> None:
    print(f"\n### Optimizer-side work (no forward/backward): {name}\n")
    rows = []
    for cfg, r in res.items():
        if cfg == "SGD step":
            continue
        rows.append(
            [
                cfg,
                f"{r['first_ms']:.3f}",
                f"{r['second_ms']:.3f}",
                f"{r['sgd_step_ms']:.3f}",
                f"{r['sam_side_ms']:.3f}",
                f"{r['speedup_per_tensor_over_foreach']:.2f}x",
            ]
        )
    hdr = [
        "optimizer", "first_step (ms)", "second_step (ms)", "SGD step (ms)",
        "SAM-side work (ms)", "per-tensor / foreach",
    ]
    print(table(hdr, rows))


def print_breakdown(name: str, res: dict[str, dict[str, float]]) -> None:
    print(f"\n### Breakdown of SAM's optimizer-side work: {name}\n")
    rows = []
    for op, r in res.items():
        count = str(int(r["count"])) if r["count"] else ""
        ratio = r["per_tensor_us"] / r["foreach_us"] if r["foreach_us"] > 0 else float("nan")
        rows.append(
            [op, count, f"{r['foreach_us']:.1f}", f"{r['per_tensor_us']:.1f}", f"{ratio:.2f}x"]
        )
    hdr = ["operation", "per step", "foreach (us)", "per-tensor (us)", "per-tensor / foreach"]
    print(table(hdr, rows))


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(
        __doc__.splitlines()[0], quick_help="fewer rounds (smoke run, under ~30 s)",
        threads_default=None, threads_help="torch.set_num_threads(N)",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    s = Settings.make(args.quick)
    t_start = time.perf_counter()
    meta = machine_meta(args.quick, s.__dict__)
    print(
        f"# SAM step overhead | torch {meta['torch']} | threads {meta['threads']} | "
        f"{meta['processor']} | os.cpu_count() = {meta['cpu_count']} | "
        f"{'quick' if args.quick else 'default'} run (up to {s.rounds} rounds x "
        f"{s.steps_per_round} steps per config, {s.warmup} warm-up steps)"
    )
    mlp, cnn = make_workloads()

    full: dict[str, dict[str, dict[str, float]]] = {}
    for w in (mlp, cnn):
        full[w.name] = bench_full_steps(w, s)
        print_full(w.name, full[w.name])

    opt_side: dict[str, dict[str, dict[str, float]]] = {}
    for w in (mlp, cnn):
        opt_side[w.name] = bench_optimizer_side(w, s)
        print_opt_side(w.name, opt_side[w.name])

    breakdown = bench_breakdown(mlp, s)
    print_breakdown(mlp.name, breakdown)

    hooks: dict[str, dict[str, float]] = {}
    for w in (mlp, cnn):
        h = bench_guard_hook(w, s)
        if h is not None:
            hooks[w.name] = h
    if hooks:
        print("\n### BatchNorm guard (global module forward pre-hook) on one forward pass\n")
        rows = [
            [
                n,
                str(int(h["module_calls"])),
                f"{h['plain_ms']:.3f}",
                f"{h['guarded_ms']:.3f}",
                f"{h['delta_ms']:+.3f}",
                f"{h['per_call_us']:+.2f}",
            ]
            for n, h in hooks.items()
        ]
        hdr = [
            "model", "module calls", "no hook (ms)", "guard active (ms)", "difference (ms)",
            "per call (us)",
        ]
        print(table(hdr, rows))

    # ---------------------------------------------------------------------- targets
    fe = opt_side[mlp.name]["SAM (foreach)"]
    pt = opt_side[mlp.name]["SAM (per-tensor)"]
    speedup = fe["speedup_per_tensor_over_foreach"]
    cnn_ratio = full[cnn.name]["SAM (foreach)"]["ratio_to_sgd"]
    cnn_paired = full[cnn.name]["SAM (foreach)"]["paired_ratio_to_sgd"]
    cnn_floor = full[cnn.name][FLOOR]["ratio_to_sgd"]
    mlp_noise = max(fe["spread"], pt["spread"])
    cnn_noise = full_spread(full[cnn.name])
    targets = {
        "foreach_speedup_mlp": {
            "value": speedup,
            "target": TARGET_FOREACH_SPEEDUP,
            "met": speedup >= TARGET_FOREACH_SPEEDUP,
            "noisy": mlp_noise > NOISY_SPREAD,
        },
        "cnn_sam_over_sgd": {
            "value": cnn_ratio,
            "paired": cnn_paired,
            "floor": cnn_floor,
            "target": TARGET_CNN_SAM_RATIO,
            "met": cnn_ratio <= TARGET_CNN_SAM_RATIO,
            "noisy": cnn_noise > NOISY_SPREAD,
        },
    }

    def caveat(noise: float) -> str:
        if noise <= NOISY_SPREAD:
            return ""
        return (
            f" [UNRELIABLE: the machine was loaded (p75 up to {noise:.1f}x the median); "
            "rerun on a quiet machine or with --threads 1]"
        )

    print("\n### Targets\n")
    print(
        f"- foreach >= {TARGET_FOREACH_SPEEDUP}x faster than per-tensor on the MLP's SAM-side "
        f"work: {'MET' if targets['foreach_speedup_mlp']['met'] else 'MISSED'} "
        f"({pt['sam_side_ms']:.3f} ms per-tensor / {fe['sam_side_ms']:.3f} ms foreach = "
        f"{speedup:.2f}x){caveat(mlp_noise)}"
    )
    print(
        f"- SAM (foreach) / SGD <= {TARGET_CNN_SAM_RATIO} on the CNN, full steps: "
        f"{'MET' if targets['cnn_sam_over_sgd']['met'] else 'MISSED'} "
        f"(ratio of medians {cnn_ratio:.3f}, paired {cnn_paired:.3f}; "
        f"floor with 2 fwd/bwd + 1 step {cnn_floor:.3f}){caveat(cnn_noise)}"
    )
    payload = {
        "meta": meta,
        "full_step": full,
        "optimizer_side": opt_side,
        "breakdown_mlp": breakdown,
        "bn_guard_hook": hooks,
        "targets": targets,
    }
    finish(t_start, args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
