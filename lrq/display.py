"""Drawing status records for people: the ``lrq status`` table, ``lrq status --watch``, and
progress bars for long manual runs (``lrq work --burst``, ``lrq sniff``, ``lrq verify``).

On a terminal these draw with ``rich`` (a live table, a progress bar on stderr); elsewhere
(a pipe, a log file, a test) they print plain lines. ``rich`` is imported only inside the
functions that draw on a terminal: importing ``rich.live``, ``rich.table`` and
``rich.progress`` costs ~90 ms of CPU and ~6 MB here (``python -X importtime``; a bare
interpreter starts in ~50 ms), which ``lrq run`` and every worker process must not pay
(tests/acceptance/test_status.py checks ``lrq work`` never imports it).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from lrq.rates import eta, human_seconds

if TYPE_CHECKING:
    from lrq.app import App
    from lrq.status import QueueStatus, Status

log = logging.getLogger(__name__)

#: Seconds between plain progress lines when stderr is not a terminal (as the worker's own).
PROGRESS_EVERY = 5.0
#: Seconds between redraws of a progress bar on a terminal.
REDRAW_EVERY = 0.2


def can_draw(stream: IO[str]) -> bool:
    """A terminal, and ``rich`` is installed (found, not imported): draw; else plain lines."""
    return stream.isatty() and importlib.util.find_spec("rich") is not None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _rate(q: QueueStatus) -> str:
    return "-" if q.rates is None else f"{q.rates.items_per_s:.1f}"


def table_rows(st: Status) -> list[tuple[Any, ...]]:
    """The ``lrq status`` table, header first. The database's columns (results, dead
    letters, items/s and ETA) are left out when it cannot be reached. Columns read by
    scripts keep their places from both ends: results at 7, position last (the rate
    columns went in between)."""
    down = st.database_error is not None
    db_cols: tuple[str, ...] = () if down else ("results", "dead letters")
    rate_cols: tuple[str, ...] = () if down else ("items/s", "eta")
    rows: list[tuple[Any, ...]] = [("queue", "pending", "claimed", "stale", "done", "failed",
                                    "quarantined", *db_cols, *rate_cols, "disk", "position")]
    for q in st.queues:
        c = q.counts
        db = () if down else (q.results, q.dead_letters)
        rate = () if down else (_rate(q), human_seconds(q.eta_seconds))
        rows.append((q.name + (" (paused)" if q.paused else ""), c.pending, c.claimed, q.stale,
                     c.done, c.failed, c.quarantined, *db, *rate, human_bytes(c.bytes),
                     _position(q.position)))
    return rows


def _position(position: Any) -> str:
    """The position column: a broker has none; a structured one (the logfile source's list of
    files) is cut short here, its source line and ``--json`` show it whole."""
    if position is None:
        return "-"
    if isinstance(position, (dict, list)):
        text = json.dumps(position, separators=(",", ":"))
        return text if len(text) <= 40 else text[:39] + "…"
    return str(position)


def format_table(rows: list[tuple[Any, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def status_lines(st: Status) -> list[str]:
    """``lrq status`` as text: the table, bytes by state, the disk, then one line per thing
    that needs a look (awaiting acknowledgements, the source, a key problem, foreign
    entries, a pause, throughput) and the database's error last."""
    out = format_table(table_rows(st))
    out.append("bytes by state: " + "; ".join(
        f"{q.name} pending {human_bytes(q.counts.pending_bytes)}, claimed "
        f"{human_bytes(q.counts.claimed_bytes)}, done {human_bytes(q.counts.done_bytes)}, "
        f"failed {human_bytes(q.counts.failed_bytes)}, tmp {human_bytes(q.counts.tmp_bytes)}, "
        f"{q.counts.spare} spare files (empty, kept for reuse)" for q in st.queues))
    d = st.disk
    out.append(f"data dir {st.data_dir}: {human_bytes(d.used)} of budget "
               f"{human_bytes(d.max_bytes)} ({d.used / max(d.max_bytes, 1):.0%}); filesystem free "
               f"{human_bytes(d.free_bytes)} of {human_bytes(d.total_bytes)}, {d.free_inodes} "
               f"inodes; min_free {d.min_free}"
               + (f"  WARNING: {d.below_min_free}" if d.below_min_free else ""))
    if d.blocked:
        out.append(f"WARNING: no room for the next batch: {d.blocked}")
    for q in st.queues:
        if q.awaiting_ack:
            out.append(f"{q.name}: {q.awaiting_ack} of the done batches await their "
                       "acknowledgement to the source (kept until the sniffer's next tick "
                       "acknowledges them)")
        if len(q.source) > 1:
            out.append(f"{q.name}: source " + ", ".join(f"{k} {v}" for k, v in q.source.items()))
        if q.key_problem:
            out.append(f"WARNING: {q.key_problem}")
        if q.foreign_count:
            out.append(f"WARNING: {q.name}: {q.foreign_count} entries lrq did not write "
                       f"(skipped; remove them): {', '.join(q.foreign_sample)}")
        if q.paused:
            out.append(f"{q.name}: PAUSED since {q.paused.get('since')} by {q.paused.get('by')} "
                       f"(`lrq resume {q.name}`)")
        if q.rates is not None:
            out.append(f"{q.name}: {throughput(q)}")
    if st.database_error is not None:
        out.append(f"database unreachable: {st.database_error}")
    return out


