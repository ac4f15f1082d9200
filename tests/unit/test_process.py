"""Live-worker files: counted while their process runs, removed once it is gone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lrqtest import load_app, write_config

from lrq import cleanup, process
from lrq.spool import process_start


def test_live_workers_counts_running_processes_and_removes_the_rest(tmp_path: Path) -> None:
    app = load_app(write_config(tmp_path, docs=None))
    sp = app.spool(app.queues("docs")[0])
    mine = process.register_worker(sp)
    assert mine.name == f"{os.getpid()}-{process_start()}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = sp.root / process.WORKERS
    (folder / f"{gone.pid}-1").touch()  # a worker killed before it could remove its file
    (folder / f"{os.getpid()}-{process_start() + 1}").touch()  # our pid, another process
    (folder / "notes.txt").touch()  # not lrq's: left alone
    (report,) = cleanup.run(app, dry_run=True)
    assert len(list(folder.iterdir())) == 4  # a dry run removes nothing
    cleanup.run(app)
    assert sorted(p.name for p in folder.iterdir()) == sorted([mine.name, "notes.txt"])
    assert process.live_workers(sp) == [os.getpid()]
    process.unregister_workers()
    assert process.live_workers(sp) == []
