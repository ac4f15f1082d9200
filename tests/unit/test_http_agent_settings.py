"""kind = "http-agent": its options are checked at load, with errors naming the option and
the fix, and never showing a password."""
from __future__ import annotations

from pathlib import Path

import pytest

from lrq.errors import ConfigError
from lrq.sources import parse
from lrq.sources.http_agent import Settings, endpoint

WHERE = "queues.events.source"
BASE = {"url": "http://127.0.0.1:8000", "servers": "10.0.0.7:9092", "group": "lrq", "topic": "events"}


def settings(**changes: object) -> Settings:
    table = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    result: Settings = parse("http-agent", table, Path("/cfg"), WHERE)
    return result


def test_defaults_and_values() -> None:
    s = settings(timeout="2m", is_json=False)
    assert s == Settings(url="http://127.0.0.1:8000", servers="10.0.0.7:9092", group="lrq",
                         topic="events", is_json=False, timeout=120.0)
    assert settings().timeout == 30.0 and settings().is_json is True


@pytest.mark.parametrize("changes, says", [
    ({"brokers": "x"}, f"{WHERE}: unknown key 'brokers' for kind \"http-agent\" (known keys: kind, group,"),
    ({"url": None}, f"{WHERE}: missing 'url' (e.g. url = \"http://127.0.0.1:8000\")"),
    ({"topic": " "}, f"{WHERE}: missing 'topic'"),
    ({"group": 5}, f"{WHERE}.group: expected str, got 5"),
    ({"is_json": "yes"}, f"{WHERE}.is_json: expected bool, got 'yes'"),
    ({"timeout": True}, f"{WHERE}.timeout: expected int or float or str, got True"),
    ({"timeout": "soon"}, f"{WHERE}.timeout: 'soon' is not a duration"),
    ({"timeout": 0}, f"{WHERE}.timeout: must be more than 0 seconds"),
    ({"timeout": "1d"}, f"{WHERE}.timeout: must be at most 600 seconds"),
    ({"url": "127.0.0.1:8000"}, f"{WHERE}.url: '127.0.0.1:8000' is not an http:// or https:// URL; "
                                "write the agent's address, e.g. url = \"http://127.0.0.1:8000\""),
    ({"url": "http://h:port/"}, f"{WHERE}.url: 'http://h:port/' is not a URL"),
    ({"url": "http://h/?a=1"}, f"{WHERE}.url: 'http://h/?a=1' has a query or fragment"),
])
def test_bad_options_name_the_option_and_the_fix(changes: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as e:
        settings(**changes)
    assert str(e.value).startswith(says), str(e.value)


def test_a_bad_url_with_a_password_is_shown_without_it() -> None:
    with pytest.raises(ConfigError) as e:
        settings(url="ftp://lrq:Pa55word@agent/")
    assert "ftp://lrq:***@agent/" in str(e.value) and "Pa55word" not in str(e.value)


@pytest.mark.parametrize("url, expect", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/consume_msg/"),
    ("http://agent/", "http://agent/consume_msg/"),
    ("https://gw.example/kafka", "https://gw.example/kafka/consume_msg/"),
    ("http://agent:8000/consume_msg/", "http://agent:8000/consume_msg/"),
    ("http://agent:8000/consume_msg", "http://agent:8000/consume_msg/"),
])
def test_the_endpoint_is_the_agents_consume_msg(url: str, expect: str) -> None:
    assert endpoint(url, "url") == (expect, None)


def test_a_user_in_the_url_becomes_basic_auth_and_leaves_the_endpoint() -> None:
    assert endpoint("http://lrq:p%40ss@agent:8000", "url") == (
        "http://agent:8000/consume_msg/", "Basic bHJxOnBAc3M=")  # lrq:p@ss
