"""A handler whose results the database refuses for a few items: ``lrq run --until-idle``
ends by itself, every good item is stored once, each refused one is a dead letter with the
database's message, and ``lrq verify`` is exact. On SQLite, PostgreSQL and MariaDB.

Before, the refused batch was released without counting an attempt about once a second,
forever: the run never ended (the subprocess timeout is the bound).
"""
from __future__ import annotations

import re
from pathlib import Path

from lrqtest import load_app, lrq, write_config

DOCS = 300
RUN_TIMEOUT = 120  # seconds; the run takes 1.5-2.5 s on this machine
MODULE = '''
from sqlalchemy import CheckConstraint, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Strict(Base):
    __tablename__ = "strict_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    doc_id: Mapped[str] = mapped_column(String(50), unique=True)
    note: Mapped[str] = mapped_column(String(20), nullable=False)
    words: Mapped[int] = mapped_column(Integer)
    __table_args__ = (CheckConstraint("words >= 0", name="words_not_negative"),)


def handle(items):
    out = []
    for item in items:
        n = item["id"]
        out.append({"doc_id": item["doc_id"],
                    "note": None if n % 17 == 0 else "x" * 30 if n % 29 == 0 else "ok",
                    "words": -1 if n % 23 == 0 else len(item["content"].split())})
    return out
'''
# Which ids each dialect refuses, and by what words in its message.
NOT_NULL = {n for n in range(1, DOCS + 1) if n % 17 == 0}
CHECK = {n for n in range(1, DOCS + 1) if n % 23 == 0} - NOT_NULL
TOO_LONG = {n for n in range(1, DOCS + 1) if n % 29 == 0} - NOT_NULL - CHECK


def test_a_run_with_refused_rows_ends_and_verify_is_exact(tmp_path: Path, db_url: str) -> None:
    (tmp_path / "refusing_model.py").write_text(MODULE)
    cfg = write_config(tmp_path, docs=DOCS, batch_size=25, chunk_size=10, workers=2,
                       handler="refusing_model:handle", result_table=None,
                       model="refusing_model:Strict",
                       top={"db_url": db_url})
    run = lrq("-c", str(cfg), "run", "--until-idle", timeout=RUN_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]

    app = load_app(cfg)
    q = app.queues("docs")[0]
    sink = app.sink(q)
    sqlite = db_url.startswith("sqlite")  # SQLite does not enforce VARCHAR lengths
    refused = NOT_NULL | CHECK | (set() if sqlite else TOO_LONG)
    assert sorted(sink.keys()) == sorted(f"m{n:09d}" for n in range(1, DOCS + 1)
                                         if n not in refused)
    assert sink.duplicates() == 0
    dead = {d["key"]: d["error"] for d in sink.dead_letters(limit=DOCS)}
    assert sorted(dead) == sorted(f"m{n:09d}" for n in refused)
    for numbers, words in ((NOT_NULL, r"(?i)null"), (CHECK, r"(?i)check|words_not_negative"),
                           (set() if sqlite else TOO_LONG, r"(?i)too long")):
        for n in numbers:
            error = dead[f"m{n:09d}"]
            assert error.startswith("the database refused the result: "), error
            assert re.search(words, error.splitlines()[0]), error
    assert sink.ledger_stats() == (DOCS // 25, DOCS)
    counts = app.spool(q).counts()
    assert (counts.pending, counts.claimed, counts.failed) == (0, 0, 0)

    verify = lrq("-c", str(cfg), "verify", timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (f"source {DOCS}, results {DOCS - len(refused)}, dead letters {len(refused)}, "
            "missing 0, duplicated 0, not in source 0") in verify.stdout


def test_a_results_table_missing_a_column_fails_every_batch_and_the_run_ends(
        tmp_path: Path, db_url: str) -> None:
    """A statement the database refuses whatever the rows (the table lacks a column the
    model has) is not waited out: each batch counts its attempts and, at max_attempts, is in
    failed/ with the database's message; the run ends. Before, it was released uncounted
    forever."""
    from lrq.db import make_engine

    (tmp_path / "refusing_model.py").write_text(MODULE)
    cfg = write_config(tmp_path, docs=100, batch_size=25, chunk_size=10, workers=2,
                       handler="refusing_model:handle", result_table=None,
                       model="refusing_model:Strict", backoff=0.05, max_attempts=3,
                       top={"db_url": db_url})
    engine = make_engine(db_url)
    serial = {"sqlite": "INTEGER PRIMARY KEY", "postgresql": "SERIAL PRIMARY KEY"}.get(
        engine.dialect.name, "INT AUTO_INCREMENT PRIMARY KEY")
    with engine.begin() as conn:  # an older version of the table, without `words`
        conn.exec_driver_sql(f"CREATE TABLE strict_results (id {serial}, "
                             "doc_id VARCHAR(50) UNIQUE, note VARCHAR(20) NOT NULL)")
    engine.dispose()

    run = lrq("-c", str(cfg), "run", "--until-idle", timeout=RUN_TIMEOUT)
    assert run.returncode == 1, run.stderr[-3000:]  # batches failed during the run
    assert "stopped-with-failures failed=4 quarantined=0" in run.stderr
    app = load_app(cfg)
    q = app.queues("docs")[0]
    sp = app.spool(q)
    counts = sp.counts()
    assert (counts.failed, counts.pending, counts.claimed, counts.done) == (4, 0, 0, 0)
    for path in sp.failed.glob("*.pkl"):
        error = sp.read_error(path.stem)
        assert "gave up after 3 attempts (max_attempts)" in error["error"], error
        assert "words" in error["error"] and "schema or configuration problem" in error["error"]
    assert app.sink(q).count() == 0 and app.sink(q).ledger_stats() == (0, 0)
