"""Owner files: one per worker process and queue, the inode every claim of that process is
a hard link to (see :mod:`lrq.spool`, "Claims").

``<queue>/owners/<host>-<pid>-<start>-<token>`` holds a fixed-size JSON record, padded with
spaces: the owner (host, pid, process start, token, since) and ``handling``, the batches in
the handler now. The file is created once per process (a new inode per claim is what made
claiming slow: ext4 checks recently deleted inodes on every create, and cleanup deletes done
batches all the time). From then on a claim is one ``link(2)``, the handled mark one
``pwrite`` of the record, a heartbeat one ``futimens`` of the shared inode for every claim.

The process keeps the file open and writes through the descriptor, so its record and
heartbeat do not depend on the path: a link made since, or a cleanup that removed the path
(it removes only a dead owner's file without links), cannot make it lose track. A process
whose owner file reaches the filesystem's link limit (``EMLINK``: ext4 caps an inode at
65,000; only live claims and the rare fallback ``.done`` link of :meth:`Spool.mark_done` hold
links, since done batches move to ``done/`` and drop their claim) or whose path is gone starts
a new one (:meth:`rotate`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from lrq.spool.files import FILE_MODE

log = logging.getLogger(__name__)

OWNERS = "owners"
#: Bytes of an owner record; rewritten in place, so its size never changes.
RECORD = 1024
#: Names ``handling`` keeps at most, the newest: a worker has one batch in its handler (two
#: while storing behind); a claim lost to the reaper is never marked handled by its owner,
#: so its name would otherwise stay for the process's life.
HANDLING_CAP = 16
#: Reads of a record being rewritten that a reader retries before calling it unreadable.
READ_TRIES = 3


@dataclass(frozen=True)
class OwnerId:
    """The inode of an owner file: a claim is ours when ``right/<name>`` is this inode."""

    dev: int
    ino: int


class Owner:
    """This process's owner file for one queue, made and held by its
    :class:`~lrq.spool.Spool` (:meth:`~lrq.spool.claims.Claims.owner`); thread-safe."""

    def __init__(self, folder: Path, start: int) -> None:
        self.folder = folder
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.start = start
        self._lock = threading.Lock()
        self._handling: list[str] = []
        #: Every owner file this process made for the queue: (path, fd, id), newest last.
        self.files: list[tuple[Path, int, OwnerId]] = []
        self.token = ""
        self.rotate()

    @property
    def path(self) -> Path:
        return self.files[-1][0]

    @property
    def id(self) -> OwnerId:
        return self.files[-1][2]

    def rotate(self) -> None:
        """Start a new owner file (the first one, or after ``EMLINK`` or a lost path)."""
        with self._lock:
            self.token = secrets.token_hex(6)
            path = self.folder / f"{self.host}-{self.pid}-{self.start}-{self.token}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                os.pwrite(fd, self._record(), 0)
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            self.files.append((path, fd, OwnerId(st.st_dev, st.st_ino)))
        log.debug("owner-file path=%s", path)

    def _record(self) -> bytes:
        handling = self._handling
        while True:
            # orjson: 0.25 µs against json's 3 µs, and a record is written twice a batch.
            raw = orjson.dumps({"host": self.host, "pid": self.pid, "start": self.start,
                                "token": self.token, "since": time.time(),
                                "handling": handling})
            if len(raw) <= RECORD or not handling:  # only with names far longer than lrq's
                break
            handling = handling[1:]
        return raw.ljust(RECORD)

    def handling(self, name: str, on: bool, oid: OwnerId) -> None:
        """Note that batch ``name`` is in the handler (or no longer is): one ``pwrite`` of the
        record into the owner file ``oid`` (the one its claim links to, where the reaper reads
        it). The write also sets that inode's mtime: a claim's first heartbeat."""
        with self._lock:
            if on:
                self._handling.append(name)
                del self._handling[:-HANDLING_CAP]
            elif name in self._handling:
                self._handling.remove(name)
            else:
                return
            for _path, fd, i in self.files:
                if i == oid:
                    os.pwrite(fd, self._record(), 0)

    def touch(self) -> None:
        """Refresh the lease of every claim of this process: one ``futimens`` per owner file
        (one, unless it was rotated)."""
        for _path, fd, _id in self.files:
            os.utime(fd)

    def ids(self) -> set[OwnerId]:
        return {i for _p, _fd, i in self.files}

    def close(self) -> None:
        """At exit (or when its spool is collected): remove owner files no claim or done
        marker links to any more. Only in the process that made them: a forked child that
        inherited the object leaves its parent's files alone."""
        if os.getpid() != self.pid:
            return
        for path, fd, oid in self.files:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if st.st_nlink == 1 and (st.st_dev, st.st_ino) == (oid.dev, oid.ino):
                    os.unlink(path)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files.clear()  # closed once: a descriptor number may be reused afterwards


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """An owner record (trailing spaces allowed), or None if this is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if isinstance(data, dict) and "handling" in data and "token" in data:
        return data
    return None


def name_fields(filename: str) -> tuple[str, int, int] | None:
    """(host, pid, start) from an owner file's name; None for a name lrq does not make."""
    parts = filename.rsplit("-", 3)
    if len(parts) != 4:
        return None
    try:
        return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        return None
