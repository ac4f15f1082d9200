"""The entity-mapping HTTP service: a client handler for lrq, and a small local service.

Wire protocol (the original system's, kept as is)::

    POST <url>/ent_mapping/      {"data_list": [{"doc_id": ..., "content": ...}, ...]}
    200 application/json         [{"doc_id": ..., "ent_list": [...], "maaped_ent": [...]}, ...]

``maaped_ent`` is misspelled in the service's API; it stays misspelled on the wire.

Configure the client as a queue's handler::

    handler = "workers.entity_service:EntityService"
    handler_options = { url = "http://127.0.0.1:8765" }

Run the local service (answers with :func:`workers.entities.map_entities`, a set latency
after each request arrives, standing in for the remote model's)::

    python -m workers.entity_service --port 8765 --delay-ms 20 --per-item-ms 0.2
"""
from __future__ import annotations

import argparse
import json
import logging
import netrc
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import orjson
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
    ResponseError,
)
from urllib3.util import Retry

from lrq.errors import HandlerError, Retryable
from workers.entities import map_entities, to_rows

log = logging.getLogger(__name__)

PATH = "/ent_mapping/"
#: Statuses worth retrying: the service is overloaded or restarting, not refusing the data.
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: The local service refuses bodies larger than this, rather than reading without bound.
MAX_BODY = 64 * 2**20


# -- the client handler ------------------------------------------------------------------

