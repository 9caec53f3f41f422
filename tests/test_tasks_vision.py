"""Vision tasks: the IDX reader on synthetic files, MNIST-1D (generated offline) and Fashion-MNIST
(Debian package, skipped only where it is not installed) through the Task interface."""

from __future__ import annotations

import gzip
import random
import socket
import struct
import sys

import numpy as np
import pytest
import torch

from flatminima.bench.tasks import TASKS, TaskUnavailable
from flatminima.bench.tasks import vision as V
from flatminima.bench.tasks.vision import FashionMNISTTask, MNIST1DCNNTask, MNIST1DMLPTask

ALL_TASKS = (MNIST1DMLPTask, MNIST1DCNNTask, FashionMNISTTask)


def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
             np.float64: 0x0E}
    code = codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, array: np.ndarray, compress: bool = True) -> None:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)


def _fake_fashion(folder, n_train: int = 600, n_test: int = 300) -> None:
    """Four Fashion-MNIST-shaped IDX files whose image ``i`` stores ``i`` in its first two pixels."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        _write(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write(folder / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), compress=False)


def _make(cls, **kw):
    message = cls.availability()
    if message is not None:
        pytest.skip(message)
    return cls(**kw)


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_returns_the_written_arrays(tmp_path, compress):
    rng = np.random.default_rng(1)
    arrays = {
        "img": rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8),
        "lab": rng.integers(0, 10, size=(7,), dtype=np.uint8),
        "i8": rng.integers(-128, 128, size=(2, 3), dtype=np.int8),
        "i16": rng.integers(-3000, 3000, size=(4, 2), dtype=np.int16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(3, 2, 2), dtype=np.int32),
        "f32": rng.standard_normal((2, 5)).astype(np.float32),
        "f64": rng.standard_normal((6,)),
    }
    for name, array in arrays.items():
        _write(tmp_path / name, array, compress=compress)
        out = V.read_idx(tmp_path / name)
        assert out.dtype == array.dtype and out.dtype.isnative and out.shape == array.shape
        np.testing.assert_array_equal(out, array)
    assert V.read_idx(tmp_path / "img", V.IDX_IMAGES_MAGIC).shape == (5, 3, 4)
    assert V.read_idx(tmp_path / "lab", V.IDX_LABELS_MAGIC).shape == (7,)
    assert V.parse_idx(_idx_bytes(np.zeros((0, 28, 28), np.uint8))).shape == (0, 28, 28)


def test_read_idx_rejects_bad_magic_and_truncated_files_with_clear_errors(tmp_path):
    good = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    cases = {
        "bad_first_bytes": (b"\x01\x00" + good[2:], "bad IDX magic number 0x01000803"),
        "bad_type_code": (good[:2] + b"\x07" + good[3:], "bad IDX magic number 0x00000703"),
        "zero_dims": (good[:3] + b"\x00" + good[4:], "bad IDX magic number 0x00000800"),
        "text_file": (b"hello world, not IDX", "bad IDX magic number"),
        "too_short": (b"\x00\x00", "shorter than the magic number"),
        "truncated_header": (good[:10], "truncated IDX header"),
        "truncated_data": (
            good[:-1], r"truncated IDX file: shape \(2, 3, 4\) of uint8 needs 24 data bytes, found 23"
        ),
        "trailing": (good + b"\x00", "1 trailing bytes"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            V.read_idx(tmp_path / name)
    (tmp_path / "gz_truncated").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(ValueError, match="damaged or truncated gzip"):
        V.read_idx(tmp_path / "gz_truncated")
    (tmp_path / "gz_truncated_data").write_bytes(gzip.compress(good[:-5]))
    with pytest.raises(ValueError, match="truncated IDX file"):
        V.read_idx(tmp_path / "gz_truncated_data")
    (tmp_path / "labels").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match=r"magic number 0x00000801 \(2049\), expected 0x00000803 \(2051\)"):
        V.read_idx(tmp_path / "labels", V.IDX_IMAGES_MAGIC)


# ------------------------------------------------------------------------------------ the tasks


def test_registry_names_models_and_hparams():
    for cls, name in zip(ALL_TASKS, ("mnist1d-mlp", "mnist1d-cnn", "fashion-mnist-cnn")):
        assert TASKS[name] is cls and cls.domain == "vision" and cls.per_sample
        hp = cls.hparams
        assert hp.lr > 0 and hp.batch_size > 0 and 0 < hp.epochs_quick <= hp.epochs_full
    counts = [sum(p.numel() for p in m.parameters()) for m in
              (V.make_mlp(40, 10, hidden=(100, 100)), V.make_mnist1d_cnn(), V.make_fashion_cnn())]
    assert counts[0] == 15210 and counts[1] < 20_000 and 80_000 < counts[2] < 130_000
    assert V.make_mnist1d_cnn()(torch.randn(3, 40)).shape == (3, 10)
    assert V.make_fashion_cnn()(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("cls", ALL_TASKS, ids=lambda c: c.name)
def test_tiny_task_splits_noise_training_and_evaluation(cls):
    clean = _make(cls, size="tiny", data_seed=0)
    noisy = cls(size="tiny", data_seed=0, label_noise=0.25)
    n_train, n_val, n_test = clean.x_train.shape[0], clean.x_val.shape[0], clean.x_test.shape[0]
    expected = {"mnist1d-mlp": (360, 40, 100), "mnist1d-cnn": (360, 40, 100),
                "fashion-mnist-cnn": (400, 100, 200)}[cls.name]
    assert n_train + n_val == sum(expected[:2]) and abs(n_val - expected[1]) <= 5 and n_test == expected[2]
    # train and val come from disjoint rows of the training data; the test set is separate
    assert not set(clean.train_index.tolist()) & set(clean.val_index.tolist())
    assert clean.x_train.dtype == torch.float32 and clean.y_train.dtype == torch.int64
    assert torch.bincount(clean.y_train, minlength=10).min() >= n_train // 10 - 10
    assert torch.bincount(clean.y_val, minlength=10).min() >= n_val // 10 - 1
    # label noise: only training labels, exactly the requested number
    assert int(noisy.flipped.sum()) == round(0.25 * n_train)
    assert torch.equal(noisy.y_train_clean, clean.y_train)
    assert torch.equal(noisy.y_train[~noisy.flipped], clean.y_train[~noisy.flipped])
    assert bool((noisy.y_train[noisy.flipped] != clean.y_train[noisy.flipped]).all())
    assert torch.equal(noisy.y_val, clean.y_val) and torch.equal(noisy.y_test, clean.y_test)
    assert torch.equal(noisy.x_train, clean.x_train)
    # per-sample losses average to the loss
    torch.manual_seed(0)
    model = clean.make_model()
    batch = next(clean.train_batches(torch.Generator().manual_seed(0)))
    with torch.no_grad():
        per = clean.sample_losses(model, batch)
        assert per.shape == (cls.hparams.batch_size,)
        assert float(per.mean()) == pytest.approx(float(clean.loss(model, batch)), rel=1e-5)
        rows = torch.tensor([0, 5, 9])
        torch.testing.assert_close(clean.sample_losses(model, clean.select(batch, rows)), per[rows])
    # one epoch of SGD lowers the training loss
    before = clean.evaluate(model, "train")["loss"]
    opt = torch.optim.SGD(model.parameters(), lr=cls.hparams.lr, momentum=0.9)
    for b in clean.train_batches(torch.Generator().manual_seed(1)):
        opt.zero_grad()
        loss = clean.loss(model, b)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    after = clean.evaluate(model, "train")["loss"]
    assert np.isfinite(after) and after < before
    for mode in (True, False):
        model.train(mode)
        for split in ("val", "test"):
            metrics = clean.evaluate(model, split)
            assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
        assert model.training is mode


def test_default_hparams_learn_mnist1d_at_quick_size():
    """10 epochs of the default SGD settings on the quick data (the full quick budget is longer)."""
    for cls, target in ((MNIST1DCNNTask, 0.85), (MNIST1DMLPTask, 0.35)):
        task = _make(cls, size="quick")
        n_train, n_val = task.x_train.shape[0], task.x_val.shape[0]  # 90 / 10 within each class
        assert n_train + n_val == 4000 and abs(n_val - 400) <= 5 and task.x_test.shape[0] == 1000
        hp = task.hparams
        torch.manual_seed(0)
        model = task.make_model()
        opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        best = 0.0
        for epoch in range(10):
            for batch in task.train_batches(torch.Generator().manual_seed(epoch)):
                opt.zero_grad()
                task.loss(model, batch).backward()
                opt.step()
            best = max(best, task.evaluate(model, "val")["accuracy"])
        assert best > target, (cls.name, best)


def test_mnist1d_is_deterministic_seeded_and_leaves_global_rngs_alone():
    if MNIST1DMLPTask.availability() is not None:
        pytest.skip(MNIST1DMLPTask.availability())
    V._generate_mnist1d.cache_clear()
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    a = MNIST1DMLPTask(size="tiny", data_seed=0)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    V._generate_mnist1d.cache_clear()
    b = MNIST1DCNNTask(size="tiny", data_seed=0)
    c = MNIST1DMLPTask(size="tiny", data_seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_test, c.x_test)
    assert a.x_train.shape[1:] == (40,)
    x_tr, y_tr, x_te, y_te = V.load_mnist1d(0, 500)
    torch.testing.assert_close(a.x_train, x_tr[a.train_index])
    torch.testing.assert_close(a.x_val, x_tr[a.val_index])
    assert torch.equal(a.y_test, y_te) and a.x_train.data_ptr() != b.x_train.data_ptr()


def test_data_loads_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access during data loading")

    V._generate_mnist1d.cache_clear()
    V._read_fashion_files.cache_clear()
    V._dpkg_fashion_dir.cache_clear()
    for name in [m for m in sys.modules if m == "mnist1d" or m.startswith("mnist1d.")]:
        monkeypatch.delitem(sys.modules, name)  # the generator package is imported again, offline
    monkeypatch.setattr(socket, "socket", no_network)
    with pytest.raises(OSError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))
    loaded = 0
    for cls in ALL_TASKS:
        if cls.availability() is None:
            task = cls(size="tiny")
            assert task.x_train.shape[0] > 0
            loaded += 1
    if loaded == 0:
        pytest.skip("no vision data on this machine")


def test_missing_data_gives_a_message_and_task_unavailable(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = FashionMNISTTask.availability(data_dir=empty)
    assert "apt-get install dataset-fashion-mnist" in message and str(empty) in message
    assert "\n" not in message
    with pytest.raises(TaskUnavailable, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTTask(size="tiny", data_dir=empty)
    monkeypatch.setattr(V, "FASHION_MNIST_DIR", empty)
    assert FashionMNISTTask.availability() == message
    with pytest.raises(TaskUnavailable):
        FashionMNISTTask(size="tiny")
    monkeypatch.setattr(V, "FASHION_MNIST_DIR", None)
    monkeypatch.setenv(V.FASHION_ENV, str(empty))
    assert V.fashion_mnist_dir() == empty and FashionMNISTTask.availability() == message
    # mnist1d not importable (even with a cached generation)
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    for cls in (MNIST1DMLPTask, MNIST1DCNNTask):
        message = cls.availability()
        assert message == "MNIST-1D needs the mnist1d generator package: pip install mnist1d==0.0.2.post1"
        with pytest.raises(TaskUnavailable, match=r"pip install mnist1d==0\.0\.2\.post1"):
            cls(size="tiny")


def test_fashion_task_on_synthetic_idx_files(tmp_path):
    _fake_fashion(tmp_path)
    assert FashionMNISTTask.availability(data_dir=tmp_path) is None
    task = FashionMNISTTask(size="tiny", data_seed=3, data_dir=tmp_path)
    assert task.x_train.shape == (400, 1, 28, 28) and task.x_test.shape == (200, 1, 28, 28)
    assert task.data_dir == tmp_path

    def ids(x):  # undo the normalization and read the row ids stored in the first two pixels
        pixels = torch.round((x[:, 0, 0, :2] * V.FASHION_STD + V.FASHION_MEAN) * 255).long()
        return pixels[:, 0] + 256 * pixels[:, 1]

    assert torch.equal(ids(task.x_train), task.train_index) and torch.equal(ids(task.x_val), task.val_index)
    assert torch.equal(ids(task.x_test), task.test_index)
    assert not set(task.train_index.tolist()) & set(task.val_index.tolist())
    assert torch.equal(task.y_train, task.train_index % 10) and torch.equal(task.y_test, task.test_index % 10)
    assert torch.bincount(task.y_train).tolist() == [40] * 10
    assert torch.bincount(task.y_val).tolist() == [10] * 10
    other = FashionMNISTTask(size="tiny", data_seed=4, data_dir=tmp_path)
    assert not torch.equal(other.train_index, task.train_index)
    with pytest.raises(ValueError, match="cannot take a subset of 5000 rows out of 600"):
        FashionMNISTTask(size="quick", data_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(299, np.uint8)))
    with pytest.raises(ValueError, match="test files disagree"):
        FashionMNISTTask(size="tiny", data_dir=tmp_path)


def test_fashion_quick_split_on_the_real_data():
    task = _make(FashionMNISTTask, size="quick", data_seed=0)
    assert (task.x_train.shape[0], task.x_val.shape[0], task.x_test.shape[0]) == (4500, 500, 2000)
    assert torch.bincount(task.y_train).tolist() == [450] * 10
    assert torch.bincount(task.y_val).tolist() == [50] * 10
    assert torch.bincount(task.y_test).tolist() == [200] * 10
    assert task.test_index.unique().numel() == 2000 and int(task.test_index.max()) < 10000
    assert torch.equal(FashionMNISTTask(size="full").test_index, torch.arange(10000))
    assert abs(float(task.x_train.mean())) < 0.05 and abs(float(task.x_train.std()) - 1) < 0.05
    x_tr, y_tr, x_te, y_te = V.load_fashion_mnist()
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28) and x_tr.dtype == np.uint8
    assert np.bincount(y_tr).tolist() == [6000] * 10
