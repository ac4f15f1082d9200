"""What runs beside a worker's main loop: the heartbeat thread that keeps its claims' lease
(and is the handler's watchdog), and the committer thread that stores a handled batch while
the next one is handled (:class:`StoreBehind`). Split from :mod:`lrq.worker`, which drives them.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lrq.errors import HandlerBroken
from lrq.spool import Claim, Spool

if TYPE_CHECKING:
    from lrq.worker import Worker

__all__ = ["Handled", "Heartbeat", "StoreBehind", "end_process"]

log = logging.getLogger("lrq.worker")  # the worker's events, under its logger name

OVERRUN_EXIT = 1  # exit status of a worker process ended by the watchdog


class Heartbeat:
    """Refreshes every claim a worker holds every ``every`` seconds, from one thread: one
    touch of the process's owner file, which all its claims link to, then a stat per claim to
    see it is still ours (:meth:`lrq.spool.Spool.beat`).

    :meth:`hold` returns an event that is set if the claim was taken back (the reaper decided
    its owner was dead). The thread starts with the first claim held and ends once a beat
    finds none; one thread per worker, not one per batch (starting and joining one cost
    ~1.2 ms a batch).

    It is also the batch's watchdog: each beat asks ``watch`` (the policy's
    :meth:`~lrq.policy.HandlerPolicy.overrun`) whether the handler call in progress ran past
    its deadline. If so it stops refreshing, marks every claim lost and calls
    ``on_overrun``, by default :func:`end_process`: the process ends, the slot is freed and
    the reaper takes the claims back, counting an attempt. Detection takes up to one beat
    (``lease / 4``) past the deadline."""

    def __init__(self, spool: Spool, every: float, *,
                 watch: Callable[[], str | None] | None = None,
                 on_overrun: Callable[[str], Any] | None = None) -> None:
        self.spool = spool
        self.every = every
        self.watch = watch
        self.on_overrun = on_overrun or end_process
        self._held: dict[str, tuple[Claim, threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, claim: Claim) -> threading.Event:
        lost = threading.Event()
        with self._lock:
            self._held[claim.name] = (claim, lost)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name=f"heartbeat-{self.spool.queue}")
                self._thread.start()
        return lost

    def drop(self, claim: Claim) -> None:
        with self._lock:
            self._held.pop(claim.name, None)

    def claims(self) -> list[Claim]:
        """The claims held now: batches being handled or committed."""
        with self._lock:
            return [claim for claim, _lost in self._held.values()]

    def _beat(self) -> None:
        while True:
            time.sleep(self.every)  # the beat's period, not synchronisation
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
                held = list(self._held.values())
            overrun = self.watch() if self.watch is not None else None
            if overrun is not None:
                self._overrun(overrun, held)
                return
            live = [(claim, lost) for claim, lost in held if not lost.is_set()]
            for (_claim, lost), ours in zip(live, self.spool.beat([c for c, _ in live])):
                if not ours:
                    lost.set()

    def _overrun(self, why: str, held: list[tuple[Claim, threading.Event]]) -> None:
        with self._lock:
            self._thread = None
        for _claim, lost in held:
            lost.set()  # nothing of these batches is committed now
        log.error("batch-overrun queue=%s batches=%s: %s; ending the process, the reaper "
                  "takes the batches back", self.spool.queue,
                  ",".join(c.name for c, _ in held), why)
        self.on_overrun(why)


def end_process(_why: str) -> None:
    """End a worker process whose handler will not stop (see :class:`Heartbeat`)."""
    logging.shutdown()
    os._exit(OVERRUN_EXIT)


@dataclass
class Handled:
    """A claimed batch whose handler calls are done: what its commit needs."""

    claim: Claim
    lost: threading.Event
    items: int
    results: list[dict[str, Any]]
    dead: list[tuple[dict[str, Any], str]]
    started: float
    #: A ``lrq retry-dead`` batch: its store replaces its keys' dead letters.
    replace_dead: bool = False
    #: The batch's items: a result the database refuses is dead-lettered with its item.
    inputs: list[dict[str, Any]] | None = None
    #: Seconds the handler calls took (retries and backoff included), for the ledger row.
    seconds: float | None = None
    #: A fan-out queue's batch: output name -> (results, dead letters); ``results`` and
    #: ``dead`` are then empty (lrq.outputs).
    outputs: dict[str, tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]] | None = None


class StoreBehind:
    """Commits on a second thread, one at a time, while the worker handles the next batch.

    :meth:`submit` queues a handled batch; :meth:`start` begins its commit once the commit in
    flight has ended. A commit's error is kept and raised by :meth:`raise_error`,
    :meth:`wait` or :meth:`close`, in the worker's thread, where it cannot be mistaken for the
    failure of the batch then in hand. Each wait is as long as one commit, which the
    database's own timeouts bound.

    One committer thread for the run, started with the first commit and ended by
    :meth:`close`, handed each batch through two plain locks: ``_go`` released by the worker
    when ``_job`` is set, ``_done`` by the committer when the commit has ended. A
    ``ThreadPoolExecutor`` did the same with a ``Future``, a work queue, condition variables
    and an idle semaphore per commit: the handoff's CPU went 85 -> 52 µs a batch at batch
    100 (bench/README.md, "Worker CPU per batch, second pass")."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._name = f"lrq-commit-{worker.queue.name}"
        self._thread: threading.Thread | None = None
        #: Held until the worker hands the committer a job (or None: end the thread).
        self._go = threading.Lock()
        self._go.acquire()
        #: Held while a commit runs; released by the committer when it has ended.
        self._done = threading.Lock()
        self._done.acquire()
        self._job: Handled | None = None
        #: The error of the commit that ended last, set by the committer before ``_done``.
        self._outcome: BaseException | None = None
        self._inflight = False
        self._queued: Handled | None = None
        self._error: BaseException | None = None

    def submit(self, handled: Handled) -> None:
        """Queue ``handled`` for the next :meth:`start`, starting the one queued before it
        (a batch that ended before its handler ran did not start it)."""
        self.start()
        self._queued = handled

    def start(self) -> None:
        """Start the queued commit, after the commit in flight has ended; unless that commit
        failed with :class:`HandlerBroken` (the run ends with it): the queued batch
        is then released uncounted, not committed, so a broken handler fails one batch."""
        if self._queued is None:
            return
        self._settle()
        if isinstance(self._error, HandlerBroken):
            self._worker.release_handled(self._queued, type(self._error).__name__)
            self._queued = None
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._job, self._queued = self._queued, None
        self._inflight = True
        self._go.release()

    def _run(self) -> None:
        """The committer thread: commit each job handed over, until handed None."""
        while True:
            self._go.acquire()
            job, self._job = self._job, None
            if job is None:
                return
            try:
                self._worker.commit(job)
            except BaseException as e:  # noqa: BLE001 (handed to the worker's thread)
                self._outcome = e
            self._done.release()

    def _settle(self) -> None:
        """Wait for the commit in flight; keep its error, or log it if one is already kept."""
        if not self._inflight:
            return
        self._done.acquire()
        self._inflight = False
        error, self._outcome = self._outcome, None
        if error is None:
            return
        if self._error is None:
            self._error = error
        else:
            log.error("commit failed queue=%s while an earlier commit's error was pending: "
                      "%s: %s", self._worker.queue.name, type(error).__name__, error)

    def raise_error(self) -> None:
        """Raise the error of a commit that has ended, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def raise_fatal(self) -> None:
        """Raise a kept :class:`HandlerBroken` now, before another batch is picked."""
        if isinstance(self._error, HandlerBroken):
            self.raise_error()

    def wait(self) -> None:
        """Start the queued commit and wait for every commit; raise the first error."""
        self.start()
        self._settle()
        self.raise_error()

    def close(self) -> None:
        """Wait for every commit (raising the first error), then end the committer thread."""
        try:
            self.wait()
        finally:
            self._settle()  # wait() may have raised before the last commit ended
            thread, self._thread = self._thread, None
            if thread is not None:
                self._job = None
                self._go.release()
                thread.join()
