"""Worker processes log to the scheduler's stderr and log file themselves (lrq.logfile):
whole lines from several processes, the scheduler rotating, the children following."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lrqtest import ROOT, write_config

from lrq import logfile
from lrq.launcher import Launcher

WRITER = """\
import logging, sys
from pathlib import Path
from lrq import logfile
log = logging.getLogger("lrq.worker")
log.addHandler(logfile.AppendFileHandler(Path(sys.argv[1]), logfile.child_format("docs")))
log.setLevel(logging.INFO)
for i in range(int(sys.argv[2])):
    log.info("done queue=docs n=%d pad=%s end", i, "x" * 3000)
"""


def test_lines_of_several_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "lrq.log"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), "400"], cwd=ROOT)
             for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 1200
    assert all(" INFO lrq.child: [docs " in x and x.endswith(" end") for x in lines)
    assert len({x.split("[docs ")[1].split("]")[0] for x in lines}) == 3  # three pids


def test_a_child_follows_the_schedulers_rotation(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfile, "REOPEN_EVERY", 0.0)
    path = tmp_path / "lrq.log"
    scheduler = logfile.SharedLogFile(path, maxBytes=1000, backupCount=2)
    child = logfile.AppendFileHandler(path, logfile.child_format("docs"))
    record = logging.LogRecord("lrq.worker", logging.INFO, __file__, 1, "done n=%d", (1,), None)
    for _ in range(20):
        child.emit(record)
    assert path.stat().st_size > 1000
    logfile.rotate()  # not this process's root handler: nothing happens
    assert not (tmp_path / "lrq.log.1").exists()
    scheduler.rotate_if_full()
    rotated = (tmp_path / "lrq.log.1").stat().st_size
    assert rotated > 1000 and path.stat().st_size == 0
    child.emit(record)  # reopens the path: the line lands in the new file
    assert (tmp_path / "lrq.log.1").stat().st_size == rotated
    assert "done n=1" in path.read_text()
    scheduler.rotate_if_full()  # not full: stays
    assert not (tmp_path / "lrq.log.2").exists()
    child.close()
    scheduler.close()


def test_a_forked_worker_given_the_schedulers_stderr_logs_there_itself(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=None)
    read, write = os.pipe()
    launcher = Launcher()
    child = launcher.spawn(["-c", str(cfg), "work", "docs", "--once"], "lrq work docs",
                           {**os.environ, "LRQ_CHILD": "1", logfile.QUEUE_ENV: "docs"},
                           log_fd=write)
    os.close(write)
    relayed = list(child.lines())  # the pipe: only what is not a log record
    assert child.wait(timeout=60) == 0
    with os.fdopen(read) as f:
        direct = f.read()
    line = f" INFO lrq.child: [docs {child.pid}] lrq: idle queue=docs nothing pending\n"
    assert line in direct and not any("nothing pending" in x for x in relayed)
    assert line in (tmp_path / "data" / "lrq.log").read_text()  # the log file too
