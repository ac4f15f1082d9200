"""Batch rules: where the sniffer cuts the items it fetched into batch files.

A queue's batches are shaped by four keys (``[queues.NAME]``):

``batch_size``
    At most this many items per batch (and per fetch), as ever.
``batch_max_bytes``
    A batch closes before its items' size would pass this (``"1MB"`` or bytes). An item's
    size is the length of its own pickle (:func:`item_size`), the encoding the spool writes
    before compression; a batch file is at most its items' sizes plus a header (about 150
    bytes, plus the source position), less what compression saves. An item larger than the
    limit goes alone in its batch: never dropped, never stalled.
``separate``
    ``"module:function"``, a function ``(batch_so_far, item) -> bool`` that says ``item``
    must start a new batch (it is not asked for the first item of a batch). It must not
    modify ``batch_so_far``. One that raises is logged (``separate-failed``, at ERROR, at
    most once a minute with a count) and counts as True: the item starts a new batch, so a
    rule that keeps items apart is never broken by its own failure, and the batch is
    neither lost nor stalled (a bad item must not stop the queue; invariant 11).
``batch_linger``
    A batch that is not full (``batch_size`` not reached and no rule closed it) waits this
    long for more items before it is published anyway (``"2s"``), so a slow source such as
    a log written line by line still flows in sizeable batches. Default 0: published at
    once, as before these rules. The wait counts from the fetch of the batch's first item
    and is checked at each sniffer tick (``interval``), so a batch can wait up to one
    interval longer. ``lrq sniff``, a one-off run, does not linger (``Sniffer.tick(flush=True)``).

Items waiting (lingering, or carried by backpressure or a full disk) are in memory only. A
source acknowledged at publish has not moved its position past them, so a crash loses
nothing: they are fetched again. A broker's receipts stay with them (the acker keeps them
alive, :meth:`lrq.acker.Acker.step`) and are published sliced with their items.

Positions: the :class:`Batcher` keeps, per fetch, the position after it (a *mark*). The
sniffer may save a position only once every item before it is in ``left/``: when a fetch is
cut into several batches, its position becomes safe only when its last piece is published
(:meth:`Batcher.drop` returns it then), never in between. A piece's batch file records the
last position wholly inside it or before it.

Cost: with neither ``batch_max_bytes`` nor ``separate`` set, nothing is done per item: a
fetch is taken as one batch without a copy (the fast path the sniffer had before).
"""
from __future__ import annotations

import logging
import pickle
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lrq.config import QueueConfig, load_object
from lrq.errors import ConfigError
from lrq.sources import Fetched

log = logging.getLogger(__name__)

#: Seconds between two ``separate-failed`` log lines of one queue (the first is at once).
ERROR_LOG_EVERY = 60.0

Separate = Callable[[list[dict[str, Any]], dict[str, Any]], bool]


def item_size(item: Any) -> int:
    """An item's size for ``batch_max_bytes``: the length of its pickle (the spool's encoding,
    before compression)."""
    return len(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))


@dataclass(frozen=True)
class Rules:
    """A queue's batch rules (see the module docstring)."""

    batch_size: int
    max_bytes: int | None = None
    separate: Separate | None = None
    linger: float = 0.0
    queue: str = ""

    @classmethod
    def of(cls, queue: QueueConfig, base: Path | None = None) -> Rules:
        """The rules of ``queue``, its ``separate`` function imported (a bad path or a
        name that is not callable is a :class:`ConfigError` naming the key)."""
        separate = None
        if queue.separate is not None:
            where = f"queues.{queue.name}.separate"
            separate = load_object(queue.separate, where, base)
            if not callable(separate):
                raise ConfigError(f"{where}: {queue.separate!r} is not callable; name a function "
                                  f"(batch_so_far, item) -> bool")
        return cls(batch_size=queue.batch_size, max_bytes=queue.batch_max_bytes,
                   separate=separate, linger=queue.batch_linger, queue=queue.name)

    @property
    def per_item(self) -> bool:
        """Must each item be looked at? (False: the fast path.)"""
        return self.max_bytes is not None or self.separate is not None


#: A mark: ``(end, position, at)``, the source position after the first ``end`` items of the
#: buffer, fetched at ``at`` (a plain tuple: one is made per fetch, on the fast path too).
Mark = tuple[int, Any, float]


class Piece(NamedTuple):
    """The next batch to publish: its items, their receipts, the position its file records."""

    items: list[dict[str, Any]]
    receipts: list[Any] | None
    position: Any


