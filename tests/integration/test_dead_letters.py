"""``lrq dead`` and ``lrq retry-dead`` on SQLite, PostgreSQL and MariaDB: dead letters are
listed, retried after the handler is fixed, and a retried item ends with exactly one row,
its result or its new dead letter (``verify`` exact)."""
from __future__ import annotations

import json
from pathlib import Path

from lrqtest import load_app, lrq, write_config

#: Fails on the items whose ids are in FAIL_IDS (env), with the message ERR.
FLAKY = """\
import os

def handle(items):
    bad = {int(x) for x in os.environ.get("FAIL_IDS", "").split(",") if x}
    if any(i["id"] in bad for i in items):
        raise RuntimeError(os.environ.get("ERR", "cannot map this doc"))
    return [{"doc_id": i["doc_id"]} for i in items]
"""


def _setup(tmp_path: Path, db_url: str) -> Path:
    (tmp_path / "flaky.py").write_text(FLAKY)
    cfg = write_config(tmp_path, docs=300, batch_size=100, chunk_size=10, handler="flaky:handle",
                       backoff=0, top={"db_url": db_url})
    lrq("-c", str(cfg), "sniff", check=True)
    lrq("-c", str(cfg), "work", "--burst", check=True, env={"FAIL_IDS": "7,150,151"})
    return cfg


def _verify(cfg: Path) -> str:
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout + v.stderr
    return v.stdout


def _dead(cfg: Path, *args: str) -> list[dict]:
    return json.loads(lrq("-c", str(cfg), "dead", "--json", *args, check=True).stdout)


def test_retried_dead_letters_are_stored_once_fixed(tmp_path: Path, db_url: str) -> None:
    cfg = _setup(tmp_path, db_url)
    listed = lrq("-c", str(cfg), "dead", check=True).stdout.splitlines()
    assert listed[0].split() == ["queue", "key", "batch", "created", "error"]
    assert sorted(line.split()[1] for line in listed[1:]) == ["m000000007", "m000000150",
                                                              "m000000151"]
    assert all(line.endswith("RuntimeError: cannot map this doc") for line in listed[1:])
    short = lrq("-c", str(cfg), "dead", "--limit", "1", check=True).stdout.splitlines()
    assert short[1] == listed[1] and len(short) == 3 and short[2].startswith("... and 2 more")
    assert lrq("-c", str(cfg), "dead", "--limit", "-1").returncode == 2
    full = _dead(cfg, "--key", "m000000150")
    assert len(full) == 1 and full[0]["item"]["id"] == 150
    assert "Traceback" in full[0]["error"] and full[0]["created_at"].startswith("20")

    r = lrq("-c", str(cfg), "retry-dead", "docs")
    assert r.returncode == 2 and "--all" in r.stderr
    r = lrq("-c", str(cfg), "retry-dead", "--all", check=True)
    assert "published 3 dead-lettered items as 1 retry batches" in r.stdout
    # Not stored yet: a second run (or a rerun after a crash) publishes nothing again.
    again = lrq("-c", str(cfg), "retry-dead", "--all", check=True)
    assert "published 0" in again.stdout and "3 keys skipped" in again.stdout
    assert len(_dead(cfg)) == 3  # still there until the retry is stored

    lrq("-c", str(cfg), "work", "--burst", check=True)  # the handler is fixed: no FAIL_IDS
    assert _dead(cfg) == []
    out = _verify(cfg)
    assert "results 300, dead letters 0, missing 0, duplicated 0" in out
    assert "no dead letters" in lrq("-c", str(cfg), "dead", check=True).stdout


