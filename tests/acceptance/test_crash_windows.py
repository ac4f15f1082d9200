"""Each crash window, with a real process killed at it: then the reaper, another worker, and
the invariant check (every item exactly once, nothing left claimed)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
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
