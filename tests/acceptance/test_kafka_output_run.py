"""A fan-out queue with a table output and a ``kind = "kafka"`` output (lrq.outputs.kafka), run
by the real ``lrq`` command against Tansu: every item's message reaches the topic at least
once, the ledger and the table are exact, and a worker SIGKILLed between the produce and the
commit (failpoint ``during-txn``: every output written, the transaction not committed) leads
to the batch being produced again, never to a lost message."""
from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from lrqtest import load_app, lrq, write_config
from services.tansu import Tansu, fresh

DOCS = 500


def config(tmp_path: Path, tansu: Tansu, topic: str, **kafka: Any) -> Path:
    outputs = {
        "counts": {"handler": "workers.wordcount:handle", "result_table": "doc_results"},
        "to_kafka": {"kind": "kafka", "handler": "workers.wordcount:handle",
                     "bootstrap": tansu.brokers, "topic": topic, "timeout": "10s", **kafka},
    }
    return write_config(tmp_path, docs=DOCS, batch_size=100, handler=None, result_table=None,
                        outputs=outputs)


def status(cfg: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]
    return out


def source_keys(tmp_path: Path) -> set[str]:
    import sqlite3
    with sqlite3.connect(tmp_path / "source.db") as db:
        return {k for (k,) in db.execute("SELECT mid FROM source_data")}


def table_rows(tmp_path: Path) -> dict[str, dict[str, Any]]:
    import sqlite3
    with sqlite3.connect(tmp_path / "results.db") as db:
        return {k: json.loads(v) for k, v in db.execute(
            "SELECT key, value FROM doc_results WHERE queue = 'docs'")}


def messages(tansu: Tansu, topic: str, n: int) -> list[tuple[str, dict[str, Any]]]:
    return [(k.decode(), json.loads(v)) for _, k, v in tansu.read(topic, 2, n)]


