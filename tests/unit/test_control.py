"""Pause and resume (lrq.control): the file, the Watch, and what the sniffer, the worker, the
acker and App do while a queue is paused. Across real processes: tests/acceptance/test_pause.py."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from lrqtest import load_app, write_config

from lrq import control
from lrq.errors import ConfigError, LrqError, NoSuchBatch
from lrq.sniffer import Sniffer
from lrq.spool import State
from lrq.testing import MemoryBroker, MemorySource


@pytest.fixture
def app(tmp_path: Path):
    return load_app(write_config(tmp_path, docs=None, batch_size=10, chunk_size=5))


def publish(app, n: int, start: int = 0) -> str:
    q = app.queues("docs")[0]
    return app.spool(q).publish([{"doc_id": f"d{i}", "content": "w x"} for i in range(start, start + n)])


def test_pause_writes_one_record_and_resume_removes_it(tmp_path: Path) -> None:
    assert control.paused(tmp_path, "docs") is None
    record = control.pause(tmp_path, "docs", "ann")
    assert record["by"] == "ann" and record["since"].endswith("Z")
    assert json.loads(control.path(tmp_path, "docs").read_text()) == record
    assert control.paused(tmp_path, "docs") == record
    again = control.pause(tmp_path, "docs", "bob")
    assert again == record, "a second pause keeps the first one's since and by"
    assert not list((tmp_path / "docs" / "tmp").iterdir()), "no tmp leftover"
    assert control.resume(tmp_path, "docs") is True
    assert control.paused(tmp_path, "docs") is None
    assert control.resume(tmp_path, "docs") is False


def test_default_by_is_user_at_host(tmp_path: Path) -> None:
    assert "@" in control.pause(tmp_path, "docs")["by"]


@pytest.mark.parametrize("by", ["", "   ", "a\nb", "x" * 101])
def test_a_bad_by_is_refused(tmp_path: Path, by: str) -> None:
    with pytest.raises(ConfigError, match="--by"):
        control.pause(tmp_path, "docs", by)
    assert control.paused(tmp_path, "docs") is None


def test_an_unreadable_pause_file_still_pauses(tmp_path: Path) -> None:
    target = control.path(tmp_path, "docs")
    target.parent.mkdir(parents=True)
    target.write_text("not json")
    record = control.paused(tmp_path, "docs")
    assert record is not None and record["by"].startswith("unknown") and record["since"].endswith("Z")


def test_the_pause_file_is_not_a_foreign_entry_nor_counted(app) -> None:
    q = app.queues("docs")[0]
    sp = app.spool(q)
    publish(app, 3)
    before = app.budget().used()
    app.pause("docs", "ann")
    assert sp.foreign() == {}
    assert app.budget().used() == before
    assert sp.counts().pending == 1


def test_watch_logs_paused_and_resumed_once_per_change(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lrq.control")
    w = control.Watch(tmp_path, "docs")
    assert w.paused() is None and not caplog.records, "not paused at start: nothing to say"
    control.pause(tmp_path, "docs", "Ann Lee")
    assert [w.paused()["by"] for _ in range(3)] == ["Ann Lee"] * 3
    control.resume(tmp_path, "docs")
    assert w.paused() is None and w.paused() is None
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split()[0] for m in messages] == ["paused", "resumed"]
    assert 'by="Ann Lee"' in messages[0]


def test_app_refuses_an_unknown_queue_in_one_line(app) -> None:
    for call in (app.pause, app.resume, app.paused):
        with pytest.raises(ConfigError, match="no queue named 'nope'") as e:
            call("nope")
        assert "\n" not in str(e.value)


def test_a_paused_worker_claims_nothing_and_resume_lets_it_go_on(app) -> None:
    q = app.queues("docs")[0]
    names = [publish(app, 10, 10 * i) for i in range(3)]
    w = app.worker(q)
    assert w.run_once()
    app.pause("docs", "ann")
    assert not w.run_once()
    stats = w.run(burst=True)
    assert stats.batches == 0
    sp = app.spool(q)
    assert sorted(sp.pending()) == sorted(n for n in names if sp.state(n) is State.PENDING)
    assert len(sp.pending()) == 2 and sp.claimed() == []
    assert app.resume("docs")
    assert w.run(burst=True).batches == 2
    assert w.sink.ledger_stats() == (3, 30)


def test_a_paused_worker_still_runs_a_named_batch(app) -> None:
    name = publish(app, 10)
    w = app.worker(app.queues("docs")[0])
    app.pause("docs")
    assert w.run_named(name) and w.spool.state(name) is State.DONE


def test_pausing_mid_run_finishes_the_batch_in_hand(app) -> None:
    """The pause lands while the handler runs (store behind on): that batch is committed,
    the next is not claimed."""
    q = app.queues("docs")[0]
    for i in range(4):
        publish(app, 10, 10 * i)
    w = app.worker(q)
    handler = w.handler
    calls = []

    def pausing(items):
        calls.append(len(items))
        if len(calls) == 1:
            control.pause(app.cfg.data_dir, "docs", "ann")
        return handler(items)

    w.handler = pausing
    stats = w.run(burst=True)
    assert stats.batches == 1 and w.sink.ledger_stats() == (1, 10)
    sp = app.spool(q)
    assert len(sp.pending()) == 3 and sp.claimed() == []


def test_a_paused_sniffer_publishes_nothing_and_resumes(app) -> None:
    q = app.queues("docs")[0]
    sp = app.spool(q)
    src = MemorySource([{"doc_id": f"d{i}"} for i in range(25)])
    sn = Sniffer(q, sp, src, pause=app.watch(q))
    app.pause("docs")
    assert sn.tick() == 0 and sn.paused == "operator" and sp.pending() == []
    assert not sn.drained, "a paused sniffer has not seen the source drained"
    app.resume("docs")
    assert sn.tick() == 3 and sn.paused is None and len(sp.pending()) == 3


def test_a_pause_during_a_long_tick_stops_publishing(app) -> None:
    q = app.queues("docs")[0]
    sp = app.spool(q)
    src = MemorySource([{"doc_id": f"d{i}"} for i in range(50)])
    sn = Sniffer(q, sp, src, pause=app.watch(q))
    sn.on_publish = lambda: control.pause(app.cfg.data_dir, "docs", "ann")
    assert sn.tick() == 1 and len(sp.pending()) == 1


def test_a_paused_broker_queue_still_acknowledges_done_batches(app) -> None:
    q = app.queues("docs")[0]
    sp = app.spool(q)
    broker = MemoryBroker([{"doc_id": f"d{i}"} for i in range(20)])
    sn = Sniffer(q, sp, broker, pause=app.watch(q))
    assert sn.tick() == 2
    first = sorted(sp.pending())[0]
    sp.mark_done(sp.claim(first))
    app.pause("docs")
    assert sn.tick() == 0
    assert broker.acks == [list(range(10))], "done batches are acknowledged while paused"


def test_requeue_failed_and_by_name(app) -> None:
    q = app.queues("docs")[0]
    sp = app.spool(q)
    a, b = publish(app, 10), publish(app, 10, 10)
    for name in (a, b):
        sp.fail(sp.claim(name), "boom")
    assert app.requeue_failed("docs") == 2
    assert sorted(sp.pending()) == sorted([a, b])
    assert app.requeue_failed() == 0
    sp.fail(sp.claim(a), "boom")
    assert app.requeue(a) == ("docs", "requeued from failed/")
    with pytest.raises(NoSuchBatch, match="no batch named"):
        app.requeue("20990101T000000000000-nosuchbatch0")
    with pytest.raises(LrqError, match="pending"):
        app.requeue(b)


def test_requeue_is_logged_with_its_event_name(app, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lrq.app")
    sp = app.spool(app.queues("docs")[0])
    name = publish(app, 10)
    sp.fail(sp.claim(name), "boom")
    app.requeue_failed("docs")
    assert [r.getMessage().split()[:3] for r in caplog.records] == [
        ["requeued", "queue=docs", f"batch={name}"]]


def test_the_pause_file_leaves_no_tmp_file_behind_even_on_a_fresh_data_dir(tmp_path: Path) -> None:
    control.pause(tmp_path / "fresh", "docs", "ann")
    assert sorted(os.listdir(tmp_path / "fresh" / "docs")) == ["paused.json", "tmp"]
    assert os.listdir(tmp_path / "fresh" / "docs" / "tmp") == []
