"""Prometheus metrics, read at scrape time from what lives on disk and in the ledger.

Nothing is counted in memory: each scrape lists the spool folders (batches and bytes by
state, the oldest live claim) and asks the ledger with one ``GROUP BY queue`` (batches,
items and results recorded, handler seconds as histogram buckets) plus one count of the
dead-letter table. So a restart loses nothing, and a scrape says the same whichever process
serves it: the scheduler serves ``/metrics`` (one port however many worker processes run,
see :mod:`lrq.web`), ``lrq web`` serves it from a data dir alone.

The histogram's buckets are cumulative sums over every timed ledger row, ``SUM(CASE WHEN
seconds <= bound ...)`` per bound: a counter that only grows, as Prometheus' ``rate()``
expects (a bounded read of recent rows would make it fall). ``bench/metrics_scrape.py``
measures a scrape with 10k done batches kept.

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

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from lrq.disk import log_bytes, space
from lrq.errors import LrqError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from lrq.app import App

log = logging.getLogger(__name__)

#: Handler seconds per batch: from a fast in-process handler to a slow service.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATES = ("pending", "claimed", "done", "failed", "quarantined")
BYTE_STATES = ("pending", "claimed", "done", "failed", "tmp")


def _import_client() -> Any:
    try:
        import prometheus_client
    except ImportError as e:
        raise LrqError("metrics need prometheus-client: pip install 'lrq[web]'") from e
    return prometheus_client


class Collector:
    """A ``prometheus_client`` custom collector over one :class:`~lrq.app.App`."""

    def __init__(self, app: App) -> None:
        self.app = app

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
            c = sp.counts()
            used += c.bytes
            for state in STATES:
                batches.add_metric([q.name, state], getattr(c, state))
            failed.add_metric([q.name], c.failed)
            for state in BYTE_STATES:
                disk.add_metric([q.name, state], getattr(c, f"{state}_bytes"))
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
        """The ledger per queue: (batches, items, results, timed batches, seconds, bucket
        counts...), and dead letters per queue; one statement each."""
        sink = self.app.sink(self.app.queues()[0])  # every queue shares the ledger tables
        led, dead = sink.ledger, sink.dead
        seconds = led.c.seconds
        q = select(led.c.queue, func.count(), func.sum(led.c["items"]), func.sum(led.c.results),
                   func.count(seconds), func.sum(seconds),
                   *[func.sum(case((seconds <= b, 1), else_=0)) for b in BUCKETS]
                   ).where(led.c.queue.in_(names)).group_by(led.c.queue)
        d = select(dead.c.queue, func.count()).where(dead.c.queue.in_(names)).group_by(dead.c.queue)
        with sink.engine.connect() as conn:
            rows = {r[0]: tuple(r[1:]) for r in conn.execute(q)}
            letters = {r[0]: int(r[1]) for r in conn.execute(d)}
        return rows, letters


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
