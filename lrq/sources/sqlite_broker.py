"""``kind = "sqlite-broker"``: a consumer group in one SQLite file, acknowledged at commit.

A stand-in broker with a Redis Stream consumer group's semantics, in a file every process
on the machine can open: the contract suite (tests/contract) runs its crash windows of a
source acknowledged at commit against it with real processes, before and beside the real
brokers. Not for production: one file, one machine, no network (use ``redis-stream`` or
``kafka`` to scale out).

Table ``entries(id, body, consumer, taken, acked)``: ``body`` a JSON object (the item),
``consumer`` NULL until an entry is handed out (then it is *pending* for that consumer
until acknowledged), ``taken`` when it was handed out or last kept. A fetch hands out, in
one write transaction: first this consumer's own pending entries that are not in
``context.held`` (once per process: a restarted node re-reads what it fetched and never
stored), then entries pending for another consumer longer than ``claim_idle`` (a dead
node's), then new ones. ``ack`` sets ``acked``; ``keep`` refreshes ``taken``.

```toml
[queues.events.source]
kind       = "sqlite-broker"
path       = "broker.db"     # relative to the config file's folder
claim_idle = "60s"
# consumer = "..."           # default: a short hash of the data dir
```
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrq.config import parse_duration, positive, required, take
from lrq.errors import SourceError
from lrq.sources import AckAt, Context, Fetched

SCHEMA = ("CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, body TEXT NOT NULL, "
          "consumer TEXT, taken REAL, acked INTEGER NOT NULL DEFAULT 0)")
#: Seconds a statement waits for another process's write lock before it fails.
BUSY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Settings:
    path: str
    claim_idle: float = 60.0
    consumer: str | None = None

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        take(table, {"path": str, "claim_idle": (int, float, str), "consumer": str}, where,
             kind="sqlite-broker")
        path = required(table, "path", where, "broker.db")
        idle = positive(parse_duration(table.get("claim_idle", 60.0), f"{where}.claim_idle"),
                        f"{where}.claim_idle")
        return cls(path=str(base / path), claim_idle=idle,
                   consumer=table.get("consumer"))


def open(settings: Settings, context: Context) -> SqliteBroker:  # noqa: A001
    return SqliteBroker(settings, context)


def connect(path: str) -> sqlite3.Connection:
    """The broker file, created with its table if missing (autocommit: transactions are
    explicit ``BEGIN IMMEDIATE``)."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(SCHEMA)
    return db


def add(path: str, items: list[dict[str, Any]]) -> None:
    """Append entries (what a producer does)."""
    db = connect(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO entries (body) VALUES (?)",
                       [(json.dumps(i),) for i in items])
        db.execute("COMMIT")
    finally:
        db.close()


class SqliteBroker:
    ack_at: AckAt = "commit"

    def __init__(self, settings: Settings, context: Context) -> None:
        self.settings = settings
        self.consumer = settings.consumer or \
            "node-" + hashlib.sha256(str(context.data_dir).encode()).hexdigest()[:8]
        self.keep_every = settings.claim_idle / 4
        self._held = context.held  # read at the first fetch (a restart's own pending)
        #: Our own pending entries still to hand out again (listed at the first fetch).
        self._redo: list[int] | None = None
        self.last_ack: float | None = None
        try:
            self.db = connect(settings.path)
        except sqlite3.Error as e:
            raise SourceError(f"cannot open broker file {settings.path}: {e}") from e

    def fetch(self, position: Any, limit: int) -> Fetched:
        try:
            return self._fetch(limit)
        except sqlite3.Error as e:
            raise SourceError(f"cannot read broker file {self.settings.path}: {e}") from e

    def _fetch(self, limit: int) -> Fetched:
        db, me, now = self.db, self.consumer, time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._redo is None:  # our own pending entries, minus those in our batch files
                held = set(self._held)
                self._redo = [i for (i,) in db.execute(
                    "SELECT id FROM entries WHERE consumer = ? AND acked = 0 ORDER BY id",
                    (me,)) if i not in held]
            ids, self._redo = self._redo[:limit], self._redo[limit:]
            rows: list[tuple[int, str]] = [r for i in ids for r in db.execute(
                "SELECT id, body FROM entries WHERE id = ? AND consumer = ? AND acked = 0",
                (i, me))]
            rows += db.execute(
                "SELECT id, body FROM entries WHERE acked = 0 AND consumer IS NOT NULL AND "
                "consumer != ? AND taken < ? ORDER BY id LIMIT ?",
                (me, now - self.settings.claim_idle, limit - len(rows))).fetchall()
            rows += db.execute("SELECT id, body FROM entries WHERE consumer IS NULL "
                               "ORDER BY id LIMIT ?", (limit - len(rows),)).fetchall()
            db.executemany("UPDATE entries SET consumer = ?, taken = ? WHERE id = ?",
                           [(me, now, r[0]) for r in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Fetched([json.loads(b) for _, b in rows], None, [i for i, _ in rows])

    def ack(self, receipts: Sequence[Any]) -> None:
        self._update("UPDATE entries SET acked = 1 WHERE id = ?", [(r,) for r in receipts])
        self.last_ack = time.time()

    def keep(self, receipts: Sequence[Any]) -> None:
        self._update("UPDATE entries SET taken = ? WHERE id = ? AND consumer = ? AND acked = 0",
                     [(time.time(), r, self.consumer) for r in receipts])

    def _update(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(sql, rows)
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise SourceError(f"cannot write broker file {self.settings.path}: {e}") from e

    def settled(self) -> bool:
        return self.status()["unacknowledged"] == 0

    def keys(self, key: str) -> None:
        return None

    def item_fields(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        try:
            lag, = self.db.execute(
                "SELECT count(*) FROM entries WHERE consumer IS NULL").fetchone()
            per = dict(self.db.execute("SELECT consumer, count(*) FROM entries WHERE acked = 0 "
                                       "AND consumer IS NOT NULL GROUP BY consumer").fetchall())
        except sqlite3.Error as e:
            raise SourceError(f"cannot read broker file {self.settings.path}: {e}") from e
        return {"consumer": self.consumer, "lag": lag, "pending": sum(per.values()),
                "pending_per_consumer": per, "unacknowledged": lag + sum(per.values()),
                "last_ack": self.last_ack}

    def close(self) -> None:
        self.db.close()
