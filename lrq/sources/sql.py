"""A SQL table read by keyset paging: ``WHERE order_by > :position ORDER BY order_by``.

Unlike ``OFFSET`` paging filtered by ``NOT IN (results)``, this neither re-sends rows that are
still in flight nor skips rows when results change under it. It assumes ``order_by`` only
grows for new rows (an auto-increment id or an insertion timestamp with a unique tiebreak).
"""
from __future__ import annotations

from typing import Any, Iterator

from sqlalchemy import MetaData, Table, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from lrq.config import SourceConfig
from lrq.db import make_engine
from lrq.errors import ConfigError, SourceError
from lrq.sources import Fetched

_POS = "_lrq_position"


class SqlSource:
    def __init__(self, cfg: SourceConfig, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self.engine = engine or make_engine(cfg.url, what="source url", create=False, writer=False)
        try:
            self.table = Table(cfg.table, MetaData(), autoload_with=self.engine)
        except NoSuchTableError:
            raise ConfigError(f"source table {cfg.table!r} not found in {cfg.url}") from None
        except SQLAlchemyError as e:
            raise SourceError(f"cannot read source {cfg.url}: {e}") from e
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

    def fetch(self, position: Any, limit: int) -> Fetched:
        q = self._select.order_by(self.order).limit(limit)
        if position is not None:
            q = q.where(self.order > position)
        try:
            with self.engine.connect() as conn:
                result = conn.execute(q)
                names = list(result.keys())
                rows = [dict(zip(names, r)) for r in result]  # 3x cheaper than .mappings()
        except SQLAlchemyError as e:
            raise SourceError(f"cannot read source table {self.cfg.table}: {e}") from e
        if not rows:
            return Fetched([], position)
        last = rows[-1][_POS]
        for r in rows:
            del r[_POS]
        return Fetched(rows, last)

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
