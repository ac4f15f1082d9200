"""``POST /api/queues/NAME/items`` on a real web server, data dir and SQLite ledger: 202 only
for items that reach the journal (then the sniffer and a worker store them, ``lrq verify``
agrees), 400 with the reason, 401/403, 404, 411, 413 without reading the body, and 503 with
Retry-After while the journal is full or the disk budget says no."""
from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lrqtest import lrq
from lrqtest import toml_value as tv

from lrq import config, journal, web
from lrq.sample import write_documents

TOKEN = "ingest-token"
HANDLER = '''
def handle(items):
    return [{"id": i["id"], "n": i.get("n")} for i in items]
'''


def make_config(folder: Path, source: dict[str, Any] | None = None,
                cleanup: dict[str, Any] | None = None) -> Path:
    """Two queues: ``events`` (ingest) and ``docs`` (a SQL table)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "store.py").write_text(HANDLER)
    write_documents(f"sqlite:///{folder / 'source.db'}", 10)
    lines = ['data_dir = "data"', 'db_url = "sqlite:///results.db"', f"http_token = {tv(TOKEN)}",
             "[queues.events]", 'handler = "store:handle"', 'key = "id"', "batch_size = 50",
             'result_table = "events"',
             "[queues.events.source]", 'kind = "ingest"',
             *(f"{k} = {tv(v)}" for k, v in (source or {}).items()),
             "[queues.docs]", 'handler = "workers.wordcount:handle"', 'key = "doc_id"',
             "[queues.docs.source]", 'url = "sqlite:///source.db"', 'table = "source_data"',
             'columns = { id = "id", doc_id = "mid", content = "content" }']
    if cleanup:
        lines += ["[cleanup]", *(f"{k} = {tv(v)}" for k, v in cleanup.items())]
    path = folder / "lrq.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[web.Server]:
    options = getattr(request, "param", {})
    cfg = make_config(tmp_path, options.get("source"), options.get("cleanup"))
    server = web.Server(config.load(cfg), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.close()


def send(server: web.Server, path: str, body: bytes | None, token: str | None = TOKEN,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A POST with exactly the headers given (``Content-Length`` from ``body`` unless set)."""
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
    try:
        conn.putrequest("POST", path)
        hs = {"Content-Length": str(len(body))} if body is not None else {}
        hs.update({"Authorization": f"Bearer {token}"} if token else {})
        hs.update(headers or {})
        for k, v in hs.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body is not None and "Content-Length" not in (headers or {}):
            conn.send(body)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read())
    finally:
        conn.close()


def items(n: int, start: int = 0) -> bytes:
    return json.dumps([{"id": f"e{i}", "n": i} for i in range(start, start + n)]).encode()


URL = "/api/queues/events/items"


def test_accepted_items_are_stored_exactly_once(served: web.Server, tmp_path: Path) -> None:
    for start in range(0, 300, 30):
        code, _, body = send(served, URL, items(30, start))
        assert (code, body) == (202, {"queue": "events", "accepted": 30})
    code, _, body = send(served, URL, items(5, 0))  # sent again: the sink keeps one row each
    assert code == 202
    assert send(served, URL, b"[]")[0:3:2] == (202, {"queue": "events", "accepted": 0})
    cfg = str(tmp_path / "lrq.toml")
    st = json.loads(lrq("-c", cfg, "status", "--json", "events", check=True).stdout)
    assert st["queues"]["events"]["source"]["lag"] == 305
    lrq("-c", cfg, "sniff", "events", check=True)
    lrq("-c", cfg, "work", "events", "--burst", check=True)
    v = lrq("-c", cfg, "verify", "events")
    assert v.returncode == 0, v.stdout + v.stderr
    assert "results 300, dead letters 0, missing 0, duplicated 0" in v.stdout
    st = json.loads(lrq("-c", cfg, "status", "--json", "events", check=True).stdout)
    assert st["queues"]["events"]["source"]["lag"] == 0
    assert st["queues"]["events"]["ledger_items"] == 305


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "not JSON"),
    (b'{"id": 1}', "must be a JSON list of items (objects), not dict"),
    (b'[{"id": 1}, 7]', "item 1 is a number, not an object"),
    (b'[{"id": 1}, {"n": 2}]', "item 1 has no 'id' field"),
    (b'[{"id": null}]', "item 0 has no 'id' field"),
    (b'[{"id": 1}, {"id": 2}, {"id": "1"}]', "item 2 repeats the 'id' of item 0"),
])
def test_malformed_input_is_400_with_the_reason_and_nothing_is_kept(
        served: web.Server, tmp_path: Path, body: bytes, reason: str) -> None:
    code, _, answer = send(served, URL, body)
    assert code == 400 and reason in answer["error"], answer
    assert not journal.segments(tmp_path / "data" / "events" / "ingest")


