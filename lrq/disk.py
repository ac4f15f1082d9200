"""Disk accounting: what lrq keeps in the data dir, the budget, and the free-space floor.

``usage`` counts what lrq can be held to: the queue folders (batches, owner files, markers,
tmp; a claim is a link to its owner file and counts once) and its own log files. Database
files are not counted: results are the point, and cleanup cannot delete them. The
free-space floor (``min_free``) guards the filesystem as a whole, whatever fills it.

:meth:`Budget.blocked` is the one predicate for "no room for the next batch": the sniffer
pauses on it and cleanup trims done batches until it clears, so cleanup never stops short of
what the sniffer waits for. When no done batch is left to trim, :class:`Held` says what
holds the space (pending, claimed, failed batches, tmp, logs, other files).
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lrq.errors import ConfigError

#: Cleanup trims done batches when usage goes above this share of ``max_bytes``; the sniffer
#: pauses when the next batch would cross ``max_bytes`` itself. The gap keeps them from
#: waiting on each other.
TRIM_AT = 0.8
#: Folders of a queue whose files count against the budget. ``owners/`` holds one small file
#: per worker process; a claim in ``right/`` is a hard link to one, counted once (by inode).
#: ``spare/`` holds empty files (0 bytes; their inodes count against the inode floor, and
#: cleanup unlinks them when free inodes run below it, see :meth:`Space.inodes_low`).
#: ``ingest/`` is the journal of a ``kind = "ingest"`` queue (:mod:`lrq.journal`).
QUEUE_FOLDERS = ("owners", "left", "right", "done", "tmp", "failed", "quarantine", "spare",
                 "ingest")


@dataclass(frozen=True)
class Floor:
    """Free space to keep: a fraction of the filesystem, or a number of bytes."""

    fraction: float = 0.0
    bytes: int = 0

    @classmethod
    def parse(cls, value: str, where: str) -> Floor:
        from lrq.config import parse_bytes

        text = str(value).strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
        if m:
            fraction = float(m.group(1)) / 100
            if fraction >= 1:
                raise ConfigError(f"{where}: {value!r} leaves no room; use less than 100%")
            return cls(fraction=fraction)
        return cls(bytes=parse_bytes(text, where))


@dataclass(frozen=True)
class Space:
    free_bytes: int
    total_bytes: int
    free_inodes: int
    total_inodes: int

    def below(self, floor: Floor, extra_bytes: int = 0) -> str | None:
        """Why writing ``extra_bytes`` more would cross the floor, or None."""
        free = self.free_bytes - extra_bytes
        if floor.fraction:
            if free < floor.fraction * self.total_bytes:
                return (f"free space {free / max(self.total_bytes, 1):.1%} below "
                        f"min_free {floor.fraction:.0%}")
            if self.total_inodes and self.free_inodes < floor.fraction * self.total_inodes:
                return (f"free inodes {self.free_inodes / self.total_inodes:.1%} below "
                        f"min_free {floor.fraction:.0%}")
        elif free < floor.bytes:
            return f"free space {free} bytes below min_free {floor.bytes} bytes"
        return None

    def inodes_low(self, floor: Floor) -> bool:
        """Are free inodes below the floor (a fractional ``min_free`` only)? Then retired
        batch files are unlinked, not kept as spares, and the spares are unlinked too."""
        return bool(floor.fraction and self.total_inodes
                    and self.free_inodes < floor.fraction * self.total_inodes)


def space(path: Path) -> Space:
    st = os.statvfs(path)
    return Space(free_bytes=st.f_bavail * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize,
                 free_inodes=st.f_favail, total_inodes=st.f_files)


def tree_bytes(path: Path, seen: set[int] | None = None) -> int:
    """Bytes of the files under ``path``; an inode already in ``seen`` (a hard link, such as
    a claim linking its owner file) counts once, and ``seen`` is shared between calls."""
    seen = set() if seen is None else seen
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        total += tree_bytes(Path(e.path), seen)
                    elif e.inode() not in seen:
                        seen.add(e.inode())
                        total += e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # removed while we looked
    except FileNotFoundError:
        pass
    return total


def log_bytes(log_file: Path | None) -> int:
    """Bytes of lrq's log file and its rotated copies."""
    total = 0
    if log_file is not None:
        for p in log_file.parent.glob(log_file.name + "*"):
            with contextlib.suppress(FileNotFoundError):  # rotated away meanwhile
                total += p.stat().st_size
    return total