def test_a_retry_failing_again_leaves_one_dead_letter_with_the_new_error(
        tmp_path: Path, db_url: str) -> None:
    cfg = _setup(tmp_path, db_url)
    r = lrq("-c", str(cfg), "retry-dead", "--key", "m000000150", "--key", "m000000007",
            "--key", "m000000999")
    assert r.returncode == 1 and "no dead letter with key 'm000000999'" in r.stderr
    assert "published 2 dead-lettered items" in r.stdout
    lrq("-c", str(cfg), "work", "--burst", check=True,
        env={"FAIL_IDS": "150", "ERR": "still broken"})
    dead = {d["key"]: d for d in _dead(cfg)}
    assert sorted(dead) == ["m000000150", "m000000151"]
    assert dead["m000000150"]["error"].startswith("RuntimeError: still broken")
    assert dead["m000000151"]["error"].startswith("RuntimeError: cannot map this doc")
    assert dead["m000000150"]["batch"] != dead["m000000151"]["batch"]  # the retry batch's
    assert "results 298, dead letters 2, missing 0, duplicated 0" in _verify(cfg)


def test_store_replace_dead_swaps_rows_in_one_transaction(tmp_path: Path, db_url: str) -> None:
    cfg = write_config(tmp_path, docs=None, top={"db_url": db_url})
    app = load_app(cfg)
    sink = app.sink(app.queues("docs")[0])
    a, b = {"doc_id": "a", "n": 1}, {"doc_id": "b", "n": 2}
    sink.store("batch-1", 2, [], dead=[(a, "first a"), (b, "first b")])
    # A plain store of the same keys leaves the dead letters (the common path is unchanged).
    sink.store("batch-2", 1, [{"doc_id": "a"}])
    assert {d.key for d in sink.dead_records()} == {"a", "b"}
    sink.store("batch-3", 2, [{"doc_id": "a"}], dead=[(b, "second b")], replace_dead=True)
    (only,) = sink.dead_records()
    assert (only.key, only.error, only.batch, only.item) == ("b", "second b", "batch-3", b)
    assert sink.dead_count() == 1 and sink.dead_count(keys=["a"]) == 0
    # A replay of the stored batch is recognised by the ledger and deletes nothing.
    assert not sink.store("batch-3", 2, [], replace_dead=True, dead=[]).recorded
    assert sink.dead_count() == 1


def test_retry_dead_splits_by_batch_size_and_skips_keys_waiting_even_in_failed(
        tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=None, batch_size=2)
    app = load_app(cfg)
    q = app.queues("docs")[0]
    sink, sp = app.sink(q), app.spool(q)
    sink.store("batch-1", 3, [], dead=[({"doc_id": k}, "boom") for k in "abc"])
    r = app.retry_dead(q)
    assert (r.items, len(r.batches), r.waiting, r.missing) == (3, 2, {}, [])
    assert [[i["doc_id"] for i in sp.load(n).items] for n in r.batches] == [["a", "b"], ["c"]]
    claim = sp.claim(r.batches[0])
    assert claim is not None
    sp.fail(claim, "the handler is still broken")  # e.g. a broken handler's batch
    again = app.retry_dead(q, keys={"a", "c", "zz"})
    assert (again.items, again.batches, again.missing) == (0, [], ["zz"])
    assert again.waiting == {"a": r.batches[0], "c": r.batches[1]}


def test_an_error_text_longer_than_a_text_column_is_clipped_not_the_batch_failed(
        tmp_path: Path, db_url: str) -> None:
    # e.g. an exception carrying a service's response body: 80 KB of UTF-8, more than
    # MariaDB's TEXT (65,535 bytes) takes, which refused the dead letter and so the batch.
    (tmp_path / "flaky.py").write_text(FLAKY)
    cfg = write_config(tmp_path, docs=300, batch_size=100, chunk_size=10, handler="flaky:handle",
                       backoff=0, top={"db_url": db_url})
    lrq("-c", str(cfg), "sniff", check=True)
    err = "body: " + "ü" * 40_000 + " end"
    lrq("-c", str(cfg), "work", "--burst", check=True, env={"FAIL_IDS": "7,150", "ERR": err})
    _verify(cfg)
    app = load_app(cfg)
    q = app.queues("docs")[0]
    assert app.spool(q).counts().failed == 0
    dead = app.sink(q).dead_records()
    assert len(dead) == 2 and all(len(d.error) <= 12_000 for d in dead)
    assert all("RuntimeError: body: üü" in d.error and "characters cut" in d.error
               for d in dead)
