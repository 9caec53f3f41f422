"""Command line.

* ``flatminima bench``: the quick digits benchmark (one MLP, several optimizers, a table);
* ``flatminima bench --suite quick|full``: the multi-task suite, run as a resumable sweep over a
  SQLite store (runs already stored are not recomputed), then its summary table and win matrix;
* ``flatminima report``: ``report.md`` and PNG plots from that store;
* ``flatminima tasks``: the benchmark tasks and whether their data is available;
* ``flatminima sharpness``: sharpness of a model saved by ``flatminima bench --save-models``;
* ``flatminima list``: the optimizer registry.

Exit codes: 0 on success, 1 when a suite run failed, 2 on bad arguments (unknown optimizer or task
name, malformed list, options of the other ``bench`` mode, missing or invalid checkpoint or
database, ...), 130 when a sweep is interrupted (its finished runs stay stored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


class _UsageError(Exception):
    """A bad argument found after parsing (reported with exit code 2)."""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be comma-separated integers, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("at least one seed is needed")
    return seeds


def _number(kind: type, check: Callable[[float], bool], requirement: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses ``kind`` and checks it, naming the bad value."""

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not check(v):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {v}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, ">= 1")
_nonnegative_int = _number(int, lambda v: v >= 0, ">= 0")
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


_DIGITS_LR = 0.05
_DIGITS_BATCH_SIZE = 64
#: ``bench`` options that only apply to the suite / only to the digits job: (attribute, flag).
_SUITE_ONLY = (("tasks", "--tasks"), ("budget", "--budget"), ("size", "--size"), ("db", "--db"),
               ("studies", "--studies"), ("jobs", "--jobs"))
_DIGITS_SEEDS = [0, 1]
_DIGITS_ONLY = (
    ("epochs", "--epochs"), ("lr", "--lr"), ("batch_size", "--batch-size"),
    ("save_models", "--save-models"),
)


