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
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import shortuuid

from lrq import failpoints
from lrq.errors import AlreadyRunning, ForeignEntry
from lrq.regular import kind as kind
from lrq.regular import read_regular as read_regular

SUFFIX = ".pkl"
DONE = ".done"
ERROR = ".error"
ATTEMPT = ".attempt"
DIR_MODE = 0o700
FILE_MODE = 0o600
#: The mode of a batch file whose items the source has not been told are stored (a source
#: acknowledged at commit): set at publish, kept through ``left/``, ``failed/`` and
#: ``done/`` (renames keep it), put back to :data:`FILE_MODE` by :mod:`lrq.acker` once the
#: source acknowledged them. Retention never removes such a file. A mode, not a marker
#: file: the acknowledgement costs one ``chmod``, no inode.
AWAITING_ACK_MODE = 0o400
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


def create(path: Path) -> int:
    """A new file at ``path`` open for writing (never an existing one)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)


def write_atomic(path: Path, data: bytes, tmp_dir: Path, *, sync_dir: bool = True,
                 opener: Callable[[Path], int] = create) -> None:
    """Write ``data`` to ``path`` so that a reader sees all of it or nothing.

    Any error (including from fsync or close) removes the temporary file and propagates:
    the caller must then treat the write as not having happened. With ``sync_dir=False`` the
    file is visible but its name is not yet durable: the caller fsyncs ``path.parent`` once
    for several files (group commit) before relying on any of them. ``opener`` makes the
    temporary file and opens it empty for writing (the publisher's takes a spare, see
    :func:`take_spare`).
    """
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{token(8)}"
    fd = opener(tmp)
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


def reusable(st: os.stat_result) -> bool:
    """Is this a file a spare may be made of, or taken from: a regular file of ours with
    one link (a second link would be someone else's name for the same bytes)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def retire(path: Path, spare_dir: Path) -> int | None:
    """Make the retired batch file ``path`` a spare: truncate it to 0 bytes, then rename it
    into ``spare_dir`` under a new random name. Returns the bytes freed, or None when it is
    not :func:`reusable` or ``spare_dir`` is missing (the caller unlinks it instead).

    Truncated first: killed in between (failpoint ``retire-after-truncate``), the batch is
    still done, as an empty file with its done time kept, and retired again by the next
    pass; a spare never holds data. Opened without following links or blocking (a FIFO),
    and nothing is written but the truncation, which comes only after ``fstat`` says the
    file is reusable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # gone, a symlink (ELOOP), a FIFO with no reader (ENXIO): unlink path
    try:
        st = os.fstat(fd)
        if not reusable(st):
            return None
        os.ftruncate(fd, 0)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))  # its done time, for retention
    finally:
        os.close(fd)
    failpoints.hit("retire-after-truncate")
    try:
        os.rename(path, spare_dir / token(12))
    except FileNotFoundError:
        return None
    return st.st_size


def take_spare(spare: Path, dst: Path) -> int | None:
    """Move the spare ``spare`` to ``dst`` (in ``tmp/``) and return it open for writing,
    empty; None when it is gone (another publisher took it).

    The rename comes first: it is the one atomic step, so two publishers never write to one
    inode. The entry is checked with ``lstat`` before (a foreign entry is never moved or
    opened: :class:`~lrq.errors.ForeignEntry`) and the opened file with ``fstat`` after (same
    inode, still reusable; else it goes back to ``spare`` and ForeignEntry is raised). The
    open neither follows links nor blocks, and truncation waits for those checks. Killed
    after the rename (failpoint ``spare-after-take``), ``dst`` is an empty orphan in
    ``tmp/``: its mtime is its retirement's but the rename set its ctime, which is what
    the tmp sweep ages an empty file by."""
    try:
        st = os.lstat(spare)
    except FileNotFoundError:
        return None
    if not reusable(st):
        raise ForeignEntry(spare, kind(st.st_mode) if not stat.S_ISREG(st.st_mode)
                           else f"a file with {st.st_nlink} links owned by uid {st.st_uid}")
    try:
        os.rename(spare, dst)
    except FileNotFoundError:
        return None
    failpoints.hit("spare-after-take")
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.rename(dst, spare)
        raise ForeignEntry(spare, f"not reopenable ({e.strerror})") from e
    try:
        now = os.fstat(fd)
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev) or not reusable(now):
            raise ForeignEntry(spare, "replaced while it was taken")
        os.ftruncate(fd, 0)
        if stat.S_IMODE(now.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.rename(dst, spare)
        raise
    return fd


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
