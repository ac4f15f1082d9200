"""What is in a queue's folders: listings (regular files only; foreign entries noted),
batch states and counts, the sample of ``left/`` a random pick starts from, and retention
(removing done and failed batches, a done one into ``spare/`` while there is room). Reads,
unlinks and retires only; the protocol is in :mod:`lrq.spool`.
"""
from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from lrq.disk import tree_bytes
from lrq.errors import ForeignEntry, LrqError
from lrq.spool.files import (
    ATTEMPT,
    AWAITING_ACK_MODE,
    DONE,
    ERROR,
    FILE_MODE,
    SUFFIX,
    _entries_from,
    is_regular,
    kind,
    read_regular,
    retire,
)
from lrq.spool.owners import OWNERS

log = logging.getLogger(__name__)

#: Entries of ``left/`` a random pick with no names cached samples before listing them all.
PROBE = 64
#: Most files ``spare/`` holds; retention unlinks retired batch files beyond it. A spare is an
#: inode with no data block (about 256 bytes of inode table and a directory entry), so 4096
#: hold about 1 MB and a fraction of any filesystem's inodes (ext4 makes one per 16 KB:
#: 4096 are 64 MB of disk). Cleanup runs every 15 s by default and the sniffer publishes up
#: to ~450 batches/s at batch 100: 4096 covers ~9 s of publishing per pass; more would
#: mostly sit idle, counted against the inode floor (which cleanup frees them for).
SPARE_MAX = 4096
#: Seconds a count of ``spare/`` is trusted by retention (only cleanup adds spares, one
#: process at a time, so a stale count is high, never low: the cap holds).
SPARE_RECOUNT = 1.0
#: A folder's mtime is trusted to show every change only for looks that began this long
#: after it: longer than the coarsest mtime granularity lrq meets (1 s on some filesystems).
DIR_SETTLE_NS = 2_000_000_000
#: Foreign entries already logged by this process (each is logged once, however often seen).
_WARNED: set[str] = set()


class State(enum.Enum):
    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    MISSING = "missing"


