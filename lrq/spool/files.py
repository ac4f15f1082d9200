"""File primitives of the spool: names of the files beside a batch, atomic writes, directory
fsyncs, ``flock`` singletons, and reading only regular files (anything else in a queue folder
is a *foreign entry*, see :mod:`lrq.spool`; the reading itself is :mod:`lrq.regular`'s).
Nothing here knows what a batch or a claim is.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import shortuuid

from lrq import failpoints
from lrq.errors import AlreadyRunning
from lrq.regular import kind as kind
from lrq.regular import read_regular as read_regular

SUFFIX = ".pkl"
DONE = ".done"
ERROR = ".error"
ATTEMPT = ".attempt"
DIR_MODE = 0o700
FILE_MODE = 0o600
_uuid = shortuuid.ShortUUID()
#: shortuuid's alphabet (no 0/1/I/O/l): the random part of names keeps its look.
ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def token(length: int) -> str:
    """``length`` random characters of :data:`ALPHABET` from ``os.urandom`` (never the
    ``random`` module's state, which forked processes share): one system call and a few
    divisions, where ``shortuuid.random`` asks the OS once per character (12 µs for 12
    characters against 2 µs; the sniffer names two files per batch)."""
    value = int.from_bytes(os.urandom((length * 6 + 7) // 8 + 1))  # 6 bits >= log2(57)
    out = []
    for _ in range(length):
        value, r = divmod(value, len(ALPHABET))
        out.append(ALPHABET[r])
    return "".join(out)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that a reader sees all of it or nothing.

    Any error (including from fsync or close) removes the temporary file and propagates:
    the caller must then treat the write as not having happened. With ``sync_dir=False`` the
    file is visible but its name is not yet durable: the caller fsyncs ``path.parent`` once
    for several files (group commit) before relying on any of them.
    """
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{token(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:1 << 20]):]
                failpoints.hit("sniff-mid-write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def flock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path``; the kernel drops it if we die."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(f"{what} is already running (pid {holder}; lock {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _entries_from(fd: int, offset: int, limit: int) -> list[str]:
    """Up to ``limit`` names of the directory open at ``fd``, read from ``offset`` on."""
    os.lseek(fd, offset, os.SEEK_SET)
    with os.scandir(fd) as it:
        return [e.name for e in itertools.islice(it, limit) if is_regular(e)]


def is_regular(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_file(follow_symlinks=False)
    except OSError:
        return False
