"""The handler policy: how one batch's items go through the user's handler.

:meth:`HandlerPolicy.run` cuts a batch into chunks of ``chunk_size`` and calls the handler on
each; a failing call is classified, and only *transient* causes wait:

* **Item errors** (any exception that is not one of the two below, or results that fail the
  check): the call is split in halves *at once*, no wait. Both halves are called before
  either is split further. A lone item gets ``1 + retries`` immediate tries, then is
  dead-lettered with its error. k bad items cost O(k · log chunk) extra calls, no sleep.
* **Transient** (infrastructure, see :func:`is_infrastructure`, or
  :class:`~lrq.errors.Retryable`): transient until shown otherwise. A chunk's call is
  tried again after ``backoff * 2**n`` seconds (at most ``MAX_BACKOFF``), ``retries``
  times; then it is split like an item error, one try per part, no more waits. A lone
  item failing so is dead-lettered with its error only if some call of this batch
  succeeded (the service is up, this item makes it fail); when nothing of the batch
  succeeded (both halves of the first split failed too) or a probe (below) fails so, the
  error is raised and the worker releases the claim without counting an attempt: the
  service is down. One item that always makes the service answer 500 thus costs its
  chunk's waits and about ``2·log2(chunk_size)`` calls, instead of the batch being
  released forever.
* **Timeouts** (:class:`~lrq.errors.HandlerTimeout`: a call ran past ``handler_timeout``):
  transient until shown otherwise. A chunk's call is retried with backoff, ``retries``
  times; then it is split like an item error, with one try per part and per lone item.

``retries`` thus stays "extra tries of a failing call": with waits for transient causes,
without for item errors, and for item errors only on a lone item.

**Broken handler.** A handler that fails on everything is not a batch of bad items. The
policy *suspects* it when, since the last successful call of the batch, ``BROKEN_AFTER``
isolated items failed with the same error (exception type and first line of its message),
or ``HUNG_AFTER`` calls on disjoint items timed out. It then *probes* one item elsewhere in
the batch (not dead-lettered, away from the suspects): if the probe fails the same way, the
policy raises :class:`~lrq.errors.HandlerBroken` and nothing of the batch is dead-lettered;
if it succeeds, the bisection goes on (the probe's result is dropped: the item is handled
again in its place). Three poison items side by side with the same message are therefore
not mistaken for a broken handler, unless the probe is a fourth. Cost to the verdict, with
``c = chunk_size``, ``r = retries``, ``T = handler_timeout``, ``b = backoff``:

* a handler raising on everything: about ``2·log2(c) + 4·(1 + r)`` calls, no sleep;
* a hung service: ``(1 + r) + 2 + 1`` calls of ``T`` each, plus ``b·(2**r - 1)`` of
  backoff: 6 × 300 s + 1.5 s ≈ 30 min with the defaults, 6.5 s with ``T = 1``.

**Results with a field the model lacks** (a queue with ``model``): each call's results are
checked against the model's columns (``columns``, from the sink; one set difference over
the union of their keys, ~40 µs per 1,000 results of 5 fields), so such a result is an item
error, dead-lettered alone, instead of failing its whole batch at commit.

**Items the handler changes.** Keys are read before a call and results are checked against
them; the handler gets shallow copies of the items (``dict(item)``), so popping or setting a
field changes neither the check nor the dead letter, which stores the original item. Nested
values are shared: a handler that changes them in place changes the stored dead letter.

**Watchdog.** A call is interrupted at ``T`` (SIGALRM, main thread only: the handler of
:func:`alarm_handler` installed once per batch, the timer armed per call). A
handler that catches the interrupt and goes on would hold its lease forever, so while a
call runs, :attr:`HandlerPolicy.deadline` is ``start + overrun_after(T)``, where
``overrun_after(T) = T + max(5 s, T / 10)``; the worker's heartbeat thread checks it
(:meth:`HandlerPolicy.overrun`) and ends the process past it. Every call is thus bounded,
the number of calls and waits is bounded by the rules above, and so is the whole batch.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from lrq.config import QueueConfig
from lrq.db import Fault, fault
from lrq.errors import DatabaseUnreachable, HandlerBroken, HandlerError, HandlerTimeout, Retryable, SinkError

log = logging.getLogger(__name__)

Item = dict[str, Any]
Handler = Callable[[list[Item]], list[Item]]
Dead = tuple[Item, str]

MAX_BACKOFF = 60.0  # seconds, the longest wait between tries
BROKEN_AFTER = 3  # isolated items failing alike, nothing succeeding between: suspect
HUNG_AFTER = 2  # calls on disjoint items timing out, nothing succeeding between: suspect
OVERRUN_GRACE = 5.0  # seconds, at least, a call gets past handler_timeout to unwind
MESSAGE_CHARS = 2000  # of an exception's message kept in a dead letter (a response body...)
TRACE_CHARS = 4000  # of its traceback
#: The most of an error text a dead letter keeps: 4 bytes a character stay within MariaDB's
#: TEXT (65,535 bytes), which refuses a longer one, and the whole batch with it.
ERROR_CHARS = 12_000


def clip(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its head and tail with the cut
    between them said."""
    if len(text) <= limit:
        return text
    cut = f"\n[... {len(text) - limit} characters cut ...]\n"
    keep = max(limit - len(cut), 0)
    return text[:keep // 2] + cut + text[len(text) - (keep - keep // 2):]


def is_infrastructure(exc: BaseException) -> bool:
    """Is ``exc`` (or anything in its ``__cause__`` chain) a failure of something other than
    the items: a database, a network, a service that is down or overloaded?

    A database error is infrastructure only when :func:`lrq.db.fault` reads it as the
    database being unreachable: a row or a statement it refuses would fail the same way on
    every retry, so it is not waited out. A :class:`SinkError` is the sink's verdict: only
    :class:`DatabaseUnreachable` is infrastructure, whatever error lies beneath it."""
    import requests
    from urllib3 import exceptions as u3

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, SinkError):  # the sink's verdict on the error beneath it
            return isinstance(e, DatabaseUnreachable)
        if isinstance(e, SQLAlchemyError) and fault(e) is Fault.UNREACHABLE:
            return True
        if isinstance(e, (Retryable, ConnectionError, TimeoutError,
                          requests.ConnectionError, requests.Timeout,
                          requests.exceptions.RetryError, u3.MaxRetryError, u3.ProtocolError,
                          u3.TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True  # disk full: wait for cleanup, the items are fine
        if isinstance(e, requests.HTTPError) and e.response is not None and (
                e.response.status_code >= 500 or e.response.status_code == 429):
            return True
        e = e.__cause__  # explicit `raise ... from`, not whatever was being handled
    return False


def _is_timeout(exc: BaseException) -> bool:
    """The soft timeout, raised as is or wrapped (``raise ... from``) by the handler."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, HandlerTimeout):
            return True
        seen.add(id(e))
        e = e.__cause__
    return False


def _armed(seconds: float) -> bool:
    return seconds > 0 and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def alarm_handler(seconds: float) -> Iterator[bool]:
    """For the block, the SIGALRM handler that raises :class:`HandlerTimeout`; yields whether
    calls in it can be cut (the main thread, a positive ``seconds``). Each call arms the
    timer itself (``signal.setitimer``), so a batch of many calls installs and restores the
    handler once, not per call: the two ``signal.signal`` were 4 of a call's 7 µs."""
    if not _armed(seconds):
        yield False
        return

    def expired(_sig: int, _frame: Any) -> None:
        raise HandlerTimeout(f"handler call ran past handler_timeout ({seconds:g}s)")

    previous = signal.signal(signal.SIGALRM, expired)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def soft_timeout(seconds: float) -> Iterator[None]:
    """Raise :class:`HandlerTimeout` in the block after ``seconds`` (main thread only)."""
    with alarm_handler(seconds) as armed:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)


def overrun_after(handler_timeout: float) -> float:
    """Seconds after its start by which a call must have ended, the soft timeout included."""
    return handler_timeout + max(OVERRUN_GRACE, handler_timeout / 10)


def backoff_wait(backoff: float, n: int) -> float:
    """The wait before the ``n``-th retry (from 0): ``backoff * 2**n``, capped."""
    return min(backoff * 2 ** n, MAX_BACKOFF)


@dataclass(frozen=True)
class Failure:
    """How a call failed: the text a dead letter keeps, and what it is compared by."""

    error: str
    signature: str
    timeout: bool = False
    #: The exception of a transient (infrastructure) failure, raised if the service is down.
    transient: BaseException | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, exc: BaseException, timeout: bool = False,
           transient: bool = False) -> Failure:
        message = str(exc)
        # its head (the outer frames) and tail (the innermost and the message's end): a
        # message as long as a response body would fill a plain tail
        trace = clip("".join(traceback.format_exception(exc)), TRACE_CHARS)
        first = message.splitlines()[0][:MESSAGE_CHARS] if message else ""
        return cls(f"{type(exc).__name__}: {clip(message, MESSAGE_CHARS)}\n{trace}",
                   f"{type(exc).__name__}: {first}", timeout, exc if transient else None)

    def raise_if_down(self, b: _Batch) -> None:
        """A transient failure with no call of the batch succeeded: the service is down."""
        if self.transient is not None and not b.ok:
            raise self.transient


