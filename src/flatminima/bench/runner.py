"""Run benchmark runs one by one or as a resumable sweep over a :class:`~flatminima.bench.store.Store`.

:func:`run_one` trains one :class:`~flatminima.bench.store.RunSpec` through the
:class:`~flatminima.bench.tasks.base.Task` interface and returns a
:class:`~flatminima.bench.store.RunRecord`; :func:`run_sweep` runs a list of specs, skipping those
whose key the store already holds, so a sweep stopped at any point (Ctrl-C, ``kill -9``) resumes
where it was: finished runs are neither recomputed nor duplicated, the run that was in progress
(never written) is redone. :func:`make_specs` builds the specs of a suite.

The training loop is that of :mod:`flatminima.bench.quick`, for any task:

* seeding: ``torch.manual_seed(seed)`` right before ``task.make_model()`` (inside
  ``torch.random.fork_rng``, so the caller's RNG state is untouched); the minibatch order comes
  from ``torch.Generator().manual_seed(seed)``; evaluation runs in its own forked RNG, so it never
  changes the training trajectory;
* optimizer: ``flatminima.create(name, ...)`` with the task's defaults (:func:`optimizer_kwargs`):
  a base ``sgd`` gets ``task.hparams.lr`` and momentum 0.9, every other base (AdamW, Adam, ...)
  ``task.hparams.lr_adam``; all get ``task.hparams.weight_decay``; SAM-family rules get the
  :data:`~flatminima.bench.quick.DEFAULT_RHO` of their family; the spec's ``hparams`` go on top;
* steps: SAM-family optimizers ``opt.step(closure)``, base ones ``zero_grad(); closure(); step()``
  with the standard closure (``task.loss`` forward and backward); optimizers with ``per_sample``
  (ESAM) get ``closure(select=None)`` returning ``task.sample_losses`` of the batch or of
  ``task.select(batch, select)`` when the task has ``per_sample``;
* ``+swa`` names (SWA / WASAM) average :data:`SWA_AVERAGES_PER_EPOCH` times per epoch (``every`` =
  ``ceil(steps per epoch / SWA_AVERAGES_PER_EPOCH)`` steps, so that short budgets still average many
  iterates; once per step on full-batch tasks) from the epoch
  boundary ``floor(start * epochs)`` (``start`` from the hparams, default 0.75; an int ``start`` is
  a step index), with ``total_steps`` = epochs x steps per epoch. Under a time budget the number of
  epochs is unknown up front: the base optimizer (``create`` of the name without ``+swa``) runs
  alone until the first epoch end where the training time reaches ``start`` x the budget (or where
  the next epoch, as long as the last, would end past the budget, so that at least one epoch is
  averaged); it is then wrapped in :class:`~flatminima.optim.averaging.SWA`, averaging every
  ``every`` steps from there (an int ``start``: from the first epoch end with that many steps).
  ``record.extra["swa"]`` keeps the schedule used.
  Once the average holds at least one iterate, every evaluation recomputes its BatchNorm statistics
  from the training batches (``update_bn``) and measures the averaged weights; before that, the
  live weights (``EpochRecord.averaged`` says which);
* ``hparams["lets"]`` (a dict of :class:`~flatminima.optim.lets.LETS` options, ``{}`` for its
  defaults) wraps a SAM-family optimizer in LETS, which learns ``rho`` from a validation closure
  over :meth:`Task.val_batches` (the task's validation split, cycled in an order drawn from
  ``seed + 1``; LETS's extra passes leave BN statistics and the RNG alone). Its validation
  numbers are therefore not held out; its test numbers are, like every run's. The suites label
  these runs ``"<name>+lets"``; each epoch's stats snapshot holds the learned ``rho``;
* after every epoch: ``task.evaluate(model, "val")`` and ``"test"``, and a snapshot of
  ``opt.stats`` when the optimizer has one;
* after training (``sharpness=True``, the default): the top eigenvalue of the Hessian of the
  training loss of the final model (the averaged one for ``+swa``) in eval mode, on a fixed set of
  training batches (the first :data:`SHARPNESS_SAMPLES` samples in the order of
  ``Generator().manual_seed(0)``, the same for every run of a task), by Lanczos to a relative
  residual of :data:`SHARPNESS_TOL` (:func:`~flatminima.sharpness.hessian_eigenvalues`);
  ``record.extra["sharpness"]`` is the value and ``extra["sharpness_info"]`` how it was measured
  (samples, Hessian-vector products, converged, seconds). It is not part of the training time.

Budgets. ``{"epochs": n}`` runs exactly ``n`` epochs. ``{"seconds": s}`` runs until the training
time (optimizer steps and batch preparation, not evaluation) reaches ``s`` at an epoch end: the
first epoch end past the budget; the record says how many epochs and steps ran.

Divergence. A SAM-family step raising ``FloatingPointError`` (non-finite loss) or a non-finite
epoch training loss ends training early; the run is stored as finished with
``extra["diverged"]`` set (recomputing it would diverge again) and its completed epochs.

Peak memory (``RunRecord.peak_memory_bytes``, ``base_memory_bytes``, ``memory_method``):

* ``"cuda_max_allocated"``: on CUDA, ``torch.cuda.max_memory_allocated`` over the run (the peak
  statistics are reset when training starts), base = ``memory_allocated`` then;
* ``"rss_hwm"``: on CPU under Linux, the process's peak resident set size over the run: the
  kernel's high-water mark ``VmHWM`` is reset to the current RSS when training starts (writing
  ``5`` to ``/proc/self/clear_refs``) and read at the end; base = ``VmRSS`` at the reset. It counts
  the whole process (Python, torch, the task's data), so compare ``peak - base``
  (:attr:`RunRecord.peak_memory_delta`: model, optimizer state, activations, evaluation); memory
  the allocator kept from earlier runs in the same process can make that delta smaller than in a
  fresh process;
* ``"ru_maxrss"``: the fallback elsewhere: ``resource.getrusage`` ``ru_maxrss`` (a process-lifetime
  peak that cannot be reset), base = its value at the start, so the delta is only the growth of the
  lifetime peak (0 when a run stays below an earlier one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor

from ..optim.averaging import SWA
from ..optim.lets import LETS
from ..optim.registry import SWA_OPTIONS, create, optimizer_info
from .quick import DEFAULT_OPTIMIZERS, _default_rho, optimizer_step
from .store import EpochRecord, RunRecord, RunSpec, Store
from .tasks import TASKS, Task, TaskUnavailable

__all__ = [
    "DEFAULT_SUITE_OPTIMIZERS",
    "SHARPNESS_SAMPLES",
    "SHARPNESS_TOL",
    "EpochRecord",
    "RunRecord",
    "RunSpec",
    "SweepResult",
    "TextProgress",
    "make_specs",
    "optimizer_kwargs",
    "parse_budget",
    "run_one",
    "run_sweep",
    "select_best_epoch",
]

#: Optimizers of a suite when none are named (those of the quick digits benchmark).
DEFAULT_SUITE_OPTIMIZERS: tuple[str, ...] = DEFAULT_OPTIMIZERS
#: SWA's default start, as a fraction of the epochs (classic SWA: the last 25 %).
DEFAULT_SWA_START = 0.75
#: Iterates averaged per epoch by the ``+swa`` names (at most one per step).
SWA_AVERAGES_PER_EPOCH = 10
#: Momentum of the SGD base.
SGD_MOMENTUM = 0.9
#: Training samples (at least; whole batches) of the final sharpness measurement.
SHARPNESS_SAMPLES = 256
#: Relative Lanczos residual of the final sharpness measurement (and its iteration cap).
SHARPNESS_TOL = 1e-3
SHARPNESS_MAX_ITER = 60

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- specs
def parse_budget(budget: Any, *, task: str | None = None, suite: str = "quick") -> dict[str, Any]:
    """A budget dict from what a user writes.

    ``10`` or ``"10"`` or ``"10e"`` -> ``{"epochs": 10}``; ``"30s"``, ``"2.5s"``, ``"5m"``,
    ``"1h"`` -> ``{"seconds": ...}``; ``None``, ``"quick"`` or ``"full"`` -> the task's
    ``epochs_quick`` / ``epochs_full`` (``None`` uses ``suite``; needs ``task``); a dict is
    checked and returned."""
    if isinstance(budget, Mapping):
        return dict(RunSpec(task="x", optimizer="x", budget=budget).budget)
    if budget is None or (isinstance(budget, str) and budget.strip().lower() in ("quick", "full")):
        which = suite if budget is None else budget.strip().lower()
        if which not in ("quick", "full", "tiny"):
            raise ValueError(f"invalid suite {which!r} (must be 'quick' or 'full')")
        if task is None:
            raise ValueError(f"budget {which!r} depends on the task: pass task=")
        hp = _task_class(task).hparams
        return {"epochs": int(hp.epochs_full if which == "full" else hp.epochs_quick)}
    if isinstance(budget, bool):
        raise ValueError(f"invalid budget {budget!r}")
    if isinstance(budget, int):
        return dict(RunSpec(task="x", optimizer="x", budget={"epochs": budget}).budget)
    text = str(budget).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(e|ep|epochs?|s|sec|m|min|h)?", text)
    if m is None:
        raise ValueError(
            f"invalid budget {budget!r}: an epoch count ('10'), a time ('30s', '5m', '1h'), "
            "'quick' or 'full'"
        )
    value, unit = m.group(1), m.group(2) or "e"
    if unit.startswith("e"):
        if not float(value).is_integer():
            raise ValueError(f"invalid budget {budget!r}: epochs must be a whole number")
        return dict(RunSpec(task="x", optimizer="x", budget={"epochs": int(float(value))}).budget)
    scale = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[unit]
    return dict(RunSpec(task="x", optimizer="x", budget={"seconds": float(value) * scale}).budget)


def _task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name]


def make_specs(
    tasks: Iterable[str] | None,
    optimizers: Iterable[str | tuple[str, str, Mapping[str, Any]]] | None = None,
    seeds: Iterable[int] = (0,),
    *,
    suite: str = "quick",
    budget: Any = None,
    size: str | None = None,
    label_noise: float = 0.0,
    data_seed: int = 0,
) -> list[RunSpec]:
    """The runs of a sweep, seed-major (every task and optimizer of seed 0, then seed 1, ...: a
    sweep stopped half-way has whole seeds of everything, and load from other processes hits every
    optimizer alike).

    Args:
        tasks: task names; ``None``: every registered task whose data is available.
        optimizers: registry names, or labelled variants ``(label, registry_name, hparams)`` (e.g.
            ``("sam rho=0.1", "sam_sgd", {"rho": 0.1})``); ``None``: :data:`DEFAULT_SUITE_OPTIMIZERS`.
        seeds: one run per seed.
        suite: ``"quick"`` or ``"full"``: the default ``size`` and epoch budget of each task.
        budget: anything :func:`parse_budget` reads; ``None``: the suite's epochs per task.
        size, label_noise, data_seed: passed to the tasks (``size`` defaults to ``suite``).
    """
    if suite not in ("quick", "full"):
        raise ValueError(f"invalid suite {suite!r} (must be 'quick' or 'full')")
    if tasks is None:
        names = [n for n, cls in TASKS.items() if cls.availability() is None]
    else:
        names = list(tasks)
        for n in names:
            _task_class(n)
    opts: list[tuple[str | None, str, dict[str, Any]]] = []
    for entry in DEFAULT_SUITE_OPTIMIZERS if optimizers is None else optimizers:
        if isinstance(entry, str):
            opts.append((None, optimizer_info(entry).name, {}))
        elif isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[2], Mapping):
            opts.append((str(entry[0]), optimizer_info(entry[1]).name, dict(entry[2])))
        else:
            raise ValueError(f"an optimizer is a registry name or (label, name, hparams), got {entry!r}")
    budgets = {n: parse_budget(budget, task=n, suite=suite) for n in names}
    specs = []
    for seed in seeds:
        for n in names:
            for label, name, hp in opts:
                specs.append(RunSpec(
                    task=n, optimizer=name, seed=int(seed), budget=budgets[n], hparams=hp,
                    size=size or suite, data_seed=data_seed, label_noise=label_noise, label=label,
                ))
    return specs


def optimizer_kwargs(task: Task | type[Task], optimizer: str, hparams: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
    """The ``create`` options of a run, before the SWA schedule: ``lr`` (``hparams.lr`` with
    momentum 0.9 for the ``sgd`` base, ``hparams.lr_adam`` for any other base) and
    ``weight_decay`` from the task, the family's default ``rho`` for SAM-family rules, then
    ``hparams`` over all of them."""
    info = optimizer_info(optimizer)
    hp = task.hparams
    extra = dict(hparams or {})
    kw: dict[str, Any] = {}
    if info.base == "sgd":
        kw.update(lr=float(hp.lr), momentum=SGD_MOMENTUM)
    else:
        kw["lr"] = float(hp.lr_adam)
    kw["weight_decay"] = float(hp.weight_decay)
    if info.family != "base":
        rho = _default_rho(info.family, extra.get("perturbation"))
        if rho is not None:
            kw["rho"] = float(rho)
    kw.update(extra)
    return kw


def select_best_epoch(values: Sequence[float]) -> int:
    """0-based index of the largest value (ties: the earliest; NaN ignored; the last index when
    none is a number; ``ValueError`` when empty)."""
    if not values:
        raise ValueError("no epochs to choose from")
    best, best_i = -math.inf, None
    for i, v in enumerate(values):
        v = float(v)
        if not math.isnan(v) and (best_i is None or v > best):
            best, best_i = v, i
    return len(values) - 1 if best_i is None else best_i


# ----------------------------------------------------------------------------- helpers
def _to_device(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)((k, _to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def _task_to(task: Task, device: torch.device) -> None:
    """Move the task's tensors (its data, for in-memory tasks) to ``device``."""
    if device.type == "cpu":
        return
    to = getattr(task, "to", None)
    if callable(to):
        to(device)
        return
    for name, value in list(vars(task).items()):
        if isinstance(value, Tensor):
            setattr(task, name, value.to(device))


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    n = getattr(batch, "num_graphs", None) or getattr(batch, "batch_size", None)
    if not (isinstance(n, int) and n > 0) and hasattr(batch, "__len__"):
        n = len(batch)  # e.g. a graph task's NodeBatch: its nodes
    return int(n) if isinstance(n, int) and n > 0 else 1


