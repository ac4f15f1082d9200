"""``kind = "redis-list"``: a Redis list as the data queue, with in-flight entries tracked
until their results are committed (the related system's design), acknowledged at commit.

Keys (all on one server; ``inflight`` defaults to ``<list>:inflight``):

``list``
    The data queue producers push to (RPUSH, taken from the left by default: FIFO).
``inflight``
    A sorted set of the ids of entries taken and not yet acknowledged, scored by the time
    (the Redis server's clock, in ms) they were taken or last kept.
``<inflight>:entries``
    A hash of id -> entry, the taken entries themselves.
``<inflight>:seq``
    The counter ids are drawn from (INCRBY).
``<inflight>:owners``
    A hash of id -> the consumer that took it: a restarted node puts back at once the
    entries it took but never published (those not in ``Context.held``), as a stream
    consumer re-reads its own pending entries, instead of leaving them for ``timeout``.
``<inflight>:acked``
    A hash of consumer name -> the time of its last acknowledgement (unix ms), for
    ``lrq status``. ``consumer`` (default: host name + a short hash of the data dir and
    queue) names the node here and in ``owners``.

Why ids and not the entries as the set's members: a member is unique, so two equal entries
in flight would be one member and the put-back of a lost node would restore one of them; and
the receipt kept in each batch file would repeat every entry (a large document twice). An id
is small, unique and binary-safe.

Taking is one Lua script (atomic: an entry is always in the list or in flight, never in
neither): LPOP/RPOP ``count`` entries, draw their ids, ZADD them at the server's time, HSET
the entries. :meth:`RedisListSource.keep` refreshes the scores of held ids (ZADD XX) every
:attr:`~RedisListSource.keep_every` (``timeout / 4``) seconds. The *put-back*, also one
script, moves entries in flight longer than ``timeout`` back to the list's taking end, in
the order they were taken, so they come out first and in order; every node's
:meth:`~RedisListSource.fetch` runs it, at most every ``min(timeout / 4, 5 s)``. ``timeout``
must therefore be well above the keep interval plus the longest stall of a node (at the
default 300 s, held entries are refreshed every 75 s). An entry taken by a node that dies
before its batch file is durable is put back after ``timeout``; one put back while its first
taker still holds it (a stall longer than ``timeout``) is processed twice, and the results'
unique keys absorb the replay.

Acknowledging (after commit) removes the ids from ``inflight`` and their entries in one
MULTI; it is idempotent (ids are never reused).

Items: with ``format = "json"`` (default) an entry that is a JSON object is the item; any
other entry (not JSON, not UTF-8, a JSON number or list) becomes ``{"raw": "<the entry as
text>"}`` and a warning is logged, so it reaches the handler and, if the handler refuses it,
the dead letters: never dropped. With ``format = "raw"`` every entry is ``{"raw": text}``
(producers of plain strings or numbers; use ``key = "raw"``).

``keys()`` is None: taken entries leave the list, so it cannot list every item.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from lrq.config import required, take
from lrq.errors import ConfigError
from lrq.sources import Context, Fetched
from lrq.sources import _redis as r

log = logging.getLogger(__name__)

#: Put-back rounds (``r.CHUNK`` entries each) one fetch may run.
_PUTBACK_ROUNDS = 10
#: The longest pause between put-backs.
_PUTBACK_EVERY = 5.0

_NOW = """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: list, inflight, entries, owners, seq. ARGV: count, LPOP|RPOP, consumer.
# Returns {first id, entries}.
_TAKE = _NOW + """
local got = redis.call(ARGV[2], KEYS[1], tonumber(ARGV[1]))
if not got then return {0, {}} end
local last = redis.call('INCRBY', KEYS[5], #got)
local first = last - #got + 1
for i = 1, #got, 500 do
  local z, h, o = {}, {}, {}
  for j = i, math.min(i + 499, #got) do
    local id = first + j - 1
    z[#z + 1] = now; z[#z + 1] = id
    h[#h + 1] = id; h[#h + 1] = got[j]
    o[#o + 1] = id; o[#o + 1] = ARGV[3]
  end
  redis.call('ZADD', KEYS[2], unpack(z))
  redis.call('HSET', KEYS[3], unpack(h))
  redis.call('HSET', KEYS[4], unpack(o))
end
return {first, got}
"""

# KEYS: list, inflight, entries, owners. ARGV: timeout ms, most, LPUSH|RPUSH.
# Returns {ids, entries}.
_PUT_BACK = _NOW + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]),
                       'LIMIT', 0, tonumber(ARGV[2]))
