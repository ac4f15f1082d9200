"""kind = "http-agent" against the loopback agent the tests run (tests/services/http_agent.py):
a real HTTP server on 127.0.0.1 that commits when it answers, like the original agent."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from services.http_agent import LoopbackAgent

from lrq.errors import SourceError
from lrq.sources import Context, parse
from lrq.sources import http_agent as kind

PW = "agent-Pa55"


def open_source(tmp_path: Path, url: str, **options: object) -> kind.HttpAgentSource:
    table = {"url": url, "servers": "10.0.0.7:9092", "group": "lrq-test", "topic": "events",
             **options}
    settings = parse("http-agent", table, tmp_path, "queues.events.source")
    return kind.open(settings, Context(data_dir=tmp_path, queue="events"))


def test_messages_arrive_in_order_once_and_the_request_is_the_agents(
        tmp_path: Path, http_agent: LoopbackAgent) -> None:
    http_agent.add([{"id": i, "doc_id": f"m{i}", "content": "x"} for i in range(250)])
    src = open_source(tmp_path, http_agent.url)
    assert src.ack_at == "publish" and src.keys("doc_id") is None and src.item_fields() is None
    got = []
    for expect in (100, 100, 50):
        assert not src.settled()
        fetched = src.fetch(None, 100)
        assert len(fetched.items) == expect and fetched.position is None
        assert fetched.receipts is None
        got += fetched.items
    assert src.settled()  # the last answer came back short
    assert [m["id"] for m in got] == list(range(250))
    assert src.fetch(None, 100).items == []  # committed by the agent: never served again
    assert http_agent.committed == 250
    assert http_agent.requests[0] == {"servers": "10.0.0.7:9092", "groupid": "lrq-test",
                                      "is_commit": True, "msg_num": 100, "topic": "events",
                                      "is_json": True}
    assert http_agent.auth[0] is None
    status = src.status()
    assert status["agent"] == http_agent.url and status["fetched"] == 250
    assert status["last_count"] == 0 and status["last_fetch"] is not None


def test_a_message_that_is_not_an_object_becomes_a_value_item(
        tmp_path: Path, http_agent: LoopbackAgent) -> None:
    http_agent.add(["raw line", 7, None, [1, 2], {"id": 1}])
    src = open_source(tmp_path, http_agent.url, is_json=False)
    items = src.fetch(None, 10).items
    assert items == [{"value": "raw line"}, {"value": 7}, {"value": None}, {"value": [1, 2]},
                     {"id": 1}]
    assert http_agent.requests[0]["is_json"] is False


@pytest.mark.parametrize("mode, says", [
    ("garbage", "answered something that is not JSON: '<html><body>502 Bad Gateway"),
    ("object", "answered a JSON dict, not a list of messages: '{\"error\": \"no such topic\"}'"),
    ("500", "answered HTTP 500 Internal Server Error: 'Internal Server Error: consumer crashed'"),
    ("nohttp", "gave a broken answer: BadStatusLine: SSH-2.0-OpenSSH_9.2"),
])
def test_a_bad_answer_is_a_source_error_naming_the_agent_without_its_password(
        tmp_path: Path, http_agent: LoopbackAgent, mode: str, says: str) -> None:
    http_agent.add([{"id": 1}])
    http_agent.fail = mode
    src = open_source(tmp_path, f"http://lrq:{PW}@127.0.0.1:{http_agent.port}")
    with pytest.raises(SourceError) as e:
        src.fetch(None, 10)
    message = str(e.value)
    assert says in message
    assert f"agent http://lrq:***@127.0.0.1:{http_agent.port}" in message and PW not in message
    assert len(message) < 400  # the answer is quoted truncated
    assert len(http_agent.requests) == 1  # an answer is not retried
    assert http_agent.auth[0] == "Basic bHJxOmFnZW50LVBhNTU="  # the URL's user, as basic auth


def test_a_slow_agent_is_a_source_error_within_the_timeout(
        tmp_path: Path, http_agent: LoopbackAgent) -> None:
    http_agent.add([{"id": 1}])
    http_agent.fail = "slow"
    src = open_source(tmp_path, http_agent.url, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"did not answer within 0.5 s \(timeout\)"):
        src.fetch(None, 10)
    took = time.monotonic() - started
    assert 0.45 <= took < 1.5, took
    assert len(http_agent.requests) == 1  # a timeout is not retried


def test_a_connection_reset_before_an_answer_is_retried(
        tmp_path: Path, http_agent: LoopbackAgent, caplog: pytest.LogCaptureFixture) -> None:
    http_agent.add([{"id": i} for i in range(3)])
    http_agent.fail, http_agent.fail_times = "reset", 1
    src = open_source(tmp_path, http_agent.url)
    with caplog.at_level(logging.INFO, logger="lrq.sources.http_agent"):
        assert [m["id"] for m in src.fetch(None, 10).items] == [0, 1, 2]
    assert [r.getMessage().split()[0] for r in caplog.records].count("agent-retry") == 1


def test_an_agent_that_is_down_fails_after_bounded_retries(tmp_path: Path) -> None:
    agent = LoopbackAgent()  # bound to a port, never serving: then closed, so refused
    url = agent.url
    agent.server.server_close()
    src = open_source(tmp_path, url.replace("http://", f"http://u:{PW}@"), timeout=1)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"cannot reach agent http://u:\*\*\*@127.0.0.1:\d+: "
                                          rf".*Connection refused \(after {kind.RETRIES + 1} tries\)") as e:
        src.fetch(None, 10)
    assert PW not in str(e.value)
    assert time.monotonic() - started < 5


def test_the_at_most_once_warning_is_logged_once_at_the_first_fetch(
        tmp_path: Path, http_agent: LoopbackAgent, caplog: pytest.LogCaptureFixture) -> None:
    http_agent.add([{"id": i} for i in range(5)])
    with caplog.at_level(logging.WARNING, logger="lrq.sources.http_agent"):
        src = open_source(tmp_path, f"http://lrq:{PW}@127.0.0.1:{http_agent.port}")
        src.status()
        assert not caplog.records  # opened (a worker's key check, `lrq status`): no risk taken
        src.fetch(None, 2)
        src.fetch(None, 2)
        src.fetch(None, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("at-most-once queue=events agent=http://lrq:***@127.0.0.1:")
    assert 'kind = "kafka"' in warnings[0] and PW not in warnings[0]
    assert len(http_agent.requests) == 3  # three fetches, no call at open


def test_opening_the_source_calls_nothing(tmp_path: Path, http_agent: LoopbackAgent) -> None:
    """Any call to the agent consumes messages: opening, status and settled() must not."""
    http_agent.add([{"id": 1}])
    src = open_source(tmp_path, http_agent.url)
    src.status()
    assert not src.settled()
    src.close()
    assert http_agent.requests == [] and http_agent.unserved() == 1
