"""Claims as hard links to a per-process owner file: no inode per claim, done by rename, one
touch heartbeats every claim, the handled mark in the owner record, EMLINK rotation, owner
files swept, and entries written by the previous version still understood."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lrqtest import ROOT

from lrq.spool import OWNERS, Claim, Spool, State, owners
from lrq.spool.owners import RECORD, parse_record


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "data", "q").ensure()


def owner_files(sp: Spool) -> list[Path]:
    return sorted((sp.root / OWNERS).iterdir())


def inode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def test_claims_of_one_process_are_links_to_its_one_owner_file(spool: Spool) -> None:
    names = [spool.publish([{"k": i}]) for i in range(3)]
    claims = [spool.claim(n) for n in names]
    (owner,) = owner_files(spool)
    assert all(inode(spool.right / n) == inode(owner) for n in names)
    assert os.lstat(owner).st_nlink == 4 and all(spool.owns(c) for c in claims)
    assert oct(owner.stat().st_mode & 0o777) == "0o600"
    assert oct((spool.root / OWNERS).stat().st_mode & 0o777) == "0o700"
    assert list(spool.tmp.iterdir()) == []  # nothing written aside


def test_done_moves_the_batch_to_done_and_removes_the_claim(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    claim = spool.claim(name)
    ino = inode(spool.left / f"{name}.pkl")
    spool.mark_done(claim)
    assert os.listdir(spool.left) == [] and os.listdir(spool.right) == []
    assert inode(spool.done / f"{name}.pkl") == ino  # renamed, no new inode
    assert spool.state(name) is State.DONE and spool.pending() == [] and not spool.has_pending()
    assert spool.settled() and spool.counts().done == 1 and spool.counts().pending == 0
    assert spool.counts().done_bytes == os.stat(spool.done / f"{name}.pkl").st_size
    assert spool.claim(name) is None and not os.path.lexists(spool.right / name)
    assert spool.pick() is None


def test_a_batch_done_between_the_check_and_the_link_is_not_claimed(spool: Spool,
                                                                    monkeypatch) -> None:
    """Another worker's claim renamed to ``.done`` just before our link: the link succeeds
    (``right/<name>`` is free) and the look after it undoes it."""
    name = spool.publish([{"k": 1}])
    real = spool._link

    def done_meanwhile(owner, target):
        (spool.right / f"{name}.done").write_text("")
        return real(owner, target)

    monkeypatch.setattr(spool, "_link", done_meanwhile)
    assert spool.claim(name) is None
    assert not os.path.lexists(spool.right / name) and spool.state(name) is State.DONE


def test_a_batch_marked_done_the_previous_way_is_not_claimed(spool: Spool) -> None:
    """A ``.done`` marker alone (a claim renamed, as earlier versions marked done): no look
    before the link any more, the look after it refuses the batch and removes the link."""
    name = spool.publish([{"k": 1}])
    (spool.right / f"{name}.done").write_text("")
    assert spool.claim(name) is None and spool.pick() is None
    assert sorted(os.listdir(spool.right)) == [f"{name}.done"]
    assert spool.state(name) is State.DONE


def test_one_touch_refreshes_the_lease_of_every_claim(spool: Spool) -> None:
    names = [spool.publish([{"k": i}]) for i in range(3)]
    claims = [spool.claim(n) for n in names]
    (owner,) = owner_files(spool)
    old = time.time() - 3600
    os.utime(owner, (old, old))
    assert sorted(s.name for s in spool.stale_claims(lease=60)) == sorted(names)
    assert spool.beat(claims) == [True, True, True]
    assert spool.stale_claims(lease=60) == []
    spool.release(claims[0])
    assert spool.beat(claims) == [False, True, True]  # lost: no longer ours


def test_mark_handled_rewrites_the_owner_record_in_place(spool: Spool) -> None:
    a, b = spool.publish([{"k": 1}]), spool.publish([{"k": 2}])
    ca, cb = spool.claim(a), spool.claim(b)
    (owner,) = owner_files(spool)
    assert parse_record(owner.read_bytes())["handling"] == [a, b]
    spool.mark_handled(ca)
    raw = owner.read_bytes()
    assert len(raw) == RECORD and parse_record(raw)["handling"] == [b]
    assert inode(owner) == inode(spool.right / a)  # the same inode: no new file
    spool.mark_done(cb)
    assert parse_record(owner.read_bytes())["handling"] == []


def test_mark_done_sets_the_done_time_retention_ages_from(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    old = time.time() - 3600
    os.utime(spool.left / f"{name}.pkl", (old, old))
    spool.mark_done(spool.claim(name))
    ((done_at, done),) = spool.done_batches()
    assert done == name and abs(done_at - time.time()) < 60


def test_at_the_link_limit_a_new_owner_file_is_started(spool: Spool) -> None:
    spool.link_cap = 3  # the owner file itself is one link: two claims per file
    names = [spool.publish([{"k": i}]) for i in range(5)]
    claims = [spool.claim(n) for n in names]
    assert all(c is not None for c in claims)
    spool.mark_done(claims[0])  # a done marker keeps its link
    owners = owner_files(spool)
    assert len(owners) == 3
    assert all(os.lstat(o).st_nlink <= 3 for o in owners)
    assert all(spool.owns(c) for c in claims[1:])
    old = time.time() - 3600
    for o in owners:
        os.utime(o, (old, old))
    assert spool.beat(claims[1:]) == [True] * 4
    assert spool.stale_claims(lease=60) == []  # every owner file was touched


def run_child(data: Path, script: str) -> None:
    code = ("import os, sys; from pathlib import Path; from lrq.spool import Spool; "
            f"sp = Spool(Path({str(data)!r}), 'q'); {script}")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_owner_files_go_once_nothing_links_to_them(spool: Spool) -> None:
    data = spool.root.parent
    a, b = spool.publish([{"k": 1}]), spool.publish([{"k": 2}])
    # Exits normally with no links left: removes its own owner file.
    run_child(data, f"c = sp.claim({a!r}); sp.release(c)")
    assert owner_files(spool) == []
    # Killed (no exit handlers) with a claim linking to it: kept while linked.
    run_child(data, f"sp.claim({b!r}); os._exit(0)")
    (owner,) = owner_files(spool)
    assert spool.sweep_owners() == 0 and owner.exists()
    os.unlink(spool.right / b)
    assert spool.sweep_owners() == 1 and owner_files(spool) == []
    # A live process's owner file is never swept, linked or not.
    spool.release(spool.claim(a))
    assert spool.sweep_owners() == 0 and len(owner_files(spool)) == 1


def old_claim(sp: Spool, name: str, pid: int, mode: int = 0o600) -> None:
    """A claim file as the previous version wrote it: its own inode, the owner record."""
    path = sp.right / name
    path.write_text(json.dumps({"name": name, "token": f"t{name}", "attempt": 1,
                                "host": os.uname().nodename, "pid": pid, "start": 0,
                                "claimed_at": time.time()}))
    path.chmod(mode)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_entries_of_the_previous_version_are_understood(spool: Spool) -> None:
    claimed, stored, done = (spool.publish([{"k": i}]) for i in range(3))
    pid = dead_pid()
    old_claim(spool, claimed, pid)
    old_claim(spool, stored, pid, mode=0o400)  # handled: only storing was left
    old_claim(spool, done, os.getpid())
    (spool.right / f"{done}.done").write_text(json.dumps({"token": f"t{done}", "done_at": 1.0}))
    assert [spool.state(n) for n in (claimed, stored, done)] == [State.CLAIMED, State.CLAIMED,
                                                                 State.DONE]
    assert spool.pending() == [] and spool.claim(done) is None and spool.claim(claimed) is None
    assert spool.read_claim(claimed).pid == pid
    assert spool.owns(Claim(claimed, f"t{claimed}", 1, "h", pid, 0, 0.0))
    by_name = {s.name: s for s in spool.stale_claims(lease=3600)}
    assert set(by_name) == {claimed, stored}
    assert by_name[stored].collateral and not by_name[claimed].collateral
    assert spool.reap(by_name[claimed], 3) == "requeued"
    assert spool.attempts(claimed)["attempts"] == 1 and spool.claim(claimed).attempt == 2
    assert [n for _t, n in spool.done_batches()] == [done]
    spool.remove_done(done)
    assert spool.state(done) is State.MISSING and not list(spool.right.glob(f"{done}*"))


def test_the_record_keeps_the_newest_names_in_the_handler_within_its_size(spool: Spool) -> None:
    """Claims lost to the reaper are never marked handled by their owner: the record keeps
    only the newest names (it once re-encoded itself per name dropped: minutes at 3,000)."""
    names = [spool.publish([{"k": i}]) for i in range(40)]
    for n in names:
        assert spool.claim(n) is not None
    (owner,) = owner_files(spool)
    raw = owner.read_bytes()
    assert len(raw) == RECORD and parse_record(raw)["handling"] == names[-16:]


def test_a_batch_claimed_again_by_the_same_process_is_not_the_old_claim(tmp_path: Path) -> None:
    """All of a process's claims link one inode: after a reaper took a stalled claim back and
    the same process claimed the batch again, the old claim is not ours (its store-behind
    must not commit), and the first reaper's old verdict does not take the new claim back."""
    sp = Spool(tmp_path, "q", key=b"k" * 32).ensure()
    name = sp.publish([{"id": 1}])
    c1 = sp.claim(name)
    assert c1 is not None
    old = time.time() - 1000
    os.utime(sp.owner().path, (old, old))  # the process stalled past the lease
    stale = sp.stale_claims(lease=60)
    assert [s.name for s in stale] == [name]
    assert sp.reap(stale[0], max_attempts=5) == "requeued"
    c2 = sp.claim(name)
    assert c2 is not None and c2.attempt == 2
    assert not sp.owns(c1)
    assert sp.owns(c2)
    assert sp.reap(stale[0], max_attempts=5) == "gone"  # a reaper acting on its old list
    assert sp.owns(c2) and sp.attempts(name)["attempts"] == 1


