"""Entries lrq did not write in a queue's folders (directories, FIFOs, symlinks) are skipped
and reported; the reaper, cleanup, status and workers go on with the real batches."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lrq import cleanup
from lrq.spool import State
from lrqtest import load_app, lrq, write_config


def plant(sp) -> list[Path]:
    """A directory, a FIFO and a symlink in left/ and right/ (also under claim, marker and
    attempt names), and a directory in tmp/ and failed/."""
    planted = [sp.left / "20200101T000000000000-dir.pkl", sp.right / "20200101T000000000000-dir",
               sp.right / "20200101T000000000001-x.done", sp.tmp / "junkdir",
               sp.failed / "20200101T000000000002-y.pkl"]
    for p in planted:
        p.mkdir()
    fifos = [sp.left / "20200101T000000000003-fifo.pkl", sp.right / "20200101T000000000003-fifo",
             sp.right / "20200101T000000000004-z.attempt"]
    for p in fifos:
        os.mkfifo(p)
    link = sp.right / "20200101T000000000005-link"
    link.symlink_to("/dev/zero")  # reading it would never end
    return planted + fifos + [link]


@pytest.fixture
def app(tmp_path: Path):
    return load_app(write_config(tmp_path, docs=None, chunk_size=50, lease=1))


def test_foreign_entries_are_skipped_and_reported_and_real_batches_go_through(
        app, caplog: pytest.LogCaptureFixture) -> None:
    q = app.queues("docs")[0]
    sp = app.spool(q)
    names = [sp.publish([{"doc_id": f"d{b}-{i}", "content": "a b"} for i in range(5)])
             for b in range(3)]
    planted = plant(sp)
    assert sorted(sp.pending()) == sorted(names)
    c = sp.counts()
    assert (c.pending, c.claimed, c.done, c.failed) == (3, 0, 0, 0)
    assert sp.stale_claims(lease=0, now=sp.clock() + 100) == []
    st = app.status()["queues"]["docs"]
    assert st["pending"] == 3
    assert st["foreign"]["count"] == len(planted)
    reports = cleanup.run(app, now=sp.clock() + 10**9)
    assert not reports[0].skipped
    w = app.worker(q)
    w.run(burst=True)
    assert w.stats.batches == 3 and w.stats.failed == 0
    assert all(sp.state(n) is State.DONE for n in names)
    cleanup.run(app, now=sp.clock() + 10**9)  # retention removes the done batches, not the rest
    assert all(os.path.lexists(p) for p in planted)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("foreign-entry")]
    assert len(warnings) == len(planted), warnings  # once each, however often they were seen
    assert all("not lrq's; remove it" in m for m in warnings)


def test_status_and_cleanup_commands_report_foreign_entries(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=200, lease=1)
    app = load_app(cfg)
    sp = app.spool(app.queues("docs")[0])
    planted = plant(sp)
    r = lrq("-c", str(cfg), "cleanup", timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "foreign-entry" in r.stderr
    r = lrq("-c", str(cfg), "status", timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{len(planted)} entries lrq did not write" in r.stdout
    st = json.loads(lrq("-c", str(cfg), "status", "--json", check=True, timeout=60).stdout)
    assert st["queues"]["docs"]["foreign"]["count"] == len(planted)
    lrq("-c", str(cfg), "sniff", check=True, timeout=60)
    lrq("-c", str(cfg), "work", "--burst", check=True, timeout=60)
    st = json.loads(lrq("-c", str(cfg), "status", "--json", check=True, timeout=60).stdout)
    assert st["queues"]["docs"]["ledger_items"] == 200
