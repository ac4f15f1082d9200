"""The worker on a SQLite sink: store, replay, finalize, retries, poison isolation, leases."""
from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import pytest
import requests
from lrqtest import load_app, poll, write_config
from sqlalchemy import func, select
from urllib3.exceptions import MaxRetryError, NewConnectionError, ReadTimeoutError

from lrq.errors import Retryable
from lrq.spool import MAGIC, State


@pytest.fixture
def app(tmp_path: Path):
    return load_app(write_config(tmp_path, docs=None, chunk_size=4, backoff=0, retries=2))


def queue(app):
    return app.queues("docs")[0]


def publish(app, n: int, start: int = 0) -> str:
    return app.spool(queue(app)).publish(
        [{"doc_id": f"d{i}", "content": f"w{i} x y"} for i in range(start, start + n)])


def rows(app) -> int:
    sink = app.sink(queue(app))
    with sink.engine.connect() as c:
        return c.execute(select(func.count()).select_from(sink.table)).scalar_one()


def echo(items):
    return [{"doc_id": i["doc_id"]} for i in items]


def test_worker_stores_a_batch_and_marks_it_done(app) -> None:
    name = publish(app, 10)
    w = app.worker(queue(app))
    assert w.run_once() and not w.run_once()
    assert rows(app) == 10
    assert w.spool.state(name) is State.DONE
    assert w.sink.ledger_stats() == (1, 10)


def test_replaying_a_batch_adds_no_rows(app) -> None:
    first, replay = publish(app, 10), publish(app, 10)  # the sniffer re-published the same items
    w = app.worker(queue(app))
    w.run(burst=True)
    assert rows(app) == 10
    assert w.spool.state(first) is State.DONE and w.spool.state(replay) is State.DONE
    results, dead = w.handle(w.spool.load(first).items)
    assert not w.sink.store(first, 10, results, dead=dead).recorded and rows(app) == 10


def test_killed_after_commit_the_next_claimer_only_finalizes(app, caplog) -> None:
    name = publish(app, 4)
    w = app.worker(queue(app))
    claim = w.spool.claim(name)
    w.sink.store(name, 4, w.handle(w.spool.load(name).items)[0])  # committed, then "killed"
    w.spool.release(claim)
    caplog.set_level("INFO", logger="lrq.worker")
    assert w.run_once()
    assert w.spool.state(name) is State.DONE and rows(app) == 4
    assert any(r.message.startswith("finalized") for r in caplog.records)


def test_a_reaped_batch_already_committed_is_finalized_without_the_handler(app, caplog) -> None:
    name = publish(app, 4)
    w = app.worker(queue(app))
    claim = w.spool.claim(name)
    w.sink.store(name, 4, w.handle(w.spool.load(name).items)[0])  # committed, then killed
    w.spool._record_attempt(claim, "owner dead")  # what the reaper records ...
    w.spool.release(claim)  # ... as it takes the claim back
    calls: list[int] = []
    w.handler = lambda items: calls.append(len(items)) or echo(items)
    caplog.set_level("INFO", logger="lrq.worker")
    assert w.run_once()
    assert w.spool.state(name) is State.DONE and rows(app) == 4 and calls == []
    assert any(r.message.startswith("finalized") for r in caplog.records)


def test_poison_items_are_isolated_and_dead_lettered(app) -> None:
    calls: list[int] = []

    def picky(items):
        calls.append(len(items))
        bad = [i["doc_id"] for i in items if i["doc_id"] in ("d3", "d6")]
        if bad:
            raise ValueError(f"cannot map {bad}")
        return echo(items)

    name = publish(app, 10)
    w = app.worker(queue(app))
    w.handler = picky
    assert w.run_once()
    assert w.spool.state(name) is State.DONE
    assert rows(app) == 8
    dead = {d["key"]: d["error"] for d in w.sink.dead_letters()}
    assert set(dead) == {"d3", "d6"}
    assert "ValueError: cannot map ['d3']" in dead["d3"] and "Traceback" in dead["d3"]
    # chunk [d0..d3] once (an item error splits at once), halves [d0,d1] ok and [d2,d3]
    # once, then d2 ok and d3 3 tries (1 + retries), no waits.
    assert calls[:7] == [4, 2, 2, 1, 1, 1, 1] and calls.count(1) == 8
    assert w.stats.dead == 2


