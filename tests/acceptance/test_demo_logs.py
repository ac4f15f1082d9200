"""``make demo-logs``'s pipeline (demo-logs.toml) as a subprocess: a sample day of access
logs rotated twice, ``lrq run --until-idle``, ``lrq verify`` exact per output, and the
stored lines and windows equal to a direct computation from the generated files."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import windowref
from lrqtest import ROOT, lrq
from sqlalchemy import create_engine, text

from workers.apache import Access, parse_line
from workers.apache_sample import read_day, stored_rows, write_day

pytestmark = pytest.mark.slow


def demo_config(folder: Path) -> Path:
    """demo-logs.toml, its paths moved into ``folder`` and the scheduler's tick shortened."""
    cfg = (ROOT / "demo-logs.toml").read_text()
    for old, new in (('data_dir = "data/demo-logs"', 'data_dir = "data"\ninterval = 0.2'),
                     ("sqlite:///data/demo-logs/results.db", "sqlite:///results.db"),
                     ("data/demo-logs/logs/", "logs/")):
        assert old in cfg, old
        cfg = cfg.replace(old, new)
    path = folder / "lrq.toml"
    path.write_text(cfg)
    return path


def split(lines: list[str]) -> tuple[list[Access], list[str]]:
    good, bad = [], []
    for s in lines:
        try:
            good.append(parse_line(s))
        except ValueError:
            bad.append(s)
    return good, bad


def test_demo_logs_store_every_line_once_and_the_windows_of_a_direct_computation(
        tmp_path: Path) -> None:
    write_day(tmp_path / "logs", lines=9000, seed=5, bad=4)
    good, bad = split(read_day(tmp_path / "logs"))
    assert len(bad) == 4
    cfg = demo_config(tmp_path)

    run = lrq("-c", str(cfg), "run", "--until-idle", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    verify = lrq("-c", str(cfg), "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr[-2000:]

    url = f"sqlite:///{tmp_path / 'results.db'}"
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(text(
            "SELECT remote, remote_user, ts, method, url, protocol, status, size, referer, agent "
            "FROM access_lines")).all()
        dead = conn.execute(text("SELECT item FROM lrq_dead_letters")).scalars().all()
    engine.dispose()
    # every good line exactly once, parsed as the parser parses it
    assert Counter(Access(*r) for r in stored) == Counter(good)
    # every bad line a dead letter of each of the three outputs, with its text
    lines = Counter((json.loads(d) if isinstance(d, str) else d)["line"] for d in dead)
    assert lines == Counter({s: 3 for s in bad})

    status = {r["id"]: r["requests"] for r in stored_rows(url, "access_status_windows")}
    assert status == windowref.status_counts(good, 60, 10)
    remote = {r["id"]: (r["requests"], r["bytes"]) for r in stored_rows(url, "access_remote_windows")}
    assert remote == windowref.remote_counts(good, 3600, 900)
