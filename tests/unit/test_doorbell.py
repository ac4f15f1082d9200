"""The doorbell (:mod:`lrq.spool.wake`): a publish wakes an idle worker at once, instead of
the worker sleeping out ``idle_wait``; ringing never blocks or fails; a path that is not a
FIFO makes waiting a plain sleep again."""
from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from lrqtest import load_app, poll, write_config
from sqlalchemy import func, select

from lrq.spool.wake import Doorbell
from lrq.worker import RunStats


@pytest.fixture
def app(tmp_path: Path) -> Any:
    return load_app(write_config(tmp_path, docs=None, chunk_size=4, backoff=0, retries=2))


def publish(app: Any, n: int) -> str:
    """Publish through a Spool of its own, as the sniffer's process would."""
    return app.spool(app.queues("docs")[0]).publish(
        [{"doc_id": f"d{i}", "content": f"w{i} x y"} for i in range(n)])


def rows(app: Any) -> int:
    sink = app.sink(app.queues("docs")[0])
    with sink.engine.connect() as c:
        return c.execute(select(func.count()).select_from(sink.table)).scalar_one()


def idle_worker(app: Any, **run: Any) -> tuple[Any, threading.Event, threading.Thread, list[RunStats]]:
    """A worker running in a thread, and an event set once it waits on its doorbell."""
    w = app.worker(app.queues("docs")[0])
    waiting = threading.Event()
    bell_wait = w.spool.bell.wait

    def wait(timeout: float, stop: threading.Event) -> bool:
        waiting.set()
        return bell_wait(timeout, stop)

    w.spool.bell.wait = wait
    out: list[RunStats] = []
    t = threading.Thread(target=lambda: out.append(w.run(burst=False, **run)), daemon=True)
    t.start()
    return w, waiting, t, out


def test_an_idle_worker_takes_a_batch_published_while_it_waits(app: Any) -> None:
    w, waiting, t, out = idle_worker(app, idle_wait=600.0)
    try:
        assert waiting.wait(30)  # nothing pending: the worker is in its idle wait
        publish(app, 10)
        # Old code slept the whole idle_wait (600 s) here; the poll gives up after 30.
        assert poll(lambda: rows(app) == 10, seconds=30)
        assert w.spool.bell.wakeups >= 1  # woken by the ring, not by the backstop
    finally:
        w.stop.set()
        t.join(30)
    assert not t.is_alive() and out[0].batches == 1
    assert stat.S_ISFIFO(os.lstat(w.spool.bell.path).st_mode)


def test_stop_ends_the_idle_wait_and_idle_exit_still_exits(app: Any) -> None:
    w, waiting, t, out = idle_worker(app, idle_wait=600.0)
    assert waiting.wait(30)
    w.stop.set()
    t.join(30)
    assert not t.is_alive() and out[0].batches == 0
    w, waiting, t, out = idle_worker(app, idle_wait=0.05, idle_exit=0.5)
    assert waiting.wait(30)
    t.join(30)
    assert not t.is_alive() and out[0].batches == 0


def test_a_ring_is_kept_until_read_and_read_by_one_waiter(tmp_path: Path) -> None:
    path = tmp_path / "wake"
    a, b, ringer = Doorbell(path), Doorbell(path), Doorbell(path)
    stop = threading.Event()
    ringer.ring()  # nobody listens: nothing to open, nothing made, no error
    assert not path.exists()
    assert a.listen() and b.listen()
    ringer.ring()
    ringer.ring()
    assert a.wait(600, stop) and a.wakeups == 1  # at once: the rings waited in the pipe
    assert not b.wait(0.2, stop) and b.wakeups == 0  # a read them all: b was not woken
    stop.set()
    assert not a.wait(600, stop)  # stop set: answers at once
    for bell in (a, b, ringer):
        bell.close()
    ringer.ring()  # the listeners went away (EPIPE, then ENXIO): still no error
    assert not ringer.wait(0.0, stop)


def test_ringing_never_blocks_when_nobody_reads(tmp_path: Path) -> None:
    path = tmp_path / "wake"
    listener, ringer = Doorbell(path), Doorbell(path)
    assert listener.listen()
    for _ in range(70_000):  # more than a pipe holds (64 KiB): the extra rings are dropped
        ringer.ring()
    assert listener.wait(600, threading.Event()) and listener.wakeups == 1


def test_a_path_that_is_not_a_fifo_is_left_alone_and_waiting_sleeps(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "wake"
    path.write_bytes(b"not ours")
    bell = Doorbell(path)
    bell.ring()
    assert path.read_bytes() == b"not ours"  # never written to
    with caplog.at_level(logging.WARNING, logger="lrq.spool.wake"):
        assert not bell.listen()
        assert not bell.wait(0.01, threading.Event())
        assert not bell.listen()
    assert [r.getMessage().split()[0] for r in caplog.records] == ["doorbell-unusable"]
    assert path.read_bytes() == b"not ours"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    assert not Doorbell(link).listen() and not (tmp_path / "elsewhere").exists()
