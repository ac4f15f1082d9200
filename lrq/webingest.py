"""``POST /api/queues/NAME/items``: clients send items to a ``kind = "ingest"`` queue.

The body is a JSON list of objects, each carrying the queue's ``key`` field. The answer is
202 ``{"queue", "accepted"}`` only once the items are durable in the queue's journal
(:mod:`lrq.journal`: appended and fsynced; concurrent requests share an fsync), from which
the sniffer makes batches. Otherwise nothing of the request is kept, and:

* 400 with the reason: not JSON, not a list, an item that is not an object, an item without
  the key (or with a null one), two items with one key, a body shorter than its
  Content-Length;
* 401 / 403: the bearer token, as every POST (:mod:`lrq.web`), checked before the body is
  read;
* 404: no such queue, or its source is not ``ingest``;
* 411: no Content-Length (chunked bodies are not read);
* 413: Content-Length above the source's ``max_request_bytes``; the body is not read and the
  connection is closed;
* 503 with ``Retry-After``: backpressure. The journal holds ``max_unread_bytes`` not yet in
  batches (the sniffer is behind, or the queue is paused: a paused queue accepts until
  then), the disk budget says no (:meth:`lrq.disk.Budget.blocked`, as for the sniffer's next
  batch), the disk is full, the journal's lock stayed held, or :data:`MAX_BODIES` requests
  are being handled already (memory: a body is read whole before it is checked).

Costs per request: a listing of the journal folder and a stat per segment (the unread
bytes), a read of the queue's ``position.json``, a ``statvfs``; the budget's walk of the data
dir is done at most every :data:`BUDGET_EVERY` seconds (the bytes appended since are added).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lrq.journal import JournalBusy, JournalFailed, Reader, Writer

if TYPE_CHECKING:
    from lrq.app import App
    from lrq.config import QueueConfig
    from lrq.disk import Budget
    from lrq.sources.ingest import Settings
    from lrq.spool import Spool

log = logging.getLogger(__name__)

#: Seconds between two walks of the data dir for the disk budget.
BUDGET_EVERY = 1.0
#: Request bodies read and handled at once, over every ingest queue of a server: each may hold
#: up to ``max_request_bytes`` in memory (the server starts a thread per connection). One
#: more waits up to :data:`SLOT_WAIT` seconds, then is answered 503 without being read.
MAX_BODIES = 32
SLOT_WAIT = 1.0
RETRY_FULL = 1  # seconds a client should wait when the journal is full ...
RETRY_DISK = 5  # ... and when the disk is
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, JSON body, extra headers, and whether to close the
    connection (a body left unread)."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


def queue_of(path: str) -> str | None:
    """The queue NAME of ``/api/queues/NAME/items``, else None."""
    from urllib.parse import unquote

    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["api", "queues"] and parts[3] == "items":
        return unquote(parts[2])
    return None


class Front:
    """One ingest queue's side of the web server: validation, backpressure, the writer."""

    def __init__(self, q: QueueConfig, spool: Spool, budget: Budget) -> None:
        from lrq.sources.ingest import folder

        self.q = q
        self.settings: Settings = q.source.settings
        self.spool = spool
        self.budget = budget
        where = folder(budget.data_dir, q.name)
        self.writer = Writer(where, self.settings.segment_bytes)
        self.reader = Reader(where)
        self._lock = threading.Lock()
        self._used: tuple[float, int] | None = None  # (when walked, bytes then)
        self._since = 0  # bytes appended since that walk

    def too_large(self, length: int) -> Answer | None:
        if length > self.settings.max_request_bytes:
            return Answer(413, {"error": f"request body of {length} bytes is over "
                                f"max_request_bytes {self.settings.max_request_bytes} of "
                                f"queue {self.q.name}; send fewer items per request"},
                          close=True)
        return None

    def post(self, body: bytes) -> Answer:
        items = _items(body, self.q.key)
        if isinstance(items, str):
            return Answer(400, {"error": items})
        if not items:
            return Answer(202, {"queue": self.q.name, "accepted": 0})
        busy = self._backpressure(len(body))
        if busy is not None:
            return busy
        try:
            self.writer.append(body, len(items))
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            log.warning("ingest-refused queue=%s reason=disk-full: %s", self.q.name, e.strerror)
            return _busy(f"the disk is full ({e.strerror}); nothing was kept", RETRY_DISK)
        except (JournalBusy, JournalFailed) as e:
            log.warning("ingest-refused queue=%s reason=%s: %s", self.q.name,
                        type(e).__name__, e)
            return _busy(f"{e}; nothing was acknowledged", RETRY_FULL)
        with self._lock:
            self._since += len(body)
        log.debug("ingest-accepted queue=%s items=%d bytes=%d", self.q.name, len(items),
                  len(body))
        return Answer(202, {"queue": self.q.name, "accepted": len(items)})

    def _backpressure(self, size: int) -> Answer | None:
        """A 503 while the journal is full or the disk budget says no; None to go on."""
        unread = self.reader.unread_bytes(self.spool.read_position())
        limit = self.settings.max_unread_bytes
        if unread + size > limit:
            return _busy(f"queue {self.q.name}'s journal holds {unread} bytes not yet in "
                         f"batches (max_unread_bytes {limit})", RETRY_FULL)
        blocked = self.budget.blocked(self._used_bytes(), size)
        if blocked is not None:
            return _busy(f"no room on disk: {blocked[1]}", RETRY_DISK)
        return None

    def _used_bytes(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._used is None or now - self._used[0] >= BUDGET_EVERY:
                self._used, self._since = (now, self.budget.used()), 0
            return self._used[1] + self._since

    def close(self) -> None:
        self.writer.close()


def _busy(reason: str, seconds: int) -> Answer:
    return Answer(503, {"error": f"{reason}; retry after {seconds}s"},
                  (("Retry-After", str(seconds)),))


def _items(body: bytes, key: str) -> list[Any] | str:
    """The request's items, or why they are refused (the 400's reason)."""
    try:
        items = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return f"the body is not JSON: {e}"
    if not isinstance(items, list):
        return f"the body must be a JSON list of items (objects), not {type(items).__name__}"
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return f"item {i} is a {_json_type(item)}, not an object"
        if item.get(key) is None:
            return f"item {i} has no {key!r} field (the queue's key); every item needs one"
        k = str(item[key])  # as the sink stores it
        if k in seen:
            return (f"item {i} repeats the {key!r} of item {seen[k]} ({k!r}); the queue's "
                    "key must be unique per item")
        seen[k] = i
    return items


def _json_type(value: Any) -> str:
    return {str: "string", int: "number", float: "number", bool: "boolean", list: "list",
            type(None): "null"}.get(type(value), type(value).__name__)


class Ingest:
    """The ingest queues of one web server's :class:`~lrq.app.App`, built on first use."""

    def __init__(self, app: App, max_bodies: int = MAX_BODIES) -> None:
        self.app = app
        self._fronts: dict[str, Front] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_bodies)

    @contextlib.contextmanager
    def slot(self) -> Iterator[Answer | None]:
        """Hold one of the :data:`MAX_BODIES` slots while a body is read and handled; yields
        the 503 to answer instead when none frees up within :data:`SLOT_WAIT` seconds."""
        if not self._slots.acquire(timeout=SLOT_WAIT):
            yield Answer(503, {"error": f"{MAX_BODIES} requests are being handled; retry "
                               f"after {RETRY_FULL}s"}, (("Retry-After", str(RETRY_FULL)),),
                         close=True)
            return
        try:
            yield None
        finally:
            self._slots.release()

    def front(self, name: str) -> Front | Answer:
        """The queue's :class:`Front`, or the 404 for a queue that is not an ingest one."""
        q = self.app.cfg.queues.get(name)
        if q is None or q.source.kind != "ingest":
            ingest = [n for n, x in self.app.cfg.queues.items() if x.source.kind == "ingest"]
            why = "no queue named" if q is None else "not an ingest queue:"
            return Answer(404, {"error": f"{why} {name!r} (ingest queues: "
                                f"{', '.join(ingest) or 'none'})"}, close=True)
        with self._lock:
            if name not in self._fronts:
                from lrq.spool import Spool

                # A spool of its own (the position only: no key, no folders made) and a
                # budget of its own: nothing shared with the routes under Web.lock.
                # ensure(): the queue's folders 0700, as the scheduler makes them (this
                # server may be the first to touch a new data dir).
                spool = Spool(self.app.cfg.data_dir, q.name).ensure()
                self._fronts[name] = Front(q, spool, self.app.budget())
            return self._fronts[name]

    def close(self) -> None:
        with self._lock:
            for f in self._fronts.values():
                f.close()
            self._fronts.clear()
