"""Rows the database refuses, on SQLite, PostgreSQL and MariaDB: isolated inside SAVEPOINTs
and dead-lettered with the database's message; the rest stored with the ledger row; a
replay adds nothing. A statement the database refuses whatever the rows, and an
unreachable database, are told apart from a refused row.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import CheckConstraint, ForeignKey, Integer, String, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from lrq.config import QueueConfig, SourceConfig
from lrq.db import make_engine
from lrq.errors import HandlerBroken, StatementRefused
from lrq.sink import Sink
from lrq.sources import sql


class _Base(DeclarativeBase):
    pass


class Parent(_Base):
    __tablename__ = "refusing_parent"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


class Refusing(_Base):
    """A model with every kind of constraint a row can break."""

    __tablename__ = "refusing"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    doc_id: Mapped[str] = mapped_column(String(50), unique=True)
    note: Mapped[str] = mapped_column(String(20), nullable=False)
    score: Mapped[int | None] = mapped_column(Integer)
    parent: Mapped[int | None] = mapped_column(Integer, ForeignKey("refusing_parent.id"))
    __table_args__ = (CheckConstraint("score >= 0", name="score_not_negative"),)


MODEL = f"{__name__}:Refusing"


def queue() -> QueueConfig:
    return QueueConfig(name="docs", handler="workers.wordcount:handle", key="doc_id",
                       model=MODEL,
                       source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db",
                                                               table="source_data")))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    e = make_engine(db_url)
    try:
        _Base.metadata.create_all(e)
        with e.begin() as conn:
            conn.execute(Parent.__table__.insert(), [{"id": 1}])
        yield e
    finally:
        e.dispose()


def items(n: int) -> list[dict[str, Any]]:
    return [{"doc_id": f"d{i}", "content": f"text {i}"} for i in range(n)]


def results(n: int, bad: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"doc_id": f"d{i}", "note": f"n{i}", "score": i, "parent": 1, **bad.get(i, {})}
            for i in range(n)]


def stored_keys(sink: Sink) -> list[str]:
    return sorted(sink.keys(), key=lambda k: int(k[1:]))


CASES = {
    # case: (bad values, the database's message, dialects that do not enforce it)
    "not-null": ({"note": None}, r"(?i)null", {}),
    "check": ({"score": -5}, r"(?i)check constraint|constraint `score_not_negative` failed", {}),
    "too-long": ({"note": "x" * 21}, r"(?i)too long",
                 {"sqlite": "SQLite does not enforce VARCHAR lengths"}),
    "foreign-key": ({"parent": 999}, r"(?i)foreign key",
                    {"sqlite": "lrq does not switch on SQLite's foreign_keys pragma"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_rows_are_dead_lettered_and_the_rest_stored(engine: Engine, case: str) -> None:
    values, named, unenforced = CASES[case]
    if engine.dialect.name in unenforced:
        pytest.skip(unenforced[engine.dialect.name])
    sink = Sink(engine, queue()).prepare()
    bad = {2: values, 7: values, 8: values}
    handler_dead = [({"doc_id": "d10", "content": "text 10"}, "ValueError: cannot map")]
    stored = sink.store("b1", 11, results(10, bad), dead=handler_dead, inputs=items(11))

    assert stored.recorded and (stored.results, stored.dead) == (7, 4)
    assert stored_keys(sink) == [f"d{i}" for i in range(10) if i not in bad]
    with engine.connect() as conn:
        ledger = conn.execute(select(sink.ledger.c["items", "results", "dead"])).one()
        dead = {r.key: r for r in conn.execute(select(sink.dead)).all()}
    assert tuple(ledger) == (11, 7, 4)
    assert sorted(dead) == ["d10", "d2", "d7", "d8"]
    for key in ("d2", "d7", "d8"):
        message, result = dead[key].error.split("\nresult: ")
        assert message.startswith("the database refused the result: ")
        assert re.search(named, message), message  # the database's own message
        assert json.loads(result) == results(10, bad)[int(key[1:])]
        assert dead[key].item == {"doc_id": key, "content": f"text {key[1:]}"}  # the input
        assert dead[key].batch == "b1"
    assert dead["d10"].error == "ValueError: cannot map"

    # Replaying the batch (a worker killed before the marker) adds nothing.
    again = sink.store("b1", 11, results(10, bad), dead=handler_dead, inputs=items(11))
    assert not again.recorded
    assert sink.count() == 7 and sink.dead_count() == 4


def test_without_inputs_the_refused_result_is_the_dead_letters_item(engine: Engine) -> None:
    sink = Sink(engine, queue()).prepare()
    stored = sink.store("b1", 3, results(3, {1: {"note": None}}))
    assert (stored.results, stored.dead) == (2, 1)
    with engine.connect() as conn:
        item = conn.execute(select(sink.dead.c.item)).scalar_one()
    assert item == {"doc_id": "d1", "note": None, "score": 1, "parent": 1}


def test_every_row_refused_still_records_the_batch(engine: Engine) -> None:
    # refused in two ways, or alike but too few to tell a broken handler: the rows' fault
    sink = Sink(engine, queue()).prepare()
    bad = {i: {"note": None} if i % 2 else {"score": -5} for i in range(4)}
    stored = sink.store("b1", 4, results(4, bad), inputs=items(4))
    assert stored.recorded and (stored.results, stored.dead) == (0, 4)
    stored = sink.store("b2", 2, results(2, {i: {"note": None} for i in range(2)}),
                        inputs=items(2))
    assert stored.recorded and (stored.results, stored.dead) == (0, 2)
    assert sink.count() == 0 and sink.dead_count() == 4 and sink.ledger_stats() == (2, 6)


def test_every_row_refused_alike_is_a_broken_handler(engine: Engine) -> None:
    sink = Sink(engine, queue()).prepare()
    with pytest.raises(HandlerBroken, match=r"refused all 4 results of the batch the same way"):
        sink.store("b1", 4, results(4, {i: {"note": None} for i in range(4)}),
                   inputs=items(4))
    assert sink.count() == 0 and sink.dead_count() == 0 and sink.ledger_stats() == (0, 0)


def test_a_value_the_driver_cannot_bind_is_one_rows_refusal_unless_every_row_has_it(
        engine: Engine) -> None:
    """A dict for a text column: no driver binds it (SQLite and psycopg refuse it, PyMySQL
    writes SQL the server cannot parse); each calls it a statement error. Other rows going
    in show it is the row's; when no row goes in, it is the statement's, and counts an
    attempt."""
    sink = Sink(engine, queue()).prepare()
    stored = sink.store("b1", 6, results(6, {1: {"note": {"a": 1}}, 4: {"note": {"c": [2]}}}),
                        inputs=items(6))
    assert stored.recorded and (stored.results, stored.dead) == (4, 2)
    assert stored_keys(sink) == ["d0", "d2", "d3", "d5"]
    assert sorted(sink.dead_keys()) == ["d1", "d4"]
    with pytest.raises(StatementRefused, match=r"every result was refused"):
        sink.store("b2", 2, [{"doc_id": "x1", "note": {"a": 1}},
                             {"doc_id": "x2", "note": {"b": 2}}])
    assert not sink.is_recorded("b2") and sink.dead_count() == 2


def test_the_happy_path_takes_no_savepoint(engine: Engine) -> None:
    """Isolating costs statements only once a row was refused."""
    sink = Sink(engine, queue()).prepare()
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, sql, *_a: statements.append(sql.split()[0].upper()))
    assert sink.store("b1", 5, results(5, {})).results == 5
    assert "SAVEPOINT" not in statements
    sink.store("b2", 1, [{"doc_id": "x", "note": None}])
    assert "SAVEPOINT" in statements


def test_a_missing_column_is_a_refused_statement_naming_it(engine: Engine) -> None:
    sink = Sink(engine, queue()).prepare()
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":  # SQLite cannot drop a column a CHECK names
            conn.execute(text("DROP TABLE refusing"))
            conn.execute(text("CREATE TABLE refusing (id INTEGER PRIMARY KEY, "
                              "doc_id VARCHAR(50) UNIQUE, note VARCHAR(20) NOT NULL, parent INT)"))
        else:
            conn.execute(text("ALTER TABLE refusing DROP CONSTRAINT score_not_negative"))
            conn.execute(text("ALTER TABLE refusing DROP COLUMN score"))
    with pytest.raises(StatementRefused, match=r"(?s)score.*schema or configuration problem"):
        sink.store("b1", 2, results(2, {}))
    assert sink.count() == 0 and sink.ledger_stats() == (0, 0) and sink.dead_count() == 0


def test_a_lock_wait_that_times_out_is_an_unreachable_database(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another transaction holds the ledger row this batch needs: the wait ends in the
    dialect's timeout (SQLite busy, PostgreSQL statement_timeout, MariaDB lock wait), which is
    the database, not the batch: released without counting, not refused."""
    import lrq.db
    from lrq.errors import DatabaseUnreachable
    from lrq.worker import is_infrastructure

    monkeypatch.setattr(lrq.db, "SQLITE_BUSY_MS", 100)
    if db_url.startswith("postgresql"):
        monkeypatch.setattr(lrq.db, "STATEMENT_TIMEOUT", 1)
    engine, holder = make_engine(db_url), make_engine(db_url)
    if engine.dialect.name in ("mysql", "mariadb"):
        event.listen(engine, "connect", lambda dbapi, _rec: dbapi.cursor().execute(
            "SET SESSION innodb_lock_wait_timeout = 1"))
    try:
        _Base.metadata.create_all(engine)
        sink = Sink(engine, queue()).prepare()
        with holder.begin() as conn:
            conn.execute(sink.ledger.insert().values(queue="docs", name="b1", items=1,
                                                     results=0, dead=0, attempt=1))
            with pytest.raises(DatabaseUnreachable) as caught:
                sink.store("b1", 2, results(2, {}))
            conn.rollback()
        assert is_infrastructure(caught.value)
        assert re.search(r"(?i)locked|timeout|cancel", str(caught.value)), caught.value
        assert sink.store("b1", 2, results(2, {})).recorded  # the lock gone, it goes through
    finally:
        engine.dispose()
        holder.dispose()


