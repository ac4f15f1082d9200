"""Cleanup: the reaper (stale claims back to pending) and the sweep of orphan tmp files.

Runs as ``lrq cleanup`` and as a scheduled job; at most one per queue at a time (``flock``).
It never touches a pending batch, a live claim, or a failed batch.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from lrq.app import App
from lrq.errors import AlreadyRunning

log = logging.getLogger(__name__)


@dataclass
class Report:
    queue: str
    reclaimed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    tmp_removed: int = 0
    bytes_freed: int = 0
    skipped: str = ""

    def lines(self, dry_run: bool) -> list[str]:
        verb = "would " if dry_run else ""
        if self.skipped:
            return [f"{self.queue}: skipped ({self.skipped})"]
        return [f"{self.queue}: {verb}reclaim {len(self.reclaimed)} stale claims, "
                f"{verb}fail {len(self.failed)} batches past max_attempts, "
                f"{verb}remove {self.tmp_removed} orphan tmp files ({self.bytes_freed} bytes)"]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def run(app: App, *, queue: str | None = None, now: float | None = None,
        dry_run: bool = False) -> list[Report]:
    """One cleanup pass over every queue (or one)."""
    reports = []
    for q in app.queues(queue):
        sp = app.spool(q)
        report = Report(q.name)
        try:
            with sp.lock("cleanup"):
                t = time.time() if now is None else now
                for stale in sp.stale_claims(q.lease, t):
                    if dry_run:
                        outcome = "failed" if stale.attempt >= q.max_attempts else "requeued"
                    else:
                        outcome = sp.reap(stale, q.max_attempts)
                    if outcome == "gone":
                        continue
                    (report.failed if outcome == "failed" else report.reclaimed).append(stale.name)
                    if not dry_run:
                        log.warning("reclaimed queue=%s batch=%s attempt=%d outcome=%s reason=%s",
                                    q.name, stale.name, stale.attempt, outcome, stale.reason)
                for entry in os.scandir(sp.tmp):
                    st = entry.stat(follow_symlinks=False)
                    if t - st.st_mtime > app.cfg.cleanup.tmp_age:
                        report.tmp_removed += 1
                        report.bytes_freed += st.st_size
                        if not dry_run:
                            os.unlink(entry.path)
        except AlreadyRunning as e:
            report.skipped = str(e)
        reports.append(report)
    return reports
