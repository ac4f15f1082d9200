"""The sniffer's batch writer threads: order, bounds, and what happens after a failed write."""
from __future__ import annotations

import errno
import threading
from typing import Any

from lrq.spool.writer import Writer, Written


class Files:
    """Stands for the spool's create/commit/abandon: records what each stage did."""

    def __init__(self, fail_commit: str = "", fail_create: str = "",
                 gate: threading.Event | None = None) -> None:
        self.created: list[str] = []
        self.committed: list[str] = []
        self.abandoned: list[str] = []
        self.fail_commit, self.fail_create = fail_commit, fail_create
        self.gate = gate

    def create(self, name: str, data: bytes) -> str:
        if name == self.fail_create:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.created.append(name)
        return name

    def commit(self, handle: Any) -> None:
        if self.gate is not None:
            assert self.gate.wait(30)
        if handle == self.fail_commit:
            raise OSError(errno.EIO, "I/O error")
        self.committed.append(handle)

    def abandon(self, handle: Any) -> None:
        self.abandoned.append(handle)

    def writer(self, **kw: Any) -> Writer:
        return Writer(self.create, self.commit, self.abandon, **kw)


def test_batches_are_written_in_hand_over_order_and_the_threads_stop_at_close() -> None:
    f = Files()
    w = f.writer()
    for i in range(10):
        assert w.hand_over(f"b{i}", b"x" * i, i)
    written = w.close()
    assert f.committed == [f"b{i}" for i in range(10)] and not f.abandoned
    assert written == [Written(f"b{i}", i, i) for i in range(10)]
    assert w.error is None and not any(t.is_alive() for t in w._threads)


def test_at_most_depth_batches_wait_and_a_stuck_write_fails_after_the_bound() -> None:
    gate = threading.Event()
    f = Files(gate=gate)
    w = f.writer(depth=2, wait=0.2)
    assert w.hand_over("a", b"", 1) and w.hand_over("b", b"", 2)
    assert w.outstanding == 2
    assert not w.hand_over("c", b"", 3)  # full, and the commit is stuck past the bound
    assert isinstance(w.error, TimeoutError)
    gate.set()
    assert [x.name for x in w.close()] == ["a"]  # "b" was dropped with the error ...
    assert f.committed == ["a"] and f.abandoned == ["b"]  # ... its file removed


def test_after_a_failed_commit_nothing_later_is_renamed() -> None:
    gate = threading.Event()
    f = Files(fail_commit="b1", gate=gate)
    w = f.writer(depth=4)
    for i in range(4):
        assert w.hand_over(f"b{i}", b"", i)
    gate.set()
    assert [x.name for x in w.drain()] == ["b0"]
    assert f.committed == ["b0"]  # b2, b3: created maybe, never renamed; removed if created
    assert set(f.abandoned) == set(f.created) - {"b0", "b1"}
    assert isinstance(w.error, OSError) and w.error.errno == errno.EIO
    assert not w.hand_over("b4", b"", 4)  # refused from now on
    assert w.close() == [] and f.committed == ["b0"]


def test_a_failed_create_lets_the_earlier_batches_be_renamed_and_no_later_one() -> None:
    gate = threading.Event()
    f = Files(fail_create="b2", gate=gate)
    w = f.writer(depth=4)
    for i in range(4):
        assert w.hand_over(f"b{i}", b"", i)
    gate.set()
    w.drain()
    assert f.committed == ["b0", "b1"] and "b3" not in f.committed
    assert isinstance(w.error, OSError) and w.error.errno == errno.ENOSPC
    w.close()