def test_a_claim_after_an_idle_spell_is_fresh_from_its_link(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim's heartbeat is its owner file's mtime: a process idle past the lease refreshes
    it before linking, so a reaper looking between the link and the record's write does not
    see the new claim as stale."""
    sp = Spool(tmp_path, "q", key=b"k" * 32).ensure()
    a, b = sp.publish([{"id": 1}]), sp.publish([{"id": 2}])
    ca = sp.claim(a)
    assert ca is not None
    sp.mark_done(ca)
    old = time.time() - 1000
    os.utime(sp.owner().path, (old, old))
    seen: dict[str, list[str]] = {}
    real = owners.Owner.handling

    def spy(self: owners.Owner, name: str, on: bool, oid: owners.OwnerId) -> None:
        if on:  # linked, the record not yet written: what a reaper sees now
            seen["stale"] = [s.name for s in sp.stale_claims(lease=60)]
        real(self, name, on, oid)

    monkeypatch.setattr(owners.Owner, "handling", spy)
    assert sp.claim(b) is not None
    assert seen["stale"] == []


def test_a_forked_child_claims_with_its_own_owner_file(spool: Spool) -> None:
    """The owner lives on the spool, not in a module registry: a child forked after the
    parent claimed makes its own owner file (its pid in the record, so the reaper tells
    its claims from the parent's), and leaves the parent's file alone when it exits."""
    a, b = spool.publish([{"k": 1}]), spool.publish([{"k": 2}])
    ca = spool.claim(a)
    assert ca is not None
    parent = spool.owner()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        ok = 0
        try:
            cb = spool.claim(b)
            ok = int(cb is not None and cb.pid == os.getpid() and spool.owner() is not parent
                     and inode(spool.right / b) != inode(parent.path))
            spool.owner().close()
            parent.close()  # the parent's: a no-op in the child
        finally:
            os.write(w, bytes([ok]))
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"\x01"
    os.close(r)
    os.waitpid(pid, 0)
    assert spool.owner() is parent and spool.owns(ca) and parent.path.exists()
    child_claim = spool.read_claim(b)
    assert child_claim is not None and child_claim.pid == pid
    assert len(owner_files(spool)) == 2  # the child's is still linked by its claim


def test_each_spool_holds_its_own_owner_and_removes_it_when_collected(tmp_path: Path) -> None:
    """No module-global registry: a spool's owner file is its own and goes with it (when
    nothing links to it any more) instead of living until the interpreter exits."""
    import gc

    a, b = Spool(tmp_path, "q").ensure(), Spool(tmp_path, "q")
    name = a.publish([{"k": 1}])
    a.release(a.claim(name))
    assert a.owner() is not b.owner() and len(owner_files(a)) == 2
    del b
    gc.collect()
    assert owner_files(a) == [a.owner().path]


def test_owner_files_count_once_in_the_byte_totals(spool: Spool) -> None:
    """``lrq status`` and the byte budget count the owner files, and a claim (a hard link to
    one) does not count its owner's bytes again: two claims and a released one hold one
    owner file of RECORD bytes, not two or none."""
    from lrq.disk import usage

    names = [spool.publish([{"k": i}]) for i in range(3)]
    batches = sum(os.stat(spool.left / f"{n}.pkl").st_size for n in names)
    claims = [spool.claim(n) for n in names]
    spool.release(claims[2])
    assert len(owner_files(spool)) == 1 and len(list(spool.right.iterdir())) == 2
    assert spool.counts().bytes == batches + RECORD
    assert usage(spool.root.parent, ["q"], None) == batches + RECORD
    for c in claims[:2]:
        spool.release(c)
    assert spool.counts().bytes == batches + RECORD  # no claim: the owner file still counts
    assert usage(spool.root.parent, ["q"], None) == batches + RECORD
