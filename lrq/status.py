"""What ``lrq status``, ``lrq show`` and ``lrq verify`` report, as typed records.

:meth:`lrq.app.App.status`, :meth:`~lrq.app.App.show` and :meth:`~lrq.app.App.verify` build
these; the command line (:mod:`lrq.cli`, :mod:`lrq.display`), the JSON output, the metrics
and the web page all render the same records, by attribute. Each record's ``to_json()`` is
the stable JSON form: ``lrq status --json`` prints :meth:`Status.to_json` and users script
against its keys, so keys are only ever added (tests/acceptance/test_status.py pins them).

Records are frozen and hold only values fit to show: the source's view, the key problem and
a database error are redacted when the record is built (:func:`lrq.redact.redact_options`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lrq.disk import Held
from lrq.rates import Rates
from lrq.spool.listing import Counts


@dataclass(frozen=True)
class QueueStatus:
    """One queue: its spool, the database's view of it, its source, throughput and ETA."""

    name: str
    counts: Counts
    #: Claims whose owner is dead or whose heartbeat is older than the lease.
    stale: int
    #: Entries lrq did not write (skipped by every listing): how many, and a few as
    #: ``"path (what)"``.
    foreign_count: int
    foreign_sample: tuple[str, ...]
    #: Why pending batches cannot be verified with the configured key, or None.
    key_problem: str | None
    #: A re-readable source's saved position (None for a broker, or before the first batch).
    position: Any
    #: The source's own view (:meth:`lrq.sources.Source.status`), ``{"kind": ...}`` first;
    #: ``{"kind", "error"}`` when it could not be asked.
    source: dict[str, Any]
    #: The database's counts; None when it could not be reached (see :attr:`Status.database_error`).
    results: int | None = None
    dead_letters: int | None = None
    ledger_batches: int | None = None
    ledger_items: int | None = None
    #: Items and batches per second over the last minute and ten minutes (None: no database).
    rates: Rates | None = None
    #: Items in pending and claimed batches, estimated as batches x the ledger's mean items
    #: per batch (``batch_size`` before the first commit): no batch file is opened.
    backlog_items: int = 0
    #: Seconds to work off ``backlog_items`` at the recent rate (None: no recent commits).
    eta_seconds: float | None = None
    #: Items the source has yet to hand out (SQL: rows past the watermark; a broker: its
    #: lag); None when the source cannot tell.
    remaining: int | None = None
    #: Seconds to work off the backlog and ``remaining`` together at the recent rate.
    eta_remaining_seconds: float | None = None
    #: ``{"since": ISO time, "by": str}`` while the queue is paused (:func:`lrq.control.paused`).
    paused: dict[str, Any] | None = None

    @property
    def awaiting_ack(self) -> int:
        return self.counts.awaiting_ack

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.counts.as_dict(), "stale": self.stale,
            "foreign": {"count": self.foreign_count, "sample": list(self.foreign_sample)},
            "key_problem": self.key_problem, "position": self.position, "source": self.source}
        if self.results is not None:
            out.update(results=self.results, dead_letters=self.dead_letters,
                       ledger_batches=self.ledger_batches, ledger_items=self.ledger_items)
        out.update(rates=None if self.rates is None else self.rates.to_json(),
                   backlog_items=self.backlog_items, eta_seconds=_round(self.eta_seconds),
                   remaining=self.remaining,
                   eta_remaining_seconds=_round(self.eta_remaining_seconds),
                   paused=self.paused)
        return out


@dataclass(frozen=True)
class DiskStatus:
    """The data dir's use against its budget, and the filesystem's free space."""

    used: int
    max_bytes: int
    free_bytes: int
    total_bytes: int
    free_inodes: int
    total_inodes: int
    #: The ``[cleanup] min_free`` setting as written ("10%", "2GB").
    min_free: str
    #: Why free space is below ``min_free``, or None.
    below_min_free: str | None
    #: Why the next batch cannot be published, with advice, or None.
    blocked: str | None
    held: Held

    def to_json(self) -> dict[str, Any]:
        return {"used": self.used, "max_bytes": self.max_bytes, "free_bytes": self.free_bytes,
                "total_bytes": self.total_bytes, "free_inodes": self.free_inodes,
                "total_inodes": self.total_inodes, "min_free": self.min_free,
                "below_min_free": self.below_min_free, "blocked": self.blocked,
                "held": self.held.as_dict()}


