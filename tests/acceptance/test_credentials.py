"""Passwords in database and source URLs never appear in ``lrq status`` (plain or JSON), in
configuration errors, or in the log of a failed connection (issue 13, "Credentials")."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lrqtest
import pytest
import servers

from lrq import cli, config
from lrq.errors import DatabaseUnreachable

PW = "Hunter2-s3cret"


def dead_pg_url() -> str:
    """A PostgreSQL URL with a password (in the user part and the query) at a port nothing
    listens on: every connection fails, as with a database that is down."""
    return (f"postgresql+psycopg://lrq:{PW}@127.0.0.1:{servers.free_port()}/lrq"
            f"?sslpassword={PW}&connect_timeout=5")


@pytest.fixture
def down(tmp_path: Path) -> Path:
    return lrqtest.write_config(tmp_path, docs=None, top={"db_url": dead_pg_url()})


@pytest.mark.parametrize("args", [("status",), ("status", "--json")])
def test_status_of_an_unreachable_database_shows_no_password(down: Path, args: tuple[str, ...]) -> None:
    p = lrqtest.lrq("-c", str(down), *args)
    assert p.returncode == cli.EXIT_PROBLEM, p.stderr
    out = p.stdout + p.stderr
    assert PW not in out
    shown = json.loads(p.stdout)["database"]["error"] if "--json" in args else out
    assert "postgresql+psycopg://lrq:***@127.0.0.1:" in shown and "sslpassword=***" in shown


@pytest.mark.parametrize("where", ["db_url", "source"])
def test_a_config_error_about_a_url_shows_no_password(tmp_path: Path, where: str) -> None:
    bad = f"postgresql://lrq:{PW}@db.example:port/lrq"  # not a number: not a database URL
    path = lrqtest.write_config(tmp_path, docs=None, **(
        {"top": {"db_url": bad}} if where == "db_url" else {"source": {"url": bad}}))
    p = lrqtest.lrq("-c", str(path), "status")
    assert p.returncode == cli.EXIT_USAGE
    assert "'postgresql://lrq:***@db.example:port/lrq' is not a database URL" in p.stderr
    assert PW not in p.stdout + p.stderr and "Traceback" not in p.stderr


def test_the_log_of_a_failed_connection_shows_no_password(
        down: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """lrq's own log destinations (stderr and the log file, as ``lrq run`` sets them up) with
    the error a real failed connection raises, logged as the worker logs it, traceback too."""
    from lrq.app import App

    cfg = config.load(down)
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        cli._setup_logging(verbose=False)
        cli._log_to_file(cfg)
        with pytest.raises(DatabaseUnreachable) as e:
            App(cfg).sink(cfg.queues["docs"])
        log = logging.getLogger("lrq.worker")
        log.warning("backoff queue=docs seconds=1.0 error=%s", e.value)
        log.error("connect-failed url=%s", cfg.db_url, exc_info=e.value)
    finally:
        for h in root.handlers[len(before):]:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
    err = capfd.readouterr().err
    assert cfg.log_file is not None
    text = cfg.log_file.read_text()
    for shown in (err, text):
        assert "backoff queue=docs" in shown and "Traceback" in shown
        assert "lrq:***@127.0.0.1" in shown and "sslpassword=***" in shown
        assert PW not in shown
