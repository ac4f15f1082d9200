"""``kind = "kafka"``: a Kafka consumer group (confluent-kafka), acknowledged at commit.

Contract (the ``[queues.X.source]`` table)::

    kind    = "kafka"
    brokers = "127.0.0.1:9092"     # bootstrap servers, host:port[,host:port...]
    topic   = "events"
    group   = "lrq"                # the consumer group all nodes share (default "lrq")
    format  = "json"               # or "raw"
    options = { "session.timeout.ms" = 6000 }   # librdkafka properties, passed through

Items. ``format = "json"``: the message value decoded as a JSON object is the item. A value
that is not JSON, or JSON but not an object (a tombstone, a list), is never dropped: its item
is ``{<queue key>: "<topic>:<partition>:<offset>", "_lrq_error": why, "_lrq_value": the value
as text}`` (the queue key from ``Context.key``, else ``"id"``), so the batch keeps its
keys, the handler sees the error (a handler reading its fields fails on it) and the dead
letter keeps the raw value. ``format = "raw"``: ``{"id":
"<topic>:<partition>:<offset>", "key", "value", "partition", "offset"}``, where key and value
are ``str`` when their bytes are UTF-8, else the bytes unchanged (None stays None); ``id`` is
unique per message, so ``key = "id"`` works for any topic.

Offsets. Auto-commit and the auto offset store are off. Each item's receipt is
``[topic, partition, offset]``; :meth:`KafkaSource.ack` commits, per partition, only up to the
oldest item fetched and not yet acknowledged (:mod:`lrq.sources.kafka_offsets`): batches
finish out of order, and a committed offset means "everything below is done". The commit is
synchronous (0.26 ms on loopback, ``bench/kafka_source.py``; a dead coordinator answers in
about 6 s with an error, raised as :class:`~lrq.errors.SourceError`, and the next ``ack``
retries it).

Rebalance. On a revoke the contiguous offsets of the revoked partitions are committed and
their state dropped; batches of theirs already in ``left/`` are still processed, and their
acknowledgements are ignored: the new owner replays those items from the committed offset
and the unique keys absorb them. A lost member (SIGKILL, a lost machine) holds its partitions
until ``session.timeout.ms`` (librdkafka default 45 s) expires; then the group rebalances and
the survivors read from the last committed offset. Nothing committed is unfinished, so
nothing is lost; what the dead node had finished but not committed is replayed.

Liveness. ``keep`` is a no-op: the consumer's session (heartbeats from librdkafka's thread)
keeps its partitions. But the sniffer must call ``fetch`` at least every
``max.poll.interval.ms`` (librdkafka default 300 s) or the member is dropped from the group
and its partitions replayed elsewhere. It fetches every tick (``interval``, 0.25 s) except
while paused on ``max_pending`` or the disk budget; raise ``max.poll.interval.ms`` in
``options`` if workers can take longer than that to drain half of ``max_pending``.

Restart. A restarted node resumes from the group's committed offset; items it already holds
in batch files (``Context.held``) are re-delivered by Kafka but not handed out again, and
their acknowledgements still count (so the commit waits for them).

``settled()``: nothing fetched-but-unacknowledged here, and for every partition of the topic
no message at or after the group's committed offset. The end is found by reading: a probe
consumer (assign mode, it never joins the group) seeks each partition to the committed offset
and waits for a message or the end-of-partition event. Watermarks are not used: on Tansu (the
test broker) ListOffsets reports the last batch's base offset + 1, so lag from watermarks is
too low there; ``status()``'s ``lag`` for partitions this node does not own comes from such a
query and is wrong on Tansu (owned ones use the fetch's watermark, which is right).

``keys()`` is None: a topic cannot be listed reliably (retention, compaction). Option values
(``sasl.password``, ``ssl.key.password``) are never logged or shown by ``status``.
"""
from __future__ import annotations

import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from lrq.config import required, take
from lrq.errors import ConfigError, SourceError
from lrq.redact import is_secret, scrub
from lrq.sources import Context, Fetched
from lrq.sources.kafka_offsets import Tracker

log = logging.getLogger(__name__)

