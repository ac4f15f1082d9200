"""In-memory parts for fast unit tests (never the only test of a path)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lrq.sources import Fetched


class MemorySource:
    """A list of items read in order; the position is the index of the next item."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.fetches = 0

    def fetch(self, position: Any, limit: int) -> Fetched:
        self.fetches += 1
        start = position or 0
        chunk = self.items[start:start + limit]
        return Fetched(list(chunk), start + len(chunk))

    def keys(self, key: str) -> Iterator[str]:
        return (str(i[key]) for i in self.items)

    def item_fields(self) -> None:
        return None  # items may differ; the worker checks each batch

    def close(self) -> None:
        pass
