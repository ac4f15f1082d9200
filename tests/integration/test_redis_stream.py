"""``kind = "redis-stream"`` against a real redis-server: what is read, kept, acknowledged and
taken over, through the source interface (``Settings.parse`` + ``open``).

Each test uses a stream of its own on the session's server. Waits for idle time to build up
are polls on the server's own view (XPENDING idle), bounded, never sleeps.
"""
from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from lrqtest import open_source, poll

from lrq.errors import SourceError
from lrq.sources import redis_stream as rs

pytestmark = pytest.mark.services
pytest.importorskip("redis")


@pytest.fixture
def stream() -> str:
    return f"s-{secrets.token_hex(4)}"


def make(redis_url: str, stream: str, data_dir: Path, held: tuple[str, ...] = (),
         **options: Any) -> rs.RedisStreamSource:
    src: rs.RedisStreamSource = open_source(  # block 0: no waits in tests
        "redis-stream", {"url": redis_url, "stream": stream, "block": 0, **options}, data_dir, held)
    return src


def add(redis_client: Any, stream: str, n: int, start: int = 0) -> list[str]:
    return [redis_client.xadd(stream, {"id": str(i), "body": f"doc {i}"}).decode()
            for i in range(start, start + n)]


def owners(redis_client: Any, stream: str) -> dict[str, str]:
    """Entry id -> consumer holding it, from XPENDING."""
    return {p["message_id"].decode(): p["consumer"].decode()
            for p in redis_client.xpending_range(stream, "lrq", "-", "+", 1000)}


def idle_over(redis_client: Any, stream: str, ms: int) -> bool:
    pending = redis_client.xpending_range(stream, "lrq", "-", "+", 1000)
    return bool(pending) and all(p["time_since_delivered"] >= ms for p in pending)


def test_fetch_ack_settled(redis_url: str, stream: str, redis_client: Any, tmp_path: Path) -> None:
    src = make(redis_url, stream, tmp_path)
    assert src.ack_at == "commit"
    assert src.settled(), "a new, empty stream is settled"
    ids = add(redis_client, stream, 5)
    assert not src.settled(), "undelivered entries (lag) are not settled"
    got = src.fetch(None, 3)
    assert got.items == [{"id": str(i), "body": f"doc {i}"} for i in range(3)]
    assert got.receipts == ids[:3] and got.position is None
    rest = src.fetch(None, 10)
    assert rest.receipts == ids[3:]
    assert not src.settled(), "delivered, unacknowledged entries are pending"
    src.ack(got.receipts)
    src.ack(got.receipts)  # idempotent
    assert not src.settled()
    src.ack(rest.receipts)
    assert src.settled()
    assert src.fetch(None, 10).items == []
    st = src.status()
    assert (st["lag"], st["pending"], st["length"]) == (0, 0, 5)
    assert src.consumer in st["last_ack"] and src.consumer in st["consumers"]


def test_empty_fetch_waits_at_most_block(redis_url: str, stream: str, tmp_path: Path) -> None:
    src = make(redis_url, stream, tmp_path, block=0.2)
    t = time.monotonic()
    assert src.fetch(None, 100).items == []
    assert 0.15 < time.monotonic() - t < 2.0


def test_a_fetch_right_after_a_full_batch_does_not_wait(redis_url: str, stream: str,
                                                         redis_client: Any, tmp_path: Path) -> None:
    """Only an idle fetch blocks: the one after a batch finds the end of a backlog at once
    (else every run until idle ended `block` late)."""
    add(redis_client, stream, 10)
    src = make(redis_url, stream, tmp_path, block=1.0)
    assert len(src.fetch(None, 10).items) == 10
    t = time.monotonic()
    assert src.fetch(None, 10).items == []
    assert time.monotonic() - t < 0.5
    t = time.monotonic()
    assert src.fetch(None, 10).items == []  # idle now: waits for new entries
    assert time.monotonic() - t > 0.8


def test_items_are_fields_as_text(redis_url: str, stream: str, redis_client: Any,
                                  tmp_path: Path) -> None:
    redis_client.xadd(stream, {"id": "1", "bin": b"ok \xff", "n": 7})
    assert make(redis_url, stream, tmp_path).fetch(None, 10).items == [
        {"id": "1", "bin": "ok \\xff", "n": "7"}]