def _proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class _MemoryMeter:
    """Peak memory of a run (see the module docstring for what it means on each device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.base: int | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method, self.base = "cuda_max_allocated", int(torch.cuda.memory_allocated(self.device))
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # reset VmHWM (the peak RSS) to the current RSS
            base = _proc_status("VmRSS")
            if base is not None and _proc_status("VmHWM") is not None:
                self.method, self.base = "rss_hwm", base
                return
        except OSError:
            pass
        self.method, self.base = "ru_maxrss", _ru_maxrss()

    def stop(self) -> int | None:
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method == "rss_hwm":
            return _proc_status("VmHWM")
        return _ru_maxrss()


def _stats_snapshot(opt: Any) -> dict[str, float]:
    stats = getattr(opt, "stats", None)
    if not isinstance(stats, Mapping):
        return {}
    out = {}
    for k, v in stats.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _jsonable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        elif k != "model":
            out[k] = repr(v)
    return out


def _swa_start_step(start: Any, epochs: int, steps_per_epoch: int) -> int:
    """SWA's start step for a fraction ``start`` of ``epochs`` (on an epoch boundary, leaving at
    least the last epoch to average), or an int step index as given."""
    if isinstance(start, float) and 0.0 < start < 1.0:
        return min(math.floor(start * epochs), epochs - 1) * steps_per_epoch
    if isinstance(start, int) and not isinstance(start, bool) and start >= 0:
        return start
    raise ValueError(f"invalid SWA start {start!r} (a fraction in (0, 1) or an int step index)")


def _swa_due(start: float | int, train_s: float, epoch_s: float, seconds: float, steps: int) -> bool:
    """Under a time budget, whether averaging starts after this epoch: a fraction ``start`` once
    the training time passes ``start`` x the budget, or earlier when the next epoch (as long as the
    last one) should end past the budget, so at least one epoch is averaged; an int ``start`` once
    that many steps have run."""
    if isinstance(start, float):
        return train_s >= start * seconds or train_s + epoch_s >= seconds
    return steps >= start


def _lets_options(value: Any, info: Any) -> dict[str, Any] | None:
    """The LETS options of ``hparams["lets"]`` (``None``: no LETS; ``True`` or ``{}``: defaults),
    checked against the optimizer it would wrap."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise ValueError(f"hparams['lets'] must be a dict of LETS options or true, got {value!r}")
    if info.family == "base" or info.averaging:
        raise ValueError(
            f"LETS wraps a SAM-family optimizer without averaging, not {info.name!r} "
            "(use e.g. sam_sgd, msam_sgd or esam_sgd)"
        )
    return dict(value)


