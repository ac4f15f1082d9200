"""Worker processes forked from the warm server: title, session, stderr relay, environment,
exit codes."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from lrq.launcher import Launcher
from lrqtest import poll, write_config


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
