"""Sources: where a queue's items come from, and how they are acknowledged.

A source kind is a module in this package, named in :data:`KINDS`. It exports
``Settings``, a frozen dataclass with ``parse(table, base, where) -> Settings`` that checks
the kind's own options from the config file (raising :class:`~lrq.errors.ConfigError`
naming the option and the fix), and ``open(settings, context) -> Source``. Modules import
their client libraries (redis, confluent-kafka) only inside ``open``, so loading a config
stays cheap and a kind's extra is needed only where that kind is used.

Acknowledgement, declared by :attr:`Source.ack_at`:

``"publish"``
    The source is re-readable (a SQL table by keyset, log files by offset). The sniffer
    passes in the last saved position and saves the one :class:`Fetched` returns only after
    the batch file is durable (see :mod:`lrq.spool`). ``ack`` is never called.

``"commit"``
    A broker (Redis Streams, a Redis list, Kafka): an item fetched is held for this node
    until it is acknowledged, and it must be acknowledged only once its results are
    committed, or a node lost with its disk loses it. Each item carries a *receipt* (a
    JSON-able value: a stream entry id, a ``[partition, offset]`` pair, a list entry),
    aligned with ``items``; the batch file keeps them, split batches slice them with their
    items, and the process that runs the sniffer calls :meth:`Source.ack` with the receipts
    of batches whose ledger row is committed (:mod:`lrq.acker`). Until then it calls
    :meth:`Source.keep` with the receipts still held, so the broker does not hand them to
    another node as abandoned. ``position`` is ignored by such a source (None is passed).

Nothing fetched is thrown away: the sniffer publishes or keeps in memory every item a
``fetch`` returned (an idle tick fetches a whole batch, not a probe of one; a batch stopped
by backpressure or a full disk waits in ``Sniffer.carried`` and is published first next tick).

Who calls what: ``fetch``, ``ack``, ``keep`` and ``settled`` are called only by the process
that runs the sniffer, from its sniff job's thread, under the sniffer lock (``settled`` only
for ``lrq run --until-idle``); ``ack`` and ``keep`` by :mod:`lrq.acker` at each tick and every
``lrq.sniffer.ACK_EVERY`` (0.25 s) within one (``keep`` every ``min(KEEP_EVERY,
source.keep_every)`` seconds: an optional ``keep_every`` attribute is how a source asks for
more). ``status`` and ``keys`` are
also called by other commands (``lrq status``, ``lrq verify``) in their own processes, so
``open`` must not join a consumer group or take entries: do that on the first ``fetch``.
:attr:`Context.held` is computed when first read (it scans the spool): read it at the first
``fetch``, or at ``open`` only if needed.

What remains: a kind may add ``remaining(position) -> int | None``, the items past
``position`` it has yet to hand out (``sql``: rows past the watermark). ``lrq status`` uses it
for the ETA, else the ``lag`` of :meth:`Source.status` (a broker's entries not yet read).

Kinds: ``sql`` (:mod:`lrq.sources.sql`, at publish), ``logfile`` (:mod:`lrq.sources.logfile`,
growing log files tailed like ``tail -F``, at publish) and ``sqlite-broker``
(:mod:`lrq.sources.sqlite_broker`, at commit: a stand-in broker in one SQLite file for the
contract suite, tests/contract). The config's ``kind`` defaults to ``"sql"``.
``ingest`` (:mod:`lrq.sources.ingest`, at publish): items clients POST to the web server,
kept in a fsynced journal (:mod:`lrq.journal`).
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lrq.errors import ConfigError

if TYPE_CHECKING:
    from lrq.config import SourceConfig

AckAt = Literal["publish", "commit"]

#: Source kinds and the modules that implement them (imported on first use).
KINDS: dict[str, str] = {
    "sql": "lrq.sources.sql",
    "http-agent": "lrq.sources.http_agent",
    "ingest": "lrq.sources.ingest",  # items POSTed to the web server (lrq.webingest)
    "kafka": "lrq.sources.kafka",
    "logfile": "lrq.sources.logfile",
    "redis-list": "lrq.sources.redis_list",
    "redis-stream": "lrq.sources.redis_stream",
    "sqlite-broker": "lrq.sources.sqlite_broker",  # a stand-in broker for the contract suite
}


@dataclass(frozen=True)
class Fetched:
    items: list[dict[str, Any]]
    #: The position after these items, for a source acknowledged at publish; pass it to the
    #: next ``fetch``. None for a source acknowledged at commit.
    position: Any = None
    #: One receipt per item, aligned with ``items`` (a source acknowledged at commit); None
    #: for a source acknowledged at publish.
    receipts: list[Any] | None = None


@dataclass(frozen=True)
class Context:
    """What a source may need from the running lrq besides its settings."""

    #: The data dir (a broker consumer's default name hashes it: one name per node).
    data_dir: Path
    queue: str
    #: Receipts of items this node already holds in its spool, not yet acknowledged (batches
    #: pending, claimed, failed, or done but not acknowledged). A broker source re-reading
    #: its own unacknowledged entries after a restart skips these: they are in a batch file.
    held: Sequence[Any] = field(default_factory=tuple)
    #: The queue's ``key`` field. A broker source gives a message it cannot decode this field
    #: (its broker coordinates), so the item reaches the handler and its dead letter instead
    #: of failing its whole batch for a missing key. None: the source's own default.
    key: str | None = None


class Source(Protocol):
    #: When items are acknowledged: at publish (re-readable sources) or at commit (brokers).
    ack_at: AckAt

    def fetch(self, position: Any, limit: int) -> Fetched:
        """Up to ``limit`` items after ``position`` (None: from the start; always None for a
        source acknowledged at commit). Bounded: a broker source waits at most a short,
        fixed time for new entries. Raises :class:`~lrq.errors.SourceError` when the source
        cannot be reached."""

    def ack(self, receipts: Sequence[Any]) -> None:
        """Acknowledge these items: their results are committed. Idempotent (it may repeat
        after a crash, and receipts another node already acknowledged are fine). Only for
        a source acknowledged at commit."""

    def keep(self, receipts: Sequence[Any]) -> None:
        """These items are still held here (in a batch file, not yet acknowledged): keep the
        broker from handing them to another node. Called every few seconds; a no-op where
        the broker tracks liveness itself (Kafka's session)."""

    def settled(self) -> bool:
        """Nothing left anywhere: no new entries, and nothing pending or in flight for any
        consumer (``lrq run --until-idle`` stops only then). A re-readable source is settled
        once a fetch came back short, so it answers True."""

    def keys(self, key: str) -> Iterator[str] | None:
        """Every item's ``key`` field as a string, one per item (so duplicates show), for
        ``lrq verify``; None when the source cannot list them (a stream: ``verify`` then
        reconciles the ledger against what the source still holds)."""

    def item_fields(self) -> Sequence[str] | None:
        """The fields every item carries, or None when the source cannot tell before it reads
        (a broker's messages): start-up checks the queue's ``key`` against them."""

    def status(self) -> dict[str, Any]:
        """The source's own view for ``lrq status``: lag, entries pending per consumer, the
        last acknowledgement; {} when it has none. Never contains a password."""

    def close(self) -> None: ...


def module(kind: str) -> Any:
    """The module implementing ``kind``; a :class:`ConfigError` naming the known kinds."""
    name = KINDS.get(kind)
    if name is None:
        raise ConfigError(f"unknown source kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return importlib.import_module(name)


def parse(kind: str, table: dict[str, Any], base: Path, where: str) -> Any:
    """The kind's ``Settings`` from its config table (``kind`` already removed)."""
    return module(kind).Settings.parse(table, base, where)


def build(cfg: SourceConfig, context: Context) -> Source:
    src: Source = module(cfg.kind).open(cfg.settings, context)
    return src
