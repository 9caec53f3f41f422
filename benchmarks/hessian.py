"""Hessian top eigenvalue and trace: flatminima (Lanczos, Hutch++) against PyHessian (power
iteration, Hutchinson), at equal accuracy, on a small CNN trained and at initialization.

Workloads: the bundled digits (8x8 grey images, :mod:`flatminima.bench.tasks.digits`), a CNN
``conv 1->8 (3x3) + BN + ReLU, conv 8->16 + BN + ReLU, max-pool 2, linear 256->10`` (3866
parameters), and the Hessian of the mean cross-entropy on one batch of 256 training images, in eval
mode (BatchNorm uses its running statistics), for the CNN trained for a few epochs of SGD (seeded,
on one thread so that the weights do not depend on ``--threads``) and for the same CNN at its
initialization. The two differ in what decides the speed of power iteration: the gap
``lambda_2 / lambda_1`` is about 0.5 after training and about 0.97 at initialization. PyHessian
always measures in eval mode because it calls ``model.eval()`` on the model it is given, silently;
flatminima is told ``mode="eval"`` explicitly. PyHessian gets a copy of the model (the script checks
and prints what each library leaves behind on the model it measured).

PyHessian is the PyPI package ``pyhessian`` 0.1 (``make bench-hessian`` installs it into the venv
for the benchmark only; it is not a dependency of flatminima). If it cannot be imported, or with
``--no-pyhessian``, the script says why and uses an in-script re-implementation of PyHessian's
algorithms (power iteration with deflation, stopping when the Rayleigh quotient changes by less than
``tol = 1e-3`` relative, at most 100 iterations; Hutchinson with Rademacher vectors and the same
stopping rule on the running mean), clearly labelled as such in every table.

Both libraries reuse one gradient graph for all Hessian-vector products (HVPs) on a single batch
(PyHessian always; flatminima by default when there is one batch), so an HVP costs about the same in
both: the per-HVP cost is measured and printed. What differs is how many HVPs each algorithm needs.

What is measured (medians over seeds; every time is the wall time of a complete call, set-up
included, on ``--threads`` threads):

1. **Top eigenvalue to a given accuracy** (both workloads). The reference ``lambda_1`` is Lanczos
   in float64 to a relative residual of 1e-10. For each seed, Lanczos (flatminima) is run once with
   a tolerance that never stops it, to find the first step whose top Ritz value is within 1 %
   (0.1 %, 0.01 %) of the reference; the time is then measured for a call with exactly that many
   steps (``max_iter``). PyHessian's power iteration (global RNG seeded with the seed) runs with
   ``tol = 0`` and every HVP is intercepted: the time to an accuracy is the wall time from before
   its constructor to the first HVP whose Rayleigh quotient is within it. Both are "oracle"
   stopping points (neither library knows the reference): they measure the work each algorithm
   needs, not a stopping rule.
2. **Each library's own stopping rule** (trained CNN), once per seed: top-1 and top-5 eigenvalues
   with ``tol = 1e-3`` (flatminima: relative residual ``||H y - theta y|| <= tol |theta|``; PyHessian: its
   default, relative change of the Rayleigh quotient between iterations), and the trace with the
   defaults (flatminima Hutch++ with 60 HVPs; PyHessian Hutchinson with ``tol = 1e-3`` on the
   running mean, at most 100): HVPs, time, value and the error against the reference.
3. **Trace to a relative RMS error** (equal accuracy; reference: Hutch++ with many HVPs). Hutch++
   must fix its budget ``m`` in advance (the sketch has ``m / 3`` vectors): the smallest ``m`` on a
   grid whose RMS error against the reference over the seeds is below the target is taken, and the
   median time of those calls is reported. Hutchinson's error is known in closed form, RMS =
   ``sigma / sqrt(m)`` with ``sigma`` the standard deviation of one sample ``g^T H g``: ``sigma`` is
   estimated from a pilot run of PyHessian's own samples, and PyHessian's ``trace(maxIter=m)`` with
   ``m = (sigma / (target * trace))^2`` is timed. (PyHessian reports no standard error; flatminima's
   Hutch++ does, and the table shows it next to the measured error: with few Hutchinson samples in
   the deflated part it is itself a noisy estimate.)

Usage::

    python benchmarks/hessian.py [--quick] [--threads N] [--json PATH] [--no-pyhessian]

``--quick`` uses fewer seeds (about 20-30 s); the default run takes about 1 minute on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _timing import bench_parser, finish, machine_meta, table
from torch import Tensor, nn

from flatminima.bench.tasks.digits import make_digits
from flatminima.sharpness.hessian import hessian_eigenvalues, hessian_trace

BATCH = 256
EPOCHS = 5
ACCURACIES = (1e-2, 1e-3, 1e-4)
HUTCHPP_GRID = (12, 24, 36, 48, 60, 72, 96, 120, 144, 192, 288, 384)


@dataclass
class Settings:
    eig_seeds: int
    trace_seeds: int
    repeats: int  # timed calls per flatminima eigenvalue measurement (median)
    trace_target: float  # relative standard error
    ref_trace_matvecs: int
    lanczos_max: int
    power_max: int
    hutchinson_pilot: int  # samples to estimate Hutchinson's standard deviation
    hutchinson_timed: int  # timed Hutchinson runs at the budget found

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(3, 6, 1, 0.02, 300, 100, 400, 200, 1)
        return cls(8, 12, 2, 0.02, 900, 100, 400, 400, 2)


# ---------------------------------------------------------------------------------------- workload
def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


@dataclass
class Workload:
    name: str
    model: nn.Module  # left in train mode, as in a training loop
    x: Tensor
    y: Tensor
    test_accuracy: float


def make_workloads() -> list[Workload]:
    """The CNN after ``EPOCHS`` epochs of SGD, and the same CNN at its initialization (same seed), each
    with the first ``BATCH`` training images as the Hessian batch."""
    data = make_digits(0)
    x_train, y_train = data.x_train.view(-1, 1, 8, 8), data.y_train
    x_test = data.x_test.view(-1, 1, 8, 8)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trained weights must not depend on --threads (reduction order)
    for epochs in (EPOCHS, 0):
        torch.manual_seed(0)
        model = make_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(x_train), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            acc = float((model.eval()(x_test).argmax(1) == data.y_test).float().mean())
        model.train()
        name = f"trained ({epochs} epochs)" if epochs else "at initialization"
        out.append(Workload(name, model, x_train[:BATCH], y_train[:BATCH], acc))
    torch.set_num_threads(threads)
    return out


def ce_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------------- PyHessian
def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys))


def _normalize(v: list[Tensor]) -> list[Tensor]:
    s = float(_dot(v, v)) ** 0.5
    return [t / (s + 1e-6) for t in v]  # PyHessian adds 1e-6 to the norm


def reimpl_hvp(grads: Sequence[Tensor], params: Sequence[Tensor], v: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """One HVP through the kept gradient graph (what PyHessian does for a single batch)."""
    return torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)


class PyHessianAlgorithm:
    """PyHessian's algorithms for a single batch, re-implemented here from its description (not its
    code), used only when the ``pyhessian`` package cannot be imported: ``model.eval()``, one
    forward + backward with ``create_graph=True``, then each HVP is one backward through that graph;
    power iteration with deflation stopped by the relative change of the Rayleigh quotient;
    Hutchinson with Rademacher vectors stopped by the relative change of the running mean."""

    def __init__(self, model: nn.Module, criterion: Callable[..., Tensor], data: tuple[Tensor, Tensor]):
        self.model = model.eval()
        x, y = data
        loss = criterion(self.model(x), y)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)

    def _hvp(self, v: list[Tensor]) -> tuple[Tensor, ...]:
        return sys.modules[__name__].reimpl_hvp(self.grads, self.params, v)  # looked up: interceptable

    def eigenvalues(self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1):  # noqa: N803
        values: list[float] = []
        vectors: list[list[Tensor]] = []
        for _ in range(top_n):
            v = _normalize([torch.randn_like(p) for p in self.params])
            value = None
            for _ in range(maxIter):
                for u in vectors:  # deflation: Gram-Schmidt against the vectors found
                    c = _dot(v, u)
                    v = [a - c * b for a, b in zip(v, u)]
                v = _normalize(v)
                hv = self._hvp(v)
                estimate = float(_dot(hv, v))
                v = _normalize(list(hv))
                if value is not None and abs(value - estimate) / (abs(value) + 1e-6) < tol:
                    break
                value = estimate
            values.append(value)
            vectors.append(v)
        return values, vectors

    def trace(self, maxIter: int = 100, tol: float = 1e-3) -> list[float]:  # noqa: N803
        samples: list[float] = []
        mean = 0.0
        for _ in range(maxIter):
            v = [torch.randint_like(p, high=2) * 2 - 1 for p in self.params]
            samples.append(float(_dot(self._hvp(v), v)))
            new = statistics.fmean(samples)
            if abs(new - mean) / (mean + 1e-6) < tol:
                return samples
            mean = new
        return samples


class _Stop(Exception):
    """Raised from an intercepted HVP to end a PyHessian call early."""


class PyHessianBackend:
    """The real PyHessian if importable, else :class:`PyHessianAlgorithm`; every HVP is intercepted
    to record its time and ``v . Hv`` (the Rayleigh quotient for a unit ``v``, a Hutchinson sample
    for a Rademacher ``v``)."""

    def __init__(self, force_reimplementation: bool) -> None:
        self.why = ""
        self.real = False
        if force_reimplementation:
            self.why = "--no-pyhessian given"
        else:
            try:
                import pyhessian  # noqa: F401  (the benchmark's optional reference)

                self.module = sys.modules["pyhessian.hessian"]
                self.cls = self.module.hessian
                self.hvp_name = "hessian_vector_product"
                self.real = True
                from importlib.metadata import version

                self.label = f"PyHessian {version('pyhessian')}"
            except Exception as exc:  # noqa: BLE001  (any failure: report it and fall back)
                self.why = f"`import pyhessian` failed: {type(exc).__name__}: {exc}"
        if not self.real:
            self.module = sys.modules[__name__]
            self.cls = PyHessianAlgorithm
            self.hvp_name = "reimpl_hvp"
            self.label = "PyHessian algorithm (re-implemented here)"

    @contextlib.contextmanager
    def intercept(self, on_hvp: Callable[[float, float], None]) -> Iterator[None]:
        original = getattr(self.module, self.hvp_name)

        def hvp(grads, params, v):
            hv = original(grads, params, v)
            on_hvp(time.perf_counter(), float(_dot(hv, v)))
            return hv

        setattr(self.module, self.hvp_name, hvp)
        try:
            yield
        finally:
            setattr(self.module, self.hvp_name, original)

    def make(self, model: nn.Module, x: Tensor, y: Tensor) -> Any:
        if self.real:
            return self.cls(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        return self.cls(model, nn.CrossEntropyLoss(), data=(x, y))

    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, seed: int, call: Callable[[Any], Any],
        on_hvp: Callable[[int, float, float], None] | None = None,
    ) -> tuple[Any, list[tuple[float, float]], float, float]:
        """``call(hessian_object)`` on a fresh copy of ``model`` with the global RNG seeded;
        returns ``(result or None if stopped, [(seconds since start, v.Hv) per HVP], total seconds,
        start time)``."""
        m = copy.deepcopy(model)
        records: list[tuple[float, float]] = []
        torch.manual_seed(seed)
        t0 = time.perf_counter()

        def hook(t: float, value: float) -> None:
            records.append((t - t0, value))
            if on_hvp is not None:
                on_hvp(len(records), t - t0, value)

        result = None
        with warnings.catch_warnings(), self.intercept(hook):
            warnings.simplefilter("ignore")  # backward(create_graph=True) reference-cycle warning
            try:
                result = call(self.make(m, x, y))
            except _Stop:
                pass
        return result, records, time.perf_counter() - t0, t0


# ---------------------------------------------------------------------------------------- helpers
def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``(result of the last call, median seconds over repeats)``."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # not converged: intended for oracle runs
            out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def med(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def fmt_ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{1e3 * seconds:.0f}"


def fmt_ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.1f}x"


# ---------------------------------------------------------------------------------------- parts
def reference(model: nn.Module, x: Tensor, y: Tensor, s: Settings, with_trace: bool) -> dict[str, Any]:
    m64 = copy.deepcopy(model).double()
    top, info = hessian_eigenvalues(
        m64, ce_loss, [(x.double(), y)], k=5, mode="eval", tol=1e-10, max_iter=400, return_info=True
    )
    out = {"top5": [float(v) for v in top], "eig_matvecs": info.matvecs, "converged": info.converged}
    if with_trace:
        tr, se = hessian_trace(
            model, ce_loss, [(x, y)], seed=12345, mode="eval", num_matvecs=s.ref_trace_matvecs
        )
        out.update(trace=tr, trace_se=se)
    return out


def side_effects(backend: PyHessianBackend, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """What each library leaves behind on the model it measured."""
    out = {}
    m = copy.deepcopy(model)
    before = copy.deepcopy(m.state_dict())
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backend.make(m, x, y).eigenvalues(maxIter=3)
    out["pyhessian"] = {
        "training_flag": f"{model.training} -> {m.training}",
        "grads_with_graph": sum(p.grad is not None and p.grad.grad_fn is not None for p in m.parameters()),
        "weights_changed": any(not torch.equal(before[k], v) for k, v in m.state_dict().items()),
    }
    m = copy.deepcopy(model)
    hessian_eigenvalues(m, ce_loss, [(x, y)], mode="eval", max_iter=3, tol=0.5)
    out["flatminima"] = {
        "training_flag": f"{model.training} -> {m.training}",
        "grads_with_graph": sum(p.grad is not None for p in m.parameters()),
        "weights_changed": any(not torch.equal(before[k], v) for k, v in m.state_dict().items()),
    }
    return out


def per_hvp_cost(backend: PyHessianBackend, model: nn.Module, x: Tensor, y: Tensor, s: Settings):
    """Seconds per HVP from a 50-sample Hutchinson run of each library (set-up amortized)."""
    n = 50
    _, ours = timed(
        lambda: hessian_trace(model, ce_loss, [(x, y)], mode="eval", method="hutchinson", num_matvecs=n),
        max(s.repeats, 2),
    )
    theirs = [
        backend.run(model, x, y, 0, lambda h: h.trace(maxIter=n, tol=0.0))[2]
        for _ in range(max(s.repeats, 2))
    ]
    return ours / n, statistics.median(theirs) / n


def top_eigenvalue_to_accuracy(backend, model, x, y, ref: float, s: Settings) -> dict[str, Any]:
    rows: dict[str, dict[str, list]] = {
        f"{a:g}": {"ours_hvps": [], "ours_s": [], "theirs_hvps": [], "theirs_s": []} for a in ACCURACIES
    }
    for seed in range(s.eig_seeds):
        (_, info), _ = timed(
            lambda seed=seed: hessian_eigenvalues(
                model, ce_loss, [(x, y)], k=1, seed=seed, mode="eval", max_iter=s.lanczos_max,
                tol=1e-12, return_info=True,
            ),
            1,
        )
        hist = [h[0] for h in info.history]
        for a in ACCURACIES:
            row = rows[f"{a:g}"]
            j = next((i + 1 for i, v in enumerate(hist) if rel(v, ref) <= a), None)
            row["ours_hvps"].append(j)
            if j is None:
                row["ours_s"].append(math.nan)
                continue
            _, t = timed(
                lambda seed=seed, j=j: hessian_eigenvalues(
                    model, ce_loss, [(x, y)], k=1, seed=seed, mode="eval", max_iter=j, tol=1e-12
                ),
                s.repeats,
            )
            row["ours_s"].append(t)

        def stop_when_done(count: int, _t: float, value: float) -> None:
            if rel(value, ref) <= min(ACCURACIES):
                raise _Stop

        _, rec, _, _ = backend.run(
            model, x, y, seed, lambda h: h.eigenvalues(maxIter=s.power_max, tol=0.0), stop_when_done
        )
        for a in ACCURACIES:
            row = rows[f"{a:g}"]
            i = next((i for i, (_, v) in enumerate(rec) if rel(v, ref) <= a), None)
            row["theirs_hvps"].append(None if i is None else i + 1)
            row["theirs_s"].append(math.nan if i is None else rec[i][0])
    return rows


def with_own_stopping(backend, model, x, y, ref: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    top5 = ref["top5"]
    for seed in range(s.eig_seeds):
        for k in (1, 5):
            (vals, info), t = timed(
                lambda seed=seed, k=k: hessian_eigenvalues(
                    model, ce_loss, [(x, y)], k=k, seed=seed, mode="eval", tol=1e-3, return_info=True
                ),
                s.repeats,
            )
            out.append({
                "what": f"top-{k}", "who": "flatminima", "seed": seed, "hvps": info.matvecs, "s": t,
                "value": float(vals[0]), "err": max(rel(float(v), r) for v, r in zip(vals, top5)),
            })
            runs = [
                backend.run(model, x, y, seed, lambda h, k=k: h.eigenvalues(top_n=k))
                for _ in range(s.repeats)
            ]
            res, rec, _, _ = runs[0]
            out.append({
                "what": f"top-{k}", "who": "pyhessian", "seed": seed, "hvps": len(rec),
                "s": med([r[2] for r in runs]), "value": float(res[0][0]),
                "err": max(rel(float(v), r) for v, r in zip(sorted(res[0], reverse=True), top5)),
            })
    for seed in range(s.eig_seeds):
        (est, se, info), t = timed(
            lambda seed=seed: hessian_trace(
                model, ce_loss, [(x, y)], seed=seed, mode="eval", return_info=True
            ),
            s.repeats,
        )
        out.append({
            "what": "trace", "who": "flatminima", "seed": seed, "hvps": info.matvecs, "s": t,
            "value": est, "se": se, "err": rel(est, ref["trace"]),
        })
        runs = [backend.run(model, x, y, seed, lambda h: h.trace()) for _ in range(s.repeats)]
        samples = runs[0][0]
        mean = statistics.fmean(samples)
        se = statistics.stdev(samples) / math.sqrt(len(samples)) if len(samples) > 1 else math.nan
        out.append({
            "what": "trace", "who": "pyhessian", "seed": seed, "hvps": len(samples),
            "s": med([r[2] for r in runs]), "value": mean, "se": se, "err": rel(mean, ref["trace"]),
        })
    return out


def trace_to_target(backend, model, x, y, ref: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Budgets for a relative RMS error of ``s.trace_target`` against the reference trace: Hutch++'s
    smallest grid budget whose RMS error over the seeds meets it, and Hutchinson's
    ``m = (sigma / (target * trace))^2`` with ``sigma`` from a pilot run of PyHessian's samples."""
    target, tr = s.trace_target, ref["trace"]
    res: dict[str, Any] = {"target": target}
    for m in HUTCHPP_GRID:
        calls = [
            timed(lambda seed=seed, m=m: hessian_trace(
                model, ce_loss, [(x, y)], seed=seed, mode="eval", num_matvecs=m
            ), 1)
            for seed in range(s.trace_seeds)
        ]
        errs = [(est - tr) / tr for (est, _), _ in calls]
        rms = math.sqrt(statistics.fmean(e * e for e in errs))
        if rms <= target or m == HUTCHPP_GRID[-1]:
            res["hutchpp"] = {
                "m": m, "reached": rms <= target, "rms_err": rms, "s": med([t for _, t in calls]),
                "median_rel_se": med([se / abs(est) for (est, se), _ in calls]),
            }
            break
    _, rec, _, _ = backend.run(model, x, y, 10_000, lambda h: h.trace(maxIter=s.hutchinson_pilot, tol=0.0))
    sigma = statistics.stdev(v for _, v in rec)
    m_h = math.ceil((sigma / (target * tr)) ** 2)
    runs = [
        backend.run(model, x, y, seed, lambda h: h.trace(maxIter=m_h, tol=0.0))
        for seed in range(s.hutchinson_timed)
    ]
    res["hutchinson"] = {
        "m": m_h, "sigma": sigma, "pilot_samples": len(rec), "s": med([r[2] for r in runs]),
        "errs": [rel(statistics.fmean(r[0]), tr) for r in runs],
    }
    return res


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = bench_parser(
        __doc__.splitlines()[0], quick_help="fewer seeds (under a minute)", threads_default=None,
        threads_help="torch.set_num_threads(N) (default: torch's choice)",
    )
    ap.add_argument(
        "--no-pyhessian", action="store_true",
        help="compare with the in-script re-implementation of PyHessian's algorithm even if it imports",
    )
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    return args


