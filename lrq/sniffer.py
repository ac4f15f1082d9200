"""The sniffer: fetch items from the source and publish them as batches into ``left/``.

The source position is saved only after the batch file is durable (invariant 1), so a
crash in between re-publishes the same items, which the sink's unique keys absorb. It is
saved once per ``POSITION_EVERY`` seconds of publishing and at the end of each tick rather
than after every batch: its two fsyncs were a fifth of the sniffer's time per 1000 items,
and a crash then re-publishes at most that much, which is absorbed the same way.

Group commit: each batch file is written to ``tmp/``, fsynced and renamed into ``left/`` at
once (workers may claim it straight away), but ``left/`` itself is fsynced once per position
save, just before it (:meth:`lrq.spool.Spool.sync_published`): one directory fsync per
``POSITION_EVERY`` seconds of publishing instead of one per batch. The position still moves
only after every batch up to it is durable; a crash (or power loss) before that fsync
re-publishes the group, which the unique keys absorb.

Batch rules (:mod:`lrq.batching`): what a fetch returns goes into a :class:`~lrq.batching.Batcher`
that cuts it into batches by ``batch_size``, ``batch_max_bytes`` and ``separate``, and holds a
batch that is not full for up to ``batch_linger`` while later fetches fill it. The position
moves to a fetch's position only once its last piece is published (and is saved, as above,
after ``left/`` is fsynced); a broker's receipts are sliced with their items. Without rules a
fetch is one batch, as before, with no work per item.

Backpressure: the sniffer stops prefetching while ``max_pending`` batches (or bytes; one
batch may always wait, however large, or a byte limit below one batch would stall) wait,
or while :meth:`lrq.disk.Budget.blocked` says the next batch does not fit (the data dir near
``cleanup.max_bytes``, or free space minus the next batch below ``cleanup.min_free``); cleanup
trims done batches on that same predicate. A write that still hits ENOSPC/EDQUOT
leaves nothing behind, acknowledges nothing, and backs off. Each pause is logged once, and
so is the resume (refills within one tick are not resumes).

The operator's pause (``lrq pause``, :mod:`lrq.control`): a tick looks once at its start and
once before each batch it publishes (a stat each); while paused it publishes nothing and
fetches nothing (what a broker handed over stays carried), but still steps the acker, so a
broker's done batches are acknowledged and its held entries kept while the queue stands.

Refill: a tick given the scheduler's ``stop`` event does not return when it pauses on
``max_pending``; it waits, until its ``max_seconds`` are up or ``stop`` is set, for the
backlog to fall to the low-water mark (half of ``max_pending``, in batches or bytes) and
then publishes again, so workers never drain the backlog and sit idle until the next
``interval`` tick. The tick lists the backlog once, by name, at its start and adds each batch
it publishes; the count reaching ``max_pending`` first drops the names claimed since (a
``stat`` or two each), so it pauses only on the true backlog. While paused it watches
``right/``: one ``stat`` of the folder per look (its mtime moves when a claim appears), and
only when it moved a ``stat`` per pending name; looks start every ``REFILL_POLL`` seconds and
back off to ``REFILL_POLL_MAX`` while nothing changes, so a stuck backlog costs a few stats a
second. (Measured against waking on inotify events: ``bench/refill_wait.py``; about the same
CPU, and this needs no ctypes and works everywhere.) A claim taken back by the reaper meanwhile
is not seen until the next tick's listing: the backlog can then exceed ``max_pending`` by the
claims reaped during one tick. A tick without ``stop`` (``lrq sniff`` by hand, tests) returns
at the pause as before.

New items: a tick given ``stop`` that finds the source drained does not return to wait for
the next ``interval`` firing (a quarter second by default, so an eighth on average before new
rows were seen) when the source can tell cheaply that it may have changed (``changed()``, a
token; a SQLite table's: the stats of its file and WAL). It looks every ``SOURCE_POLL``
seconds, backing off to ``SOURCE_POLL_MAX`` while nothing changes (two stats a look, ~20
looks a second idle), fetches whenever the token moved, and goes on publishing as soon as a
fetch brings items; until its ``max_seconds`` are up or ``stop`` is set, like the refill wait.
Sources without ``changed()`` are fetched at the interval as before.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from lrq import failpoints
from lrq.acker import Acker
from lrq.batching import Batcher, Rules
from lrq.config import QueueConfig
from lrq.control import Watch
from lrq.disk import TRIM_AT, Budget
from lrq.sources import Fetched, Source
from lrq.spool import DONE, SUFFIX, Spool

log = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MAX_BACKOFF = 60.0  # seconds between tries after the disk was full
ACK_EVERY = 0.25  # seconds between acker steps within one tick (a commit-acked source)
POSITION_EVERY = 0.5  # seconds of publishing between two saves of the source position
REFILL_POLL = 0.02  # seconds between looks at right/ while paused, after a change ...
REFILL_POLL_MAX = 0.1  # ... doubled while nothing changes, up to this
SOURCE_POLL = 0.005  # seconds between looks at a drained source's stats, after a change ...
SOURCE_POLL_MAX = 0.05  # ... doubled while nothing changes, up to this
#: A folder mtime is trusted unchanged only once a look came this long after it (mtimes are
#: coarse: a change in the same clock tick as the last one can keep the mtime).
MTIME_SETTLE_NS = 20_000_000


class Sniffer:
    def __init__(self, queue: QueueConfig, spool: Spool, source: Source, *,
                 budget: Budget | None = None, acker: Acker | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 pause: Watch | None = None, rules: Rules | None = None) -> None:
        self.queue = queue
        #: The operator's pause (:mod:`lrq.control`): nothing is published while it holds.
        self.pause = pause
        self.spool = spool
        self.source = source
        self.budget = budget
        self.clock = clock
        #: A source acknowledged at commit: no position, receipts in the batch files, and
        #: this acker told of each publish and stepped at each tick and every ``ACK_EVERY``
        #: within it (:mod:`lrq.acker`).
        self.commit_acked = getattr(source, "ack_at", "publish") == "commit"
        if self.commit_acked and acker is None:
            acker = Acker(spool, clock=clock)
        self.acker = acker
        #: Items fetched but not yet published (backpressure or a full disk stopped the tick
        #: after the fetch, or a batch lingering for more): published first by a later tick,
        #: never fetched again or dropped; cut into batches by the queue's rules
        #: (:mod:`lrq.batching`; ``rules`` default to the queue's, ``separate`` imported).
        self.batcher = Batcher(rules if rules is not None else Rules.of(queue))
        #: The last fetch came back short: fetch no more to fill a lingering batch this tick.
        self._short = False
        #: Ask a commit-acked source's ``settled()`` at the end of a drained tick (``lrq run
        #: --until-idle`` sets it; a broker round trip, so not on every idle tick otherwise).
        #: Asked here, in the thread that uses the source, not by the supervisor.
        self.check_settled = False
        #: The last answer: the source has nothing new and nothing pending for any consumer.
        self.source_settled = not self.commit_acked
        #: True once a fetch came back short: the source has nothing more for now.
        self.drained = False
        #: Why prefetching is paused ("max_pending", "budget", "min_free", "disk-full", or
        #: "operator": ``lrq pause``), or None.
        self.paused: str | None = None
        #: The pause's detail, for the operator.
        self.pause_detail = ""
        self.last_bytes = 0
        #: Called after each batch is published (the scheduler starts workers from it, so
        #: they need not wait for a long tick to end).
        self.on_publish: Callable[[], None] | None = None
        self._ack_at = 0.0
        self._retry_at = 0.0
        self._full_backoff = 1.0
        #: Listings of the backlog (one per tick that looks at it), refills after a pause on
        #: ``max_pending``, and looks at right/ that checked the pending names (bounded by
        #: the claims seen, not by the time waited).
        self.recounts = 0
        self.refills = 0
        self.looks = 0

    def tick(self, max_batches: int | None = None, max_seconds: float = 10.0,
             stop: threading.Event | None = None, flush: bool = False) -> int:
        """Publish batches until the source is drained, backpressure says stop, or a limit is
        hit; return how many were published. Hold :meth:`Spool.lock` around it.

        With ``stop``, a pause on ``max_pending`` waits (until ``max_seconds`` are up or
        ``stop`` is set) for the backlog to fall to the low-water mark, then goes on.
        ``flush``: publish a batch lingering for more items (``batch_linger``) now, as
        ``lrq sniff`` does before it exits."""
        self._ack_step(force=True)  # a paused queue's done batches are acknowledged still
        if self._held():
            return 0
        now = self.clock()
        if now < self._retry_at:
            return 0
        deadline = now + max_seconds
        position = None if self.commit_acked else self.spool.read_position()
        # Published since the last save: their names are not durable in left/ yet. (Not
        # ``position != saved``: a source without a position, such as http-agent's, would
        # never have left/ fsynced.)
        unsaved = False
        held = self.batcher
        if self.drained and not held.ready(now, flush):
            if not len(held) and self.acker is not None and not self.acker.held \
                    and self.check_settled:
                # Everything acknowledged: ask the broker first, so the end of an until-idle
                # run is not a blocking fetch (a stream's `block`) away.
                self._ask_settled()
                if self.source_settled:
                    return 0
            # An idle tick fetches a whole batch, never a probe it would throw away (a broker
            # hands out what it returns), or what fills a batch lingering for more; held
            # into the loop below.
            self._fetch(position, held.room())
            if not len(held) and stop is not None:
                self._watch_source(position, deadline, stop)
            if not held.ready(self.clock(), flush):
                if not len(held):
                    self._ask_settled()
                # Still nothing new, or a batch lingering: skip the disk accounting, an idle
                # tick stays cheap.
                return 0
            self.drained = False
        watch = self._pending_sizes()  # the backlog by name, kept up to date while paused
        self.recounts += 1
        pending, pending_bytes = len(watch), sum(watch.values())
        used = self.budget.used() if self.budget else 0
        published = 0
        refilled = False  # paused on max_pending and refilled in this tick: still one pause
        save_at = now + POSITION_EVERY
        try:
            while max_batches is None or published < max_batches:
                if self.budget and used + 2 * self.last_bytes > TRIM_AT * self.budget.max_bytes:
                    used = self.budget.used()  # near the budget: decide on a fresh count
                blocked = self._blocked(pending, pending_bytes, used)
                if blocked and blocked[0] == "max_pending" and stop is not None:
                    self._prune(watch)  # the count above misses the claims made since
                    pending, pending_bytes = len(watch), sum(watch.values())
                    blocked = self._blocked(pending, pending_bytes, used)
                if blocked:
                    self._pause(*blocked)
                    if blocked[0] != "max_pending" or stop is None:
                        break
                    if unsaved and self._save(position):
                        unsaved = False  # make the group durable before a wait
                    if not self._wait_for_room(watch, deadline, stop):
                        break
                    pending, pending_bytes = len(watch), sum(watch.values())
                    refilled = True
                    self.refills += 1
                    log.debug("refill queue=%s pending=%d", self.queue.name, pending)
                    continue
                self._ack_step()  # a long tick (a backlog, refills) acknowledges as it goes
                if self._held():
                    break  # paused during a long tick: nothing more (a stat per batch)
                if not len(held) and not self._fetch(position, self.queue.batch_size):
                    self.drained = True
                    self._resume(pending)
                    break
                if not held.ready(self.clock(), flush):
                    if not self._short:
                        self._fetch(position, held.room())  # a batch lingering for more: fill it
                    if not held.ready(self.clock(), flush):
                        self.drained = True  # it lingers, and the source has no more for now
                        self._resume(pending)
                        break
                piece = held.piece(position)  # held until it is in left/
                try:
                    name = self.spool.publish(piece.items, piece.position, sync=False,
                                              receipts=piece.receipts)
                except OSError as e:
                    if e.errno not in DISK_FULL:
                        raise
                    self._disk_full(e)
                    break
                moved, safe = held.drop()
                if self.acker is not None and piece.receipts is not None:
                    self.acker.add(name, list(piece.receipts))
                self._full_backoff = 1.0
                if not refilled:  # a refill is not a resume: one line per pause, not per refill
                    self._resume(pending)
                if moved:  # a fetch's last piece is in left/: its position may be saved
                    position = safe
                published += 1
                unsaved = True
                size = self._size_of(name)
                if size is not None:  # else a worker already took it out of left/: not pending
                    watch[name] = size
                    pending += 1
                    pending_bytes += size
                    self.last_bytes = size
                used += self.last_bytes
                log.debug("published queue=%s batch=%s items=%d bytes=%d", self.queue.name, name,
                          len(piece.items), size)
                if self.on_publish is not None:
                    self.on_publish()
                self.drained = self._short and not len(held)
                if self.drained or self.clock() >= deadline:
                    break
                if self.clock() >= save_at and self._save(position):
                    unsaved, save_at = False, self.clock() + POSITION_EVERY
            if self.drained:
                self._ask_settled()
        finally:
            # Every batch up to ``position`` is durable in left/ (a source without one: the
            # group's names are made durable the same way).
            if unsaved:
                self._save(position)
        return published

    @property
    def carried(self) -> Fetched | None:
        """The items fetched but not yet published, as one :class:`Fetched` (a copy); None
        when there are none."""
        return self.batcher.held()

    def _fetch(self, position: Any, limit: int) -> int:
        """Fetch up to ``limit`` items after what is held into the batcher; how many came."""
        fetched = self.source.fetch(self.batcher.read_position(position), limit)
        self._short = len(fetched.items) < limit
        self.batcher.add(fetched, self.clock())
        return len(fetched.items)

    def _held(self) -> bool:
        """Is the queue paused by the operator? (One ``faccessat``; :class:`~lrq.control.Watch`
        logs ``paused`` / ``resumed`` once per process.) Sets :attr:`paused` to
        ``"operator"`` while it is, and clears that once it is not."""
        record = self.pause.paused() if self.pause is not None else None
        if record is not None:
            self.paused = "operator"
            self.pause_detail = f"paused by {record['by']} since {record['since']}"
            return True
        if self.paused == "operator":
            self.paused, self.pause_detail = None, ""
        return False

    def _ack_step(self, force: bool = False) -> None:
        """Run the acker (a source acknowledged at commit): at a tick's start, and every
        ``ACK_EVERY`` seconds within it, so a tick that publishes a long backlog or waits to
        refill neither holds acknowledgements back nor lets held entries go stale
        (``keep``)."""
        if self.acker is None:
            return
        now = self.clock()
        if force or now >= self._ack_at:
            self._ack_at = now + ACK_EVERY
            self.acker.step(self.source, self.batcher.receipts())

    def _ask_settled(self) -> None:
        if self.commit_acked and self.check_settled:
            self.source_settled = self.source.settled()

    def _size_of(self, name: str) -> int | None:
        """A batch just published: its file's size, None when it already left ``left/``
        (workers wake at once: one can claim, store and move it to done/ before this look)."""
        try:
            return os.stat(self.spool.left / f"{name}{SUFFIX}").st_size
        except FileNotFoundError:
            return None

    def _save(self, position: Any) -> bool:
        """Make the batches published since the last save durable (one fsync of ``left/``),
        then save the source position; False (and a disk-full pause) if the disk is full, in
        which case the batches since the last save are fetched again later."""
        try:
            self.spool.sync_published()
            failpoints.hit("sniff-before-position")
            if not self.commit_acked:  # a broker's items are acknowledged by the acker instead
                self.spool.write_position(position, batch_bytes=self.last_bytes)
            return True
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            self._disk_full(e)
            return False

    def _disk_full(self, e: OSError) -> None:
        self._pause("disk-full", f"{e.strerror} while publishing; nothing acknowledged, "
                    f"retrying in {self._full_backoff:.0f}s")
        self._retry_at = self.clock() + self._full_backoff
        self._full_backoff = min(self._full_backoff * 2, MAX_BACKOFF)

    def _blocked(self, pending: int, pending_bytes: int, used: int) -> tuple[str, str] | None:
        q, nxt = self.queue, self.last_bytes
        if pending >= q.max_pending:
            return "max_pending", f"{pending} batches pending (max_pending {q.max_pending})"
        # One pending batch is always allowed: a byte limit below one batch would stall.
        if q.max_pending_bytes is not None and pending and pending_bytes + nxt > q.max_pending_bytes:
            return "max_pending", (f"pending batches hold {pending_bytes} bytes "
                                   f"(max_pending {q.max_pending_bytes} bytes)")
        if self.budget is None:
            return None
        return self.budget.blocked(used, nxt, idle=lambda: not pending and self.spool.settled())

    def _low(self, pending: int, pending_bytes: int) -> bool:
        """Is the backlog at the low-water mark (half of ``max_pending``, batches or bytes)?"""
        q = self.queue
        if pending > q.max_pending // 2:
            return False
        return q.max_pending_bytes is None or not pending or pending_bytes <= q.max_pending_bytes // 2

    def _watch_source(self, position: Any, deadline: float, stop: threading.Event) -> None:
        """Drained, in the scheduler's tick: when the source can tell cheaply that it may have
        new items (``changed()``: a SQLite file's stats, :class:`lrq.sources.sql.SqlSource`),
        wait here for that, fetching each time it changes, until a fetch brings items,
        ``deadline`` passes or ``stop`` is set; see the module docstring."""
        changed: Callable[[], Any] | None = getattr(self.source, "changed", None)
        if changed is None:
            return
        seen = changed()
        if seen is None:
            return
        # A write between the fetch that found the source drained and this first token is
        # in the token already: one more fetch sees it, or it would wait for the next change.
        if self._fetch(position, self.batcher.room()):
            return
        step = SOURCE_POLL
        while True:
            left = deadline - self.clock()
            if left <= 0 or stop.wait(min(step, left)):
                return
            now = changed()
            if now == seen:
                step = min(step * 2, SOURCE_POLL_MAX)
                continue
            seen, step = now, SOURCE_POLL
            if self._held() or self._fetch(position, self.batcher.room()):
                return  # paused by the operator since: it fetches nothing either

    def _wait_for_room(self, watch: dict[str, int], deadline: float,
                       stop: threading.Event) -> bool:
        """Paused on ``max_pending``: wait until the pending batches in ``watch`` fall to the
        low-water mark (True), ``deadline`` passes or ``stop`` is set (False). See the
        module docstring."""
        step, seen = REFILL_POLL, (-1, 0)
        while not self._low(len(watch), sum(watch.values())):
            self._ack_step()
            left = deadline - self.clock()
            if left <= 0 or stop.wait(min(step, left)):
                return False
            try:
                mtime = os.stat(self.spool.right).st_mtime_ns
            except FileNotFoundError:
                return False
            if mtime == seen[0] and seen[1] - mtime > MTIME_SETTLE_NS:
                step = min(step * 2, REFILL_POLL_MAX)  # nothing claimed since the last look
                continue
            seen, step = (mtime, time.time_ns()), REFILL_POLL
            self._prune(watch)
        return True

    def _prune(self, watch: dict[str, int]) -> None:
        """Drop the names that were claimed (or are done), or whose batch file left ``left/``
        (failed, quarantined or split between two looks), from ``watch``: a stat or three each."""
        self.looks += 1
        right = f"{self.spool.right}{os.sep}"
        left = f"{self.spool.left}{os.sep}"
        # A done batch has left left/ (it is in done/, its claim removed): gone from left/ is
        # no longer pending.
        for name in [n for n in watch if os.path.lexists(right + n) or os.path.lexists(right + n + DONE)
                     or not os.path.lexists(left + n + SUFFIX)]:
            del watch[name]

    def _pending_sizes(self) -> dict[str, int]:
        """The pending batches' names, with their sizes when ``max_pending`` is in bytes."""
        names = self.spool.pending(ordered=False)
        if self.queue.max_pending_bytes is None:
            return dict.fromkeys(names, 0)
        sizes = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                sizes[name] = os.stat(self.spool.left / f"{name}{SUFFIX}").st_size
        return sizes

    def _pause(self, why: str, detail: str) -> None:
        if self.paused != why:
            level = logging.INFO if why == "max_pending" else logging.WARNING
            log.log(level, "paused queue=%s reason=%s: %s", self.queue.name, why, detail)
        self.paused = why
        self.pause_detail = detail

    def _resume(self, pending: int) -> None:
        if self.paused:
            log.info("resumed queue=%s after=%s pending=%d", self.queue.name, self.paused, pending)
            self.paused = None
