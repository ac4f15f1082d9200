"""Cleanup: the reaper, the tmp sweep, retention, and the disk budget.

One pass, in order:

1. **Reap** stale claims (dead owner, or heartbeat older than ``lease``): pending again, or
   ``failed/`` past ``max_attempts``; at a batch's second death, split in two new batches
   or, with one item, dead-lettered (see :mod:`lrq.reaper`).
2. **Sweep** files in ``tmp/`` older than ``cleanup.tmp_age`` (writers that died), and the
   owner files of dead workers that no claim or done marker links to any more.
3. **Retention**: done batches older than ``keep_done``, failed and quarantined ones older
   than ``keep_failed``. A done batch file is retired into ``spare/`` (emptied, kept for the
   sniffer to reuse its inode, up to :data:`lrq.spool.listing.SPARE_MAX`), unless free
   inodes are below ``min_free``; here and in the budget step.
4. **Budget**: while the sniffer could not publish its next batch
   (:meth:`lrq.disk.Budget.blocked`: near ``max_bytes``, or free space minus the batch below
   ``min_free``), or the data dir is above 80% of ``max_bytes``, remove done batches oldest
   first. If that is not enough, the report and the log say what holds the space.

It never removes a pending or claimed batch, nor a failed one inside ``keep_failed``: if
those alone fill the budget, the sniffer's backpressure holds new work back instead.
Runs as ``lrq cleanup`` and as a scheduled job, one at a time per data dir (``flock``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from lrq import process, reaper
from lrq.app import App
from lrq.config import QueueConfig
from lrq.disk import Space
from lrq.errors import AlreadyRunning
from lrq.spool import flock

log = logging.getLogger(__name__)


@dataclass
class Report:
    queue: str
    reclaimed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: Batches whose worker died twice, split in halves; one-item ones dead-lettered.
    split: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    tmp_removed: int = 0
    done_removed: int = 0
    done_trimmed: int = 0
    failed_removed: int = 0
    bytes_freed: int = 0
    skipped: str = ""
    #: Set when the sniffer still has no room after trimming: why, and what holds the space.
    still_blocked: str = ""

    def lines(self, dry_run: bool) -> list[str]:
        verb = "would " if dry_run else ""
        if self.skipped:
            return [f"{self.queue}: skipped ({self.skipped})"]
        return [f"{self.queue}: {verb}reclaim {len(self.reclaimed)} stale claims, "
                f"{verb}fail {len(self.failed)} batches past max_attempts, "
                f"{verb}split {len(self.split)} batches whose worker died twice and "
                f"{verb}dead-letter {len(self.dead_lettered)} items that killed their worker, "
                f"{verb}remove {self.done_removed} done batches past keep_done and "
                f"{self.done_trimmed} more for the budget, {self.failed_removed} failed past "
                f"keep_failed, {self.tmp_removed} orphan tmp files; "
                f"{self.bytes_freed} bytes {'to free' if dry_run else 'freed'}"] + (
                    [f"{self.queue}: no room for the next batch: {self.still_blocked}"]
                    if self.still_blocked else [])

    @property
    def changed(self) -> bool:
        return bool(self.reclaimed or self.failed or self.split or self.dead_lettered
                    or self.tmp_removed or self.done_removed or self.done_trimmed
                    or self.failed_removed)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def run(app: App, *, queue: str | None = None, now: float | None = None,
        dry_run: bool = False, exits: reaper.Exits | None = None) -> list[Report]:
    """One cleanup pass over every queue (or one); see the module docstring. ``exits``: how
    the scheduler's worker processes ended, recorded with their dead claims."""
    cfg = app.cfg
    queues = app.queues(queue)
    reports = {q.name: Report(q.name) for q in queues}
    t = time.time() if now is None else now
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with flock(cfg.data_dir / "cleanup.lock", f"cleanup of {cfg.data_dir}"):
            for q in queues:
                reap(app, q, reports[q.name], t, dry_run=dry_run, exits=exits)
                _queue_pass(app, q, reports[q.name], t, dry_run)
            _budget_pass(app, queues, reports, dry_run)
    except AlreadyRunning as e:
        for r in reports.values():
            r.skipped = str(e)
    return list(reports.values())


