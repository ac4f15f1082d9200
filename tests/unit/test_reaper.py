"""Leases: stale claims (dead owner, old heartbeat) are taken back; max_attempts ends in failed/."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lrqtest import load_app, write_config

from lrq import cleanup, reaper
from lrq.spool import OWNERS, Exit, Spool, Stale, State, half_name
from lrq.spool.owners import RECORD, parse_record


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "data", "q").ensure()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def forge_owner(spool: Spool, name: str, handling: list[str] | None = None, **fields) -> None:
    """Make ``right/<name>`` a claim of another owner: a link to an owner file with this
    claim's record, ``fields`` changed (its token derived from the pid), listing ``handling``
    as the batches in its handler (default: none but ``name``). Claims forged with the same
    fields share one owner file, as one process's claims do."""
    path = spool.right / name
    record = {**parse_record(path.read_bytes()), **fields}
    record["token"] = fields.get("token", f"forged{record['pid']}")
    record["handling"] = [name] if handling is None else handling
    owner = spool.root / OWNERS / f"{record['host']}-{record['pid']}-{record['start']}-{record['token']}"
    if not owner.exists():
        owner.write_bytes(json.dumps(record).encode().ljust(RECORD))
    os.unlink(path)
    os.link(owner, path)


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
    spool.claim(name)
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


# -- deaths: exit codes, splits, the killer item dead-lettered ----------------------------
def die(sp: Spool, name: str, **owner) -> Stale:
    """Claim ``name`` as a worker that then died; the stale claim the reaper sees."""
    assert sp.claim(name) is not None
    forge_owner(sp, name, pid=dead_pid(), **owner)
    (stale,) = sp.stale_claims(lease=3600)
    assert stale.dead
    return stale


def test_a_dead_owner_s_exit_is_recorded_and_a_silent_one_has_none(spool: Spool) -> None:
    name = spool.publish([{"k": 1}])
    spool.reap(die(spool, name), 5, exit=Exit.of(-signal.SIGSEGV))
    spool.reap(die(spool, name), 5)  # a by-hand worker: only the dead pid was seen
    spool.claim(name)
    forge_owner(spool, name, host="another-host")
    (silent,) = spool.stale_claims(lease=60, now=time.time() + 61)
    assert not silent.dead
    spool.reap(silent, 5)
    history = spool.attempts(name)["history"]
    assert history[0]["exit"] == {"code": None, "signal": "SIGSEGV"}
    assert history[0]["reason"].endswith("is dead: killed by SIGSEGV (exit -11)")
    assert history[1]["exit"] == {"code": None, "signal": None}
    assert history[1]["reason"].endswith("is dead: died (exit unknown)")
    assert "exit" not in history[2]


def test_exit_descriptions() -> None:
    assert Exit.of(3) == Exit(code=3) and Exit.of(3).describe() == "exited with code 3"
    assert Exit.of(-9).describe() == "killed by SIGKILL (exit -9)"
    assert Exit.of(None).describe() == "died (exit unknown)"
    assert reaper.killed_message((Exit.of(-11), Exit.of(-11))) == \
        "worker killed by SIGSEGV (exit -11) handling this item, 2 times"
    assert reaper.killed_message((Exit.of(3), Exit.of(None))) == \
        "worker exited with code 3; died (exit unknown) handling this item, 2 times"


def test_the_second_death_holds_the_batch_and_a_split_publishes_its_halves(spool: Spool) -> None:
    items = [{"k": i} for i in range(5)]
    name = spool.publish(items, position=42)
    assert spool.take_back(die(spool, name), 3, split_after=2).outcome == "requeued"
    reaped = spool.take_back(die(spool, name), 3, split_after=2)
    assert reaped.outcome == "dying" and len(reaped.deaths) == 2
    assert spool.state(name) is State.CLAIMED and spool.owns(reaped.held)
    first, second = spool.split(reaped.held, spool.load(name))
    assert (first, second) == (half_name(name, 0), half_name(name, 1))
    assert first.split("-")[0] == second.split("-")[0] == name.split("-")[0]
    assert spool.state(name) is State.MISSING
    assert not (spool.right / f"{name}.attempt").exists()
    halves = [spool.load(first), spool.load(second)]
    assert [h.items for h in halves] == [items[:3], items[3:]]
    assert {h.position for h in halves} == {42}  # the source receipt goes with the items
    assert sorted(spool.pending()) == sorted([first, second])
    assert spool.claim(first).attempt == 1  # a new batch: its own history


def test_a_redone_split_writes_only_what_is_missing(spool: Spool) -> None:
    name = spool.publish([{"k": i} for i in range(4)])
    batch = spool.load(name)
    spool.take_back(die(spool, name), 3, split_after=2)
    held = spool.take_back(die(spool, name), 3, split_after=2).held
    first = half_name(name, 0)
    spool.publish(batch.items[:2], name=first)  # written before its reaper died...
    done = spool.claim(first)
    spool.mark_done(done)  # ...and processed since
    assert spool.split(held, batch) == (first, half_name(name, 1))
    assert spool.state(first) is State.DONE and spool.pending() == [half_name(name, 1)]


