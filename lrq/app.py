"""The application object: everything built from one :class:`~lrq.config.Config`.

Nothing is created at import time; engines and tables are made on first use and belong to
the App, so tests and processes can hold several side by side.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from lrq import signing, sources
from lrq.config import Config, QueueConfig, load_handler
from lrq.db import make_engine
from lrq.disk import Budget, Floor, Held
from lrq.errors import ConfigError
from lrq.sink import Sink
from lrq.sniffer import Sniffer
from lrq.spool import Spool, State
from lrq.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class Verification:
    """Source keys against result rows plus dead letters: every item exactly once."""

    queue: str
    source: int
    results: int
    dead: int
    missing: int
    #: Keys stored more than once, or both as a result and as a dead letter.
    duplicated: int
    extra: int
    failed_batches: int
    quarantined_batches: int = 0
    missing_sample: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicated == 0 and self.extra == 0


class App:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.base = cfg.path.parent
        self._engine: Engine | None = None
        self._sinks: dict[str, Sink] = {}
        self._sources: dict[str, sources.Source] = {}
        self._spools: dict[str, Spool] = {}
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
        if q.name not in self._sources:
            self._sources[q.name] = sources.build(q.source)
        return self._sources[q.name]

    def worker(self, q: QueueConfig, stop: threading.Event | None = None) -> Worker:
        return Worker(q, self.spool(q), self.sink(q), load_handler(q, self.base), stop=stop)

    def budget(self) -> Budget:
        self.cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Budget(self.cfg.data_dir, list(self.cfg.queues), self.cfg.log_file,
                      self.cfg.cleanup.max_bytes, Floor.parse(self.cfg.cleanup.min_free, "min_free"))

    def held(self) -> Held:
        """What holds the data dir's filesystem (for "no room" messages)."""
        return self.budget().held(self.spool(q).counts() for q in self.queues())

    def sniffer(self, q: QueueConfig) -> Sniffer:
        return Sniffer(q, self.spool(q), self.source(q), budget=self.budget())

    def check(self) -> None:
        """Build every queue's parts once, so a bad handler, model or URL fails up front."""
        for q in self.queues():
            handler = load_handler(q, self.base)
            close = getattr(handler, "close", None)
            if callable(close):
                close()  # built only to check it; workers build their own
            self.sink(q)
            self.source(q)

    def check_keys(self) -> None:
        """Raise :class:`~lrq.errors.KeyMismatch` when pending batches show the key changed,
        before anything is claimed (see :meth:`lrq.spool.Spool.key_problem`)."""
        for q in self.queues():
            problem = self.spool(q).key_problem()
            if problem is not None:
                raise problem

    # -- reports -------------------------------------------------------------------------
    def status(self, name: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"data_dir": str(self.cfg.data_dir), "queues": {}}
        total = 0
        every = []
        for q in self.queues(name):
            sp = self.spool(q)
            every.append(sp.counts())
            counts = every[-1].as_dict()
            total += counts["bytes"]
            sink = self.sink(q)
            batches, items = sink.ledger_stats()
            stale = len(sp.stale_claims(q.lease))
            foreign = sp.foreign()
            problem = sp.key_problem()
            out["queues"][q.name] = {**counts, "stale": stale,
                                     "foreign": {"count": len(foreign), "sample": [
                                         f"{p} ({w})" for p, w in list(foreign.items())[:5]]},
                                     "key_problem": str(problem) if problem else None,
                                     "dead_letters": sink.dead_count(),
                                     "position": sp.read_position(),
                                     "ledger_batches": batches, "ledger_items": items}
        out["bytes"] = total
        budget = self.budget()
        sp = budget.space()
        used = budget.used()
        nxt = max((self.spool(q).last_batch_bytes() for q in self.queues(name)), default=0)
        blocked = budget.blocked(used, nxt, sp)
        held = budget.held(every)
        out["disk"] = {"used": used, "max_bytes": budget.max_bytes,
                       "free_bytes": sp.free_bytes, "total_bytes": sp.total_bytes,
                       "free_inodes": sp.free_inodes, "total_inodes": sp.total_inodes,
                       "min_free": self.cfg.cleanup.min_free,
                       "below_min_free": sp.below(budget.floor),
                       "blocked": blocked and f"{blocked[1]}; {held.advice()}",
                       "held": held.as_dict()}
        return out

    def verify(self, q: QueueConfig, sample: int = 10) -> Verification:
        """Every source key has exactly one result row or exactly one dead letter."""
        sink = self.sink(q)
        counts = self.spool(q).counts()
        stored = set(sink.keys())
        dead = set(sink.dead_keys())
        n_results = sink.count()
        both = len(stored & dead)
        stored |= dead
        seen: set[str] = set()
        missing: list[str] = []
        n_missing = 0
        for k in self.source(q).keys(q.key):
            seen.add(k)
            if k not in stored:
                n_missing += 1
                if len(missing) < sample:
                    missing.append(k)
        return Verification(
            queue=q.name, source=len(seen), results=n_results, dead=len(dead), missing=n_missing,
            duplicated=sink.duplicates() + both, extra=len(stored - seen),
            failed_batches=counts.failed, quarantined_batches=counts.quarantined,
            missing_sample=missing)

    def show(self, name: str) -> dict[str, Any]:
        for q in self.queues():
            sp = self.spool(q)
            state = sp.state(name)
            if state is State.MISSING:
                continue
            info: dict[str, Any] = {"queue": q.name, "name": name, "state": state.value}
            claim = sp.read_claim(name)
            if claim is not None:
                info["claim"] = claim.__dict__
            attempts = sp.attempts(name)
            if attempts["attempts"]:
                info["attempts"] = attempts
            try:
                batch = sp.load(name)
                info["items"] = len(batch.items)
                info["keys"] = [str(i.get(q.key)) for i in batch.items[:10]]
                info["position"] = batch.position
            except Exception as e:  # show what we can of a broken batch
                info["load_error"] = str(e)
            error = sp.read_error(name)
            if error is not None:
                info["error"] = error
            sink = self.sink(q)
            info["recorded"] = sink.is_recorded(name)
            dead = sink.dead_letters(batch=name)
            if dead:
                info["dead_letters"] = dead
            return info
        raise ConfigError(f"no batch named {name!r} in {self.cfg.data_dir} "
                          f"(queues: {', '.join(self.cfg.queues)})")
