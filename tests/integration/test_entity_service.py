"""workers.entity_service against real HTTP servers on 127.0.0.1: the local service, and tiny
misbehaving ones (503s, a hang, wrong answers) written here."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import urllib3
from urllib3.exceptions import MaxRetryError, NewConnectionError, ReadTimeoutError, ResponseError

from lrq.config import QueueConfig, SourceConfig, load_handler
from lrq.errors import HandlerError, Retryable
from lrq.sample import documents
from lrq.sources import sql
from workers import entities
from workers.entity_service import EntityServer, EntityService, make_server

ROOT = Path(__file__).resolve().parents[2]

Serve = Callable[[HTTPServer], str]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start servers in threads; return their base URL; shut them all down at teardown."""
    running: list[tuple[HTTPServer, threading.Thread]] = []

    def start(server: HTTPServer) -> str:
        # a short poll interval only makes shutdown() at teardown return sooner
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                             daemon=True)
        t.start()
        running.append((server, t))
        host, port = server.server_address[:2]
        return f"http://{host}:{port}"

    yield start
    for server, t in running:
        release = getattr(server, "release", None)
        if release is not None:
            release.set()
        server.shutdown()
        server.server_close()
        t.join(timeout=5)


@pytest.fixture
def service(serve: Serve) -> str:
    return serve(make_server("127.0.0.1", 0))


@pytest.fixture
def items() -> list[dict[str, Any]]:
    return [{"id": d["id"], "doc_id": d["mid"], "content": d["content"]}
            for d in documents(40, seed=3)]


def client(url: str, **kw: Any) -> EntityService:
    """A client that does not wait between retries, so tests stay fast."""
    kw.setdefault("backoff", 0.0)
    return EntityService(url, **kw)


class TestServer(ThreadingHTTPServer):
    """A scripted server: ``answer(handler, data_list)`` decides each response."""

    __test__ = False
    daemon_threads = True

    def __init__(self, answer: Callable[[ScriptedHandler, list[dict[str, Any]]], None]) -> None:
        self.answer = answer
        self.hits = 0
        #: (request target, headers) of every POST, in arrival order
        self.seen: list[tuple[str, Message]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), ScriptedHandler)


class ScriptedHandler(BaseHTTPRequestHandler):
    server: TestServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.hits += 1
            self.server.seen.append((self.path, self.headers))
        self.server.answer(self, body["data_list"])

    def send(self, status: int, payload: bytes | Any = b"") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


