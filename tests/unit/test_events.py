"""The lifecycle log lines users and log shippers rely on: each starts with its stable event
name (claimed, done, reclaimed, dead-lettered, paused, resumed, requeued) and, through the
JSON formatter, comes out as that event with its fields."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from lrqtest import load_app, write_config
from test_reaper import die

from lrq import control, reaper
from lrq.logjson import JsonFormatter


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def test_every_lifecycle_event_is_logged_under_its_name(tmp_path: Path) -> None:
    (tmp_path / "picky.py").write_text(
        "def handle(items):\n"
        "    if any(i['doc_id'] == 'bad' for i in items):\n"
        "        raise ValueError('bad item')\n"
        "    return [{'doc_id': i['doc_id'], 'n': 1} for i in items]\n")
    app = load_app(write_config(tmp_path, docs=None, handler="picky:handle", chunk_size=2,
                                retries=0, backoff=0))
    q = app.queues("docs")[0]
    sp = app.spool(q)
    collect = Collect()
    lrq_log = logging.getLogger("lrq")
    saved = lrq_log.level
    lrq_log.addHandler(collect)
    lrq_log.setLevel(logging.DEBUG)
    try:
        sp.publish([{"doc_id": "a"}, {"doc_id": "bad"}])
        w = app.worker(q)
        assert w.run_once()                                     # claimed, dead-lettered, done
        name = sp.publish([{"doc_id": "c"}])
        reaper.take_back(app, q, die(sp, name))                 # reclaimed
        sp.fail(sp.claim(name), "boom")
        assert app.requeue_failed("docs") == 1                  # requeued
        app.pause("docs", "ann")
        assert not w.run_once()                                 # paused
        app.resume("docs")
        assert w.run_once()                                     # resumed, claimed, done
    finally:
        lrq_log.removeHandler(collect)
        lrq_log.setLevel(saved)
    seen = [r["event"] for r in collect.lines]
    for event in ("claimed", "done", "reclaimed", "dead-lettered", "paused", "resumed",
                  "requeued"):
        assert event in seen, f"no {event!r} line in {seen}"
    by = {r["event"]: r for r in reversed(collect.lines)}  # the first of each
    assert by["claimed"]["level"] == "DEBUG" and by["claimed"]["fields"]["attempt"] == 1
    assert by["done"]["fields"]["dead"] == 1 and by["done"]["fields"]["items"] == 2
    assert by["dead-lettered"]["fields"]["key"] == "bad"
    assert by["reclaimed"]["fields"]["batch"] == name
    assert by["requeued"]["fields"] == {"queue": "docs", "batch": name,
                                        "outcome": "requeued from failed/"}
    assert by["paused"]["fields"]["by"] == "ann" and by["paused"]["fields"]["reason"] == "operator"
    assert by["resumed"]["fields"]["queue"] == "docs"
    assert control.paused(app.cfg.data_dir, "docs") is None