@dataclass(frozen=True)
class Status:
    """``lrq status``: every queue asked for, the disk, and the database's reachability."""

    data_dir: str
    queues: tuple[QueueStatus, ...]
    disk: DiskStatus
    #: Why the database could not be reached (one line), or None: the spool's part of each
    #: queue is shown regardless.
    database_error: str | None = None

    @property
    def bytes(self) -> int:
        """Bytes of every queue's folders."""
        return sum(q.counts.bytes for q in self.queues)

    def queue(self, name: str) -> QueueStatus:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data_dir": self.data_dir,
                               "queues": {q.name: q.to_json() for q in self.queues}}
        if self.database_error is not None:
            out["database"] = {"error": self.database_error}
        out["bytes"] = self.bytes
        out["disk"] = self.disk.to_json()
        return out


@dataclass(frozen=True)
class BatchView:
    """``lrq show NAME``: one batch's state, claim, attempts, contents and errors. Fields
    left None were not found (no claim, no error) or could not be read (see ``load_error``)."""

    queue: str
    name: str
    state: str
    #: The claim record (owner, attempt, times) while claimed.
    claim: dict[str, Any] | None = None
    #: ``{"attempts": n, "history": [...]}`` when an attempt ended without finishing.
    attempts: dict[str, Any] | None = None
    created: float | None = None
    items: int | None = None
    #: The first ten items' keys.
    keys: tuple[str, ...] = ()
    position: Any = None
    #: Why the batch file could not be read (the other fields are still shown).
    load_error: str | None = None
    #: A failed batch's error file.
    error: Any = None
    #: The ledger holds the batch (its results are committed).
    recorded: bool = False
    dead_letters: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"queue": self.queue, "name": self.name, "state": self.state}
        if self.claim is not None:
            out["claim"] = self.claim
        if self.attempts:
            out["attempts"] = self.attempts
        if self.load_error is None:
            out.update(created=self.created, items=self.items, keys=list(self.keys),
                       position=self.position)
        else:
            out["load_error"] = self.load_error
        if self.error is not None:
            out["error"] = self.error
        out["recorded"] = self.recorded
        if self.dead_letters:
            out["dead_letters"] = list(self.dead_letters)
        return out


@dataclass(frozen=True)
class OutputVerification:
    """One output of a fan-out queue (lrq.outputs): every source item either stored or
    dead-lettered in it. An aggregating output's rows are not one per item: only their
    count, dead letters and duplicates are shown; so is an output that cannot list its keys
    (``listed`` False)."""

    output: str
    aggregate: bool
    results: int
    dead: int
    missing: int = 0
    duplicated: int = 0
    extra: int = 0
    listed: bool = True
    missing_sample: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicated == 0 and self.extra == 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class Verification:
    """Source keys against result rows plus dead letters: every item exactly once."""

    queue: str
    #: Source items (rows), and how many distinct keys they carry.
    source: int
    distinct: int
    results: int
    dead: int
    missing: int
    #: Keys stored more than once, or both as a result and as a dead letter.
    duplicated: int
    extra: int
    failed_batches: int
    quarantined_batches: int = 0
    missing_sample: list[str] = field(default_factory=list)
    #: Set when the source cannot list its keys (a broker): how the ledger was reconciled
    #: against what the source still holds instead. ``source`` is then the ledger's item
    #: count and ``missing`` the entries the source still holds (pending or not yet read).
    reconciled: str | None = None
    #: A fan-out queue's outputs, each verified on its own (the fields above are their sums;
    #: ``dead`` counts dead letters of every output). Empty for a queue with one handler.
    outputs: tuple[OutputVerification, ...] = ()

    @property
    def source_duplicates(self) -> int:
        """Source items whose key another item already has: the sink keeps one row per key,
        so these are lost without a trace unless ``key`` is made unique."""
        return self.source - self.distinct

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicated == 0 and self.extra == 0 \
            and self.source_duplicates == 0 and all(o.ok for o in self.outputs)

    def to_json(self) -> dict[str, Any]:
        out = {**asdict(self), "source_duplicates": self.source_duplicates, "ok": self.ok}
        if self.outputs:
            out["outputs"] = {o.output: o.to_json() for o in self.outputs}
        else:
            del out["outputs"]  # a queue with one handler: the keys it always had
        return out


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)
