"""The sink's contract on every backend (SQLite file, real PostgreSQL, real MariaDB).

A batch is done once its ledger row exists; results and ledger row commit together, so a
replayed batch adds nothing, an overlapping batch adds only new keys, and of two writers of
the same batch exactly one records it.
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from lrqtest import run_threads, statements_sent
from sqlalchemy import Integer, String, Text, func, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from lrq.config import QueueConfig, SourceConfig
from lrq.db import make_engine
from lrq.errors import ConfigError, DatabaseUnreachable, HandlerError, SinkError
from lrq.schema import DEAD, LEDGER, LEDGER_RECENT
from lrq.sink import SQLITE_ROWS, Sink
from lrq.sources import sql
from lrq.worker import is_infrastructure

MODEL = "workers.models:DocEntMap"
JOIN_TIMEOUT = 60.0  # bound on any thread a test starts; the engines' own timeouts are shorter


# ---------------------------------------------------------------- helpers and fixtures


def queue(name: str = "docs", **kw: Any) -> QueueConfig:
    kw.setdefault("key", "doc_id")
    return QueueConfig(name=name, handler="workers.wordcount:handle",
                       source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db",
                                                               table="source_data")), **kw)


def results(*ids: int, tag: str = "") -> list[dict[str, Any]]:
    """Results shaped like DocEntMap rows (so they fit the generic table and the model)."""
    return [{"doc_id": f"doc-{i}", "ent_list_str": f"ent {i}{tag}",
             "mapped_list_str": f"mapped {i}{tag}"} for i in ids]


@pytest.fixture(params=["generic", "model"])
def target(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Where results go: the generic table, or the user's ORM model keyed by doc_id."""
    if request.param == "generic":
        return {"result_table": "doc_results"}
    return {"model": MODEL}


def stored_value(sink: Sink, key: str) -> Any:
    """What the sink holds for ``key``: the JSON value (generic) or the ORM row (model)."""
    with sink.engine.connect() as conn:
        if sink.generic:
            return conn.execute(select(sink.table.c.value).where(
                sink.table.c.queue == sink.queue.name, sink.table.c.key == key)).scalar_one()
        row = conn.execute(select(sink.table).where(sink.table.c.doc_id == key)).one()
        return {"doc_id": row.doc_id, "ent_list_str": row.ent_list_str,
                "mapped_list_str": row.mapped_list_str}


# ---------------------------------------------------------------- replay, overlap, reading


def test_replay_adds_nothing_and_overlap_adds_only_new_keys(engine: Engine,
                                                            target: dict[str, Any]) -> None:
    sink = Sink(engine, queue(**target)).prepare()
    assert sink.count() == 0 and sink.ledger_stats() == (0, 0)

    first = sink.store("b1", items=3, results=results(1, 2, 3))
    assert first.recorded and first.results == 3
    assert sink.count() == 3
    assert sink.is_recorded("b1") and not sink.is_recorded("b2")

    # The same batch again, even with other content, is already done: nothing changes.
    again = sink.store("b1", items=3, results=results(1, 2, 3, tag=" replay"))
    assert not again.recorded and again.results == 0
    again = sink.store("b1", items=2, results=results(8, 9))
    assert not again.recorded
    assert sink.count() == 3
    assert stored_value(sink, "doc-1")["ent_list_str"] == "ent 1"

    # Another batch holding items b1 stored: only doc-4 and doc-5 are new; doc-2 keeps b1's row.
    other = sink.store("b2", items=4, results=results(2, 3, 4, 5, tag=" b2"))
    assert other.recorded
    assert sink.count() == 5
    assert sorted(sink.keys()) == [f"doc-{i}" for i in range(1, 6)]
    assert stored_value(sink, "doc-2")["ent_list_str"] == "ent 2"
    assert stored_value(sink, "doc-5")["ent_list_str"] == "ent 5 b2"
    assert sink.duplicates() == 0
    assert sink.ledger_stats() == (2, 7)

    # A batch whose handler returned nothing is still recorded (its items are done).
    empty = sink.store("b3", items=2, results=[])
    assert empty.recorded and empty.results == 0
    assert sink.ledger_stats() == (3, 9) and sink.count() == 5

    # prepare() again (another worker starting) keeps everything.
    again_sink = Sink(engine, queue(**target)).prepare()
    assert again_sink.count() == 5 and again_sink.ledger_stats() == (3, 9)


