"""Benchmark reports on hand-made records: summary statistics, win matrix counts, report.md and plots."""

from __future__ import annotations

import math
import statistics

import pytest

from flatminima.bench.report import (
    VERDICTS,
    Claim,
    Comparison,
    _is_lets,
    _lets_curves,
    _rho_points,
    claims,
    default_comparisons,
    format_claims,
    format_summary,
    setting_of,
    summary_table,
    win_matrix,
    write_report,
)
from flatminima.bench.store import EpochRecord, RunRecord, RunSpec


def _rec(task, optimizer, seed, acc, *, ms=1.0, hparams=None, rho=None, sharpness=None, mem=None,
         label=None, stats=None, metric="accuracy"):
    """Three epochs; validation peaks at epoch 2, where the test ``metric`` is ``acc``; the last
    epoch's is ``acc - 0.02``. ``rho`` goes to ``optimizer_kwargs``, ``stats`` to
    ``stats_history``."""
    spec = RunSpec(task, optimizer, seed=seed, budget={"epochs": 3}, hparams=hparams or {}, label=label)
    tests = [acc - 0.1, acc, acc - 0.02]
    vals = [0.5, 0.7, 0.6]
    epochs = [
        EpochRecord(epoch=i + 1, steps=10 * (i + 1), train_seconds=0.5 * (i + 1) * ms,
                    train_loss=1.0 / (i + 1), val={metric: v, "loss": 1.0},
                    test={metric: t, "loss": 1.0})
        for i, (v, t) in enumerate(zip(vals, tests))
    ]
    kwargs = {"lr": 0.05}
    if rho is not None:
        kwargs["rho"] = rho
    return RunRecord(
        spec=spec, metric=metric, epochs=epochs, best_epoch=2, best_val=epochs[1].val,
        best_test=epochs[1].test, final_val=epochs[2].val, final_test=epochs[2].test, steps=30,
        ms_per_step=ms, ms_per_step_median=ms, peak_memory_bytes=None if mem is None else 1000 + mem,
        base_memory_bytes=None if mem is None else 1000, optimizer_kwargs=kwargs,
        extra={} if sharpness is None else {"sharpness": sharpness}, stats_history=stats or [],
    )


def _lets(task, seed, acc, rhos, *, rho0=0.05, optimizer="sam_sgd"):
    """A LETS run: ``hparams["lets"]``, label ``<optimizer>+lets``, starting ``rho0`` in the
    optimizer kwargs and the learned ``rhos`` per epoch in ``stats_history``."""
    return _rec(task, optimizer, seed, acc, hparams={"lets": {}}, rho=rho0, label=f"{optimizer}+lets",
                stats=[{"rho": x, "sam_grad_norm": 1.0} for x in rhos])


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


# ----------------------------------------------------------------------------- LETS and claims
def _setting(task):
    return f"{task} (quick, 3 epochs)"


def _claim(recs, name):
    found = {c.name: c for c in claims(recs)}
    assert list(found) == ["WASAM ≥ max(SAM, SWA)",
                           "Flat-minima methods gain more over SGD with label noise",
                           "SAM beats SGD at equal training time",
                           "Flatter final models have lower test error",
                           "Monge-SAM is more robust to rho than SAM",
                           "ESAM costs less than SAM (paper: ~1.4x SGD)", "LETS ≥ best fixed rho"]
    assert all(c.verdict in VERDICTS for c in found.values())
    return found[name]


