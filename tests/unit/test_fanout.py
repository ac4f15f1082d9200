"""Fan-out on SQLite, in process: the config of ``outputs``, a worker running every output's
handler over a batch, dead letters per output, aggregating outputs, and ``lrq verify`` per
output (lrq.outputs)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fanout_handlers as fh
import pytest
from lrqtest import load_app, write_config
from sqlalchemy import text

from lrq import cli
from lrq.config import from_dict
from lrq.errors import ConfigError

DOCS = 60

OUTPUTS = {
    "words": {"handler": "fanout_handlers:words", "result_table": "doc_words"},
    "picky": {"handler": "fanout_handlers:picky", "result_table": "doc_picky", "chunk_size": 3},
    "totals": {"handler": "fanout_handlers:make_totals", "options": {"scale": 2},
               "result_table": "doc_totals", "aggregate": True, "key": "bucket"},
}


def fanout_app(tmp_path: Path, outputs: dict[str, Any] | None = None, **kw: Any) -> Any:
    return load_app(write_config(tmp_path, docs=DOCS, handler=None, result_table=None,
                                 chunk_size=4, batch_size=25, backoff=0, retries=1,
                                 outputs=outputs or OUTPUTS, **kw))


def sniff_all(app: Any) -> None:
    q = app.queues("docs")[0]
    sniffer = app.sniffer(q)
    for _ in range(100):  # bounded: 60 documents in batches of 25
        if not sniffer.tick(time.time()):
            return
    raise AssertionError("the sniffer did not drain its source")


def rows(app: Any, sql: str) -> list[Any]:
    with app.engine.connect() as conn:
        return list(conn.execute(text(sql)))


def direct_totals(scale: int = 2) -> dict[str, dict[str, Any]]:
    """The aggregating output's rows computed directly from the source documents."""
    from lrq.sample import documents

    out: dict[str, dict[str, Any]] = {}
    for d in documents(DOCS, 40, 1, 1):
        item = {"doc_id": d["mid"], "content": d["content"]}
        if fh.number(item) in fh.TOTALS_BAD:
            continue
        b = fh.bucket_of(item)
        r = out.setdefault(b, {"docs": 0, "words": 0})
        r["docs"] += scale
        r["words"] += len(d["content"].split())
    return out


# -- config ---------------------------------------------------------------------------------


def config(queue: dict[str, Any]) -> Any:
    return from_dict({"queues": {"q": {"source": {"url": "sqlite:///s.db", "table": "t"},
                                       **queue}}}, Path("/tmp/lrq.toml"))


