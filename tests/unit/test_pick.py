"""Picking a batch without listing the backlog: the lazy probe, its fallback, and races."""
from __future__ import annotations

import errno
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from lrq.spool import PROBE, SUFFIX, Spool, State, owner_alive, process_start
from lrq.spool import listing as listing_module


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "data", "q").ensure()


def backlog(spool: Spool, n: int) -> list[str]:
    """``n`` pending batches: one real publish, then its bytes under new names (no fsync)."""
    first = spool.publish([{"doc_id": "d0"}])
    data = (spool.left / f"{first}{SUFFIX}").read_bytes()
    names = [first]
    for _ in range(n - 1):
        names.append(spool.new_name())
        (spool.left / f"{names[-1]}{SUFFIX}").write_bytes(data)
    return names


def finish(spool: Spool, names: list[str]) -> None:
    for name in names:
        claim = spool.claim(name)
        assert claim is not None
        spool.mark_done(claim)


def fresh(spool: Spool, monkeypatch: pytest.MonkeyPatch | None = None) -> Spool:
    """A new Spool on the same folders, as a new worker process has; with ``monkeypatch``,
    listing the backlog fails the test."""
    sp = Spool(spool.root.parent, spool.queue)
    if monkeypatch is not None:
        def listed(*args: object, **kwargs: object) -> list[str]:
            raise AssertionError("a fresh random pick listed the whole backlog")
        monkeypatch.setattr(sp, "pending", listed)
    return sp


def test_a_fresh_pick_claims_without_listing_the_backlog(spool: Spool, monkeypatch) -> None:
    names = set(backlog(spool, 3 * PROBE))
    claim = fresh(spool, monkeypatch).pick()
    assert claim is not None and claim.name in names
    assert spool.state(claim.name) is State.CLAIMED
    assert spool.read_claim(claim.name) == claim


def test_a_fresh_pick_skips_claimed_and_done_batches(spool: Spool, monkeypatch) -> None:
    names = backlog(spool, 30)  # fewer than PROBE: the probe sees every entry
    claimed, done, pending = names[:10], names[10:20], set(names[20:])
    for name in claimed:
        assert spool.claim(name) is not None
    finish(spool, done)
    linked: list[str] = []
    real_link = os.link
    monkeypatch.setattr(os, "link",
                        lambda src, dst: linked.append(Path(dst).name) or real_link(src, dst))
    got = [fresh(spool, monkeypatch).pick().name for _ in range(len(pending))]
    assert sorted(got) == sorted(pending)
    assert sorted(linked) == sorted(pending)  # no claim was even attempted on the others
    assert all(spool.state(n) is State.CLAIMED for n in claimed)
    assert all(spool.state(n) is State.DONE for n in done)


def test_a_window_of_claimed_batches_falls_back_to_the_listing(spool: Spool, monkeypatch) -> None:
    names = backlog(spool, 3 * PROBE + 1)
    *done, last = names
    for name in done:
        assert spool.claim(name) is not None
    listings = []
    for _ in range(20):  # the random window misses the one pending batch about 2 times in 3
        sp = fresh(spool)
        real = sp.pending
        monkeypatch.setattr(sp, "pending",
                            lambda *a, real=real, **k: listings.append(1) or real(*a, **k))
        claim = sp.pick()
        assert claim is not None and claim.name == last
        assert sp.release(claim)
    assert listings  # the fallback really ran


def test_a_fresh_pick_returns_none_when_nothing_is_pending(spool: Spool) -> None:
    assert fresh(spool).pick() is None  # empty folders
    names = backlog(spool, PROBE + 10)
    finish(spool, names[:PROBE])
    for name in names[PROBE:]:
        assert spool.claim(name) is not None
    right = sorted(os.listdir(spool.right))
    assert fresh(spool).pick() is None
    assert sorted(os.listdir(spool.right)) == right  # no claim was taken or left behind
    assert os.listdir(spool.tmp) == []


def test_a_warm_pick_takes_the_rest_of_the_cached_sample(spool: Spool, monkeypatch) -> None:
    names = set(backlog(spool, 3 * PROBE))
    sp = fresh(spool, monkeypatch)
    samples = []
    real = sp._sample_left
    monkeypatch.setattr(sp, "_sample_left", lambda: samples.append(1) or real())
    got = {sp.pick().name for _ in range(PROBE)}
    assert len(got) == PROBE and got <= names
    assert len(samples) == 1  # one read of left/ served all of them


def test_the_probe_reads_a_bounded_window(spool: Spool, monkeypatch) -> None:
    backlog(spool, 3 * PROBE)
    window = fresh(spool)._sample_left()
    assert len(window) == PROBE and len(set(window)) == PROBE
    monkeypatch.setattr(listing_module, "PROBE", 5)
    assert len(fresh(spool)._sample_left()) == 5


def test_an_offset_the_filesystem_refuses_reads_from_the_start(spool: Spool, monkeypatch) -> None:
    names = set(backlog(spool, 3 * PROBE))
    real = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if pos:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    sp = fresh(spool, monkeypatch)
    assert len(sp._sample_left()) == PROBE
    claim = sp.pick()
    assert claim is not None and claim.name in names


def drain(data: str, go, results) -> None:
    """Pick until nothing is pending, with a fresh Spool (nothing cached) for every pick."""
    go.wait(timeout=60)
    got = []
    while (claim := Spool(Path(data), "q").pick()) is not None:
        got.append(claim.name)
    results.put((os.getpid(), got))


def test_racing_fresh_picks_never_get_the_same_batch(spool: Spool) -> None:
    names = backlog(spool, 5 * PROBE)
    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=drain, args=(str(spool.root.parent), go, results))
             for _ in range(6)]
    for p in procs:
        p.start()
    go.set()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    got = [name for _, won in outcome for name in won]
    assert sorted(got) == sorted(names)  # every batch once: none twice, none missed
    for pid, won in outcome:
        assert all(spool.read_claim(name).pid == pid for name in won)
    assert sum(1 for _, won in outcome if won) > 1  # it really was a race


def claim_in_child(data: str, name: str, out, done) -> None:
    claim = Spool(Path(data), "q").claim(name)
    out.put((claim.pid, claim.start))
    done.wait(timeout=60)


def test_a_forked_child_claims_with_its_own_process_start(spool: Spool) -> None:
    (name,) = backlog(spool, 1)
    assert process_start() > 0  # cached in this (the parent) process before the fork
    ctx = mp.get_context("fork")
    out, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=claim_in_child, args=(str(spool.root.parent), name, out, done))
    child.start()
    try:
        pid, start = out.get(timeout=60)
        assert pid == child.pid
        assert owner_alive(pid, start)  # the parent's start would make it look dead
        assert spool.stale_claims(lease=3600) == []
    finally:
        done.set()
        child.join(timeout=30)


@pytest.mark.parametrize("content", ["", "not json", "[]", "{}", '{"token": 1}'])
def test_owns_is_false_for_a_foreign_claim_file(spool: Spool, content: str) -> None:
    (name,) = backlog(spool, 1)
    claim = spool.claim(name)
    assert spool.owns(claim)
    (spool.right / name).unlink()
    (spool.right / name).write_text(content)
    assert not spool.owns(claim)
