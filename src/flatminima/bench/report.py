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
* :func:`claims`: verdicts (``"yes"``, ``"no"``, ``"unclear"`` or ``"not measured"``) on four
  claims of the papers behind the library, each with a one-line evidence string
  (:func:`format_claims` renders them):

  - *WASAM ≥ max(SAM, SWA)*: settings where ``sam_sgd+swa`` ≥ max(``sam_sgd``, ``sgd+swa``)
    (the win matrix's rule), k of n (the paper: 39 of 42); "yes" when k/n ≥
    :data:`WASAM_YES_FRACTION`, "no" when k/n < :data:`WASAM_NO_FRACTION`.
  - *Flat-minima methods gain more over SGD with label noise*: for each noisy setting whose clean
    twin (same task, size and budget) was run, and each of ``sam_sgd``, ``sgd+swa``,
    ``sam_sgd+swa``, whether its gain over ``sgd`` is larger with noise; "yes" / "no" at
    :data:`MAJORITY_YES_FRACTION` / :data:`MAJORITY_NO_FRACTION` of the pairs.
  - *SAM beats SGD at equal training time*: settings with a wall-clock budget where ``sam_sgd`` ≥
    ``sgd``, with the same thresholds.
  - *Flatter final models have lower test error*: per setting with at least
    :data:`SHARPNESS_MIN_RUNS` runs carrying ``extra["sharpness"]``, Spearman's correlation
    (:func:`spearman`) of the sharpness and the final test error over all its runs; "yes" when the
    median is ≥ :data:`SHARPNESS_YES_CORRELATION` and positive in :data:`MAJORITY_YES_FRACTION`
    of the settings, "no" when the median is ≤ 0.
  - *Monge-SAM is more robust to rho than SAM*: in settings where both ``sam_sgd`` and
    ``msam_sgd`` were run with at least :data:`MSAM_MIN_RHOS` values of ``rho``, the spread (best
    minus worst mean over ``rho``) of each; "yes" when Monge-SAM's is smaller in every such
    setting, "no" when larger in every one.
  - *ESAM costs less than SAM*: in settings with ``sgd``, ``sam_sgd`` and ``esam_sgd``, the time
    per step of each over ``sgd``'s; "yes" when ESAM's ratio is below SAM's in every setting and
    ESAM's metric is at most :data:`ESAM_TOLERANCE` below SAM's in more than
    :data:`ESAM_MOST_FRACTION` of them, "no" when ESAM is not cheaper in any.
  - *LETS ≥ best fixed rho*: for each label of LETS runs, its mean against the best mean of the
    same optimizer over the fixed values of ``rho`` it was run with (at least
    :data:`LETS_MIN_RHOS`; with a single one, e.g. only the default ``rho``, the evidence says
    "no rho sweep"); "yes" when LETS is at most :data:`LETS_TOLERANCE` below in every (setting,
    label) pair, "no" when further below in every one.

  Means are those of the summary table; the rho sweeps use the runs whose ``hparams`` set nothing
  but ``rho`` (LETS runs excluded), with ``rho`` from their ``optimizer_kwargs``. Tolerances are in
  units of the metric (``0.01`` is one point of a percent metric); evidence shows differences in
  points for percent metrics (:data:`_PERCENT`) and unscaled otherwise, as the table does.
* :func:`write_report`: ``report.md`` with the table, the win matrix, the claims and PNG plots (test
  metric vs training time per setting, test metric vs ``rho`` where an optimizer was run with
  several, final test error vs sharpness where records carry one in ``extra["sharpness"]``, and the
  radius learned by LETS per epoch, one line per run, with its starting ``rho`` dashed) drawn with
  matplotlib when it is installed (otherwise the report says the plots were skipped).

LETS runs (:class:`~flatminima.optim.lets.LETS` wrapping a SAM-family optimizer) are the records
whose ``spec.hparams`` has a ``"lets"`` key (its value: the LETS options, possibly ``{}``), labelled
e.g. ``sam_sgd+lets``; ``optimizer_kwargs["rho"]`` is the starting radius and
``stats_history[i]["rho"]`` the radius at the end of epoch ``i + 1``. They are left out of the
test metric vs ``rho`` plots and of the rho sweeps of the claims.
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
    "ESAM_MOST_FRACTION",
    "ESAM_TOLERANCE",
    "LETS_MIN_RHOS",
    "LETS_TOLERANCE",
    "MAJORITY_NO_FRACTION",
    "MAJORITY_YES_FRACTION",
    "MSAM_MIN_RHOS",
    "SHARPNESS_MIN_RUNS",
    "SHARPNESS_YES_CORRELATION",
    "VERDICTS",
    "WASAM_NO_FRACTION",
    "WASAM_YES_FRACTION",
    "Claim",
    "Comparison",
    "WinMatrix",
    "claims",
    "default_comparisons",
    "format_claims",
    "format_pivot",
    "format_summary",
    "setting_of",
    "spearman",
    "summary_table",
    "win_matrix",
    "write_report",
]

