"""Contract harness: ``kind = "redis-stream"`` on a redis-server of its own (acknowledged at
commit; a fresh stream per ``source_table``, one consumer per lrq data dir)."""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from services.redis_server import ServerHarness


class RedisStreamHarness(ServerHarness):
    name = "redis-stream"
    takeover = {"claim_idle": 1}
    stream = ""

    def source_table(self, tmp_path: Path) -> dict[str, Any]:
        self.stream = f"events-{secrets.token_hex(4)}"
        return {"kind": "redis-stream", "url": self.server.url(), "stream": self.stream,
                "group": "lrq", "block": 0.1}

    def add(self, items: list[dict[str, Any]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.xadd(self.stream, {k: str(v) for k, v in item.items()})
        pipe.execute()

    def unacknowledged(self) -> int:
        """Entries not yet delivered to the group (all of them before it exists) plus those
        pending for any consumer."""
        import redis

        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return 0
        group = next((g for g in groups if g["name"] in (b"lrq", "lrq")), None)
        if group is None:
            return int(self.client.xlen(self.stream))
        return int(group["lag"] or 0) + int(group["pending"])


def harness(request: pytest.FixtureRequest) -> RedisStreamHarness:
    return RedisStreamHarness()
