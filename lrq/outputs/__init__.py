"""Outputs: where one handler's results go, inside the batch's transaction (fan-out).

A queue has one output per ``[queues.X.outputs.NAME]`` table (or one, named ``""``, made of
its ``handler``: :meth:`lrq.config.QueueConfig.plan`). Each output has its own handler,
handler policy (chunks, retries, splits: :mod:`lrq.policy`) and place for its results.
:meth:`lrq.sink.Sink.store_outputs` commits a batch as ONE transaction, in this order:

1. the ledger row (its key makes a replayed or concurrently stored batch fail here, before
   anything is written or added: see :mod:`lrq.sink`);
2. each output's :meth:`Output.write`, in the config's order (an output outside the
   database, ``Output.outside``: a Kafka topic, was written before the transaction opened,
   so the transaction never waits on a broker);
3. the dead letters of every output, then the ledger's counts; commit.

So all of a batch's outputs are stored or none (a crash between two outputs' writes rolls
the whole transaction back: ``tests/acceptance/test_fanout_crash.py``).

**Dead letters per output.** An item a handler fails on is dead-lettered for that output
only; the other outputs store their results for it. Its dead letter's key is
``"<output>/<item key>"`` (output names cannot hold ``/``), so an item may be dead in
several outputs of one queue; a queue without ``outputs`` keeps its plain keys.

**The interface** (:class:`Output`) for a new kind (``kind = "kafka"``): a class built with
``(engine, queue, output, base)`` whose :meth:`Output.write` is called inside the batch's
transaction, before the ledger commits, and returns the rows it refused (dead-lettered for
that output). A write that raises rolls the batch back. Register it in :data:`KINDS`
(``"kind": "module:Class"``); its own config keys reach its ``parse(options, where)``
classmethod, whose value is :attr:`lrq.config.OutputConfig.settings`.

**Aggregating outputs** (``aggregate = true``): the handler returns any rows, each with its
own unique key (the output's ``key``, else the queue's); the one-result-per-item check is
skipped. Rows with the same key within a batch are merged, then *upserted*: a stored row
gets the new one merged into it. The merge rule (:func:`merge`): a numeric field (int or
float, not bool) is ADDED to the stored value; any other field takes the newest value. A
window's counts thus accumulate across batches, and a replayed batch adds nothing (step 1).
Two workers adding to the same new key at once: the existing keys are read ``FOR UPDATE``
(sorted, so lockers queue instead of deadlocking on each other), the rest inserted; the
loser of an insert race (unique violation) or a deadlock retries the whole transaction,
``RACE_TRIES`` times at most (:meth:`lrq.sink.Sink.store_outputs`). SQLite's ``BEGIN
IMMEDIATE`` serializes writers, so there is no race there.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection, Engine

from lrq.config import OutputConfig, QueueConfig
from lrq.db import Fault, fault
from lrq.errors import ConfigError

if TYPE_CHECKING:
    from lrq.sink import Sink, Stored

log = logging.getLogger(__name__)

#: Output kinds: name -> "module:Class" implementing :class:`Output`.
KINDS: dict[str, str] = {"sql": "lrq.outputs:SqlOutput",
                         "kafka": "lrq.outputs.kafka:KafkaOutput"}
#: Separates an output's name from the item key in its dead letters' keys.
SEP = "/"
#: Keys per ``SELECT ... FOR UPDATE`` of an aggregating output's stored rows.
SELECT_CHUNK = 500


class Race(Exception):
    """Another transaction inserted a key this one meant to insert (an aggregating output's
    upsert lost a race): the whole batch's transaction is tried again."""


