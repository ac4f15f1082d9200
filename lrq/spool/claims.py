"""Claims: the exclusive link that decides who processes a batch (a hard link to the
claimer's owner file, :mod:`lrq.spool.owners`), the lease its owner keeps (one touch of the
owner file for all its claims), the handled mark (the owner record's ``handling``), its
attempts (derived from ``right/<name>.attempt``), picking a pending batch to claim, and
finishing one (done by renaming the claim, released, given back, failed). Claim files of the
previous version (their own inode, holding the owner record) are still read. The protocol is
in :mod:`lrq.spool`.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import random
import signal
import socket
import threading
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lrq import failpoints
from lrq.errors import ForeignEntry, LrqError
from lrq.spool.batches import Batches
from lrq.spool.files import ATTEMPT, DONE, ERROR, SUFFIX, fsync_dir, read_regular, write_atomic
from lrq.spool.listing import State
from lrq.spool.owners import OWNERS, READ_TRIES, RECORD, Owner, OwnerId, name_fields, parse_record

log = logging.getLogger(__name__)

#: Claims :meth:`Claims.owns` remembers, to tell this process's new claim of a batch from an
#: old one (all its claims share its owner file's inode); a worker holds two at a time.
LATEST_KEPT = 256
#: A claim file's mode, in the previous version, once its handler calls were over: still
#: read from claim files an upgraded data dir holds.
HANDLED_MODE = 0o400


@dataclass(frozen=True)
class Claim:
    """A claim of ``right/<name>``: who claimed the batch, when, and which attempt this is.
    Only the owner (host, pid, start, token) is on disk, in the owner file the claim links
    to; the attempt is derived from ``right/<name>.attempt``."""

    name: str
    token: str
    attempt: int
    host: str
    pid: int
    start: int
    #: Not compared: read back from a link it is the inode's change time, at or after this.
    claimed_at: float = field(compare=False)
    #: The owner file's inode this claim links to (0 for a claim file of the previous
    #: version, which is told apart by ``token``).
    dev: int = 0
    ino: int = 0


@dataclass(frozen=True)
class Exit:
    """How a worker process ended, as its parent saw it: an exit status, a signal, or
    neither when only the dead pid was seen (a by-hand ``lrq work``)."""

    code: int | None = None
    signal: str | None = None

    @classmethod
    def of(cls, returncode: int | None) -> Exit:
        """From a ``subprocess``/``multiprocessing`` return code (negative: killed by that
        signal; None: unknown)."""
        if returncode is None:
            return cls()
        if returncode < 0:
            try:
                return cls(signal=signal.Signals(-returncode).name)
            except ValueError:
                return cls(signal=f"signal {-returncode}")
        return cls(code=returncode)

    def describe(self) -> str:
        """``killed by SIGSEGV (exit -11)``, ``exited with code 3`` or ``died (exit unknown)``."""
        if self.signal is not None:
            number = getattr(signal.Signals, self.signal, None)
            return f"killed by {self.signal}" + (f" (exit -{number.value})" if number else "")
        if self.code is not None:
            return f"exited with code {self.code}"
        return "died (exit unknown)"


def process_start() -> int:
    """This process's start time in clock ticks since boot (tells a reused pid apart).

    Read once per process: the cache is keyed on the pid, so a forked child reads its own
    instead of claiming with its parent's start (which the reaper would take for a dead owner).
    """
    return _start_of(os.getpid())


def start_of(pid: int) -> int:
    """Process ``pid``'s start time in clock ticks since boot; 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


_start_of = functools.lru_cache(maxsize=1)(start_of)


