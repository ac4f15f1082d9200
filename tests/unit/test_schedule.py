"""The scheduler's relay of worker-process log lines."""
from __future__ import annotations

import logging

import pytest

from lrq.schedule import child_line


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