class EntityService:
    """lrq handler that maps entities by calling the entity service over HTTP.

    ``url`` is the service's base URL; requests go to ``<url>/ent_mapping/``.

    ``batch=True`` posts a whole chunk in one request (the chunk is the queue's
    ``chunk_size``); ``batch=False`` posts one item per request, like the original system.

    The client is urllib3 used directly: ``requests`` cost ~0.7 ms more per call against
    the local service (2.0 ms over its latency, against 1.3), ~10% of its throughput in W2.

    Every request has ``urllib3.Timeout(connect=connect_timeout, read=read_timeout)``.
    Connection errors, connect and read timeouts and the statuses in :data:`RETRY_STATUSES`
    are retried up to ``retries`` times with exponential backoff (``backoff`` seconds,
    doubling, at most 30; a ``Retry-After`` header is ignored). Retrying a POST is safe here
    because mapping is a pure function of the documents. So one request takes at most
    ``retries + 1`` attempts of at most ``connect_timeout + read_timeout`` each, plus the
    backoff. Redirects are not followed. What happens when that is not enough:

    * the retries run out (the service cannot be reached, keeps timing out, or keeps
      answering a retried status), or the transport fails otherwise (any
      ``urllib3.exceptions.HTTPError``): :class:`lrq.errors.Retryable`, raised from the
      urllib3 exception (usually a ``MaxRetryError`` whose ``reason`` is the last failure),
      saying whether it was a timeout, a refused connection or a status. None of this is the
      batch's fault: lrq releases the batch uncounted and the worker backs off.
    * any other non-2xx status (400, 404, 413, a 5xx not in :data:`RETRY_STATUSES`, a 3xx):
      :class:`lrq.errors.HandlerError` naming the URL, the status and the start of the body.
      The service refused this request, so lrq counts a failed call (retry, split, dead
      letter).
    * the service answers 2xx with something unusable (not JSON, not a list, entries
      missing, duplicated, unknown or malformed): :class:`lrq.errors.HandlerError`.

    One instance holds one ``urllib3.PoolManager`` (a ``ProxyManager`` when a proxy applies),
    so connections are kept alive between calls; lrq builds one handler per worker, so it is
    not shared between threads. :meth:`close` releases its connections. The proxy variables
    (``no_proxy`` honoured), ``~/.netrc`` and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` are
    read once, when the instance is built: reading them on every call, as ``requests`` did,
    cost ~0.3 ms of CPU per call. Without a CA bundle variable, HTTPS trusts the system's
    certificate store.
    """

    def __init__(self, url: str, connect_timeout: float = 3.05, read_timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5, batch: bool = True) -> None:
        self.url = url.rstrip("/") + PATH
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.batch = batch
        # Retry-After is ignored: a service asking for an hour would stall a worker that long;
        # our own backoff is bounded, and lrq backs off further on infrastructure errors.
        self.retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                           backoff_factor=backoff, backoff_max=30,
                           status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"POST"}),
                           raise_on_status=True, respect_retry_after_header=False)
        parts = urlsplit(self.url)
        self.headers: dict[str, str] = {"Content-Type": "application/json",
                                        **_auth_header(parts)}
        #: The proxy requests go through (from the environment), or None.
        self.proxy = _environment_proxy(parts)
        tls: dict[str, Any] = {}
        ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if ca:
            tls["ca_cert_dir" if os.path.isdir(ca) else "ca_certs"] = ca
        self.pool: urllib3.PoolManager
        if self.proxy is None:
            self.pool = urllib3.PoolManager(**tls)
        else:
            proxy = self.proxy if "://" in self.proxy else "http://" + self.proxy
            p = urlsplit(proxy)
            # urllib3 ignores credentials in the proxy URL; requests sent them, so do we.
            proxy_headers = (urllib3.make_headers(proxy_basic_auth=unquote(
                f"{p.username}:{p.password or ''}")) if p.username else None)
            self.pool = urllib3.ProxyManager(proxy, proxy_headers=proxy_headers, **tls)

    def __repr__(self) -> str:
        return f"EntityService({self.url!r}, batch={self.batch})"

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``DocEntMap`` rows for ``items``, in the order of ``items``."""
        if not items:
            return []
        if self.batch:
            return self._post(items)
        return [row for it in items for row in self._post([it])]

    def close(self) -> None:
        self.pool.clear()

    def _post(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            keys = [str(it["doc_id"]) for it in items]
        except KeyError:
            raise HandlerError(f"an item has no 'doc_id' field; item fields: "
                               f"{sorted(next(it for it in items if 'doc_id' not in it))}") from None
        try:
            body = orjson.dumps({"data_list": items})
        except orjson.JSONEncodeError as e:
            raise HandlerError(f"an item cannot be sent as JSON: {e}") from None
        try:
            resp = self.pool.urlopen("POST", self.url, body=body, headers=self.headers,
                                     timeout=self.timeout, retries=self.retry, redirect=False)
        except urllib3.exceptions.HTTPError as e:
            raise Retryable(f"entity service {self.url}: {self._failure(e)}") from e
        data = resp.data
        if not 200 <= resp.status < 300:
            raise self._bad(f"answered {resp.status}: "
                            f"{data[:80].decode('utf-8', 'replace')!r}")
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._bad(f"answered {resp.status} with a body that is not JSON: "
                            f"{data[:80].decode('utf-8', 'replace')!r}") from None
        return self._rows(keys, items, answer)

    def _failure(self, e: urllib3.exceptions.HTTPError) -> str:
        """What went wrong, for an operator: urllib3's own messages lead with object reprs."""
        reason = e.reason if isinstance(e, MaxRetryError) and e.reason is not None else e
        if isinstance(reason, NewConnectionError):  # before ConnectTimeoutError: a subclass
            what = f"cannot connect ({reason.__cause__ or reason})"
        elif isinstance(reason, ConnectTimeoutError):
            what = f"connect timeout ({self.timeout.connect_timeout}s)"
        elif isinstance(reason, ReadTimeoutError):
            what = f"no answer within the read timeout ({self.timeout.read_timeout}s)"
        elif isinstance(reason, ResponseError):
            what = str(reason)  # "too many 503 error responses"
        else:
            what = f"{type(reason).__name__}: {reason}"
        if isinstance(e, MaxRetryError):
            # Every failure counts against ``total``, so running out means total + 1 attempts.
            attempts = (self.retry.total or 0) + 1
            what += f"; gave up after {attempts} attempt{'s' if attempts > 1 else ''}"
        return what

    def _rows(self, keys: list[str], items: list[dict[str, Any]], answer: Any) -> list[dict[str, Any]]:
        """Check ``answer`` holds exactly one well-formed entry per item; rows in item order."""
        if not isinstance(answer, list):
            raise self._bad(f"answered a JSON {type(answer).__name__}, not a list")
        by_key: dict[str, list[dict[str, Any]]] = {}
        for entry in answer:
            if not (isinstance(entry, dict) and "doc_id" in entry
                    and _is_str_list(entry.get("ent_list"))
                    and _is_str_list(entry.get("maaped_ent"))):
                raise self._bad(f"answered a malformed entry (want doc_id, ent_list, maaped_ent "
                                f"with lists of strings): {json.dumps(entry)[:120]}")
            by_key.setdefault(str(entry["doc_id"]), []).append(entry)
        want = Counter(keys)
        got = Counter({k: len(v) for k, v in by_key.items()})
        if got != want:
            problems = []
            for label, diff in (("missing", want - got), ("unexpected or repeated", got - want)):
                if diff:
                    problems.append(f"{label} doc_id {', '.join(sorted(diff)[:5])}"
                                    + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""))
            raise self._bad(f"answered {len(answer)} entries for {len(keys)} docs: "
                            + "; ".join(problems))
        # Rows carry the item's own doc_id (its type, not the JSON round trip's) in item order.
        return to_rows([{**by_key[k].pop(0), "doc_id": it["doc_id"]} for k, it in zip(keys, items)])

    def _bad(self, what: str) -> HandlerError:
        return HandlerError(f"entity service {self.url} {what}")


