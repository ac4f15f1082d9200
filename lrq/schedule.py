"""The scheduler: sniffers in-process, worker runs as child processes, on APScheduler 3.

Each queue gets a sniffer job (max_instances=1) firing every ``interval`` seconds and a
worker job (max_instances=workers) firing every ``interval`` but at most once a second
(``WORK_EVERY``) and at once when the sniffer publishes while a worker slot is free, both
coalesced. A sniff run paused on ``max_pending`` waits to refill for at
least five seconds, until just before a firing (:func:`sniff_seconds`), then returns. A
cleanup job (the reaper) runs every ``cleanup.every`` seconds. A worker job only starts a
process when something is pending; that process runs ``lrq work QUEUE --idle-exit 2``
(forked from a warm server, see :mod:`lrq.launcher`) and drains batches until none came
for two seconds or ``run_seconds`` pass, so CPU-bound handlers use every core.

A worker process that exits non-zero has its claims reaped at once (or by the cleanup pass
running then, or its next one: one reaper at a time), with its exit code or signal recorded
(:mod:`lrq.reaper`: a batch whose worker died twice is split, and an item that kills its
worker ends dead-lettered). Workers stop when the scheduler dies, even by
``kill -9``, and a scheduler counts the live workers of its data dir (an old scheduler's,
a by-hand ``lrq work``) before it starts more (:mod:`lrq.process`).

A worker process that exits with :attr:`HandlerBroken.exit_code <lrq.errors.HandlerBroken>`
found its queue's handler broken (and failed one batch); one that exits 2 could not work for
its configuration (a handler module that no longer imports, a batch-signing key that
changed). Starting another at once would fail the same way, so the queue gets no new worker
for ``BROKEN_PAUSE`` seconds, doubled each time it happens again (at most
``BROKEN_PAUSE_MAX``), and one worker at a time until a run ends otherwise; ``until_idle``
stops the scheduler instead and :meth:`Runner.run` returns that exit status.

A worker process that exits 1 or by a signal holding no batch (the results database is
down: it fails at its start, or releases what it held after its retries) would fail the same
way if started again at once. The first such exit restarts at once; each one after it pauses
the queue's new workers for ``FAILING_PAUSE`` seconds, doubled each time (at most
``FAILING_PAUSE_MAX``), until a worker exits 0 or a dead worker is found holding a batch (a
death the reaper counts toward splitting: an item that kills its worker is isolated without
waiting). With ``until_idle``, the run stops with exit status 1 instead of pausing for
``FAILING_PAUSE_MAX``: about a minute of failing workers (``FAILING_PAUSE`` doubled up to it)
is not a state that drains.

Signals only set a flag. A thread waiting on it (with ``until_idle``, a supervisor job
that also sees when the sources are drained and nothing is pending, claimed or running)
stops the scheduler;
children are then asked to stop with SIGTERM and killed after ``grace`` seconds.

A queue the operator paused (``lrq pause``, :mod:`lrq.control`) gets no new worker process;
its sniffer publishes nothing (its acker still acknowledges) and the workers running finish
their batch and exit on their idle timeout. ``until_idle`` does not take a paused queue with
work left for idle: the run waits for ``lrq resume`` (``until-idle-waiting`` is logged once),
at the jobs' usual pace, each look a stat. A paused queue with nothing pending whose source
was found drained is idle as before.

On stopping, batches that failed or were quarantined during the run are counted in one
``stopped-with-failures`` line; with ``until_idle`` they make the exit code 1.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler

from lrq import cleanup, logfile, logjson, process
from lrq.app import App
from lrq.config import QueueConfig
from lrq.errors import AlreadyRunning, HandlerBroken, LrqError
from lrq.launcher import Child, Launcher
from lrq.reaper import Exits
from lrq.spool import Exit, flock, start_of

log = logging.getLogger(__name__)
child_log = logging.getLogger("lrq.child")

SUPERVISE_EVERY = 0.1  # seconds between idle checks of an ``until_idle`` run (ends it ~0.1 s sooner)
STOP_WAIT = 1.0  # seconds of one wait on the stop flag, then a log rotation check (_watch_stop)
SNIFF_SECONDS = 5.0  # about how long one sniff job may publish or wait to refill ...
SNIFF_MARGIN = 0.05  # ... ending this long before a firing of its interval (see sniff_seconds)
#: Seconds between worker jobs at most as often: a publish starts a worker at once
#: (``on_publish``), so the job is only the backstop for batches that become pending otherwise
#: (released or reaped claims, a worker's ``run_seconds`` ending with a backlog left).
WORK_EVERY = 1.0
CHILD_IDLE_EXIT = 2.0  # seconds a worker process waits for new batches before exiting
CHILD_ENV = "LRQ_CHILD"
BROKEN_PAUSE = 30.0  # seconds without workers for a queue whose handler is broken ...
BROKEN_PAUSE_MAX = 600.0  # ... doubled each time, up to this
FAILING_PAUSE = 1.0  # seconds without new workers after the 2nd failed worker in a row ...
FAILING_PAUSE_MAX = 60.0  # ... doubled each time, up to this (until_idle: stop instead)
#: Worker exits that another worker would repeat at once: the queue pauses (see above).
STOPPING_EXITS = {HandlerBroken.exit_code: "handler-broken", 2: "worker-config-error"}


_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def child_line(line: str) -> tuple[int, str]:
    """A worker process's stderr line as (level, text). Lines that are not lrq's log format
    (a handler's print, a traceback) pass through whole at INFO: the relay must never fail,
    or the child would block on a full pipe."""
    first, _, rest = line.rstrip("\n").partition(" ")
    if first in _LEVELS:
        return _LEVELS[first], rest
    return logging.INFO, line.rstrip("\n")


class Runner:
    def __init__(self, app: App, *, until_idle: bool = False,
                 launcher: Launcher | None = None) -> None:
        self.app = app
        self.until_idle = until_idle
        self.stop = threading.Event()
        self.children: dict[int, tuple[str, Child]] = {}
        #: How this scheduler's worker processes ended, for the reaper.
        self.exits = Exits()
        self._starting: dict[str, int] = {q.name: 0 for q in app.queues()}
        self._others: dict[str, list[int]] = {q.name: [] for q in app.queues()}
        self.launcher = launcher or Launcher()  # started on the first spawn unless warmed
        self._lock = threading.Lock()
        self.sniffers = {q.name: app.sniffer(q) for q in app.queues()}
        for q in app.queues():
            self.sniffers[q.name].on_publish = lambda q=q: self._start_worker(q)
            self.sniffers[q.name].check_settled = until_idle
        self.spools = {q.name: app.spool(q) for q in app.queues()}
        #: Queues whose handler is broken: (no worker before this monotonic time, times seen).
        self.broken: dict[str, tuple[float, int]] = {}
        #: Queues whose workers keep failing: (no worker before this monotonic time, in a row).
        self.failing: dict[str, tuple[float, int]] = {}
        #: Paused queues an ``until_idle`` run said it waits for (:meth:`_held`).
        self._waiting: set[str] = set()
        #: The exit status that stopped an ``until_idle`` run before it drained, if one did.
        self.stopped_by: int | None = None
        slots = sum(1 + q.workers for q in app.queues()) + 4  # +1: _watch_stop, for good
        self.scheduler = BlockingScheduler(
            executors={"default": ThreadPoolExecutor(slots)},
            job_defaults={"coalesce": True, "misfire_grace_time": None},
        )

    # -- jobs ----------------------------------------------------------------------------
    def sniff(self, q: QueueConfig) -> None:
        if self.stop.is_set():
            return
        try:
            sniffer = self.sniffers[q.name]
            with self.spools[q.name].lock("sniff"):
                sniffer.tick(max_seconds=sniff_seconds(self.app.cfg.interval), stop=self.stop)
            if sniffer.paused in ("budget", "min_free", "disk-full"):
                self.scheduler.modify_job("cleanup", next_run_time=_now())  # make room now
        except AlreadyRunning as e:
            log.debug("skipped %s", e)
        except LrqError as e:
            log.error("sniff-failed queue=%s error=%s", q.name, e)

    def _start_worker(self, q: QueueConfig) -> None:
        """A batch was published: run the worker job now, not at its next tick, while fewer
        than ``workers`` processes serve the queue (extra runs are refused by max_instances)."""
        with self._lock:
            running = sum(1 for name, _ in self.children.values() if name == q.name)
        if running < q.workers:
            try:
                self.scheduler.modify_job(f"work:{q.name}", next_run_time=_now())
            except Exception as e:  # noqa: BLE001 (stopping: the job may be gone; the next tick will do)
                log.debug("worker start skipped queue=%s: %s", q.name, e)

    def work(self, q: QueueConfig) -> None:
        if (self.stop.is_set() or self._paused(q) or self._held(q)
                or time.monotonic() < self.failing.get(q.name, (0.0, 0))[0]
                or not self.spools[q.name].has_pending() or not self._slot(q)):
            return
        cfg = str(self.app.cfg.path)
        argv = ["-c", cfg, "work", q.name, "--idle-exit", str(CHILD_IDLE_EXIT),
                "--max-seconds", str(q.run_seconds)]
        env = {**os.environ, CHILD_ENV: "1", logfile.QUEUE_ENV: q.name, **process.scheduler_env(),
               logjson.ENV: logjson.in_use()}
        try:
            child = self.launcher.spawn(argv, f"lrq work {q.name} -c {cfg}", env,
                                        log_fd=_stderr_fd())
        except BaseException as e:
            with self._lock:
                self._starting[q.name] -= 1
            if not isinstance(e, (OSError, EOFError)):
                raise
            # The fork server died; the next start makes a new one.
            log.error("worker-start-failed queue=%s error=%s: %s", q.name, type(e).__name__, e)
            return
        with self._lock:
            self._starting[q.name] -= 1
            self.children[child.pid] = (q.name, child)
        start = start_of(child.pid)  # 0 if it already ended: its claims then read "exit unknown"
        log.debug("spawned queue=%s pid=%d", q.name, child.pid)
        try:
            for line in child.lines():  # ends when the child exits
                level, text = child_line(line)
                child_log.log(level, "[%s %d] %s", q.name, child.pid, text)
            code = child.wait(timeout=self.app.cfg.grace + 5)
            if code is None:
                child.send_signal(signal.SIGKILL)
                code = child.wait()
        finally:
            with self._lock:
                self.children.pop(child.pid, None)
            child.finished.set()
        exit = Exit.of(code)
        self.exits.record(child.pid, start, exit)
        held = None
        if code != 0:
            log.error("worker-exit queue=%s pid=%d code=%s: %s", q.name, child.pid, code,
                      exit.describe())
            held = self._reap(q, child.pid)
        self._count_failure(q, code, held)
        if code in STOPPING_EXITS:
            self._pause(q, code)
        elif code is not None and code >= 0:
            self.broken.pop(q.name, None)
        if code != 0 and q.name not in self.broken:
            self._start_worker(q)  # what it held is pending again (or split): not at the next tick

    def _held(self, q: QueueConfig) -> bool:
        """Is ``q`` paused by the operator (``lrq pause``, a stat)? Then no worker process is
        started for it; an ``until_idle`` run says once that it waits for the resume."""
        if self.app.watch(q).paused() is None:
            self._waiting.discard(q.name)
            return False
        if self.until_idle and q.name not in self._waiting:
            self._waiting.add(q.name)
            log.info("until-idle-waiting queue=%s: the queue is paused; this run ends only "
                     "once it is resumed (`lrq resume %s`) and drained", q.name, q.name)
        return True

    def _slot(self, q: QueueConfig) -> bool:
        """Take one of ``q``'s ``workers`` slots for a new process, counting the live worker
        processes this scheduler did not start (an earlier scheduler's, a by-hand ``lrq
        work``); False when none is free. The caller gives the slot back once its child is
        in ``children``."""
        live = process.live_workers(self.spools[q.name])
        with self._lock:
            ours = {pid for pid, (name, _) in self.children.items() if name == q.name}
            others = [pid for pid in live if pid not in ours]
            if others != self._others[q.name]:
                self._others[q.name] = others
                log.log(logging.WARNING if others else logging.INFO,
                        "workers-alive queue=%s others=%d pids=%s workers=%d: %s", q.name,
                        len(others), ",".join(map(str, others)) or "-", q.workers,
                        "counted against the slots" if others else "none besides ours")
            if len(ours) + self._starting[q.name] + len(others) >= q.workers:
                return False
            self._starting[q.name] += 1
            return True

    def _reap(self, q: QueueConfig, pid: int) -> bool | None:
        """Take back a dead child's claims now, with its exit, rather than at the next
        cleanup tick; under the cleanup lock, so not beside the cleanup job or a by-hand
        ``lrq cleanup``. If one holds it, that one (or the next tick) reaps them. Returns
        whether the child held a batch, None when unknown."""
        report = cleanup.Report(q.name)
        try:
            with flock(self.app.cfg.data_dir / "cleanup.lock", "cleanup"):
                cleanup.reap(self.app, q, report, time.time(), exits=self.exits, pid=pid)
        except AlreadyRunning:
            log.debug("reap-deferred queue=%s pid=%d: a cleanup is running", q.name, pid)
            return None
        except Exception:
            log.exception("reap-failed queue=%s pid=%d", q.name, pid)
            return None
        return bool(report.reclaimed or report.failed or report.split or report.dead_lettered)

    def _count_failure(self, q: QueueConfig, code: int | None, held: bool | None) -> None:
        """Count a worker of ``q`` that exited 1 or by a signal holding no batch (``held``:
        what :meth:`_reap` found, None if it could not tell); one that exited 0 or held a
        batch ends the count. See the module docstring."""
        with self._lock:  # workers of a queue end in their own job threads
            if code == 0 or held:
                self.failing.pop(q.name, None)
            elif code is not None and (code == 1 or code < 0) and held is not None:
                self._failed(q)

    def _failed(self, q: QueueConfig) -> None:
        n = self.failing.get(q.name, (0.0, 0))[1] + 1
        if n == 1:
            self.failing[q.name] = (0.0, n)  # the first: restart at once
            return
        wait = FAILING_PAUSE * 2 ** (n - 2)
        if wait >= FAILING_PAUSE_MAX and self.until_idle:
            log.error("stopping: queue %s: %d workers in a row failed without holding a batch; "
                      "fix what their error lines above name (the database?), then run again",
                      q.name, n)
            if self.stopped_by is None:
                self.stopped_by = 1
            self.stop.set()
            return
        wait = min(wait, FAILING_PAUSE_MAX)
        self.failing[q.name] = (time.monotonic() + wait, n)
        log.error("paused queue=%s seconds=%.0f reason=workers-failing failed=%d: no new worker "
                  "until then", q.name, wait, n)

    def _paused(self, q: QueueConfig) -> bool:
        """A queue whose workers cannot work (:data:`STOPPING_EXITS`): no worker before its
        pause ends, then one at a time."""
        if q.name not in self.broken:
            return False
        with self._lock:
            running = any(name == q.name for name, _ in self.children.values())
        return running or time.monotonic() < self.broken[q.name][0]

    def _pause(self, q: QueueConfig, code: int) -> None:
        why = STOPPING_EXITS[code]
        fix = ("fix the handler, then `lrq requeue --failed`" if code == HandlerBroken.exit_code
               else "fix what the worker's error line above names")
        if self.until_idle:
            log.error("stopping: queue %s cannot work (%s, see above): %s", q.name, why, fix)
            self.broken[q.name] = (float("inf"), 1)
            if self.stopped_by is None:
                self.stopped_by = code
            self.stop.set()
            return
        n = self.broken.get(q.name, (0.0, 0))[1] + 1
        wait = min(BROKEN_PAUSE * 2 ** (n - 1), BROKEN_PAUSE_MAX)
        self.broken[q.name] = (time.monotonic() + wait, n)
        log.error("paused queue=%s seconds=%.0f reason=%s: no worker until then; %s", q.name,
                  wait, why, fix)

    def clean(self) -> None:
        try:
            for report in cleanup.run(self.app, exits=self.exits):
                if report.changed:
                    log.info("cleanup %s", report.lines(dry_run=False)[0])
        except Exception:
            log.exception("cleanup-failed")

    def supervise(self) -> None:
        logfile.rotate()  # the children append to the log file without rotating it
        if self.stop.is_set() or (self.until_idle and self.idle()):
            if not self.stop.is_set():
                log.info("idle: sources drained, nothing pending or claimed; stopping")
            self.stop.set()
            self.scheduler.shutdown(wait=False)

    def _watch_stop(self) -> None:
        """Stop the scheduler once :attr:`stop` is set (a signal, a queue that cannot work):
        one job run for the scheduler's life (so it runs only once the scheduler does), waiting
        on the flag rather than polling it: each APScheduler run costs ~0.5 ms of CPU, and an
        idle scheduler ran a 4 Hz supervise job for nothing. Nothing but the flag stops a
        scheduler without ``until_idle``, so the loop ends with it (in bounded waits, each
        followed by a check of the log file's size: see :mod:`lrq.logfile`)."""
        while not self.stop.wait(STOP_WAIT):
            logfile.rotate()  # the children append to the log file without rotating it
        self.supervise()

    def idle(self) -> bool:
        """Sources drained and no batch pending or claimed; for a source acknowledged at
        commit also no done batch awaiting its acknowledgement and ``source.settled()`` (as
        last asked by its sniff job: nothing new, nothing pending for any consumer). Worker
        processes still running then have nothing to claim (only the in-process sniffer
        publishes), so they are not waited for: stopping sends them SIGTERM and they exit at
        once."""
        return all(sniffer.drained and sniffer.carried is None and self.spools[name].settled()
                   and (sniffer.acker is None or sniffer.acker.awaiting() == 0)
                   and sniffer.source_settled for name, sniffer in self.sniffers.items())

    # -- lifecycle -----------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        interval = self.app.cfg.interval
        for q in self.app.queues():
            self.scheduler.add_job(self.sniff, "interval", args=[q], seconds=interval,
                                   max_instances=1, id=f"sniff:{q.name}", next_run_time=_now())
            self.scheduler.add_job(self.work, "interval", args=[q],
                                   seconds=max(interval, WORK_EVERY),
                                   max_instances=q.workers, id=f"work:{q.name}",
                                   next_run_time=_now())
        self.scheduler.add_job(self.clean, "interval", seconds=self.app.cfg.cleanup.every,
                               max_instances=1, id="cleanup", next_run_time=_now())
        if self.until_idle:
            self.scheduler.add_job(self.supervise, "interval", seconds=SUPERVISE_EVERY,
                                   max_instances=1, id="supervise")
        else:  # only the stop flag to watch: no 4 Hz job (~0.2% of a core idle)
            self.scheduler.add_job(self._watch_stop, id="supervise", next_run_time=_now())
        log.info("started data_dir=%s queues=%s pid=%d", self.app.cfg.data_dir,
                 ",".join(q.name for q in self.app.queues()), os.getpid())
        before = self._set_aside()
        self.scheduler.start()  # returns after supervise() shuts it down
        self._stop_children()
        code = self._report(before)
        if self.until_idle and self.stopped_by is not None:
            return self.stopped_by  # the reason the run could not drain
        return code

    def _set_aside(self) -> dict[Path, tuple[str, bool]]:
        """Every batch file in a queue's ``failed/`` or ``quarantine/`` now, with its queue
        and whether it is quarantined."""
        return {path: (sp.queue, path.parent == sp.quarantine) for sp in self.spools.values()
                for _, path in sp.failed_batches()}

    def _report(self, before: dict[Path, tuple[str, bool]]) -> int:
        """Say how many batches failed or were quarantined while this scheduler ran; with
        ``until_idle`` they make the exit code 1, so a drained run that left work behind does
        not pass as a success. Batches set aside before the run are mentioned, not counted:
        the run that failed them said so, and ``lrq verify`` still misses their items."""
        after = self._set_aside()
        new = [after[p] for p in after.keys() - before.keys()]
        if not new:
            log.info("stopped")
            return 0
        quarantined = sum(1 for _, q in new if q)
        log.error("stopped-with-failures failed=%d quarantined=%d earlier=%d queues=%s: see "
                  "`lrq status` and `lrq show NAME` for each error, then `lrq requeue NAME` "
                  "(or `--failed`) once fixed", len(new) - quarantined, quarantined,
                  len(before), ",".join(sorted({name for name, _ in new})))
        return 1 if self.until_idle else 0

    def _stop_children(self) -> None:
        with self._lock:
            children = [c for _, c in self.children.values()]
        for c in children:
            c.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.app.cfg.grace + 5  # children give up at grace
        for c in children:  # each is reaped by the job thread that started it
            if not c.finished.wait(timeout=max(0.0, deadline - time.monotonic())):
                log.warning("killing worker pid=%d after %.0fs grace", c.pid, self.app.cfg.grace)
                c.send_signal(signal.SIGKILL)
                c.finished.wait(timeout=10)


def sniff_seconds(interval: float) -> float:
    """How long one sniff job may run: at least :data:`SNIFF_SECONDS`, ending just before a
    later firing of the job's ``interval``. A sniffer paused on ``max_pending`` waits in its tick
    for the backlog to fall (:mod:`lrq.sniffer`); when the tick's time is up it returns, and
    the next run starts at that firing, not up to one interval later (runs that fire while
    one is running are skipped), so the refill wait is never off for long."""
    slots = math.ceil(SNIFF_SECONDS / interval)
    return slots * interval - min(SNIFF_MARGIN, interval / 4)


def _stderr_fd() -> int | None:
    """This process's stderr, for its worker processes to log to (None: they relay)."""
    try:
        return sys.stderr.fileno() if sys.stderr is not None else None
    except (OSError, ValueError, AttributeError):  # replaced by an object without a descriptor
        return None


def _now() -> Any:
    from datetime import datetime

    return datetime.now().astimezone()


def run(app: App, *, until_idle: bool = False, launcher: Launcher | None = None) -> int:
    """Run the scheduler in the foreground; one per data dir."""
    app.check()
    with flock(app.cfg.data_dir / "scheduler.lock", f"a scheduler for {app.cfg.data_dir}"):
        return Runner(app, until_idle=until_idle, launcher=launcher).run()
