"""--log-format json (lrq.logjson): one JSON object per line, event and fields parsed, nothing
secret in it. Worker processes of a real scheduler: tests/acceptance/test_pause.py."""
from __future__ import annotations

import io
import json
import logging

import pytest

from lrq import logfile
from lrq.logjson import JsonFormatter, event_of, fields_of


def emit(formatter: logging.Formatter, msg: str, *args: object, exc: bool = False,
         level: int = logging.INFO) -> dict:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger("lrq.test-json")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    try:
        if exc:
            try:
                raise RuntimeError("connect to postgresql://lrq:hunter2@db/lrq failed")
            except RuntimeError:
                logger.exception(msg, *args)
        else:
            logger.log(level, msg, *args)
    finally:
        logger.handlers.clear()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_a_done_line_becomes_event_and_typed_fields() -> None:
    rec = emit(JsonFormatter(), "done queue=%s batch=%s items=%d stored=%d dead=%d seconds=%.3f",
               "docs", "20261201T000000000000-abc", 100, 99, 1, 0.031)
    assert rec["event"] == "done" and rec["level"] == "INFO" and rec["logger"] == "lrq.test-json"
    assert rec["fields"] == {"queue": "docs", "batch": "20261201T000000000000-abc", "items": 100,
                             "stored": 99, "dead": 1, "seconds": 0.031}
    assert rec["message"].startswith("done queue=docs") and rec["time"].endswith("Z")
    assert isinstance(rec["pid"], int) and "worker" not in rec and "exc" not in rec


@pytest.mark.parametrize("message, event", [
    ("paused queue=docs reason=operator by=\"Ann Lee\": until resumed", "paused"),
    ("idle: sources drained, nothing pending", "idle"),
    ("dead-lettered queue=docs key=k1 error=boom", "dead-lettered"),
    ("queue=docs without an event", None),
    ("Traceback (most recent call last):", None),
    ("", None),
])
def test_event_is_the_leading_word_only(message: str, event: str | None) -> None:
    assert event_of(message) == event


def test_fields_quoted_values_trailing_punctuation_and_first_wins() -> None:
    assert fields_of('paused queue=docs by="Ann Lee" reason=max_pending: 50 batches queue=x') == {
        "queue": "docs", "by": "Ann Lee", "reason": "max_pending"}
    assert fields_of("rate=12/s attempt=-1 ratio=0.5,") == {"rate": "12/s", "attempt": -1,
                                                           "ratio": 0.5}


def test_a_password_in_a_url_never_reaches_json_output() -> None:
    rec = emit(JsonFormatter(), "sniff-failed queue=docs error=%s",
               "cannot reach redis://:s3cret@10.0.0.1:6379/0", exc=True)
    text = json.dumps(rec)
    assert "s3cret" not in text and "hunter2" not in text
    assert rec["fields"]["error"] == "cannot"
    assert "redis://:***@10.0.0.1:6379/0" in rec["message"]
    assert "RuntimeError" in rec["exc"] and "postgresql://lrq:***@db/lrq" in rec["exc"]


def test_a_worker_process_json_lines_name_their_queue() -> None:
    fmt = logfile.child_format("docs", "json")
    assert fmt is logfile.child_format("docs", "json"), "one formatter: each record formatted once"
    rec = emit(fmt, "claimed queue=docs batch=b attempt=1", level=logging.DEBUG)
    assert rec["worker"] == "docs" and rec["event"] == "claimed" and rec["level"] == "DEBUG"
    text = logfile.child_format("docs").format(logging.makeLogRecord(
        {"msg": "done queue=docs", "name": "lrq.worker", "levelname": "INFO"}))
    assert "lrq.child: [docs " in text, "the text format is unchanged"


def test_non_ascii_and_newlines_stay_one_line() -> None:
    rec = emit(JsonFormatter(), "failed queue=docs error=%s", "bad\nitem é")
    assert rec["message"] == "failed queue=docs error=bad\nitem é"


def test_cli_log_format_json_and_config_log_format(tmp_path, capfd) -> None:
    """`--log-format json` on the command line, and `log_format = "json"` in the config."""
    from lrqtest import write_config

    from lrq import cli

    cfg = write_config(tmp_path, docs=None, top={"log_format": "json"})
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for argv in (["-c", str(cfg), "pause", "docs", "--by", "ann"],
                     ["--log-format", "json", "-c", str(cfg), "resume", "docs"]):
            root.handlers[:] = []
            assert cli.main(argv) == 0
        err = capfd.readouterr().err.strip().splitlines()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    recs = [json.loads(line) for line in err]
    assert [r["event"] for r in recs] == ["pause-requested", "resume-requested"]
    assert recs[0]["fields"]["by"] == "ann"


def test_a_bad_log_format_in_the_config_is_one_line(tmp_path) -> None:
    from lrqtest import write_config

    from lrq import config
    from lrq.errors import ConfigError

    with pytest.raises(ConfigError, match="log_format 'xml'"):
        config.load(write_config(tmp_path, docs=None, top={"log_format": "xml"}))



def test_a_relayed_worker_line_is_unpacked() -> None:
    record = logging.makeLogRecord({"name": "lrq.child", "levelname": "INFO", "msg": "[%s %d] %s",
                                    "args": ("docs", 4242, "lrq.worker: done queue=docs items=5")})
    rec = json.loads(JsonFormatter().format(record))
    assert (rec["worker"], rec["pid"], rec["logger"], rec["event"]) == ("docs", 4242, "lrq.worker",
                                                                        "done")
    assert rec["fields"] == {"queue": "docs", "items": 5}