def print_accuracy_table(label: str, rows_in: dict[str, dict[str, list]], s: Settings) -> dict[str, Any]:
    header = ["within", "Lanczos HVPs", "Lanczos ms", "power HVPs", "power ms", "HVP ratio", "speed-up"]
    rows, summary = [], {}
    for a, r in rows_in.items():
        oh, th = med(r["ours_hvps"]), med(r["theirs_hvps"])
        os_, ts = med(r["ours_s"]), med(r["theirs_s"])
        reached = (sum(v is not None for v in r["ours_hvps"]), sum(v is not None for v in r["theirs_hvps"]))
        name = f"{100 * float(a):g} %"
        if reached != (s.eig_seeds, s.eig_seeds):
            name += f" (reached {reached[0]} / {reached[1]} of {s.eig_seeds})"
        rows.append(
            [name, f"{oh:g}", fmt_ms(os_), f"{th:g}", fmt_ms(ts), fmt_ratio(th, oh), fmt_ratio(ts, os_)]
        )
        summary[a] = {"lanczos_hvps": oh, "lanczos_s": os_, "power_hvps": th, "power_s": ts}
    print(f"\n### {label}\n")
    print(table(header, rows))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    s = Settings.make(args.quick)
    t_start = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    meta = machine_meta(args.quick, asdict(s), loadavg=list(load))
    backend = PyHessianBackend(args.no_pyhessian)
    print(
        f"# Hessian spectrum: flatminima vs {backend.label} | torch {meta['torch']} | threads "
        f"{meta['threads']} | {meta['processor']} | load average {load[0]:.2f} | "
        f"{'quick' if args.quick else 'default'} run"
    )
    if not backend.real:
        print(f"\nNOTE: PyHessian not used ({backend.why}); comparing with {backend.label}.")

    works = make_workloads()
    trained = works[0]
    n = sum(p.numel() for p in trained.model.parameters())
    print(
        f"\nWorkload: digits CNN (conv 8/16 + BatchNorm + linear, {n} parameters), Hessian of the "
        f"cross-entropy on one batch of {BATCH} training images, eval mode (flatminima: mode='eval'; "
        "PyHessian: model.eval(), implicitly); the CNN trained "
        f"({EPOCHS} epochs of SGD, test accuracy {100 * trained.test_accuracy:.1f} %) and at initialization."
    )
    refs = {}
    for w in works:
        refs[w.name] = ref = reference(w.model, w.x, w.y, s, with_trace=w is trained)
        top = ref["top5"]
        line = (
            f"Reference, {w.name}: top-5 eigenvalues {', '.join(f'{v:.4f}' for v in top)} "
            f"(lambda_2 / lambda_1 = {top[1] / top[0]:.3f}; float64 Lanczos, residual <= 1e-10 relative "
            f"{'reached' if ref['converged'] else 'NOT reached'} in {ref['eig_matvecs']} HVPs)"
        )
        if "trace" in ref:
            line += (
                f"; trace {ref['trace']:.3f} +- {ref['trace_se']:.3f} (Hutch++, {s.ref_trace_matvecs} HVPs)"
            )
        print(line + ".")
    effects = side_effects(backend, trained.model, trained.x, trained.y)
    for who, e in effects.items():
        print(
            f"Side effects on the measured model, {who}: training flag {e['training_flag']}, "
            f"{e['grads_with_graph']} parameters left with a .grad, weights changed: {e['weights_changed']}."
        )
    ours_hvp, theirs_hvp = per_hvp_cost(backend, trained.model, trained.x, trained.y, s)
    print(
        f"Cost per HVP (50-sample Hutchinson call / 50, trained CNN): flatminima {1e3 * ours_hvp:.2f} ms, "
        f"{backend.label} {1e3 * theirs_hvp:.2f} ms."
    )

    print(f"\n## 1. Top eigenvalue to a given accuracy (median over {s.eig_seeds} seeds; oracle stop)")
    summaries = {}
    for w in works:
        rows = top_eigenvalue_to_accuracy(backend, w.model, w.x, w.y, refs[w.name]["top5"][0], s)
        top = refs[w.name]["top5"]
        summaries[w.name] = {
            "summary": print_accuracy_table(
                f"CNN {w.name}, lambda_2 / lambda_1 = {top[1] / top[0]:.2f}", rows, s
            ),
            "per_seed": rows,
        }
    print(
        f"\n(power = {backend.label}'s power iteration; HVP ratio and speed-up = power / Lanczos; times "
        "include each call's set-up: flatminima's determinism check and graph build, PyHessian's "
        "constructor)"
    )

    print("\n## 2. Each library's own stopping rule, trained CNN (median over seeds)\n")
    ref = refs[trained.name]
    own = with_own_stopping(backend, trained.model, trained.x, trained.y, ref, s)
    rows = []
    own_summary = {}
    settings = {
        ("top-1", "flatminima"): "Lanczos, k=1, tol=1e-3 (residual)",
        ("top-1", "pyhessian"): "power, top_n=1, defaults (tol=1e-3 change)",
        ("top-5", "flatminima"): "Lanczos, k=5, tol=1e-3 (residual)",
        ("top-5", "pyhessian"): "power + deflation, top_n=5, defaults",
        ("trace", "flatminima"): "Hutch++, defaults (60 HVPs)",
        ("trace", "pyhessian"): "Hutchinson, defaults (tol=1e-3, maxIter=100)",
    }
    for (what, who), label in settings.items():
        sel = [r for r in own if r["what"] == what and r["who"] == who]
        entry = {
            "hvps": med([r["hvps"] for r in sel]), "s": med([r["s"] for r in sel]),
            "value": med([r["value"] for r in sel]), "err": med([r["err"] for r in sel]),
            "max_err": max(r["err"] for r in sel),
        }
        own_summary[f"{what}/{who}"] = entry
        value = f"{entry['value']:.4f}"
        if what == "trace":
            value += f" +- {med([r['se'] for r in sel]):.2f}"
        rows.append([
            what, f"{'flatminima' if who == 'flatminima' else backend.label}: {label}",
            f"{entry['hvps']:g}", fmt_ms(entry["s"]), value,
            f"{entry['err']:.1e} (max {entry['max_err']:.1e})",
        ])
    print(table(["what", "library: setting", "HVPs", "ms", "value", "rel. error (median, max)"], rows))
    print(
        "\n(top-5 error: the largest relative error of the 5 values against the reference; trace: "
        "value +- standard error, PyHessian's computed here from its samples)"
    )

    target = s.trace_target
    print(
        f"\n## 3. Trace to a relative RMS error <= {100 * target:g} %, trained CNN (equal accuracy)\n"
    )
    tr = trace_to_target(backend, trained.model, trained.x, trained.y, ref, s)
    hp, hu = tr["hutchpp"], tr["hutchinson"]
    om, tm, os_, ts = hp["m"], hu["m"], hp["s"], hu["s"]
    print(table(
        ["method", "HVPs", "ms", "accuracy"],
        [
            ["flatminima Hutch++", f"{om}", fmt_ms(os_),
             f"RMS error {100 * hp['rms_err']:.1f} % over {s.trace_seeds} seeds "
             f"(median reported SE {100 * hp['median_rel_se']:.1f} %)"
             + ("" if hp["reached"] else " NOT reached on the grid")],
            [f"{backend.label} Hutchinson", f"{tm}", fmt_ms(ts),
             f"RMS error {100 * target:g} % by sigma = {hu['sigma']:.2f} ({hu['pilot_samples']}-sample "
             f"pilot); timed runs' errors {', '.join(f'{100 * e:.1f} %' for e in hu['errs'])}"],
        ],
    ))
    print(
        f"\nHVP ratio {fmt_ratio(tm, om)}, speed-up {fmt_ratio(ts, os_)} (Hutchinson / Hutch++). Hutch++'s "
        "budget is the smallest on the grid whose RMS error against the reference over the seeds meets "
        "the target; Hutchinson's is sigma^2 / (target * trace)^2, its exact variance formula."
    )

    print("\n## Summary (README table)\n")
    readme = []
    for w in works:
        top = refs[w.name]["top5"]
        for a in (f"{1e-2:g}", f"{1e-4:g}"):
            r = summaries[w.name]["summary"][a]
            readme.append([
                f"top eigenvalue within {100 * float(a):g} %, {w.name} (gap {top[1] / top[0]:.2f})",
                f"{r['lanczos_hvps']:g} / {fmt_ms(r['lanczos_s'])}",
                f"{r['power_hvps']:g} / {fmt_ms(r['power_s'])}",
                fmt_ratio(r["power_s"], r["lanczos_s"]),
            ])
    t5f, t5p = own_summary["top-5/flatminima"], own_summary["top-5/pyhessian"]
    readme.append([
        f"top-5 eigenvalues, tol 1e-3, {trained.name}",
        f"{t5f['hvps']:g} / {fmt_ms(t5f['s'])} (err {t5f['err']:.0e})",
        f"{t5p['hvps']:g} / {fmt_ms(t5p['s'])} (err {t5p['err']:.0e})", fmt_ratio(t5p["s"], t5f["s"]),
    ])
    readme.append([
        f"trace, relative RMS error <= {100 * target:g} %, {trained.name}", f"{om} / {fmt_ms(os_)}",
        f"{tm} / {fmt_ms(ts)}", fmt_ratio(ts, os_),
    ])
    print(table([f"task (digits CNN, {n} params)", "flatminima HVPs / ms", f"{backend.label} HVPs / ms",
                 "speed-up"], readme))
    print(
        "\n(gap = lambda_2 / lambda_1; medians over seeds; power iteration converges like gap^(2 t), "
        "Lanczos much faster when the gap is close to 1)"
    )
    for w in works:
        r = summaries[w.name]["summary"][f"{1e-2:g}"]
        goal = r["power_s"] / r["lanczos_s"] if r["lanczos_s"] > 0 else math.nan
        print(
            f"Target (>= 2x faster than PyHessian's power iteration, top eigenvalue within 1 %), "
            f"{w.name}: {'met' if goal >= 2 else 'NOT met'} ({goal:.1f}x)."
        )

    payload = {
        "meta": meta, "pyhessian": {"label": backend.label, "real": backend.real, "why_not": backend.why},
        "workloads": {
            w.name: {"parameters": n, "batch": BATCH, "test_accuracy": w.test_accuracy} for w in works
        },
        "reference": refs, "side_effects": effects,
        "per_hvp_s": {"flatminima": ours_hvp, "pyhessian": theirs_hvp},
        "top_eigenvalue_to_accuracy": summaries,
        "own_stopping": {"summary": own_summary, "runs": own},
        "trace_to_target": tr,
    }
    finish(t_start, args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