def test_a_flaky_call_succeeds_on_retry(app) -> None:
    tries = []

    def flaky(items):
        tries.append(1)
        if len(tries) < 3:
            raise Retryable("transient model glitch")
        return echo(items)

    sleeps: list[float] = []
    publish(app, 4)
    w = app.worker(queue(app))
    w.handler, w.sleep = flaky, sleeps.append
    w.run_once()
    assert rows(app) == 4 and w.sink.dead_count() == 0 and len(tries) == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize("result", [lambda items: items[:-1], lambda items: "oops",
                                    lambda items: [{"doc_id": "other"} for _ in items]])
def test_bad_handler_results_are_dead_lettered_with_the_reason(app, result) -> None:
    publish(app, 3)
    w = app.worker(queue(app))
    w.handler = result
    w.run_once()
    dead = w.sink.dead_letters()
    assert len(dead) == 3 and all("HandlerError" in d["error"] for d in dead)


def test_results_in_any_order_are_accepted(app) -> None:
    publish(app, 4)
    w = app.worker(queue(app))
    w.handler = lambda items: [{"doc_id": i["doc_id"], "n": 1} for i in reversed(items)]
    w.run_once()
    assert rows(app) == 4 and w.sink.dead_count() == 0


def test_a_key_answered_twice_and_another_not_at_all_is_refused(app) -> None:
    from lrq.errors import HandlerError

    w = app.worker(queue(app))
    assert w.policy.check(["a", "b"], [{"doc_id": "b"}, {"doc_id": "a"}])
    with pytest.raises(HandlerError, match="2 results for 2 items"):
        w.policy.check(["a", "b"], [{"doc_id": "a"}, {"doc_id": "a"}])


@pytest.mark.parametrize("error", [
    requests.ConnectionError("connection refused"),
    MaxRetryError(None, "/ent_mapping/", NewConnectionError(None, "refused")),
    ReadTimeoutError(None, "/ent_mapping/", "read timed out"),
    requests.ReadTimeout("read timed out"),
    ConnectionResetError("reset by peer"),
    Retryable("model service overloaded"),
])
def test_infrastructure_errors_release_the_batch_without_counting(app, error) -> None:
    def down(items):
        raise error

    name = publish(app, 4)
    w = app.worker(queue(app))
    w.handler = down
    with pytest.raises(Retryable):
        w.run_once()
    assert w.spool.state(name) is State.PENDING
    assert w.spool.attempts(name)["attempts"] == 0 and w.sink.dead_count() == 0
    w.handler = echo
    assert w.run_once() and rows(app) == 4


def test_one_item_the_service_always_refuses_with_a_5xx_is_dead_lettered(app) -> None:
    def one_503(items):
        if any(it["doc_id"] == "d2" for it in items):
            r = requests.Response()
            r.status_code = 503
            raise requests.HTTPError("503 Service Unavailable", response=r)
        return echo(items)

    name = publish(app, 8)
    w = app.worker(queue(app))
    w.handler, w.sleep = one_503, lambda s: None
    assert w.run_once()
    assert w.spool.state(name) is State.DONE and rows(app) == 7
    assert [d["key"] for d in w.sink.dead_letters()] == ["d2"]
    assert "HTTPError: 503" in w.sink.dead_letters()[0]["error"]


def test_http_5xx_is_infrastructure_but_4xx_is_poison(app) -> None:
    from lrq.worker import is_infrastructure

    def http_error(code: int) -> requests.HTTPError:
        r = requests.Response()
        r.status_code = code
        return requests.HTTPError(f"{code}", response=r)

    assert is_infrastructure(http_error(503)) and is_infrastructure(http_error(429))
    assert not is_infrastructure(http_error(400)) and not is_infrastructure(ValueError("x"))
    try:
        try:
            raise ConnectionRefusedError("db")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert is_infrastructure(wrapped)


def test_run_backs_off_then_gives_up_on_persistent_infrastructure_failure(app) -> None:
    def down(items):
        raise requests.ConnectionError("refused")

    publish(app, 4)
    w = app.worker(queue(app))
    w.handler = down
    stats = w.run(burst=True)
    assert stats.infra_errors == 6 and stats.batches == 0
    assert w.spool.counts().pending == 1


