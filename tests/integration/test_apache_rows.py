"""workers.apache's rows on every backend (SQLite, PostgreSQL, MariaDB): AccessLine rows,
long URLs and non-ASCII agents included, come back as stored, a replay adds nothing, and
window rows keep their nested ``window`` in lrq's generic table."""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from lrq.config import QueueConfig, SourceConfig
from lrq.db import make_engine
from lrq.sink import Sink
from lrq.sources import sql
from workers.apache import parse, status_windows
from workers.apache_sample import sample_lines
from workers.models import AccessLine

EXTRA = [
    '2001:db8:85a3::8a2e:370:7334 - bob [30/Nov/2026:23:59:59 +0000] "GET /s?q=' + "z" * 20_000
    + ' HTTP/1.1" 200 123456789012 "-" "Mozilla/5.0 (ü; 日本語) \\"quoted\\""',
    '10.0.0.1 - - [30/Nov/2026:10:00:00 +0000] "\\x16\\x03\\x01" 400 - "-" "-"',
]


def queue(**kw: Any) -> QueueConfig:
    return QueueConfig(name="access", handler="workers.apache:parse", key="id",
                       source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db",
                                                               table="t")), **kw)


def items() -> list[dict[str, Any]]:
    lines = sample_lines(300, seed=11, bad=0) + EXTRA
    return [{"id": f"2049:{1000 + i}:{i * 200}", "line": s} for i, s in enumerate(lines)]


def test_access_lines_round_trip_and_replays_add_nothing(db_url: str) -> None:
    engine = make_engine(db_url)
    sink = Sink(engine, queue(model="workers.models:AccessLine")).prepare()
    rows = parse(items())
    assert sink.store("b1", items=len(rows), results=rows).recorded
    assert not sink.store("b1", items=len(rows), results=rows).recorded
    with engine.connect() as conn:
        stored = [dict(r) for r in conn.execute(select(AccessLine.__table__)).mappings()]
        assert conn.execute(select(func.count()).select_from(AccessLine.__table__)).scalar_one() == len(rows)
    by_id = {r["id"]: r for r in stored}
    assert {r["id"]: r for r in rows} == by_id
    big = by_id["2049:1300:60000"]
    assert len(big["url"]) > 20_000 and big["size"] == 123456789012 and "日本語" in big["agent"]
    engine.dispose()


def test_window_rows_keep_their_window_in_the_generic_table(db_url: str) -> None:
    engine = make_engine(db_url)
    sink = Sink(engine, queue(result_table="access_windows")).prepare()
    rows = status_windows(60, 10)(items())
    assert sink.store("b1", items=len(rows), results=rows).recorded
    with engine.connect() as conn:
        values = conn.execute(select(sink.table.c.key, sink.table.c.value)).all()
    assert {k: v for k, v in values} == {r["id"]: r for r in rows}
    engine.dispose()
