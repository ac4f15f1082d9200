"""The scheduler and a broken handler: a worker exiting with HandlerBroken.exit_code pauses
its queue (doubling, capped, one worker at a time after), or stops an --until-idle run."""
from __future__ import annotations

from pathlib import Path

from lrq import schedule
from lrq.errors import HandlerBroken
from lrqtest import load_app, write_config


def runner(tmp_path: Path, until_idle: bool) -> schedule.Runner:
    return schedule.Runner(load_app(write_config(tmp_path, docs=10)), until_idle=until_idle)


def test_a_broken_handler_pauses_its_queue_doubling_up_to_the_cap(tmp_path: Path, caplog) -> None:
    r = runner(tmp_path, until_idle=False)
    q = r.app.queues("docs")[0]
    assert not r._paused(q)
    waits = []
    for _ in range(7):
        r._pause(q)
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
    r._pause(r.app.queues("docs")[0])
    assert r.stop.is_set() and HandlerBroken.exit_code == 4