def test_token_queue_and_length_are_checked_before_the_body_is_read(
        served: web.Server, tmp_path: Path) -> None:
    code, headers, answer = send(served, URL, items(1), token=None)
    assert code == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert send(served, URL, items(1), token="wrong")[0] == 403
    code, _, answer = send(served, "/api/queues/docs/items", items(1))
    assert code == 404 and "not an ingest queue" in answer["error"]
    code, _, answer = send(served, "/api/queues/nope/items", items(1))
    assert code == 404 and "ingest queues: events" in answer["error"]
    assert send(served, URL, None)[0] == 411
    # A Content-Length over max_request_bytes (4 MB by default): 413 without sending (or
    # the server reading) a byte of it.
    code, _, answer = send(served, URL, b"", headers={"Content-Length": str(10**9)})
    assert code == 413 and "max_request_bytes 4000000" in answer["error"]
    assert not journal.segments(tmp_path / "data" / "events" / "ingest")


def test_a_body_shorter_than_its_content_length_is_refused(served: web.Server) -> None:
    host, port = served.httpd.server_address[:2]
    with socket.create_connection((str(host), int(port)), timeout=30) as s:
        s.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Length: 100\r\n\r\n[]".encode())
        s.shutdown(socket.SHUT_WR)
        answer = s.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.0 400") and b"ended after 2 of 100 bytes" in answer


@pytest.mark.parametrize("served", [{"source": {"max_request_bytes": 1000,
                                                "max_unread_bytes": 3000}}], indirect=True)
def test_a_full_journal_answers_503_with_retry_after_until_the_sniffer_reads_it(
        served: web.Server, tmp_path: Path) -> None:
    cfg = str(tmp_path / "lrq.toml")
    lrq("-c", cfg, "pause", "events", check=True)  # a paused queue accepts until the limit
    accepted = 0
    for start in range(0, 400, 10):
        code, headers, answer = send(served, URL, items(10, start))
        if code != 202:
            break
        accepted += 10
    assert code == 503 and headers["Retry-After"] == "1", answer
    assert "max_unread_bytes 3000" in answer["error"]
    assert 0 < accepted < 400
    assert send(served, URL, items(10, start))[0] == 503  # still full for its size
    lrq("-c", cfg, "resume", "events", check=True)
    lrq("-c", cfg, "sniff", "events", check=True)  # into batches: the journal has room again
    code, _, answer = send(served, URL, items(10, start))
    assert code == 202, answer
    lrq("-c", cfg, "sniff", "events", check=True)
    lrq("-c", cfg, "work", "events", "--burst", check=True)
    v = lrq("-c", cfg, "verify", "events")
    assert f"results {accepted + 10}, dead letters 0, missing 0, duplicated 0" in v.stdout, \
        v.stdout


@pytest.mark.parametrize("served", [{"cleanup": {"max_bytes": 1500}}], indirect=True)
def test_the_disk_budget_answers_503_with_retry_after(served: web.Server) -> None:
    assert send(served, URL, items(5))[0] == 202  # 2 x 160 bytes fit under 1500
    code, headers, answer = send(served, URL, items(40))  # 2 x 1200 bytes do not
    assert code == 503 and headers["Retry-After"] == "5"
    assert "no room on disk" in answer["error"] and "max_bytes 1500" in answer["error"]


def test_the_journal_s_folders_are_private(served: web.Server, tmp_path: Path) -> None:
    assert send(served, URL, items(1))[0] == 202
    data = tmp_path / "data"
    for p in (data, data / "events", data / "events" / "ingest"):
        assert p.stat().st_mode & 0o777 == 0o700, p
    for p in (data / "events" / "ingest").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p


def test_bodies_beyond_the_server_s_slots_answer_503(served: web.Server) -> None:
    from lrqtest import poll

    from lrq import webingest

    served.web.ingest = webingest.Ingest(served.web.app, max_bodies=1)
    host, port = served.httpd.server_address[:2]
    with socket.create_connection((str(host), int(port)), timeout=30) as slow:
        # A client that sends its headers and a byte of its body, then stalls: it holds the
        # one slot while the server reads.
        slow.sendall(f"POST {URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: 100\r\n\r\n[".encode())
        answer = poll(lambda: (r := send(served, URL, items(1)))[0] == 503 and r, 30)
        assert answer, "the stalled body never held the slot"
        assert answer[1]["Retry-After"] == "1" and "being handled" in answer[2]["error"]
    assert poll(lambda: send(served, URL, items(1, 5))[0] == 202, 30)  # the slot is free again