def test_takeover_of_a_dead_consumer(redis_url: str, stream: str, redis_client: Any,
                                     tmp_path: Path) -> None:
    """A consumer dropped without ack loses nothing: its entries stay pending (not settled),
    and another consumer takes them over once idle longer than claim_idle, not before."""
    ids = add(redis_client, stream, 3)
    dead = make(redis_url, stream, tmp_path / "a", claim_idle=0.3)
    assert dead.fetch(None, 10).receipts == ids
    dead.close()
    live = make(redis_url, stream, tmp_path / "b", claim_idle=0.3)
    assert live.consumer != dead.consumer
    assert live.fetch(None, 10).items == [], "taken over before claim_idle"
    assert not live.settled(), "the dead consumer's entries count as pending"
    assert poll(lambda: idle_over(redis_client, stream, 300), 10)
    got = poll(lambda: live.fetch(None, 10).receipts, 10)
    assert sorted(got) == ids
    assert set(owners(redis_client, stream).values()) == {live.consumer}
    live.ack(got)
    assert live.settled()


def test_keep_stops_takeover(redis_url: str, stream: str, redis_client: Any, tmp_path: Path) -> None:
    ids = add(redis_client, stream, 3)
    holder = make(redis_url, stream, tmp_path / "a", claim_idle=0.3)
    assert holder.keep_every == pytest.approx(0.075)
    assert holder.fetch(None, 10).receipts == ids
    other = make(redis_url, stream, tmp_path / "b", claim_idle=0.3)
    assert poll(lambda: idle_over(redis_client, stream, 300), 10)
    holder.keep(ids)
    assert other.fetch(None, 10).items == []
    assert set(owners(redis_client, stream).values()) == {holder.consumer}
    pending = redis_client.xpending_range(stream, "lrq", "-", "+", 10)
    assert all(p["times_delivered"] == 1 for p in pending), "keep counts no delivery"
    holder.keep(ids[:1])
    holder.ack(ids)
    holder.keep(ids)  # acknowledged: nothing to keep, no error
    assert holder.settled()


def test_restart_rereads_own_pending_skipping_held(redis_url: str, stream: str, redis_client: Any,
                                                   tmp_path: Path) -> None:
    ids = add(redis_client, stream, 5)
    first = make(redis_url, stream, tmp_path)
    assert first.fetch(None, 5).receipts == ids
    first.close()  # ids[:2] made it into a batch file; ids[2:] were lost before publish
    later = add(redis_client, stream, 2, start=5)
    again = make(redis_url, stream, tmp_path, held=tuple(ids[:2]))
    assert again.consumer == first.consumer, "one name per data dir and queue"
    got = again.fetch(None, 2)
    assert got.receipts == ids[2:4]
    assert got.items == [{"id": "2", "body": "doc 2"}, {"id": "3", "body": "doc 3"}]
    assert again.fetch(None, 10).receipts == [ids[4], *later]
    assert again.fetch(None, 10).receipts == []
    again.ack(ids + later)
    assert again.settled()


def test_pending_entry_deleted_from_the_stream(redis_url: str, stream: str, redis_client: Any,
                                               tmp_path: Path, caplog: Any) -> None:
    ids = add(redis_client, stream, 2)
    make(redis_url, stream, tmp_path).fetch(None, 2)
    redis_client.xdel(stream, ids[0])
    again = make(redis_url, stream, tmp_path)
    assert again.fetch(None, 10).receipts == [ids[1]]
    assert "redis-stream-deleted" in caplog.text
    again.ack([ids[1]])
    assert again.settled(), "the deleted entry was acknowledged, not left pending"


def test_stream_deleted_under_the_source(redis_url: str, stream: str, redis_client: Any,
                                         tmp_path: Path) -> None:
    src = make(redis_url, stream, tmp_path)
    redis_client.delete(stream)
    add(redis_client, stream, 1)  # a new stream, no group
    assert [i["id"] for i in src.fetch(None, 10).items] == ["0"]


def test_keys_while_the_stream_holds_every_entry(redis_url: str, stream: str, redis_client: Any,
                                                 tmp_path: Path) -> None:
    add(redis_client, stream, 2500)
    redis_client.xadd(stream, {"other": "x"})
    src = make(redis_url, stream, tmp_path)
    keys = src.keys("id")
    assert keys is not None and list(keys) == [str(i) for i in range(2500)]
    redis_client.xtrim(stream, maxlen=10, approximate=False)
    assert src.keys("id") is None, "a trimmed stream cannot list every key"


def test_an_error_after_a_partial_read_hands_out_what_was_read(
        redis_url: str, stream: str, redis_client: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """Entries already read into this consumer's pending list are returned, not left to wait
    for claim_idle, when a later step of the same fetch fails; with nothing read, it raises."""
    import redis

    ids = add(redis_client, stream, 3)
    make(redis_url, stream, tmp_path).fetch(None, 3)
    again = make(redis_url, stream, tmp_path)

    def gone(*_args: Any, **_kw: Any) -> Any:
        raise redis.ConnectionError("connection lost")

    monkeypatch.setattr(again.client, "xautoclaim", gone)
    assert again.fetch(None, 10).receipts == ids
    with pytest.raises(SourceError, match="cannot read the stream: connection lost"):
        again.fetch(None, 10)
