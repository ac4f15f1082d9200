"""Leases: stale claims (dead owner, old heartbeat) are taken back; max_attempts ends in failed/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrq import cleanup
from lrq.spool import Spool, State
from lrqtest import load_app, write_config


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "data", "q").ensure()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def forge_owner(spool: Spool, name: str, **fields) -> None:
    path = spool.right / name
    record = {**json.loads(path.read_text()), **fields}
    path.write_text(json.dumps(record))


def test_live_claims_are_not_stale(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    claim = spool.claim(name)
    assert spool.stale_claims(lease=60) == []
    assert spool.heartbeat(claim)


def test_dead_owner_is_detected_at_once_and_the_batch_requeued(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    spool.claim(name)
    forge_owner(spool, name, pid=dead_pid())
    (stale,) = spool.stale_claims(lease=3600)
    assert "is dead" in stale.reason and stale.attempt == 1
    assert spool.reap(stale, max_attempts=3) == "requeued"
    assert spool.state(name) is State.PENDING
    assert spool.attempts(name)["attempts"] == 1
    assert spool.claim(name).attempt == 2  # the next claim counts on


def test_a_reused_pid_is_not_mistaken_for_the_owner(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    spool.claim(name)
    forge_owner(spool, name, start=12345)  # our pid, another process start time
    assert [s.name for s in spool.stale_claims(lease=3600)] == [name]


def test_old_heartbeat_expires_the_lease(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    claim = spool.claim(name)
    forge_owner(spool, name, host="another-host")  # cannot check the pid: the lease decides
    now = time.time()
    assert spool.stale_claims(lease=60, now=now + 30) == []
    (stale,) = spool.stale_claims(lease=60, now=now + 61)
    assert "no heartbeat" in stale.reason
    os.utime(spool.right / name, (now + 50, now + 50))  # a heartbeat
    assert spool.stale_claims(lease=60, now=now + 61) == []


def test_reaped_owner_loses_its_lease(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    claim = spool.claim(name)
    forge_owner(spool, name, pid=dead_pid())
    spool.reap(spool.stale_claims(lease=60)[0], max_attempts=3)
    assert not spool.heartbeat(claim) and not spool.owns(claim)
    assert not spool.release(claim)


def test_max_attempts_moves_the_batch_to_failed_with_its_history(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    for attempt in (1, 2, 3):
        c = spool.claim(name)
        assert c.attempt == attempt
        forge_owner(spool, name, pid=dead_pid())
        outcome = spool.reap(spool.stale_claims(lease=60)[0], max_attempts=3)
    assert outcome == "failed"
    assert spool.state(name) is State.FAILED
    err = spool.read_error(name)
    assert "gave up after 3 attempts" in err["error"] and len(err["history"]) == 3
    assert spool.requeue(name) == "requeued from failed/"
    assert spool.state(name) is State.PENDING and spool.claim(name).attempt == 1


def test_only_one_reaper_wins(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    spool.claim(name)
    forge_owner(spool, name, pid=dead_pid())
    stale = spool.stale_claims(lease=60)[0]
    assert spool.reap(stale, 3) == "requeued"
    assert spool.reap(stale, 3) == "gone"
    assert spool.attempts(name)["attempts"] == 1


def test_cleanup_reports_and_dry_run_changes_nothing(tmp_path: Path) -> None:
    app = load_app(write_config(tmp_path, docs=None))
    q = app.queues("docs")[0]
    sp = app.spool(q)
    name = sp.publish([{"doc_id": "a"}])
    live = sp.publish([{"doc_id": "b"}])
    sp.claim(name)
    sp.claim(live)
    forge_owner(sp, name, pid=dead_pid())
    orphan = sp.tmp / "orphan.pkl.123"
    orphan.write_bytes(b"x" * 100)
    old = time.time() - 2 * 3600
    os.utime(orphan, (old, old))
    fresh = sp.tmp / "fresh.pkl.456"
    fresh.write_bytes(b"y")
    (report,) = cleanup.run(app, dry_run=True)
    assert report.reclaimed == [name] and report.tmp_removed == 1 and report.bytes_freed == 100
    assert sp.state(name) is State.CLAIMED and orphan.exists()
    (report,) = cleanup.run(app)
    assert report.reclaimed == [name]
    assert sp.state(name) is State.PENDING and sp.state(live) is State.CLAIMED
    assert not orphan.exists() and fresh.exists()


def test_settled_is_not_fooled_by_a_claim_reaped_between_listings(spool: Spool) -> None:
    """The chaos test once lost a batch this way: the scheduler asked "pending?" (no: it was
    claimed by a dead worker), the reaper took the claim back, then "claimed?" (no): idle, exit.
    """
    name = spool.publish([{"k": 1}])
    spool.claim(name)
    forge_owner(spool, name, pid=dead_pid())
    stale = spool.stale_claims(lease=60)[0]
    listings = []
    real = spool._names

    def reaped_right_after_the_first_listing(folder, suffix):
        out = real(folder, suffix)
        listings.append(folder.name)
        if len(listings) == 1:
            spool.reap(stale, max_attempts=3)
        return out

    spool._names = reaped_right_after_the_first_listing
    assert not spool.settled()
    assert listings[0] == "right"
    spool._names = real
    assert spool.state(name) is State.PENDING and not spool.settled()
    c = spool.claim(name)
    assert not spool.settled()
    spool.mark_done(c)
    assert spool.settled()
