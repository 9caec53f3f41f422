"""Summaries of benchmark records: tables, win matrices and a Markdown report with PNG plots.

Records (:class:`~flatminima.bench.store.RunRecord`, e.g. ``Store(path).all()``) are grouped by
*setting* (task, size, label noise and budget: runs that are comparable) and by optimizer label
(:attr:`RunSpec.display_label`: the registry name, or the name with its hparams, e.g.
``sam_sgd[rho=0.1]``); seeds and data seeds are the repetitions of a group.

* :func:`summary_table`: per setting and optimizer, mean ± sample standard deviation (``n - 1``;
  NaN for one run) of the primary test metric at the epoch chosen on validation, of the final one,
  the mean time per optimizer step and its ratio to the baseline optimizer (``sgd``) in the same
  setting, and the mean peak memory over the start of the run; :func:`format_summary` renders it.
* :func:`win_matrix`: comparisons "A ≥ max(B, C, ...)" of those means, per setting, counted
  "k of n" (settings where one of the labels is missing are not counted). By default, for every
  ``X+swa`` with ``X`` SAM-family: ``X+swa ≥ max(X, <base>+swa)`` (does WASAM beat both SAM and
  SWA?).
* :func:`write_report`: ``report.md`` with both, and PNG plots (test metric vs training time per
  setting, test metric vs ``rho`` where an optimizer was run with several, test error vs sharpness
  where records carry one in ``extra["sharpness"]``) drawn with matplotlib when it is installed
  (otherwise the report says the plots were skipped).
"""

from __future__ import annotations

import datetime
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import RunRecord, canonical_json

__all__ = [
    "Comparison",
    "WinMatrix",
    "default_comparisons",
    "format_summary",
    "setting_of",
    "summary_table",
    "win_matrix",
    "write_report",
]

#: Metrics shown as percentages.
_PERCENT = frozenset({"accuracy", "acc", "top1", "top5", "balanced_accuracy", "f1", "macro_f1",
                      "auc", "auroc", "win_rate"})


def setting_of(record: RunRecord) -> str:
    """The comparable setting of a record: ``"task"`` followed by its size, budget and label noise,
    e.g. ``"digits-mlp (quick, 10 epochs)"`` or ``"cifar-noise (full, 60 s, noise 0.2)"``."""
    s = record.spec
    parts = [s.size, s.budget_text()]
    if s.label_noise:
        parts.append(f"noise {s.label_noise:g}")
    return f"{s.task} ({', '.join(parts)})"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return mean, std


def _groups(records: Iterable[RunRecord]) -> dict[str, dict[str, list[RunRecord]]]:
    """setting -> label -> records, in order of first appearance."""
    out: dict[str, dict[str, list[RunRecord]]] = {}
    for r in records:
        out.setdefault(setting_of(r), {}).setdefault(r.label, []).append(r)
    return out


def summary_table(records: Iterable[RunRecord], *, baseline: str = "sgd") -> list[dict[str, Any]]:
    """One row per setting and optimizer label (settings in order of first appearance, labels
    too): ``setting``, ``task``, ``optimizer`` (the label), ``runs``, ``metric``,
    ``test_mean`` / ``test_std`` (test metric at the validation-chosen epoch), ``final_mean`` /
    ``final_std`` (at the last epoch), ``best_epoch_mean``, ``epochs_mean``, ``ms_per_step``
    (mean over runs of the mean step time), ``time_ratio`` (that over ``baseline``'s in the same
    setting; NaN without it) and ``peak_mib`` (mean peak memory over the run's start, MiB; NaN
    when unknown)."""
    rows: list[dict[str, Any]] = []
    for setting, by_label in _groups(records).items():
        block = []
        for label, recs in by_label.items():
            test_mean, test_std = _mean_std([r.test_at_best for r in recs])
            final_mean, final_std = _mean_std([r.final_test_metric for r in recs])
            mems = [r.peak_memory_delta for r in recs if r.peak_memory_delta is not None]
            block.append({
                "setting": setting,
                "task": recs[0].spec.task,
                "optimizer": label,
                "runs": len(recs),
                "metric": recs[0].metric,
                "test_mean": test_mean,
                "test_std": test_std,
                "final_mean": final_mean,
                "final_std": final_std,
                "best_epoch_mean": statistics.fmean(r.best_epoch for r in recs),
                "epochs_mean": statistics.fmean(r.epochs_run for r in recs),
                "ms_per_step": statistics.fmean(float(r.ms_per_step) for r in recs),
                "peak_mib": statistics.fmean(mems) / 2**20 if mems else math.nan,
            })
        base = next((row for row in block if row["optimizer"] == baseline), None)
        for row in block:
            ok = base is not None and base["ms_per_step"] > 0
            row["time_ratio"] = row["ms_per_step"] / base["ms_per_step"] if ok else math.nan
        rows += block
    return rows