class Output(Protocol):
    """One output of a queue (see the module docstring)."""

    name: str
    aggregate: bool
    #: The fields a result may have (a model's columns), None: any.
    columns: frozenset[str] | None
    #: How a refused row's dead letter begins ("the database refused the result").
    refusal: str
    #: True: :meth:`write` sends to something outside the results database (a broker). It is
    #: then called BEFORE the batch's transaction opens, with ``conn`` None, so the
    #: transaction (on SQLite, the database's write lock) is not held while it waits; its
    #: refused rows join the dead letters, and a failure raises before anything is written.
    #: A batch whose transaction then fails, or that the ledger already holds, was sent
    #: anyway: such an output is at least once (:mod:`lrq.outputs.kafka`).
    outside: bool

    def prepare(self) -> None:
        """Create what the output needs (its table), as :meth:`lrq.sink.Sink.prepare`."""

    def write(self, conn: Connection | None, batch: str, results: list[dict[str, Any]],
              final: bool) -> list[tuple[dict[str, Any], str, Exception]]:
        """Store ``results`` inside ``conn``'s transaction (the batch's; None for an output
        :attr:`outside` the database, called before it opens); return the rows
        refused, as (row, its key, the error). ``final``: the last try of the transaction
        (an aggregating output then treats a unique violation as a refused row instead of
        raising :class:`Race`)."""

    def keys(self) -> Iterator[str] | None:
        """Every stored key (for ``lrq verify``); None: the output cannot list them."""

    def count(self) -> int | None:
        """Rows stored; None when the output cannot tell."""

    def duplicates(self) -> int:
        """Keys stored more than once."""


def parse(kind: str, options: dict[str, Any], where: str) -> Any:
    """Check a kind's own keys with its ``parse`` classmethod; its settings value."""
    cls = _kind(kind, where)
    check = getattr(cls, "parse", None)
    if check is None:
        if options:
            raise ConfigError(f"{where}: unknown key {sorted(options)[0]!r} for output kind "
                              f"{kind!r}")
        return None
    return check(options, where)


def _kind(kind: str, where: str) -> Any:
    module, _, name = KINDS[kind].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}.kind: output kind {kind!r} cannot be loaded: {e}") from e


def build(engine: Engine, queue: QueueConfig, base: Path | None = None) -> dict[str, Output]:
    """The queue's outputs by name, in the config's order."""
    out: dict[str, Output] = {}
    for o in queue.plan():
        cls = _kind(o.kind, f"queues.{queue.name}.outputs.{o.name}")
        if cls is SqlOutput and o.aggregate:
            cls = AggregateSqlOutput
        out[o.name] = cls(engine, queue, o, base)
    return out


