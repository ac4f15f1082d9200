"""A worker process's ties to its scheduler and to its data dir.

* **Dying with the scheduler.** A scheduler's workers are forked by its fork server
  (:mod:`lrq.launcher`), which exits when the scheduler does, even on ``kill -9``. Each
  worker asks the kernel for SIGTERM when its parent (the server) dies
  (``prctl(PR_SET_PDEATHSIG)``, :func:`die_with_parent`), and, as a second line, a thread
  checks every :data:`WATCH_EVERY` seconds that the scheduler named in ``LRQ_SCHEDULER``
  (``pid:start``) still runs and sends the same SIGTERM if not (:func:`watch_scheduler`).
  SIGTERM is ``lrq work``'s graceful stop: no new claims, the batch in hand finished within
  ``grace`` seconds or released uncounted. So no orphan worker runs on for ``run_seconds``
  with nobody reading its log.
* **Counting live workers.** Every ``lrq work`` process, forked or by hand, creates
  ``<data_dir>/<queue>/workers/<pid>-<start>`` (:func:`register_worker`) and removes it at
  exit. A scheduler counts the files whose process still runs (:func:`live_workers`,
  the same pid-and-start test as a claim's owner, so a reused pid does not count), removing
  the rest, and starts only ``workers`` minus those it did not start itself.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from pathlib import Path

from lrq.spool import FILE_MODE, Spool, owner_alive, process_start

log = logging.getLogger(__name__)

#: Names the scheduler a forked worker belongs to, as ``pid:start``.
SCHEDULER_ENV = "LRQ_SCHEDULER"
#: Seconds between two checks of the scheduler by :func:`watch_scheduler`.
WATCH_EVERY = 1.0
WORKERS = "workers"
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux); False
    where that cannot be asked for (the check of :func:`watch_scheduler` remains)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def scheduler_env() -> dict[str, str]:
    """The environment entry naming this process as the scheduler of its workers."""
    return {SCHEDULER_ENV: f"{os.getpid()}:{process_start()}"}


def watch_scheduler(value: str | None, every: float = WATCH_EVERY) -> bool:
    """Watch the scheduler named by ``value`` (``pid:start``, see :func:`scheduler_env`)
    from a daemon thread that sends this process SIGTERM once it is gone. False, and no
    thread, when it is gone already (it may have died before :func:`die_with_parent` was
    asked): the caller exits instead of starting work. True without a scheduler to watch."""
    try:
        pid, start = (int(part) for part in (value or "").split(":"))
    except ValueError:
        return True
    if not owner_alive(pid, start):
        log.warning("orphaned: scheduler pid %d is gone; not starting", pid)
        return False

    def watch() -> None:
        while owner_alive(pid, start):
            time.sleep(every)  # the check's period, not synchronisation
        log.warning("orphaned: scheduler pid %d is gone; stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="lrq-watch-scheduler").start()
    return True


_registered: list[Path] = []


def register_worker(spool: Spool) -> Path:
    """Mark this process as a live worker of ``spool``'s queue until it exits (or calls
    :func:`unregister_workers`)."""
    folder = spool.root / WORKERS
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{os.getpid()}-{process_start()}"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    if not _registered:
        atexit.register(unregister_workers)
    _registered.append(path)
    return path


def unregister_workers() -> None:
    """Remove this process's worker files. Runs at exit; a forked worker, which
    multiprocessing ends with ``os._exit``, calls it itself. What ``os._exit`` or a kill
    leaves behind, :func:`live_workers` removes."""
    while _registered:
        _unlink(_registered.pop())


def live_workers(spool: Spool) -> list[int]:
    """Pids of the running worker processes of ``spool``'s queue; files of dead ones are
    removed."""
    live = []
    try:
        entries = list(os.scandir(spool.root / WORKERS))
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            pid, start = (int(part) for part in entry.name.split("-"))
        except ValueError:
            continue  # not ours: left alone
        if owner_alive(pid, start):
            live.append(pid)
        else:
            _unlink(Path(entry.path))
    return sorted(live)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
