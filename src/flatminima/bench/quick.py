"""The quick benchmark: a small MLP on digits with SGD, SAM, ASAM, Monge-SAM or ESAM.

:func:`run_quick` trains one model per (optimizer, seed) with the same data, model, batches and
hyperparameters and records test / validation accuracy, the final training loss and the time per
optimizer step; :func:`format_table` turns the records into a Markdown table (mean ± std over
seeds). ``flatminima bench`` prints that table. An optimizer is given by its registry name or as a
labelled variant ``(label, registry_name, kwargs)``, so one name can run with several settings.

The training loop is generic: it reads ``needs_closure`` and ``per_sample`` from the registry and
either calls ``opt.step(closure)`` (SAM family: the closure runs twice per step) or ``zero_grad();
closure(); opt.step()`` as with any ``torch.optim`` optimizer. Every optimizer gets the same
standard closure (forward, backward, mean cross-entropy), except those whose step makes use of a
per-sample closure (``per_sample``: ESAM, for its data selection): they get ``closure(select=None)``,
which runs only the forward on the minibatch (or its rows ``select``) and returns the per-sample
losses; the optimizer backpropagates their mean.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..optim.registry import create, optimizer_info
from .tasks.digits import make_digits, make_mlp

__all__ = [
    "accuracy",
    "optimizer_step",
    "DEFAULT_EPOCHS",
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_RHO",
    "format_table",
    "run_quick",
    "summarize",
]

DEFAULT_OPTIMIZERS: tuple[str, ...] = (
    "sgd", "sam_sgd", "asam_sgd", "msam_sgd", "esam_sgd", "sgd+swa", "sam_sgd+swa"
)
DEFAULT_EPOCHS = 30
#: Default radius per SAM-family rule (ASAM's radius lives in normalized coordinates).
DEFAULT_RHO: dict[str, float] = {"sam": 0.05, "asam": 0.5, "msam": 0.05, "esam": 0.05}
#: Base optimizers that take a ``momentum`` argument.
_MOMENTUM_BASES = frozenset({"sgd", "rmsprop"})


#: An entry of ``run_quick(optimizers=...)``: a registry name, or ``(label, registry_name, kwargs)``.
OptimizerSpec = str | tuple[str, str, Mapping[str, Any]]


def _parse_specs(optimizers: Iterable[OptimizerSpec]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, canonical registry name, variant kwargs)`` per entry; a plain name is its own
    label with no kwargs. ``KeyError`` for an unknown name, ``ValueError`` for a duplicate label or
    a malformed entry, all before any training."""
    specs: list[tuple[str, str, dict[str, Any]]] = []
    for entry in optimizers:
        if isinstance(entry, str):
            name = optimizer_info(entry).name
            specs.append((name, name, {}))
            continue
        ok = isinstance(entry, (tuple, list)) and len(entry) == 3
        if ok:
            label, name, kw = entry
            ok = isinstance(label, str) and bool(label) and isinstance(name, str)
            ok = ok and isinstance(kw, Mapping)
        if not ok:
            raise ValueError(
                f"an optimizer entry is a registry name or a tuple (label, registry_name, kwargs), "
                f"got {entry!r}"
            )
        specs.append((label, optimizer_info(name).name, dict(kw)))
    labels = [label for label, _, _ in specs]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise ValueError(f"optimizer labels must be unique, got duplicates {dupes}")
    return specs


def _default_rho(family: str, perturbation: Any) -> float | None:
    """:data:`DEFAULT_RHO` of a family; for ESAM, that of its ``perturbation`` rule (an ESAM
    around ASAM defaults to ASAM's radius)."""
    if family == "esam" and perturbation in ("asam", "monge", "msam"):
        return DEFAULT_RHO.get("msam" if perturbation == "monge" else perturbation)
    return DEFAULT_RHO.get(family)


