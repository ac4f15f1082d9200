"""The web page and its JSON API, on the standard library's HTTP server (no framework).

``lrq run --http HOST:PORT`` serves it from a thread of the scheduler process (one port
however many worker processes run); ``lrq web --http HOST:PORT`` serves it alone on a data
dir. The host defaults to 127.0.0.1. Each server has an :class:`~lrq.app.App` of its own
(its own engine and spool objects), so requests never share state with the scheduler's jobs;
all it reads lives on disk or in the database.

Routes (GETs need no token):

* ``GET /``: the page (:mod:`lrq.webpage`): one self-contained HTML file, inline JS/CSS.
* ``GET /metrics``: Prometheus text (:mod:`lrq.metrics`).
* ``GET /api/status``: the JSON of ``lrq status --json``.
* ``GET /api/throughput``: batches and items per minute over the last hour, per queue,
  from the ledger's ``finished_at`` (the database's clock).
* ``GET /api/problems``: failed batches with their errors, and dead letters, per queue.
* ``POST /api/queues/NAME/pause`` and ``/resume``, ``POST /api/batches/NAME/requeue``,
  ``POST /api/requeue-failed[?queue=NAME]``, ``POST /api/cleanup``.
* ``POST /api/queues/NAME/items``: items for a ``kind = "ingest"`` queue (:mod:`lrq.webingest`;
  its body is read up to the source's ``max_request_bytes``, and not under the routes' lock).

Every POST needs ``Authorization: Bearer TOKEN``: without the header it answers 401, with
another token 403 (compared in constant time). The token is config ``http_token``, else env
``LRQ_HTTP_TOKEN``, else ``<data_dir>/http.token``, generated with mode 0600 (outside every
queue folder: not a foreign entry, not counted in the disk budget). A header, never a
cookie: another site's page cannot make a browser send it, and with no CORS headers served,
it cannot send one itself. The page keeps the token in ``sessionStorage``.

The page builds its DOM with ``textContent`` only and is served with a Content-Security-
Policy allowing just its own nonce'd script: no text from items or errors can execute.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from lrq.errors import ConfigError, LrqError, NoSuchBatch
from lrq.regular import create_once

if TYPE_CHECKING:
    from lrq.app import App
    from lrq.config import Config

log = logging.getLogger(__name__)

TOKEN_FILE = "http.token"
DEFAULT_HOST = "127.0.0.1"
MAX_BODY = 64 * 1024  # bytes of a POST body read (and discarded: the URL says it all)
BATCH_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1); ``[::1]:PORT`` for IPv6."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--http {text!r}: expected HOST:PORT (e.g. 127.0.0.1:8321) or PORT")
    return host, int(port)


def load_token(cfg: Config, env: dict[str, str] | None = None) -> str:
    """The POSTs' bearer token: config ``http_token``, env ``LRQ_HTTP_TOKEN``, else
    ``<data_dir>/http.token`` (made once, mode 0600; the first of racing writers wins)."""
    env = dict(os.environ) if env is None else env
    if cfg.http_token:
        return cfg.http_token
    if env.get("LRQ_HTTP_TOKEN"):
        return env["LRQ_HTTP_TOKEN"]
    path = cfg.data_dir / TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_token(path)
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if create_once(path, secrets.token_urlsafe(32).encode()):  # else a racing writer's won
        log.info("http-token-created path=%s", path)
    return _read_token(path)


def _read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ConfigError(f"{path} is empty; delete it (a new token is made) or set http_token")
    return token


# -- the server -----------------------------------------------------------------------
class Web:
    """The routes over one :class:`App`; one lock keeps requests from sharing its lazy
    parts while they are built (requests are few: a page polls every few seconds)."""

    def __init__(self, app: App, token: str) -> None:
        from lrq import metrics

        self.app = app
        self.token = token.encode()
        self.lock = threading.Lock()
        self.registry = metrics.registry(app)
        from lrq.webingest import Ingest

        self.ingest = Ingest(app)

    def authorized(self, header: str | None) -> int:
        """200 for the right bearer token, 401 without one, 403 for another."""
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return 401
        return 200 if hmac.compare_digest(given.strip().encode(), self.token) else 403

    def get(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        from lrq import metrics, webdata, webpage

        with self.lock:
            if path == "/":
                return 200, "text/html; charset=utf-8", webpage.PAGE.encode()
            if path == "/metrics":
                body, kind = metrics.render(self.registry)
                return 200, kind, body
            if path == "/api/status":
                return _json(self.app.status().to_json())
            if path == "/api/throughput":
                return _json(webdata.throughput(self.app))
            if path == "/api/problems":
                return _json(webdata.problems(self.app))
        return _json({"error": f"no page {path}"}, 404)

    def post(self, path: str, query: dict[str, list[str]], by: str) -> tuple[int, str, bytes]:
        from lrq import cleanup

        parts = [unquote(p) for p in path.strip("/").split("/")]
        with self.lock:
            if len(parts) == 4 and parts[:2] == ["api", "queues"] and parts[3] in ("pause",
                                                                                   "resume"):
                name = self._queue(parts[2])
                if parts[3] == "pause":  # each logs pause-requested / resume-requested
                    self.app.pause(name, by)
                else:
                    self.app.resume(name, by)
                return _json({"queue": name, "paused": parts[3] == "pause"})
            if len(parts) == 4 and parts[:2] == ["api", "batches"] and parts[3] == "requeue":
                return _json(self._requeue(parts[2], by))
            if parts == ["api", "requeue-failed"]:
                queue = query.get("queue", [None])[0]
                n = self.app.requeue_failed(self._queue(queue) if queue else None)
                log.info("requeue-failed batches=%d queue=%s by=%s", n, queue or "*", by)
                return _json({"requeued": n})
            if parts == ["api", "cleanup"]:
                reports = cleanup.run(self.app)
                return _json({"reports": [r.as_dict() for r in reports]})
        return _json({"error": f"no action {path}"}, 404)

    def _queue(self, name: str) -> str:
        if name not in self.app.cfg.queues:
            raise _NotFound(f"no queue named {name!r} (queues: {', '.join(self.app.cfg.queues)})")
        return name

    def _requeue(self, name: str, by: str) -> dict[str, Any]:
        if not BATCH_NAME.fullmatch(name):
            raise _NotFound(f"no batch named {name!r}")
        try:
            queue, result = self.app.requeue(name)  # logs requeued
        except NoSuchBatch:
            raise _NotFound(f"no batch named {name!r}") from None
        return {"queue": queue, "batch": name, "result": result}


class _NotFound(LrqError):
    """A queue or batch the URL names does not exist."""


def _json(value: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(value, default=str).encode()


def _handler(web: Web) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lrq"
        sys_version = ""
        timeout = 30  # seconds a client may take to send its request

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
            log.debug("http %s " + format, self.client_address[0], *args)

        def do_GET(self) -> None:  # noqa: N802 (stdlib name)
            url = urlsplit(self.path)
            self._answer(lambda: web.get(url.path, parse_qs(url.query)))

        def do_POST(self) -> None:  # noqa: N802 (stdlib name)
            from lrq import webingest

            queue = webingest.queue_of(urlsplit(self.path).path)
            if queue is not None:
                self._answer_ingest(queue)
                return
            length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY)
            if length > 0:
                self.rfile.read(length)
            if not self._authorized():
                return
            url = urlsplit(self.path)
            by = f"web:{self.client_address[0]}"
            self._answer(lambda: web.post(url.path, parse_qs(url.query), by))

        def _answer_ingest(self, queue: str) -> None:
            """``POST /api/queues/NAME/items`` (:mod:`lrq.webingest`): the token, the queue
            and the Content-Length are checked before the body is read; a refusal then
            closes the connection rather than read what it refuses."""
            from lrq.webingest import Answer

            if not self._authorized(close=True):
                return
            try:
                answer = self._ingest(queue)
            except Exception as e:  # noqa: BLE001 (answer 500, keep serving, log it)
                log.exception("http-error path=%s", self.path)
                answer = Answer(500, {"error": f"{type(e).__name__}: {e}"}, close=True)
            if answer.close:
                self.close_connection = True
            try:
                self._send(*_json(answer.body, answer.status), extra=dict(answer.headers))
            except (BrokenPipeError, ConnectionResetError):  # the client left: nothing to tell
                self.close_connection = True
                log.debug("http-client-gone path=%s status=%d", self.path, answer.status)

        def _ingest(self, queue: str) -> Any:
            from lrq.webingest import Answer

            front = web.ingest.front(queue)
            if isinstance(front, Answer):
                return front
            text = self.headers.get("Content-Length")
            if text is None:
                return Answer(411, {"error": "send a Content-Length (chunked bodies are not "
                                    "read)"}, close=True)
            if not text.strip().isdigit():
                return Answer(400, {"error": f"Content-Length {text!r} is not a number"},
                              close=True)
            length = int(text)
            refused = front.too_large(length)
            if refused is not None:
                return refused
            with web.ingest.slot() as busy:
                if busy is not None:
                    return busy
                try:
                    body = self.rfile.read(length)
                except OSError as e:  # a client that stalls past the timeout
                    return Answer(400, {"error": f"reading the body failed: {e}"}, close=True)
                if len(body) < length:
                    return Answer(400, {"error": f"the body ended after {len(body)} of "
                                        f"{length} bytes (Content-Length)"}, close=True)
                return front.post(body)

        def _answer(self, route: Callable[[], tuple[int, str, bytes]]) -> None:
            try:
                status, kind, body = route()
            except _NotFound as e:
                status, kind, body = _json({"error": str(e)}, 404)
            except LrqError as e:
                status, kind, body = _json({"error": str(e)}, 409)
            except Exception as e:  # noqa: BLE001 (answer 500, keep serving, log it)
                log.exception("http-error path=%s", self.path)
                status, kind, body = _json({"error": f"{type(e).__name__}: {e}"}, 500)
            self._send(status, kind, body)

        def _authorized(self, close: bool = False) -> bool:
            """Does the request carry the token? Else answer 401 (none) or 403 (a wrong
            one), closing the connection when ``close`` (a body left unread)."""
            code = web.authorized(self.headers.get("Authorization"))
            if code == 200:
                return True
            if close:
                self.close_connection = True
            text = ("send Authorization: Bearer TOKEN (config http_token, env "
                    "LRQ_HTTP_TOKEN or data_dir/http.token)" if code == 401 else "wrong token")
            self._send(*_json({"error": text}, code),
                       extra={"WWW-Authenticate": "Bearer"} if code == 401 else {})
            return False

        def _send(self, status: int, kind: str, body: bytes,
                  extra: dict[str, str] | None = None) -> None:
            from lrq import webpage

            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Content-Security-Policy", webpage.csp())
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    return Handler


class Server:
    """A :class:`ThreadingHTTPServer` serving :class:`Web` from a daemon thread."""

    def __init__(self, cfg: Config, host: str, port: int) -> None:
        from lrq.app import App

        self.web = Web(App(cfg), load_token(cfg))
        self.httpd = ThreadingHTTPServer((host, port), _handler(self.web))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="lrq-web",
                                       daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{f'[{name}]' if ':' in name else name}:{port}/"

    def start(self) -> Server:
        self.thread.start()
        log.info("http-serving url=%s", self.url)
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
        self.web.ingest.close()


def serve(cfg: Config, address: str) -> Server:
    """Start serving the page on ``address`` (``HOST:PORT``) in a thread."""
    host, port = parse_address(address)
    try:
        return Server(cfg, host, port).start()
    except OSError as e:
        raise ConfigError(f"--http {address}: cannot listen on {host}:{port}: {e.strerror}; "
                          "choose another port") from e
