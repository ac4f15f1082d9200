"""Contract harness: ``kind = "redis-list"`` on a redis-server of its own (acknowledged at
commit; a fresh list per ``source_table``, entries pushed as JSON objects)."""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from services.redis_server import ServerHarness


class RedisListHarness(ServerHarness):
    name = "redis-list"
    takeover = {"timeout": 1}
    list = ""

    def source_table(self, tmp_path: Path) -> dict[str, Any]:
        self.list = f"jobs-{secrets.token_hex(4)}"
        return {"kind": "redis-list", "url": self.server.url(), "list": self.list}

    def add(self, items: list[dict[str, Any]]) -> None:
        self.client.rpush(self.list, *[json.dumps(i) for i in items])

    def unacknowledged(self) -> int:
        """Entries still in the list plus those in flight (taken, not acknowledged)."""
        return int(self.client.llen(self.list)) + int(self.client.zcard(f"{self.list}:inflight"))


def harness(request: pytest.FixtureRequest) -> RedisListHarness:
    return RedisListHarness()
