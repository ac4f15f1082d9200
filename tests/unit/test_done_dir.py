"""Done batches leave ``left/``: ``mark_done`` renames the batch file to ``done/`` and removes
the claim, so listings of the backlog cost O(pending + claimed), never O(done). Data dirs
written by the previous versions (``left/<name>.pkl`` + ``right/<name>.done``) still work."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lrq.spool import Spool, State


@pytest.fixture()
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "data", "q").ensure()


def finish(sp: Spool, n: int) -> list[str]:
    names = [sp.publish([{"k": i}]) for i in range(n)]
    for name in names:
        claim = sp.claim(name)
        assert claim is not None
        sp.mark_done(claim)
    return names


def listed(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the directory entries the spool's listings return."""
    seen: list[int] = []
    real = sp.files
    monkeypatch.setattr(sp, "files", lambda folder: seen.append(len(out := real(folder))) or out)
    return seen


def test_backlog_listings_do_not_list_done_batches(spool: Spool, monkeypatch) -> None:
    done = finish(spool, 200)
    pending = [spool.publish([{"k": i}]) for i in range(3)]
    assert sorted(os.listdir(spool.left)) == sorted(f"{n}.pkl" for n in pending)
    assert os.listdir(spool.right) == []
    assert sorted(os.listdir(spool.done)) == sorted(f"{n}.pkl" for n in done)
    seen = listed(spool, monkeypatch)
    assert sorted(spool.pending()) == sorted(pending)
    assert spool.pending_stats()[0] == 3 and spool.has_pending() and not spool.settled()
    assert max(seen) <= 3  # a left/-listing of the old layout returns 203 entries
    c = spool.counts()
    assert (c.done, c.pending, c.claimed) == (200, 3, 0)
    assert c.done_bytes == sum(os.stat(spool.done / f"{n}.pkl").st_size for n in done)
    assert spool.state(done[0]) is State.DONE and spool.is_done(done[0])
    assert spool.load(done[0]).items == [{"k": 0}]  # `lrq show` of a done batch


def old_done(sp: Spool) -> str:
    """A done batch as the previous versions left it: the file in left/, the claim renamed
    to ``right/<name>.done``."""
    name = sp.publish([{"k": "old"}])
    assert sp.claim(name) is not None
    os.rename(sp.right / name, sp.right / f"{name}.done")
    return name


def test_a_data_dir_of_the_previous_version_reads_done_and_is_retained(spool: Spool) -> None:
    old = old_done(spool)
    new = finish(spool, 1)[0]
    pending = spool.publish([{"k": "p"}])
    assert spool.state(old) is State.DONE and spool.pending() == [pending]
    assert spool.claim(old) is None and not os.path.lexists(spool.right / old)
    c = spool.counts()
    assert (c.done, c.pending, c.claimed) == (2, 1, 0)
    assert sorted(n for _, n in spool.done_batches()) == sorted([old, new])
    claim = spool.claim(pending)
    spool.mark_done(claim)
    assert spool.settled()
    for name in (old, new):
        assert spool.remove_done(name) > 0
        assert spool.state(name) is State.MISSING
    assert os.listdir(spool.left) == [] and os.listdir(spool.right) == []


def test_a_stale_listing_naming_a_moved_batch_claims_nothing(spool: Spool) -> None:
    """A worker listed the batch before another finished it: the name is free in right/, so
    the link succeeds, and the look at left/ after it undoes the link."""
    (name,) = finish(spool, 1)
    assert spool.claim(name) is None
    assert os.listdir(spool.right) == [] and spool.state(name) is State.DONE


def test_a_claim_left_beside_a_done_batch_is_removed_without_counting(spool: Spool) -> None:
    """Killed between the move to done/ and the unlink: the batch reads done, settled() does
    not wait on it, and the reaper removes the claim without an attempt or a split."""
    name = spool.publish([{"k": 1}])
    assert spool.claim(name) is not None
    os.rename(spool.left / f"{name}.pkl", spool.done / f"{name}.pkl")
    assert spool.state(name) is State.DONE and spool.claimed() == [] and spool.settled()
    assert spool.counts().claimed == 0
    assert spool.stale_claims(lease=0.0, now=time.time() + 60) == []
    assert os.listdir(spool.right) == [] and spool.state(name) is State.DONE