def _budget(text: str) -> str:
    """An argparse ``type=`` for ``--budget``: checked with :func:`parse_budget`, kept as text (a
    ``quick`` / ``full`` budget depends on the task)."""
    from .bench.runner import parse_budget

    value = text.strip().lower()
    if value in ("quick", "full"):
        return value
    try:
        parse_budget(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``flatminima`` argument parser (subcommands ``bench``, ``report``, ``tasks``,
    ``sharpness`` and ``list``)."""
    from .bench.quick import DEFAULT_EPOCHS, DEFAULT_OPTIMIZERS

    parser = argparse.ArgumentParser(
        prog="flatminima",
        description=(
            "Flat-minima optimizers for PyTorch: benchmarks (the quick digits job and the "
            "multi-task suite with its report), sharpness of saved models and the optimizer registry."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser(
        "bench",
        help="benchmark optimizers: the quick digits job, or the multi-task suite with --suite",
        description=(
            "Without --suite: train a 64-128-128-10 MLP on scikit-learn's digits (bundled; "
            "60/20/20 stratified split) once per optimizer and seed, then print a Markdown table of "
            "test and validation accuracy, final training loss and time per optimizer step "
            "(mean ± std over seeds). "
            "With --suite quick|full: run every task (see `flatminima tasks`; tasks whose data is "
            "missing are reported and skipped) x optimizer x seed as a resumable sweep over a "
            "SQLite database: each run is stored when it finishes, runs already stored are not "
            "recomputed (rerun the same command to resume an interrupted sweep), a run that fails "
            "is reported and skipped (exit code 1). Then print the summary table (test metric at "
            "the validation-chosen epoch, mean ± std over seeds, time per step, peak memory) and "
            "the win matrix; `flatminima report` writes them with plots. "
            "Progress lines go to stderr."
        ),
    )
    suite_opts = bench.add_argument_group("suite (with --suite only)")
    digits = bench.add_argument_group("digits job (without --suite only)")
    bench.add_argument(
        "--suite", choices=("quick", "full"), default=None,
        help="run the multi-task suite; quick/full sets each task's data size and epoch budget "
        "(default: the digits job)",
    )
    bench.add_argument(
        "--optimizers", type=_csv, default=None, metavar="LIST",
        help=f"comma-separated registry names (default: {','.join(DEFAULT_OPTIMIZERS)}; see "
        "`flatminima list`); with --suite, replaces the suite's studies by these optimizers on "
        "its tasks (a SAM-family name followed by +lets wraps it in LETS)",
    )
    bench.add_argument(
        "--seeds", type=_seeds, default=None, metavar="LIST",
        help="comma-separated training seeds, e.g. 0,1,2 (default: 0,1; with --suite: the suite's)",
    )
    bench.add_argument(
        "--label-noise", type=_fraction, default=None, metavar="FRACTION",
        help="fraction of training labels flipped to another class (default: 0; the suite needs < 1; "
        "with --suite, replaces the suite's studies like --optimizers)",
    )
    bench.add_argument(
        "--threads", type=_positive_int, default=1,
        help="torch intra-op threads during training (default: %(default)s)",
    )
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bench.add_argument(
        "--json", type=Path, default=None, metavar="PATH",
        help="also write the configuration, every run and the summary to this JSON file",
    )
    suite_opts.add_argument(
        "--tasks", type=_csv, default=None, metavar="LIST",
        help="comma-separated task names (default: every task whose data is available; see "
        "`flatminima tasks`)",
    )
    suite_opts.add_argument(
        "--budget", type=_budget, default=None, metavar="B",
        help="per run: epochs ('10'), training time ('30s', '5m', '1h'; stops at the first epoch "
        "end past it), or 'quick' / 'full' epochs of each task (default: the suite's)",
    )
    suite_opts.add_argument(
        "--size", choices=("tiny", "quick", "full"), default=None,
        help="data size passed to the tasks (default: the suite's)",
    )
    suite_opts.add_argument(
        "--studies", type=_csv, default=None, metavar="LIST",
        help="run only these studies of the suite (main, noise, rho, lets, time; full also noise40; "
        "default: all)",
    )
    suite_opts.add_argument(
        "--jobs", type=_positive_int, default=None,
        help="runs trained at a time, in worker processes sharing the database (default: 1); "
        "--threads applies to each",
    )
    suite_opts.add_argument(
        "--db", type=Path, default=None, metavar="PATH",
        help="SQLite database of finished runs (default: $FLATMINIMA_BENCH_DB or "
        "./flatminima-bench.sqlite)",
    )
    digits.add_argument(
        "--epochs", type=_positive_int, default=None,
        help=f"epochs per run (default: {DEFAULT_EPOCHS})",
    )
    digits.add_argument(
        "--lr", type=_positive_float, default=None, help=f"learning rate (default: {_DIGITS_LR})"
    )
    digits.add_argument(
        "--batch-size", type=_positive_int, default=None,
        help=f"minibatch size (default: {_DIGITS_BATCH_SIZE})",
    )
    digits.add_argument(
        "--save-models", type=Path, default=None, metavar="DIR",
        help="write each run's final model to DIR/<optimizer>-seed<seed>.pt "
        "(input of `flatminima sharpness`)",
    )

    report = sub.add_parser(
        "report",
        help="write report.md and plots from the suite's database",
        description=(
            "Read the finished runs of `flatminima bench --suite` from the database and write "
            "DIR/report.md (summary table, win matrix, diverged runs, list of runs) and PNG plots "
            "next to it (test metric vs training time per setting, vs rho where an optimizer ran "
            "with several; needs matplotlib, else skipped with a note), then print the summary "
            "table and the report's path."
        ),
    )
    report.add_argument(
        "--db", type=Path, default=None, metavar="PATH",
        help="SQLite database of finished runs (default: $FLATMINIMA_BENCH_DB or "
        "./flatminima-bench.sqlite)",
    )
    report.add_argument(
        "--out", type=Path, default=Path("report"), metavar="DIR",
        help="output folder (default: report/)",
    )
    report.add_argument(
        "--tasks", type=_csv, default=None, metavar="LIST",
        help="only the runs of these comma-separated tasks (default: all)",
    )
    report.add_argument("--no-plots", action="store_true", help="write report.md without plots")

    sub.add_parser(
        "tasks",
        help="list the benchmark tasks and whether their data is available",
        description=(
            "List the registered benchmark tasks: name, domain, primary metric, epochs of the "
            "quick and full suites, and 'available' or how to get the missing data."
        ),
    )

    sharp = sub.add_parser(
        "sharpness",
        help="sharpness of a saved digits model (loss, worst-case sharpness, Hessian, 1-D slice)",
        description=(
            "Load a model saved by `flatminima bench --save-models DIR` and measure, on the first "
            "N minibatches of 128 rows of its training split (labels as trained on, label noise "
            "included), in float64 and without changing the model: the training loss (mean over "
            "the batches of the batch mean), the first-order worst-case sharpness "
            "L(w + rho g/|g|) - L(w), the top Hessian eigenvalue and the Hessian trace; with "
            "--plot, a 1-D loss slice in a random filter-normalized direction as a PNG."
        ),
    )
    sharp.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .pt file")
    sharp.add_argument(
        "--rho", type=_positive_float, default=0.05,
        help="radius of the worst-case sharpness (default: %(default)s)",
    )
    sharp.add_argument(
        "--batches", type=_positive_int, default=None, metavar="N",
        help="use the first N batches of 128 training rows (default: all of them)",
    )
    sharp.add_argument(
        "--seed", type=_nonnegative_int, default=0,
        help="seed of the random directions and probes (default: %(default)s)",
    )
    sharp.add_argument(
        "--mode", choices=("eval", "train"), default="eval",
        help="evaluate the model in eval or train mode (BatchNorm / dropout; default: %(default)s)",
    )
    sharp.add_argument(
        "--plot", type=Path, default=None, metavar="DIR",
        help="write a 1-D loss slice to DIR/<checkpoint name>-slice1d.png (needs matplotlib)",
    )
    sharp.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the numbers to this JSON file"
    )

    sub.add_parser("list", help="list the registered optimizers")
    return parser


def _cmd_list() -> int:
    from . import list_optimizers

    infos = list_optimizers(with_info=True)
    width = max(len(i.name) for i in infos)
    print(f"{'name':<{width}}  passes  closure  description")
    for info in infos:
        closure = "yes" if info.needs_closure else "no"
        print(f"{info.name:<{width}}  {info.passes:>6}  {closure:>7}  {info.description}")
    return 0


def _jsonable(value: Any) -> Any:
    """NaN/inf become None so that the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _check_optimizers(names: Sequence[str]) -> list[str]:
    """The canonical registry names of ``--optimizers``; :class:`_UsageError` for an empty list,
    an unknown name or a name given twice."""
    from . import optimizer_info

    if not names:
        raise _UsageError("--optimizers: no optimizer names given")
    for name in names:
        try:
            optimizer_info(name)
        except KeyError as exc:
            raise _UsageError(f"--optimizers: {exc.args[0]} (see `flatminima list`)") from None
    canonical = [optimizer_info(n).name for n in names]
    repeated = sorted({n for n in canonical if canonical.count(n) > 1})
    if repeated:
        raise _UsageError(f"--optimizers: each name once, got {', '.join(repeated)} more than once")
    return canonical


def _suite_optimizers(names: Sequence[str]) -> list[Any]:
    """``--optimizers`` of a suite: registry names, and ``X+lets`` for a SAM-family ``X`` (LETS
    with its defaults around ``X``, as the entry ``("X+lets", "X", {"lets": {}})``)."""
    from . import optimizer_info

    plain = [n[: -len("+lets")] if n.endswith("+lets") else n for n in names]
    canonical = _check_optimizers(plain)
    out: list[Any] = []
    for given, name in zip(names, canonical):
        if not given.endswith("+lets"):
            out.append(name)
            continue
        info = optimizer_info(name)
        if info.family == "base" or info.averaging:
            raise _UsageError(
                f"--optimizers: {given}: LETS wraps a SAM-family optimizer without averaging "
                "(e.g. sam_sgd+lets, msam_sgd+lets)"
            )
        out.append((f"{name}+lets", name, {"lets": {}}))
    labels = [e if isinstance(e, str) else e[0] for e in out]
    repeated = sorted({n for n in labels if labels.count(n) > 1})
    if repeated:
        raise _UsageError(f"--optimizers: each name once, got {', '.join(repeated)} more than once")
    return out


def _given(args: argparse.Namespace, options: Sequence[tuple[str, str]]) -> list[str]:
    """The flags among ``options`` that were given (their value is not ``None``)."""
    return [flag for attr, flag in options if getattr(args, attr) is not None]


def _availability(cls: Any) -> str | None:
    """``cls.availability()``, an exception in it reported as the reason."""
    try:
        return cls.availability()
    except Exception as exc:  # a broken check must not hide the other tasks
        return f"availability check failed ({type(exc).__name__}: {exc})"


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.suite is not None:
        return _cmd_bench_suite(args)
    import torch

    from . import __version__
    from .bench.quick import DEFAULT_EPOCHS, DEFAULT_OPTIMIZERS, format_table, run_quick, summarize

    wrong = _given(args, _SUITE_ONLY)
    if wrong:
        raise _UsageError(
            f"{', '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} to the multi-task "
            "suite: add --suite quick or --suite full"
        )
    if args.optimizers is None:
        args.optimizers = list(DEFAULT_OPTIMIZERS)
    if args.seeds is None:
        args.seeds = list(_DIGITS_SEEDS)
    if args.label_noise is None:
        args.label_noise = 0.0
    _check_optimizers(args.optimizers)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    if args.lr is None:
        args.lr = _DIGITS_LR
    if args.batch_size is None:
        args.batch_size = _DIGITS_BATCH_SIZE

    t0 = time.perf_counter()
    results = run_quick(
        optimizers=args.optimizers, epochs=args.epochs, seeds=args.seeds,
        batch_size=args.batch_size, lr=args.lr, label_noise=args.label_noise,
        progress=not args.quiet, threads=args.threads, save_models=args.save_models,
    )
    wall = time.perf_counter() - t0
    print(
        f"digits MLP 64-128-128-10, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
        f"momentum 0.9, weight decay 5e-4, label noise {args.label_noise:g}, "
        f"seeds {','.join(map(str, args.seeds))} (torch {torch.__version__}, "
        f"{args.threads} thread{'s' if args.threads > 1 else ''})"
    )
    print()
    print(format_table(results))
    print()
    print(f"total {wall:.1f} s")
    if args.json is not None:
        payload = {
            "flatminima": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "config": {
                "task": "digits",
                "optimizers": args.optimizers,
                "epochs": args.epochs,
                "seeds": args.seeds,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "label_noise": args.label_noise,
            },
            "wall_seconds": wall,
            "summary": summarize(results),
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0



def _suite_tasks(names: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The tasks of a suite that can run, and the unavailable ones with the reason: ``names``
    (``None``: every registered task); :class:`_UsageError` for an unknown or repeated name."""
    from .bench.tasks import TASKS

    if names is None:
        names = list(TASKS)
    else:
        if not names:
            raise _UsageError("--tasks: no task names given")
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise _UsageError(
                f"--tasks: unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                f" (registered: {', '.join(TASKS)}; see `flatminima tasks`)"
            )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise _UsageError(f"--tasks: each name once, got {', '.join(repeated)} more than once")
    ready: list[str] = []
    unavailable: dict[str, str] = {}
    for name in names:
        why = _availability(TASKS[name])
        if why is None:
            ready.append(name)
        else:
            unavailable[name] = why
    return ready, unavailable


def _cmd_bench_suite(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .bench.report import claims, format_claims, format_summary, summary_table, win_matrix
    from .bench.runner import DEFAULT_SUITE_OPTIMIZERS, TextProgress, make_specs, run_sweep
    from .bench.store import Store, default_db_path
    from .bench.suites import SUITES, suite_specs

    wrong = _given(args, _DIGITS_ONLY)
    if wrong:
        raise _UsageError(
            f"{', '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} to the digits job "
            "(without --suite); the suite takes each task's own settings"
        )
    custom = args.optimizers is not None or args.label_noise is not None
    if custom and args.studies is not None:
        raise _UsageError("--studies selects the suite's own studies; it cannot be combined with "
                          "--optimizers or --label-noise (which replace them)")
    label_noise = 0.0 if args.label_noise is None else args.label_noise
    if label_noise >= 1.0:
        raise _UsageError(f"--label-noise: the suite's tasks need a fraction < 1, got {label_noise:g}")
    suite = SUITES[args.suite]
    seeds = list(suite.seeds) if args.seeds is None else args.seeds
    tasks, unavailable = _suite_tasks(args.tasks)
    try:
        if custom:
            entries = _suite_optimizers(args.optimizers or [n for n in DEFAULT_SUITE_OPTIMIZERS])
            specs = make_specs(
                tasks, entries, seeds, suite=args.suite, budget=args.budget, size=args.size,
                label_noise=label_noise,
            )
            what = f"optimizers {','.join(e if isinstance(e, str) else e[0] for e in entries)}, " \
                   f"label noise {label_noise:g}"
        else:
            for name in args.studies or ():
                suite.study(name)
            specs = suite_specs(args.suite, tasks=tasks, studies=args.studies, seeds=seeds,
                                budget=args.budget, size=args.size)
            chosen = args.studies or [st.name for st in suite.studies]
            what = f"studies {','.join(chosen)}"
    except (KeyError, ValueError) as exc:
        raise _UsageError(str(exc.args[0] if isinstance(exc, KeyError) else exc)) from None
    db = args.db if args.db is not None else default_db_path()
    for name, why in unavailable.items():
        print(f"flatminima bench: skipping task {name} (unavailable): {why}", file=sys.stderr)
    try:
        store = Store(db)
    except (sqlite3.Error, RuntimeError, OSError) as exc:
        raise _UsageError(f"--db {db}: cannot open the database ({exc})") from None

    by_key = {s.key: s for s in specs}
    t0 = time.perf_counter()
    with store:
        try:
            result = run_sweep(
                specs, store, progress=None if args.quiet else TextProgress(),
                threads=args.threads, errors="skip", jobs=args.jobs or 1,
            )
        except KeyboardInterrupt:
            print(
                f"\nflatminima bench: interrupted; {len(store)} finished runs are stored in {db}: "
                "run the same command again to resume",
                file=sys.stderr,
            )
            return 130
    wall = time.perf_counter() - t0
    for key, why in result.unavailable.items():  # found only when the task's data was loaded
        task = by_key[key].task
        unavailable.setdefault(task, why[len(task) + 2:] if why.startswith(f"{task}: ") else why)

    if args.budget is None or args.budget in ("quick", "full"):
        budget = f"{args.budget or args.suite} epochs of each task"
    else:
        budget = specs[0].budget_text() if specs else args.budget
    print(
        f"suite {args.suite}: tasks {','.join(tasks) or '(none)'}, {what}, "
        f"seeds {','.join(map(str, seeds))}, budget {budget}, size {args.size or args.suite} "
        f"(torch {torch.__version__}, {args.jobs or 1} job{'s' if (args.jobs or 1) > 1 else ''} x "
        f"{args.threads} thread{'s' if args.threads > 1 else ''}); database {db}"
    )
    print()
    rows = summary_table(result.records) if result.records else []
    wm = win_matrix(result.records) if result.records else None
    if rows:
        print(format_summary(rows))
        print()
        print("Win matrix (mean test metric at the validation-chosen epoch):")
        print()
        print(wm.to_markdown())
        print()
        print("Claims of the seed papers (see `flatminima report` for the plots):")
        print()
        print(format_claims(claims(result.records)))
    else:
        print("no finished runs")
    print()
    print(
        f"{len(by_key)} runs: {len(result.ran)} ran, {len(result.skipped)} already in the database, "
        f"{len(result.unavailable)} unavailable, {len(result.failed)} failed; total {wall:.1f} s"
    )
    if unavailable:
        print("unavailable tasks (skipped):")
        for name, why in unavailable.items():
            print(f"  {name}: {why}")
    if result.failed:
        print("failed runs (not stored; the next sweep retries them):")
        for key, error in result.failed.items():
            print(f"  {by_key[key].describe()}: {error}")

    if args.json is not None:
        payload = {
            "flatminima": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "config": {
                "suite": args.suite,
                "tasks": tasks,
                "runs": what,
                "optimizers": list(dict.fromkeys(sp.display_label for sp in specs)),
                "label_noise": sorted({sp.label_noise for sp in specs}),
                "seeds": seeds,
                "budget": args.budget or args.suite,
                "size": args.size or args.suite,
                "jobs": args.jobs or 1,
                "db": str(db),
            },
            "claims": [dataclasses.asdict(c) for c in claims(result.records)],
            "wall_seconds": wall,
            "summary": rows,
            "win_matrix": {} if wm is None else {k: list(v) for k, v in wm.counts().items()},
            "ran": result.ran,
            "skipped": result.skipped,
            "unavailable": unavailable,
            "failed": {by_key[k].describe(): e for k, e in result.failed.items()},
            "records": [r.to_dict() for r in result.records],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(payload), indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if result.failed else 0


def _cmd_tasks() -> int:
    from .bench.tasks import TASKS

    rows = [("name", "domain", "metric", "epochs quick/full", "status")]
    for name, cls in TASKS.items():
        why = _availability(cls)
        hp = cls.hparams
        rows.append((
            name, cls.domain or "-", cls.metric, f"{hp.epochs_quick}/{hp.epochs_full}",
            "available" if why is None else f"unavailable: {why}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _open_existing_store(db: Path) -> Any:
    """A :class:`Store` on an existing flatminima database; :class:`_UsageError` when ``db`` is
    missing, not a file or not such a database (checked read-only first, so that another SQLite
    file is never modified)."""
    from .bench.store import Store

    if not db.exists():
        raise _UsageError(
            f"{db}: no such database (write one with `flatminima bench --suite quick --db {db}`)"
        )
    if not db.is_file():
        raise _UsageError(f"{db}: not a file")
    try:
        conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _UsageError(f"{db}: not a readable SQLite database ({exc})") from None
    if "runs" not in tables:
        raise _UsageError(f"{db}: not a flatminima benchmark database (no runs table)")
    try:
        return Store(db)
    except (sqlite3.Error, RuntimeError, OSError) as exc:
        raise _UsageError(f"{db}: cannot open the database ({exc})") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from .bench.report import format_summary, summary_table, write_report
    from .bench.store import default_db_path

    db = args.db if args.db is not None else default_db_path()
    if args.tasks is not None and not args.tasks:
        raise _UsageError("--tasks: no task names given")
    with _open_existing_store(db) as store:
        records = store.all() if args.tasks is None else store.all(task=args.tasks)
        present = sorted({r.spec.task for r in store.all()}) if args.tasks is not None else []
    if not records:
        if args.tasks is not None and present:
            raise _UsageError(
                f"{db}: no runs of {', '.join(args.tasks)} (it has runs of {', '.join(present)})"
            )
        raise _UsageError(f"{db}: no runs yet (run `flatminima bench --suite quick --db {db}`)")
    if args.tasks is not None:
        missing = [t for t in args.tasks if t not in {r.spec.task for r in records}]
        if missing:
            print(f"flatminima report: no runs of {', '.join(missing)} in {db}", file=sys.stderr)
    try:
        path = write_report(records, args.out, plots=not args.no_plots)
    except OSError as exc:
        raise _UsageError(f"--out {args.out}: cannot write the report ({exc})") from None
    print(format_summary(summary_table(records)))
    print()
    print(f"wrote {path} ({len(records)} runs from {db})")
    return 0

_BATCH_ROWS = 128
_CHECKPOINT_KEYS = ("task", "model_kwargs", "state_dict", "data_seed", "label_noise")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``run_quick(save_models=...)``; :class:`_UsageError` when it is
    missing, unreadable or not such a checkpoint."""
    import torch

    if not path.exists():
        raise _UsageError(f"{path}: no such file")
    if not path.is_file():
        raise _UsageError(f"{path}: not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling / format error: report it, do not crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _UsageError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {first})"
        ) from None
    if not isinstance(ckpt, dict):
        raise _UsageError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise _UsageError(
            f"{path}: not a flatminima model checkpoint (missing {', '.join(missing)}; write one with "
            "`flatminima bench --save-models DIR`)"
        )
    if ckpt["task"] != "digits":
        raise _UsageError(f"{path}: unsupported task {ckpt['task']!r} (supported: 'digits')")
    if not isinstance(ckpt["model_kwargs"], dict) or not isinstance(ckpt["state_dict"], dict):
        raise _UsageError(f"{path}: model_kwargs and state_dict must be dicts")
    return ckpt


def _digits_setup(ckpt: dict[str, Any], path: Path, n_batches: int | None) -> tuple[Any, list[Any], int]:
    """The float64 model of the checkpoint, its first ``n_batches`` training batches of 128 rows
    and the number of training rows."""
    import torch

    from .bench.tasks.digits import NUM_CLASSES, NUM_FEATURES, make_digits, make_mlp

    try:
        model = make_mlp(NUM_FEATURES, NUM_CLASSES, **ckpt["model_kwargs"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise _UsageError(f"{path}: the saved model does not fit the digits MLP ({first})") from None
    model = model.to(torch.float64)
    try:
        data = make_digits(
            int(ckpt["data_seed"]), label_noise=float(ckpt["label_noise"]), max_train=ckpt.get("max_train")
        )
    except (TypeError, ValueError) as exc:
        raise _UsageError(f"{path}: invalid data settings ({exc})") from None
    x, y = data.x_train.to(torch.float64), data.y_train
    batches = [(x[i : i + _BATCH_ROWS], y[i : i + _BATCH_ROWS]) for i in range(0, len(y), _BATCH_ROWS)]
    if n_batches is not None:
        if n_batches > len(batches):
            print(
                f"note: --batches {n_batches} but the training split has {len(batches)} batches of "
                f"{_BATCH_ROWS}; using all of them",
                file=sys.stderr,
            )
        batches = batches[:n_batches]
    return model, batches, len(y)


def _as_float(value: Any, attrs: Sequence[str], what: str, *, many: str = "first") -> float:
    """A number out of a measurement's result: a number, a tensor / array / sequence (its first
    element, or its largest with ``many="max"``), or else the first of ``attrs`` found on a result
    object (then read the same way)."""
    if hasattr(value, "detach"):  # a tensor
        value = value.detach().cpu().reshape(-1).tolist()
    elif hasattr(value, "tolist") and hasattr(value, "dtype"):  # a numpy array or scalar
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise TypeError(f"the result of {what} is empty")
        return _as_float(max(value) if many == "max" else value[0], (), what)
    if isinstance(value, (int, float)):
        return float(value)
    for attr in attrs:
        found = getattr(value, attr, None)
        if found is not None and not callable(found):
            return _as_float(found, (), what, many=many)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"cannot read a number from the result of {what}: {value!r}") from None


def _optional(module: str, name: str) -> Callable[..., Any] | None:
    """``module.name`` (a module of this package, relative name) when the module exists, else
    ``None``; an existing module that fails to import raises."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(module, __package__) is None:
        return None
    return getattr(importlib.import_module(module, __package__), name, None)


def _first_order_sharpness(
    model: Any, loss_fn: Callable[..., Any], batches: list[Any], rho: float, *, seed: int, mode: str
) -> float:
    r"""``L(w + rho g / ‖g‖) − L(w)``, ``g = ∇L(w)``: the first-order solution of
    ``max_{‖ε‖ ≤ rho} L(w + ε) − L(w)`` (Foret et al. 2021), the model left untouched."""
    from .sharpness import LossFunction, preserved

    with preserved(model, seed):
        lf = LossFunction(model, loss_fn, batches, mode=mode)
        lf.check_deterministic()
        _, g = lf.grad()
        norm = float(g.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return 0.0 if norm == 0.0 else math.nan
        return lf.loss(lf.w0 + (rho / norm) * g) - lf.loss()


def _cmd_sharpness(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from . import __version__
    from .sharpness import LossFunction, preserved

    if args.plot is not None:
        from .plotting import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as exc:
            raise _UsageError(f"--plot: {exc}") from None
    ckpt = _load_checkpoint(args.checkpoint)
    model, batches, n_train = _digits_setup(ckpt, args.checkpoint, args.batches)
    rows = sum(len(b[1]) for b in batches)

    def loss_fn(m: Any, batch: Any) -> Any:
        return F.cross_entropy(m(batch[0]), batch[1])

    with preserved(model, args.seed):
        lf = LossFunction(model, loss_fn, batches, mode=args.mode)
        lf.check_deterministic()
        train_loss = lf.loss()

    worst_case = _optional(".sharpness.measures", "worst_case_sharpness")
    if worst_case is not None:
        wc_method = "flatminima.sharpness.measures.worst_case_sharpness"
        wc_raw = worst_case(model, loss_fn, batches, args.rho, seed=args.seed, mode=args.mode)
        sharpness = _as_float(wc_raw, ("sharpness", "value"), wc_method)
    else:
        wc_method = "first order, inline: L(w + rho g/|g|) - L(w)"
        sharpness = _first_order_sharpness(
            model, loss_fn, batches, args.rho, seed=args.seed, mode=args.mode
        )

    top_eig: float | None = None
    trace: float | None = None
    trace_se: float | None = None
    hessian_note: str | None = None
    eig_fn = _optional(".sharpness.hessian", "hessian_eigenvalues")
    trace_fn = _optional(".sharpness.hessian", "hessian_trace")
    if eig_fn is None or trace_fn is None:
        hessian_note = "skipped: flatminima.sharpness.hessian is not available in this version"
    else:
        eig_raw = eig_fn(model, loss_fn, batches, k=1, seed=args.seed, mode=args.mode)
        top_eig = _as_float(eig_raw, ("eigenvalues", "values"), "hessian_eigenvalues", many="max")
        trace_raw = trace_fn(model, loss_fn, batches, seed=args.seed, mode=args.mode)
        trace = _as_float(trace_raw, ("trace", "estimate", "value"), "hessian_trace")
        if isinstance(trace_raw, tuple) and len(trace_raw) >= 2:  # (estimate, standard error)
            trace_se = _as_float(trace_raw[1], (), "hessian_trace")

    slice_path: Path | None = None
    slice_data: dict[str, Any] | None = None
    if args.plot is not None:
        from .plotting import plot_line
        from .sharpness.landscape import slice_1d

        line = slice_1d(model, loss_fn, batches, seed=args.seed, mode=args.mode)
        slice_path = plot_line(
            line, args.plot / f"{args.checkpoint.stem}-slice1d.png",
            title=f"{args.checkpoint.stem}: 1-D slice, filter-normalized ({args.mode} mode)",
        )
        slice_data = {"coords": line.coords.tolist(), "losses": line.losses.tolist()}

    noise = float(ckpt["label_noise"])
    print(
        f"{args.checkpoint}: digits MLP {ckpt['model_kwargs'] or '(default)'}, optimizer "
        f"{ckpt.get('optimizer', '?')}, seed {ckpt.get('seed', '?')}"
    )
    print(
        f"{len(batches)} batch{'es' if len(batches) > 1 else ''} of <= {_BATCH_ROWS} training rows "
        f"({rows} of {n_train}; labels as trained on, label noise {noise:g}), mode {args.mode}, "
        f"float64, seed {args.seed}"
    )
    print(f"training loss                    {train_loss:.6g}")
    print(f"worst-case sharpness (rho={args.rho:g})  {sharpness:.6g}   [{wc_method}]")
    if hessian_note is None:
        print(f"top Hessian eigenvalue           {top_eig:.6g}")
        se = "" if trace_se is None else f" ± {trace_se:.2g} (standard error)"
        print(f"Hessian trace                    {trace:.6g}{se}")
    else:
        print(f"Hessian eigenvalue and trace     {hessian_note}")
    if slice_path is not None:
        print(f"1-D slice                        {slice_path}")
    if args.json is not None:
        payload = {
            "flatminima": __version__,
            "torch": torch.__version__,
            "checkpoint": str(args.checkpoint),
            "task": ckpt["task"],
            "optimizer": ckpt.get("optimizer"),
            "model_kwargs": ckpt["model_kwargs"],
            "label_noise": noise,
            "data_seed": ckpt["data_seed"],
            "mode": args.mode,
            "seed": args.seed,
            "rho": args.rho,
            "batches": len(batches),
            "batch_rows": _BATCH_ROWS,
            "examples": rows,
            "dtype": "float64",
            "train_loss": train_loss,
            "worst_case_sharpness": sharpness,
            "worst_case_method": wc_method,
            "hessian_top_eigenvalue": top_eig,
            "hessian_trace": trace,
            "hessian_trace_stderr": trace_se,
            "hessian_note": hessian_note,
            "slice_1d_png": None if slice_path is None else str(slice_path),
            "slice_1d": slice_data,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flatminima`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit
    code (0 success, 1 a suite run failed, 2 bad arguments, 130 an interrupted sweep) instead of
    exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    try:
        if args.command == "list":
            return _cmd_list()
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "tasks":
            return _cmd_tasks()
        if args.command == "sharpness":
            return _cmd_sharpness(args)
    except _UsageError as exc:
        print(f"flatminima {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    print(f"flatminima: error: unknown command {args.command!r}", file=sys.stderr)
    return 2  # pragma: no cover (argparse rejects unknown commands first)
