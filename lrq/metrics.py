"""Prometheus metrics, read at scrape time from what lives on disk and in the ledger.

Nothing is counted in memory: each scrape lists the spool folders (batches and bytes by
state, the oldest live claim) and asks the ledger with one ``GROUP BY queue`` (batches,
items and results recorded, handler seconds as histogram buckets) plus one count of the
dead-letter table. So a restart loses nothing, and a scrape says the same whichever process
serves it: the scheduler serves ``/metrics`` (one port however many worker processes run,
see :mod:`lrq.web`), ``lrq web`` serves it from a data dir alone.

The histogram's buckets are cumulative counts over every timed ledger row, ``COUNT(CASE
WHEN seconds <= bound THEN 1 END)`` per bound: a counter that only grows, as Prometheus' ``rate()``
expects (a bounded read of recent rows would make it fall). ``bench/metrics_scrape.py``
measures a scrape with 10k done batches kept.

A scrape lists each queue's folders as :meth:`Spool.counts() <lrq.spool.Spool.counts>`
does, but stats a ``done/`` file only the first time its name is seen (:class:`Listing`): a
batch file in ``done/`` never changes size (it is moved there whole and moved out to
``spare/`` whole), and with 10k done batches kept the stats were most of a scrape (45 of
96 ms). So a scrape costs a directory read of ``done/`` plus a stat per file elsewhere
(pending, claimed, failed: bounded by ``max_pending`` and retention). Likewise the ledger:
rows finished over an hour ago are summed once (the first scrape reads the whole ledger),
later scrapes only the last hour or two (:meth:`Collector._query`).

When the database cannot be reached, the spool's metrics are still served and
``lrq_database_up`` is 0.

Metric names (labels ``queue``, and ``state`` where said):

* ``lrq_batches{state}``: pending, claimed, done, failed, quarantined batches on disk;
* ``lrq_failed_batches``: batches in ``failed/`` (the same as ``state="failed"``, for alerts);
* ``lrq_oldest_claim_age_seconds``: age of the oldest live claim (0 without one);
* ``lrq_ledger_batches_total``, ``lrq_ledger_items_total``, ``lrq_results_stored_total``:
  batches, items and result rows the ledger recorded;
* ``lrq_dead_letters``: rows in the dead-letter table now;
* ``lrq_handler_seconds``: histogram of a batch's handler time (batches the worker timed);
* ``lrq_disk_bytes{state}``: batch bytes by state (pending, claimed, done, failed, tmp);
* ``lrq_disk_used_bytes``, ``lrq_disk_budget_bytes`` (no queue label): lrq's files against
  ``cleanup.max_bytes``; ``lrq_disk_free_bytes``, ``lrq_disk_free_inodes``: the filesystem's.
"""
from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from lrq.disk import log_bytes, space
from lrq.errors import LrqError
from lrq.spool.files import SUFFIX
from lrq.spool.listing import split_states
from lrq.spool.owners import OWNERS

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from lrq.app import App
    from lrq.spool import Spool

log = logging.getLogger(__name__)

#: Handler seconds per batch: from a fast in-process handler to a slow service.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATES = ("pending", "claimed", "done", "failed", "quarantined")
BYTE_STATES = ("pending", "claimed", "done", "failed", "tmp")
#: Ledger rows older than this (by the database's clock) are summed once and kept.
SETTLED = timedelta(hours=1)


def _import_client() -> Any:
    try:
        import prometheus_client
    except ImportError as e:
        raise LrqError("metrics need prometheus-client: pip install 'lrq[web]'") from e
    return prometheus_client


@dataclass(frozen=True)
class Listed:
    """One queue's batches and bytes by state, as :class:`~lrq.spool.Counts` has them."""

    batches: dict[str, int]
    bytes_by_state: dict[str, int]
    #: Every file in the queue's folders (a file's links counted once).
    total_bytes: int


