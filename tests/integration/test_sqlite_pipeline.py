"""A SQLite source into SQLite results through the real CLI: generic table and a user model."""
from __future__ import annotations

import json
from pathlib import Path

from lrqtest import lrq, write_config
from sqlalchemy import create_engine, text

MAPPER = '''
def handle(items):
    return [{"doc_id": i["doc_id"], "ent_list_str": ",".join(i["content"].split()[:2]),
             "mapped_list_str": str(len(i["content"]))} for i in items]
'''


def status(cfg: Path) -> dict:
    r = lrq("-c", str(cfg), "status", "--json", check=True)
    return json.loads(r.stdout)["queues"]["docs"]


def test_sql_source_into_the_generic_table(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=1234, batch_size=100, chunk_size=7)
    r = lrq("-c", str(cfg), "sniff", check=True)
    assert "published 13 batches" in r.stdout and "drained" in r.stdout
    assert status(cfg)["pending"] == 13
    first = sorted((tmp_path / "data" / "docs" / "left").iterdir())[0].stem
    r = lrq("-c", str(cfg), "work", "docs", "--batch", first, check=True)
    assert status(cfg)["done"] == 1
    r = lrq("-c", str(cfg), "work", "--burst", check=True)
    assert "finished queue=docs batches=12 items=1134" in r.stderr
    st = status(cfg)
    assert (st["pending"], st["claimed"], st["done"], st["failed"]) == (0, 0, 13, 0)
    assert st["ledger_items"] == 1234 and st["position"] == 1234
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert "source 1234, results 1234, dead letters 0, missing 0, duplicated 0" in v.stdout
    with create_engine(f"sqlite:///{tmp_path / 'results.db'}").connect() as c:
        key, value = c.execute(text("SELECT key, value FROM doc_results WHERE key = 'm000000001'")).one()
    value = json.loads(value)
    assert value["doc_id"] == key and value["words"] == 40 and len(value["sha1"]) == 40
    shown = json.loads(lrq("-c", str(cfg), "show", first, check=True).stdout)
    assert shown["state"] == "done" and shown["items"] == 100 and shown["recorded"] is True
    # Nothing more to do: a second run changes nothing.
    assert "published 0 batches" in lrq("-c", str(cfg), "sniff", check=True).stdout


def test_sql_source_into_a_user_orm_model(tmp_path: Path) -> None:
    (tmp_path / "mymap.py").write_text(MAPPER)  # handlers import from the config's folder
    cfg = write_config(tmp_path, docs=500, handler="mymap:handle", result_table=None,
                       model="workers.models:DocEntMap", batch_size=64)
    lrq("-c", str(cfg), "sniff", check=True)
    lrq("-c", str(cfg), "work", "--burst", check=True)
    assert lrq("-c", str(cfg), "verify").returncode == 0
    with create_engine(f"sqlite:///{tmp_path / 'results.db'}").connect() as c:
        n, distinct = c.execute(text("SELECT count(*), count(DISTINCT doc_id) FROM doc_ent_map")).one()
        row = c.execute(text("SELECT doc_id, ent_list_str, create_time FROM doc_ent_map "
                             "WHERE doc_id = 'm000000007'")).one()
    assert n == distinct == 500
    assert row.ent_list_str.count(",") == 1 and row.create_time is not None


def test_verify_reports_missing_items_and_exits_1(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=300, batch_size=100)
    lrq("-c", str(cfg), "sniff", check=True)
    lrq("-c", str(cfg), "work", "--once", check=True)
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 1
    assert "missing 200" in v.stdout and "missing keys (first 10)" in v.stdout