FORMATS = ("json", "raw")
#: Properties lrq sets itself: the contract depends on them.
RESERVED = ("bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store")
FETCH_WAIT = 0.1   # seconds a fetch waits for new messages at most
OPEN_TIMEOUT = 5.0  # seconds to reach the brokers when opening
REFUSED_WAIT = 0.25  # seconds per metadata try at open (then: are all brokers down?)
QUERY_TIMEOUT = 5.0  # seconds for a committed-offsets or metadata request
JOIN_WAIT = 10.0  # seconds close() waits at most for a pending first assignment
#: Seconds the first fetch waits at most for the group's first assignment (on Tansu about
#: half of ``session.timeout.ms``; on Kafka ``group.initial.rebalance.delay.ms``, 3 s).
ASSIGN_WAIT = 30.0
#: Seconds a fetch waits for messages while joining: each wait is this long at most, and the
#: first messages after the join arrive one fetch round trip after the positions are known.
FIRST_FETCH_WAIT = 0.5
ERROR_FIELD, VALUE_FIELD = "_lrq_error", "_lrq_value"
_BROKER = re.compile(r"[A-Za-z0-9_.\-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}")
_OPTION_TYPES = (str, int, float, bool)
_KNOWN: dict[str, type | tuple[type, ...]] = {
    "brokers": str, "topic": str, "group": str, "format": str, "options": dict}


@dataclass(frozen=True)
class Settings:
    brokers: str
    topic: str
    group: str = "lrq"
    format: str = "json"
    #: librdkafka properties, passed to the consumer as they are.
    options: tuple[tuple[str, str | int | float | bool], ...] = ()

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        """Check the ``[queues.X.source]`` table of a kafka source (``kind`` removed)."""
        take(table, _KNOWN, where, kind="kafka")
        brokers = check_brokers(table, "brokers", where)
        topic = required(table, "topic", where, "events")
        fmt = table.get("format", "json")
        if fmt not in FORMATS:
            raise ConfigError(f"{where}.format: {fmt!r} is not one of {', '.join(FORMATS)}")
        options = client_options(table, "options", where, RESERVED,
                                 "brokers, group, manual commits after the results are stored")
        return cls(brokers=brokers, topic=topic, group=table.get("group", "lrq"),
                   format=fmt, options=options)


def check_brokers(table: dict[str, Any], key: str, where: str) -> str:
    """``table[key]``, a comma-separated list of host:port (a kafka source's ``brokers``, a
    kafka output's ``bootstrap``); a one-line :class:`ConfigError` naming a bad one."""
    brokers = required(table, key, where, "10.0.0.1:9092,10.0.0.2:9092")
    for b in brokers.split(","):
        if not _BROKER.fullmatch(b.strip()):
            raise ConfigError(f"{where}.{key}: {b.strip()!r} is not host:port; write e.g. "
                              f"{key} = \"10.0.0.1:9092,10.0.0.2:9092\"")
    return brokers


def client_options(table: dict[str, Any], key: str, where: str, reserved: Sequence[str],
                   why: str) -> tuple[tuple[str, str | int | float | bool], ...]:
    """The librdkafka properties of ``table[key]`` as pairs; a property lrq sets itself
    (``reserved``, for ``why``) or a value that is not a string, number or boolean is a
    one-line :class:`ConfigError`."""
    options = []
    for k, v in table.get(key, {}).items():
        if k in reserved:
            raise ConfigError(f"{where}.{key}: {k!r} is set by lrq ({why}); remove it")
        if not isinstance(v, _OPTION_TYPES):
            raise ConfigError(f"{where}.{key}.{k}: expected a string, number or boolean")
        options.append((str(k), v))
    return tuple(options)


def open(settings: Settings, context: Context) -> KafkaSource:  # noqa: A001 - the kind API
    return KafkaSource(settings, context)


def _text(b: bytes | None) -> str | bytes | None:
    if b is None:
        return None
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b


def _receipts(receipts: Sequence[Any], topic: str) -> Iterator[tuple[int, int]]:
    """(partition, offset) of the receipts of ``topic`` (others: a former topic's batches)."""
    for r in receipts:
        t, p, o = r
        if t == topic:
            yield int(p), int(o)