def test_a_hung_handler_call_is_cut_by_the_soft_timeout(tmp_path: Path) -> None:
    app = load_app(write_config(tmp_path, docs=None, chunk_size=10, backoff=0, retries=0,
                                handler_timeout=0.2))

    def hang(items):
        if any(i["doc_id"] == "d1" for i in items):
            time.sleep(60)  # the hang being cut, not synchronisation
        return echo(items)

    publish(app, 2)
    w = app.worker(queue(app))
    w.handler = hang
    w.run_once()
    dead = w.sink.dead_letters()
    assert [d["key"] for d in dead] == ["d1"] and "handler_timeout" in dead[0]["error"]
    assert rows(app) == 1


def test_a_worker_that_lost_its_lease_does_not_commit(app) -> None:
    name = publish(app, 4)
    w = app.worker(queue(app))

    def slow_then_reaped(items):
        os.unlink(w.spool.right / name)  # the reaper took the claim meanwhile
        return echo(items)

    w.handler = slow_then_reaped
    w.run_once()
    assert rows(app) == 0 and not w.sink.is_recorded(name)
    assert w.spool.state(name) is State.PENDING


def test_keyless_items_fail_the_batch_instead_of_colliding(app) -> None:
    name = app.spool(queue(app)).publish([{"id": 1}, {"id": 2}])
    w = app.worker(queue(app))
    w.run_once()
    assert w.spool.state(name) is State.FAILED
    assert "have no 'doc_id' field" in w.spool.read_error(name)["error"]


def test_items_sharing_a_key_fail_the_batch_instead_of_collapsing(app) -> None:
    name = app.spool(queue(app)).publish([{"doc_id": "a"}, {"doc_id": "b"}, {"doc_id": "a"}])
    w = app.worker(queue(app))
    w.handler = echo
    w.run_once()
    assert w.spool.state(name) is State.FAILED and rows(app) == 0
    assert not w.sink.is_recorded(name)
    assert "1 of 3 items repeat another item's 'doc_id' (2 distinct)" in \
        w.spool.read_error(name)["error"]


def test_keys_are_compared_as_stored(app) -> None:
    """1 and "1" are one key in the results table (keys are stored as strings)."""
    name = app.spool(queue(app)).publish([{"doc_id": 1}, {"doc_id": "1"}])
    w = app.worker(queue(app))
    w.handler = echo
    w.run_once()
    assert w.spool.state(name) is State.FAILED and rows(app) == 0