def _fmt_metric(value: float, metric: str) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}" if metric in _PERCENT else f"{value:.4f}"


def _pm(mean: float, std: float, metric: str) -> str:
    if math.isnan(std):
        return _fmt_metric(mean, metric)
    return f"{_fmt_metric(mean, metric)} ± {_fmt_metric(std, metric)}"


def format_summary(rows: Sequence[Mapping[str, Any]], *, baseline: str = "sgd") -> str:
    """A Markdown table of :func:`summary_table` rows (metrics in % for accuracy-like ones)."""
    lines = [
        "| setting | optimizer | runs | test (val-chosen epoch) | test (last epoch) | best epoch "
        f"| ms/step | time vs {baseline} | peak mem (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        m = row["metric"]
        unit = " %" if m in _PERCENT else ""
        ratio = "n/a" if math.isnan(row["time_ratio"]) else f"{row['time_ratio']:.2f}x"
        mem = "n/a" if math.isnan(row["peak_mib"]) else f"{row['peak_mib']:.1f}"
        lines.append(
            f"| {row['setting']} | {row['optimizer']} | {row['runs']} "
            f"| {_pm(row['test_mean'], row['test_std'], m)}{unit} "
            f"| {_pm(row['final_mean'], row['final_std'], m)}{unit} "
            f"| {row['best_epoch_mean']:.1f}/{row['epochs_mean']:.1f} "
            f"| {row['ms_per_step']:.3f} | {ratio} | {mem} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- win matrix
@dataclass(frozen=True)
class Comparison:
    """"``a`` ≥ max(``others``)" on the mean test metric at the validation-chosen epoch."""

    a: str
    others: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "others", tuple(self.others))
        if not self.others:
            raise ValueError("a comparison needs at least one other label")

    @property
    def name(self) -> str:
        if len(self.others) == 1:
            return f"{self.a} ≥ {self.others[0]}"
        return f"{self.a} ≥ max({', '.join(self.others)})"


def _as_comparison(c: Any) -> Comparison:
    if isinstance(c, Comparison):
        return c
    a, others = c
    return Comparison(a, (others,) if isinstance(others, str) else tuple(others))


def default_comparisons(labels: Iterable[str]) -> list[Comparison]:
    """For every label ``X+swa`` where ``X`` is a SAM-family registry name with base ``B``:
    ``X+swa ≥ max(X, B+swa)``, in order of the labels."""
    from ..optim.registry import optimizer_info  # imports torch; only needed here

    out = []
    for label in dict.fromkeys(labels):
        if not label.endswith("+swa"):
            continue
        try:
            info = optimizer_info(label[: -len("+swa")])
        except KeyError:
            continue
        if info.family != "base" and not info.averaging:
            out.append(Comparison(label, (info.name, f"{info.base}+swa")))
    return out


@dataclass
class WinMatrix:
    """Outcome of comparisons per setting: ``cells[(comparison.name, setting)]`` is ``True`` (a
    wins), ``False`` or ``None`` (a label is missing in that setting, or a mean is NaN: not
    counted); ``margins`` holds ``mean(a) - max(mean(others))`` where decided."""

    comparisons: list[Comparison] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], bool | None] = field(default_factory=dict)
    margins: dict[tuple[str, str], float] = field(default_factory=dict)

    def counts(self) -> dict[str, tuple[int, int]]:
        """comparison name -> (wins k, decided settings n)."""
        out = {}
        for c in self.comparisons:
            vals = [self.cells.get((c.name, s)) for s in self.settings]
            decided = [v for v in vals if v is not None]
            out[c.name] = (sum(decided), len(decided))
        return out

    def total(self) -> tuple[int, int]:
        """(k, n) over every comparison and setting."""
        ks = self.counts().values()
        return sum(k for k, _ in ks), sum(n for _, n in ks)

    def to_markdown(self) -> str:
        if not self.comparisons or not self.settings:
            return "_no comparison applies to these records_"
        lines = ["| setting | " + " | ".join(c.name for c in self.comparisons) + " |",
                 "|---|" + "---:|" * len(self.comparisons)]
        for s in self.settings:
            cells = []
            for c in self.comparisons:
                v = self.cells.get((c.name, s))
                if v is None:
                    cells.append("–")
                else:
                    margin = self.margins[(c.name, s)]
                    cells.append(f"{'yes' if v else 'no'} ({margin:+.4f})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        counts = self.counts()
        lines.append("| **k of n** | " + " | ".join(
            f"**{counts[c.name][0]} of {counts[c.name][1]}**" for c in self.comparisons) + " |")
        return "\n".join(lines)


def win_matrix(
    records: Iterable[RunRecord],
    comparisons: Iterable[Comparison | tuple[str, Sequence[str] | str]] | None = None,
    *,
    tol: float = 1e-9,
) -> WinMatrix:
    """Decide every comparison in every setting on the means over seeds of the test metric at the
    validation-chosen epoch: ``a`` wins when ``mean(a) >= max(mean(b) for b in others) - tol``
    (ties win; the default ``tol`` only absorbs floating-point round-off in the means).
    ``comparisons``: :class:`Comparison` objects or ``(a, others)`` pairs; default
    :func:`default_comparisons` of the labels present."""
    groups = _groups(records)
    means = {
        (setting, label): _mean_std([r.test_at_best for r in recs])[0]
        for setting, by_label in groups.items() for label, recs in by_label.items()
    }
    if comparisons is None:
        comps = default_comparisons(label for by_label in groups.values() for label in by_label)
    else:
        comps = [_as_comparison(c) for c in comparisons]
    wm = WinMatrix(comparisons=comps, settings=list(groups))
    for c in comps:
        for s in wm.settings:
            vals = [means.get((s, lab)) for lab in (c.a, *c.others)]
            if any(v is None or math.isnan(v) for v in vals):
                wm.cells[(c.name, s)] = None
                continue
            margin = vals[0] - max(vals[1:])
            wm.cells[(c.name, s)] = bool(margin >= -tol)
            wm.margins[(c.name, s)] = margin
    return wm


# ----------------------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "plot"


def _sharpness(record: RunRecord) -> float | None:
    for source in (record.extra, record.best_test, record.final_test):
        v = source.get("sharpness") if isinstance(source, Mapping) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def _rho(record: RunRecord) -> float | None:
    for source in (record.optimizer_kwargs, record.spec.hparams):
        v = source.get("rho")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _new_figure(Figure: Any) -> tuple[Any, Any]:
    fig = Figure(figsize=(6.4, 4.4))
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig: Any, ax: Any, canvas: Any, setting: str, xlabel: str, ylabel: str, caption: str,
            path: Path) -> tuple[str, Path]:
    """Label, title, grid and legend of one per-setting plot, saved as PNG; ``(caption, path)``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(setting, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return caption, _save(fig, canvas, path)


def _save(fig: Any, canvas_cls: Any, path: Path) -> Path:
    canvas_cls(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def _plot_time(groups: dict[str, dict[str, list[RunRecord]]], out: Path, mpl: tuple[Any, Any]
               ) -> list[tuple[str, Path]]:
    Figure, Canvas = mpl
    made = []
    for setting, by_label in groups.items():
        fig, ax = _new_figure(Figure)
        drawn = False
        metric = "metric"
        for label, recs in by_label.items():
            n = min(r.epochs_run for r in recs)
            if n == 0:
                continue
            metric = recs[0].metric
            xs = [statistics.fmean(r.epochs[i].train_seconds for r in recs) for i in range(n)]
            ys = [statistics.fmean(float(r.epochs[i].test.get(metric, math.nan)) for r in recs)
                  for i in range(n)]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} (n={len(recs)})")
            drawn = True
        if not drawn:
            continue
        made.append(_finish(
            fig, ax, Canvas, setting, "training time (s)", f"test {metric} (mean over seeds)",
            f"{setting}: test {metric} vs training time", out / f"time_{_slug(setting)}.png",
        ))
    return made


def _plot_rho(groups: dict[str, dict[str, list[RunRecord]]], out: Path, mpl: tuple[Any, Any]
              ) -> list[tuple[str, Path]]:
    Figure, Canvas = mpl
    made = []
    for setting, by_label in groups.items():
        by_opt: dict[str, dict[float, list[float]]] = {}
        metric = "metric"
        for recs in by_label.values():
            for r in recs:
                rho = _rho(r)
                if rho is not None:
                    by_opt.setdefault(r.spec.optimizer, {}).setdefault(rho, []).append(r.test_at_best)
                    metric = r.metric
        varied = {opt: pts for opt, pts in by_opt.items() if len(pts) >= 2}
        if not varied:
            continue
        fig, ax = _new_figure(Figure)
        positive = True
        for opt, pts in varied.items():
            rhos = sorted(pts)
            stats = [_mean_std(pts[x]) for x in rhos]
            errs = [0.0 if math.isnan(s) else s for _, s in stats]
            ax.errorbar(rhos, [m for m, _ in stats], yerr=errs, marker="o", capsize=3, label=opt)
            positive = positive and all(x > 0 for x in rhos)
        if positive:
            ax.set_xscale("log")
        made.append(_finish(
            fig, ax, Canvas, setting, "rho", f"test {metric} at the val-chosen epoch",
            f"{setting}: test {metric} vs rho", out / f"rho_{_slug(setting)}.png",
        ))
    return made


def _plot_sharpness(groups: dict[str, dict[str, list[RunRecord]]], out: Path, mpl: tuple[Any, Any]
                    ) -> list[tuple[str, Path]]:
    Figure, Canvas = mpl
    made = []
    for setting, by_label in groups.items():
        pts = {
            label: [(s, 1.0 - r.test_at_best) for r in recs if (s := _sharpness(r)) is not None]
            for label, recs in by_label.items()
        }
        pts = {k: v for k, v in pts.items() if v}
        if not pts:
            continue
        metric = next(iter(by_label.values()))[0].metric
        fig, ax = _new_figure(Figure)
        for label, xy in pts.items():
            ax.scatter([x for x, _ in xy], [y for _, y in xy], label=label, s=18)
        made.append(_finish(
            fig, ax, Canvas, setting, "sharpness", f"test error (1 - {metric})",
            f"{setting}: test error vs sharpness", out / f"sharpness_{_slug(setting)}.png",
        ))
    return made


# ----------------------------------------------------------------------------- the report
def write_report(
    records: Iterable[RunRecord],
    out_dir: str | Path,
    *,
    baseline: str = "sgd",
    comparisons: Iterable[Comparison | tuple[str, Sequence[str] | str]] | None = None,
    title: str = "flatminima benchmark report",
    plots: bool = True,
) -> Path:
    """Write ``out_dir/report.md`` (and PNG plots next to it) and return its path.

    The report has the :func:`summary_table`, the :func:`win_matrix` with its k-of-n counts, the
    plots (see the module docstring; skipped with a note when matplotlib is missing or
    ``plots=False``) and a list of diverged runs."""
    recs = list(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _groups(recs)
    rows = summary_table(recs, baseline=baseline)
    wm = win_matrix(recs, comparisons)
    seeds = sorted({r.spec.seed for r in recs})
    now = datetime.datetime.now().isoformat(timespec="seconds")
    md = [
        f"# {title}",
        "",
        f"{len(recs)} runs, {len(groups)} settings, seeds {seeds}; generated {now}.",
        "",
        "Test metrics are taken at the epoch with the best validation metric (ties: the earliest) "
        "and averaged over seeds (± sample standard deviation). Time per step is the mean wall "
        "time of one optimizer step (all its forward/backward passes); peak memory is the peak "
        "over the run's start (CUDA: allocated tensors; CPU: resident set size).",
        "",
        "## Summary",
        "",
        format_summary(rows, baseline=baseline) if rows else "_no records_",
        "",
        "## Win matrix",
        "",
        wm.to_markdown(),
        "",
    ]
    counts = wm.counts()
    for c in wm.comparisons:
        k, n = counts[c.name]
        md.append(f"- {c.name}: {k} of {n} settings")
    if wm.comparisons:
        k, n = wm.total()
        md += [f"- all comparisons: {k} of {n}", ""]
    md += ["## Plots", ""]
    if not plots:
        md.append("_plots not requested_")
    else:
        try:
            from ..plotting import require_matplotlib

            mpl = require_matplotlib()
        except ImportError as exc:
            md.append(f"_plots skipped: {exc}_")
        else:
            made = _plot_time(groups, out, mpl) + _plot_rho(groups, out, mpl)
            made += _plot_sharpness(groups, out, mpl)
            if not made:
                md.append("_nothing to plot_")
            for caption, path in made:
                md += [f"### {caption}", "", f"![{caption}]({path.name})", ""]
    diverged = [r for r in recs if "diverged" in r.extra]
    if diverged:
        md += ["", "## Diverged runs", ""]
        for r in diverged:
            md.append(f"- {r.spec.describe()} ({setting_of(r)}): {r.extra['diverged']} "
                      f"after {r.epochs_run} epochs")
    md += ["", "## Runs", "", "| setting | optimizer | seed | key | hparams |", "|---|---|---:|---|---|"]
    for r in recs:
        md.append(f"| {setting_of(r)} | {r.label} | {r.spec.seed} | `{r.key[:12]}` "
                  f"| `{canonical_json(r.spec.hparams)}` |")
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