#: Metrics shown as percentages.
_PERCENT = frozenset({"accuracy", "acc", "top1", "top5", "balanced_accuracy", "f1", "macro_f1",
                      "auc", "auroc", "win_rate"})

#: Claim verdicts.
VERDICTS = ("yes", "no", "unclear", "not measured")
#: WASAM claim: "yes" when ``sam_sgd+swa`` wins in at least this fraction of the settings.
WASAM_YES_FRACTION = 0.75
#: WASAM claim: "no" when it wins in less than this fraction.
WASAM_NO_FRACTION = 0.5
#: Monge-SAM claim: distinct ``rho`` values needed for both ``sam_sgd`` and ``msam_sgd``.
MSAM_MIN_RHOS = 3
#: ESAM claim: how far (metric units; 0.01 = 1 point) ESAM's mean may be below SAM's.
ESAM_TOLERANCE = 0.01
#: ESAM claim: ESAM must be within :data:`ESAM_TOLERANCE` in more than this fraction of settings.
ESAM_MOST_FRACTION = 0.5
#: LETS claim: how far (metric units; 0.005 = half a point) LETS may be below the best fixed rho.
LETS_TOLERANCE = 0.005
#: LETS claim: distinct fixed ``rho`` values that make a sweep (fewer: "no rho sweep").
LETS_MIN_RHOS = 2
#: Share of comparisons above which "helps more with noise" / "SAM wins at equal time" is a yes,
#: and below which it is a no.
MAJORITY_YES_FRACTION = 0.75
MAJORITY_NO_FRACTION = 0.5
#: Median within-setting Spearman correlation of sharpness and final test error for a "yes".
SHARPNESS_YES_CORRELATION = 0.3
#: Fewest runs with a sharpness in a setting for its correlation to count.
SHARPNESS_MIN_RUNS = 5
#: Round-off absorbed by the claims' comparisons of means (as :func:`win_matrix`'s ``tol``).
_EPS = 1e-9


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


