"""A loopback "Kafka agent" for the ``http-agent`` source: the original system's
``POST /consume_msg/`` (DESIGN.md §6), served from a list on 127.0.0.1 at a free port.

Like the real agent it commits when it answers: a message served with ``is_commit`` true is
never served again, whether or not the answer reached the caller. It can be told to fail:
``fail = "500"`` (an HTTP 500), ``"garbage"`` (200 with a body that is not JSON),
``"object"`` (a JSON object, not a list), ``"nohttp"`` (not HTTP at all), ``"slow"``
(answers only after ``slow_seconds``, or when stopped), ``"hangup"`` (commits, then closes
the connection without answering: the at-most-once loss), ``"reset"`` (closes the
connection before reading, committing nothing).
``fail_times`` limits a failure to the next N calls (None: every call).

The fixture ``http_agent`` starts one per test and stops it after (threads joined, socket
closed); no binary is needed, so it never skips.
"""
from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

HOST = "127.0.0.1"
#: The longest a "slow" answer is held back; stop() releases it at once.
SLOW_MAX = 30.0


class LoopbackAgent:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        #: How many messages have been committed (served with is_commit): the group's offset.
        self.committed = 0
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.fail: str | None = None
        self.fail_times: int | None = None
        self.slow_seconds = SLOW_MAX
        self._lock = threading.Lock()
        self._release = threading.Event()
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                agent._serve(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet: pytest shows failures, not every request

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-agent", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def add(self, messages: list[Any]) -> None:
        with self._lock:
            self.messages.extend(messages)

    def unserved(self) -> int:
        with self._lock:
            return len(self.messages) - self.committed

    def start(self) -> LoopbackAgent:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def _failure(self) -> str | None:
        with self._lock:
            if self.fail is None:
                return None
            mode = self.fail
            if self.fail_times is not None:
                self.fail_times -= 1
                if self.fail_times <= 0:
                    self.fail, self.fail_times = None, None
            return mode

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        mode = self._failure()
        if mode == "reset":
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))))
        with self._lock:
            self.requests.append(body)
            self.auth.append(h.headers.get("Authorization"))
        if h.path != "/consume_msg/":
            return self._answer(h, 404, b'{"detail": "Not Found"}')
        if mode == "500":
            return self._answer(h, 500, b"Internal Server Error: consumer crashed")
        if mode == "garbage":
            return self._answer(h, 200, b"<html><body>502 Bad Gateway</body></html>" + b"x" * 1000)
        if mode == "object":
            return self._answer(h, 200, b'{"error": "no such topic"}')
        if mode == "nohttp":  # not even an HTTP status line
            h.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            h.close_connection = True
            return None
        if mode == "slow":
            self._release.wait(self.slow_seconds)
        with self._lock:
            start = self.committed
            served = self.messages[start:start + int(body["msg_num"])]
            if body.get("is_commit"):
                self.committed += len(served)
        if mode == "hangup":
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return None
        return self._answer(h, 200, json.dumps(served).encode())

    @staticmethod
    def _answer(h: BaseHTTPRequestHandler, code: int, data: bytes) -> None:
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller gave up (a timeout): nothing to tell it


@pytest.fixture
def http_agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackAgent]:
    """A :class:`LoopbackAgent` on 127.0.0.1, stopped after the test."""
    monkeypatch.setenv("no_proxy", HOST)  # a proxy from the environment must not be asked
    agent = LoopbackAgent().start()
    try:
        yield agent
    finally:
        agent.stop()
