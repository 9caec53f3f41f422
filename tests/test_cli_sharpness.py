"""``run_quick(save_models=...)`` / ``flatminima bench --save-models`` and ``flatminima sharpness``.

The numbers printed by the command are checked against direct computations on the loaded model:
the training loss, the first-order worst-case sharpness (by hand with autograd), and the top Hessian
eigenvalue and trace against the full Hessian of a small model.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from flatminima import cli
from flatminima.bench.quick import run_quick
from flatminima.bench.tasks.digits import make_digits, make_mlp
from flatminima.cli import main

MODEL_KWARGS = {"hidden": (8,), "batch_norm": True}
RUN = dict(epochs=4, seeds=[0], max_train=200, label_noise=0.2, model_kwargs=MODEL_KWARGS, progress=False)
TIMING_KEYS = {"ms_per_step", "ms_per_step_median", "train_seconds"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two runs (SGD and SGD+SWA) saved to a folder, with their records."""
    folder = tmp_path_factory.mktemp("models")
    records = run_quick(["sgd", "sgd+swa"], save_models=folder, **RUN)
    return folder, records


def load(path):
    ckpt = torch.load(path, weights_only=True)
    model = make_mlp(64, 10, **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return ckpt, model


def train_batches(ckpt, n, dtype=torch.float64, clean=False):
    data = make_digits(ckpt["data_seed"], label_noise=ckpt["label_noise"], max_train=ckpt["max_train"])
    x, y = data.x_train.to(dtype), (data.y_train_clean if clean else data.y_train)
    return [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(y), 128)][:n]


def mean_loss(model, bs):
    return sum(F.cross_entropy(model(x), y) for x, y in bs) / len(bs)


def run_cli(args, capsys):
    code = main(["sharpness", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- saving models
def test_saving_models_changes_no_result_and_writes_the_evaluated_weights(saved):
    folder, records = saved
    plain = run_quick(["sgd", "sgd+swa"], **RUN)
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in plain]
    assert sorted(p.name for p in folder.iterdir()) == ["sgd+swa-seed0.pt", "sgd-seed0.pt"]
    for rec in records:
        ckpt, model = load(folder / f"{rec['optimizer']}-seed0.pt")
        assert ckpt["task"] == "digits" and ckpt["optimizer"] == rec["optimizer"]
        assert ckpt["model_kwargs"] == MODEL_KWARGS
        assert (ckpt["data_seed"], ckpt["label_noise"], ckpt["max_train"]) == (0, 0.2, 200)
        assert ckpt["seed"] == 0 and ckpt["epochs"] == 4
        # The saved weights are those evaluated (the averaged ones for SWA): same test accuracy.
        data = make_digits(0, label_noise=0.2, max_train=200)
        with torch.no_grad():
            acc = (model.eval()(data.x_test).argmax(1) == data.y_test).double().mean().item()
        assert acc == rec["test_acc"] == ckpt["test_acc"]


def test_bench_command_saves_models(tmp_path, capsys):
    code = main(["bench", "--optimizers", "sgd", "--epochs", "1", "--seeds", "3", "--quiet",
                 "--save-models", str(tmp_path / "m")])
    assert code == 0
    ckpt, _ = load(tmp_path / "m" / "sgd-seed3.pt")
    assert ckpt["seed"] == 3 and ckpt["max_train"] is None and ckpt["model_kwargs"] == {}


# ----------------------------------------------------------------------------- the command
def first_order_by_hand(model, bs, rho):
    """``L(w + rho g/|g|) - L(w)`` with plain autograd on a copy of the model."""
    m = copy.deepcopy(model).eval()
    params = list(m.parameters())
    loss = mean_loss(m, bs)
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / norm)
        return float(mean_loss(m, bs)) - float(loss)


def full_hessian(model, bs):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    model.eval()

    def f(w):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = w[i : i + s.numel()].view(s)
            i += s.numel()
        return sum(F.cross_entropy(functional_call(model, params, (x,)), y) for x, y in bs) / len(bs)

    return torch.func.jacrev(torch.func.jacrev(f))(w0)  # reverse over reverse: no forward AD


