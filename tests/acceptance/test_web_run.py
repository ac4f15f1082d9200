"""Issue 14's acceptance test: ``lrq run --until-idle --http 127.0.0.1:PORT`` on 20k items,
seen and steered only through its HTTP server while it runs.

* ``GET /metrics`` is served mid-run, parses with ``prometheus_client.parser``, and the
  ledger's batch count in it moves between scrapes;
* a POST without the bearer token answers 401 and changes nothing (the queue stays
  unpaused, then stays paused);
* ``POST /api/queues/docs/pause`` with the token from ``data/http.token``: once the batches
  in hand finish (at most one more per worker racing the pause), the ledger does not grow
  and nothing is claimed or published for 5 s, the run has work left and ``GET
  /api/status`` shows the queue paused;
* ``POST /api/queues/docs/resume`` lets the run end by itself (exit 0), and ``lrq verify``
  finds every key exactly once.

The handler sleeps per batch so the run lasts well past the 5 s hold (about 200 batches at
0.2 s over 2 workers); the test asserts pending work remained while paused, so a run that
ended early fails instead of passing vacuously."""
from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from lrqtest import ROOT, killed_on_exit, load_app, lrq, poll, write_config

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.slow

DOCS = 20_000
WORKERS = 2
HOLD = 5.0  # seconds a pause must hold (the figure)
SLOW = '''
import time
def handle(items):
    time.sleep(0.2)  # per batch (chunk_size = batch_size): a slow model call
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''


# -- the run's log (--log-format json: one object a line) ---------------------------------
def events(log: Path, event: str, **fields: Any) -> list[dict[str, Any]]:
    lines = log.read_text(errors="replace").splitlines()
    if lines and not lines[-1].endswith("}"):
        lines = lines[:-1]  # a line being written right now
    return [r for r in map(json.loads, lines) if r["event"] == event
            and all(r["fields"].get(k) == v for k, v in fields.items())]


def served_url(log: Path) -> str | None:
    found = events(log, "http-serving")
    return str(found[0]["fields"]["url"]) if found else None


# -- HTTP ----------------------------------------------------------------------------------
def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return bytes(r.read())


def post(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
    """The status code and JSON body of a POST (``token`` None: no Authorization header)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ledger_batches(text: str) -> int:
    """``lrq_ledger_batches_total{queue="docs"}`` from a scrape's Prometheus text."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = [s for s in families["lrq_ledger_batches"].samples
                 if s.name == "lrq_ledger_batches_total" and s.labels == {"queue": "docs"}]
    return int(sample.value)


def paused(url: str) -> Any:
    return json.loads(get(url + "api/status"))["queues"]["docs"]["paused"]


# -- the state on disk and in the database, read beside the run ----------------------------
def ledger_count(folder: Path) -> int:
    """Rows in the results database's batch ledger (read-only, beside the writers)."""
    with contextlib.closing(sqlite3.connect(f"file:{folder / 'results.db'}?mode=ro", uri=True,
                                            timeout=30)) as c:
        try:
            return int(c.execute("SELECT count(*) FROM lrq_batches WHERE queue = 'docs'")
                       .fetchone()[0])
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return 0  # before the first commit
            raise


def spool(cfg: Path) -> Any:
    """The queue's spool, read beside the run (:meth:`lrq.spool.Spool.counts`)."""
    app = load_app(cfg)
    return app.spool(app.queues("docs")[0])


def test_run_with_http_serves_metrics_pauses_for_5s_and_resumes_to_exactly_once(
        tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    cfg = write_config(tmp_path, docs=DOCS, handler="slow:handle", batch_size=100,
                       chunk_size=100, workers=WORKERS, max_pending=10)
    log = tmp_path / "run.log"
    with log.open("w") as err, killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "--log-format", "json", "-c", str(cfg), "run",
             "--until-idle", "--http", "127.0.0.1:0"], cwd=ROOT, text=True,
            stdout=subprocess.DEVNULL, stderr=err)) as run:
        url = poll(lambda: served_url(log), 60)
        assert url and url.startswith("http://127.0.0.1:"), log.read_text()[-3000:]
        sp = spool(cfg)
        token = (tmp_path / "data" / "http.token").read_text().strip()
        pause, resume = url + "api/queues/docs/pause", url + "api/queues/docs/resume"

        # Metrics mid-run: they parse, and the ledger's batch count moves between scrapes.
        first = ledger_batches(get(url + "metrics").decode())
        assert poll(lambda: ledger_batches(get(url + "metrics").decode()) >= first + 2,
                    seconds=60), "the ledger's batch count in /metrics never moved"
        assert run.poll() is None

        # A POST without the token: 401, and the queue is not paused.
        code, body = post(pause, None)
        assert code == 401 and "Bearer" in body["error"]
        assert post(pause, "not-the-token")[0] == 403
        assert paused(url) is None
        assert not (tmp_path / "data" / "docs" / "paused.json").exists()
        assert ledger_count(tmp_path) >= 2  # still running: the pause lands mid-run

        # Pause through the API.
        code, body = post(pause, token)
        assert (code, body) == (200, {"queue": "docs", "paused": True})
        # Claims first, then the ledger: a batch claimed then is in hand, one that committed
        # meanwhile is counted twice (the bound only loosens), none falls between the reads.
        at_pause = sp.counts()
        in_hand = at_pause.claimed
        before = ledger_count(tmp_path)
        state = paused(url)
        assert state and state["by"] == "web:127.0.0.1" and state["since"]
        # The batches in hand finish: the scheduler saw the pause, no claim is left, and
        # every worker process started so far has ended (on its idle timeout).
        assert poll(lambda: events(log, "paused", queue="docs", reason="operator"), 30)
        assert poll(lambda: sp.counts().claimed == 0, 60), "the batches in hand never finished"
        assert poll(lambda: len(events(log, "finished", queue="docs"))
                    >= len(events(log, "working", queue="docs")), 60), \
            "worker processes of a paused queue should exit on their idle timeout"
        done = ledger_count(tmp_path)
        # At most the batches in hand, plus one per worker that looked at the pause just
        # before it was written and claimed after `in_hand` was read.
        assert done <= before + in_hand + WORKERS, (before, in_hand, done)
        left = sp.counts()
        print(f"paused at ledger {before} with {in_hand} in hand; settled at {done}, "
              f"{left.pending} pending")
        assert left.pending > 0 and done < DOCS // 100, \
            "the run had no work left when paused: make the handler slower"
        # The sniffer published nothing since (it may finish the one batch it was writing).
        assert left.pending + done <= at_pause.pending + in_hand + before + 1, \
            (at_pause.pending, in_hand, before, left.pending, done)

        # A resume without the token changes nothing: the hold below covers it.
        assert post(resume, None)[0] == 401

        # The hold: 5 s in which the ledger, the claims, the pending batches and the run stay
        # as they are.
        hold_until = time.monotonic() + HOLD
        samples = 0
        while time.monotonic() < hold_until:
            assert ledger_count(tmp_path) == done, "a paused queue committed a batch"
            now = sp.counts()
            assert now.claimed == 0, "a paused queue claimed a batch"
            assert now.pending == left.pending, "a paused queue's sniffer published a batch"
            assert run.poll() is None, "an until-idle run ended while its queue was paused"
            samples += 1
            time.sleep(0.2)  # the hold's sampling period, not synchronisation
        assert samples >= 5
        assert ledger_batches(get(url + "metrics").decode()) == done
        assert paused(url) is not None, "the queue should still be paused after the hold"
        assert events(log, "until-idle-waiting", queue="docs")

        # Resume: the run finishes by itself.
        code, body = post(resume, token)
        assert (code, body) == (200, {"queue": "docs", "paused": False})
        assert poll(lambda: ledger_count(tmp_path) > done, 60), "resume did not restart work"
        assert run.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert events(log, "resumed", queue="docs")
    assert len(events(log, "idle")) == 1

    # Exactly once: every key once in the results, the ledger holding every item once.
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout + v.stderr
    assert f"source {DOCS}, results {DOCS}, dead letters 0, missing 0, duplicated 0" in v.stdout
    with contextlib.closing(sqlite3.connect(tmp_path / "results.db")) as c:
        rows, keys = c.execute("SELECT count(*), count(DISTINCT key) FROM doc_results "
                               "WHERE queue = 'docs'").fetchone()
        items = c.execute("SELECT sum(items) FROM lrq_batches WHERE queue = 'docs'").fetchone()[0]
    assert rows == keys == DOCS
    assert items == DOCS, "the ledger's batches do not add up to the source's items"