class Listing:
    """:meth:`Spool.counts` for scrapes: the sizes of ``done/`` files are kept by name
    between calls, so only new done batches are stat'ed (see the module docstring)."""

    def __init__(self) -> None:
        self.done_sizes: dict[str, dict[str, int]] = {}

    def read(self, sp: Spool) -> Listed:
        sizes: dict[Any, dict[str, int]] = {}
        seen: set[int] = set()  # a claim is a hard link to its owner file: counted once
        for folder in (sp.root / OWNERS, sp.left, sp.right, sp.failed, sp.quarantine, sp.tmp):
            found = sizes[folder] = {}
            for e in sp.files(folder):
                with contextlib.suppress(FileNotFoundError):
                    n_bytes = e.stat(follow_symlinks=False).st_size
                    found[e.name] = 0 if e.inode() in seen else n_bytes
                    seen.add(e.inode())
        known = self.done_sizes.get(sp.queue, {})
        done_files: dict[str, int] = {}  # batch files in done/: name -> size
        other = 0  # bytes of anything else lrq keeps in done/
        try:
            names = os.listdir(sp.done)  # names only: no DirEntry, no stat, for 10k+ files
        except FileNotFoundError:
            names = []
        for name in names:
            size = known.get(name)
            if size is None:
                try:
                    info = os.stat(os.path.join(sp.done, name), follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(info.st_mode):  # not lrq's (Spool.files skips it too)
                    continue
                if not name.endswith(SUFFIX):
                    other += info.st_size
                    continue
                size = info.st_size
            done_files[name] = size
        self.done_sizes[sp.queue] = done_files
        split = split_states(sizes[sp.left], sizes[sp.right], done_files)  # batch files only
        done_bytes = sum(done_files.values())
        return Listed(
            batches={"pending": split.pending, "claimed": split.claimed, "done": split.done,
                     "failed": sum(n.endswith(SUFFIX) for n in sizes[sp.failed]),
                     "quarantined": sum(n.endswith(SUFFIX) for n in sizes[sp.quarantine])},
            bytes_by_state={"pending": split.pending_bytes, "claimed": split.claimed_bytes,
                            "done": split.done_left_bytes + done_bytes,
                            "failed": sum(sizes[sp.failed].values())
                            + sum(sizes[sp.quarantine].values()),
                            "tmp": sum(sizes[sp.tmp].values())},
            total_bytes=sum(sum(f.values()) for f in sizes.values()) + done_bytes + other)


class Collector:
    """A ``prometheus_client`` custom collector over one :class:`~lrq.app.App`."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.listing = Listing()
        #: Ledger sums per queue of the rows finished before ``_mark`` (see :meth:`_query`).
        self._settled: dict[str, list[Any]] = {}
        self._mark: datetime | None = None

    def describe(self) -> list[Any]:
        return []  # no describe at registration: that would run a whole scrape

    def collect(self) -> Iterator[Any]:
        _import_client()
        from prometheus_client import core as pc
        app = self.app
        queues = app.queues()
        names = [q.name for q in queues]
        batches = pc.GaugeMetricFamily("lrq_batches", "Batches on disk by state",
                                       labels=["queue", "state"])
        failed = pc.GaugeMetricFamily("lrq_failed_batches", "Batches in failed/", labels=["queue"])
        oldest = pc.GaugeMetricFamily("lrq_oldest_claim_age_seconds",
                                      "Age of the oldest live claim (0: none)", labels=["queue"])
        disk = pc.GaugeMetricFamily("lrq_disk_bytes", "Batch bytes on disk by state",
                                    labels=["queue", "state"])
        used = 0
        now = time.time()
        for q in queues:
            sp = app.spool(q)
            c = self.listing.read(sp)
            used += c.total_bytes
            for state in STATES:
                batches.add_metric([q.name, state], c.batches[state])
            failed.add_metric([q.name], c.batches["failed"])
            for state in BYTE_STATES:
                disk.add_metric([q.name, state], c.bytes_by_state[state])
            ages = [now - claim.claimed_at for claim in
                    (sp.read_claim(n) for n in sp.claimed()) if claim is not None]
            oldest.add_metric([q.name], max(0.0, max(ages, default=0.0)))
        yield from (batches, failed, oldest, disk)
        yield from self._disk(pc, used + log_bytes(app.cfg.log_file))
        yield from self._ledger(pc, names)

    def _disk(self, pc: Any, used: int) -> Iterator[Any]:
        cfg = self.app.cfg
        st = space(cfg.data_dir)
        for name, doc, value in (
                ("lrq_disk_used_bytes", "Bytes lrq holds in the data dir (queues and logs)", used),
                ("lrq_disk_budget_bytes", "cleanup.max_bytes", cfg.cleanup.max_bytes),
                ("lrq_disk_free_bytes", "Free bytes on the data dir's filesystem", st.free_bytes),
                ("lrq_disk_total_bytes", "Size of the data dir's filesystem", st.total_bytes),
                ("lrq_disk_free_inodes", "Free inodes on the data dir's filesystem",
                 st.free_inodes),
                ("lrq_disk_total_inodes", "Inodes of the data dir's filesystem", st.total_inodes)):
            yield pc.GaugeMetricFamily(name, doc, value=value)

    def _ledger(self, pc: Any, names: list[str]) -> Iterator[Any]:
        up = pc.GaugeMetricFamily("lrq_database_up", "1 when the results database answered")
        try:
            rows, dead = self._query(names)
        except (LrqError, SQLAlchemyError) as e:
            log.warning("metrics-database-error error=%s", str(getattr(e, "orig", None) or e)
                        .splitlines()[0])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        recorded = pc.CounterMetricFamily("lrq_ledger_batches", "Batches the ledger recorded",
                                          labels=["queue"])
        items = pc.CounterMetricFamily("lrq_ledger_items", "Items of the batches recorded",
                                       labels=["queue"])
        results = pc.CounterMetricFamily("lrq_results_stored", "Result rows stored",
                                         labels=["queue"])
        hist = pc.HistogramMetricFamily("lrq_handler_seconds", "Handler seconds per batch",
                                        labels=["queue"])
        letters = pc.GaugeMetricFamily("lrq_dead_letters", "Rows in the dead-letter table",
                                       labels=["queue"])
        for name in names:
            row = rows.get(name)
            n, n_items, n_results, timed, total, *cum = row or (0, 0, 0, 0, 0.0,
                                                                *([0] * len(BUCKETS)))
            recorded.add_metric([name], int(n))
            items.add_metric([name], int(n_items or 0))
            results.add_metric([name], int(n_results or 0))
            buckets = [(_bound(b), int(c or 0)) for b, c in zip(BUCKETS, cum)]
            hist.add_metric([name], buckets + [("+Inf", int(timed or 0))],
                            sum_value=float(total or 0.0))
            letters.add_metric([name], dead.get(name, 0))
        yield from (recorded, items, results, hist, letters)

    def _query(self, names: list[str]) -> tuple[dict[str, tuple[Any, ...]], dict[str, int]]:
        """The ledger per queue: (batches, items, results, timed batches, seconds, cumulative
        bucket counts...), and dead letters per queue.

        The ledger only grows, so rows finished before a mark (``SETTLED`` before the
        database's clock, moved on when it is twice that old) are summed once and kept; a
        scrape sums only the rows since (:meth:`_sums`). A row whose ``finished_at`` is
        older than the mark when it commits would be missed: a transaction open for
        ``SETTLED``, which lrq's short commits never are."""
        sink = self.app.sink(self.app.queues()[0])  # every queue shares the ledger tables
        dead = sink.dead
        d = select(dead.c.queue, func.count()).where(dead.c.queue.in_(names)).group_by(dead.c.queue)
        with sink.engine.connect() as conn:
            now = _as_datetime(conn.execute(select(func.now())).scalar_one())
            if self._mark is None or now - self._mark > 2 * SETTLED:
                mark = now - SETTLED
                for queue, sums in self._sums(conn, sink, names, self._mark, mark).items():
                    self._settled[queue] = _add(self._settled.get(queue), sums)
                self._mark = mark
            recent = self._sums(conn, sink, names, self._mark, None)
            letters = {r[0]: int(r[1]) for r in conn.execute(d)}
        rows = {q: tuple(_add(self._settled.get(q), recent.get(q)))
                for q in set(self._settled) | set(recent)}
        return rows, letters

    @staticmethod
    def _sums(conn: Any, sink: Any, names: list[str], since: datetime | None,
              until: datetime | None) -> dict[str, list[Any]]:
        """Per queue, over ledger rows finished in [since, until): one statement grouped by
        queue (the primary key's order: no sort), a ``COUNT(CASE WHEN seconds <= bound THEN
        1 END)`` per bound. On SQLite with 10k rows: 19-27 ms, against 32-34 ms for
        ``SUM(CASE ... ELSE 0)`` per bound or for grouping by each row's bucket index (a
        sort) and summing here (bench/metrics_scrape.py)."""
        led = sink.ledger
        seconds = led.c.seconds
        q = select(led.c.queue, func.count(), func.sum(led.c["items"]), func.sum(led.c.results),
                   func.count(seconds), func.sum(seconds),
                   *[func.count(case((seconds <= b, 1))) for b in BUCKETS]
                   ).where(led.c.queue.in_(names))
        if since is not None:
            q = q.where(led.c.finished_at >= since.replace(tzinfo=None))
        if until is not None:
            q = q.where(led.c.finished_at < until.replace(tzinfo=None))
        return {r[0]: [x or 0 for x in r[1:]] for r in conn.execute(q.group_by(led.c.queue))}


def _add(a: list[Any] | None, b: list[Any] | None) -> list[Any]:
    if a is None or b is None:
        return list(a or b or [])
    return [x + y for x, y in zip(a, b)]


def _as_datetime(value: Any) -> datetime:
    """The database's ``now()``: a datetime, or text on SQLite; naive, as ``finished_at``."""
    out = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return out.replace(tzinfo=None)


def _bound(b: float) -> str:
    return repr(float(b))


def registry(app: App) -> CollectorRegistry:
    """A registry of its own holding one :class:`Collector` (not the client's global one:
    no import-time state, and several apps side by side in tests)."""
    pc = _import_client()
    reg = pc.CollectorRegistry(auto_describe=False)
    reg.register(Collector(app))
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    pc = _import_client()
    return pc.generate_latest(reg), pc.CONTENT_TYPE_LATEST