def _val_closure(task: Task, model: torch.nn.Module, device: torch.device, seed: int
                 ) -> Callable[[], Tensor]:
    """LETS's validation closure: the loss of the next validation batch (the split is cycled,
    reshuffled with a generator seeded ``seed`` at each pass), with its backward."""
    gen = torch.Generator().manual_seed(seed)
    batches: Iterator[Any] = iter(())

    def next_batch() -> Any:
        nonlocal batches
        for _ in range(2):
            try:
                return next(batches)
            except StopIteration:
                batches = iter(task.val_batches(gen))
        raise RuntimeError(f"task {task.name!r} has an empty validation split")

    def val_closure() -> Tensor:
        model.zero_grad(set_to_none=True)
        loss = task.loss(model, _to_device(next_batch(), device))
        loss.backward()
        return loss

    return val_closure


def _sharpness_batches(task: Task, device: torch.device) -> list[Any]:
    """The fixed training batches of the sharpness measurement (:data:`SHARPNESS_SAMPLES`)."""
    batches, n = [], 0
    for batch in task.train_batches(torch.Generator().manual_seed(0)):
        batches.append(_to_device(batch, device))
        n += _batch_len(batch)
        if n >= SHARPNESS_SAMPLES:
            break
    return batches


def _final_sharpness(task: Task, model: torch.nn.Module, opt: Any, device: torch.device, seed: int
                     ) -> dict[str, Any]:
    """``{"sharpness": top Hessian eigenvalue, "sharpness_info": {...}}`` of the final model (the
    averaged weights of an SWA run, with their recomputed BN statistics)."""
    from ..sharpness import hessian_eigenvalues

    t0 = time.perf_counter()
    batches = _sharpness_batches(task, device)

    def measure() -> tuple[Any, Any]:
        return hessian_eigenvalues(
            model, task.loss, batches, k=1, seed=0, mode="eval", tol=SHARPNESS_TOL,
            max_iter=SHARPNESS_MAX_ITER, return_info=True,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a non-converged value is reported in the info
        if isinstance(opt, SWA) and opt.n_averaged > 0:
            train = (_to_device(b, device) for b in
                     task.train_batches(torch.Generator().manual_seed(seed)))
            opt.update_bn(train, lambda m, b: task.loss(m, b))
            with opt.swapped():
                values, info = measure()
        else:
            values, info = measure()
    return {
        "sharpness": float(values[0]),
        "sharpness_info": {
            "measure": "hessian_top_eigenvalue", "mode": "eval",
            "samples": sum(_batch_len(b) for b in batches), "matvecs": int(info.matvecs),
            "converged": bool(info.converged), "averaged": isinstance(opt, SWA) and opt.n_averaged > 0,
            "seconds": time.perf_counter() - t0,
        },
    }


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "n/a"


# ----------------------------------------------------------------------------- one run
def run_one(
    spec: RunSpec,
    *,
    store: Store | None = None,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
    prefix: str = "",
    sharpness: bool = True,
) -> RunRecord:
    """Train one run and return its record (also written to ``store`` when given, once finished).

    Args:
        spec: the run.
        store: where the finished record is put (``Store.put``: a key already stored is kept).
        progress: called with one line of text per epoch (``"digits-mlp sam_sgd seed 1: epoch
            4/10 loss 0.1234 val accuracy 0.9500 test accuracy 0.9400"``).
        device: where to train (default CPU); the task's tensors and every batch are moved there.
        threads: ``torch.set_num_threads`` for the run (restored after); ``None`` keeps it.
        prefix: put before every progress line (the sweep's ``"[3/40] "``).
        sharpness: measure the final model's top Hessian eigenvalue into ``extra["sharpness"]``
            (see the module docstring; skipped for a diverged run).

    Raises ``KeyError`` for an unknown task or optimizer, :class:`TaskUnavailable` when the task's
    data is missing. Nothing is stored when the run raises or is interrupted.
    """
    info = optimizer_info(spec.optimizer)
    task_cls = _task_class(spec.task)
    why = task_cls.availability()
    if why is not None:
        raise TaskUnavailable(f"{spec.task}: {why}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    say = progress or (lambda line: None)
    started_at = time.time()
    t_total = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rng_devices = [dev.index] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            task = task_cls(size=spec.size, data_seed=spec.data_seed, label_noise=spec.label_noise)
            _task_to(task, dev)
            meter = _MemoryMeter(dev)
            meter.start()
            torch.manual_seed(spec.seed)
            model = task.make_model().to(dev)
            spe = int(task.steps_per_epoch())
            kwargs = optimizer_kwargs(task, info.name, spec.hparams)
            extra: dict[str, Any] = {}
            lets_opts = _lets_options(kwargs.pop("lets", None), info)
            swa_pending: dict[str, Any] | None = None  # time budget: wrap once averaging is due
            if info.averaging:
                start = kwargs.pop("start", DEFAULT_SWA_START)
                every = kwargs.pop("every", -(-spe // SWA_AVERAGES_PER_EPOCH))
                if spec.epochs is not None:
                    kwargs.pop("total_steps", None)
                    start_step = _swa_start_step(start, spec.epochs, spe)
                    kwargs.update(start=start_step, every=every, total_steps=spec.epochs * spe)
                    extra["swa"] = {"start_step": start_step, "every": every}
                    opt = create(info.name, model.parameters(), model=model, **kwargs)
                else:
                    swa_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in SWA_OPTIONS}
                    swa_kw.pop("total_steps", None)
                    _swa_start_step(start, 1, spe)  # validates it
                    swa_pending = {"start": start, "every": every, **swa_kw}
                    opt = create(info.name[: -len("+swa")], model.parameters(), **kwargs)
                    kwargs.update(start=start, every=every, **swa_kw)
            else:
                opt = create(info.name, model.parameters(), **kwargs)
            step_info = info
            if lets_opts is not None:
                opt = LETS(opt, _val_closure(task, model, dev, spec.seed + 1), **lets_opts)
                extra["lets"] = dict(lets_opts)
                if lets_opts.get("estimator") == "exact":  # needs the per-sample training closure
                    step_info = dataclasses.replace(info, per_sample=True)

            current: dict[str, Any] = {}

            def closure() -> Tensor:
                model.zero_grad(set_to_none=True)
                loss = task.loss(model, current["batch"])
                loss.backward()
                return loss

            def sample_closure(select: Tensor | None = None) -> Tensor:
                batch = current["batch"]
                if select is not None:
                    batch = task.select(batch, select)
                return task.sample_losses(model, batch)

            per_sample = sample_closure if task.per_sample else None
            silence = info.per_sample and not task.per_sample
            if silence:
                # ESAM on a loss that does not split per sample (e.g. contrastive): said once in
                # the record instead of a warning per run
                extra["data_selection"] = "off: the task has no per-sample losses"

            @contextlib.contextmanager
            def quiet_step() -> Iterator[None]:
                if not silence:
                    yield
                    return
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="ESAM got a standard closure")
                    yield

            def evaluate() -> tuple[dict[str, float], dict[str, float], bool]:
                with torch.random.fork_rng(devices=rng_devices):
                    if isinstance(opt, SWA) and opt.n_averaged > 0:
                        batches = (_to_device(b, dev) for b in
                                   task.train_batches(torch.Generator().manual_seed(spec.seed)))
                        opt.update_bn(batches, lambda m, b: task.loss(m, b))
                        with opt.swapped():
                            return task.evaluate(model, "val"), task.evaluate(model, "test"), True
                    return task.evaluate(model, "val"), task.evaluate(model, "test"), False

            gen = torch.Generator().manual_seed(spec.seed)
            sync = dev.type == "cuda"
            step_ns: list[int] = []
            epochs: list[EpochRecord] = []
            history: list[dict[str, float]] = []
            train_s = 0.0
            model.train()
            target = spec.epochs
            while True:
                epoch = len(epochs) + 1
                losses: list[Tensor] = []
                sizes: list[int] = []
                t_epoch = time.perf_counter()
                diverged = None
                try:
                    for batch in task.train_batches(gen):
                        current["batch"] = _to_device(batch, dev)
                        t0 = time.perf_counter_ns()
                        with quiet_step():
                            loss = optimizer_step(opt, step_info, closure, per_sample)
                        if sync:
                            torch.cuda.synchronize(dev)
                        step_ns.append(time.perf_counter_ns() - t0)
                        losses.append(torch.as_tensor(loss).detach().float().mean())
                        sizes.append(_batch_len(current["batch"]))
                except FloatingPointError as exc:
                    diverged = str(exc)
                epoch_s = time.perf_counter() - t_epoch
                train_s += epoch_s
                current.clear()
                if diverged is not None and not losses:
                    extra["diverged"] = diverged
                    break
                n = max(1, sum(sizes))
                train_loss = float(sum(float(v) * k for v, k in zip(losses, sizes)) / n)
                if diverged is None and not math.isfinite(train_loss):
                    diverged = f"non-finite training loss {train_loss} in epoch {epoch}"
                val, test, averaged = evaluate()
                epochs.append(EpochRecord(
                    epoch=epoch, steps=len(step_ns), train_seconds=train_s, train_loss=train_loss,
                    val=dict(val), test=dict(test), averaged=averaged,
                    elapsed_seconds=time.perf_counter() - t_total,
                ))
                history.append(_stats_snapshot(opt))
                if target is not None:
                    where = f"epoch {epoch}/{target}"
                else:
                    where = f"epoch {epoch} ({train_s:.1f}/{spec.seconds:g} s)"
                say(
                    f"{prefix}{spec.describe()}: {where} loss {train_loss:.4f} "
                    f"val {task.metric} {_fmt(val.get(task.metric))} "
                    f"test {task.metric} {_fmt(test.get(task.metric))}"
                    + (" (averaged)" if averaged else "")
                )
                if diverged is not None:
                    extra["diverged"] = diverged
                    break
                if target is not None and epoch >= target:
                    break
                if target is None and train_s >= spec.seconds:
                    break
                if swa_pending is not None and _swa_due(
                    swa_pending["start"], train_s, epoch_s, spec.seconds, len(step_ns)
                ):
                    sw = dict(swa_pending)
                    del sw["start"]
                    opt = SWA(opt, model, start=0, **sw)  # averages every `every` steps from now
                    extra["swa"] = {"start_step": len(step_ns), "start_epoch": epoch + 1,
                                    "every": sw["every"]}
                    swa_pending = None
            peak = meter.stop()
            if sharpness and epochs and "diverged" not in extra:
                with torch.random.fork_rng(devices=rng_devices):
                    extra.update(_final_sharpness(task, model, opt, dev, spec.seed))
    finally:
        torch.set_num_threads(old_threads)

    metric = task.metric
    if epochs:
        best = select_best_epoch([e.val.get(metric, math.nan) for e in epochs])
        best_val, best_test = dict(epochs[best].val), dict(epochs[best].test)
        final_val, final_test = dict(epochs[-1].val), dict(epochs[-1].test)
    else:
        best, best_val, best_test, final_val, final_test = -1, {}, {}, {}, {}
    if not any(history):
        history = []
    record = RunRecord(
        spec=spec,
        metric=metric,
        epochs=epochs,
        best_epoch=best + 1,
        final_val=final_val,
        final_test=final_test,
        best_val=best_val,
        best_test=best_test,
        steps=len(step_ns),
        ms_per_step=sum(step_ns) / 1e6 / len(step_ns) if step_ns else math.nan,
        ms_per_step_median=statistics.median(step_ns) / 1e6 if step_ns else math.nan,
        train_seconds=train_s,
        total_seconds=time.perf_counter() - t_total,
        peak_memory_bytes=peak,
        base_memory_bytes=meter.base,
        memory_method=meter.method,
        stats_history=history,
        optimizer_kwargs=_jsonable(kwargs),
        device=str(dev),
        threads=threads if threads is not None else old_threads,
        torch_version=torch.__version__,
        started_at=started_at,
        finished_at=time.time(),
        extra=extra,
    )
    if store is not None:
        store.put(record)
    return record


# ----------------------------------------------------------------------------- sweeps
@dataclass
class SweepResult:
    """What :func:`run_sweep` did, by run key."""

    records: list[RunRecord] = field(default_factory=list)  #: one per distinct spec, in order
    ran: list[str] = field(default_factory=list)  #: keys trained now
    skipped: list[str] = field(default_factory=list)  #: keys found in the store
    unavailable: dict[str, str] = field(default_factory=dict)  #: key -> why the task cannot run
    failed: dict[str, str] = field(default_factory=dict)  #: key -> error (``errors="skip"``)


class TextProgress:
    """A progress callback printing to ``stream`` (default: stderr), flushed.

    Line mode (the default when the stream is not a terminal, e.g. a CI log): every line as it
    comes; with ``epochs=False`` the per-epoch lines are dropped and only per-run lines are shown.

    Bar mode (``bar=True``; the default on a terminal): the per-run lines (done, skipped, failed)
    are printed and, below them, one status line redrawn in place with two bars: runs finished of
    the sweep, and epochs of the run in progress, e.g.
    ``runs [#####.....]  45/224 | mfeat-clip sam_sgd seed 0 [###.......] epoch 7/20``.
    The lines are those :func:`run_sweep` and :func:`run_one` emit (``"[i/N] what: ..."``).
    """

    _LINE = re.compile(r"\[(\d+)/(\d+)\] (.*?): (epoch (\d+)(?:/(\d+))?|.*)")

    def __init__(self, stream: TextIO | None = None, *, epochs: bool = True, bar: bool | None = None,
                 width: int = 10) -> None:
        self.stream = stream
        self.epochs = epochs
        out = stream if stream is not None else sys.stderr
        self.bar = bool(bar) if bar is not None else bool(getattr(out, "isatty", lambda: False)())
        self.width = width
        self.finished = 0
        self.total = 0
        self._status = ""

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _meter(self, done: int, total: int) -> str:
        filled = min(self.width, round(self.width * done / total)) if total > 0 else 0
        return "[" + "#" * filled + "." * (self.width - filled) + "]"

    def __call__(self, line: str) -> None:
        if not self.bar:
            if not self.epochs and ": epoch " in line:
                return
            print(line, file=self._out(), flush=True)
            return
        out = self._out()
        m = self._LINE.match(line)
        if m is None:  # not a sweep line: print it above the status line
            print("\r\033[K" + line, file=out)
            print(self._status, end="", file=out, flush=True)
            return
        self.total = int(m.group(2))
        if m.group(5) is not None:  # an epoch of the run in progress
            epoch, of = int(m.group(5)), m.group(6)
            run = (f"{self._meter(epoch, int(of))} epoch {epoch}/{of}" if of is not None
                   else f"epoch {epoch}")
            self._status = (f"runs {self._meter(self.finished, self.total)} "
                            f"{self.finished:>{len(str(self.total))}}/{self.total} | {m.group(3)} {run}")
        else:  # the run ended (done, skipped, unavailable, failed)
            self.finished += 1
            self._status = (f"runs {self._meter(self.finished, self.total)} "
                            f"{self.finished}/{self.total}")
            print("\r\033[K" + line, file=out)
        print("\r\033[K" + self._status, end="", file=out, flush=True)
        if self.finished >= self.total:
            print(file=out, flush=True)


def _dedupe(specs: Iterable[RunSpec]) -> Iterator[tuple[str, RunSpec]]:
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, RunSpec):
            raise TypeError(f"run_sweep takes RunSpec objects, got {type(spec).__name__}")
        key = spec.key
        if key not in seen:
            seen.add(key)
            yield key, spec


def run_sweep(
    specs: Iterable[RunSpec],
    store: Store,
    *,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
    errors: str = "raise",
    jobs: int = 1,
    sharpness: bool = True,
) -> SweepResult:
    """Run every spec whose key ``store`` does not hold yet, putting each record as it finishes.

    Specs with the same key run once. A key already stored (by an earlier, interrupted sweep, or
    by another process sharing the database) is skipped and its stored record returned, so
    re-running an interrupted sweep computes only what is missing. A task whose data is missing
    (:class:`TaskUnavailable`) is skipped with a message. Another exception stops the sweep
    (``errors="raise"``) or is reported and skipped (``errors="skip"``; not stored, so retried on
    the next sweep).

    ``jobs > 1`` trains that many runs at a time in worker processes (``spawn``ed, each writing
    its finished records to the same database file; ``threads`` defaults to the CPU count divided
    by ``jobs``). Records come back in the order of ``specs`` either way; with ``errors="raise"`` the
    first failure cancels the runs not started and raises ``RuntimeError`` with the worker's error.

    ``progress`` gets lines such as ``"[3/40] digits-mlp sam_sgd seed 1: epoch 4/10 ..."`` and
    ``"[3/40] digits-mlp sam_sgd seed 1: done, test accuracy 0.9600 at epoch 9 (12.3 s)"`` (with
    ``jobs > 1`` the per-epoch lines are printed to stderr by the workers, and only when
    ``progress`` is a :class:`TextProgress` with ``epochs=True``).
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"invalid errors={errors!r} (must be 'raise' or 'skip')")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"invalid jobs: {jobs!r} (must be an int >= 1)")
    if jobs > 1 and str(store.path) == ":memory:":
        raise ValueError("jobs > 1 needs a database file that the worker processes can open, not ':memory:'")
    todo = list(_dedupe(specs))
    say = progress or (lambda line: None)
    result = SweepResult()
    unavailable: dict[str, str] = {}
    done: dict[str, RunRecord] = {}
    total = len(todo)
    pending: list[tuple[str, str, RunSpec]] = []
    for i, (key, spec) in enumerate(todo, 1):
        prefix = f"[{i}/{total}] "
        stored = store.get(key)
        if stored is not None:
            result.skipped.append(key)
            done[key] = stored
            say(f"{prefix}{spec.describe()}: already done, skipped")
            continue
        why = unavailable.get(spec.task)
        if why is None and spec.task in TASKS:
            reason = TASKS[spec.task].availability()
            if reason is not None:
                why = unavailable[spec.task] = f"{spec.task}: {reason}"
                say(f"{prefix}{spec.describe()}: unavailable ({why}), skipped")
        elif why is not None:
            say(f"{prefix}{spec.describe()}: unavailable, skipped")
        if why is not None:
            result.unavailable[key] = why
            continue
        pending.append((key, prefix, spec))

    def finished(key: str, prefix: str, spec: RunSpec, record: RunRecord) -> None:
        result.ran.append(key)
        done[key] = record
        note = f", diverged: {record.extra['diverged']}" if "diverged" in record.extra else ""
        say(
            f"{prefix}{spec.describe()}: done, test {record.metric} {_fmt(record.test_at_best)} "
            f"at epoch {record.best_epoch}/{record.epochs_run}, {record.ms_per_step:.3f} ms/step "
            f"({record.total_seconds:.1f} s){note}"
        )

    def failed(key: str, prefix: str, spec: RunSpec, error: str) -> None:
        result.failed[key] = error
        say(f"{prefix}{spec.describe()}: failed ({error})")

    if jobs == 1 or len(pending) <= 1:
        for key, prefix, spec in pending:
            if spec.task in unavailable:
                result.unavailable[key] = unavailable[spec.task]
                say(f"{prefix}{spec.describe()}: unavailable, skipped")
                continue
            try:
                record = run_one(spec, store=store, progress=say, device=device, threads=threads,
                                 prefix=prefix, sharpness=sharpness)
            except TaskUnavailable as exc:
                unavailable[spec.task] = result.unavailable[key] = str(exc)
                say(f"{prefix}{spec.describe()}: unavailable ({exc}), skipped")
                continue
            except Exception as exc:
                if errors == "raise":
                    raise
                failed(key, prefix, spec, f"{type(exc).__name__}: {exc}")
                continue
            finished(key, prefix, spec, record)
    else:
        _parallel(pending, store, jobs, device, threads, progress, sharpness, errors,
                  finished, failed, result, unavailable, say)
    result.records = [done[k] for k, _ in todo if k in done]
    return result


def _parallel(pending: list[tuple[str, str, RunSpec]], store: Store, jobs: int, device: Any,
              threads: int | None, progress: Progress | None, sharpness: bool, errors: str,
              finished: Callable[..., None], failed: Callable[..., None], result: SweepResult,
              unavailable: dict[str, str], say: Progress) -> None:
    """The ``jobs > 1`` part of :func:`run_sweep`."""
    import concurrent.futures as cf
    import multiprocessing

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    # workers print their epoch lines themselves, only in line mode (a bar is the parent's)
    epoch_lines = isinstance(progress, TextProgress) and progress.epochs and not progress.bar
    dev = None if device is None else str(device)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads run
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    futures = {
        pool.submit(_pool_run, spec.to_dict(), str(store.path), dev, threads, prefix, epoch_lines,
                    sharpness): (key, prefix, spec)
        for key, prefix, spec in pending
    }
    try:
        for fut in cf.as_completed(futures):
            key, prefix, spec = futures[fut]
            try:
                status, message = fut.result()
            except cf.CancelledError:
                continue
            except Exception as exc:  # the worker died (e.g. killed for memory)
                status, message = "failed", f"{type(exc).__name__}: {exc}"
            if status == "ok":
                record = store.get(key)
                if record is None:
                    status, message = "failed", "the worker finished but its record is not in the database"
                else:
                    finished(key, prefix, spec, record)
                    continue
            if status == "unavailable":
                unavailable[spec.task] = result.unavailable[key] = str(message)
                say(f"{prefix}{spec.describe()}: unavailable ({message}), skipped")
                continue
            failed(key, prefix, spec, str(message))
            if errors == "raise":
                raise RuntimeError(f"{spec.describe()}: {message}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool_run(spec: dict[str, Any], db: str, device: str | None, threads: int, prefix: str,
              epoch_lines: bool, sharpness: bool) -> tuple[str, str | None]:
    """One run in a worker process of a parallel sweep: ``("ok", None)``, ``("unavailable", why)``
    or ``("failed", error)``; the record goes to the database ``db``."""
    run_spec = RunSpec.from_dict(spec)
    progress = TextProgress(epochs=True) if epoch_lines else None
    try:
        with Store(db) as store:
            run_one(run_spec, store=store, progress=progress, device=device, threads=threads,
                    prefix=prefix, sharpness=sharpness)
    except TaskUnavailable as exc:
        return "unavailable", str(exc)
    except Exception as exc:
        return "failed", f"{type(exc).__name__}: {exc}"
    return "ok", None