table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)
local back = 0
for i = #ids, 1, -1 do  -- youngest first: the oldest ends up at the taking end
  local id = ids[i]
  local e = redis.call('HGET', KEYS[3], id)
  if e then redis.call(ARGV[3], KEYS[1], e); back = back + 1 end
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
end
return {#ids, back}
"""

# KEYS: list, inflight, entries, owners. ARGV: LPUSH|RPUSH, ids in the order taken.
# Puts those still in flight back now. Returns how many.
_PUT_BACK_IDS = """
local back = 0
for i = #ARGV, 2, -1 do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[2], id) == 1 then
    local e = redis.call('HGET', KEYS[3], id)
    if e then redis.call(ARGV[1], KEYS[1], e); back = back + 1 end
  end
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
end
return back
"""

# KEYS: inflight. ARGV: ids. Refreshes the scores of those still in flight.
_KEEP = _NOW + """
for i = 1, #ARGV, 500 do
  local z = {}
  for j = i, math.min(i + 499, #ARGV) do z[#z + 1] = now; z[#z + 1] = ARGV[j] end
  redis.call('ZADD', KEYS[1], 'XX', unpack(z))
end
return #ARGV
"""

# KEYS: inflight. Returns {count, age ms of the oldest or -1}.
_OLDEST = _NOW + """
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return {0, -1} end
return {redis.call('ZCARD', KEYS[1]), now - tonumber(first[2])}
"""


@dataclass(frozen=True)
class Settings:
    """The ``[queues.X.source]`` table of ``kind = "redis-list"``."""

    url: str
    list: str
    #: The sorted set of in-flight ids; "" means ``<list>:inflight``.
    inflight: str = ""
    #: Entries in flight this long (not kept, not acknowledged) are put back on the list.
    timeout: float = 300.0
    #: Which end entries are taken from: "left" (producers RPUSH: first in, first out) or "right".
    pop: str = "left"
    #: "json": an entry that is a JSON object is the item; "raw": every item is {"raw": entry}.
    format: str = "json"
    socket_timeout: float = 5.0
    #: Names this node in the last-acknowledgement hash; None: host name + a short hash.
    consumer: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        seconds = (int, float, str)
        take(table, {"url": str, "list": str, "inflight": str, "timeout": seconds,
                     "pop": str, "format": str, "socket_timeout": seconds, "consumer": str,
                     "options": dict}, where, kind="redis-list")
        if "consumer" in table and not table["consumer"]:
            raise ConfigError(f"{where}.consumer: empty; leave it out for the default")
        for key, allowed in (("pop", ("left", "right")), ("format", ("json", "raw"))):
            if table.get(key, getattr(cls, key)) not in allowed:
                raise ConfigError(f"{where}.{key}: {table[key]!r}; write "
                                  + " or ".join(f'"{a}"' for a in allowed))
        name = required(table, "list", where, "jobs")
        inflight = table.get("inflight") or f"{name}:inflight"
        if inflight == name:
            raise ConfigError(f"{where}.inflight: must differ from list {name!r}")
        return cls(url=r.parse_url(table, where), list=name, inflight=inflight,
                   timeout=r.parse_seconds(table, "timeout", cls.timeout, where),
                   pop=table.get("pop", cls.pop), format=table.get("format", cls.format),
                   socket_timeout=r.parse_seconds(table, "socket_timeout", cls.socket_timeout,
                                                  where),
                   consumer=table.get("consumer"), options=r.parse_options(table, where))


def open(settings: Settings, context: Context) -> RedisListSource:  # noqa: A001 - the kind API
    return RedisListSource(settings, context)


class RedisListSource(r.RedisSource):
    """Takes entries from ``settings.list`` into ``settings.inflight`` (see the module doc)."""

    def __init__(self, settings: Settings, context: Context) -> None:
        self.settings = s = settings
        super().__init__(s.url, s.consumer, s.socket_timeout, s.options, context)
        c = self.client
        self._entries = f"{s.inflight}:entries"
        self._owners = f"{s.inflight}:owners"
        self._keys = [s.list, s.inflight, self._entries, self._owners, f"{s.inflight}:seq"]
        self._held = {int(x) for x in context.held}
        self._recovered = False
        self._acked = f"{s.inflight}:acked"
        self._take = c.register_script(_TAKE)
        self._put_back = c.register_script(_PUT_BACK)
        self._put_back_ids = c.register_script(_PUT_BACK_IDS)
        self._keep = c.register_script(_KEEP)
        self._oldest = c.register_script(_OLDEST)
        self._pop = "LPOP" if s.pop == "left" else "RPOP"
        self._push = "LPUSH" if s.pop == "left" else "RPUSH"
        self._next_put_back = 0.0
        self._put_back_every = min(s.timeout / 4, _PUTBACK_EVERY)
        log.info("redis-list-open %s list=%s inflight=%s timeout=%g s", self._conn.shown,
                 s.list, s.inflight, s.timeout)

    @property
    def keep_every(self) -> float:
        """How often :meth:`keep` must run so held entries are never put back."""
        return self.settings.timeout / 4

    def fetch(self, position: Any, limit: int) -> Fetched:
        with self._failing("take entries"):
            if time.monotonic() >= self._next_put_back:
                self.put_back()
            if not self._recovered:
                self._recover()
            first, entries = self._take(keys=self._keys, args=[limit, self._pop, self.consumer])
        items = self._items(entries)
        return Fetched(items, None, list(range(first, first + len(entries))))

    def put_back(self) -> int:
        """Move entries in flight longer than ``timeout`` back to the list; how many."""
        s = self.settings
        moved = 0
        for _ in range(_PUTBACK_ROUNDS):
            ids, back = self._put_back(keys=self._keys[:4],
                                       args=[int(s.timeout * 1000), r.CHUNK, self._push])
            moved += back
            if back < ids:
                log.warning("redis-list-lost-entry %s: %d in-flight ids had no entry in %s",
                            s.inflight, ids - back, self._entries)
            if ids < r.CHUNK:
                break
        self._next_put_back = time.monotonic() + self._put_back_every
        if moved:
            log.warning("redis-list-put-back %s: %d entries in flight over %g s put back on %s",
                        s.inflight, moved, s.timeout, s.list)
        return moved

    def _recover(self) -> None:
        """Once, before the first take: put back the entries this consumer took before a
        restart and never published (in flight as its own, not held in its spool)."""
        me = self.consumer.encode()
        lost = sorted(int(i) for i, owner in self.client.hscan_iter(self._owners, count=r.CHUNK)
                      if owner == me and int(i) not in self._held)
        back = 0
        for i in range(0, len(lost), r.CHUNK):
            back += self._put_back_ids(keys=self._keys[:4],
                                       args=[self._push, *lost[i:i + r.CHUNK]])
        self._recovered = True
        self._held.clear()
        if back:
            log.warning("redis-list-recovered %s consumer=%s: %d entries taken before a restart "
                        "and never published put back on %s", self.settings.inflight,
                        self.consumer, back, self.settings.list)

    def _items(self, entries: list[bytes]) -> list[dict[str, Any]]:
        if self.settings.format == "raw":
            return [{"raw": r.text(e)} for e in entries]
        items: list[dict[str, Any]] = []
        odd: list[str] = []
        for e in entries:
            try:
                value = orjson.loads(e)
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                items.append(value)
            else:
                odd.append(r.text(e))
                items.append({"raw": odd[-1]})
        if odd:
            log.warning("redis-list-not-json %s: %d entries are not JSON objects (first: %.80r); "
                        "passed on as {\"raw\": entry}", self.settings.list, len(odd), odd[0])
        return items

    def ack(self, receipts: Sequence[Any]) -> None:
        """Remove the ids from in-flight, with their entries (one MULTI; repeats are no-ops)."""
        if not receipts:
            return
        ids = [int(x) for x in receipts]
        with self._failing("acknowledge entries"):
            pipe = self.client.pipeline(transaction=True)
            for i in range(0, len(ids), r.CHUNK):
                pipe.zrem(self.settings.inflight, *ids[i:i + r.CHUNK])
                pipe.hdel(self._entries, *ids[i:i + r.CHUNK])
                pipe.hdel(self._owners, *ids[i:i + r.CHUNK])
            pipe.hset(self._acked, self.consumer, int(time.time() * 1000))
            pipe.execute()

    def keep(self, receipts: Sequence[Any]) -> None:
        """Refresh the in-flight time of these ids (those still in flight) to now."""
        ids = [int(x) for x in receipts]
        with self._failing("keep held entries"):
            for i in range(0, len(ids), r.CHUNK):
                self._keep(keys=[self.settings.inflight], args=ids[i:i + r.CHUNK])

    def settled(self) -> bool:
        with self._failing("read the list"):
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(self.settings.list)
            pipe.zcard(self.settings.inflight)
            length, inflight = pipe.execute()
        return length == 0 and inflight == 0

    def status(self) -> dict[str, Any]:
        s = self.settings
        with self._failing("read the list"):
            length = self.client.llen(s.list)
            inflight, age = self._oldest(keys=[s.inflight])
            acked = self.client.hgetall(self._acked)
        return {"kind": "redis-list", "url": self._conn.shown, "list": s.list,
                "inflight_key": s.inflight, "lag": length, "inflight": inflight,
                "pending": inflight,  # taken, not acknowledged: what `lrq verify` adds to lag
                "oldest_inflight_s": None if age < 0 else age / 1000,
                "last_ack": {r.text(k): r.iso(int(v)) for k, v in acked.items()}}

    def keys(self, key: str) -> Iterator[str] | None:
        return None