def test_queues_sharing_a_generic_table_do_not_collide(engine: Engine) -> None:
    alpha = Sink(engine, queue("alpha", result_table="doc_results")).prepare()
    beta = Sink(engine, queue("beta", result_table="doc_results")).prepare()

    # Equal keys and even equal batch names: the table is unique by (queue, key), the
    # ledger by (queue, name).
    assert alpha.store("b1", 3, results(1, 2, 3, tag=" alpha")).recorded
    assert beta.store("b1", 3, results(1, 2, 3, tag=" beta")).recorded
    assert beta.store("b2", 2, results(3, 4, tag=" beta")).recorded

    assert alpha.count() == 3 and beta.count() == 4
    assert sorted(alpha.keys()) == ["doc-1", "doc-2", "doc-3"]
    assert sorted(beta.keys()) == ["doc-1", "doc-2", "doc-3", "doc-4"]
    assert alpha.ledger_stats() == (1, 3) and beta.ledger_stats() == (2, 5)
    assert alpha.duplicates() == 0 and beta.duplicates() == 0
    assert stored_value(alpha, "doc-1")["ent_list_str"] == "ent 1 alpha"
    assert stored_value(beta, "doc-1")["ent_list_str"] == "ent 1 beta"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(alpha.table)).scalar_one() == 7


# ---------------------------------------------------------------- concurrency


def test_concurrent_writers_of_one_batch_record_it_once(db_url: str,
                                                        target: dict[str, Any]) -> None:
    """Two workers (own engines, as two processes would have) store the same batch at once."""
    engines = [make_engine(db_url), make_engine(db_url)]
    try:
        sinks = [Sink(e, queue(**target)).prepare() for e in engines]
        rounds, size = 5, 200
        for r in range(rounds):
            batch = results(*range(r * size, (r + 1) * size))
            outcomes = run_threads([lambda s=s, r=r, batch=batch: s.store(f"b{r}", size, batch)
                                    for s in sinks])
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            assert not errors, errors
            assert sorted(o.recorded for o in outcomes) == [False, True], outcomes
        assert sinks[0].ledger_stats() == (rounds, rounds * size)
        assert sinks[0].count() == rounds * size
        assert sinks[0].duplicates() == 0
        with engines[0].connect() as conn:
            ledger = sinks[0].ledger
            assert conn.execute(select(func.count()).select_from(ledger).where(
                ledger.c.queue == "docs")).scalar_one() == rounds
    finally:
        for e in engines:
            e.dispose()


