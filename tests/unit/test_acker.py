"""A source acknowledged at commit (MemoryBroker): receipts in batch files, the sniffer never
throws a fetch away, the acker acknowledges only done batches and keeps the rest, retention
keeps what awaits an acknowledgement. The same paths against real servers: tests/contract."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from lrqtest import load_app, write_config

from lrq.acker import Acker
from lrq.sniffer import Sniffer
from lrq.sources import Context
from lrq.spool import SUFFIX, Spool
from lrq.spool.files import AWAITING_ACK_MODE, FILE_MODE
from lrq.testing import MemoryBroker


def make(tmp_path: Path, n: int, batch_size: int = 10, max_pending: int = 1000,
         broker: MemoryBroker | None = None) -> Sniffer:
    app = load_app(write_config(tmp_path / "cfg", docs=None, batch_size=batch_size,
                                max_pending=max_pending))
    q = app.queues("docs")[0]
    spool = Spool(tmp_path / "data", "docs").ensure()
    broker = broker or MemoryBroker([{"doc_id": i} for i in range(n)])
    return Sniffer(q, spool, broker)


def mode(sp: Spool, folder: Path, name: str) -> int:
    return stat.S_IMODE(os.stat(folder / f"{name}{SUFFIX}").st_mode)


def finish(sp: Spool, name: str) -> None:
    sp.mark_done(sp.claim(name))


def test_batches_carry_receipts_and_are_acked_only_once_done(tmp_path: Path) -> None:
    sn = make(tmp_path, 25)
    broker, sp = sn.source, sn.spool
    assert sn.tick() == 3 and sn.acker is not None
    names = sp.pending()
    assert [sp.load(n).receipts for n in names] == [list(range(10)), list(range(10, 20)),
                                                    list(range(20, 25))]
    assert all(mode(sp, sp.left, n) == AWAITING_ACK_MODE for n in names)
    assert not (sp.root / "position.json").exists()  # a broker has no position
    assert broker.pending == set(range(25)) and not broker.acks
    finish(sp, names[1])
    sn.tick()
    assert broker.acks == [list(range(10, 20))]  # only the done batch, once
    assert mode(sp, sp.done, names[1]) == FILE_MODE
    assert broker.pending == set(range(10)) | set(range(20, 25))
    sn.tick()
    assert len(broker.acks) == 1  # nothing newly done: no second ack
    assert sn.acker.awaiting() == 0 and set(sn.acker.held) == {names[0], names[2]}


def test_keep_is_called_with_every_held_receipt(tmp_path: Path) -> None:
    sn = make(tmp_path, 20)
    sn.tick()
    sn.tick()  # keep_every 0: kept at every step
    assert sorted(sn.source.kept[-1]) == list(range(20))


def test_retention_keeps_done_batches_awaiting_their_ack(tmp_path: Path) -> None:
    sn = make(tmp_path, 10)
    sn.tick()
    name = sn.spool.pending()[0]
    finish(sn.spool, name)
    assert sn.spool.done_batches() == []  # not yet acked: never removed or retired
    assert sn.spool.counts().awaiting_ack == 1
    sn.tick()
    assert [n for _, n in sn.spool.done_batches()] == [name]
    assert sn.spool.counts().awaiting_ack == 0


def test_an_idle_tick_fetch_is_carried_through_backpressure_not_thrown_away(
        tmp_path: Path) -> None:
    sn = make(tmp_path, 0, max_pending=1)
    broker, sp = sn.source, sn.spool
    assert sn.tick() == 0 and sn.drained
    sp.publish([{"doc_id": -1}])  # the backlog is full ...
    broker.add([{"doc_id": i} for i in range(5)])  # ... when entries arrive
    assert sn.tick() == 0 and sn.paused == "max_pending"
    assert sn.carried is not None and [i["doc_id"] for i in sn.carried.items] == list(range(5))
    assert not sn.drained  # until-idle must not stop with items in memory
    fetches = broker.fetches
    assert sn.tick() == 0 and broker.fetches == fetches  # still carried, not fetched again
    finish(sp, sp.pending()[0])
    assert sn.tick() == 1 and sn.carried is None
    batch = sp.load(sp.pending()[0])
    assert [i["doc_id"] for i in batch.items] == list(range(5)) and batch.receipts == list(range(5))


def test_a_restarted_acker_finds_held_batches_and_the_broker_skips_them(tmp_path: Path) -> None:
    sn = make(tmp_path, 30)
    broker, sp = sn.source, sn.spool
    sn.tick()
    a, b, c = sp.pending()
    finish(sp, a)  # done, not acked: the process dies before its next tick
    sp.fail(sp.claim(b), "boom")  # failed: held, never acked until requeued and done
    os.unlink(sp.left / f"{c}{SUFFIX}")  # a batch lost (its disk went): redelivered
    acker = Acker(sp)
    assert set(acker.held) == {a, b}
    broker.restart(Context(data_dir=tmp_path, queue="docs", held=acker.receipts()))
    sn2 = Sniffer(sn.queue, sp, broker, acker=acker)
    assert sn2.tick() == 1
    assert broker.acks == [list(range(10))]  # a acked at the first step
    redone = [n for n in sp.pending()]
    assert [sp.load(n).receipts for n in redone] == [list(range(20, 30))]  # only c's entries
    assert b in acker.held and broker.pending == set(range(10, 30))
    sp.requeue(b)
    finish(sp, b)
    sn2.tick()
    assert broker.pending == set(range(20, 30))


def test_a_split_batch_slices_its_receipts_and_the_acker_holds_the_halves(
        tmp_path: Path) -> None:
    sn = make(tmp_path, 10)
    sp = sn.spool
    sn.tick()
    name = sp.pending()[0]
    held = sp.claim(name)
    halves = sp.split(held, sp.load(name))
    assert [sp.load(h).receipts for h in halves] == [list(range(5)), list(range(5, 10))]
    assert all(mode(sp, sp.left, h) == AWAITING_ACK_MODE for h in halves)
    sn.tick()  # the original vanished: rescanned
    assert set(sn.acker.held) == set(halves)
    finish(sp, halves[0])
    sn.tick()
    assert sn.source.acks == [list(range(5))]


def test_a_full_disk_keeps_the_fetched_batch_for_the_next_tick(tmp_path: Path, monkeypatch) -> None:
    import errno

    sn = make(tmp_path, 10)
    publish = sn.spool.publish

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sn.spool, "publish", full)
    assert sn.tick() == 0 and sn.paused == "disk-full"
    assert sn.carried is not None and sn.carried.receipts == list(range(10))
    monkeypatch.setattr(sn.spool, "publish", publish)
    sn._retry_at = 0.0  # the back-off is over
    assert sn.tick() == 1 and sn.carried is None and sn.source.fetches == 2
    assert sn.spool.load(sn.spool.pending()[0]).receipts == list(range(10))


def test_an_until_idle_tick_asks_settled_before_a_blocking_fetch(tmp_path: Path) -> None:
    """Everything acknowledged: the tick asks the broker whether anything is left before it
    fetches (a stream's fetch blocks up to `block`, 0.5 s, at the end of every run)."""
    sn = make(tmp_path, 20)
    sn.check_settled = True
    broker, sp = sn.source, sn.spool
    assert sn.tick() == 2
    for name in sp.pending():
        finish(sp, name)
    sn.tick()  # acknowledges both batches; its own fetch came back empty
    assert broker.pending == set() and not sn.acker.held
    fetches = broker.fetches
    assert sn.tick() == 0 and sn.source_settled
    assert broker.fetches == fetches  # settled: no fetch
    broker.add([{"doc_id": 99}])
    assert sn.tick() == 1 and broker.fetches > fetches  # new entries: fetched at once


def test_a_long_tick_acknowledges_as_it_goes(tmp_path: Path) -> None:
    """A tick publishing a backlog (or waiting to refill) can last seconds: the acker steps
    within it, so acknowledgements and keeps are not held back until the next tick."""
    sn = make(tmp_path, 100)
    broker, sp = sn.source, sn.spool
    ticks = iter(range(10_000))
    sn.clock = lambda: float(next(ticks))  # every look at the clock is a second later
    published: list[str] = []

    def finish_the_first() -> None:
        published.append(sp.pending()[0] if not published else "")
        if len(published) == 2:
            finish(sp, published[0])  # done while the tick still runs

    sn.on_publish = finish_the_first
    assert sn.tick(max_seconds=10_000) == 10
    assert broker.acks, "the done batch waited for the next tick to be acknowledged"


def test_awaiting_is_safe_while_the_acker_steps_in_another_thread(tmp_path: Path) -> None:
    """The supervise job counts awaiting batches while the sniff job's step removes the
    acknowledged ones: here a removal lands in the middle of the count."""
    sn = make(tmp_path, 30)
    sp, acker = sn.spool, sn.acker
    sn.tick()
    for name in sp.pending():
        finish(sp, name)
    assert acker is not None and len(acker.held) == 3
    state = sp.ack_state
    first = next(iter(acker.held))

    def state_while_stepping(name: str) -> str:
        acker.held.pop(first, None)  # the other thread's step, acknowledging one batch
        return state(name)

    sp.ack_state = state_while_stepping  # type: ignore[method-assign]
    assert acker.awaiting() == 3  # counted from the names it started with
