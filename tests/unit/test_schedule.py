"""The scheduler's relay of worker-process log lines, and how an idle one waits."""
from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import pytest
from lrqtest import load_app, poll, write_config

from lrq import schedule
from lrq.schedule import child_line, sniff_seconds


@pytest.mark.parametrize("line, expected", [
    ("WARNING lrq.worker: released queue=docs\n", (logging.WARNING, "lrq.worker: released queue=docs")),
    ("INFO lrq: finished\n", (logging.INFO, "lrq: finished")),
    ("ERROR!! my handler printed this\n", (logging.INFO, "ERROR!! my handler printed this")),
    ("OK\n", (logging.INFO, "OK")),
    ("Traceback (most recent call last):\n", (logging.INFO, "Traceback (most recent call last):")),
    ("\n", (logging.INFO, "")),
])
def test_child_lines_always_map_to_a_level(line: str, expected: tuple[int, str]) -> None:
    assert child_line(line) == expected
    logging.getLogger("lrq.child").log(*child_line(line))  # never raises


@pytest.mark.parametrize("interval", [0.05, 0.1, 0.3, 1.0, 2.0, 7.0, 30.0])
def test_a_sniff_run_ends_just_before_a_firing_of_its_interval(interval: float) -> None:
    """A run still paused on max_pending returns at the end of its time; ending just before
    a firing lets the next run start then, not one interval later (runs firing meanwhile
    are skipped)."""
    seconds = sniff_seconds(interval)
    gap = math.ceil(seconds / interval) * interval - seconds  # to the firing after its end
    assert 0 < gap <= 0.05 + 1e-9
    assert 5.0 - 0.05 <= seconds < 5.0 + interval


def test_an_idle_scheduler_has_no_polling_supervise_job_and_stops_on_its_flag(
        tmp_path: Path) -> None:
    """Without ``until_idle`` only the stop flag ends a run: a job waits on it (one run for the
    scheduler's life) instead of an APScheduler job firing four times a second, each run
    ~0.5 ms of an idle scheduler's CPU. The flag set while the scheduler runs stops it."""
    r = schedule.Runner(load_app(write_config(tmp_path, docs=10)))
    seen: list[Any] = []

    def watch() -> None:
        if poll(lambda: r.scheduler.running and r.scheduler.get_job("supervise") is None
                and r.scheduler.get_job("sniff:docs") is not None, seconds=30):
            seen.extend(type(j.trigger).__name__ for j in r.scheduler.get_jobs())
        r.stop.set()

    t = threading.Thread(target=watch)
    t.start()
    try:
        assert r.run() == 0  # returns once the flag is seen
    finally:
        r.stop.set()
        t.join(timeout=60)
    assert sorted(seen) == ["IntervalTrigger"] * 3  # sniff, work, cleanup: no supervise poll
