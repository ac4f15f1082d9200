"""Rates from a real ledger (SQLite file, PostgreSQL and MariaDB when their servers are
installed): :meth:`Sink.finished_within` counts commits against the database's own clock."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from lrq import rates
from lrq.config import QueueConfig, SourceConfig
from lrq.sink import Sink
from lrq.sources import sql


def queue(name: str) -> QueueConfig:
    return QueueConfig(name=name, handler="workers.wordcount:handle", key="doc_id",
                       result_table="doc_results",
                       source=SourceConfig("sql", sql.Settings(url="sqlite:///unused.db",
                                                               table="source_data")))


def results(*ids: int) -> list[dict[str, Any]]:
    return [{"doc_id": f"doc-{i}", "ent_list_str": "e", "mapped_list_str": "m"} for i in ids]


def age(sink: Sink, batch: str, seconds: int) -> None:
    """Move a ledger row's ``finished_at`` back by ``seconds`` of the database's clock."""
    led = sink.ledger
    with sink.engine.begin() as conn:
        now = conn.execute(select(func.now())).scalar_one()
        conn.execute(led.update().where(led.c.queue == sink.queue.name, led.c.name == batch)
                     .values(finished_at=now - timedelta(seconds=seconds)))


def test_finished_within_counts_each_windows_commits_on_the_databases_clock(
        engine: Engine) -> None:
    sink = Sink(engine, queue("docs")).prepare()
    other = Sink(engine, queue("other")).prepare()
    assert sink.finished_within(rates.WINDOWS) == {60: (0, 0), 600: (0, 0)}
    sink.store("now1", items=3, results=results(1, 2, 3))
    sink.store("now2", items=2, results=results(4, 5))
    sink.store("old", items=10, results=results(*range(10, 20)))
    sink.store("older", items=100, results=results(*range(100, 200)))
    other.store("x", items=7, results=results(*range(300, 307)))  # another queue's
    age(sink, "old", 300)
    age(sink, "older", 3600)
    got = sink.finished_within(rates.WINDOWS)
    assert got == {60: (2, 5), 600: (3, 15)}
    r = rates.Rates.from_counts(got)
    assert r.items_per_s == pytest.approx(5 / 60)
    assert rates.eta(50, r.items_per_s) == pytest.approx(600)
    assert other.finished_within([60]) == {60: (1, 7)}
