"""Suites as data, LETS and the final sharpness in the runner, parallel sweeps, validation batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatminima.bench.runner import RunSpec, _final_sharpness, _sharpness_batches, run_one, run_sweep
from flatminima.bench.store import Store
from flatminima.bench.suites import ALL_OPTIMIZERS, SUITES, suite_specs
from flatminima.bench.tasks import TASKS, DigitsTask
from flatminima.bench.tasks.alignment import MultipleFeaturesAlignmentTask
from flatminima.bench.tasks.graph import CSBMTask
from flatminima.optim.averaging import SWA


def _label(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]


# ----------------------------------------------------------------------------- suite definitions
def test_quick_suite_covers_every_task_and_optimizer_with_two_seeds():
    specs = suite_specs("quick")
    assert len({s.key for s in specs}) == len(specs)  # no run twice
    main = {(s.task, s.display_label, s.seed) for s in specs if s.label_noise == 0 and
            (not s.hparams or s.hparams == {"lets": {}})}
    want = {(t, _label(e), seed) for t in TASKS for e in ALL_OPTIMIZERS for seed in (0, 1)}
    assert want <= main
    families = {"sgd", "sam_sgd", "asam_sgd", "msam_sgd", "esam_sgd", "sgd+swa", "sam_sgd+swa",
                "sam_sgd+lets"}
    assert {_label(e) for e in ALL_OPTIMIZERS} == families
    noisy = [s for s in specs if s.label_noise > 0]
    assert noisy and {s.label_noise for s in noisy} == {0.3}
    assert {TASKS[s.task].domain for s in noisy} == {"vision", "text"}
    assert {s.task for s in noisy} == {t for t, c in TASKS.items() if c.domain in ("vision", "text")}
    # radii: SAM and Monge-SAM at >= 3 radii besides the default on the alignment task
    rhos = {(s.optimizer, s.hparams["rho"]) for s in specs
            if s.task == "mfeat-clip" and "rho" in s.hparams and "lets" not in s.hparams}
    for opt in ("sam_sgd", "msam_sgd"):
        assert len({r for o, r in rhos if o == opt}) >= 3
    lets = [s for s in specs if "lets" in s.hparams and "rho" in s.hparams]
    assert {s.hparams["rho"] for s in lets} == {0.01, 0.5} and all(s.optimizer == "sam_sgd" for s in lets)
    # seed-major, the suite's size and each task's quick epochs
    seeds = [s.seed for s in specs]
    assert seeds == sorted(seeds) and set(seeds) == {0, 1}
    timed = [s for s in specs if s.seconds is not None]
    assert {(s.task, s.seconds) for s in timed} == {("mnist1d-cnn", 4.0), ("bbc-news-boe", 2.0),
                                                      ("mfeat-clip", 2.0)}
    assert {s.optimizer for s in timed} == {"sgd", "sam_sgd", "sgd+swa", "sam_sgd+swa"}
    assert all(s.size == "quick" and s.epochs == TASKS[s.task].hparams.epochs_quick
               for s in specs if s.seconds is None)
    # an explicit budget replaces every study's
    assert {s.epochs for s in suite_specs("quick", budget=2, studies=["time"])} == {2}


def test_full_suite_has_more_seeds_noise_levels_and_radii():
    specs = suite_specs("full")
    assert {s.seed for s in specs} == {0, 1, 2}
    assert {s.label_noise for s in specs} == {0.0, 0.2, 0.4}
    assert all(s.epochs == TASKS[s.task].hparams.epochs_full and s.size == "full"
               for s in specs if s.seconds is None)
    n_rho = len({s.hparams["rho"] for s in specs if s.optimizer == "msam_sgd" and "rho" in s.hparams})
    assert n_rho == 7


def test_suite_specs_filters_and_errors():
    specs = suite_specs("quick", tasks=["digits-mlp"], studies=["main", "noise"], seeds=[5])
    assert {s.task for s in specs} == {"digits-mlp"} and {s.seed for s in specs} == {5}
    assert len(specs) == len(ALL_OPTIMIZERS) + 4
    assert suite_specs("quick", tasks=["csbm-gcn"], studies=["noise"]) == []  # graph: no noise study
    with pytest.raises(KeyError, match="no study 'nope'"):
        suite_specs("quick", studies=["nope"])
    with pytest.raises(KeyError, match="unknown task"):
        suite_specs("quick", tasks=["nope"])
    with pytest.raises(ValueError, match="invalid suite"):
        suite_specs("medium")
    assert SUITES["quick"].expected and SUITES["full"].expected


# ----------------------------------------------------------------------------- validation batches
def test_val_batches_cover_the_validation_split_once():
    task = DigitsTask(size="tiny")
    gen = torch.Generator().manual_seed(3)
    rows = torch.cat([x for x, _ in task.val_batches(gen)])
    labels = torch.cat([y for _, y in task.val_batches(torch.Generator().manual_seed(3))])
    assert rows.shape == task.x_val.shape
    # a permutation of the validation rows, with their clean labels
    key = lambda x: sorted(map(tuple, x.reshape(x.shape[0], -1).tolist()))  # noqa: E731
    assert key(rows) == key(task.x_val)
    assert sorted(labels.tolist()) == sorted(task.y_val.tolist())
    assert max(x.shape[0] for x, _ in task.val_batches(gen)) <= task.batch_size

    graph = CSBMTask(size="tiny", label_noise=0.5)
    (b,) = list(graph.val_batches(torch.Generator().manual_seed(0)))
    assert sorted(b.index.tolist()) == sorted(graph.val_index.tolist())
    assert torch.equal(b.y, graph.graph.labels[b.index])  # clean labels, also with label noise

    align = MultipleFeaturesAlignmentTask(size="tiny")
    got = torch.cat([lab for _, _, lab in align.val_batches(torch.Generator().manual_seed(0))])
    assert sorted(got.tolist()) == sorted(align.splits["val"][2].tolist())


# ----------------------------------------------------------------------------- LETS in the runner
def _spec(optimizer: str, epochs: int = 2, **kw) -> RunSpec:
    return RunSpec("digits-mlp", optimizer, seed=kw.pop("seed", 0), budget={"epochs": epochs},
                   size="tiny", **kw)


def test_lets_with_zero_lr_trains_exactly_like_sam_and_records_rho():
    sam = run_one(_spec("sam_sgd"), threads=1, sharpness=False)
    frozen = run_one(_spec("sam_sgd", hparams={"lets": {"lr": 0.0}}, label="sam_sgd+lets"), threads=1,
                     sharpness=False)
    assert [e.train_loss for e in frozen.epochs] == [e.train_loss for e in sam.epochs]
    assert frozen.final_test == sam.final_test and frozen.final_val == sam.final_val
    assert frozen.extra["lets"] == {"lr": 0.0}
    assert [h["rho"] for h in frozen.stats_history] == [0.05, 0.05]

    moving = run_one(_spec("sam_sgd", hparams={"rho": 0.02, "lets": {"lr": 0.05}}), threads=1,
                     sharpness=False)
    rhos = [h["rho"] for h in moving.stats_history]
    assert len(rhos) == 2 and all(math.isfinite(r) and r > 0 for r in rhos) and rhos[-1] != 0.02
    spe = DigitsTask(size="tiny").steps_per_epoch()
    assert moving.stats_history[-1]["lets_updates"] == 2 * spe  # every step updates rho
    assert moving.label == "sam_sgd[lets={'lr': 0.05},rho=0.02]"


def test_lets_needs_a_sam_family_optimizer():
    for name in ("sgd", "sam_sgd+swa"):
        with pytest.raises(ValueError, match="LETS wraps a SAM-family optimizer"):
            run_one(_spec(name, hparams={"lets": {}}), threads=1)
    with pytest.raises(ValueError, match="hparams\\['lets'\\]"):
        run_one(_spec("sam_sgd", hparams={"lets": 3}), threads=1)


# ----------------------------------------------------------------------------- final sharpness
def _explicit_top_eigenvalue(model: nn.Module, loss_fn, batches) -> float:
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def total(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        losses = [loss_fn(lambda x: torch.func.functional_call(model, params, (x,)), b) for b in batches]
        return torch.stack(losses).mean()

    h = torch.autograd.functional.hessian(total, flat0)
    return float(torch.linalg.eigvalsh(h)[-1])


def test_final_sharpness_equals_the_explicit_hessian_and_uses_the_swa_average():
    task = DigitsTask(size="tiny")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
    task.x_train = task.x_train.double()
    batches = _sharpness_batches(task, torch.device("cpu"))
    n = sum(x.shape[0] for x, _ in batches)
    assert n >= 256 and n - batches[-1][0].shape[0] < 256  # whole batches, just past 256 samples

    def ce(f, b):
        return nn.functional.cross_entropy(f(b[0]), b[1])

    out = _final_sharpness(task, model, object(), torch.device("cpu"), seed=0)
    want = _explicit_top_eigenvalue(model, ce, batches)
    assert out["sharpness"] == pytest.approx(want, rel=2e-3)
    info = out["sharpness_info"]
    assert info["converged"] and info["matvecs"] > 0 and not info["averaged"]
    assert info["samples"] == sum(x.shape[0] for x, _ in batches)

    # SWA: measured at the averaged weights, the live weights untouched
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.5), model, start=0)
    for x, y in batches[:2]:
        opt.zero_grad()
        ce(model, (x, y)).backward()
        opt.step()
    live = [p.detach().clone() for p in model.parameters()]
    out = _final_sharpness(task, model, opt, torch.device("cpu"), seed=0)
    with opt.swapped():
        want_avg = _explicit_top_eigenvalue(model, ce, batches)
    assert out["sharpness_info"]["averaged"]
    assert out["sharpness"] == pytest.approx(want_avg, rel=2e-3)
    assert all(torch.equal(a, p) for a, p in zip(live, model.parameters()))


def test_runs_record_their_sharpness():
    rec = run_one(_spec("sgd", epochs=1), threads=1)
    assert rec.extra["sharpness"] > 0 and rec.extra["sharpness_info"]["measure"] == "hessian_top_eigenvalue"
    assert "sharpness" not in run_one(_spec("sgd", epochs=1), threads=1, sharpness=False).extra


# ----------------------------------------------------------------------------- parallel sweeps
def test_parallel_sweep_equals_the_sequential_one(tmp_path):
    specs = [_spec("sgd"), _spec("sam_sgd"), _spec("sgd", seed=1)]
    with Store(tmp_path / "a.sqlite") as a:
        seq = run_sweep(specs, a, threads=1, sharpness=False)
    with Store(tmp_path / "b.sqlite") as b:
        par = run_sweep(specs + [specs[0]], b, threads=1, jobs=2, sharpness=False)
        assert len(b) == 3 and sorted(b.keys()) == sorted(s.key for s in specs)
        again = run_sweep(specs, b, jobs=2)
        assert again.skipped == [s.key for s in specs] and again.ran == []
    assert [r.key for r in par.records] == [s.key for s in specs]
    for x, y in zip(seq.records, par.records):
        assert [e.train_loss for e in x.epochs] == [e.train_loss for e in y.epochs]
        assert x.best_test == y.best_test and x.final_val == y.final_val
    with pytest.raises(ValueError, match="':memory:'"):
        run_sweep(specs, Store(":memory:"), jobs=2)
    with pytest.raises(ValueError, match="invalid jobs"):
        run_sweep(specs, Store(":memory:"), jobs=0)


def test_parallel_sweep_reports_failures(tmp_path):
    bad = _spec("sam_sgd", hparams={"rho": -1.0})
    with Store(tmp_path / "c.sqlite") as st:
        res = run_sweep([bad, _spec("sgd")], st, threads=1, jobs=2, errors="skip", sharpness=False)
        assert list(res.failed) == [bad.key] and "rho" in res.failed[bad.key]
        assert res.ran == [_spec("sgd").key] and len(st) == 1
        with pytest.raises(RuntimeError, match="rho"):
            run_sweep([bad, _spec("sgd", seed=3)], st, threads=1, jobs=2, sharpness=False)


def test_esam_on_a_task_without_per_sample_losses_says_so_in_the_record():
    import warnings

    spec = RunSpec("mfeat-clip", "esam_sgd", seed=0, budget={"epochs": 1}, size="tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ESAM closure warning is replaced by the record's note
        rec = run_one(spec, threads=1, sharpness=False)
    assert rec.extra["data_selection"] == "off: the task has no per-sample losses"
    assert rec.stats_history[-1]["selected"] == 1.0  # every sample used
    with pytest.warns(UserWarning, match="ESAM got a standard closure"):  # outside the runner: warned
        import flatminima
        task = MultipleFeaturesAlignmentTask(size="tiny")
        torch.manual_seed(0)
        model = task.make_model()
        opt = flatminima.create("esam_sgd", model.parameters(), lr=0.1)
        batch = next(iter(task.train_batches(torch.Generator().manual_seed(0))))

        def closure():
            opt.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