def test_max_attempts_still_bounds_failures_that_are_not_deaths(spool: Spool) -> None:
    name = spool.publish([{"k": 1}, {"k": 2}])
    spool.reap(die(spool, name), 3)
    for _ in range(2):
        spool.claim(name)
        forge_owner(spool, name, host="another-host")
        (silent,) = spool.stale_claims(lease=60, now=time.time() + 61)
        outcome = spool.take_back(silent, 3, split_after=2).outcome
    assert outcome == "failed" and spool.state(name) is State.FAILED


def test_a_reaped_claim_without_its_batch_file_is_removed(spool: Spool) -> None:
    """Its owner was killed inside fail() or split(), after the batch file moved."""
    name = spool.publish([{"k": 1}])
    stale = die(spool, name)
    (spool.right / f"{name}.attempt").write_text('{"attempts": 1, "history": []}')
    (spool.left / f"{name}.pkl").unlink()
    assert not spool.settled()
    assert spool.take_back(stale, 3, split_after=2).outcome == "gone"
    assert not (spool.right / name).exists() and not (spool.right / f"{name}.attempt").exists()
    assert spool.settled()


def app_with(tmp_path: Path, *items: dict) -> tuple:
    app = load_app(write_config(tmp_path, docs=None))
    q = app.queues("docs")[0]
    return app, q, app.spool(q), app.spool(q).publish(list(items))


def test_the_reaper_splits_until_the_killer_is_alone_and_dead_letters_it(tmp_path: Path) -> None:
    app, q, sp, name = app_with(tmp_path, *({"doc_id": f"d{i}"} for i in range(4)))
    exits = reaper.Exits()
    killer = "d2"

    def worker_dies_on(batch: str) -> str:
        stale = die(sp, batch)
        exits.record(stale.pid, stale.start, Exit.of(-signal.SIGSEGV))
        return reaper.take_back(app, q, stale, exits)

    outcomes = []
    while True:
        holding = [n for n in sp.pending() if killer in {i["doc_id"] for i in sp.load(n).items}]
        if not holding:
            break
        outcomes.append(worker_dies_on(holding[0]))
    # 4 items -> 2 -> 1: two deaths at each level, the last dead-letters the item.
    assert outcomes == ["requeued", "split"] * 2 + ["requeued", "dead-lettered"]
    sink = app.sink(q)
    (dead,) = sink.dead_letters()
    assert dead["key"] == killer
    assert dead["error"] == "worker killed by SIGSEGV (exit -11) handling this item, 2 times"
    # Every other item is still pending, in batches of its own; none failed.
    left = sorted(i["doc_id"] for n in sp.pending() for i in sp.load(n).items)
    assert left == ["d0", "d1", "d3"] and sp.counts().failed == 0
    assert sink.ledger_stats() == (1, 1)  # the killer's batch: done, one item


def test_a_dying_batch_already_in_the_ledger_is_only_marked_done(tmp_path: Path) -> None:
    app, q, sp, name = app_with(tmp_path, {"doc_id": "a"}, {"doc_id": "b"})
    app.sink(q).store(name, 2, [{"doc_id": "a"}, {"doc_id": "b"}])  # died after its commit
    assert reaper.take_back(app, q, die(sp, name)) == "requeued"
    assert reaper.take_back(app, q, die(sp, name)) == "finalized"
    assert sp.state(name) is State.DONE and sp.pending() == []


def test_a_failed_split_releases_the_batch_unless_a_half_is_written(tmp_path: Path,
                                                                   monkeypatch) -> None:
    app, q, sp, name = app_with(tmp_path, *({"doc_id": d} for d in "abcd"))
    real = Spool.publish
    written = []

    def publish_then_fill_the_disk(self: Spool, *args, **kw) -> str:
        if len(written) == allowed:
            raise OSError(28, "No space left on device")
        written.append(real(self, *args, **kw))
        return written[-1]

    monkeypatch.setattr(Spool, "publish", publish_then_fill_the_disk)
    allowed = 0
    reaper.take_back(app, q, die(sp, name))
    assert reaper.take_back(app, q, die(sp, name)) == "requeued"
    assert sp.state(name) is State.PENDING  # nothing begun: pending again
    allowed = 1
    assert reaper.take_back(app, q, die(sp, name)) == "requeued"
    # A half is in left/: released, the batch could be processed whole beside it. Held, it
    # is split again once its claim is stale (here: its holder is dead).
    assert sp.state(name) is State.CLAIMED and sp.pending() == written
    allowed = 2
    forge_owner(sp, name, pid=dead_pid())
    (stale,) = sp.stale_claims(lease=3600)
    assert reaper.take_back(app, q, stale) == "split"
    assert sorted(sp.pending()) == sorted(written) and sp.state(name) is State.MISSING


