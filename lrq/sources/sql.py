"""``kind = "sql"``: a SQL table read by keyset paging: ``WHERE order_by > :position ORDER BY
order_by``. Acknowledged at publish (the position saved once the batch file is durable).

Unlike ``OFFSET`` paging filtered by ``NOT IN (results)``, this neither re-sends rows that are
still in flight nor skips rows when results change under it. It assumes ``order_by`` only
grows for new rows (an auto-increment id or an insertion timestamp with a unique tiebreak).
"""
from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, Table, bindparam, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from lrq.config import absolute_sqlite, check_url, required, take
from lrq.db import make_engine
from lrq.errors import ConfigError, SourceError
from lrq.redact import redact
from lrq.sources import AckAt, Context, Fetched

_POS = "_lrq_position"
#: How long after a SQLite file's last write its stats may still miss a write (the mtime's
#: clock tick): :meth:`SqlSource.changed` answers "maybe changed" until then.
SETTLE_NS = 20_000_000


@dataclass(frozen=True)
class Settings:
    """The ``[queues.X.source]`` table of ``kind = "sql"``."""

    url: str = ""
    table: str = ""
    order_by: str = "id"
    #: Column names, or a table ``{item_field = "column"}``; empty means every column.
    columns: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        """Check the options (``kind`` already removed); a relative SQLite path is made
        absolute against ``base``, the config file's folder."""
        take(table, {"url": str, "table": str, "order_by": str, "columns": (list, dict)}, where,
             kind="sql")
        url = required(table, "url", where, "sqlite:///source.db")
        name = required(table, "table", where, "documents")
        cols = table.get("columns", [])
        if isinstance(cols, list):
            pairs = tuple((str(c), str(c)) for c in cols)
        else:
            pairs = tuple((str(k), str(v)) for k, v in cols.items())
        url = absolute_sqlite(check_url(url, f"{where}.url"), base)
        return cls(url=url, table=name, order_by=table.get("order_by", "id"),
                   columns=pairs)


def open(settings: Settings, context: Context | None = None) -> SqlSource:  # noqa: A001
    """The kind's entry point for :func:`lrq.sources.build` (``context`` is not needed: a
    table is re-readable, nothing is held)."""
    return SqlSource(settings)


