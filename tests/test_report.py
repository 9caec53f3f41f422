"""Benchmark reports on hand-made records: summary statistics, win matrix counts, report.md and plots."""

from __future__ import annotations

import math
import statistics

import pytest

from flatminima.bench.report import (
    Comparison,
    default_comparisons,
    format_summary,
    setting_of,
    summary_table,
    win_matrix,
    write_report,
)
from flatminima.bench.store import EpochRecord, RunRecord, RunSpec


def _rec(task, optimizer, seed, acc, *, ms=1.0, hparams=None, rho=None, sharpness=None, mem=None):
    """Three epochs; validation peaks at epoch 2, where the test accuracy is ``acc``; the last
    epoch's test accuracy is ``acc - 0.02``."""
    spec = RunSpec(task, optimizer, seed=seed, budget={"epochs": 3}, hparams=hparams or {})
    tests = [acc - 0.1, acc, acc - 0.02]
    vals = [0.5, 0.7, 0.6]
    epochs = [
        EpochRecord(epoch=i + 1, steps=10 * (i + 1), train_seconds=0.5 * (i + 1) * ms,
                    train_loss=1.0 / (i + 1), val={"accuracy": v, "loss": 1.0},
                    test={"accuracy": t, "loss": 1.0})
        for i, (v, t) in enumerate(zip(vals, tests))
    ]
    kwargs = {"lr": 0.05}
    if rho is not None:
        kwargs["rho"] = rho
    return RunRecord(
        spec=spec, epochs=epochs, best_epoch=2, best_val=epochs[1].val, best_test=epochs[1].test,
        final_val=epochs[2].val, final_test=epochs[2].test, steps=30, ms_per_step=ms,
        ms_per_step_median=ms, peak_memory_bytes=None if mem is None else 1000 + mem,
        base_memory_bytes=None if mem is None else 1000, optimizer_kwargs=kwargs,
        extra={} if sharpness is None else {"sharpness": sharpness},
    )


# Mean test accuracy (at the validation-chosen epoch) per task and optimizer, over seeds 0, 1, 2.
ACC = {
    "task-a": {"sgd": [0.80, 0.82, 0.84], "sam_sgd": [0.87, 0.88, 0.89],
               "sgd+swa": [0.85, 0.85, 0.85], "sam_sgd+swa": [0.89, 0.90, 0.91],
               "asam_sgd+swa": [0.95, 0.95, 0.95], "msam_sgd+swa": [0.90, 0.91, 0.92],
               "msam_sgd": [0.91, 0.91, 0.91]},
    "task-b": {"sgd": [0.60, 0.70, 0.65], "sam_sgd": [0.74, 0.75, 0.76],
               "sgd+swa": [0.70, 0.70, 0.70], "sam_sgd+swa": [0.69, 0.70, 0.71]},
}
MS = {"sgd": 2.0, "sam_sgd": 4.0, "sgd+swa": 2.2, "sam_sgd+swa": 4.4, "asam_sgd+swa": 5.0,
      "msam_sgd+swa": 4.6, "msam_sgd": 4.2}


def _records():
    recs = []
    for task, by_opt in ACC.items():
        for opt, accs in by_opt.items():
            for seed, acc in enumerate(accs):
                recs.append(_rec(task, opt, seed, acc, ms=MS[opt] + 0.1 * seed, mem=2**20 * (seed + 1),
                                 sharpness=1.0 - acc if opt.startswith("sam") else None))
    # A rho sweep of sam_sgd on task-a (labels carry the rho).
    for rho in (0.02, 0.1):
        for seed in (0, 1):
            recs.append(_rec("task-a", "sam_sgd", seed, 0.8 + rho + 0.01 * seed, hparams={"rho": rho},
                             rho=rho, ms=4.0))
    return recs


def test_summary_table_matches_hand_computed_values():
    rows = summary_table(_records())
    by = {(r["task"], r["optimizer"]): r for r in rows}
    setting = setting_of(_records()[0])
    assert setting == "task-a (quick, 3 epochs)"
    assert len(rows) == 7 + 4 + 2  # 7 + 4 optimizers, plus 2 rho variants on task-a
    sgd_a = by[("task-a", "sgd")]
    assert sgd_a["runs"] == 3 and sgd_a["setting"] == setting and sgd_a["metric"] == "accuracy"
    assert sgd_a["test_mean"] == pytest.approx(0.82) and sgd_a["test_std"] == pytest.approx(0.02)
    assert sgd_a["final_mean"] == pytest.approx(0.80) and sgd_a["final_std"] == pytest.approx(0.02)
    assert sgd_a["best_epoch_mean"] == 2 and sgd_a["epochs_mean"] == 3
    assert sgd_a["ms_per_step"] == pytest.approx(2.1) and sgd_a["time_ratio"] == pytest.approx(1.0)
    assert sgd_a["peak_mib"] == pytest.approx(2.0)
    sgd_b = by[("task-b", "sgd")]
    assert sgd_b["test_mean"] == pytest.approx(0.65)
    assert sgd_b["test_std"] == pytest.approx(statistics.stdev([0.60, 0.70, 0.65]))
    assert sgd_b["test_std"] == pytest.approx(0.05)
    sam_b = by[("task-b", "sam_sgd")]
    assert sam_b["test_mean"] == pytest.approx(0.75) and sam_b["test_std"] == pytest.approx(0.01)
    assert sam_b["time_ratio"] == pytest.approx(4.1 / 2.1)
    rho_row = by[("task-a", "sam_sgd[rho=0.1]")]
    assert rho_row["runs"] == 2 and rho_row["test_mean"] == pytest.approx(0.905)
    assert rho_row["test_std"] == pytest.approx(math.sqrt(0.01**2 / 2))
    # One run: std is NaN, shown without "±"; no baseline: ratio NaN.
    one = summary_table([_rec("t", "sam_sgd", 0, 0.5)])
    assert math.isnan(one[0]["test_std"]) and math.isnan(one[0]["time_ratio"])
    text = format_summary(one)
    assert "| t (quick, 3 epochs) | sam_sgd | 1 | 50.00 % | 48.00 % | 2.0/3.0 | 1.000 | n/a | n/a |" in text


