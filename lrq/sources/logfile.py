"""``kind = "logfile"``: growing log files tailed with ``tail -F`` semantics, acknowledged at
publish (the sniffer saves the position only once the batch file is durable, as for SQL).

(Not :mod:`lrq.logfile`, which is lrq's own log handler. The position's records, the losses
journal and the lookups on disk are in :mod:`lrq.sources._logfiles`.)

```toml
[queues.access.source]
kind      = "logfile"
paths     = ["/var/log/apache2/access.log"]   # globs allowed, relative to the config dir
max_bytes = 65536        # a longer line is cut into parts, each marked (part, of)
# encoding = "utf-8"     # undecodable bytes are replaced (U+FFFD), never dropped
```

Items: ``id`` (``dev:inode:tag:offset``, plus ``:part`` for the parts of a cut line), ``line``
(the text without its newline), ``path`` (where the file was when read), ``offset`` (the byte
offset of the line's start) and, for a cut line, ``part`` (1-based) and ``of``. ``tag`` is a
short hash of the file's first line (``tag.N`` after the file's N-th truncation), so the ids
stay unique when a file is truncated and written again (copytruncate) or a deleted file's
inode is reused: ``dev:inode:offset`` alone would repeat an id the results already hold, and
the new line would be dropped as a replay. It depends only on the file's content and the
saved position, so a crash before the position is saved re-reads the same lines under the
same ids (the unique keys absorb them).

The position (``position.json``, a JSON value; the fields are
:class:`~lrq.sources._logfiles.Followed`'s) lists each known file: its identity
``(dev, ino)``, ``tag``, ``offset`` (the end of the last complete line handed out; with
``part``, the parts of a cut line there handed out already, so a line's parts may straddle
two fetches and no fetch comes back short, which would end the sniffer's tick), the last
size seen, the path where it was last seen and ``home``, the configured path it lived at;
and ``gone``, the identities and tags of the last files no longer followed (a new file
reusing one's inode with the same first line gets the next ``tag.N``). A fetch:

* expands the globs (a file is identified by ``(dev, ino)``, never by its name);
* finds each known file that is no longer at a glob path (rotated away): by the descriptor
  this process keeps open, else at its last path, else among the entries of its home's
  folder whose name starts with the home's name (``access.log.1``, ``access.log-20260101``,
  however often it was renamed since); such a file is read to its end before the files at
  the glob paths (older content first), and forgotten once read to its end and unchanged for
  ``GRACE`` seconds (a writer may still append until it reopens its log; a partial last line
  is then handed out as it is, since it will never complete);
* when a file that was at its home in the position has been rotated away, also reads the
  *generations* lrq never saw: unknown, uncompressed files beside the home, written no
  earlier than it (the file that took the home and was rotated away again while lrq was
  down, or before a crash saved the position);
* reads each file from its offset with big reads (``CHUNK``), splits on ``b"\\n"`` and holds
  a partial last line back until its newline arrives;
* detects truncation (copytruncate): the size below the offset, or the first line or the
  ``TAIL`` bytes before the offset changed under the same inode (a file truncated and
  written past the old offset before lrq looked; a fixed header line alone would hide it);
  the file is read again from 0, with a WARNING ``truncated``.

Losses are reported, never skipped silently: a known file that can no longer be found while
its offset is below its last known size, or a truncation that cut bytes not yet read, logs a
WARNING ``lost`` naming the file and the bytes, and is recorded in ``logfile-losses.json`` in
the queue's folder (at once, not with the position), which :meth:`LogfileSource.status`
shows. The windows that cannot be closed: while lrq is down, a file rotated away *and* moved
out of its home folder (or renamed to a name not starting with its home's name, or deleted)
cannot be found after the restart; its unread tail is reported lost (a generation never seen
and gone too is not known at all: nothing can report it). Before the first position is saved
lrq has not started following: files rotated away by then are not read (``tail -F`` started
after the rotation would not read them either). A running lrq keeps a descriptor on every
file it follows, so it reads a rotated or even deleted file to its end. Lines written
between logrotate's copy and its truncate are lost by copytruncate itself, and so are lines
not yet read when the truncate comes (reported, as above): prefer ``create`` rotation.
Don't glob a copytruncate setup's copies (a copy is a new file: its lines would be stored
twice, under other ids).

The encoding must write ``"\\n"`` as the byte ``0x0a`` (utf-8, latin-1, cp1252 ...; not
utf-16). A line is held in memory whole until its newline, up to ``LONGEST`` (64 MiB: past
that it is cut there, with a WARNING ``overlong``, and the rest is read as the next line);
its parts are cut at ``max_bytes`` (for utf-8, moved back to a character boundary so no
character is split). A carriage return before the newline is kept in the text.

``keys()`` is None: the ids of rotated-away files cannot be listed again, so ``lrq verify``
reconciles the ledger against the ``lag`` of :meth:`LogfileSource.status` (lines behind,
estimated from the bytes behind and the mean line length read so far).
"""
from __future__ import annotations

