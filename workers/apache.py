"""Apache access logs: a parser for the combined format and sliding-window statistics.

Handlers for a queue whose items are log lines (``kind = "logfile"``: items
``{"id": "dev:inode:tag:offset", "line": ..., "path": ..., "offset": ...}``), one per output:

* :func:`parse`: one :class:`workers.models.AccessLine` row per line.
* :func:`status_windows` and :func:`remote_windows`: factories (``options = { width = 60,
  interval = 10 }``) of *aggregating* handlers, which return one row per window and status,
  or per window and remote, with counts to be added up across batches.

**The format** is Apache's ``combined``::

    LogFormat "%h %l %u %t \\"%r\\" %>s %b \\"%{Referer}i\\" \\"%{User-agent}i\\"" combined
    127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /a.gif HTTP/1.0" 200 2326 "http://x/" "Mozilla/4.08"

Apache escapes ``"`` and ``\\`` inside the quoted fields as ``\\"`` and ``\\\\``; the parser
undoes those two (other escapes, ``\\xhh``, are kept as logged). A size of ``-`` (no body) is
0; an ident, user or referer of ``-`` is empty. A request line that is not ``METHOD URL
[PROTOCOL]`` (a TLS handshake sent to the plain port, a timeout's ``-``) is still a request
Apache logged: its method and protocol are empty and ``url`` holds it as logged (``-``:
empty), so its status still counts in the windows. The time ``10/Oct/2000:13:55:36 -0700``
becomes epoch seconds UTC (an int).

**A line that does not parse raises** :class:`ValueError` naming the problem and quoting the
line (clipped to :data:`CLIP` characters). lrq's handler policy (:mod:`lrq.policy`) then
isolates it by bisection and dead-letters that item, with its line, for that output only;
it is never skipped silently. Lines the log source cut into parts (over ``max_bytes``) do
not parse, so they are dead letters too.

**Windows** are sliding and in *event time* (the line's own timestamp, not when lrq sees
it): with ``width`` W and ``interval`` I (seconds, W a multiple of I), window starts are
the multiples of I, and a line at time t is counted in each of the W/I windows ``[s, s+W)``
with ``s <= t < s + W``. A handler returns, per call, one row per (window start, status) or
(window start, remote) that its lines touch, keyed by ``id``::

    {"id": "status:60:10:1795996800:200",
     "window": {"start": 1795996800, "width": 60, "interval": 10, "status": 200},
     "requests": 3}
    {"id": "remote:60:10:1795996800:2001:db8::1",
     "window": {"start": 1795996800, "width": 60, "interval": 10, "remote": "2001:db8::1"},
     "requests": 2, "bytes": 5120}

Stored with ``aggregate = true``, a row's numeric fields are *added* to the stored row's and
other fields take the newest value (:func:`lrq.outputs.merge`), so a window seen in several
batches ends with the counts of all its lines. That is why what names the window sits in
the ``window`` object: flat numbers (start, width, status) would be added up too.

The computation is vectorised with numpy: the timestamps become an (n, W/I) array of window
starts, the (window, status or remote) pairs are packed into one int64 and grouped by
``np.unique``, bytes summed by ``np.add.at``; only the parse is a Python loop over lines
(``bench/apache_windows.py``: the numpy part 6-8x faster than a loop per line per window).
"""
from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

#: A bad line is quoted in its error up to this many characters.
CLIP = 200

_Q = r'"([^"\\]*(?:\\.[^"\\]*)*)"'  # a quoted field with \" and \\ escapes
LINE = re.compile(
    r"(\S+) (\S+) (\S+) \[([^\]]*)\] " + _Q + r" (\d{3}) (\d+|-) " + _Q + " " + _Q + r"\s*")
TIME = re.compile(r"(\d{1,2})/([A-Za-z]{3})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})")
REQUEST = re.compile(r"([A-Za-z][A-Za-z_-]{0,31}) (\S+)(?: ([A-Za-z]{1,16}/\d{1,3}(?:\.\d{1,3})?))?")
_UNESCAPE = re.compile(r'\\(["\\])')
MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_EPOCH = _dt.date(1970, 1, 1).toordinal()