def owner_alive(pid: int, start: int) -> bool:
    """Is the process ``pid`` (started at ``start`` ticks) still running on this host?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # cannot tell: let the lease decide
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie is dead
        return False
    return start == 0 or int(fields[19]) == start


class Claims(Batches):
    """The claim layer of :class:`~lrq.spool.Spool`; its attributes are set there."""

    #: Names an earlier pick listed or sampled and has not tried yet.
    _candidates: list[str]
    #: This process's newest claim of each batch it claimed lately (at most ``LATEST_KEPT``).
    _latest: dict[str, Claim]
    rng: random.Random
    #: This process's owner file for the queue (:meth:`owner`), None until the first claim.
    _owner: Owner | None
    _owner_lock: threading.Lock
    #: Links an owner file may have before this process starts a new one; None leaves it
    #: to the filesystem (``EMLINK``). Tests set a small cap instead of making 65,000 links.
    link_cap: int | None = None

    def owner(self) -> Owner:
        """This process's owner file for the queue, made (and ``owners/`` with it) on first
        use and held by this spool. A forked child inheriting the spool sees another pid
        and makes its own: claiming with its parent's would make its claims look like the
        parent's to the reaper. The owner's files are removed at exit (or when the spool is
        collected) if nothing links to them any more (:meth:`Owner.close`)."""
        owner = self._owner
        if owner is None or owner.pid != os.getpid():
            with self._owner_lock:
                owner = self._owner
                if owner is None or owner.pid != os.getpid():
                    folder = self.root / OWNERS
                    folder.mkdir(mode=0o700, exist_ok=True)
                    owner = self._owner = Owner(folder, process_start())
                    weakref.finalize(self, owner.close)
        return owner

    def close_owner(self) -> None:
        """Remove this process's owner files now if nothing links to them (as at exit): a
        worker process forked by the scheduler ends without running exit handlers."""
        owner = self._owner
        if owner is not None and owner.pid == os.getpid():
            owner.close()
            self._owner = None  # a later claim makes a new one

    def claim(self, name: str) -> Claim | None:
        """Claim ``name``: link this process's owner file to ``right/<name>``; None when the
        batch is claimed, done or gone.

        ``link(2)`` is an exclusive, atomic create of an entry for an inode that exists, so
        there is one winner and the claim is never half-written, and no inode is created.
        A batch marked done the previous versions' way has ``right/<name>.done`` and no
        ``right/<name>`` (the marker is the claim renamed), so ``.done`` is looked for after
        linking: the claim it was renamed from existed until the rename, so our link can only
        have succeeded after it, when ``.done`` already existed, and the look sees it. The batch file
        is looked at after the link too, as cleanup may have removed it since our listing.
        Either way the link is undone (only if it is still ours) and the answer is None.
        """
        # Strings, not Paths: pathlib's joins cost more than the system calls here.
        right = f"{self.right}/{name}"
        done = f"{right}{DONE}"
        if os.path.lexists(right):
            return None  # claimed: a stat spares a link for nothing
        # A done batch is told by the look after the link (``.done`` is the previous
        # versions' marker and this version's rare fallback: a look before would cost every
        # claim a stat for it).
        owner = self.owner()
        # The link shares the owner file's mtime, which is the claim's heartbeat: a process
        # idle past the lease would show its new claim stale until the record's write below.
        owner.touch()
        try:
            oid = self._link(owner, right)
        except FileExistsError:
            return None
        if os.path.lexists(done) or not os.path.exists(f"{self.left}/{name}{SUFFIX}"):
            self._unlink_if(right, oid)
            return None
        owner.handling(name, True, oid)
        failpoints.hit("after-claim")
        claim = Claim(name=name, token=owner.token, attempt=self.attempts(name)["attempts"] + 1,
                      host=owner.host, pid=owner.pid, start=owner.start,
                      claimed_at=self.clock(), dev=oid.dev, ino=oid.ino)
        self._latest[name] = claim
        while len(self._latest) > LATEST_KEPT:
            del self._latest[next(iter(self._latest))]
        return claim

    def _link(self, owner: Owner, target: str | Path) -> OwnerId:
        """Link ``owner``'s file to ``target``; a new owner file when the link limit is
        reached (``EMLINK``, or :attr:`link_cap`) or the file's path is gone."""
        for _ in range(3):
            path, oid = owner.path, owner.id
            try:
                if self.link_cap is not None and os.lstat(path).st_nlink >= self.link_cap:
                    raise OSError(errno.EMLINK, "link cap reached", str(path))
                os.link(path, target)
                return oid
            except FileExistsError:
                raise
            except FileNotFoundError:
                if os.path.lexists(path):
                    raise  # the target's folder is gone, not the owner file
            except OSError as e:
                if e.errno != errno.EMLINK:
                    raise
            log.info("owner-rotated queue=%s path=%s: its links are used up or its path is gone",
                     self.queue, path)
            owner.rotate()
        raise LrqError(f"cannot link an owner file of queue {self.queue} to {target}")

    def _unlink_if(self, path: str, oid: OwnerId) -> None:
        """Remove ``path`` if it is still a link to owner file ``oid``."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (oid.dev, oid.ino):
                os.unlink(path)

    def attempts(self, name: str) -> dict[str, Any]:
        """``{"attempts": n, "history": [...]}``: attempts that ended without finishing."""
        try:
            return json.loads(read_regular(self.right / f"{name}{ATTEMPT}"))
        except ForeignEntry as e:
            self.note_foreign(self.right / f"{name}{ATTEMPT}", e.what)
        except (FileNotFoundError, ValueError):
            pass
        return {"attempts": 0, "history": []}

    def _record_attempt(self, claim: Claim, reason: str, exit: Exit | None = None,
                        counted: bool = True, progress: int | None = None) -> dict[str, Any]:
        record = self.attempts(claim.name)
        if counted:
            record["attempts"] = max(record["attempts"], claim.attempt)
        entry = {"attempt": claim.attempt, "host": claim.host, "pid": claim.pid,
                 "claimed_at": claim.claimed_at, "ended_at": self.clock(), "reason": reason}
        if exit is not None:
            entry["exit"] = asdict(exit)
        if not counted:
            entry["counted"] = False
        if progress is not None:
            entry["progress"] = progress
        record["history"] = (record["history"] + [entry])[-20:]
        write_atomic(self.right / f"{claim.name}{ATTEMPT}", json.dumps(record).encode(), self.tmp)
        return record

    def heartbeat(self, claim: Claim) -> bool:
        """Refresh the lease; False when the claim is no longer ours (reaped, released)."""
        return self.beat([claim])[0]

    def beat(self, claims: list[Claim]) -> list[bool]:
        """Refresh the lease of every claim of this process (one ``futimens`` of the owner
        file they all link to); then, per claim, whether it is still ours (a stat each)."""
        if claims:
            self.owner().touch()
            failpoints.hit("during-heartbeat")
        return [self.owns(c) for c in claims]

    def owns(self, claim: Claim) -> bool:
        """Is ``right/<name>`` still this claim? Asked before every commit and at every
        heartbeat: a stat, comparing the entry's inode with the owner file's."""
        try:
            st = os.lstat(f"{self.right}/{claim.name}")
        except FileNotFoundError:
            return False
        if claim.ino:
            # Every claim of this process links the same inode: one it made of this batch
            # since (after a reaper took this one back) is not this claim.
            latest = self._latest.get(claim.name)
            return (st.st_dev, st.st_ino) == (claim.dev, claim.ino) and latest in (None, claim)
        c = self.read_claim(claim.name)  # a claim file of the previous version
        return c is not None and c.token == claim.token

    def read_claim(self, name: str) -> Claim | None:
        return self.read_claim_file(self.right / name, name)

    def read_claim_file(self, path: Path, name: str) -> Claim | None:
        """The claim at ``path`` (``right/<name>`` or a link to it), None if it is not one."""
        return self.read_entry(path, name)[0]

    def read_entry(self, path: Path, name: str) -> tuple[Claim | None, list[str] | None]:
        """The claim at ``path`` and, for a link to an owner file, the batches its owner has
        in the handler (None for a claim file of the previous version, which has its own
        inode and marks "handled" in its mode). The attempt of a linked claim is derived
        from ``right/<name>.attempt``, as its owner did when it claimed; its ``claimed_at``
        is the inode's change time, at or after the claim. A record read while its owner
        rewrites it is read again, a bounded number of times."""
        for _ in range(READ_TRIES):
            try:
                raw = read_regular(path)
                st = os.lstat(path)
            except FileNotFoundError:
                return None, None
            rec = parse_record(raw)
            if rec is not None:
                try:
                    claim = Claim(name=name, token=str(rec["token"]),
                                  attempt=self.attempts(name)["attempts"] + 1,
                                  host=str(rec["host"]), pid=int(rec["pid"]),
                                  start=int(rec["start"]), claimed_at=st.st_ctime,
                                  dev=st.st_dev, ino=st.st_ino)
                except (KeyError, TypeError, ValueError):
                    return None, None
                return claim, [str(n) for n in rec["handling"]]
            try:
                return Claim(**json.loads(raw)), None
            except (ValueError, TypeError):
                if raw.rstrip(b" ")[:1] != b"{" or len(raw) != RECORD:
                    return None, None  # not a record being rewritten: not lrq's
        return None, None

    def mark_handled(self, claim: Claim) -> None:
        """Note in the owner record that the batch's handler calls are over (only storing is
        left): one ``pwrite``, no new inode. If the owner dies while another of its batches
        is in the handler, this one was not the cause (see :meth:`stale_claims`)."""
        self._unhandle(claim)

    def _unhandle(self, claim: Claim) -> None:
        if claim.ino:
            self.owner().handling(claim.name, False, OwnerId(claim.dev, claim.ino))

    def sweep_owners(self) -> int:
        """Remove the owner files of dead processes (this host) that no claim or done marker
        links to any more; return how many. A live owner's file is left to its process,
        which removes it at exit if nothing links to it."""
        host = socket.gethostname()
        removed = 0
        for e in self.files(self.root / OWNERS):
            fields = name_fields(e.name)
            if fields is None or fields[0] != host or owner_alive(fields[1], fields[2]):
                continue
            with contextlib.suppress(FileNotFoundError):
                if e.stat(follow_symlinks=False).st_nlink == 1:
                    os.unlink(e.path)
                    removed += 1
        return removed

    def pick(self, order: str = "random") -> Claim | None:
        """Claim one pending batch, or return None when there is none.

        The listing is cached between calls and refreshed when used up, so a claim costs
        O(1) amortised however long the backlog. With nothing cached, a random pick caches a
        sample of ``left/`` first (:meth:`_sample_left`) and lists only if none of it is
        pending, so even a new process's first claim does not list the backlog. A fifo pick
        needs the sorted listing: its first one costs O(backlog).
        """
        claim = self._pick_cached(order)
        if claim is None and order == "random":
            self._candidates = self._sample_left()
            claim = self._pick_cached(order)
        if claim is None:
            self._candidates = self.pending(ordered=order == "fifo")
            if order == "fifo":
                self._candidates.reverse()
            claim = self._pick_cached(order)
        return claim

    def _pick_cached(self, order: str) -> Claim | None:
        """Claim a name from the cached ones (a sample or a listing); None once used up."""
        while self._candidates:
            if order == "fifo":
                name = self._candidates.pop()
            else:
                i = self.rng.randrange(len(self._candidates))
                self._candidates[i], self._candidates[-1] = self._candidates[-1], self._candidates[i]
                name = self._candidates.pop()
            claim = self.claim(name)
            if claim is not None:
                return claim
        return None

    # -- finishing -----------------------------------------------------------------------
    def mark_done(self, claim: Claim) -> None:
        """Mark the batch done; call only after the results are committed. The batch file's
        mtime is set first (it is the done time that retention ages from), then it is renamed
        from ``left/`` to ``done/`` (no new inode) and the claim is removed, so ``left/`` keeps
        only pending and claimed batches and ``right/`` only live claims. Killed between the
        two, the claim of a batch in ``done/`` is removed by the reaper (nothing counted or
        split). A batch file no longer in ``left/`` (already moved by another claimer that
        finalized it from the ledger) leaves only the claim to remove; one gone entirely is
        marked the previous versions' way, by linking this process's owner file to
        ``right/<name>.done``."""
        left = f"{self.left}/{claim.name}{SUFFIX}"
        right = f"{self.right}/{claim.name}"
        with contextlib.suppress(FileNotFoundError):
            os.utime(left)
        self._unhandle(claim)
        try:
            os.rename(left, f"{self.done}/{claim.name}{SUFFIX}")
        except FileNotFoundError:
            if not os.path.exists(f"{self.done}/{claim.name}{SUFFIX}"):
                with contextlib.suppress(FileExistsError):
                    self._link(self.owner(), f"{right}{DONE}")
        failpoints.hit("after-done-move")
        if claim.ino:
            self._unlink_if(right, OwnerId(dev=claim.dev, ino=claim.ino))
        elif self.owns(claim):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(right)

    def release(self, claim: Claim) -> bool:
        """Give a claim back (the batch becomes pending) if we still own it."""
        if not self.owns(claim):
            return False
        self._unhandle(claim)
        with contextlib.suppress(FileNotFoundError):  # reaped since we looked: gone either way
            os.unlink(self.right / claim.name)
        return True

    def note_release(self, claim: Claim, reason: str, progress: int | None = None) -> int:
        """Record in the attempt history that ``claim`` is about to be released uncounted
        (infrastructure failed), with ``progress``: how many batches of the queue are done
        now (the ledger's count; None when it cannot be read). Return how many of the
        uncounted releases in a row since the last counted attempt came while other batches
        got done (``progress`` grew since the release before): this batch fails while the
        rest flows, which an outage, where nothing is done, never shows. 0 if the claim is
        no longer ours."""
        if not self.owns(claim):
            return 0
        history = self._record_attempt(claim, reason, counted=False,
                                       progress=progress)["history"]
        marks: list[int | None] = []  # newest first
        for entry in reversed(history):
            if entry.get("counted", True):
                break
            marks.append(entry.get("progress"))
        return sum(1 for newer, older in zip(marks, marks[1:])
                   if newer is not None and older is not None and newer > older)

    def give_back(self, claim: Claim, reason: str) -> None:
        """Release a claim whose attempt failed, counting the attempt (unlike :meth:`release`):
        the next claim is attempt + 1, and the history keeps ``reason``."""
        if self.owns(claim):
            self._record_attempt(claim, reason)
            self.release(claim)

    def fail(self, claim: Claim, error: str, folder: Path | None = None) -> Path:
        """Move a claimed batch to ``failed/`` (or ``folder``) with an error file beside it."""
        folder = folder or self.failed
        self._unhandle(claim)
        err = folder / f"{claim.name}{ERROR}"
        record = {"name": claim.name, "queue": self.queue, "attempt": claim.attempt,
                  "claimed_at": claim.claimed_at, "failed_at": self.clock(),
                  "host": claim.host, "pid": claim.pid, "error": error,
                  "history": self.attempts(claim.name)["history"]}
        write_atomic(err, json.dumps(record, indent=2).encode(), self.tmp)
        os.rename(self.left / f"{claim.name}{SUFFIX}", folder / f"{claim.name}{SUFFIX}")
        fsync_dir(folder)
        fsync_dir(self.left)
        for leftover in (claim.name, f"{claim.name}{ATTEMPT}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.right / leftover)
        return err

    def quarantine_batch(self, claim: Claim, error: str) -> Path:
        """Set aside a file that failed its signature check; it is never unpickled."""
        return self.fail(claim, error, self.quarantine)

    def requeue(self, name: str) -> str:
        """Put a failed batch back into ``left/`` (attempts reset), or release a stuck claim."""
        failed = self.failed / f"{name}{SUFFIX}"
        if failed.exists():
            os.rename(failed, self.left / f"{name}{SUFFIX}")
            fsync_dir(self.left)
            self.bell.ring()
            for leftover in (self.failed / f"{name}{ERROR}", self.right / f"{name}{ATTEMPT}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            return "requeued from failed/"
        state = self.state(name)
        if state is State.CLAIMED:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.right / name)
            return "claim released"
        if state is State.QUARANTINED:
            raise LrqError(f"batch {name} is quarantined (its signature did not verify); if lrq "
                           f"wrote it, re-sign it: lrq requeue --quarantined {name}")
        raise LrqError(f"batch {name} is {state.value}; only failed or claimed batches can be requeued")