@pytest.mark.parametrize("fallback", [False, True])
def test_sharpness_numbers_equal_direct_computations(saved, tmp_path, capsys, monkeypatch, fallback):
    folder, _ = saved
    path = folder / "sgd-seed0.pt"
    if fallback:  # as if flatminima.sharpness.measures / .hessian did not exist
        monkeypatch.setattr(cli, "_optional", lambda module, name: None)
    out_json = tmp_path / "s.json"
    code, out, err = run_cli([path, "--batches", "2", "--rho", "0.1", "--json", out_json], capsys)
    assert code == 0, err
    report = json.loads(out_json.read_text())

    ckpt, model = load(path)
    model = model.double()
    bs = train_batches(ckpt, 2)
    assert report["batches"] == 2 and report["examples"] == 200  # 128 + 72 rows
    with torch.no_grad():
        direct = float(mean_loss(copy.deepcopy(model).eval(), bs))
        clean = float(mean_loss(copy.deepcopy(model).eval(), train_batches(ckpt, 2, clean=True)))
    assert report["train_loss"] == pytest.approx(direct, rel=1e-13)
    assert abs(clean - direct) > 1e-3  # the noisy labels (as trained on) were used
    assert f"training loss                    {direct:.6g}" in out

    sharp = first_order_by_hand(model, bs, 0.1)
    assert sharp > 0
    assert report["worst_case_sharpness"] == pytest.approx(sharp, rel=1e-9)
    assert report["rho"] == 0.1 and report["mode"] == "eval"

    if fallback or cli._optional(".sharpness.hessian", "hessian_eigenvalues") is None:
        assert report["hessian_top_eigenvalue"] is None and report["hessian_trace"] is None
        assert "skipped" in report["hessian_note"] and "skipped" in out
        if fallback:
            assert report["worst_case_method"].startswith("first order, inline")
    else:
        evals = torch.linalg.eigvalsh(full_hessian(copy.deepcopy(model), bs))
        assert report["hessian_top_eigenvalue"] == pytest.approx(float(evals[-1]), rel=1e-5)
        trace, se = float(evals.sum()), report["hessian_trace_stderr"]
        assert abs(report["hessian_trace"] - trace) <= max(5 * se, 1e-8 * abs(trace))
        assert "top Hessian eigenvalue" in out


def test_train_mode_uses_batch_statistics_and_leaves_the_loaded_file_alone(saved, tmp_path, capsys):
    folder, _ = saved
    path = folder / "sgd+swa-seed0.pt"
    before = path.read_bytes()
    code, _, err = run_cli([path, "--batches", "3", "--mode", "train", "--json", tmp_path / "t.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "t.json").read_text())
    ckpt, model = load(path)
    with torch.no_grad():
        direct = float(mean_loss(model.double().train(), train_batches(ckpt, 3)))
    assert report["train_loss"] == pytest.approx(direct, rel=1e-13)
    assert report["mode"] == "train" and report["examples"] == 200
    assert path.read_bytes() == before


def test_plot_writes_a_slice_png(saved, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder, _ = saved
    args = ["--batches", "1", "--plot", tmp_path / "plots", "--json", tmp_path / "p.json"]
    code, out, err = run_cli([folder / "sgd-seed0.pt", *args], capsys)
    assert code == 0, err
    png = tmp_path / "plots" / "sgd-seed0-slice1d.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["slice_1d_png"] == str(png)
    coords, losses = report["slice_1d"]["coords"], report["slice_1d"]["losses"]
    assert len(coords) == 21 and coords[10] == 0.0
    assert losses[10] == report["train_loss"]  # the centre of the slice is the model itself
    assert all(math.isfinite(v) for v in losses)


def test_bad_checkpoints_exit_2_with_a_message(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    a_list = tmp_path / "list.pt"
    torch.save([1, 2], a_list)
    partial = tmp_path / "partial.pt"
    torch.save({"task": "digits", "state_dict": {}}, partial)
    other_task = tmp_path / "task.pt"
    base = {"task": "digits", "model_kwargs": {"hidden": (8,)}, "data_seed": 0, "label_noise": 0.0,
            "state_dict": make_mlp(64, 10, hidden=(8,)).state_dict()}
    torch.save({**base, "task": "cifar"}, other_task)
    wrong_shape = tmp_path / "shape.pt"
    torch.save({**base, "model_kwargs": {"hidden": (9,)}}, wrong_shape)
    cases = [
        (tmp_path / "missing.pt", "no such file"),
        (tmp_path, "not a file"),
        (garbage, "not a readable torch checkpoint"),
        (a_list, "expected a dict checkpoint"),
        (partial, "missing model_kwargs, data_seed, label_noise"),
        (other_task, "unsupported task 'cifar'"),
        (wrong_shape, "does not fit the digits MLP"),
    ]
    for path, message in cases:
        code, out, err = run_cli([path], capsys)
        assert code == 2, (path, err)
        assert message in err and "Traceback" not in err
        assert err.startswith("flatminima sharpness: error:")
        assert out == ""
    # The valid base checkpoint works.
    ok = tmp_path / "ok.pt"
    torch.save(base, ok)
    assert run_cli([ok, "--batches", "1"], capsys)[0] == 0
    assert run_cli([ok, "--rho", "-1"], capsys)[0] == 2
    assert run_cli([ok, "--mode", "test"], capsys)[0] == 2
