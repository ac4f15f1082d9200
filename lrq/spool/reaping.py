"""Taking back claims: finding stale ones (owner dead or lease expired), requeueing or
failing them with the attempt recorded, and splitting a batch whose workers keep dying.
When to split or dead-letter is :mod:`lrq.reaper`'s policy; this is the mechanism on disk.
The protocol, crash windows included, is in :mod:`lrq.spool`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import uuid
from dataclasses import dataclass, replace
from stat import S_IWUSR

from lrq import failpoints
from lrq.errors import ForeignEntry
from lrq.spool.batches import Batch
from lrq.spool.claims import Claim, Claims, Exit, owner_alive
from lrq.spool.files import ATTEMPT, DONE, SUFFIX, _uuid, fsync_dir
from lrq.spool.listing import State


@dataclass(frozen=True)
class Stale:
    """A claim the reaper may take back, and why."""

    name: str
    reason: str
    attempt: int
    #: The owner is known dead (this host, pid gone or reused), not merely silent.
    dead: bool = False
    pid: int = 0
    start: int = 0
    #: The owner died while storing this batch and another of its batches was in the
    #: handler: that one is charged with the death, this one is requeued uncounted.
    collateral: bool = False
    #: The claim's token when it was found stale ("" if unreadable): taking it back checks
    #: that ``right/<name>`` is still that claim, not a new worker's.
    token: str = ""
    #: The claim's heartbeat (mtime) when it was found stale: one that moved since (the owner
    #: beat, or claimed the batch again: a claim's link shares its owner's mtime) is not
    #: taken back.
    beat: float | None = None


@dataclass(frozen=True)
class Reaped:
    """What :meth:`Spool.take_back` did with a stale claim. ``dying``: the batch's worker
    died ``split_after`` times; the reaper holds it (``held``) to split it or dead-letter
    its one item, and must release the claim if it cannot."""

    outcome: str  # requeued | failed | gone | dying
    #: Why the claim was stale, with how its owner ended when it is dead.
    reason: str = ""
    deaths: tuple[Exit, ...] = ()
    held: Claim | None = None


def half_name(name: str, half: int) -> str:
    """The name of half 0 or 1 of batch ``name`` when it is split: the same time stamp (a
    fifo pick takes it where the batch was), and a random-looking part derived from the
    batch's name, so a split that is redone names the same files."""
    stamp = name.rsplit("-", 1)[0]
    digest = hashlib.sha256(f"{name}/{half}".encode()).digest()
    return f"{stamp}-{_uuid.encode(uuid.UUID(bytes=digest[:16]))[:12]}"


