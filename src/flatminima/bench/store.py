"""Benchmark results: the run and record types, their stable keys, and a SQLite store of finished runs.

A benchmark run is (task, optimizer, hyperparameters, seed, budget) plus the task's ``size``,
``label_noise`` and ``data_seed``: a :class:`RunSpec`. Its :attr:`RunSpec.key` is the SHA-256 of
the canonical JSON of exactly those fields (sorted keys, no whitespace, integral floats written as
integers so that ``rho=0`` and ``rho=0.0`` are the same run, tuples as lists), so the same run gets
the same key in every process and on every machine. The display ``label`` is not part of the key.

A finished run is a :class:`RunRecord`: its spec, one :class:`EpochRecord` per epoch, the epoch
chosen on validation, timings, peak memory and the optimizer's ``stats`` history.
:mod:`flatminima.bench.runner` produces them; :mod:`flatminima.bench.report` summarizes them.

:class:`Store` keeps records in one SQLite file (WAL mode, so readers such as ``flatminima report``
never block a running sweep). Schema (version :data:`SCHEMA_VERSION`)::

    meta(name TEXT PRIMARY KEY, value TEXT)                      -- schema_version
    runs(id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,
         task, optimizer, label, seed, size, label_noise, data_seed,
         budget TEXT (canonical JSON), hparams TEXT (canonical JSON),
         metric, test_metric, val_metric, best_epoch, best_test_metric, best_val_metric,
         epochs_run, steps, ms_per_step, ms_per_step_median, train_seconds, total_seconds,
         peak_memory_bytes, base_memory_bytes, memory_method, started_at, finished_at,
         record TEXT NOT NULL)        -- the whole record as JSON, epochs excepted
    epochs(run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE, epoch INTEGER,
           steps, train_seconds, train_loss, val_metric, val_loss, test_metric, test_loss,
           averaged, data TEXT NOT NULL,  -- the whole EpochRecord as JSON
           PRIMARY KEY (run_id, epoch))

The scalar columns are copies for SQL queries; ``record`` and ``epochs.data`` are the source of truth.
A record is written only once its run has finished, in one transaction (the run row and all its
epoch rows, or nothing): a sweep killed at any point leaves only whole records, and the run it was
in the middle of has no row and is redone on resume. :meth:`Store.put` is ``INSERT OR IGNORE`` on
the ``UNIQUE`` key: the first finished record of a key is kept, a second ``put`` of the same key is
a no-op that returns ``False`` (``replace=True`` deletes and rewrites it instead), so a result once
stored keeps its row id and timestamps and never duplicates.

Nothing here imports torch: reading a database is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_DB_ENV",
    "DEFAULT_DB_PATH",
    "KEY_FIELDS",
    "SCHEMA_VERSION",
    "EpochRecord",
    "RunRecord",
    "RunSpec",
    "Store",
    "canonical_json",
    "default_db_path",
    "run_key",
]

SCHEMA_VERSION = 1
#: Key format version, part of every key: bump it when the meaning of a field changes.
KEY_VERSION = 1
#: Database used when :class:`Store` gets no path and ``$FLATMINIMA_BENCH_DB`` is unset.
DEFAULT_DB_PATH = "flatminima-bench.sqlite"
#: Environment variable overriding :data:`DEFAULT_DB_PATH`.
DEFAULT_DB_ENV = "FLATMINIMA_BENCH_DB"
#: The :class:`RunSpec` fields that identify a run (hashed into :attr:`RunSpec.key`).
KEY_FIELDS = ("task", "optimizer", "hparams", "seed", "budget", "size", "label_noise", "data_seed")


def default_db_path() -> Path:
    """``$FLATMINIMA_BENCH_DB`` if set, else :data:`DEFAULT_DB_PATH` in the working directory."""
    return Path(os.environ.get(DEFAULT_DB_ENV) or DEFAULT_DB_PATH)


# ----------------------------------------------------------------------------- keys
def _canonical(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) or (hasattr(value, "__float__") and not hasattr(value, "__len__")):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"{where}: non-finite number {value!r} cannot be part of a run key")
        return int(f) if f.is_integer() and abs(f) < 2**53 else f
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} value {value!r} is not JSON (str, number, bool, "
                    "None, list or dict)")


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value``: sorted keys, no whitespace, tuples as lists, integral
    floats as integers (``1.0`` -> ``1``); ``ValueError`` for NaN / inf, ``TypeError`` for values
    that are not JSON."""
    return json.dumps(_canonical(value, "value"), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def run_key(config: Mapping[str, Any]) -> str:
    """The stable key of a run: hex SHA-256 (32 characters) of the canonical JSON of the
    :data:`KEY_FIELDS` of ``config`` (missing ones count as ``None``) and the key version."""
    payload = {f: config.get(f) for f in KEY_FIELDS}
    payload["key_version"] = KEY_VERSION
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:32]


