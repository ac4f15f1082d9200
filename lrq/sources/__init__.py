"""Sources: where a queue's items come from.

A source is stateless about progress: the sniffer passes in the last saved position and
saves the one returned, only after the batch file is durable (see :mod:`lrq.spool`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lrq.config import SourceConfig


@dataclass(frozen=True)
class Fetched:
    items: list[dict[str, Any]]
    #: The position after these items; pass it to the next ``fetch``.
    position: Any


class Source(Protocol):
    def fetch(self, position: Any, limit: int) -> Fetched:
        """Up to ``limit`` items after ``position`` (None: from the start)."""

    def keys(self, key: str) -> Iterator[str]:
        """Every item's ``key`` field as a string, one per item (so duplicates show), for
        ``lrq verify``."""

    def item_fields(self) -> Sequence[str] | None:
        """The fields every item carries, or None when the source cannot tell before it reads
        (a broker's messages): start-up checks the queue's ``key`` against them."""

    def close(self) -> None: ...


def build(cfg: SourceConfig) -> Source:
    if cfg.kind == "sql":
        from lrq.sources.sql import SqlSource

        return SqlSource(cfg)
    raise ValueError(f"unknown source kind {cfg.kind!r}")
