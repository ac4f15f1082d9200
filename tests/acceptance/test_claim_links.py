"""Crash windows of linked claims, with real processes killed (SIGKILL): a claim is a hard
link to its worker process's owner file, done is the claim renamed, the heartbeat one touch
of the owner file, the batch in the handler recorded in it. Each test checks the queue's
folders and the database after the kill, the reap and the rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lrqtest import ROOT, lrq, write_config

from lrq.spool import Spool, State

OWNERS = "owners"  # not imported: the old code has no such folder, and these tests must run on it

SLOW = '''
import time

from workers.wordcount import handle as wordcount


def handle(items):
    time.sleep(0.3)
    return wordcount(items)
'''


def status(cfg: Path) -> dict:
    return json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]


def verify(cfg: Path, docs: int) -> None:
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert f"source {docs}, results {docs}, dead letters 0, missing 0, duplicated 0" in v.stdout
    st = status(cfg)
    assert (st["pending"], st["claimed"], st["failed"]) == (0, 0, 0)


def test_killed_during_a_heartbeat_the_claim_is_reaped_and_its_owner_file_swept(
        tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    cfg = write_config(tmp_path, docs=300, batch_size=100, chunk_size=10, handler="slow:handle",
                       lease=0.4)  # a beat every 0.1 s, inside the first handler call
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--once", env={"LRQ_FAILPOINT": "during-heartbeat"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    q = tmp_path / "data/docs"
    (owner,) = (q / OWNERS).iterdir()
    (claim,) = [p for p in (q / "right").iterdir() if "." not in p.name]
    assert os.path.samefile(owner, claim)  # the claim is the owner file, linked
    st = status(cfg)
    assert st["claimed"] == 1 and st["stale"] == 1 and st["ledger_batches"] == 0
    assert "reclaim 1 stale claims" in lrq("-c", str(cfg), "cleanup", check=True).stdout
    assert list((q / OWNERS).iterdir()) == []  # dead, and nothing links to it any more
    lrq("-c", str(cfg), "work", "--burst", check=True)
    verify(cfg, 300)
    shown = json.loads(lrq("-c", str(cfg), "show", claim.name, check=True).stdout)
    assert shown["state"] == "done" and shown["attempts"]["attempts"] == 1


def test_killed_after_the_commit_before_the_rename_the_batch_is_finalized(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=200, batch_size=100)
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--once", env={"LRQ_FAILPOINT": "after-commit"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    right = tmp_path / "data/docs/right"
    (claim,) = right.iterdir()
    assert not (right / f"{claim.name}.done").exists() and status(cfg)["ledger_batches"] == 1
    lrq("-c", str(cfg), "cleanup", check=True)
    r = lrq("-c", str(cfg), "work", "--burst", check=True)
    assert "finalized queue=docs" in r.stderr
    verify(cfg, 200)
    assert list((tmp_path / "data/docs/left").iterdir()) == []  # done batches leave left/
    assert len(list((tmp_path / "data/docs/done").glob("*.pkl"))) == 2
    assert not [p for p in right.iterdir() if not p.name.endswith(".attempt")]  # no claim kept


def test_killed_after_the_move_to_done_the_claim_is_removed_without_a_reap(
        tmp_path: Path) -> None:
    """The batch is in done/ and its claim still in right/: status shows it done (not
    claimed, settled), cleanup removes the claim without counting an attempt or splitting."""
    cfg = write_config(tmp_path, docs=200, batch_size=100)
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--once", env={"LRQ_FAILPOINT": "after-done-move"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    q = tmp_path / "data/docs"
    (claim,) = (q / "right").iterdir()
    assert (q / "done" / f"{claim.name}.pkl").exists() and not (q / "left" / f"{claim.name}.pkl").exists()
    st = status(cfg)
    assert (st["claimed"], st["done"], st["pending"], st["ledger_batches"]) == (0, 1, 1, 1)
    sp = Spool(q.parent, "docs")
    assert sp.state(claim.name) is State.DONE and sp.claimed() == []
    r = lrq("-c", str(cfg), "cleanup", check=True)
    assert "reclaim 0 stale claims" in r.stdout and "split 0 batches" in r.stdout
    assert list((q / "right").iterdir()) == []  # claim gone, no .attempt: nothing was counted
    lrq("-c", str(cfg), "work", "--burst", check=True)
    verify(cfg, 200)
    assert len(list((q / "done").iterdir())) == 2 and list((q / "right").iterdir()) == []


CHILD = '''
import os, signal, sys
from pathlib import Path
from lrq.spool import Spool
sp = Spool(Path(sys.argv[1]), "q")
stored, handling = sp.claim(sys.argv[2]), sp.claim(sys.argv[3])
sp.mark_handled(stored)  # its handler calls are over; the other's are running
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_dead_owner_s_death_is_charged_to_the_batch_in_its_handler(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "q").ensure()
    stored, handling = sp.publish([{"k": 1}]), sp.publish([{"k": 2}])
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), stored, handling],
                       cwd=ROOT, timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert os.path.samefile(sp.right / stored, sp.right / handling)  # one owner file
    by_name = {s.name: s for s in sp.stale_claims(lease=3600)}
    assert by_name[stored].dead and by_name[stored].collateral
    assert by_name[handling].dead and not by_name[handling].collateral
    assert sp.reap(by_name[stored], 3) == "requeued" and sp.attempts(stored)["attempts"] == 0
    assert sp.reap(by_name[handling], 3) == "requeued" and sp.attempts(handling)["attempts"] == 1
    assert sp.state(stored) is State.PENDING and sp.state(handling) is State.PENDING
    assert sp.sweep_owners() == 1 and list((sp.root / OWNERS).iterdir()) == []
