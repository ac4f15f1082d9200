"""Bad configuration: one clear line naming the problem, exit code 2."""
from __future__ import annotations

from pathlib import Path

import pytest

from lrq import config
from lrq.errors import ConfigError
from lrqtest import lrq, write_config


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
    (lambda t: t.replace("[queues.docs]", "[queues.docs]\nmodel = \"workers.models:DocEntMap\""),
     "set result_table or model, not both"),
    (lambda t: t.replace("data_dir", "[broken"), "not valid TOML"),
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