def _check_budget(budget: Mapping[str, Any]) -> dict[str, Any]:
    b = dict(budget)
    if set(b) == {"epochs"}:
        e = b["epochs"]
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"invalid budget {budget!r}: epochs must be an int >= 1")
        return {"epochs": int(e)}
    if set(b) == {"seconds"}:
        s = b["seconds"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise ValueError(f"invalid budget {budget!r}: seconds must be a number > 0")
        return {"seconds": float(s)}
    raise ValueError(f"invalid budget {budget!r}: give {{'epochs': n}} or {{'seconds': s}}")


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run.

    Attributes:
        task: a name in :data:`flatminima.bench.tasks.TASKS`.
        optimizer: a registry name (``flatminima.list_optimizers()``), e.g. ``"sam_sgd+swa"``.
        hparams: options for ``flatminima.create`` applied over the task defaults (``rho``, ``lr``,
            ``momentum``, ``weight_decay``, ESAM's ``beta`` / ``gamma``, SWA's ``start``, ...).
        seed: initialization, minibatch order and dropout.
        budget: ``{"epochs": n}`` (exactly ``n`` epochs) or ``{"seconds": s}`` (equal-time
            comparison: training stops at the first epoch end where the training time reaches
            ``s``).
        size, data_seed, label_noise: passed to the task's constructor.
        label: how reports name the optimizer (default: the registry name, followed by the
            ``hparams`` in brackets when there are any); not part of the key.
    """

    task: str
    optimizer: str
    seed: int = 0
    budget: Mapping[str, Any] = field(default_factory=lambda: {"epochs": 10})
    hparams: Mapping[str, Any] = field(default_factory=dict)
    size: str = "quick"
    data_seed: int = 0
    label_noise: float = 0.0
    label: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"invalid task: {self.task!r}")
        if not isinstance(self.optimizer, str) or not self.optimizer:
            raise ValueError(f"invalid optimizer: {self.optimizer!r}")
        object.__setattr__(self, "optimizer", self.optimizer.lower())
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "data_seed", int(self.data_seed))
        object.__setattr__(self, "label_noise", float(self.label_noise))
        object.__setattr__(self, "budget", _check_budget(self.budget))
        hp = dict(self.hparams)
        canonical_json(hp)  # fails early on values that cannot be keyed
        object.__setattr__(self, "hparams", hp)

    @property
    def epochs(self) -> int | None:
        """The epoch budget (``None`` for a time budget)."""
        return self.budget.get("epochs")

    @property
    def seconds(self) -> float | None:
        """The time budget in seconds (``None`` for an epoch budget)."""
        return self.budget.get("seconds")

    @property
    def display_label(self) -> str:
        """:attr:`label`, or the optimizer name followed by ``[k=v,...]`` for its hparams."""
        if self.label:
            return self.label
        if not self.hparams:
            return self.optimizer
        inner = ",".join(f"{k}={self.hparams[k]}" for k in sorted(self.hparams))
        return f"{self.optimizer}[{inner}]"

    def config(self) -> dict[str, Any]:
        """The key fields as a plain dict (what :func:`run_key` hashes)."""
        return {f: getattr(self, f) for f in KEY_FIELDS}

    @property
    def key(self) -> str:
        """The stable run key (:func:`run_key` of :meth:`config`)."""
        return run_key(self.config())

    def budget_text(self) -> str:
        """``"10 epochs"`` or ``"30 s"``."""
        if self.epochs is not None:
            return f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        return f"{self.seconds:g} s"

    def describe(self) -> str:
        """One line: ``task label seed N`` (plus size / noise when not the defaults)."""
        extra = "" if self.size == "quick" else f" [{self.size}]"
        if self.label_noise:
            extra += f" noise {self.label_noise:g}"
        return f"{self.task}{extra} {self.display_label} seed {self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.config(), "label": self.label}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class EpochRecord:
    """Metrics at the end of one epoch (``val`` / ``test`` are :meth:`Task.evaluate` dicts)."""

    epoch: int  #: 1-based
    steps: int  #: optimizer steps so far
    train_seconds: float  #: training time so far (optimizer steps and batches; evaluation excluded)
    train_loss: float  #: mean training loss over the epoch (loss returned by the step, at ``w``)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    #: whether ``val`` / ``test`` were measured on SWA-averaged weights
    averaged: bool = False
    elapsed_seconds: float = math.nan  #: wall time since the run started (evaluation included)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunRecord:
    """A finished run. ``best_*`` refer to the epoch chosen on validation (best primary validation
    metric, ties to the earliest epoch); ``final_*`` to the last epoch."""

    spec: RunSpec
    metric: str = "accuracy"  #: the task's primary metric (higher is better)
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0  #: 1-based; 0 when no epoch ran
    final_val: dict[str, float] = field(default_factory=dict)
    final_test: dict[str, float] = field(default_factory=dict)
    best_val: dict[str, float] = field(default_factory=dict)
    best_test: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    ms_per_step: float = math.nan  #: mean wall time of one optimizer step (its passes included)
    ms_per_step_median: float = math.nan
    train_seconds: float = math.nan  #: time in optimizer steps and batch preparation
    total_seconds: float = math.nan  #: the whole run: task construction, training, evaluation
    #: peak memory during the run (bytes): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
    #: process's peak resident set size (see :mod:`flatminima.bench.runner`)
    peak_memory_bytes: int | None = None
    base_memory_bytes: int | None = None  #: the same quantity when training started
    memory_method: str = ""  #: ``"cuda_max_allocated"``, ``"rss_hwm"`` or ``"ru_maxrss"``
    #: one snapshot of ``opt.stats`` per epoch (empty for optimizers without ``stats``)
    stats_history: list[dict[str, float]] = field(default_factory=list)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  #: what ``create`` received
    device: str = "cpu"
    threads: int = 0
    torch_version: str = ""
    started_at: float = math.nan  #: unix time
    finished_at: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)  #: e.g. ``{"sharpness": 0.12}``

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def label(self) -> str:
        return self.spec.display_label

    @property
    def epochs_run(self) -> int:
        return len(self.epochs)

    @property
    def test_at_best(self) -> float:
        """The primary test metric at the validation-chosen epoch (NaN if missing)."""
        return float(self.best_test.get(self.metric, math.nan))

    @property
    def final_test_metric(self) -> float:
        return float(self.final_test.get(self.metric, math.nan))

    @property
    def peak_memory_delta(self) -> int | None:
        """``peak_memory_bytes - base_memory_bytes``: what the run added at its peak."""
        if self.peak_memory_bytes is None or self.base_memory_bytes is None:
            return None
        return max(0, int(self.peak_memory_bytes) - int(self.base_memory_bytes))

    def to_dict(self, *, epochs: bool = True) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["spec"] = self.spec.to_dict()
        d["key"] = self.key
        d["epochs"] = [e.to_dict() for e in self.epochs] if epochs else []
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["spec"] = d["spec"] if isinstance(d["spec"], RunSpec) else RunSpec.from_dict(d["spec"])
        kw["epochs"] = [e if isinstance(e, EpochRecord) else EpochRecord.from_dict(e)
                        for e in d.get("epochs", [])]
        return cls(**kw)


# ----------------------------------------------------------------------------- the store
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    label TEXT NOT NULL,
    seed INTEGER NOT NULL,
    size TEXT,
    label_noise REAL,
    data_seed INTEGER,
    budget TEXT NOT NULL,
    hparams TEXT NOT NULL,
    metric TEXT,
    test_metric REAL,
    val_metric REAL,
    best_epoch INTEGER,
    best_test_metric REAL,
    best_val_metric REAL,
    epochs_run INTEGER,
    steps INTEGER,
    ms_per_step REAL,
    ms_per_step_median REAL,
    train_seconds REAL,
    total_seconds REAL,
    peak_memory_bytes INTEGER,
    base_memory_bytes INTEGER,
    memory_method TEXT,
    started_at REAL,
    finished_at REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_task_optimizer ON runs (task, optimizer);
CREATE TABLE IF NOT EXISTS epochs (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    steps INTEGER,
    train_seconds REAL,
    train_loss REAL,
    val_metric REAL,
    val_loss REAL,
    test_metric REAL,
    test_loss REAL,
    averaged INTEGER,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
"""

_FILTERS = ("task", "optimizer", "label", "seed", "size", "label_noise", "data_seed", "key")


def _num(x: Any) -> float | None:
    """A float for a REAL column (``None`` for missing / NaN, which SQLite cannot hold)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if not math.isnan(f) else None


def _dumps(value: Any) -> str:
    # Records may hold NaN (a diverged run); Python's json reads its own NaN / Infinity back.
    return json.dumps(value, sort_keys=True, default=str)


class Store:
    """The finished runs in one SQLite file.

    ``Store(path)`` opens (creating it and its folder if needed) the database at ``path``; default
    :func:`default_db_path`. ``":memory:"`` gives a private in-memory store. Use as a context manager
    or call :meth:`close`. Several processes may share a file: writes take SQLite's write lock
    (``BEGIN IMMEDIATE``, waiting up to ``timeout`` seconds), readers never block (WAL).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float = 60.0) -> None:
        self.path = default_db_path() if path is None else path
        if str(self.path) != ":memory:":
            self.path = Path(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; put() opens its own BEGIN IMMEDIATE.
        self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a killed process (not a power cut).
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._transaction():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)
            row = self._conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema version {row[0]}, this flatminima reads {SCHEMA_VERSION}"
                )

    # ------------------------------------------------------------------ plumbing
    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")

    def _transaction(self) -> Store._Tx:
        return Store._Tx(self._conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ------------------------------------------------------------------ queries
    def has(self, key: str) -> bool:
        """Whether a finished run with this key is stored."""
        return self._conn.execute("SELECT 1 FROM runs WHERE key=?", (key,)).fetchone() is not None

    __contains__ = has

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def keys(self) -> set[str]:
        """The keys of every stored run."""
        return {r[0] for r in self._conn.execute("SELECT key FROM runs")}

    def row_id(self, key: str) -> int | None:
        """The ``runs.id`` of a key (stable: a stored run is never rewritten unless replaced)."""
        row = self._conn.execute("SELECT id FROM runs WHERE key=?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _load(self, run_id: int, record_json: str) -> RunRecord:
        d = json.loads(record_json)
        d["epochs"] = [
            json.loads(r[0])
            for r in self._conn.execute("SELECT data FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,))
        ]
        return RunRecord.from_dict(d)

    def get(self, key: str) -> RunRecord | None:
        """The record of ``key`` (``None`` if not stored)."""
        row = self._conn.execute("SELECT id, record FROM runs WHERE key=?", (key,)).fetchone()
        return None if row is None else self._load(row[0], row[1])

    def all(self, **filters: Any) -> list[RunRecord]:
        """Stored records in insertion order, optionally filtered: ``task``, ``optimizer``,
        ``label``, ``seed``, ``size``, ``label_noise``, ``data_seed`` or ``key``, each a value or a
        list / tuple / set of accepted values, e.g. ``store.all(task="digits-mlp", seed=[0, 1])``."""
        clauses, args = [], []
        for name, want in filters.items():
            if name not in _FILTERS:
                raise TypeError(f"unknown filter {name!r} (one of {', '.join(_FILTERS)})")
            values = list(want) if isinstance(want, (list, tuple, set, frozenset)) else [want]
            if not values:
                return []
            clauses.append(f"{name} IN ({','.join('?' * len(values))})")
            args += values
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._conn.execute(f"SELECT id, record FROM runs{where} ORDER BY id", args).fetchall()
        return [self._load(i, rec) for i, rec in rows]

    def __iter__(self) -> Iterator[RunRecord]:
        return iter(self.all())

    # ------------------------------------------------------------------ writes
    def put(self, record: RunRecord, *, replace: bool = False) -> bool:
        """Store a finished run: its row and its epoch rows in one transaction.

        ``INSERT OR IGNORE`` on the unique key: if the key is already stored, nothing changes and
        ``False`` is returned (the first finished record is kept, with its row id and timestamps).
        With ``replace=True`` an existing record is deleted and this one written instead (new row
        id). Returns whether this record was written."""
        if not isinstance(record, RunRecord):
            raise TypeError(f"put() takes a RunRecord, got {type(record).__name__}")
        spec = record.spec
        key = spec.key
        body = record.to_dict(epochs=False)
        del body["epochs"]
        epoch_rows = []
        for e in record.epochs:
            epoch_rows.append((
                int(e.epoch), int(e.steps), _num(e.train_seconds), _num(e.train_loss),
                _num(e.val.get(record.metric)), _num(e.val.get("loss")),
                _num(e.test.get(record.metric)), _num(e.test.get("loss")), int(bool(e.averaged)),
                _dumps(e.to_dict()),
            ))
        values = (
            key, spec.task, spec.optimizer, spec.display_label, spec.seed, spec.size,
            spec.label_noise, spec.data_seed, canonical_json(spec.budget), canonical_json(spec.hparams),
            record.metric, _num(record.final_test.get(record.metric)),
            _num(record.final_val.get(record.metric)), int(record.best_epoch),
            _num(record.best_test.get(record.metric)), _num(record.best_val.get(record.metric)),
            record.epochs_run, int(record.steps), _num(record.ms_per_step),
            _num(record.ms_per_step_median), _num(record.train_seconds), _num(record.total_seconds),
            record.peak_memory_bytes, record.base_memory_bytes, record.memory_method,
            _num(record.started_at), _num(record.finished_at), _dumps(body),
        )
        with self._transaction() as conn:
            if replace:
                conn.execute("DELETE FROM runs WHERE key=?", (key,))
            cur = conn.execute(
                "INSERT OR IGNORE INTO runs (key, task, optimizer, label, seed, size, label_noise, "
                "data_seed, budget, hparams, metric, test_metric, val_metric, best_epoch, "
                "best_test_metric, best_val_metric, epochs_run, steps, ms_per_step, "
                "ms_per_step_median, train_seconds, total_seconds, peak_memory_bytes, "
                "base_memory_bytes, memory_method, started_at, finished_at, record) "
                f"VALUES ({','.join('?' * len(values))})",
                values,
            )
            if cur.rowcount == 0:
                return False
            run_id = cur.lastrowid
            conn.executemany(
                "INSERT INTO epochs (run_id, epoch, steps, train_seconds, train_loss, val_metric, "
                "val_loss, test_metric, test_loss, averaged, data) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(run_id, *r) for r in epoch_rows],
            )
        return True

    def put_many(self, records: Iterable[RunRecord]) -> int:
        """:meth:`put` each record; returns how many were written."""
        return sum(self.put(r) for r in records)

    def delete(self, key: str) -> bool:
        """Remove a run and its epochs (so that a sweep runs it again); whether it existed."""
        with self._transaction() as conn:
            return conn.execute("DELETE FROM runs WHERE key=?", (key,)).rowcount > 0