@dataclass(frozen=True)
class Counts:
    pending: int
    claimed: int
    done: int
    failed: int
    quarantined: int
    #: Every file in the queue's folders (owner files included; a file's links count once).
    bytes: int
    #: Bytes of batch files by state (markers and tmp/ are small and counted in ``bytes``).
    pending_bytes: int = 0
    claimed_bytes: int = 0
    done_bytes: int = 0
    failed_bytes: int = 0
    tmp_bytes: int = 0
    #: Empty files in ``spare/`` (retired batch files the sniffer reuses; 0 bytes, 1 inode each).
    spare: int = 0
    #: Done batches whose items the source has not acknowledged yet (a source acknowledged
    #: at commit; :mod:`lrq.acker`): counted in ``done`` too, kept by retention.
    awaiting_ack: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Listing:
    """The listing layer of :class:`~lrq.spool.Spool`; its attributes are set there."""

    queue: str
    root: Path
    left: Path
    right: Path
    done: Path
    tmp: Path
    failed: Path
    quarantine: Path
    spare: Path
    clock: Callable[[], float]
    #: (spares in ``spare/``, ``time.monotonic()`` when counted), for retention's cap.
    _spare_count: tuple[int, float] | None
    _none_pending_at: tuple[int, int] | None
    #: Entries lrq did not write, seen by this process: path -> what it is.
    _foreign: dict[str, str]
    _done_bytes: tuple[tuple[int, int], int, int] | None
    _retention: tuple[tuple[int, int], int, float] | None

    def files(self, folder: Path) -> list[os.DirEntry[str]]:
        """The regular files in ``folder``. Anything else (a directory, FIFO, socket, symlink)
        is not lrq's: it is skipped and noted (:meth:`foreign`), so no listing, count, reaper
        or sweep ever opens, reads or deletes it."""
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except FileNotFoundError:
            return []
        regular = [e for e in entries if is_regular(e)]
        if len(regular) < len(entries):  # rare: only then look at what the others are
            for e in entries:
                if not is_regular(e):
                    with contextlib.suppress(FileNotFoundError):
                        self.note_foreign(Path(e.path), kind(e.stat(follow_symlinks=False).st_mode))
        return regular

    def note_foreign(self, path: Path, what: str) -> None:
        """Remember an entry lrq did not write; log it once per process."""
        self._foreign[str(path)] = what
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            log.warning("foreign-entry queue=%s path=%s what=%s: not lrq's; remove it",
                        self.queue, path, what)

    def foreign(self) -> dict[str, str]:
        """Entries lrq did not write that this process came across (path -> what), after
        looking through every folder once more for those a listing alone finds."""
        for folder in (self.left, self.right, self.done, self.failed, self.quarantine, self.tmp,
                       self.spare):
            self.files(folder)
        return {p: w for p, w in sorted(self._foreign.items()) if os.path.lexists(p)}

    def _names(self, folder: Path, suffix: str) -> set[str]:
        return {e.name[: -len(suffix)] if suffix else e.name
                for e in self.files(folder) if e.name.endswith(suffix)}

    def _claims(self) -> set[str]:
        """Names of batches claimed or done: ``right/<name>`` or ``right/<name>.done``."""
        out = set()
        for n in self._names(self.right, ""):
            if "." not in n:
                out.add(n)
            elif n.endswith(DONE):
                out.add(n[: -len(DONE)])
        return out

    def pending(self, ordered: bool = True) -> list[str]:
        """Names in ``left/`` neither claimed nor done, oldest first (or unordered)."""
        names = self._names(self.left, SUFFIX) - self._claims()
        return sorted(names) if ordered else list(names)

    def pending_stats(self) -> tuple[int, int]:
        """(pending batches, their bytes), statting only the pending files."""
        claims = self._claims()
        count = size = 0
        for e in self.files(self.left):
            if e.name.endswith(SUFFIX) and e.name[: -len(SUFFIX)] not in claims:
                with contextlib.suppress(FileNotFoundError):
                    size += e.stat(follow_symlinks=False).st_size
                    count += 1
        return count, size

    def has_pending(self) -> bool:
        """Is any batch pending? Asked every second by an idle scheduler, so when neither
        folder changed since the last "no" it answers without listing them. Folder mtimes are
        coarse (a change in the same clock tick can keep the mtime), so an unchanged mtime is
        trusted only once it is a second old."""
        try:
            stamps = (os.stat(self.left).st_mtime_ns, os.stat(self.right).st_mtime_ns)
        except FileNotFoundError:
            return False
        if stamps == self._none_pending_at:
            return False
        claimed = self._claims()
        found = any(e.name.endswith(SUFFIX) and e.name[: -len(SUFFIX)] not in claimed
                    for e in self.files(self.left))
        settled_before = time.time_ns() - 1_000_000_000
        self._none_pending_at = stamps if not found and max(stamps) < settled_before else None
        return found

    def settled(self) -> bool:
        """True when no batch is pending or claimed, judged from one snapshot.

        ``right/`` is listed before ``left/``: a claim taken back (reaped, released) between
        the two listings then shows as pending, never as gone, and a batch finished in
        between shows as unfinished. Two separate questions ("pending?" then "claimed?") can
        both answer no for a batch whose claim was reaped in between.
        """
        right = self._names(self.right, "")
        left = self._names(self.left, SUFFIX)
        if any(f"{n}{DONE}" not in right for n in left):
            return False  # pending or claimed
        # A claim whose batch file is gone (killed inside fail()) until the reaper clears it;
        # one whose batch is in done/ (killed between the move and the unlink) is done.
        return not self.claimed()

    def done_claims(self) -> list[str]:
        """Claims left beside a batch already in ``done/``: its worker was killed between the
        move and the unlink (:meth:`mark_done`). Nothing to count or split; removed by
        :meth:`clear_done_claims`."""
        right = self._names(self.right, "")
        return sorted(n for n in right if "." not in n
                      and os.path.exists(f"{self.done}/{n}{SUFFIX}"))

    def clear_done_claims(self) -> int:
        """Remove the claims (and attempt records) of batches in ``done/``; return how many.
        A claimer racing us on such a name fails its post-link check of ``left/``."""
        names = self.done_claims()
        for name in names:
            for path in (self.right / name, self.right / f"{name}{ATTEMPT}"):
                self._remove(path)
            log.info("done-claim-removed queue=%s batch=%s: its worker stopped after moving "
                     "it to done/", self.queue, name)
        return len(names)

    def claimed(self) -> list[str]:
        """Live claims: ``right/<name>`` of a batch not done (neither an old-format marker
        nor a file in ``done/``; one stat per claim, and claims are few)."""
        right = self._names(self.right, "")
        return sorted(n for n in right if "." not in n and f"{n}{DONE}" not in right
                      and not os.path.exists(f"{self.done}/{n}{SUFFIX}"))

    def counts(self) -> Counts:
        sizes: dict[Path, dict[str, int]] = {}
        #: Inodes counted: a claim is a hard link to its owner file, which counts once.
        seen: set[int] = set()
        awaiting = 0
        for folder in (self.root / OWNERS, self.left, self.right, self.done, self.failed,
                       self.quarantine, self.tmp):
            found = sizes[folder] = {}
            for e in self.files(folder):
                with contextlib.suppress(FileNotFoundError):
                    info = e.stat(follow_symlinks=False)
                    found[e.name] = 0 if e.inode() in seen else info.st_size
                    seen.add(e.inode())
                    if folder == self.done and stat.S_IMODE(info.st_mode) == AWAITING_ACK_MODE:
                        awaiting += 1
        split = split_states(sizes[self.left], sizes[self.right],
                             {n for n in sizes[self.done] if n.endswith(SUFFIX)})
        bad = sum(sizes[self.failed].values()) + sum(sizes[self.quarantine].values())
        return Counts(
            pending=split.pending, claimed=split.claimed, done=split.done,
            failed=sum(n.endswith(SUFFIX) for n in sizes[self.failed]),
            quarantined=sum(n.endswith(SUFFIX) for n in sizes[self.quarantine]),
            bytes=sum(sum(f.values()) for f in sizes.values()),
            pending_bytes=split.pending_bytes, claimed_bytes=split.claimed_bytes,
            done_bytes=split.done_left_bytes + sum(
                v for n, v in sizes[self.done].items() if n.endswith(SUFFIX)), failed_bytes=bad,
            tmp_bytes=sum(sizes[self.tmp].values()), spare=len(self.files(self.spare)),
            awaiting_ack=awaiting)

    def last_batch_bytes(self) -> int:
        """Size of the newest batch file in ``left/`` or ``done/`` (any state): cleanup's
        and ``lrq status``'s estimate of the sniffer's next batch. Cleanup lists ``done/``
        anyway (retention). With none left (a budget so small that cleanup removed every
        done batch), the size the sniffer saved with its position."""
        newest = max(((n, folder) for folder in (self.left, self.done)
                      for n in self._names(folder, SUFFIX)), default=None)
        with contextlib.suppress(FileNotFoundError):
            if newest:
                return (newest[1] / f"{newest[0]}{SUFFIX}").stat().st_size
        try:
            record = json.loads(read_regular(self.root / "position.json"))
        except (FileNotFoundError, ForeignEntry, ValueError):
            return 0
        saved = record.get("batch_bytes") if isinstance(record, dict) else None
        return saved if isinstance(saved, int) and saved > 0 else 0

    def _sample_left(self) -> list[str]:
        """Up to :data:`PROBE` names from ``left/``, in folder order from a random offset.

        On ext4 a directory offset is a place in name-hash order, so the read starts at a
        random point of the backlog: it costs the same however long the backlog is, and
        workers starting together spread out instead of racing for the same first entries.
        Where the offset lands past the end (other filesystems), the read wraps to the start.
        """
        try:
            fd = os.open(self.left, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return []
        try:
            entries: list[str] = []
            # Not self.rng: forked copies of one Spool would all start at the same offset.
            with contextlib.suppress(OSError):  # an offset the filesystem refuses
                entries = _entries_from(fd, secrets.randbits(63), PROBE)
            if len(entries) < PROBE:
                entries += _entries_from(fd, 0, PROBE - len(entries))
        finally:
            os.close(fd)
        # A small folder is read twice over: once from the offset, then from the start.
        return list(dict.fromkeys(n[: -len(SUFFIX)] for n in entries if n.endswith(SUFFIX)))

    def state(self, name: str) -> State:
        if self.is_done(name):
            return State.DONE
        if (self.right / name).exists():
            return State.CLAIMED
        if (self.left / f"{name}{SUFFIX}").exists():
            return State.PENDING
        if (self.failed / f"{name}{SUFFIX}").exists():
            return State.FAILED
        if (self.quarantine / f"{name}{SUFFIX}").exists():
            return State.QUARANTINED
        return State.MISSING

    def is_done(self, name: str) -> bool:
        """Done: ``done/<name>.pkl``, or the previous versions' ``right/<name>.done``."""
        return (os.path.exists(f"{self.done}/{name}{SUFFIX}")
                or os.path.exists(f"{self.right}/{name}{DONE}"))

    # -- retention -----------------------------------------------------------------------
    def _done_key(self) -> tuple[int, int] | None:
        """``done/``'s (mtime in ns, inode), or None when it is missing."""
        try:
            st = os.stat(self.done)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def done_bytes(self) -> int:
        """Bytes of the files in ``done/``, for the disk budget (:func:`lrq.disk.usage`).

        Done files never change in place (a retired one is emptied, then renamed out), so
        the count stays right while the folder's mtime does: it is cached against it and
        counted again only after a change. The cache is trusted only once the count began
        :data:`DIR_SETTLE_NS` after that mtime, longer than any mtime granularity, so a
        change in the same clock tick is never missed. An idle data dir then costs one stat
        here however many done batches it keeps (a count is ~6 µs a file)."""
        key = self._done_key()
        if key is None:
            return 0
        cached = self._done_bytes
        if cached is not None and cached[0] == key and cached[1] - key[0] > DIR_SETTLE_NS:
            return cached[2]
        counted_at = time.time_ns()  # before the listing: a change during it moves the mtime
        total, cacheable = 0, True
        try:
            with os.scandir(self.done) as it:
                entries = list(it)
        except FileNotFoundError:
            return 0
        for e in entries:
            with contextlib.suppress(FileNotFoundError):
                if e.is_dir(follow_symlinks=False):
                    # Not lrq's, and what it holds changes without done/'s mtime: counted as
                    # the budget always did, and never cached.
                    cacheable = False
                    total += tree_bytes(Path(e.path))
                else:
                    total += e.stat(follow_symlinks=False).st_size
        self._done_bytes = (key, counted_at, total) if cacheable else None
        return total

    def retention_due(self, now: float) -> tuple[tuple[int, int], int] | None:
        """May a done batch have passed its retention since cleanup last looked? None only
        when ``done/`` is unchanged since a full look that began :data:`DIR_SETTLE_NS` after
        its mtime (as in :meth:`done_bytes`) and the oldest done batch that look kept is not
        yet due at ``now``: cleanup then skips listing and stating every done batch. Else a
        token for :meth:`note_retention`, taken before the look."""
        key = self._done_key() or (0, 0)
        kept = self._retention
        if kept is not None and kept[0] == key and kept[1] - key[0] > DIR_SETTLE_NS \
                and now < kept[2]:
            return None
        return key, time.time_ns()

    def note_retention(self, token: tuple[tuple[int, int], int], due: float) -> None:
        """Retention looked at every done batch (``token``: :meth:`retention_due`'s, from
        before the look); the oldest it kept expires at ``due`` (``inf`` if none is left)."""
        self._retention = (token[0], token[1], due)

    def done_batches(self) -> list[tuple[float, str]]:
        """``(done time, name)`` of every done batch, oldest first.

        The done time is the batch file's mtime, set just before the done marker
        (:meth:`mark_done`): the marker is a link to its owner's file, whose mtime is that
        process's last heartbeat and the same for all its batches. A batch marked done by
        the previous version (or by a worker killed between the two steps) ages from when it
        was published, so it may go up to its time pending early; its results are in the
        database either way. A done batch whose file is gone (cleanup was killed removing
        it) ages by its marker. A batch in ``done/`` ages by its file's mtime, set just before
        it moved there. A done batch awaiting its acknowledgement to the source
        (:data:`~lrq.spool.files.AWAITING_ACK_MODE`) is left out: retention keeps it."""
        out = []
        for e in self.files(self.done):
            if e.name.endswith(SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat(follow_symlinks=False)
                    if stat.S_IMODE(st.st_mode) != AWAITING_ACK_MODE:  # else kept: see acker
                        out.append((st.st_mtime, e.name[: -len(SUFFIX)]))
        for name in self._names(self.right, DONE):
            for path in (self.left / f"{name}{SUFFIX}", self.right / f"{name}{DONE}"):
                try:
                    out.append((os.lstat(path).st_mtime, name))
                    break
                except FileNotFoundError:
                    continue
        return sorted(out)

    # -- acknowledgement (lrq.acker) ------------------------------------------------------
    def ack_state(self, name: str) -> str:
        """Where a batch of a source acknowledged at commit stands: "held" (in ``left/`` or
        ``failed/``: not stored yet), "done" (in ``done/``, awaiting its acknowledgement),
        "acked" (in ``done/``, acknowledged), "gone" (split, quarantined or removed). Two
        stats at most."""
        try:
            st = os.stat(f"{self.done}/{name}{SUFFIX}")
            return "done" if stat.S_IMODE(st.st_mode) == AWAITING_ACK_MODE else "acked"
        except FileNotFoundError:
            pass
        if os.path.exists(f"{self.left}/{name}{SUFFIX}") or \
                os.path.exists(f"{self.failed}/{name}{SUFFIX}"):
            return "held"
        if os.path.exists(f"{self.done}/{name}{SUFFIX}"):
            return self.ack_state(name)  # moved to done/ between the two looks
        return "gone"

    def mark_acked(self, name: str) -> None:
        """The source acknowledged this done batch's items: one ``chmod`` back to
        :data:`~lrq.spool.files.FILE_MODE` (no fsync: lost in a crash, the batch is
        acknowledged again, which sources allow)."""
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{self.done}/{name}{SUFFIX}", FILE_MODE)

    def held_names(self) -> list[str]:
        """Batches awaiting an acknowledgement: every batch in ``left/`` and ``failed/``
        written with receipts, and every done one not acknowledged (by mode; one stat per
        file of the three folders). The acker's start-up scan, and again whenever a batch
        it held vanished (split into halves it did not publish)."""
        out = []
        for folder in (self.left, self.failed, self.done):
            for e in self.files(folder):
                if e.name.endswith(SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_IMODE(e.stat(follow_symlinks=False).st_mode) == AWAITING_ACK_MODE:
                            out.append(e.name[: -len(SUFFIX)])
        return sorted(set(out))

    def remove_done(self, name: str, *, spare: bool = False) -> int:
        """Delete a done batch and its markers; return the bytes freed. The batch file goes
        first: until the markers go too, the batch still reads as done, never as pending.
        ``right/<name>`` is a done batch's claim file only in the previous version's format.

        ``spare``: a file in ``done/`` is retired into ``spare/`` (emptied, kept as an inode
        the sniffer reuses: creating a file right after many deletions is its costliest
        step on ext4) while ``spare/`` holds fewer than :data:`SPARE_MAX`; else unlinked."""
        if not self.is_done(name):
            raise LrqError(f"batch {name} is not done; cleanup never removes it")
        first = self.done / f"{name}{SUFFIX}"
        freed = self._retire(first) if spare else self._remove(first)
        return freed + sum(self._remove(path) for path in (
            self.left / f"{name}{SUFFIX}", self.right / f"{name}{ATTEMPT}",
            self.right / name, self.right / f"{name}{DONE}"))

    def spares(self) -> int:
        """Files in ``spare/``, counted at most once per :data:`SPARE_RECOUNT` seconds."""
        now = time.monotonic()
        if self._spare_count is None or now - self._spare_count[1] > SPARE_RECOUNT:
            self._spare_count = (len(self.files(self.spare)), now)
        return self._spare_count[0]

    def _retire(self, path: Path) -> int:
        """:func:`~lrq.spool.files.retire` ``path`` while ``spare/`` has room, else (or when
        it is not reusable) :meth:`_remove` it."""
        count = self.spares()
        if count < SPARE_MAX:
            freed = retire(path, self.spare)
            if freed is not None:
                assert self._spare_count is not None
                self._spare_count = (count + 1, self._spare_count[1])
                return freed
        return self._remove(path)

    def drop_spares(self) -> int:
        """Unlink every spare (cleanup, when free inodes are below ``min_free``); return
        how many. Foreign entries in ``spare/`` are left, as everywhere."""
        dropped = 0
        for e in self.files(self.spare):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                dropped += 1
        self._spare_count = None
        return dropped

    def _remove(self, path: Path) -> int:
        """Unlink a file of lrq's and return its size; leave (and note) anything else."""
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                self.note_foreign(path, kind(st.st_mode))
                return 0
            path.unlink()
        except FileNotFoundError:
            return 0
        return st.st_size

    def failed_batches(self) -> list[tuple[float, Path]]:
        """``(failed time, batch file)`` in ``failed/`` and ``quarantine/``, oldest first."""
        out = []
        for folder in (self.failed, self.quarantine):
            for path in (Path(e.path) for e in self.files(folder) if e.name.endswith(SUFFIX)):
                err = folder / f"{path.stem}{ERROR}"
                with contextlib.suppress(FileNotFoundError):
                    out.append(((err if err.exists() else path).stat().st_mtime, path))
        return sorted(out)

    def remove_failed(self, path: Path) -> int:
        return self._remove(path) + self._remove(path.with_suffix(ERROR))


@dataclass(frozen=True)
class StateSplit:
    """Batches by state from a listing: ``left/`` files, ``right/`` entries, ``done/`` files."""

    pending: int
    pending_bytes: int
    claimed: int
    claimed_bytes: int
    done: int
    #: Bytes of done batches whose file is still in ``left/`` (marked done in ``right/``).
    done_left_bytes: int


def split_states(left: dict[str, int], right: Iterable[str], done_files: Collection[str]
                 ) -> StateSplit:
    """The one reading of a listing into states (:meth:`Listing.counts` and the metrics'
    cached listing): ``left`` maps batch file names to sizes, ``right`` holds claims (a bare
    name) and done markers, ``done_files`` the batch file names in ``done/`` (looked up by
    name, never walked: the metrics keep 10k+ of them). A batch is done when marked or
    moved, claimed when it has a claim and is not done, else pending."""
    names = list(right)
    markers = {n[: -len(DONE)] for n in names if n.endswith(DONE)}
    claims = [n for n in names if "." not in n]

    def is_done(stem: str) -> bool:
        return stem in markers or f"{stem}{SUFFIX}" in done_files

    by_state = {State.PENDING: [0, 0], State.CLAIMED: [0, 0], State.DONE: [0, 0]}
    claimed = {c for c in claims if not is_done(c)}
    for n, size in left.items():
        if n.endswith(SUFFIX):
            stem = n[: -len(SUFFIX)]
            st = State.DONE if is_done(stem) else State.CLAIMED if stem in claimed else State.PENDING
            by_state[st][0] += 1
            by_state[st][1] += size
    done = len(done_files) + sum(1 for m in markers if f"{m}{SUFFIX}" not in done_files)
    return StateSplit(pending=by_state[State.PENDING][0], pending_bytes=by_state[State.PENDING][1],
                      claimed=len(claimed), claimed_bytes=by_state[State.CLAIMED][1],
                      done=done, done_left_bytes=by_state[State.DONE][1])