def test_prepare_when_another_worker_created_the_tables_after_the_check(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic form of the first-start race: the existence check answers "missing"
    once per table (as it would just before another worker's CREATE commits)."""
    Sink(engine, queue(result_table="doc_results")).prepare()  # the other worker
    asked: set[str] = set()
    dialect = engine.dialect
    real_one = dialect.has_table
    real_multi = getattr(dialect, "has_multi_table", None)  # SQLAlchemy 2.1's checkfirst

    def stale_one(connection: Any, table_name: str, *args: Any, **kw: Any) -> bool:
        if table_name not in asked:
            asked.add(table_name)
            return False
        return real_one(connection, table_name, *args, **kw)

    def stale_multi(connection: Any, table_names: Any, *args: Any, **kw: Any) -> Any:
        out = []
        for key, exists in real_multi(connection, table_names, *args, **kw):
            if key[1] not in asked:
                asked.add(key[1])
                exists = False
            out.append((key, exists))
        return out

    monkeypatch.setattr(dialect, "has_table", stale_one)
    if real_multi is not None:
        monkeypatch.setattr(dialect, "has_multi_table", stale_multi)
    sink = Sink(engine, queue(result_table="doc_results")).prepare()
    assert asked == {LEDGER, DEAD, "doc_results"}
    assert sink.store("b1", 1, results(1)).recorded and sink.count() == 1


def test_concurrent_first_prepare(db_url: str) -> None:
    """Workers starting together on an empty database all get their tables."""
    for _ in range(3):
        engines = [make_engine(db_url) for _ in range(3)]
        try:
            with engines[0].begin() as conn:  # start each round from an empty database
                for name in ("doc_results", LEDGER, DEAD):
                    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
            outcomes = run_threads([lambda e=e: Sink(e, queue(result_table="doc_results")).prepare()
                                    for e in engines])
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            assert not errors, errors
            assert outcomes[0].store("b1", 1, results(1)).recorded
            assert outcomes[1].count() == 1
        finally:
            for e in engines:
                e.dispose()


# ---------------------------------------------------------------- refusals


class _Base(DeclarativeBase):
    pass


class NotUnique(_Base):
    """The original system's table: doc_id only indexed, so replays would duplicate rows."""

    __tablename__ = "doc_ent_map_not_unique"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    doc_id: Mapped[str] = mapped_column(String(50), index=True)
    ent_list_str: Mapped[str] = mapped_column(Text, default="")


def test_model_without_unique_key_column_is_refused(engine: Engine) -> None:
    with pytest.raises(ConfigError, match=r"doc_ent_map_not_unique\.doc_id must be unique"):
        Sink(engine, queue(model=f"{__name__}:NotUnique"))
    with pytest.raises(ConfigError, match=r"has no column 'mid'"):
        Sink(engine, queue(model=MODEL, key="mid"))
    with pytest.raises(ConfigError, match=r"is not an ORM model"):
        Sink(engine, queue(model=f"{__name__}:queue"))


def test_result_field_the_model_lacks_is_a_handler_error(engine: Engine) -> None:
    sink = Sink(engine, queue(model=MODEL)).prepare()
    bad = results(1, 2)
    bad[1]["score"] = 0.5
    with pytest.raises(HandlerError, match=r"\['score'\]"):
        sink.store("b1", 2, bad)
    assert sink.count() == 0 and sink.ledger_stats() == (0, 0)
    assert not sink.is_recorded("b1")
    assert sink.store("b1", 2, results(1, 2)).recorded  # the batch is not poisoned


def test_result_without_the_key_is_a_handler_error(engine: Engine) -> None:
    sink = Sink(engine, queue(result_table="doc_results")).prepare()
    with pytest.raises(HandlerError, match=r"no 'doc_id' field"):
        sink.store("b1", 2, [{"doc_id": "a"}, {"other": "b"}])
    assert sink.count() == 0 and sink.ledger_stats() == (0, 0)


def test_model_result_without_the_key_is_a_handler_error(engine: Engine) -> None:
    sink = Sink(engine, queue(model=MODEL)).prepare()
    with pytest.raises(HandlerError, match=r"doc_id"):
        sink.store("b1", 1, [{"ent_list_str": "no key"}])
    assert sink.count() == 0 and sink.ledger_stats() == (0, 0)


def test_results_with_different_fields_are_stored_as_given(engine: Engine) -> None:
    """A handler may leave out fields the model has defaults for, in some results only."""
    sink = Sink(engine, queue(model=MODEL)).prepare()
    rows = [{"doc_id": "a"},
            {"doc_id": "b", "ent_list_str": "B"},
            {"doc_id": "c", "mapped_list_str": "C"}]
    assert sink.store("b1", 3, rows).recorded
    assert stored_value(sink, "b") == {"doc_id": "b", "ent_list_str": "B", "mapped_list_str": ""}
    assert stored_value(sink, "c") == {"doc_id": "c", "ent_list_str": "", "mapped_list_str": "C"}
    assert stored_value(sink, "a") == {"doc_id": "a", "ent_list_str": "", "mapped_list_str": ""}


# ---------------------------------------------------------------- an unreachable database


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound by this test but not listening: connecting is refused at once,
    and no other process can start listening there meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_unreachable_database_is_a_sink_error(backend: str, closed_port: int, tmp_path) -> None:
    if backend == "sqlite":
        (tmp_path / "results.db").mkdir()  # a folder where the file should be: cannot open
        url = f"sqlite:///{tmp_path / 'results.db'}"
    elif backend == "postgresql":
        url = f"postgresql+psycopg://lrq:secret@127.0.0.1:{closed_port}/lrq"
    else:
        url = f"mysql+pymysql://lrq:secret@127.0.0.1:{closed_port}/lrq"
    engine = make_engine(url)
    try:
        sink = Sink(engine, queue(result_table="doc_results"))  # builds without connecting
        prepare, store = run_threads([sink.prepare, lambda: sink.store("b1", 1, results(1))])
        assert isinstance(prepare, SinkError), prepare
        assert "cannot reach results database" in str(prepare)
        assert isinstance(store, SinkError), store
        assert "storing batch b1" in str(store)
        # A failed connect is the database, not the batch: released uncounted, backed off.
        assert isinstance(prepare, DatabaseUnreachable) and isinstance(store, DatabaseUnreachable)
        assert is_infrastructure(prepare) and is_infrastructure(store)
    finally:
        engine.dispose()


# ---------------------------------------------------------------- values round-trip


UNICODE = ("Grüße, Ελληνικά, русский, 中文字符, 日本語, العربية, עברית, हिन्दी, "
           "emoji 🙂🚀👩‍💻🇩🇪, combining é, zero-width\u200bspace, "
           "quotes ' \" ` backslash \\ percent %s %(x)s %% newline\nand tab\t; DROP TABLE x; --")


def test_unicode_and_long_text_round_trip(engine: Engine, target: dict[str, Any]) -> None:
    sink = Sink(engine, queue(**target)).prepare()
    # MySQL/MariaDB TEXT (the model's Text columns) holds 65,535 bytes: stay under it there.
    long_text = ("lorem ipsum dolor sit amet 🙂 Ω ü 中 " * 1200)[:40_000]
    assert len(long_text.encode()) < 65_535
    rows = [
        {"doc_id": "döc-Ω-🙂-1", "ent_list_str": UNICODE, "mapped_list_str": long_text},
        {"doc_id": "doc-'\"-%s-2", "ent_list_str": "", "mapped_list_str": UNICODE[::-1]},
        {"doc_id": "doc-3", "ent_list_str": long_text[::-1], "mapped_list_str": "x"},
    ]
    assert sink.store("b1", 3, rows).recorded
    assert sink.store("b1", 3, rows).recorded is False
    assert sorted(sink.keys()) == sorted(r["doc_id"] for r in rows)
    for r in rows:
        assert stored_value(sink, r["doc_id"]) == r


def test_generic_values_keep_json_types_and_large_text(engine: Engine) -> None:
    sink = Sink(engine, queue(result_table="doc_results")).prepare()
    big = UNICODE * 2_000  # ~ 0.3 MB in one JSON value
    value = {"doc_id": 7, "n": 3, "f": 0.25, "ok": True, "none": None,
             "list": [1, "två", {"ß": "🙂"}], "big": big}
    assert sink.store("b1", 1, [value]).recorded
    assert list(sink.keys()) == ["7"]  # the key is stored as text
    assert stored_value(sink, "7") == value


# ---------------------------------------------------------------- the shared ledger


def test_ledger_rows_are_per_queue(engine: Engine) -> None:
    a = Sink(engine, queue("a", result_table="a_results")).prepare()
    b = Sink(engine, queue("b", model=MODEL)).prepare()
    assert a.store("same-name", 2, results(1, 2)).recorded
    assert b.store("same-name", 5, results(1, 2, 3)).recorded
    assert a.ledger_stats() == (1, 2) and b.ledger_stats() == (1, 5)
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT queue, name, items, results FROM {LEDGER} "
                                 "ORDER BY queue")).all()
    assert [tuple(r) for r in rows] == [("a", "same-name", 2, 2), ("b", "same-name", 5, 3)]


