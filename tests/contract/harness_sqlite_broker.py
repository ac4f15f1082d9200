"""Contract harness: ``kind = "sqlite-broker"``, the stand-in broker in a SQLite file
(acknowledged at commit, shared by processes): the commit-acked crash windows with real
processes, before and beside the real brokers' harnesses."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from lrq.sources import sqlite_broker


class BrokerHarness:
    name = "sqlite-broker"
    ack_at = "commit"
    takeover = {"claim_idle": 1}
    takeover_seconds = 1.0
    named_consumers = True

    def __init__(self) -> None:
        self.path: Path | None = None

    def source_table(self, tmp_path: Path) -> dict[str, Any]:
        self.path = tmp_path / "broker.db"
        sqlite_broker.connect(str(self.path)).close()
        return {"kind": "sqlite-broker", "path": str(self.path)}

    def add(self, items: list[dict[str, Any]]) -> None:
        assert self.path is not None
        sqlite_broker.add(str(self.path), items)

    def unacknowledged(self) -> int:
        assert self.path is not None
        db = sqlite3.connect(self.path)
        try:
            (n,) = db.execute("SELECT count(*) FROM entries WHERE acked = 0").fetchone()
        finally:
            db.close()
        return int(n)

    def close(self) -> None:
        pass


def harness(request: pytest.FixtureRequest) -> BrokerHarness:
    return BrokerHarness()
