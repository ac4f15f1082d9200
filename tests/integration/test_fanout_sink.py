"""Fan-out on every backend (SQLite file, real PostgreSQL, real MariaDB): a batch's outputs,
their dead letters and its ledger row commit together; dead letters are per output; an
aggregating output's rows are upserted (numbers added), a replay adds nothing, and
concurrent writers to the same new key end with the exact sum (lrq.outputs)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from lrqtest import run_threads
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from lrq.config import OutputConfig, QueueConfig, SourceConfig
from lrq.outputs import merge
from lrq.schema import DEAD, LEDGER
from lrq.sink import Sink
from lrq.sources import sql

JOIN_TIMEOUT = 120.0


def fanout(agg_target: dict[str, Any] | None = None, name: str = "docs") -> QueueConfig:
    agg = {"result_table": "agg_totals"} if agg_target is None else agg_target
    return QueueConfig(
        name=name, handler="", key="doc_id",
        source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db", table="source_data")),
        outputs=(OutputConfig("words", "fanout_handlers:words", result_table="fo_words"),
                 OutputConfig("picky", "fanout_handlers:picky", result_table="fo_picky"),
                 OutputConfig("totals", "fanout_handlers:totals", key="bucket",
                              aggregate=True, **agg)))


@pytest.fixture(params=["generic", "model"])
def agg_target(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "generic":
        return {"result_table": "agg_totals"}
    return {"model": "fanout_handlers:BucketTotal"}


def word_rows(*ids: int) -> list[dict[str, Any]]:
    return [{"doc_id": f"d{i}", "words": i} for i in ids]


def totals_row(bucket: str, docs: int, words: int, last: str) -> dict[str, Any]:
    return {"bucket": bucket, "docs": docs, "words": words, "ratio": 0.5 * docs, "last": last}


def stored_totals(sink: Sink) -> dict[str, dict[str, Any]]:
    out = sink.outputs["totals"]
    t = out.table
    with sink.engine.connect() as conn:
        if out.table_sink.generic:
            return {k: v for k, v in conn.execute(select(t.c.key, t.c.value).where(
                t.c.queue == sink.queue.name))}
        return {r.bucket: {"bucket": r.bucket, "docs": r.docs, "words": r.words,
                           "ratio": r.ratio, "last": r.last}
                for r in conn.execute(select(t))}


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def dead_keys(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(str(k) for (k,) in conn.execute(text(f"SELECT {_q(engine, 'key')} FROM {DEAD}")))


def _q(engine: Engine, name: str) -> str:
    return engine.dialect.identifier_preparer.quote(name)


def test_a_batch_commits_every_output_and_its_dead_letters_with_one_ledger_row(
        engine: Engine, agg_target: dict[str, Any]) -> None:
    sink = Sink(engine, fanout(agg_target)).prepare()
    inputs = [{"doc_id": f"d{i}"} for i in range(1, 6)]
    stored = sink.store_outputs("b1", 5, {
        "words": (word_rows(1, 2, 3, 4, 5), []),
        "picky": (word_rows(1, 2, 4, 5), [({"doc_id": "d3"}, "ValueError: picky refuses d3")]),
        "totals": ([totals_row("b0", 2, 7, "d3"), totals_row("b1", 2, 5, "d4"),
                    totals_row("b0", 1, 5, "d5")],
                   [({"doc_id": "d3"}, "ValueError: totals refuses d3")]),
    }, inputs=inputs)
    assert stored.recorded and stored.dead == 2
    assert count(engine, "fo_words") == 5 and count(engine, "fo_picky") == 4
    # The item dead in two outputs has one dead letter in each; the others stored it.
    assert dead_keys(engine) == ["picky/d3", "totals/d3"]
    totals = stored_totals(sink)
    assert totals["b0"]["docs"] == 3 and totals["b0"]["words"] == 12  # merged within the batch
    assert totals["b0"]["last"] == "d5" and totals["b1"]["docs"] == 2
    assert sink.ledger_stats() == (1, 5)
    assert sorted(sink.dead_keys()) == ["picky/d3", "totals/d3"]


def test_aggregate_rows_add_up_across_batches_and_a_replay_adds_nothing(
        engine: Engine, agg_target: dict[str, Any]) -> None:
    sink = Sink(engine, fanout(agg_target)).prepare()
    first = {"words": (word_rows(1), []), "picky": (word_rows(1), []),
             "totals": ([totals_row("b0", 1, 10, "d1"), totals_row("b1", 2, 4, "d1")], [])}
    second = {"words": (word_rows(2), []), "picky": (word_rows(2), []),
              "totals": ([totals_row("b0", 3, 1, "d2")], [])}
    assert sink.store_outputs("b1", 1, first).recorded
    assert sink.store_outputs("b2", 1, second).recorded
    # Replays of both, with other content even: the ledger holds them, nothing is added.
    assert not sink.store_outputs("b1", 1, first).recorded
    assert not sink.store_outputs("b2", 1, {**second, "totals": (
        [totals_row("b0", 100, 100, "zz")], [])}).recorded
    totals = stored_totals(sink)
    assert (totals["b0"]["docs"], totals["b0"]["words"], totals["b0"]["last"]) == (4, 11, "d2")
    assert totals["b0"]["ratio"] == pytest.approx(2.0)
    assert (totals["b1"]["docs"], totals["b1"]["words"]) == (2, 4)
    assert sink.ledger_stats() == (2, 2) and count(engine, "fo_words") == 2


def test_a_failing_output_rolls_back_every_output_and_the_ledger_row(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = Sink(engine, fanout()).prepare()

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("the third output failed")

    monkeypatch.setattr(sink.outputs["totals"], "write", broken)
    with pytest.raises(RuntimeError):
        sink.store_outputs("b1", 2, {
            "words": (word_rows(1, 2), []),
            "picky": (word_rows(1), [({"doc_id": "d2"}, "no")]),
            "totals": ([totals_row("b0", 2, 2, "d2")], [])})
    assert count(engine, "fo_words") == 0 and count(engine, "fo_picky") == 0
    assert count(engine, DEAD) == 0 and count(engine, LEDGER) == 0
    monkeypatch.undo()
    assert sink.store_outputs("b1", 2, {"words": (word_rows(1, 2), []),
                                        "picky": (word_rows(1, 2), []),
                                        "totals": ([totals_row("b0", 2, 2, "d2")], [])}).recorded
    assert stored_totals(sink)["b0"]["docs"] == 2


def test_concurrent_writers_to_the_same_new_keys_get_the_exact_sum(
        engine: Engine, agg_target: dict[str, Any]) -> None:
    Sink(engine, fanout(agg_target)).prepare()
    writers, rounds = 4, 3
    sinks = [Sink(engine, fanout(agg_target)) for _ in range(writers)]

    def writer(w: int) -> Callable[[], Any]:
        def go() -> list[Any]:
            done = []
            for r in range(rounds):
                # every writer adds to the same keys, new ones each round, in both orders
                keys = [f"k{r}-{j}" for j in range(5)]
                rows = [totals_row(k, 1, w + 1, f"w{w}") for k in (keys if w % 2 else keys[::-1])]
                done.append(sinks[w].store_outputs(f"b{w}-{r}", 1, {
                    "words": (word_rows(w * 100 + r), []), "picky": ([], []),
                    "totals": (rows, [])}))
            return done
        return go

    out = run_threads(timeout=JOIN_TIMEOUT, targets=[writer(w) for w in range(writers)])
    assert all(isinstance(x, list) and all(s.recorded for s in x) for x in out), out
    totals = stored_totals(sinks[0])
    assert len(totals) == rounds * 5
    want_words = sum(w + 1 for w in range(writers))
    assert all(v["docs"] == writers and v["words"] == want_words for v in totals.values()), totals
    assert sinks[0].ledger_stats() == (writers * rounds, writers * rounds)


def test_merge_adds_numbers_and_keeps_the_newest_of_the_rest() -> None:
    old = {"k": "a", "n": 2, "x": 1.5, "flag": True, "s": "old", "only_old": 1}
    new = {"k": "a", "n": 3, "x": 0.25, "flag": False, "s": "new", "only_new": "z"}
    assert merge(old, new) == {"k": "a", "n": 5, "x": 1.75, "flag": False, "s": "new",
                               "only_old": 1, "only_new": "z"}
    assert merge({"n": "text"}, {"n": 2}) == {"n": 2}  # not both numbers: the newest


def test_two_writers_racing_on_a_new_key_retry_and_sum_exactly(
        db_url: str, engine: Engine, agg_target: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Both writers read the key as absent (FOR UPDATE), then both insert it: the loser's
    unique violation (PostgreSQL) or deadlock (MariaDB) retries its whole transaction."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite's BEGIN IMMEDIATE serializes writers: no race to force")
    from lrq.outputs import AggregateSqlOutput

    Sink(engine, fanout(agg_target)).prepare()
    sinks = [Sink(engine, fanout(agg_target)) for _ in range(2)]
    met = threading.Barrier(2, timeout=30)
    first: set[int] = set()
    original = AggregateSqlOutput._stored

    def stored_then_meet(self: Any, conn: Any, keys: list[str]) -> Any:
        found = original(self, conn, keys)
        me = threading.get_ident()
        if me not in first:  # the first try of each writer: both have read, neither inserted
            first.add(me)
            met.wait()
        return found

    monkeypatch.setattr(AggregateSqlOutput, "_stored", stored_then_meet)
    caplog.set_level("INFO", logger="lrq.outputs")

    def writer(w: int) -> Callable[[], Any]:
        return lambda: sinks[w].store_outputs(f"b{w}", 1, {
            "words": ([], []), "picky": ([], []),
            "totals": ([totals_row("new", 1, 10 * (w + 1), f"w{w}")], [])})

    out = run_threads(timeout=JOIN_TIMEOUT, targets=[writer(0), writer(1)])
    assert all(getattr(x, "recorded", False) for x in out), out
    totals = stored_totals(sinks[0])
    assert (totals["new"]["docs"], totals["new"]["words"]) == (2, 30)
    assert any(r.message.startswith("upsert-race") for r in caplog.records)


def test_a_row_the_database_refuses_is_dead_in_its_output_and_the_rest_is_stored(
        engine: Engine) -> None:
    q = QueueConfig(
        name="docs", handler="", key="doc_id",
        source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db", table="source_data")),
        outputs=(OutputConfig("ents", "m:f", model="workers.models:DocEntMap"),
                 OutputConfig("totals", "m:f", model="fanout_handlers:BucketTotal",
                              key="bucket", aggregate=True)))
    sink = Sink(engine, q).prepare()
    ents = [{"doc_id": f"doc-{i}", "ent_list_str": None if i == 3 else f"e{i}",
             "mapped_list_str": ""} for i in range(1, 6)]
    rows = [totals_row("ok", 2, 2, "doc-2"), {**totals_row("bad", 1, 1, "doc-3"), "docs": None}]
    inputs = [{"doc_id": f"doc-{i}", "content": "x"} for i in range(1, 6)]
    stored = sink.store_outputs("b1", 5, {"ents": (ents, []), "totals": (rows, [])},
                                inputs=inputs)
    assert stored.recorded and stored.dead == 2
    assert count(engine, "doc_ent_map") == 4
    assert stored_totals(sink).keys() == {"ok"}
    dead = {d.key: d for d in sink.dead_records()}
    assert sorted(dead) == ["ents/doc-3", "totals/bad"]
    assert dead["ents/doc-3"].item == inputs[2]  # the input item, so it can be retried
    assert dead["ents/doc-3"].error.startswith("the database refused the result")
    assert dead["totals/bad"].item["bucket"] == "bad"  # an aggregate row: the row itself
    with engine.connect() as conn:
        led = conn.execute(text(f"SELECT results, dead FROM {LEDGER}")).one()
    assert tuple(led) == (5, 2)  # rows stored over both outputs, dead letters


def test_every_row_of_an_output_refused_alike_is_a_broken_handler(engine: Engine) -> None:
    from lrq.errors import HandlerBroken

    q = QueueConfig(
        name="docs", handler="", key="doc_id",
        source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db", table="source_data")),
        outputs=(OutputConfig("words", "m:f", result_table="fo_words"),
                 OutputConfig("ents", "m:ents", model="workers.models:DocEntMap")))
    sink = Sink(engine, q).prepare()
    ents = [{"doc_id": f"doc-{i}", "ent_list_str": None, "mapped_list_str": ""}
            for i in range(4)]
    with pytest.raises(HandlerBroken, match="m:ents"):
        sink.store_outputs("b1", 4, {"words": (word_rows(0, 1, 2, 3), []), "ents": (ents, [])})
    assert count(engine, "fo_words") == 0 and count(engine, DEAD) == 0
    assert count(engine, LEDGER) == 0