def reap(app: App, q: QueueConfig, report: Report, t: float, *, dry_run: bool = False,
         exits: reaper.Exits | None = None, pid: int | None = None) -> None:
    """Take back ``q``'s stale claims (only those of the dead process ``pid``, when given:
    the scheduler reaps a child that exited non-zero at once). Callers hold the cleanup
    lock, but a reaper beside it would still be safe: each claim is taken back by one atomic
    rename, checked to be the claim found stale (a live one renamed away is put back), and a
    batch being split is held."""
    sp = app.spool(q)
    if pid is None and not dry_run:
        process.live_workers(sp)  # removes the files of dead workers (see lrq.process)
    for stale in sp.stale_claims(q.lease, t):
        if pid is not None and not (stale.dead and stale.pid == pid):
            continue
        if dry_run:
            outcome = reaper.predict(sp, stale, q.max_attempts)
        else:
            outcome = reaper.take_back(app, q, stale, exits)
        if outcome != "gone":
            {"failed": report.failed, "split": report.split, "dead-lettered":
             report.dead_lettered}.get(outcome, report.reclaimed).append(stale.name)


def _queue_pass(app: App, q: Any, report: Report, t: float, dry_run: bool) -> None:
    sp = app.spool(q)
    c = app.cfg.cleanup
    if not dry_run:
        sp.sweep_owners()  # a few bytes each: not counted in the report
    for entry in sp.files(sp.tmp):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        # An empty file may be a spare just taken (lrq.spool.files.take_spare): its mtime is
        # its retirement's, but the rename into tmp/ set its ctime.
        age = t - (max(st.st_mtime, st.st_ctime) if st.st_size == 0 else st.st_mtime)
        if age > c.tmp_age:
            report.tmp_removed += 1
            report.bytes_freed += st.st_size
            if not dry_run:
                os.unlink(entry.path)
    budget = app.budget()
    keep_spares = not budget.space().inodes_low(budget.floor)
    token = sp.retention_due(t)  # None: nothing can be due, skip stating every done batch
    if token is not None:
        due = math.inf
        for done_at, name in sp.done_batches():
            if t - done_at <= c.keep_done:
                due = done_at + c.keep_done
                break  # oldest first: the rest are younger
            report.done_removed += 1
            report.bytes_freed += (_size(sp, name) if dry_run
                                   else sp.remove_done(name, spare=keep_spares))
        if not dry_run:
            sp.note_retention(token, due)
    for failed_at, path in sp.failed_batches():
        if t - failed_at <= c.keep_failed:
            break
        report.failed_removed += 1
        report.bytes_freed += path.stat().st_size if dry_run else sp.remove_failed(path)
        if not dry_run:
            log.info("expired queue=%s batch=%s (failed, past keep_failed)", q.name, path.stem)


def _budget_pass(app: App, queues: list[Any], reports: dict[str, Report], dry_run: bool) -> None:
    """Trim done batches, oldest first, while :meth:`~lrq.disk.Budget.pressure` holds: the
    sniffer's own predicate for the next batch (sized as the newest batch file), or usage
    above ``TRIM_AT``. A dry run counts the bytes it would free as free space. Trimmed
    files become spares (0 bytes) unless free inodes are below the floor: then they are
    unlinked, and so are the spares already kept."""
    budget = app.budget()
    used = budget.used()
    spools = {q.name: app.spool(q) for q in queues}
    nxt = max((sp.last_batch_bytes() for sp in spools.values()), default=0)
    space = budget.space()
    keep_spares = not space.inodes_low(budget.floor)
    if not keep_spares and not dry_run:
        dropped = sum(sp.drop_spares() for sp in spools.values())
        if dropped:
            log.warning("spares-dropped count=%d: free inodes below min_free", dropped)
    why = budget.pressure(used, nxt, space)
    if why is None:
        return
    oldest = sorted((done_at, qname, name) for qname, sp in spools.items()
                    for done_at, name in sp.done_batches())
    freed = 0
    for _, qname, name in oldest:
        if budget.pressure(used - freed, nxt, _after(space, freed) if dry_run else None) is None:
            break
        sp = spools[qname]
        size = _size(sp, name) if dry_run else sp.remove_done(name, spare=keep_spares)
        freed += size
        reports[qname].done_trimmed += 1
        reports[qname].bytes_freed += size
    left = budget.pressure(used - freed, nxt, _after(space, freed) if dry_run else None)
    if left:
        held = budget.held(sp.counts() for sp in spools.values())
        left = f"{left}; {held.advice()}"
        reports[queues[0].name].still_blocked = left
    log.log(logging.WARNING if left else logging.INFO,
            "trimmed %d done batches (%d bytes) because %s%s",
            sum(r.done_trimmed for r in reports.values()), freed, why,
            f"; still: {left}" if left else "")


def _after(space: Space, freed: int) -> Space:
    return dataclasses.replace(space, free_bytes=space.free_bytes + freed)


def _size(sp: Any, name: str) -> int:
    for folder in (sp.done, sp.left):
        try:
            return int((folder / f"{name}.pkl").stat().st_size)
        except FileNotFoundError:
            continue
    return 0
