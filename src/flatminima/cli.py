"""Command line: ``flatminima bench`` (the quick digits benchmark) and ``flatminima list``.

Exit codes: 0 on success, 2 on bad arguments (unknown optimizer name, malformed list, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def build_parser() -> argparse.ArgumentParser:
    """The ``flatminima`` argument parser (subcommands ``bench`` and ``list``)."""
    from .bench.quick import DEFAULT_EPOCHS, DEFAULT_OPTIMIZERS

    parser = argparse.ArgumentParser(
        prog="flatminima",
        description="Flat-minima optimizers for PyTorch: benchmarks and the optimizer registry.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser(
        "bench",
        help="train an MLP on the bundled digits data with several optimizers, print a table",
        description=(
            "Train a 64-128-128-10 MLP on scikit-learn's digits (bundled; 60/20/20 stratified "
            "split) once per optimizer and seed, then print a Markdown table of test and "
            "validation accuracy, final training loss and time per optimizer step "
            "(mean ± std over seeds). Progress lines go to stderr."
        ),
    )
    bench.add_argument(
        "--optimizers", type=_csv, default=list(DEFAULT_OPTIMIZERS), metavar="LIST",
        help="comma-separated registry names (default: %(default)s; see `flatminima list`)",
    )
    bench.add_argument(
        "--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
        help="epochs per run (default: %(default)s)",
    )
    bench.add_argument(
        "--seeds", type=_seeds, default=[0, 1], metavar="LIST",
        help="comma-separated training seeds, e.g. 0,1,2 (default: 0,1)",
    )
    bench.add_argument(
        "--label-noise", type=_fraction, default=0.0, metavar="FRACTION",
        help="fraction of training labels flipped to another class (default: 0)",
    )
    bench.add_argument(
        "--lr", type=_positive_float, default=0.05, help="learning rate (default: %(default)s)"
    )
    bench.add_argument(
        "--batch-size", type=_positive_int, default=64, help="minibatch size (default: %(default)s)"
    )
    bench.add_argument(
        "--json", type=Path, default=None, metavar="PATH",
        help="also write the configuration, every run and the summary to this JSON file",
    )
    bench.add_argument(
        "--threads", type=_positive_int, default=1,
        help="torch intra-op threads during training (default: %(default)s; the model is tiny)",
    )
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

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


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, optimizer_info
    from .bench.quick import format_table, run_quick, summarize

    if not args.optimizers:
        raise _UsageError("--optimizers: no optimizer names given")
    for name in args.optimizers:
        try:
            optimizer_info(name)
        except KeyError as exc:
            raise _UsageError(f"--optimizers: {exc.args[0]} (see `flatminima list`)") from None
    canonical = [optimizer_info(n).name for n in args.optimizers]
    repeated = sorted({n for n in canonical if canonical.count(n) > 1})
    if repeated:
        raise _UsageError(f"--optimizers: each name once, got {', '.join(repeated)} more than once")

    t0 = time.perf_counter()
    results = run_quick(
        optimizers=args.optimizers, epochs=args.epochs, seeds=args.seeds,
        batch_size=args.batch_size, lr=args.lr, label_noise=args.label_noise,
        progress=not args.quiet, threads=args.threads,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flatminima`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit
    code (0 success, 2 bad arguments) instead of exiting."""
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
    except _UsageError as exc:
        print(f"flatminima {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    print(f"flatminima: error: unknown command {args.command!r}", file=sys.stderr)
    return 2  # pragma: no cover (argparse rejects unknown commands first)
