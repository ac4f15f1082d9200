"""The web server's routes on a real data dir and SQLite ledger: metrics that parse, a JSON
API that answers like ``lrq status --json``, and control POSTs that need the token."""
from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lrqtest import load_app, lrq, write_config

from lrq import config, web

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

TOKEN = "s3cret-token"
DOCS = 500  # 5 batches of 100: the first fails, one item of another is dead-lettered
#: A handler that fails every item of the first batch alike (the batch fails: a broken
#: handler) while ``broken`` exists beside the config, and one item of another batch with
#: an error holding markup.
HANDLER = '''
from pathlib import Path

def handle(items):
    out = []
    for i in items:
        n = int(i["doc_id"][1:])
        if n <= 100 and (Path(__file__).parent / "broken").exists():
            raise RuntimeError("broken <b>bold</b> <script>window.pwned = 1</script>")
        if n == 150:
            raise ValueError("<script>window.pwned = 2</script> item " + i["doc_id"])
        out.append({"doc_id": i["doc_id"], "n": n})
    return out
'''


def make_config(folder: Path, **top: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flaky.py").write_text(HANDLER)
    (folder / "broken").touch()
    return write_config(folder, docs=DOCS, handler="flaky:handle", retries=0, backoff=0.01,
                        max_attempts=1, chunk_size=100, top=top or None)


@pytest.fixture(scope="module")
def worked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir after a sniff and a burst: 3 batches done, 1 failed, 1 item dead."""
    folder = tmp_path_factory.mktemp("web")
    cfg = make_config(folder, http_token=TOKEN)
    lrq("-c", str(cfg), "sniff", check=True)
    lrq("-c", str(cfg), "work", "--burst")  # ends on the broken batch or drains: run twice
    lrq("-c", str(cfg), "work", "--burst")
    return cfg


@pytest.fixture
def served(worked: Path) -> Iterator[web.Server]:
    server = web.Server(config.load(worked), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.close()


def request(server: web.Server, path: str, method: str = "GET",
            token: str | None = None, scheme: str = "Bearer") -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    req = urllib.request.Request(server.url.rstrip("/") + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metrics(server: web.Server) -> dict[str, Any]:
    """Samples by (name, labels without queue): value, for queue docs."""
    status, headers, body = request(server, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "queue"}
            assert s.labels.get("queue", "docs") == "docs"
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def test_metrics_parse_and_match_disk_and_ledger(served: web.Server, worked: Path) -> None:
    m = metrics(served)
    st = load_app(worked).status().to_json()["queues"]["docs"]
    assert (st["done"], st["failed"], st["dead_letters"]) == (4, 1, 1)
    for state in ("pending", "claimed", "done", "failed", "quarantined"):
        assert m[("lrq_batches", (("state", state),))] == st[state]
    assert m[("lrq_failed_batches", ())] == 1
    assert m[("lrq_ledger_batches_total", ())] == 4
    assert m[("lrq_ledger_items_total", ())] == 400
    assert m[("lrq_results_stored_total", ())] == 399
    assert m[("lrq_dead_letters", ())] == 1
    assert m[("lrq_handler_seconds_count", ())] == 4  # every batch was timed
    assert m[("lrq_handler_seconds_bucket", (("le", "+Inf"),))] == 4
    assert 0 < m[("lrq_handler_seconds_sum", ())] < 60
    assert m[("lrq_disk_bytes", (("state", "done"),))] == st["done_bytes"]
    assert m[("lrq_disk_bytes", (("state", "failed"),))] == st["failed_bytes"] > 0
    assert m[("lrq_oldest_claim_age_seconds", ())] == 0
    assert m[("lrq_database_up", ())] == 1
    assert m[("lrq_disk_free_bytes", ())] > 0 and m[("lrq_disk_free_inodes", ())] > 0
    assert m[("lrq_disk_budget_bytes", ())] == load_app(worked).cfg.cleanup.max_bytes


def test_status_api_is_the_status_json(served: web.Server, worked: Path) -> None:
    status, _, body = request(served, "/api/status")
    api = json.loads(body)
    cli = json.loads(lrq("-c", str(worked), "status", "--json").stdout)
    assert status == 200
    assert set(cli) <= set(api) and set(cli["queues"]["docs"]) <= set(api["queues"]["docs"])
    assert api["queues"]["docs"]["done"] == cli["queues"]["docs"]["done"] == 4


def test_throughput_counts_the_last_hours_commits(served: web.Server) -> None:
    _, _, body = request(served, "/api/throughput")
    data = json.loads(body)
    assert len(data["minutes"]) == 60
    assert sum(data["queues"]["docs"]["batches"]) == 4
    assert sum(data["queues"]["docs"]["items"]) == 400


def test_problems_list_the_failed_batch_and_the_dead_letter(served: web.Server) -> None:
    _, _, body = request(served, "/api/problems")
    p = json.loads(body)["docs"]
    assert len(p["failed"]) == 1 and "<script>window.pwned = 1" in p["failed"][0]["error"]
    assert [d["key"] for d in p["dead_letters"]] == ["m000000150"]
    assert "<script>window.pwned = 2" in p["dead_letters"][0]["error"]


def test_page_allows_only_its_own_script(served: web.Server) -> None:
    status, headers, body = request(served, "/")
    from lrq import webpage

    assert status == 200 and b"<script>" in body and b"innerHTML" not in body
    assert headers["Content-Security-Policy"] == webpage.csp()
    assert "default-src 'none'" in webpage.csp() and "'unsafe-inline'" not in \
        webpage.csp().split("script-src")[1].split(";")[0]
    assert headers["X-Frame-Options"] == "DENY"
    assert "Access-Control-Allow-Origin" not in headers


ACTIONS = ["/api/queues/docs/pause", "/api/queues/docs/resume",
           "/api/batches/{failed}/requeue", "/api/requeue-failed?queue=docs", "/api/cleanup"]


@pytest.mark.parametrize("path", ACTIONS)
def test_every_action_refuses_a_missing_or_wrong_token(served: web.Server, worked: Path,
                                                      path: str) -> None:
    app = load_app(worked)
    sp = app.spool(app.queues()[0])
    failed = sorted(p.stem for p in sp.failed.glob("*.pkl"))
    path = path.format(failed=failed[0])
    for token, scheme, code in ((None, "Bearer", 401), ("", "Bearer", 401),
                                (TOKEN, "Basic", 401), ("wrong", "Bearer", 403),
                                (TOKEN + "x", "Bearer", 403), (TOKEN[:-1], "Bearer", 403)):
        status, headers, body = request(served, path, "POST", token, scheme)
        assert status == code, (token, scheme, body)
        assert "error" in json.loads(body)
        if code == 401:
            assert headers["WWW-Authenticate"] == "Bearer"
    assert sorted(p.stem for p in sp.failed.glob("*.pkl")) == failed  # nothing was done
    _, _, body = request(served, "/api/status")
    assert not json.loads(body)["queues"]["docs"]["paused"]
    assert request(served, "/api/status", "POST")[0] == 401  # a POST is a POST, on any path


def test_actions_work_with_the_token(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, http_token=TOKEN)
    lrq("-c", str(cfg), "sniff", check=True)
    # A burst stops at the broken batch (handler-broken), which a random pick may take
    # first: the second drains the rest (flaky with one: no done batch below, 1 run in ~10).
    lrq("-c", str(cfg), "work", "--burst")
    lrq("-c", str(cfg), "work", "--burst")
    server = web.Server(config.load(cfg), "127.0.0.1", 0).start()
    try:
        def state() -> dict[str, Any]:
            return json.loads(request(server, "/api/status")[2])["queues"]["docs"]

        assert request(server, "/api/queues/docs/pause", "POST", TOKEN)[0] == 200
        assert state()["paused"]
        assert request(server, "/api/queues/docs/resume", "POST", TOKEN)[0] == 200
        assert not state()["paused"]
        assert request(server, "/api/queues/nope/pause", "POST", TOKEN)[0] == 404
        assert request(server, "/api/batches/..%2Fx/requeue", "POST", TOKEN)[0] == 404
        assert request(server, "/api/batches/nope/requeue", "POST", TOKEN)[0] == 404

        failed = json.loads(request(server, "/api/problems")[2])["docs"]["failed"][0]["name"]
        status, _, body = request(server, f"/api/batches/{failed}/requeue", "POST", TOKEN)
        assert status == 200 and json.loads(body)["result"] == "requeued from failed/"
        assert state()["failed"] == 0 and state()["pending"] >= 1
        # Fail it again, then requeue every failed batch of the queue.
        lrq("-c", str(cfg), "work", "--burst")
        assert state()["failed"] == 1
        status, _, body = request(server, "/api/requeue-failed?queue=docs", "POST", TOKEN)
        assert status == 200 and json.loads(body)["requeued"] == 1
        # A done batch cannot be requeued: a conflict, said in one line.
        done = next(iter(sorted((tmp_path / "data" / "docs" / "done").glob("*.pkl")))).stem
        status, _, body = request(server, f"/api/batches/{done}/requeue", "POST", TOKEN)
        assert status == 409 and "only failed or claimed" in json.loads(body)["error"]
        status, _, body = request(server, "/api/cleanup", "POST", TOKEN)
        assert status == 200 and [r["queue"] for r in json.loads(body)["reports"]] == ["docs"]
    finally:
        server.close()


def test_token_from_config_env_or_a_generated_file(tmp_path: Path) -> None:
    cfg = config.load(make_config(tmp_path))
    app = load_app(cfg.path)
    used = app.budget().used()
    assert web.load_token(cfg, env={"LRQ_HTTP_TOKEN": "from-env"}) == "from-env"
    token = web.load_token(cfg, env={})
    path = cfg.data_dir / web.TOKEN_FILE
    assert len(token) >= 32 and path.read_text() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert web.load_token(cfg, env={}) == token  # kept, not made again
    assert [p.name for p in cfg.data_dir.iterdir() if p.name.startswith(".")] == []
    # Not lrq's queue data: not a foreign entry, not counted against the budget.
    assert app.budget().used() == used
    assert app.status().to_json()["queues"]["docs"]["foreign"]["count"] == 0
    cfg2 = config.load(make_config(tmp_path / "c", http_token="from-config"))
    assert web.load_token(cfg2, env={"LRQ_HTTP_TOKEN": "from-env"}) == "from-config"


@pytest.mark.parametrize("text, expected", [("127.0.0.1:8321", ("127.0.0.1", 8321)),
                                            (":9000", ("127.0.0.1", 9000)),
                                            ("9000", ("127.0.0.1", 9000)),
                                            ("0.0.0.0:80", ("0.0.0.0", 80)),
                                            ("[::1]:8080", ("::1", 8080))])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert web.parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:", "host:port", "1:99999", ""])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(config.ConfigError, match="HOST:PORT"):
        web.parse_address(text)


def test_ledger_sums_kept_between_scrapes_match_a_full_count(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows finished over an hour ago are summed once and kept; rows added later, old or
    new, and a mark moved on, still give the totals a full count gives."""
    from datetime import datetime, timedelta

    from sqlalchemy import func, insert, select

    from lrq import metrics

    app = load_app(make_config(tmp_path))
    q = app.queues()[0]
    sink = app.sink(q)
    now = datetime.utcnow()  # SQLite's CURRENT_TIMESTAMP is UTC  # noqa: DTZ003

    def add(prefix: str, hours: list[float]) -> None:
        with sink.engine.begin() as conn:
            conn.execute(insert(sink.ledger), [
                {"queue": "docs", "name": f"{prefix}{i}", "items": 3, "results": 2, "dead": 1,
                 "attempt": 1, "seconds": 0.2 * i or None,
                 "finished_at": now - timedelta(hours=h)} for i, h in enumerate(hours)])

    def full() -> tuple[int, int, int, int]:
        led = sink.ledger
        with sink.engine.connect() as conn:
            n, items, results, timed = conn.execute(select(
                func.count(), func.sum(led.c["items"]), func.sum(led.c.results),
                func.count(led.c.seconds))).one()
        return n, items, results, timed

    collector = metrics.Collector(app)
    add("a", [5, 3, 2.5, 0.5, 0])
    rows, _ = collector._query(["docs"])
    assert tuple(rows["docs"][:3]) + (rows["docs"][3],) == full()
    add("b", [0.2, 0.1, 0])  # new rows: in the recent part
    rows, _ = collector._query(["docs"])
    assert tuple(rows["docs"][:3]) + (rows["docs"][3],) == full()
    first_mark = collector._mark
    # As if time passed: the mark moves on (rows 30 and 12 minutes old become settled).
    monkeypatch.setattr(metrics, "SETTLED", timedelta(minutes=10))
    add("c", [0])
    rows, _ = collector._query(["docs"])
    assert first_mark is not None and collector._mark is not None
    assert collector._mark - first_mark > timedelta(minutes=45)
    rows, _ = collector._query(["docs"])
    assert tuple(rows["docs"][:3]) + (rows["docs"][3],) == full() == (9, 27, 18, 6)
    # The histogram's cumulative buckets count every timed row at its bound and above.
    assert rows["docs"][5 + metrics.BUCKETS.index(0.25)] == 2  # 0.2 twice
    assert rows["docs"][5 + len(metrics.BUCKETS) - 1] == 6
