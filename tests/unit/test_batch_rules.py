"""Batch rules (lrq.batching): batch_size, batch_max_bytes, separate and batch_linger cut
what the sniffer fetched into batch files, with every item exactly once and in order, the
position saved only once a fetch's last piece is in left/, and receipts sliced with items."""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import pytest
from lrqtest import load_app, write_config

from lrq import batching
from lrq.batching import Rules, item_size
from lrq.errors import ConfigError
from lrq.sniffer import Sniffer
from lrq.sources import Fetched
from lrq.spool import SUFFIX, Spool, files
from lrq.testing import MemoryBroker, MemorySource
from workers.storage import apart


class Clock:
    """A stepped clock: tests move it, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, source: Any, clock: Clock | None = None, **keys: Any) -> Sniffer:
    """A sniffer on queue "docs" with these queue keys, its rules from the config file."""
    app = load_app(write_config(tmp_path / "cfg", docs=None, **{"max_pending": 10**6, **keys}))
    q = app.queues("docs")[0]
    spool = Spool(tmp_path / "data", "docs").ensure()
    return Sniffer(q, spool, source, clock=clock or Clock(), rules=Rules.of(q, app.base))


def record_publishes(sn: Sniffer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the batches ``sn`` publishes, in publish order."""
    names: list[str] = []
    publish = sn.spool.publish

    def spy(*a: Any, **k: Any) -> str:
        names.append(publish(*a, **k))
        return names[-1]

    monkeypatch.setattr(sn.spool, "publish", spy)
    return names


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of batch files in a unit test: their content is under test here, not their
    durability (tests/unit/test_sniffer.py and the crash tests cover that), so skip the
    fsyncs (2 ms each on this disk)."""
    monkeypatch.setattr(files.os, "fsync", lambda fd: None)


def drain(sn: Sniffer, clock: Clock, step: float = 0.0, ticks: int = 100_000) -> None:
    """Tick until the source is drained and nothing is held (``step`` seconds a tick)."""
    for _ in range(ticks):
        sn.tick()
        if sn.drained and sn.carried is None:
            return
        clock.now += step
    raise AssertionError("the sniffer never drained")


def batches(sn: Sniffer, names: list[str]) -> list[list[dict[str, Any]]]:
    return [sn.spool.load(n).items for n in names]


@pytest.mark.usefixtures("no_fsync")
@pytest.mark.parametrize("linger", [0, 2.0])
def test_the_storage_rule_over_10k_random_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                linger: float) -> None:
    """At most 5 items per file, kinds 1 and 2 never together, every item once, in order;
    with a linger too, where a short piece waits and later fetches fill it."""
    rng = random.Random(15)
    items = [{"id": i, "doc_id": i, "kind": rng.choice([0, 1, 2, 3])} for i in range(10_000)]
    clock = Clock()
    sn = make(tmp_path, MemorySource(items), clock, batch_size=5, separate="workers.storage:apart",
              batch_linger=linger)
    names = record_publishes(sn, monkeypatch)
    drain(sn, clock, step=0.5)
    got = batches(sn, names)
    assert sorted(names) == sorted(sn.spool.pending()), "every batch file written was read"
    for b in got:
        kinds = {i["kind"] for i in b}
        assert 1 <= len(b) <= 5 and not {1, 2} <= kinds, b
    assert [i["id"] for b in got for i in b] == list(range(10_000))  # once each, in order
    assert len(got) > 2000, "the rule never cut a fetch"
    if linger:
        assert sum(len(b) == 5 for b in got) > sum(len(b) == 5 for b in batches_without_linger(items))
    assert sn.spool.read_position() == 10_000


def batches_without_linger(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """What the rule alone makes of ``items`` fetched 5 at a time (the linger's baseline)."""
    out: list[list[dict[str, Any]]] = []
    for start in range(0, len(items), 5):
        batch: list[dict[str, Any]] = []
        for item in items[start:start + 5]:
            if batch and apart(batch, item):
                out.append(batch)
                batch = []
            batch.append(item)
        out.append(batch)
    return out


@pytest.mark.usefixtures("no_fsync")
def test_batch_max_bytes_cuts_before_the_limit_and_an_oversized_item_goes_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    items = [{"id": i, "doc_id": i, "content": "x" * rng.choice([10, 300, 1500, 2900, 9000])}
             for i in range(2000)]
    clock = Clock()
    sn = make(tmp_path, MemorySource(items), clock, batch_size=100, batch_max_bytes="4KB",
              compress="none")
    names = record_publishes(sn, monkeypatch)
    drain(sn, clock)
    got = batches(sn, names)
    lone = 0
    for name, b in zip(names, got):
        size = sum(item_size(i) for i in b)
        if len(b) == 1 and size > 4000:
            lone += 1
        else:
            assert size <= 4000, (len(b), size)
        assert len(b) <= 100
        # The documented bound on the file: its items' sizes plus a fixed header.
        file_size = (sn.spool.left / f"{name}{SUFFIX}").stat().st_size
        assert file_size <= size + 300, (file_size, size)
    assert lone == sum(len(i["content"]) == 9000 for i in items) > 0
    assert [i["id"] for b in got for i in b] == list(range(2000))
    assert len(got) > 2000 / 100 * 5, "the byte limit never cut a fetch"
    assert sn.spool.read_position() == 2000


def test_a_short_batch_lingers_until_batch_linger_then_is_published(tmp_path: Path) -> None:
    clock = Clock()
    src = MemorySource([{"doc_id": i} for i in range(3)])
    sn = make(tmp_path, src, clock, batch_size=10, batch_linger="2s")
    assert sn.tick() == 0 and sn.spool.pending() == []
    held = sn.carried
    assert held is not None and [i["doc_id"] for i in held.items] == [0, 1, 2]
    assert sn.spool.read_position() is None, "the position moved past items only in memory"
    clock.now += 1.0
    src.items += [{"doc_id": 3}, {"doc_id": 4}]  # a slow source: two more lines
    assert sn.tick() == 0 and sn.spool.pending() == []  # fetched into the lingering batch
    assert sn.carried is not None and len(sn.carried.items) == 5
    clock.now += 0.999
    assert sn.tick() == 0 and sn.spool.pending() == []
    clock.now += 0.001  # 2 s since the batch's first item was fetched
    assert sn.tick() == 1 and sn.carried is None
    (name,) = sn.spool.pending()
    assert [i["doc_id"] for i in sn.spool.load(name).items] == [0, 1, 2, 3, 4]
    assert sn.spool.read_position() == 5
    # A batch that fills up does not wait.
    src.items += [{"doc_id": i} for i in range(5, 15)]
    assert sn.tick() == 1 and len(sn.spool.pending()) == 2 and sn.carried is None
    assert sn.spool.read_position() == 15


def test_lingering_items_are_fetched_again_after_a_crash(tmp_path: Path) -> None:
    clock = Clock()
    src = MemorySource([{"doc_id": i} for i in range(4)])
    sn = make(tmp_path, src, clock, batch_size=10, batch_linger="5s")
    assert sn.tick() == 0 and sn.carried is not None
    # The process dies: a new sniffer over the same spool starts at the saved position.
    again = make(tmp_path, src, clock, batch_size=10)
    assert again.tick() == 1
    (name,) = again.spool.pending()
    assert [i["doc_id"] for i in again.spool.load(name).items] == [0, 1, 2, 3]


def test_linger_0_publishes_a_short_fetch_at_once_as_before(tmp_path: Path) -> None:
    src = MemorySource([{"doc_id": i} for i in range(3)])
    sn = make(tmp_path, src, batch_size=10)
    assert sn.batcher.rules.linger == 0
    assert sn.tick() == 1 and sn.drained and sn.carried is None and src.fetches == 1
    assert sn.spool.read_position() == 3


def test_flush_publishes_a_lingering_batch_now(tmp_path: Path) -> None:
    sn = make(tmp_path, MemorySource([{"doc_id": i} for i in range(3)]), batch_size=10,
              batch_linger="1h")
    assert sn.tick() == 0
    assert sn.tick(flush=True) == 1 and sn.carried is None and sn.spool.read_position() == 3


def test_the_position_moves_only_once_every_piece_of_a_fetch_is_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetch of 10 cut into pieces of 2 (by bytes): the disk fills after the first piece.
    The saved position stays where it was; the rest stays held and is published later,
    nothing twice."""
    clock = Clock()
    items = [{"doc_id": i, "content": "y" * 100} for i in range(10)]
    limit = 2 * item_size(items[0])
    sn = make(tmp_path, MemorySource(items), clock, batch_size=10, batch_max_bytes=limit)
    names = record_publishes(sn, monkeypatch)
    publish = sn.spool.publish
    calls = [0]

    def full_on_second(*a: Any, **k: Any) -> str:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        return publish(*a, **k)

    monkeypatch.setattr(sn.spool, "publish", full_on_second)
    assert sn.tick() == 1 and sn.paused == "disk-full"
    assert sn.spool.read_position() is None, "saved past items not yet in left/"
    assert sn.carried is not None and [i["doc_id"] for i in sn.carried.items] == list(range(2, 10))
    clock.now += 60  # past the disk-full backoff
    assert sn.tick() == 4 and sn.carried is None
    assert sn.spool.read_position() == 10
    got = batches(sn, names)
    assert [len(b) for b in got] == [2] * 5
    assert [i["doc_id"] for b in got for i in b] == list(range(10))


def test_pieces_stopped_by_backpressure_are_carried_and_published_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = [{"doc_id": i, "kind": 1 + i % 2} for i in range(6)]  # kinds alternate: 6 pieces
    sn = make(tmp_path, MemorySource(items), batch_size=10, separate="workers.storage:apart",
              max_pending=2)
    names = record_publishes(sn, monkeypatch)
    assert sn.tick() == 2 and sn.paused == "max_pending"
    assert sn.spool.read_position() is None  # 4 of the fetch's 6 items are only in memory
    assert sn.carried is not None and [i["doc_id"] for i in sn.carried.items] == [2, 3, 4, 5]
    for name in sn.spool.pending():  # workers take the backlog
        sn.spool.mark_done(sn.spool.claim(name))
    assert sn.tick() == 2 and sn.carried is not None and sn.spool.read_position() is None
    for name in sn.spool.pending():
        sn.spool.mark_done(sn.spool.claim(name))
    assert sn.tick() == 2 and sn.carried is None and sn.spool.read_position() == 6
    assert [i["doc_id"] for b in batches(sn, names) for i in b] == list(range(6))


def test_receipts_of_a_commit_acked_source_are_sliced_with_their_items(tmp_path: Path,
                                                                       monkeypatch) -> None:
    rng = random.Random(3)
    broker = MemoryBroker([{"doc_id": i, "kind": rng.choice([1, 2])} for i in range(500)])
    clock = Clock()
    sn = make(tmp_path, broker, clock, batch_size=5, separate="workers.storage:apart")
    names = record_publishes(sn, monkeypatch)
    drain(sn, clock)
    assert sn.acker is not None
    seen = []
    for name in names:
        batch = sn.spool.load(name)
        assert batch.receipts == [i["doc_id"] for i in batch.items]  # entry id == doc_id
        assert sn.acker.held[name] == batch.receipts
        assert not {1, 2} <= {i["kind"] for i in batch.items}
        seen += batch.receipts
    assert seen == list(range(500)) and len(names) > 100
    # Done batches are acknowledged with exactly their receipts.
    for name in names:
        sn.spool.mark_done(sn.spool.claim(name))
    sn.tick()
    assert sorted(r for rs in broker.acks for r in rs) == list(range(500))
    assert broker.settled()


def test_a_lingering_brokers_receipts_are_kept_alive(tmp_path: Path) -> None:
    clock = Clock()
    broker = MemoryBroker([{"doc_id": i} for i in range(3)])
    sn = make(tmp_path, broker, clock, batch_size=10, batch_linger="30s")
    assert sn.tick() == 0 and sn.carried is not None and sn.carried.receipts == [0, 1, 2]
    clock.now += 11  # past the acker's keep period
    assert sn.tick() == 0
    assert [0, 1, 2] in broker.kept, "items held in memory were not kept at the broker"
    assert broker.pending == {0, 1, 2} and not broker.acks


def test_a_separate_that_raises_starts_a_new_batch_and_is_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(batch: list[dict[str, Any]], item: dict[str, Any]) -> bool:
        if item["doc_id"] % 7 == 3:
            raise KeyError("kind")
        return False

    clock = Clock()
    items = [{"doc_id": i} for i in range(100)]
    app = load_app(write_config(tmp_path / "cfg", docs=None, batch_size=10))
    q = app.queues("docs")[0]
    sn = Sniffer(q, Spool(tmp_path / "data", "docs").ensure(), MemorySource(items), clock=clock,
                 rules=Rules(batch_size=10, separate=broken, queue="docs"))
    names = record_publishes(sn, monkeypatch)
    with caplog.at_level(logging.ERROR, logger="lrq.batching"):
        drain(sn, clock)
    got = batches(sn, names)
    assert [i["doc_id"] for b in got for i in b] == list(range(100))
    starts = {b[0]["doc_id"] for b in got}
    assert {i for i in range(100) if i % 7 == 3} <= starts  # each failing item began a batch
    # Asked of every item but a batch's first (10 and 80 began their fetches' batches).
    assert sn.batcher.separate_errors == sum(1 for i in range(100) if i % 7 == 3 and i % 10)
    lines = [r for r in caplog.records if r.getMessage().startswith("separate-failed")]
    assert len(lines) == 1 and "queue=docs count=1: KeyError" in lines[0].getMessage()


def test_without_rules_nothing_is_done_per_item(tmp_path: Path, monkeypatch) -> None:
    """The fast path: no item is measured or copied when neither rule is set."""
    def never(item: Any) -> int:
        raise AssertionError("an item was measured without batch_max_bytes")

    monkeypatch.setattr(batching, "item_size", never)
    src = MemorySource([{"doc_id": i} for i in range(250)])
    sn = make(tmp_path, src, batch_size=100)
    fetched: list[Fetched] = []
    fetch = src.fetch
    monkeypatch.setattr(src, "fetch", lambda p, n: fetched.append(fetch(p, n)) or fetched[-1])
    pieces: list[list[Any]] = []
    publish = sn.spool.publish
    monkeypatch.setattr(sn.spool, "publish", lambda items, *a, **k: pieces.append(items)
                        or publish(items, *a, **k))
    assert not sn.batcher.rules.per_item
    assert sn.tick() == 3 and sn.spool.read_position() == 250
    assert all(p is f.items for p, f in zip(pieces, fetched)), "a fetch was copied"


@pytest.mark.parametrize(("keys", "message"), [
    ({"batch_max_bytes": "lots"}, "queues.docs.batch_max_bytes: 'lots' is not a size"),
    ({"batch_max_bytes": 0}, "queues.docs.batch_max_bytes: must be more than 0 bytes"),
    ({"batch_linger": "soon"}, "queues.docs.batch_linger: 'soon' is not a duration"),
    ({"batch_linger": -1}, "queues.docs.batch_linger: must be 0 (publish at once) or more"),
    ({"batch_linger": "40d"}, "queues.docs.batch_linger: must be at most"),
    ({"separate": "  "}, "queues.docs: missing 'separate'"),
    ({"separate": 3}, "queues.docs.separate: expected str"),
])
def test_bad_rule_values_are_one_line_config_errors(tmp_path: Path, keys: dict[str, Any],
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_app(write_config(tmp_path, docs=None, **keys))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("spec", "message"), [
    ("workers.storage:nothing", "module 'workers.storage' has no 'nothing'"),
    ("no_such_module:f", "cannot import 'no_such_module'"),
    ("workers.storage:APART", "is not callable"),
    ("nocolon", "must look like"),
])
def test_a_bad_separate_fails_the_start(tmp_path: Path, spec: str, message: str) -> None:
    app = load_app(write_config(tmp_path, docs=None, separate=spec))
    with pytest.raises(ConfigError, match=f"queues.docs.separate: .*{message}"):
        app.check()


def test_defaults_and_parsed_values(tmp_path: Path) -> None:
    q = load_app(write_config(tmp_path / "a", docs=None)).queues("docs")[0]
    assert (q.batch_max_bytes, q.separate, q.batch_linger) == (None, None, 0.0)
    q = load_app(write_config(tmp_path / "b", docs=None, batch_max_bytes="1MB",
                              batch_linger="2s", separate="workers.storage:apart",
                              )).queues("docs")[0]
    assert (q.batch_max_bytes, q.separate, q.batch_linger) == (10**6, "workers.storage:apart", 2.0)
    rules = Rules.of(q)
    assert rules.separate is apart and rules.per_item and rules.linger == 2.0
