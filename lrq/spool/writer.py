"""The sniffer's batch writer: one thread that writes encoded batch files into ``left/`` (a
``tmp/`` file, its fsync, the rename) in the order they were handed over, while the sniffer
fetches and encodes the next batch.

Why: at 100 items a batch, creating the ``tmp/`` file (a new inode: kernel time, more of it
on journal-less ext4 right after deletions) and its fsync (a wait on the disk) were over half
of the sniffer's wall time, before the next fetch could start. The system calls release the
GIL, so with the writer they overlap the fetch and the encoding: the sniffer's wall per batch
is about the longer of the two, not their sum (bench/publish_cost.py).

One thread, not two: a variant with one thread creating and writing the tmp/ files and
another fsyncing and renaming them (so a creation overlaps the previous fsync) cost 1.2x the
CPU per batch and was slower than this one (bench/README.md, "Publish cost").

What it keeps (DESIGN.md §2.1): each file is fsynced before its rename, the renames happen in
hand-over order, and the caller moves the source position only to a batch :meth:`Writer.taken`
returned (renamed) and after fsyncing ``left/`` (:meth:`lrq.spool.Spool.sync_published`).
Bounded: at most ``depth`` batches are handed over and not yet renamed (the encoded bytes in
memory), and every wait for the thread is bounded by ``WAIT``. After a write fails (ENOSPC,
EIO, ...) nothing more is written: the batches handed over after it are dropped (their items
are fetched again from the saved position) and :attr:`Writer.error` holds the error, which
the caller raises or handles as it handled a failed write before.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Batches handed over and not yet renamed: one being written, one waiting. More would only
#: hold more memory: the writer is the slower side at batch 100, the encoder at 1000.
DEPTH = 2
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
    """Writes handed-over batches with ``write(name, data)`` on its own thread, in order.

    Used by one caller thread; the writing thread starts with the first hand-over and ends at
    :meth:`close` (or after a failed write)."""

    def __init__(self, write: Callable[[str, bytes], None], *, depth: int = DEPTH,
                 wait: float = WAIT) -> None:
        self._write = write
        self.depth = depth
        self.wait = wait
        self._cond = threading.Condition()
        self._jobs: deque[tuple[str, bytes, Any] | None] = deque()  # None: stop
        self._written: deque[Written] = deque()
        self._busy = False
        self._held = [0, 0]  # batches, bytes handed over and not yet renamed nor dropped
        self._thread: threading.Thread | None = None
        #: The first failed write's exception (then nothing more is written), or None.
        self.error: BaseException | None = None

    @property
    def outstanding(self) -> int:
        """Batches handed over and not yet renamed (nor dropped after an error)."""
        with self._cond:
            return len(self._jobs) + self._busy

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
            if self.error is None and not self._cond.wait_for(
                    lambda: self.error is not None or len(self._jobs) + self._busy < self.depth,
                    self.wait):
                self._fail(TimeoutError(f"writing a batch file took over {self.wait:.0f}s"))
            if self.error is not None:
                return False
            self._jobs.append((name, data, position))
            self._held[0] += 1
            self._held[1] += len(data)
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lrq-batch-writer", daemon=True)
            self._thread.start()
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
            if not self._cond.wait_for(lambda: not self._jobs and not self._busy, self.wait):
                self._fail(TimeoutError(f"writing a batch file took over {self.wait:.0f}s"))
        return self.taken()

    def close(self) -> list[Written]:
        """Write what was handed over (unless a write failed), stop the thread and return the
        batches renamed since the last :meth:`taken`. Never raises the write's error: see
        :attr:`error`."""
        written = self.drain()
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self.wait)
        return written

    def _fail(self, error: BaseException) -> None:
        """Record the first error and drop what waits (caller holds the lock)."""
        if self.error is None:
            self.error = error
        for job in self._jobs:
            if job is not None:
                self._release(len(job[1]))
        self._jobs = deque(j for j in self._jobs if j is None)
        self._cond.notify_all()

    def _release(self, size: int) -> None:
        """A batch left the writer's hands: renamed, or dropped (caller holds the lock)."""
        self._held[0] -= 1
        self._held[1] -= size

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs))
                job = self._jobs.popleft()
                if job is None:
                    return
                self._busy = True
            name, data, position = job
            try:
                self._write(name, data)
            except BaseException as e:  # noqa: BLE001 (handed to the caller: see error)
                log.debug("batch-write-failed batch=%s error=%s", name, e)
                with self._cond:
                    self._busy = False
                    self._release(len(data))
                    self._fail(e)
                return
            with self._cond:
                self._busy = False
                self._release(len(data))
                self._written.append(Written(name, len(data), position))
                self._cond.notify_all()
