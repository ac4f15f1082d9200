"""Disk accounting: what lrq keeps in the data dir, the budget, and the free-space floor.

``usage`` counts what lrq can be held to: the queue folders (batches, claims, markers, tmp)
and its own log files. Database files are not counted: results are the point, and cleanup
cannot delete them. The free-space floor (``min_free``) guards the filesystem as a whole,
whatever fills it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lrq.errors import ConfigError

#: Cleanup trims done batches when usage goes above this share of ``max_bytes``; the sniffer
#: pauses when the next batch would cross ``max_bytes`` itself. The gap keeps them from
#: waiting on each other.
TRIM_AT = 0.8
QUEUE_FOLDERS = ("left", "right", "tmp", "failed", "quarantine")


@dataclass(frozen=True)
class Floor:
    """Free space to keep: a fraction of the filesystem, or a number of bytes."""

    fraction: float = 0.0
    bytes: int = 0

    @classmethod
    def parse(cls, value: str, where: str) -> "Floor":
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


def space(path: Path) -> Space:
    st = os.statvfs(path)
    return Space(free_bytes=st.f_bavail * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize,
                 free_inodes=st.f_favail, total_inodes=st.f_files)


def tree_bytes(path: Path) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        total += tree_bytes(Path(e.path))
                    else:
                        total += e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # removed while we looked
    except FileNotFoundError:
        pass
    return total


def usage(data_dir: Path, queues: list[str], log_file: Path | None) -> int:
    """Bytes lrq holds in the data dir: the queue folders and its log files."""
    total = sum(tree_bytes(data_dir / q / f) for q in queues for f in QUEUE_FOLDERS)
    if log_file is not None:
        for p in log_file.parent.glob(log_file.name + "*"):
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
    return total


class Budget:
    """The data dir's byte budget and free-space floor, as the sniffer and cleanup see them."""

    def __init__(self, data_dir: Path, queues: list[str], log_file: Path | None,
                 max_bytes: int, floor: Floor) -> None:
        self.data_dir = data_dir
        self.queues = queues
        self.log_file = log_file
        self.max_bytes = max_bytes
        self.floor = floor

    def used(self) -> int:
        return usage(self.data_dir, self.queues, self.log_file)

    def space(self) -> Space:
        return space(self.data_dir)

    def pressure(self, used: int) -> str | None:
        """Why cleanup should trim done batches now (before their ``keep_done``), or None."""
        if used > TRIM_AT * self.max_bytes:
            return f"data dir holds {used} bytes, over {TRIM_AT:.0%} of max_bytes {self.max_bytes}"
        return self.space().below(self.floor)
