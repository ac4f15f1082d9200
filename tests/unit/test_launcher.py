"""Worker processes forked from the warm server: title, session, stderr relay, environment,
exit codes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lrqtest import poll, write_config

from lrq import process
from lrq.launcher import Launcher
from lrq.spool import start_of


def test_a_forked_worker_relays_its_log_and_exits_as_lrq_work(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=None)
    launcher = Launcher()
    launcher.warm()
    child = launcher.spawn(["-c", str(cfg), "work", "docs", "--once"], "lrq work docs",
                           {**os.environ, "LRQ_CHILD": "1"})
    lines = list(child.lines())  # until the child exits
    assert child.wait(timeout=60) == 0
    # LRQ_CHILD reached the child: its log lines carry no timestamp (the relay adds one).
    assert "INFO lrq: idle queue=docs nothing pending\n" in lines

    bad = launcher.spawn(["-c", str(cfg), "work", "nosuchqueue"], "lrq work nosuchqueue",
                         dict(os.environ))
    assert any("nosuchqueue" in line for line in bad.lines())
    assert bad.wait(timeout=60) == 2  # a usage error, as `lrq work` exits


def test_a_forked_worker_has_its_title_and_session_and_stops_on_signals(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=None)
    launcher = Launcher()
    title = f"lrq work docs -c {cfg}"
    argv = ["-c", str(cfg), "work", "docs", "--idle-exit", "60"]
    calm = launcher.spawn(argv, title, dict(os.environ))
    assert poll(lambda: Path(f"/proc/{calm.pid}/cmdline").read_bytes()
                      .startswith(title.encode())), "ps never showed the worker's title"
    assert os.getsid(calm.pid) == calm.pid  # its own session: a terminal's Ctrl-C skips it
    lines = calm.lines()
    assert f"working queue=docs pid={calm.pid}" in next(lines)  # its signal handlers are set
    calm.send_signal(signal.SIGTERM)
    assert any("stopping signal=SIGTERM" in line for line in lines)
    assert calm.wait(timeout=60) == 0  # lrq work's graceful stop

    killed = launcher.spawn(argv, title, dict(os.environ))
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    killed.send_signal(signal.SIGTERM)  # already gone: no error


def test_a_forked_worker_stops_once_its_scheduler_is_gone(tmp_path: Path) -> None:
    """The second line behind PR_SET_PDEATHSIG: the scheduler named in the environment is
    checked at the child's start and every second after."""
    cfg = write_config(tmp_path, docs=None)
    argv = ["-c", str(cfg), "work", "docs", "--idle-exit", "30"]
    launcher = Launcher()
    scheduler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        named = f"{scheduler.pid}:{start_of(scheduler.pid)}"
        child = launcher.spawn(argv, "lrq work docs",
                               {**os.environ, "LRQ_CHILD": "1", process.SCHEDULER_ENV: named})
        lines = child.lines()
        assert f"working queue=docs pid={child.pid}" in next(lines)  # its handlers are set
        workers = tmp_path / "data/docs/workers"
        assert [p.name for p in workers.iterdir()] == [f"{child.pid}-{start_of(child.pid)}"]
    finally:
        scheduler.kill()
        scheduler.wait()
    rest = list(lines)
    assert child.wait(timeout=60) == 0
    assert any(f"orphaned: scheduler pid {scheduler.pid} is gone; stopping" in line
               for line in rest), rest
    assert any("stopping signal=SIGTERM" in line for line in rest)  # lrq work's graceful stop
    assert list(workers.iterdir()) == []  # its worker file is removed at exit

    late = launcher.spawn(argv, "lrq work docs",
                          {**os.environ, "LRQ_CHILD": "1", process.SCHEDULER_ENV: named})
    assert any("orphaned" in line for line in late.lines())
    assert late.wait(timeout=60) == 0  # gone before it started: it does not start work


def test_the_orm_is_preloaded_only_for_a_config_naming_a_model(tmp_path: Path) -> None:
    from lrq.cli import _names_models

    plain = tmp_path / "plain.toml"
    plain.write_text('[queues.docs]\nhandler = "x:y"\n[queues.docs.source]\nkind = "sql"\n')
    queue = tmp_path / "queue.toml"
    queue.write_text('[queues.docs]\nhandler = "x:y"\nmodel = "m:M"\n')
    output = tmp_path / "output.toml"
    output.write_text('[queues.docs]\nhandler = "x:y"\n[queues.docs.outputs.t]\nmodel = "m:M"\n')
    assert not _names_models(str(plain))
    assert _names_models(str(queue)) and _names_models(str(output))
    assert _names_models(str(tmp_path / "absent.toml"))  # unsure: preload it
