"""Bad configuration: one clear line naming the problem, exit code 2."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from lrqtest import lrq, write_config

from lrq import config
from lrq.errors import ConfigError
from lrq.sources import KINDS, module, parse


def test_starter_config_loads(tmp_path: Path) -> None:
    r = lrq("-c", str(tmp_path / "lrq.toml"), "init", cwd=tmp_path)
    assert r.returncode == 0
    cfg = config.load(tmp_path / "lrq.toml")
    q = cfg.queues["docs"]
    assert (q.batch_size, q.chunk_size, q.key) == (100, 10, "doc_id")
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.db_url == f"sqlite:///{tmp_path}/data/results.db"
    assert cfg.cleanup.keep_done == 7 * 86400 and cfg.cleanup.max_bytes == 10**10
    assert lrq("-c", str(tmp_path / "lrq.toml"), "init", cwd=tmp_path).returncode == 2


def test_env_overrides(tmp_path: Path) -> None:
    path = write_config(tmp_path, docs=None)
    cfg = config.load(path, env={"LRQ_DB_URL": "postgresql://u@127.0.0.1/x", "LRQ_DATA_DIR": "/srv/q"})
    assert cfg.db_url == "postgresql://u@127.0.0.1/x" and cfg.data_dir == Path("/srv/q")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("batch_size", "bacth_size"), "unknown key 'bacth_size'"),
    (lambda t: t.replace('handler = "workers.wordcount:handle"', 'handler = "workers.nope:handle"'),
     "cannot import 'workers.nope'"),
    (lambda t: t.replace('handler = "workers.wordcount:handle"', 'handler = "workers.wordcount:nope"'),
     "has no 'nope'"),
    (lambda t: t.replace('db_url = "sqlite:///results.db"', 'db_url = "not a url"'),
     "is not a database URL"),
    (lambda t: t.replace("batch_size = 100", "batch_size = 0"), "batch_size: must be at least 1"),
    (lambda t: t.replace("batch_size = 100", 'batch_size = "many"'), "expected int"),
    (lambda t: t.replace('kind = "sql"', 'kind = "ftp"'), "unknown source kind 'ftp'"),
    (lambda t: t + "[cleanup]\nkeep_done = \"forever\"\n", "not a duration"),
    (lambda t: t + "[cleanup]\nmax_bytes = \"lots\"\n", "not a size"),
    (lambda t: t.replace("batch_size = 100", "batch_size = 100\nlease = inf"),
     "queues.docs.lease: must be at most"),
    (lambda t: t.replace("[queues.docs]", "[queues.docs]\nmodel = \"workers.models:DocEntMap\""),
     "set result_table or model, not both"),
    (lambda t: t.replace("data_dir", "[broken"), "not valid TOML"),
    (lambda t: t.replace('key = "doc_id"', 'key = "nokey"'),
     "queues.docs.key: 'nokey' is not a field of the source's items (fields: id, doc_id, content)"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, edit, message) -> None:
    path = write_config(tmp_path, docs=10)
    path.write_text(edit(path.read_text()))
    r = lrq("-c", str(path), "work", "--once", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("lrq: ")  # no traceback


def test_missing_config_file(tmp_path: Path) -> None:
    r = lrq("status", cwd=tmp_path, env={"LRQ_CONFIG": ""})
    assert r.returncode == 2 and "lrq.toml not found" in r.stderr and "lrq init" in r.stderr


def test_unknown_queue(tmp_path: Path) -> None:
    r = lrq("-c", str(write_config(tmp_path, docs=10)), "work", "nope", "--once")
    assert r.returncode == 2 and "no queue named 'nope'" in r.stderr


def test_durations_and_sizes() -> None:
    assert config.parse_duration("12h", "x") == 43200 and config.parse_duration(5, "x") == 5.0
    assert config.parse_bytes("512MiB", "x") == 512 * 2**20 and config.parse_bytes("1.5GB", "x") == 1.5e9
    with pytest.raises(ConfigError):
        config.parse_bytes("-1GB", "x")


def test_stored_json_is_compact_utf8_with_str_for_other_values() -> None:
    from datetime import datetime
    from decimal import Decimal

    from lrq.db import dumps_json

    assert dumps_json({"a": "é", 1: [1.5, None, True]}) == '{"a":"é","1":[1.5,null,true]}'
    assert dumps_json({"at": datetime(2026, 1, 1, 8), "d": Decimal("1.5")}) == \
        '{"at":"2026-01-01 08:00:00","d":"1.5"}'
    assert dumps_json({"n": float("nan")}) == '{"n":null}'  # PostgreSQL's JSON rejects NaN
    assert dumps_json({"big": 2 ** 70}) == '{"big": 1180591620717411303424}'  # stdlib fallback


@pytest.mark.parametrize("queue_keys, top, message", [
    ({"run_seconds": 0}, {}, "queues.docs.run_seconds: must be more than 0 seconds, got 0"),
    ({"run_seconds": 0.2}, {}, "queues.docs.run_seconds: must be at least 1 second"),
    ({"backoff": -1}, {}, "queues.docs.backoff: must be 0 or more, got -1"),
    ({"handler_timeout": 0}, {}, "queues.docs.handler_timeout: must be more than 0 seconds"),
    ({"handler_timeout": -5}, {}, "queues.docs.handler_timeout: must be more than 0 seconds"),
    ({"lease": 0}, {}, "queues.docs.lease: must be more than 0 seconds"),
    ({"lease": "-1"}, {}, "not a duration"),
    ({"max_pending": "0B"}, {}, "queues.docs.max_pending: must be more than 0 bytes"),
    ({}, {"grace": 0}, "grace: must be more than 0 seconds, got 0"),
    ({}, {"interval": -1}, "interval: must be more than 0 seconds, got -1"),
    ({}, {"interval": 0.0}, "interval: must be more than 0 seconds"),
    ({}, {"cleanup": {"every": 0}}, "cleanup.every: must be more than 0 seconds"),
    ({}, {"cleanup": {"tmp_age": "0s"}}, "cleanup.tmp_age: must be more than 0 seconds"),
    ({}, {"cleanup": {"keep_failed": 0}}, "cleanup.keep_failed: must be more than 0 seconds"),
    ({}, {"cleanup": {"keep_done": -1}}, "cleanup.keep_done: must be more than 0 seconds"),
    ({}, {"cleanup": {"max_bytes": 0}}, "cleanup.max_bytes: must be more than 0 bytes"),
    ({}, {"cleanup": {"max_bytes": "0KB"}}, "cleanup.max_bytes: must be more than 0 bytes"),
])
def test_zero_or_negative_settings_are_config_errors(tmp_path: Path, queue_keys, top,
                                                      message) -> None:
    """Each of these was accepted and then misbehaved: endless spawns, a crashed worker,
    claims reclaimed from live workers, spinning jobs, failed batches deleted at once."""
    path = write_config(tmp_path, docs=None, top=top, **queue_keys)
    with pytest.raises(ConfigError, match="^.*" + message.replace(".", r"\.")) as e:
        config.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("queue_keys, top, message", [
    ({}, {"interval": float("inf")}, "interval: must be at most 2.592e+06 seconds (30 days), got inf"),
    ({"lease": float("inf")}, {}, "queues.docs.lease: must be at most"),
    ({"lease": 1e300}, {}, "queues.docs.lease: must be at most 2.592e+06 seconds (30 days), got 1e+300"),
    ({"handler_timeout": 1e12}, {}, "queues.docs.handler_timeout: must be at most"),
    ({"run_seconds": "31d"}, {}, "queues.docs.run_seconds: must be at most"),
    ({}, {"grace": float("inf")}, "grace: must be at most"),
    ({}, {"cleanup": {"every": "31d"}}, "cleanup.every: must be at most"),
    ({}, {"cleanup": {"keep_done": float("inf")}}, "cleanup.keep_done: must be at most 3.1536e+08 "
                                                  "seconds (3650 days), got inf"),
    ({}, {"cleanup": {"keep_failed": "3651d"}}, "cleanup.keep_failed: must be at most"),
    ({}, {"cleanup": {"tmp_age": float("nan")}}, "cleanup.tmp_age: must be more than 0 seconds"),
    ({"backoff": float("inf")}, {}, "queues.docs.backoff: must be at most 86400, got inf"),
    ({"backoff": float("nan")}, {}, "queues.docs.backoff: must be 0 or more, got nan"),
    ({"retries": 101}, {}, "queues.docs.retries: must be at most 100, got 101"),
])
def test_infinite_or_huge_settings_are_config_errors(tmp_path: Path, queue_keys, top,
                                                     message) -> None:
    """Each was accepted, then crashed: OverflowError in the scheduler (interval), the
    heartbeat thread's sleep (lease) or setitimer on every handler call (handler_timeout)."""
    path = write_config(tmp_path, docs=None, top=top, **queue_keys)
    with pytest.raises(ConfigError, match="^.*" + re.escape(message)) as e:
        config.load(path)
    assert "\n" not in str(e.value)