def _msam_records():
    """m1: SAM's mean over rho spans 0.80..0.84 (spread 0.04), Monge-SAM's 0.83..0.84 (0.01);
    m2: SAM 0.70..0.72 (0.02), Monge-SAM 0.70..0.73 (0.03); m3: Monge-SAM with only two rho."""
    recs = [
        # m1, sam_sgd: the default run (rho 0.05 from the kwargs) and two [rho=x] variants.
        _rec("m1", "sam_sgd", 0, 0.83, rho=0.05), _rec("m1", "sam_sgd", 1, 0.85, rho=0.05),
        _rec("m1", "sam_sgd", 0, 0.79, rho=0.01, hparams={"rho": 0.01}),
        _rec("m1", "sam_sgd", 1, 0.81, rho=0.01, hparams={"rho": 0.01}),
        _rec("m1", "sam_sgd", 0, 0.82, rho=0.1, hparams={"rho": 0.1}),
        _rec("m1", "msam_sgd", 0, 0.83, rho=0.1, hparams={"rho": 0.1}),
        _rec("m1", "msam_sgd", 0, 0.84, rho=0.5),
        _rec("m1", "msam_sgd", 0, 0.835, rho=1.0, hparams={"rho": 1.0}),
        # Not part of SAM's rho sweep: a LETS run (its kwargs' rho is only the start) and a run
        # that changes more than rho.
        _lets("m1", 0, 0.5, [0.2, 0.3, 0.4], rho0=0.2),
        _rec("m1", "sam_sgd", 0, 0.4, rho=0.3, hparams={"rho": 0.3, "lr": 0.1}),
    ]
    for opt, accs in (("sam_sgd", (0.70, 0.71, 0.72)), ("msam_sgd", (0.70, 0.73, 0.72))):
        for rho, acc in zip((0.01, 0.05, 0.1) if opt == "sam_sgd" else (0.1, 0.5, 1.0), accs):
            recs.append(_rec("m2", opt, 0, acc, rho=rho, hparams={"rho": rho}))
    recs += [_rec("m3", "sam_sgd", 0, 0.6 + 0.01 * i, rho=rho, hparams={"rho": rho})
             for i, rho in enumerate((0.01, 0.05, 0.1))]
    recs += [_rec("m3", "msam_sgd", 0, 0.6, rho=rho, hparams={"rho": rho}) for rho in (0.1, 0.5)]
    return recs


def test_is_lets_and_rho_points_exclude_lets_runs():
    assert _is_lets(_lets("t", 0, 0.5, [0.1]))
    assert _is_lets(_rec("t", "sam_sgd", 0, 0.5, hparams={"lets": {"lr": 0.01, "every": 5}}))
    assert not _is_lets(_rec("t", "sam_sgd", 0, 0.5, rho=0.05))
    assert not _is_lets(_rec("t", "sam_sgd", 0, 0.5, hparams={"lets": None}))
    m1 = [r for r in _msam_records() if r.spec.task == "m1"]
    # What the rho plot draws: SAM at 0.01, 0.05, 0.1 and the lr=0.1 run's 0.3; never LETS's 0.2.
    assert _rho_points(m1) == {
        "sam_sgd": {0.05: [0.83, 0.85], 0.01: [0.79, 0.81], 0.1: [0.82], 0.3: [0.4]},
        "msam_sgd": {0.1: [0.83], 0.5: [0.84], 1.0: [0.835]},
    }
    assert _rho_points(m1, only_rho=True)["sam_sgd"] == {0.05: [0.83, 0.85], 0.01: [0.79, 0.81],
                                                          0.1: [0.82]}