@pytest.mark.parametrize("dead", [False, True], ids=["happy", "with-dead-letters"])
def test_ledger_keeps_the_handler_seconds(engine: Engine, dead: bool) -> None:
    """Both commit paths (SQLite's driver-level one and SQLAlchemy's) write ``seconds``;
    a store without it leaves NULL."""
    sink = Sink(engine, queue(result_table="doc_results")).prepare()
    letters = [({"doc_id": "doc-9"}, "boom")] if dead else []
    assert sink.store("timed", 2, results(1, 2), dead=letters, seconds=1.25).recorded
    assert sink.store("untimed", 1, results(3)).recorded
    with engine.connect() as conn:
        rows = dict(conn.execute(text(f"SELECT name, seconds FROM {LEDGER}")).all())
    assert rows == {"timed": 1.25, "untimed": None}


def test_prepare_adds_seconds_to_an_older_ledger(engine: Engine) -> None:
    """A ledger made before the ``seconds`` column gets it at prepare (ALTER TABLE), keeps
    its rows (their seconds NULL), and takes timed rows afterwards; preparing again, as
    every worker process does, is a no-op."""
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {LEDGER} (queue VARCHAR(64) NOT NULL, "
                          "name VARCHAR(64) NOT NULL, items INTEGER NOT NULL, "
                          "results INTEGER NOT NULL, dead INTEGER NOT NULL, "
                          "attempt INTEGER NOT NULL, finished_at TIMESTAMP NOT NULL "
                          "DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (queue, name))"))
        conn.execute(text(f"INSERT INTO {LEDGER} (queue, name, items, results, dead, attempt) "
                          "VALUES ('docs', 'old', 3, 3, 0, 1)"))
    sink = Sink(engine, queue(result_table="doc_results")).prepare()
    Sink(engine, queue(result_table="doc_results")).prepare()
    assert sink.store("new", 1, results(1), seconds=0.5).recorded
    assert not sink.store("old", 3, results(1, 2, 3), seconds=9.0).recorded  # a replay
    with engine.connect() as conn:
        rows = dict(conn.execute(text(f"SELECT name, seconds FROM {LEDGER}")).all())
    assert rows == {"old": None, "new": 0.5}
    # ... and the index the rates and metrics read recent rows by (made by an older lrq
    # without it), made once however often prepare runs.
    indexes = [i for i in inspect(engine).get_indexes(LEDGER) if i["name"] == LEDGER_RECENT]
    assert [i["column_names"] for i in indexes] == [["queue", "finished_at"]]