class SqlSource:
    ack_at: AckAt = "publish"

    def __init__(self, cfg: Settings, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self.engine = engine or make_engine(cfg.url, what="source url", create=False, writer=False)
        try:
            self.table = Table(cfg.table, MetaData(), autoload_with=self.engine)
        except NoSuchTableError:
            raise ConfigError(f"source table {cfg.table!r} not found in {redact(cfg.url)}") from None
        except SQLAlchemyError as e:
            raise SourceError(f"cannot read source {redact(cfg.url)}: {e}") from e
        cols = self.table.c
        pairs = cfg.columns or tuple((c.name, c.name) for c in cols)
        for _, column in (*pairs, ("", cfg.order_by)):
            if column not in cols:
                raise ConfigError(
                    f"source table {cfg.table!r} has no column {column!r} "
                    f"(columns: {', '.join(c.name for c in cols)})"
                )
        self.fields = {field: cols[column] for field, column in pairs}
        self.order = cols[cfg.order_by]
        self._select = select(*(c.label(f) for f, c in self.fields.items()), self.order.label(_POS))
        self._names = [*self.fields, _POS]
        self._raw = self._raw_queries()
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        #: A SQLite source's file and its WAL, whose stats :meth:`changed` reads.
        self._files = ((database, f"{database}-wal")
                       if database and database != ":memory:" and not database.startswith("file:")
                       else None)

    def changed(self) -> tuple[int, ...] | None:
        """A token for a sniffer waiting on a drained table (:mod:`lrq.sniffer`): equal to an
        earlier one only if no row can have been written in between. For a SQLite file, the
        mtime, size and inode of the file and its WAL (two stats; a commit grows or rewrites
        the WAL); while the last write is under ``SETTLE_NS`` old, a write in the same
        clock tick would leave the mtime as it was, so the token is then new at every look.
        None for other databases: the sniffer fetches at its interval."""
        if self._files is None:
            return None
        token: list[int] = []
        for path in self._files:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                token += (0, 0, 0)
                continue
            token += (st.st_mtime_ns, st.st_size, st.st_ino)
        if time.time_ns() - max(token[0::3]) < SETTLE_NS:
            token.append(time.monotonic_ns())
        return tuple(token)

    def _raw_queries(self) -> tuple[str, str] | None:
        """For SQLite, the two page queries as SQL text for the driver's own cursor, when no
        column needs SQLAlchemy's type conversion: the rows then come back as the driver
        gives them, which costs a third of a SQLAlchemy result (half the sniffer's time).
        Other databases, and columns such as DATETIME or NUMERIC, take the general path."""
        dialect = self.engine.dialect
        if dialect.name != "sqlite" or dialect.paramstyle != "qmark":
            return None
        columns = [*self.fields.values(), self.order]
        if any(c.type.result_processor(dialect, None) is not None for c in columns) or \
                self.order.type.bind_processor(dialect) is not None:
            return None
        first = self._select.order_by(self.order)
        after = self._select.where(self.order > bindparam("after")).order_by(self.order)
        return (f"{first.compile(dialect=dialect)} LIMIT ?",
                f"{after.compile(dialect=dialect)} LIMIT ?")

    def fetch(self, position: Any, limit: int) -> Fetched:
        try:
            with self.engine.connect() as conn:
                if self._raw is not None:
                    rows = self._fetch_raw(conn, position, limit)
                else:
                    q = self._select.order_by(self.order).limit(limit)
                    if position is not None:
                        q = q.where(self.order > position)
                    rows = [dict(zip(self._names, r)) for r in conn.execute(q)]
        except (SQLAlchemyError, sqlite3.Error) as e:  # sqlite3: the raw path's driver
            raise SourceError(f"cannot read source table {self.cfg.table}: {e}") from e
        if not rows:
            return Fetched([], position)
        last = rows[-1][_POS]
        for r in rows:
            del r[_POS]
        return Fetched(rows, last)

    def _fetch_raw(self, conn: Any, position: Any, limit: int) -> list[dict[str, Any]]:
        assert self._raw is not None
        cur = conn.connection.dbapi_connection.cursor()
        try:
            if position is None:
                cur.execute(self._raw[0], (limit,))
            else:
                cur.execute(self._raw[1], (position, limit))
            names = self._names
            return [dict(zip(names, r)) for r in cur.fetchall()]
        finally:
            cur.close()

    def ack(self, receipts: Sequence[Any]) -> None:
        """Never called: a table is acknowledged at publish, by the saved position."""

    def keep(self, receipts: Sequence[Any]) -> None:
        """Nothing is held in a table."""

    def settled(self) -> bool:
        """Re-readable: settled once a fetch came back short (the sniffer's ``drained``)."""
        return True

    def status(self) -> dict[str, Any]:
        return {}

    def remaining(self, position: Any) -> int:
        """Rows past ``position`` (every row for None): what the sniffer has yet to read, for
        ``lrq status``'s ETA and the progress of ``lrq sniff`` and ``lrq verify``. One
        ``count(*)`` over the ``order_by`` range (its index, where it has one)."""
        q = select(func.count()).select_from(self.table)
        if position is not None:
            q = q.where(self.order > position)
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(q).scalar_one())
        except SQLAlchemyError as e:
            raise SourceError(f"cannot count rows of source table {self.cfg.table}: {e}") from e

    def item_fields(self) -> list[str]:
        """The ``columns`` mapping's fields, else every column (reflected when built)."""
        return list(self.fields)

    def keys(self, key: str) -> Iterator[str]:
        if key not in self.fields:
            raise ConfigError(f"queue key {key!r} is not a field of source {self.cfg.table!r} "
                              f"(fields: {', '.join(self.fields)})")
        with self.engine.connect() as conn:
            for (value,) in conn.execution_options(yield_per=10_000).execute(
                    select(self.fields[key])):
                yield str(value)

    def close(self) -> None:
        self.engine.dispose()