class KafkaSource:
    ack_at = "commit"

    def __init__(self, settings: Settings, context: Context) -> None:
        from confluent_kafka import Consumer, KafkaError, KafkaException

        self.settings = settings
        self.topic = settings.topic
        self._KafkaError, self._KafkaException = KafkaError, KafkaException
        self._key = context.key or "id"
        self._raw = settings.format == "raw"
        self._lock = threading.RLock()
        self._tracker = Tracker(_receipts(context.held, self.topic))
        self.last_commit: float | None = None
        self.last_error: str | None = None
        self._all_down = False
        node = hashlib.sha256(str(Path(context.data_dir).resolve()).encode()).hexdigest()[:8]
        self._conf: dict[str, Any] = {
            "auto.offset.reset": "earliest",
            "client.id": f"lrq-{socket.gethostname()}-{node}",
            **dict(settings.options),
            "bootstrap.servers": settings.brokers, "group.id": settings.group,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "logger": logging.getLogger(f"{__name__}.client"),
            "error_cb": self._on_error,
        }
        try:
            self._consumer: Any = Consumer(self._conf)
        except KafkaException as e:
            raise ConfigError(f"queue {context.queue}: kafka options: "
                              f"{self._redact(e.args[0].str())}; fix `options` (librdkafka "
                              "properties)") from None
        self._probe: Any = None
        #: When the first fetch stops waiting for the group's first assignment (None: this
        #: consumer has not joined the group yet).
        self._join_until: float | None = None
        self._warm = False  # every assigned partition had its fetch position once
        try:
            self._partitions(opening=True)  # reach the brokers now: a bad address fails at start
        except BaseException:
            self._consumer.close()
            raise
        log.info("kafka-open queue=%s brokers=%s topic=%s group=%s held=%d", context.queue,
                 settings.brokers, self.topic, settings.group, len(context.held))

    # ------------------------------------------------------------ client callbacks

    def _on_error(self, err: Any) -> None:
        """librdkafka's client errors (brokers down, auth failed): logged when they change."""
        text = self._redact(err.str())
        if err.code() == self._KafkaError._ALL_BROKERS_DOWN:
            self._all_down = True  # read at open only (the transport errors that follow differ)
        if text != self.last_error:
            log.warning("kafka-error brokers=%s error=%s", self.settings.brokers, text)
        self.last_error = text

    def _redact(self, text: str) -> str:
        """``text`` (a librdkafka message) without the value of any secret option."""
        return scrub(text, (v for k, v in self.settings.options
                            if is_secret(k) and isinstance(v, str)))

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        with self._lock:
            self._tracker.assigned(tp.partition for tp in partitions)
        log.info("kafka-assigned topic=%s partitions=%s", self.topic,
                 ",".join(str(tp.partition) for tp in partitions))

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        """Commit what is contiguous on the revoked partitions, then forget them."""
        revoked = {tp.partition for tp in partitions}
        with self._lock:
            try:
                self._commit({p: o for p, o in self._tracker.due().items() if p in revoked})
            except SourceError as e:  # their new owner replays from the last commit
                log.warning("kafka-revoke-commit-failed topic=%s error=%s", self.topic, e)
            self._tracker.revoked(revoked)
        log.info("kafka-revoked topic=%s partitions=%s", self.topic,
                 ",".join(str(p) for p in sorted(revoked)))

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        """Partitions already given to another member (our session expired): drop, no commit."""
        with self._lock:
            self._tracker.revoked(tp.partition for tp in partitions)
        log.warning("kafka-lost topic=%s partitions=%s", self.topic,
                    ",".join(str(tp.partition) for tp in partitions))

    # ------------------------------------------------------------ the Source interface

    def _join(self) -> None:
        """Join the group, at the first fetch or ack (never at open: every lrq process opens
        the source, `lrq status` and a worker's key check included, and each member joining
        would cost the group a rebalance)."""
        if self._join_until is None:
            self._consumer.subscribe([self.topic], on_assign=self._on_assign,
                                     on_revoke=self._on_revoke, on_lost=self._on_lost)
            self._join_until = time.monotonic() + ASSIGN_WAIT

    def _joining(self, now: float) -> bool:
        """Is this member still joining: no first assignment yet, or an assigned partition
        whose fetch position is not known yet (its committed offset or reset still being
        looked up)? Bounded by :data:`ASSIGN_WAIT` from the join."""
        if self._join_until is None or now >= self._join_until or self._warm:
            return False
        if self._tracker.early is not None:
            return True
        parts = self._consumer.assignment()
        self._warm = bool(parts) and all(tp.offset >= 0 for tp in self._consumer.position(parts))
        return not self._warm

    def fetch(self, position: Any, limit: int) -> Fetched:
        """Up to ``limit`` messages, waiting at most :data:`FETCH_WAIT` for them, or, before
        the group's first assignment, at most :data:`ASSIGN_WAIT` for that (so one `lrq sniff`
        publishes what is there). Every message recorded as fetched is returned (or skipped as
        held): a consumer error after some messages returns those, and is raised on the next
        call if it persists."""
        items: list[dict[str, Any]] = []
        receipts: list[Any] = []
        with self._lock:
            self._join()
            deadline = time.monotonic() + FETCH_WAIT
            while len(items) < limit:
                now = time.monotonic()
                joining = self._joining(now)
                if joining:  # in short waits: consume() returns early only with a full batch
                    deadline = now + FIRST_FETCH_WAIT
                left = deadline - now
                if left <= 0:
                    break
                try:
                    messages = self._consumer.consume(num_messages=limit - len(items),
                                                      timeout=left)
                except (self._KafkaException, RuntimeError) as e:
                    if items:
                        break
                    raise SourceError(f"cannot read kafka topic {self.topic} from "
                                      f"{self.settings.brokers}: {e}") from None
                if not messages:
                    if joining:
                        continue  # the first assignment is still pending
                    break
                for m in messages:
                    err = m.error()
                    if err is not None:
                        self._message_error(err, bool(items))
                        continue
                    p, o = m.partition(), m.offset()
                    if self._tracker.fetched(p, o):
                        items.append(self._item(m, p, o))
                        receipts.append([self.topic, p, o])
            self._commit_due()
        return Fetched(items, None, receipts)

    def _commit_due(self) -> None:
        """Commit what became contiguous without an ack: acknowledgements that came before
        the first assignment (a restarted node acks its done batches at once), counted
        when the partitions arrived. A failure is logged; the next fetch tries again."""
        due = self._tracker.due()
        if due:
            try:
                self._commit(due)
            except SourceError as e:
                log.warning("kafka-commit-failed topic=%s error=%s", self.topic, e)

    def _message_error(self, err: Any, have_items: bool) -> None:
        code, KafkaError = err.code(), self._KafkaError
        if code == KafkaError._PARTITION_EOF:
            return
        text = self.last_error = self._redact(err.str())
        fatal = err.fatal() or code in (
            KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError._ALL_BROKERS_DOWN)
        if fatal and not have_items:  # with items: return them; the error comes back next call
            raise SourceError(f"cannot read kafka topic {self.topic} from "
                              f"{self.settings.brokers}: {text}")
        log.warning("kafka-error topic=%s error=%s", self.topic, text)

    def _item(self, m: Any, p: int, o: int) -> dict[str, Any]:
        ident = f"{self.topic}:{p}:{o}"
        value = m.value()
        if self._raw:
            return {"id": ident, "key": _text(m.key()), "value": _text(value),
                    "partition": p, "offset": o}
        try:
            item = orjson.loads(value) if value is not None else None
        except orjson.JSONDecodeError as e:
            why = f"kafka message {ident} is not JSON: {e}"
        else:
            if isinstance(item, dict):
                return item
            why = f"kafka message {ident} is not a JSON object: {type(item).__name__}"
        raw = _text(value)
        text = raw.decode(errors="backslashreplace") if isinstance(raw, bytes) else raw
        return {self._key: ident, ERROR_FIELD: why, VALUE_FIELD: text}

    def ack(self, receipts: Sequence[Any]) -> None:
        """Count these items done and commit, per owned partition, up to the oldest item still
        in flight. Receipts of partitions this node no longer owns are ignored."""
        with self._lock:
            self._join()  # a restarted node acks its held batches before its first fetch
            ignored = sum(not self._tracker.acked(p, o) for p, o in _receipts(receipts, self.topic))
            if ignored:
                log.info("kafka-ack-ignored topic=%s items=%d (partitions not owned: their new "
                         "owner replays them)", self.topic, ignored)
            self._commit(self._tracker.due())

    def _commit(self, offsets: dict[int, int]) -> None:
        if not offsets:
            return
        from confluent_kafka import TopicPartition
        tps = [TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())]
        try:
            answer = self._consumer.commit(offsets=tps, asynchronous=False)
        except self._KafkaException as e:
            raise SourceError(f"kafka commit to group {self.settings.group} on "
                              f"{self.settings.brokers} failed: {e.args[0].str()}") from None
        answer = answer or tps
        self._tracker.confirmed({tp.partition: tp.offset for tp in answer if tp.error is None})
        self.last_commit = time.time()
        failed = [f"{tp.partition}: {tp.error.str()}" for tp in answer if tp.error is not None]
        if failed:
            raise SourceError(f"kafka commit to group {self.settings.group} failed for "
                              f"partition {'; '.join(failed)}")
        log.debug("kafka-committed topic=%s offsets=%s", self.topic, offsets)

    def keep(self, receipts: Sequence[Any]) -> None:
        """A no-op: the consumer's session keeps its partitions (see the module docstring)."""

    def settled(self) -> bool:
        """Nothing in flight here and, on every partition, nothing at or after the group's
        committed offset (read by a probe consumer, not from watermarks)."""
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition
        with self._lock:
            if self._tracker.in_flight() or self._tracker.due():
                return False
            parts = self._partitions()
            probe = self._probe_consumer()
            try:
                committed = probe.committed([TopicPartition(self.topic, p) for p in parts],
                                            timeout=QUERY_TIMEOUT)
            except self._KafkaException as e:
                raise SourceError(f"cannot read group {self.settings.group}'s offsets from "
                                  f"{self.settings.brokers}: {e.args[0].str()}") from None
            reset = OFFSET_END if self._conf["auto.offset.reset"] in ("latest", "largest", "end") \
                else OFFSET_BEGINNING
            probe.assign([TopicPartition(self.topic, tp.partition,
                                         tp.offset if tp.offset >= 0 else reset)
                          for tp in committed])
            try:
                return self._probe_ends(probe, set(parts))
            finally:
                probe.unassign()

    def _probe_ends(self, probe: Any, parts: set[int]) -> bool:
        """True once every partition in ``parts`` reports its end before any message."""
        deadline = time.monotonic() + QUERY_TIMEOUT
        while parts:
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("kafka-settle-unknown topic=%s partitions=%s (no end seen in %gs)",
                         self.topic, sorted(parts), QUERY_TIMEOUT)
                return False
            for m in probe.consume(num_messages=len(parts), timeout=left):
                err = m.error()
                if err is None:
                    return False  # a message at or after the committed offset: lag
                if err.code() == self._KafkaError._PARTITION_EOF:
                    parts.discard(m.partition())
                else:
                    log.info("kafka-settle-error topic=%s error=%s", self.topic, err.str())
                    return False
        return True

    def _probe_consumer(self) -> Any:
        if self._probe is None:
            from confluent_kafka import Consumer
            conf = {k: v for k, v in self._conf.items() if k != "error_cb"}
            conf.update({"enable.partition.eof": True, "fetch.wait.max.ms": 50,
                         "client.id": f"{self._conf['client.id']}-probe"})
            self._probe = Consumer(conf)
        return self._probe

    def _partitions(self, opening: bool = False) -> list[int]:
        """The topic's partitions (a metadata request, bounded by :data:`OPEN_TIMEOUT`).
        ``opening`` (not subscribed yet, so a poll reads nothing): the request is retried
        every :data:`REFUSED_WAIT` and fails as soon as librdkafka reports every broker down
        (a refused connection), instead of after the whole timeout."""
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            try:
                md = self._consumer.list_topics(
                    self.topic, timeout=max(0.01, min(left, REFUSED_WAIT) if opening else left))
                break
            except self._KafkaException as e:
                if opening:
                    self._consumer.poll(0)  # serves error_cb
                if self._all_down and opening:
                    why = self.last_error
                elif time.monotonic() >= deadline:
                    why = e.args[0].str()
                else:
                    continue
                raise SourceError(f"cannot reach kafka brokers {self.settings.brokers}: "
                                  f"{why}") from None
        t = md.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            why = t.error.str() if t is not None and t.error is not None else "no partitions"
            raise SourceError(f"kafka topic {self.topic!r} not found on {self.settings.brokers} "
                              f"({why}); create it")
        return sorted(t.partitions)

    def _finish_join(self) -> None:
        """Wait, at most the session timeout and :data:`JOIN_WAIT`, for a pending first
        assignment. On Tansu a consumer closed while its first JoinGroup is pending wedges
        the group for good (measured: a new member got nothing in 12 s; after a SIGKILL
        instead it got its partitions once the session expired). Messages read meanwhile
        are dropped unrecorded: never committed, so read again by the group."""
        if self._tracker.early is None or self._join_until is None:
            return  # assigned, or never joined (this process only opened the source)
        session = float(self._conf.get("session.timeout.ms", 45000)) / 1000
        deadline = time.monotonic() + min(session, JOIN_WAIT)
        log.info("kafka-close-waits-join topic=%s group=%s", self.topic, self.settings.group)
        while self._tracker.early is not None and time.monotonic() < deadline:
            try:
                self._consumer.consume(num_messages=100, timeout=0.1)
            except (self._KafkaException, RuntimeError):
                return

    def keys(self, key: str) -> Iterator[str] | None:
        return None

    def item_fields(self) -> Sequence[str] | None:
        return ("id", "key", "value", "partition", "offset") if self._raw else None

    def assignment(self) -> list[int]:
        """Partitions this member owns now."""
        with self._lock:
            return sorted(self._tracker.parts)

    def status(self) -> dict[str, Any]:
        """Per partition: the group's committed offset, this member's position, the high
        watermark and lag (see the module docstring on Tansu), items in flight; the last
        commit's time and the last client error. Never an option value."""
        from confluent_kafka import TopicPartition
        with self._lock:
            owned = self._tracker.parts
            out: dict[str, Any] = {
                "kind": "kafka", "brokers": self.settings.brokers, "topic": self.topic,
                "group": self.settings.group, "member": self._consumer.memberid(),
                "in_flight": self._tracker.in_flight(),
                "last_commit": None if self.last_commit is None else
                datetime.fromtimestamp(self.last_commit, UTC).isoformat(),
                "last_error": self.last_error, "partitions": {},
            }
            try:
                tps = [TopicPartition(self.topic, p) for p in self._partitions()]
                committed = self._consumer.committed(tps, timeout=QUERY_TIMEOUT)
                positions = {tp.partition: tp.offset for tp in self._consumer.position(tps)}
            except (SourceError, self._KafkaException) as e:
                out["error"] = str(e)
                return out
            for tp in committed:
                p, c = tp.partition, (tp.offset if tp.offset >= 0 else None)
                try:
                    _, high = self._consumer.get_watermark_offsets(
                        TopicPartition(self.topic, p), timeout=QUERY_TIMEOUT, cached=p in owned)
                except self._KafkaException:
                    high = None
                high = high if high is not None and high >= 0 else None
                pos = positions.get(p)
                out["partitions"][str(p)] = {
                    "owned": p in owned, "committed": c,
                    "position": pos if pos is not None and pos >= 0 else None,
                    "high": high, "lag": None if high is None else max(0, high - (c or 0)),
                    "in_flight": len(owned[p].pending) if p in owned else 0,
                }
            # The group's unacknowledged messages, for `lrq verify` (which sums ``pending``
            # and ``lag``): past the committed offsets, fetched or not. From watermarks,
            # so wrong on Tansu (see the module docstring); None when one is unknown.
            lags = [v["lag"] for v in out["partitions"].values()]
            out["lag"] = None if None in lags else sum(lags)
            return out

    def close(self) -> None:
        """Commit what is contiguous, then leave the group. A member that never got its first
        assignment first waits for it (see :meth:`_finish_join`)."""
        with self._lock:
            self._finish_join()
            try:
                self._commit(self._tracker.due())
            except SourceError as e:
                log.warning("kafka-close-commit-failed topic=%s error=%s", self.topic, e)
            if self._probe is not None:
                self._probe.close()
                self._probe = None
            self._consumer.close()