def test_a_death_is_charged_to_the_batch_in_the_handler_not_to_one_being_stored(
        spool: Spool) -> None:
    """Storing behind, a worker holds the batch it commits and the one in its handler: a
    handler that kills it must not count against the first (twice: an innocent item would be
    dead-lettered)."""
    stored, handling = spool.publish([{"k": 1}]), spool.publish([{"k": 2}])
    pid = dead_pid()
    for name in (stored, handling):
        spool.claim(name)
        forge_owner(spool, name, pid=pid, handling=[handling])
    by_name = {s.name: s for s in spool.stale_claims(lease=3600)}
    assert by_name[stored].collateral and not by_name[handling].collateral
    assert spool.reap(by_name[stored], 1) == "requeued"  # even at max_attempts = 1
    assert spool.attempts(stored)["attempts"] == 0
    (entry,) = spool.attempts(stored)["history"]
    assert entry["counted"] is False and entry["exit"] == {"code": None, "signal": None}
    assert spool.claim(stored).attempt == 1
    # Alone, a handled batch is charged: its worker died storing it, nothing else ran.
    forge_owner(spool, stored, pid=dead_pid(), handling=[])
    alone = next(s for s in spool.stale_claims(lease=3600) if s.name == stored)
    assert not alone.collateral
    assert spool.take_back(alone, 3, split_after=2).deaths == (Exit(),)


def test_a_second_reaper_with_an_old_stale_list_leaves_a_live_claim_alone(spool: Spool) -> None:
    """Two reapers list the same dead claim; the first requeues it and a new worker claims the
    batch. Before, the second renamed the new worker's claim away and recorded a second death
    (a split after one real death)."""
    name = spool.publish([{"k": 1}, {"k": 2}])
    spool.claim(name)
    forge_owner(spool, name, pid=dead_pid())
    (first,) = spool.stale_claims(lease=3600)
    (second,) = spool.stale_claims(lease=3600)
    assert spool.take_back(first, 3, exit=Exit(signal="SIGKILL"), split_after=2).outcome == "requeued"
    live = spool.claim(name)
    assert live is not None
    assert spool.take_back(second, 3, exit=Exit(signal="SIGKILL"), split_after=2).outcome == "gone"
    assert spool.owns(live) and spool.state(name) is State.CLAIMED
    assert len(spool.attempts(name)["history"]) == 1
    assert not list(spool.tmp.iterdir())  # the aside file is not left behind


def test_the_scheduler_reaps_a_dead_child_only_under_the_cleanup_lock(tmp_path: Path) -> None:
    from lrq import schedule
    from lrq.spool import flock

    app = load_app(write_config(tmp_path, docs=10))
    q = app.queues("docs")[0]
    r = schedule.Runner(app)
    sp = app.spool(q)
    name = sp.publish([{"doc_id": 1}])
    sp.claim(name)
    pid = dead_pid()
    forge_owner(sp, name, pid=pid)
    with flock(app.cfg.data_dir / "cleanup.lock", "a cleanup"):
        r._reap(q, pid)  # a cleanup is running: it (or its next tick) reaps the claim
        assert sp.state(name) is State.CLAIMED
    r._reap(q, pid)
    assert sp.state(name) is State.PENDING


def test_a_retry_dead_batch_keeps_replace_dead_through_its_split_and_dead_letter(
        tmp_path: Path) -> None:
    """Before, the halves were plain batches: the killer's new dead letter was dropped by the
    insert-ignore (its old one stayed), and an item stored later kept its old dead letter."""
    app, q, sp, _ = app_with(tmp_path)
    sink = app.sink(q)
    sink.store("old", 2, [], dead=[({"doc_id": "a"}, "old error"), ({"doc_id": "b"}, "old error")])
    name = sp.publish([{"doc_id": "a"}, {"doc_id": "b"}], replace_dead=True)  # lrq retry-dead
    exits = reaper.Exits()

    def dies(batch: str) -> str:
        stale = die(sp, batch)
        exits.record(stale.pid, stale.start, Exit.of(-signal.SIGSEGV))
        return reaper.take_back(app, q, stale, exits)

    assert [dies(name), dies(name)] == ["requeued", "split"]
    first, second = half_name(name, 0), half_name(name, 1)
    assert sp.load(first).replace_dead and sp.load(second).replace_dead
    assert [dies(first), dies(first)] == ["requeued", "dead-lettered"]  # "a" kills its worker
    (dead,) = sink.dead_records(keys=["a"])
    assert dead.error == "worker killed by SIGSEGV (exit -11) handling this item, 2 times"
