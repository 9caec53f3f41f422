"""The quick benchmark: the vendored digits data, its split and label noise, the training loop,
the summary table and the command line. Every test checks numbers (about 10 s in all)."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch

import flatminima
from flatminima.bench.quick import format_table, run_quick, summarize
from flatminima.bench.tasks.digits import (
    CLASS_COUNTS,
    add_label_noise,
    load_digits,
    load_digits_raw,
    make_digits,
    make_mlp,
    stratified_split,
)
from flatminima.cli import main

KNOWN_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
FRACTIONS = (0.6, 0.2, 0.2)
TIMING_KEYS = {"ms_per_step", "ms_per_step_median", "train_seconds"}


# ---------------------------------------------------------------------------- vendored data
def test_vendored_digits_shape_range_and_class_counts():
    pixels, labels = load_digits_raw()
    assert pixels.shape == (1797, 64)
    assert labels.shape == (1797,)
    assert pixels.min() == 0 and pixels.max() == 16
    assert np.array_equal(np.unique(labels), np.arange(10))
    assert np.bincount(labels, minlength=10).tolist() == KNOWN_COUNTS
    assert list(CLASS_COUNTS) == KNOWN_COUNTS
    # First row of sklearn's digits: a zero whose first image row is 0 0 5 13 9 1 0 0.
    assert labels[0] == 0 and pixels[0, :8].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]


def test_load_digits_is_float32_scaled_by_16():
    x, y = load_digits()
    pixels, labels = load_digits_raw()
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x * 16, torch.from_numpy(pixels).float())
    assert torch.equal(y, torch.from_numpy(labels))


# ---------------------------------------------------------------------------- split
@pytest.mark.parametrize("seed", [0, 7])
def test_split_is_disjoint_complete_and_stratified(seed):
    _, y = load_digits()
    parts = stratified_split(y, FRACTIONS, seed=seed)
    assert len(parts) == 3
    allidx = torch.cat(parts)
    assert allidx.numel() == 1797
    assert torch.equal(torch.sort(allidx).values, torch.arange(1797))  # disjoint and covering
    for part, frac in zip(parts, FRACTIONS, strict=True):
        counts = torch.bincount(y[part], minlength=10).tolist()
        for c, (got, n_c) in enumerate(zip(counts, KNOWN_COUNTS, strict=True)):
            assert abs(got - frac * n_c) <= 1, (c, got, frac * n_c)
    # 0.6 * 1797 = 1078.2, 0.2 * 1797 = 359.4: the class-wise rounding lands next to them.
    assert abs(parts[0].numel() - 1078.2) <= 10
    assert abs(parts[1].numel() - 359.4) <= 10


def test_split_is_deterministic_per_seed():
    _, y = load_digits()
    a = stratified_split(y, FRACTIONS, seed=3)
    b = stratified_split(y, FRACTIONS, seed=3)
    c = stratified_split(y, FRACTIONS, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_split_rejects_bad_fractions():
    _, y = load_digits()
    with pytest.raises(ValueError):
        stratified_split(y, (0.6, 0.3, 0.2))


# ---------------------------------------------------------------------------- label noise
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_label_noise_flips_exact_count_to_other_classes(fraction):
    _, y = load_digits()
    y_before = y.clone()
    noisy, flipped = add_label_noise(y, fraction, seed=5)
    assert torch.equal(y, y_before)  # input untouched
    n_flip = round(fraction * y.numel())
    assert int(flipped.sum()) == n_flip
    assert int((noisy != y).sum()) == n_flip  # every flip changes the class
    assert torch.equal(noisy != y, flipped)
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    noisy2, flipped2 = add_label_noise(y, fraction, seed=5)
    assert torch.equal(noisy, noisy2) and torch.equal(flipped, flipped2)


def test_label_noise_is_symmetric_over_other_classes():
    y = torch.zeros(9000, dtype=torch.int64)
    noisy, _ = add_label_noise(y, 1.0, seed=0)
    counts = torch.bincount(noisy, minlength=10).tolist()
    assert counts[0] == 0
    assert all(850 <= c <= 1150 for c in counts[1:]), counts  # 1000 each, +-5 sigma


def test_make_digits_noise_only_touches_training_labels():
    x, y = load_digits()
    clean = make_digits(0)
    noisy = make_digits(0, label_noise=0.25)
    for name in ("train_index", "val_index", "test_index", "x_train", "x_val", "x_test",
                 "y_val", "y_test", "y_train_clean"):
        assert torch.equal(getattr(clean, name), getattr(noisy, name)), name
    assert torch.equal(noisy.y_val, y[noisy.val_index])
    assert torch.equal(noisy.y_test, y[noisy.test_index])
    assert torch.equal(noisy.y_train_clean, y[noisy.train_index])
    assert torch.equal(noisy.x_test, x[noisy.test_index])
    n_train = noisy.y_train.numel()
    assert int((noisy.y_train != noisy.y_train_clean).sum()) == round(0.25 * n_train)
    assert torch.equal(clean.y_train, clean.y_train_clean)
    assert int(clean.flipped.sum()) == 0


def test_make_digits_max_train_subsamples_train_only():
    full = make_digits(0)
    sub = make_digits(0, max_train=300)
    assert sub.x_train.shape == (300, 64)
    assert bool(torch.isin(sub.train_index, full.train_index).all())
    assert torch.equal(sub.test_index, full.test_index)
    assert torch.equal(sub.val_index, full.val_index)


def test_make_mlp_shapes_and_flags():
    m = make_mlp()
    assert [p.shape for p in m.parameters()] == [
        (128, 64), (128,), (128, 128), (128,), (10, 128), (10,)
    ]
    m2 = make_mlp(batch_norm=True, dropout=0.1)
    kinds = [type(layer).__name__ for layer in m2]
    assert kinds.count("BatchNorm1d") == 2 and kinds.count("Dropout") == 2
    assert m2(torch.zeros(4, 64)).shape == (4, 10)


# ---------------------------------------------------------------------------- training loop
QUICK = {"epochs": 2, "seeds": (0,), "batch_size": 16, "max_train": 600, "progress": False}


def _numbers(results):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in results]


def test_run_quick_is_deterministic_and_learns():
    rng_before = torch.get_rng_state()
    threads_before = torch.get_num_threads()
    a = run_quick(("sgd", "sam_sgd"), **QUICK)
    b = run_quick(("sgd", "sam_sgd"), **QUICK)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    assert torch.get_num_threads() == threads_before
    assert _numbers(a) == _numbers(b)
    assert [r["optimizer"] for r in a] == ["sgd", "sam_sgd"]
    n_steps = 2 * math.ceil(600 / 16)
    for r in a:
        assert r["steps"] == n_steps and r["epochs"] == 2
        assert 0 < r["ms_per_step"] < 1000
        assert len(r["train_loss_curve"]) == 2
        assert r["final_train_loss"] == r["train_loss_curve"][-1]
        assert r["train_loss_curve"][1] < r["train_loss_curve"][0] < math.log(10) + 0.1
    sgd, sam = a
    assert sgd["test_acc"] > 0.5  # chance is 0.1
    assert sam["test_acc"] > 0.5
    assert sgd["passes"] == 1 and sam["passes"] == 2
    assert sgd["last_stats"] == {}
    assert sam["last_stats"]["rho"] == pytest.approx(0.05)
    assert sam["last_stats"]["step"] == n_steps
    assert sam["hparams"] == {"lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9, "rho": 0.05}


def test_run_quick_sam_with_zero_rho_retraces_sgd():
    """The same closure drives both loops: SAM with rho = 0 must give SGD's numbers exactly."""
    sgd, sam0 = run_quick(("sgd", "sam_sgd"), rho=0.0, **QUICK)
    for key in ("test_acc", "val_acc", "train_acc", "train_loss_curve"):
        assert sgd[key] == sam0[key], key


