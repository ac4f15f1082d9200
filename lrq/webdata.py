"""What the web page shows beyond ``lrq status``: throughput per minute, failed batches and
dead letters. Read from disk and the ledger per request, like :mod:`lrq.metrics`."""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, literal_column, select
from sqlalchemy.exc import SQLAlchemyError

from lrq.errors import LrqError

if TYPE_CHECKING:
    from lrq.app import App

MINUTES = 60  # the chart's span
FAILED_SHOWN = 50  # failed batches listed per queue (newest first)
DEAD_SHOWN = 50  # dead letters listed per queue
ERROR_CHARS = 2000  # of an error shown


def _minute(dialect: str, column: Any) -> Any:
    """``column`` cut to its minute, as text ``YYYY-MM-DD HH:MM`` on every dialect."""
    if dialect == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M", column)
    if dialect == "postgresql":
        return func.to_char(column, "YYYY-MM-DD HH24:MI")
    return func.date_format(column, literal_column("'%Y-%m-%d %H:%i'"))


def _as_datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def throughput(app: App) -> dict[str, Any]:
    """Batches and items committed per minute over the last :data:`MINUTES`, per queue:
    ``{"minutes": ["YYYY-MM-DD HH:MM", ...], "queues": {name: {"batches": [...],
    "items": [...]}}}`` (oldest minute first; the database's clock, as ``finished_at``).
    One ``GROUP BY`` over the ledger rows of the last hour."""
    names = list(app.cfg.queues)
    try:
        sink = app.sink(app.queues()[0])
        led = sink.ledger
        minute = _minute(sink.engine.dialect.name, led.c.finished_at).label("minute")
        with sink.engine.connect() as conn:
            now = _as_datetime(conn.execute(select(func.now())).scalar_one()).replace(
                second=0, microsecond=0, tzinfo=None)
            since = now - timedelta(minutes=MINUTES - 1)
            rows = conn.execute(select(led.c.queue, minute, func.count(), func.sum(led.c["items"]))
                                .where(led.c.finished_at >= since, led.c.queue.in_(names))
                                .group_by(led.c.queue, minute)).all()
    except (LrqError, SQLAlchemyError) as e:
        return {"error": str(getattr(e, "orig", None) or e).splitlines()[0]}
    labels = [(since + timedelta(minutes=i)).strftime("%Y-%m-%d %H:%M") for i in range(MINUTES)]
    at = {m: i for i, m in enumerate(labels)}
    out = {n: {"batches": [0] * MINUTES, "items": [0] * MINUTES} for n in names}
    for queue, m, batches, items in rows:
        if m in at:
            out[queue]["batches"][at[m]] = int(batches)
            out[queue]["items"][at[m]] = int(items or 0)
    return {"minutes": labels, "queues": out}


def problems(app: App) -> dict[str, Any]:
    """Per queue: the newest failed (and quarantined) batches with their errors, and dead
    letters with theirs; ``{"error": ...}`` for a queue whose dead letters cannot be read."""
    out: dict[str, Any] = {}
    for q in app.queues():
        sp = app.spool(q)
        failed = []
        for at, path in sorted(sp.failed_batches(), reverse=True)[:FAILED_SHOWN]:
            record = sp.read_error(path.stem) or {}
            failed.append({"name": path.stem, "failed_at": at,
                           "quarantined": path.parent == sp.quarantine,
                           "attempt": record.get("attempt"),
                           "error": str(record.get("error", ""))[:ERROR_CHARS]})
        entry: dict[str, Any] = {"failed": failed}
        try:
            entry["dead_letters"] = [
                {"key": d["key"], "batch": d["batch"], "error": str(d["error"])[:ERROR_CHARS],
                 "created_at": d["created_at"]}
                for d in app.sink(q).dead_letters(limit=DEAD_SHOWN)]
        except (LrqError, SQLAlchemyError) as e:
            entry["error"] = str(getattr(e, "orig", None) or e).splitlines()[0]
        out[q.name] = entry
    return out