@pytest.mark.parametrize("answers", [True, False])
def test_a_connection_lost_while_the_database_answers_is_the_batchs_fault(
        engine: Engine, monkeypatch: pytest.MonkeyPatch, answers: bool) -> None:
    """MySQL closes the connection on a packet over max_allowed_packet: a disconnect that
    comes back on every retry of that batch only. If the database answers at once, the
    attempt counts (StatementRefused); if it does not, it is down (DatabaseUnreachable)."""
    from sqlalchemy.exc import OperationalError

    from lrq.errors import DatabaseUnreachable
    from lrq.worker import is_infrastructure

    sink = Sink(engine, queue()).prepare()

    def lost(*_args: Any) -> None:
        raise OperationalError("INSERT", {}, Exception("server has gone away"),
                               connection_invalidated=True)

    monkeypatch.setattr(sink, "_insert_rows", lost)
    if not answers:
        monkeypatch.setattr(sink, "_answers", lambda: False)
    with pytest.raises(StatementRefused if answers else DatabaseUnreachable) as caught:
        sink.store("b1", 2, results(2, {}))
    assert is_infrastructure(caught.value) is not answers
    assert "server has gone away" in str(caught.value)
    assert sink.ledger_stats() == (0, 0)


@pytest.mark.services
def test_a_batch_over_max_allowed_packet_is_refused_not_waited_for(mariadb_url: str) -> None:
    """MariaDB answers a statement over max_allowed_packet by closing the connection: for
    that batch only, every time. It counts attempts (so it ends in failed/), while smaller
    batches are stored."""
    admin = make_engine(mariadb_url)
    with admin.connect() as conn:
        before = conn.exec_driver_sql("SELECT @@GLOBAL.max_allowed_packet").scalar_one()
        conn.exec_driver_sql("SET GLOBAL max_allowed_packet = 65536")
    engine = make_engine(mariadb_url)  # new connections take the new limit
    try:
        sink = Sink(engine, QueueConfig(
            name="docs", handler="workers.wordcount:handle", key="doc_id",
            result_table="doc_results",
            source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db",
                                                    table="source_data")))).prepare()
        big = [{"doc_id": f"d{i}", "text": "x" * 1000} for i in range(200)]  # ~200 KB
        with pytest.raises(StatementRefused, match=r"max_allowed_packet"):
            sink.store("big", 200, big)
        assert sink.store("small", 20, big[:20]).recorded
        assert sink.count() == 20 and sink.ledger_stats() == (1, 20)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"SET GLOBAL max_allowed_packet = {int(before)}")
        admin.dispose()
