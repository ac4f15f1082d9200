"""Reading a file only if it is a regular one: a FIFO, socket or directory where lrq expects
its own file must not block or crash the reader, and a symlink must not be followed. Used by
the spool (:mod:`lrq.spool.files`) and for the key file (:mod:`lrq.signing`), so it imports
neither.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

from lrq.errors import ForeignEntry


def kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return kind
    return "not a regular file"


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file lrq wrote, or :class:`ForeignEntry` for anything else.

    Opened with ``O_NONBLOCK | O_NOFOLLOW`` and checked with ``fstat`` before reading: a FIFO
    opens at once and is refused instead of blocking the read forever, a symlink is refused
    instead of followed (to ``/dev/zero``, say), and an unreadable file is reported, not
    raised as a traceback."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as e:
        what = "a symlink" if e.errno == errno.ELOOP else f"unreadable ({e.strerror})"
        raise ForeignEntry(path, what) from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ForeignEntry(path, kind(mode))
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ForeignEntry(path, f"unreadable ({e.strerror})") from e
    finally:
        os.close(fd)


def create_once(path: Path, content: bytes) -> bool:
    """Make ``path`` (mode 0600) holding ``content`` unless it exists: written aside, fsynced,
    then hard-linked into place, so the first of racing writers (processes or threads) wins
    and nobody reads a half-written file. True when this call made it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