import codecs
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from lrq.config import take
from lrq.errors import ConfigError, SourceError
from lrq.sources import AckAt, Context, Fetched
from lrq.sources._logfiles import (
    LOSSES,
    Followed,
    Key,
    Loss,
    LossJournal,
    at_paths,
    beside,
    estimate,
    followed,
    generations,
)

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read
HEAD = 256  # at most this much of a file's first line makes its tag
GONE = 32  # files no longer followed kept in the position, for inodes reused
TAIL = 64  # bytes before the offset whose hash tells a truncation regrown past the offset
GRACE = 5.0  # seconds a rotated file read to its end stays watched for late appends
SCAN_EVERY = 1.0  # seconds between glob scans while reading a backlog (always after an EOF)
FIELDS = ("id", "line", "path", "offset")
#: A log queue's default ``batch_size`` (lrq.config): lines are small, and at lrq's usual 100
#: the spool's cost per batch file bounds the tail at 56k lines/s; at 1000, 176k lines/s
#: (bench/logfile_source.py, bench/README.md). A ``batch_size`` in the config wins.
BATCH_SIZE = 1000
LONGEST = 64 << 20  # bytes: a "line" without a newline in this many is cut (memory bound)


@dataclass(frozen=True)
class Settings:
    """The ``[queues.X.source]`` table of ``kind = "logfile"``."""

    paths: tuple[str, ...]
    max_bytes: int = 65536
    encoding: str = "utf-8"

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        """Check the options; relative paths (and globs) are made absolute against ``base``."""
        take(table, {"paths": list, "max_bytes": int, "encoding": str}, where, kind="logfile")
        paths = table.get("paths")
        if paths and not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"{where}.paths: expected a list of strings (files or globs), "
                              f"got {paths!r}")
        if not paths or not all(p.strip() for p in paths):
            raise ConfigError(f'{where}.paths: missing or empty; give a list of files or globs '
                              f'(e.g. paths = ["/var/log/apache2/access.log"])')
        max_bytes = table.get("max_bytes", cls.max_bytes)
        if max_bytes < 1:
            raise ConfigError(f"{where}.max_bytes: {max_bytes} is below 1; give the longest "
                              f"line in bytes before it is cut into parts (e.g. 65536)")
        encoding = table.get("encoding", cls.encoding)
        try:
            name = codecs.lookup(encoding).name
            ok = "\n".encode(name) == b"\n"
        except LookupError:
            raise ConfigError(f"{where}.encoding: unknown encoding {encoding!r} "
                              f'(e.g. encoding = "utf-8")') from None
        if not ok:
            raise ConfigError(f"{where}.encoding: {encoding!r} does not write a newline as one "
                              f'byte 0x0a; use an ASCII-compatible one (e.g. "utf-8")')
        return cls(paths=tuple(os.path.normpath(base / p.strip()) for p in paths),
                   max_bytes=max_bytes, encoding=name)


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=4).hexdigest()


def open(settings: Settings, context: Context | None = None) -> LogfileSource:  # noqa: A001
    """The kind's entry point for :func:`lrq.sources.build`: nothing is opened yet."""
    return LogfileSource(settings, context)


