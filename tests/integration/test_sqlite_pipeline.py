"""A SQLite source into SQLite results through the real CLI: generic table and a user model."""
from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import create_engine, text

from lrqtest import lrq, write_config

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
    assert "source 1234, results 1234, missing 0, duplicated 0" in v.stdout
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


def test_a_failing_handler_is_reported_not_swallowed(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(
        "def handle(items):\n"
        "    if any(i['id'] == 150 for i in items):\n"
        "        raise RuntimeError('cannot map doc 150')\n"
        "    return [{'doc_id': i['doc_id']} for i in items]\n")
    cfg = write_config(tmp_path, docs=300, batch_size=100, handler="flaky:handle")
    lrq("-c", str(cfg), "sniff", check=True)
    r = lrq("-c", str(cfg), "work", "--burst")
    assert r.returncode == 1 and "cannot map doc 150" in r.stderr
    st = status(cfg)
    assert (st["done"], st["failed"]) == (2, 1)
    failed = next((tmp_path / "data" / "docs" / "failed").glob("*.pkl")).stem
    shown = json.loads(lrq("-c", str(cfg), "show", failed, check=True).stdout)
    assert shown["state"] == "failed" and "RuntimeError: cannot map doc 150" in shown["error"]["error"]
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 1 and "missing 100" in v.stdout and "failed batches 1" in v.stdout
