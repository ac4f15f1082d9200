"""The sink: results, dead letters and the batch ledger row that makes a batch *done*, in one
transaction.

Result rows are unique by ``(queue, key)`` (generic table) or by the model's key column, and
are inserted with the dialect's on-conflict form, so replaying a batch, or a batch holding
items another batch already stored, adds nothing. The ledger's primary key
``(queue, name)`` lets exactly one transaction record a batch.

What the database answers decides what happens (:func:`lrq.db.fault`):

* **A row it refuses** (NOT NULL, CHECK, foreign key, another unique key, a value too long or
  out of range: ``IntegrityError``/``DataError`` or the dialect's code for one). The batch
  is not at fault, that row is. The whole insert is tried first, as on the happy path; when
  it fails on anything but an unreachable database (and the ledger does not already hold the
  batch: a replay stays ``Stored(recorded=False)``), the transaction is rolled back and done
  again with each group of rows inserted inside a SAVEPOINT, halved on refusal until each
  refused row is alone. A refusal the driver calls a statement error (a dict for a text
  column, which no driver binds) is one row's when other rows go in; when no row goes in, it
  is the statement's (below). Each refused row is dead-lettered with the database's message
  and the refused result (``the database refused the result: NOT NULL constraint failed:
  t.col``, then a line ``result: {...}``: PostgreSQL names no column for a value too long).
  Its dead letter's item is the batch's input item with the same key when the worker passes
  ``inputs`` (so it can be retried), else the refused result. The rest, the dead letters and
  the ledger row (its ``results`` and ``dead`` counts corrected) commit together. On SQLite,
  whose connections run without the driver's own transaction handling (``BEGIN
  IMMEDIATE``, see :mod:`lrq.db`), SAVEPOINTs nest inside that transaction as on the
  servers.
* **Every row of the batch refused with the same first line of the message** (3 rows or
  more: a handler that leaves a NOT NULL column empty for all): the handler is broken, not
  the items; :class:`~lrq.errors.HandlerBroken` is raised (nothing committed) and the
  worker fails the batch loudly as when the handler's calls fail alike.
* **An unreachable database** (failed connect, disconnect, timeout, lock wait, deadlock,
  full disk): :class:`~lrq.errors.DatabaseUnreachable`; the worker releases the batch without
  counting an attempt and backs off.
* **A connection lost during the statement while the database answers a probe right after**
  (MySQL closes the connection on a packet over ``max_allowed_packet``; a server limit may
  kill the query): the batch's own statement is at fault, so it is treated as refused
  (counted), or it would be released uncounted forever. A lost connection with the
  database then unreachable stays :class:`~lrq.errors.DatabaseUnreachable`.
* **A statement it refuses whatever the rows** (missing table or column, privileges; every
  row refused with a statement error): :class:`~lrq.errors.StatementRefused`, naming the
  table and what to check; the worker counts an attempt, so the batch ends in ``failed/``
  after ``max_attempts``.

A commit sends the ledger row's insert and the results' insert, nothing else on the happy
path: no ``SELECT`` of the ledger first (a replay fails on the ledger's key and is read as
one, as a concurrent writer of the same batch always was). On SQLite the generic table's
rows go in as multi-row ``INSERT ... VALUES`` of at most :data:`SQLITE_ROWS` rows, which
cost 0.6x the CPU of executemany (``bench/sink_cost.py``), and when the batch has no dead
letters the whole transaction is sent on the pooled driver connection, without
SQLAlchemy's transaction and execution context (0.8x the CPU of a commit at batch 100; its
errors wrapped as SQLAlchemy's, so they are read the same way: :meth:`Sink._store_sqlite`).

Not covered: a value too long for lrq's own ``key`` column (255 characters) is refused in
the dead-letter table too, so that batch fails as a refused statement.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import chain, repeat
from pathlib import Path
from typing import Any

from sqlalchemy import (
    MetaData,
    Table,
    case,
    delete,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError, StatementError

from lrq import failpoints
from lrq.config import QueueConfig, load_object
from lrq.db import Fault, dumps_json, fault, insert_ignore, reader, shown_url
from lrq.errors import (
    ConfigError,
    DatabaseUnreachable,
    HandlerBroken,
    HandlerError,
    SinkError,
    StatementRefused,
)
from lrq.policy import BROKEN_AFTER, ERROR_CHARS, clip
from lrq.schema import (
    GENERIC_FIELDS,
    LEDGER,
    LEDGER_FIELDS,
    dead_letter_table,
    generic_table,
    is_unique,
    ledger_table,
    values_form,
)

log = logging.getLogger(__name__)

#: Rows per multi-row ``INSERT ... VALUES (...), (...)`` into the generic table on SQLite:
#: 4 parameters a row stays within the 999 of SQLite builds before 3.32. Measured on W1's
#: results, such statements and their commit took 0.6x the CPU of executemany.
SQLITE_ROWS = 249
#: Keys per ``DELETE ... IN`` when a retried batch replaces its dead letters.
DELETE_CHUNK = 1000
MESSAGE_CHARS = 2000  # of the database's message kept in a refused row's dead letter
#: What an insert raises when the database or its driver refuses it: SQLAlchemy's errors,
#: and a driver's own TypeError/ValueError for a value it cannot bind (PyMySQL: "dict can
#: not be used as parameter"), which SQLAlchemy passes on unwrapped.
_REFUSED = (StatementError, TypeError, ValueError)


@dataclass(frozen=True)
class Stored:
    """What one :meth:`Sink.store` did. ``recorded`` is False when the ledger already had it."""

    recorded: bool
    results: int
    dead: int = 0


@dataclass(frozen=True)
class DeadLetter:
    """One row of the dead-letter table: an item the handler failed on, and why."""

    queue: str
    key: str
    batch: str
    #: The traceback (or the reason) the item was set aside with.
    error: str
    item: dict[str, Any]
    #: The database's clock when the row was stored (naive: the server's time zone, UTC on
    #: SQLite).
    created_at: datetime | None


class Sink:
    """Where one queue's results go. A queue with ``outputs`` (fan-out) stores each
    output's rows through its :class:`lrq.outputs.Output` (:meth:`store_outputs`); this
    class keeps the ledger and the dead letters. ``tables_only``: the sink of one such
    output's table (made by :class:`lrq.outputs.SqlOutput`), whose :meth:`prepare` creates
    that table only."""

    #: What an insert raises when the database or its driver refuses it.
    refused_errors = _REFUSED

    def __init__(self, engine: Engine, queue: QueueConfig, base: Path | None = None, *,
                 tables_only: bool = False) -> None:
        self.engine = engine
        self.queue = queue
        self.tables_only = tables_only
        #: A fan-out queue's outputs by name (lrq.outputs); empty for a queue with a handler.
        self.outputs: dict[str, Any] = {}
        if queue.fanout:
            from lrq import outputs  # lrq.outputs imports this module

            self.outputs = outputs.build(engine, queue, base)
        self.key = queue.key
        self.metadata = MetaData()
        self.ledger = ledger_table(self.metadata)
        self.dead = dead_letter_table(self.metadata)
        self._insert_dead = insert_ignore(engine, self.dead, ["queue", "key"])
        if queue.model:
            model = load_object(queue.model, f"queues.{queue.name}.model", base)
            table = getattr(model, "__table__", None)
            if not isinstance(table, Table):
                raise ConfigError(f"queues.{queue.name}.model: {queue.model!r} is not an ORM model")
            if self.key not in table.c:
                raise ConfigError(f"queues.{queue.name}.model: {queue.model} has no column "
                                  f"{self.key!r} (the queue's key)")
            if not is_unique(table, self.key):
                raise ConfigError(f"queues.{queue.name}.model: column {table.name}.{self.key} "
                                  "must be unique (unique=True) so replays add nothing")
            self.table = table
            self.generic = False
            self.unique = [self.key]
            self._columns = {c.name for c in table.c}
        else:
            self.table = generic_table(self.metadata, queue.result_table or "lrq_results")
            self.generic = True
            self.unique = ["queue", "key"]
        self._insert = insert_ignore(engine, self.table, self.unique)
        #: The fields a result may have (the model's columns); None: any (the generic table).
        self.columns: frozenset[str] | None = (
            None if self.generic else frozenset(self._columns))
        if self.generic:
            # lrq's own table has a known shape (three strings and JSON), so its rows skip
            # SQLAlchemy's per-row processing: the statement is compiled once and sent to
            # the driver's executemany with the JSON already encoded (on SQLite, as
            # multi-row inserts: SQLITE_ROWS). User models keep the typed path.
            compiled = self._insert.compile(dialect=engine.dialect, for_executemany=True,
                                            column_keys=list(GENERIC_FIELDS))
            self._bulk_sql = compiled.string
            self._bulk_positional = compiled.positional
            #: SQLite: the statement's (head, row, tail), to send many rows in one statement.
            self._values_sql = (values_form(compiled.string)
                                if engine.dialect.name == "sqlite" else None)
            #: The driver's error root, to wrap its errors as SQLAlchemy does (SQLite's
            #: happy path, :meth:`_store_sqlite`, runs on the driver's connection).
            self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
            if compiled.positional and list(compiled.positiontup or ()) != list(GENERIC_FIELDS):
                raise SinkError(f"unexpected parameter order {compiled.positiontup} for "
                                f"{self.table.name} on {engine.dialect.name}")
        # The ledger row's insert, compiled once for the driver: building a Core statement
        # and its cache key per batch was a third of a commit's CPU at batch 100.
        ledger = self.ledger.insert().compile(dialect=engine.dialect,
                                              column_keys=list(LEDGER_FIELDS))
        self._ledger_sql = ledger.string
        self._ledger_positional = ledger.positional
        if ledger.positional and list(ledger.positiontup or ()) != list(LEDGER_FIELDS):
            raise SinkError(f"unexpected parameter order {ledger.positiontup} for {LEDGER} on "
                            f"{engine.dialect.name}")

    def prepare(self) -> Sink:
        """Create the ledger, dead-letter and results tables if they are missing. Safe when
        several processes start at once: losing the race to create a table is fine."""
        tables = ((self.table,) if self.tables_only else
                  (self.ledger, self.dead) if self.outputs else (self.ledger, self.dead, self.table))
        for table in tables:
            try:
                table.create(self.engine, checkfirst=True)
            except SQLAlchemyError as e:
                try:
                    if inspect(self.engine).has_table(table.name):
                        continue  # another process created it between the check and the create
                except OperationalError as again:
                    raise DatabaseUnreachable(f"cannot reach results database "
                                              f"{shown_url(self.engine)}: {again.orig}") from again
                raise self._error(f"cannot create table {table.name} in {shown_url(self.engine)}", e,
                                  "the database user needs the right to create it, or create "
                                  "it beforehand") from e
        if not self.tables_only:
            self._migrate()
        for output in self.outputs.values():
            output.prepare()
        return self

    def _migrate(self) -> None:
        """Add what a ledger made by an older lrq lacks: the ``seconds`` column (nullable, so
        old rows keep NULL) and the ``LEDGER_RECENT`` index. Safe when several processes
        start at once: what another process added between the look and the change is fine."""
        quote = self.engine.dialect.identifier_preparer.quote
        steps = [("column", c.name, f"ALTER TABLE {LEDGER} ADD COLUMN {quote(c.name)} "
                  f"{c.type.compile(dialect=self.engine.dialect)}") for c in self.ledger.c]
        steps += [("index", str(i.name), f"CREATE INDEX {i.name} ON {LEDGER} "
                   f"({', '.join(quote(c.name) for c in i.columns)})")
                  for i in self.ledger.indexes]
        have = {what: self._ledger_has(what) for what in ("column", "index")}
        for what, name, sql in steps:
            if name in have[what]:
                continue
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(sql)
                log.info("ledger-migrated table=%s %s=%s", LEDGER, what, name)
            except SQLAlchemyError as e:
                if name in self._ledger_has(what):
                    continue
                raise self._error(f"cannot add {what} {name} to {LEDGER} in "
                                  f"{shown_url(self.engine)}", e,
                                  f"the database user needs the right to alter it, or run {sql}"
                                  ) from e

    def _ledger_has(self, what: str) -> set[str]:
        """The names of the ledger's columns (``what="column"``) or indexes."""
        look = inspect(self.engine)
        try:
            found = look.get_columns(LEDGER) if what == "column" else look.get_indexes(LEDGER)
        except OperationalError as e:
            raise DatabaseUnreachable(f"cannot reach results database "
                                      f"{shown_url(self.engine)}: {e.orig}") from e
        return {str(f["name"]) for f in found}

    def is_recorded(self, name: str) -> bool:
        with reader(self.engine) as conn:
            return conn.execute(select(self.ledger.c.name).where(
                self.ledger.c.queue == self.queue.name, self.ledger.c.name == name)).first() is not None

    def rows(self, batch: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.generic:
            try:
                return [{"queue": self.queue.name, "key": str(r[self.key]), "batch": batch,
                         "value": r} for r in results]
            except KeyError:
                raise HandlerError(f"a result has no {self.key!r} field (the queue's key)") from None
        # The policy checks each call's results (an item with a field too many is dead-lettered
        # alone); this is the backstop for callers without it.
        extra = set().union(*(r.keys() for r in results)) - self._columns if results else set()
        if extra:
            raise HandlerError(f"results have fields {sorted(extra)} that model "
                               f"{self.queue.model} has no columns for")
        if any(r.get(self.key) is None for r in results):
            raise HandlerError(f"a result has no {self.key!r} (the key column of {self.queue.model})")
        return results

    def store(self, batch: str, items: int, results: list[dict[str, Any]], attempt: int = 1, *,
              dead: Sequence[tuple[dict[str, Any], str]] = (),
              inputs: list[dict[str, Any]] | None = None, replace_dead: bool = False,
              seconds: float | None = None) -> Stored:
        """Commit results, dead letters ``(item, error)`` and the ledger row together; a batch
        already in the ledger is left as is. ``seconds``: the batch's handler time, kept in
        the ledger row for the metrics' histogram (None: not measured). ``replace_dead`` (a
        ``lrq retry-dead`` batch): the same transaction first deletes the earlier dead letters
        of the batch's keys, so a retried item ends with its result or its new dead letter,
        never both or neither.

        Rows the database refuses are isolated and dead-lettered in the same transaction (see
        the module docstring); their dead letter carries the item of ``inputs`` with the same
        key (the batch's items, as the worker passes them), else the refused result.
        Raises :class:`DatabaseUnreachable` or :class:`StatementRefused`."""
        # Encoded before the transaction: on SQLite it holds the write lock, which the other
        # workers wait for (1 ms of JSON per 1000 results). The generic table's parameters
        # are made from the results directly; its row dicts only if a row is refused or dead
        # letters are replaced (making both was twice the CPU: 0.7 ms per 1000 results).
        bulk = self._bulk_of(batch, results) if self.generic and results else None
        rows = [] if bulk is not None else self.rows(batch, results)
        n = len(results)
        dead_rows = self._dead_rows(batch, dead)
        replace = (self._keys_of(rows or self.rows(batch, results), dead_rows)
                   if replace_dead else None)
        try:
            try:
                if bulk is not None and self._values_sql is not None and not dead_rows \
                        and replace is None:
                    self._store_sqlite(batch, items, attempt, bulk, seconds)
                else:
                    with self.engine.begin() as conn:
                        self._open_batch(conn, batch, items, n, len(dead_rows), attempt,
                                         replace, checked=False, seconds=seconds)
                        self._insert_rows(conn, rows, bulk, range(n))
                        if dead_rows:
                            conn.execute(self._insert_dead, dead_rows)
                        failpoints.hit("during-txn")
            except _REFUSED as e:
                kind = fault(e)
                if kind is Fault.UNREACHABLE:
                    raise
                if kind is Fault.ROW and self.is_recorded(batch):
                    return Stored(recorded=False, results=0)  # the ledger's key: a replay
                log.warning("refused queue=%s batch=%s table=%s: isolating the rows the "
                            "database refuses: %s", self.queue.name, batch, self.table.name,
                            _first_line(e))
                return self._store_isolating(batch, items, rows or self.rows(batch, results),
                                             bulk, dead_rows, attempt, inputs, replace, seconds)
        except (SQLAlchemyError, TypeError, ValueError) as e:
            what = f"storing batch {batch} into {self.table.name} failed"
            if isinstance(e, DBAPIError) and e.connection_invalidated and self._answers():
                raise StatementRefused(
                    f"{what}: the connection was lost during the statement, yet the database "
                    f"answers at once: this batch's statement is at fault (larger than the "
                    f"server's max_allowed_packet? killed by a server limit?): {e.orig}") from e
            raise self._error(what, e) from e
        return Stored(recorded=True, results=n, dead=len(dead_rows))

    def store_outputs(self, batch: str, items: int,
                      handled: dict[str, tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]],
                      attempt: int = 1, **kw: Any) -> Stored:
        """A fan-out queue's :meth:`store` (:func:`lrq.outputs.store_batch`)."""
        from lrq.outputs import store_batch

        return store_batch(self, batch, items, handled, attempt, **kw)

    def _store_sqlite(self, batch: str, items: int, attempt: int, bulk: list[Any],
                      seconds: float | None = None) -> None:
        """The happy path of :meth:`store` on SQLite's generic table (no dead letters, none
        replaced): the transaction :meth:`store` makes through SQLAlchemy (``BEGIN
        IMMEDIATE``, the ledger row, the multi-row inserts, ``COMMIT``), sent on the pooled
        driver connection itself. SQLAlchemy's transaction, pool checkout and execution
        context cost ~80 µs of a 400 µs commit at batch 100 (bench/README.md, "Worker CPU
        per batch, second pass"). The connection is the engine's (its pragmas set on
        connect, see :mod:`lrq.db`) and goes back to its pool; a driver error is raised as SQLAlchemy
        would wrap it (``IntegrityError``, ``OperationalError``, ...), so :meth:`store`
        reads it as on the other path: a replay, refused rows to isolate (done through
        SQLAlchemy), or an unreachable database."""
        sql: str | None = None  # connecting
        params: tuple[Any, ...] | None = None
        try:
            raw = self.engine.raw_connection()
            try:
                db: Any = raw.driver_connection
                sql = "BEGIN IMMEDIATE"
                db.execute(sql)
                try:
                    sql, params = self._ledger_sql, (self.queue.name, batch, items, len(bulk), 0,
                                                     attempt, seconds)
                    db.execute(sql, params)
                    for sql, params in self._values_statements(bulk):
                        db.execute(sql, params)
                    failpoints.hit("during-txn")
                    sql, params = "COMMIT", None
                    db.execute(sql)
                except BaseException:
                    if db.in_transaction:
                        db.rollback()
                    raise
            finally:
                raw.close()
        except self._driver_error as e:
            raise DBAPIError.instance(sql, params, e, self._driver_error,
                                      dialect=self.engine.dialect) from e

    def _answers(self) -> bool:
        """Does the database answer a ``SELECT 1`` on a new connection (bounded by the
        engine's connect timeout)?"""
        try:
            with reader(self.engine) as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            return False

    def _store_isolating(self, batch: str, items: int, rows: list[dict[str, Any]],
                         bulk: list[Any] | None, dead_rows: list[dict[str, Any]], attempt: int,
                         inputs: list[dict[str, Any]] | None,
                         replace: list[str] | None = None,
                         seconds: float | None = None) -> Stored:
        """The whole insert failed on a row's values: the same transaction again, each group
        of rows inserted inside a SAVEPOINT and halved on refusal until the refused rows are
        alone; those are dead-lettered with the database's message."""
        with self.engine.begin() as conn:
            if not self._open_batch(conn, batch, items, len(rows), len(dead_rows), attempt,
                                    replace, seconds=seconds):
                return Stored(recorded=False, results=0)
            refused: list[tuple[int, Exception]] = []
            for group in _same_fields(rows, indexes=True):
                self._bisect(conn, rows, bulk, group, refused)
            statement = [e for _i, e in refused if fault(e) is Fault.STATEMENT]
            if statement and len(refused) == len(rows):  # no row went in: not the rows
                raise self._error(f"storing batch {batch} into {self.table.name} failed "
                                  f"(every result was refused)", statement[0])
            self._check_broken(rows, refused)
            by_key = {str(it.get(self.key)): it for it in inputs or ()}
            for i, e in refused:
                error = str(getattr(e, "orig", None) or e)[:MESSAGE_CHARS]
                key, value = self._row_key(rows[i]), self._row_value(rows[i])
                dead_rows.append({"queue": self.queue.name, "key": key, "batch": batch,
                                  "error": f"the database refused the result: {error}\n"
                                           f"result: {dumps_json(value)[:MESSAGE_CHARS]}",
                                  "item": by_key.get(key, value)})
                log.warning("dead-lettered queue=%s key=%s error=the database refused the "
                            "result: %s", self.queue.name, key, error.splitlines()[0])
            if dead_rows:
                conn.execute(self._insert_dead, dead_rows)
            stored = len(rows) - len(refused)
            conn.execute(self.ledger.update().where(
                self.ledger.c.queue == self.queue.name, self.ledger.c.name == batch).values(
                results=stored, dead=len(dead_rows)))
            failpoints.hit("during-txn")
        return Stored(recorded=True, results=stored, dead=len(dead_rows))

    def _check_broken(self, rows: list[dict[str, Any]],
                      refused: list[tuple[int, Exception]]) -> None:
        """Every result of the batch (``BROKEN_AFTER`` or more) refused with the same first
        line of the database's message: the handler is broken (it leaves a NOT NULL column
        empty for all), so raise :class:`HandlerBroken` rather than dead-letter every item."""
        if len(rows) < BROKEN_AFTER or len(refused) < len(rows):
            return
        lines = {_first_line(e) for _i, e in refused}
        if len(lines) == 1:
            error = str(getattr(refused[0][1], "orig", None) or refused[0][1])
            raise HandlerBroken(self.queue.handler, f"the database refused the result: "
                                f"{lines.pop()[:MESSAGE_CHARS]}",
                                f"the database refused all {len(rows)} results of the batch "
                                f"the same way (table {self.table.name})",
                                error[:MESSAGE_CHARS])

    def _bisect(self, conn: Connection, rows: list[dict[str, Any]], bulk: list[Any] | None,
                part: list[int], refused: list[tuple[int, Exception]]) -> None:
        """Insert ``rows[part]`` inside a SAVEPOINT; on a refusal, halve and recurse (a lone
        refused row goes into ``refused`` with the database's error). k refused rows of n
        cost about 2·k·log2(n) statements."""
        try:
            with conn.begin_nested():
                self._insert_rows(conn, rows, bulk, part)
        except _REFUSED as e:
            if fault(e) is Fault.UNREACHABLE:
                raise
            if len(part) == 1:
                refused.append((part[0], e))
                return
            mid = len(part) // 2
            self._bisect(conn, rows, bulk, part[:mid], refused)
            self._bisect(conn, rows, bulk, part[mid:], refused)

    def _insert_rows(self, conn: Connection, rows: list[dict[str, Any]], bulk: list[Any] | None,
                     part: Sequence[int]) -> None:
        """Insert ``rows[part]`` (all of them: a ``range``, taken without copying); from
        ``bulk``, the same rows as driver parameters, when given (``rows`` may then be
        empty: the generic table's happy path does not make them)."""
        if not part:
            return
        whole = isinstance(part, range) and len(part) == len(rows if bulk is None else bulk)
        if bulk is not None:
            params = bulk if whole else [bulk[i] for i in part]
            if self._values_sql is None:
                conn.exec_driver_sql(self._bulk_sql, params)
                return
            for sql, values in self._values_statements(params):
                conn.exec_driver_sql(sql, values)
            return
        chosen = rows if whole else [rows[i] for i in part]
        for group in _same_fields(chosen):
            conn.execute(self._insert, group)

    def _values_statements(self, params: Sequence[Any]) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """SQLite's multi-row ``INSERT ... VALUES (...), (...)`` for the generic table's rows
        ``params``: (statement, parameters) per :data:`SQLITE_ROWS` rows."""
        head, row, tail = self._values_sql or ("", "", "")
        for at in range(0, len(params), SQLITE_ROWS):
            chunk = params[at:at + SQLITE_ROWS]
            yield f"{head}{', '.join([row] * len(chunk))}{tail}", tuple(chain.from_iterable(chunk))

    def _open_batch(self, conn: Connection, batch: str, items: int, results: int, dead: int,
                    attempt: int, replace: list[str] | None = None, *,
                    checked: bool = True, seconds: float | None = None) -> bool:
        """Insert the ledger row first, in ``conn``'s transaction; False when the ledger
        already holds the batch. The row's key makes a concurrent writer of the same batch
        wait for this transaction, then fail (a replay). Then the dead letters of the keys in
        ``replace`` are deleted (a retried batch's).

        ``checked=False`` (the first try of :meth:`store`): no ``SELECT`` first; a batch the
        ledger holds makes the insert fail on the ledger's key, which :meth:`store` reads as
        a replay (:meth:`is_recorded`), as it does for a concurrent writer. A replay is rare
        (a commit whose done marker was lost); the statement saved is on every batch."""
        if checked and conn.execute(select(self.ledger.c.name).where(
                self.ledger.c.queue == self.queue.name,
                self.ledger.c.name == batch)).first() is not None:
            return False
        values = (self.queue.name, batch, items, results, dead, attempt, seconds)
        conn.exec_driver_sql(self._ledger_sql, values if self._ledger_positional
                             else dict(zip(LEDGER_FIELDS, values)))
        for i in range(0, len(replace or ()), DELETE_CHUNK):
            conn.execute(delete(self.dead).where(
                self.dead.c.queue == self.queue.name,
                self.dead.c.key.in_((replace or [])[i:i + DELETE_CHUNK])))
        return True

    def _keys_of(self, rows: list[dict[str, Any]], dead_rows: list[dict[str, Any]]) -> list[str]:
        """The keys of a batch's result rows and dead letters, as the tables store them."""
        return sorted({self._row_key(r) for r in rows} | {r["key"] for r in dead_rows})

    def _dead_rows(self, batch: str,
                   dead: Sequence[tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
        return [{"queue": self.queue.name, "key": str(item.get(self.key)), "batch": batch,
                 "error": clip(error, ERROR_CHARS), "item": item} for item, error in dead]

    def _row_key(self, row: dict[str, Any]) -> str:
        return str(row["key"] if self.generic else row[self.key])

    def _row_value(self, row: dict[str, Any]) -> dict[str, Any]:
        return row["value"] if self.generic else row

    def _error(self, what: str, e: Exception, fix: str | None = None) -> SinkError:
        """``e`` as :class:`DatabaseUnreachable` or :class:`StatementRefused`, with the
        database's message and, for a statement, what to check."""
        message = f"{what}: {getattr(e, 'orig', None) or e}"
        if fault(e) is Fault.UNREACHABLE:
            # Named by URL (its password masked): a driver's text may not say which server
            # ("terminating connection due to administrator command").
            return DatabaseUnreachable(f"results database {self.engine.url!r}: {message}")
        fix = fix or (f"check that table {self.table.name} has the columns the results carry "
                      "and that the database user may write it")
        return StatementRefused(f"{message} (a schema or configuration problem: {fix})")

    def _bulk_of(self, batch: str, results: list[dict[str, Any]]) -> list[Any]:
        """The generic table's driver parameters for ``results``, in order: the rows of
        :meth:`rows` with the value JSON-encoded, without making those dicts."""
        try:
            keys = [str(r[self.key]) for r in results]
        except KeyError:
            raise HandlerError(f"a result has no {self.key!r} field (the queue's key)") from None
        values = [dumps_json(r) for r in results]
        queue = self.queue.name
        if self._bulk_positional:
            return list(zip(repeat(queue), keys, repeat(batch), values))
        return [{"queue": queue, "key": k, "batch": batch, "value": v}
                for k, v in zip(keys, values)]

    def _key_column(self) -> Any:
        return self.table.c.key if self.generic else self.table.c[self.key]

    def _scoped(self, q: Any) -> Any:
        return q.where(self.table.c.queue == self.queue.name) if self.generic else q

    def keys(self) -> Iterator[str]:
        if self.outputs:  # a fan-out queue: lrq.app verifies each output
            for o in self.outputs.values():
                yield from (o.keys() or ()) if not o.aggregate else ()
            return
        with reader(self.engine) as conn:
            for (k,) in conn.execution_options(yield_per=10_000).execute(
                    self._scoped(select(self._key_column()))):
                yield str(k)

    def dead_keys(self) -> Iterator[str]:
        with reader(self.engine) as conn:
            for (k,) in conn.execution_options(yield_per=10_000).execute(
                    select(self.dead.c.key).where(self.dead.c.queue == self.queue.name)):
                yield str(k)

    def dead_letters(self, batch: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        q = select(self.dead.c.key, self.dead.c.batch, self.dead.c.error, self.dead.c.created_at)
        q = q.where(self.dead.c.queue == self.queue.name)
        if batch is not None:
            q = q.where(self.dead.c.batch == batch)
        with reader(self.engine) as conn:
            return [dict(r) for r in conn.execute(q.order_by(self.dead.c.id).limit(limit)).mappings()]

    def dead_records(self, keys: Collection[str] | None = None,
                     limit: int | None = None) -> list[DeadLetter]:
        """This queue's dead letters, oldest first; only ``keys`` when given."""
        q = select(self.dead).where(self.dead.c.queue == self.queue.name)
        if keys is not None:
            q = q.where(self.dead.c.key.in_(sorted(keys)))
        q = q.order_by(self.dead.c.id)
        if limit is not None:
            q = q.limit(limit)
        with reader(self.engine) as conn:
            return [DeadLetter(queue=r.queue, key=r.key, batch=r.batch, error=r.error,
                               item=r.item, created_at=r.created_at) for r in conn.execute(q)]

    def dead_items(self, keys: Collection[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, item)`` of this queue's dead letters (only ``keys`` when given), oldest
        first, streamed: ``lrq retry-dead --all`` needs the items, not the tracebacks."""
        q = select(self.dead.c.key, self.dead.c.item).where(self.dead.c.queue == self.queue.name)
        if keys is not None:
            q = q.where(self.dead.c.key.in_(sorted(keys)))
        with reader(self.engine) as conn:
            for k, item in conn.execution_options(yield_per=1000).execute(q.order_by(self.dead.c.id)):
                yield str(k), item

    def duplicates(self) -> int:
        """Keys stored more than once (non-zero only if the unique constraint was dropped)."""
        if self.outputs:
            return sum(o.duplicates() for o in self.outputs.values())
        col = self._key_column()
        q = self._scoped(select(col)).group_by(col).having(func.count() > 1)
        with reader(self.engine) as conn:
            return len(conn.execute(q).all())

    def count(self) -> int:
        if self.outputs:  # a fan-out queue: its outputs' rows
            return sum(o.count() or 0 for o in self.outputs.values())
        with reader(self.engine) as conn:
            return conn.execute(self._scoped(select(func.count()).select_from(self.table))).scalar_one()

    def ledger_stats(self) -> tuple[int, int]:
        """(batches recorded, items recorded) for this queue."""
        q = select(func.count(), func.coalesce(func.sum(self.ledger.c["items"]), 0)).where(
            self.ledger.c.queue == self.queue.name)
        with reader(self.engine) as conn:
            n, items = conn.execute(q).one()
        return int(n), int(items)

    def finished_within(self, windows: Sequence[int]) -> dict[int, tuple[int, int]]:
        """``{seconds: (batches, items)}`` the ledger recorded as committed in each of the
        last ``windows`` seconds, for :mod:`lrq.rates`. Measured against the database's own
        ``now()``: ``finished_at`` is that clock's default (SQLite's is UTC), and a remote
        database's clock need not agree with this machine's. Read-only: two short queries."""
        c = self.ledger.c
        with reader(self.engine) as conn:
            now = conn.execute(select(func.now())).scalar_one()
            if isinstance(now, str):  # a driver that leaves the timestamp as text
                now = datetime.fromisoformat(now)
            cut = {w: now - timedelta(seconds=w) for w in windows}
            cols = []
            for w in windows:
                recent = c.finished_at >= cut[w]
                cols += [func.coalesce(func.sum(case((recent, 1), else_=0)), 0),
                         func.coalesce(func.sum(case((recent, c["items"]), else_=0)), 0)]
            row = conn.execute(select(*cols).where(
                c.queue == self.queue.name, c.finished_at >= min(cut.values()))).one()
        return {w: (int(row[2 * i]), int(row[2 * i + 1])) for i, w in enumerate(windows)}

    def dead_count(self, keys: Collection[str] | None = None) -> int:
        q = select(func.count()).select_from(self.dead).where(self.dead.c.queue == self.queue.name)
        if keys is not None:
            q = q.where(self.dead.c.key.in_(sorted(keys)))
        with reader(self.engine) as conn:
            return int(conn.execute(q).scalar_one())


def _same_fields(rows: list[dict[str, Any]], indexes: bool = False) -> list[list[Any]]:
    """Rows (or, with ``indexes``, their positions) grouped by their set of fields: an
    executemany takes its columns from the first row, so mixing shapes would drop fields
    silently or fail the batch."""
    groups: dict[frozenset[str], list[Any]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(frozenset(r), []).append(i if indexes else r)
    return list(groups.values())


def _first_line(e: BaseException) -> str:
    return str(getattr(e, "orig", None) or e).splitlines()[0]
