"""Contract harness: ``kind = "sql"``, a SQLite table (acknowledged at publish)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest


class SqlHarness:
    name = "sql"
    ack_at = "publish"
    takeover = None
    takeover_seconds = 0.0
    named_consumers = False

    def __init__(self) -> None:
        self.path: Path | None = None
        self.data: Path | None = None

    def source_table(self, tmp_path: Path) -> dict[str, Any]:
        self.path = tmp_path / "source.db"
        self.data = tmp_path  # lrq's data dirs live below: the saved positions
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, doc_id TEXT, content TEXT)")
        db.commit()
        db.close()
        return {"kind": "sql", "url": f"sqlite:///{self.path}", "table": "items", "order_by": "id"}

    def add(self, items: list[dict[str, Any]]) -> None:
        assert self.path is not None
        db = sqlite3.connect(self.path)
        db.executemany("INSERT INTO items (id, doc_id, content) VALUES (?, ?, ?)",
                       [(i["id"], i["doc_id"], i["content"]) for i in items])
        db.commit()
        db.close()

    def unacknowledged(self) -> int:
        """Rows after the highest position any data dir below saved."""
        assert self.path is not None and self.data is not None
        saved = [json.loads(p.read_text())["position"] or 0
                 for p in self.data.rglob("position.json")]
        db = sqlite3.connect(self.path)
        try:
            (n,) = db.execute("SELECT count(*) FROM items WHERE id > ?",
                              (max(saved, default=0),)).fetchone()
        finally:
            db.close()
        return int(n)

    def close(self) -> None:
        pass


def harness(request: pytest.FixtureRequest) -> SqlHarness:
    return SqlHarness()
