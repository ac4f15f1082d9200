"""The ``logfile`` kind's records and lookups on disk (:mod:`lrq.sources.logfile` reads).

:class:`Followed` is one followed file as the position records it; :class:`LossJournal` is
``logfile-losses.json`` in the queue's folder, where bytes that will never be read are
recorded the moment they are found (not with the position, which moves only on a publish);
the functions find files: at the configured globs, and beside a file's home (a rotated file
renamed ``access.log.1``, or a generation lrq never saw).
"""
from __future__ import annotations

import glob as globlib
import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lrq.sources.logfile")

Key = tuple[int, int]  # (st_dev, st_ino): a file's identity, whatever its name
LOSSES = "logfile-losses.json"
KEEP_LOSSES = 100  # loss records kept in LOSSES (the totals count all)
GUESS_LINE = 200  # bytes per line, for an estimate before any line was read
#: The first bytes of gzip, bzip2, xz and zstd files: a rotated log compressed is not text.
MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class Followed:
    """A followed file, as the position records it (mutable while one fetch works on it):
    its identity, ``tag`` (the hash of its first ``hl`` bytes), ``gen`` (truncations seen),
    ``offset`` (past the last line handed out), ``part`` (the parts of the cut line at
    ``offset`` handed out already: a fetch full before its last part), ``th`` (the hash of the
    ``TAIL`` bytes before ``offset``), the last ``size`` seen, ``path`` (where it was last
    seen), ``home`` (the configured path it lived at) and ``n``, the lines handed out (for
    estimates)."""

    __slots__ = ("dev", "ino", "tag", "hl", "gen", "offset", "part", "th", "size", "path",
                 "home", "n")

    def __init__(self, dev: int, ino: int, path: str, home: str, offset: int = 0,
                 size: int = 0, tag: str | None = None, hl: int = 0, n: int = 0,
                 gen: int = 0, th: str | None = None, part: int = 0) -> None:
        self.dev, self.ino, self.path, self.home = dev, ino, path, home
        self.offset, self.size, self.tag, self.hl, self.n = offset, size, tag, hl, n
        self.gen, self.th, self.part = gen, th, part

    @property
    def key(self) -> Key:
        return (self.dev, self.ino)

    @property
    def prefix(self) -> str:
        """Its items' ids up to the offset: ``dev:ino:tag:``, ``dev:ino:tag.gen:`` once it
        was truncated (its first line may be the same header as before)."""
        gen = f".{self.gen}" if self.gen else ""
        return f"{self.dev}:{self.ino}:{self.tag}{gen}:"

    def to_json(self) -> dict[str, Any]:
        return {s: getattr(self, s) for s in self.__slots__}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Followed:
        return cls(**{s: d[s] for s in cls.__slots__ if s in d})


def followed(position: Any) -> list[Followed]:
    """The files a saved position lists (none for None, or another kind's position)."""
    if not isinstance(position, dict):
        return []
    return [Followed.from_json(d) for d in position.get("files", [])]


@dataclass(frozen=True)
class Loss:
    """Bytes of a file that will never be read: a record of ``logfile-losses.json``."""

    path: str
    dev: int
    ino: int
    offset: int
    bytes: int
    why: str  # "missing" (the file cannot be found) or "truncated" (cut before it was read)
    at: float


class LossJournal:
    """``logfile-losses.json``: the count and bytes of every loss, the last ``KEEP_LOSSES``
    records, each under its event id so a loss found again after a restart counts once.
    ``path`` None (a source opened without a context, in tests and benchmarks): nothing is
    kept."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"count": 0, "bytes": 0, "recent": []}
        if self.path is None:
            return empty
        try:
            data: dict[str, Any] = json.loads(self.path.read_bytes())
            return data
        except (FileNotFoundError, ValueError):
            return empty

    def add(self, event: str, loss: Loss) -> None:
        """Record ``loss`` unless ``event`` is recorded already; an error writing it is
        logged (the caller's WARNING has said it anyway)."""
        if self.path is None:
            return
        record = self.read()
        if any(r.get("event") == event for r in record["recent"]):
            return
        record["recent"] = [*record["recent"], {"event": event, **asdict(loss)}][-KEEP_LOSSES:]
        record["count"] += 1
        record["bytes"] += loss.bytes
        from lrq.spool.files import write_atomic

        folder = self.path.parent
        tmp = folder / "tmp"  # the spool's, swept by cleanup after a crash
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(record).encode(), tmp if tmp.is_dir() else folder)
        except OSError as e:
            log.error("lost-unrecorded path=%s: cannot write %s: %s", loss.path, self.path, e)

    def losses(self) -> list[Loss]:
        return [Loss(**{k: v for k, v in r.items() if k != "event"}) for r in self.read()["recent"]]


def estimate(behind: int, read: int, lines: int) -> int:
    """Lines in ``behind`` bytes, at the mean length of the ``lines`` in ``read`` bytes
    (``GUESS_LINE`` without any); at least 1 while any byte waits."""
    if behind <= 0:
        return 0
    return max(1, round(behind * lines / read) if lines and read else behind // GUESS_LINE)


def at_paths(patterns: Iterable[str]) -> dict[Key, tuple[str, os.stat_result]]:
    """The regular files at ``patterns`` (paths or globs) now, by identity, in path order."""
    found: dict[Key, tuple[str, os.stat_result]] = {}
    for pattern in patterns:
        names = sorted(globlib.glob(pattern)) if globlib.has_magic(pattern) else [pattern]
        for p in names:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.setdefault((st.st_dev, st.st_ino), (p, st))
    return found


def beside(home: str, ino: int | None = None) -> list[os.DirEntry[str]]:
    """Entries of ``home``'s folder whose name starts with its name, itself excluded (with
    ``ino``, only those with that inode number: no stat needed to tell)."""
    h = Path(home)
    try:
        with os.scandir(h.parent) as it:
            return [e for e in it if e.name.startswith(h.name) and e.path != home
                    and (ino is None or e.inode() == ino)]
    except OSError:
        return []


def generations(f: Followed, st: os.stat_result,
                known: set[Key]) -> list[tuple[str, os.stat_result]]:
    """Files beside ``f``'s home, unknown, last written no earlier than ``f`` (which was at
    its home when the position was saved and has been rotated away since: ``st``), and not
    compressed: generations that were at the home and rotated away again before lrq saw them
    (lrq down, or killed before it saved a position listing them). Oldest first."""
    found = []
    for e in beside(f.home):
        if e.path == f.path:
            continue
        try:
            g = e.stat()
        except OSError:
            continue
        if not stat.S_ISREG(g.st_mode) or (g.st_dev, g.st_ino) in known or \
                g.st_mtime < st.st_mtime or compressed(e.path):
            continue
        found.append((g.st_mtime, e.path, g))
    return [(p, g) for _, p, g in sorted(found)]


def compressed(path: str) -> bool:
    """Does the file start like a gzip, bzip2, xz or zstd file (or cannot be read)?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # unreadable: not a generation to follow
    try:
        return os.pread(fd, 6, 0).startswith(MAGIC)
    finally:
        os.close(fd)