def test_long_retention_and_the_duration_caps_themselves_are_allowed(tmp_path: Path) -> None:
    cfg = config.load(write_config(tmp_path, docs=None, lease="30d", handler_timeout=2592000,
                                   backoff=86400, retries=100,
                                   top={"cleanup": {"keep_done": "3650d", "keep_failed": "1000d",
                                                    "tmp_age": "400d"}}))
    q = cfg.queues["docs"]
    assert (q.lease, q.handler_timeout, q.backoff, q.retries) == (2592000, 2592000, 86400, 100)
    assert cfg.cleanup.keep_done == 3650 * 86400 and cfg.cleanup.tmp_age == 400 * 86400


def test_zero_or_negative_settings_still_allow_the_edges(tmp_path: Path) -> None:
    cfg = config.load(write_config(tmp_path, docs=None, backoff=0, retries=0, run_seconds=1,
                                   lease=0.5, max_pending="1B", top={"interval": 0.01}))
    q = cfg.queues["docs"]
    assert (q.backoff, q.run_seconds, q.lease, q.max_pending_bytes) == (0, 1, 0.5, 1)


def test_a_bad_number_is_one_line_and_exit_2_on_the_command_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, docs=10, backoff=-1)
    r = lrq("-c", str(path), "run", "--until-idle", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "lrq: queues.docs.backoff: must be 0 or more, got -1\n"


@pytest.mark.parametrize("command", [("run", "--until-idle"), ("sniff",), ("work", "--burst")])
def test_a_key_the_source_lacks_stops_every_command_at_start_up(tmp_path: Path, command) -> None:
    """Found before a batch is published or claimed, not by every batch failing. Without a
    ``columns`` mapping the fields are the table's reflected columns."""
    path = write_config(tmp_path, docs=300, source={"columns": []})  # mid, not doc_id
    r = lrq("-c", str(path), *command, cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("lrq: queues.docs.key: 'doc_id' is not a field of the source's items "
                        "(fields: id, mid, content, created); set key to one of them, or map a "
                        "column to it in [queues.docs.source] columns\n")
    assert not list((tmp_path / "data" / "docs" / "left").glob("*.pkl"))


def test_source_kinds_come_from_the_registry_and_check_their_own_options(tmp_path: Path) -> None:
    from lrq.sources import sql, sqlite_broker

    base = write_config(tmp_path, docs=None)
    q = config.load(base).queues["docs"]
    assert q.source.kind == "sql" and isinstance(q.source.settings, sql.Settings)
    assert q.source.settings.url == f"sqlite:///{tmp_path}/source.db"  # made absolute
    text = base.read_text()
    base.write_text(text.replace('kind = "sql"\n', ""))  # an old config: sql by default
    assert config.load(base).queues["docs"].source.kind == "sql"
    broker = text[:text.index("[queues.docs.source]")] + \
        '[queues.docs.source]\nkind = "sqlite-broker"\npath = "b.db"\nclaim_idle = "2m"\n'
    base.write_text(broker)
    s = config.load(base).queues["docs"].source.settings
    assert isinstance(s, sqlite_broker.Settings) and (s.path, s.claim_idle) == (
        str(tmp_path / "b.db"), 120.0)
    base.write_text(broker + 'url = "sqlite:///x.db"\n')  # another kind's option
    with pytest.raises(ConfigError, match=r"queues.docs.source: unknown key 'url' for kind "
                                          r"\"sqlite-broker\" \(known keys: kind, claim_idle, "
                                          r"consumer, path\)"):
        config.load(base)
    base.write_text(broker.replace('"sqlite-broker"', '"kafak"'))
    with pytest.raises(ConfigError, match=r"unknown source kind 'kafak' \(known: [a-z, -]*\bsql\b"):
        config.load(base)


def test_a_source_url_password_never_shows_in_its_error() -> None:
    from lrq.errors import SourceError
    from lrq.sources.sql import Settings, SqlSource

    with pytest.raises(SourceError) as e:  # nothing listens on port 1
        SqlSource(Settings(url="postgresql://lrq:s3cret@127.0.0.1:1/x", table="t"))
    assert "s3cret" not in str(e.value) and "***" in str(e.value)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_source_kind_checks_its_table_with_the_same_messages(kind: str) -> None:
    """config.take for every kind: an unknown key names the kind and the known keys (the fix);
    a value of the wrong type names the option and the type, and shows no password."""
    where = "queues.q.source"
    with pytest.raises(ConfigError) as e:
        parse(kind, {"nonsense": 1}, Path("."), where)
    assert str(e.value).startswith(f"{where}: unknown key 'nonsense' for kind \"{kind}\" "
                                   "(known keys: kind, "), str(e.value)
    option = next(o for o in ("url", "brokers", "path", "max_request_bytes", "encoding")  # of every kind
                  if o in module(kind).Settings.__dataclass_fields__)
    with pytest.raises(ConfigError) as e:
        parse(kind, {option: ["redis://:pw@h/0"]}, Path("."), where)
    assert str(e.value).startswith(f"{where}.{option}: expected ") and \
        str(e.value).endswith("got ['redis://:***@h/0']"), str(e.value)


@pytest.mark.parametrize("given, expected", [(None, 1000), (50, 50)])
def test_a_log_queue_batches_1000_lines_unless_told(tmp_path: Path, given: int | None,
                                                   expected: int) -> None:
    """Log lines are small: a log queue's default batch is the kind's BATCH_SIZE (1000), and a
    ``batch_size`` in the file wins; other kinds keep 100 (test_starter_config_loads)."""
    size = "" if given is None else f"batch_size = {given}\n"
    path = tmp_path / "lrq.toml"
    path.write_text('data_dir = "data"\ndb_url = "sqlite:///r.db"\n[queues.logs]\n'
                    f'handler = "workers.wordcount:handle"\nkey = "id"\n{size}'
                    '[queues.logs.source]\nkind = "logfile"\npaths = ["a.log"]\n')
    assert config.load(path).queues["logs"].batch_size == expected