class Reaping(Claims):
    """The reaping layer of :class:`~lrq.spool.Spool`."""

    def stale_claims(self, lease: float, now: float | None = None) -> list[Stale]:
        """Claims whose owner is dead (this host) or whose heartbeat is older than ``lease``.
        A dead owner's claims not in its handler (its record's ``handling``, see
        :meth:`mark_handled`; for a claim file of the previous version, mode 0400) are
        ``collateral`` when one of its claims was: the batch in the handler is the one that
        killed it."""
        now = self.clock() if now is None else now
        self.clear_done_claims()
        host = socket.gethostname()
        out = []
        handled = set()
        for name in self.claimed():
            try:
                st = os.lstat(self.right / name)
                c, handling = self.read_entry(self.right / name, name)
            except FileNotFoundError:
                continue
            except ForeignEntry as e:  # e.g. unreadable: skipped, never reaped or deleted
                self.note_foreign(self.right / name, e.what)
                continue
            beat = st.st_mtime
            if c is None:
                # Not written by this lrq (claims are linked in whole): wait out the lease.
                if now - beat > lease:
                    out.append(Stale(name, "unreadable claim", self.attempts(name)["attempts"] + 1))
            elif c.host == host and not owner_alive(c.pid, c.start):
                out.append(Stale(name, f"owner pid {c.pid} is dead", c.attempt, dead=True,
                                 pid=c.pid, start=c.start, token=c.token))
                if (name not in handling) if handling is not None else not st.st_mode & S_IWUSR:
                    handled.add(name)
            elif now - beat > lease:
                out.append(Stale(name, f"no heartbeat for {now - beat:.0f}s (lease {lease:.0f}s)",
                                 c.attempt, token=c.token, beat=st.st_mtime))
        in_handler = {(s.pid, s.start) for s in out if s.dead and s.name not in handled}
        return [replace(s, collateral=True)
                if s.name in handled and (s.pid, s.start) in in_handler else s for s in out]

    def reap(self, stale: Stale, max_attempts: int, exit: Exit | None = None) -> str:
        """Take back one stale claim: pending again, or ``failed/`` past ``max_attempts``.
        Returns "requeued", "failed" or "gone"; see :meth:`take_back`."""
        return self.take_back(stale, max_attempts, exit=exit).outcome

    def take_back(self, stale: Stale, max_attempts: int, *, exit: Exit | None = None,
                  split_after: int | None = None) -> Reaped:
        """Take back one stale claim and record the attempt (with ``exit``, how its owner
        ended, when the owner is dead). Then: pending again; or, at the batch's
        ``split_after``-th death, held for the caller (outcome ``dying``); or ``failed/``
        past ``max_attempts``.

        The claim is first renamed into ``tmp/`` (atomic: one reaper wins, and its owner's next
        heartbeat sees the lease is gone). The entry renamed is a link to its owner's file,
        so the owner record is read from it there. A claim whose batch file is gone (its owner was
        killed inside :meth:`fail` or :meth:`split`) is removed with its attempt record.

        Another reaper may have taken the stale claim back first, and a worker claimed the
        batch again since: the renamed file is then that worker's live claim (another owner
        token, or, when the same process claimed it again, a heartbeat that moved: all of a
        process's claims share its owner file, token and mtime). It is linked back and the
        outcome is "gone"; should a third claim have appeared in the instant between, the
        live worker loses its lease, which it notices at its next heartbeat or commit
        (nothing is stored twice).
        """
        name = stale.name
        aside = self.tmp / f"{name}.reaped.{_uuid.random(8)}"
        try:
            os.rename(self.right / name, aside)
        except FileNotFoundError:
            return Reaped("gone", stale.reason)
        found = self.read_claim_file(aside, name)
        if ((found.token if found is not None else "") != stale.token
                or (stale.beat is not None and os.lstat(aside).st_mtime != stale.beat)):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.right / name)
            os.unlink(aside)
            return Reaped("gone", stale.reason)
        done = (self.right / f"{name}{DONE}").exists()
        if not done and not (self.left / f"{name}{SUFFIX}").exists():
            for leftover in (aside, self.right / f"{name}{ATTEMPT}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            return Reaped("gone", stale.reason)
        claim = found or Claim(
            name=name, token="", attempt=stale.attempt, host="?", pid=0, start=0,
            claimed_at=0.0)
        exit = (exit or Exit()) if stale.dead else None
        reason = f"{stale.reason}: {exit.describe()}" if exit is not None else stale.reason
        prior = self.attempts(name)
        deaths = tuple(Exit(**h["exit"]) for h in prior["history"]
                       if h.get("exit") and h.get("counted", True))
        if stale.collateral:
            # Like a release: its items were handled; the batch in the handler is charged.
            reason += "; it was being stored while another batch was in the handler: not counted"
            self._record_attempt(claim, reason, exit, counted=False)
            os.unlink(aside)
            return Reaped("requeued", reason, deaths)
        deaths += (exit,) if exit is not None else ()
        dying = not done and split_after is not None and len(deaths) >= split_after
        spent = not done and max(prior["attempts"], claim.attempt) >= max_attempts
        # Held at once, before the attempt is recorded: the batch is pending from the rename
        # until this claim, and a worker taking it meanwhile would process whole a batch
        # that is being split or failed.
        held = self.claim(name) if dying or spent else None
        self._record_attempt(claim, reason, exit)
        os.unlink(aside)
        if held is None:
            return Reaped("requeued", reason, deaths)
        if dying:
            return Reaped("dying", reason, deaths, held)
        attempts = max(prior["attempts"], claim.attempt)
        self.fail(held, f"gave up after {attempts} attempts; the last: {reason}")
        return Reaped("failed", reason, deaths)

    def split(self, held: Claim, batch: Batch) -> tuple[str, str]:
        """Publish the two halves of a held batch as new batches, then retire the batch
        (its file, attempt record and claim, in that order). Each step is atomic and every
        crash point leaves the items in the batch, its halves, or both (see the module
        docstring); returns the halves' names."""
        mid = (len(batch.items) + 1) // 2
        halves = (half_name(held.name, 0), half_name(held.name, 1))
        receipts = batch.receipts
        parts = ((batch.items[:mid], receipts and receipts[:mid]),
                 (batch.items[mid:], receipts and receipts[mid:]))
        for i, (name, (items, kept)) in enumerate(zip(halves, parts)):
            if self.state(name) is State.MISSING:
                self.publish(items, batch.position, name=name, created=batch.created,
                             replace_dead=batch.replace_dead, receipts=kept)
            failpoints.hit(f"split-after-half-{i}")
        os.unlink(self.left / f"{held.name}{SUFFIX}")
        fsync_dir(self.left)
        failpoints.hit("split-after-retire")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.right / f"{held.name}{ATTEMPT}")
        self.release(held)
        return halves
