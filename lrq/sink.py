"""The sink: results, dead letters and the batch ledger row that makes a batch *done*, in one
transaction.

Result rows are unique by ``(queue, key)`` (generic table) or by the model's key column, and
are inserted with the dialect's on-conflict form, so replaying a batch, or a batch holding
items another batch already stored, adds nothing. The ledger's primary key
``(queue, name)`` lets exactly one transaction record a batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime
from typing import Any, Collection, Iterator

from sqlalchemy import (JSON, BigInteger, Column, DateTime, Integer, MetaData, String, Table,
                        Text, UniqueConstraint, delete, func, inspect, select)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from lrq import failpoints
from lrq.config import QueueConfig, load_object
from lrq.db import dumps_json, insert_ignore, reader
from lrq.errors import ConfigError, HandlerError, SinkError

log = logging.getLogger(__name__)

LEDGER = "lrq_batches"
GENERIC_FIELDS = ("queue", "key", "batch", "value")
DEAD = "lrq_dead_letters"
#: Keys per ``DELETE ... IN`` when a retried batch replaces its dead letters.
DELETE_CHUNK = 1000


def ledger_table(metadata: MetaData) -> Table:
    return Table(
        LEDGER, metadata,
        Column("queue", String(64), primary_key=True),
        Column("name", String(64), primary_key=True),
        Column("items", Integer, nullable=False),
        Column("results", Integer, nullable=False),
        Column("dead", Integer, nullable=False, default=0),
        Column("attempt", Integer, nullable=False, default=1),
        Column("finished_at", DateTime, nullable=False, server_default=func.now()),
    )


def _keyed_table(metadata: MetaData, name: str, *payload: Column, index_created: bool = False) -> Table:
    """Rows unique by ``(queue, key)``, so a replay adds nothing: results and dead letters."""
    return Table(
        name, metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
               autoincrement=True),
        Column("queue", String(64), nullable=False),
        Column("key", String(255), nullable=False),
        Column("batch", String(64), nullable=False),
        *payload,
        Column("created_at", DateTime, nullable=False, server_default=func.now(),
               index=index_created),
        UniqueConstraint("queue", "key", name=f"uq_{name}_queue_key"),
    )


def dead_letter_table(metadata: MetaData) -> Table:
    """Items the handler failed on after retries, one row per (queue, key), with the error."""
    return _keyed_table(metadata, DEAD, Column("error", Text, nullable=False),
                        Column("item", JSON, nullable=False))


def generic_table(metadata: MetaData, name: str) -> Table:
    """Results as JSON values, for queues without a model of their own."""
    return _keyed_table(metadata, name, Column("value", JSON, nullable=False), index_created=True)


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
    """Where one queue's results go."""

    def __init__(self, engine: Engine, queue: QueueConfig, base: Path | None = None) -> None:
        self.engine = engine
        self.queue = queue
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
            if not _is_unique(table, self.key):
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
        if self.generic:
            # lrq's own table has a known shape (three strings and JSON), so its rows skip
            # SQLAlchemy's per-row processing: the statement is compiled once and sent to
            # the driver's executemany with the JSON already encoded. User models keep the
            # typed path.
            compiled = self._insert.compile(dialect=engine.dialect, for_executemany=True,
                                            column_keys=list(GENERIC_FIELDS))
            self._bulk_sql = compiled.string
            self._bulk_positional = compiled.positional
            if compiled.positional and list(compiled.positiontup or ()) != list(GENERIC_FIELDS):
                raise SinkError(f"unexpected parameter order {compiled.positiontup} for "
                                f"{self.table.name} on {engine.dialect.name}")

    def prepare(self) -> "Sink":
        """Create the ledger, dead-letter and results tables if they are missing. Safe when
        several processes start at once: losing the race to create a table is fine."""
        for table in (self.ledger, self.dead, self.table):
            try:
                table.create(self.engine, checkfirst=True)
            except SQLAlchemyError as e:
                try:
                    if inspect(self.engine).has_table(table.name):
                        continue  # another process created it between the check and the create
                except OperationalError as again:
                    raise SinkError(f"cannot reach results database {self.engine.url!r}: "
                                    f"{again.orig}") from again
                raise SinkError(f"cannot create table {table.name} in {self.engine.url!r}: "
                                f"{getattr(e, 'orig', None) or e}") from e
        return self

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
        extra = set().union(*(r.keys() for r in results)) - self._columns if results else set()
        if extra:
            raise HandlerError(f"results have fields {sorted(extra)} that model "
                               f"{self.queue.model} has no columns for")
        if any(r.get(self.key) is None for r in results):
            raise HandlerError(f"a result has no {self.key!r} (the key column of {self.queue.model})")
        return results

    def store(self, batch: str, items: int, results: list[dict[str, Any]], attempt: int = 1, *,
              dead: list[tuple[dict[str, Any], str]] = (), replace_dead: bool = False) -> Stored:
        """Commit results, dead letters ``(item, error)`` and the ledger row together; a batch
        already in the ledger is left as is. ``replace_dead`` (a ``lrq retry-dead`` batch):
        the same transaction first deletes the earlier dead letters of the batch's keys, so
        a retried item ends with its result or its new dead letter, never both or neither."""
        rows = self.rows(batch, results)
        # Encoded before the transaction: on SQLite it holds the write lock, which the other
        # workers wait for (1 ms of JSON per 1000 results).
        bulk = self._bulk_params(rows) if self.generic and rows else None
        dead_rows = [{"queue": self.queue.name, "key": str(item.get(self.key)), "batch": batch,
                      "error": error, "item": item} for item, error in dead]
        try:
            with self.engine.begin() as conn:
                if conn.execute(select(self.ledger.c.name).where(
                        self.ledger.c.queue == self.queue.name,
                        self.ledger.c.name == batch)).first() is not None:
                    return Stored(recorded=False, results=0)
                conn.execute(self.ledger.insert().values(
                    queue=self.queue.name, name=batch, items=items, results=len(rows),
                    dead=len(dead_rows), attempt=attempt))
                if replace_dead:
                    self._delete_dead(conn, rows, dead_rows)
                if bulk is not None:
                    conn.exec_driver_sql(self._bulk_sql, bulk)
                else:
                    for group in _same_fields(rows):
                        conn.execute(self._insert, group)
                if dead_rows:
                    conn.execute(self._insert_dead, dead_rows)
                failpoints.hit("during-txn")
        except IntegrityError as e:
            if self.is_recorded(batch):
                return Stored(recorded=False, results=0)
            raise SinkError(f"storing batch {batch} into {self.table.name} failed: {e.orig}") from e
        except SQLAlchemyError as e:
            raise SinkError(f"storing batch {batch} into {self.table.name} failed: "
                            f"{getattr(e, 'orig', None) or e}") from e
        return Stored(recorded=True, results=len(rows), dead=len(dead_rows))

    def _delete_dead(self, conn: Connection, rows: list[dict[str, Any]],
                     dead_rows: list[dict[str, Any]]) -> None:
        field = "key" if self.generic else self.key
        keys = sorted({str(r[field]) for r in rows} | {r["key"] for r in dead_rows})
        for i in range(0, len(keys), DELETE_CHUNK):
            conn.execute(delete(self.dead).where(self.dead.c.queue == self.queue.name,
                                                 self.dead.c.key.in_(keys[i:i + DELETE_CHUNK])))

    def _bulk_params(self, rows: list[dict[str, Any]]) -> list[Any]:
        if self._bulk_positional:
            return [(r["queue"], r["key"], r["batch"], dumps_json(r["value"])) for r in rows]
        return [{**r, "value": dumps_json(r["value"])} for r in rows]

    def _key_column(self) -> Any:
        return self.table.c.key if self.generic else self.table.c[self.key]

    def _scoped(self, q: Any) -> Any:
        return q.where(self.table.c.queue == self.queue.name) if self.generic else q

    def keys(self) -> Iterator[str]:
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
        col = self._key_column()
        q = self._scoped(select(col)).group_by(col).having(func.count() > 1)
        with reader(self.engine) as conn:
            return len(conn.execute(q).all())

    def count(self) -> int:
        with reader(self.engine) as conn:
            return conn.execute(self._scoped(select(func.count()).select_from(self.table))).scalar_one()

    def ledger_stats(self) -> tuple[int, int]:
        """(batches recorded, items recorded) for this queue."""
        q = select(func.count(), func.coalesce(func.sum(self.ledger.c["items"]), 0)).where(
            self.ledger.c.queue == self.queue.name)
        with reader(self.engine) as conn:
            n, items = conn.execute(q).one()
        return int(n), int(items)

    def dead_count(self, keys: Collection[str] | None = None) -> int:
        q = select(func.count()).select_from(self.dead).where(self.dead.c.queue == self.queue.name)
        if keys is not None:
            q = q.where(self.dead.c.key.in_(sorted(keys)))
        with reader(self.engine) as conn:
            return int(conn.execute(q).scalar_one())


def _same_fields(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by their set of fields: an executemany takes its columns from the first
    row, so mixing shapes would drop fields silently or fail the batch."""
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(frozenset(r), []).append(r)
    return list(groups.values())


def _is_unique(table: Table, column: str) -> bool:
    col = table.c[column]
    if col.unique or (col.primary_key and len(table.primary_key.columns) == 1):
        return True
    for c in table.constraints:
        if isinstance(c, UniqueConstraint) and [x.name for x in c.columns] == [column]:
            return True
    return any(ix.unique and [x.name for x in ix.columns] == [column] for ix in table.indexes)