@dataclass
class _Batch:
    """One :meth:`HandlerPolicy.run`: its items, their keys (read before any call) and the
    evidence gathered for the broken-handler verdict since the last successful call."""

    items: list[Item]
    keys: list[Any]
    results: list[Item] = field(default_factory=list)
    dead: dict[int, Failure] = field(default_factory=dict)
    #: Isolated items failing alike since the last success: (index, failure).
    streak: list[tuple[int, Failure]] = field(default_factory=list)
    #: Item ranges whose call timed out since the last success.
    timeouts: list[tuple[int, int]] = field(default_factory=list)
    #: Some call of this batch succeeded (the service answers).
    ok: bool = False

    def succeeded(self) -> None:
        self.streak.clear()
        self.timeouts.clear()


class HandlerPolicy:
    """Chunking, tries, splitting, the soft timeout, the result check and the broken-handler
    verdict for one queue's handler; ``sleep`` and ``clock`` are injectable for tests."""

    def __init__(self, queue: QueueConfig, handler: Handler, *,
                 sleep: Callable[[float], Any] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 columns: frozenset[str] | None = None,
                 aggregate_key: str | None = None, output: str = "") -> None:
        self.queue = queue
        #: An aggregating output's row key (lrq.outputs): its handler returns any rows, each
        #: carrying this field, so the one-result-per-item check is skipped.
        self.aggregate_key = aggregate_key
        #: The output this policy runs the handler of ("": a queue without outputs).
        self.output = output
        #: The fields a result may have (the model's columns), None: any.
        self.columns = columns
        self.handler = handler
        self.sleep = sleep
        self.clock = clock
        #: While a call runs under an armed soft timeout: when it must have ended.
        self.deadline: float | None = None
        self._started = 0.0
        #: Whether calls are cut by SIGALRM: set for each batch by :meth:`run`.
        self._alarm = False

    # -- the batch -----------------------------------------------------------------------
    def run(self, items: list[Item]) -> tuple[list[Item], list[Dead]]:
        """Handle ``items``; return (results, dead letters). Raises what is transient
        (after its retries) and :class:`HandlerBroken`."""
        key = self.queue.key
        b = _Batch(items, [it[key] for it in items])
        size = self.queue.chunk_size
        with alarm_handler(self.queue.handler_timeout) as self._alarm:
            for lo in range(0, len(items), size):
                hi = min(lo + size, len(items))
                out = self._attempt(b, lo, hi, chunk=True)
                if isinstance(out, Failure):
                    self._isolate(b, lo, hi, out)
        dead = []
        for i in sorted(b.dead):
            f = b.dead[i]
            dead.append((items[i], f.error))
            if self.output:
                log.warning("dead-lettered queue=%s output=%s key=%s error=%s", self.queue.name,
                            self.output, b.keys[i], f.signature)
            else:
                log.warning("dead-lettered queue=%s key=%s error=%s", self.queue.name,
                            b.keys[i], f.signature)
        return b.results, dead

    def _isolate(self, b: _Batch, lo: int, hi: int, failure: Failure) -> None:
        """[lo, hi) failed with ``failure``: a lone item is dead; else call both halves, then
        isolate within each that failed."""
        if hi - lo == 1:
            failure.raise_if_down(b)
            self._dead(b, lo, failure)
            return
        mid = (lo + hi) // 2
        failed = []
        for a, z in ((lo, mid), (mid, hi)):
            out = self._attempt(b, a, z, chunk=False)
            if isinstance(out, Failure):
                failed.append((a, z, out))
        for _a, _z, f in failed:
            f.raise_if_down(b)
        for a, z, f in failed:
            self._isolate(b, a, z, f)

    def _dead(self, b: _Batch, i: int, failure: Failure) -> None:
        b.dead[i] = failure
        if b.streak and b.streak[-1][1].signature != failure.signature:
            b.streak.clear()
        b.streak.append((i, failure))
        if len(b.streak) >= BROKEN_AFTER:
            self._probe(b, failure, {j for j, _ in b.streak})

    # -- one call, with its tries ------------------------------------------------------------
    def _attempt(self, b: _Batch, lo: int, hi: int, *, chunk: bool,
                 probe: bool = False) -> list[Item] | Failure:
        """Call the handler on items [lo, hi) with the tries the rules give; the results
        (kept unless ``probe``) or how it failed."""
        waits = item_tries = 0
        while True:
            try:
                out = self._call(b, lo, hi)
            except Exception as e:  # noqa: BLE001 (every failure is classified below)
                if _is_timeout(e):
                    if chunk and waits < self.queue.retries:
                        self._wait(waits, e)
                        waits += 1
                        continue
                    failure = Failure.of(e, timeout=True)
                    if not probe:
                        self._timed_out(b, lo, hi, failure)
                    return failure
                if is_infrastructure(e):
                    if chunk and waits < self.queue.retries:
                        self._wait(waits, e)
                        waits += 1
                        continue
                    return Failure.of(e, transient=True)
                if hi - lo == 1 and item_tries < self.queue.retries:
                    item_tries += 1
                    continue
                return Failure.of(e)
            b.succeeded()
            b.ok = True
            if not probe:
                b.results.extend(out)
            return out

    def _wait(self, n: int, e: BaseException) -> None:
        seconds = backoff_wait(self.queue.backoff, n)
        log.info("retry queue=%s seconds=%.1f error=%s: %s", self.queue.name, seconds,
                 type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        self.sleep(seconds)

    def _call(self, b: _Batch, lo: int, hi: int) -> list[Item]:
        chunk = list(map(dict, b.items[lo:hi]))  # the handler may change its copies
        timeout = self.queue.handler_timeout
        armed = self._alarm  # the SIGALRM handler is installed for the batch (run)
        if armed:
            self._started = self.clock()
            self.deadline = self._started + overrun_after(timeout)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            out = self.handler(chunk)
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.deadline = None
        return self.check(b.keys[lo:hi], out)

    def check(self, keys: list[Any], results: Any) -> list[Item]:
        """``results`` if they are one dict per key, carrying it (any order), with no field
        but :attr:`columns` (when given); else raise :class:`HandlerError`, so the call is
        split and the item at fault dead-lettered alone, not its batch failed at commit."""
        key = self.queue.key
        # map() rather than generator expressions, and a list copy by map(dict): per item,
        # they took 0.7x the CPU (155 -> 110 µs at batch 1000, with the copy in _call).
        if not isinstance(results, list) or not all(map(isinstance, results, repeat(dict))):
            raise HandlerError(f"handler {self.queue.handler} must return a list of dicts, "
                               f"got {type(results).__name__}")
        if self.columns is not None and results:
            extra = set().union(*results) - self.columns
            if extra:
                raise HandlerError(f"results have fields {sorted(extra)} that model "
                                   f"{self.queue.model} has no columns for")
        if self.aggregate_key is not None:
            if any(r.get(self.aggregate_key) is None for r in results):
                raise HandlerError(f"handler {self.queue.handler} returned a row without its "
                                   f"key {self.aggregate_key!r} (an aggregating output's rows "
                                   "each carry their own key)")
            return results
        if len(results) == len(keys) and list(map(dict.get, results, repeat(key))) == keys:
            return results  # one result per item, in item order: the common case, no sort
        want = sorted(str(k) for k in keys)
        got = sorted(str(r.get(key)) for r in results)
        if got != want:
            raise HandlerError(f"handler {self.queue.handler} returned {len(results)} results "
                               f"for {len(keys)} items; each item needs one result carrying "
                               f"its {key!r}")
        return results

    # -- the broken-handler verdict ----------------------------------------------------------
    def _timed_out(self, b: _Batch, lo: int, hi: int, failure: Failure) -> None:
        # Ranges of one bisection nest or are disjoint; a disjoint pair is two places.
        disjoint = sum(1 for a, z in b.timeouts if z <= lo or hi <= a)
        b.timeouts.append((lo, hi))
        if disjoint + 1 >= HUNG_AFTER:
            self._probe(b, failure, {i for a, z in b.timeouts for i in range(a, z)})

    def _probe(self, b: _Batch, failure: Failure, suspects: set[int]) -> None:
        """Try one item away from ``suspects``; raise :class:`HandlerBroken` if it fails the
        same way, else clear the evidence."""
        n = len(b.items)
        order = [n - 1, 0, n // 2, *range(n)]
        j = next((i for i in order if i not in suspects and i not in b.dead), None)
        if j is None:  # nothing else to ask: every item is under suspicion
            j = next((i for i in order if i not in b.dead), None)
        if j is None:
            b.succeeded()
            return
        out = self._attempt(b, j, j + 1, chunk=False, probe=True)
        if isinstance(out, Failure) and out.transient is not None:
            raise out.transient  # the service is down now, whatever the items
        if isinstance(out, Failure) and (out.timeout if failure.timeout
                                         else out.signature == failure.signature):
            what = ("calls on separate items all ran past handler_timeout "
                    f"({self.queue.handler_timeout:g}s): the service or the handler hangs"
                    if failure.timeout else
                    f"{len(b.streak)} items in a row and item {b.keys[j]!r} elsewhere in the "
                    "batch failed the same way")
            raise HandlerBroken(self.queue.handler, failure.signature, what, failure.error)
        b.succeeded()

    # -- the watchdog ------------------------------------------------------------------------
    def overrun(self) -> str | None:
        """If the call in progress is past its deadline (it swallowed the soft timeout), what
        to log; else None. Called from another thread."""
        deadline = self.deadline
        if deadline is None or self.clock() <= deadline:
            return None
        return (f"handler {self.queue.handler} call running for "
                f"{self.clock() - self._started:.1f}s, past handler_timeout "
                f"({self.queue.handler_timeout:g}s) and its grace: it caught HandlerTimeout and "
                "went on, or blocks where signals cannot reach it")
