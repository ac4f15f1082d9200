"""``kind = "http-agent"``: the original system's HTTP "Kafka agent" (DESIGN.md §6).

The agent is a small web service in front of Kafka. lrq calls its ``POST /consume_msg/``
with ``{"servers", "groupid", "is_commit": true, "msg_num", "topic", "is_json"}`` and gets
back a JSON list of up to ``msg_num`` messages::

    [queues.events.source]
    kind    = "http-agent"
    url     = "http://10.0.0.5:8000"   # the agent; lrq posts to <url>/consume_msg/
    servers = "10.0.0.7:9092"          # the Kafka brokers, passed to the agent
    group   = "lrq"                    # its consumer group (groupid)
    topic   = "events"
    is_json = true                     # the agent decodes each message as JSON (default)
    timeout = "30s"                    # per call: connect, and the answer (default 30s)

**At most once.** The agent commits the group's offsets when it answers (``is_commit`` is
always true: the agent has no other way to acknowledge, so with false it would serve the
same messages forever). The messages of an answer are therefore lost if this process dies,
or the answer is cut off, between the agent's commit and the batch file being durable in
``left/``: a window of milliseconds per batch, but not zero. So the source is acknowledged at
*publish* (``ack_at = "publish"``) with no position of its own (the agent keeps it), and
its first fetch in a process logs the ``at-most-once`` warning. Use ``kind = "kafka"``, which commits
offsets only after the results are committed, wherever a lost message matters; this kind
exists for systems that already run the agent.

Nothing is sent to the agent until the first ``fetch``: any call consumes messages, so there
is no probe call (opening the source does not check that the agent is reachable).

Items: a message that is a JSON object is the item as it is. Any other message (a string,
when ``is_json = false`` or the message was not an object; a number, a list, null) becomes
``{"value": message}``: never dropped, and the handler sees a dict as always. An answer
with more than ``msg_num`` messages is kept whole (nothing fetched is thrown away).

Every call is bounded: ``timeout`` applies to the connect and to each read of the answer,
and the whole answer must arrive within ``2 * timeout``. A connection refused or reset
before the agent answered is retried :data:`RETRIES` times with a short backoff; a timeout
is not (the agent may have answered and committed; the next sniff calls again). An answer
that is not HTTP 200, not JSON or not a list is a :class:`~lrq.errors.SourceError` naming
the agent (password hidden) and what came back (truncated). A user and password in ``url``
are sent as HTTP basic auth and never shown.
"""
from __future__ import annotations

import base64
import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from lrq.config import parse_duration, positive, required, take
from lrq.errors import ConfigError, SourceError
from lrq.redact import redact
from lrq.sources import AckAt, Context, Fetched

log = logging.getLogger(__name__)

PATH = "/consume_msg/"
#: Extra tries of a call whose connection was refused or reset before an answer.
RETRIES = 2
BACKOFF = 0.2  # seconds before the first retry; doubles
#: The longest ``timeout``: a sniff blocked longer would hold up its queue's tick.
MAX_TIMEOUT = 600.0
#: The largest answer read; a bigger one is an error rather than memory exhausted.
MAX_ANSWER_BYTES = 256 * 2**20
SHOWN = 200  # characters of an unexpected answer quoted in an error

_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "url": str, "servers": str, "group": str, "topic": str, "is_json": bool,
    "timeout": (int, float, str)}


@dataclass(frozen=True)
class Settings:
    """The ``[queues.X.source]`` table of ``kind = "http-agent"`` (module docstring)."""

    url: str
    servers: str
    group: str
    topic: str
    is_json: bool = True
    timeout: float = 30.0

    @classmethod
    def parse(cls, table: dict[str, Any], base: Path, where: str) -> Settings:
        """Check the options (``kind`` already removed); ``base`` is not needed (no paths)."""
        take(table, _OPTIONS, where, kind="http-agent")
        url = required(table, "url", where, "http://127.0.0.1:8000")
        servers = required(table, "servers", where, "10.0.0.7:9092")
        group = required(table, "group", where, "lrq")
        topic = required(table, "topic", where, "events")
        endpoint(url, f"{where}.url")  # fail at load, not at the first sniff
        timeout = positive(parse_duration(table.get("timeout", cls.timeout), f"{where}.timeout"),
                           f"{where}.timeout", MAX_TIMEOUT)
        return cls(url=url, servers=servers, group=group, topic=topic,
                   is_json=table.get("is_json", True), timeout=timeout)


