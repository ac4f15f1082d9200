"""Pausing a queue: the operator's brake, shared by every process and kept across restarts.

A pause is one small file, ``<data_dir>/<queue>/paused.json``, beside the queue's
``position.json``: ``{"since": "<ISO 8601 UTC>", "by": "<who>"}``, written atomically
(``tmp/`` then rename, fsynced, as the position is) by :func:`pause` and removed by
:func:`resume`. Its *existence* is the pause; its content only says since when and by whom
(a file that cannot be read still pauses, shown with its mtime and ``by`` "unknown").
It lives at the queue's root, not in one of the batch folders, so no listing, the disk
budget (which counts the batch folders and logs) or the foreign-entry scan ever sees it; a
``tmp/`` leftover of a write killed halfway is swept by cleanup like any orphan.

Who reads it, and what a pause means for them:

* the **sniffer** publishes nothing while paused (:meth:`lrq.sniffer.Sniffer.tick` looks
  once per tick and once per batch published); a broker source's acker keeps stepping, so
  done batches are still acknowledged and held entries kept (not stolen by another node);
* a **worker** claims nothing new (:meth:`lrq.worker.Worker.run` looks before each claim
  attempt: one ``faccessat``, ~2 µs against ~220 µs for a warm pick and release,
  ``bench/control_cost.py``) but finishes what it
  holds, its commit in flight included; ``lrq work --batch NAME`` by hand is the exception,
  an operator asking for one batch (to debug it while the queue stands still);
* the **scheduler** starts no worker process for a paused queue; the ones running finish
  their batch and exit on their idle timeout. ``lrq run --until-idle`` does not count a
  paused queue with work left as idle: it waits for ``lrq resume`` (logging that once),
  without spinning (the jobs run at their usual pace; each look is a stat: a scheduler
  whose only queue is paused with 2000 items waiting used 0.13 s of CPU in 30 s, 0.4% of
  a core at ``interval = 0.25``, as much as an idle one);
* cleanup and the reaper go on as usual.

:class:`Watch` is one process's view of one queue: every look is one ``faccessat``; the file is
read, and ``paused`` / ``resumed`` logged, only when the answer changes, so each process says
it once. :meth:`lrq.app.App.watch` hands out one per queue, shared by the process's sniffer,
scheduler jobs and worker.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lrq.errors import ConfigError, ForeignEntry
from lrq.regular import read_regular

log = logging.getLogger(__name__)

#: The pause file, in the queue's folder (``<data_dir>/<queue>/``).
NAME = "paused.json"
#: The longest ``by`` accepted (it is shown in logs, status and the web page).
BY_CHARS = 100


def path(data_dir: Path | str, queue: str) -> Path:
    """Where ``queue``'s pause file lives."""
    return Path(data_dir) / queue / NAME


def default_by() -> str:
    """``user@host``: who paused, when the operator does not say."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _check_by(by: str) -> str:
    by = by.strip()
    if not by or len(by) > BY_CHARS or not by.isprintable():
        raise ConfigError(f"--by {by!r}: give who pauses as printable text of 1 to "
                          f"{BY_CHARS} characters (default user@host)")
    return by


def _now() -> str:
    return _iso(datetime.now(UTC))


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def pause(data_dir: Path | str, queue: str, by: str | None = None) -> dict[str, Any]:
    """Pause ``queue`` and return its record (``since``, ``by``). Pausing a paused queue
    changes nothing and returns the first pause's record. The caller checks the queue is
    configured (:meth:`lrq.app.App.pause`)."""
    who = _check_by(by if by is not None else default_by())
    current = paused(data_dir, queue)
    if current is not None:
        return current
    record = {"since": _now(), "by": who}
    target = path(data_dir, queue)
    tmp = target.parent / "tmp"
    tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    from lrq.spool.files import write_atomic  # the spool's writer: fsynced file and folder

    write_atomic(target, json.dumps(record).encode(), tmp)
    return record


def resume(data_dir: Path | str, queue: str, by: str | None = None) -> bool:
    """Lift ``queue``'s pause; False when it was not paused. Rings the queue's doorbell, so a
    worker waiting idle looks again at once instead of at its next timeout. ``by`` is for the
    caller's log line; nothing keeps it."""
    target = path(data_dir, queue)
    try:
        os.unlink(target)
    except FileNotFoundError:
        return False
    from lrq.spool.files import fsync_dir

    with contextlib.suppress(OSError):
        fsync_dir(target.parent)  # a resume survives a crash as the pause does
    from lrq.spool.wake import NAME as WAKE
    from lrq.spool.wake import Doorbell

    Doorbell(target.parent / WAKE).ring()
    return True


def paused(data_dir: Path | str, queue: str) -> dict[str, Any] | None:
    """``{"since": ISO 8601 UTC, "by": str}`` while ``queue`` is paused, else None."""
    return _read(path(data_dir, queue))


def _read(target: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(read_regular(target))
        if isinstance(record, dict) and isinstance(record.get("since"), str) \
                and isinstance(record.get("by"), str):
            return {"since": record["since"], "by": record["by"]}
        why = "not a pause record"
    except FileNotFoundError:
        return None
    except (ForeignEntry, ValueError, UnicodeDecodeError) as e:  # ValueError: bad JSON
        why = str(e)
    # The file is there, so the queue is paused, whatever it holds.
    try:
        since = datetime.fromtimestamp(os.lstat(target).st_mtime, UTC)
    except FileNotFoundError:
        return None  # resumed while we looked
    return {"since": _iso(since), "by": f"unknown ({target} unreadable: {why})"}


def quoted(value: str) -> str:
    """``value`` as a log field: bare when it is one word, else JSON-quoted, so a ``by``
    with spaces stays one field (:mod:`lrq.logjson` parses both)."""
    if value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return json.dumps(value)


class Watch:
    """One process's view of one queue's pause (see the module docstring)."""

    def __init__(self, data_dir: Path | str, queue: str) -> None:
        self.queue = queue
        self.path = path(data_dir, queue)
        self._where = str(self.path)
        self._record: dict[str, Any] | None = None
        self._seen: bool | None = None  # None: never looked
        self._lock = threading.Lock()  # the scheduler's sniff and work jobs share one

    def paused(self) -> dict[str, Any] | None:
        """The pause record, or None: one ``faccessat`` while nothing changes (1.5 µs; an
        ``lstat`` of a missing file raised and caught an exception: 5.5 µs)."""
        there = os.access(self._where, os.F_OK, follow_symlinks=False)
        if there is self._seen:
            return self._record
        with self._lock:
            if there is self._seen:
                return self._record
            record = _read(self.path) if there else None
            first, self._seen = self._seen is None, record is not None
            self._record = record
            if record is not None:
                log.info("paused queue=%s reason=operator by=%s since=%s: claiming and "
                         "publishing nothing new until `lrq resume %s`", self.queue,
                         quoted(record["by"]), record["since"], self.queue)
            elif not first:
                log.info("resumed queue=%s reason=operator", self.queue)
            return record