def test_win_matrix_counts():
    recs = _records()
    comps = default_comparisons(r.label for r in recs)
    assert [c.name for c in comps] == [
        "sam_sgd+swa ≥ max(sam_sgd, sgd+swa)",
        "asam_sgd+swa ≥ max(asam_sgd, sgd+swa)",
        "msam_sgd+swa ≥ max(msam_sgd, sgd+swa)",
    ]
    wm = win_matrix(recs)
    sa, sb = "task-a (quick, 3 epochs)", "task-b (quick, 3 epochs)"
    assert wm.settings == [sa, sb]
    wasam = comps[0].name
    assert wm.cells[(wasam, sa)] is True  # 0.90 >= max(0.88, 0.85)
    assert wm.margins[(wasam, sa)] == pytest.approx(0.02)
    assert wm.cells[(wasam, sb)] is False  # 0.70 < max(0.75, 0.70)
    assert wm.cells[(comps[1].name, sa)] is None  # asam_sgd missing: not counted
    assert wm.cells[(comps[2].name, sa)] is True  # 0.91 >= max(0.91, 0.85): a tie wins
    assert wm.cells[(comps[2].name, sb)] is None
    assert wm.counts() == {comps[0].name: (1, 2), comps[1].name: (0, 0), comps[2].name: (1, 1)}
    assert wm.total() == (2, 3)
    # Generic comparisons, and a tolerance.
    wm2 = win_matrix(recs, [("sam_sgd", ["sgd"]), Comparison("sgd+swa", ("sam_sgd",))])
    assert wm2.counts() == {"sam_sgd ≥ sgd": (2, 2), "sgd+swa ≥ sam_sgd": (0, 2)}
    wm3 = win_matrix(recs, [("sgd+swa", "sam_sgd")], tol=0.04)
    assert wm3.counts() == {"sgd+swa ≥ sam_sgd": (1, 2)}  # task-a: 0.85 >= 0.88 - 0.04
    md = wm.to_markdown()
    assert "| **k of n** | **1 of 2** | **0 of 0** | **1 of 1** |" in md
    assert f"| {sb} | no (-0.0500) | – | – |" in md


def test_write_report(tmp_path):
    recs = _records()
    path = write_report(recs, tmp_path / "out")
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text(encoding="utf-8")
    assert "| task-a (quick, 3 epochs) | sgd | 3 | 82.00 ± 2.00 % | 80.00 ± 2.00 % | 2.0/3.0 " in text
    assert "| task-b (quick, 3 epochs) | sam_sgd | 3 | 75.00 ± 1.00 % |" in text
    assert "| 1.95x |" in text  # sam_sgd on task-b: 4.1 / 2.1 ms per step
    assert "- sam_sgd+swa ≥ max(sam_sgd, sgd+swa): 1 of 2 settings" in text
    assert "- all comparisons: 2 of 3" in text
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == [
        "rho_task-a-quick-3-epochs.png",
        "sharpness_task-a-quick-3-epochs.png",
        "sharpness_task-b-quick-3-epochs.png",
        "time_task-a-quick-3-epochs.png",
        "time_task-b-quick-3-epochs.png",
    ]
    for name in pngs:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    assert text.count("\n| task-") >= len(recs)  # the per-run list

    # Without plots (as when matplotlib is missing) the report is still written, with a note.
    text = write_report(recs, tmp_path / "bare", plots=False).read_text(encoding="utf-8")
    assert "_plots not requested_" in text and not list((tmp_path / "bare").glob("*.png"))


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    import flatminima.plotting as plotting

    def missing():
        raise ImportError("no matplotlib here")

    monkeypatch.setattr(plotting, "require_matplotlib", missing)
    text = write_report([_rec("t", "sgd", 0, 0.5)], tmp_path).read_text(encoding="utf-8")
    assert "_plots skipped: no matplotlib here_" in text and not list(tmp_path.glob("*.png"))
