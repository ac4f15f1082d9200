"""The scheduler and workers that cannot work: a worker exiting with HandlerBroken.exit_code
(or 2, its configuration) pauses its queue (doubling, capped, one worker at a time after), or
stops an --until-idle run with that exit status."""
from __future__ import annotations

from pathlib import Path

from lrqtest import load_app, lrq, write_config

from lrq import schedule
from lrq.errors import HandlerBroken


def runner(tmp_path: Path, until_idle: bool) -> schedule.Runner:
    return schedule.Runner(load_app(write_config(tmp_path, docs=10)), until_idle=until_idle)


def test_a_broken_handler_pauses_its_queue_doubling_up_to_the_cap(tmp_path: Path, caplog) -> None:
    r = runner(tmp_path, until_idle=False)
    q = r.app.queues("docs")[0]
    assert not r._paused(q)
    waits = []
    for _ in range(7):
        r._pause(q, HandlerBroken.exit_code)
        waits.append(r.broken[q.name][0])
    assert r._paused(q) and not r.stop.is_set()
    assert [m.message.split("seconds=")[1].split()[0] for m in caplog.records
            if m.message.startswith("paused")] == ["30", "60", "120", "240", "480", "600", "600"]
    r.broken[q.name] = (0.0, 7)  # the pause is over: one worker may start again ...
    assert not r._paused(q)
    r.children[1] = (q.name, None)  # ... but only one while the handler may still be broken
    assert r._paused(q)


def test_a_broken_handler_stops_an_until_idle_run_with_its_exit_status(tmp_path: Path) -> None:
    r = runner(tmp_path, until_idle=True)
    r._pause(r.app.queues("docs")[0], HandlerBroken.exit_code)
    assert r.stop.is_set() and r.stopped_by == HandlerBroken.exit_code == 4


def test_a_worker_that_exits_2_pauses_its_queue_too(tmp_path: Path, caplog) -> None:
    r = runner(tmp_path, until_idle=False)
    q = r.app.queues("docs")[0]
    r._pause(q, 2)
    assert r._paused(q) and not r.stop.is_set()
    assert any("reason=worker-config-error" in m.message for m in caplog.records)


BREAKS_IN_WORKERS = """\
import os

if os.environ.get("LRQ_CHILD"):  # the scheduler imports it fine; its worker processes do not
    raise RuntimeError("the handler's module was broken after the scheduler started")


def handle(items):
    return [{"doc_id": it["doc_id"]} for it in items]
"""


def test_run_until_idle_stops_with_exit_2_when_its_workers_cannot_start(tmp_path: Path) -> None:
    """Before, the scheduler started a new worker every tick, each failing the same way, and
    `run --until-idle` never ended."""
    (tmp_path / "breaks_in_workers.py").write_text(BREAKS_IN_WORKERS)
    cfg = write_config(tmp_path, docs=300, handler="breaks_in_workers:handle")
    run = lrq("-c", str(cfg), "run", "--until-idle", timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "importing module 'breaks_in_workers' failed: RuntimeError" in run.stderr
    assert "stopping: queue docs cannot work (worker-config-error" in run.stderr
    app = load_app(cfg)
    counts = app.spool(app.queues("docs")[0]).counts()
    assert counts.pending == 3 and counts.failed == counts.claimed == 0  # nothing lost


EXITS_IN_WORKERS = """\
import os

if os.environ.get("LRQ_CHILD"):  # like a worker that cannot reach the results database
    os._exit(1)


def handle(items):
    return [{"doc_id": it["doc_id"]} for it in items]
"""


def test_workers_that_keep_failing_holding_nothing_pause_their_queue_doubling(
        tmp_path: Path, monkeypatch, caplog) -> None:
    """Before, each failed worker was replaced at once: fork, fail, reap, in a tight loop."""
    monkeypatch.setattr(schedule, "FAILING_PAUSE", 0.05, raising=False)
    monkeypatch.setattr(schedule, "FAILING_PAUSE_MAX", 0.4, raising=False)
    (tmp_path / "exits_in_workers.py").write_text(EXITS_IN_WORKERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = write_config(tmp_path, docs=300, handler="exits_in_workers:handle",
                       workers=1)
    r = schedule.Runner(load_app(cfg), until_idle=True)
    assert r.run() == 1
    assert [m.message.split("seconds=")[1].split()[0] for m in caplog.records
            if m.message.startswith("paused")] == ["0", "0", "0"]  # 0.05, 0.1, 0.2
    assert [m.message.split("failed=")[1].split(":")[0] for m in caplog.records
            if m.message.startswith("paused")] == ["2", "3", "4"]
    assert sum(m.message.startswith("worker-exit") for m in caplog.records) == 5
    assert any(m.message.startswith("stopping: queue docs: 5 workers in a row failed")
               for m in caplog.records)
    counts = r.spools["docs"].counts()
    assert counts.pending == 3 and counts.failed == counts.claimed == 0  # nothing lost


def test_a_worker_that_held_a_batch_or_exited_0_ends_the_count(tmp_path: Path) -> None:
    r = runner(tmp_path, until_idle=False)
    q = r.app.queues("docs")[0]
    r._count_failure(q, 1, False)
    assert r.failing[q.name] == (0.0, 1)  # the first failure restarts at once
    r._count_failure(q, -9, False)
    assert r.failing[q.name][0] > 0.0 and r.failing[q.name][1] == 2
    r._count_failure(q, 1, None)  # the reap was deferred: not counted
    r._count_failure(q, 3, False)  # busy, not failing
    assert r.failing[q.name][1] == 2
    r._count_failure(q, -9, True)  # died holding a batch: the reaper isolates the killer
    assert q.name not in r.failing
    r._count_failure(q, 1, False)
    r._count_failure(q, 0, None)
    assert q.name not in r.failing
