"""The sniffer's batch writer: two threads that write encoded batch files into ``left/`` in
the order they were handed over, while the sniffer fetches and encodes the next batch. One
creates each ``tmp/`` file and writes it, the other fsyncs it and renames it into ``left/``.

Why: at 100 items a batch, creating the ``tmp/`` file (a new inode: kernel CPU, more of it on
journal-less ext4 right after deletions) and its fsync (a wait on the disk) were over half of
the sniffer's wall time, one after the other, before the next fetch. Here the three overlap
(the system calls release the GIL): the sniffer's wall per batch is about the longest of
fetch + encode, create + write, fsync + rename (bench/publish_cost.py).

What it keeps (DESIGN.md §2.1): each file is fsynced before its rename, the renames happen in
hand-over order, and the caller moves the source position only to a batch
:meth:`Writer.taken` returned (renamed) and after fsyncing ``left/``
(:meth:`lrq.spool.Spool.sync_published`). Bounded: at most ``depth`` batches are handed over
and not yet renamed (their bytes in memory, at most one open file each), and every wait for
the threads is bounded by ``WAIT``. After a write fails (ENOSPC, EIO, ...) nothing later is
renamed: the batches handed over after it are dropped (a file already created for one is
removed; their items are fetched again from the saved position) and :attr:`Writer.error`
holds the error, which the caller raises or handles as it handled a failed write before.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Batches handed over and not yet renamed: one being committed, one created, one waiting.
DEPTH = 3
#: Seconds a caller waits for the writer at most (a hand-over with ``depth`` batches queued,
#: the final :meth:`Writer.close`): a write stuck longer is a failed write.
WAIT = 120.0


@dataclass(frozen=True)
class Written:
    """A batch renamed into ``left/``: its name, file size and source position."""

    name: str
    size: int
    position: Any


class Writer:
    """Writes handed-over batches with ``create(name, data)`` then ``commit(handle)`` on two
    threads, in order; ``abandon(handle)`` removes a created file that will not be committed.

    Used by one caller thread; the threads start with the first hand-over and end at
    :meth:`close`."""

    def __init__(self, create: Callable[[str, bytes], Any], commit: Callable[[Any], None],
                 abandon: Callable[[Any], None], *, depth: int = DEPTH,
                 wait: float = WAIT) -> None:
        self._create, self._commit, self._abandon = create, commit, abandon
        self.depth = depth
        self.wait = wait
        self._cond = threading.Condition()
        self._jobs: deque[tuple[str, bytes, Any]] = deque()  # to create
        self._made: deque[tuple[Any, str, int, Any]] = deque()  # created, to commit
        self._written: deque[Written] = deque()
        self._busy = 0  # batches a thread is creating or committing now
        self._held = [0, 0]  # batches, bytes handed over and not yet renamed nor dropped
        self._stopping = False
        self._created_all = False  # the creating thread has ended
        self._threads: list[threading.Thread] = []
        #: The first failed write's exception (then nothing later is written), or None.
        self.error: BaseException | None = None

    @property
    def outstanding(self) -> int:
        """Batches handed over and not yet renamed (nor dropped after an error)."""
        with self._cond:
            return len(self._jobs) + len(self._made) + self._busy

    @property
    def unwritten(self) -> tuple[int, int]:
        """(batches, bytes) handed over and not yet renamed nor dropped: not all of them
        are on disk yet (the sniffer's free-space check counts them as if they were not)."""
        with self._cond:
            return self._held[0], self._held[1]

    def hand_over(self, name: str, data: bytes, position: Any) -> bool:
        """Queue a batch to be written after those before it; False (nothing queued) once a
        write has failed. Waits while ``depth`` batches are outstanding, at most ``wait``
        seconds (then the writer counts as failed with a :class:`TimeoutError`)."""
        with self._cond:
            full = lambda: len(self._jobs) + len(self._made) + self._busy >= self.depth  # noqa: E731
            if self.error is None and not self._cond.wait_for(
                    lambda: self.error is not None or not full(), self.wait):
                self._fail(TimeoutError(f"writing a batch file took over {self.wait:.0f}s"))
            if self.error is not None:
                return False
            self._jobs.append((name, data, position))
            self._held[0] += 1
            self._held[1] += len(data)
            self._cond.notify_all()
        if not self._threads:
            self._threads = [threading.Thread(target=run, name=f"lrq-batch-{what}", daemon=True)
                             for what, run in (("create", self._creating),
                                               ("commit", self._committing))]
            for t in self._threads:
                t.start()
        return True

    def taken(self) -> list[Written]:
        """The batches renamed into ``left/`` since the last call, in hand-over order."""
        with self._cond:
            out = list(self._written)
            self._written.clear()
        return out

    def drain(self) -> list[Written]:
        """Wait (at most ``wait`` seconds) until every batch handed over is renamed or dropped;
        then :meth:`taken`."""
        with self._cond:
            if not self._cond.wait_for(
                    lambda: not self._jobs and not self._made and not self._busy, self.wait):
                self._fail(TimeoutError(f"writing a batch file took over {self.wait:.0f}s"))
        return self.taken()

    def close(self) -> list[Written]:
        """Write what was handed over (unless a write failed), stop the threads and return
        the batches renamed since the last :meth:`taken`. Never raises a write's error: see
        :attr:`error`."""
        written = self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(self.wait)
        return written + self.taken()

    def _fail(self, error: BaseException, *, created_too: bool = True) -> None:
        """Record the first error; drop what waits to be created and, unless the failure is a
        creation (the files created before it come before it), what waits to be committed,
        removing those files (caller holds the lock; a close and an unlink each)."""
        if self.error is None:
            self.error = error
        for _, data, _ in self._jobs:
            self._release(len(data))
        self._jobs.clear()
        while created_too and self._made:
            handle, _, size, _ = self._made.popleft()
            self._abandon(handle)
            self._release(size)
        self._cond.notify_all()

    def _release(self, size: int) -> None:
        """A batch left the writer's hands: renamed, or dropped (caller holds the lock)."""
        self._held[0] -= 1
        self._held[1] -= size

    def _creating(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._jobs or self._stopping)
                    if not self._jobs:
                        return
                    name, data, position = self._jobs.popleft()
                    self._busy += 1
                try:
                    handle = self._create(name, data)
                except BaseException as e:  # noqa: BLE001 (handed to the caller: see error)
                    log.debug("batch-write-failed batch=%s error=%s", name, e)
                    with self._cond:
                        self._busy -= 1
                        self._release(len(data))
                        self._fail(e, created_too=False)
                    continue
                with self._cond:
                    self._busy -= 1
                    if self.error is not None:  # failed meanwhile: this one is dropped too
                        self._abandon(handle)
                        self._release(len(data))
                    else:
                        self._made.append((handle, name, len(data), position))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._created_all = True
                self._cond.notify_all()

    def _committing(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._made or self._created_all)
                if not self._made:
                    return
                handle, name, size, position = self._made.popleft()
                self._busy += 1
            try:
                self._commit(handle)
            except BaseException as e:  # noqa: BLE001 (handed to the caller: see error)
                log.debug("batch-write-failed batch=%s error=%s", name, e)
                with self._cond:
                    self._busy -= 1
                    self._release(size)
                    self._fail(e)
                continue
            with self._cond:
                self._busy -= 1
                self._release(size)
                self._written.append(Written(name, size, position))
                self._cond.notify_all()
