"""The reaper: takes back stale claims, and isolates the item that kills its worker.

A claim is stale when its owner is dead (this host: pid gone, reused or a zombie) or its
heartbeat is older than the lease (:meth:`lrq.spool.Spool.stale_claims`). Taking it back
records the attempt and, for a dead owner, how the owner ended: the scheduler knows its
children's exit codes (:class:`Exits`); for a by-hand ``lrq work`` only the dead pid is seen
("exit unknown").

A worker process that dies (a segfault, ``os._exit``, the OOM killer) takes every batch it
holds with it, and no handler policy can catch that. Requeued as a whole, such a batch would
die ``max_attempts`` times and move to ``failed/`` with all its good items. So a batch's
``SPLIT_AFTER``-th death splits it instead (:meth:`lrq.spool.Spool.split`): two new batches,
each processed, or dying, on its own. Each split halves the items, so a batch of ``n`` items
needs at most ``SPLIT_AFTER * (ceil(log2(n)) + 1)`` deaths until the item that kills its
worker is alone in a one-item batch and is dead-lettered with the exit codes or signals, its
batch marked done. A worker storing one batch behind while its handler runs the next
holds both claims; the one whose handler calls were over (:meth:`lrq.spool.Spool.mark_handled`:
its owner record no longer lists it in ``handling``) is requeued uncounted and the death
charged to the other. A batch that died for another
reason (the OOM killer chose its worker) is at worst split: splitting loses nothing. A dying
batch the ledger already holds (its worker died after the commit) is only marked done.

Events: ``reclaimed``, ``split``, ``dead-lettered``,
``finalized``, ``split-failed``.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING

from lrq.errors import BatchCorrupt, BatchUnsigned
from lrq.spool import Exit, Reaped, Spool, Stale, State, half_name

if TYPE_CHECKING:
    from lrq.app import App
    from lrq.config import QueueConfig

log = logging.getLogger(__name__)

#: Deaths of one batch after which it is split (or, with one item, dead-lettered). One death
#: can be bad luck (the OOM killer, a reboot); two on the same items rarely are.
SPLIT_AFTER = 2


class Exits:
    """How recently ended worker processes ended, by (pid, process start): the scheduler
    records each child's exit, the reaper looks up a dead claim owner's. Holds the last
    ``keep``; thread-safe."""

    def __init__(self, keep: int = 256) -> None:
        self._keep = keep
        self._seen: collections.OrderedDict[tuple[int, int], Exit] = collections.OrderedDict()
        self._lock = threading.Lock()

    def record(self, pid: int, start: int, exit: Exit) -> None:
        with self._lock:
            self._seen[(pid, start)] = exit
            while len(self._seen) > self._keep:
                self._seen.popitem(last=False)

    def get(self, pid: int, start: int) -> Exit | None:
        with self._lock:
            return self._seen.get((pid, start))


def take_back(app: App, q: QueueConfig, stale: Stale, exits: Exits | None = None) -> str:
    """Take back one stale claim. Returns ``requeued``, ``failed``, ``gone`` or, for a batch
    at its ``SPLIT_AFTER``-th death, ``split``, ``dead-lettered`` or ``finalized``."""
    sp = app.spool(q)
    exit = exits.get(stale.pid, stale.start) if exits is not None and stale.dead else None
    reaped = sp.take_back(stale, q.max_attempts, exit=exit, split_after=SPLIT_AFTER)
    outcome = reaped.outcome
    if outcome == "dying" and reaped.held is not None:
        try:
            outcome = _end_dying(app, q, sp, reaped)
        except Exception:
            # The database is down, the disk full... A split begun is kept held: released,
            # the batch could be processed whole beside a half. It is split again when its
            # claim goes stale (this process dies, or the lease runs out). Otherwise the
            # batch is pending again and its next death brings it back here.
            begun = _split_begun(sp, stale.name)
            log.exception("split-failed queue=%s batch=%s: %s", q.name, stale.name,
                          "held until its claim is stale" if begun else "released")
            if not begun:
                sp.release(reaped.held)
            outcome = "requeued"
    if outcome != "gone":
        log.warning("reclaimed queue=%s batch=%s attempt=%d outcome=%s reason=%s",
                    q.name, stale.name, stale.attempt, outcome, reaped.reason)
    return outcome


def predict(sp: Spool, stale: Stale, max_attempts: int) -> str:
    """What :func:`take_back` would do, for ``lrq cleanup --dry-run``."""
    if stale.collateral:
        return "requeued"
    history = sp.attempts(stale.name)["history"]
    deaths = sum(1 for h in history if h.get("exit") and h.get("counted", True)) + stale.dead
    if deaths >= SPLIT_AFTER:
        return "split"
    return "failed" if stale.attempt >= max_attempts else "requeued"


def killed_message(deaths: tuple[Exit, ...]) -> str:
    """The dead letter's error: ``worker killed by SIGSEGV (exit -11) handling this item, 2
    times`` (different ends are listed, separated by ``;``)."""
    ends = "; ".join(dict.fromkeys(d.describe() for d in deaths))
    return f"worker {ends} handling this item, {len(deaths)} times"


def _end_dying(app: App, q: QueueConfig, sp: Spool, reaped: Reaped) -> str:
    held = reaped.held
    assert held is not None
    sink = app.sink(q)
    # A split begun (its reaper died) is finished without asking the database: the batch
    # was not in the ledger then, and no worker can have claimed it since.
    if not _split_begun(sp, held.name) and sink.is_recorded(held.name):
        sp.mark_done(held)
        log.info("finalized queue=%s batch=%s", q.name, held.name)
        return "finalized"
    try:
        batch = sp.load(held.name)
    except (BatchUnsigned, BatchCorrupt):
        sp.release(held)  # a worker quarantines or fails it, with the reason
        return "requeued"
    ends = ",".join(dict.fromkeys(d.describe() for d in reaped.deaths))
    if len(batch.items) > 1:
        first, second = sp.split(held, batch)
        log.warning("split queue=%s batch=%s items=%d into=%s,%s deaths=%d exit=%s",
                    q.name, held.name, len(batch.items), first, second, len(reaped.deaths), ends)
        return "split"
    error = killed_message(reaped.deaths)
    dead = [(item, error) for item in batch.items]
    if q.fanout:  # which output's handler killed it is unknown: dead in every output
        sink.store_outputs(held.name, len(batch.items), {o: ([], dead) for o in sink.outputs},
                           held.attempt, inputs=batch.items, replace_dead=batch.replace_dead)
    else:
        sink.store(held.name, len(batch.items), [], held.attempt, dead=dead,
                   replace_dead=batch.replace_dead)
    sp.mark_done(held)
    for item in batch.items:
        log.warning("dead-lettered queue=%s batch=%s key=%s error=%s", q.name, held.name,
                    item.get(q.key), error)
    return "dead-lettered"


def _split_begun(sp: Spool, name: str) -> bool:
    """Is a half of batch ``name`` already written (a split was interrupted)?"""
    return any(sp.state(half_name(name, i)) is not State.MISSING for i in (0, 1))
