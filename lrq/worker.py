"""The worker: claim a pending batch, run the handler over it in chunks, store, mark done.

Log lines start with a stable event name (``claimed``, ``done``, ``finalized``, ``failed``,
``released``, ``progress``) followed by ``key=value`` fields.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from lrq.config import QueueConfig
from lrq.errors import BatchCorrupt, HandlerError, SinkError
from lrq.sink import Sink
from lrq.spool import Claim, Spool

log = logging.getLogger(__name__)

Handler = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
PROGRESS_EVERY = 5.0  # seconds between progress lines on long runs


@dataclass
class RunStats:
    batches: int = 0
    items: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


class Worker:
    def __init__(self, queue: QueueConfig, spool: Spool, sink: Sink, handler: Handler, *,
                 stop: threading.Event | None = None) -> None:
        self.queue = queue
        self.spool = spool
        self.sink = sink
        self.handler = handler
        self.stop = stop or threading.Event()
        self.stats = RunStats()

    # -- one batch -----------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and process one batch; False when nothing is pending."""
        claim = self.spool.pick(self.queue.order)
        if claim is None:
            return False
        log.debug("claimed queue=%s batch=%s", self.queue.name, claim.name)
        self.process(claim)
        return True

    def run_named(self, name: str) -> bool:
        """Process one named batch; False when it is not pending (claimed, done or absent)."""
        claim = self.spool.claim(name)
        if claim is None:
            return False
        self.process(claim)
        return True

    def process(self, claim: Claim) -> None:
        q = self.queue.name
        if self.sink.is_recorded(claim.name):
            # Killed after the commit, before the marker: the ledger says done.
            self.spool.mark_done(claim, {"finalized": True})
            log.info("finalized queue=%s batch=%s", q, claim.name)
            return
        t0 = time.monotonic()
        try:
            batch = self.spool.load(claim.name)
            results = self.handle(batch.items)
        except (BatchCorrupt, HandlerError) as e:
            self._fail(claim, str(e), "".join(traceback.format_exception(e)))
            return
        except Exception as e:
            self._fail(claim, f"handler {self.queue.handler} raised {type(e).__name__}: {e}",
                       "".join(traceback.format_exception(e)))
            return
        try:
            stored = self.sink.store(claim.name, len(batch.items), results, claim.attempt)
        except HandlerError as e:
            self._fail(claim, str(e), "".join(traceback.format_exception(e)))
            return
        except SinkError:
            # The database is the problem, not the batch: give it back untouched.
            self.spool.release(claim)
            log.warning("released queue=%s batch=%s reason=sink-error", q, claim.name)
            raise
        self.spool.mark_done(claim, {"items": len(batch.items), "results": stored.results})
        self.stats.batches += 1
        self.stats.items += len(batch.items)
        log.info("done queue=%s batch=%s items=%d stored=%d seconds=%.3f", q, claim.name,
                 len(batch.items), stored.results, time.monotonic() - t0)

    def _fail(self, claim: Claim, message: str, detail: str) -> None:
        self.spool.fail(claim, f"{message}\n\n{detail}")
        self.stats.failed += 1
        log.error("failed queue=%s batch=%s error=%s (details: lrq show %s)",
                  self.queue.name, claim.name, message, claim.name)

    def handle(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Call the handler on chunks of ``chunk_size``; check one result per item."""
        key = self.queue.key
        out: list[dict[str, Any]] = []
        size = self.queue.chunk_size
        for i in range(0, len(items), size):
            chunk = items[i:i + size]
            results = self.handler(chunk)
            if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
                raise HandlerError(f"handler {self.queue.handler} must return a list of dicts, "
                                   f"got {type(results).__name__}")
            try:
                want = sorted(str(it[key]) for it in chunk)
            except KeyError:
                raise HandlerError(f"an item has no {key!r} field (the queue's key); "
                                   f"item fields: {sorted(chunk[0])}") from None
            got = sorted(str(r.get(key)) for r in results)
            if got != want:
                raise HandlerError(f"handler {self.queue.handler} returned {len(results)} results "
                                   f"for {len(chunk)} items; each item needs one result carrying "
                                   f"its {key!r}")
            out.extend(results)
        return out

    # -- many batches --------------------------------------------------------------------
    def run(self, *, burst: bool = True, max_batches: int | None = None,
            max_seconds: float | None = None, idle_wait: float = 1.0,
            progress: bool = False) -> RunStats:
        """Process batches until none is pending (``burst``), a limit is hit, or ``stop`` is set."""
        self.stats = RunStats()
        next_report = time.monotonic() + PROGRESS_EVERY
        while not self.stop.is_set():
            if max_batches is not None and self.stats.batches + self.stats.failed >= max_batches:
                break
            if max_seconds is not None and self.stats.seconds >= max_seconds:
                break
            if not self.run_once():
                if burst:
                    break
                self.stop.wait(idle_wait)
            if progress and time.monotonic() >= next_report:
                next_report = time.monotonic() + PROGRESS_EVERY
                log.info("progress queue=%s batches=%d items=%d rate=%.0f/s pending=%d",
                         self.queue.name, self.stats.batches, self.stats.items, self.stats.rate,
                         len(self.spool.pending()))
        return self.stats
