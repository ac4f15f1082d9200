"""Claims: the exclusive create that decides who processes a batch, the owner record it
holds, the lease its owner keeps (heartbeat), its attempts, picking a pending batch to claim,
and finishing one (done, released, given back, failed). The protocol is in :mod:`lrq.spool`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import secrets
import signal
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lrq import failpoints
from lrq.errors import ForeignEntry, LrqError
from lrq.spool.batches import Batches
from lrq.spool.files import ATTEMPT, DONE, ERROR, FILE_MODE, SUFFIX, fsync_dir, read_regular, write_atomic
from lrq.spool.listing import State

#: A claim's mode once its handler calls are over (:meth:`Spool.mark_handled`).
HANDLED_MODE = 0o400


@dataclass(frozen=True)
class Claim:
    """What ``right/<name>`` holds: who claimed the batch, when, and which attempt this is."""

    name: str
    token: str
    attempt: int
    host: str
    pid: int
    start: int
    claimed_at: float


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
    rng: random.Random

    def claim(self, name: str) -> Claim | None:
        """Claim ``name`` with an exclusive create; None when someone else has it."""
        if os.path.lexists(self.right / name):
            return None  # claimed or done: a stat spares writing an owner record for nothing
        attempt = self.attempts(name)["attempts"] + 1
        c = Claim(name=name, token=secrets.token_urlsafe(12), attempt=attempt,
                  host=socket.gethostname(), pid=os.getpid(), start=process_start(),
                  claimed_at=self.clock())
        # Write the owner record aside, then link it into place: link(2) is an exclusive,
        # atomic create, so a claim is never seen half-written.
        tmp = self.tmp / f"{name}.claim.{c.token}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            try:
                os.write(fd, json.dumps(vars(c)).encode())  # asdict() deep-copies: 3x the time
            finally:
                os.close(fd)
        except BaseException:
            os.unlink(tmp)  # e.g. ENOSPC: leave nothing behind
            raise
        try:
            os.link(tmp, self.right / name)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        if not (self.left / f"{name}{SUFFIX}").exists():
            # Cleanup removed the batch after our listing: undo and report no claim.
            os.unlink(self.right / name)
            return None
        failpoints.hit("after-claim")
        return c

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
        if not self.owns(claim):
            return False
        try:
            os.utime(self.right / claim.name)
        except FileNotFoundError:
            return False
        return True

    def owns(self, claim: Claim) -> bool:
        """Is ``right/<name>`` still this claim (same token)? Asked before every commit and
        heartbeat, so only the token is looked at, not the whole record rebuilt."""
        try:
            return json.loads(read_regular(self.right / claim.name))["token"] == claim.token
        except (FileNotFoundError, ForeignEntry, ValueError, KeyError, TypeError):  # not lrq's
            return False

    def read_claim(self, name: str) -> Claim | None:
        return self.read_claim_file(self.right / name)

    @staticmethod
    def read_claim_file(path: Path) -> Claim | None:
        try:
            return Claim(**json.loads(read_regular(path)))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def mark_handled(self, claim: Claim) -> None:
        """Note on the claim that its handler calls are over (only storing is left), by
        clearing its write bit: one chmod (~5 us; reading the claim first to check the token
        would be 20 us), so call it only while the lease is held. If the owner dies while
        another of its batches is in the handler, this one was not the cause (see
        :meth:`stale_claims`)."""
        with contextlib.suppress(FileNotFoundError):
            os.chmod(self.right / claim.name, HANDLED_MODE)

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
    def mark_done(self, claim: Claim, info: dict[str, Any] | None = None) -> None:
        """Write the done marker; call only after the results are committed."""
        data = json.dumps({"token": claim.token, "done_at": self.clock(), **(info or {})})
        fd = os.open(self.right / f"{claim.name}{DONE}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     FILE_MODE)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def release(self, claim: Claim) -> bool:
        """Give a claim back (the batch becomes pending) if we still own it."""
        if not self.owns(claim):
            return False
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