def test_lets_curves_and_plot(tmp_path):
    recs = [
        _rec("l1", "sam_sgd", 0, 0.88, rho=0.05),
        _lets("l1", 0, 0.897, [0.05, 0.07, 0.09]),
        _lets("l1", 1, 0.899, [0.04, math.nan, 0.03]),  # a NaN epoch is skipped
        _lets("l1", 2, 0.9, [], rho0=0.2),  # nothing learned to draw
        _lets("l1", 0, 0.9, [0.1, 0.2, 0.3], rho0=0.1, optimizer="msam_sgd"),
    ]
    curves = _lets_curves({"sam_sgd": recs[:1], "sam_sgd+lets": recs[1:4], "msam_sgd+lets": recs[4:]})
    assert list(curves) == ["sam_sgd+lets", "msam_sgd+lets"]
    assert [(r.spec.seed, pts) for r, pts in curves["sam_sgd+lets"]] == [
        (0, [(1, 0.05), (2, 0.07), (3, 0.09)]), (1, [(1, 0.04), (3, 0.03)])]
    assert curves["msam_sgd+lets"][0][1] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert _lets_curves({"sam_sgd": recs[:1]}) == {}

    pytest.importorskip("matplotlib")
    text = write_report(recs + [_rec("l2", "sgd", 0, 0.7)], tmp_path).read_text(encoding="utf-8")
    pngs = sorted(p.name for p in tmp_path.glob("lets_*.png"))
    assert pngs == ["lets_l1-quick-3-epochs.png"]
    assert (tmp_path / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    caption = "l1 (quick, 3 epochs): LETS radius per epoch"
    assert f"### {caption}\n\n![{caption}](lets_l1-quick-3-epochs.png)" in text
    # sam_sgd ran at 0.05 only: LETS's starting rho 0.2 does not make it a rho sweep.
    assert not list(tmp_path.glob("rho_*.png"))


WASAM_ACC = {
    "w1": {"sam_sgd": [0.87, 0.89], "sgd+swa": [0.85], "sam_sgd+swa": [0.90]},  # +0.02 over 0.88
    "w2": {"sam_sgd": [0.75], "sgd+swa": [0.70], "sam_sgd+swa": [0.70]},  # -0.05
    "w3": {"sam_sgd": [0.80], "sgd+swa": [0.82], "sam_sgd+swa": [0.83]},  # +0.01
    "w4": {"sam_sgd": [0.60], "sgd+swa": [0.60], "sam_sgd+swa": [0.60]},  # a tie wins
}


def _wasam(*tasks):
    return [_rec(t, opt, seed, acc) for t in tasks for opt, accs in WASAM_ACC[t].items()
            for seed, acc in enumerate(accs)]


def test_claim_wasam():
    name = "WASAM ≥ max(SAM, SWA)"
    c = _claim(_wasam("w1", "w2", "w3"), name)
    assert (c.verdict, c.data["k"], c.data["n"]) == ("unclear", 2, 3)  # 2/3 = 0.67
    assert c.data["margins"] == pytest.approx({_setting("w1"): 0.02, _setting("w2"): -0.05,
                                               _setting("w3"): 0.01})
    # mean margin (2 - 5 + 1) / 3 = -0.67 points
    assert c.evidence == ("2 of 3 settings (paper: 39/42); margin over the better of SAM and SWA: "
                          "mean -0.67 points (-5.00 to +2.00); at the last epoch (the final "
                          "models): 2 of 3")
    assert (c.data["k_final"], c.data["n_final"]) == (2, 3)  # _rec: last epoch = best - 0.02
    assert _claim(_wasam("w1", "w2", "w3", "w4"), name).verdict == "yes"  # 3 of 4 = 0.75
    assert _claim(_wasam("w1", "w2"), name).verdict == "unclear"  # 1 of 2 = 0.5
    assert _claim(_wasam("w2"), name).evidence.startswith("0 of 1 settings")
    assert _claim(_wasam("w2"), name).verdict == "no"
    assert _claim(_wasam("w1", "w3"), name).verdict == "yes"
    missing = [r for r in _wasam("w1", "w2") if r.label != "sgd+swa"]
    assert _claim(missing, name).verdict == "not measured"
    # A metric outside _PERCENT is not scaled, as in the table.
    recall = [_rec("r", opt, 0, acc, metric="recall@1")
              for opt, acc in (("sam_sgd", 0.5), ("sgd+swa", 0.4), ("sam_sgd+swa", 0.52))]
    assert _claim(recall, name).evidence.endswith(
        "mean +0.0200 recall@1 (+0.0200 to +0.0200); at the last epoch (the final models): 1 of 1")


def test_claim_msam_spreads():
    name = "Monge-SAM is more robust to rho than SAM"
    recs = _msam_records()
    c = _claim(recs, name)
    assert c.verdict == "unclear"  # smaller in m1, larger in m2; m3 has two rho for Monge-SAM
    assert set(c.data["spreads"]) == {_setting("m1"), _setting("m2")}
    assert c.data["spreads"][_setting("m1")] == pytest.approx({"sam_sgd": 0.04, "msam_sgd": 0.01})
    assert c.data["spreads"][_setting("m2")] == pytest.approx({"sam_sgd": 0.02, "msam_sgd": 0.03})
    assert c.data["rhos"][_setting("m1")] == {"sam_sgd": [0.01, 0.05, 0.1], "msam_sgd": [0.1, 0.5, 1.0]}
    assert c.evidence == (
        "spread of the mean over rho (best - worst) smaller for Monge-SAM in 1 of 2 settings: "
        "m1 (quick, 3 epochs): SAM 4.00 points over rho 0.01–0.1, Monge-SAM 1.00 points over rho "
        "0.1–1; m2 (quick, 3 epochs): SAM 2.00 points over rho 0.01–0.1, Monge-SAM 3.00 points "
        "over rho 0.1–1")

    def only(*tasks):
        return [r for r in recs if r.spec.task in tasks]

    assert _claim(only("m1", "m3"), name).verdict == "yes"
    assert _claim(only("m2"), name).verdict == "no"
    assert _claim(only("m3"), name).verdict == "not measured"
    assert _claim(_records(), name).verdict == "not measured"


ESAM = {  # task: {label: (ms per step, test accuracy)}
    "e1": {"sgd": (2.0, 0.80), "sam_sgd": (4.0, 0.88), "esam_sgd": (2.8, 0.875)},  # 1.4x, 2.0x, -0.5
    "e2": {"sgd": (1.0, 0.70), "sam_sgd": (2.1, 0.75), "esam_sgd": (1.5, 0.73)},  # 1.5x, 2.1x, -2.0
    "e3": {"sgd": (2.0, 0.70), "sam_sgd": (4.0, 0.80), "esam_sgd": (2.6, 0.81)},  # 1.3x, 2.0x, +1.0
    "e4": {"sgd": (1.0, 0.70), "sam_sgd": (2.0, 0.75), "esam_sgd": (2.5, 0.75)},  # 2.5x, 2.0x, 0
}


def _esam(*tasks, drop=()):
    return [_rec(t, opt, 0, acc, ms=ms) for t in tasks for opt, (ms, acc) in ESAM[t].items()
            if opt not in drop]


def test_claim_esam_ratios():
    name = "ESAM costs less than SAM (paper: ~1.4x SGD)"
    c = _claim(_esam("e1", "e2", "e3"), name)
    assert c.verdict == "yes"  # cheaper in 3 of 3, within 1 point in 2 of 3
    assert (c.data["cheaper"], c.data["close"], c.data["n"]) == (3, 2, 3)
    per = c.data["settings"]
    assert [per[_setting(t)]["esam_ratio"] for t in ("e1", "e2", "e3")] == pytest.approx([1.4, 1.5, 1.3])
    assert [per[_setting(t)]["sam_ratio"] for t in ("e1", "e2", "e3")] == pytest.approx([2.0, 2.1, 2.0])
    assert [per[_setting(t)]["diff"] for t in ("e1", "e2", "e3")] == pytest.approx([-0.005, -0.02, 0.01])
    assert c.evidence == (
        "time per step vs sgd: ESAM median 1.40x (1.30x to 1.50x), SAM median 2.00x (2.00x to 2.10x); "
        "ESAM cheaper than SAM in 3 of 3 settings, at most 1 point(s) below SAM in 2 of 3; "
        "ESAM - SAM: mean -0.50 points (-2.00 to +1.00)")
    assert _claim(_esam("e2"), name).verdict == "unclear"  # cheaper, but 2 points below SAM
    assert _claim(_esam("e1", "e2"), name).verdict == "unclear"  # within 1 point in 1 of 2 only
    assert _claim(_esam("e4"), name).verdict == "no"  # 2.5x vs 2.0x
    assert _claim(_esam("e1", "e4"), name).verdict == "unclear"
    assert _claim(_esam("e1", drop=("esam_sgd",)), name).verdict == "not measured"
    assert _claim(_esam("e1", drop=("sgd",)), name).verdict == "not measured"  # no time ratio


def _lets_records():
    """l1: sam_sgd at rho 0.02, 0.05 (default), 0.1 -> 0.86, 0.88, 0.90, LETS 0.898 (within 0.5
    point of 0.90); l2: only the default rho, 0.75, and LETS 0.74 (1 point below)."""
    return [
        _rec("l1", "sam_sgd", 0, 0.88, rho=0.05),
        _rec("l1", "sam_sgd", 0, 0.90, rho=0.1, hparams={"rho": 0.1}),
        _rec("l1", "sam_sgd", 0, 0.86, rho=0.02, hparams={"rho": 0.02}),
        _lets("l1", 0, 0.897, [0.05, 0.07, 0.09]),
        _lets("l1", 1, 0.899, [0.05, 0.06, 0.08]),
        _rec("l2", "sam_sgd", 0, 0.75, rho=0.05),
        _lets("l2", 0, 0.74, [0.05, 0.04, 0.03]),
    ]


def test_claim_lets_vs_best_fixed_rho():
    name = "LETS ≥ best fixed rho"
    recs = _lets_records()
    c = _claim(recs, name)
    assert (c.verdict, c.data["k"], c.data["n"]) == ("unclear", 1, 2)
    l1 = c.data["settings"][_setting("l1")]["sam_sgd+lets"]
    assert l1["lets"] == pytest.approx(0.898) and l1["best"] == pytest.approx(0.90)
    assert l1["best_rho"] == 0.1 and l1["rhos"] == [0.02, 0.05, 0.1] and l1["sweep"] is True
    assert l1["gap"] == pytest.approx(-0.002)
    l2 = c.data["settings"][_setting("l2")]["sam_sgd+lets"]
    assert l2["sweep"] is False and l2["best_rho"] == 0.05 and l2["gap"] == pytest.approx(-0.01)
    assert c.evidence == (
        "LETS at most 0.5 point(s) below the best fixed rho in 1 of 2 (setting, label) pairs: "
        "l1 (quick, 3 epochs): sam_sgd+lets 89.80 vs 90.00 (best of sam_sgd over 3 rho in "
        "0.02–0.1, at rho=0.1), -0.20 points; "
        "l2 (quick, 3 epochs): sam_sgd+lets 74.00 vs 75.00 (no rho sweep: sam_sgd at rho=0.05), "
        "-1.00 points")
    assert _claim([r for r in recs if r.spec.task == "l1"], name).verdict == "yes"
    assert _claim([r for r in recs if r.spec.task == "l2"], name).verdict == "no"
    none = _claim(_records(), name)
    assert (none.verdict, none.evidence) == ("not measured", "no LETS runs (records with hparams['lets'])")
    alone = _claim([r for r in recs if _is_lets(r)], name)
    assert alone.verdict == "not measured" and alone.evidence.startswith("LETS runs but no fixed-rho")


def test_claims_section_in_report(tmp_path):
    with pytest.raises(ValueError):
        Claim("x", "maybe", "")
    assert format_claims([Claim("A", "yes", "3 of 3")]) == "- **A**: yes — 3 of 3"
    text = write_report(_records(), tmp_path, plots=False).read_text(encoding="utf-8")
    assert text.index("## Win matrix") < text.index("## Claims") < text.index("## Plots")
    # task-a: 0.90 vs max(0.88, 0.85), +2 points; task-b: 0.70 vs max(0.75, 0.70), -5 points.
    assert ("- **WASAM ≥ max(SAM, SWA)**: unclear — 1 of 2 settings (paper: 39/42); margin over "
            "the better of SAM and SWA: mean -1.50 points (-5.00 to +2.00); at the last epoch (the "
            "final models): 1 of 2\n") in text
    assert "- **Monge-SAM is more robust to rho than SAM**: not measured — " in text
    assert "- **ESAM costs less than SAM (paper: ~1.4x SGD)**: not measured — " in text
    assert "- **LETS ≥ best fixed rho**: not measured — no LETS runs" in text


# ----------------------------------------------------------------------------- more claims
def _with_spec(rec, **changes):
    import dataclasses

    return dataclasses.replace(rec, spec=dataclasses.replace(rec.spec, **changes))


def _claim_by(records, name_start):
    (c,) = [c for c in claims(records) if c.name.startswith(name_start)]
    return c


def test_claim_noise_compares_gains_over_sgd_with_the_clean_twin():
    clean = {"sgd": 0.80, "sam_sgd": 0.85, "sgd+swa": 0.82}
    noisy = {"sgd": 0.60, "sam_sgd": 0.70, "sgd+swa": 0.61}
    recs = [_rec("task-a", o, 0, a) for o, a in clean.items()]
    recs += [_with_spec(_rec("task-a", o, 0, a), label_noise=0.2) for o, a in noisy.items()]
    c = _claim_by(recs, "Flat-minima methods gain more")
    # SAM: +0.10 with noise vs +0.05 without (larger); SWA: +0.01 vs +0.02 (smaller): 1 of 2
    assert (c.data["k"], c.data["n"], c.verdict) == (1, 2, "unclear")
    pairs = {o: (ng, cg) for _, o, ng, cg in c.data["pairs"]}
    assert pairs["sam_sgd"] == pytest.approx((0.10, 0.05)) and pairs["sgd+swa"] == pytest.approx((0.01, 0.02))
    assert "1 of 2" in c.evidence and "+5.00 points" in c.evidence
    only_sam = [r for r in recs if r.spec.optimizer != "sgd+swa"]
    assert _claim_by(only_sam, "Flat-minima methods gain more").verdict == "yes"
    assert _claim_by(recs[:3], "Flat-minima methods gain more").verdict == "not measured"


def test_claim_equal_time_counts_settings_with_seconds_budgets():
    def timed(task, opt, acc):
        return _with_spec(_rec(task, opt, 0, acc), budget={"seconds": 5.0})

    recs = [timed("task-a", "sgd", 0.80), timed("task-a", "sam_sgd", 0.85),
            timed("task-b", "sgd", 0.70), timed("task-b", "sam_sgd", 0.60),
            _rec("task-c", "sgd", 0, 0.5), _rec("task-c", "sam_sgd", 0, 0.9)]  # epochs: not counted
    c = _claim_by(recs, "SAM beats SGD at equal")
    assert (c.data["k"], c.data["n"], c.verdict) == (1, 2, "unclear")
    assert sorted(c.data["diffs"].values()) == pytest.approx([-0.10, 0.05])
    assert _claim_by(recs[:2], "SAM beats SGD at equal").verdict == "yes"
    assert _claim_by(recs[2:4], "SAM beats SGD at equal").verdict == "no"
    assert _claim_by(recs[4:], "SAM beats SGD at equal").verdict == "not measured"


def test_spearman_against_hand_values():
    from flatminima.bench.report import spearman

    assert spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties averaged: ranks (1.5, 1.5, 3) against (1, 2, 3): 1.5 / sqrt(1.5 * 2)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    # monotone transforms do not change it
    assert spearman([0.1, 5.0, 2.0, 9.0], [1, 3, 2, 4]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1], [1, 2])) and math.isnan(spearman([1], [1]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_claim_sharpness_is_the_within_setting_rank_correlation():
    accs = [0.9, 0.85, 0.8, 0.75, 0.7]
    up = [_rec("task-a", "sgd", i, a, sharpness=float(i + 1)) for i, a in enumerate(accs)]
    c = _claim_by(up, "Flatter final models")
    assert c.verdict == "yes" and c.data["correlations"] == {setting_of(up[0]): pytest.approx(1.0)}
    down = [_rec("task-b", "sgd", i, a, sharpness=float(5 - i)) for i, a in enumerate(accs)]
    assert _claim_by(down, "Flatter final models").verdict == "no"
    both = _claim_by(up + down, "Flatter final models")
    assert both.data["median"] == pytest.approx(0.0) and both.verdict == "no"
    assert _claim_by(up[:4], "Flatter final models").verdict == "not measured"  # < 5 runs


def test_win_matrix_at_the_last_epoch():
    import dataclasses

    recs = _wasam("w1")
    # WASAM's last epoch drops below SAM's: it wins at the val-chosen epoch only
    recs = [dataclasses.replace(r, final_test={"accuracy": 0.5, "loss": 1.0}) if r.label == "sam_sgd+swa"
            else r for r in recs]
    comp = [("sam_sgd+swa", ("sam_sgd", "sgd+swa"))]
    assert win_matrix(recs, comp).total() == (1, 1)
    assert win_matrix(recs, comp, at="final").total() == (0, 1)
    assert win_matrix(recs, comp, at="final").margins[(win_matrix(recs, comp).comparisons[0].name,
                                                      _setting("w1"))] == pytest.approx(0.5 - 0.86)
    with pytest.raises(ValueError, match="invalid at"):
        win_matrix(recs, comp, at="middle")


def test_format_pivot_cells_and_bold_best():
    from flatminima.bench.report import format_pivot

    rows = summary_table(_records())
    text = format_pivot(rows, ["sgd", "sam_sgd", "sam_sgd+swa", "msam_sgd"])
    lines = text.splitlines()
    assert lines[0] == "| setting | sgd | sam_sgd | sam_sgd+swa | msam_sgd |"
    # task-a: sgd 82.00 ± 2.00, sam 88.00 ± 1.00, WASAM 90.00 ± 1.00, msam 91.00 ± 0.00 (best)
    assert lines[2] == ("| task-a (quick, 3 epochs) (%) | 82.00 ± 2.00 | 88.00 ± 1.00 | 90.00 ± 1.00 "
                        "| **91.00 ± 0.00** |")
    assert lines[3] == "| task-b (quick, 3 epochs) (%) | 65.00 ± 5.00 | **75.00 ± 1.00** | 70.00 ± 1.00 | - |"
    times = format_pivot(rows, ["sgd", "sam_sgd"], value="time").splitlines()
    assert times[2] == "| task-a (quick, 3 epochs) | **1.00x** | 1.95x |"  # 4.1 / 2.1 ms (seeds +0.1)
    final = format_pivot(rows, ["sgd"], value="final", best=False).splitlines()
    assert final[2] == "| task-a (quick, 3 epochs) (%) | 80.00 ± 2.00 |"  # last epoch: acc - 0.02
    assert format_pivot(rows, ["nope"]).splitlines()[2:] == []
    with pytest.raises(ValueError, match="invalid value"):
        format_pivot(rows, value="median")


def test_glance_labels_skip_variants_and_rare_labels():
    from flatminima.bench.report import _common_labels

    rows = summary_table(_records())
    # task-a only: asam_sgd+swa, msam_sgd+swa, msam_sgd and the rho variants
    assert _common_labels(rows) == ["sgd", "sam_sgd", "sgd+swa", "sam_sgd+swa"]
    one = [r for r in rows if r["setting"].startswith("task-b")]
    assert _common_labels(one) == ["sgd", "sam_sgd", "sgd+swa", "sam_sgd+swa"]