def test_run_until_idle_sends_every_item_and_stores_the_table_exactly(tansu: Tansu,
                                                                       tmp_path: Path) -> None:
    topic = fresh("lines")
    tansu.create_topic(topic, 2)
    cfg = config(tmp_path, tansu, topic)
    r = lrq("-c", str(cfg), "run", "--until-idle", timeout=180)
    assert r.returncode == 0, r.stderr
    keys = source_keys(tmp_path)
    got = messages(tansu, topic, DOCS)
    assert Counter(k for k, _ in got) == Counter(keys)  # each once: nothing was retried
    rows = table_rows(tmp_path)
    assert set(rows) == keys
    for k, value in got:  # the message is the handler's result, as the table holds it
        assert value["doc_id"] == k
        assert {f: value[f] for f in ("words", "sha1")} == \
            {f: rows[k][f] for f in ("words", "sha1")}
    st = status(cfg)
    assert (st["ledger_batches"], st["ledger_items"]) == (DOCS // 100, DOCS)
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    app = load_app(cfg)
    (q,) = app.queues("docs")
    outs = {o.output: o for o in app.verify(q).outputs}
    assert (outs["counts"].missing, outs["counts"].results) == (0, DOCS)
    assert outs["to_kafka"].listed is False and outs["to_kafka"].dead == 0


def test_a_worker_killed_between_produce_and_commit_produces_the_batch_again(
        tansu: Tansu, tmp_path: Path) -> None:
    topic = fresh("lines")
    tansu.create_topic(topic, 2)
    cfg = config(tmp_path, tansu, topic)
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--once", env={"LRQ_FAILPOINT": "during-txn"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    first = messages(tansu, topic, 100)
    assert len(first) == 100  # produced and acknowledged by the broker...
    st = status(cfg)
    assert st["ledger_batches"] == 0 and table_rows(tmp_path) == {}  # ...never committed
    assert st["claimed"] == 1 and st["stale"] == 1
    assert "reclaim 1 stale claims" in lrq("-c", str(cfg), "cleanup", check=True).stdout
    lrq("-c", str(cfg), "work", "--burst", check=True)

    keys = source_keys(tmp_path)
    got = messages(tansu, topic, DOCS + 100)
    seen = Counter(k for k, _ in got)
    assert set(seen) == keys  # nothing lost
    again = {k for k, _ in first}
    assert {k for k, n in seen.items() if n == 2} == again  # the killed batch, produced twice
    assert all(n == 1 for k, n in seen.items() if k not in again)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for k, value in got:
        by_key.setdefault(k, []).append(value)
    assert all(len({json.dumps(v, sort_keys=True) for v in vs}) == 1 for vs in by_key.values())
    st = status(cfg)
    assert (st["ledger_batches"], st["ledger_items"]) == (DOCS // 100, DOCS)  # exact
    assert set(table_rows(tmp_path)) == keys
    assert lrq("-c", str(cfg), "verify").returncode == 0


def test_an_oversize_result_is_a_dead_letter_of_the_kafka_output_only(
        tansu: Tansu, tmp_path: Path) -> None:
    """max_message_bytes below every message: each is a dead letter keyed to_kafka/<key>,
    the table output stores every row, and every batch is done."""
    topic = fresh("lines")
    tansu.create_topic(topic, 2)
    cfg = config(tmp_path, tansu, topic, max_message_bytes=10)
    lrq("-c", str(cfg), "sniff", check=True)
    lrq("-c", str(cfg), "work", "--burst", check=True)
    keys = source_keys(tmp_path)
    assert set(table_rows(tmp_path)) == keys
    import sqlite3
    with sqlite3.connect(tmp_path / "results.db") as db:
        dead = dict(db.execute("SELECT key, error FROM lrq_dead_letters WHERE queue = 'docs'"))
    assert set(dead) == {f"to_kafka/{k}" for k in keys}
    assert all(e.startswith("the kafka output cannot send the result: the message of ")
               and "over max_message_bytes 10" in e for e in dead.values())
    st = status(cfg)
    assert (st["ledger_batches"], st["pending"], st["failed"]) == (DOCS // 100, 0, 0)


def test_an_unreachable_broker_commits_nothing_and_releases_the_batch(tmp_path: Path) -> None:
    """The kafka output's brokers refuse connections: the batch's transaction rolls back
    (the table output's rows too), the batch is released without counting an attempt, and
    the error is one line naming the output, topic and brokers."""
    import servers
    brokers = f"127.0.0.1:{servers.free_port()}"
    outputs = {
        "counts": {"handler": "workers.wordcount:handle", "result_table": "doc_results"},
        "to_kafka": {"kind": "kafka", "handler": "workers.wordcount:handle",
                     "bootstrap": brokers, "topic": "lines", "timeout": "5s"},
    }
    cfg = write_config(tmp_path, docs=200, batch_size=100, handler=None, result_table=None,
                       outputs=outputs)
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--once")
    assert r.returncode != 0
    assert f"kafka output docs.to_kafka (topic 'lines', bootstrap {brokers}): cannot reach " \
        "the brokers" in r.stderr
    st = status(cfg)
    assert (st["ledger_batches"], st["pending"], st["claimed"], st["failed"]) == (0, 2, 0, 0)
    assert table_rows(tmp_path) == {}
    (attempts,) = (tmp_path / "data/docs/right").glob("*.attempt")
    record = json.loads(attempts.read_text())
    assert record["attempts"] == 0  # released uncounted: infrastructure, not the items
    assert record["history"][0]["reason"].startswith("ProduceFailed: kafka output docs.to_kafka")


SLOW = '''
import time
def handle(items):
    time.sleep(0.02)  # a slow model call: the run lasts long enough to be killed in it
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''


def ledger_rows(tmp_path: Path) -> int:
    import sqlite3
    try:
        with sqlite3.connect(tmp_path / "results.db", timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM lrq_batches").fetchone()[0])
    except sqlite3.OperationalError:  # not made yet
        return 0


@pytest.mark.slow
def test_a_scheduler_killed_mid_run_loses_no_message(tansu: Tansu, tmp_path: Path) -> None:
    """``lrq run`` SIGKILLed with its worker processes mid-run (kill_tree: a lost machine,
    disk kept), then ``lrq run --until-idle``: every item's message is in the topic at least
    once, the ledger and the table are exact, and only keys of batches that were in flight
    (produced, not committed) arrive twice."""
    import subprocess
    import sys

    from lrqtest import kill_tree, killed_on_exit, poll
    (tmp_path / "slow.py").write_text(SLOW)
    docs, batch = 6000, 100
    topic = fresh("lines")
    tansu.create_topic(topic, 2)
    outputs = {
        "counts": {"handler": "slow:handle", "result_table": "doc_results"},
        "to_kafka": {"kind": "kafka", "handler": "slow:handle", "bootstrap": tansu.brokers,
                     "topic": topic, "timeout": "10s"},
    }
    cfg = write_config(tmp_path, docs=docs, batch_size=batch, handler=None, result_table=None,
                       outputs=outputs, workers=2)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "run"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    with killed_on_exit(proc):
        assert poll(lambda: ledger_rows(tmp_path) >= 5, 120), "no progress"
        kill_tree(proc.pid)
        proc.wait(timeout=30)
    before = ledger_rows(tmp_path)
    assert before < docs // batch, "the run ended before it was killed"
    r = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    keys = source_keys(tmp_path)
    seen = Counter(k for k, _ in messages(tansu, topic, docs))
    assert set(seen) == keys  # nothing lost
    twice = [k for k, n in seen.items() if n > 1]
    assert len(twice) <= 2 * batch * 2  # at most the batches in flight: 2 workers, 2 each
    assert ledger_rows(tmp_path) == docs // batch
    assert set(table_rows(tmp_path)) == keys
    assert lrq("-c", str(cfg), "verify").returncode == 0
    print(f"killed after {before} of {docs // batch} batches; {len(twice)} keys produced twice")
