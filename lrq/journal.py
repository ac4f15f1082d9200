"""The ingest journal: items clients sent over HTTP, durable before they are acknowledged, read
by the sniffer of a ``kind = "ingest"`` queue (:mod:`lrq.sources.ingest`). This docstring is
its on-disk protocol.

Layout, per queue, under ``<data_dir>/<queue>/ingest/`` (0700)::

    <segment>.seg   records, appended; ``<segment>`` is a 12-digit number, one more than the
                    newest before it
    head            the last record written: 20 bytes, ``>QQI`` (segment, end offset,
                    crc32 of those 16 bytes), rewritten in place after each append
    writer.lock     ``flock``-ed by a writer around each append (any process, any thread)

A record is one request's items: a 16-byte header ``>4sIII`` (magic ``LRQJ``, payload
length, item count, crc32 of the payload), then the payload, the request body as the client
sent it (a JSON list of objects, validated before it is written; never re-encoded).

Writing (:class:`Writer`): under ``writer.lock``, read ``head``; ``pwrite`` the record at the
head's end offset (a file longer than that holds a torn record of a writer that died
mid-append: it is cut off first), then rewrite ``head``. The lock is dropped and the segment
fsynced; only then is the request answered 202. Group commit: threads of one writer that
appended while another thread's fsync ran share the next one (one fsync per group, not per
request). A failed write or fsync answers an error and retires the segment: the next append
starts a new one, so nothing is ever appended after bytes of unknown state.

A writer's first append (a new process, or after an error) always starts a new segment.
This is what makes power loss safe: the reader may have read records that were written but
not yet fsynced (it reads the page cache), and saved a position past them; were the lost
tail to be overwritten by new records, the reader would skip them. Segments also start anew
above ``segment_bytes``.

Reading (:class:`Reader`, the sniffer's process): a position is ``[segment, offset, skip]``,
a record's start and the items of it already taken. A segment is *closed* once a newer one
exists (no writer appends to it again: writers only append at the head, and the head moves
to a new segment under the lock): it is read to its end, and a torn last record (a writer
killed mid-append) is ignored, logged once (``ingest-torn-tail``). The newest segment is read
only up to the head's end offset: bytes past it belong to an append still running, or to one
that died before it finished. Segments wholly behind the saved position (the sniffer saves it
once the batch files holding their items are durable) are deleted (``ingest-segment-
deleted``), so the journal holds at most the unread items and one partly read segment.

Crash windows:

* killed mid-append, or after the write before ``head`` moved: the record is past the head's
  end, never read in the newest segment; the next writer cuts it off, or starts a new
  segment (the old one closed: a complete record there may then be read, an item never
  acknowledged, which "may or may not be stored" allows). The client saw no 202.
* killed after ``head`` moved, before the fsync: the record may be read and published; the
  client saw no 202; after power loss it may be gone (a new segment follows, see above).
* killed after the fsync, before the 202 reached the client: the item is stored; the client
  retries and the sink's unique keys absorb the second copy.

Failpoints (:mod:`lrq.failpoints`): ``ingest-mid-write`` (half a record written),
``ingest-before-head`` (the record written, the head not moved), ``ingest-before-fsync``
(the head moved, nothing fsynced yet).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrq import failpoints
from lrq.errors import LrqError, SourceError
from lrq.spool.files import fsync_dir

log = logging.getLogger(__name__)

FOLDER = "ingest"
SUFFIX = ".seg"
HEAD = "head"
LOCK = "writer.lock"
MAGIC = b"LRQJ"
HEADER = struct.Struct(">4sIII")
HEAD_RECORD = struct.Struct(">QQI")
#: A record longer than this is garbage (a torn header), not a request.
MAX_RECORD = 1 << 31
#: Bytes read at a time.
CHUNK = 1 << 20
#: Seconds a writer waits for ``writer.lock`` (held only around one append) before it gives
#: up: the request is answered 503.
LOCK_WAIT = 5.0
DIR_MODE = 0o700
FILE_MODE = 0o600


class JournalBusy(LrqError):
    """The ingest journal's writer lock was held too long by another writer; retry."""


class JournalFailed(LrqError):
    """The ingest journal could not make the items durable (a failed write or fsync)."""


def segment_name(n: int) -> str:
    return f"{n:012d}{SUFFIX}"


