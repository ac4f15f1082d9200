"""Each crash window, with a real process killed at it: then the reaper, another worker, and
the invariant check (every item exactly once, nothing left claimed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lrqtest import ROOT, killed_on_exit, lrq, poll, write_config


def status(cfg: Path) -> dict:
    return json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]


def killed_at(point: str, *args: str) -> subprocess.CompletedProcess[str]:
    r = lrq(*args, env={"LRQ_FAILPOINT": point})
    assert r.returncode == -signal.SIGKILL, f"{point} was not reached: {r.returncode}\n{r.stderr}"
    return r


def assert_exactly_once(cfg: Path, docs: int) -> None:
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert f"source {docs}, results {docs}, dead letters 0, missing 0, duplicated 0" in v.stdout
    st = status(cfg)
    assert (st["pending"], st["claimed"], st["failed"]) == (0, 0, 0)


@pytest.mark.parametrize("point, recorded", [("after-claim", False), ("during-txn", False),
                                             ("after-commit", True)])
def test_worker_killed_in_each_window(tmp_path: Path, point: str, recorded: bool) -> None:
    cfg = write_config(tmp_path, docs=500, batch_size=100)
    lrq("-c", str(cfg), "sniff", check=True)
    killed_at(point, "-c", str(cfg), "work", "--once")
    st = status(cfg)
    assert st["claimed"] == 1 and st["stale"] == 1
    assert st["ledger_batches"] == (1 if recorded else 0)  # the transaction is all or nothing
    r = lrq("-c", str(cfg), "cleanup", check=True)
    assert "reclaim 1 stale claims" in r.stdout
    r = lrq("-c", str(cfg), "work", "--burst", check=True)
    if recorded:
        assert "finalized queue=docs" in r.stderr
    assert_exactly_once(cfg, 500)
    (attempt_file,) = (tmp_path / "data/docs/right").glob("*.attempt")
    shown = json.loads(lrq("-c", str(cfg), "show", attempt_file.stem, check=True).stdout)
    assert shown["attempts"]["attempts"] == 1 and "is dead" in shown["attempts"]["history"][0]["reason"]


def test_sniffer_killed_mid_write_leaves_nothing_visible(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=500, batch_size=100)
    killed_at("sniff-mid-write", "-c", str(cfg), "sniff")
    st = status(cfg)
    assert st["pending"] == 0 and st["position"] is None
    assert len(list((tmp_path / "data/docs/tmp").iterdir())) == 1  # the orphan
    lrq("-c", str(cfg), "sniff", check=True)
    lrq("-c", str(cfg), "work", "--burst", check=True)
    assert_exactly_once(cfg, 500)


def test_sniffer_killed_after_rename_before_the_watermark(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=500, batch_size=100)
    killed_at("sniff-after-rename", "-c", str(cfg), "sniff")
    st = status(cfg)
    assert st["pending"] == 1 and st["position"] is None  # published, not acknowledged
    lrq("-c", str(cfg), "sniff", check=True)
    assert status(cfg)["pending"] == 6  # the first 100 items twice
    lrq("-c", str(cfg), "work", "--burst", check=True)
    assert_exactly_once(cfg, 500)  # the unique keys absorbed the replay


@pytest.mark.parametrize("point", ["sniff-before-dir-sync", "sniff-before-position"])
def test_sniffer_killed_in_a_group_commit_before_the_watermark(tmp_path: Path, point: str) -> None:
    """Group commit: the tick's five batches are renamed into left/, then left/ is fsynced
    once, then the position saved. Killed before the fsync or before the position: the
    whole group is published again and absorbed."""
    cfg = write_config(tmp_path, docs=500, batch_size=100)
    killed_at(point, "-c", str(cfg), "sniff")
    st = status(cfg)
    assert st["pending"] == 5 and st["position"] is None  # the group visible, not acknowledged
    assert not list((tmp_path / "data/docs/tmp").iterdir())  # every file was renamed
    lrq("-c", str(cfg), "sniff", check=True)
    assert status(cfg)["pending"] == 10  # the group again: the position had not moved
    lrq("-c", str(cfg), "work", "--burst", check=True)
    assert_exactly_once(cfg, 500)


SLOW = '''
import time
def handle(items):
    time.sleep(0.3)  # a slow model call
    return [{"doc_id": i["doc_id"]} for i in items]
'''


def test_sigterm_past_the_grace_period_releases_the_batch_uncounted(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    cfg = write_config(tmp_path, docs=200, batch_size=100, chunk_size=5, handler="slow:handle",
                       top={"grace": 1})
    lrq("-c", str(cfg), "sniff", check=True)
    w = subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "work", "--burst"],
                         cwd=ROOT, text=True, stderr=subprocess.PIPE)
    with killed_on_exit(w):
        assert poll(lambda: status(cfg)["claimed"] == 1)
        w.send_signal(signal.SIGTERM)
        _, err = w.communicate(timeout=30)
    assert w.returncode == 0, err
    assert "reason=shutdown" in err
    st = status(cfg)
    assert st["claimed"] == 0 and st["pending"] == 2 and st["ledger_batches"] == 0
    for p in (tmp_path / "data/docs/left").glob("*.pkl"):
        shown = json.loads(lrq("-c", str(cfg), "show", p.stem, check=True).stdout)
        assert "attempts" not in shown  # shutting down is not a failed attempt


def test_sniffer_killed_taking_a_spare_leaves_an_empty_orphan(tmp_path: Path) -> None:
    """Killed after renaming a spare into tmp/, before writing it: nothing visible, the
    position unmoved; the orphan is empty and swept like any other once it ages."""
    cfg = write_config(tmp_path, docs=500, batch_size=100)
    lrq("-c", str(cfg), "status", check=True)  # creates the folders
    spare = tmp_path / "data/docs/spare"
    for i in range(3):
        (spare / f"s{i}").write_bytes(b"")
        (spare / f"s{i}").chmod(0o600)
    inodes = {p.stat().st_ino for p in spare.iterdir()}
    killed_at("spare-after-take", "-c", str(cfg), "sniff")
    st = status(cfg)
    assert st["pending"] == 0 and st["position"] is None
    (orphan,) = (tmp_path / "data/docs/tmp").iterdir()
    assert orphan.stat().st_size == 0 and orphan.stat().st_ino in inodes
    assert len(list(spare.iterdir())) == 2
    lrq("-c", str(cfg), "sniff", check=True)
    published = {p.stat().st_ino for p in (tmp_path / "data/docs/left").iterdir()}
    assert len(published & inodes) == 2  # the two spares left were taken
    lrq("-c", str(cfg), "work", "--burst", check=True)
    assert_exactly_once(cfg, 500)


def test_cleanup_killed_retiring_a_done_batch_leaves_it_done(tmp_path: Path) -> None:
    """Killed after emptying a done batch file, before moving it into spare/: the batch
    still reads done (an empty file in done/), and the next pass retires it."""
    cfg = write_config(tmp_path, docs=200, batch_size=100, top={"cleanup": {"keep_done": "1s"}})
    lrq("-c", str(cfg), "sniff", check=True)
    lrq("-c", str(cfg), "work", "--burst", check=True)
    done = tmp_path / "data/docs/done"
    old = time.time() - 60
    for p in done.iterdir():
        os.utime(p, (old, old))
    killed_at("retire-after-truncate", "-c", str(cfg), "cleanup")
    files = sorted(done.iterdir())
    assert len(files) == 2 and sorted(p.stat().st_size == 0 for p in files) == [False, True]
    assert status(cfg)["done"] == 2
    r = lrq("-c", str(cfg), "cleanup", check=True)
    assert "remove 2 done batches past keep_done" in r.stdout, r.stdout
    assert list(done.iterdir()) == []
    assert all(p.stat().st_size == 0 for p in (tmp_path / "data/docs/spare").iterdir())
    assert len(list((tmp_path / "data/docs/spare").iterdir())) == 2
    assert_exactly_once(cfg, 200)
