"""``kind = "ingest"``: items clients send over HTTP (``POST /api/queues/NAME/items``,
:mod:`lrq.webingest`), kept in a fsynced journal (:mod:`lrq.journal`) until the sniffer
turns them into batches. Acknowledged at publish, like a SQL table: the position
``[segment, offset, skip]`` is saved once the batch files are durable, and the segments
wholly behind the saved position are deleted at the next fetch.

Config::

    [queues.events]
    handler = "workers.store:handle"
    key     = "event_id"               # every item must carry it, or the request is 400

    [queues.events.source]
    kind = "ingest"
    max_request_bytes = "4MB"          # a larger request body is answered 413, unread
    max_unread_bytes  = "256MB"        # journal bytes not yet in batches: above, 503
    segment_bytes     = "16MB"         # a journal file starts anew past this

A paused queue (``lrq pause``) still accepts items until ``max_unread_bytes``: clients keep
sending while the operator looks, and get 503 (Retry-After) only once the journal is full.
A client that retries a request whose 202 it never saw (the connection dropped) sends its
items again; within one fetch (one batch) an item whose key repeats an earlier one's is
dropped (``ingest-repeats-dropped``), since a batch whose items share a key fails whole;
across batches the sink's unique key keeps the first copy.

``lrq verify`` cannot list an HTTP client's keys: it reconciles the ledger against what the
journal still holds (``lag``: items not yet in a batch).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrq.config import parse_bytes, take
from lrq.errors import ConfigError
from lrq.journal import FOLDER, Reader, parse_position
from lrq.sources import AckAt, Context, Fetched

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST = 4 * 10**6
DEFAULT_MAX_UNREAD = 256 * 10**6
DEFAULT_SEGMENT = 16 * 10**6


@dataclass(frozen=True)
class Settings:
    """The ``[queues.X.source]`` table of ``kind = "ingest"``."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST
    max_unread_bytes: int = DEFAULT_MAX_UNREAD
    segment_bytes: int = DEFAULT_SEGMENT

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        take(table, {"max_request_bytes": (int, str), "max_unread_bytes": (int, str),
                     "segment_bytes": (int, str)}, where, kind="ingest")
        values = {k: parse_bytes(v, f"{where}.{k}") for k, v in table.items()}
        for k, v in values.items():
            if v < 1:
                raise ConfigError(f"{where}.{k}: must be more than 0 bytes, got {table[k]!r}")
        s = cls(**values)
        if s.max_unread_bytes < s.max_request_bytes:
            raise ConfigError(f"{where}.max_unread_bytes: {s.max_unread_bytes} is below "
                              f"max_request_bytes {s.max_request_bytes}, so a largest request "
                              "could never be accepted; raise it")
        return s


def folder(data_dir: Path, queue: str) -> Path:
    """The queue's journal folder."""
    return Path(data_dir) / queue / FOLDER


def open(settings: Settings, context: Context) -> IngestSource:  # noqa: A001
    """The kind's entry point for :func:`lrq.sources.build`."""
    return IngestSource(settings, context.data_dir, context.queue, context.key or "id")


class IngestSource:
    ack_at: AckAt = "publish"

    def __init__(self, settings: Settings, data_dir: Path, queue: str, key: str = "id") -> None:
        from lrq.spool import Spool

        self.settings = settings
        self.queue = queue
        self.key = key
        self.reader = Reader(folder(data_dir, queue))
        #: Only to read the saved position (deleting segments behind it).
        self._spool = Spool(Path(data_dir), queue)

    def fetch(self, position: Any, limit: int) -> Fetched:
        """Up to ``limit`` items, each key once (see the module docstring): the repeats of a
        retried request are dropped and more are read in their place, so a short answer
        still means the journal has nothing more (the sniffer's ``drained``)."""
        start = parse_position(position)
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        at, read = position, 0
        while len(out) < limit:
            want = limit - len(out)
            items, after = self.reader.read(at, want)
            at = at if after is None else after
            read += len(items)
            for it in items:
                k = str(it.get(self.key))  # as the sink stores it
                if k not in seen:
                    seen.add(k)
                    out.append(it)
            if len(items) < want:
                break
        if read > len(out):
            log.info("ingest-repeats-dropped queue=%s items=%d kept=%d", self.queue, read,
                     len(out))
        if start is not None:
            self._delete_behind(start[0])
        return Fetched(out, at)

    def _delete_behind(self, segment: int) -> None:
        """Delete segments behind the *saved* position only: ``position`` may be ahead of it
        (the sniffer saves it every half second), and a crash then resumes from the saved one."""
        from lrq.journal import segments

        segs = segments(self.reader.folder)
        if not segs or segs[0] >= segment:
            return  # nothing behind this fetch's position, so nothing behind the saved one
        saved = parse_position(self._spool.read_position())
        if saved is not None:
            self.reader.delete_behind(saved[0])

    def ack(self, receipts: Sequence[Any]) -> None:
        """Never called: acknowledged at publish, by the saved position."""

    def keep(self, receipts: Sequence[Any]) -> None:
        """Nothing is held elsewhere."""

    def settled(self) -> bool:
        """Settled once a fetch came back short (the sniffer's ``drained``): a client may post
        more later, but what was acknowledged until then is in batches."""
        return True

    def keys(self, key: str) -> Iterator[str] | None:
        """None: the items came from clients; ``verify`` reconciles the ledger against the
        journal's ``lag`` instead."""
        return None

    def item_fields(self) -> Sequence[str] | None:
        """None: the web server checks every item for the queue's key as it arrives."""
        return None

    def remaining(self, position: Any) -> int:
        """Items in the journal past ``position``, not in a batch yet (ETA, ``lrq sniff``)."""
        return self.reader.unread(position).items

    def status(self) -> dict[str, Any]:
        """``lag``: items in the journal not yet in a batch; their bytes on disk and the
        journal files holding them."""
        u = self.reader.unread(self._spool.read_position())
        return {"lag": u.items, "unread_bytes": u.bytes, "segments": u.segments}

    def close(self) -> None:
        pass
