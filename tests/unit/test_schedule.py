"""The scheduler's relay of worker-process log lines."""
from __future__ import annotations

import logging
import math

import pytest

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
