"""The worker on a SQLite sink: store, replay, finalize, and failures that say what went wrong."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from lrq.errors import HandlerError
from lrq.spool import State
from lrqtest import load_app, write_config


@pytest.fixture
def app(tmp_path: Path):
    return load_app(write_config(tmp_path, docs=None, chunk_size=3))


def publish(app, n: int, start: int = 0) -> str:
    q = app.queues("docs")[0]
    return app.spool(q).publish([{"doc_id": f"d{i}", "content": f"w{i} x y"} for i in range(start, start + n)])


def rows(app) -> int:
    sink = app.sink(app.queues("docs")[0])
    with sink.engine.connect() as c:
        return c.execute(select(func.count()).select_from(sink.table)).scalar_one()


def test_worker_stores_a_batch_and_marks_it_done(app) -> None:
    name = publish(app, 10)
    w = app.worker(app.queues("docs")[0])
    assert w.run_once() and not w.run_once()
    assert rows(app) == 10
    assert w.spool.state(name) is State.DONE
    assert w.sink.ledger_stats() == (1, 10)


def test_replaying_a_batch_adds_no_rows(app) -> None:
    q = app.queues("docs")[0]
    first, replay = publish(app, 10), publish(app, 10)  # the sniffer re-published the same items
    w = app.worker(q)
    w.run(burst=True)
    assert rows(app) == 10
    assert w.spool.state(first) is State.DONE and w.spool.state(replay) is State.DONE
    stored = w.sink.store(first, 10, w.handle(w.spool.load(first).items))
    assert not stored.recorded and rows(app) == 10


def test_killed_after_commit_the_next_claimer_only_finalizes(app, caplog) -> None:
    q = app.queues("docs")[0]
    name = publish(app, 4)
    w = app.worker(q)
    claim = w.spool.claim(name)
    w.sink.store(name, 4, w.handle(w.spool.load(name).items))  # committed, then "killed"
    w.spool.release(claim)  # (what a reaper does with a dead owner's claim)
    caplog.set_level("INFO", logger="lrq.worker")
    assert w.run_once()
    assert w.spool.state(name) is State.DONE and rows(app) == 4
    assert any(r.message.startswith("finalized") for r in caplog.records)


def test_handler_exception_moves_the_batch_to_failed_with_the_traceback(app, caplog) -> None:
    q = app.queues("docs")[0]
    name = publish(app, 5)

    def boom(items):
        raise ValueError("model said no")

    w = app.worker(q)
    w.handler = boom
    assert w.run_once()
    assert w.spool.state(name) is State.FAILED and rows(app) == 0
    err = w.spool.read_error(name)["error"]
    assert "ValueError: model said no" in err and "Traceback" in err
    assert any(r.levelname == "ERROR" and name in r.message for r in caplog.records)
    assert w.stats.failed == 1


@pytest.mark.parametrize("result, message", [
    (lambda items: items[:-1], "returned 2 results for 3 items"),
    (lambda items: "oops", "must return a list of dicts"),
    (lambda items: [{"doc_id": "other"} for _ in items], "returned 3 results for 3 items"),
])
def test_bad_handler_results_fail_the_batch_clearly(app, result, message) -> None:
    name = publish(app, 3)
    w = app.worker(app.queues("docs")[0])
    w.handler = result
    w.run_once()
    assert message in w.spool.read_error(name)["error"]
    with pytest.raises(HandlerError, match=message):
        w.handle([{"doc_id": f"d{i}"} for i in range(3)])


def test_chunks_follow_chunk_size(app) -> None:
    sizes = []

    def spy(items):
        sizes.append(len(items))
        return [{"doc_id": i["doc_id"]} for i in items]

    publish(app, 10)
    w = app.worker(app.queues("docs")[0])
    w.handler = spy
    w.run_once()
    assert sizes == [3, 3, 3, 1]


def test_run_named_batch(app) -> None:
    a, b = publish(app, 2), publish(app, 2, 2)
    w = app.worker(app.queues("docs")[0])
    assert w.run_named(b)
    assert w.spool.state(b) is State.DONE and w.spool.state(a) is State.PENDING
    assert not w.run_named(b)
