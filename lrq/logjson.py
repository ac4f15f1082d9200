"""``--log-format json``: one JSON object per log line, for log shippers.

lrq's log lines start with a stable event name followed by ``key=value`` fields
(``done queue=docs batch=... items=100 seconds=0.031``); :class:`JsonFormatter` keeps that
shape machine-readable::

    {"time": "2026-12-01T10:40:00.123Z", "level": "INFO", "logger": "lrq.worker",
     "event": "done", "fields": {"queue": "docs", "batch": "...", "items": 100,
     "seconds": 0.031}, "message": "done queue=docs batch=... items=100 ...", "pid": 4242}

* ``event`` is the message's first word when it is one (lower case, digits and ``-``; a
  trailing ``:`` dropped), else null: a line without an event name still parses.
* ``fields`` are the message's ``key=value`` pairs: a value runs to the next blank (a
  JSON-quoted value, ``by="Ann Lee"``, to its closing quote), trailing ``,;:`` dropped;
  integers and decimals become numbers, everything else stays a string. A key seen twice
  keeps its first value.
* ``exc`` holds a traceback when the record has one; ``worker`` the queue a scheduler's worker
  process was started for (its text lines carry it as ``[QUEUE PID]``). A worker process's
  line the scheduler relays (``lrq.child``: the worker had no descriptor of the scheduler's
  stderr) is unpacked into the worker's own logger, pid and message.
* The same event name can come from several places, told apart by ``reason``: ``paused``
  is the operator's pause (``reason=operator``, :mod:`lrq.control`), the sniffer's
  backpressure (``reason=max_pending``, ``budget``...) or the scheduler's pause of a queue
  whose workers keep failing (``reason=workers-failing``, ``handler-broken``...).

Redaction comes first (:func:`lrq.redact.redact_text` on the whole message and traceback),
so the fields are parsed from text that holds no password, as the text format's lines.

The format is chosen by ``--log-format`` (a global option), else the environment
``LRQ_LOG_FORMAT`` (the scheduler sets it for its worker processes to its own format), else
the config's ``log_format``; ``text`` by default.
"""
from __future__ import annotations

import json
import logging
import os
import re
from datetime import UTC, datetime
from typing import Any

from lrq.redact import redact_text

#: The environment variable naming the log format (``text`` or ``json``).
ENV = "LRQ_LOG_FORMAT"
FORMATS = ("text", "json")

_EVENT = re.compile(r"[a-z][a-z0-9-]*:?$")
_FIELD = re.compile(r'(?<![\w.-])([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|[^\s]*)')
_NUMBER = re.compile(r"-?\d+(\.\d+)?$")
#: A worker process's line relayed by the scheduler (``lrq.child``): ``[QUEUE PID] LOGGER: text``.
_RELAYED = re.compile(r"\[(\S+) (\d+)\] ([\w.]+): (.*)", re.S)


def event_of(message: str) -> str | None:
    """The stable event name a message starts with, or None."""
    first = message.split(None, 1)[0] if message.strip() else ""
    return first.rstrip(":") if _EVENT.match(first) and "=" not in first else None


def fields_of(message: str) -> dict[str, Any]:
    """The ``key=value`` pairs of a message (see the module docstring)."""
    out: dict[str, Any] = {}
    for m in _FIELD.finditer(message):
        key, raw = m.group(1), m.group(2)
        if key in out:
            continue
        out[key] = _value(raw)
    return out


def _value(raw: str) -> Any:
    if raw.startswith('"') and len(raw) > 1 and raw.endswith('"'):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    raw = raw.rstrip(",;:")
    if _NUMBER.match(raw):
        return float(raw) if "." in raw else int(raw)
    return raw


class JsonFormatter(logging.Formatter):
    """Each record as one line of JSON (see the module docstring); ``worker``: the queue of
    a scheduler's worker process, added to each of its lines."""

    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        message = redact_text(record.getMessage())
        logger, pid, worker = record.name, record.process, self.worker
        relayed = _RELAYED.match(message) if logger == "lrq.child" else None
        if relayed:  # a worker that could not write the scheduler's stderr itself
            worker, pid, logger, message = (relayed.group(1), int(relayed.group(2)),
                                            relayed.group(3), relayed.group(4))
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": logger, "event": event_of(message),
            "fields": fields_of(message), "message": message, "pid": pid}
        if worker is not None:
            out["worker"] = worker
        if record.exc_info:
            out["exc"] = redact_text(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact_text(record.exc_text)
        return json.dumps(out, default=str, ensure_ascii=False)


def in_use() -> str:
    """The format this process logs in (its stderr handler's): the scheduler hands it to its
    worker processes (``LRQ_LOG_FORMAT``)."""
    for h in logging.getLogger().handlers:
        if isinstance(h.formatter, JsonFormatter):
            return "json"
    return "text"


def chosen(cli: str | None, config: str | None = None) -> str:
    """The log format in force: ``--log-format``, else ``LRQ_LOG_FORMAT``, else config."""
    return cli or os.environ.get(ENV) or config or "text"
