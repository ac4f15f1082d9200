"""Worker processes for the scheduler, forked from a warm server instead of started afresh.

A new ``lrq work`` interpreter spends ~0.5 s of CPU (Python, SQLAlchemy, lrq) before its
first claim, and the scheduler starts one whenever a worker slot is free and work appears.
A multiprocessing *forkserver* imports lrq once, at scheduler start, alongside the
scheduler's own start-up, and forks each worker from that state in a few milliseconds. The
server is a separate single-threaded process: forking the scheduler itself, which runs
APScheduler's threads, could copy a lock held by another thread into the child, along with
the scheduler's flock and database connections.

Each child runs ``lrq.cli.main(argv)`` exactly as ``lrq work`` would, with the scheduler's
environment and working directory at spawn time, in its own session (a terminal's Ctrl-C
reaches only the scheduler, which forwards SIGTERM), stdout on /dev/null, stderr into a
pipe the scheduler relays line by line (given the scheduler's stderr, the child logs to it
and to the log file itself, and only other output such as a traceback uses the pipe: see
:mod:`lrq.logfile`), and the process title ``lrq work QUEUE -c CONFIG``
so that ``ps`` shows what it is. If the server dies, multiprocessing starts a new one on
the next spawn.

The server exits when the scheduler does, even on ``kill -9``: it watches a pipe whose
writing end the scheduler holds (multiprocessing hands each child a copy too, which the
child closes, or a running child would keep the server alive). Each child asks for SIGTERM
when the server dies and watches the scheduler itself too (:mod:`lrq.process`), so workers
stop with their scheduler.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from multiprocessing import forkserver, reduction
from multiprocessing.connection import Connection
from typing import Any

from setproctitle import setproctitle

from lrq import logfile

#: Imported once by the server; what every worker needs before its first claim. No worker
#: can start before the server has imported these, while the scheduler imports its own on the
#: other core: the ORM and urllib3 (~0.1 s, a handler's or a model's needs, not lrq's) kept
#: the first worker 0.1-0.5 s behind the first published batch, so a worker whose handler
#: needs urllib3 imports it itself (~20-40 ms), and the ORM is preloaded only for a config
#: that names a ``model`` (:data:`MODELS`), where the worker would import it before its first
#: claim. Users' own modules are not preloaded: one that opens a connection or starts a
#: thread at import would hand every worker a copy of it.
PRELOAD = ["lrq.cli", "lrq.app", "lrq.worker", "lrq.sink", "lrq.spool", "lrq.process",
           "lrq.db", "lrq.sources.sql", "sqlalchemy.dialects.sqlite"]
#: Preloaded too when the config names a model (a queue's or an output's ``model``).
MODELS = ["sqlalchemy.orm"]


class Launcher:
    def __init__(self, models: bool = True) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD + MODELS if models else PRELOAD)

    def warm(self) -> None:
        """Start the server now (it returns at once; the server imports in the background),
        so the first spawn does not wait for its imports."""
        forkserver.ensure_running()

    def spawn(self, argv: list[str], title: str, env: dict[str, str],
              log_fd: int | None = None) -> Child:
        """Start ``lrq <argv>`` in a forked child. With ``log_fd`` (the scheduler's stderr),
        the child logs there itself, not through its stderr pipe (:mod:`lrq.logfile`)."""
        read, write = self._ctx.Pipe(duplex=False)
        log = None if log_fd is None else _Fd(log_fd)
        proc = self._ctx.Process(target=_child_main, args=(argv, write, title, env, log),
                                 name=title, daemon=False)
        try:
            proc.start()
        finally:
            write.close()  # the child has its own copy; EOF comes when the child is gone
        return Child(proc, read)


class Child:
    """A running worker process: its pid, its stderr lines, its exit code.

    One thread owns a child: it reads :meth:`lines` and calls :meth:`wait` (two threads
    waiting on one forkserver child could both read its exit status) and sets
    ``finished`` after; other threads signal it and wait on ``finished``."""

    def __init__(self, proc: multiprocessing.process.BaseProcess, read: Connection) -> None:
        self._proc = proc
        self.pid: int = proc.pid  # type: ignore[assignment]
        self.finished = threading.Event()
        fd = os.dup(read.fileno())
        read.close()
        self._stderr = open(fd, errors="replace")  # noqa: SIM115 (closed by lines() at EOF)

    def lines(self) -> Iterator[str]:
        """The child's stderr, line by line, until it exits (and closes the pipe)."""
        with self._stderr:
            yield from self._stderr

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code (negative: killed by that signal), or None if still running."""
        self._proc.join(timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(self.pid, sig)


class _Fd:
    """A descriptor handed to a forked child: duplicated into it while the process object is
    pickled (as multiprocessing passes a Connection), an int again in the child."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return _inherited, (reduction.DupFd(self.fd),)


def _inherited(dup: Any) -> int:
    return int(dup.detach())


def _child_main(argv: list[str], stderr: Connection, title: str, env: dict[str, str],
                log_fd: int | None = None) -> None:
    from lrq import process

    process.die_with_parent(signal.SIGTERM)  # first: the sooner asked, the smaller the gap
    _let_the_server_go()
    os.setsid()
    os.dup2(stderr.fileno(), 2)
    stderr.close()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    setproctitle(title)  # first: it finds the argv area by the environment's original layout
    os.environ.clear()
    os.environ.update(env)
    if log_fd is not None:
        os.environ[logfile.LOG_FD_ENV] = str(log_fd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # lrq work installs its own
    if not process.watch_scheduler(env.get(process.SCHEDULER_ENV)):  # covers the gap above
        sys.exit(0)
    from lrq.cli import main

    try:
        code = main(argv)
    finally:
        process.unregister_workers()  # multiprocessing skips atexit
    sys.exit(code)


def _let_the_server_go() -> None:
    """Close this child's copy of the pipe end the fork server watches for the scheduler's
    exit. Held open, it keeps the server running after the scheduler died, and with it every
    child (whose PR_SET_PDEATHSIG waits for the server's death). The child starts no
    processes of its own through the server, which is what the copy is for."""
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if server is not None and fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None