def test_run_quick_swa_trains_like_its_inner_optimizer_and_evaluates_the_hand_computed_average():
    """sgd+swa: the same training trajectory as sgd; accuracy is that of the mean of the iterates
    at the end of the epochs of the last quarter, rebuilt here by hand."""
    epochs, bs = 8, 64
    kw = {"epochs": epochs, "seeds": (0,), "max_train": 256, "batch_size": bs, "progress": False}
    sgd, swa = run_quick(("sgd", "sgd+swa"), **kw)
    assert sgd["train_loss_curve"] == swa["train_loss_curve"]
    assert swa["hparams"]["every"] == 4 and swa["hparams"]["total_steps"] == 32
    # Rebuild: train SGD by hand exactly as the loop does, snapshot after the epochs 7 and 8
    # (start = floor(0.75 * 32) = 24: averages after steps 27 and 31, i.e. epoch ends).
    data = make_digits(0, max_train=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make_mlp(data.num_features, data.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(0)
        snaps = []
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(256, generator=gen)
            for start in range(0, 256, bs):
                idx = order[start : start + bs]
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
                opt.step()
            if epoch >= 6:
                snaps.append([p.detach().clone() for p in model.parameters()])
        with torch.no_grad():
            for p, a, b in zip(model.parameters(), *snaps):
                p.copy_((a + b) / 2)
        model.eval()
        sets = {"test_acc": (data.x_test, data.y_test), "val_acc": (data.x_val, data.y_val),
                "train_acc": (data.x_train, data.y_train)}
        acc = {k: (model(x).argmax(1) == y).double().mean().item() for k, (x, y) in sets.items()}
    for key, value in acc.items():
        assert swa[key] == pytest.approx(value, abs=1e-12), key
    assert any(swa[k] != sgd[k] for k in acc)  # the average is not the last iterate


def test_run_quick_rejects_unknown_optimizer_before_training():
    with pytest.raises(KeyError, match="nope"):
        run_quick(("sgd", "nope"), **QUICK)


def test_run_quick_rho_defaults_and_overrides():
    res = run_quick(
        ("asam_sgd", "msam_sgd"), rho={"msam": 0.1}, optimizer_kwargs={"asam_sgd": {"eta": 0.0}},
        epochs=1, seeds=(0,), max_train=64, batch_size=64, progress=False,
    )
    assert res[0]["hparams"]["rho"] == 0.5 and res[0]["hparams"]["eta"] == 0.0
    assert res[1]["hparams"]["rho"] == 0.1


# ---------------------------------------------------------------------------- labelled variants
def test_run_quick_variant_without_options_equals_the_plain_name():
    plain, variant = run_quick(("sam_sgd", ("sam_plain", "sam_sgd", {})), **QUICK)
    assert (plain["optimizer"], variant["optimizer"]) == ("sam_sgd", "sam_plain")
    assert plain["registry_name"] == variant["registry_name"] == "sam_sgd"
    a, b = _numbers([plain])[0], _numbers([variant])[0]
    a.pop("optimizer"), b.pop("optimizer")
    assert a == b  # same hparams, test_acc, final_train_loss, curve, stats: bit for bit
    assert plain["test_acc"] > 0.5


def test_run_quick_esam_with_beta_and_gamma_one_retraces_sam():
    """ESAM(beta=1, gamma=1) is SAM; it gets the per-sample closure, whose mean reduction can
    differ from cross_entropy's in the last bits, so losses agree to 1e-6, accuracies exactly."""
    sam, esam = run_quick(
        ("sam_sgd", ("esam_11", "esam_sgd", {"beta": 1.0, "gamma": 1.0})), **QUICK
    )
    assert esam["registry_name"] == "esam_sgd" and esam["passes"] == 3
    assert esam["hparams"] == {**sam["hparams"], "beta": 1.0, "gamma": 1.0}  # rho 0.05 as SAM
    for key in ("test_acc", "val_acc", "train_acc", "train_acc_clean"):
        assert esam[key] == sam[key], key
    assert esam["final_train_loss"] == pytest.approx(sam["final_train_loss"], rel=0, abs=1e-6)
    assert esam["train_loss_curve"] == pytest.approx(sam["train_loss_curve"], rel=0, abs=1e-6)
    assert esam["last_stats"]["selected"] == 1.0 and esam["last_stats"]["swp_kept"] == 1.0
    assert math.isnan(esam["last_stats"]["delta_mean"])  # gamma = 1: no scoring pass
    assert esam["last_stats"]["loss"] == pytest.approx(sam["last_stats"]["loss"], abs=1e-6)


def test_run_quick_esam_variants_select_data_and_mask_weights():
    """The per-sample closure reaches ESAM: data selection runs (no standard-closure warning, the
    last batch of 600 - 37 * 16 = 8 rows keeps ceil(0.5 * 8) = 4) and SWP masks tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = run_quick(
            (("sds", "esam_sgd", {"beta": 1.0, "gamma": 0.5}),
             ("swp", "esam_sgd", {"beta": 0.5, "gamma": 1.0}),
             ("esam_asam", "esam_sgd", {"perturbation": "asam"})),
            optimizer_kwargs={"esam_sgd": {"beta": 0.5, "gamma": 0.5}}, **QUICK,
        )
    sds, swp, easam = res
    assert [r["optimizer"] for r in res] == ["sds", "swp", "esam_asam"]
    assert {r["registry_name"] for r in res} == {"esam_sgd"}
    # rho: the family default, or the rule's for ESAM around ASAM; the variant overrides the
    # per-name options.
    assert sds["hparams"]["rho"] == 0.05 and easam["hparams"]["rho"] == 0.5
    assert (sds["hparams"]["beta"], sds["hparams"]["gamma"]) == (1.0, 0.5)
    assert (swp["hparams"]["beta"], swp["hparams"]["gamma"]) == (0.5, 1.0)
    assert (easam["hparams"]["beta"], easam["hparams"]["gamma"]) == (0.5, 0.5)
    assert sds["last_stats"]["selected"] == 0.5
    assert math.isfinite(sds["last_stats"]["delta_mean"]) and sds["last_stats"]["swp_kept"] == 1.0
    assert swp["last_stats"]["selected"] == 1.0 and math.isnan(swp["last_stats"]["delta_mean"])
    kept = swp["last_stats"]["swp_kept"]
    # 6 tensors of the digits MLP: the kept fraction of entries is a sum of whole tensors' sizes.
    sizes = [p.numel() for p in make_mlp().parameters()]
    total = sum(sizes)
    sums = {sum(s for s, on in zip(sizes, bits, strict=True) if on) / total
            for bits in itertools.product((0, 1), repeat=len(sizes))}
    assert any(kept == pytest.approx(v, abs=1e-12) for v in sums)
    for r in res:
        assert r["steps"] == 2 * math.ceil(600 / 16) and r["test_acc"] > 0.5
        assert r["train_loss_curve"][1] < r["train_loss_curve"][0]
    assert easam["last_stats"]["selected"] == 0.5


@pytest.mark.parametrize(
    "optimizers",
    [("sgd", ("sgd", "sam_sgd", {})),
     (("a", "sam_sgd", {}), ("a", "esam_sgd", {"beta": 1.0})),
     ("sgd", "sgd")],
)
def test_run_quick_rejects_duplicate_labels(optimizers):
    with pytest.raises(ValueError, match="unique"):
        run_quick(optimizers, **QUICK)


@pytest.mark.parametrize(
    "entry",
    [("x", "sam_sgd"), ("x", "sam_sgd", None), (1, "sam_sgd", {}), ("", "sam_sgd", {}), None],
)
def test_run_quick_rejects_malformed_entries(entry):
    with pytest.raises(ValueError, match="label, registry_name, kwargs"):
        run_quick(("sgd", entry), **QUICK)


def test_run_quick_variant_with_unknown_registry_name_raises_keyerror():
    with pytest.raises(KeyError, match="nope"):
        run_quick(("sgd", ("v", "nope", {})), **QUICK)


# ---------------------------------------------------------------------------- table
def _fake(opt, seed, test, val, loss, ms):
    return {"optimizer": opt, "seed": seed, "test_acc": test, "val_acc": val,
            "final_train_loss": loss, "ms_per_step": ms}


FAKE = [
    _fake("sgd", 0, 0.90, 0.80, 0.10, 1.0),
    _fake("sam_sgd", 0, 0.97, 0.91, 0.05, 4.0),
    _fake("sgd", 1, 0.95, 0.86, 0.30, 3.0),
    _fake("sam_sgd", 1, 0.99, 0.93, 0.07, 4.0),
    _fake("sam_sgd", 2, 0.98, 0.95, 0.06, 7.0),
    _fake("asam_sgd", 0, 0.50, 0.40, 1.25, 2.5),
]


def test_summarize_matches_hand_computed_mean_and_sample_std():
    rows = {r["optimizer"]: r for r in summarize(FAKE)}
    assert list(rows) == ["sgd", "sam_sgd", "asam_sgd"]  # first-appearance order
    sgd, sam, asam = rows["sgd"], rows["sam_sgd"], rows["asam_sgd"]
    assert (sgd["runs"], sam["runs"], asam["runs"]) == (2, 3, 1)
    # sgd test: mean (0.90 + 0.95) / 2 = 0.925, std sqrt(2 * 0.025^2 / 1) = 0.0353553
    assert sgd["test_acc_mean"] == pytest.approx(0.925)
    assert sgd["test_acc_std"] == pytest.approx(0.0353553, abs=1e-7)
    # sgd loss 0.1, 0.3: mean 0.2, std sqrt(0.02) = 0.1414214; ms 1, 3: mean 2, std sqrt(2)
    assert sgd["final_train_loss_mean"] == pytest.approx(0.2)
    assert sgd["final_train_loss_std"] == pytest.approx(0.1414214, abs=1e-7)
    assert sgd["ms_per_step_std"] == pytest.approx(math.sqrt(2))
    # sam test 0.97, 0.99, 0.98: mean 0.98, std sqrt((1e-4 + 1e-4 + 0) / 2) = 0.01
    assert sam["test_acc_mean"] == pytest.approx(0.98)
    assert sam["test_acc_std"] == pytest.approx(0.01)
    # sam val 0.91, 0.93, 0.95: mean 0.93, std 0.02; ms 4, 4, 7: mean 5, std sqrt(6 / 2)
    assert sam["val_acc_mean"] == pytest.approx(0.93)
    assert sam["val_acc_std"] == pytest.approx(0.02)
    assert sam["ms_per_step_mean"] == pytest.approx(5.0)
    assert sam["ms_per_step_std"] == pytest.approx(math.sqrt(3))
    assert sam["time_ratio"] == pytest.approx(2.5)  # 5 / 2
    assert sgd["time_ratio"] == pytest.approx(1.0)
    assert asam["time_ratio"] == pytest.approx(1.25)
    assert math.isnan(asam["test_acc_std"])  # one run: no spread


def _table_rows(text):
    lines = text.splitlines()
    assert lines[1].startswith("|---")
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def test_format_table_prints_hand_computed_cells():
    text = format_table(FAKE)
    assert "test acc (%)" in text.splitlines()[0] and "time vs sgd" in text.splitlines()[0]
    rows = _table_rows(text)
    assert rows["sgd"] == ["2", "92.50 ± 3.54", "83.00 ± 4.24", "0.2000 ± 0.1414",
                           "2.000 ± 1.414", "1.00x"]
    assert rows["sam_sgd"] == ["3", "98.00 ± 1.00", "93.00 ± 2.00", "0.0600 ± 0.0100",
                               "5.000 ± 1.732", "2.50x"]
    assert rows["asam_sgd"] == ["1", "50.00", "40.00", "1.2500", "2.500", "1.25x"]


def test_format_table_without_baseline_says_na():
    rows = _table_rows(format_table([r for r in FAKE if r["optimizer"] != "sgd"]))
    assert rows["sam_sgd"][-1] == "n/a" and rows["asam_sgd"][-1] == "n/a"


# ---------------------------------------------------------------------------- command line
def test_cli_unknown_optimizer_exits_2(capsys):
    assert main(["bench", "--optimizers", "sgd,nope", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'nope'" in err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["bench", "--seeds", "a,b"], ["bench", "--epochs", "0"],
     ["bench", "--label-noise", "1.5"], ["bench", "--optimizers", ","],
     ["bench", "--optimizers", "sgd,SGD"]],
)
def test_cli_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_cli_list_prints_the_registry(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    infos = flatminima.list_optimizers(with_info=True)
    assert len(lines) == len(infos) + 1
    row = {line.split()[0]: line.split()[1:3] for line in lines[1:]}
    assert set(row) == set(flatminima.list_optimizers())
    assert row["sgd"] == ["1", "no"] and row["sam_sgd"] == ["2", "yes"]
    assert row["msam_adamw"] == ["2", "yes"] and row["esam_sgd"] == ["3", "yes"]


def test_cli_bench_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "res.json"
    argv = ["bench", "--optimizers", "sgd", "--epochs", "1", "--seeds", "0", "--json", str(out),
            "--quiet"]
    assert main(argv) == 0
    rows = _table_rows(capsys.readouterr().out.split("\n\n")[1])
    assert list(rows) == ["sgd"] and rows["sgd"][0] == "1"
    payload = json.loads(out.read_text())
    (rec,) = payload["results"]
    n_train = make_digits(0).x_train.shape[0]
    assert rec["optimizer"] == "sgd" and rec["steps"] == math.ceil(n_train / 64)
    assert payload["config"]["epochs"] == 1 and payload["summary"][0]["runs"] == 1
    assert rows["sgd"][1] == f"{100 * rec['test_acc']:.2f}"
