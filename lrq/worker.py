"""The worker: claim a pending batch, run the handler over it in chunks, store, mark done.

What can go wrong, and what the worker does:

* **The handler fails**: :mod:`lrq.policy` decides (chunks, tries, splits, timeouts, the
  result check): item errors split the call at once and dead-letter the bad items alone, no
  wait; infrastructure errors and timeouts are retried with backoff first.
* **Infrastructure fails** (database unreachable, service timeout, connection refused, HTTP
  5xx/429, disk full, or the handler raises :class:`~lrq.errors.Retryable`): the items are
  not at fault, unless the service answers the rest of the batch (the policy then
  dead-letters the one item it fails on, see :mod:`lrq.policy`).
  The claim is released without counting an attempt and the worker backs off. The backstop:
  the release is noted in the batch's attempt history with the ledger's count of done
  batches, and the ``RELEASES_PER_ATTEMPT``-th uncounted release in a row that came while
  other batches got done counts an attempt (:meth:`Worker._released_too_often`), so a batch
  that meets an infrastructure error while the rest flows ends in ``failed/`` after
  ``RELEASES_PER_ATTEMPT × max_attempts`` such releases instead of looping forever. An
  outage, where nothing gets done, counts nothing (DESIGN invariant 5).
* **The database refuses a result row** (NOT NULL, CHECK, too long, foreign key): the sink
  dead-letters that row with the database's message and stores the rest (see
  :mod:`lrq.sink`). **It refuses the statement** whatever the rows (a missing table or
  column, a privilege): the attempt counts, and after ``max_attempts`` the batch moves to
  ``failed/`` with the message (:meth:`Worker._attempt_failed`).
* **Commits keep failing without progress**: :meth:`Worker.run` backs off, doubling, and
  gives up after ``INFRA_TRIES``; only a batch that settles resets the count (see there).
* **The handler is broken** (every item fails the same way, or calls hang, or the database
  refuses every result of a batch the same way): :class:`~lrq.errors.HandlerBroken`. The
  batch moves to ``failed/`` with the error, nothing is dead-lettered, one
  ``handler-broken`` line is logged at ERROR, and the run ends with it
  (``lrq work`` exits 4; the scheduler pauses the queue, ``run --until-idle`` stops).
  Storing behind, a batch handled while that commit ran is released uncounted, not
  committed (:meth:`StoreBehind.start`).
* **A handler call will not stop** (it caught the soft timeout and went on): the heartbeat
  thread, the batch's watchdog, logs ``batch-overrun`` and ends the process once the call is
  ``overrun_after(handler_timeout)`` old (see :mod:`lrq.policy`); the reaper takes the
  claim back.
* **The lease is lost** (the reaper took the claim back): the worker does not commit.
* **The batch was signed with a key the config no longer has** (:class:`~lrq.errors.KeyMismatch`):
  the claim is released uncounted, nothing is quarantined, and the run stops with the error.
* **SIGTERM/SIGINT**: see :meth:`Worker.abandon`.
* **The queue is paused** (``lrq pause``, :mod:`lrq.control`): looked at before each claim
  attempt (one ``faccessat``, ~2 µs); nothing new is claimed, the batch in hand and the commit in flight
  finish, and the run idles as if nothing were pending (``--burst`` ends, ``--idle-exit``
  counts down, a resume rings the doorbell).

:meth:`Worker.run` *stores behind* (``pipeline``, on by default): a batch's results are
committed by a second thread while the handler starts on the next batch, so a slow service
does not wait for the database, nor the database for it. Each batch keeps its own claim and
heartbeat until its commit ends; at most one commit is in flight, and the handler still runs
in the main thread only.

Log lines start with a stable event name (``claimed``, ``done``, ``finalized``, ``failed``,
``quarantined``, ``dead-lettered``, ``released``, ``lease-lost``, ``backoff``, ``progress``,
``handler-broken``, ``batch-overrun``; ``paused`` and ``resumed`` from :mod:`lrq.control`)
followed by ``key=value`` fields (``--log-format json`` parses them, :mod:`lrq.logjson`).
``claimed`` is at DEBUG (``-v`` shows it): at INFO it would double the lines per batch, and a
line a worker process writes (its stderr and the log file) costs 65-95 µs of CPU as text and
120-190 µs as JSON, against 0.5-1 µs for a disabled DEBUG call and ~220-290 µs for the pick
and release it would report (``bench/control_cost.py``, 2-core VM shared with other jobs);
``done`` names the batch anyway.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from lrq import failpoints
from lrq.config import QueueConfig
from lrq.control import Watch
from lrq.errors import (
    BatchCorrupt,
    BatchUnsigned,
    ClaimLost,
    DatabaseUnreachable,
    HandlerBroken,
    HandlerError,
    KeyMismatch,
    Retryable,
    SinkError,
)
from lrq.pipeline import Handled, Heartbeat, StoreBehind
from lrq.policy import (
    MAX_BACKOFF,
    MESSAGE_CHARS,
    Handler,
    HandlerPolicy,
    Item,
    is_infrastructure,
    soft_timeout,
)
from lrq.sink import Sink
from lrq.spool import Claim, Spool

__all__ = ["Worker", "Heartbeat", "StoreBehind", "RunStats", "is_infrastructure",
           "soft_timeout", "reach"]

log = logging.getLogger(__name__)

PROGRESS_EVERY = 5.0  # seconds between progress lines on long runs
INFRA_TRIES = 6  # consecutive infrastructure failures before a run gives up
#: Uncounted releases of one batch in a row (infrastructure failed) that count an attempt.
RELEASES_PER_ATTEMPT = 10


def reach(open_sink: Callable[[], Sink], queue: QueueConfig, stop: threading.Event) -> Sink:
    """``open_sink()`` with a run's backoff on :class:`~lrq.errors.DatabaseUnreachable`: a
    worker process the scheduler starts while the results database restarts waits for it as
    a running worker would (``INFRA_TRIES`` tries, the wait doubling from the queue's
    ``backoff``), instead of exiting at once into the scheduler's restart pauses. Raises the
    last error once the tries are spent or ``stop`` is set."""
    for failures in range(1, INFRA_TRIES + 1):
        try:
            return open_sink()
        except DatabaseUnreachable as e:
            if failures >= INFRA_TRIES or stop.is_set():
                raise
            back_off(queue, failures, f"{type(e).__name__}: {e}", stop)  # as a run logs it
    raise AssertionError("unreachable")  # the loop returns or raises


def back_off(queue: QueueConfig, failures: int, error: object, stop: threading.Event) -> None:
    """Wait ``queue.backoff × 2^failures`` seconds (at most ``MAX_BACKOFF``), or until
    ``stop``, after logging the wait."""
    wait = min(queue.backoff * 2 ** failures, MAX_BACKOFF)
    log.warning("backoff queue=%s seconds=%.1f error=%s", queue.name, wait, error)
    stop.wait(wait)


@dataclass
class RunStats:
    batches: int = 0
    items: int = 0
    failed: int = 0
    dead: int = 0
    infra_errors: int = 0
    #: Commits the database refused as a statement (not a row): released with the attempt
    #: counted, or moved to ``failed/`` at ``max_attempts`` (then also in ``failed``).
    refused: int = 0
    #: Batches found already in the ledger and only marked done.
    finalized: int = 0
    #: The run ended on ``INFRA_TRIES`` failures in a row without progress (the database or
    #: a service stayed down): work is left, so ``lrq work`` exits non-zero. Infrastructure
    #: errors the run recovered from are counted in ``infra_errors`` only.
    gave_up: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    @property
    def settled(self) -> int:
        """Batches this run brought to an end (done, finalized, failed or quarantined): the
        progress that tells a run's failures apart from a database that is down."""
        return self.batches + self.finalized + self.failed


