"""The doorbell: idle workers are woken by a publish, not by a timer.

A worker that finds nothing pending used to sleep its whole ``idle_wait``. When workers are
faster than the sniffer (batch 100: the sniffer is the serial step), they empty the backlog
again and again, and each time slept 0.2 s while the sniffer filled ``max_pending`` and then
waited for room: the pipeline stalled most of the time. Polling ``left/``'s mtime instead
woke on every done batch too (a rename out of ``left/``), so idle workers picked in a loop
and cost more CPU per batch than they saved (bench/README.md, "Idle workers").

So each queue has a FIFO, ``<queue>/wake`` (mode 0600, made by the first worker that waits).
Whatever publishes a batch (the sniffer, a split, a requeue) writes one byte into it after the
batch's rename into ``left/``; a worker waiting for work blocks in ``select`` on it.

* **Ringing** never blocks and never fails the publish: the FIFO is opened ``O_NONBLOCK``;
  with no worker listening the open fails (``ENXIO``) and nothing is written; a full pipe
  (64 KiB of rings nobody read: no worker was idle) drops the byte; a listener gone
  (``EPIPE``) closes the descriptor, to be opened again on the next ring.
* **Waiting** (:meth:`Doorbell.wait`): a worker opens the FIFO once, read-write (so it never
  sees end-of-file when no publisher has it open), before its first pick. When a ring arrives
  it reads every byte there (the rings it slept through too) and picks. A ring another
  worker's read took first wakes this one for nothing: it waits on without picking, since
  the worker that read the rings picks, and a later ring or ``timeout`` brings this one back.
  No wake-up is lost: a ring is written after its batch's rename, so a pick after the read
  sees that batch; a ring written while the worker was picking stays in the pipe and ends
  its next wait at once.
* ``timeout`` stays the backstop for what does not ring: a claim given back (released,
  reaped) makes a batch pending again without a publish.
* Where no FIFO can be used (the path holds something else, a filesystem without FIFOs), the
  wait is a plain sleep of ``timeout``, as before, and ``doorbell-unusable`` is logged once.

The FIFO holds no state: deleting it loses nothing (the next waiting worker makes a new
one; workers still listening on the old one fall back on ``timeout`` until they restart).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import stat
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "wake"
#: Longest single ``select``: how soon a waiting worker notices ``stop`` (set by a signal
#: handler, which does not interrupt a ``select`` for good: it is retried).
STOP_CHECK = 0.1
_OPEN = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class Doorbell:
    """One queue's FIFO, for one process: :meth:`ring` after a publish, :meth:`wait` when idle.

    Descriptors belong to the process that opened them: after a fork the child opens its own.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pid = os.getpid()
        self._ring_fd: int | None = None
        self._wait_fd: int | None = None
        self._unusable = False
        #: Waits ended by a ring (tests, benchmarks).
        self.wakeups = 0

    def _forked(self) -> None:
        if self._pid != os.getpid():  # the parent's descriptors: leave them to it
            self._pid, self._ring_fd, self._wait_fd = os.getpid(), None, None

    def ring(self) -> None:
        """Tell waiting workers a batch was published; never blocks, never raises."""
        self._forked()
        fd = self._ring_fd
        if fd is None:
            fd = self._ring_fd = _open_fifo(self.path, os.O_WRONLY)
            if fd is None:
                return  # nobody listens (ENXIO), or no FIFO there
        try:
            os.write(fd, b"\0")
        except BlockingIOError:
            pass  # 64 KiB of rings unread: nobody was idle, and a waiter reads them all
        except OSError:  # EPIPE: the listeners went away; open again on the next ring
            self._close_ring()

    def listen(self) -> bool:
        """Open the FIFO for waiting (made if missing); False when it cannot be used. Call
        before the first pick, so no ring written after it is missed."""
        self._forked()
        if self._wait_fd is not None:
            return True
        if self._unusable:
            return False
        try:
            os.mkfifo(self.path, 0o600)
        except OSError as e:
            if e.errno != errno.EEXIST:  # a FIFO there already, or whatever else: opened below
                return self._give_up(e.strerror or str(e))
        fd = _open_fifo(self.path, os.O_RDWR)
        if fd is None:
            return self._give_up("not a FIFO, or it cannot be opened")
        self._wait_fd = fd
        return True

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Wait until a batch may have been published (True: a ring was read), or until
        ``timeout`` passes or ``stop`` is set (False)."""
        if not self.listen():
            stop.wait(timeout)
            return False
        fd = self._wait_fd
        assert fd is not None
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([fd], [], [], min(left, STOP_CHECK))
            if ready and _drain(fd):
                self.wakeups += 1
                return True
        return False

    def close(self) -> None:
        self._forked()
        self._close_ring()
        if self._wait_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._wait_fd)
            self._wait_fd = None

    def _close_ring(self) -> None:
        if self._ring_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._ring_fd)
            self._ring_fd = None

    def _give_up(self, why: str) -> bool:
        self._unusable = True
        log.warning("doorbell-unusable path=%s: %s; idle workers poll instead (remove the "
                    "entry to let lrq make its FIFO again)", self.path, why)
        return False


def _open_fifo(path: Path, mode: int) -> int | None:
    """``path`` opened without blocking or following a symlink, if it is a FIFO."""
    try:
        fd = os.open(path, mode | _OPEN)
    except OSError:
        return None
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _drain(fd: int) -> bool:
    """Read every ring in the pipe; False when another waiter took them first."""
    got = False
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            got = True
            if len(chunk) < 4096:
                break
    return got