def test_tampered_batch_is_quarantined_and_never_unpickled(app, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    sp = app.spool(queue(app))
    payload = pickle.dumps({"name": "x", "queue": "docs", "created": 0, "position": None,
                            "items": [Evil()]})
    name = "20260101T000000000000-evil00000000"
    (sp.left / f"{name}.pkl").write_bytes(MAGIC + b"\0" * 32 + payload)
    w = app.worker(queue(app))
    assert w.run_once()
    assert not marker.exists()
    assert sp.state(name) is State.QUARANTINED
    assert "signature does not match" in sp.read_error(name)["error"]
    assert sp.counts().quarantined == 1


def test_chunks_follow_chunk_size(app) -> None:
    sizes = []

    def spy(items):
        sizes.append(len(items))
        return echo(items)

    publish(app, 10)
    w = app.worker(queue(app))
    w.handler = spy
    w.run_once()
    assert sizes == [4, 4, 2]


def test_run_named_batch(app) -> None:
    a, b = publish(app, 2), publish(app, 2, 2)
    w = app.worker(queue(app))
    assert w.run_named(b)
    assert w.spool.state(b) is State.DONE and w.spool.state(a) is State.PENDING
    assert not w.run_named(b)


# -- storing behind (pipeline) -----------------------------------------------------------

def test_run_stores_a_batch_while_the_handler_runs_the_next(app) -> None:
    first, second = publish(app, 4), publish(app, 4, start=4)
    w = app.worker(queue(app))
    assert w.queue.pipeline  # the default
    handling = {first: threading.Event(), second: threading.Event()}
    overlapped: list[bool] = []
    store = w.sink.store

    def handler(items):
        name = first if items[0]["doc_id"] in {"d0", "d1", "d2", "d3"} else second
        handling[name].set()
        return echo(items)

    def store_when_the_next_is_handled(name, *args, **kwargs):
        # The first commit waits (bounded) for the handler to start on the other batch: it
        # only can if the commit runs behind, on another thread.
        other = second if name == first else first
        if not overlapped:
            overlapped.append(handling[other].wait(timeout=10))
        return store(name, *args, **kwargs)

    w.handler = handler
    w.sink.store = store_when_the_next_is_handled
    stats = w.run(burst=True)
    assert overlapped == [True]
    assert (stats.batches, stats.items) == (2, 8) and rows(app) == 8
    assert w.spool.state(first) is State.DONE and w.spool.state(second) is State.DONE


def test_a_run_sets_its_start_up_heap_aside_from_the_collector_and_gives_it_back(app) -> None:
    """During a run the objects alive at its start are frozen (``gc.freeze``), so full
    collections do not rescan them every few batches; after it, even one that raised, they
    are collectable again."""
    import gc

    publish(app, 4), publish(app, 4, start=4)
    w = app.worker(queue(app))
    assert gc.get_freeze_count() == 0
    frozen: list[int] = []
    w.handler = lambda items: frozen.append(gc.get_freeze_count()) or echo(items)
    assert w.run(burst=True).batches == 2
    assert len(frozen) == 2 and min(frozen) > 1000, frozen
    assert gc.get_freeze_count() == 0

    publish(app, 4, start=8)
    w.handler = lambda items: (_ for _ in ()).throw(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        w.run(burst=True)
    assert gc.get_freeze_count() == 0


def test_without_pipeline_each_batch_is_stored_before_the_next_is_handled(tmp_path: Path) -> None:
    app = load_app(write_config(tmp_path, docs=None, chunk_size=4, pipeline=False))
    publish(app, 4), publish(app, 4, start=4)
    w = app.worker(queue(app))
    events: list[str] = []
    store = w.sink.store
    w.handler = lambda items: events.append("handle") or echo(items)
    w.sink.store = lambda *a, **k: events.append("store") or store(*a, **k)
    assert w.run(burst=True).batches == 2
    assert events == ["handle", "store", "handle", "store"]


def test_an_infrastructure_failure_in_a_commit_behind_releases_only_that_batch(app) -> None:
    from sqlalchemy.exc import OperationalError

    names = [publish(app, 4, start=4 * i) for i in range(3)]
    w = app.worker(queue(app))
    store = w.sink.store
    failed: list[str] = []

    def store_failing_once(name, *args, **kwargs):
        if not failed:
            failed.append(name)
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return store(name, *args, **kwargs)

    w.sink.store = store_failing_once
    stats = w.run(burst=True)
    assert stats.infra_errors == 1 and stats.batches == 3 and rows(app) == 12
    assert not stats.gave_up  # recovered: `lrq work` exits 0
    assert all(w.spool.state(n) is State.DONE for n in names)
    assert w.spool.attempts(failed[0])["attempts"] == 0  # released uncounted, then redone


def test_abandon_gives_back_every_batch_in_hand(app) -> None:
    first, second = publish(app, 4), publish(app, 4, start=4)
    w = app.worker(queue(app))
    store = w.sink.store
    in_store, go = threading.Event(), threading.Event()
    abandoned: list[bool] = []

    def slow_store(*args, **kwargs):
        in_store.set()
        go.wait(timeout=10)  # held until the handler of the next batch has abandoned
        return store(*args, **kwargs)

    calls: list[int] = []

    def handler(items):
        calls.append(len(items))
        if len(calls) == 2:  # the second batch, while the first one is being committed
            committing = in_store.wait(timeout=10)
            held = len(w.heartbeat.claims())
            abandoned.append(committing and held == 2 and w.abandon())
            go.set()
        return echo(items)

    w.handler = handler
    w.sink.store = slow_store
    w.run(burst=True, max_seconds=30)
    assert abandoned == [True]
    # The commit in flight went through (the ledger decides); the batch being handled was
    # given back and is pending, or was taken again and done by the same run.
    assert w.sink.ledger_stats()[0] >= 1
    states = {w.spool.state(first), w.spool.state(second)}
    assert states <= {State.DONE, State.PENDING} and rows(app) == 4 * w.sink.ledger_stats()[0]


def test_the_heartbeat_touches_every_claim_in_hand_and_reports_a_lost_one(tmp_path: Path) -> None:
    app = load_app(write_config(tmp_path, docs=None, chunk_size=4, lease=0.2))  # beat: 0.05 s
    kept, taken = publish(app, 4), publish(app, 4, start=4)
    w = app.worker(queue(app))
    claims = [w.spool.claim(kept), w.spool.claim(taken)]
    old = time.time() - 100
    for c in claims:
        os.utime(w.spool.right / c.name, (old, old))
    lost = [w.heartbeat.hold(c) for c in claims]
    os.unlink(w.spool.right / taken)  # the reaper took this one back
    assert lost[1].wait(timeout=10) and not lost[0].is_set()
    assert poll(lambda: os.stat(w.spool.right / kept).st_mtime > old + 50, seconds=10)
    for c in claims:
        w.heartbeat.drop(c)
    # With nothing held, the next beat ends the thread.
    assert poll(lambda: w.heartbeat._thread is None, seconds=10)


def test_store_behind_waits_for_every_commit_and_logs_a_second_error(caplog) -> None:
    """Two commits fail: the first error is raised in the worker's thread, the second is
    logged, not dropped, and neither commit is still running when the errors are handed back."""
    from types import SimpleNamespace

    from lrq.worker import StoreBehind

    finished: list[str] = []
    release = threading.Event()

    def commit(handled):
        release.wait(timeout=10)  # "b" is queued before "a" ends
        finished.append(handled)
        raise RuntimeError(f"commit {handled} failed")

    behind = StoreBehind(SimpleNamespace(queue=SimpleNamespace(name="q"), commit=commit))
    behind.submit("a")
    behind.start()
    behind.submit("b")  # queued while "a" is in flight
    release.set()
    with pytest.raises(RuntimeError, match="commit a failed"):
        behind.close()
    assert finished == ["a", "b"]
    assert "commit b failed" in caplog.text


# -- failures without progress -----------------------------------------------------------

class RecordedWaits(threading.Event):
    """A stop event whose waits return at once and are recorded (the backoff's lengths)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return self.is_set()


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_commit_that_keeps_failing_backs_off_longer_each_time_then_gives_up(
        tmp_path: Path, pipeline: bool) -> None:
    """Storing behind, a commit's error surfaces after the next batch was handled: that
    handled batch is not progress, so the count of failures is not reset and the backoff
    grows. (Before, with pipeline on, the count went 1, 0, 1, 0, ... and the run never ended.)"""
    from sqlalchemy.exc import OperationalError

    from lrq.worker import INFRA_TRIES

    app = load_app(write_config(tmp_path, docs=None, chunk_size=4, backoff=1.0,
                                pipeline=pipeline))
    name = publish(app, 4)
    stop = RecordedWaits()
    w = app.worker(queue(app), stop=stop)

    def unreachable(*_args, **_kwargs):
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    w.sink.store = unreachable
    stats = w.run(burst=True, max_seconds=30)  # the bound, should the run not give up
    # Storing behind, the batch handled again as the run gave up is committed (and fails)
    # before the run returns: one more error, without a wait.
    assert INFRA_TRIES <= stats.infra_errors <= INFRA_TRIES + pipeline and stats.batches == 0
    assert stop.waits == [2.0, 4.0, 8.0, 16.0, 32.0]  # gave up after 6, not at max_seconds
    assert stats.gave_up  # work left behind: `lrq work` exits non-zero
    assert w.spool.state(name) is State.PENDING
    assert w.spool.attempts(name)["attempts"] == 0  # the database was down: nothing counted


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_statement_the_database_refuses_counts_attempts_then_fails_the_batch(
        tmp_path: Path, pipeline: bool, caplog) -> None:
    """A schema problem (the results table lacks a column) is not the database being down:
    each commit counts an attempt, and at max_attempts the batch is in failed/ with the
    database's message. (Before, it was released uncounted forever.)"""
    app = load_app(write_config(tmp_path, docs=None, chunk_size=4, backoff=0,
                                pipeline=pipeline, max_attempts=3))
    names = [publish(app, 4), publish(app, 4, start=4)]
    w = app.worker(queue(app), stop=RecordedWaits())
    with w.sink.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE doc_results DROP COLUMN value")
    caplog.set_level("WARNING", logger="lrq.worker")
    stats = w.run(burst=True, max_seconds=30)
    assert (stats.refused, stats.failed, stats.batches, stats.infra_errors) == (6, 2, 0, 0)
    for name in names:
        assert w.spool.state(name) is State.FAILED
        error = w.spool.read_error(name)
        assert "gave up after 3 attempts (max_attempts)" in error["error"]
        assert "no column named value" in error["error"]
        assert "schema or configuration problem" in error["error"]
        assert [h["attempt"] for h in error["history"]] == [1, 2]
    assert "released queue=docs batch=" in caplog.text and "attempt=1 of 3" in caplog.text


def strict_app(tmp_path: Path, module: str):
    """An app whose results go into model ``module:Strict`` (doc_id, note NOT NULL)."""
    (tmp_path / f"{module}.py").write_text(
        "from sqlalchemy import String\n"
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
        "class Base(DeclarativeBase):\n    pass\n"
        "class Strict(Base):\n"
        "    __tablename__ = 'strict'\n"
        "    doc_id: Mapped[str] = mapped_column(String(50), primary_key=True)\n"
        "    note: Mapped[str] = mapped_column(String(50), nullable=False)\n")
    return load_app(write_config(tmp_path, docs=None, chunk_size=4, result_table=None,
                                 model=f"{module}:Strict"))


def test_a_result_the_database_refuses_is_dead_lettered_with_its_item(tmp_path: Path) -> None:
    app = strict_app(tmp_path, "notnull_model")
    name = publish(app, 6)
    w = app.worker(queue(app))
    w.handler = lambda items: [{"doc_id": i["doc_id"],
                                "note": None if i["doc_id"] in ("d1", "d4") else "ok"}
                               for i in items]
    assert w.run(burst=True).batches == 1
    assert w.spool.state(name) is State.DONE and w.stats.dead == 2
    assert sorted(w.sink.keys()) == ["d0", "d2", "d3", "d5"]
    dead = {d["key"]: d["error"] for d in w.sink.dead_letters()}
    assert sorted(dead) == ["d1", "d4"]
    assert "NOT NULL constraint failed: strict.note" in dead["d1"]
    with w.sink.engine.connect() as conn:
        items = conn.exec_driver_sql("SELECT item FROM lrq_dead_letters ORDER BY key").scalars()
        assert [json.loads(i) for i in items] == [{"doc_id": "d1", "content": "w1 x y"},
                                                  {"doc_id": "d4", "content": "w4 x y"}]


def test_a_result_with_a_field_the_model_lacks_is_dead_lettered_alone(tmp_path: Path) -> None:
    app = strict_app(tmp_path, "strict_model")
    name = publish(app, 10)
    w = app.worker(queue(app))
    w.handler = lambda items: [{"doc_id": i["doc_id"], "note": "ok",
                                **({"debug": 1} if i["doc_id"] == "d6" else {})}
                               for i in items]
    assert w.run(burst=True).batches == 1
    assert w.spool.state(name) is State.DONE and w.stats.dead == 1 and w.stats.failed == 0
    assert sorted(w.sink.keys()) == sorted(f"d{i}" for i in range(10) if i != 6)
    (dead,) = w.sink.dead_letters()
    assert dead["key"] == "d6"
    assert "results have fields ['debug'] that model strict_model:Strict has no columns" \
        in dead["error"]


def test_a_batch_released_uncounted_again_and_again_counts_attempts_then_fails(app) -> None:
    """The backstop: every RELEASES_PER_ATTEMPT-th uncounted release in a row that came while
    other batches got done counts an attempt, so a batch that always meets an infrastructure
    error while the rest flows ends in failed/."""
    from lrq.worker import RELEASES_PER_ATTEMPT

    def down(items):
        raise Retryable("service says 503")

    name = publish(app, 4)
    q = queue(app)
    w = app.worker(q)
    good = app.worker(q)
    w.handler = down
    per_attempt = RELEASES_PER_ATTEMPT + 1  # a streak's first release has nothing before it
    for n in range(1, per_attempt * q.max_attempts + 1):
        assert good.run_named(publish(app, 1, start=100 + n))  # the rest flows meanwhile
        with pytest.raises(Retryable):
            assert w.run_named(name)
        if n < per_attempt * q.max_attempts:
            assert w.spool.state(name) is State.PENDING
            assert w.spool.attempts(name)["attempts"] == n // per_attempt
    assert w.spool.state(name) is State.FAILED
    error = w.spool.read_error(name)["error"]
    assert f"released {RELEASES_PER_ATTEMPT} times in a row" in error
    assert "service says 503" in error and w.sink.dead_count() == 0


def test_an_outage_releases_a_batch_uncounted_however_often(app) -> None:
    """Nothing gets done while the service is down: its releases never count (infrastructure
    failures are not poison), however many there are."""
    from lrq.worker import RELEASES_PER_ATTEMPT

    def down(items):
        raise Retryable("service says 503")

    name = publish(app, 4)
    q = queue(app)
    w = app.worker(q)
    w.handler = down
    for _ in range(RELEASES_PER_ATTEMPT * q.max_attempts + 5):
        with pytest.raises(Retryable):
            w.run_named(name)
    assert w.spool.state(name) is State.PENDING and w.spool.attempts(name)["attempts"] == 0
