"""``kind = "redis-stream"``: a Redis stream read by a consumer group, acknowledged at commit.

Many nodes (each its own lrq with its own data dir and consumer name) share one group; Redis
hands each entry to one of them. An entry stays in its consumer's pending list (PEL) until
XACK, which lrq sends only once the entry's batch is committed to the results database, so a
node lost with its disk loses nothing: its entries stay pending and another node takes them
over with XAUTOCLAIM once they have been idle for ``claim_idle``.

What :meth:`RedisStreamSource.fetch` reads, in this order:

1. **Its own pending entries** (``XREADGROUP ... 0``), once after start: entries this consumer
   was given before a restart. Those already in a batch file (``Context.held``) are skipped.
   Entries deleted from the stream while pending come back empty; they are acknowledged (there
   is nothing to process) with a warning.
2. **Abandoned entries** of other consumers (``XAUTOCLAIM`` with ``claim_idle``), scanned at
   most every ``min(1 s, claim_idle / 4)``: a dead node's entries move here within
   ``claim_idle`` plus one sniffer tick.
3. **New entries** (``XREADGROUP ... >``), waiting at most ``block`` when nothing else came
   and the previous fetch found nothing either (idle; right after a batch it does not wait,
   so the end of a backlog is seen at once).

Keeping held entries: an entry waiting in this node's ``left/`` is still pending and its idle
time grows; after ``claim_idle`` another node's XAUTOCLAIM would take it. :meth:`keep`
(``XCLAIM <ids> 0 JUSTID`` to this consumer) resets the idle time without a new delivery.
Call it every :attr:`keep_every` (``claim_idle / 4``) seconds: ``claim_idle`` must be well
above the keep interval plus the longest stall of the process calling it (a GC pause, a slow
disk); at the default 60 s, entries are refreshed every 15 s. ``XCLAIM`` with min-idle 0 also
takes an entry back from a node that claimed it while this one was presumed dead: both then
process it, and the results' unique keys absorb the replay (never a loss).

``keys()``: XRANGE lists what the stream still holds. That is every item only while nothing
was ever removed from the stream (``entries-added == length`` in XINFO STREAM); after a trim
(MAXLEN, XTRIM, XDEL) it answers None and ``verify`` reconciles without the source's keys.

``status()`` and the last acknowledgement: each ack also writes ``<stream>:lrq-acks``, a hash
of consumer name -> unix time in milliseconds, so ``lrq status`` in any process shows when
each node last acknowledged.

Items are the entry's fields as a dict of str (bytes that are not UTF-8 show as ``\\xNN``).
The receipt of an item is its entry id (a str).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrq.config import parse_duration, required, take
from lrq.errors import ConfigError, SourceError
from lrq.sources import Context, Fetched
from lrq.sources import _redis as r

log = logging.getLogger(__name__)

#: Rounds of own-pending reads one fetch may run while skipping held entries.
_OWN_ROUNDS = 20
#: The longest ``block`` may be: a sniffer tick must stay short.
_MAX_BLOCK = 5.0


@dataclass(frozen=True)
class Settings:
    """The ``[queues.X.source]`` table of ``kind = "redis-stream"``."""

    url: str
    stream: str
    group: str = "lrq"
    #: None: host name + a short hash of the data dir and queue (see :func:`_redis.default_consumer`).
    consumer: str | None = None
    #: Entries pending this long in another consumer are taken over (XAUTOCLAIM).
    claim_idle: float = 60.0
    #: How long a fetch waits on the server for new entries when it has nothing else.
    block: float = 0.5
    #: Socket connect and read timeout of every call (a blocking read adds ``block``).
    socket_timeout: float = 5.0
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        seconds = (int, float, str)
        take(table, {"url": str, "stream": str, "group": str, "consumer": str,
                     "claim_idle": seconds, "block": seconds, "socket_timeout": seconds,
                     "options": dict}, where, kind="redis-stream")
        block = parse_duration(table.get("block", cls.block), f"{where}.block")
        if not 0 <= block <= _MAX_BLOCK:
            raise ConfigError(f"{where}.block: {block:g} s is out of range; "
                              f"write 0 (no wait) up to {_MAX_BLOCK:g}s")
        if "consumer" in table and not table["consumer"]:
            raise ConfigError(f"{where}.consumer: empty; leave it out for the default")
        return cls(url=r.parse_url(table, where),
                   stream=required(table, "stream", where, "events"),
                   group=required({"group": table.get("group", cls.group)}, "group", where,
                                  "lrq"),
                   consumer=table.get("consumer"),
                   claim_idle=r.parse_seconds(table, "claim_idle", cls.claim_idle, where),
                   block=block,
                   socket_timeout=r.parse_seconds(table, "socket_timeout", cls.socket_timeout,
                                                  where),
                   options=r.parse_options(table, where))


def open(settings: Settings, context: Context) -> RedisStreamSource:  # noqa: A001 - the kind API
    return RedisStreamSource(settings, context)


class RedisStreamSource(r.RedisSource):
    """One consumer of ``settings.group`` on ``settings.stream`` (see the module docstring)."""

    def __init__(self, settings: Settings, context: Context) -> None:
        self.settings = s = settings
        super().__init__(s.url, s.consumer, s.socket_timeout, s.options, context, s.block)
        self._acks_key = f"{s.stream}:lrq-acks"
        #: Entry ids this node holds unacknowledged (in its spool or handed out since start).
        self._mine: set[str] = {str(x) for x in context.held}
        #: Cursor through this consumer's own pending entries; None once they are all read.
        self._own: str | None = "0-0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._claim_every = min(1.0, s.claim_idle / 4)
        self._idle = True  # the last fetch found nothing: the next may block
        #: The group is created on first use, not here: opening never waits on the network,
        #: so lrq starts while Redis is down and the sniffer retries.
        self._grouped = False
        log.info("redis-stream-open %s stream=%s group=%s consumer=%s", self._conn.shown,
                 s.stream, s.group, self.consumer)

    @property
    def keep_every(self) -> float:
        """How often :meth:`keep` must run so held entries are never idle ``claim_idle``."""
        return self.settings.claim_idle / 4

    def _create_group(self) -> bool:
        """Create the group reading from the start (and the stream); False if it existed."""
        import redis

        try:
            self.client.xgroup_create(self.settings.stream, self.settings.group, id="0",
                                      mkstream=True)
            return True
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
            return False

    def _ensure_group(self) -> None:
        if not self._grouped:
            self._create_group()
            self._grouped = True

    def _again_if_gone(self, call: Any) -> Any:
        """``call()`` on the group, created first if this is the first call; if the group or
        stream was deleted under us (NOGROUP), recreate the group from the start and call
        once more."""
        import redis

        self._ensure_group()
        try:
            return call()
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
        log.warning("redis-stream-group-recreated %s stream=%s group=%s: it was deleted",
                    self._conn.shown, self.settings.stream, self.settings.group)
        self._create_group()
        return call()

    # ------------------------------------------------------------------ fetch

    def fetch(self, position: Any, limit: int) -> Fetched:
        items: list[dict[str, Any]] = []
        receipts: list[str] = []
        try:
            with self._failing("read the stream"):
                if self._own is not None:
                    self._read_own(limit, items, receipts)
                if len(items) < limit and time.monotonic() >= self._next_claim:
                    self._autoclaim(limit - len(items), items, receipts)
                if len(items) < limit:
                    # Block only when idle (the last fetch found nothing): the fetch right
                    # after a full batch usually comes back empty at the end of a backlog,
                    # and blocking there held every until-idle run for `block` more.
                    self._read_new(limit - len(items), not items and self._idle, items,
                                   receipts)
                self._idle = not items
        except SourceError as e:
            if not items:
                raise
            # What was read is in this consumer's pending list already: hand it out, or it
            # would wait for claim_idle. The next fetch meets the error again if it stays.
            log.warning("redis-stream-read-partial %s: %d entries read, then: %s",
                        self.settings.stream, len(items), e)
        self._mine.update(receipts)
        return Fetched(items, None, receipts)

    def _take(self, entries: Sequence[Any], items: list[dict[str, Any]],
              receipts: list[str]) -> list[str]:
        """Add live entries not already held here; return the ids of deleted ones."""
        deleted = []
        text = r.text
        for raw_id, fields in entries:
            eid = raw_id.decode()
            if not fields:  # a deleted entry (redis-py: {}); XADD cannot add one without fields
                deleted.append(eid)
            elif eid not in self._mine:
                items.append({text(k): text(v) for k, v in fields.items()})
                receipts.append(eid)
        return deleted

    def _read_own(self, limit: int, items: list[dict[str, Any]], receipts: list[str]) -> None:
        s = self.settings
        for _ in range(_OWN_ROUNDS):
            assert self._own is not None
            cursor = self._own
            reply = self._again_if_gone(lambda c=cursor: self.client.xreadgroup(
                s.group, self.consumer, {s.stream: c}, count=limit - len(items)))
            entries = reply[0][1] if reply else []
            if not entries:
                self._own = None
                log.info("redis-stream-own-read %s consumer=%s: own pending entries re-read",
                         s.stream, self.consumer)
                return
            self._own = entries[-1][0].decode()
            deleted = self._take(entries, items, receipts)
            if deleted:
                log.warning("redis-stream-deleted %s: %d pending entries were deleted from the "
                            "stream before they were processed (first %s); acknowledged",
                            s.stream, len(deleted), deleted[0])
                self.client.xack(s.stream, s.group, *deleted)
            if len(items) >= limit:
                return

    def _autoclaim(self, limit: int, items: list[dict[str, Any]], receipts: list[str]) -> None:
        s = self.settings
        cursor = self._claim_cursor
        reply = self._again_if_gone(lambda: self.client.xautoclaim(
            s.stream, s.group, self.consumer, int(s.claim_idle * 1000), cursor, count=limit))
        following, entries = reply[0], reply[1]
        before = len(items)
        self._take(entries, items, receipts)  # XAUTOCLAIM drops deleted ids from the PEL itself
        if len(items) > before:
            log.info("redis-stream-claimed %s consumer=%s: took over %d entries idle over %g s",
                     s.stream, self.consumer, len(items) - before, s.claim_idle)
        following = following.decode() if isinstance(following, bytes) else str(following)
        if following == "0-0":  # the scan is through: the next one after a pause
            self._next_claim = time.monotonic() + self._claim_every
        self._claim_cursor = following

    def _read_new(self, limit: int, wait: bool, items: list[dict[str, Any]],
                  receipts: list[str]) -> None:
        s = self.settings
        block = int(s.block * 1000) if wait and s.block > 0 else None
        reply = self._again_if_gone(lambda: self.client.xreadgroup(
            s.group, self.consumer, {s.stream: ">"}, count=limit, block=block))
        if reply:
            self._take(reply[0][1], items, receipts)

    # ------------------------------------------------------------------ ack, keep

    def ack(self, receipts: Sequence[Any]) -> None:
        """XACK the entries (pipelined, in chunks); already acknowledged ids are no-ops."""
        if not receipts:
            return
        s = self.settings
        ids = [str(x) for x in receipts]
        with self._failing("acknowledge entries"):
            self._ensure_group()
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(ids), r.CHUNK):
                pipe.xack(s.stream, s.group, *ids[i:i + r.CHUNK])
            pipe.hset(self._acks_key, self.consumer, int(time.time() * 1000))
            pipe.execute()
        self._mine.difference_update(ids)

    def keep(self, receipts: Sequence[Any]) -> None:
        """Reset the idle time of these pending entries (XCLAIM to this consumer, min-idle 0,
        JUSTID: no new delivery is counted), so no other node takes them over."""
        if not receipts:
            return
        s = self.settings
        ids = [str(x) for x in receipts]
        with self._failing("keep held entries"):
            self._ensure_group()
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(ids), r.CHUNK):
                pipe.xclaim(s.stream, s.group, self.consumer, 0, ids[i:i + r.CHUNK],
                            justid=True)
            kept = sum(len(x) for x in pipe.execute())
        if kept < len(ids):
            log.debug("redis-stream-kept %s: %d of %d held entries are no longer pending "
                      "(acknowledged already, or deleted)", s.stream, len(ids) - kept, len(ids))

    # ------------------------------------------------------------------ views

    def _group(self) -> dict[str, Any]:
        s = self.settings
        for g in self._again_if_gone(lambda: self.client.xinfo_groups(s.stream)):
            if _str(g.get("name")) == s.group:
                return dict(g)
        return {}

    def _lag(self, group: dict[str, Any]) -> int | None:
        """Entries not yet delivered to the group. XINFO GROUPS says so, except after some
        deletions (lag nil): then 0 if the group has read up to the last id, else unknown."""
        lag = group.get("lag")
        if lag is not None:
            return int(lag)
        last = _str(self.client.xinfo_stream(self.settings.stream).get("last-generated-id"))
        return 0 if last == _str(group.get("last-delivered-id")) else None

    def settled(self) -> bool:
        with self._failing("read the group"):
            group = self._group()
            return int(group.get("pending", 0)) == 0 and self._lag(group) == 0

    def status(self) -> dict[str, Any]:
        s = self.settings
        with self._failing("read the group"):
            group = self._group()
            consumers = self.client.xinfo_consumers(s.stream, s.group)
            acks = self.client.hgetall(self._acks_key)
            length = self.client.xlen(s.stream)
            lag = self._lag(group)
        return {
            "kind": "redis-stream", "url": self._conn.shown, "stream": s.stream,
            "group": s.group, "consumer": self.consumer, "length": length, "lag": lag,
            "pending": int(group.get("pending", 0)),
            "consumers": {_str(c["name"]): {"pending": int(c["pending"]),
                                            "idle_s": round(int(c["idle"]) / 1000, 1)}
                          for c in consumers},
            "last_ack": {_str(k): r.iso(int(v)) for k, v in acks.items()},
        }

    def keys(self, key: str) -> Iterator[str] | None:
        """The ``key`` field of every entry, if the stream still holds every entry it was
        given (see the module docstring); entries without the field are left out."""
        s = self.settings
        with self._failing("read the stream"):
            info = self._again_if_gone(lambda: self.client.xinfo_stream(s.stream))
        added, length = info.get("entries-added"), info.get("length")
        if added is None or int(added) != int(length):
            log.info("redis-stream-keys-partial %s: %s of %s entries remain (trimmed), so the "
                     "stream cannot list every key", s.stream, length, added)
            return None
        return self._keys(key.encode())

    def _keys(self, key: bytes) -> Iterator[str]:
        s = self.settings
        start = "-"
        while True:
            with self._failing("read the stream"):
                entries = self.client.xrange(s.stream, min=start, count=r.CHUNK)
            for _, fields in entries:
                if key in fields:
                    yield r.text(fields[key])
            if len(entries) < r.CHUNK:
                return
            start = "(" + entries[-1][0].decode()


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