def dead_key(output: str, key: str) -> str:
    """The dead-letter key of ``key`` in ``output`` (``""``: a queue without outputs)."""
    return f"{output}{SEP}{key}" if output else key


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` merged into ``old``: numeric fields (int or float, not bool) added, the others
    the newest value. Fields only in one of them are kept."""
    out = dict(old)
    for k, v in new.items():
        was = out.get(k)
        if _number(v) and _number(was):
            out[k] = was + v
        else:
            out[k] = v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class SqlOutput:
    """``kind = "sql"``: rows in the results database, in the output's ``result_table``
    (lrq's generic table) or ``model``, unique by key. The table code is the sink's own
    (:class:`lrq.sink.Sink` built for the output), so rows are shaped and checked as for a
    queue without outputs. Refused rows are isolated by SAVEPOINTs, as the sink does."""

    def __init__(self, engine: Engine, queue: QueueConfig, output: OutputConfig,
                 base: Path | None = None) -> None:
        from lrq.sink import Sink  # lrq.sink builds outputs

        self.name = output.name
        self.aggregate = output.aggregate
        self.outside = False
        self.refusal = "the database refused the result"
        self.key = output.key or queue.key
        self.table_sink: Sink = Sink(engine, replace(queue.for_output(output), key=self.key),
                                     base, tables_only=True)
        self.table = self.table_sink.table
        self.columns = self.table_sink.columns

    def prepare(self) -> None:
        self.table_sink.prepare()

    def write(self, conn: Connection | None, batch: str, results: list[dict[str, Any]],
              final: bool) -> list[tuple[dict[str, Any], str, Exception]]:
        assert conn is not None  # in the batch's transaction: not outside
        if not results:
            return []
        s = self.table_sink
        # lrq's generic table: its rows as driver parameters, JSON encoded once, sent as
        # multi-row INSERTs on SQLite (the sink's own fast path); the row dicts only on a
        # refusal. A model's rows go through SQLAlchemy.
        bulk = s._bulk_of(batch, results) if s.generic else None
        rows = [] if bulk is not None else s.rows(batch, results)
        refused: list[tuple[int, Exception]] = []
        try:
            with savepoint(conn):
                s._insert_rows(conn, rows, bulk, range(len(results)))
        except s.refused_errors as e:
            if fault(e) is Fault.UNREACHABLE:
                raise
            rows = s.rows(batch, results)
            s._bisect(conn, rows, None, list(range(len(rows))), refused)
            s._check_broken(rows, refused)  # all refused alike: HandlerBroken, not dead letters
        return [(s._row_value(rows[i]), s._row_key(rows[i]), e) for i, e in refused]

    def keys(self) -> Iterator[str] | None:
        return self.table_sink.keys()

    def count(self) -> int | None:
        return self.table_sink.count()

    def duplicates(self) -> int:
        return self.table_sink.duplicates()


class AggregateSqlOutput(SqlOutput):
    """``aggregate = true`` of kind "sql": rows upserted by :func:`merge` (see the module
    docstring)."""

    def write(self, conn: Connection | None, batch: str, results: list[dict[str, Any]],
              final: bool) -> list[tuple[dict[str, Any], str, Exception]]:
        assert conn is not None  # in the batch's transaction: not outside
        merged: dict[str, dict[str, Any]] = {}
        for r in results:
            if r.get(self.key) is None:
                from lrq.errors import HandlerError

                raise HandlerError(f"output {self.name}: a row has no {self.key!r} (its key)")
            k = str(r[self.key])
            merged[k] = merge(merged[k], r) if k in merged else r
        if not merged:
            return []
        ordered = [merged[k] for k in sorted(merged)]
        refused: list[tuple[dict[str, Any], str, Exception]] = []
        self._upsert_isolating(conn, batch, ordered, final, refused)
        self.table_sink._check_broken(ordered, [(i, e) for i, (_r, _k, e) in enumerate(refused)])
        return refused

    def _upsert_isolating(self, conn: Connection, batch: str, rows: list[dict[str, Any]],
                          final: bool, refused: list[tuple[dict[str, Any], str, Exception]]) -> None:
        """Upsert ``rows`` in a SAVEPOINT; on a refused row, halve until it is alone."""
        s = self.table_sink
        try:
            with savepoint(conn):
                self._upsert(conn, batch, rows)
        except s.refused_errors as e:
            if fault(e) is Fault.UNREACHABLE:
                raise
            if is_unique_violation(e) and not final:
                raise Race(str(e)) from e
            if len(rows) == 1:
                refused.append((rows[0], str(rows[0][self.key]), e))
                return
            mid = len(rows) // 2
            self._upsert_isolating(conn, batch, rows[:mid], final, refused)
            self._upsert_isolating(conn, batch, rows[mid:], final, refused)

    def _upsert(self, conn: Connection, batch: str, rows: list[dict[str, Any]]) -> None:
        """Read the stored rows of ``rows``' keys ``FOR UPDATE``, update those with the merge,
        insert the others (a concurrent insert of one of them fails on the unique key)."""
        s = self.table_sink
        t = self.table
        keys = [str(r[self.key]) for r in rows]
        stored = self._stored(conn, keys)
        col = t.c.key if s.generic else t.c[self.key]
        new = [r for k, r in zip(keys, rows) if k not in stored]
        # the stored row merged with the new one; a model's row only in the new row's fields
        # (its other columns, an id or created_at, are the database's)
        old = [(k, m if s.generic else {f: m[f] for f in r})
               for k, r in zip(keys, rows) if k in stored for m in (merge(stored[k], r),)]
        if s.generic:
            if old:
                conn.execute(t.update().where(t.c.queue == s.queue.name,
                                              t.c.key == bindparam("k")),
                             [{"k": k, "value": v, "batch": batch} for k, v in old])
            if new:
                conn.execute(t.insert(), s.rows(batch, new))
            return
        if old:
            for fields, group in _grouped(old):
                values: dict[str, Any] = {f: bindparam(f"v_{f}") for f in fields
                                          if f != self.key}
                if values:
                    conn.execute(t.update().where(col == bindparam("k")).values(values),
                                 [{"k": v[self.key], **{f"v_{f}": v[f] for f in values}}
                                  for _k, v in group])
        if new:
            for _fields, group in _grouped([(str(r[self.key]), r) for r in new]):
                conn.execute(t.insert(), [r for _k, r in group])

    def _stored(self, conn: Connection, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The stored rows (generic: values) of ``keys`` (sorted), locked ``FOR UPDATE``."""
        s = self.table_sink
        t = self.table
        stored: dict[str, dict[str, Any]] = {}
        col = t.c.key if s.generic else t.c[self.key]
        for at in range(0, len(keys), SELECT_CHUNK):
            part = keys[at:at + SELECT_CHUNK]
            if s.generic:
                q = select(t.c.key, t.c.value).where(t.c.queue == s.queue.name, col.in_(part))
                found = {str(k): v for k, v in conn.execute(
                    q.order_by(col).with_for_update())}
            else:
                found = {str(r[self.key]): dict(r) for r in conn.execute(
                    select(t).where(col.in_(part)).order_by(col).with_for_update()).mappings()}
            stored.update(found)
        return stored


@contextlib.contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    """The block in a SAVEPOINT, rolled back to it on an error; but a deadlock raises
    :class:`Race` at once: MariaDB has then rolled the whole transaction back, and going
    back to the savepoint would fail with "SAVEPOINT does not exist" while the statements
    after it ran outside any transaction."""
    sp = conn.begin_nested()
    try:
        yield
    except BaseException as e:
        if is_deadlock(e):
            raise Race(f"deadlock: {getattr(e, 'orig', None) or e}") from e
        if sp.is_active:
            sp.rollback()
        raise
    else:
        sp.commit()


def _grouped(pairs: list[tuple[str, dict[str, Any]]]) -> list[tuple[frozenset[str], list[Any]]]:
    """Pairs grouped by their row's set of fields (one executemany per shape)."""
    groups: dict[frozenset[str], list[Any]] = {}
    for k, r in pairs:
        groups.setdefault(frozenset(r), []).append((k, r))
    return list(groups.items())


def is_unique_violation(e: BaseException) -> bool:
    """A unique-key violation, by the driver's code (PostgreSQL 23505, MySQL 1062, SQLite
    SQLITE_CONSTRAINT_UNIQUE / PRIMARYKEY)."""
    orig = getattr(e, "orig", None)
    if getattr(orig, "sqlstate", None) == "23505":
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    if type(orig).__module__.startswith("pymysql") and args and args[0] == 1062:
        return True
    return getattr(orig, "sqlite_errorcode", None) in (2067, 1555)


def is_deadlock(e: BaseException) -> bool:
    """A deadlock or serialization failure the database resolved by rolling this
    transaction back (PostgreSQL 40P01/40001, MySQL 1213)."""
    orig = getattr(e, "orig", None)
    if getattr(orig, "sqlstate", None) in ("40P01", "40001"):
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return type(orig).__module__.startswith("pymysql") and bool(args) and args[0] == 1213


#: Tries of a batch's transaction that lost an aggregating output's race (or a deadlock).
RACE_TRIES = 8
MESSAGE_CHARS = 2000  # of the database's message kept in a refused row's dead letter


def store_batch(sink: Sink, batch: str, items: int,
                handled: dict[str, tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]],
                attempt: int = 1, *, inputs: list[dict[str, Any]] | None = None,
                replace_dead: bool = False, seconds: float | None = None) -> Stored:
    """Commit every output's results of a batch (``handled``: output name -> (results, dead
    letters)), their dead letters and the ledger row, in one transaction (see the module
    docstring); :class:`lrq.sink.Stored`. A batch the ledger holds is left as is
    (``recorded=False``): the ledger row goes in first, so nothing is added by a replay."""
    from sqlalchemy.exc import SQLAlchemyError

    from lrq import failpoints
    from lrq.db import dumps_json
    from lrq.policy import ERROR_CHARS, clip
    from lrq.sink import Stored

    q, key = sink.queue.name, sink.key
    dead_rows = [{"queue": q, "key": dead_key(name, str(item.get(key))), "batch": batch,
                  "error": clip(error, ERROR_CHARS), "item": item}
                 for name, (_results, dead) in handled.items() for item, error in dead]
    n_results = sum(len(r) for r, _d in handled.values())
    replace = (sorted({dead_key(o, str(it.get(key))) for o in sink.outputs for it in inputs or ()})
               if replace_dead else None)
    by_key = {str(it.get(key)): it for it in inputs or ()}
    last = list(sink.outputs)[-1]
    # Outputs outside the database send first, once: no transaction waits on a broker, and
    # a race's retry below does not send again.
    sent = {name: output.write(None, batch, handled.get(name, ([], []))[0], True)
            for name, output in sink.outputs.items() if output.outside}
    for n in range(1, RACE_TRIES + 1):
        final = n == RACE_TRIES
        try:
            with sink.engine.begin() as conn:
                # unchecked, as Sink.store's first try: a replay fails on the ledger's key
                # (below), before anything else is written or added
                sink._open_batch(conn, batch, items, n_results, len(dead_rows), attempt,
                                 replace, checked=False, seconds=seconds)
                refused_rows: list[dict[str, Any]] = []
                stored = 0
                for name, output in sink.outputs.items():
                    results = handled.get(name, ([], []))[0]
                    refused = (sent[name] if name in sent
                               else output.write(conn, batch, results, final))
                    stored += len(results) - len(refused)
                    for value, k, e in refused:
                        error = str(getattr(e, "orig", None) or e)[:MESSAGE_CHARS]
                        refused_rows.append({
                            "queue": q, "key": dead_key(name, k), "batch": batch,
                            "error": f"{output.refusal}: {error}\n"
                                     f"result: {dumps_json(value)[:MESSAGE_CHARS]}",
                            "item": value if output.aggregate else by_key.get(k, value)})
                        log.warning("dead-lettered queue=%s output=%s key=%s error=%s: %s",
                                    q, name, k, output.refusal,
                                    error.splitlines()[0] if error else "")
                    if name != last:
                        failpoints.hit("between-outputs")
                every = dead_rows + refused_rows
                if every:
                    conn.execute(sink._insert_dead, every)
                if refused_rows:
                    conn.execute(sink.ledger.update().where(
                        sink.ledger.c.queue == q, sink.ledger.c.name == batch).values(
                        results=stored, dead=len(every)))
                failpoints.hit("during-txn")
            return Stored(recorded=True, results=stored, dead=len(every))
        except Race as e:
            log.info("upsert-race queue=%s batch=%s try=%d: %s", q, batch, n,
                     str(e).splitlines()[0] if str(e) else "")
            if final:
                from lrq.errors import DatabaseUnreachable

                raise DatabaseUnreachable(f"storing batch {batch}: {RACE_TRIES} tries lost a "
                                          f"race with other writers of the same keys: {e}") from e
            continue
        except (SQLAlchemyError, TypeError, ValueError) as e:
            if fault(e) is Fault.ROW and sink.is_recorded(batch):
                return Stored(recorded=False, results=0)  # a concurrent writer of the batch
            if is_deadlock(e) and not final:
                log.info("upsert-race queue=%s batch=%s try=%d: deadlock", q, batch, n)
                continue
            raise sink._error(f"storing batch {batch} into outputs "
                              f"{', '.join(sink.outputs)} failed", e,
                              "check that each output's table has the columns its results "
                              "carry and that the database user may write it") from e
    raise AssertionError("unreachable")  # the final try raises or returns


def dead_in(sink: Sink, keys: list[str]) -> dict[str, set[str]]:
    """Output name -> the ``keys`` (item keys) dead-lettered in it: what a ``lrq retry-dead``
    batch of a fan-out queue runs again, output by output, so an item stored by an
    aggregating output is not added to it twice."""
    from lrq.db import reader

    wanted = [dead_key(o, k) for o in sink.outputs for k in keys]
    out: dict[str, set[str]] = {o: set() for o in sink.outputs}
    d = sink.dead
    with reader(sink.engine) as conn:
        for at in range(0, len(wanted), SELECT_CHUNK):
            for (k,) in conn.execute(select(d.c.key).where(
                    d.c.queue == sink.queue.name, d.c.key.in_(wanted[at:at + SELECT_CHUNK]))):
                name, _, key = str(k).partition(SEP)
                out.setdefault(name, set()).add(key)
    return out


if TYPE_CHECKING:  # mypy checks the kinds against the interface
    _sql: type[Output] = SqlOutput
    _aggregate: type[Output] = AggregateSqlOutput