def test_a_new_ledger_has_the_recent_rows_index(engine: Engine) -> None:
    Sink(engine, queue(result_table="doc_results")).prepare()
    names = [i["name"] for i in inspect(engine).get_indexes(LEDGER)]
    assert names.count(LEDGER_RECENT) == 1


def test_ledger_check_does_not_wait_for_another_workers_transaction(engine: Engine) -> None:
    """A worker asking "is this batch recorded?" reads; it must not queue behind a commit
    in progress (on SQLite, behind the write lock, for up to the 60 s busy timeout)."""
    sink = Sink(engine, queue(result_table="doc_results")).prepare()
    assert sink.store("old", 1, results(1)).recorded
    with engine.begin() as writer:  # another worker's transaction, still open
        writer.execute(sink.ledger.insert().values(queue="docs", name="open", items=1,
                                                   results=0, dead=0, attempt=1))
        done = threading.Event()
        answers: list[bool] = []
        t = threading.Thread(target=lambda: (answers.extend(
            [sink.is_recorded("old"), sink.is_recorded("open")]), done.set()), daemon=True)
        t.start()
        assert done.wait(10), "is_recorded waited for the open write transaction"
    assert answers == [True, False]  # the open transaction's row is not visible yet
    assert sink.is_recorded("open")


def test_a_commit_sends_the_ledger_row_and_the_results_only(engine: Engine,
                                                          target: dict[str, Any],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Two statements a batch: the ledger insert and the results' executemany, no ``SELECT``
    of the ledger first (its key catches a replay). A replay stays ``recorded=False``, with
    nothing stored and no "refused" warning: the ledger's key is not a refused row."""
    sink = Sink(engine, queue(**target)).prepare()
    with statements_sent(engine) as sent:
        assert sink.store("b1", 3, results(1, 2, 3)).recorded
        data = [s[:60] for s in sent if not s.lstrip().upper().startswith(
            ("BEGIN", "SAVEPOINT", "RELEASE", "COMMIT", "ROLLBACK"))]
        # SQLite's trace shows an executemany (a model's rows) as one statement a row.
        kinds = {" ".join(s.split()[:3]) for s in data}
        assert len(kinds) == 2 and all(k.startswith("INSERT INTO") for k in kinds), sent
        assert engine.dialect.name == "sqlite" or len(data) == 2, sent
        with caplog.at_level(logging.WARNING, logger="lrq.sink"):
            again = sink.store("b1", 2, results(8, 9))
    assert not again.recorded and again.results == 0
    assert sink.count() == 3 and sink.ledger_stats() == (1, 3)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


def test_sqlite_results_go_in_as_multi_row_inserts(tmp_path) -> None:
    """On SQLite the generic table's rows go in as ``INSERT ... VALUES (...), (...)`` of at
    most ``SQLITE_ROWS`` rows (0.6x the CPU of executemany): 600 results are 3 statements,
    every row stored once, a key repeated within the batch or stored before ignored."""
    engine = make_engine(f"sqlite:///{tmp_path}/r.db")
    try:
        sink = Sink(engine, queue(result_table="doc_results")).prepare()
        assert sink.store("b0", 1, results(7)).recorded
        rows = results(*range(600)) + results(5, tag=" again")
        with statements_sent(engine) as sent:
            assert sink.store("b1", 601, rows).recorded
        inserts = [sql for sql in sent if "doc_results" in sql]  # executemany: one a row
        assert len(inserts) == 3
        assert [sql.count(", 'b1', ") for sql in inserts] == [  # rows, parameters filled in
            SQLITE_ROWS, SQLITE_ROWS, 601 - 2 * SQLITE_ROWS]
        assert sink.count() == 600 and sink.duplicates() == 0
        assert stored_value(sink, "doc-5")["ent_list_str"] == "ent 5"
        with engine.connect() as conn:
            assert conn.execute(select(sink.table.c.batch).where(
                sink.table.c.key == "doc-7")).scalar_one() == "b0"
    finally:
        engine.dispose()


def test_a_generic_row_sqlite_refuses_is_isolated_from_the_multi_row_insert(tmp_path) -> None:
    """The generic table's happy path makes no row dicts; a refused row still gets them: a
    trigger refusing doc-300 fails the 249-row statement holding it, the rows are bisected,
    and that one is dead-lettered with its input item while the other 599 commit."""
    engine = make_engine(f"sqlite:///{tmp_path}/r.db")
    try:
        sink = Sink(engine, queue(result_table="doc_results")).prepare()
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON doc_results WHEN NEW.key = 'doc-300' "
                "BEGIN SELECT RAISE(ABORT, 'doc-300 is not welcome'); END")
        inputs = [{"doc_id": f"doc-{i}", "content": f"text {i}"} for i in range(600)]
        stored = sink.store("b1", 600, results(*range(600)), inputs=inputs)
        assert (stored.recorded, stored.results, stored.dead) == (True, 599, 1)
        assert sink.count() == 599 and sink.ledger_stats() == (1, 600)
        [letter] = sink.dead_records()
        assert letter.key == "doc-300" and letter.item == inputs[300]
        assert "doc-300 is not welcome" in letter.error
    finally:
        engine.dispose()


def test_dead_letters_commit_with_the_batch_and_replay_adds_nothing(engine: Engine) -> None:
    sink = Sink(engine, queue(result_table="doc_results")).prepare()
    bad = [({"doc_id": "x1", "content": "Пекин 😀"}, "ValueError: cannot map"),
           ({"doc_id": "x2", "content": "b"}, "HandlerTimeout: ran past 300s")]
    stored = sink.store("b1", 5, results(1, 2, 3), dead=bad)
    assert stored.recorded and (stored.results, stored.dead) == (3, 2)
    assert sorted(sink.dead_keys()) == ["x1", "x2"] and sink.dead_count() == 2
    again = sink.store("b2", 2, [], dead=bad)  # the same items dead again in a replayed batch
    assert again.recorded and sink.dead_count() == 2
    assert [d["error"] for d in sink.dead_letters(batch="b1")] == [e for _, e in bad]


@pytest.mark.services
def test_postgresql_statements_are_bounded(pg_url: str) -> None:
    """A statement stuck on a lock must end (and count as infrastructure), not wait forever."""
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "5min"
    finally:
        engine.dispose()