def usage(data_dir: Path, queues: list[str], log_file: Path | None,
          done_bytes: Callable[[str], int] | None = None) -> int:
    """Bytes lrq holds in the data dir: the queue folders (a file's links counted once)
    and its log files. ``done_bytes(queue)``, when given, counts ``done/`` instead of a
    walk: :meth:`lrq.spool.Spool.done_bytes`, cached while the folder is unchanged (done
    batches are most of the files, and their files are never linked elsewhere)."""
    seen: set[int] = set()
    total = log_bytes(log_file)
    for q in queues:
        for f in QUEUE_FOLDERS:
            if f == "done" and done_bytes is not None:
                total += done_bytes(q)
            else:
                total += tree_bytes(data_dir / q / f, seen)
    return total


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class Held:
    """What holds the data dir's filesystem, in bytes: lrq's batches by state, its tmp files
    and logs, and everything else on the filesystem (databases, other programs' files)."""

    pending: int
    claimed: int
    done: int
    failed: int
    tmp: int
    logs: int
    other: int
    free: int

    def describe(self) -> str:
        return (f"pending batches {mb(self.pending)}, claimed {mb(self.claimed)}, "
                f"done {mb(self.done)}, failed and quarantined {mb(self.failed)}, "
                f"tmp {mb(self.tmp)}, logs {mb(self.logs)}, other files on the filesystem "
                f"{mb(self.other)}; free {mb(self.free)}")

    def advice(self) -> str:
        """What an operator can do about a full disk, given what holds it."""
        if self.done:
            return f"run `lrq cleanup`: done batches hold {mb(self.done)}"
        return f"nothing cleanup may remove holds it: {self.describe()}"

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Budget:
    """The data dir's byte budget and free-space floor, as the sniffer and cleanup see them."""

    def __init__(self, data_dir: Path, queues: list[str], log_file: Path | None,
                 max_bytes: int, floor: Floor,
                 done_bytes: Callable[[str], int] | None = None) -> None:
        self.data_dir = data_dir
        self.queues = queues
        self.log_file = log_file
        self.max_bytes = max_bytes
        self.floor = floor
        self.done_bytes = done_bytes

    def used(self) -> int:
        return usage(self.data_dir, self.queues, self.log_file, self.done_bytes)

    def space(self) -> Space:
        return space(self.data_dir)

    def blocked(self, used: int, next_bytes: int, space: Space | None = None,
                idle: Callable[[], bool] | None = None) -> tuple[str, str] | None:
        """Why a batch of ``next_bytes`` cannot be published now, as (``"budget"`` or
        ``"min_free"``, detail), or None. ``used`` is :meth:`used`; ``space`` defaults to a
        fresh look at the filesystem. ``idle`` (asked only when the budget blocks) says the
        queue has nothing pending or claimed: then one batch goes through whatever
        ``max_bytes`` says, or a budget below two batches would stall the queue forever
        (cleanup trims done batches meanwhile, as the budget still presses)."""
        # Two batches of headroom under max_bytes: usage is counted once per sniffer tick,
        # while workers add claims and markers, logs grow, and the next batch may be larger.
        if used + 2 * next_bytes > self.max_bytes and not (idle and idle()):
            if 2 * next_bytes > self.max_bytes:
                return "budget", (f"max_bytes {self.max_bytes} is below two batches "
                                  f"({next_bytes} bytes each); raise it")
            return "budget", (f"the data dir holds {used} bytes; the next batch would leave "
                              f"less than a batch of room under max_bytes {self.max_bytes}")
        below = (space or self.space()).below(self.floor, next_bytes)
        return ("min_free", below) if below else None

    def advice(self, held: Held, next_bytes: int) -> str:
        """:meth:`Held.advice`, unless ``max_bytes`` itself is below two batches: then no
        cleanup helps and the other files on the filesystem are not to blame."""
        if 2 * next_bytes > self.max_bytes:
            return f"set cleanup.max_bytes to at least {2 * next_bytes} bytes"
        return held.advice()

    def pressure(self, used: int, next_bytes: int = 0, space: Space | None = None) -> str | None:
        """Why cleanup should trim done batches now (before their ``keep_done``), or None:
        the sniffer is (or would be) :meth:`blocked`, or usage is above ``TRIM_AT``."""
        blocked = self.blocked(used, next_bytes, space)
        if blocked:
            return blocked[1]
        if used > TRIM_AT * self.max_bytes:
            return f"data dir holds {used} bytes, over {TRIM_AT:.0%} of max_bytes {self.max_bytes}"
        return None

    def held(self, counts: Iterable[Any]) -> Held:
        """What holds the space, from every queue's :class:`~lrq.spool.Counts`."""
        counts = list(counts)
        sp = self.space()
        used = self.used()
        return Held(pending=sum(c.pending_bytes for c in counts),
                    claimed=sum(c.claimed_bytes for c in counts),
                    done=sum(c.done_bytes for c in counts),
                    failed=sum(c.failed_bytes for c in counts),
                    tmp=sum(c.tmp_bytes for c in counts), logs=log_bytes(self.log_file),
                    other=max(0, sp.total_bytes - sp.free_bytes - used), free=sp.free_bytes)
