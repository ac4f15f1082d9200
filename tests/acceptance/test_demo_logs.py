"""``make demo-logs``'s pipeline (demo-logs.toml) as a subprocess: a sample day of access
logs rotated twice, ``lrq run --until-idle``, ``lrq verify`` exact per output, and the
stored lines and windows equal to a direct computation from the generated files."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import windowref
from lrqtest import ROOT, killed_on_exit, lrq, poll
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

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


def check_stored(folder: Path, good: list[Access], bad: list[str]) -> None:
    """``lrq verify`` is exact; every good line stored once, every bad one a dead letter of
    each output with its text; the windows those of a direct computation."""
    verify = lrq("-c", str(folder / "lrq.toml"), "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr[-2000:]
    outputs = json.loads(verify.stdout)[0]["outputs"]  # exact per output
    assert set(outputs) == {"lines", "status_per_minute", "per_remote"}
    assert all(o["ok"] and o["missing"] == o["duplicated"] == 0 for o in outputs.values())
    assert outputs["lines"]["results"] == len(good)
    assert [o["dead"] for o in outputs.values()] == [len(bad)] * 3
    url = f"sqlite:///{folder / 'results.db'}"
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(text(
            "SELECT remote, remote_user, ts, method, url, protocol, status, size, referer, agent "
            "FROM access_lines")).all()
        dead = conn.execute(text("SELECT item FROM lrq_dead_letters")).scalars().all()
    engine.dispose()
    assert Counter(Access(*r) for r in stored) == Counter(good)
    lines = Counter((json.loads(d) if isinstance(d, str) else d)["line"] for d in dead)
    assert lines == Counter({s: 3 for s in bad})
    status = {r["id"]: r["requests"] for r in stored_rows(url, "access_status_windows")}
    assert status == windowref.status_counts(good, 60, 10)
    remote = {r["id"]: (r["requests"], r["bytes"]) for r in stored_rows(url, "access_remote_windows")}
    assert remote == windowref.remote_counts(good, 3600, 900)


def handled(folder: Path) -> int:
    """Lines the ``lines`` output has stored or dead-lettered so far."""
    if not (folder / "results.db").exists():
        return 0
    engine = create_engine(f"sqlite:///{folder / 'results.db'}")
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT (SELECT COUNT(*) FROM access_lines) + (SELECT COUNT(*) FROM "
                "lrq_dead_letters WHERE key LIKE 'lines/%')")).scalar_one())
    except OperationalError:  # tables not made yet
        return 0
    finally:
        engine.dispose()


def test_demo_logs_store_every_line_once_and_the_windows_of_a_direct_computation(
        tmp_path: Path) -> None:
    write_day(tmp_path / "logs", lines=9000, seed=5, bad=4)
    good, bad = split(read_day(tmp_path / "logs"))
    assert len(bad) == 4
    cfg = demo_config(tmp_path)
    run = lrq("-c", str(cfg), "run", "--until-idle", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    check_stored(tmp_path, good, bad)


def test_a_running_tail_sees_the_day_written_and_rotated(tmp_path: Path) -> None:
    """The sample written in steps (--pause) while ``lrq run`` tails it: the two rotations
    happen under the running source, and the result is the same as from finished files."""
    cfg = demo_config(tmp_path)
    (tmp_path / "logs").mkdir()
    with open(tmp_path / "run.log", "w") as out, killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "-c", str(cfg), "run"], cwd=ROOT, text=True,
            stdout=out, stderr=subprocess.STDOUT)) as run:
        subprocess.run([sys.executable, "-m", "workers.apache_sample", "--out",
                        str(tmp_path / "logs"), "--lines", "6000", "--seed", "9", "--bad", "3",
                        "--pause", "1"], cwd=ROOT, check=True, timeout=120)
        assert poll(lambda: handled(tmp_path) >= 6000, 300) and handled(tmp_path) == 6000
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    # the log source's events for lines it could not read, or read twice
    for event in ("lost path=", "truncated path=", "Traceback"):
        assert event not in log, log[-3000:]
    good, bad = split(read_day(tmp_path / "logs"))
    assert len(bad) == 3
    check_stored(tmp_path, good, bad)


def test_windows_stay_exact_when_batches_are_replayed(tmp_path: Path) -> None:
    """Batches stored twice by a crash's retry add nothing to the windows: a worker killed
    after its commit and before the batch is marked done (the batch is handled again after
    the reaper takes it back: its ledger row stops the replay), and one killed between two
    outputs' inserts (nothing of it committed). The windows then equal the direct
    computation, as after a clean run."""
    write_day(tmp_path / "logs", lines=3000, seed=7, bad=2)
    good, bad = split(read_day(tmp_path / "logs"))
    cfg = demo_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("batch_size = 2000", "batch_size = 500"))
    c = ["-c", str(cfg)]
    lrq(*c, "sniff", check=True)
    for point in ("after-commit", "between-outputs"):
        r = lrq(*c, "work", "--once", env={"LRQ_FAILPOINT": point})
        assert r.returncode == -signal.SIGKILL, f"{point} was not reached:\n{r.stderr[-2000:]}"
    assert "reclaim 2 stale claims" in lrq(*c, "cleanup", check=True).stdout
    run = lrq(*c, "run", "--until-idle", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    check_stored(tmp_path, good, bad)
