"""The spool: the only code that touches a queue's folders. This docstring is the protocol.

Layout, per queue, under ``<data_dir>/<queue>/`` (folders are created 0700)::

    tmp/<name>.pkl       a batch being written; never read; orphans are swept by cleanup
    left/<name>.pkl      a published batch: tmp write, fsync, rename here; left/ is fsynced once
                         per group of batches, before the source position moves (see below)
    owners/<host>-<pid>-<start>-<token>
                         one owner file per worker process (and queue), written once: a
                         fixed-size JSON record padded with spaces (host, pid, process start,
                         token, ``handling``: the batches in its handler now), rewritten in
                         place; its mtime is the heartbeat of every claim linked to it
    right/<name>         the claim (the ack): a hard link to the claimer's owner file, made with
                         link(2) (an exclusive, atomic create: one winner, never half-written,
                         no new inode)
    done/<name>.pkl      a done batch: after the database commit its file is renamed here from
                         left/ (no new inode; its mtime, set just before, is the done time
                         retention ages from) and then its claim is removed, so left/ holds
                         only pending and claimed batches, right/ only live claims, and every
                         listing of the backlog is O(backlog), never O(done). The batch ledger
                         in the results database is the truth it can be rebuilt from
    spare/<token>        an empty retired batch file (0 bytes, one link, ours): retention
                         (:mod:`lrq.cleanup`) empties a done batch file, keeping its mtime,
                         and renames it here instead of unlinking it, up to
                         ``listing.SPARE_MAX`` files; a publisher takes one instead of
                         creating a new inode (see Publishing). Holds no data; unlinked by
                         cleanup when free inodes are below ``min_free``
    right/<name>.done    the previous versions' done marker (the claim renamed, the batch file
                         left in left/): still read as done, aged and removed by retention
    right/<name>.attempt attempts so far and why they ended, for a batch that was reclaimed
    failed/<name>.pkl    a batch that could not be processed, beside failed/<name>.error
    quarantine/<name>.pkl a file whose signature did not verify: never unpickled
    position.json        the source position, advanced only after the batch file is durable
                         (a source acknowledged at publish; a broker has none, see Receipts)
    paused.json          present while the operator has paused the queue (``lrq pause``):
                         ``{"since", "by"}``, written and removed by :mod:`lrq.control`, not
                         by the spool; no listing, budget or foreign-entry scan looks at it
    logfile-losses.json  a ``logfile`` source's reported losses (:mod:`lrq.sources.logfile`),
                         written by the source, not by the spool; nothing else reads it
    wake                 a FIFO: whatever publishes a batch writes a byte to it, waking the
                         idle workers blocked on it (:mod:`lrq.spool.wake`); holds no state
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
``20261123T064512123456-Xk3pQ9aLm2Zt`` (12 characters of shortuuid's alphabet drawn from
``os.urandom``): unique, and sorting by name sorts by creation (one
process never hands out the same microsecond twice); the halves of a split batch keep its
time stamp.

A batch is *pending* when ``left/<name>.pkl`` exists with neither ``right/<name>`` nor
``right/<name>.done``, *claimed* when ``right/<name>`` exists and the batch is not done,
*done* when ``done/<name>.pkl`` exists (or the previous versions' ``right/<name>.done``),
*failed* when it sits in ``failed/``. A claim beside a batch in ``done/`` (its worker killed
between the move and the unlink) is not a live claim: ``claimed``/``settled`` ignore it and
the reaper removes it without counting an attempt or splitting.

Claims: creating a file is the costly step on ext4 while cleanup deletes done batches (each
new inode is checked against recently deleted ones), so a claim creates none. A worker
process writes its owner file once (:mod:`lrq.spool.owners`) and claims a batch with
``link(owner file, right/<name>)``; a claim is ours while ``lstat(right/<name>)`` is the owner
file's inode (:meth:`Spool.owns`: a stat, no read). The attempt number is not on disk with the
claim: the claimer derives it from ``right/<name>.attempt`` (attempts so far + 1), and so does
the reaper for a stale claim. ``claim`` refuses a done batch: it looks for ``.done`` after
linking, since a claim renamed to ``.done`` just before our link frees ``right/<name>`` for
it (the marker exists from that instant, so the look sees it; a look before the link too
would only spare a link for a batch marked that way, at a stat on every claim);
the batch file in ``left/`` is looked at after the link as well: a stale listing may name a
batch another worker has since moved to ``done/`` and unlinked the claim of (the link then
succeeds, and this look fails), or one cleanup removed. Either way
the link is undone, if it is still ours. A claim keeps its link, and ext4 caps an inode
at 65,000 links: at ``EMLINK`` (or ``Spool.link_cap``) the process starts a new owner file.
An owner file goes when nothing links to it any more: at its process's exit, or by cleanup
once its process is dead. Claims and markers written by the previous version (a claim file of
its own holding the owner record and attempt, mode 0400 once handled; a ``.done`` file beside
it) are still read, reaped and removed.

Picking (:meth:`Spool.pick`): whatever list a worker takes a name from may be stale; the
claim's exclusive link decides, so a lost race or a batch removed since costs one failed
link (or a stat, for a name that already has an entry in ``right/``). A random pick (the
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
``"receipts"`` (default None): one receipt per item, aligned with ``items``, from a source
acknowledged at commit (see Receipts); a split slices them with the items, and ``lrq
retry-dead`` batches carry none (their items were committed, and acknowledged, with their
original batch).

Receipts (a source acknowledged at commit, :mod:`lrq.acker`): a batch published with receipts
is written with mode :data:`~lrq.spool.files.AWAITING_ACK_MODE` (0400, set on the open
``tmp/`` file before its rename into ``left/``); renames into ``done/``, ``failed/`` and back
keep it. Once the batch is in ``done/`` (so its ledger row is committed) the process running
the sniffer calls ``source.ack`` with its receipts and only then ``chmod``s the file back to
0600: the mark costs one metadata write and no inode (a rename ``done/`` -> ``acked/`` would
cost a directory entry in a second folder and a second place every done-batch reader looks;
``bench/ack_mark.py --files 20000``: chmod 3-6 us per batch, the rename 19-27 us). It is
not fsynced: lost in a crash, the batch is acknowledged again, which sources allow; a mark is
never made before the acknowledgement. Retention never removes (nor retires into ``spare/``) a
done batch still 0400, and ``counts`` reports them as ``awaiting_ack``; the disk budget counts
them (a broker outage then pauses the sniffer by budget). After a restart the acker finds its
held batches by this mode (``held_names``) and reads their receipts back.

A file whose signature fails is judged by its key id: one of ours with a failing HMAC was
altered, and one never used here was not written by lrq: both are moved to ``quarantine/``.
An id this data dir signed with (listed in ``<data_dir>/key-ids``) that the config no longer
has means the key changed: the batch stays pending, nothing is quarantined, and the worker
stops with :class:`~lrq.errors.KeyMismatch` (an LRQ2 file, which has no key id, counts as
such when no pending LRQ2 file verifies, unless it is newer than ``key-ids``: lrq has written
only LRQ3 files since, so it is quarantined). ``lrq run``, ``lrq work`` and ``lrq sniff``
check a sample of pending batches the same way first (:meth:`Spool.key_problem`). A planted
file cannot stop the queue this way: naming an id of ours without our key makes it
"altered", any other id a stranger, an LRQ2 file newer than ``key-ids`` planted, and all are
quarantined; only ids listed in ``key-ids`` (0600, in the 0700 data dir) and LRQ2 files
from before it stop a worker.

Leases: a worker process touches its owner file (one ``futimens``) every ``lease / 4`` while it
holds claims; the shared inode's mtime is the heartbeat of all of them, and each held claim
is then checked to still be ours (a stat). Writing the record (a claim, the handled mark)
touches it too, so a new claim starts with a fresh heartbeat. :meth:`Spool.stale_claims`
finds claims whose owner is dead (same host, pid gone or reused) or whose heartbeat is older
than the lease; :meth:`Spool.reap` moves such a claim
aside with one atomic rename (the batch is pending again, attempt + 1) or, past
``max_attempts``, moves the batch to ``failed/``. An owner that finds its claim gone has
lost its lease and must not commit; the ledger's primary key stops it if it tries anyway.

Deaths: an attempt whose owner is dead (not merely silent) is a *death*; its history entry
in ``right/<name>.attempt`` carries ``"exit": {"code": <int or null>, "signal": <"SIGSEGV"
or null>}`` (both null when only the dead pid was seen). A death is charged to the batch in
the handler: the owner record lists the batches in the handler (``handling``: a batch is
added when claimed and removed by :meth:`Spool.mark_handled` once its handler calls are
over; one ``pwrite`` of the record each, no inode), and the reaper reads it through any of
the dead owner's claims. A dead owner's claim not listed there is requeued uncounted
(``"counted": false``) when another of its claims is listed. A batch's second death hands it to
:mod:`lrq.reaper` instead of requeueing it, whatever ``max_attempts`` says (which bounds the
other failures): :meth:`Spool.split` publishes its two halves as new batches and retires it,
so the item that kills its worker ends alone in a one-item batch, which is dead-lettered.
A half's name keeps the batch's time stamp and derives its random part from the batch's
name and the half (:func:`half_name`), so an interrupted split, redone, writes the same two
files; a half that already exists in any state is not written again.

Publishing (group commit): the sniffer writes each batch to ``tmp/``, fsyncs it and renames it
into ``left/`` at once, so workers may claim it straight away; ``left/`` itself is fsynced
once for all the batches published since the last position save
(:meth:`Spool.sync_published`), and only then does the source position move (invariant 1).
A batch claimed, even done, before that fsync is fine: power lost before it can lose the
name, never the position, so its items are fetched and published again and the unique keys
absorb them. Other publishers (a split's halves, ``lrq retry-dead``, re-signing) fsync
``left/`` per file.

Spares: creating a file is the costliest step of a publish on ext4 while retention deletes
done batches (see Claims), so the ``tmp/`` file is a spare when there is one
(:func:`lrq.spool.files.take_spare`): ``lstat`` it (a regular file with one link, owned by
us; anything else is a foreign entry, never moved or opened), rename ``spare/<token>`` to
``tmp/<name>...`` (the one atomic step: two publishers never share an inode), open it
``O_WRONLY|O_NOFOLLOW|O_NONBLOCK``, ``fstat`` it (same inode, still reusable; else it is
renamed back), truncate it, then write, fsync and rename into ``left/`` exactly as a new
file. Each process caches the names of ``spare/`` and lists it again only when they are
used up (an empty ``spare/`` only once its mtime changed: a stat per publish meanwhile).
Retention's step is the reverse (:func:`lrq.spool.files.retire`): open the done batch file
the same way, check it, truncate it (its mtime put back), rename it into ``spare/``.

Crash windows and what covers them:

* killed while writing ``tmp/``: the file is never visible; the source position did not move,
  so the same items are fetched again. Killed after taking a spare (failpoint
  ``spare-after-take``), the same with an empty orphan in ``tmp/``: the tmp sweep ages an
  empty file by its ctime too (the rename set it; the mtime is still its retirement's),
  so it never takes a spare a live publisher is about to write.
* cleanup killed after emptying a done batch file, before its rename into ``spare/``
  (failpoint ``retire-after-truncate``): the batch still reads done, as an empty file with
  its done time, and the next pass retires it.
* killed after the rename, before the position is saved, or after some renames of a group
  before ``left/`` is fsynced: the items are published again in later batches; the results
  table's unique keys absorb the replay.
* killed after the claim (or during a heartbeat): the claim is a link to the owner file, so
  it names its owner whole; the reaper sees the owner is dead and makes the batch pending
  again, counting the attempt. The owner file is removed by cleanup once no claim or done
  marker links to it.
* killed after the database commit, before the move to ``done/``: the claim is reaped like
  any other; the next claimer finds the batch in the ledger and only moves it and removes
  its claim. A batch whose claim was reaped and taken by another worker since the commit is
  moved by whichever ``mark_done`` comes first; the other finds ``left/`` empty and removes
  only its own claim (a link still its owner's inode). A batch gone from both ``left/`` and
  ``done/`` is marked the previous way, by linking the owner file to ``right/<name>.done``.
* killed between setting the batch file's mtime (the done time retention ages from) and the
  move: the batch is not done on disk, and is finished as above.
* a source acknowledged at commit, killed between the fetch and the publish: the entries are
  pending for this node in the broker and not in any batch file; the restarted source re-reads
  its own pending entries minus the receipts held in batch files (``Context.held``).
* killed after the move to ``done/``, before the acknowledgement (failpoint ``ack-before``) or
  after it, before the file's mode is put back (``ack-after``): the batch still reads awaiting;
  the restarted acker acknowledges it (again).
* killed after the move to ``done/``, before the claim is removed (failpoint
  ``after-done-move``): the batch reads done (``lrq status``, ``settled``); the reaper removes
  the leftover claim without counting an attempt or splitting (``done-claim-removed``).
* a splitting reaper holds the batch's claim, so its own death is one more death of the
  batch and the next reap splits again. Killed after one or both halves are in ``left/``:
  the redone split writes only what is missing (the halves' items are never lost; a half
  already processed is not rewritten); killed after the batch file is removed, before its
  claim and attempt record are: the next reap finds the claim without a batch and removes
  them. The batch stays claimed from the reap that decides its split until it is retired
  (a split that fails once a half exists keeps it held), so no worker processes it whole
  beside a half; were one to (the microseconds between :meth:`Spool.take_back`'s rename
  and its claim), the unique keys would absorb the second store.

Code: :class:`Spool` is assembled from layers, each using only those before it:
:mod:`lrq.spool.files` (file primitives: atomic write, fsync, flock, regular-file reads),
:mod:`lrq.spool.batchfile` (a batch file's bytes: header, signature, codecs),
:mod:`lrq.spool.listing` (listings, states, counts, retention), :mod:`lrq.spool.batches`
(publishing and reading batches, keys, the position), :mod:`lrq.spool.claims` (claims,
leases, attempts, picking, finishing) and :mod:`lrq.spool.reaping` (stale claims, take
back, split).
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lrq.spool.batches import KEY_IDS, KEY_SAMPLE, Batch
from lrq.spool.batchfile import CODECS, MAGIC
from lrq.spool.claims import HANDLED_MODE, Claim, Exit, owner_alive, process_start, start_of
from lrq.spool.files import (
    ATTEMPT,
    DIR_MODE,
    DONE,
    ERROR,
    FILE_MODE,
    SUFFIX,
    flock,
    fsync_dir,
    write_atomic,
)
from lrq.spool.listing import PROBE, Counts, State
from lrq.spool.owners import OWNERS
from lrq.spool.reaping import Reaped, Reaping, Stale, half_name
from lrq.spool.wake import NAME as WAKE
from lrq.spool.wake import Doorbell

__all__ = [
    "ATTEMPT", "DIR_MODE", "DONE", "ERROR", "FILE_MODE", "HANDLED_MODE", "KEY_IDS", "KEY_SAMPLE",
    "MAGIC", "OWNERS", "PROBE", "SUFFIX", "Batch", "Claim", "Counts", "Exit", "Reaped", "Spool", "Stale",
    "State", "flock", "fsync_dir", "half_name", "owner_alive", "process_start", "start_of",
    "write_atomic",
]


class Spool(Reaping):
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
        self.done = self.root / "done"
        self.tmp = self.root / "tmp"
        self.failed = self.root / "failed"
        self.quarantine = self.root / "quarantine"
        self.spare = self.root / "spare"
        #: The queue's FIFO that wakes idle workers on a publish (:mod:`lrq.spool.wake`).
        self.bell = Doorbell(self.root / WAKE)
        self._key = key
        self._previous = previous
        self._keys: dict[bytes, bytes] | None = None
        self._key_noted = False
        self.clock = clock
        self.rng = rng or random.Random()
        self._last_us = 0
        self._candidates: list[str] = []
        self._latest: dict[str, Claim] = {}
        self._none_pending_at: tuple[int, int] | None = None
        self._owner = None
        self._spare_count: tuple[int, float] | None = None
        #: Names in ``spare/`` this process may take (one listing each time it runs out).
        self._spare_names: list[str] = []
        #: ``spare/``'s mtime when this process last found it empty.
        self._spare_empty_at: int | None = None
        self._owner_lock = threading.Lock()
        #: Entries lrq did not write, seen by this process: path -> what it is.
        self._foreign: dict[str, str] = {}
        #: ``done/``'s byte count: (its mtime and inode, ns when counted, bytes).
        self._done_bytes: tuple[tuple[int, int], int, int] | None = None
        #: ``done/``'s mtime and inode at retention's last full look, when that look began
        #: (ns), and when the oldest done batch it kept expires (:meth:`retention_due`).
        self._retention: tuple[tuple[int, int], int, float] | None = None

    def ensure(self) -> Spool:
        for d in (self.root.parent, self.root, self.left, self.right, self.done, self.tmp, self.failed,
                  self.quarantine, self.spare, self.root / OWNERS):
            d.mkdir(mode=DIR_MODE, exist_ok=True)
        return self

    # -- singletons ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, job: str) -> Iterator[None]:
        with flock(self.root / f"{job}.lock", f"{job} of queue {self.queue}"):
            yield
