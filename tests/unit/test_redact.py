"""lrq.redact: passwords in URLs, option tables and messages are never shown."""
from __future__ import annotations

import io
import logging

import pytest

from lrq.redact import (
    MASK,
    RedactingFormatter,
    redact,
    redact_options,
    redact_text,
    redact_value,
    scrub,
    url_secrets,
)

PW = "Sup3r-s3cret"


@pytest.mark.parametrize("url, shown", [
    (f"postgresql+psycopg://lrq:{PW}@127.0.0.1:5432/lrq", "postgresql+psycopg://lrq:***@127.0.0.1:5432/lrq"),
    (f"mysql+pymysql://lrq:{PW}@db/lrq?charset=utf8mb4", "mysql+pymysql://lrq:***@db/lrq?charset=utf8mb4"),
    (f"redis://:{PW}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    (f"rediss://default:{PW}@cache:6380/1", "rediss://default:***@cache:6380/1"),
    (f"redis://cache/0?password={PW}&socket_timeout=5", "redis://cache/0?password=***&socket_timeout=5"),
    (f"postgresql://db/lrq?user=lrq&password={PW}", "postgresql://db/lrq?user=lrq&password=***"),
    (f"http://agent:{PW}@10.0.0.5:8000/consume_msg/", "http://agent:***@10.0.0.5:8000/consume_msg/"),
    # an unencoded @ or / in the password: hidden whole, up to the last @ before the query
    (f"postgresql://lrq:a@b/{PW}@db:5432/lrq", "postgresql://lrq:***@db:5432/lrq"),
])
def test_redact_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert PW not in redact(url)


@pytest.mark.parametrize("url", [
    "sqlite:////tmp/data/results.db", "sqlite:///data/a@b.db", "redis://127.0.0.1:6379/0",
    "http://127.0.0.1:8000/", "postgresql://lrq@db/lrq", "not a url at all", "",
])
def test_redact_leaves_urls_without_a_password_alone(url: str) -> None:
    assert redact(url) == url


def test_redact_options_hides_client_secrets() -> None:
    options = {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "lrq",
               "sasl.password": PW, "ssl.key.password": PW, "ssl.keystore.password": PW,
               "sasl.oauthbearer.client.secret": PW, "sasl.oauthbearer.config": f"secret={PW}",
               "ssl.key.pem": PW, "session.timeout.ms": 6000,
               "bootstrap": f"redis://:{PW}@h/0", "nested": {"password": PW, "port": 1}}
    shown = redact_options(options)
    assert PW not in repr(shown)
    assert shown["sasl.username"] == "lrq" and shown["session.timeout.ms"] == 6000
    assert shown["sasl.password"] == MASK and shown["nested"] == {"password": MASK, "port": 1}
    assert shown["bootstrap"] == "redis://:***@h/0"
    assert options["sasl.password"] == PW  # a copy: the client still gets the real one


def test_redact_text_hides_every_url_and_password_pair_in_a_message() -> None:
    message = (f"cannot reach postgresql://lrq:{PW}@db/lrq (then redis://:{PW}@cache/0): "
               f"connection to 'host=db password={PW} dbname=lrq' failed; "
               f"password authentication failed for user \"lrq\"")
    shown = redact_text(message)
    assert PW not in shown
    assert "postgresql://lrq:***@db/lrq" in shown and "redis://:***@cache/0" in shown
    assert "password authentication failed" in shown  # words about passwords stay
    assert redact_text(f"cannot reach postgresql://db/x?password={PW}: refused") == \
        "cannot reach postgresql://db/x?password=***: refused"
    assert redact_text("done queue=docs batch=x items=100") == "done queue=docs batch=x items=100"


def test_redacting_formatter_hides_passwords_in_messages_and_tracebacks() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test_redact.formatter")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.error("connect-failed url=%s", f"redis://:{PW}@h/0")
        try:
            raise ConnectionError(f"no route to postgresql://u:{PW}@db/x")
        except ConnectionError:
            log.exception("source-failed")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert PW not in text
    assert "connect-failed url=redis://:***@h/0" in text and "ConnectionError" in text


def test_scrub_hides_known_secrets_quoted_bare() -> None:
    """A client may quote a password with nothing around it that marks it as one."""
    assert scrub(f"AUTH {PW} failed ({PW})", [PW, ""]) == "AUTH *** failed (***)"
    assert scrub("nothing to hide", []) == "nothing to hide"


@pytest.mark.parametrize("url, secrets", [
    ("redis://u:p%40ss@h/0", {"p%40ss", "p@ss"}),
    (f"redis://h/0?password={PW}&db=1", {PW}),
    ("http://agent:8000/", set()),
    ("redis://h:port/0", set()),  # does not parse: nothing to scrub, no error
])
def test_url_secrets_as_written_and_decoded(url: str, secrets: set[str]) -> None:
    assert set(url_secrets(url)) == secrets


def test_redact_value_hides_passwords_in_any_config_value() -> None:
    url = f"redis://:{PW}@h/0"
    assert redact_value({"a": [url], "sasl.password": PW, "n": 1}) == \
        {"a": ["redis://:***@h/0"], "sasl.password": MASK, "n": 1}