def endpoint(url: str, where: str) -> tuple[str, str | None]:
    """The ``/consume_msg/`` URL of the agent at ``url`` without its user and password, and
    the ``Authorization`` header they make (None without them). :class:`ConfigError` for a
    URL that is not ``http(s)://host[:port][/path]``."""
    fix = "write the agent's address, e.g. url = \"http://127.0.0.1:8000\""
    try:
        u = urllib.parse.urlsplit(url.strip())
        u.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        raise ConfigError(f"{where}: {redact(url)!r} is not a URL ({e}); {fix}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"{where}: {redact(url)!r} is not an http:// or https:// URL; {fix}")
    if u.query or u.fragment:
        raise ConfigError(f"{where}: {redact(url)!r} has a query or fragment; {fix}")
    auth = None
    if u.username is not None or u.password is not None:
        pair = f"{urllib.parse.unquote(u.username or '')}:{urllib.parse.unquote(u.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    host = u.netloc.rpartition("@")[2]
    path = u.path.rstrip("/")
    if not path.endswith(PATH.rstrip("/")):
        path += PATH.rstrip("/")
    return urllib.parse.urlunsplit((u.scheme, host, path + "/", "", "")), auth


def open(settings: Settings, context: Context) -> HttpAgentSource:  # noqa: A001 - the kind's entry point
    """The source for :func:`lrq.sources.build`."""
    return HttpAgentSource(settings, context.queue)


class HttpAgentSource:
    """Messages from the agent's ``/consume_msg/``; see the module docstring."""

    ack_at: AckAt = "publish"

    def __init__(self, settings: Settings, queue: str = "") -> None:
        self.settings = settings
        self.queue = queue
        self._url, self._auth = endpoint(settings.url, "url")
        #: The agent as shown in logs, errors and status: no password.
        self.agent = redact(settings.url)
        # No urllib handler for file:// or ftp://, whatever a redirect says; proxies from the
        # environment (http_proxy, no_proxy) apply as for any HTTP client.
        self._opener = urllib.request.build_opener()
        self._short = False
        self.fetches = 0
        self.fetched = 0
        self.last_fetch: float | None = None
        self.last_count: int | None = None

    def fetch(self, position: Any, limit: int) -> Fetched:
        """Up to ``limit`` messages (``position`` is ignored: the agent keeps its group's
        offsets). The agent has committed them once this returns."""
        if not self.fetches:
            # At the first fetch, not at open: every process opens the source (a worker's key
            # check, `lrq status`), only the one that fetches takes the risk.
            log.warning("at-most-once queue=%s agent=%s: the agent commits messages when it "
                        "answers, so an answer not yet in a durable batch file is lost if this "
                        "process dies; use kind = \"kafka\" (acknowledged after commit) where "
                        "that matters", self.queue, self.agent)
        body = orjson.dumps({"servers": self.settings.servers, "groupid": self.settings.group,
                             "is_commit": True, "msg_num": limit, "topic": self.settings.topic,
                             "is_json": self.settings.is_json})
        messages = self._decode(self._post(body))
        items = [m if isinstance(m, dict) else {"value": m} for m in messages]
        self.fetches += 1
        self.fetched += len(items)
        self.last_fetch, self.last_count = time.time(), len(items)
        self._short = len(items) < limit
        return Fetched(items, None)

    def _post(self, body: bytes) -> bytes:
        """The answer's body; bounded (see the module docstring)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._auth:
            headers["Authorization"] = self._auth
        timeout = self.settings.timeout
        for attempt in range(RETRIES + 1):
            request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=timeout) as answer:
                    return self._read(answer, time.monotonic() + 2 * timeout)
            except urllib.error.HTTPError as e:
                raise SourceError(f"agent {self.agent} answered HTTP {e.code} {e.reason}: "
                                  f"{_quote(_peek(e))}") from None
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                if isinstance(reason, TimeoutError):
                    raise SourceError(f"agent {self.agent} did not answer within {timeout:g} s "
                                      f"(timeout)") from None
                if not isinstance(reason, OSError):  # a broken answer (not HTTP, cut short)
                    raise SourceError(f"agent {self.agent} gave a broken answer: "
                                      f"{type(reason).__name__}: {reason}") from None
                if attempt == RETRIES:
                    raise SourceError(f"cannot reach agent {self.agent}: {reason} "
                                      f"(after {attempt + 1} tries)") from None
                log.info("agent-retry agent=%s attempt=%d error=%s", self.agent, attempt + 1, reason)
                time.sleep(BACKOFF * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _read(self, answer: Any, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := answer.read(2**16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise SourceError(f"agent {self.agent} answered more than "
                                  f"{MAX_ANSWER_BYTES // 2**20} MiB; ask for fewer messages "
                                  f"(batch_size)")
            if time.monotonic() > deadline:
                raise SourceError(f"agent {self.agent} did not finish its answer within "
                                  f"{2 * self.settings.timeout:g} s (timeout)")
        return b"".join(chunks)

    def _decode(self, raw: bytes) -> list[Any]:
        try:
            messages = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SourceError(f"agent {self.agent} answered something that is not JSON: "
                              f"{_quote(raw)}") from None
        if not isinstance(messages, list):
            raise SourceError(f"agent {self.agent} answered a JSON {type(messages).__name__}, "
                              f"not a list of messages: {_quote(raw)}")
        return messages

    def ack(self, receipts: Sequence[Any]) -> None:
        """Never called: the agent acknowledged when it answered."""

    def keep(self, receipts: Sequence[Any]) -> None:
        """Nothing is held at the agent."""

    def settled(self) -> bool:
        """True once a fetch came back short. The agent shows no lag and no pending entries,
        and it commits what it serves, so nothing is pending or in flight anywhere; a short
        answer (the agent's consumer found no more in its poll) is the only sign of the end
        it gives. Messages produced later are fetched by the next run."""
        return self._short

    def keys(self, key: str) -> Iterator[str] | None:
        """None: the agent cannot list what its topic held (``lrq verify`` says so)."""
        return None

    def item_fields(self) -> Sequence[str] | None:
        """None: messages are not known before they are read."""
        return None

    def status(self) -> dict[str, Any]:
        """The agent (no password), topic and group, and this process's last fetch."""
        last = None if self.last_fetch is None else \
            datetime.fromtimestamp(self.last_fetch, UTC).isoformat(timespec="seconds")
        return {"kind": "http-agent", "agent": self.agent, "topic": self.settings.topic,
                "group": self.settings.group, "acknowledged": "by the agent when it answers "
                "(at most once)", "last_fetch": last, "last_count": self.last_count,
                "fetched": self.fetched}

    def close(self) -> None:
        """Nothing to close: each call opens and closes its own connection."""


def _peek(e: urllib.error.HTTPError) -> bytes:
    try:
        return e.read(SHOWN * 4)
    except (OSError, http.client.HTTPException):
        return b""


def _quote(raw: bytes) -> str:
    """The start of an unexpected answer, as text, for an error message."""
    text = raw[:SHOWN * 4].decode("utf-8", "replace")
    shown = text[:SHOWN] + ("..." if len(raw) > SHOWN or len(text) > SHOWN else "")
    return repr(shown) if shown else "(empty)"
