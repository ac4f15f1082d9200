"""The worker with the handler policy on a real spool and SQLite sink: poison without sleeps,
a broken handler fails its batch, a mutating handler, the watchdog on a call that will not
stop."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from lrqtest import load_app, write_config
from test_worker import echo, publish, queue, rows

from lrq.errors import HandlerBroken, HandlerTimeout
from lrq.spool import State


@pytest.fixture
def app(tmp_path: Path):
    return load_app(write_config(tmp_path, docs=None, batch_size=200, chunk_size=50,
                                 backoff=0.5, retries=2))


def test_one_percent_poison_is_dead_lettered_without_a_single_sleep(app) -> None:
    bad = {"d17", "d93", "d150"}
    sleeps: list[float] = []

    def picky(items):
        if any(i["doc_id"] in bad for i in items):
            raise ValueError("cannot map")
        return echo(items)

    name = publish(app, 200)
    w = app.worker(queue(app))
    w.handler, w.sleep = picky, sleeps.append
    assert w.run_once()
    assert w.spool.state(name) is State.DONE and rows(app) == 197
    assert {d["key"] for d in w.sink.dead_letters()} == bad
    assert sleeps == []


def test_a_broken_handler_fails_its_batch_loudly_and_dead_letters_nothing(app, caplog) -> None:
    def broken(items):
        raise AttributeError("'NoneType' object has no attribute 'map'")

    name = publish(app, 200)
    w = app.worker(queue(app))
    w.handler = broken
    caplog.set_level("INFO")
    with pytest.raises(HandlerBroken):
        w.run_once()
    assert w.spool.state(name) is State.FAILED
    assert w.sink.dead_count() == 0 and rows(app) == 0
    error = w.spool.read_error(name)
    assert "is broken" in str(error) and "AttributeError" in str(error)
    lines = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and lines[0].message.startswith("handler-broken queue=docs")
    assert "lrq requeue --failed" in lines[0].message
    assert not any(r.message.startswith("dead-lettered") for r in caplog.records)


def test_a_broken_handler_ends_a_run_and_leaves_the_rest_pending(app) -> None:
    for start in (0, 200, 400):
        publish(app, 200, start)
    w = app.worker(queue(app))
    w.handler = lambda items: 1 / 0
    with pytest.raises(HandlerBroken):
        w.run(burst=True)
    counts = w.spool.counts()
    assert counts.failed == 1 and counts.pending == 2 and w.stats.failed == 1


def test_a_handler_that_pops_the_key_stores_every_result_and_the_original_dead_item(app) -> None:
    def popper(items):
        out = []
        for it in items:
            key = it.pop("doc_id")
            if key == "d7":
                raise ValueError("bad item")
            out.append({"doc_id": key})
        return out

    publish(app, 100)
    w = app.worker(queue(app))
    w.handler, w.sleep = popper, lambda seconds: None
    assert w.run_once()
    assert rows(app) == 99
    dead = w.sink.dead_letters()
    assert [d["key"] for d in dead] == ["d7"]


def test_the_watchdog_ends_a_call_that_swallowed_the_timeout(tmp_path: Path, caplog) -> None:
    """The handler catches HandlerTimeout and goes on; the heartbeat sees the call past its
    deadline (a fake clock jumps there), stops refreshing, marks the claim lost and calls
    on_overrun (here a recorder; in a process, os._exit). Nothing is committed."""
    app = load_app(write_config(tmp_path, docs=None, chunk_size=4, handler_timeout=0.05,
                                lease=0.2, retries=0))  # beat: 0.05 s
    name = publish(app, 4)
    w = app.worker(queue(app))
    overran = threading.Event()
    w.heartbeat.on_overrun = lambda why: overran.set()
    now = [0.0]
    w.policy.clock = lambda: now[0]

    def swallower(items: list[dict[str, Any]]):
        try:
            threading.Event().wait(10)  # cut by the soft timeout, not synchronisation
        except HandlerTimeout:
            now[0] += 1000  # ... and goes on, far past the deadline
            overran.wait(30)
        return echo(items)

    w.handler = swallower
    caplog.set_level("INFO")
    w.run_once()
    assert overran.is_set()
    assert rows(app) == 0 and w.spool.state(name) is not State.DONE
    assert any(r.message.startswith("batch-overrun queue=docs") for r in caplog.records)
    assert any(r.message.startswith("lease-lost") for r in caplog.records)
