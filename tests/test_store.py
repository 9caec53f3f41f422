"""The SQLite store of benchmark runs: keys, round trips, idempotent puts, and resuming a sweep that
was killed (SIGKILL) in the middle of a run."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from flatminima.bench.store import EpochRecord, RunRecord, RunSpec, Store, canonical_json, run_key


def _record(seed: int = 0, optimizer: str = "sgd", acc: float = 0.9, **spec_kw) -> RunRecord:
    spec = RunSpec(task="digits-mlp", optimizer=optimizer, seed=seed, budget={"epochs": 2},
                   size="tiny", **spec_kw)
    epochs = [
        EpochRecord(epoch=1, steps=4, train_seconds=0.1, train_loss=1.5,
                    val={"accuracy": acc - 0.1, "loss": 1.2}, test={"accuracy": acc - 0.1, "loss": 1.3}),
        EpochRecord(epoch=2, steps=8, train_seconds=0.2, train_loss=float("nan"),
                    val={"accuracy": acc, "loss": 1.0}, test={"accuracy": acc, "loss": 1.1},
                    averaged=True),
    ]
    return RunRecord(
        spec=spec, epochs=epochs, best_epoch=2, final_val=epochs[1].val, final_test=epochs[1].test,
        best_val=epochs[1].val, best_test=epochs[1].test, steps=8, ms_per_step=1.5,
        ms_per_step_median=1.4, train_seconds=0.2, total_seconds=0.5, peak_memory_bytes=2000,
        base_memory_bytes=1000, memory_method="rss_hwm",
        stats_history=[{"rho": 0.05}, {"rho": 0.05, "loss": float("nan")}],
        optimizer_kwargs={"lr": 0.05}, started_at=1.0, finished_at=2.0, extra={"sharpness": 0.3},
    )


def _same(a: object, b: object) -> bool:
    """Equality treating NaN == NaN (records carry NaN losses)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_key_is_canonical_and_ignores_label():
    a = RunSpec("digits-mlp", "sam_sgd", seed=1, hparams={"rho": 0.0, "gamma": 0.5}, label="x")
    b = RunSpec("digits-mlp", "SAM_SGD", seed=1, hparams={"gamma": 0.5, "rho": 0})
    assert a.key == b.key and len(a.key) == 32
    assert a.key == run_key(a.config())
    for other in (
        RunSpec("digits-mlp", "sam_sgd", seed=2, hparams={"rho": 0.0, "gamma": 0.5}),
        RunSpec("digits-mlp", "sam_sgd", seed=1, hparams={"rho": 0.1, "gamma": 0.5}),
        RunSpec("digits-mlp", "sam_sgd", seed=1, hparams={"rho": 0.0, "gamma": 0.5}, size="tiny"),
        RunSpec("digits-mlp", "sam_sgd", seed=1, hparams={"rho": 0.0, "gamma": 0.5}, label_noise=0.2),
        RunSpec("digits-mlp", "sam_sgd", seed=1, hparams={"rho": 0.0, "gamma": 0.5}, data_seed=3),
        RunSpec("digits-mlp", "sam_sgd", seed=1, hparams={"rho": 0.0, "gamma": 0.5},
                budget={"seconds": 10}),
    ):
        assert other.key != a.key
    assert canonical_json({"b": (1, 2.0), "a": 1.5}) == '{"a":1.5,"b":[1,2]}'
    with pytest.raises(ValueError):
        RunSpec("digits-mlp", "sgd", hparams={"lr": float("nan")})
    with pytest.raises(ValueError):
        RunSpec("digits-mlp", "sgd", budget={"epochs": 0})
    with pytest.raises(ValueError):
        RunSpec("digits-mlp", "sgd", budget={"epochs": 2, "seconds": 3})


def test_put_get_roundtrip(tmp_path):
    rec = _record()
    with Store(tmp_path / "sub" / "runs.sqlite") as store:
        assert not store.has(rec.key) and store.get(rec.key) is None
        assert store.put(rec) is True
        assert store.has(rec.key) and rec.key in store and len(store) == 1
        got = store.get(rec.key)
        assert _same(got.to_dict(), rec.to_dict())
        assert got.spec == rec.spec and got.epochs[1].averaged is True
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # Reopened from disk, with SQL-visible columns.
    with Store(tmp_path / "sub" / "runs.sqlite") as store:
        assert _same(store.get(rec.key).to_dict(), rec.to_dict())
        row = store._conn.execute(
            "SELECT task, optimizer, seed, best_test_metric, epochs_run FROM runs").fetchone()
        assert row == ("digits-mlp", "sgd", 0, 0.9, 2)
        assert store._conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 2


