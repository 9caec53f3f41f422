"""The suite side of the command line: ``flatminima bench --suite``, ``flatminima report`` and
``flatminima tasks`` (tiny digits runs, a few seconds in all)."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3

import pytest

from flatminima.bench.store import Store
from flatminima.bench.tasks import TASKS, DigitsTask
from flatminima.cli import main

SUITE = ["bench", "--suite", "quick", "--tasks", "digits-mlp", "--optimizers", "sgd,sam_sgd",
         "--seeds", "0", "--size", "tiny", "--budget", "2", "--quiet"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _table(text: str) -> str:
    """The summary table: the Markdown lines from its header to the first blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| setting | optimizer |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return "\n".join(lines[start:end])


def _rows(table: str) -> dict[str, list[str]]:
    """optimizer -> the other cells of its row."""
    out = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[1]] = [cells[0], *cells[2:]]
    return out


def _db_rows(db) -> list[tuple]:
    with Store(db) as store:
        return sorted(
            (store.row_id(r.key), r.key, r.spec.optimizer, r.finished_at, r.epochs_run)
            for r in store.all()
        )


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The first sweep: (its database, exit code, stdout, stderr)."""
    db = tmp_path_factory.mktemp("suite") / "tmp" / "db.sqlite"
    code, out, err = _run([*SUITE, "--db", str(db)])
    return db, code, out, err


# ---------------------------------------------------------------------------- bench --suite
def test_suite_runs_both_optimizers_and_stores_two_runs(first):
    db, code, out, err = first
    assert code == 0, err
    assert err == ""  # --quiet: no progress lines
    rows = _rows(_table(out))
    assert list(rows) == ["sgd", "sam_sgd"]
    for cells in rows.values():
        assert cells[0] == "digits-mlp (tiny, 2 epochs)" and cells[1] == "1"  # setting, runs
        assert cells[2].endswith(" %")  # accuracy in percent
    assert rows["sgd"][6] == "1.00x"  # time vs sgd
    assert "2 runs: 2 ran, 0 already in the database, 0 unavailable, 0 failed" in out
    assert "Win matrix" in out
    stored = _db_rows(db)
    assert [r[2] for r in sorted(stored, key=lambda r: r[0])] == ["sgd", "sam_sgd"]
    assert all(r[4] == 2 for r in stored)  # two epochs each
    with Store(db) as store:
        specs = [r.spec for r in store.all()]
    assert all(s.task == "digits-mlp" and s.size == "tiny" and s.budget == {"epochs": 2}
               and s.seed == 0 for s in specs)


def test_suite_rerun_recomputes_nothing_and_prints_the_same_table(first, tmp_path):
    db, code, out, _ = first
    assert code == 0
    before = _db_rows(db)
    jpath = tmp_path / "sweep.json"
    code2, out2, err2 = _run([*SUITE, "--db", str(db), "--json", str(jpath)])
    assert code2 == 0, err2
    assert _db_rows(db) == before  # same row ids, keys, finished_at: nothing recomputed
    assert _table(out2) == _table(out)
    assert "2 runs: 0 ran, 2 already in the database, 0 unavailable, 0 failed" in out2
    payload = json.loads(jpath.read_text())
    assert payload["config"]["tasks"] == ["digits-mlp"]
    assert payload["config"]["optimizers"] == ["sgd", "sam_sgd"]
    assert payload["ran"] == [] and sorted(payload["skipped"]) == sorted(r[1] for r in before)
    assert [row["optimizer"] for row in payload["summary"]] == ["sgd", "sam_sgd"]
    assert [r["finished_at"] for r in payload["records"]] == [r[3] for r in sorted(before)]


def test_suite_progress_goes_to_stderr(first):
    db, _, _, _ = first
    argv = [a for a in SUITE if a != "--quiet"]
    code, out, err = _run([*argv, "--db", str(db)])
    assert code == 0
    assert "[1/2] digits-mlp [tiny] sgd seed 0: already done, skipped" in err
    assert "already done" not in out


def test_suite_skips_unavailable_named_task_and_uses_the_env_database(tmp_path, monkeypatch):
    monkeypatch.setattr(DigitsTask, "availability", classmethod(lambda cls: "download it"))
    db = tmp_path / "env.sqlite"
    monkeypatch.setenv("FLATMINIMA_BENCH_DB", str(db))
    code, out, err = _run(SUITE)
    assert code == 0
    assert "skipping task digits-mlp (unavailable): download it" in err
    assert "unavailable tasks (skipped):\n  digits-mlp: download it" in out
    assert "no finished runs" in out
    assert db.exists() and len(Store(db)) == 0


def test_suite_failed_run_is_reported_and_exits_1(tmp_path, monkeypatch):
    class Boom(DigitsTask):
        name = "boom-task"

        def __init__(self, **kw):
            raise RuntimeError("boom")

    monkeypatch.setitem(TASKS, "boom-task", Boom)
    db = tmp_path / "db.sqlite"
    code, out, err = _run(["bench", "--suite", "quick", "--tasks", "boom-task,digits-mlp",
                           "--optimizers", "sgd", "--seeds", "0", "--size", "tiny", "--budget", "1",
                           "--db", str(db), "--quiet"])
    assert code == 1, err
    assert "2 runs: 1 ran, 0 already in the database, 0 unavailable, 1 failed" in out
    assert "failed runs (not stored; the next sweep retries them):" in out
    assert "boom-task [tiny] sgd seed 0: RuntimeError: boom" in out
    assert list(_rows(_table(out))) == ["sgd"]  # the digits run still ran
    with Store(db) as store:
        assert [r.spec.task for r in store.all()] == ["digits-mlp"]


def test_suite_interrupted_exits_130(tmp_path, monkeypatch):
    import flatminima.bench.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_sweep", interrupted)
    code, _, err = _run([*SUITE, "--db", str(tmp_path / "db.sqlite")])
    assert code == 130
    assert "interrupted" in err and "run the same command again to resume" in err


# ---------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--tasks", "digits-mlp"], "--tasks only applies to the multi-task suite"),
        (["bench", "--budget", "2", "--size", "tiny"], "--budget, --size only apply"),
        (["bench", "--db", "DB"], "--db only applies"),
        (["bench", "--suite", "quick", "--tasks", "nope"], "unknown task 'nope'"),
        (["bench", "--suite", "quick", "--tasks", "digits-mlp,digits-mlp"], "each name once"),
        (["bench", "--suite", "quick", "--tasks", ","], "no task names"),
        (["bench", "--suite", "quick", "--epochs", "3"], "--epochs only applies to the digits job"),
        (["bench", "--suite", "full", "--lr", "0.1", "--batch-size", "8"], "--lr, --batch-size"),
        (["bench", "--suite", "quick", "--save-models", "m"], "--save-models"),
        (["bench", "--suite", "quick", "--optimizers", "sgd,nope"], "unknown optimizer 'nope'"),
        (["bench", "--suite", "quick", "--budget", "ten"], "invalid budget 'ten'"),
        (["bench", "--suite", "quick", "--size", "huge"], "invalid choice"),
        (["bench", "--suite", "medium"], "invalid choice"),
        (["bench", "--suite", "quick", "--label-noise", "1"], "fraction < 1"),
    ],
)
def test_bench_usage_errors_exit_2_before_touching_the_database(argv, message, tmp_path):
    db = tmp_path / "db.sqlite"
    argv = [str(db) if a == "DB" else a for a in argv]
    if "--suite" in argv:
        argv += ["--db", str(db)]
    code, out, err = _run(argv)
    assert code == 2
    assert message in err and "error" in err
    assert out == ""
    assert not db.exists()


def test_digits_job_keeps_its_defaults(tmp_path):
    code, out, err = _run(["bench", "--optimizers", "sgd", "--epochs", "1", "--seeds", "0",
                           "--quiet"])
    assert code == 0, err
    assert out.startswith("digits MLP 64-128-128-10, 1 epochs, batch 64, lr 0.05,")


# ---------------------------------------------------------------------------- report
def test_report_writes_markdown_and_prints_the_table(first, tmp_path):
    db, _, out, _ = first
    rep = tmp_path / "tmp" / "rep"
    code, rout, err = _run(["report", "--db", str(db), "--out", str(rep)])
    assert code == 0, err
    text = (rep / "report.md").read_text()
    for line in _table(out).splitlines()[2:]:
        assert line in text  # the optimizer rows, as the sweep printed them
    assert _table(rout) == _table(out)
    assert f"wrote {rep / 'report.md'} (2 runs from {db})" in rout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in text
    else:
        pngs = sorted(p.name for p in rep.glob("*.png"))
        # every run measures its final sharpness, so the error-vs-sharpness plot is drawn too
        assert pngs == ["sharpness_digits-mlp-tiny-2-epochs.png", "time_digits-mlp-tiny-2-epochs.png"]
        assert "![" in text

    code, _, err = _run(["report", "--db", str(db), "--out", str(tmp_path / "np"), "--no-plots",
                         "--tasks", "digits-mlp"])
    assert code == 0, err
    assert "_plots not requested_" in (tmp_path / "np" / "report.md").read_text()
    assert not list((tmp_path / "np").glob("*.png"))


def test_report_errors_exit_2(first, tmp_path):
    db, _, _, _ = first
    missing = tmp_path / "missing.sqlite"
    code, _, err = _run(["report", "--db", str(missing), "--out", str(tmp_path / "r")])
    assert code == 2 and "no such database" in err
    assert not missing.exists() and not (tmp_path / "r").exists()

    empty = tmp_path / "empty.sqlite"
    Store(empty).close()
    code, _, err = _run(["report", "--db", str(empty), "--out", str(tmp_path / "r")])
    assert code == 2 and "no runs yet" in err

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    code, _, err = _run(["report", "--db", str(other), "--out", str(tmp_path / "r")])
    assert code == 2 and "not a flatminima benchmark database" in err
    with sqlite3.connect(other) as conn:  # left as it was
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["t"]

    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all, just some text that is long enough" * 10)
    code, _, err = _run(["report", "--db", str(junk), "--out", str(tmp_path / "r")])
    assert code == 2 and "not a readable SQLite database" in err

    code, _, err = _run(["report", "--db", str(db), "--tasks", "csbm-gcn", "--out", str(tmp_path / "r")])
    assert code == 2 and "no runs of csbm-gcn (it has runs of digits-mlp)" in err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- tasks
def _task_rows(out: str) -> dict[str, list[str]]:
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["name", "domain", "metric"]
    return {line.split()[0]: line.split(None, 4)[1:] for line in lines[1:]}


def test_tasks_lists_digits_as_available():
    code, out, _ = _run(["tasks"])
    assert code == 0
    rows = _task_rows(out)
    assert set(rows) == set(TASKS)
    hp = DigitsTask.hparams
    assert rows["digits-mlp"] == ["vision", "accuracy", f"{hp.epochs_quick}/{hp.epochs_full}",
                                  "available"]


def test_tasks_shows_the_availability_message(monkeypatch):
    monkeypatch.setattr(DigitsTask, "availability", classmethod(lambda cls: "pip install it"))
    code, out, _ = _run(["tasks"])
    assert code == 0
    assert _task_rows(out)["digits-mlp"][3] == "unavailable: pip install it"


def test_suite_studies_run_in_parallel_jobs_and_print_claims(tmp_path):
    db = tmp_path / "s.sqlite"
    argv = ["bench", "--suite", "quick", "--tasks", "digits-mlp", "--studies", "main,noise",
            "--seeds", "0", "--size", "tiny", "--budget", "1", "--jobs", "2", "--quiet", "--db", str(db)]
    code, out, err = _run(argv)
    assert code == 0, err
    assert "studies main,noise" in out and "2 jobs" in out
    # main: 8 optimizers; noise (30 %): 4 more
    assert "12 runs: 12 ran, 0 already in the database" in out
    rows = _rows(_table(out))
    assert {"sgd", "sam_sgd", "esam_sgd", "sam_sgd+swa", "sam_sgd+lets"} <= set(rows)
    assert "Claims of the seed papers" in out and "**WASAM ≥ max(SAM, SWA)**" in out
    with Store(db) as store:
        recs = store.all()
    assert len(recs) == 12 and {r.spec.label_noise for r in recs} == {0.0, 0.3}
    assert all("sharpness" in r.extra for r in recs)
    lets = [r for r in recs if r.label == "sam_sgd+lets"]
    assert len(lets) == 1 and "rho" in lets[0].stats_history[-1]


@pytest.mark.parametrize("argv, message", [
    (["--studies", "nope"], "no study 'nope'"),
    (["--studies", "main", "--optimizers", "sgd"], "--studies selects the suite's own studies"),
    (["--optimizers", "sgd+lets"], "LETS wraps a SAM-family optimizer"),
    (["--optimizers", "sam_sgd+swa+lets"], "LETS wraps a SAM-family optimizer"),
    (["--optimizers", "sam_sgd+lets,sam_sgd+lets"], "each name once"),
])
def test_suite_argument_errors(argv, message, tmp_path):
    code, _, err = _run(["bench", "--suite", "quick", "--tasks", "digits-mlp", "--size", "tiny",
                         "--db", str(tmp_path / "x.sqlite"), *argv])
    assert code == 2 and message in err


def test_jobs_and_studies_only_with_the_suite():
    code, _, err = _run(["bench", "--jobs", "2"])
    assert code == 2 and "--jobs" in err
