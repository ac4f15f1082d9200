"""In-memory sources for fast unit tests (never the only test of a path).

:class:`MemorySource` is a re-readable list (acknowledged at publish, like a SQL table);
:class:`MemoryBroker` is a broker in miniature (acknowledged at commit, like a Redis stream
read by a consumer group): what it hands out stays pending until acknowledged, and a
restarted consumer gets its own pending entries again, minus those it holds.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lrq.sources import AckAt, Context, Fetched


class MemorySource:
    """A list of items read in order; the position is the index of the next item."""

    ack_at: AckAt = "publish"

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.fetches = 0

    def fetch(self, position: Any, limit: int) -> Fetched:
        self.fetches += 1
        start = position or 0
        chunk = self.items[start:start + limit]
        return Fetched(list(chunk), start + len(chunk))

    def ack(self, receipts: Sequence[Any]) -> None:
        raise AssertionError("a source acknowledged at publish is never acked")

    def keep(self, receipts: Sequence[Any]) -> None:
        pass

    def settled(self) -> bool:
        return True

    def keys(self, key: str) -> Iterator[str]:
        return (str(i[key]) for i in self.items)

    def item_fields(self) -> None:
        return None  # items may differ; the worker checks each batch

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class MemoryBroker:
    """Entries by id (their receipt); each is *new* until fetched, then *pending* until
    acknowledged. A fetch hands out this consumer's pending entries it does not hold first
    (a restarted consumer re-reading its own), then new ones. ``keep`` calls are recorded;
    ``settled`` once nothing is new or pending. Not shared between processes: the contract
    suite's cross-process broker is the SQL-backed harness's."""

    ack_at: AckAt = "commit"
    keep_every = 0.0  # keep at every step, so tests see it

    def __init__(self, items: list[dict[str, Any]], context: Context | None = None) -> None:
        self.entries: dict[int, dict[str, Any]] = dict(enumerate(items))
        self.new: list[int] = list(self.entries)
        self.pending: set[int] = set()
        self.acked: set[int] = set()
        self.kept: list[list[Any]] = []
        self.acks: list[list[Any]] = []
        self.skip: set[int] = set(context.held) if context else set()
        self.fetches = 0

    def add(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            n = len(self.entries)
            self.entries[n] = item
            self.new.append(n)

    def restart(self, context: Context) -> MemoryBroker:
        """The same broker seen by a restarted consumer: its pending entries (those not in
        ``context.held``) are handed out again."""
        self.skip = set(context.held)
        self.redeliver = sorted(self.pending - self.skip)
        return self

    redeliver: list[int] = []

    def fetch(self, position: Any, limit: int) -> Fetched:
        assert position is None, "a commit-acked source is given no position"
        self.fetches += 1
        ids = self.redeliver[:limit]
        self.redeliver = self.redeliver[len(ids):]
        take = self.new[:limit - len(ids)]
        self.new = self.new[len(take):]
        ids += take
        self.pending.update(take)
        return Fetched([dict(self.entries[i]) for i in ids], None, list(ids))

    def ack(self, receipts: Sequence[Any]) -> None:
        self.acks.append(list(receipts))
        for r in receipts:
            self.pending.discard(r)
            self.acked.add(r)

    def keep(self, receipts: Sequence[Any]) -> None:
        self.kept.append(list(receipts))

    def settled(self) -> bool:
        return not self.new and not self.pending

    def keys(self, key: str) -> None:
        return None  # a stream cannot list its keys

    def item_fields(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"pending": len(self.pending), "lag": len(self.new), "acked": len(self.acked)}

    def close(self) -> None:
        pass
