"""lrq's tables in the results database: the batch ledger, the dead letters, and the
generic results table (queues with a model of their own bring their table). :class:`lrq.sink.Sink`
creates them, and adds to a ledger an older lrq made what it lacks (``Sink.prepare``)."""
from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)

LEDGER = "lrq_batches"
#: The ledger columns a commit writes, in its compiled insert's parameter order.
LEDGER_FIELDS = ("queue", "name", "items", "results", "dead", "attempt", "seconds")
LEDGER_RECENT = "ix_lrq_batches_recent"  # (queue, finished_at): see ledger_table
DEAD = "lrq_dead_letters"
GENERIC_FIELDS = ("queue", "key", "batch", "value")


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
        # The batch's handler time (seconds, the worker's clock): the metrics' histogram.
        # Nullable: rows of ledgers older than the column, and batches only finalized, have
        # none. Added to an existing ledger by :meth:`Sink.prepare`.
        Column("seconds", Double, nullable=True),
        # The rates (lrq status, the web page) and the metrics read a queue's recent rows: a
        # range scan here, not a scan of a ledger that grows by a row a batch for weeks
        # (101k rows: 139 ms -> 3 ms for the rates' query on SQLite). Added to an existing
        # ledger by :meth:`Sink.prepare`.
        Index(LEDGER_RECENT, "queue", "finished_at"),
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


def values_form(sql: str) -> tuple[str, str, str] | None:
    """``sql`` (a one-row ``INSERT ... VALUES (?, ...) ...``) cut around its row of
    parameters: (head, row, tail), so one statement can carry many rows; None when it does
    not have that shape (then executemany is used)."""
    head, values, rest = sql.partition(" VALUES ")
    group, close, tail = rest.partition(")")
    if not values or not close or not group.startswith("(") or set(group[1:]) - set("?, "):
        return None
    return f"{head} VALUES ", f"{group})", tail


def is_unique(table: Table, column: str) -> bool:
    col = table.c[column]
    if col.unique or (col.primary_key and len(table.primary_key.columns) == 1):
        return True
    for c in table.constraints:
        if isinstance(c, UniqueConstraint) and [x.name for x in c.columns] == [column]:
            return True
    return any(ix.unique and [x.name for x in ix.columns] == [column] for ix in table.indexes)
