"""Log destinations shared by the scheduler and its worker processes.

A scheduler's worker processes (``lrq run``) log to the scheduler's own destinations, its
stderr and its log file, themselves: each record is one ``write()`` of one whole line (or a
record with its traceback), to a file opened ``O_APPEND``, so lines of several processes
never interleave. Relaying each line through the scheduler (read from a pipe, parse its
level, log it again) cost the scheduler ~250 µs of CPU per batch at batch 100 (its ``done``
line; bench/cpu_ledger.py), a tenth of a core at full speed. A child's line keeps the form
the relay gave it: ``TIME LEVEL lrq.child: [QUEUE PID] LOGGER: message`` (with
``--log-format json``, a JSON object with ``"worker": QUEUE``, see :mod:`lrq.logjson`).

What a child writes to its stderr other than log records (a traceback at exit, a handler's
warnings) still goes through the pipe the scheduler reads (:mod:`lrq.launcher`), which also
tells it when the child is gone.

Only the scheduler rotates the log file (:class:`SharedLogFile`, on its own lines and at
each worker tick, so the children's lines count too); a child notices the rename within
:data:`REOPEN_EVERY` seconds and reopens the path. Until then its lines go to the rotated
file, so a file can outgrow ``log_max_bytes`` by about what the workers log in that time.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import logging.handlers
import os
import time
from pathlib import Path

from lrq.redact import RedactingFormatter

#: Set in a worker process's environment: the descriptor of the scheduler's stderr.
LOG_FD_ENV = "LRQ_LOG_FD"
#: Set in a worker process's environment: the queue its lines are tagged with.
QUEUE_ENV = "LRQ_CHILD_QUEUE"
REOPEN_EVERY = 1.0  # seconds between a child's checks that its log file was not rotated
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def child_format(queue: str, fmt: str = "text") -> logging.Formatter:
    """A worker process's lines as the scheduler's relay wrote them, or as JSON with a
    ``worker`` key (:mod:`lrq.logjson`): one formatter per queue, process and format, so
    that its stderr and file handlers format each record once."""
    return _child_format(queue, os.getpid(), fmt)


@functools.cache
def _child_format(queue: str, pid: int, fmt: str) -> logging.Formatter:
    if fmt == "json":
        from lrq.logjson import JsonFormatter

        return JsonFormatter(worker=queue)
    tag = f"[{queue} {pid}]".replace("%", "%%")
    return RedactingFormatter(f"%(asctime)s %(levelname)s lrq.child: {tag} %(name)s: %(message)s")


class LineHandler(logging.Handler):
    """Each record as one ``write()`` to a descriptor: whole lines, however many processes
    share it (a pipe takes up to PIPE_BUF bytes whole; a regular file opened ``O_APPEND``
    any length)."""

    def __init__(self, fd: int, formatter: logging.Formatter) -> None:
        super().__init__()
        self.fd = fd
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            done = record.__dict__.get("_lrq_line")  # the same line for the other destination
            if done is not None and done[0] is self.formatter:
                data = done[1]
            else:
                data = (self.format(record) + "\n").encode("utf-8", "replace")
                record.__dict__["_lrq_line"] = (self.formatter, data)
            self.acquire()
            try:
                self._write(data)
            finally:
                self.release()
        except Exception:  # noqa: BLE001 (logging must not raise into the worker)
            self.handleError(record)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a short write only on a full disk or a signal: finish the line
            view = view[os.write(self.fd, view):]


class AppendFileHandler(LineHandler):
    """The scheduler's log file, for a worker process: appended to, reopened by its path
    once the scheduler has rotated it."""

    def __init__(self, path: Path, formatter: logging.Formatter) -> None:
        self.path = path
        super().__init__(self._open(), formatter)
        self._check_at = time.monotonic() + REOPEN_EVERY

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._ino = os.fstat(fd).st_ino
        return fd

    def _write(self, data: bytes) -> None:
        if time.monotonic() >= self._check_at:
            self._check_at = time.monotonic() + REOPEN_EVERY
            try:
                moved = os.stat(self.path).st_ino != self._ino
            except FileNotFoundError:
                moved = True
            if moved:
                old, self.fd = self.fd, self._open()
                os.close(old)
        super()._write(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        super().close()


class SharedLogFile(logging.handlers.RotatingFileHandler):
    """The scheduler's log file, which its worker processes append to as well: rotated by
    its size on disk, checked on each of the scheduler's own lines and by :meth:`rotate_if_full`."""

    def rotate_if_full(self) -> None:
        """Roll the file over if it (with the children's lines) reached ``maxBytes``."""
        if self.maxBytes <= 0 or self.stream is None:
            return
        try:
            full = os.fstat(self.stream.fileno()).st_size >= self.maxBytes
        except (OSError, ValueError):
            return
        if full:
            self.acquire()
            try:
                self.doRollover()
            finally:
                self.release()


def rotate() -> None:
    """Rotate this process's :class:`SharedLogFile` handlers that are full (the scheduler's
    worker job, each tick: its children write to the file without rotating it)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, SharedLogFile):
            h.rotate_if_full()
