"""The sniffer: fetch items from the source and publish them as batches into ``left/``.

The source position is saved only after the batch file is durable (invariant 1), so a
crash in between re-publishes the same items, which the sink's unique keys absorb.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from lrq.config import QueueConfig
from lrq.sources import Source
from lrq.spool import Spool

log = logging.getLogger(__name__)


class Sniffer:
    def __init__(self, queue: QueueConfig, spool: Spool, source: Source, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.spool = spool
        self.source = source
        self.clock = clock
        #: True once a fetch came back short: the source has nothing more for now.
        self.drained = False
        self.paused = False

    def tick(self, max_batches: int | None = None, max_seconds: float = 10.0) -> int:
        """Publish batches until the source is drained, ``max_pending`` batches wait, or a
        limit is hit; return how many were published. Hold :meth:`Spool.lock` around it."""
        deadline = self.clock() + max_seconds
        pending = len(self.spool.pending())
        position = self.spool.read_position()
        published = 0
        while max_batches is None or published < max_batches:
            if pending >= self.queue.max_pending:
                if not self.paused:
                    log.info("paused queue=%s pending=%d max_pending=%d", self.queue.name,
                             pending, self.queue.max_pending)
                self.paused = True
                break
            if self.paused:
                log.info("resumed queue=%s pending=%d", self.queue.name, pending)
                self.paused = False
            fetched = self.source.fetch(position, self.queue.batch_size)
            if not fetched.items:
                self.drained = True
                break
            name = self.spool.publish(fetched.items, fetched.position)
            self.spool.write_position(fetched.position)
            position = fetched.position
            published += 1
            pending += 1
            log.debug("published queue=%s batch=%s items=%d", self.queue.name, name,
                      len(fetched.items))
            self.drained = len(fetched.items) < self.queue.batch_size
            if self.drained or self.clock() >= deadline:
                break
        return published