class Worker:
    def __init__(self, queue: QueueConfig, spool: Spool, sink: Sink,
                 handler: Handler | Mapping[str, Handler], *,
                 stop: threading.Event | None = None,
                 sleep: Callable[[float], Any] | None = None,
                 pause: Watch | None = None) -> None:
        """``handler``: the queue's handler, or (a queue with ``outputs``) each output's by
        name."""
        self.queue = queue
        #: The queue's pause (:mod:`lrq.control`): looked at before each claim attempt.
        self.pause = pause
        self.spool = spool
        self.sink = sink
        self.stop = stop or threading.Event()
        #: Chunks, tries, splits, timeouts, result checks (see :mod:`lrq.policy`): one per
        #: output of a fan-out queue (:mod:`lrq.outputs`), in the config's order.
        self.policies: dict[str, HandlerPolicy] = {}
        if queue.fanout:
            handlers = handler if isinstance(handler, Mapping) else {}
            for o in queue.plan():
                if o.name not in handlers:
                    raise ValueError(f"queue {queue.name}: no handler for output {o.name!r}")
                out = sink.outputs[o.name]
                self.policies[o.name] = HandlerPolicy(
                    queue.for_output(o), handlers[o.name], sleep=sleep or time.sleep,
                    columns=out.columns, output=o.name,
                    aggregate_key=(o.key or queue.key) if o.aggregate else None)
            self.policy = next(iter(self.policies.values()))
        else:
            assert callable(handler), "a queue without outputs has one handler"
            self.policy = HandlerPolicy(queue, handler, sleep=sleep or time.sleep,
                                        columns=sink.columns)
            self.policies[""] = self.policy
        self.stats = RunStats()
        #: Holds every claim of a batch being handled or committed (see :meth:`abandon`), and
        #: ends the process if a handler call will not stop.
        self.heartbeat = Heartbeat(spool, queue.lease / 4, watch=self._overrun)
        self._lock = threading.Lock()  # stats: the committer thread updates them too

    def _overrun(self) -> str | None:
        """The watchdog's question (:meth:`HandlerPolicy.overrun`), of every output's policy."""
        for policy in self.policies.values():
            why = policy.overrun()
            if why is not None:
                return why
        return None

    # -- one batch -----------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and process one batch (its commit included); False when nothing is pending."""
        return self._step(None)

    def paused(self) -> bool:
        """Is the queue paused (:mod:`lrq.control`)? One ``faccessat``."""
        return self.pause is not None and self.pause.paused() is not None

    def run_named(self, name: str) -> bool:
        """Process one named batch; False when it is not pending (claimed, done or absent).
        A paused queue does not stop it: an operator asked for this batch."""
        claim = self.spool.claim(name)
        if claim is None:
            return False
        self.process(claim)
        return True

    def process(self, claim: Claim) -> None:
        """Process a claimed batch. Raises :class:`Retryable` after releasing the claim when
        infrastructure failed, and :class:`~lrq.errors.StatementRefused` after counting the
        attempt (released, or in ``failed/`` at ``max_attempts``) when the database refused
        the commit's statement; every other outcome ends with the batch done, failed or
        quarantined."""
        handled = self.handle_claim(claim)
        if handled is not None:
            self.commit(handled)

    def handle_claim(self, claim: Claim, behind: StoreBehind | None = None) -> Handled | None:
        """Load a claimed batch and run the handler over it; None when the batch ended here
        (failed, quarantined, released or found committed), else what :meth:`commit` needs.
        The claim's heartbeat runs until the commit ends. ``behind``'s queued commit is
        started as the handler starts."""
        lost = self.heartbeat.hold(claim)
        handled = None
        try:
            with self._guard(claim):
                handled = self._handle_claim(claim, lost, behind)
        finally:
            if handled is None:
                self._let_go(claim)
        if handled is not None and not lost.is_set():
            self.spool.mark_handled(claim)  # a death from here on is not its items' doing
        return handled

    def commit(self, handled: Handled) -> None:
        """Store a handled batch's results and mark it done (or failed: results the sink
        cannot take). Raises like :meth:`process`."""
        try:
            with self._guard(handled.claim):
                self._commit(handled)
        finally:
            self._let_go(handled.claim)

    @contextlib.contextmanager
    def _guard(self, claim: Claim) -> Iterator[None]:
        """A lost claim is logged (nothing is committed); infrastructure failures release the
        claim uncounted and raise :class:`Retryable`."""
        try:
            yield
        except ClaimLost:
            log.warning("lease-lost queue=%s batch=%s: another worker may take it; not committing",
                        self.queue.name, claim.name)
        except Exception as e:
            if not is_infrastructure(e):
                raise
            reason = f"{type(e).__name__}: {e}"
            progress = self._done_so_far()
            if self.spool.note_release(claim, reason[:MESSAGE_CHARS],
                                       progress) >= RELEASES_PER_ATTEMPT:
                self._released_too_often(claim, reason)
            else:
                self.spool.release(claim)
                log.warning("released queue=%s batch=%s reason=%s", self.queue.name,
                            claim.name, reason)
            raise e if isinstance(e, Retryable) else Retryable(reason) from e

    def _done_so_far(self) -> int | None:
        """Batches of this queue in the ledger, for the release backstop; None when the
        database cannot say (it is what failed, most likely)."""
        try:
            return self.sink.ledger_stats()[0]
        except (SinkError, SQLAlchemyError):
            return None

    def _released_too_often(self, claim: Claim, reason: str) -> None:
        """The backstop: a batch released uncounted ``RELEASES_PER_ATTEMPT`` times in a row
        counts an attempt, so it ends in ``failed/`` after ``max_attempts`` of those instead
        of being released forever."""
        why = (f"released {RELEASES_PER_ATTEMPT} times in a row for infrastructure errors "
               "while other batches got done; "
               f"the last: {reason}")
        if claim.attempt >= self.queue.max_attempts:
            self._fail(claim, f"gave up after {claim.attempt} attempts (max_attempts): {why}")
            return
        self.spool.give_back(claim, why[:MESSAGE_CHARS])
        log.error("released queue=%s batch=%s attempt=%d of %d reason=%s", self.queue.name,
                  claim.name, claim.attempt, self.queue.max_attempts, why)

    def _let_go(self, claim: Claim) -> None:
        self.heartbeat.drop(claim)

    def release_handled(self, handled: Handled, reason: str) -> None:
        """Give a handled batch back uncounted, uncommitted (the run ends before its commit)."""
        if self.spool.release(handled.claim):
            log.warning("released queue=%s batch=%s reason=%s", self.queue.name,
                        handled.claim.name, reason)
        self._let_go(handled.claim)

    def _handle_claim(self, claim: Claim, lost: threading.Event,
                      behind: StoreBehind | None) -> Handled | None:
        q = self.queue.name
        if claim.attempt > 1 and self.sink.is_recorded(claim.name):
            # Killed after the commit, before the marker (the reaper counted an attempt):
            # the ledger says done. On a first attempt this check is skipped (it was 5% of a
            # batch); a batch released uncounted after its commit is caught by store() instead.
            self._finalize(claim)
            return None
        t0 = time.monotonic()
        try:
            batch = self.spool.load(claim.name)
        except KeyMismatch:
            self.spool.release(claim)  # the key is wrong, not the file: uncounted, kept
            raise
        except BatchUnsigned as e:
            self.spool.quarantine_batch(claim, str(e))
            self._count(failed=1)
            log.error("quarantined queue=%s batch=%s error=%s", q, claim.name, e)
            return None
        except BatchCorrupt as e:
            self._fail(claim, str(e), e)
            return None
        except FileNotFoundError:
            self.spool.release(claim)
            log.warning("released queue=%s batch=%s reason=file-vanished", q, claim.name)
            return None
        problem = self._bad_keys(batch.items)
        if problem:
            self._fail(claim, problem)
            return None
        if behind is not None:
            # The previous batch's commit starts as the handler does: beside a pick or a
            # load the two contend for the GIL (either took ~2 ms longer), while a handler
            # waiting on a service leaves it free.
            behind.start()
        t_handle = time.monotonic()
        per: dict[str, tuple[list[Item], list[tuple[Item, str]]]] | None = None
        results: list[Item] = []
        dead: list[tuple[Item, str]] = []
        try:
            if self.queue.fanout:
                per = self.handle_outputs(batch.items, retry=batch.replace_dead)
            else:
                results, dead = self.handle(batch.items)
        except HandlerBroken as e:
            self._broken(claim, e)
            raise
        return Handled(claim, lost, len(batch.items), results, dead, t0, batch.replace_dead,
                       batch.items, seconds=time.monotonic() - t_handle, outputs=per)

    def _bad_keys(self, items: list[Item]) -> str | None:
        """Why the batch's keys cannot identify its items, or None. Keys are compared as the
        sink stores them (strings). Items sharing a key would collapse into one result row
        (the insert ignores a second row with the same key), so the batch fails instead."""
        key = self.queue.key
        try:
            keys = {str(it[key]) for it in items}  # one pass when every item has its key
        except KeyError:
            keyless = sum(1 for it in items if key not in it)
            return (f"{keyless} of {len(items)} items have no {key!r} field (the queue's key); "
                    "fix `key` or the source columns")
        if len(keys) < len(items):
            return (f"{len(items) - len(keys)} of {len(items)} items repeat another item's "
                    f"{key!r} ({len(keys)} distinct); key must be unique per item: set `key` to "
                    "a unique field (see `lrq verify`)")
        return None

    def _broken(self, claim: Claim, e: HandlerBroken) -> None:
        """Fail the batch, nothing dead-lettered, and say so once; the run then ends."""
        self.spool.fail(claim, f"{e}\n\nfirst failure:\n{e.detail}")
        self._count(failed=1)
        log.error("handler-broken queue=%s batch=%s: %s; the batch is in failed/, nothing "
                  "was dead-lettered; fix the handler or its service, then `lrq requeue "
                  "--failed`", self.queue.name, claim.name, e)

    def _commit(self, h: Handled) -> None:
        claim = h.claim
        if h.lost.is_set() or not self.spool.owns(claim):
            raise ClaimLost(claim.name)
        try:
            if h.outputs is not None:
                stored = self.sink.store_outputs(claim.name, h.items, h.outputs, claim.attempt,
                                                 inputs=h.inputs, replace_dead=h.replace_dead,
                                                 seconds=h.seconds)
            else:
                stored = self.sink.store(claim.name, h.items, h.results, claim.attempt,
                                         dead=h.dead, inputs=h.inputs,
                                         replace_dead=h.replace_dead, seconds=h.seconds)
        except HandlerBroken as e:  # the database refused every result alike
            self._broken(claim, e)
            raise
        except HandlerError as e:  # results the sink cannot take: the handler's fault
            self._fail(claim, str(e), e)
            return
        except SinkError as e:
            if not is_infrastructure(e):
                self._attempt_failed(claim, e)
            raise
        failpoints.hit("after-commit")
        if not stored.recorded:  # committed by an earlier attempt: only the marker was missing
            self._finalize(claim)
            return
        self.spool.mark_done(claim)
        self._count(batches=1, items=h.items, dead=stored.dead)
        log.info("done queue=%s batch=%s items=%d stored=%d dead=%d seconds=%.3f",
                 self.queue.name, claim.name, h.items, stored.results, stored.dead,
                 time.monotonic() - h.started)

    def _attempt_failed(self, claim: Claim, e: SinkError) -> None:
        """The database refused the commit's statement (a schema or configuration problem, not
        one row): the attempt counts, so a batch that keeps failing ends in ``failed/`` after
        ``max_attempts`` with the database's message instead of being released forever."""
        self._count(refused=1)
        limit = self.queue.max_attempts
        if claim.attempt >= limit:
            self._fail(claim, f"gave up after {claim.attempt} attempts (max_attempts); "
                       f"the last: {e}", e)
            return
        self.spool.give_back(claim, f"{type(e).__name__}: {e}")
        log.error("released queue=%s batch=%s attempt=%d of %d reason=%s: %s",
                  self.queue.name, claim.name, claim.attempt, limit, type(e).__name__, e)

    def _count(self, **add: int) -> None:
        with self._lock:
            for k, n in add.items():
                setattr(self.stats, k, getattr(self.stats, k) + n)

    def _finalize(self, claim: Claim) -> None:
        """Mark done a batch the ledger already holds (its committer died before the marker)."""
        self.spool.mark_done(claim)
        self._count(finalized=1)
        log.info("finalized queue=%s batch=%s", self.queue.name, claim.name)

    def _fail(self, claim: Claim, message: str, exc: BaseException | None = None) -> None:
        detail = "".join(traceback.format_exception(exc)) if exc is not None else ""
        self.spool.fail(claim, f"{message}\n\n{detail}")
        self._count(failed=1)
        log.error("failed queue=%s batch=%s error=%s (details: lrq show %s)",
                  self.queue.name, claim.name, message, claim.name)

    # -- the handler ---------------------------------------------------------------------
    @property
    def handler(self) -> Handler:
        return self.policy.handler

    @handler.setter
    def handler(self, handler: Handler) -> None:
        self.policy.handler = handler

    @property
    def sleep(self) -> Callable[[float], Any]:
        return self.policy.sleep

    @sleep.setter
    def sleep(self, sleep: Callable[[float], Any]) -> None:
        for policy in self.policies.values():
            policy.sleep = sleep

    def handle(self, items: list[Item]) -> tuple[list[Item], list[tuple[Item, str]]]:
        """Run the handler over ``items`` (see :class:`~lrq.policy.HandlerPolicy`); return
        (results, dead letters)."""
        return self.policy.run(items)

    def handle_outputs(self, items: list[Item], retry: bool = False
                       ) -> dict[str, tuple[list[Item], list[tuple[Item, str]]]]:
        """A fan-out queue's :meth:`handle`: each output's handler over ``items``, in the
        config's order; output name -> (results, dead letters). An item one output fails on
        is dead for that output only. ``retry`` (a ``lrq retry-dead`` batch): each output
        gets only the items dead-lettered in it."""
        if not retry:
            return {name: policy.run(items) for name, policy in self.policies.items()}
        from lrq.outputs import dead_in

        key = self.queue.key
        dead = dead_in(self.sink, [str(it[key]) for it in items])
        return {name: policy.run([it for it in items if str(it[key]) in dead.get(name, ())])
                for name, policy in self.policies.items()}

    # -- stopping ------------------------------------------------------------------------
    def abandon(self) -> bool:
        """Give the batches in hand back without counting an attempt (shutdown past the grace
        period). Safe against a commit racing it: the ledger decides, a later claimer only
        finalizes."""
        released = False
        for claim in self.heartbeat.claims():
            if self.spool.release(claim):
                released = True
                log.warning("released queue=%s batch=%s reason=shutdown", self.queue.name,
                            claim.name)
        return released

    # -- many batches --------------------------------------------------------------------
    def run(self, *, burst: bool = True, max_batches: int | None = None,
            max_seconds: float | None = None, idle_wait: float = 1.0,
            idle_exit: float | None = None, progress: bool = False) -> RunStats:
        """Process batches until none is pending (``burst``) or none came for ``idle_exit``
        seconds, a limit is hit, ``stop`` is set, or commits keep failing without progress
        (``INFRA_TRIES`` times, with a backoff that doubles each time).

        *Progress* is a batch brought to an end (:attr:`RunStats.settled`), not a handler
        call that succeeded: storing behind, a commit's error surfaces a step after the next
        batch was handled, so counting a handled batch as progress would reset the count
        before every error and never let the backoff grow. A refused statement
        (:class:`~lrq.errors.StatementRefused`) backs off like an unreachable database, and
        its batch also counts an attempt (see :meth:`_attempt_failed`). Idle, it waits for a
        publish to ring the queue's doorbell (:mod:`lrq.spool.wake`), ``idle_wait`` at most.
        """
        self.stats = RunStats()
        next_report = time.monotonic() + PROGRESS_EVERY
        failures = 0
        settled = 0
        idle_since: float | None = None
        # Storing behind would let a run overshoot max_batches by the batch in flight.
        behind = StoreBehind(self) if self.queue.pipeline and max_batches is None else None
        # The start-up heap (~44k objects) is kept out of full collections for the run: each
        # rescanned it, ~17 ms every ~50 batches at batch 1000. Given back at the end.
        gc.freeze()
        if not burst:
            self.spool.bell.listen()  # before the first pick: no ring after it is missed
        try:
            while not self.stop.is_set():
                if max_batches is not None and self.stats.batches + self.stats.failed >= max_batches:
                    break
                if max_seconds is not None and self.stats.seconds >= max_seconds:
                    break
                try:
                    worked = self._step(behind)
                except Exception as e:
                    if not _backs_off(e):
                        raise
                    if self.stats.settled != settled:
                        failures, settled = 0, self.stats.settled
                    failures += 1
                    if is_infrastructure(e):
                        self._count(infra_errors=1)
                    if failures >= INFRA_TRIES:
                        log.error("giving up queue=%s after %d failures without progress: %s",
                                  self.queue.name, failures, e)
                        self.stats.gave_up = True
                        break
                    back_off(self.queue, failures, e, self.stop)
                    continue
                if self.stats.settled != settled or not worked:
                    failures, settled = 0, self.stats.settled
                if worked:
                    idle_since = None
                else:
                    if burst:
                        break
                    idle_since = idle_since or time.monotonic()
                    if idle_exit is not None and time.monotonic() - idle_since >= idle_exit:
                        break
                    self.spool.bell.wait(idle_wait, self.stop)  # or a publish rings
                if progress and time.monotonic() >= next_report:
                    next_report = time.monotonic() + PROGRESS_EVERY
                    log.info("progress queue=%s batches=%d items=%d dead=%d rate=%.0f/s "
                             "pending=%d", self.queue.name, self.stats.batches, self.stats.items,
                             self.stats.dead, self.stats.rate, len(self.spool.pending()))
        finally:
            try:
                if behind is not None:
                    self._drain(behind)
            finally:
                gc.unfreeze()
                self.spool.bell.close()
        return self.stats

    def _step(self, behind: StoreBehind | None) -> bool:
        """One batch: claim it, run the handler, commit it or hand the commit to ``behind``.
        False when nothing is pending (and no commit is in flight)."""
        try:
            if behind is not None:
                behind.raise_fatal()
            if self.paused():
                if behind is not None:
                    behind.wait()  # the batch in hand is finished, its error this step's
                return False
            claim = self.spool.pick(self.queue.order)
            if claim is None:
                if behind is not None:
                    behind.wait()  # its error, if any, is this step's
                return False
            log.debug("claimed queue=%s batch=%s attempt=%d", self.queue.name, claim.name,
                      claim.attempt)
            handled = self.handle_claim(claim, behind)
            if behind is None:
                if handled is not None:
                    self.commit(handled)
                return True
            if handled is not None:
                behind.submit(handled)
            behind.raise_error()  # the previous commit's, once this batch is queued
            return True
        finally:
            if behind is not None:
                behind.start()  # a batch queued before this step failed is not held back

    def _drain(self, behind: StoreBehind) -> None:
        """Wait for the last commit; an infrastructure failure or a refused statement there is
        counted (its batch was released, or failed), anything else raised."""
        try:
            behind.close()
        except Exception as e:
            if not _backs_off(e):
                raise
            if is_infrastructure(e):
                self._count(infra_errors=1)
            log.warning("backoff queue=%s seconds=0.0 error=%s", self.queue.name, e)


def _backs_off(e: BaseException) -> bool:
    """Does ``e`` make :meth:`Worker.run` wait and try again (infrastructure, or a statement
    the database refused, whose batch has counted an attempt) rather than end the run?"""
    return is_infrastructure(e) or isinstance(e, SinkError)
