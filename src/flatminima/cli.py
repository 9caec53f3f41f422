"""Command line: ``flatminima bench`` (the quick digits benchmark), ``flatminima sharpness`` (sharpness
of a model saved by ``flatminima bench --save-models``) and ``flatminima list``.

Exit codes: 0 on success, 2 on bad arguments (unknown optimizer name, malformed list, missing or
invalid checkpoint, ...).
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
_nonnegative_int = _number(int, lambda v: v >= 0, ">= 0")
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def build_parser() -> argparse.ArgumentParser:
    """The ``flatminima`` argument parser (subcommands ``bench``, ``sharpness`` and ``list``)."""
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
    bench.add_argument(
        "--save-models", type=Path, default=None, metavar="DIR",
        help="write each run's final model to DIR/<optimizer>-seed<seed>.pt "
        "(input of `flatminima sharpness`)",
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
