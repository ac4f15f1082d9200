"""The spool: the only code that touches a queue's folders. This docstring is the protocol.

Layout, per queue, under ``<data_dir>/<queue>/`` (folders are created 0700)::

    tmp/<name>.pkl       a batch being written; never read; orphans are swept by cleanup
    left/<name>.pkl      a published batch: tmp write, fsync, rename here, fsync left/
    right/<name>         the claim (the ack): exclusive create (link(2) of a written file), one winner;
                         holds the owner record as JSON (host, pid, process start, attempt, token);
                         mode 0400 once the batch's handler calls are over (only storing is left)
    right/<name>.done    the done marker, written after the database commit; the batch ledger
                         in the results database is the truth it can be rebuilt from
    right/<name>.attempt attempts so far and why they ended, for a batch that was reclaimed
    failed/<name>.pkl    a batch that could not be processed, beside failed/<name>.error
    quarantine/<name>.pkl a file whose signature did not verify: never unpickled
    position.json        the source position, advanced only after the batch file is durable
    ../key-ids           ids of the keys this data dir has signed batches with, one per line
    <job>.lock           flock files making the sniffer (and the scheduler) single per folder
    workers/<pid>-<start> one empty file per live ``lrq work`` process of this queue (see
                         :mod:`lrq.process`); a scheduler counts them before it starts more

Only regular files are lrq's. Anything else in these folders (a directory, FIFO, socket,
symlink, or a file that cannot be read) is a *foreign entry*: every listing skips it, no
reader opens it in a way that could block or follow it
(:func:`lrq.spool.files.read_regular`), cleanup never deletes it, and it is logged once per
process (``foreign-entry``) and shown by ``lrq status``.

Names are ``<UTC time to the microsecond>-<shortuuid>``, e.g.
``20261123T064512123456-Xk3pQ9aLm2Zt``: unique, and sorting by name sorts by creation (one
process never hands out the same microsecond twice); the halves of a split batch keep its
time stamp.

A batch is *pending* when ``left/<name>.pkl`` exists and ``right/<name>`` does not, *claimed*
when ``right/<name>`` exists without ``right/<name>.done``, *done* with both, *failed* when it
sits in ``failed/``.

Picking (:meth:`Spool.pick`): whatever list a worker takes a name from may be stale; the
claim's exclusive link decides, so a lost race or a batch removed since costs one failed
create (or a stat, for a name that already has an entry in ``right/``). A random pick (the
default) takes a random name from the names an earlier pick cached; with none left (always
so in a new worker process) it caches ``PROBE`` entries of ``left/`` read from a random
directory offset: on ext4 a random point in name-hash order, so the cost does not grow with
the backlog and workers starting together do not race for the same names. Only when none of
those is pending does it list ``left/`` and ``right/`` in full and cache that. A fifo pick
lists and sorts both folders whenever its cache is used up, so a process's first one costs
O(backlog). A pick answers "nothing pending" only after a full listing.

Batch file: the magic ``LRQ3\\n``, the signing key's id (8 bytes, :func:`lrq.signing.key_id`),
an HMAC-SHA256 (32 bytes) of everything after it, one codec byte (0 none, 1 zlib, 2 zstd),
then the pickle of ``{"name", "queue", "created", "position", "items"}`` compressed with
that codec. The signature is checked before anything is decompressed or unpickled, so only
files written with one of this data dir's keys (``secret``, ``previous_secrets``) are read.
Files of the older ``LRQ2\\n`` format (no key id) are still read.
Optional keys, absent from files that do not need them (and from files written before them),
read as their default: ``"replace_dead": True`` marks a batch ``lrq retry-dead`` published
from dead letters; storing it removes those keys' old dead letters in the same transaction.

A file whose signature fails is judged by its key id: one of ours with a failing HMAC was
altered, and one never used here was not written by lrq: both are moved to ``quarantine/``.
An id this data dir signed with (listed in ``<data_dir>/key-ids``) that the config no longer
has means the key changed: the batch stays pending, nothing is quarantined, and the worker
stops with :class:`~lrq.errors.KeyMismatch` (an LRQ2 file, which has no key id, counts as
such when no pending batch verifies). ``lrq run`` and ``lrq work`` check a sample of pending
batches the same way before claiming (:meth:`Spool.key_problem`). A planted file cannot stop the queue
this way: naming an id of ours without our key makes it "altered", any other id a stranger,
and both are quarantined; only ids listed in ``key-ids`` (0600, in the 0700 data dir) stop a
worker.

Leases: the owner of a claim touches ``right/<name>`` (its mtime is the heartbeat) while it
works. :meth:`Spool.stale_claims` finds claims whose owner is dead (same host, pid gone or
reused) or whose heartbeat is older than the lease; :meth:`Spool.reap` moves such a claim
aside with one atomic rename (the batch is pending again, attempt + 1) or, past
``max_attempts``, moves the batch to ``failed/``. An owner that finds its claim gone has
lost its lease and must not commit; the ledger's primary key stops it if it tries anyway.

Deaths: an attempt whose owner is dead (not merely silent) is a *death*; its history entry
in ``right/<name>.attempt`` carries ``"exit": {"code": <int or null>, "signal": <"SIGSEGV"
or null>}`` (both null when only the dead pid was seen). A death is charged to the batch in
the handler: a dead owner's claim of mode 0400 is requeued uncounted (``"counted": false``)
when another of its claims was still in the handler. A batch's second death hands it to
:mod:`lrq.reaper` instead of requeueing it, whatever ``max_attempts`` says (which bounds the
other failures): :meth:`Spool.split` publishes its two halves as new batches and retires it,
so the item that kills its worker ends alone in a one-item batch, which is dead-lettered.
A half's name keeps the batch's time stamp and derives its random part from the batch's
name and the half (:func:`half_name`), so an interrupted split, redone, writes the same two
files; a half that already exists in any state is not written again.

Crash windows and what covers them:

* killed while writing ``tmp/``: the file is never visible; the source position did not move,
  so the same items are fetched again.
* killed after the rename, before the position is saved: the items are published again in a
  later batch; the results table's unique keys absorb the replay.
* killed after the claim: the claim (written aside and linked into place, so never empty)
  names its owner, so the reaper sees the owner is dead and makes the batch pending again,
  counting the attempt.
* killed after the database commit, before the done marker: the next claimer finds the batch
  in the ledger and only writes the marker.
* a splitting reaper holds the batch's claim, so its own death is one more death of the
  batch and the next reap splits again. Killed after one or both halves are in ``left/``:
  the redone split writes only what is missing (the halves' items are never lost; a half
  already processed is not rewritten); killed after the batch file is removed, before its
  claim and attempt record are: the next reap finds the claim without a batch and removes
  them. The batch stays claimed from the reap that decides its split until it is retired
  (a split that fails once a half exists keeps it held), so no worker processes it whole
  beside a half; were one to (the microseconds between :meth:`Spool.take_back`'s rename
  and its claim), the unique keys would absorb the second store.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from stat import S_IWUSR

from lrq import failpoints
from lrq.errors import ForeignEntry
from lrq.spool.batches import KEY_IDS, KEY_SAMPLE, Batch
from lrq.spool.batchfile import CODECS, MAGIC
from lrq.spool.claims import (
    HANDLED_MODE,
    Claim,
    Claims,
    Exit,
    owner_alive,
    process_start,
    start_of,
)
from lrq.spool.files import (
    ATTEMPT,
    DIR_MODE,
    DONE,
    ERROR,
    FILE_MODE,
    SUFFIX,
    _uuid,
    flock,
    fsync_dir,
    write_atomic,
)
from lrq.spool.listing import PROBE, Counts, State


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


class Spool(Claims):
    """One queue's folders. Safe to use from many processes at once."""

    def __init__(self, data_dir: Path, queue: str, *, key: bytes | None = None,
                 previous: tuple[bytes, ...] = (), compress: str = "none",
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        if compress not in CODECS:
            raise ValueError(f"unknown codec {compress!r} (known: {', '.join(CODECS)})")
        self.queue = queue
        self.compress = compress
        self.root = Path(data_dir) / queue
        self.left = self.root / "left"
        self.right = self.root / "right"
        self.tmp = self.root / "tmp"
        self.failed = self.root / "failed"
        self.quarantine = self.root / "quarantine"
        self._key = key
        self._previous = previous
        self._keys: dict[bytes, bytes] | None = None
        self._key_noted = False
        self.clock = clock
        self.rng = rng or random.Random()
        self._last_us = 0
        self._candidates: list[str] = []
        self._none_pending_at: tuple[int, int] | None = None
        #: Entries lrq did not write, seen by this process: path -> what it is.
        self._foreign: dict[str, str] = {}

    def ensure(self) -> Spool:
        for d in (self.root.parent, self.root, self.left, self.right, self.tmp, self.failed,
                  self.quarantine):
            d.mkdir(mode=DIR_MODE, exist_ok=True)
        return self

    def stale_claims(self, lease: float, now: float | None = None) -> list[Stale]:
        """Claims whose owner is dead (this host) or whose heartbeat is older than ``lease``.
        A dead owner's claims marked handled (:meth:`mark_handled`) are ``collateral`` when
        one of its claims was not: the batch in the handler is the one that killed it."""
        now = self.clock() if now is None else now
        host = socket.gethostname()
        out = []
        handled = set()
        for name in self.claimed():
            try:
                st = (self.right / name).stat()
                c = self.read_claim(name)
            except FileNotFoundError:
                continue
            except ForeignEntry as e:  # e.g. unreadable: skipped, never reaped or deleted
                self.note_foreign(e.path, e.what)
                continue
            beat = st.st_mtime
            if c is None:
                # Not written by this lrq (claims are linked in whole): wait out the lease.
                if now - beat > lease:
                    out.append(Stale(name, "unreadable claim", self.attempts(name)["attempts"] + 1))
            elif c.host == host and not owner_alive(c.pid, c.start):
                out.append(Stale(name, f"owner pid {c.pid} is dead", c.attempt, dead=True,
                                 pid=c.pid, start=c.start))
                if not st.st_mode & S_IWUSR:
                    handled.add(name)
            elif now - beat > lease:
                out.append(Stale(name, f"no heartbeat for {now - beat:.0f}s (lease {lease:.0f}s)",
                                 c.attempt))
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
        heartbeat sees the lease is gone). A claim whose batch file is gone (its owner was
        killed inside :meth:`fail` or :meth:`split`) is removed with its attempt record.
        """
        name = stale.name
        aside = self.tmp / f"{name}.reaped.{_uuid.random(8)}"
        try:
            os.rename(self.right / name, aside)
        except FileNotFoundError:
            return Reaped("gone", stale.reason)
        done = (self.right / f"{name}{DONE}").exists()
        if not done and not (self.left / f"{name}{SUFFIX}").exists():
            for leftover in (aside, self.right / f"{name}{ATTEMPT}"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
            return Reaped("gone", stale.reason)
        claim = self.read_claim_file(aside) or Claim(
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
        for i, (name, items) in enumerate(zip(halves, (batch.items[:mid], batch.items[mid:]))):
            if self.state(name) is State.MISSING:
                self.publish(items, batch.position, name=name, created=batch.created)
            failpoints.hit(f"split-after-half-{i}")
        os.unlink(self.left / f"{held.name}{SUFFIX}")
        fsync_dir(self.left)
        failpoints.hit("split-after-retire")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.right / f"{held.name}{ATTEMPT}")
        self.release(held)
        return halves

    @contextlib.contextmanager
    def lock(self, job: str) -> Iterator[None]:
        with flock(self.root / f"{job}.lock", f"{job} of queue {self.queue}"):
            yield


__all__ = [
    "ATTEMPT", "DIR_MODE", "DONE", "ERROR", "FILE_MODE", "HANDLED_MODE", "KEY_IDS", "KEY_SAMPLE",
    "MAGIC", "PROBE", "SUFFIX", "Batch", "Claim", "Counts", "Exit", "Reaped", "Spool", "Stale",
    "State", "flock", "fsync_dir", "half_name", "owner_alive", "process_start", "start_of",
    "write_atomic",
]
