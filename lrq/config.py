"""Configuration: one TOML file, defaults here and nowhere else.

Relative paths (``data_dir``, SQLite URLs) are resolved against the folder of the config
file, so ``nohup python scheduler.py &`` behaves the same from any working directory.
Environment overrides: ``LRQ_CONFIG`` (the file), ``LRQ_DATA_DIR``, ``LRQ_DB_URL``.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import sysconfig
import tomllib
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from lrq.errors import ConfigError
from lrq.redact import redact, redact_value

DEFAULT_CONFIG = "lrq.toml"
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SourceConfig:
    """Where a queue's items come from: a kind named in :data:`lrq.sources.KINDS` and that
    kind's own frozen ``Settings`` (``kind = "sql"``, the default: :mod:`lrq.sources.sql`)."""

    kind: str = "sql"
    settings: Any = None


@dataclass(frozen=True)
class OutputConfig:
    """One output of a queue (``[queues.X.outputs.NAME]``): its own handler and where its
    results go. A queue with a single ``handler`` has one output named ``""``, built from
    the queue's own keys (:meth:`QueueConfig.plan`), so its tables, dead letters and ledger
    rows are those of a queue without outputs. See :mod:`lrq.outputs`."""

    name: str
    handler: str
    #: When set, ``handler`` names a factory called with these keyword arguments.
    options: dict[str, Any] | None = None
    #: "sql" (the results database) or another kind in :data:`lrq.outputs.KINDS`.
    kind: str = "sql"
    model: str | None = None
    result_table: str | None = None
    #: Items per handler call; None: the queue's ``chunk_size``.
    chunk_size: int | None = None
    #: The field that identifies a result row; None: the queue's ``key``. An aggregating
    #: output's rows carry it (a window's key); other outputs' results carry the item's key.
    key: str | None = None
    #: The handler returns any rows, each with its own unique ``key``, upserted: numeric
    #: fields are added to the stored row's, others take the newest value (lrq.outputs).
    aggregate: bool = False
    #: A kind other than "sql": its own keys, checked by that kind.
    settings: Any = None


