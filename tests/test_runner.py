"""The benchmark runner on the tiny digits task: optimizer kinds, budgets, determinism and the
validation-chosen epoch."""

from __future__ import annotations

import math

import pytest
import torch

from flatminima.bench.runner import (
    RunSpec,
    TextProgress,
    make_specs,
    optimizer_kwargs,
    parse_budget,
    run_one,
    run_sweep,
    select_best_epoch,
)
from flatminima.bench.store import Store
from flatminima.bench.tasks import DigitsTask, TaskUnavailable


def _spec(optimizer: str, epochs: int = 2, **kw) -> RunSpec:
    return RunSpec("digits-mlp", optimizer, seed=kw.pop("seed", 0), budget={"epochs": epochs},
                   size="tiny", **kw)


def _finite(d: dict) -> bool:
    return bool(d) and all(math.isfinite(v) for v in d.values())


@pytest.mark.parametrize("optimizer", ["sgd", "sam_sgd", "esam_sgd", "sgd+swa"])
def test_tiny_runs_finish_with_finite_metrics(optimizer):
    lines: list[str] = []
    rec = run_one(_spec(optimizer), progress=lines.append, threads=1)
    spe = DigitsTask(size="tiny").steps_per_epoch()
    assert rec.epochs_run == 2 and rec.steps == 2 * spe
    assert rec.metric == "accuracy" and 1 <= rec.best_epoch <= 2
    for e in rec.epochs:
        assert math.isfinite(e.train_loss) and _finite(e.val) and _finite(e.test)
    assert _finite(rec.final_test) and _finite(rec.best_test)
    assert rec.ms_per_step > 0 and rec.ms_per_step_median > 0 and rec.total_seconds > 0
    assert rec.memory_method in ("rss_hwm", "ru_maxrss") and rec.peak_memory_bytes > 0
    assert rec.peak_memory_delta is not None and rec.peak_memory_delta >= 0
    assert rec.optimizer_kwargs["lr"] == DigitsTask.hparams.lr
    assert rec.optimizer_kwargs["momentum"] == 0.9
    assert rec.optimizer_kwargs["weight_decay"] == DigitsTask.hparams.weight_decay
    assert len(lines) == 2
    assert all(line.startswith(f"digits-mlp [tiny] {optimizer} seed 0: epoch {i}/2 loss ")
               for i, line in enumerate(lines, 1))
    if optimizer == "sgd":
        assert rec.stats_history == [] and "rho" not in rec.optimizer_kwargs
    if optimizer == "sam_sgd":
        assert len(rec.stats_history) == 2 and rec.stats_history[-1]["rho"] == pytest.approx(0.05)
    if optimizer == "esam_sgd":  # the per-sample closure ran: data selection kept half the batch
        assert rec.stats_history[-1]["selected"] == pytest.approx(0.5)
    if optimizer == "sgd+swa":  # averaging starts at epoch floor(0.75 * 2) = 1: the last epoch,
        # every ceil(spe / 10) steps (spe = 4: every step, 4 iterates)
        every = -(-spe // 10)
        assert [e.averaged for e in rec.epochs] == [False, True]
        assert rec.stats_history[-1]["n_averaged"] == spe // every == 4
        assert rec.extra["swa"] == {"start_step": spe, "every": every}


def test_epoch_budget_runs_exactly_that_many_epochs():
    rec = run_one(_spec("sgd", epochs=3), threads=1)
    spe = DigitsTask(size="tiny").steps_per_epoch()
    assert [e.epoch for e in rec.epochs] == [1, 2, 3]
    assert [e.steps for e in rec.epochs] == [spe, 2 * spe, 3 * spe]
    times = [e.train_seconds for e in rec.epochs]
    assert times == sorted(times) and rec.train_seconds == times[-1]


def test_seconds_budget_stops_at_first_epoch_end_past_it():
    budget = 0.15
    lines: list[str] = []
    spec = RunSpec("digits-mlp", "sgd", budget={"seconds": budget}, size="tiny")
    rec = run_one(spec, progress=lines.append, threads=1)
    times = [e.train_seconds for e in rec.epochs]
    assert times[-1] >= budget  # the budget was reached at the last epoch end...
    assert all(t < budget for t in times[:-1])  # ...and at no earlier one
    assert rec.epochs_run == len(lines) >= 1
    assert rec.steps == rec.epochs[-1].steps == rec.epochs_run * DigitsTask(size="tiny").steps_per_epoch()
    assert f"/{budget:g} s)" in lines[-1]


def test_seconds_budget_with_swa_averages_the_end():
    rec = run_one(RunSpec("digits-mlp", "sgd+swa", budget={"seconds": 0.15}, size="tiny"), threads=1)
    if rec.epochs_run >= 2:  # averaging starts at the end of some epoch and covers the last one
        assert rec.epochs[-1].averaged and not rec.epochs[0].averaged
        start = rec.extra["swa"]["start_epoch"]
        assert [e.averaged for e in rec.epochs] == [e.epoch >= start for e in rec.epochs]


def test_sam_with_rho_zero_matches_sgd_bit_for_bit():
    a = run_one(_spec("sgd", epochs=3, seed=3), threads=1)
    b = run_one(_spec("sam_sgd", epochs=3, seed=3, hparams={"rho": 0.0}), threads=1)
    assert b.optimizer_kwargs["rho"] == 0.0
    assert [(e.train_loss, e.val, e.test) for e in a.epochs] == [
        (e.train_loss, e.val, e.test) for e in b.epochs
    ]
    # ...while the default rho changes the trajectory.
    c = run_one(_spec("sam_sgd", epochs=3, seed=3), threads=1)
    assert [e.train_loss for e in c.epochs] != [e.train_loss for e in a.epochs]


def test_same_seed_same_metrics_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run_one(_spec("sam_sgd", seed=5), threads=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = run_one(_spec("sam_sgd", seed=5), threads=1)
    assert [(e.train_loss, e.val, e.test) for e in a.epochs] == [
        (e.train_loss, e.val, e.test) for e in b.epochs
    ]


def test_validation_chosen_epoch_is_argmax_of_val_metric():
    rec = run_one(_spec("sgd", epochs=6, seed=1, hparams={"lr": 0.2}), threads=1)
    vals = [e.val["accuracy"] for e in rec.epochs]
    best = max(vals)
    assert rec.best_epoch == vals.index(best) + 1  # the earliest of the best
    assert rec.best_val == rec.epochs[rec.best_epoch - 1].val
    assert rec.best_test == rec.epochs[rec.best_epoch - 1].test
    assert rec.test_at_best == rec.epochs[rec.best_epoch - 1].test["accuracy"]
    assert rec.final_test == rec.epochs[-1].test
    assert select_best_epoch([0.1, 0.5, 0.5, 0.2]) == 1
    assert select_best_epoch([math.nan, 0.3, math.nan]) == 1
    assert select_best_epoch([math.nan, math.nan]) == 1
    with pytest.raises(ValueError):
        select_best_epoch([])


def test_optimizer_defaults_and_budget_parsing():
    kw = optimizer_kwargs(DigitsTask, "sam_adamw", {"rho": 0.1})
    assert kw == {"lr": DigitsTask.hparams.lr_adam, "weight_decay": DigitsTask.hparams.weight_decay,
                  "rho": 0.1}
    assert optimizer_kwargs(DigitsTask, "asam_sgd")["rho"] == 0.5
    assert optimizer_kwargs(DigitsTask, "esam_sgd", {"perturbation": "asam"})["rho"] == 0.5
    assert parse_budget("10") == parse_budget(10) == parse_budget("10e") == {"epochs": 10}
    assert parse_budget("30s") == {"seconds": 30.0} and parse_budget("2m") == {"seconds": 120.0}
    assert parse_budget(None, task="digits-mlp") == {"epochs": DigitsTask.hparams.epochs_quick}
    assert parse_budget("full", task="digits-mlp") == {"epochs": DigitsTask.hparams.epochs_full}
    for bad in ("ten", "1.5", "0", "-3s"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_make_specs_order_and_labels():
    specs = make_specs(["digits-mlp"], ["sgd", ("sam .1", "sam_sgd", {"rho": 0.1})], seeds=[0, 1],
                       budget="3")
    assert [(s.seed, s.display_label) for s in specs] == [
        (0, "sgd"), (0, "sam .1"), (1, "sgd"), (1, "sam .1")
    ]
    assert all(s.budget == {"epochs": 3} and s.size == "quick" for s in specs)
    assert make_specs(["digits-mlp"], ["sam_sgd"], suite="full")[0].budget == {
        "epochs": DigitsTask.hparams.epochs_full
    }
    with pytest.raises(KeyError):
        make_specs(["no-such-task"], ["sgd"])
    with pytest.raises(KeyError):
        make_specs(["digits-mlp"], ["no_such_opt"])


def test_sweep_dedupes_skips_unavailable_and_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(DigitsTask, "availability", classmethod(lambda cls: None))
    spec = _spec("sgd", epochs=1)
    lines: list[str] = []
    with Store(tmp_path / "db.sqlite") as store:
        result = run_sweep([spec, spec], store, progress=lines.append, threads=1)
        assert result.ran == [spec.key] and len(store) == 1 and len(result.records) == 1
        assert lines[-1].startswith("[1/1] digits-mlp [tiny] sgd seed 0: done, test accuracy ")
        monkeypatch.setattr(DigitsTask, "availability", classmethod(lambda cls: "download it"))
        other = _spec("sam_sgd", epochs=1)
        result = run_sweep([spec, other], store, progress=lines.append, threads=1)
        assert result.skipped == [spec.key] and list(result.unavailable) == [other.key]
        assert "download it" in result.unavailable[other.key] and len(store) == 1
        with pytest.raises(TaskUnavailable):
            run_one(other)


def test_text_progress(capsys):
    TextProgress()("[1/2] x: epoch 1/3 loss 1")
    TextProgress(epochs=False)("[1/2] x: epoch 1/3 loss 1")
    TextProgress(epochs=False)("[1/2] x: done")
    assert capsys.readouterr().err == "[1/2] x: epoch 1/3 loss 1\n[1/2] x: done\n"


def test_text_progress_bars():
    import io

    out = io.StringIO()
    assert not TextProgress(out).bar  # not a terminal: line mode
    bar = TextProgress(out, bar=True, width=4)
    bar("[1/2] a sgd seed 0: epoch 1/4 loss 1")
    assert out.getvalue() == "\r\033[Kruns [....] 0/2 | a sgd seed 0 [#...] epoch 1/4"
    bar("[1/2] a sgd seed 0: epoch 3/4 loss 1")
    assert out.getvalue().endswith("\r\033[Kruns [....] 0/2 | a sgd seed 0 [###.] epoch 3/4")
    bar("[1/2] a sgd seed 0: done, test accuracy 0.9")  # the run's line stays, the bar moves on
    assert out.getvalue().endswith("\r\033[K[1/2] a sgd seed 0: done, test accuracy 0.9\n"
                                   "\r\033[Kruns [##..] 1/2")
    bar("note: something else")
    assert out.getvalue().endswith("\r\033[Knote: something else\nruns [##..] 1/2")
    bar("[2/2] b sgd seed 0: epoch 2 (1.0/3 s) loss 1")  # a time budget: no epoch count
    assert out.getvalue().endswith("| b sgd seed 0 epoch 2")
    bar("[2/2] b sgd seed 0: already done, skipped")
    assert out.getvalue().endswith("\r\033[Kruns [####] 2/2\n")
