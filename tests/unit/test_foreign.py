"""Entries lrq did not write in a queue's folders (directories, FIFOs, symlinks) are skipped
and reported; the reaper, cleanup, status and workers go on with the real batches."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lrqtest import load_app, lrq, write_config

from lrq import cleanup
from lrq.spool import Spool, State


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
    assert sp.claim(names[0]) is not None  # a real claim beside them, its heartbeat to go stale
    stale = sp.stale_claims(lease=1, now=sp.clock() + 100)
    assert [s.name for s in stale] == [names[0]]
    st = app.status().queue("docs")
    assert (st.counts.pending, st.counts.claimed) == (2, 1)
    assert st.foreign_count == len(planted)
    reports = cleanup.run(app, now=sp.clock() + 10**9)
    assert not reports[0].skipped and reports[0].reclaimed == [names[0]]
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


CHECK_UNREADABLE = """
import sys
from pathlib import Path
from lrq.errors import BatchCorrupt
from lrq.spool import Spool
sp = Spool(Path(sys.argv[1]), "q", key=b"k")
good, unreadable = sys.argv[2], sys.argv[3]
assert sp.pending() == sorted([good, unreadable]), sp.pending()
assert sp.stale_claims(lease=0, now=sp.clock() + 100) == []
try:
    sp.load(unreadable)
    raise SystemExit("loaded an unreadable file")
except BatchCorrupt as e:
    assert "unreadable" in str(e), e
assert sp.load(good).items == [{"doc_id": "a"}]
print(sorted(sp.foreign().values()))
"""


def test_unreadable_files_are_skipped_and_reported(tmp_path: Path) -> None:
    """A claim and a batch file this process may not read: reported, not raised. Root reads
    anything, so as root the check runs as ``nobody`` (CI is root)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="lrq-unreadable-"))  # tmp_path's parents are 0700
    try:
        sp = Spool(base, "q", key=b"k").ensure()
        good = sp.publish([{"doc_id": "a"}])
        unreadable = sp.publish([{"doc_id": "b"}])
        os.chmod(sp.left / f"{unreadable}.pkl", 0)
        claim = sp.right / "20200101T000000000000-notmine"
        claim.write_text("{}")
        os.chmod(claim, 0)
        argv = [sys.executable, "-c", CHECK_UNREADABLE, str(base), good, unreadable]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("needs setpriv to drop root")
            for root, dirs, files in os.walk(base):  # mode 000 stops the owner too
                for d in [root, *(os.path.join(root, x) for x in dirs + files)]:
                    os.chown(d, 65534, 65534)
            argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                           cwd=Path(__file__).parents[2])
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("unreadable (Permission denied)") == 2, r.stdout
        assert "foreign-entry" in r.stderr and "not lrq's; remove it" in r.stderr
    finally:
        shutil.rmtree(base)