def segments(folder: Path) -> list[int]:
    """The segment numbers in ``folder``, oldest first (none when it does not exist)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-len(SUFFIX)]) for n in names
                  if n.endswith(SUFFIX) and n[:-len(SUFFIX)].isdigit())


def read_head(folder: Path) -> tuple[int, int] | None:
    """(segment, end offset) of the last record written, or None (no writer yet, or a
    record that does not check out)."""
    try:
        with open(folder / HEAD, "rb") as f:
            data = f.read(HEAD_RECORD.size)
    except FileNotFoundError:
        return None
    return _unpack_head(data)


def _unpack_head(data: bytes) -> tuple[int, int] | None:
    if len(data) < HEAD_RECORD.size:
        return None
    seg, end, crc = HEAD_RECORD.unpack(data[:HEAD_RECORD.size])
    return (seg, end) if zlib.crc32(data[:16]) == crc else None


def _pack_head(seg: int, end: int) -> bytes:
    body = struct.pack(">QQ", seg, end)
    return body + struct.pack(">I", zlib.crc32(body))


def record(payload: bytes, count: int) -> bytes:
    """One record: the header and ``payload`` (a JSON list of ``count`` items)."""
    return HEADER.pack(MAGIC, len(payload), count, zlib.crc32(payload)) + payload


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# -- writing --------------------------------------------------------------------------
@dataclass(frozen=True)
class Appended:
    """Where a record went: its segment, offset and length."""

    segment: int
    offset: int
    length: int


class Writer:
    """Appends records to one queue's journal; thread-safe, and safe beside writers in other
    processes (``writer.lock``). :meth:`append` returns once the record is durable."""

    def __init__(self, folder: Path, segment_bytes: int = 16 * 2**20,
                 lock_wait: float = LOCK_WAIT) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.lock_wait = lock_wait
        self._lock = threading.Lock()  # the segment, its descriptor, the generation
        self._sync_lock = threading.Lock()  # one fsync at a time; others wait and share it
        self._lock_fd: int | None = None
        self._head_fd: int | None = None
        self._fd: int | None = None
        self._seg = -1
        #: Appends so far (written, not necessarily durable), the last one durable, and the
        #: last one whose fsync (or its segment's) failed: those never answer success.
        self._gen = 0
        self._synced = 0
        self._failed = 0
        #: fsyncs run (a group of appends shares one): tests and the bench read it.
        self.fsyncs = 0

    def append(self, payload: bytes, count: int) -> Appended:
        """Write one record and make it durable. Raises :class:`JournalBusy` (another writer
        held the lock past ``lock_wait``), :class:`JournalFailed` (an fsync failed) or the
        ``OSError`` of a failed write (``ENOSPC``...): then nothing is acknowledged."""
        data = record(payload, count)
        with self._lock:
            with self._flocked():
                head = self._head()
                self._place(head, len(data))
                start = head[1] if head is not None and head[0] == self._seg else 0
                assert self._fd is not None
                try:
                    if head is not None and head[0] == self._seg and \
                            os.fstat(self._fd).st_size > start:
                        # A writer of this segment died mid-append: cut its torn record.
                        os.ftruncate(self._fd, start)
                        log.warning("ingest-torn-tail-cut folder=%s segment=%d offset=%d",
                                    self.folder, self._seg, start)
                    if os.environ.get(failpoints.ENV) == "ingest-mid-write":
                        _write_all(self._fd, data[:len(data) // 2], start)  # half, then die
                        failpoints.hit("ingest-mid-write")
                    _write_all(self._fd, data, start)
                    failpoints.hit("ingest-before-head")
                    self._write_head(self._seg, start + len(data))
                except OSError:
                    self._retire()
                    raise
            self._gen += 1
            gen, seg = self._gen, self._seg
        failpoints.hit("ingest-before-fsync")
        self._sync(gen)
        return Appended(seg, start, len(data))

    def _place(self, head: tuple[int, int] | None, size: int) -> None:
        """Point ``self._fd`` at the segment to append to (under both locks): a new one at
        this writer's first append or past ``segment_bytes``, else the head's (another
        writer may have moved it)."""
        if self._fd is not None and head is not None and head[0] != self._seg:
            self._retire()  # another writer started a newer segment: append there
            self._open(head[0])
        elif self._fd is not None and head is None:
            self._retire()  # the head is unreadable: start anew rather than guess
        if self._fd is None:
            self._new(head)
        elif head is not None and head[1] + size > self.segment_bytes and head[1] > 0:
            self._retire()
            self._new(head)

    def _new(self, head: tuple[int, int] | None) -> None:
        """Start the next segment and point the head at its start. The old head segment is
        left as it is: after a power loss the head (never fsynced) may be older than records
        fsynced and acknowledged, so its end must not be trusted to cut anything there; the
        reader ignores a closed segment's torn tail."""
        n = max([*segments(self.folder), head[0] if head else 0, self._seg]) + 1
        fd = os.open(self.folder / segment_name(n), os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            fsync_dir(self.folder)  # the segment's name is durable before anything in it
            self._write_head(n, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._seg = fd, n
        log.info("ingest-segment-started folder=%s segment=%d", self.folder, n)

    def _open(self, n: int) -> None:
        try:
            self._fd = os.open(self.folder / segment_name(n), os.O_RDWR)
        except FileNotFoundError:
            self._fd = None  # deleted (read already?): start a new one instead
            return
        self._seg = n

    def _retire(self) -> None:
        """Close the current segment's descriptor; appends written to it and not yet fsynced
        are fsynced first, and fail if that does (the next append starts a new segment)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._synced < self._gen:
                os.fsync(fd)
                self.fsyncs += 1
        except OSError as e:
            self._failed = self._gen
            log.error("ingest-fsync-failed folder=%s segment=%d: %s", self.folder, self._seg,
                      e.strerror)
        finally:
            os.close(fd)

    def _sync(self, gen: int) -> None:
        with self._sync_lock:
            if gen <= self._failed:
                raise JournalFailed(f"fsync of the ingest journal in {self.folder} failed")
            if self._synced >= gen:
                return  # another thread's fsync covered this append
            with self._lock:
                target = self._gen
                fd = None if self._fd is None else os.dup(self._fd)
            try:
                if fd is not None:  # else retired since: _retire fsynced it
                    os.fsync(fd)
                    self.fsyncs += 1
            except OSError as e:
                with self._lock:
                    self._failed = max(self._failed, target)
                    self._retire()
                raise JournalFailed(f"fsync of the ingest journal in {self.folder} failed: "
                                    f"{e.strerror}") from e
            finally:
                if fd is not None:
                    os.close(fd)
            if gen <= self._failed:
                raise JournalFailed(f"fsync of the ingest journal in {self.folder} failed")
            self._synced = max(self._synced, target)

    def _head(self) -> tuple[int, int] | None:
        return _unpack_head(os.pread(self._head_file(), HEAD_RECORD.size, 0))

    def _head_file(self) -> int:
        if self._head_fd is None:
            self._head_fd = os.open(self.folder / HEAD, os.O_RDWR | os.O_CREAT, FILE_MODE)
        return self._head_fd

    def _write_head(self, seg: int, end: int) -> None:
        _write_all(self._head_file(), _pack_head(seg, end), 0)

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        if self._lock_fd is None:
            self.folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
        deadline = time.monotonic() + self.lock_wait
        wait = 0.0005
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise JournalBusy(f"the ingest journal in {self.folder} stayed locked for "
                                  f"{self.lock_wait:g}s by another writer; retry")
            time.sleep(wait)  # a bounded backoff on a lock held for one append
            wait = min(wait * 2, 0.02)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            self._retire()
            for fd in (self._lock_fd, self._head_fd):
                if fd is not None:
                    os.close(fd)
            self._lock_fd = self._head_fd = None


# -- reading --------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    offset: int
    count: int
    payload: bytes
    end: int


@dataclass(frozen=True)
class Unread:
    """What the journal holds past a position: bytes, items and segments."""

    bytes: int
    items: int
    segments: int


def _records(fd: int, start: int, end: int, payloads: bool = True) -> Iterator[Record]:
    """The valid records of the segment open at ``fd`` from ``start`` up to ``end``; stops
    at the first incomplete or invalid one (check where the last one ended). Reads
    :data:`CHUNK` bytes at a time; without ``payloads``, only the headers (counting)."""
    buf, base = b"", start
    off = start
    while off + HEADER.size <= end:
        if not (base <= off and off + HEADER.size <= base + len(buf)):
            buf, base = os.pread(fd, max(CHUNK, HEADER.size), off), off
            if len(buf) < HEADER.size:
                return
        magic, length, count, crc = HEADER.unpack_from(buf, off - base)
        rec_end = off + HEADER.size + length
        if magic != MAGIC or length >= MAX_RECORD or rec_end > end:
            return
        payload = b""
        if payloads:
            if rec_end > base + len(buf):
                buf, base = os.pread(fd, max(CHUNK, rec_end - off), off), off
                if len(buf) < rec_end - off:
                    return
            payload = buf[off - base + HEADER.size:rec_end - base]
            if zlib.crc32(payload) != crc:
                return
        yield Record(off, count, payload, rec_end)
        off = rec_end


def parse_position(position: Any) -> tuple[int, int, int] | None:
    """``[segment, offset, skip]`` (None: from the start); a :class:`SourceError` for
    anything else (a position another source kind saved)."""
    if position is None:
        return None
    if isinstance(position, (list, tuple)) and len(position) == 3 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in position):
        return position[0], position[1], position[2]
    raise SourceError(f"saved position {position!r} is not an ingest journal position "
                      "[segment, offset, skip]; was the queue's source kind changed? Delete "
                      "the queue's position.json once its old source's batches are stored")


class Reader:
    """Reads one queue's journal by position (:mod:`lrq.sources.ingest`). Single-threaded:
    the sniffer's process, under the sniffer lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        #: Closed segments whose torn tail was logged (once each).
        self._torn: set[int] = set()
        #: The last record decoded, for a fetch that resumes inside it: (segment, offset).
        self._cached: tuple[tuple[int, int], list[Any]] | None = None

    def read(self, position: Any, limit: int) -> tuple[list[dict[str, Any]], list[int] | None]:
        """Up to ``limit`` items after ``position`` and the position after them."""
        segs = segments(self.folder)
        start = parse_position(position)
        if not segs:
            return [], None if start is None else list(start)
        seg, off, skip = start if start is not None else (segs[0], 0, 0)
        head = read_head(self.folder)
        items: list[dict[str, Any]] = []
        while len(items) < limit:
            later = [s for s in segs if s > seg]
            if seg not in segs:  # deleted, or a position past a segment lost in a crash
                if not later:
                    break
                seg, off, skip = later[0], 0, 0
                continue
            path = self.folder / segment_name(seg)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                segs.remove(seg)
                continue
            try:
                size = os.fstat(fd).st_size
                end = size if later else (min(head[1], size) if head and head[0] == seg else 0)
                last = off
                for rec in _records(fd, off, end):
                    last = rec.end
                    got = self._items(seg, rec)
                    take = got[skip:skip + limit - len(items)]
                    items.extend(take)
                    if skip + len(take) < len(got):
                        off, skip = rec.offset, skip + len(take)
                        break
                    off, skip = rec.end, 0
                    if len(items) >= limit:
                        break
            finally:
                os.close(fd)
            if len(items) >= limit or not later:
                break
            if last < size and off >= last and seg not in self._torn:
                self._torn.add(seg)
                log.warning("ingest-torn-tail queue-folder=%s segment=%d offset=%d bytes=%d: "
                            "a writer died mid-append; the record was never acknowledged",
                            self.folder, seg, last, size - last)
            seg, off, skip = later[0], 0, 0
        return items, [seg, off, skip]

    def _items(self, seg: int, rec: Record) -> list[Any]:
        if self._cached is not None and self._cached[0] == (seg, rec.offset):
            return self._cached[1]
        got: list[Any] = json.loads(rec.payload)
        self._cached = ((seg, rec.offset), got)
        return got

    def unread(self, position: Any) -> Unread:
        """Bytes, items and segments from ``position`` to the end (headers only: a pread per
        record past the position). Bytes count whole segments from the position's offset,
        torn tails included: it is what the journal holds on disk."""
        segs = segments(self.folder)
        start = parse_position(position)
        seg0, off0, skip0 = start if start is not None else (segs[0] if segs else 0, 0, 0)
        head = read_head(self.folder)
        total = items = n = 0
        for seg in (s for s in segs if s >= seg0):
            off = off0 if seg == seg0 else 0
            try:
                fd = os.open(self.folder / segment_name(seg), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                size = os.fstat(fd).st_size
                n += 1
                total += max(0, size - off)
                later = seg < segs[-1]
                end = size if later else (min(head[1], size) if head and head[0] == seg else 0)
                for rec in _records(fd, off, end, payloads=False):
                    items += rec.count - (skip0 if (seg, rec.offset) == (seg0, off0) else 0)
            finally:
                os.close(fd)
        return Unread(bytes=total, items=items, segments=n)

    def unread_bytes(self, position: Any) -> int:
        """The bytes of :meth:`unread` without reading a record: a listing and a stat per
        segment (the web server asks it per request)."""
        segs = segments(self.folder)
        start = parse_position(position)
        seg0, off0 = (start[0], start[1]) if start is not None else (segs[0] if segs else 0, 0)
        total = 0
        for seg in segs:
            if seg < seg0:
                continue
            with contextlib.suppress(FileNotFoundError):
                total += max(0, os.stat(self.folder / segment_name(seg)).st_size
                             - (off0 if seg == seg0 else 0))
        return total

    def delete_behind(self, segment: int) -> int:
        """Delete the segments older than ``segment`` (wholly behind a saved position);
        return how many. Not fsynced: a deletion lost in a crash is redone next time."""
        n = 0
        for seg in segments(self.folder):
            if seg >= segment:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folder / segment_name(seg))
                n += 1
                self._torn.discard(seg)
                log.info("ingest-segment-deleted folder=%s segment=%d", self.folder, seg)
        return n
