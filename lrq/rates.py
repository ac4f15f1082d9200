"""Throughput and ETA arithmetic for ``lrq status``: pure functions over counts and times.

Rates come from the batch ledger (``lrq_batches.finished_at``, the database's own clock):
:meth:`lrq.sink.Sink.finished_within` counts the batches and items committed in each window
ending at the database's ``now``, so a remote database with a skewed clock still gives the
right figures. A rate is the window's count over the window's length: a run that started
30 s ago shows half its speed in the 60 s window until a minute has passed, and a stopped
run decays to 0 instead of keeping its last speed.

The ETA divides a backlog by the most recent non-zero rate (60 s, else 600 s); None when
nothing was committed in either window (no basis for a guess) and 0 for an empty backlog.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

#: The windows, in seconds, rates are reported over (the last minute and ten minutes).
WINDOWS = (60, 600)


@dataclass(frozen=True)
class Window:
    """What the ledger recorded as committed in the last ``seconds``."""

    seconds: int
    batches: int
    items: int

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds

    def to_json(self) -> dict[str, float | int]:
        return {"batches": self.batches, "items": self.items,
                "items_per_s": round(self.items_per_s, 3),
                "batches_per_s": round(self.batches_per_s, 3)}


@dataclass(frozen=True)
class Rates:
    """Items and batches per second over each of :data:`WINDOWS`."""

    windows: tuple[Window, ...]

    @classmethod
    def from_counts(cls, counts: Mapping[int, tuple[int, int]]) -> Rates:
        """From ``{seconds: (batches, items)}`` as :meth:`Sink.finished_within` returns it."""
        return cls(tuple(Window(s, *counts.get(s, (0, 0))) for s in sorted(counts)))

    def window(self, seconds: int) -> Window | None:
        return next((w for w in self.windows if w.seconds == seconds), None)

    @property
    def items_per_s(self) -> float:
        """The most recent non-zero items rate (shortest window first), else 0."""
        return next((w.items_per_s for w in self.windows if w.items), 0.0)

    def to_json(self) -> dict[str, dict[str, float | int]]:
        """``{"60s": {...}, "600s": {...}}`` (see :meth:`Window.to_json`)."""
        return {f"{w.seconds}s": w.to_json() for w in self.windows}


def window_counts(finished: list[tuple[float, int]], now: float,
                  windows: tuple[int, ...] = WINDOWS) -> dict[int, tuple[int, int]]:
    """``{seconds: (batches, items)}`` of ``finished`` ``(time, items)`` pairs at most
    ``seconds`` before ``now``: the in-memory twin of the ledger query (tests, fake clocks)."""
    return {w: (sum(1 for t, _ in finished if now - w <= t <= now),
                sum(n for t, n in finished if now - w <= t <= now)) for w in windows}


def eta(backlog: int | None, rate: float) -> float | None:
    """Seconds to work off ``backlog`` items at ``rate`` items/s: 0 for nothing left, None
    when either is unknown (no backlog figure, or nothing committed lately)."""
    if backlog is None:
        return None
    if backlog <= 0:
        return 0.0
    if rate <= 0 or math.isnan(rate):
        return None
    return backlog / rate


def human_seconds(seconds: float | None) -> str:
    """``"-"``, ``"45s"``, ``"12m05s"``, ``"3h20m"`` or ``"2d04h"``: an ETA for a column."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
