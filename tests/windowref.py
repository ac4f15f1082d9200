"""The sliding windows of workers.apache computed directly, in pure Python, from the
definition (a line at t is in every window [s, s + width) with s a multiple of interval),
for the unit and acceptance tests to compare the numpy handlers and the stored rows with."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from workers.apache import Access


def starts(t: int, width: int, interval: int) -> range:
    """Every multiple s of ``interval`` with s <= t < s + width."""
    first = -(-(t - width + 1) // interval) * interval  # the least multiple >= t - width + 1
    return range(first, t + 1, interval)


def status_counts(lines: Iterable[Access], width: int, interval: int) -> dict[str, int]:
    """requests per ``status:W:I:start:status`` id."""
    c: Counter[str] = Counter()
    for a in lines:
        for s in starts(a.ts, width, interval):
            c[f"status:{width}:{interval}:{s}:{a.status}"] += 1
    return dict(c)


def remote_counts(lines: Iterable[Access], width: int, interval: int) -> dict[str, tuple[int, int]]:
    """(requests, bytes) per ``remote:W:I:start:remote`` id."""
    c: dict[str, tuple[int, int]] = {}
    for a in lines:
        for s in starts(a.ts, width, interval):
            key = f"remote:{width}:{interval}:{s}:{a.remote}"
            r, b = c.get(key, (0, 0))
            c[key] = (r + 1, b + a.size)
    return c