def _environment_proxy(parts: SplitResult) -> str | None:
    """The proxy the environment sets for ``parts``' scheme, unless ``no_proxy`` exempts it."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            parts.netloc.rpartition("@")[2], proxies):
        return None
    return proxy


def _auth_header(parts: SplitResult) -> dict[str, str]:
    """Basic auth from ~/.netrc for the host, else from the URL's userinfo (as requests did)."""
    try:
        entry = netrc.netrc().authenticators(parts.hostname or "")
    except (OSError, netrc.NetrcParseError):
        entry = None  # no ~/.netrc, or one that cannot be used: no auth, as with requests
    if entry:
        login, account, password = entry
        return urllib3.make_headers(basic_auth=f"{login or account or ''}:{password or ''}")
    if parts.username:
        return urllib3.make_headers(
            basic_auth=unquote(f"{parts.username}:{parts.password or ''}"))
    return {}


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# -- the local service -------------------------------------------------------------------

class EntityServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` answering ``POST /ent_mapping/`` from the local dictionary."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], delay_ms: float = 0.0,
                 per_item_ms: float = 0.0) -> None:
        self.delay_ms = delay_ms
        self.per_item_ms = per_item_ms
        super().__init__(address, _EntityRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if isinstance(host, bytes):  # typeshed allows it; an AF_INET server has a str
            host = host.decode()
        return f"http://{host}:{port}"


class _EntityRequestHandler(BaseHTTPRequestHandler):
    server: EntityServer
    protocol_version = "HTTP/1.1"  # keep-alive, so a client's session reuses connections
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers, adding ~40 ms to every keep-alive request. (One buffered
    # write instead of two measured the same; bench/README.md, W2.)
    disable_nagle_algorithm = True
    #: When the request line was read: the service's latency counts from here.
    arrived = 0.0

    def parse_request(self) -> bool:
        self.arrived = time.monotonic()
        return super().parse_request()

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != PATH:
            self._discard_body()
            self._send(404, {"error": f"no such path {self.path}; POST {PATH}"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._send(411, {"error": "Content-Length required"})
            return
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._send(413, {"error": f"body of {length} bytes; at most {MAX_BODY}"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            data_list = body["data_list"]
            if not isinstance(data_list, list) or not all(
                    isinstance(d, dict) and "doc_id" in d
                    and isinstance(d.get("content") or "", str) for d in data_list):
                raise ValueError("data_list must be a list of objects with doc_id and content")
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            self._send(400, {"error": f"malformed body: {type(e).__name__}: {e}"})
            return
        # The remote model's latency, counted from the request's arrival: reading, mapping
        # and encoding are part of it, so only what remains of it is slept (in _send).
        latency = (self.server.delay_ms + self.server.per_item_ms * len(data_list)) / 1000
        self._send(200, map_entities(data_list), not_before=self.arrived + latency)

    def do_GET(self) -> None:
        self._send(404, {"error": f"POST {PATH}"})

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def _send(self, status: int, payload: Any, not_before: float = 0.0) -> None:
        """Answer ``payload`` as JSON, not before ``time.monotonic()`` reaches ``not_before``."""
        data = json.dumps(payload).encode()
        # The whole answer is formatted before the wait and goes out in one write after it,
        # so it leaves at the latency, not the latency plus the formatting.
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._headers_buffer.append(b"\r\n" + data)  # type: ignore[attr-defined]  # headers' end, then the body
        wait = not_before - time.monotonic()
        if wait > 0:
            # The remote model's latency: this is what the service does, not synchronisation.
            time.sleep(wait)
        self.flush_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def make_server(host: str = "127.0.0.1", port: int = 0, delay_ms: float = 0.0,
                per_item_ms: float = 0.0) -> EntityServer:
    """A bound, not yet serving entity service; ``port=0`` picks a free port (see ``.url``).

    Each request is answered ``delay_ms + per_item_ms * len(data_list)`` milliseconds after
    its request line was read, so benchmarks can compare batched and one-by-one calls
    against a model whose cost has a fixed and a per-document part. The service's own work
    (reading and parsing the body, mapping, encoding the answer) is done within that time
    and only the rest is slept, like a remote model whose latency includes its compute; if
    the work takes longer, it answers when done. Connections are keep-alive HTTP/1.1 with
    TCP_NODELAY, each served by its own thread.
    Call ``serve_forever()``, then ``shutdown()`` and ``server_close()``.
    """
    return EntityServer((host, port), delay_ms=delay_ms, per_item_ms=per_item_ms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m workers.entity_service",
        description="serve POST /ent_mapping/ from the local entity dictionary",
        epilog="example: python -m workers.entity_service --port 8765 --delay-ms 20 "
               "--per-item-ms 0.2")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="simulated latency of every request (default 0)")
    p.add_argument("--per-item-ms", type=float, default=0.0,
                   help="simulated extra latency per document (default 0)")
    a = p.parse_args(argv)
    server = make_server(a.host, a.port, a.delay_ms, a.per_item_ms)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="entity-service", daemon=True)
    thread.start()
    print(f"entity service on {server.url}{PATH} (delay {a.delay_ms} ms + "
          f"{a.per_item_ms} ms/doc); Ctrl-C to stop", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
