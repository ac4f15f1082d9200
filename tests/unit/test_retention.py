"""Retention and the disk budget, stepped with an injected clock; backpressure in the sniffer."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from lrqtest import load_app, write_config

from lrq import cleanup
from lrq.disk import Budget, Floor, Space
from lrq.spool import State
from lrq.testing import MemorySource

DAY = 86400.0


def make_app(tmp_path: Path, **cleanup_keys):
    c = {"keep_done": "7d", "keep_failed": "30d", **cleanup_keys}
    return load_app(write_config(tmp_path, docs=None, compress="none", top={"cleanup": c}))


def batch(sp, state: str, age_days: float = 0.0, n: int = 50) -> str:
    """A batch in ``state`` whose last change was ``age_days`` ago."""
    name = sp.publish([{"doc_id": f"{state}{i}", "pad": "x" * 200} for i in range(n)])
    when = time.time() - age_days * DAY
    if state == "pending":
        return name
    claim = sp.claim(name)
    if state == "done":
        sp.mark_done(claim)
        os.utime(sp.done / f"{name}.pkl", (when, when))  # done time: set by mark_done
    elif state == "failed":
        sp.fail(claim, "boom")
        os.utime(sp.failed / f"{name}.error", (when, when))
    return name


def test_keep_done_and_keep_failed(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    sp = app.spool(app.queues("docs")[0])
    old_done, new_done = batch(sp, "done", 8), batch(sp, "done", 6)
    old_failed, new_failed = batch(sp, "failed", 31), batch(sp, "failed", 29)
    pending, claimed = batch(sp, "pending", 100), batch(sp, "claimed", 100)
    size = (sp.done / f"{old_done}.pkl").stat().st_size
    (dry,) = cleanup.run(app, dry_run=True)
    assert (dry.done_removed, dry.failed_removed) == (1, 1) and dry.bytes_freed >= 2 * size
    assert sp.state(old_done) is State.DONE  # a dry run changes nothing
    (report,) = cleanup.run(app)
    assert (report.done_removed, report.failed_removed) == (1, 1)
    assert report.bytes_freed >= 2 * size
    assert sp.state(old_done) is State.MISSING and sp.state(old_failed) is State.MISSING
    assert not list(sp.right.glob(f"{old_done}*"))  # markers went with it
    for name, state in ((new_done, State.DONE), (new_failed, State.FAILED),
                        (pending, State.PENDING), (claimed, State.CLAIMED)):
        assert sp.state(name) is state
    # Eight days later the young ones expire too; pending and claimed batches never do.
    (later,) = cleanup.run(app, now=time.time() + 60 * DAY)
    assert sp.state(new_done) is State.MISSING and sp.state(new_failed) is State.MISSING
    assert sp.state(pending) is State.PENDING
    assert later.reclaimed == [claimed]  # its lease expired long ago: pending again, not deleted
    assert sp.state(claimed) is State.PENDING


def test_over_budget_trims_done_oldest_first_and_never_pending_or_claimed(tmp_path: Path) -> None:
    app = make_app(tmp_path, max_bytes=8_000, min_free="0%")
    sp = app.spool(app.queues("docs")[0])
    done = [batch(sp, "done", age) for age in (3, 2, 1)]  # oldest first
    pending = [batch(sp, "pending") for _ in range(3)]
    claimed = batch(sp, "claimed")
    budget = app.budget()
    assert budget.used() > 8_000
    (report,) = cleanup.run(app)
    assert report.done_trimmed >= 1
    states = [sp.state(n) for n in done]
    assert states[0] is State.MISSING  # the oldest went first
    kept = states.index(State.DONE) if State.DONE in states else len(states)
    assert all(s is State.MISSING for s in states[:kept])
    assert all(sp.state(n) is State.PENDING for n in pending) and sp.state(claimed) is State.CLAIMED
    # Pending and claimed alone are over budget: cleanup removes nothing more, and says so.
    (again,) = cleanup.run(app)
    assert all(sp.state(n) is State.PENDING for n in pending) and sp.state(claimed) is State.CLAIMED
    assert [sp.state(n) for n in done].count(State.DONE) == 0


class FakeBudget(Budget):
    """A budget whose usage and free space the test sets (the real ones are tested on tmpfs)."""

    def __init__(self, max_bytes: int, used: int, free: int, floor: str = "10%") -> None:
        super().__init__(Path("/"), [], None, max_bytes, Floor.parse(floor, "t"))
        self._used, self._free = used, free

    def used(self) -> int:
        return self._used

    def space(self) -> Space:
        return Space(free_bytes=self._free, total_bytes=1000, free_inodes=1000, total_inodes=1000)


def sniffer(tmp_path: Path, budget: Budget, **keys):
    from lrq.sniffer import Sniffer

    app = load_app(write_config(tmp_path, docs=None, batch_size=10, **keys))
    q = app.queues("docs")[0]
    return Sniffer(q, app.spool(q), MemorySource([{"doc_id": i} for i in range(1000)]),
                   budget=budget)


def test_sniffer_pauses_on_budget_and_free_space_and_logs_once(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="lrq.sniffer")
    budget = FakeBudget(max_bytes=10_000, used=9_999_999, free=50)
    sn = sniffer(tmp_path, budget)
    sn.spool.publish([{"doc_id": -1}])  # a pending batch: an idle queue would get one through
    assert sn.tick() == 0 and sn.paused == "budget"
    assert sn.tick() == 0
    budget._used = 0  # cleanup made room; free space is still below 10%
    assert sn.tick() == 0 and sn.paused == "min_free"
    budget._free = 900
    assert sn.tick(max_batches=2) == 2 and sn.paused is None
    events = [(r.levelname, r.message.split(":")[0]) for r in caplog.records]
    assert events == [("WARNING", "paused queue=docs reason=budget"),
                      ("WARNING", "paused queue=docs reason=min_free"),
                      ("INFO", events[2][1])]
    assert events[2][1].startswith("resumed queue=docs after=min_free")


def test_a_budget_below_two_batches_lets_one_through_when_the_queue_is_idle(tmp_path: Path) -> None:
    """Else the queue stalls forever: nothing pending or claimed, nothing to trim."""
    budget = FakeBudget(max_bytes=1, used=0, free=900)
    sn = sniffer(tmp_path, budget)
    assert sn.tick() == 1 and sn.paused == "budget"
    assert sn.pause_detail == f"max_bytes 1 is below two batches ({sn.last_bytes} bytes each); raise it"
    assert budget.advice(budget.held([]), sn.last_bytes) == \
        f"set cleanup.max_bytes to at least {2 * sn.last_bytes} bytes"
    assert sn.tick() == 0  # one pending
    (name,) = sn.spool.pending()
    claim = sn.spool.claim(name)
    assert sn.tick() == 0  # one claimed
    sn.spool.mark_done(claim)
    assert sn.tick() == 1 and len(sn.spool.pending()) == 1


def test_max_pending_in_bytes(tmp_path: Path) -> None:
    sn = sniffer(tmp_path, FakeBudget(max_bytes=10**9, used=0, free=1000), max_pending="3KB")
    published = sn.tick()
    assert published >= 1 and sn.paused == "max_pending"
    assert sn.spool.counts().pending_bytes <= 3000 + sn.last_bytes


def test_enospc_while_publishing_backs_off_and_acknowledges_nothing(tmp_path: Path, monkeypatch) -> None:
    clock = [1000.0]
    sn = sniffer(tmp_path, FakeBudget(max_bytes=10**9, used=0, free=1000))
    sn.clock = lambda: clock[0]
    real = sn.spool.publish

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sn.spool, "publish", full)
    assert sn.tick() == 0 and sn.paused == "disk-full"
    assert sn.spool.read_position() is None
    monkeypatch.setattr(sn.spool, "publish", real)
    assert sn.tick() == 0  # still backing off
    clock[0] += 1.5
    assert sn.tick(max_batches=1) == 1 and sn.paused is None


def test_worker_keeps_the_batch_when_the_done_marker_hits_enospc(tmp_path: Path, monkeypatch) -> None:
    from lrq.errors import Retryable

    app = load_app(write_config(tmp_path, docs=None))
    q = app.queues("docs")[0]
    sp = app.spool(q)
    name = sp.publish([{"doc_id": "a", "content": "x"}])
    w = app.worker(q)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w.spool, "mark_done", full)
    with pytest.raises(Retryable):
        w.run_once()
    assert sp.state(name) is State.PENDING and w.sink.is_recorded(name)  # committed, not lost
    monkeypatch.undo()
    assert w.run_once() and sp.state(name) is State.DONE and w.sink.count() == 1


def test_a_drained_sniffer_tick_does_no_disk_accounting(tmp_path: Path) -> None:
    """An idle scheduler ticks every second for weeks, next to every done batch kept for
    keep_done: a tick on a drained source must not scan them."""

    class CountingBudget(FakeBudget):
        calls = 0

        def used(self) -> int:
            CountingBudget.calls += 1
            return 0

    source = MemorySource([{"doc_id": i} for i in range(25)])
    sn = sniffer(tmp_path, CountingBudget(max_bytes=10**9, used=0, free=1000))
    sn.source = source
    assert sn.tick() == 3 and sn.drained and CountingBudget.calls == 1
    for _ in range(5):
        assert sn.tick() == 0
    assert CountingBudget.calls == 1
    source.items.extend({"doc_id": i} for i in range(25, 30))  # new rows arrive
    assert sn.tick() == 1 and CountingBudget.calls == 2
    ids = [i["doc_id"] for n in sn.spool.pending() for i in sn.spool.load(n).items]
    assert ids == list(range(30))


def settle(folder: Path) -> None:
    """Date ``folder``'s mtime back past DIR_SETTLE_NS, as an idle data dir's is."""
    old = time.time() - 60
    os.utime(folder, (old, old))


def test_done_bytes_counted_again_only_after_done_changes(tmp_path: Path) -> None:
    """The budget's count of done/ is cached while done/ is unchanged and settled (an idle
    data dir keeps its done batches for days), and counted again once a batch moves in."""
    app = make_app(tmp_path)
    sp = app.spool(app.queues("docs")[0])
    first = batch(sp, "done", 1)
    budget = app.budget()
    size = (sp.done / f"{first}.pkl").stat().st_size
    assert sp.done_bytes() == size
    with (sp.done / f"{first}.pkl").open("ab") as f:  # in place: done/'s mtime stays
        f.write(b"x" * 1000)
    assert sp.done_bytes() == size + 1000, "an mtime under DIR_SETTLE_NS old is not trusted"
    settle(sp.done)
    used = budget.used()
    assert sp.done_bytes() == size + 1000
    with (sp.done / f"{first}.pkl").open("ab") as f:
        f.write(b"y" * 500)
    assert sp.done_bytes() == size + 1000, "cached: done/ unchanged since a settled count"
    assert budget.used() == used
    second = batch(sp, "done", 0)  # renamed into done/: its mtime moves
    both = size + 1500 + (sp.done / f"{second}.pkl").stat().st_size
    assert sp.done_bytes() == both
    assert budget.used() >= used + (sp.done / f"{second}.pkl").stat().st_size + 500


def test_retention_skips_the_done_batches_until_one_can_be_due(tmp_path: Path,
                                                                monkeypatch) -> None:
    """An idle cleanup pass does not list and stat every done batch: done/ unchanged since a
    full look, and the oldest batch that look kept not yet due."""
    app = make_app(tmp_path)
    sp = app.spool(app.queues("docs")[0])
    old, young = batch(sp, "done", 8), batch(sp, "done", 5)
    settle(sp.done)
    looks = []
    real = sp.done_batches
    monkeypatch.setattr(sp, "done_batches", lambda: looks.append(1) or real())
    now = time.time()
    (report,) = cleanup.run(app, now=now)
    assert report.done_removed == 1 and sp.state(old) is State.MISSING and len(looks) == 1
    settle(sp.done)  # the removal changed done/: the next pass looks once more
    (report,) = cleanup.run(app, now=now + 1)
    assert report.done_removed == 0 and len(looks) == 2
    for i in range(3):  # unchanged, and the young batch is due only in 2 days
        (report,) = cleanup.run(app, now=now + 2 + i)
    assert len(looks) == 2 and sp.state(young) is State.DONE
    (report,) = cleanup.run(app, now=now + 2.5 * DAY)  # past its keep_done
    assert report.done_removed == 1 and sp.state(young) is State.MISSING and len(looks) == 3