class Access(NamedTuple):
    """One parsed access line (the fields of :class:`workers.models.AccessLine` but ``id``).

    A NamedTuple, not a frozen dataclass: built once per line, it costs 0.8 us against the
    dataclass's 3.7 us (a fifth of a line's parse)."""

    remote: str
    remote_user: str
    ts: int
    method: str
    url: str
    protocol: str
    status: int
    size: int
    referer: str
    agent: str


def clip(line: str, limit: int = CLIP) -> str:
    """``line`` shortened for an error message, saying how long it was."""
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line)} characters)"


@lru_cache(maxsize=4096)
def _day(day: int, month: str, year: int) -> int:
    """Epoch seconds of a date's midnight UTC (a log holds few dates: cached)."""
    m = MONTHS.get(month.capitalize())
    if m is None:
        raise ValueError(f"unknown month {month!r}")
    return (_dt.date(year, m, day).toordinal() - _EPOCH) * 86400  # ValueError for 30 Feb


def parse_time(text: str) -> int:
    """``10/Oct/2000:13:55:36 -0700`` -> 971211336 (epoch seconds UTC)."""
    m = TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"time {text!r} is not like 10/Oct/2000:13:55:36 -0700")
    d, mon, y, hh, mm, ss, sign, zh, zm = m.groups()
    h, mi, s = int(hh), int(mm), int(ss)
    if h > 23 or mi > 59 or s > 60 or int(zh) > 23 or int(zm) > 59:
        raise ValueError(f"time {text!r} is out of range")
    offset = int(zh) * 3600 + int(zm) * 60
    return _day(int(d), mon, int(y)) + h * 3600 + mi * 60 + s - (offset if sign == "+" else -offset)


def _text(field: str) -> str:
    return _UNESCAPE.sub(r"\1", field) if "\\" in field else field


def parse_line(line: str) -> Access:
    """One combined-format line; :class:`ValueError` naming the problem if it is not one."""
    m = LINE.fullmatch(line)
    if m is None:
        raise ValueError(f"not an Apache combined-format access line: {clip(line)!r}")
    remote, _ident, user, when, request, status, size, referer, agent = m.groups()
    try:
        ts = parse_time(when)
    except ValueError as e:
        raise ValueError(f"{e} in access line: {clip(line)!r}") from None
    request = _text(request)
    r = REQUEST.fullmatch(request)
    if r is not None:
        method, url, protocol = r.group(1), r.group(2), r.group(3) or ""
    else:
        method, url, protocol = "", "" if request == "-" else request, ""
    return Access(remote=remote, remote_user="" if user == "-" else user, ts=ts,
                  method=method, url=url, protocol=protocol, status=int(status),
                  size=0 if size == "-" else int(size),
                  referer="" if referer == "-" else _text(referer), agent=_text(agent))


def _line(item: dict[str, Any]) -> str:
    line = item.get("line")
    if not isinstance(line, str):
        raise ValueError(f"item {item.get('id')!r} has no text field 'line' (fields: {sorted(item)})")
    return line


