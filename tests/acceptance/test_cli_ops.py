"""The small things an operator meets at the command line: ``--version``, output into a
closed pipe, ``status`` with the database down, ``cleanup --json``, ``show``'s times and a
dead owner's end, and a handler module that fails while it is imported."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import pytest
from lrqtest import ROOT, lrq, write_config


def test_version() -> None:
    r = lrq("--version")
    assert (r.returncode, r.stdout) == (0, f"lrq {version('lrq')}\n")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sniffed(tmp_path: Path, **keys: object) -> tuple[Path, str]:
    cfg = write_config(tmp_path, docs=200, **keys)
    lrq("-c", str(cfg), "sniff", check=True)
    return cfg, sorted((tmp_path / "data/docs/left").glob("*.pkl"))[0].stem


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_output_into_a_closed_pipe_exits_141_without_a_traceback(
        tmp_path: Path, unbuffered: bool) -> None:
    cfg, name = _sniffed(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"  # every print writes at once, as a long output does
    for command in (["show", name], ["status"], ["dead"], ["verify"], ["--version"]):
        read, write = os.pipe()
        os.close(read)  # `| head -1` that has already exited
        try:
            p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), *command],
                               stdout=write, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=ROOT, timeout=60)
        finally:
            os.close(write)
        assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, (command, p.stderr)
        # argparse's --version swallows the write error itself; everything else says 141.
        assert p.returncode == (0 if unbuffered and command == ["--version"] else 141), command


@pytest.mark.parametrize("url", ["closed-port", "sqlite-directory"])
def test_status_with_the_database_down_shows_the_spool_and_says_why(
        tmp_path: Path, url: str) -> None:
    cfg, _ = _sniffed(tmp_path)
    (tmp_path / "dir.db").mkdir()
    db = (f"postgresql://lrq:x@127.0.0.1:{_closed_port()}/lrq" if url == "closed-port"
          else f"sqlite:///{tmp_path / 'dir.db'}")
    r = lrq("-c", str(cfg), "status", env={"LRQ_DB_URL": db})
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["queue", "pending", "claimed"]
    assert lines[1].split()[:2] == ["docs", "2"]
    assert "results" not in lines[0] and "dead" not in lines[0]  # the database's columns
    assert lines[2].startswith("bytes by state: ") and lines[3].startswith("data dir ")
    assert lines[-1].startswith("database unreachable: ") and len(lines) == 5
    assert ("refused" if url == "closed-port" else "unable to open") in lines[-1]
    j = lrq("-c", str(cfg), "status", "--json", env={"LRQ_DB_URL": db})
    st = json.loads(j.stdout)
    assert j.returncode == 1 and st["queues"]["docs"]["pending"] == 2
    assert "\n" not in st["database"]["error"] and st["database"]["error"] in lines[-1]


def test_cleanup_json_prints_only_json(tmp_path: Path) -> None:
    cfg, _ = _sniffed(tmp_path)
    for extra in ([], ["--dry-run"]):
        r = lrq("-c", str(cfg), "cleanup", "--json", *extra, check=True)
        assert [rep["queue"] for rep in json.loads(r.stdout)] == ["docs"]


def test_show_gives_iso_times_and_a_dead_owners_exit(tmp_path: Path) -> None:
    cfg, name = _sniffed(tmp_path)
    t = datetime(2026, 11, 23, 6, 45, 12, 123000, tzinfo=UTC).timestamp()
    history = [
        {"attempt": 1, "host": "h", "pid": 11, "claimed_at": t - 60, "ended_at": t,
         "reason": "owner pid 11 is dead", "exit": {"code": None, "signal": "SIGKILL"}},
        {"attempt": 2, "host": "h", "pid": 12, "claimed_at": t, "ended_at": t + 1,
         "reason": "owner pid 12 is dead", "exit": {"code": 3, "signal": None}},
        {"attempt": 3, "host": "h", "pid": 13, "claimed_at": t, "ended_at": t + 2,
         "reason": "no heartbeat for 90s (lease 60s)"},
    ]
    (tmp_path / f"data/docs/right/{name}.attempt").write_text(
        json.dumps({"attempts": 3, "history": history}))
    shown = json.loads(lrq("-c", str(cfg), "show", name, check=True).stdout)
    got = shown["attempts"]["history"]
    assert [h["reason"] for h in got] == ["owner pid 11 is dead (killed by SIGKILL)",
                                          "owner pid 12 is dead (exit code 3)",
                                          "no heartbeat for 90s (lease 60s)"]
    assert (got[0]["claimed_at"], got[0]["ended_at"]) == ("2026-11-23T06:44:12.123Z",
                                                          "2026-11-23T06:45:12.123Z")
    assert got[0]["exit"] == {"code": None, "signal": "SIGKILL"}
    created = datetime.fromisoformat(shown["created"].replace("Z", "+00:00"))
    assert abs(created - datetime.now(UTC)).total_seconds() < 3600


@pytest.mark.parametrize("source, error, line", [
    ("import os\n\nRATIO = 1 / 0\n", "ZeroDivisionError: division by zero", 3),
    ("def handle(items:\n    return items\n", "SyntaxError: ", 1),
    ("def handle(items):\n    return items\n\nhandle(undefined)\n",
     "NameError: name 'undefined' is not defined", 4),
    ("import no_such_dependency_xyz\n", "ModuleNotFoundError: No module named "
     "'no_such_dependency_xyz'", 1),
], ids=["ZeroDivisionError", "SyntaxError", "NameError", "missing-dependency"])
def test_a_handler_module_failing_on_import_is_one_line_naming_file_and_line(
        tmp_path: Path, source: str, error: str, line: int) -> None:
    (tmp_path / "badpkg").mkdir()
    (tmp_path / "badpkg/__init__.py").write_text("")
    (tmp_path / "badpkg/broken.py").write_text(source)
    cfg = write_config(tmp_path, docs=10, handler="badpkg.broken:handle")
    r = lrq("-c", str(cfg), "work", "--once")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (msg,) = r.stderr.strip().splitlines()
    assert msg.startswith("lrq: queues.docs.handler: importing module 'badpkg.broken' failed: "
                          + error), msg
    assert msg.endswith(f" (badpkg/broken.py, line {line})"), msg
