"""A day of sample Apache access logs, rotated twice, for ``make demo-logs`` and the tests.

``python -m workers.apache_sample --out data/demo-logs/logs --lines 60000``
``python -m workers.apache_sample --peek sqlite:///data/demo-logs/results.db TABLE TABLE``

Writes ``access.log`` in three parts of about ``lines / 3`` lines, with timestamps increasing
over 24 hours; between the parts the file is *rotated* as logrotate's ``create`` mode does:
``access.log.1`` becomes ``access.log.2``, ``access.log`` becomes ``access.log.1``, and
writing goes on in a new ``access.log``. So the day ends in ``access.log.2`` (oldest),
``access.log.1`` and ``access.log``. ``--pause SECONDS`` waits between parts (after each
rotation too), so a running tail (``kind = "logfile"``) sees the files grow and rotate.

The lines are deterministic for a seed: a few hundred remotes (some IPv6) chosen with a
skewed popularity, mostly 200s with some 304 (size ``-``), 404 and 5xx, user agents with
escaped quotes, some URLs of several kilobytes, and ``bad`` malformed lines (not access
lines, a line cut short, an impossible date) that the parser must reject as dead letters.
Existing ``access.log*`` files in the folder are removed first: a sample is a fresh day.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The sample day: 2026-11-30 00:00:00 UTC.
DAY = 1_795_996_800
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
PATHS = ["/", "/index.html", "/about", "/blog/", "/blog/2026/11/queues", "/static/app.js",
         "/static/app.css", "/img/logo.png", "/api/v1/items", "/api/v1/items/42",
         "/search", "/login", "/favicon.ico", "/robots.txt", "/feed.xml"]
STATUSES = np.array([200, 304, 404, 301, 302, 500, 503, 206, 403])
STATUS_P = np.array([0.78, 0.09, 0.05, 0.02, 0.02, 0.01, 0.01, 0.01, 0.01])
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0 Safari/537.36",
    "curl/8.5.0",
    'Mozilla/5.0 (compatible; \\"QuoteBot\\"/1.0; +http://example.com/bot)',
    "python-requests/2.32.3",
    "-",
]
REFERERS = ["-", "-", "https://www.example.com/", "https://search.example.org/?q=lrq+queue"]


@dataclass(frozen=True)
class Written:
    """What :func:`write_day` wrote: the files, oldest first, and the line counts."""

    files: list[Path]
    lines: int
    bad: int


def _remotes(rng: np.random.Generator, n: int) -> list[str]:
    v4 = [f"{a}.{b}.{c}.{d}" for a, b, c, d in rng.integers(1, 255, size=(n - n // 10, 4))]
    v6 = [f"2001:db8:{x:x}::{y:x}" for x, y in rng.integers(1, 0xFFFF, size=(n // 10, 2))]
    return v4 + v6


def _stamp(t: int, offset: int) -> str:
    """``t`` (epoch UTC) as Apache writes it in a zone ``offset`` seconds east of UTC."""
    y, mo, d, h, mi, s = time.gmtime(t + offset)[:6]
    sign, a = ("+" if offset >= 0 else "-"), abs(offset)
    return f"{d:02d}/{MONTHS[mo - 1]}/{y}:{h:02d}:{mi:02d}:{s:02d} {sign}{a // 3600:02d}{a % 3600 // 60:02d}"


def sample_lines(n: int, seed: int = 0, bad: int = 5, day: int = DAY,
                 offset: int = -7 * 3600) -> list[str]:
    """``n`` lines over the 24 h from ``day``, times increasing, ``bad`` of them malformed."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(day, day + 86400, size=n))
    remotes = _remotes(rng, 300)
    popularity = 1.0 / np.arange(1, len(remotes) + 1)
    who = rng.choice(len(remotes), size=n, p=popularity / popularity.sum())
    status = rng.choice(STATUSES, size=n, p=STATUS_P)
    sizes = rng.lognormal(8, 1.5, size=n).astype(np.int64)
    paths = rng.integers(0, len(PATHS), size=n)
    methods = rng.choice(np.array(["GET", "POST", "HEAD"]), size=n, p=[0.9, 0.08, 0.02])
    agents = rng.integers(0, len(AGENTS), size=n)
    referers = rng.integers(0, len(REFERERS), size=n)
    long_urls = set(rng.choice(n, size=max(1, n // 500), replace=False).tolist())
    broken = rng.choice(n, size=min(bad, n), replace=False).tolist()
    out = []
    for i in range(n):
        url = PATHS[paths[i]]
        if i in long_urls:
            url += "?utm=" + "x" * int(rng.integers(2000, 8000))
        st = int(status[i])
        size = "-" if st == 304 or methods[i] == "HEAD" else str(sizes[i])
        out.append(f'{remotes[who[i]]} - - [{_stamp(int(ts[i]), offset)}] "{methods[i]} {url} '
                   f'HTTP/1.1" {st} {size} "{REFERERS[referers[i]]}" "{AGENTS[agents[i]]}"')
    for j, i in enumerate(broken):
        kind = j % 3
        if kind == 0:
            out[i] = f"malformed line {i}: not an access line"
        elif kind == 1:
            out[i] = out[i][: len(out[i]) // 2]  # cut short, as by a full disk
        else:
            out[i] = out[i].replace(f"/{MONTHS[10]}/", "/Foo/", 1)  # an impossible month
    return out


def _parts(lines: list[str], parts: int) -> Iterator[list[str]]:
    step = -(-len(lines) // parts)
    for k in range(parts):
        yield lines[k * step:(k + 1) * step]


def write_day(folder: Path, lines: int = 60_000, seed: int = 0, bad: int = 5,
              rotations: int = 2, pause: float = 0.0) -> Written:
    """Write the sample day into ``folder`` as ``access.log`` rotated ``rotations`` times."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("access.log*"):
        old.unlink()
    log = folder / "access.log"
    text = sample_lines(lines, seed, bad)
    for k, part in enumerate(_parts(text, rotations + 1)):
        if k:
            for i in range(k, 0, -1):  # access.log.1 -> .2, access.log -> .1
                src = log if i == 1 else folder / f"access.log.{i - 1}"
                src.rename(folder / f"access.log.{i}")
            if pause:
                time.sleep(pause)
        with open(log, "a", encoding="utf-8") as f:
            for chunk in _parts(part, 4):  # in steps, so a tail sees the file grow
                f.write("".join(s + "\n" for s in chunk))
                f.flush()
                if pause:
                    os.fsync(f.fileno())
                    time.sleep(pause / 4)
    files = [folder / f"access.log.{i}" for i in range(rotations, 0, -1)] + [log]
    return Written(files, lines, min(bad, lines))


def read_day(folder: Path, rotations: int = 2) -> list[str]:
    """The lines of a written day, oldest file first (as :func:`write_day` names them)."""
    files = [folder / f"access.log.{i}" for i in range(rotations, 0, -1)] + [folder / "access.log"]
    return [s for p in files for s in p.read_text(encoding="utf-8").splitlines()]


def stored_rows(url: str, table: str) -> list[dict[str, Any]]:
    """The result rows an output stored in lrq's generic table ``table`` (its JSON values)."""
    from sqlalchemy import text

    from lrq.db import make_engine

    engine = make_engine(url, what="results url", create=False)
    try:
        with engine.connect() as conn:
            values = conn.execute(text(f"SELECT value FROM {table}")).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(v) if isinstance(v, (str, bytes)) else v for v in values]


def peek(url: str, status_table: str, remote_table: str, rows: int = 5) -> int:
    """Print the busiest windows (the end of ``make demo-logs``)."""
    status = stored_rows(url, status_table)
    errors = sorted((r for r in status if r["window"]["status"] >= 500),
                    key=lambda r: (-r["requests"], r["id"]))
    print(f"{status_table}: {len(status)} rows; the windows with the most 5xx:")
    for r in errors[:rows]:
        w = r["window"]
        print(f"  {_utc(w['start'])} +{w['width']}s  status {w['status']}: "
              f"{r['requests']} requests")
    remote = sorted(stored_rows(url, remote_table), key=lambda r: (-r["bytes"], r["id"]))
    print(f"{remote_table}: {len(remote)} rows; the most bytes in a window:")
    for r in remote[:rows]:
        w = r["window"]
        print(f"  {_utc(w['start'])} +{w['width']}s  {w['remote']}: "
              f"{r['requests']} requests, {r['bytes']} bytes")
    return 0


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/demo-logs/logs"))
    p.add_argument("--lines", type=int, default=60_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad", type=int, default=5, help="malformed lines among them")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds to wait around each rotation, so a running tail sees it")
    p.add_argument("--peek", nargs=3, metavar=("URL", "STATUS_TABLE", "REMOTE_TABLE"),
                   help="print the busiest stored windows instead")
    a = p.parse_args(argv)
    if a.peek:
        return peek(*a.peek)
    w = write_day(a.out, a.lines, a.seed, a.bad, pause=a.pause)
    print(f"{a.out}: {w.lines} lines ({w.bad} malformed) in "
          + ", ".join(f"{f.name} ({f.stat().st_size} bytes)" for f in w.files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