def test_duplicate_put_keeps_one_row(tmp_path):
    rec = _record()
    with Store(tmp_path / "runs.sqlite") as store:
        assert store.put(rec)
        first_id = store.row_id(rec.key)
        assert store.put(rec) is False
        changed = _record(acc=0.5)  # same key, other content: still ignored
        assert changed.key == rec.key and store.put(changed) is False
        assert len(store) == 1
        assert store._conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 2
        assert store.row_id(rec.key) == first_id
        assert store.get(rec.key).test_at_best == 0.9
        # replace=True rewrites it (one row still, epochs replaced too).
        assert store.put(changed, replace=True)
        assert len(store) == 1 and store.get(rec.key).test_at_best == 0.5
        assert store._conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 2
        # The UNIQUE constraint itself refuses a plain second insert.
        with pytest.raises(sqlite3.IntegrityError):
            store._conn.execute("INSERT INTO runs (key, task, optimizer, label, seed, budget, hparams, "
                                "record) VALUES (?, 't', 'o', 'l', 0, '{}', '{}', '{}')", (rec.key,))
        assert store.delete(rec.key) and not store.has(rec.key)
        assert store._conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 0


def test_all_filters(tmp_path):
    with Store(tmp_path / "runs.sqlite") as store:
        recs = [_record(seed=s, optimizer=o) for s in (0, 1) for o in ("sgd", "sam_sgd")]
        assert store.put_many(recs) == 4
        assert [r.key for r in store.all()] == [r.key for r in recs]
        assert {r.spec.optimizer for r in store.all(optimizer="sam_sgd")} == {"sam_sgd"}
        assert len(store.all(seed=[0, 1], optimizer=("sgd",))) == 2
        assert store.all(task="nope") == [] and store.all(seed=[]) == []
        assert store.keys() == {r.key for r in recs}
        with pytest.raises(TypeError):
            store.all(colour="red")


_SWEEP_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from flatminima.bench.runner import RunSpec, run_sweep
    from flatminima.bench.store import Store

    db, flag, specs = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])

    def progress(line):
        print(line, flush=True)
        if line.startswith("[2/4]") and ": epoch 1/" in line:
            flag.write_text("run 2 in progress")  # run 1 is committed, run 2 is half done
            time.sleep(120)                         # the parent kills us here

    run_sweep([RunSpec.from_dict(s) for s in specs], Store(db), progress=progress, threads=1)
    """
)


def test_sweep_resumes_after_sigkill(tmp_path):
    from flatminima.bench.runner import run_sweep

    db, flag = tmp_path / "runs.sqlite", tmp_path / "flag"
    specs = [RunSpec("digits-mlp", opt, seed=seed, budget={"epochs": 2}, size="tiny")
             for seed in (0, 1) for opt in ("sgd", "sam_sgd")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SWEEP_SCRIPT, str(db), str(flag),
         json.dumps([s.to_dict() for s in specs])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the sweep did not reach run 2: {proc.stdout.read().decode()}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    with Store(db) as store:
        assert store.keys() == {specs[0].key}  # run 1 whole, run 2 absent (no half record)
        first_id = store.row_id(specs[0].key)
        first = store.get(specs[0].key)
        assert first.epochs_run == 2

        lines: list[str] = []
        killed_at = time.time()
        result = run_sweep(specs, store, progress=lines.append, threads=1)
        assert result.skipped == [specs[0].key]
        assert result.ran == [s.key for s in specs[1:]]
        assert [r.key for r in result.records] == [s.key for s in specs]
        assert lines[0] == f"[1/4] {specs[0].describe()}: already done, skipped"
        assert any(line.startswith("[2/4]") and ": epoch 2/2" in line for line in lines)

        assert len(store) == 4 and store.keys() == {s.key for s in specs}
        assert store._conn.execute("SELECT COUNT(DISTINCT key), COUNT(*) FROM runs").fetchone() == (4, 4)
        assert store._conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 8
        assert store.row_id(specs[0].key) == first_id  # not recomputed
        again = store.get(specs[0].key)
        assert again.finished_at == first.finished_at and again.started_at == first.started_at
        assert store.get(specs[1].key).started_at >= killed_at  # the killed run was redone

        # A second resume computes nothing.
        result = run_sweep(specs, store, threads=1)
        assert result.ran == [] and len(result.skipped) == 4 and len(store) == 4


def test_ctrl_c_mid_run_leaves_only_whole_records(tmp_path):
    from flatminima.bench.runner import run_sweep

    specs = [RunSpec("digits-mlp", "sgd", seed=s, budget={"epochs": 2}, size="tiny") for s in (0, 1)]

    def progress(line):
        if line.startswith("[2/2]") and ": epoch 1/" in line:
            raise KeyboardInterrupt

    with Store(tmp_path / "runs.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(specs, store, progress=progress, threads=1)
        assert store.keys() == {specs[0].key}
        assert store._conn.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 2
        result = run_sweep(specs, store, threads=1)
        assert result.skipped == [specs[0].key] and result.ran == [specs[1].key] and len(store) == 2
