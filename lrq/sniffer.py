"""The sniffer: fetch items from the source and publish them as batches into ``left/``.

The source position is saved only after the batch file is durable (invariant 1), so a
crash in between re-publishes the same items, which the sink's unique keys absorb. It is
saved once per ``POSITION_EVERY`` seconds of publishing and at the end of each tick rather
than after every batch: its two fsyncs were a fifth of the sniffer's time per 1000 items,
and a crash then re-publishes at most that much, which is absorbed the same way.

Backpressure: the sniffer stops prefetching while ``max_pending`` batches (or bytes; one
batch may always wait, however large, or a byte limit below one batch would stall) wait,
or while :meth:`lrq.disk.Budget.blocked` says the next batch does not fit (the data dir near
``cleanup.max_bytes``, or free space minus the next batch below ``cleanup.min_free``); cleanup
trims done batches on that same predicate. A write that still hits ENOSPC/EDQUOT
leaves nothing behind, acknowledges nothing, and backs off. Each pause is logged once, and
so is the resume.
"""
from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from lrq.config import QueueConfig
from lrq.disk import TRIM_AT, Budget
from lrq.sources import Source
from lrq.spool import Spool

log = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MAX_BACKOFF = 60.0  # seconds between tries after the disk was full
POSITION_EVERY = 0.5  # seconds of publishing between two saves of the source position


class Sniffer:
    def __init__(self, queue: QueueConfig, spool: Spool, source: Source, *,
                 budget: Budget | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.spool = spool
        self.source = source
        self.budget = budget
        self.clock = clock
        #: True once a fetch came back short: the source has nothing more for now.
        self.drained = False
        #: Why prefetching is paused ("max_pending", "budget", "min_free", "disk-full"), or None.
        self.paused: str | None = None
        #: The pause's detail, for the operator.
        self.pause_detail = ""
        self.last_bytes = 0
        #: Called after each batch is published (the scheduler starts workers from it, so
        #: they need not wait for a long tick to end).
        self.on_publish: Callable[[], None] | None = None
        self._retry_at = 0.0
        self._full_backoff = 1.0

    def tick(self, max_batches: int | None = None, max_seconds: float = 10.0) -> int:
        """Publish batches until the source is drained, backpressure says stop, or a limit is
        hit; return how many were published. Hold :meth:`Spool.lock` around it."""
        now = self.clock()
        if now < self._retry_at:
            return 0
        deadline = now + max_seconds
        position = saved = self.spool.read_position()
        if self.drained and not self.source.fetch(position, 1).items:
            return 0  # still nothing new: skip the disk accounting, an idle tick stays cheap
        pending, pending_bytes = self.spool.pending_stats()
        used = self.budget.used() if self.budget else 0
        published = 0
        save_at = now + POSITION_EVERY
        try:
            while max_batches is None or published < max_batches:
                if self.budget and used + 2 * self.last_bytes > TRIM_AT * self.budget.max_bytes:
                    used = self.budget.used()  # near the budget: decide on a fresh count
                blocked = self._blocked(pending, pending_bytes, used)
                if blocked:
                    self._pause(*blocked)
                    break
                fetched = self.source.fetch(position, self.queue.batch_size)
                if not fetched.items:
                    self.drained = True
                    self._resume(pending)
                    break
                try:
                    name = self.spool.publish(fetched.items, fetched.position)
                    size = (self.spool.left / f"{name}.pkl").stat().st_size
                except OSError as e:
                    if e.errno not in DISK_FULL:
                        raise
                    self._disk_full(e)
                    break
                self._full_backoff = 1.0
                self._resume(pending)
                position = fetched.position
                published += 1
                pending += 1
                pending_bytes += size
                used += size
                self.last_bytes = size
                log.debug("published queue=%s batch=%s items=%d bytes=%d", self.queue.name, name,
                          len(fetched.items), size)
                if self.on_publish is not None:
                    self.on_publish()
                self.drained = len(fetched.items) < self.queue.batch_size
                if self.drained or self.clock() >= deadline:
                    break
                if self.clock() >= save_at and self._save(position):
                    saved, save_at = position, self.clock() + POSITION_EVERY
        finally:
            if position != saved:  # every batch up to ``position`` is durable in left/
                self._save(position)
        return published

    def _save(self, position: Any) -> bool:
        """Save the source position; False (and a disk-full pause) if the disk is full, in
        which case the batches since the last save are fetched again later."""
        try:
            self.spool.write_position(position)
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
