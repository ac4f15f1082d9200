"""Which offset a Kafka consumer may commit, per partition, when batches finish out of order.

Kafka keeps one committed offset per partition and group: "everything below this is done".
lrq's batches finish in any order, so a partition's offset may move only up to its oldest
item that is fetched but not yet acknowledged. :class:`Tracker` keeps, per owned partition,
the fetched offsets in fetch order (a deque) and the acknowledged ones not yet at its head (a
set): acknowledging pops the head while it is done, so each offset costs O(1). Offsets the
broker skips (compaction, transaction markers) never enter the deque, so gaps do not stall it.

Held receipts (items a restarted node already has in batch files, see
:class:`lrq.sources.Context`) are re-delivered by Kafka from the committed offset: they are
not handed out again but enter the deque like a fetch, so the commit waits for their own
acknowledgement. Acknowledgements that come before the first assignment (the acker starts
before the group answers) are kept and merged when it comes; after that, one for a partition
this node does not own is ignored (its new owner replays the item; the unique keys absorb it).

Pure bookkeeping, no client: unit-tested without a broker (tests/unit/test_kafka_offsets.py).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class Partition:
    """One owned partition's fetched-but-unacknowledged offsets."""

    __slots__ = ("pending", "members", "done", "next", "committed")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # fetched, in fetch order, head not yet acked
        self.members: set[int] = set()      # the same offsets, for O(1) membership
        self.done: set[int] = set()         # acked, waiting for the head to reach them
        self.next: int | None = None        # one past the highest offset fetched
        #: The offset last committed by this node (confirmed by the broker), None before.
        self.committed: int | None = None

    def fetched(self, offset: int) -> None:
        if self.next is None:  # first fetch since assigned: the group's offset is here
            self.done = {o for o in self.done if o >= offset}
            if self.committed is None:
                self.committed = offset
        self.pending.append(offset)
        self.members.add(offset)
        self.next = offset + 1
        self._advance()

    def acked(self, offset: int) -> None:
        if offset in self.members or self.next is None or offset >= self.next:
            self.done.add(offset)  # ahead of the fetch: the item comes again, already done
            self._advance()

    def _advance(self) -> None:
        pending, done = self.pending, self.done
        while pending and pending[0] in done:
            head = pending.popleft()
            done.discard(head)
            self.members.discard(head)

    def point(self) -> int | None:
        """The offset to commit: the oldest unacknowledged item, or one past the last fetched
        when all are acknowledged; None before anything was fetched."""
        return self.pending[0] if self.pending else self.next

    def due(self) -> int | None:
        """:meth:`point` when it is past the last commit, else None (nothing to commit)."""
        point = self.point()
        if point is None or (self.committed is not None and point <= self.committed):
            return None
        return point


class Tracker:
    """Owned partitions, held receipts and early acknowledgements of one consumer."""

    def __init__(self, held: Iterable[tuple[int, int]] = ()) -> None:
        self.parts: dict[int, Partition] = {}
        #: Offsets this node holds in batch files, per partition: skipped when re-delivered.
        self.held: dict[int, set[int]] = {}
        for p, o in held:
            self.held.setdefault(p, set()).add(o)
        #: Acknowledgements before the first assignment, per partition.
        self.early: dict[int, set[int]] | None = {}

    def assigned(self, partitions: Iterable[int]) -> None:
        first = self.early is not None
        for p in partitions:
            part = self.parts.setdefault(p, Partition())
            if self.early:
                for o in self.early.pop(p, ()):
                    part.acked(o)
        if first:  # held receipts of partitions another node owns now: that node replays them
            self.early = None
            self.held = {p: s for p, s in self.held.items() if p in self.parts}

    def revoked(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.parts.pop(p, None)
            self.held.pop(p, None)  # should it come back, its items are fetched normally

    def fetched(self, partition: int, offset: int) -> bool:
        """Record a fetched offset; False when this node already holds it (skip the item)."""
        part = self.parts.get(partition)
        if part is None:  # a message of a partition revoked meanwhile: not ours to track
            return False
        part.fetched(offset)
        held = self.held.get(partition)
        if held is not None and offset in held:
            held.discard(offset)
            if not held:
                del self.held[partition]
            return False
        return True

    def acked(self, partition: int, offset: int) -> bool:
        """Record an acknowledgement; False when it is ignored (a partition not owned)."""
        part = self.parts.get(partition)
        if part is not None:
            part.acked(offset)
            return True
        if self.early is not None:
            self.early.setdefault(partition, set()).add(offset)
            return True
        return False

    def due(self) -> dict[int, int]:
        """Offsets to commit now, per partition."""
        return {p: d for p, part in self.parts.items() if (d := part.due()) is not None}

    def confirmed(self, offsets: dict[int, int]) -> None:
        for p, o in offsets.items():
            part = self.parts.get(p)
            if part is not None and (part.committed is None or o > part.committed):
                part.committed = o

    def in_flight(self) -> int:
        """Items fetched and not yet acknowledged, on every owned partition."""
        return sum(len(part.pending) for part in self.parts.values())