def _optimizer_kwargs(
    name: str,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    rho: float | Mapping[str, float] | None,
    optimizer_kwargs: Mapping[str, Mapping[str, Any]] | None,
    variant: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``create(name, ...)``: shared base options, the rule's ``rho``, the
    per-name overrides, then those of a labelled variant."""
    info = optimizer_info(name)
    extra: dict[str, Any] = {}
    if optimizer_kwargs and info.name in optimizer_kwargs:
        extra.update(optimizer_kwargs[info.name])
    extra.update(variant or {})
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if info.base in _MOMENTUM_BASES:
        kwargs["momentum"] = momentum
    if info.family != "base":
        default = _default_rho(info.family, extra.get("perturbation"))
        if isinstance(rho, Mapping):
            r = rho.get(info.name, rho.get(info.family, default))
        elif rho is not None:
            r = rho
        else:
            r = default
        if r is not None:
            kwargs["rho"] = float(r)
    kwargs.update(extra)
    return kwargs


def optimizer_step(
    opt: Any, info: Any, closure: Callable[[], Tensor], sample_closure: Callable[..., Tensor] | None = None
) -> Any:
    """One optimizer step in the convention the registry entry ``info`` declares: ``opt.step(closure)``
    for the SAM family (with the per-sample ``sample_closure`` when ``info.per_sample`` and one is
    given), else ``zero_grad(); closure(); opt.step()`` as for any ``torch.optim`` optimizer.
    Returns the loss the closure produced."""
    if info.needs_closure:
        return opt.step(sample_closure if (info.per_sample and sample_closure is not None) else closure)
    opt.zero_grad(set_to_none=True)
    loss = closure()
    opt.step()
    return loss


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (the model is left in train mode)."""
    model.eval()
    acc = (model(x).argmax(dim=1) == y).double().mean().item()
    model.train()
    return float(acc)


def _train_one(
    name: str,
    seed: int,
    data: Any,
    *,
    epochs: int,
    batch_size: int,
    opt_kwargs: dict[str, Any],
    model_kwargs: Mapping[str, Any],
    label: str | None = None,
    save_path: Path | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    info = optimizer_info(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_mlp(data.num_features, data.num_classes, **model_kwargs)
        n = data.x_train.shape[0]
        steps_per_epoch = math.ceil(n / batch_size)
        if info.averaging:  # SWA / WASAM: average once per epoch over the last quarter by default
            opt_kwargs = {
                "total_steps": epochs * steps_per_epoch, "every": steps_per_epoch, **opt_kwargs,
                "model": model,
            }
        opt = create(name, model.parameters(), **opt_kwargs)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(seed)
        xb = yb = data.x_train[:0]

        def closure() -> Tensor:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        def sample_closure(select: Tensor | None = None) -> Tensor:
            # Forward only; the optimizer backpropagates the mean (and zeroes the gradients).
            x, y = (xb, yb) if select is None else (xb[select], yb[select])
            return nn.functional.cross_entropy(model(x), y, reduction="none")

        model.train()
        step_ns: list[int] = []
        epoch_losses: list[float] = []
        t_run = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            loss_sum = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                xb, yb = data.x_train[idx], data.y_train[idx]
                t0 = time.perf_counter_ns()
                loss = optimizer_step(opt, info, closure, sample_closure)
                step_ns.append(time.perf_counter_ns() - t0)
                if isinstance(loss, Tensor):
                    loss = loss.detach()
                loss_sum += float(loss) * idx.numel()
            epoch_losses.append(loss_sum / n)
        train_s = time.perf_counter() - t_run
        stats = dict(getattr(opt, "stats", {}) or {})
        evaluate: Any = contextlib.nullcontext()
        if info.averaging:  # evaluate the averaged weights, BatchNorm statistics recomputed
            opt.update_bn(data.x_train[i : i + batch_size] for i in range(0, n, batch_size))
            evaluate = opt.swapped()
        with evaluate:
            accuracies = {
                "test_acc": accuracy(model, data.x_test, data.y_test),
                "val_acc": accuracy(model, data.x_val, data.y_val),
                "train_acc": accuracy(model, data.x_train, data.y_train),
                "train_acc_clean": accuracy(model, data.x_train, data.y_train_clean),
            }
            if save_path is not None:  # the evaluated weights (averaged ones for SWA / WASAM)
                torch.save(
                    {
                        "task": "digits",
                        "model_kwargs": dict(model_kwargs),
                        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "optimizer": info.name if label is None else label,
                        "registry_name": info.name,
                        "seed": int(seed),
                        "epochs": int(epochs),
                        **dict(checkpoint_meta or {}),
                        "test_acc": accuracies["test_acc"],
                    },
                    save_path,
                )
        record: dict[str, Any] = {
            "optimizer": info.name if label is None else label,
            "registry_name": info.name,
            "seed": int(seed),
            **accuracies,
            "final_train_loss": epoch_losses[-1] if epoch_losses else math.nan,
            "ms_per_step": sum(step_ns) / 1e6 / len(step_ns) if step_ns else math.nan,
            "ms_per_step_median": statistics.median(step_ns) / 1e6 if step_ns else math.nan,
            "steps": len(step_ns),
            "epochs": epochs,
            "passes": info.passes,
            "train_seconds": train_s,
            "train_loss_curve": epoch_losses,
            "hparams": {k: v for k, v in opt_kwargs.items() if isinstance(v, (int, float, str))},
            "last_stats": {k: float(v) for k, v in stats.items()},
        }
    return record


def run_quick(
    optimizers: Iterable[OptimizerSpec] = DEFAULT_OPTIMIZERS,
    epochs: int = DEFAULT_EPOCHS,
    seeds: Sequence[int] = (0, 1),
    batch_size: int = 64,
    lr: float = 0.05,
    label_noise: float = 0.0,
    progress: bool | Callable[[str], None] = True,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    rho: float | Mapping[str, float] | None = None,
    optimizer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    data_seed: int = 0,
    max_train: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    threads: int | None = 1,
    save_models: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Train the digits MLP once per (optimizer, seed) and return one record per run.

    Every run sees the same data: the 60/20/20 stratified split, the optional subsample of
    ``max_train`` training rows and the ``label_noise`` on training labels all come from
    ``data_seed``. ``seed`` sets the initialization, the minibatch order (a ``torch.Generator``)
    and dropout; the caller's global RNG state is left untouched. Given the seeds, results are
    identical from run to run (timings aside).

    Args:
        optimizers: each a registry name (``flatminima.list_optimizers()``) or a labelled variant
            ``(label, registry_name, kwargs)``, e.g. ``("esam_swp", "esam_sgd", {"gamma": 1.0})``:
            its records carry ``label`` as ``optimizer`` and ``kwargs`` are applied last, so the
            same name can appear with different options. A plain name is its own label. Names,
            entries and the uniqueness of labels are checked before training (``KeyError`` for an
            unknown name, ``ValueError`` for a duplicate label or a malformed entry).
        epochs: passes over the training set (minibatches of ``batch_size``, last one smaller).
        seeds: one run per seed and optimizer.
        lr, momentum, weight_decay: base-optimizer options shared by every run (``momentum`` only
            goes to bases that take it: SGD, RMSprop).
        label_noise: fraction of training labels flipped to another class.
        progress: ``True`` prints one line per run to stderr; a callable receives the line instead.
        rho: SAM-family radius: one number for every rule, or a mapping from a registry name
            (``"sam_sgd"``) or family (``"asam"``, ``"esam"``) to a number; missing ones use
            :data:`DEFAULT_RHO` (SAM 0.05, ASAM 0.5, Monge-SAM 0.05, ESAM 0.05; an ESAM whose
            ``perturbation`` is ``"asam"`` or ``"monge"`` defaults to that rule's radius).
        optimizer_kwargs: extra ``create`` options per registry name (for every entry with that
            name), applied after ``rho`` and before a variant's own kwargs.
        model_kwargs: options of :func:`~flatminima.bench.tasks.digits.make_mlp`
            (``hidden``, ``batch_norm``, ``dropout``).
        threads: ``torch.set_num_threads`` during the runs (restored afterwards); ``None`` keeps
            the current setting. The default 1 suits this tiny model: with several intra-op
            threads, a CPU shared with other processes makes steps 10-20x slower and the timings
            meaningless.
        save_models: a folder (created if needed) where each run's final model is written with
            ``torch.save`` as ``<label>-seed<seed>.pt`` (characters other than letters, digits and
            ``._+-`` in the label become ``_``): a dict ``{"task": "digits", "model_kwargs",
            "state_dict", "optimizer" (the label), "registry_name", "seed", "epochs", "data_seed",
            "label_noise", "max_train", "test_acc"}``, the weights being those evaluated (the
            averaged ones, BatchNorm statistics recomputed, for SWA / WASAM). ``flatminima
            sharpness`` reads these files. ``None`` (default): nothing is written. Saving changes
            no result.

    Records come in run order: for each seed, every optimizer in turn (interleaved so that load
    from other processes on a shared machine spoils every optimizer's timing alike). Each record
    holds ``optimizer`` (the label), ``registry_name``, ``seed``, ``test_acc``, ``val_acc``,
    ``train_acc`` (on the labels trained on), ``train_acc_clean``, ``final_train_loss`` (mean over
    the last epoch of the loss at ``w`` returned by the step, weighted by batch size),
    ``ms_per_step`` (mean wall time of the step call including its forward/backward passes) and
    ``ms_per_step_median``, ``steps``, ``epochs``, ``passes``, ``train_seconds``,
    ``train_loss_curve`` (per epoch), ``hparams``, ``last_stats`` (the optimizer's ``stats`` after
    the last step, empty for base optimizers), ``label_noise``, ``batch_size``, ``data_seed`` and
    ``threads``. Nothing is selected on the validation set; its accuracy is only reported.
    """
    specs = _parse_specs(optimizers)  # unknown names and duplicate labels fail up front
    if not specs:
        raise ValueError("no optimizers given")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    data = make_digits(data_seed, label_noise=label_noise, max_train=max_train)
    kwargs = {
        label: _optimizer_kwargs(
            name, lr=lr, momentum=momentum, weight_decay=weight_decay, rho=rho,
            optimizer_kwargs=optimizer_kwargs, variant=variant,
        )
        for label, name, variant in specs
    }
    report: Callable[[str], None] | None
    if callable(progress):
        report = progress
    elif progress:
        def report(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    else:
        report = None

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    save_dir = None if save_models is None else Path(save_models)
    files = {label: re.sub(r"[^A-Za-z0-9._+-]", "_", label) for label, _, _ in specs}
    if save_dir is not None:
        if len(set(files.values())) < len(files):
            raise ValueError(f"save_models: two labels give the same file name: {files}")
        save_dir.mkdir(parents=True, exist_ok=True)
    meta = {"data_seed": int(data_seed), "label_noise": float(label_noise), "max_train": max_train}
    results: list[dict[str, Any]] = []
    total = len(specs) * len(seeds)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # Seed-major order: a burst of load from other processes hits every optimizer alike.
        for seed in seeds:
            for label, name, _ in specs:
                save_path = None
                if save_dir is not None:
                    save_path = save_dir / f"{files[label]}-seed{seed}.pt"
                rec = _train_one(
                    name, seed, data, epochs=epochs, batch_size=batch_size,
                    opt_kwargs=kwargs[label], model_kwargs=dict(model_kwargs or {}), label=label,
                    save_path=save_path, checkpoint_meta=meta,
                )
                rec["label_noise"] = float(label_noise)
                rec["batch_size"] = int(batch_size)
                rec["data_seed"] = int(data_seed)
                rec["threads"] = torch.get_num_threads()
                results.append(rec)
                if report is not None:
                    report(
                        f"[{len(results)}/{total}] {label:<10} seed={seed}: "
                        f"test {100 * rec['test_acc']:.2f}%  val {100 * rec['val_acc']:.2f}%  "
                        f"loss {rec['final_train_loss']:.4f}  {rec['ms_per_step']:.3f} ms/step  "
                        f"({rec['train_seconds']:.1f} s)"
                    )
    finally:
        torch.set_num_threads(old_threads)
    return results


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; NaN for a single value)."""
    vals = [float(v) for v in values]
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return mean, std


_METRICS = ("test_acc", "val_acc", "final_train_loss", "ms_per_step")


def summarize(
    results: Sequence[Mapping[str, Any]], baseline: str = "sgd"
) -> list[dict[str, Any]]:
    """Aggregate run records per optimizer (in order of first appearance).

    Each row has ``optimizer``, ``runs``, ``<metric>_mean`` and ``<metric>_std`` for ``test_acc``,
    ``val_acc``, ``final_train_loss`` and ``ms_per_step`` (sample std, ``n - 1``; NaN with one
    run), and ``time_ratio``: mean ms/step divided by that of ``baseline`` (NaN without it).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(str(r["optimizer"]), []).append(r)
    rows: list[dict[str, Any]] = []
    for name, recs in groups.items():
        row: dict[str, Any] = {"optimizer": name, "runs": len(recs)}
        for m in _METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([r[m] for r in recs])
        rows.append(row)
    base = next((r for r in rows if r["optimizer"] == baseline), None)
    for row in rows:
        ok = base is not None and base["ms_per_step_mean"] > 0
        row["time_ratio"] = row["ms_per_step_mean"] / base["ms_per_step_mean"] if ok else math.nan
    return rows


def _pm(mean: float, std: float, fmt: str) -> str:
    if math.isnan(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def format_table(results: Sequence[Mapping[str, Any]], baseline: str = "sgd") -> str:
    """A Markdown table of :func:`summarize`: per optimizer, mean ± std over seeds of the test and
    validation accuracy (%, 2 decimals), the final training loss (4 decimals) and ms per step
    (3 decimals), and the ratio of its ms/step to ``baseline``'s (``n/a`` without it)."""
    header = (
        "| optimizer | runs | test acc (%) | val acc (%) | final train loss | ms/step "
        f"| time vs {baseline} |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in summarize(results, baseline):
        ratio = "n/a" if math.isnan(row["time_ratio"]) else f"{row['time_ratio']:.2f}x"
        cells = [
            row["optimizer"],
            str(row["runs"]),
            _pm(100 * row["test_acc_mean"], 100 * row["test_acc_std"], ".2f"),
            _pm(100 * row["val_acc_mean"], 100 * row["val_acc_std"], ".2f"),
            _pm(row["final_train_loss_mean"], row["final_train_loss_std"], ".4f"),
            _pm(row["ms_per_step_mean"], row["ms_per_step_std"], ".3f"),
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
