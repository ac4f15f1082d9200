"""workers.apache's handlers on a sample day: lines/s, and the numpy windows against the same
windows counted in a pure-Python loop per line per window, in the same run.

``python bench/apache_windows.py [--lines 60000] [--chunk 500] [--repeat 3] [--quick]``

Rows (median of ``--repeat``, over chunks of ``--chunk`` items, as a worker calls them):

* ``parse``: :func:`workers.apache.parse`, the AccessLine rows;
* ``status_windows`` / ``remote_windows``: the handlers (each parses its lines again);
* ``windows only``: the handlers' numpy part on already-parsed lines, against ``python
  loop``: the same counts by ``for line: for window: counter[key] += 1`` (tests/windowref.py's
  method). The ratio is python loop time / numpy time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from workers.apache import _group, parse, parse_line, remote_windows, status_windows, window_starts
from workers.apache_sample import sample_lines


def timed(fn: Callable[[], Any], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def python_windows(ts: list[int], status: list[int], width: int, interval: int) -> Counter[tuple[int, int]]:
    c: Counter[tuple[int, int]] = Counter()
    for t, st in zip(ts, status):
        first = -(-(t - width + 1) // interval) * interval
        for s in range(first, t + 1, interval):
            c[s, st] += 1
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=60_000)
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--width", type=int, default=60)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="10k lines, one run")
    a = p.parse_args()
    if a.quick:
        a.lines, a.repeat = 10_000, 1
    items = [{"id": str(i), "line": s} for i, s in enumerate(sample_lines(a.lines, bad=0))]
    chunks = [items[i:i + a.chunk] for i in range(0, len(items), a.chunk)]
    w, i = a.width, a.interval
    sw, rw = status_windows(w, i), remote_windows(w, i)
    rows = [("parse", timed(lambda: [parse(c) for c in chunks], a.repeat)),
            (f"status_windows({w}, {i})", timed(lambda: [sw(c) for c in chunks], a.repeat)),
            (f"remote_windows({w}, {i})", timed(lambda: [rw(c) for c in chunks], a.repeat))]
    parsed = [[parse_line(it["line"]) for it in c] for c in chunks]
    cols = [(np.array([x.ts for x in c], np.int64), np.array([x.status for x in c], np.int64))
            for c in parsed]
    lists = [([x.ts for x in c], [x.status for x in c]) for c in parsed]
    t_np = timed(lambda: [_group(window_starts(ts, w, i), st, i) for ts, st in cols], a.repeat)
    t_py = timed(lambda: [python_windows(ts, st, w, i) for ts, st in lists], a.repeat)
    rows += [("windows only, numpy", t_np), ("windows only, python loop", t_py)]
    print(f"{a.lines} lines in chunks of {a.chunk}, width {w} s, interval {i} s, "
          f"median of {a.repeat}")
    for name, t in rows:
        print(f"  {name:28} {t:8.3f} s  {a.lines / t:12,.0f} lines/s")
    print(f"  python loop / numpy: {t_py / t_np:.1f}x")


if __name__ == "__main__":
    main()
