"""Acknowledgement at commit: tell a broker source which items are stored, and keep the rest.

A source acknowledged at commit (``Source.ack_at == "commit"``: Redis Streams, a Redis list,
Kafka) must hear of an item only once its results are committed, or a node lost with its
disk loses it (issue 13). The :class:`Acker` runs in the process that runs the sniffer (the
scheduler's sniff job, ``lrq sniff``), at the start of every sniffer tick and every
``lrq.sniffer.ACK_EVERY`` (0.25 s) within one (a tick publishing a backlog or waiting to
refill can last seconds), under the sniffer lock: a Kafka group member must commit its own
partitions, and that process owns the consumer.

It holds ``name -> receipts`` for every batch of this queue not yet acknowledged: built at
start from the spool (:meth:`lrq.spool.Spool.held_names`: batches in ``left/`` and
``failed/`` written with receipts, done ones not yet acknowledged), extended by each
publish. Each :meth:`Acker.step`:

1. looks at each held batch (a stat or two, :meth:`~lrq.spool.Spool.ack_state`): done
   (in ``done/``, where a batch moves only after its ledger row is committed) and not yet
   acknowledged -> collected;
2. one ``source.ack(all their receipts)``, then each is marked acknowledged on disk
   (:meth:`~lrq.spool.Spool.mark_acked`: its file's mode back from
   :data:`~lrq.spool.files.AWAITING_ACK_MODE`, one ``chmod``, no inode). Ack first, mark
   second: a crash in between acknowledges again after the restart (``ack`` is idempotent);
   a mark is never written for an item the source was not told of;
3. every :data:`KEEP_EVERY` seconds (or the source's ``keep_every``), ``source.keep(receipts
   of every held batch)``, so the broker does not hand them to another node as abandoned.

A held batch that vanished (split by the reaper into halves, or quarantined) makes the next
step scan the spool again, which picks up the halves (their receipts are sliced with their
items). Failed batches (``failed/``) stay held and kept, and are never acknowledged until
they are requeued and done: the broker keeps them pending for this node meanwhile.
A source acknowledged at publish gets no acker (``ack`` is never called).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from lrq import failpoints
from lrq.errors import BatchCorrupt, LrqError, SourceError
from lrq.sources import Source
from lrq.spool import Spool

log = logging.getLogger(__name__)

#: Seconds between two ``keep`` calls unless the source asks for less (``keep_every``). The
#: gap can be longer by ``lrq.sniffer.ACK_EVERY`` or by one blocking fetch (a stream's
#: ``block``), so a source's own keep-alive (``claim_idle``) should be well above this (the
#: default 60 s keeps every 15 s).
KEEP_EVERY = 10.0


class Acker:
    """One queue's acknowledgements to its source; see the module docstring."""

    def __init__(self, spool: Spool, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.clock = clock
        #: Held batches not yet acknowledged: name -> receipts.
        self.held: dict[str, list[Any]] = {}
        self.acked = 0  # batches acknowledged by this process
        self.last_ack: float | None = None  # time.time() of the last acknowledgement
        self._keep_at = 0.0
        self._rescan = True
        self._failing = False
        self.scan()

    def receipts(self) -> list[Any]:
        """Every held batch's receipts (:attr:`lrq.sources.Context.held`)."""
        return [r for rs in self.held.values() for r in rs]

    def scan(self) -> None:
        """Add the spool's held batches this acker does not know yet (start-up, and after a
        held batch vanished). Reads each new one's receipts from its file."""
        for name in self.spool.held_names():
            if name in self.held:
                continue
            try:
                receipts = self.spool.load(name).receipts
            except FileNotFoundError:
                continue  # moved between the listing and the read; the next scan finds it
            except (BatchCorrupt, LrqError) as e:
                log.warning("ack-unreadable queue=%s batch=%s: %s; its items stay pending in "
                            "the source until a restart re-reads them", self.spool.queue, name, e)
                continue
            if receipts:
                self.held[name] = list(receipts)
        self._rescan = False

    def add(self, name: str, receipts: list[Any]) -> None:
        """A batch just published with these receipts."""
        self.held[name] = receipts

    def awaiting(self) -> int:
        """Held batches that are done but not acknowledged yet (a stat or two each): 0 is
        what ``lrq run --until-idle`` waits for. Called from the scheduler's supervise job
        while the sniff job's thread steps the acker, so it reads a copy of the names
        (taken at once, under the GIL): iterating ``held`` itself could meet a ``step``
        removing an acknowledged batch ("dictionary changed size during iteration")."""
        return sum(1 for name in list(self.held) if self.spool.ack_state(name) == "done")

    def step(self, source: Source, carried: Sequence[Any] = ()) -> int:
        """Acknowledge the held batches that are done, and keep the others when it is time;
        return how many batches were acknowledged. A source that cannot be reached is
        logged (once until it recovers) and tried again next step. ``carried``: receipts of
        items the sniffer holds in memory, not yet in a batch file (a batch lingering for
        more, or stopped by backpressure): kept alive too."""
        if self._rescan:
            self.scan()
        done: list[str] = []
        for name in list(self.held):
            state = self.spool.ack_state(name)
            if state == "done":
                done.append(name)
            elif state != "held":  # acknowledged by another process, or split: look again
                del self.held[name]
                self._rescan |= state == "gone"
        try:
            if done:
                failpoints.hit("ack-before")
                source.ack([r for name in done for r in self.held[name]])
                failpoints.hit("ack-after")
                for name in done:
                    self.spool.mark_acked(name)
                    del self.held[name]
                self.acked += len(done)
                self.last_ack = time.time()
                log.debug("acked queue=%s batches=%d", self.spool.queue, len(done))
            now = self.clock()
            if (self.held or carried) and now >= self._keep_at:
                source.keep(self.receipts() + list(carried))
                self._keep_at = now + min(KEEP_EVERY, float(getattr(source, "keep_every",
                                                                    KEEP_EVERY)))
        except SourceError as e:
            if not self._failing:
                log.warning("ack-failed queue=%s batches=%d: %s; trying again next tick",
                            self.spool.queue, len(done), e)
            self._failing = True
            return 0
        if self._failing:
            log.info("ack-resumed queue=%s", self.spool.queue)
            self._failing = False
        if self._rescan:
            self.scan()  # the halves of a split batch: held from now on
        return len(done)

    def status(self) -> dict[str, Any]:
        return {"held_batches": len(self.held), "acked_batches": self.acked,
                "last_ack": self.last_ack}