@dataclass(frozen=True)
class QueueConfig:
    """One pipeline: a source, a handler (or several ``outputs``), a sink and its own spool
    folders."""

    name: str
    handler: str
    source: SourceConfig
    #: When set, ``handler`` names a factory called with these keyword arguments.
    handler_options: dict[str, Any] | None = None
    batch_size: int = 100
    chunk_size: int = 10
    workers: int = 2
    key: str = "id"
    result_table: str | None = None
    model: str | None = None
    #: Which pending batch a worker takes: "random" (the original system) or "fifo".
    order: str = "random"
    #: The sniffer stops prefetching while this many batches are pending
    #: (``max_pending = "200MB"`` in the file sets a byte limit instead).
    max_pending: int = 50
    max_pending_bytes: int | None = None
    #: A scheduled worker process exits after this long, so a slow leak cannot grow forever.
    run_seconds: float = 300.0
    #: Extra tries of a failing handler call: of a lone item before it is dead-lettered (at
    #: once), and of a call failing for a transient cause or a timeout (after
    #: ``backoff * 2**n`` seconds). Item errors split a call without retrying it; see
    #: :mod:`lrq.policy`.
    retries: int = 2
    backoff: float = 0.5
    #: A handler call running longer than this is interrupted (a timeout, see lrq.policy).
    handler_timeout: float = 300.0
    #: A claim whose heartbeat is older than this is taken back by the reaper.
    lease: float = 60.0
    #: A batch whose attempts ended unfinished this many times moves to failed/ (a batch
    #: whose worker died twice is split instead, see lrq.reaper).
    max_attempts: int = 3
    #: Batch-file codec: "zstd" (default), "zlib" or "none".
    compress: str = "zstd"
    #: A worker run commits a batch on a second thread while the handler starts on the next
    #: one, so a slow service and the database do not wait for each other.
    pipeline: bool = True
    #: Fan-out (``[queues.X.outputs.NAME]`` tables): each output its own handler and table,
    #: all of a batch's committed together. Empty: the queue's ``handler`` is its one output.
    outputs: tuple[OutputConfig, ...] = ()

    #: Batch rules (:mod:`lrq.batching`): a batch closes before its items' pickled size
    #: passes ``batch_max_bytes``; ``separate`` ("module:function", ``(batch_so_far, item) ->
    #: bool``) says an item starts a new batch; a batch that is not full waits up to
    #: ``batch_linger`` seconds for more items (0: published at once).
    batch_max_bytes: int | None = None
    separate: str | None = None
    batch_linger: float = 0.0

    @property
    def fanout(self) -> bool:
        """Does the queue name its outputs (``outputs`` tables) instead of one ``handler``?"""
        return bool(self.outputs)

    def plan(self) -> tuple[OutputConfig, ...]:
        """The queue's outputs: its ``outputs``, or the one its ``handler`` makes (named
        ``""``, the queue's model, table, key and chunk size)."""
        if self.outputs:
            return self.outputs
        return (OutputConfig(name="", handler=self.handler, options=self.handler_options,
                             model=self.model, result_table=self.result_table,
                             chunk_size=self.chunk_size, key=self.key),)

    def for_output(self, output: OutputConfig) -> QueueConfig:
        """This queue as one output sees it: the output's handler, options, chunk size,
        model and table in the queue's places (the handler policy and the sink's table code
        read those). ``key`` stays the queue's: it names the items' key; an aggregating
        output's row key is its own (:class:`lrq.outputs.SqlOutput`)."""
        if not self.outputs:
            return self
        return replace(self, handler=output.handler, handler_options=output.options,
                       chunk_size=output.chunk_size or self.chunk_size, model=output.model,
                       result_table=output.result_table, outputs=())


@dataclass(frozen=True)
class CleanupConfig:
    keep_done: float = 7 * 86400.0
    keep_failed: float = 30 * 86400.0
    max_bytes: int = 10 * 10**9
    min_free: str = "10%"
    #: Orphan files in tmp/ (writers that died) are removed after this long.
    tmp_age: float = 3600.0
    #: Seconds between scheduled cleanup (reaper) runs.
    every: float = 15.0


@dataclass(frozen=True)
class Config:
    path: Path
    data_dir: Path
    db_url: str
    queues: dict[str, QueueConfig]
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    #: Seconds between scheduler ticks of the sniffer and worker jobs: how soon new source
    #: rows are seen (0.1-0.2 s on average; 1.0 before, ~0.6 s). An idle scheduler costs
    #: ~0.4% of a core at 0.25, 0.13% at 1.0 (bench/README.md, "Idle cost").
    interval: float = 0.25
    #: Seconds a stopping worker gets to finish its batch before it is killed.
    grace: float = 30.0
    log_file: Path | None = None
    log_max_bytes: int = 10 * 2**20
    log_backups: int = 5
    #: "text", or "json": one JSON object per log line (lrq.logjson); ``--log-format`` and
    #: env ``LRQ_LOG_FORMAT`` override it.
    log_format: str = "text"
    #: Key that signs batch files; else env LRQ_SECRET, else <data_dir>/secret.key (generated).
    secret: str | None = None
    #: Earlier keys that still verify batch files (rotation); also env LRQ_PREVIOUS_SECRETS.
    previous_secrets: tuple[str, ...] = ()
    #: Bearer token the web page's POSTs need; else env LRQ_HTTP_TOKEN, else
    #: <data_dir>/http.token (generated, mode 0600). See :mod:`lrq.web`.
    http_token: str | None = None

    def queue(self, name: str | None) -> list[QueueConfig]:
        """The named queue (or every queue when ``name`` is None)."""
        if name is None:
            return list(self.queues.values())
        if name not in self.queues:
            raise ConfigError(
                f"{self.path}: no queue named {name!r} (queues: {', '.join(self.queues) or 'none'})"
            )
        return [self.queues[name]]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_bytes(value: int | str, where: str) -> int:
    """``10GB``, ``512MiB`` or a plain integer of bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{where}: {value!r} is not a size; write e.g. 10GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_duration(value: int | float | str, where: str) -> float:
    """``7d``, ``12h``, ``30m``, ``45s`` or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]?)\s*", str(value))
    if not m or m.group(2) not in _SECONDS:
        raise ConfigError(f"{where}: {value!r} is not a duration; write e.g. 7d, 12h or 30m")
    return float(m.group(1)) * _SECONDS[m.group(2)]


