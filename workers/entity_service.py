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
import os
import signal
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ReadTimeoutError
from urllib3.util import Retry

from lrq.errors import HandlerError
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

    Every request has ``timeout=(connect_timeout, read_timeout)``. Connection errors, read
    timeouts and the statuses in :data:`RETRY_STATUSES` are retried up to ``retries`` times
    with exponential backoff (``backoff`` seconds, doubling; urllib3 also honours a
    ``Retry-After`` header on 429/503). Retrying a POST is safe here because mapping is a
    pure function of the documents. So one request takes at most ``retries + 1`` attempts of
    at most ``connect_timeout + read_timeout`` each, plus the backoff (and any Retry-After).
    What happens when that is not enough:

    * the service cannot be reached, keeps timing out, or keeps answering a retried status:
      a ``requests`` exception propagates (``ConnectionError``, ``Timeout``, ``RetryError``);
      any other non-2xx status raises ``requests.HTTPError``. These say nothing about the
      batch itself; lrq is to classify them as infrastructure errors.
    * the service answers 2xx with something unusable (not JSON, not a list, entries
      missing, duplicated, unknown or malformed): :class:`lrq.errors.HandlerError`.

    One instance holds one ``requests.Session`` (a connection pool); lrq builds one handler
    per worker, so it is not shared between threads. :meth:`close` releases it. The proxy
    variables, ``~/.netrc`` and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` are read once, when
    the instance is built.
    """

    def __init__(self, url: str, connect_timeout: float = 3.05, read_timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5, batch: bool = True) -> None:
        self.url = url.rstrip("/") + PATH
        self.timeout = (connect_timeout, read_timeout)
        self.batch = batch
        # Retry-After is ignored: a service asking for an hour would stall a worker that long;
        # our own backoff is bounded, and lrq backs off further on infrastructure errors.
        retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                      backoff_factor=backoff, backoff_max=30, status_forcelist=RETRY_STATUSES,
                      allowed_methods=frozenset({"POST"}), raise_on_status=True,
                      respect_retry_after_header=False)
        self.session = requests.Session()
        # With trust_env on, requests reads the proxy variables, ~/.netrc and the CA bundle
        # variables again on every call: ~0.3 of the ~1 ms of CPU a call costs here. The
        # environment is read once, here, with the same effect.
        self.session.trust_env = False
        self.session.proxies = requests.utils.get_environ_proxies(self.url)
        self.session.auth = requests.utils.get_netrc_auth(self.url)
        self.session.verify = (os.environ.get("REQUESTS_CA_BUNDLE")
                               or os.environ.get("CURL_CA_BUNDLE") or True)
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

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
        self.session.close()

    def _post(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            keys = [str(it["doc_id"]) for it in items]
        except KeyError:
            raise HandlerError(f"an item has no 'doc_id' field; item fields: "
                               f"{sorted(next(it for it in items if 'doc_id' not in it))}") from None
        try:
            resp = self.session.post(self.url, json={"data_list": items}, timeout=self.timeout)
        except requests.ConnectionError as e:
            # With read retries, requests reports exhausted read timeouts as ConnectionError
            # (psf/requests#5430); give them back their real type.
            reason = e.args[0].reason if e.args and isinstance(e.args[0], MaxRetryError) else None
            if isinstance(reason, ReadTimeoutError):
                raise requests.ReadTimeout(e, request=e.request) from e
            raise
        resp.raise_for_status()
        try:
            answer = resp.json()
        except ValueError:
            raise self._bad(f"answered {resp.status_code} with a body that is not JSON: "
                            f"{resp.text[:80]!r}") from None
        return self._rows(keys, items, answer)

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
        wait = not_before - time.monotonic()
        if wait > 0:
            # The remote model's latency: this is what the service does, not synchronisation.
            time.sleep(wait)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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