class LogfileSource:
    ack_at: AckAt = "publish"

    def __init__(self, cfg: Settings, context: Context | None = None) -> None:
        self.cfg = cfg
        self.context = context
        self.clock = time.monotonic
        self.wall = time.time
        self._utf8 = cfg.encoding == "utf-8"
        #: A line is held in memory until its newline, up to this; then it is cut there.
        self._longest = max(LONGEST, cfg.max_bytes)
        self._fds: dict[Key, int] = {}
        #: Read-ahead per file: (offset of data[0], data), reused by the next fetch.
        self._buf: dict[Key, tuple[int, bytes]] = {}
        #: Files quiet for GRACE after rotation: a trailing partial line is handed out.
        self._final: set[Key] = set()
        self._scan_at = float("-inf")
        self._rescan = True
        self._reported: set[str] = set()  # warnings logged and losses recorded, by event id
        #: The position's ``gone`` while a fetch works: [dev, ino, tag, gen] of retired files.
        self._gone: list[list[Any]] = []
        self.journal = LossJournal(None if context is None else
                                   Path(context.data_dir) / context.queue / LOSSES)

    # -- fetch ---------------------------------------------------------------------------
    def fetch(self, position: Any, limit: int) -> Fetched:
        """Up to ``limit`` items (complete lines, or parts of a cut line, which may straddle
        two fetches) past ``position``, rotated files first; the new position lists every
        file followed."""
        before = followed(position)
        gone = position.get("gone", []) if isinstance(position, dict) else []
        self._gone = [list(g) for g in gone]
        files = before
        if self._rescan or self.clock() - self._scan_at >= SCAN_EVERY or \
                any(f.key not in self._fds for f in files):
            files = self._locate(before)
        items: list[dict[str, Any]] = []
        self._rescan = False
        try:
            for f in files:
                if len(items) >= limit:
                    break
                if self._read(f, items, limit):
                    self._rescan = True  # at an end: look for rotations and new files next time
        except OSError as e:
            self._rescan = True
            raise SourceError(f"cannot read log file {f.path}: {e}") from e
        if len(items) < limit:
            self._rescan = True
        self._close_unused({f.key for f in before} | {f.key for f in files})
        out: dict[str, Any] = {"files": [f.to_json() for f in files]}
        if self._gone:
            out["gone"] = self._gone[-GONE:]
        return Fetched(items, out)

    def _read(self, f: Followed, items: list[dict[str, Any]], limit: int) -> bool:
        """Append ``f``'s complete lines past its offset to ``items`` (up to ``limit``) and
        move its offset; True when it was read to its end."""
        fd = self._fds[f.key]
        size = os.fstat(fd).st_size
        if size < f.offset or (f.tag is not None and not self._same(fd, 0, f.hl, f.tag)) or \
                (f.th is not None and not self._same(fd, f.offset - TAIL, TAIL, f.th)):
            self._truncated(f, size)
        f.size = size
        start, data = self._buf.get(f.key, (f.offset, b""))
        if not start <= f.offset <= start + len(data):
            start, data = f.offset, b""
        pos = f.offset - start
        prefix = f.prefix
        max_bytes, enc, path = self.cfg.max_bytes, self.cfg.encoding, f.path
        append, n = items.append, 0
        avg = max(16, f.offset // f.n) if f.n else 256  # bytes per line so far: the window
        eof, split = False, 0
        while len(items) < limit:
            if f.tag is not None:
                block = self._block(data, pos, start, limit - len(items), avg, prefix, path, items)
                if block is not None:
                    n, pos = n + block[0], block[1]
                    continue
            nl = data.find(b"\n", pos, pos + self._longest + 1)
            cut = False  # a line ended without its newline: the next one starts at ``nl``
            if nl < 0 and len(data) - pos > self._longest:
                nl, cut = pos + self._longest, True  # no newline in sight: cut here, go on
            elif nl < 0:
                more = os.pread(fd, max(CHUNK, min(len(data) - pos, self._longest)),
                                start + len(data))
                if more:
                    data, start, pos = data[pos:] + more, start + pos, 0
                    continue
                eof = True
                if f.key in self._final and pos < len(data):
                    nl, cut = len(data), True  # rotated and quiet: its last line never ends
                else:
                    break
            if f.tag is None:  # the first line (start == 0 here): it names the file
                head = data[:min(nl + 1, HEAD)]
                f.tag, f.hl = _hash(head), len(head)
                # A file gone from this (dev, inode) with the same first line: its ids are
                # in the results already, so this one counts on from its generation.
                f.gen = max([f.gen, *(g + 1 for d, i, t, g in self._gone
                                      if (d, i, t) == (f.dev, f.ino, f.tag))])
                prefix = f.prefix
            offset = start + pos
            if nl - pos <= max_bytes:
                append({"id": prefix + str(offset), "line": data[pos:nl].decode(enc, "replace"),
                        "path": path, "offset": offset})
            else:
                cuts = self._cuts(data, pos, nl)
                of, done = len(cuts), f.part if offset == f.offset else 0
                upto = min(of, done + limit - len(items))
                for part in range(done + 1, upto + 1):
                    a, b = cuts[part - 1]
                    append({"id": f"{prefix}{offset}:{part}", "line": data[a:b].decode(enc, "replace"),
                            "path": path, "offset": offset, "part": part, "of": of})
                if upto < of:  # the fetch is full: the next one hands out the rest
                    split, eof = upto, False
                    break
            n += 1
            pos = nl if cut else nl + 1
            if eof:
                break
            if cut:
                log.warning("overlong path=%s offset=%d: no newline in %d bytes; cut there",
                            path, offset, self._longest)
        else:
            eof = data.find(b"\n", pos) < 0 and start + len(data) >= size
        if split or n:
            f.part = split  # parts of the line at the new offset handed out already
        if n:
            f.offset, f.n = start + pos, f.n + n
            if f.offset >= TAIL:  # the bytes before the offset never change, but by truncation
                f.th = _hash(data[pos - TAIL:pos] if pos >= TAIL
                             else os.pread(fd, TAIL, f.offset - TAIL))
        f.size = max(f.size, start + len(data))
        if pos >= len(data):
            self._buf.pop(f.key, None)
        elif pos > len(data) // 2:  # keep what is left, not the whole read (many files)
            self._buf[f.key] = (start + pos, data[pos:])
        else:
            self._buf[f.key] = (start, data)
        return eof

    def _block(self, data: bytes, pos: int, start: int, room: int, avg: int, prefix: str,
               path: str, items: list[dict[str, Any]]) -> tuple[int, int] | None:
        """The fast path: up to ``room`` complete lines of ``data[pos:]`` within a window of
        about ``room`` average lines, split and built in C-level passes instead of one
        ``find`` and a few Python statements a line; (lines, new pos). None when the window
        holds no complete line or a line over ``max_bytes`` (the line-by-line loop then
        takes one line)."""
        last = data.rfind(b"\n", pos, pos + (room + 1) * avg)
        if last < 0:
            return None
        parts = data[pos:last].split(b"\n", room)
        del parts[room:]  # past ``room`` lines: the rest of the window, read next time
        if max(map(len, parts)) > self.cfg.max_bytes:
            return None
        offsets = list(accumulate([len(p) + 1 for p in parts], initial=start + pos))
        enc = self.cfg.encoding
        items.extend([{"id": f"{prefix}{o}", "line": p.decode(enc, "replace"), "path": path,
                       "offset": o} for p, o in zip(parts, offsets)])
        return len(parts), offsets[-1] - start

    def _cuts(self, data: bytes, pos: int, end: int) -> list[tuple[int, int]]:
        """The parts of the line ``data[pos:end]``: ``max_bytes`` each, for utf-8 moved back
        to a character boundary (never to an empty part), so every byte is in one part."""
        out, a, step = [], pos, self.cfg.max_bytes
        while a < end:
            b = min(a + step, end)
            if self._utf8 and b < end:
                c = b
                while c > a + 1 and b - c < 3 and data[c] & 0xC0 == 0x80:
                    c -= 1
                if data[c] & 0xC0 != 0x80:
                    b = c
            out.append((a, b))
            a = b
        return out

    @staticmethod
    def _same(fd: int, at: int, n: int, digest: str) -> bool:
        """Do the ``n`` bytes at ``at`` still hash to ``digest``?"""
        data = os.pread(fd, n, at)
        return len(data) == n and _hash(data) == digest

    def _truncated(self, f: Followed, size: int) -> None:
        """copytruncate (or the file rewritten under the same inode): read it again from 0.
        Bytes past the offset that were seen but not read are reported lost."""
        event = f"truncated:{f.dev}:{f.ino}:{f.tag}:{f.offset}"
        if event not in self._reported:
            self._reported.add(event)
            log.warning("truncated path=%s size=%d offset=%d: reading it again from the start",
                        f.path, size, f.offset)
        if f.size > f.offset:
            self._lost(f, f.size - f.offset, "truncated")
        f.offset, f.tag, f.hl, f.n, f.th, f.gen, f.part = 0, None, 0, 0, None, f.gen + 1, 0
        self._buf.pop(f.key, None)
        self._final.discard(f.key)

    # -- finding files -------------------------------------------------------------------
    def _locate(self, files: list[Followed]) -> list[Followed]:
        """The files to read, in order: rotated-away ones still to finish, the known ones at
        the glob paths, then new ones (oldest first). Opens each one's descriptor; reports
        known files that cannot be found any more."""
        live = at_paths(self.cfg.paths)
        moved: list[Followed] = []
        kept: list[Followed] = []
        seen: set[Key] = set()
        for f in files:
            if f.key in seen:
                continue
            seen.add(f.key)
            hit = live.get(f.key)
            if hit is not None and self._open(f.key, hit[0]):
                f.path = f.home = hit[0]
                self._final.discard(f.key)
                kept.append(f)
                continue
            was_home = f.path == f.home
            st = self._find(f)
            if st is None:
                if f.size > f.offset:
                    self._lost(f, f.size - f.offset, "missing")
                log.info("forgotten path=%s offset=%d: no longer found", f.path, f.offset)
                self._retire(f)
                continue
            quiet = self.wall() - st.st_mtime > GRACE
            if quiet and f.offset >= st.st_size:
                log.info("finished path=%s offset=%d: rotated away and read to its end",
                         f.path, f.offset)
                self._drop(f.key)
                self._retire(f)
                continue
            if quiet:
                self._final.add(f.key)
            moved.append(f)
            if was_home:  # it just left its home: did another generation come and go since?
                for p, g in generations(f, st, seen | set(live)):
                    key = (g.st_dev, g.st_ino)
                    if self._open(key, p):
                        seen.add(key)
                        moved.append(Followed(key[0], key[1], path=p, home=f.home))
                        log.info("following path=%s: a generation rotated away before it was "
                                 "seen", p)
        new = [(st.st_mtime, p, k) for k, (p, st) in live.items() if k not in seen]
        for _, p, k in sorted(new):
            if self._open(k, p):
                kept.append(Followed(k[0], k[1], path=p, home=p))
                log.info("following path=%s", p)
        self._scan_at = self.clock()
        return moved + kept

    def _retire(self, f: Followed) -> None:
        """Remember a file no longer followed in the position's ``gone`` (the last ``GONE``):
        a new file that reuses its inode and starts with the same line (a fixed header) then
        gets ids of its own (``tag.N``), not the old file's."""
        if f.tag is not None:
            self._gone = [*self._gone, [f.dev, f.ino, f.tag, f.gen]][-GONE:]

    def _open(self, key: Key, path: str) -> bool:
        """Keep a descriptor on the file ``key`` found at ``path``; False if it is no longer
        there (rotated between the look and the open)."""
        if key in self._fds:
            return True
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise SourceError(f"cannot open log file {path}: {e}") from e
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != key:
            os.close(fd)
            return False
        self._fds[key] = fd
        return True

    def _find(self, f: Followed) -> os.stat_result | None:
        """A known file no longer at a glob path: at its last path or renamed beside its home
        (``access.log.1``), else by the descriptor this process keeps (moved elsewhere or
        deleted, still readable); None when it cannot be found."""
        candidates = [f.path] + [e.path for e in beside(f.home, f.ino) if e.path != f.path]
        for p in candidates:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == f.key and self._open(f.key, p):
                f.path = p
                return os.fstat(self._fds[f.key])
        fd = self._fds.get(f.key)
        return None if fd is None else os.fstat(fd)

    def _drop(self, key: Key) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
        self._buf.pop(key, None)
        self._final.discard(key)

    def _close_unused(self, keep: set[Key]) -> None:
        for key in [k for k in self._fds if k not in keep]:
            self._drop(key)

    # -- losses --------------------------------------------------------------------------
    def _lost(self, f: Followed, nbytes: int, why: str) -> None:
        """Report bytes that will never be read: once per event, logged and recorded."""
        event = f"lost:{f.dev}:{f.ino}:{f.tag}:{f.offset}"
        if event in self._reported:
            return
        self._reported.add(event)
        log.warning("lost path=%s bytes=%d offset=%d why=%s: not read, and can no longer be",
                    f.path, nbytes, f.offset, why)
        self.journal.add(event, Loss(path=f.path, dev=f.dev, ino=f.ino, offset=f.offset,
                                     bytes=nbytes, why=why, at=self.wall()))

    def losses(self) -> list[Loss]:
        """The recorded losses, oldest first (the last ``KEEP_LOSSES``)."""
        return self.journal.losses()

    # -- reports -------------------------------------------------------------------------
    def _behind(self, position: Any) -> tuple[list[dict[str, Any]], int, int, int]:
        """Per file (known, or new at a glob path): path, offset, size now; and the totals of
        bytes behind, of bytes read and of lines read."""
        files = followed(position)
        live = at_paths(self.cfg.paths)
        rows, behind, read, lines = [], 0, 0, 0
        for f in files:
            hit = live.pop(f.key, None)
            size = hit[1].st_size if hit else f.size
            rows.append({"path": hit[0] if hit else f.path, "offset": f.offset, "size": size})
            behind += max(size - f.offset, 0)
            read, lines = read + f.offset, lines + f.n
        for p, st in live.values():
            rows.append({"path": p, "offset": 0, "size": st.st_size})
            behind += st.st_size
        return rows, behind, read, lines

    def _saved(self) -> Any:
        if self.context is None:
            return None
        from lrq.spool import Spool

        return Spool(self.context.data_dir, self.context.queue).read_position()

    def remaining(self, position: Any) -> int:
        """Lines behind, estimated: bytes behind over the mean line length read so far
        (``GUESS_LINE`` bytes before any was read); at least 1 while any byte waits, a partial
        line included; 0 when none does."""
        _, behind, read, lines = self._behind(position)
        return estimate(behind, read, lines)

    def status(self) -> dict[str, Any]:
        """Files with offsets and sizes, ``behind_bytes``, ``lag`` (lines behind, estimated),
        and the losses reported (``lost_bytes``, ``losses``, the last one's file)."""
        rows, behind, read, lines = self._behind(self._saved())
        record = self.journal.read()
        view: dict[str, Any] = {
            "files": rows, "behind_bytes": behind,
            "lag": estimate(behind, read, lines),
            "losses": record["count"], "lost_bytes": record["bytes"]}
        if record["recent"]:
            last = record["recent"][-1]
            view["last_loss"] = f"{last['path']}: {last['bytes']} bytes ({last['why']})"
        return view

    # -- the rest of the protocol --------------------------------------------------------
    def ack(self, receipts: Sequence[Any]) -> None:
        """Never called: acknowledged at publish, by the saved position."""

    def keep(self, receipts: Sequence[Any]) -> None:
        """Nothing is held: files are re-readable."""

    def settled(self) -> bool:
        """Re-readable: settled once a fetch came back short (the sniffer's ``drained``)."""
        return True

    def keys(self, key: str) -> Iterator[str] | None:
        """None: a rotated-away file's lines cannot be listed again (verify reconciles)."""
        return None

    def item_fields(self) -> list[str]:
        """The fields every item carries (a cut line's parts add ``part`` and ``of``)."""
        return list(FIELDS)

    def close(self) -> None:
        for key in list(self._fds):
            self._drop(key)