def test_poison_items_are_dead_lettered_and_counted_by_verify(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(
        "def handle(items):\n"
        "    if any(i['id'] in (150, 151) for i in items):\n"
        "        raise RuntimeError('cannot map this doc')\n"
        "    return [{'doc_id': i['doc_id']} for i in items]\n")
    cfg = write_config(tmp_path, docs=300, batch_size=100, chunk_size=10, handler="flaky:handle",
                       backoff=0)
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--burst", check=True)
    assert r.stderr.count("dead-lettered queue=docs") == 2
    st = status(cfg)
    assert (st["done"], st["failed"], st["dead_letters"]) == (3, 0, 2)
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert v.stdout.startswith("docs: ok, 2 dead letters; source 300, ")  # next to "ok"
    assert "results 298, dead letters 2, missing 0, duplicated 0" in v.stdout
    strict = lrq("-c", str(cfg), "verify", "--strict")
    assert strict.returncode == 1 and strict.stdout.startswith(
        "docs: NOT OK, 2 dead letters (--strict); source 300, ")
    batch = next(p.stem for p in (tmp_path / "data/docs/done").glob("*.pkl")
                 if json.loads(lrq("-c", str(cfg), "show", p.stem, check=True).stdout).get("dead_letters"))
    shown = json.loads(lrq("-c", str(cfg), "show", batch, check=True).stdout)
    assert {d["key"] for d in shown["dead_letters"]} == {"m000000150", "m000000151"}
    assert "RuntimeError: cannot map this doc" in shown["dead_letters"][0]["error"]


def test_a_corrupt_batch_fails_and_can_be_requeued_once_fixed(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=200, batch_size=100)
    lrq("-c", str(cfg), "sniff", check=True)
    left = sorted((tmp_path / "data/docs/left").glob("*.pkl"))
    good = left[0].read_bytes()
    left[0].write_bytes(good[:-20])  # truncated on disk: the signature no longer matches
    r = lrq("-c", str(cfg), "work", "--burst")
    assert r.returncode == 1 and "quarantined" in r.stderr
    st = status(cfg)
    assert (st["done"], st["quarantined"]) == (1, 1)
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 1 and "missing 100" in v.stdout


def test_requeue_puts_failed_batches_back(tmp_path: Path) -> None:
    (tmp_path / "mymap.py").write_text(MAPPER.replace('"mapped_list_str"', '"no_such_column"'))
    cfg = write_config(tmp_path, docs=200, batch_size=100, handler="mymap:handle",
                       result_table=None, model="workers.models:DocEntMap")
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--burst")
    # every result has the field: a broken handler, the run stops at its first batch
    assert r.returncode == 4 and "has no columns for" in r.stderr
    assert (status(cfg)["failed"], status(cfg)["pending"]) == (1, 1)
    (tmp_path / "mymap.py").write_text(MAPPER)  # the fix
    r = lrq("-c", str(cfg), "requeue", "--failed", check=True)
    assert "requeued 1 batches" in r.stdout
    assert (status(cfg)["failed"], status(cfg)["pending"]) == (0, 2)
    lrq("-c", str(cfg), "work", "--burst", check=True)
    assert lrq("-c", str(cfg), "verify").returncode == 0
    r = lrq("-c", str(cfg), "requeue", "20260101T000000000000-nosuchbatch")
    assert r.returncode == 1 and "no batch named" in r.stderr


def test_a_key_repeated_across_the_source_fails_verify_and_status_counts_result_rows(
        tmp_path: Path) -> None:
    """Keys unique within each batch but repeated across batches: every batch is stored,
    the results table keeps one row per key, and only verify can tell."""
    cfg = write_config(tmp_path, docs=300, batch_size=50)
    with create_engine(f"sqlite:///{tmp_path / 'source.db'}").begin() as c:
        c.execute(text("UPDATE source_data SET mid = 'm' || (id % 50)"))  # 50 distinct
    lrq("-c", str(cfg), "sniff", check=True)
    lrq("-c", str(cfg), "work", "--burst", check=True)
    st = status(cfg)
    assert (st["done"], st["results"], st["ledger_items"]) == (6, 50, 300)
    table = lrq("-c", str(cfg), "status", check=True).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[7] == "results" and row[7] == "50"
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 1, v.stdout
    assert v.stdout.startswith("docs: NOT OK, no dead letters; source 300, results 50, ")
    assert "  key 'doc_id' is not unique in the source: 300 items, 50 distinct; set `key` to " \
           "a unique column (queues.docs.key)" in v.stdout


def test_a_batch_whose_items_share_a_key_fails_instead_of_collapsing(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=300, batch_size=100)
    with create_engine(f"sqlite:///{tmp_path / 'source.db'}").begin() as c:
        c.execute(text("UPDATE source_data SET mid = 'm' || (id % 28)"))
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--burst")
    assert r.returncode == 1
    assert r.stderr.count("72 of 100 items repeat another item's 'doc_id' (28 distinct); key "
                          "must be unique per item: set `key` to a unique field") == 3
    st = status(cfg)
    assert (st["failed"], st["done"], st["results"]) == (3, 0, 0)