#: The longest a duration may be: longer ones are typos (``1e12``, ``inf``) that overflow
#: ``time.sleep`` and ``setitimer`` in the threads that use them. Retention periods
#: (``keep_done``, ``keep_failed``, ``tmp_age``) may be longer.
MAX_SECONDS = 30 * 86400.0
MAX_KEEP_SECONDS = 3650 * 86400.0
#: Bounds of ``backoff`` (its seconds double per retry) and ``retries``.
MAX_BACKOFF = 86400.0
MAX_RETRIES = 100


def positive(seconds: float, where: str, most: float = MAX_SECONDS) -> float:
    """``seconds`` if above 0 and at most ``most``. Zero or less is never meant: a zero
    ``run_seconds`` spawns worker processes that exit at once, forever; a zero ``lease``
    reclaims live claims; a zero ``interval`` or cleanup period spins; a zero ``keep_failed``
    deletes failed batches. Infinite or huge ones crash the sleep or timer they reach."""
    if not seconds > 0:  # also NaN
        raise ConfigError(f"{where}: must be more than 0 seconds, got {seconds:g}")
    if not seconds <= most:
        raise ConfigError(f"{where}: must be at most {most:g} seconds ({most / 86400:g} days), "
                          f"got {seconds:g}")
    return seconds


