"""The application object: everything built from one :class:`~lrq.config.Config`.

Nothing is created at import time; engines and tables are made on first use and belong to
the App, so tests and processes can hold several side by side.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from lrq import control, rates, signing, sources
from lrq.acker import Acker
from lrq.batching import Rules
from lrq.config import Config, QueueConfig, load_handler
from lrq.db import make_engine
from lrq.disk import Budget, Floor, Held
from lrq.errors import BatchCorrupt, ConfigError, LrqError, NoSuchBatch, SinkError
from lrq.redact import redact_options, redact_text
from lrq.sink import Sink
from lrq.sniffer import Sniffer
from lrq.spool import Spool, State
from lrq.status import (
    BatchView,
    DiskStatus,
    OutputVerification,
    QueueStatus,
    Status,
    Verification,
)
from lrq.worker import Worker

log = logging.getLogger(__name__)

#: Source keys ``verify`` reads between calls of its ``progress`` callback.
VERIFY_PROGRESS_EVERY = 1000


@dataclass(frozen=True)
class Retried:
    """What :meth:`App.retry_dead` did for one queue."""

    queue: str
    #: The new batches (marked ``replace_dead``), and how many items they hold.
    batches: list[str]
    items: int
    #: Keys skipped because a retry batch not yet stored holds them: key -> that batch.
    waiting: dict[str, str]
    #: Keys asked for that have no dead letter in this queue.
    missing: list[str]


class App:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.base = cfg.path.parent
        self._engine: Engine | None = None
        self._sinks: dict[str, Sink] = {}
        self._sources: dict[str, sources.Source] = {}
        self._spools: dict[str, Spool] = {}
        self._ackers: dict[str, Acker] = {}
        self._watches: dict[str, control.Watch] = {}
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        """The batch-signing key (config ``secret``, env ``LRQ_SECRET`` or data_dir/secret.key)."""
        if self._key is None:
            self._key = signing.load_key(self.cfg.secret, self.cfg.data_dir)
        return self._key

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.cfg.db_url)
        return self._engine

    def queues(self, name: str | None = None) -> list[QueueConfig]:
        return self.cfg.queue(name)

    def spool(self, q: QueueConfig) -> Spool:
        if q.name not in self._spools:
            self._spools[q.name] = Spool(
                self.cfg.data_dir, q.name, key=self.key, compress=q.compress,
                previous=signing.previous_keys(self.cfg.previous_secrets)).ensure()
        return self._spools[q.name]

    def sink(self, q: QueueConfig) -> Sink:
        if q.name not in self._sinks:
            self._sinks[q.name] = Sink(self.engine, q, self.base).prepare()
        return self._sinks[q.name]

    def source(self, q: QueueConfig) -> sources.Source:
        """The queue's source, opened once. Its context's ``held`` is read from the spool
        only if the source asks (a broker consumer at open; a SQL table never does)."""
        if q.name not in self._sources:
            context = sources.Context(data_dir=self.cfg.data_dir, queue=q.name, key=q.key,
                                      held=_Lazy(lambda: self.acker(q).receipts()))
            self._sources[q.name] = sources.build(q.source, context)
        return self._sources[q.name]

    def acker(self, q: QueueConfig) -> Acker:
        """The queue's :class:`~lrq.acker.Acker` (its spool scanned once, when built)."""
        if q.name not in self._ackers:
            self._ackers[q.name] = Acker(self.spool(q))
        return self._ackers[q.name]

    def watch(self, q: QueueConfig) -> control.Watch:
        """The queue's pause, as this process sees it (:class:`lrq.control.Watch`): one per
        queue, shared by the sniffer, the scheduler's jobs and the worker, so each process
        logs ``paused`` / ``resumed`` once."""
        if q.name not in self._watches:
            self._watches[q.name] = control.Watch(self.cfg.data_dir, q.name)
        return self._watches[q.name]

    def worker(self, q: QueueConfig, stop: threading.Event | None = None) -> Worker:
        return Worker(q, self.spool(q), self.sink(q), self.handlers(q), stop=stop,
                      pause=self.watch(q))

    def handlers(self, q: QueueConfig) -> Any:
        """The queue's handler, or (a queue with ``outputs``) each output's by name."""
        if not q.fanout:
            return load_handler(q, self.base)
        return {o.name: load_handler(q, self.base, o) for o in q.plan()}

    def budget(self) -> Budget:
        self.cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Budget(self.cfg.data_dir, list(self.cfg.queues), self.cfg.log_file,
                      self.cfg.cleanup.max_bytes, Floor.parse(self.cfg.cleanup.min_free, "min_free"),
                      done_bytes=lambda name: self.spool(self.cfg.queues[name]).done_bytes())

    def held(self) -> Held:
        """What holds the data dir's filesystem (for "no room" messages)."""
        return self.budget().held(self.spool(q).counts() for q in self.queues())

    def sniffer(self, q: QueueConfig) -> Sniffer:
        source = self.source(q)
        acker = self.acker(q) if source.ack_at == "commit" else None
        return Sniffer(q, self.spool(q), source, budget=self.budget(), acker=acker,
                       pause=self.watch(q), rules=Rules.of(q, self.base))

    def check(self) -> None:
        """Build every queue's parts once, so a bad handler, model, URL or key fails up front."""
        for q in self.queues():
            for o in q.plan():
                handler = load_handler(q, self.base, o)
                close = getattr(handler, "close", None)
                if callable(close):
                    close()  # built only to check it; workers build their own
            Rules.of(q, self.base)  # imports its `separate`, if any
            self.sink(q)
            self.source(q)
            self.check_key(q)

    def check_key(self, q: QueueConfig) -> None:
        """The queue's ``key`` must be a field of the source's items. Otherwise every batch
        would fail in the worker, one by one, while the run looks healthy. A ``columns``
        mapping names the fields without a database round trip; else the source is built
        (its table reflected) and asked."""
        mapped = getattr(q.source.settings, "columns", ())  # a SQL source's, without a query
        fields = [f for f, _ in mapped] or self.source(q).item_fields()
        if fields is not None and q.key not in fields:
            raise ConfigError(
                f"queues.{q.name}.key: {q.key!r} is not a field of the source's items "
                f"(fields: {', '.join(fields)}); set key to one of them, or map a column to "
                f"it in [queues.{q.name}.source] columns")

    def check_keys(self) -> None:
        """Raise :class:`~lrq.errors.KeyMismatch` when pending batches show the key changed,
        before anything is claimed (see :meth:`lrq.spool.Spool.key_problem`)."""
        for q in self.queues():
            problem = self.spool(q).key_problem()
            if problem is not None:
                raise problem

    # -- control -------------------------------------------------------------------------
    def pause(self, queue: str, by: str | None = None) -> dict[str, Any]:
        """Pause a configured queue (:func:`lrq.control.pause`): its record, ``since`` and
        ``by``; the first pause's when it was paused already. Raises
        :class:`~lrq.errors.ConfigError` for a queue the config does not name."""
        q = self.queues(queue)[0]
        before = control.paused(self.cfg.data_dir, q.name)
        record = control.pause(self.cfg.data_dir, q.name, by)
        if before is None:
            log.info("pause-requested queue=%s by=%s", q.name, control.quoted(record["by"]))
        return record

    def resume(self, queue: str, by: str | None = None) -> bool:
        """Lift a configured queue's pause; False when it was not paused."""
        q = self.queues(queue)[0]
        done = control.resume(self.cfg.data_dir, q.name)
        if done:
            log.info("resume-requested queue=%s by=%s", q.name,
                     control.quoted(by or control.default_by()))
        return done

    def paused(self, queue: str) -> dict[str, Any] | None:
        """A configured queue's pause record (``since``, ``by``), or None."""
        return control.paused(self.cfg.data_dir, self.queues(queue)[0].name)

    def requeue(self, name: str, queue: str | None = None) -> tuple[str, str]:
        """Put a failed batch back (or release a stuck claim) by name, in whichever queue
        (or ``queue``) has it: (queue, what was done). Raises
        :class:`~lrq.errors.NoSuchBatch` when no queue has it, :class:`~lrq.errors.LrqError`
        when its state cannot be requeued (pending, done, quarantined)."""
        for q in self.queues(queue):
            sp = self.spool(q)
            if sp.state(name) is not State.MISSING:
                outcome = sp.requeue(name)
                log.info("requeued queue=%s batch=%s outcome=%s", q.name, name,
                         control.quoted(outcome))
                return q.name, outcome
        raise NoSuchBatch(name, f"{self.cfg.data_dir} (queues: "
                                f"{', '.join(q.name for q in self.queues(queue))})")

    def requeue_failed(self, queue: str | None = None) -> int:
        """Put every failed batch of ``queue`` (or of every queue) back to pending, attempts
        reset; return how many. A batch another process moved meanwhile is skipped."""
        n = 0
        for q in self.queues(queue):
            sp = self.spool(q)
            for _, p in sp.failed_batches():
                if p.parent != sp.failed:
                    continue  # quarantined: `lrq requeue --quarantined NAME` re-signs it
                try:
                    outcome = sp.requeue(p.stem)
                except (FileNotFoundError, LrqError):
                    continue  # requeued or removed by another process since the listing
                n += 1
                log.info("requeued queue=%s batch=%s outcome=%s", q.name, p.stem,
                         control.quoted(outcome))
        return n

    # -- reports -------------------------------------------------------------------------
    def status(self, name: str | None = None) -> Status:
        """Per queue: the spool's counts, the database's, the source's, rates and ETA; the
        disk's. Never a password. A database that cannot be reached leaves its fields None
        and says why in :attr:`Status.database_error`: the spool's part is still worth
        showing (and needs no database)."""
        queues: list[QueueStatus] = []
        every = []
        db_error: str | None = None
        for q in self.queues(name):
            sp = self.spool(q)
            counts = sp.counts()
            every.append(counts)
            foreign = sp.foreign()
            problem = sp.key_problem()
            position = sp.read_position()
            source = self._source_status(q)
            db: dict[str, Any] = {}
            if db_error is None:
                try:
                    db = self._status_db(q)
                except (SinkError, SQLAlchemyError) as e:
                    text = str(getattr(e, "orig", None) or e)
                    db_error = redact_text(
                        "; ".join(x.strip() for x in text.splitlines() if x.strip()))
            queues.append(self._queue_status(q, counts, db, source, QueueStatus(
                name=q.name, counts=counts, stale=len(sp.stale_claims(q.lease)),
                foreign_count=len(foreign),
                foreign_sample=tuple(f"{p} ({w})" for p, w in list(foreign.items())[:5]),
                key_problem=redact_text(str(problem)) if problem else None,
                position=position, source=source,
                paused=control.paused(self.cfg.data_dir, q.name))))
        return Status(data_dir=str(self.cfg.data_dir), queues=tuple(queues),
                      disk=self._disk_status(name, every), database_error=db_error)

    def _queue_status(self, q: QueueConfig, counts: Any, db: dict[str, Any],
                      source: dict[str, Any], base: QueueStatus) -> QueueStatus:
        """``base`` with the database's counts and rates (``db``, empty when the database is
        down), the backlog, what the source still holds, and their ETAs (None without rates,
        unless there is nothing left)."""
        r: rates.Rates | None = db.pop("rates", None)
        per_batch = db["ledger_items"] / db["ledger_batches"] if db.get("ledger_batches") \
            else q.batch_size
        backlog = round((counts.pending + counts.claimed) * per_batch)
        remaining = None if "error" in source else self.remaining(q, source)
        rate = 0.0 if r is None else r.items_per_s
        return dataclasses.replace(
            base, **db, rates=r, backlog_items=backlog,
            eta_seconds=rates.eta(backlog, rate), remaining=remaining,
            eta_remaining_seconds=None if remaining is None
            else rates.eta(backlog + remaining, rate))

    def _disk_status(self, name: str | None, every: list[Any]) -> DiskStatus:
        budget = self.budget()
        space = budget.space()
        used = budget.used()
        nxt = max((self.spool(q).last_batch_bytes() for q in self.queues(name)), default=0)
        blocked = budget.blocked(used, nxt, space)
        held = budget.held(every)
        return DiskStatus(used=used, max_bytes=budget.max_bytes, free_bytes=space.free_bytes,
                          total_bytes=space.total_bytes, free_inodes=space.free_inodes,
                          total_inodes=space.total_inodes, min_free=self.cfg.cleanup.min_free,
                          below_min_free=space.below(budget.floor),
                          blocked=f"{blocked[1]}; {budget.advice(held, nxt)}" if blocked else None,
                          held=held)

    def _source_status(self, q: QueueConfig) -> dict[str, Any]:
        """The source's own view (:meth:`Source.status`: lag, pending per consumer, the last
        acknowledgement), ``{"kind": ...}`` first, redacted; ``{"error": ...}`` when it cannot
        be opened or asked (the spool's part is still shown)."""
        try:
            return redact_options({"kind": q.source.kind, **self.source(q).status()})
        except LrqError as e:
            return redact_options({"kind": q.source.kind, "error": str(e)})

    def remaining(self, q: QueueConfig, view: dict[str, Any] | None = None) -> int | None:
        """Items the source has yet to hand out: its ``remaining(position)`` where it has one
        (SQL: rows past the saved watermark), else the ``lag`` of its view (a broker;
        ``view`` is :meth:`Source.status`, asked here when not given); None when it cannot
        tell or cannot be asked."""
        try:
            count = getattr(self.source(q), "remaining", None)
            if callable(count):
                n = count(self.spool(q).read_position())
                return None if n is None else int(n)
            view = self._source_status(q) if view is None else view
        except (LrqError, SQLAlchemyError) as e:
            log.debug("remaining-unknown queue=%s: %s", q.name, e)
            return None
        lag = view.get("lag")
        return lag if isinstance(lag, int) and not isinstance(lag, bool) else None

    def _status_db(self, q: QueueConfig) -> dict[str, Any]:
        """The database's part of a queue's status: result rows, dead letters, the ledger's
        counts and the recent rates. Raises what the sink raises when it cannot be reached."""
        sink = self.sink(q)
        batches, items = sink.ledger_stats()
        # ``results`` are rows in the results table; the ledger's items count what the
        # workers were given, which is more when items shared a key.
        return {"results": sink.count(), "dead_letters": sink.dead_count(),
                "ledger_batches": batches, "ledger_items": items,
                "rates": rates.Rates.from_counts(sink.finished_within(rates.WINDOWS))}

    def verify(self, q: QueueConfig, sample: int = 10,
               progress: Callable[[int], None] | None = None) -> Verification:
        """Every source item has its own key, and every key exactly one result row or exactly
        one dead letter. ``progress`` is called with the count of source keys read so far,
        every ``VERIFY_PROGRESS_EVERY`` keys (a progress bar over millions of keys)."""
        sink = self.sink(q)
        counts = self.spool(q).counts()
        if q.fanout:
            return self._verify_outputs(q, counts, sample, progress)
        stored = set(sink.keys())
        dead = set(sink.dead_keys())
        n_results = sink.count()
        both = len(stored & dead)
        stored |= dead
        seen: set[str] = set()
        missing: list[str] = []
        n_missing = n_items = 0
        keys = self.source(q).keys(q.key)
        if keys is None:
            return self._reconcile(q, counts, n_results, len(dead), sink.duplicates() + both)
        for k in keys:
            n_items += 1
            if progress is not None and n_items % VERIFY_PROGRESS_EVERY == 0:
                progress(n_items)
            if k in seen:
                continue
            seen.add(k)
            if k not in stored:
                n_missing += 1
                if len(missing) < sample:
                    missing.append(k)
        if progress is not None:
            progress(n_items)
        return Verification(
            queue=q.name, source=n_items, distinct=len(seen), results=n_results, dead=len(dead),
            missing=n_missing,
            duplicated=sink.duplicates() + both, extra=len(stored - seen),
            failed_batches=counts.failed, quarantined_batches=counts.quarantined,
            missing_sample=missing)

    def _verify_outputs(self, q: QueueConfig, counts: Any, sample: int,
                        progress: Callable[[int], None] | None) -> Verification:
        """:meth:`verify` of a fan-out queue: each output on its own (every source item
        stored or dead-lettered in each output that stores one row per item); the queue's
        fields are the outputs' sums."""
        from lrq.outputs import SEP

        sink = self.sink(q)
        dead_by: dict[str, set[str]] = {name: set() for name in sink.outputs}
        n_dead = 0
        for k in sink.dead_keys():
            n_dead += 1
            name, _, key = k.partition(SEP)
            dead_by.setdefault(name, set()).add(key)
        keys = self.source(q).keys(q.key)
        seen: set[str] = set()
        n_items = 0
        for k in keys or ():
            n_items += 1
            if progress is not None and n_items % VERIFY_PROGRESS_EVERY == 0:
                progress(n_items)
            seen.add(k)
        if progress is not None:
            progress(n_items)
        base = (self._reconcile(q, counts, sink.count(), n_dead, sink.duplicates())
                if keys is None else None)
        found = []
        for name, output in sink.outputs.items():
            dead = dead_by.get(name, set())
            listed = None if output.aggregate or keys is None else output.keys()
            rows = output.count() or 0
            if listed is None:
                found.append(OutputVerification(
                    output=name, aggregate=output.aggregate, results=rows, dead=len(dead),
                    duplicated=output.duplicates(), listed=False,
                    missing=0 if base is None or output.aggregate else base.missing))
                continue
            stored = set(listed)
            lost = sorted(seen - stored - dead)
            found.append(OutputVerification(
                output=name, aggregate=False, results=rows, dead=len(dead), missing=len(lost),
                duplicated=output.duplicates() + len(stored & dead),
                extra=len((stored | dead) - seen), missing_sample=lost[:sample]))
        outs = tuple(found)
        if base is not None:
            return dataclasses.replace(base, outputs=outs)
        return Verification(
            queue=q.name, source=n_items, distinct=len(seen), results=sink.count(), dead=n_dead,
            missing=sum(o.missing for o in outs), duplicated=sum(o.duplicated for o in outs),
            extra=sum(o.extra for o in outs), failed_batches=counts.failed,
            quarantined_batches=counts.quarantined,
            missing_sample=sorted({k for o in outs for k in o.missing_sample})[:sample],
            outputs=outs)

    def _reconcile(self, q: QueueConfig, counts: Any, results: int, dead: int,
                   duplicated: int) -> Verification:
        """:meth:`verify` for a source that cannot list its keys: every item the ledger
        recorded is stored once (duplicates as above), and the source holds nothing more:
        its ``pending`` (fetched, not acknowledged, by any consumer: this node's batches not
        yet stored are among them) and ``lag`` (not read yet) from :meth:`Source.status` are
        the items not stored yet."""
        view = self.source(q).status()
        held = sum(int(view.get(k) or 0) for k in ("pending", "lag"))
        _, items = self.sink(q).ledger_stats()
        note = (f"the source cannot list its keys: the ledger's {items} items reconciled "
                f"against what it still holds (pending {view.get('pending', '?')}, lag "
                f"{view.get('lag', '?')}; {counts.pending + counts.claimed} batches not stored "
                f"here, {counts.awaiting_ack} awaiting their acknowledgement)")
        return Verification(
            queue=q.name, source=items, distinct=items, results=results, dead=dead,
            missing=held, duplicated=duplicated, extra=0,
            failed_batches=counts.failed, quarantined_batches=counts.quarantined,
            reconciled=note)

    def retry_dead(self, q: QueueConfig, keys: Collection[str] | None = None) -> Retried:
        """Publish dead-lettered items (``keys``, or all) again as new batches marked
        ``replace_dead``: storing one deletes its keys' old dead letters in the same
        transaction as the new results and dead letters (:meth:`Sink.store`).

        Idempotent: a key already in a retry batch that is not stored yet (pending, claimed
        or failed) is skipped, so running it twice, or again after a crash between publish
        and store, does not publish an item twice. Those batches are listed *before* the
        dead letters are read: a retry batch stored in between has replaced its rows by
        then. Items come back as the dead-letter table stored them (JSON)."""
        sp, sink = self.spool(q), self.sink(q)
        # A fan-out queue's dead letters are keyed "output/item key" (lrq.outputs): an item
        # dead in several outputs is published once; its batch runs each output only on the
        # items dead in it (Worker.handle_outputs).
        fanout = q.fanout
        asked = keys
        if fanout and keys is not None:
            from lrq.outputs import dead_key

            keys = {dead_key(o, k) for o in sink.outputs for k in keys}
        queued: set[str] = set()
        names: list[str] = []
        skipped: dict[str, str] = {}
        found: set[str] = set()
        items = 0
        todo: list[dict[str, Any]] = []

        def publish() -> None:
            names.append(sp.publish(todo, replace_dead=True))
            log.info("retry-published queue=%s batch=%s items=%d", q.name, names[-1], len(todo))
            todo.clear()

        with sp.lock("retry-dead"):
            waiting = self._waiting_retries(sp, q.key)
            for key, item in sink.dead_items(keys):
                if fanout:
                    key = str(item.get(q.key))
                    if key in queued:
                        continue  # dead in another output too: published once
                    queued.add(key)
                found.add(key)
                if key in waiting:
                    skipped[key] = waiting[key]
                    continue
                todo.append(item)
                items += 1
                if len(todo) == q.batch_size:
                    publish()
            if todo:
                publish()
        return Retried(queue=q.name, batches=names, items=items, waiting=skipped,
                       missing=sorted(set(asked or ()) - found))

    @staticmethod
    def _waiting_retries(sp: Spool, key: str) -> dict[str, str]:
        """Keys of retry batches not stored yet -> batch name. Reads every pending, claimed
        and failed batch (a manual command: at most ``max_pending`` and a few more)."""
        out: dict[str, str] = {}
        for name in sp.pending() + sp.claimed() + sorted(p.stem for p in sp.failed.glob("*.pkl")):
            try:
                batch = sp.load(name)
            except (FileNotFoundError, BatchCorrupt):  # done and removed since, or unreadable
                continue
            if batch.replace_dead:
                out.update((str(item.get(key)), name) for item in batch.items)
        return out

    def show(self, name: str) -> BatchView:
        """One batch wherever it is: state, claim, attempts, its first keys, its error and
        dead letters, and whether the ledger holds it."""
        for q in self.queues():
            sp = self.spool(q)
            state = sp.state(name)
            if state is State.MISSING:
                continue
            claim = sp.read_claim(name)
            attempts = sp.attempts(name)
            loaded: dict[str, Any] = {}
            try:
                batch = sp.load(name)
                loaded = {"created": batch.created, "items": len(batch.items),
                          "keys": tuple(str(i.get(q.key)) for i in batch.items[:10]),
                          "position": batch.position}
            except Exception as e:  # noqa: BLE001 (show what we can of a broken batch)
                loaded = {"load_error": str(e)}
            sink = self.sink(q)
            return BatchView(
                queue=q.name, name=name, state=state.value,
                claim=None if claim is None else dict(claim.__dict__),
                attempts=attempts if attempts["attempts"] else None, **loaded,
                error=sp.read_error(name), recorded=sink.is_recorded(name),
                dead_letters=tuple(sink.dead_letters(batch=name)))
        raise ConfigError(f"no batch named {name!r} in {self.cfg.data_dir} "
                          f"(queues: {', '.join(self.cfg.queues)})")


class _Lazy(Sequence[Any]):
    """A sequence computed on first use (:attr:`lrq.sources.Context.held`: reading it scans
    the spool, which only a source acknowledged at commit needs)."""

    def __init__(self, compute: Callable[[], list[Any]]) -> None:
        self._compute = compute
        self._items: list[Any] | None = None

    def _get(self) -> list[Any]:
        if self._items is None:
            self._items = self._compute()
        return self._items

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._get())
