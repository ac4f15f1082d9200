"""Worker processes and their scheduler: they stop when it is killed, and a new scheduler
counts the live ones before it starts more. Real processes, real signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lrqtest import ROOT, killed_on_exit, lrq, poll, write_config

from lrq import process
from lrq.spool import Spool

SLOW = '''
import time
from pathlib import Path
def handle(items):
    if Path(__file__).with_name("slow.flag").exists():
        time.sleep(0.3)  # a slow model call: a batch of 10 chunks takes 3 s, past the grace
    return [{"doc_id": i["doc_id"]} for i in items]
'''


def slow_config(tmp_path: Path, docs: int, **keys) -> Path:
    """Slow while ``slow.flag`` exists: a backlog of ``docs`` keeps the workers busy."""
    (tmp_path / "slow.py").write_text(SLOW)
    (tmp_path / "slow.flag").touch()
    return write_config(tmp_path, docs=docs, batch_size=100, chunk_size=10,
                        handler="slow:handle", top={"grace": 1}, **keys)


def workers_of(cfg: Path) -> set[int]:
    """Running processes titled as this config's workers (``ps`` shows the same)."""
    title = f"lrq work docs -c {cfg}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "cmdline").read_bytes().startswith(title) and \
                        Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def spawn(*args: str, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "lrq", *args], cwd=ROOT, text=True,
                                stdout=subprocess.DEVNULL, stderr=out)


def verify_exact(cfg: Path, docs: int) -> None:
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert f"source {docs}, results {docs}, dead letters 0, missing 0, duplicated 0" in v.stdout
    st = json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]
    assert (st["pending"], st["claimed"], st["failed"]) == (0, 0, 0)


def test_workers_stop_when_their_scheduler_is_killed(tmp_path: Path) -> None:
    cfg = slow_config(tmp_path, 3000, workers=2)  # 45 s of work for two workers
    run = spawn("-c", str(cfg), "run", log=tmp_path / "run.log")
    with killed_on_exit(run):
        busy = poll(lambda: len(workers_of(cfg)) == 2 and workers_of(cfg))
        assert busy, (tmp_path / "run.log").read_text()[-3000:]
        run.kill()
        run.wait(timeout=30)
    # SIGTERM reaches them (the fork server exits with the scheduler): each stops claiming
    # and gives its batch back after the 1 s grace. Bounded: grace + a second's check.
    assert poll(lambda: not workers_of(cfg), seconds=20), f"still running: {workers_of(cfg)}"
    assert process.live_workers(Spool(tmp_path / "data", "docs")) == []
    (tmp_path / "slow.flag").unlink()
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "idle: sources drained" in p.stderr, p.stderr[-3000:]
    verify_exact(cfg, 3000)


def test_a_new_scheduler_counts_the_live_workers_of_its_data_dir(tmp_path: Path) -> None:
    cfg = slow_config(tmp_path, 300, workers=1)
    lrq("-c", str(cfg), "sniff", check=True)
    by_hand = spawn("-c", str(cfg), "work", "docs", "--idle-exit", "60",
                    log=tmp_path / "work.log")
    with killed_on_exit(by_hand):
        sp = Spool(tmp_path / "data", "docs")
        assert poll(lambda: process.live_workers(sp) == [by_hand.pid])
        log = tmp_path / "run.log"
        run = spawn("-c", str(cfg), "run", "--until-idle", log=log)
        with killed_on_exit(run):
            seen = f"workers-alive queue=docs others=1 pids={by_hand.pid} workers=1"
            assert poll(lambda: seen in log.read_text()), log.read_text()[-3000:]
            assert workers_of(cfg) == set()  # workers = 1: the scheduler forks none
            assert "working queue=docs" not in log.read_text()
            (tmp_path / "slow.flag").unlink()
            by_hand.send_signal(signal.SIGTERM)
            assert by_hand.wait(timeout=30) == 0
            assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
        assert "] lrq: working queue=docs" in log.read_text()  # then it started its own
    verify_exact(cfg, 300)
