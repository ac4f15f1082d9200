"""Contract harness: ``kind = "redis-list"`` on a redis-server of its own (acknowledged at
commit; a fresh list per ``source_table``, entries pushed as JSON objects)."""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from harness import missing
from services.redis_server import RedisServer, find_redis_server, start_redis, stop_redis


class RedisListHarness:
    name = "redis-list"
    ack_at = "commit"
    takeover = {"timeout": 1}

    def __init__(self) -> None:
        if find_redis_server() is None:
            missing("redis-server not found")
        import redis

        self.server: RedisServer = start_redis()
        self.client = redis.Redis.from_url(self.server.url(), socket_timeout=10)
        self.list = ""

    def source_table(self, tmp_path: Path) -> dict[str, Any]:
        self.list = f"jobs-{secrets.token_hex(4)}"
        return {"kind": "redis-list", "url": self.server.url(), "list": self.list}

    def add(self, items: list[dict[str, Any]]) -> None:
        self.client.rpush(self.list, *[json.dumps(i) for i in items])

    def unacknowledged(self) -> int:
        """Entries still in the list plus those in flight (taken, not acknowledged)."""
        return int(self.client.llen(self.list)) + int(self.client.zcard(f"{self.list}:inflight"))

    def close(self) -> None:
        self.client.close()
        stop_redis(self.server)


def harness() -> RedisListHarness:
    return RedisListHarness()
