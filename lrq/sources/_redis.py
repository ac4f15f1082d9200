"""What the two Redis kinds share: option checks, the connection, error mapping.

:mod:`lrq.sources.redis_stream` and :mod:`lrq.sources.redis_list` both take a ``url``
(``redis://``, ``rediss://`` or ``unix://``, with an optional user and password), a
``socket_timeout`` for every socket call, and ``options`` passed to the client (TLS files, a client
name). A password never leaves this module in a string: :func:`lrq.redact.redact` replaces it
in URLs for errors, logs and ``status``, and :func:`failing` turns a client error into a
:class:`~lrq.errors.SourceError` naming the redacted URL (scrubbing the password from the
client's own message too, in case a future client version quotes it).

redis-py is imported in :func:`connect` only, so a config naming a Redis kind loads without
the ``redis`` extra; opening the source then says to install it.
"""
from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lrq.config import parse_duration, positive, required
from lrq.errors import ConfigError, SourceError
from lrq.redact import redact, scrub, url_secrets
from lrq.sources import AckAt, Context

SCHEMES = ("redis", "rediss", "unix")
#: Most entries a single command carries (XACK, XCLAIM, ZADD ids): keeps one reply, one Lua
#: stack and one blocking call on the server small whatever the batch size.
CHUNK = 1000
#: Client options lrq sets itself (the ``options`` table may not override them).
_OWN = {"decode_responses", "socket_timeout", "socket_connect_timeout", "retry",
        "host", "port", "db", "password", "username", "url"}


def parse_url(table: dict[str, Any], where: str) -> str:
    """The ``url`` option, checked for a scheme redis-py opens; the error shows it redacted."""
    url = required(table, "url", where, "redis://127.0.0.1:6379/0")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        raise ConfigError(f"{where}.url: {redact(url)!r} is not a URL ({e}); "
                          "write e.g. redis://127.0.0.1:6379/0") from None
    if parts.scheme not in SCHEMES or (parts.scheme != "unix" and not parts.hostname):
        raise ConfigError(f"{where}.url: {redact(url)!r} is not a Redis URL; write e.g. "
                          "redis://127.0.0.1:6379/0, rediss://user:pass@host:6380/0 "
                          "or unix:///run/redis.sock")
    return url


def parse_seconds(table: dict[str, Any], key: str, default: float, where: str) -> float:
    return positive(parse_duration(table.get(key, default), f"{where}.{key}"), f"{where}.{key}")


def parse_options(table: dict[str, Any], where: str) -> tuple[tuple[str, Any], ...]:
    options = dict(table.get("options", {}))
    own = sorted(set(options) & _OWN)
    if own:
        raise ConfigError(f"{where}.options: {own[0]!r} is set by lrq (put credentials and "
                          "the database in `url`, the timeout in `socket_timeout`)")
    return tuple(sorted(options.items()))


@dataclass(frozen=True)
class Connection:
    """A connected client and how to name it in messages."""

    client: Any        # redis.Redis
    shown: str         # the redacted URL
    errors: tuple[type[BaseException], ...]


def connect(url: str, timeout: float, options: tuple[tuple[str, Any], ...],
            block: float = 0.0) -> Connection:
    """A client on ``url`` whose every socket call is bounded by ``timeout`` (plus ``block``,
    the longest server-side wait a command asks for) and that retries a failed call once
    (a connection dropped by a server restart), then raises. Replies stay bytes: each kind
    decodes what it reads, so a value that is not UTF-8 cannot fail a whole read."""
    shown = redact(url)
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError as e:
        raise SourceError(f"source {shown} needs the redis client: "
                          "pip install 'lrq[redis]'") from e
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout + block,
                                      socket_connect_timeout=timeout,
                                      retry=Retry(NoBackoff(), 1), **dict(options))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"source url {shown}: {scrub(str(e), url_secrets(url))}") from None
    return Connection(client, shown, (redis.RedisError, OSError))


@contextlib.contextmanager
def failing(conn: Connection, url: str, doing: str) -> Iterator[None]:
    """Turn a client error inside the block into a :class:`SourceError` naming the redacted
    URL and what was being done."""
    try:
        yield
    except conn.errors as e:
        raise SourceError(f"redis {conn.shown}: cannot {doing}: "
                          f"{scrub(str(e), url_secrets(url)) or type(e).__name__}") from None


class RedisSource:
    """What both kinds' sources share: acknowledged at commit, a consumer name, the client,
    errors as :class:`SourceError`, no item fields known before reading."""

    ack_at: AckAt = "commit"

    def __init__(self, url: str, consumer: str | None, socket_timeout: float,
                 options: tuple[tuple[str, Any], ...], context: Context,
                 block: float = 0.0) -> None:
        self.url = url
        self.consumer = consumer or default_consumer(context.data_dir, context.queue)
        self._conn = connect(url, socket_timeout, options, block=block)
        self.client = self._conn.client

    def _failing(self, doing: str) -> Any:
        return failing(self._conn, self.url, doing)

    def item_fields(self) -> Sequence[str] | None:
        return None

    def close(self) -> None:
        self.client.close()


def default_consumer(data_dir: Path, queue: str) -> str:
    """Host name + a short hash of the data dir and queue: one stable name per node and queue
    (a restarted node finds its own pending entries again; two nodes never share one)."""
    digest = hashlib.sha256(f"{Path(data_dir).resolve()}\0{queue}".encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def text(value: bytes) -> str:
    """Bytes from Redis as text; bytes that are not UTF-8 show as ``\\xNN`` escapes (visible
    and storable) instead of failing the read."""
    return value.decode("utf-8", "backslashreplace")


def iso(ms: int) -> str:
    """Unix milliseconds as a UTC ISO time, for ``status``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
