"""The storage service's batch rule (DESIGN.md §6): items of kind 1 and 2 never share a file.

Use it as a queue's ``separate`` (:mod:`lrq.batching`), with ``batch_size = 5`` for the
service's "at most 5 items per file"::

    [queues.store]
    batch_size = 5
    separate   = "workers.storage:apart"

An item's kind is its ``kind`` field (items without one are of no kind and go anywhere).
"""
from __future__ import annotations

from typing import Any

#: Kinds that must never share a batch with each other.
APART = (1, 2)


def apart(batch_so_far: list[dict[str, Any]], item: dict[str, Any]) -> bool:
    """True when ``item`` is of one kind in :data:`APART` and the batch holds the other:
    the item must start a new batch. (A scan of the batch: batches here hold 5 items.)"""
    kind = item.get("kind")
    if kind not in APART:
        return False
    return any(other.get("kind") in APART and other.get("kind") != kind
               for other in batch_so_far)


def handle(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Store nothing but acknowledge each item: one result per item, carrying its key."""
    return [{"id": it["id"], "kind": it.get("kind")} for it in items]
