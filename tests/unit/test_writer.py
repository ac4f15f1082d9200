"""The sniffer's batch writer thread: order, bounds, and what happens after a failed write."""
from __future__ import annotations

import errno
import threading

from lrq.spool.writer import Writer, Written


def test_batches_are_written_in_hand_over_order_and_the_thread_stops_at_close() -> None:
    calls: list[str] = []
    w = Writer(lambda name, data: calls.append(name))
    for i in range(10):
        assert w.hand_over(f"b{i}", b"x" * i, i)
    written = w.close()
    assert calls == [f"b{i}" for i in range(10)]
    assert written == [Written(f"b{i}", i, i) for i in range(10)]
    assert w.error is None and w._thread is not None and not w._thread.is_alive()


def test_at_most_depth_batches_wait_and_a_stuck_write_fails_after_the_bound() -> None:
    release = threading.Event()
    w = Writer(lambda name, data: release.wait(30), depth=2, wait=0.2)
    assert w.hand_over("a", b"", 1) and w.hand_over("b", b"", 2)
    assert w.outstanding == 2
    assert not w.hand_over("c", b"", 3)  # full, and the write is stuck past the bound
    assert isinstance(w.error, TimeoutError)
    release.set()
    assert [x.name for x in w.close()] == ["a"]  # "b" was dropped with the error


def test_after_a_failed_write_nothing_more_is_written() -> None:
    calls: list[str] = []
    gate = threading.Event()

    def write(name: str, data: bytes) -> None:
        gate.wait(30)
        calls.append(name)
        if name == "b1":
            raise OSError(errno.ENOSPC, "No space left on device")

    w = Writer(write, depth=3)
    for i in range(3):
        assert w.hand_over(f"b{i}", b"", i)
    gate.set()
    written = w.drain()
    assert [x.name for x in written] == ["b0"]
    assert calls == ["b0", "b1"]  # b2, handed over after b1, is dropped unwritten
    assert isinstance(w.error, OSError) and w.error.errno == errno.ENOSPC
    assert not w.hand_over("b3", b"", 3)  # refused from now on
    assert w.close() == [] and calls == ["b0", "b1"]


def test_unwritten_counts_what_is_handed_over_until_renamed_or_dropped() -> None:
    """The sniffer's free-space check subtracts these: a batch is in them from the hand-over
    until its rename, or until a failed write drops it."""
    gate = threading.Event()
    calls: list[str] = []

    def write(name: str, data: bytes) -> None:
        assert gate.wait(30)
        calls.append(name)
        if name == "b":
            raise OSError(errno.EIO, "I/O error")

    w = Writer(write, depth=3)
    assert w.unwritten == (0, 0)
    for name, size in (("a", 10), ("b", 20), ("c", 30)):
        assert w.hand_over(name, b"x" * size, None)
    assert w.unwritten == (3, 60)
    gate.set()
    assert [x.name for x in w.drain()] == ["a"]
    assert w.unwritten == (0, 0) and calls == ["a", "b"]  # "c" dropped, not written
    w.close()
