"""``kind = "kafka"`` output: each result row produced as one Kafka message, at least once.

Contract (a ``[queues.X.outputs.NAME]`` table; the output's own keys, such as ``handler``, are
the outputs' and removed before :meth:`Settings.parse` sees the table)::

    kind      = "kafka"
    bootstrap = "127.0.0.1:9092"      # bootstrap servers, host:port[,host:port...]
    topic     = "access-lines"
    max_message_bytes = 1000000       # or "1MB": a larger message is a dead letter
    timeout   = "30s"                 # delivery bound: produce + flush + acknowledgement
    producer  = { "linger.ms" = 20 }  # librdkafka properties, passed through

``producer``, not ``options``: an output's ``options`` are its handler's (a window's width),
so the client's properties get their own table. Secret ones (``sasl.password``) are never
logged or shown.

A message. The value is the row as JSON (orjson: datetimes as ISO strings); the key is the
row's key field as text (``str(row[key])``), so one item's messages go to one partition
(``partitioner = "murmur2_random"``, as the Java client places keys, unless ``producer`` says
otherwise).

Delivery is **at least once**. :meth:`KafkaProducer.send` produces every row, then flushes
with a bounded wait and checks every delivery report; the batch's transaction (results,
dead letters, ledger row) commits only after that. So:

* a failed delivery, a flush that does not finish within ``timeout`` (plus
  :data:`FLUSH_GRACE`), every broker down, or a fatal producer error raises
  :class:`ProduceFailed` (a :class:`~lrq.errors.Retryable`): nothing of the batch commits,
  the worker releases it uncounted and backs off, and the retry produces the whole batch
  again. The producer is dropped (its queue purged) and a new one is made at the next send;
* a crash (SIGKILL, power) after the flush and before the commit also re-produces the batch
  when it is retried. Messages may therefore arrive twice, never be missing: **consumers
  dedupe by key** (the key is the item's key; the value is the same on a replay when the
  handler is deterministic).

Where it runs: :class:`KafkaOutput.write` is called by :func:`lrq.outputs.store_batch`
before the batch's transaction opens (``outside = True``), once per store (an aggregating
table output's race retries the transaction, not the send). No transaction is held while
the send waits, so on SQLite other workers' commits do not queue behind a slow broker
(milliseconds on a healthy one, ``bench/kafka_output.py``: ~2 ms per 100 rows on loopback;
up to ``timeout`` when it hangs). A batch whose transaction then fails, or that another
worker already committed, was sent anyway: at least once still. A done batch retried
(its second attempt) is caught by the worker's ledger check before its handler runs, so it
is not sent again.

Exactly-once would need Kafka transactions spanning the database commit, which no broker
offers; the idempotent producer (``enable.idempotence = true``, ``acks = all``, set by lrq
and not overridable) removes the duplicates the client's own retries would add within one
send, so the only duplicates are whole re-sent batches.

A message over ``max_message_bytes`` (key + value; checked before producing) or refused by
the broker or the client as too large (``MSG_SIZE_TOO_LARGE``) is returned as a dead letter
for its row, and so is a row without its key or one that is not JSON-encodable: bad data
never fails its batch (DESIGN invariant 11). The rest are delivered.

Every wait is bounded (DESIGN invariant 6): ``message.timeout.ms`` is ``timeout``, socket
and request timeouts at most ``timeout``, and :meth:`send` waits at most ``timeout +
FLUSH_GRACE`` in all. The producer is made at the first send, in the process that sends
(librdkafka is not fork-safe: a scheduler never makes one for its forked workers), and
``confluent_kafka`` is imported only then.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from lrq.config import (
    OutputConfig,
    QueueConfig,
    parse_bytes,
    parse_duration,
    positive,
    required,
    take,
)
from lrq.errors import ConfigError, LrqError, Retryable
from lrq.redact import is_secret, scrub
from lrq.sources.kafka import check_brokers, client_options

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

#: Properties lrq sets itself: the at-least-once contract depends on them.
RESERVED = ("bootstrap.servers", "enable.idempotence", "acks", "request.required.acks",
            "message.timeout.ms", "delivery.timeout.ms", "transactional.id")
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
#: librdkafka's ``message.max.bytes`` bounds the protocol request; it is raised to the
#: largest message allowed plus this much for the record's framing.
FRAMING_BYTES = 4096
MOST_MESSAGE_BYTES = 1_000_000_000 - FRAMING_BYTES  # librdkafka's message.max.bytes maximum
DEFAULT_TIMEOUT = 30.0
#: Seconds :meth:`KafkaProducer.send` waits past ``timeout`` for the delivery reports of
#: messages the client times out at ``timeout`` (its reports come back after that).
FLUSH_GRACE = 2.0
#: Seconds per flush wait: between them the send looks for every broker down or a fatal error.
FLUSH_SLICE = 0.1
_KNOWN: dict[str, type | tuple[type, ...]] = {
    "bootstrap": str, "topic": str, "max_message_bytes": (int, str),
    "timeout": (int, float, str), "producer": dict}

Row = dict[str, Any]


class ProduceFailed(Retryable):
    """The Kafka output could not deliver a batch's messages (brokers down, a delivery error,
    the flush timed out): infrastructure, so the batch is not committed, it is released
    uncounted and produced again on its retry."""


@dataclass(frozen=True)
class Settings:
    bootstrap: str
    topic: str
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Seconds a send may take from produce to acknowledgement (``message.timeout.ms``).
    timeout: float = DEFAULT_TIMEOUT
    #: librdkafka properties, passed to the producer as they are.
    producer: tuple[tuple[str, str | int | float | bool], ...] = ()

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        """Check a kafka output's table (``kind`` and the outputs' own keys removed)."""
        take(table, _KNOWN, where, kind="kafka")
        bootstrap = check_brokers(table, "bootstrap", where)
        topic = required(table, "topic", where, "access-lines")
        size = parse_bytes(table.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
                           f"{where}.max_message_bytes")
        if not 0 < size <= MOST_MESSAGE_BYTES:
            raise ConfigError(f"{where}.max_message_bytes: must be 1 to {MOST_MESSAGE_BYTES} "
                              f"bytes, got {size}")
        timeout = positive(parse_duration(table.get("timeout", DEFAULT_TIMEOUT),
                                          f"{where}.timeout"), f"{where}.timeout", most=3600)
        if timeout < 1:  # librdkafka's socket.connection.setup.timeout.ms is 1000 at least
            raise ConfigError(f"{where}.timeout: must be at least 1s, got {timeout:g}s")
        producer = client_options(table, "producer", where, RESERVED,
                                  "idempotent, acks=all, delivery bounded by `timeout`")
        return cls(bootstrap=bootstrap, topic=topic, max_message_bytes=size, timeout=timeout,
                   producer=producer)


def open(settings: Settings, name: str = "kafka") -> KafkaProducer:  # noqa: A001 - as sources'
    """The producer for ``settings``; nothing is connected until its first send."""
    return KafkaProducer(settings, name)


@dataclass(frozen=True)
class Sent:
    """What one :meth:`KafkaProducer.send` did."""

    delivered: int
    dead: int
    seconds: float


class _Reports:
    """The delivery reports of one send: how many came, and the failures with their message's
    key and value (a report carries no row index, and one callback per message would cost a
    closure each)."""

    __slots__ = ("served", "failed")

    def __init__(self) -> None:
        self.served = 0
        self.failed: list[tuple[Any, bytes, bytes]] = []

    def report(self, err: Any, msg: Any) -> None:
        self.served += 1
        if err is not None:
            self.failed.append((err, msg.key(), msg.value()))


class KafkaProducer:
    """An idempotent producer to one topic, made at the first :meth:`send`. One send at a
    time (a lock): the worker commits one batch at a time per process."""

    def __init__(self, settings: Settings, name: str = "kafka",
                 make_producer: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.settings = settings
        self.name = name
        #: Builds the client from :attr:`config` (tests pass a fake); default confluent_kafka's.
        self._make = make_producer
        self._producer: Any = None
        self._lock = threading.Lock()
        self._all_down = False
        self._fatal: str | None = None
        self.last_error: str | None = None
        #: The last statistics' ``eos`` section (``idemp_state``, ``producer_id``), kept when
        #: ``producer`` sets ``statistics.interval.ms``.
        self.eos: dict[str, Any] | None = None
        self.last: Sent | None = None
        ms = int(settings.timeout * 1000)
        #: The producer's properties (callbacks added at creation). Never logged: may hold
        #: secrets.
        self.config: dict[str, Any] = {
            "partitioner": "murmur2_random",
            "log_level": 5,  # notices and worse: not info lines such as BGQUEUE at every exit
            "socket.timeout.ms": min(60000, ms),
            "socket.connection.setup.timeout.ms": min(30000, ms),
            "request.timeout.ms": min(30000, ms),
            "message.max.bytes": max(1_000_000, settings.max_message_bytes + FRAMING_BYTES),
            **dict(settings.producer),
            "bootstrap.servers": settings.bootstrap,
            "enable.idempotence": True, "acks": "all",
            "message.timeout.ms": ms,
        }

    # ------------------------------------------------------------ the client

    def _client(self) -> Any:
        if self._producer is None:
            conf = {**self.config, "error_cb": self._on_error,
                    "logger": logging.getLogger(f"{__name__}.client")}
            if "statistics.interval.ms" in conf:
                conf["stats_cb"] = self._on_stats
            self._all_down, self._fatal = False, None
            if self._make is not None:
                self._producer = self._make(conf)
            else:
                from confluent_kafka import KafkaException, Producer
                try:
                    self._producer = Producer(conf)
                except KafkaException as e:
                    raise ConfigError(f"output {self.name}: kafka producer options: "
                                      f"{self._redact(e.args[0].str())}; fix `producer` "
                                      "(librdkafka properties)") from None
            log.info("kafka-output-open output=%s bootstrap=%s topic=%s", self.name,
                     self.settings.bootstrap, self.settings.topic)
        return self._producer

    def _on_error(self, err: Any) -> None:
        """Client-level errors (brokers down, a fatal idempotence error), from the client's
        poll: noted for the send in progress, logged when they change."""
        from confluent_kafka import KafkaError
        text = self._redact(err.str())
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._all_down = True
        if err.fatal():
            self._fatal = text
        if text != self.last_error:
            log.warning("kafka-output-error output=%s bootstrap=%s error=%s", self.name,
                        self.settings.bootstrap, text)
        self.last_error = text

    def _on_stats(self, text: str) -> None:
        self.eos = orjson.loads(text).get("eos")

    def _redact(self, text: str) -> str:
        return scrub(text, (v for k, v in self.settings.producer
                            if is_secret(k) and isinstance(v, str)))

    def _drop(self) -> None:
        """Forget the producer after a failed send: purge what it still holds (the batch is
        produced again on its retry) and make a new one next time, so a wedged connection or
        a fatal idempotence state never carries over."""
        p, self._producer = self._producer, None
        if p is None:
            return
        try:
            p.purge()
            p.poll(0)  # serves the purged messages' reports (to a send that is over)
        except Exception as e:  # noqa: BLE001 - the producer is being discarded anyway
            log.debug("kafka-output-drop output=%s error=%s", self.name, e)

    # ------------------------------------------------------------ sending

    def send(self, rows: Sequence[Row], key_field: str) -> list[tuple[Row, str]]:
        """Produce each row as a JSON message keyed by ``row[key_field]`` and wait until every
        one is acknowledged; the rows that cannot be sent, each with why (a dead letter).
        Raises :class:`ProduceFailed` when a delivery fails or the wait runs out (at most
        ``timeout + FLUSH_GRACE`` seconds): the caller must not commit the batch."""
        with self._lock:
            start = time.monotonic()
            if self._all_down:  # an outage since the last send: a fresh client says if it is
                self._drop()    # over (librdkafka reports "all brokers down" once, not "up")
            try:
                dead, delivered = self._send(rows, key_field, start)
            except ProduceFailed as e:
                self._drop()
                log.warning("kafka-output-failed output=%s topic=%s rows=%d error=%s",
                            self.name, self.settings.topic, len(rows), e)
                raise
            self.last = Sent(delivered, len(dead), time.monotonic() - start)
            return dead

    def _send(self, rows: Sequence[Row], key_field: str,
              start: float) -> tuple[list[tuple[Row, str]], int]:
        from confluent_kafka import KafkaError, KafkaException

        s = self.settings
        p = self._client()
        deadline = start + s.timeout + FLUSH_GRACE
        dead: list[tuple[Row, str]] = []
        reports = _Reports()  # this send's: a late report of a failed send goes to that one's
        sent: list[tuple[bytes, bytes, int]] = []  # (key, value, row index) of each produced
        for i, row in enumerate(rows):
            message = self._encode(row, key_field)
            if isinstance(message, str):
                dead.append((row, message))
                continue
            key, value = message
            while True:
                try:
                    p.produce(s.topic, value, key=key, on_delivery=reports.report)
                    sent.append((key, value, i))
                    break
                except BufferError:  # the client's queue is full: let it send, bounded
                    self._check(deadline, len(sent) - reports.served, len(sent))
                    p.poll(FLUSH_SLICE)
                except KafkaException as e:
                    err = e.args[0]
                    if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                        dead.append((row, self._too_large(len(key) + len(value), err.str())))
                        break
                    raise ProduceFailed(f"kafka output {self.name}: cannot produce to topic "
                                        f"{s.topic!r}: {self._redact(err.str())}") from None
        produced = len(sent)
        while True:
            left = p.flush(max(0.0, min(FLUSH_SLICE, deadline - time.monotonic())))
            if left == 0:
                break
            self._check(deadline, left, produced)
        if reports.failed:
            errors = [err for err, _k, _v in reports.failed
                      if err.code() != KafkaError.MSG_SIZE_TOO_LARGE]
            if errors:
                raise ProduceFailed(f"kafka output {self.name}: {len(errors)} of {produced} "
                                    f"messages to topic {s.topic!r} not delivered: "
                                    f"{self._redact(errors[0].str())}")
            index = {(k, v): i for k, v, i in sent}  # which row each refused message was
            for err, k, v in reports.failed:
                dead.append((rows[index[k, v]], self._too_large(None, err.str())))
        if reports.served != produced:  # flush said done: every report was served
            raise ProduceFailed(f"kafka output {self.name}: {produced - reports.served} of "
                                f"{produced} delivery reports missing after the flush")
        return dead, produced - len(reports.failed)

    def _check(self, deadline: float, left: int, produced: int) -> None:
        """Raise :class:`ProduceFailed` when waiting longer cannot help: the deadline passed,
        every broker is down, or the producer hit a fatal error."""
        s = self.settings
        where = f"kafka output {self.name} (topic {s.topic!r}, bootstrap {s.bootstrap})"
        if self._fatal is not None:
            raise ProduceFailed(f"{where}: fatal producer error: {self._fatal}")
        if self._all_down:
            raise ProduceFailed(f"{where}: cannot reach the brokers ({self.last_error}); "
                                f"{left} of {produced} messages not acknowledged")
        if time.monotonic() >= deadline:
            raise ProduceFailed(f"{where}: {left} of {produced} messages not acknowledged "
                                f"within {s.timeout:g} s (timeout)"
                                + (f"; last error: {self.last_error}" if self.last_error else ""))

    def _encode(self, row: Row, key_field: str) -> tuple[bytes, bytes] | str:
        """(key, value) of ``row``'s message, or why it cannot be one."""
        key = row.get(key_field)
        if key is None:
            return f"the result has no {key_field!r} (the message key)"
        try:
            value = orjson.dumps(row, option=orjson.OPT_NON_STR_KEYS)
        except TypeError as e:
            return f"the result cannot be encoded as JSON: {e}"
        k = key if isinstance(key, bytes) else str(key).encode()
        size = len(k) + len(value)
        if size > self.settings.max_message_bytes:
            return self._too_large(size, None)
        return k, value

    def _too_large(self, size: int | None, broker: str | None) -> str:
        s = self.settings
        what = "the message" if size is None else f"the message of {size} bytes"
        if broker is not None:
            return f"{what} is too large for topic {s.topic!r}: {broker}"
        return (f"{what} (key + JSON value) is over max_message_bytes {s.max_message_bytes} "
                f"of kafka output {self.name}")

    def status(self) -> dict[str, Any]:
        """For ``lrq status``: where it sends, the last send and error, the idempotent
        producer's state (with ``statistics.interval.ms`` set); never an option value. Serves
        the client's pending callbacks when no send is in progress."""
        if self._producer is not None and self._lock.acquire(blocking=False):
            try:
                if self._producer is not None:
                    self._producer.poll(0)
            finally:
                self._lock.release()
        out: dict[str, Any] = {"kind": "kafka", "bootstrap": self.settings.bootstrap,
                               "topic": self.settings.topic, "last_error": self.last_error}
        if self.last is not None:
            out.update(delivered=self.last.delivered, dead=self.last.dead,
                       seconds=round(self.last.seconds, 4))
        if self.eos is not None:
            out.update(idempotence=self.eos.get("idemp_state"),
                       producer_id=self.eos.get("producer_id"))
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (bounded: nothing is, between sends) and drop the producer."""
        with self._lock:
            p, self._producer = self._producer, None
            if p is not None:
                p.flush(timeout)


class Undeliverable(LrqError):
    """A result that cannot be a Kafka message (too large, no key, not JSON): dead-lettered
    for its output, the rest of the batch delivered."""


class KafkaOutput:
    """``kind = "kafka"`` in a queue's ``outputs`` (the :class:`lrq.outputs.Output`
    interface): :meth:`write`, called before the batch's transaction opens
    (:attr:`outside`), sends the output's results and returns the rows that cannot be
    messages. A send that fails raises :class:`ProduceFailed`: nothing of the batch commits.

    The message key is the output's ``key`` for an aggregating output (rows are produced as
    the handler returns them, not merged: a topic has no stored row to add to), else the
    queue's. :meth:`keys` and :meth:`count` are None: a topic cannot be listed, so ``lrq
    verify`` shows this output as not listed."""

    columns: frozenset[str] | None = None  # any fields: a message is the row as JSON
    #: How a dead letter of this output starts ("the database refused the result" for a table).
    refusal = "the kafka output cannot send the result"
    #: Sent before the batch's transaction opens, not inside it (lrq.outputs.store_batch).
    outside = True

    def __init__(self, engine: Engine, queue: QueueConfig, output: OutputConfig,
                 base: Path | None = None) -> None:
        self.name: str = output.name
        self.aggregate: bool = output.aggregate
        self.key: str = output.key or queue.key
        self.producer = KafkaProducer(output.settings, f"{queue.name}.{output.name}")

    @classmethod
    def parse(cls, options: dict[str, Any], where: str) -> Settings:
        """The kind's own keys of an outputs table (the outputs' keys already taken)."""
        return Settings.parse(options, Path("."), where)

    def prepare(self) -> None:
        """Nothing to create: the topic is the operator's (a missing one fails the send)."""

    def write(self, conn: Connection | None, batch: str, results: list[dict[str, Any]],
              final: bool) -> list[tuple[dict[str, Any], str, Exception]]:
        """Send ``results`` (before the batch's transaction: ``conn`` is None); the rows that
        cannot be messages. Raises :class:`ProduceFailed`: nothing of the batch commits."""
        if not results:
            return []
        dead = self.producer.send(results, self.key)
        return [(row, str(row.get(self.key)), Undeliverable(why)) for row, why in dead]

    def keys(self) -> Iterator[str] | None:
        return None

    def count(self) -> int | None:
        return None

    def duplicates(self) -> int:
        return 0

    def status(self) -> dict[str, Any]:
        return self.producer.status()


if TYPE_CHECKING:  # mypy checks the kind against the outputs' interface
    from lrq.outputs import Output

    _conforms: type[Output] = KafkaOutput
