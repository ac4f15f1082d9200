"""Handlers for the fan-out tests (tests/*/test_fanout*.py): a per-item output, one that
fails on chosen items, and an aggregating one. Copied next to a subprocess test's config."""
from __future__ import annotations

from typing import Any

from sqlalchemy import Float, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Item numbers (the digits of doc_id) the ``picky`` and the ``totals`` handlers refuse.
PICKY_BAD = {3, 7}
TOTALS_BAD = {5}


def number(item: dict[str, Any]) -> int:
    return int("".join(c for c in str(item["doc_id"]) if c.isdigit()) or "0")


def words(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per item: its word count."""
    return [{"doc_id": it["doc_id"], "words": len(str(it.get("content", "")).split())}
            for it in items]


def picky(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per item; raises on an item whose key is in ``PICKY_BAD``."""
    for it in items:
        if number(it) in PICKY_BAD:
            raise ValueError(f"picky refuses {it['doc_id']}")
    return [{"doc_id": it["doc_id"], "chars": len(str(it.get("content", "")))} for it in items]


def bucket_of(item: dict[str, Any]) -> str:
    return f"b{number(item) % 3}"


def totals(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregating: one row per bucket of this call's items (``docs``, ``words`` summed,
    ``last`` the newest key); raises on an item in ``TOTALS_BAD``."""
    rows: dict[str, dict[str, Any]] = {}
    for it in items:
        if number(it) in TOTALS_BAD:
            raise ValueError(f"totals refuses {it['doc_id']}")
        b = bucket_of(it)
        r = rows.setdefault(b, {"bucket": b, "docs": 0, "words": 0, "ratio": 0.0})
        r["docs"] += 1
        r["words"] += len(str(it.get("content", "")).split())
        r["ratio"] += 0.5
        r["last"] = it["doc_id"]
    return list(rows.values())


def make_totals(scale: int = 1) -> Any:
    """A factory (``options = { scale = N }``): ``totals`` with docs multiplied by ``scale``."""
    def handle(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = totals(items)
        for r in out:
            r["docs"] *= scale
        return out
    return handle



class Base(DeclarativeBase):
    pass


class BucketTotal(Base):
    """The aggregating output's ORM model: one row per bucket, unique by it."""

    __tablename__ = "bucket_totals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bucket: Mapped[str] = mapped_column(String(64), unique=True)
    docs: Mapped[int] = mapped_column(Integer, default=0)
    words: Mapped[int] = mapped_column(Integer, default=0)
    ratio: Mapped[float] = mapped_column(Float, default=0.0)
    last: Mapped[str] = mapped_column(String(64), nullable=True)


class OutsideProbe:
    """An output kind outside the database (as ``kind = "kafka"``): its ``write`` looks
    whether the results database's write lock is free while it "sends", and records what
    it saw in ``SEEN`` (the test registers it in ``lrq.outputs.KINDS``)."""

    SEEN: list[tuple[bool, bool]] = []  # (conn was None, the write lock was free), per send
    outside = True
    aggregate = False
    columns = None
    refusal = "the probe cannot send the result"

    def __init__(self, engine: Any, queue: Any, output: Any, base: Any = None) -> None:
        self.name = output.name
        self.path = engine.url.database

    def prepare(self) -> None:
        pass

    def write(self, conn: Any, batch: str, results: list[dict[str, Any]],
              final: bool) -> list[Any]:
        import sqlite3

        other = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # fails at once while a writer holds the lock
            other.execute("ROLLBACK")
            free = True
        except sqlite3.OperationalError:
            free = False
        finally:
            other.close()
        self.SEEN.append((conn is None, free))
        return []

    def keys(self) -> None:
        return None

    def count(self) -> None:
        return None

    def duplicates(self) -> int:
        return 0
