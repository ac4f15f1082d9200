"""The Redis kinds' config tables and URL redaction (no server; opening is network-free)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lrq.errors import ConfigError
from lrq.redact import redact, scrub, url_secrets
from lrq.sources import KINDS, module
from lrq.sources._redis import default_consumer

STREAM = {"url": "redis://127.0.0.1:6379/0", "stream": "events"}
LIST = {"url": "redis://127.0.0.1:6379/0", "list": "jobs"}


def parse(kind: str, table: dict[str, Any]) -> Any:
    return module(kind).Settings.parse(dict(table), Path("."), "queues.q.source")


def test_registered() -> None:
    assert KINDS["redis-stream"] == "lrq.sources.redis_stream"
    assert KINDS["redis-list"] == "lrq.sources.redis_list"


def test_defaults() -> None:
    s = parse("redis-stream", {**STREAM, "claim_idle": "2m"})
    assert (s.group, s.consumer, s.claim_idle, s.block, s.socket_timeout) == \
        ("lrq", None, 120.0, 0.5, 5.0)
    li = parse("redis-list", {**LIST, "timeout": "1m", "options": {"client_name": "lrq"}})
    assert (li.inflight, li.timeout, li.pop, li.format) == ("jobs:inflight", 60.0, "left", "json")
    assert li.options == (("client_name", "lrq"),)


@pytest.mark.parametrize("kind, table, message", [
    ("redis-stream", {**STREAM, "stream": ""}, "missing 'stream'"),
    ("redis-stream", {**STREAM, "claim_idle": "soon"}, "claim_idle: 'soon' is not a duration"),
    ("redis-stream", {**STREAM, "claim_idle": 0}, "claim_idle: must be more than 0"),
    ("redis-stream", {**STREAM, "block": 30}, "block: 30 s is out of range"),
    ("redis-stream", {**STREAM, "consumer": ""}, "consumer: empty"),
    ("redis-stream", {**STREAM, "group": 3}, "group: expected str, got 3"),
    ("redis-stream", {**STREAM, "topic": "x"}, "unknown key 'topic'"),
    ("redis-stream", {"stream": "e"}, "missing 'url'"),
    ("redis-list", {**LIST, "url": "postgresql://u:pw@h/db"}, "is not a Redis URL"),
    ("redis-list", {**LIST, "url": "redis://h:port/0"}, "is not a URL"),
    ("redis-list", {**LIST, "pop": "middle"}, 'pop: \'middle\'; write "left" or "right"'),
    ("redis-list", {**LIST, "format": "xml"}, "format: 'xml'"),
    ("redis-list", {**LIST, "inflight": "jobs"}, "inflight: must differ"),
    ("redis-list", {**LIST, "options": {"socket_timeout": 1}}, "'socket_timeout' is set by lrq"),
])
def test_bad_tables(kind: str, table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(kind, table)
    assert message in str(e.value)
    assert str(e.value).startswith("queues.q.source")
    assert "pw@" not in str(e.value)


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://user:p%40ss@h:6380/1", "rediss://user:***@h:6380/1"),
    ("redis://h:6379/0?password=pw&db=1", "redis://h:6379/0?password=***&db=1"),
    ("redis://user@h/0", "redis://user@h/0"),
    ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_scrub_decoded_password() -> None:
    assert scrub("auth p@ss failed, p%40ss", url_secrets("redis://u:p%40ss@h/0")) == \
        "auth *** failed, ***"


def test_default_consumer_per_data_dir_and_queue(tmp_path: Path) -> None:
    a = default_consumer(tmp_path / "a", "q")
    assert a == default_consumer(tmp_path / "a", "q")
    assert a != default_consumer(tmp_path / "b", "q") != default_consumer(tmp_path / "a", "r")