def check_url(url: str, where: str) -> str:
    try:
        make_url(url)
    except (ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        raise ConfigError(
            f"{where}: {redact(url)!r} is not a database URL; write e.g. sqlite:///data/results.db"
        ) from e
    return url


def absolute_sqlite(url: str, base: Path) -> str:
    """Make a relative SQLite path absolute against ``base`` (the config's folder)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" \
            and not u.database.startswith("file:") and not os.path.isabs(u.database):
        return u.set(database=str(base / u.database)).render_as_string(hide_password=False)
    return url


def take(table: dict[str, Any], known: dict[str, type | tuple[type, ...]], where: str,
         kind: str | None = None) -> dict[str, Any]:
    """Check ``table`` has only ``known`` keys, each of its type (a bool is not an int): one
    message shape for every table, the queue's and every source kind's. ``kind``: the table
    is a ``[queues.X.source]`` of that kind (``kind`` itself already removed), which the
    message names, so a key of another kind reads as such. A value is shown redacted."""
    unknown = sorted(set(table) - set(known))
    if unknown:
        keys = sorted(known) if kind is None else ["kind", *sorted(known)]
        of = "" if kind is None else f' for kind "{kind}"'
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{of} (known keys: {', '.join(keys)})")
    for k, v in table.items():
        if not isinstance(v, known[k]) or (isinstance(v, bool) and bool not in _tuple(known[k])):
            raise ConfigError(f"{where}.{k}: expected {_typename(known[k])}, "
                              f"got {redact_value(v)!r}")
    return table


def required(table: dict[str, Any], key: str, where: str, example: str) -> str:
    """``table[key]`` (a string, checked by :func:`take`) stripped; a missing or blank one is
    a :class:`ConfigError` showing an example line to add."""
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f'{where}: missing {key!r} (e.g. {key} = "{example}")')
    return value.strip()


def _tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _typename(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in _tuple(t))


def _source(table: dict[str, Any], base: Path, where: str) -> SourceConfig:
    """The ``[queues.X.source]`` table: ``kind`` (default "sql", for configs written before
    there were others) picks the module in :data:`lrq.sources.KINDS` that checks the rest."""
    from lrq import sources  # here, not at import: lrq.sources' kinds import this module

    options = dict(table)
    kind = options.pop("kind", "sql")
    if not isinstance(kind, str):
        raise ConfigError(f"{where}.kind: expected str, got {kind!r}")
    if kind not in sources.KINDS:
        raise ConfigError(f"{where}.kind: unknown source kind {kind!r} "
                          f"(known: {', '.join(sorted(sources.KINDS))})")
    return SourceConfig(kind=kind, settings=sources.parse(kind, options, base, where))


_QUEUE_KEYS: dict[str, type | tuple[type, ...]] = {
    "handler": str, "handler_options": dict, "batch_size": int, "chunk_size": int,
    "workers": int, "key": str, "result_table": str, "model": str, "order": str,
    "max_pending": (int, str), "run_seconds": (int, float, str), "source": dict,
    "retries": int, "backoff": (int, float), "handler_timeout": (int, float, str),
    "lease": (int, float, str), "max_attempts": int, "compress": str,
    "pipeline": bool, "outputs": dict, "batch_max_bytes": (int, str), "separate": str,
    "batch_linger": (int, float, str),
}
#: Keys of an ``[queues.X.outputs.NAME]`` table, any kind; "sql" adds ``model`` and
#: ``result_table``, another kind's own keys go to its ``parse`` (lrq.outputs.KINDS).
_OUTPUT_KEYS: dict[str, type | tuple[type, ...]] = {
    "handler": str, "options": dict, "kind": str, "chunk_size": int, "key": str,
    "aggregate": bool,
}
_SQL_OUTPUT_KEYS: dict[str, type | tuple[type, ...]] = {
    **_OUTPUT_KEYS, "model": str, "result_table": str}


def _output(name: str, table: dict[str, Any], where: str) -> OutputConfig:
    """One ``[queues.X.outputs.NAME]`` table."""
    from lrq import outputs  # here, not at import: lrq.outputs imports this module

    if not QUEUE_NAME.match(name):
        raise ConfigError(f"{where}: output name {name!r} must be letters, digits, _ . -")
    kind = table.get("kind", "sql")
    if not isinstance(kind, str) or kind not in outputs.KINDS:
        raise ConfigError(f"{where}.kind: unknown output kind {kind!r} "
                          f"(known: {', '.join(sorted(outputs.KINDS))})")
    if kind == "sql":
        take(table, _SQL_OUTPUT_KEYS, where)
    else:
        take({k: v for k, v in table.items() if k in _OUTPUT_KEYS}, _OUTPUT_KEYS, where)
    handler = required(table, "handler", where, "workers.apache:parse")
    if "result_table" in table and "model" in table:
        raise ConfigError(f"{where}: set result_table or model, not both")
    if "key" in table and not table.get("aggregate", False):
        raise ConfigError(f"{where}.key: only an aggregating output (aggregate = true) has a key "
                          "of its own; the others' results carry the queue's key")
    if table.get("chunk_size", 1) < 1:
        raise ConfigError(f"{where}.chunk_size: must be at least 1, got {table['chunk_size']}")
    own = {k: v for k, v in table.items() if k not in _OUTPUT_KEYS}  # "sql": none left
    settings = outputs.parse(kind, own, f"{where}") if kind != "sql" else None
    return OutputConfig(name=name, handler=handler, options=table.get("options"), kind=kind,
                        model=table.get("model"), result_table=table.get("result_table"),
                        chunk_size=table.get("chunk_size"), key=table.get("key"),
                        aggregate=table.get("aggregate", False), settings=settings)


def _outputs(table: dict[str, Any], where: str) -> tuple[OutputConfig, ...]:
    """The ``outputs`` tables of a queue; two SQL outputs may not write one table (their
    rows would collide on its unique key)."""
    if not table:
        raise ConfigError(f"{where}: no outputs; add a [{where}.NAME] table with a handler")
    found = tuple(_output(n, t, f"{where}.{n}") if isinstance(t, dict) else
                  _bad(f"{where}.{n} must be a table") for n, t in table.items())
    tables: dict[str, str] = {}
    for o in found:
        if o.kind != "sql":
            continue
        target = f"model {o.model}" if o.model else f"result_table {o.result_table or 'lrq_results'}"
        if target in tables:
            raise ConfigError(f"{where}.{o.name}: {target} is also output {tables[target]!r}'s; "
                              "give each output its own result_table or model")
        tables[target] = o.name
    return found


def _queue(name: str, table: dict[str, Any], base: Path, where: str) -> QueueConfig:
    if not QUEUE_NAME.match(name):
        raise ConfigError(f"{where}: queue name {name!r} must be letters, digits, _ . -")
    take(table, _QUEUE_KEYS, where)
    if "outputs" in table:
        both = [k for k in ("handler", "handler_options", "model", "result_table") if k in table]
        if both:
            raise ConfigError(f"{where}: set {both[0]} in each [{where}.outputs.NAME] table, "
                              "not beside outputs (a queue has a handler or outputs, not both)")
    else:
        required(table, "handler", where, "workers.wordcount:handle")
    if "source" not in table:
        raise ConfigError(f"{where}: missing [{where}.source] table")
    if "result_table" in table and "model" in table:
        raise ConfigError(f"{where}: set result_table or model, not both")
    values = {k: v for k, v in table.items() if k not in ("source", "outputs")}
    if "outputs" in table:
        values["handler"] = ""
        values["outputs"] = _outputs(table["outputs"], f"{where}.outputs")
    if isinstance(values.get("max_pending"), str):
        values["max_pending_bytes"] = parse_bytes(values.pop("max_pending"), f"{where}.max_pending")
        values["max_pending"] = 2**62
    for k in ("run_seconds", "handler_timeout", "lease"):
        if k in values:
            values[k] = positive(parse_duration(values[k], f"{where}.{k}"), f"{where}.{k}")
    if "batch_max_bytes" in values:
        values["batch_max_bytes"] = parse_bytes(values["batch_max_bytes"], f"{where}.batch_max_bytes")
        if values["batch_max_bytes"] < 1:
            raise ConfigError(f"{where}.batch_max_bytes: must be more than 0 bytes, "
                              f"got {table['batch_max_bytes']!r}")
    if "batch_linger" in values:  # 0 is meant here: publish at once
        linger = parse_duration(values["batch_linger"], f"{where}.batch_linger")
        if not linger >= 0:  # also NaN
            raise ConfigError(f"{where}.batch_linger: must be 0 (publish at once) or more "
                              f"seconds, got {linger:g}")
        values["batch_linger"] = 0.0 if linger == 0 else positive(linger, f"{where}.batch_linger")
    if "separate" in values:
        values["separate"] = required(table, "separate", where, "workers.rules:apart")
    if values.get("run_seconds", 1) < 1:
        raise ConfigError(f"{where}.run_seconds: must be at least 1 second (a worker process "
                          f"exits after it), got {values['run_seconds']:g}")
    if values.get("max_pending_bytes", 1) < 1:
        raise ConfigError(f"{where}.max_pending: must be more than 0 bytes, got {table['max_pending']!r}")
    for k, most in (("retries", MAX_RETRIES), ("backoff", MAX_BACKOFF)):
        if not values.get(k, 0) >= 0:
            raise ConfigError(f"{where}.{k}: must be 0 or more, got {values[k]}")
        if not values.get(k, 0) <= most:
            raise ConfigError(f"{where}.{k}: must be at most {most:g}, got {values[k]:g}")
    for k in ("batch_size", "chunk_size", "workers", "max_pending", "max_attempts"):
        if k in values and values[k] < 1:
            raise ConfigError(f"{where}.{k}: must be at least 1, got {values[k]}")
    if values.get("compress", "zstd") not in ("zstd", "zlib", "none"):
        raise ConfigError(f"{where}.compress: must be \"zstd\", \"zlib\" or \"none\", "
                          f"got {values['compress']!r}")
    if values.get("order", "random") not in ("random", "fifo"):
        raise ConfigError(f"{where}.order: must be \"random\" or \"fifo\", got {values['order']!r}")
    source = _source(table["source"], base, f"{where}.source")
    if "batch_size" not in values:
        values["batch_size"] = _kind_batch_size(source.kind)
    return QueueConfig(name=name, source=source, **values)


def _kind_batch_size(kind: str) -> int:
    """The default ``batch_size`` of a queue reading ``kind``: the kind module's
    ``BATCH_SIZE`` where it has one (small items, such as log lines, would otherwise make a
    batch file per 17 KB, and the spool's cost per file bounds the rate), else 100."""
    from lrq import sources

    size = getattr(sources.module(kind), "BATCH_SIZE", None)
    return size if isinstance(size, int) else QueueConfig.batch_size


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise :class:`ConfigError` naming what is wrong."""
    env = os.environ if env is None else env
    p = Path(path or env.get("LRQ_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found; write one with `lrq init` or pass -c FILE") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    return from_dict(raw, p.resolve(), env)


def from_dict(raw: dict[str, Any], path: Path, env: Mapping[str, str] | None = None) -> Config:
    env = {} if env is None else env
    where = str(path)
    take(raw, {"data_dir": str, "db_url": str, "queues": dict, "cleanup": dict,
                "interval": (int, float), "grace": (int, float), "log_file": str,
                "log_max_bytes": (int, str), "log_backups": int, "secret": str,
                "previous_secrets": list, "log_format": str, "http_token": str}, where)
    log_format = raw.get("log_format", Config.log_format)
    if log_format not in ("text", "json"):
        raise ConfigError(f"{where}: log_format {log_format!r}: write \"text\" or \"json\"")
    previous = raw.get("previous_secrets", [])
    if not all(isinstance(x, str) and x for x in previous):
        raise ConfigError(f"{where}: previous_secrets must be a list of non-empty strings "
                          '(earlier values of `secret`), e.g. previous_secrets = ["old key"]')
    base = path.parent
    data_dir = base / env.get("LRQ_DATA_DIR", raw.get("data_dir", "data"))
    db_url = env.get("LRQ_DB_URL") or raw.get("db_url") or f"sqlite:///{data_dir / 'results.db'}"
    db_url = absolute_sqlite(check_url(db_url, f"{where}: db_url"), base)
    queues = {name: _queue(name, t, base, f"queues.{name}") if isinstance(t, dict) else
              _bad(f"queues.{name} must be a table") for name, t in raw.get("queues", {}).items()}
    if not queues:
        raise ConfigError(f"{where}: no queues; add a [queues.NAME] table (see `lrq init`)")
    c = take(dict(raw.get("cleanup", {})), {"keep_done": (int, float, str),
              "keep_failed": (int, float, str), "max_bytes": (int, str), "min_free": str,
              "tmp_age": (int, float, str), "every": (int, float, str)}, "cleanup")
    periods = {k: positive(parse_duration(c.get(k, getattr(CleanupConfig, k)), f"cleanup.{k}"),
                           f"cleanup.{k}", MAX_SECONDS if k == "every" else MAX_KEEP_SECONDS)
               for k in ("keep_done", "keep_failed", "tmp_age", "every")}
    max_bytes = parse_bytes(c.get("max_bytes", CleanupConfig.max_bytes), "cleanup.max_bytes")
    if max_bytes < 1:
        raise ConfigError(f"cleanup.max_bytes: must be more than 0 bytes (at least two batches), "
                          f"got {c['max_bytes']!r}")
    cleanup = CleanupConfig(
        max_bytes=max_bytes,
        min_free=_floor(c.get("min_free", CleanupConfig.min_free)), **periods)
    log_file = Path(base / raw["log_file"]) if "log_file" in raw else data_dir / "lrq.log"
    return Config(
        path=path, data_dir=data_dir, db_url=db_url, queues=queues, cleanup=cleanup,
        interval=positive(float(raw.get("interval", Config.interval)), f"{where}: interval"),
        grace=positive(float(raw.get("grace", Config.grace)), f"{where}: grace"), log_file=log_file,
        log_max_bytes=parse_bytes(raw.get("log_max_bytes", Config.log_max_bytes), "log_max_bytes"),
        log_backups=raw.get("log_backups", Config.log_backups), secret=raw.get("secret"),
        previous_secrets=tuple(previous), log_format=log_format,
        http_token=raw.get("http_token") or None,
    )


def _floor(value: str) -> str:
    from lrq.disk import Floor

    Floor.parse(value, "cleanup.min_free")  # fail at load, not at the first sniff
    return value


def _bad(message: str) -> Any:
    raise ConfigError(message)


def load_object(spec: str, where: str, base: Path | None = None) -> Any:
    """Import ``"package.module:attribute"``; the config's folder is searched first."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where}: {spec!r} must look like \"package.module:name\"")
    if base is not None and str(base) not in sys.path:
        sys.path.insert(0, str(base))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(f"{e.name}.")):
            raise ConfigError(f"{where}: {_import_failure(module_name, e, base)}") from e
        raise ConfigError(f"{where}: cannot import {module_name!r} for {spec!r}: {e}") from e
    except Exception as e:  # the module's own code failed: SyntaxError, NameError, anything
        raise ConfigError(f"{where}: {_import_failure(module_name, e, base)}") from e
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"{where}: module {module_name!r} has no {attr!r}") from None
    return obj