def throughput(q: QueueStatus) -> str:
    """``"12.5 items/s (1 min), 10.1 (10 min); backlog ~400 items, ETA 32s; source has 9000
    more, ETA 12m50s"``."""
    assert q.rates is not None
    text = ", ".join(f"{w.items_per_s:.1f} items/s ({w.seconds // 60} min)" if i == 0 else
                     f"{w.items_per_s:.1f} ({w.seconds // 60} min)"
                     for i, w in enumerate(q.rates.windows))
    text += f"; backlog ~{q.backlog_items} items, ETA {human_seconds(q.eta_seconds)}"
    if q.remaining is not None:
        text += (f"; source has {q.remaining} more, ETA "
                 f"{human_seconds(q.eta_remaining_seconds)}")
    return text


def watch_line(st: Status, now: float | None = None) -> list[str]:
    """One plain line per queue for ``lrq status --watch`` off a terminal."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC) \
        .isoformat(timespec="seconds").replace("+00:00", "Z")
    out = []
    for q in st.queues:
        c = q.counts
        out.append(f"{stamp} {q.name} pending={c.pending} claimed={c.claimed} done={c.done} "
                   f"failed={c.failed} stale={q.stale} items_per_s={_rate(q)} "
                   f"eta={human_seconds(q.eta_seconds)} "
                   f"remaining={'-' if q.remaining is None else q.remaining}"
                   + (" paused" if q.paused else ""))
    if st.database_error is not None:
        out.append(f"{stamp} database unreachable: {st.database_error}")
    return out


def watch(app: App, queue: str | None, every: float, out: IO[str] | None = None,
          as_json: bool = False) -> int:
    """Redraw the status every ``every`` seconds until Ctrl-C (then return 0): a live table
    on a terminal, plain lines otherwise; ``as_json``: one compact JSON document
    (:meth:`Status.to_json`) per line per refresh, wherever it goes."""
    out = out or sys.stdout
    try:
        if can_draw(out) and not as_json:
            _watch_live(app, queue, every, out)
        else:
            while True:
                st = app.status(queue)
                for line in [json.dumps(st.to_json(), default=str)] if as_json \
                        else watch_line(st):
                    print(line, file=out)
                out.flush()
                time.sleep(every)
    except KeyboardInterrupt:
        pass
    return 0


def _watch_live(app: App, queue: str | None, every: float, out: IO[str]) -> None:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    def render() -> Group:
        st = app.status(queue)
        rows = table_rows(st)
        table = Table(*rows[0], title=f"lrq {st.data_dir}", caption=datetime.now(UTC)
                      .isoformat(timespec="seconds"))
        for r in rows[1:]:
            table.add_row(*(Text(str(v)) for v in r))
        lines = [line for line in status_lines(st)[len(rows):]]
        return Group(table, *(Text(line) for line in lines))

    with Live(render(), console=Console(file=out), refresh_per_second=4,
              auto_refresh=False) as live:
        while True:
            time.sleep(every)
            live.update(render(), refresh=True)


class Progress:
    """Count, rate and ETA of a long manual run, drawn on stderr while the run goes on.

    ``count()`` is read from a thread every :data:`REDRAW_EVERY` seconds on a terminal (a
    ``rich`` bar) or every :data:`PROGRESS_EVERY` seconds otherwise (a ``progress`` log line),
    so the run itself needs no hook: pass a function reading its counters."""

    def __init__(self, what: str, count: Callable[[], int], total: int | None = None,
                 unit: str = "batches", stream: IO[str] | None = None) -> None:
        self.what = what
        self.count = count
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = can_draw(self.stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    def line(self, now: float | None = None) -> str:
        """The plain line: ``progress what=... count=... total=... rate=.../s eta=...``."""
        n = self.count()
        seconds = (time.monotonic() if now is None else now) - self._started
        rate = n / seconds if seconds > 0 else 0.0
        left = None if self.total is None else max(self.total - n, 0)
        return (f"progress what={self.what} {self.unit}={n} total="
                f"{'-' if self.total is None else self.total} rate={rate:.1f}/s "
                f"eta={human_seconds(eta(left, rate))}")

    def __enter__(self) -> Progress:
        target = self._draw if self.tty else self._log
        self._thread = threading.Thread(target=target, name="lrq-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _log(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY):
            log.info("%s", self.line())

    def _draw(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn(self.unit), TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Bar(*columns, console=Console(file=self.stream), transient=False,
                 auto_refresh=False) as bar, _logs_above():
            task = bar.add_task(self.what, total=self.total, rate="")
            while True:
                stopping = self._stop.wait(REDRAW_EVERY)
                n = self.count()
                seconds = time.monotonic() - self._started
                bar.update(task, completed=n, rate=f"{n / seconds:.1f}/s" if seconds > 0 else "",
                           total=max(self.total, n) if self.total is not None else None)
                bar.refresh()
                if stopping:
                    return


@contextmanager
def _logs_above() -> Iterator[None]:
    """While a bar is drawn, rich has replaced ``sys.stderr`` with a proxy that prints each
    line above the bar; point the root logger's stderr handlers (which hold the real
    stderr) at it too, so log lines do not tear the bar."""
    real = getattr(sys.stderr, "rich_proxied_file", None)
    if real is None:  # not redirected (rich drew nothing live)
        yield
        return
    moved = [h for h in logging.getLogger().handlers
             if type(h) is logging.StreamHandler and h.stream in (real, sys.__stderr__)]
    old = [h.setStream(sys.stderr) for h in moved]
    try:
        yield
    finally:
        for h, s in zip(moved, old):
            h.setStream(s)


@contextmanager
def progress(what: str, count: Callable[[], int], total: int | None = None,
             unit: str = "batches", stream: IO[str] | None = None) -> Iterator[Progress]:
    """``with progress("work docs", lambda: worker.stats.batches, total=n): worker.run()``."""
    with Progress(what, count, total, unit, stream) as p:
        yield p


# -- records for people: tables, times, exits (lrq show, lrq dead) ---------------------
def print_table(rows: list[tuple[Any, ...]]) -> None:
    from lrq.display import format_table

    for line in format_table(rows):
        print(line)


def iso(t: float | datetime | None) -> str | None:
    """ISO 8601: epoch seconds (lrq's files) as UTC with a Z; a database timestamp as it is
    (naive: the server's clock, UTC on SQLite)."""
    if t is None:
        return None
    if isinstance(t, datetime):
        if t.tzinfo is not None:
            t = t.astimezone(UTC)
        return t.isoformat(timespec="seconds").replace("+00:00", "Z")
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _exit_text(ex: dict[str, Any]) -> str:
    """A dead owner's end as the procs reaper records it: ``{"code": int|None, "signal": str|None}``."""
    if ex.get("signal") is not None:
        sig = ex["signal"]
        return f"killed by {signal.Signals(sig).name if isinstance(sig, int) else sig}"
    return f"exit code {ex['code']}" if ex.get("code") is not None else ""


def readable(value: Any, key: str = "") -> Any:
    """``show``'s record for people: every time (``*_at``, ``created``) as ISO 8601 UTC, and
    a dead owner's exit code or signal added to its attempt's ``reason``."""
    if isinstance(value, dict):
        out = {k: readable(v, k) for k, v in value.items()}
        ex = out.get("exit")
        text = _exit_text(ex) if isinstance(ex, dict) else ""
        if text:
            out["reason"] = f"{out['reason']} ({text})" if out.get("reason") else text
        return out
    if isinstance(value, list):
        return [readable(v, key) for v in value]
    if isinstance(value, datetime) or (
            (key.endswith("_at") or key == "created") and isinstance(value, (int, float))
            and not isinstance(value, bool)):
        return iso(value)
    return value