@pytest.mark.parametrize("queue, message", [
    ({"handler": "m:f", "outputs": {"a": {"handler": "m:f"}}}, "a handler or outputs, not both"),
    ({"outputs": {"a b": {"handler": "m:f"}}}, "output name 'a b'"),
    ({"outputs": {"a": {"model": "m:M"}}}, "missing 'handler'"),
    ({"outputs": {"a": {"handler": "m:f"}, "b": {"handler": "m:g"}}}, "result_table lrq_results"),
    ({"outputs": {"a": {"handler": "m:f", "key": "k"}}}, "only an aggregating output"),
    ({"outputs": {"a": {"handler": "m:f", "kind": "nope"}}}, "unknown output kind 'nope'"),
    ({"outputs": {"a": {"handler": "m:f", "colour": 1}}}, "unknown key 'colour'"),
    ({"outputs": {}}, "no outputs"),
])
def test_config_errors_name_the_key_in_one_line(queue: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(queue)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_queue_with_a_handler_is_one_output_named_empty() -> None:
    q = config({"handler": "m:f", "result_table": "t1", "chunk_size": 7}).queues["q"]
    (only,) = q.plan()
    assert not q.fanout and (only.name, only.handler, only.result_table, only.chunk_size) == \
        ("", "m:f", "t1", 7)
    assert q.for_output(only) is q
    f = config({"outputs": {"a": {"handler": "m:f", "chunk_size": 2},
                            "b": {"handler": "m:g", "model": "m:M"}}}).queues["q"]
    assert f.fanout and [o.name for o in f.plan()] == ["a", "b"]
    assert f.for_output(f.plan()[0]).chunk_size == 2 and f.for_output(f.plan()[1]).chunk_size == 10


# -- the worker -----------------------------------------------------------------------------


def test_every_output_is_stored_and_a_bad_item_is_dead_in_its_output_only(tmp_path: Path) -> None:
    app = fanout_app(tmp_path)
    sniff_all(app)
    q = app.queues("docs")[0]
    stats = app.worker(q).run(burst=True)
    assert stats.batches == 3 and stats.failed == 0
    assert rows(app, "SELECT COUNT(*) FROM doc_words")[0][0] == DOCS
    # picky fails on items 3 and 7: stored by the other outputs, dead in picky only
    assert rows(app, "SELECT COUNT(*) FROM doc_picky")[0][0] == DOCS - 2
    dead = sorted(k for (k,) in rows(app, "SELECT key FROM lrq_dead_letters"))
    assert dead == ["picky/m000000003", "picky/m000000007", "totals/m000000005"]
    stored = {k: json.loads(v) for k, v in rows(app, "SELECT key, value FROM doc_totals")}
    assert {b: {"docs": v["docs"], "words": v["words"]} for b, v in stored.items()} == \
        direct_totals()
    assert app.sink(q).ledger_stats() == (3, DOCS)


def test_verify_is_exact_per_output_and_names_the_output_missing_a_row(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = fanout_app(tmp_path)
    sniff_all(app)
    q = app.queues("docs")[0]
    app.worker(q).run(burst=True)
    v = app.verify(q)
    assert v.ok and [o.output for o in v.outputs] == ["words", "picky", "totals"]
    assert [(o.results, o.dead, o.missing) for o in v.outputs[:2]] == [(DOCS, 0, 0), (DOCS - 2, 2, 0)]
    assert v.outputs[2].aggregate and v.outputs[2].results == 3 and v.outputs[2].dead == 1
    config_path = str(app.cfg.path)
    assert cli.main(["-c", config_path, "verify", "docs", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["outputs"]["picky"]["dead"] == 2 and "missing" in out

    with app.engine.begin() as conn:  # one output loses a row: only that output is inexact
        conn.execute(text("DELETE FROM doc_words WHERE key = 'm000000010'"))
    v = app.verify(q)
    assert not v.ok and v.missing == 1
    assert [(o.output, o.ok, o.missing_sample) for o in v.outputs] == [
        ("words", False, ["m000000010"]), ("picky", True, []), ("totals", True, [])]
    assert cli.main(["-c", config_path, "verify", "docs"]) == 1
    assert "output words: NOT OK" in capsys.readouterr().out


def test_a_replayed_batch_adds_nothing_to_an_aggregating_output(tmp_path: Path) -> None:
    app = fanout_app(tmp_path)
    sniff_all(app)
    q = app.queues("docs")[0]
    w = app.worker(q)
    first = app.spool(q).pending()[0]
    items = app.spool(q).load(first).items
    w.run(burst=True)
    before = rows(app, "SELECT key, value FROM doc_totals ORDER BY key")
    stored = w.sink.store_outputs(first, len(items), w.handle_outputs(items))
    assert not stored.recorded
    assert rows(app, "SELECT key, value FROM doc_totals ORDER BY key") == before


def test_a_single_handler_queue_keeps_its_dead_letter_keys_and_tables(tmp_path: Path) -> None:
    app = load_app(write_config(tmp_path, docs=10, handler="fanout_handlers:picky",
                                chunk_size=4, backoff=0, retries=0))
    sniff_all(app)
    q = app.queues("docs")[0]
    app.worker(q).run(burst=True)
    assert sorted(k for (k,) in rows(app, "SELECT key FROM lrq_dead_letters")) == \
        ["m000000003", "m000000007"]
    assert rows(app, "SELECT COUNT(*) FROM doc_results")[0][0] == 8
    v = app.verify(q)
    assert v.ok and v.outputs == () and "outputs" not in v.to_json()


def test_retry_dead_runs_each_output_only_on_the_items_dead_in_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = fanout_app(tmp_path)
    sniff_all(app)
    q = app.queues("docs")[0]
    app.worker(q).run(burst=True)
    totals_before = rows(app, "SELECT key, value FROM doc_totals ORDER BY key")
    monkeypatch.setattr(fh, "PICKY_BAD", set())  # picky is fixed; totals still refuses 5

    r = app.retry_dead(q)
    assert r.items == 3 and len(r.batches) == 1  # items 3, 7 (picky) and 5 (totals), once each
    assert app.retry_dead(q).items == 0  # waiting in the pending retry batch: not again
    app.worker(q).run(burst=True)

    assert rows(app, "SELECT COUNT(*) FROM doc_picky")[0][0] == DOCS
    assert sorted(k for (k,) in rows(app, "SELECT key FROM lrq_dead_letters")) == \
        ["totals/m000000005"]
    # items 3 and 7 were not run through totals again: its sums are unchanged
    assert rows(app, "SELECT key, value FROM doc_totals ORDER BY key") == totals_before
    assert rows(app, "SELECT COUNT(*) FROM doc_words")[0][0] == DOCS
    assert app.verify(q).ok
    only = app.retry_dead(q, ["m000000005", "m000000099"])
    assert only.items == 1 and only.missing == ["m000000099"]


def test_an_item_that_kills_its_worker_is_dead_in_every_output(tmp_path: Path) -> None:
    import signal

    from test_reaper import die

    from lrq import reaper
    from lrq.spool import Exit

    app = load_app(write_config(tmp_path, docs=None, handler=None, result_table=None,
                                outputs=OUTPUTS))
    q = app.queues("docs")[0]
    sp = app.spool(q)
    name = sp.publish([{"doc_id": "m000000042", "content": "x"}])
    exits = reaper.Exits()
    outcomes = []
    for _ in range(2):  # two deaths on a lone item: dead-lettered
        stale = die(sp, name)
        exits.record(stale.pid, stale.start, Exit.of(-signal.SIGSEGV))
        outcomes.append(reaper.take_back(app, q, stale, exits))
    assert outcomes == ["requeued", "dead-lettered"]
    assert sorted(k for (k,) in rows(app, "SELECT key FROM lrq_dead_letters")) == [
        "picky/m000000042", "totals/m000000042", "words/m000000042"]
    assert app.sink(q).ledger_stats() == (1, 1)


def test_an_output_outside_the_database_sends_before_the_transaction_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker output (``outside``, as kind "kafka") is written before the batch's
    transaction: a slow broker must not hold SQLite's write lock, which every other worker's
    commit waits for. It used to be written inside it, after the ledger row's insert."""
    from lrq import outputs

    monkeypatch.setitem(outputs.KINDS, "probe", "fanout_handlers:OutsideProbe")
    monkeypatch.setattr(fh.OutsideProbe, "SEEN", [])
    app = fanout_app(tmp_path, {"words": OUTPUTS["words"],
                                "sent": {"handler": "fanout_handlers:words", "kind": "probe"}})
    sniff_all(app)
    stats = app.worker(app.queues("docs")[0]).run(burst=True)
    assert stats.batches == 3 and stats.failed == 0
    assert rows(app, "SELECT COUNT(*) FROM doc_words")[0][0] == DOCS
    assert fh.OutsideProbe.SEEN == [(True, True)] * 3