# -- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [True, False], ids=["batch", "one-by-one"])
def test_round_trip_equals_local_handler(service: str, items: list[dict[str, Any]],
                                         batch: bool) -> None:
    svc = client(service, batch=batch)
    posted: list[Any] = []
    urlopen = svc.pool.urlopen

    def spy(method: str, url: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        assert (method, url) == ("POST", f"{service}/ent_mapping/")
        assert kwargs["headers"]["Content-Type"] == "application/json"
        assert kwargs["timeout"] is svc.timeout and kwargs["retries"] is svc.retry
        posted.append(orjson.loads(kwargs["body"]))
        return urlopen(method, url, **kwargs)

    svc.pool.urlopen = spy  # type: ignore[method-assign]
    try:
        assert svc(items) == entities.handle(items)
    finally:
        svc.close()
    if batch:
        assert posted == [{"data_list": items}]
    else:
        assert posted == [{"data_list": [it]} for it in items]


def test_empty_chunk_makes_no_request() -> None:
    # nothing listens on this URL: a request would fail
    assert client("http://127.0.0.1:9")([]) == []


def test_rows_keep_the_items_doc_id_type_and_order(serve: Serve) -> None:
    def reversed_and_stringly(h: ScriptedHandler, data_list: list[dict[str, Any]]) -> None:
        h.send(200, [{**m, "doc_id": str(m["doc_id"])} for m in entities.map_entities(data_list)[::-1]])

    url = serve(TestServer(reversed_and_stringly))
    items = [{"doc_id": 7, "content": "NYC"}, {"doc_id": 8, "content": "Peking"}]
    assert client(url)(items) == entities.handle(items)


def test_built_from_queue_config_handler_options(service: str,
                                                  items: list[dict[str, Any]]) -> None:
    q = QueueConfig(name="docs", handler="workers.entity_service:EntityService",
                    source=SourceConfig("sql", sql.Settings(url="sqlite://", table="t")), key="doc_id",
                    handler_options={"url": service, "batch": True})
    handler = load_handler(q)
    assert isinstance(handler, EntityService)
    assert handler(items[:3]) == entities.handle(items[:3])


# -- the local service -------------------------------------------------------------------

def test_service_rejects_malformed_bodies_and_unknown_paths(service: str) -> None:
    for body in (b"not json", b'{"no": "data_list"}', b'{"data_list": [{"content": "x"}]}'):
        r = requests.post(f"{service}/ent_mapping/", data=body, timeout=5)
        assert r.status_code == 400
        assert "malformed body" in r.json()["error"]
    r = requests.post(f"{service}/elsewhere/", json={"data_list": []}, timeout=5)
    assert r.status_code == 404
    assert requests.get(f"{service}/ent_mapping/", timeout=5).status_code == 404


def test_make_server_port_zero_picks_a_port() -> None:
    server = make_server(delay_ms=1.0, per_item_ms=0.5)
    try:
        assert isinstance(server, EntityServer)
        assert server.server_address[1] != 0
        assert server.url == f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.server_close()


@pytest.mark.parametrize("n", [1, 20])
def test_a_call_takes_at_least_the_configured_latency(serve: Serve, items: list[dict[str, Any]],
                                                      n: int) -> None:
    # The service does its own work within the latency and sleeps only the rest; however
    # that goes, the answer must not come before delay + per_item * n after the request.
    # (A lower bound only: an upper one would flake on a busy machine.)
    url = serve(make_server("127.0.0.1", 0, delay_ms=30.0, per_item_ms=2.0))
    svc = client(url)
    try:
        svc(items[:1])  # the connection is made: the timed calls reuse it
        for _ in range(3):
            start = time.monotonic()
            assert svc(items[:n]) == entities.handle(items[:n])
            assert time.monotonic() - start >= (30.0 + 2.0 * n) / 1000
    finally:
        svc.close()


def test_proxy_environment_is_read_when_the_client_is_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    proxied = EntityService("http://10.1.2.3:8765")
    assert proxied.proxy == "http://proxy.invalid:3128"
    assert isinstance(proxied.pool, urllib3.ProxyManager)
    assert EntityService("https://10.1.2.3:8765").proxy is None  # no HTTPS_PROXY
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    direct = EntityService("http://10.1.2.3:8765")
    assert direct.proxy is None
    assert not isinstance(direct.pool, urllib3.ProxyManager)
    assert proxied.proxy == "http://proxy.invalid:3128"  # decided once, when built


def test_requests_go_through_the_proxy(serve: Serve, items: list[dict[str, Any]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The "proxy" answers itself; nothing listens at the target (TEST-NET-1, RFC 5737), so
    # the call succeeds only through the proxy.
    proxy = TestServer(lambda h, data: h.send(200, entities.map_entities(data)))
    proxy_url = serve(proxy)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("http_proxy", proxy_url.replace("http://", "http://u%40x:pw@"))
    svc = client("http://192.0.2.1:8765", connect_timeout=1.0, retries=0)
    assert svc(items[:3]) == entities.handle(items[:3])
    [(target, headers)] = proxy.seen
    assert target == "http://192.0.2.1:8765/ent_mapping/"  # absolute form: a proxy request
    assert headers["Proxy-Authorization"] == urllib3.make_headers(
        proxy_basic_auth="u@x:pw")["proxy-authorization"]


def test_netrc_credentials_are_sent(serve: Serve, items: list[dict[str, Any]],
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = TestServer(lambda h, data: h.send(200, entities.map_entities(data)))
    url = serve(server)
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text("machine 127.0.0.1 login alice password s3cret\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    svc = client(url)
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))  # read once: already built
    assert svc(items[:2]) == entities.handle(items[:2])
    client(url)(items[:2])  # built without a ~/.netrc: no auth
    assert [h.get("Authorization") for _, h in server.seen] == [
        urllib3.make_headers(basic_auth="alice:s3cret")["authorization"], None]


def test_command_line_serves_until_sigterm(items: list[dict[str, Any]]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.entity_service", "--port", "0", "--delay-ms", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the server is listening
        url = line.split()[3].removesuffix("/ent_mapping/")
        assert url.startswith("http://127.0.0.1:")
        assert client(url)(items[:5]) == entities.handle(items[:5])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- failures ----------------------------------------------------------------------------

def test_retries_503_then_succeeds(serve: Serve, items: list[dict[str, Any]]) -> None:
    def flaky(h: ScriptedHandler, data_list: list[dict[str, Any]]) -> None:
        if h.server.hits <= 2:
            h.send(503)
        else:
            h.send(200, entities.map_entities(data_list))

    server = TestServer(flaky)
    url = serve(server)
    assert client(url, retries=3)(items) == entities.handle(items)
    assert server.hits == 3


def test_503_beyond_the_retries_is_retryable(serve: Serve, items: list[dict[str, Any]]) -> None:
    server = TestServer(lambda h, _: h.send(503))
    url = serve(server)
    with pytest.raises(Retryable) as e:
        client(url, retries=1)(items)
    assert server.hits == 2
    assert isinstance(e.value.__cause__, MaxRetryError)
    assert isinstance(e.value.__cause__.reason, ResponseError)
    assert f"entity service {url}/ent_mapping/: " in str(e.value)
    assert "503" in str(e.value) and "2 attempts" in str(e.value)


def test_other_http_errors_raise_handler_error(serve: Serve,
                                               items: list[dict[str, Any]]) -> None:
    server = TestServer(lambda h, _: h.send(400, {"error": "no such thing"}))
    url = serve(server)
    with pytest.raises(HandlerError) as e:
        client(url)(items)
    assert not isinstance(e.value, Retryable)
    msg = str(e.value)
    assert f"{url}/ent_mapping/" in msg and "answered 400" in msg and "no such thing" in msg
    assert server.hits == 1


@pytest.mark.parametrize("status", [404, 501])
def test_statuses_not_retried_raise_handler_error_at_once(serve: Serve,
                                                          items: list[dict[str, Any]],
                                                          status: int) -> None:
    server = TestServer(lambda h, _: h.send(status, b"x" * 200))
    url = serve(server)
    with pytest.raises(HandlerError, match=f"answered {status}: 'x{{80}}'$") as e:
        client(url, retries=3)(items)
    assert not isinstance(e.value, Retryable)
    assert server.hits == 1


@pytest.mark.parametrize("retries", [0, 1])
def test_no_answer_within_read_timeout_is_retryable(serve: Serve, items: list[dict[str, Any]],
                                                    retries: int) -> None:
    # The handler holds the request until teardown sets ``release``: it never answers in time.
    server = TestServer(lambda h, _: h.server.release.wait(timeout=30))
    url = serve(server)
    with pytest.raises(Retryable, match="read timeout") as e:
        client(url, read_timeout=0.3, retries=retries)(items[:2])
    assert server.hits == retries + 1
    cause = e.value.__cause__
    assert isinstance(cause, ReadTimeoutError) or (
        isinstance(cause, MaxRetryError) and isinstance(cause.reason, ReadTimeoutError))


def test_unreachable_service_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(Retryable, match="refused") as e:
            client(f"http://127.0.0.1:{port}", retries=1)([{"doc_id": "m1", "content": ""}])
    cause = e.value.__cause__
    assert isinstance(cause, MaxRetryError) and isinstance(cause.reason, NewConnectionError)
    assert isinstance(cause.reason.__cause__, ConnectionRefusedError)


def test_answer_missing_a_doc_id_raises_handler_error(serve: Serve,
                                                      items: list[dict[str, Any]]) -> None:
    url = serve(TestServer(lambda h, data: h.send(200, entities.map_entities(data)[:-1])))
    with pytest.raises(HandlerError) as e:
        client(url)(items)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{url}/ent_mapping/" in msg
    assert f"missing doc_id {items[-1]['doc_id']}" in msg
    assert f"{len(items) - 1} entries for {len(items)} docs" in msg


@pytest.mark.parametrize("answer, problem", [
    (lambda data: entities.map_entities(data) + entities.map_entities(data[:1]),
     "unexpected or repeated doc_id"),
    (lambda data: [{**m, "doc_id": "zzz"} if i == 0 else m
                   for i, m in enumerate(entities.map_entities(data))], "missing doc_id"),
    (lambda data: {"result": entities.map_entities(data)}, "not a list"),
    (lambda data: [{"doc_id": d["doc_id"], "ent_list": "Beijing"} for d in data], "malformed entry"),
    (lambda data: b"<html>oops</html>", "not JSON"),
], ids=["duplicate", "unknown", "object", "malformed", "html"])
def test_unusable_answers_raise_handler_error(serve: Serve, items: list[dict[str, Any]],
                                              answer: Callable[[list[Any]], Any],
                                              problem: str) -> None:
    url = serve(TestServer(lambda h, data: h.send(200, answer(data))))
    with pytest.raises(HandlerError, match=problem) as e:
        client(url)(items[:3])
    assert url in str(e.value) and "\n" not in str(e.value)


def test_item_without_doc_id_raises_handler_error_before_any_request() -> None:
    with pytest.raises(HandlerError, match="no 'doc_id'"):
        client("http://127.0.0.1:9")([{"id": 1, "content": "NYC"}])
