"""``kind = "redis-list"`` against a real redis-server: take, keep, put back, acknowledge.

Each test uses a list of its own on the session's server. Waits for in-flight age to build
up are polls on the server's view (``status()["oldest_inflight_s"]``), bounded.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from lrqtest import open_source, poll

from lrq.sources import redis_list as rl

pytestmark = pytest.mark.services
pytest.importorskip("redis")


@pytest.fixture
def name() -> str:
    return f"l-{secrets.token_hex(4)}"


def make(redis_url: str, name: str, data_dir: Path, held: tuple[int, ...] = (),
         **options: Any) -> rl.RedisListSource:
    src: rl.RedisListSource = open_source(
        "redis-list", {"url": redis_url, "list": name, **options}, data_dir, held)
    return src


def push(redis_client: Any, name: str, start: int, stop: int) -> None:
    redis_client.rpush(name, *[json.dumps({"id": i}) for i in range(start, stop)])


def aged(src: rl.RedisListSource, seconds: float) -> bool:
    age = src.status()["oldest_inflight_s"]
    return age is not None and age >= seconds


def test_take_ack_settled(redis_url: str, name: str, redis_client: Any, tmp_path: Path) -> None:
    src = make(redis_url, name, tmp_path)
    assert src.ack_at == "commit" and src.settled()
    push(redis_client, name, 0, 5)
    assert not src.settled()
    got = src.fetch(None, 3)
    assert got.items == [{"id": 0}, {"id": 1}, {"id": 2}] and got.position is None
    assert len(set(got.receipts)) == 3
    assert redis_client.llen(name) == 2 and redis_client.zcard(f"{name}:inflight") == 3
    rest = src.fetch(None, 10)
    assert rest.items == [{"id": 3}, {"id": 4}]
    assert not src.settled(), "in-flight entries are not settled"
    src.ack(got.receipts)
    src.ack(got.receipts)  # idempotent
    assert redis_client.zcard(f"{name}:inflight") == 2 and redis_client.hlen(f"{name}:inflight:entries") == 2
    src.ack(rest.receipts)
    assert src.settled() and src.fetch(None, 10).items == []
    st = src.status()
    assert (st["lag"], st["inflight"], st["oldest_inflight_s"]) == (0, 0, None)
    assert list(st["last_ack"]) == [src.consumer]


def test_put_back_after_timeout_in_order(redis_url: str, name: str, redis_client: Any,
                                         tmp_path: Path) -> None:
    """A node dropped without ack loses nothing: after ``timeout`` its entries go back to the
    list's head in the order they were taken, and another node takes them, not before."""
    push(redis_client, name, 0, 4)
    dead = make(redis_url, name, tmp_path / "a", timeout=0.3)
    assert [i["id"] for i in dead.fetch(None, 3).items] == [0, 1, 2]
    dead.close()
    live = make(redis_url, name, tmp_path / "b", timeout=0.3)
    assert [i["id"] for i in live.fetch(None, 1).items] == [3], "put back before timeout"
    assert poll(lambda: aged(live, 0.3), 10)
    assert live.put_back() == 4
    got = live.fetch(None, 10)
    assert [i["id"] for i in got.items] == [0, 1, 2, 3]
    live.ack(got.receipts)
    assert live.settled()


def test_keep_stops_put_back(redis_url: str, name: str, redis_client: Any, tmp_path: Path) -> None:
    push(redis_client, name, 0, 3)
    holder = make(redis_url, name, tmp_path / "a", timeout=0.3)
    assert holder.keep_every == pytest.approx(0.075)
    got = holder.fetch(None, 10)
    assert poll(lambda: aged(holder, 0.3), 10)
    holder.keep(got.receipts)
    other = make(redis_url, name, tmp_path / "b", timeout=0.3)
    assert other.fetch(None, 10).items == []
    assert redis_client.zcard(f"{name}:inflight") == 3
    holder.ack(got.receipts)
    holder.keep(got.receipts)  # acknowledged: not re-added
    assert holder.settled()


def test_restart_puts_back_its_unpublished_entries_at_once(redis_url: str, name: str,
                                                           redis_client: Any, tmp_path: Path) -> None:
    """A restarted node (same data dir) puts back, before its first take, the entries it took
    and never published, but not those held in its spool nor another node's."""
    push(redis_client, name, 0, 6)
    first = make(redis_url, name, tmp_path / "a")
    got = first.fetch(None, 4)
    other = make(redis_url, name, tmp_path / "b")
    assert [i["id"] for i in other.fetch(None, 1).items] == [4]
    first.close()  # ids 0 and 1 made it into a batch file; 2 and 3 were lost before publish
    again = make(redis_url, name, tmp_path / "a", held=tuple(got.receipts[:2]))
    assert again.consumer == first.consumer
    retaken = again.fetch(None, 10)
    assert [i["id"] for i in retaken.items] == [2, 3, 5]
    assert redis_client.zcard(f"{name}:inflight") == 6  # held 0, 1; the other node's 4; 2, 3, 5
    again.ack(got.receipts[:2] + retaken.receipts)
    assert redis_client.hlen(f"{name}:inflight:owners") == 1  # the other node's
    assert not again.settled()


def test_equal_entries_are_tracked_apart(redis_url: str, name: str, redis_client: Any,
                                         tmp_path: Path) -> None:
    redis_client.rpush(name, '{"id": 1}', '{"id": 1}')
    src = make(redis_url, name, tmp_path, timeout=0.3)
    first = src.fetch(None, 1)
    src.fetch(None, 1)
    src.ack(first.receipts)
    assert poll(lambda: aged(src, 0.3), 10)
    assert src.put_back() == 1, "the second copy is still in flight and comes back"
    assert src.fetch(None, 10).items == [{"id": 1}]


def test_entries_that_are_not_json_objects(redis_url: str, name: str, redis_client: Any,
                                           tmp_path: Path, caplog: Any) -> None:
    redis_client.rpush(name, '{"id": 1}', "plain", "42", b"\xff\xfe", "[1]")
    items = make(redis_url, name, tmp_path).fetch(None, 10).items
    assert items == [{"id": 1}, {"raw": "plain"}, {"raw": "42"}, {"raw": "\\xff\\xfe"},
                     {"raw": "[1]"}]
    assert "redis-list-not-json" in caplog.text
    assert "4 entries are not JSON objects (first: 'plain')" in caplog.text
    redis_client.rpush(name, '{"id": 2}', "7")
    raw = make(redis_url, name, tmp_path / "b", format="raw", pop="right").fetch(None, 10).items
    assert raw == [{"raw": "7"}, {"raw": '{"id": 2}'}]


def test_validation_run_every_entry_once(redis_url: str, name: str, redis_client: Any,
                                         tmp_path: Path) -> None:
    """The related system's check at the source level: 0..N in; every second batch is
    'lost' once (never acknowledged, its taker gone); after put-backs every entry has been
    acknowledged, and each exactly once."""
    n = 200
    push(redis_client, name, 0, n)
    src = make(redis_url, name, tmp_path, timeout=0.2)
    done: list[int] = []
    dropped_once: set[int] = set()
    for _ in range(200):
        got = src.fetch(None, 10)
        if not got.items:
            if src.settled():
                break
            poll(lambda: aged(src, 0.2), 10)
            src.put_back()
            continue
        ids = [i["id"] for i in got.items]
        if ids[0] % 20 == 0 and ids[0] not in dropped_once:
            dropped_once.add(ids[0])  # this batch's node died: no ack
            continue
        done += ids
        src.ack(got.receipts)
    assert sorted(done) == list(range(n))
    assert len(dropped_once) == n // 20
    assert src.settled()