def _import_failure(module_name: str, e: BaseException, base: Path | None) -> str:
    """One line for a module whose import raised: the error and the file and line it came
    from (a SyntaxError's own; else the innermost frame outside the standard library and
    site-packages, so a module that calls a library names its own line)."""
    if isinstance(e, SyntaxError):
        what, file, line = f"SyntaxError: {e.msg}", e.filename, e.lineno
    else:
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if not f.filename.startswith("<")]  # importlib's frozen bootstrap
        lib = tuple({sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"),
                     sysconfig.get_path("platlib")} - {None})
        own = [f for f in frames if not f.filename.startswith(lib)] or frames
        what = f"{type(e).__name__}: {e}"
        file, line = (own[-1].filename, own[-1].lineno) if own else (None, None)
    where = ""
    if file:
        shown = Path(file)
        if base is not None and shown.is_relative_to(base):
            shown = shown.relative_to(base)
        where = f" ({shown}, line {line})"
    return f"importing module {module_name!r} failed: {what}{where}"


def load_handler(queue: QueueConfig, base: Path | None = None,
                 output: OutputConfig | None = None) -> Callable[[list[dict]], list[dict]]:
    """The queue's handler, or the handler of one of its ``outputs``."""
    where = f"queues.{queue.name}.handler"
    if output is not None and queue.outputs:
        where = f"queues.{queue.name}.outputs.{output.name}.handler"
        queue = queue.for_output(output)
    target = load_object(queue.handler, where, base)
    if queue.handler_options is not None:
        try:
            target = target(**queue.handler_options)
        except Exception as e:
            raise ConfigError(f"{where}: building {queue.handler}(**handler_options) failed: "
                              f"{type(e).__name__}: {e}") from e
    if not callable(target):
        raise ConfigError(f"{where}: {queue.handler!r} is not callable")
    return target