def _fmt_delta(value: float, metric: str, *, signed: bool = True, unit: bool = True) -> str:
    """A difference of ``metric`` values scaled as the table scales the metric: ``"+1.25 points"``
    for a percent metric, ``"+0.0125 recall@1"`` otherwise (without the unit: ``unit=False``)."""
    sign = "+" if signed else ""
    if metric in _PERCENT:
        return f"{100 * value:{sign}.2f}" + (" points" if unit else "")
    return f"{value:{sign}.4f}" + (f" {metric}" if unit else "")


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
    at: str = "best",
) -> WinMatrix:
    """Decide every comparison in every setting on the means over seeds of the test metric at the
    validation-chosen epoch (``at="best"``) or at the last epoch (``at="final"``): ``a`` wins when
    ``mean(a) >= max(mean(b) for b in others) - tol``
    (ties win; the default ``tol`` only absorbs floating-point round-off in the means).
    ``comparisons``: :class:`Comparison` objects or ``(a, others)`` pairs; default
    :func:`default_comparisons` of the labels present."""
    if at not in ("best", "final"):
        raise ValueError(f"invalid at={at!r} (must be 'best' or 'final')")
    groups = _groups(records)
    means = {
        (setting, label): _mean_std([r.test_at_best if at == "best" else r.final_test_metric
                                     for r in recs])[0]
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


def format_pivot(rows: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None, *,
                 value: str = "test", best: bool = True) -> str:
    """A compact Markdown matrix of :func:`summary_table` rows: one row per setting, one column
    per optimizer label (``labels``, default: every label in order of first appearance), cells
    ``mean ± std`` of the ``value`` (``"test"``: at the validation-chosen epoch; ``"final"``: at
    the last epoch; ``"time"``: the time ratio to the baseline, ``1.93x``). With ``best`` the best
    mean of a row is bold (metrics: highest; time: lowest). Settings that lack every label are
    left out; a missing cell is ``-``."""
    if value not in ("test", "final", "time"):
        raise ValueError(f"invalid value={value!r} (must be 'test', 'final' or 'time')")
    by_setting: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], {})[row["optimizer"]] = row
    cols = list(labels) if labels is not None else list(
        dict.fromkeys(row["optimizer"] for row in rows))
    lines = ["| setting | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for setting, cells in by_setting.items():
        present = [c for c in cols if c in cells]
        if not present:
            continue
        if value == "time":
            means = {c: cells[c]["time_ratio"] for c in present}
        else:
            means = {c: cells[c][f"{value}_mean"] for c in present}
        finite = [v for v in means.values() if not math.isnan(v)]
        top = (min(finite) if value == "time" else max(finite)) if finite else None
        out = []
        for c in cols:
            if c not in cells:
                out.append("-")
                continue
            row = cells[c]
            if value == "time":
                text = "n/a" if math.isnan(row["time_ratio"]) else f"{row['time_ratio']:.2f}x"
            else:
                text = _pm(row[f"{value}_mean"], row[f"{value}_std"], row["metric"])
            if best and top is not None and means[c] == top:
                text = f"**{text}**"
            out.append(text)
        metric = next(iter(cells.values()))["metric"]
        unit = "" if value == "time" else (" (%)" if metric in _PERCENT else f" ({metric})")
        lines.append(f"| {setting}{unit} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _common_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The optimizer labels of the glance table, in order of first appearance: those run in at
    least two settings (every label when there is one setting), without hparam variants (labels
    with ``[...]``, e.g. a rho sweep's ``sam_sgd[rho=0.1]``)."""
    settings = {row["setting"] for row in rows}
    count: dict[str, int] = {}
    for row in rows:
        count[row["optimizer"]] = count.get(row["optimizer"], 0) + 1
    need = 1 if len(settings) == 1 else 2
    return [lab for lab, k in count.items() if k >= need and "[" not in lab]


# ----------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Claim:
    """The verdict on one claim: ``verdict`` is one of :data:`VERDICTS`, ``evidence`` one line with
    the numbers (scaled as in the table), ``data`` the numbers behind it per setting, in units of
    the metric (not scaled to points)."""

    name: str
    verdict: str
    evidence: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def _range_text(deltas: Sequence[tuple[float, str]]) -> str:
    """Mean and range of per-setting differences ``(value, metric)``, one part per unit (percent
    metrics together, in points): ``"mean -1.50 points (-5.00 to +2.00)"``."""
    by_unit: dict[str, list[tuple[float, str]]] = {}
    for v, m in deltas:
        by_unit.setdefault("%" if m in _PERCENT else m, []).append((v, m))
    parts = []
    for vals in by_unit.values():
        m, xs = vals[0][1], [v for v, _ in vals]
        parts.append(f"mean {_fmt_delta(statistics.fmean(xs), m)} "
                     f"({_fmt_delta(min(xs), m, unit=False)} to {_fmt_delta(max(xs), m, unit=False)})")
    return "; ".join(parts)


def _claim_wasam(records: Sequence[RunRecord], rows: Mapping[tuple[str, str], Mapping[str, Any]]
                 ) -> Claim:
    name = "WASAM ≥ max(SAM, SWA)"
    comp = Comparison("sam_sgd+swa", ("sam_sgd", "sgd+swa"))
    wm = win_matrix(records, [comp])
    k, n = wm.counts()[comp.name]
    if n == 0:
        return Claim(name, "not measured", "no setting has sam_sgd+swa, sam_sgd and sgd+swa")
    margins = {s: wm.margins[(comp.name, s)] for s in wm.settings if (comp.name, s) in wm.margins}
    frac = k / n
    verdict = ("yes" if frac >= WASAM_YES_FRACTION else "no" if frac < WASAM_NO_FRACTION
               else "unclear")
    deltas = [(v, rows[(s, comp.a)]["metric"]) for s, v in margins.items()]
    # the paper compares the final models; the val-chosen epoch may precede the averaging
    k_final, n_final = win_matrix(records, [comp], at="final").counts()[comp.name]
    return Claim(name, verdict,
                 f"{k} of {n} settings (paper: 39/42); margin over the better of SAM and SWA: "
                 f"{_range_text(deltas)}; at the last epoch (the final models): {k_final} of "
                 f"{n_final}",
                 {"k": k, "n": n, "margins": margins, "k_final": k_final, "n_final": n_final})


def _claim_msam(groups: Mapping[str, Mapping[str, Sequence[RunRecord]]]) -> Claim:
    name = "Monge-SAM is more robust to rho than SAM"
    opts = ("sam_sgd", "msam_sgd")
    spreads: dict[str, dict[str, float]] = {}
    rhos: dict[str, dict[str, list[float]]] = {}
    parts = []
    for setting, by_label in groups.items():
        pts = _rho_points((r for recs in by_label.values() for r in recs), only_rho=True)
        means = {o: {rho: m for rho, vals in pts.get(o, {}).items()
                     if not math.isnan(m := _mean_std(vals)[0])} for o in opts}
        if any(len(means[o]) < MSAM_MIN_RHOS for o in opts):
            continue
        metric = next(iter(by_label.values()))[0].metric
        spreads[setting] = {o: max(means[o].values()) - min(means[o].values()) for o in opts}
        rhos[setting] = {o: sorted(means[o]) for o in opts}
        sp, rh = spreads[setting], rhos[setting]
        parts.append(
            f"{setting}: SAM {_fmt_delta(sp['sam_sgd'], metric, signed=False)} over rho "
            f"{rh['sam_sgd'][0]:g}–{rh['sam_sgd'][-1]:g}, Monge-SAM "
            f"{_fmt_delta(sp['msam_sgd'], metric, signed=False)} over rho "
            f"{rh['msam_sgd'][0]:g}–{rh['msam_sgd'][-1]:g}")
    if not spreads:
        return Claim(name, "not measured", f"no setting has sam_sgd and msam_sgd each run with "
                     f"at least {MSAM_MIN_RHOS} values of rho")
    smaller = sum(sp["msam_sgd"] < sp["sam_sgd"] - _EPS for sp in spreads.values())
    larger = sum(sp["msam_sgd"] > sp["sam_sgd"] + _EPS for sp in spreads.values())
    n = len(spreads)
    verdict = "yes" if smaller == n else "no" if larger == n else "unclear"
    return Claim(name, verdict,
                 f"spread of the mean over rho (best - worst) smaller for Monge-SAM in {smaller} of "
                 f"{n} settings: " + "; ".join(parts),
                 {"spreads": spreads, "rhos": rhos})


def _claim_esam(rows: Mapping[tuple[str, str], Mapping[str, Any]], settings: Sequence[str]
                ) -> Claim:
    name = "ESAM costs less than SAM (paper: ~1.4x SGD)"
    per: dict[str, dict[str, Any]] = {}
    for s in settings:
        sam, esam = rows.get((s, "sam_sgd")), rows.get((s, "esam_sgd"))
        if sam is None or esam is None:
            continue
        vals = {"esam_ratio": esam["time_ratio"], "sam_ratio": sam["time_ratio"],
                "diff": esam["test_mean"] - sam["test_mean"]}
        if not any(math.isnan(v) for v in vals.values()):  # time ratios are NaN without sgd
            per[s] = {**vals, "metric": esam["metric"]}
    if not per:
        return Claim(name, "not measured",
                     "no setting has sgd, sam_sgd and esam_sgd (with step times and test metrics)")
    n = len(per)
    cheaper = sum(v["esam_ratio"] < v["sam_ratio"] for v in per.values())
    close = sum(v["diff"] >= -ESAM_TOLERANCE - _EPS for v in per.values())
    verdict = ("yes" if cheaper == n and close > ESAM_MOST_FRACTION * n
               else "no" if cheaper == 0 else "unclear")

    def ratios(key: str) -> str:
        xs = [v[key] for v in per.values()]
        return f"median {statistics.median(xs):.2f}x ({min(xs):.2f}x to {max(xs):.2f}x)"

    return Claim(name, verdict,
                 f"time per step vs sgd: ESAM {ratios('esam_ratio')}, SAM {ratios('sam_ratio')}; "
                 f"ESAM cheaper than SAM in {cheaper} of {n} settings, at most "
                 f"{100 * ESAM_TOLERANCE:g} point(s) below SAM in {close} of {n}; ESAM - SAM: "
                 + _range_text([(v["diff"], v["metric"]) for v in per.values()]),
                 {"settings": per, "cheaper": cheaper, "close": close, "n": n})


def _claim_lets(groups: Mapping[str, Mapping[str, Sequence[RunRecord]]]) -> Claim:
    name = "LETS ≥ best fixed rho"
    per: dict[str, dict[str, dict[str, Any]]] = {}
    parts, oks = [], []
    seen = False
    for setting, by_label in groups.items():
        pts = _rho_points((r for recs in by_label.values() for r in recs), only_rho=True)
        for label, recs in by_label.items():
            lets = [r for r in recs if _is_lets(r)]
            if not lets:
                continue
            seen = True
            opt, metric = lets[0].spec.optimizer, lets[0].metric
            fixed = {rho: m for rho, vals in sorted(pts.get(opt, {}).items())
                     if not math.isnan(m := _mean_std(vals)[0])}
            mean = _mean_std([r.test_at_best for r in lets])[0]
            if not fixed or math.isnan(mean):
                continue
            best_rho = max(fixed, key=fixed.__getitem__)  # ties: the smallest rho
            best = fixed[best_rho]
            sweep = len(fixed) >= LETS_MIN_RHOS
            gap = mean - best
            oks.append(gap >= -LETS_TOLERANCE - _EPS)
            per.setdefault(setting, {})[label] = {
                "lets": mean, "best": best, "best_rho": best_rho, "rhos": list(fixed),
                "sweep": sweep, "gap": gap, "metric": metric}
            where = (f"best of {opt} over {len(fixed)} rho in {min(fixed):g}–{max(fixed):g}, at "
                     f"rho={best_rho:g}" if sweep else f"no rho sweep: {opt} at rho={best_rho:g}")
            parts.append(f"{setting}: {label} {_fmt_metric(mean, metric)} vs "
                         f"{_fmt_metric(best, metric)} ({where}), {_fmt_delta(gap, metric)}")
    if not oks:
        why = ("LETS runs but no fixed-rho run of the same optimizer in their settings" if seen
               else "no LETS runs (records with hparams['lets'])")
        return Claim(name, "not measured", why)
    n, k = len(oks), sum(oks)
    verdict = "yes" if k == n else "no" if k == 0 else "unclear"
    return Claim(name, verdict,
                 f"LETS at most {100 * LETS_TOLERANCE:g} point(s) below the best fixed rho in {k} "
                 f"of {n} (setting, label) pairs: " + "; ".join(parts),
                 {"settings": per, "k": k, "n": n})


def _verdict(k: int, n: int) -> str:
    frac = k / n
    return ("yes" if frac >= MAJORITY_YES_FRACTION else "no" if frac < MAJORITY_NO_FRACTION
            else "unclear")


def _claim_noise(rows: Mapping[tuple[str, str], Mapping[str, Any]], recs: Sequence[RunRecord]
                 ) -> Claim:
    name = "Flat-minima methods gain more over SGD with label noise"
    # the clean setting of a noisy one: same task, size and budget
    info: dict[str, tuple[tuple[str, str, str], float]] = {}
    for r in recs:
        s = r.spec
        info[setting_of(r)] = ((s.task, s.size, s.budget_text()), s.label_noise)
    clean = {key: st for st, (key, noise) in info.items() if noise == 0}
    comps: list[tuple[str, str, float, float, str]] = []
    for st, (key, noise) in info.items():
        if noise == 0 or key not in clean:
            continue
        cst = clean[key]
        for opt in ("sam_sgd", "sgd+swa", "sam_sgd+swa"):
            need = [(st, opt), (st, "sgd"), (cst, opt), (cst, "sgd")]
            if not all(k in rows for k in need):
                continue
            noisy_gain = rows[(st, opt)]["test_mean"] - rows[(st, "sgd")]["test_mean"]
            clean_gain = rows[(cst, opt)]["test_mean"] - rows[(cst, "sgd")]["test_mean"]
            if not (math.isnan(noisy_gain) or math.isnan(clean_gain)):
                comps.append((st, opt, noisy_gain, clean_gain, rows[(st, opt)]["metric"]))
    if not comps:
        return Claim(name, "not measured", "no noisy setting with sgd and a flat-minima method "
                     "next to its clean twin (same task, size and budget)")
    k, n = sum(ng > cg + _EPS for _, _, ng, cg, _ in comps), len(comps)
    by_opt = {}
    for _, opt, ng, cg, m in comps:
        by_opt.setdefault(opt, []).append((ng - cg, m))
    detail = "; ".join(f"{opt}: gain with noise minus gain without {_range_text(d)}"
                       for opt, d in by_opt.items())
    return Claim(name, _verdict(k, n),
                 f"the gain over SGD is larger with noise in {k} of {n} (setting, optimizer) pairs; "
                 + detail,
                 {"k": k, "n": n, "pairs": [(st, o, ng, cg) for st, o, ng, cg, _ in comps]})


def _claim_equal_time(rows: Mapping[tuple[str, str], Mapping[str, Any]], recs: Sequence[RunRecord]
                      ) -> Claim:
    name = "SAM beats SGD at equal training time"
    timed = list(dict.fromkeys(setting_of(r) for r in recs if r.spec.seconds is not None))
    diffs = {st: (rows[(st, "sam_sgd")]["test_mean"] - rows[(st, "sgd")]["test_mean"],
                  rows[(st, "sam_sgd")]["metric"])
             for st in timed if (st, "sam_sgd") in rows and (st, "sgd") in rows}
    diffs = {st: d for st, d in diffs.items() if not math.isnan(d[0])}
    if not diffs:
        return Claim(name, "not measured", "no wall-clock-budget setting with sgd and sam_sgd")
    k, n = sum(d >= -_EPS for d, _ in diffs.values()), len(diffs)
    return Claim(name, _verdict(k, n),
                 f"SAM ≥ SGD with the same training time in {k} of {n} settings; SAM - SGD: "
                 + _range_text(list(diffs.values())),
                 {"k": k, "n": n, "diffs": {st: d for st, (d, _) in diffs.items()}})


def _ranks(xs: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties averaged."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on the tie-averaged ranks); NaN when either side
    is constant or there are fewer than 2 points."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman: {len(xs)} x values but {len(ys)} y values")
    if len(xs) < 2:
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _claim_sharpness(groups: Mapping[str, Mapping[str, Sequence[RunRecord]]]) -> Claim:
    name = "Flatter final models have lower test error"
    corr: dict[str, float] = {}
    for setting, by_label in groups.items():
        pts = [(sh, 1.0 - r.final_test_metric) for recs in by_label.values() for r in recs
               if (sh := _sharpness(r)) is not None and not math.isnan(r.final_test_metric)]
        if len(pts) >= SHARPNESS_MIN_RUNS:
            c = spearman([p[0] for p in pts], [p[1] for p in pts])
            if not math.isnan(c):
                corr[setting] = c
    if not corr:
        return Claim(name, "not measured", f"no setting with {SHARPNESS_MIN_RUNS} or more runs "
                     "carrying a sharpness (extra['sharpness'])")
    med = statistics.median(corr.values())
    pos, n = sum(c > 0 for c in corr.values()), len(corr)
    verdict = ("yes" if med >= SHARPNESS_YES_CORRELATION and pos >= MAJORITY_YES_FRACTION * n
               else "no" if med <= 0 else "unclear")
    return Claim(name, verdict,
                 f"Spearman correlation of the top Hessian eigenvalue and the final test error over "
                 f"the runs of a setting: median {med:+.2f} ({min(corr.values()):+.2f} to "
                 f"{max(corr.values()):+.2f}), positive in {pos} of {n} settings",
                 {"correlations": corr, "median": med})


def claims(records: Iterable[RunRecord]) -> list[Claim]:
    """Verdicts on the papers' claims, from the means over seeds of the test metric at the
    validation-chosen epoch (and of the time per step), per setting: WASAM ≥ max(SAM, SWA),
    larger gains over SGD with label noise, SAM ≥ SGD at equal time, flatter final models with
    lower test error, Monge-SAM more robust to ``rho`` than SAM, ESAM cheaper than SAM, LETS ≥ the
    best fixed ``rho``. The rules and thresholds are in the module docstring; a claim whose runs are
    missing is ``"not measured"``."""
    recs = list(records)
    groups = _groups(recs)
    rows = {(row["setting"], row["optimizer"]): row for row in summary_table(recs)}
    return [_claim_wasam(recs, rows), _claim_noise(rows, recs), _claim_equal_time(rows, recs),
            _claim_sharpness(groups), _claim_msam(groups), _claim_esam(rows, list(groups)),
            _claim_lets(groups)]


def format_claims(items: Sequence[Claim]) -> str:
    """Markdown bullets, one per claim: ``- **name**: verdict — evidence``."""
    if not items:
        return "_no claims_"
    return "\n".join(f"- **{c.name}**: {c.verdict} — {c.evidence}" for c in items)


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


def _is_lets(record: RunRecord) -> bool:
    """Whether a record is a LETS run: its ``spec.hparams`` has a ``"lets"`` key (the LETS options,
    possibly ``{}``; ``None`` or ``False`` there mean no LETS)."""
    value = record.spec.hparams.get("lets")
    return "lets" in record.spec.hparams and value is not None and value is not False


def _rho_points(records: Iterable[RunRecord], *, only_rho: bool = False
                ) -> dict[str, dict[float, list[float]]]:
    """optimizer (registry name) -> ``rho`` -> test metrics at the val-chosen epoch, of the records
    with a known ``rho`` (:func:`_rho`), LETS runs excluded (their ``rho`` is only the start).
    ``only_rho``: keep only the records whose ``hparams`` set nothing but ``rho`` (a clean sweep:
    the default-``rho`` run and its ``[rho=x]`` variants)."""
    out: dict[str, dict[float, list[float]]] = {}
    for r in records:
        if _is_lets(r) or (only_rho and set(r.spec.hparams) - {"rho"}):
            continue
        rho = _rho(r)
        if rho is not None:
            out.setdefault(r.spec.optimizer, {}).setdefault(rho, []).append(r.test_at_best)
    return out


def _plot_rho(groups: dict[str, dict[str, list[RunRecord]]], out: Path, mpl: tuple[Any, Any]
              ) -> list[tuple[str, Path]]:
    Figure, Canvas = mpl
    made = []
    for setting, by_label in groups.items():
        by_opt = _rho_points(r for recs in by_label.values() for r in recs)
        varied = {opt: pts for opt, pts in by_opt.items() if len(pts) >= 2}
        if not varied:
            continue
        metric = next(iter(by_label.values()))[0].metric
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


def _lets_curves(by_label: Mapping[str, Sequence[RunRecord]]
                 ) -> dict[str, list[tuple[RunRecord, list[tuple[int, float]]]]]:
    """label -> ``[(record, [(epoch, rho), ...]), ...]`` for the LETS runs of one setting: the
    learned ``rho`` at the end of each epoch (1-based), from ``stats_history[i]["rho"]``; epochs
    without a finite one are skipped, runs and labels left with none are dropped."""
    out: dict[str, list[tuple[RunRecord, list[tuple[int, float]]]]] = {}
    for label, recs in by_label.items():
        for r in recs:
            if not _is_lets(r):
                continue
            pts = []
            for i, stats in enumerate(r.stats_history):
                v = stats.get("rho") if isinstance(stats, Mapping) else None
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    pts.append((i + 1, float(v)))
            if pts:
                out.setdefault(label, []).append((r, pts))
    return out


def _plot_lets(groups: dict[str, dict[str, list[RunRecord]]], out: Path, mpl: tuple[Any, Any]
               ) -> list[tuple[str, Path]]:
    Figure, Canvas = mpl
    made = []
    for setting, by_label in groups.items():
        curves = _lets_curves(by_label)
        if not curves:
            continue
        fig, ax = _new_figure(Figure)
        positive = True
        starts: dict[float, str] = {}  # starting rho -> colour of the first label that used it
        for i, (label, runs) in enumerate(curves.items()):
            color = f"C{i % 10}"
            for j, (r, pts) in enumerate(runs):
                ax.plot([e for e, _ in pts], [x for _, x in pts], color=color, linewidth=0.8,
                        marker="o", markersize=2, label=f"{label} (n={len(runs)})" if j == 0 else None)
                positive = positive and all(x > 0 for _, x in pts)
                rho0 = _rho(r)
                if rho0 is not None:
                    starts.setdefault(rho0, color)
        for rho0, color in starts.items():
            ax.axhline(rho0, color=color, linestyle="--", linewidth=1, label=f"start rho={rho0:g}")
            positive = positive and rho0 > 0
        if positive:
            ax.set_yscale("log")
        from matplotlib.ticker import MaxNLocator  # matplotlib is there: mpl came from it

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        made.append(_finish(
            fig, ax, Canvas, setting, "epoch", "rho learned by LETS (end of epoch)",
            f"{setting}: LETS radius per epoch", out / f"lets_{_slug(setting)}.png",
        ))
    return made


def _plot_sharpness(groups: dict[str, dict[str, list[RunRecord]]], out: Path, mpl: tuple[Any, Any]
                    ) -> list[tuple[str, Path]]:
    Figure, Canvas = mpl
    made = []
    for setting, by_label in groups.items():
        pts = {
            # the sharpness is that of the final model, so its error is the last epoch's
            label: [(s, 1.0 - r.final_test_metric) for r in recs if (s := _sharpness(r)) is not None]
            for label, recs in by_label.items()
        }
        pts = {k: v for k, v in pts.items() if v}
        if not pts:
            continue
        first = next(iter(by_label.values()))[0]
        metric = first.metric
        info = first.extra.get("sharpness_info")
        xlabel = ("top Hessian eigenvalue of the final model"
                  if isinstance(info, Mapping) and info.get("measure") == "hessian_top_eigenvalue"
                  else "sharpness")
        fig, ax = _new_figure(Figure)
        for label, xy in pts.items():
            ax.scatter([x for x, _ in xy], [y for _, y in xy], label=label, s=18)
        if all(x > 0 for xy in pts.values() for x, _ in xy):
            ax.set_xscale("log")
        made.append(_finish(
            fig, ax, Canvas, setting, xlabel, f"final test error (1 - {metric})",
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
    :func:`claims`, the plots (see the module docstring; skipped with a note when matplotlib is
    missing or ``plots=False``) and a list of diverged runs."""
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
        "## At a glance",
        "",
        "Test metric at the validation-chosen epoch (mean ± std over seeds; the best of a row in "
        "bold) of the optimizers run in at least two settings (hparam variants such as a rho "
        f"sweep are in the summary), then their time per step relative to {baseline}.",
        "",
        format_pivot(rows, _common_labels(rows)) if rows else "_no records_",
        "",
        format_pivot(rows, _common_labels(rows), value="time") if rows else "",
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
    md += [
        "## Claims",
        "",
        "Verdicts (yes / no / unclear / not measured) on the means above; rules and thresholds in "
        "`flatminima.bench.report`. Differences are in points for percent metrics.",
        "",
        format_claims(claims(recs)),
        "",
        "## Plots",
        "",
    ]
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
            made += _plot_sharpness(groups, out, mpl) + _plot_lets(groups, out, mpl)
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