def parse(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The handler for :class:`workers.models.AccessLine`: one row per item, keyed by its
    ``id``. Raises :class:`ValueError` on the first line that does not parse."""
    rows = []
    for it in items:
        a = parse_line(_line(it))
        rows.append({"id": it["id"], "remote": a.remote, "remote_user": a.remote_user,
                     "ts": a.ts, "method": a.method, "url": a.url, "protocol": a.protocol,
                     "status": a.status, "size": a.size, "referer": a.referer,
                     "agent": a.agent})
    return rows


# -- sliding windows ---------------------------------------------------------------------

def check_window(width: Any, interval: Any) -> tuple[int, int]:
    """``(width, interval)`` if they make sliding windows, else :class:`ValueError` saying
    which option to change (lrq reports it as a config error of the output)."""
    for name, v in (("width", width), ("interval", interval)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be a whole number of seconds, got {v!r}")
        if v <= 0:
            raise ValueError(f"{name} must be > 0 seconds, got {v}")
    if width % interval:
        raise ValueError(f"width ({width}) must be a multiple of interval ({interval}): "
                         f"windows start every interval and last width seconds")
    return width, interval


def window_starts(ts: np.ndarray, width: int, interval: int) -> np.ndarray:
    """The starts of every window holding each timestamp: an (n, width/interval) int64
    array, row i holding the multiples s of ``interval`` with ``s <= ts[i] < s + width``,
    latest first."""
    last = (np.asarray(ts, dtype=np.int64) // interval) * interval
    return last[:, None] - np.arange(width // interval, dtype=np.int64)[None, :] * interval


def _group(starts: np.ndarray, codes: np.ndarray, interval: int
           ) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
    """Distinct (window start, code) pairs of the (n, k) ``starts`` and one code (>= 0) per
    line: the starts and codes of the pairs, the number of lines of each, and each (line,
    window)'s pair index. The pair is packed into one int64 (window number * (max code + 1)
    + code), as a 1-d ``np.unique`` is several times faster than ``np.unique(axis=0)``."""
    base = int(starts.min())
    span = int(codes.max()) + 1
    packed = ((starts - base) // interval * span + codes[:, None]).ravel()
    keys, inverse, counts = np.unique(packed, return_inverse=True, return_counts=True)
    windows, code = np.divmod(keys, span)
    return ((windows * interval + base).tolist(), code.tolist(), counts, inverse.reshape(-1))


@dataclass(frozen=True)
class StatusWindows:
    """Aggregating handler: requests per (window start, status). Build with
    :func:`status_windows`."""

    width: int
    interval: int

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not items:
            return []
        parsed = [parse_line(_line(it)) for it in items]
        ts = np.fromiter((a.ts for a in parsed), np.int64, len(parsed))
        status = np.fromiter((a.status for a in parsed), np.int64, len(parsed))
        w, i = self.width, self.interval
        starts, codes, counts, _ = _group(window_starts(ts, w, i), status, i)
        return [{"id": f"status:{w}:{i}:{s}:{st}",
                 "window": {"start": s, "width": w, "interval": i, "status": st},
                 "requests": n}
                for s, st, n in zip(starts, codes, counts.tolist())]


@dataclass(frozen=True)
class RemoteWindows:
    """Aggregating handler: requests and bytes per (window start, remote). Build with
    :func:`remote_windows`."""

    width: int
    interval: int

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not items:
            return []
        parsed = [parse_line(_line(it)) for it in items]
        n = len(parsed)
        ts = np.fromiter((a.ts for a in parsed), np.int64, n)
        size = np.fromiter((a.size for a in parsed), np.int64, n)
        # remotes -> codes in order of appearance (a dict; no sort of Python strings)
        index: dict[str, int] = {}
        which = np.fromiter((index.setdefault(a.remote, len(index)) for a in parsed), np.int64, n)
        names = list(index)
        w, i = self.width, self.interval
        windows = window_starts(ts, w, i)
        starts, codes, counts, inverse = _group(windows, which, i)
        sizes = np.zeros(len(starts), dtype=np.int64)
        np.add.at(sizes, inverse, np.repeat(size, windows.shape[1]))
        return [{"id": f"remote:{w}:{i}:{s}:{names[c]}",
                 "window": {"start": s, "width": w, "interval": i, "remote": names[c]},
                 "requests": r, "bytes": b}
                for s, c, r, b in zip(starts, codes, counts.tolist(), sizes.tolist())]


def status_windows(width: int = 60, interval: int = 10) -> StatusWindows:
    """Factory (``options = { width = 60, interval = 10 }``) of the handler counting
    requests per sliding window and status."""
    return StatusWindows(*check_window(width, interval))


def remote_windows(width: int = 60, interval: int = 10) -> RemoteWindows:
    """Factory (``options = { width = 60, interval = 10 }``) of the handler counting
    requests and bytes per sliding window and remote."""
    return RemoteWindows(*check_window(width, interval))


def merge(batches: Sequence[list[dict[str, Any]]], key: str = "id") -> dict[str, dict[str, Any]]:
    """Rows of several handler calls merged by key as an aggregating output stores them
    (:func:`lrq.outputs.merge`): numeric fields (int or float, not bool) added, the others
    taking the newest value. For tests and for reading windows back."""
    out: dict[str, dict[str, Any]] = {}
    for rows in batches:
        for row in rows:
            have = out.setdefault(row[key], {})
            for f, v in row.items():
                was = have.get(f)
                have[f] = was + v if _number(v) and _number(was) else v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
