"""The benchmark suites as data: which runs answer which question.

A :class:`Suite` (``"quick"`` or ``"full"``) is a list of :class:`Study` entries, each a question of
the seed papers turned into runs (tasks x optimizers x seeds at one label-noise level); the tasks
use the suite's data size and epoch budget. :func:`suite_specs` expands a suite into the
:class:`~flatminima.bench.store.RunSpec` list that :func:`~flatminima.bench.runner.run_sweep` runs
(seed-major, deduplicated by run key, so a run shared by two studies trains once).

Studies (both suites; the full one with more seeds, noise levels and radii):

* ``main``: every task x every optimizer family (SGD, SAM, ASAM, Monge-SAM, ESAM, SWA, SWA+SAM
  (WASAM), LETS around SAM): who wins where, at what cost (WASAM >= max(SAM, SWA)? ESAM's cost?);
* ``noise``: the vision and text tasks with flipped training labels, SGD / SAM / SWA / WASAM:
  flat minima are claimed to matter most under label noise;
* ``rho``: SAM and Monge-SAM at several radii on the multi-modal alignment task and on MNIST-1D
  (Monge-SAM's claim: robust to the choice of rho; the default-radius runs of ``main`` are a point
  of the same curves);
* ``lets``: LETS around SAM started from a too-small and a too-large radius on the same tasks
  (LETS's claims: at least as good as the best fixed rho, insensitive to the start);
* ``time``: SGD, SAM, SWA and WASAM with the same wall-clock training time per task (SGD gets
  about twice SAM's epochs): what does SAM buy at the cost of SGD's time? Wall-clock budgets make
  these runs depend on the machine; the comparison within one sweep is fair.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .quick import DEFAULT_OPTIMIZERS
from .store import RunSpec
from .tasks import TASKS

__all__ = ["SUITES", "ALL_OPTIMIZERS", "Study", "Suite", "suite_specs"]

#: An optimizer entry: a registry name, or ``(label, registry_name, hparams)``.
OptimizerEntry = str | tuple[str, str, dict[str, Any]]

#: Every optimizer family of the library, as the suites run them: the digits job's seven plus LETS
#: around SAM (label ``sam_sgd+lets``, LETS's defaults: Adam on log rho, lr 0.01, every step).
ALL_OPTIMIZERS: tuple[OptimizerEntry, ...] = (*DEFAULT_OPTIMIZERS, ("sam_sgd+lets", "sam_sgd", {"lets": {}}))
#: The optimizers of the label-noise study.
NOISE_OPTIMIZERS: tuple[OptimizerEntry, ...] = ("sgd", "sam_sgd", "sgd+swa", "sam_sgd+swa")


def _radii(names: Sequence[str], rhos: Sequence[float]) -> tuple[OptimizerEntry, ...]:
    return tuple((f"{n}[rho={r:g}]", n, {"rho": float(r)}) for n in names for r in rhos)


def _lets_from(rhos: Sequence[float]) -> tuple[OptimizerEntry, ...]:
    return tuple((f"sam_sgd+lets[rho0={r:g}]", "sam_sgd", {"rho": float(r), "lets": {}}) for r in rhos)


@dataclass(frozen=True)
class Study:
    """One question of a suite: ``tasks`` (``None``: every registered task; else names) or the
    tasks of ``domains``, each with ``optimizers``, at ``label_noise``."""

    name: str
    question: str
    optimizers: tuple[OptimizerEntry, ...]
    tasks: tuple[str, ...] | None = None
    domains: tuple[str, ...] | None = None
    label_noise: float = 0.0
    #: per-task budgets (anything :func:`~flatminima.bench.runner.parse_budget` reads, e.g. ``"8s"``)
    #: instead of the suite's epochs; a task without an entry uses the suite's
    budgets: tuple[tuple[str, str], ...] = ()

    def task_names(self) -> list[str]:
        """The registered tasks of the study, in registry order."""
        names = list(TASKS) if self.tasks is None else list(self.tasks)
        if self.domains is not None:
            names = [n for n in names if TASKS[n].domain in self.domains]
        return names


@dataclass(frozen=True)
class Suite:
    """A named list of studies with its seeds; ``expected`` documents its measured run time."""

    name: str
    seeds: tuple[int, ...]
    studies: tuple[Study, ...]
    expected: str = ""

    def study(self, name: str) -> Study:
        for s in self.studies:
            if s.name == name:
                return s
        names = [s.name for s in self.studies]
        raise KeyError(f"suite {self.name!r} has no study {name!r}; studies: {names}")


_RHO_TASKS = ("mfeat-clip", "mnist1d-mlp")
_TIME_OPTIMIZERS: tuple[OptimizerEntry, ...] = ("sgd", "sam_sgd", "sgd+swa", "sam_sgd+swa")
_NOISE_DOMAINS = ("vision", "text")

SUITES: dict[str, Suite] = {
    "quick": Suite(
        name="quick",
        seeds=(0, 1),
        expected="about 9 minutes with --jobs 2 on 2 CPU cores (measured 2026-11-21: 288 runs and "
                 "the report in 8 min 48 s, from an empty embedding cache)",
        studies=(
            Study("main", "which optimizer wins, where, at what cost", ALL_OPTIMIZERS),
            Study("noise", "do flat minima help more with 30 % flipped labels?", NOISE_OPTIMIZERS,
                  domains=_NOISE_DOMAINS, label_noise=0.3),
            Study("rho", "is Monge-SAM more robust to rho than SAM?",
                  _radii(("sam_sgd", "msam_sgd"), (0.01, 0.2, 0.5)), tasks=_RHO_TASKS),
            Study("lets", "does LETS find a radius as good as the best fixed one, from any start?",
                  _lets_from((0.01, 0.5)), tasks=_RHO_TASKS),
            Study("time", "what does SAM buy at the cost of SGD's time?", _TIME_OPTIMIZERS,
                  tasks=("mnist1d-cnn", "bbc-news-boe", "mfeat-clip"),
                  budgets=(("mnist1d-cnn", "4s"), ("bbc-news-boe", "2s"), ("mfeat-clip", "2s"))),
        ),
    ),
    "full": Suite(
        name="full",
        seeds=(0, 1, 2),
        expected=("about 3 h 20 min with --jobs 2 on 2 CPU cores (measured 2026-11-21 in parts, 576 "
                  "runs): fashion-mnist-cnn's 48 runs on 60 000 images take 2 h 20 min, the two MiniLM "
                  "tasks 14 min (encoding included), the other 456 runs 45 min"),
        studies=(
            Study("main", "which optimizer wins, where, at what cost", ALL_OPTIMIZERS),
            Study("noise", "do flat minima help more with 20 % flipped labels?", NOISE_OPTIMIZERS,
                  domains=_NOISE_DOMAINS, label_noise=0.2),
            Study("noise40", "... and with 40 %?", NOISE_OPTIMIZERS,
                  domains=_NOISE_DOMAINS, label_noise=0.4),
            Study("rho", "is Monge-SAM more robust to rho than SAM?",
                  _radii(("sam_sgd", "msam_sgd"), (0.005, 0.01, 0.02, 0.1, 0.2, 0.5, 1.0)),
                  tasks=_RHO_TASKS),
            Study("lets", "does LETS find a radius as good as the best fixed one, from any start?",
                  _lets_from((0.005, 0.01, 0.5, 1.0)), tasks=_RHO_TASKS),
            Study("time", "what does SAM buy at the cost of SGD's time?", _TIME_OPTIMIZERS,
                  tasks=("mnist1d-cnn", "bbc-news-boe", "mfeat-clip"),
                  budgets=(("mnist1d-cnn", "20s"), ("bbc-news-boe", "6s"), ("mfeat-clip", "6s"))),
        ),
    ),
}


def suite_specs(
    suite: str,
    *,
    tasks: Iterable[str] | None = None,
    studies: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    budget: Any = None,
    size: str | None = None,
) -> list[RunSpec]:
    """The runs of ``suite`` (``"quick"`` or ``"full"``), seed-major and without duplicates.

    ``tasks`` keeps only those tasks (of every study that has them), ``studies`` only those
    studies, ``seeds`` replaces the suite's; ``budget`` (default: the study's budget of the task,
    else the suite's epochs; given, it replaces every budget) and ``size`` (default: the suite's)
    go to :func:`~flatminima.bench.runner.make_specs`.
    Unavailable tasks are kept (the sweep skips them with their message)."""
    from .runner import make_specs

    if suite not in SUITES:
        raise ValueError(f"invalid suite {suite!r} (must be one of {sorted(SUITES)})")
    s = SUITES[suite]
    chosen = list(s.studies) if studies is None else [s.study(n) for n in studies]
    keep = None if tasks is None else list(tasks)
    if keep is not None:
        unknown = [t for t in keep if t not in TASKS]
        if unknown:
            raise KeyError(f"unknown task {unknown[0]!r}; registered tasks: {sorted(TASKS)}")
    seed_list = list(s.seeds if seeds is None else seeds)
    out: dict[str, RunSpec] = {}
    for seed in seed_list:
        for study in chosen:
            names = [n for n in study.task_names() if keep is None or n in keep]
            own = dict(study.budgets)
            for name in names:
                b = own.get(name, budget) if budget is None else budget
                for spec in make_specs([name], study.optimizers, [seed], suite=suite, budget=b,
                                       size=size, label_noise=study.label_noise):
                    out.setdefault(spec.key, spec)
    return list(out.values())
