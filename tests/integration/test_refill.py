"""Backpressure that refills at once: a sniffer paused on ``max_pending`` publishes again as
soon as claims bring the backlog down to half, within the same tick, and its wait stays
cheap (looks bounded by claims, not by time) and ends when the scheduler stops."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from lrqtest import load_app, lrq, poll, write_config

from lrq.sniffer import Sniffer


class CountingStop(threading.Event):
    """The scheduler's stop event, counting the sniffer's waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def ticking(sn: Sniffer, stop: threading.Event, out: list[int]) -> threading.Thread:
    """One long tick in a thread, as the scheduler's sniff job runs it."""
    th = threading.Thread(target=lambda: out.append(sn.tick(max_seconds=600, stop=stop)))
    th.start()
    return th


def paused_full(sn: Sniffer, n: int) -> bool:
    return sn.paused == "max_pending" and len(sn.spool.pending()) == n


def sniffer(tmp_path: Path, **queue: Any) -> tuple[Path, Sniffer]:
    cfg = write_config(tmp_path, docs=1000, batch_size=10, **queue)
    app = load_app(cfg)
    return cfg, app.sniffer(app.queues("docs")[0])


def test_a_paused_sniffer_refills_in_the_same_tick_once_workers_claim_half(tmp_path: Path) -> None:
    cfg, sn = sniffer(tmp_path, max_pending=4)
    stop, out = CountingStop(), []
    th = ticking(sn, stop, out)
    try:
        assert poll(lambda: paused_full(sn, 4))
        lrq("-c", str(cfg), "work", "--once", check=True)  # a real worker: 3 pending, above half
        assert poll(lambda: len(sn.spool.pending()) == 3) and sn.refills == 0
        lrq("-c", str(cfg), "work", "--once", check=True)  # 2 pending: the low-water mark
        assert poll(lambda: sn.refills == 1 and paused_full(sn, 4))  # refilled, paused again
        assert th.is_alive()  # the same tick: no interval had to pass
    finally:
        stop.set()
        th.join(timeout=30)
    assert not th.is_alive() and out == [6]
    assert sn.spool.read_position() == 60  # saved when it stopped: every batch is durable


def test_the_wait_ends_on_stop_and_does_not_look_while_nothing_is_claimed(tmp_path: Path) -> None:
    _, sn = sniffer(tmp_path, max_pending=3)
    stop, out = CountingStop(), []
    th = ticking(sn, stop, out)
    try:
        assert poll(lambda: paused_full(sn, 3))
        assert poll(lambda: stop.waits >= 15)  # waited a while, backing off
    finally:
        stop.set()
        th.join(timeout=30)
    assert not th.is_alive() and out == [3]
    # One listing of the backlog, then a stat of right/ per wait: nothing was claimed, so
    # the pending names were looked at when it paused and once more in the wait (twice if
    # right/ had just changed), never again.
    assert sn.recounts == 1 and sn.refills == 0 and 2 <= sn.looks <= 3


def test_a_byte_limit_refills_at_half_its_bytes(tmp_path: Path) -> None:
    _, sn = sniffer(tmp_path, max_pending="4KB")
    stop, out = CountingStop(), []
    th = ticking(sn, stop, out)
    try:
        assert poll(lambda: sn.paused == "max_pending")
        first = sn.spool.pending()
        assert len(first) >= 3  # each batch is under 2KB
        size = sum((sn.spool.left / f"{n}.pkl").stat().st_size for n in first)
        claimed = []
        for name in first:  # claim until at most half the bytes wait
            claimed.append(sn.spool.claim(name))
            size -= (sn.spool.left / f"{name}.pkl").stat().st_size
            if size <= 2000:
                break
        assert poll(lambda: sn.refills >= 1 and len(set(sn.spool.pending()) - set(first)) > 0)
    finally:
        stop.set()
        th.join(timeout=30)
    assert not th.is_alive() and out and out[0] > len(first)


def test_a_batch_that_failed_between_two_looks_leaves_the_backlog(tmp_path: Path) -> None:
    """A batch claimed and failed (or quarantined, or split) between two looks at ``right/``
    leaves no claim there: its file leaving ``left/`` takes it off the backlog all the same,
    so the refill does not wait out the tick for batches that are gone."""
    _, sn = sniffer(tmp_path, max_pending=4)
    stop, out = CountingStop(), []
    th = ticking(sn, stop, out)
    try:
        assert poll(lambda: paused_full(sn, 4))
        for name in sn.spool.pending()[:2]:  # down to the low-water mark, no claim left behind
            claim = sn.spool.claim(name)
            assert claim is not None
            sn.spool.fail(claim, "failed by the test")
        assert poll(lambda: sn.refills == 1 and paused_full(sn, 4))
        assert th.is_alive()
    finally:
        stop.set()
        th.join(timeout=30)
    assert not th.is_alive()


def test_a_batch_done_before_the_sniffer_looks_at_its_size_is_not_an_error(tmp_path: Path) -> None:
    """A worker can claim, store and move a batch to done/ between its rename into left/ and
    the sniffer's next look at it (workers wake at once): the tick goes on, the batch is not
    counted as pending, and the position still moves past it."""
    cfg, sn = sniffer(tmp_path, max_pending=4)
    worker = load_app(cfg)
    work = worker.worker(worker.queues("docs")[0])
    publish = sn.spool.publish
    done: list[str] = []

    def publish_then_work(*args: Any, **kwargs: Any) -> str:
        name = publish(*args, **kwargs)
        if not done:  # the first batch: a real worker takes it to done/ at once
            assert work.run_once()
            done.append(name)
        return name

    sn.spool.publish = publish_then_work  # type: ignore[method-assign]
    assert sn.tick(max_batches=3) == 3
    assert not (sn.spool.left / f"{done[0]}.pkl").exists()
    assert len(sn.spool.pending()) == 2 and sn.spool.read_position() == 30
