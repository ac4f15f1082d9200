"""Crash points for tests: ``LRQ_FAILPOINT=after-claim`` makes the process SIGKILL itself
when it reaches that point, so tests can check each crash window with a real dead process.

Points: ``sniff-mid-write``, ``sniff-after-rename``, ``sniff-before-dir-sync`` (a group of
batches renamed into ``left/``, the folder not yet fsynced), ``sniff-before-position`` (the
group durable, the source position not yet saved), ``after-claim``, ``during-txn``,
``between-outputs`` (a fan-out queue's batch: an output's rows written in the transaction,
the next output's not yet: lrq.outputs),
``after-commit`` (before the batch moves to ``done/``), ``after-done-move`` (the batch in
``done/``, its claim not yet removed), ``during-heartbeat`` (the owner file touched, the
claims not yet checked); in a reaper's split (:meth:`lrq.spool.Spool.split`): ``split-after-half-0``,
``split-after-half-1`` (both halves written), ``split-after-retire`` (the batch file removed,
its claim not yet); ``spare-after-take`` (a spare renamed into ``tmp/`` for a batch, not yet
opened), ``retire-after-truncate`` (cleanup emptied a done batch file, not yet moved into
``spare/``); in :mod:`lrq.acker`: ``ack-before`` (done batches found, the source not yet
told), ``ack-after`` (the source told, the batches not yet marked acknowledged); in
:mod:`lrq.journal`'s writer: ``ingest-mid-write``, ``ingest-before-head``,
``ingest-before-fsync``. Unset in
production; the check is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "LRQ_FAILPOINT"


def hit(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