class Batcher:
    """Items fetched but not yet published, in order, cut into batches by :class:`Rules`.

    The sniffer ``add``\\ s each fetch, asks ``ready`` whether the next batch may be
    published, publishes ``piece()``, then calls ``drop()``, which returns whether a source
    position became safe to save and which. A failed publish simply does not ``drop``: the
    piece is published again later, never lost or doubled.

    Every method has a fast path for the common case (no per-item rule, the whole buffer
    one batch): a few attribute reads, no copy (measured in ``bench/cpu_ledger.py``'s
    ``sniffer.other``)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self._size = rules.batch_size
        self._linger = rules.linger
        self._per_item = rules.per_item
        self._items: list[dict[str, Any]] = []
        self._receipts: list[Any] | None = None
        self._start = 0  # items before it are published
        self._marks: deque[Mark] = deque()
        # The next batch as scanned so far (per-item rules only): items[start:scan].
        self._batch: list[dict[str, Any]] = []
        self._scan = 0
        self._bytes = 0
        self._closed = False
        #: Times ``separate`` raised (each counted as True).
        self.separate_errors = 0
        self._logged_at: float | None = None
        self._unlogged = 0

    def __len__(self) -> int:
        return len(self._items) - self._start

    # -- filling -------------------------------------------------------------------------
    def add(self, fetched: Fetched, now: float) -> None:
        """Append a fetch (not copied when the buffer is empty: the fast path)."""
        if not fetched.items:
            return
        if not self._items:
            self._items = fetched.items
            self._receipts = fetched.receipts
        else:
            self._items = self._items + fetched.items  # a new list: the source's is not ours
            if self._receipts is not None and fetched.receipts is not None:
                self._receipts = self._receipts + list(fetched.receipts)
        self._marks.append((len(self._items), fetched.position, now))

    def read_position(self, saved: Any) -> Any:
        """Where the next fetch starts: after the last item held, else ``saved``."""
        return self._marks[-1][1] if self._marks else saved

    def room(self) -> int:
        """Items a fetch may add to fill the open next batch."""
        return max(self._size - len(self), 0)

    # -- cutting -------------------------------------------------------------------------
    def _cut(self) -> int:
        """Scan the next batch up to its end and return how many items it has; sets
        ``_closed`` when it can take no more (full, or a rule started a new batch)."""
        size = self._size
        if not self._per_item:
            n = min(len(self._items) - self._start, size)
            self._closed = n == size
            return n
        if self._closed:
            return self._scan - self._start
        stop = min(len(self._items), self._start + size)
        items, batch, limit = self._items, self._batch, self.rules.max_bytes
        separate = self.rules.separate
        i = self._scan
        while i < stop:
            item = items[i]
            if batch:
                if separate is not None and self._separate(separate, batch, item):
                    self._closed = True
                    break
                if limit is not None:
                    s = item_size(item)
                    if self._bytes + s > limit:
                        self._closed = True
                        break
                    self._bytes += s
            elif limit is not None:
                self._bytes = item_size(item)  # the first goes in whatever its size
            batch.append(item)
            i += 1
        self._scan = i
        if len(batch) == size:
            self._closed = True
        return len(batch)

    def _separate(self, separate: Separate, batch: list[dict[str, Any]],
                  item: dict[str, Any]) -> bool:
        try:
            return bool(separate(batch, item))
        except Exception as e:  # noqa: BLE001 (a user's function: any error is reported)
            self.separate_errors += 1
            self._unlogged += 1
            now = time.monotonic()
            if self._logged_at is None or now - self._logged_at >= ERROR_LOG_EVERY:
                log.error("separate-failed queue=%s count=%d: %s: %s; the item starts a new "
                          "batch", self.rules.queue, self._unlogged, type(e).__name__, e,
                          exc_info=self._logged_at is None)
                self._logged_at, self._unlogged = now, 0
            return True

    def closed(self) -> bool:
        """Can the next batch take no more items (full, or a rule started a new batch)?"""
        if not self._per_item:
            return len(self._items) - self._start >= self._size
        self._cut()
        return self._closed

    def ready(self, now: float, flush: bool = False) -> bool:
        """May the next batch be published now: it is closed, or the linger is 0 or over
        (or ``flush``)? False when nothing is held."""
        if len(self._items) == self._start:
            return False
        if self._linger <= 0 or flush or self.closed():
            return True
        return now - self._marks[0][2] >= self._linger

    def piece(self, saved: Any) -> Piece:
        """The next batch (call when :meth:`ready`); ``saved``: the position saved before the
        buffer's first item, recorded when no fetch ends within the piece."""
        items = self._items
        if not self._per_item and self._start == 0 and len(items) <= self._size:
            return Piece(items, self._receipts, self._marks[-1][1])  # the fast path: no copy
        n = self._cut()
        start, end = self._start, self._start + n
        batch = self._batch if self._per_item else items[start:end]
        receipts = None if self._receipts is None else self._receipts[start:end]
        position = saved
        for mark in self._marks:
            if mark[0] > end:
                break
            position = mark[1]
        return Piece(batch, receipts, position)

    def drop(self) -> tuple[bool, Any]:
        """The piece was published: forget it. Returns ``(True, position)`` when a fetch's
        last item was in it (that position is now safe to save once ``left/`` is fsynced),
        else ``(False, None)``."""
        self._start += self._cut()
        if self._per_item:
            self._batch, self._bytes, self._closed = [], 0, False
            self._scan = self._start
        moved, position = False, None
        marks = self._marks
        while marks and marks[0][0] <= self._start:
            moved, position = True, marks.popleft()[1]
        if self._start >= len(self._items):
            self._items, self._receipts, self._start, self._scan = [], None, 0, 0
        return moved, position

    def held(self) -> Fetched | None:
        """What is held, as one :class:`Fetched` (a copy), or None when nothing is. Also read
        by the scheduler's supervise job (``lrq run --until-idle``) while the sniff job's
        thread changes the buffer: it reads each field once and never raises."""
        items, start, receipts = self._items, self._start, self._receipts
        if len(items) <= start:
            return None
        try:
            position = self._marks[-1][1]
        except IndexError:  # emptied meanwhile
            position = None
        return Fetched(items[start:], position, None if receipts is None else receipts[start:])

    def receipts(self) -> list[Any]:
        """The receipts of the items held (for the acker's ``keep``)."""
        return [] if self._receipts is None else self._receipts[self._start:]
