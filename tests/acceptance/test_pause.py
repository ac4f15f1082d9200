"""`lrq pause` / `lrq resume` against a real scheduler and its worker processes, seen across
processes and restarts, with `--log-format json` logs (every line must parse)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lrqtest import ROOT, killed_on_exit, load_app, lrq, poll, write_config

SLOW = '''
import time
def handle(items):
    time.sleep(0.1)  # a slow model call
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''
WORKERS = 2


def setup(tmp_path: Path, docs: int) -> Path:
    (tmp_path / "slow.py").write_text(SLOW)
    return write_config(tmp_path, docs=docs, batch_size=100, chunk_size=50, workers=WORKERS,
                        handler="slow:handle", max_pending=10)


def spawn(cfg: Path, log: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lrq", "--log-format", "json", "-c", str(cfg),
                             "run", *args], cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def counts(cfg: Path) -> Any:
    app = load_app(cfg)
    return app.spool(app.queues("docs")[0]).counts()


def records(log: Path) -> list[dict[str, Any]]:
    """Every line of the run's stderr, each one JSON object (a line that does not parse fails)."""
    lines = log.read_text().splitlines()
    if lines and not lines[-1].endswith("}"):
        lines = lines[:-1]  # a line being written right now
    return [json.loads(line) for line in lines]


def events(log: Path, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [r for r in records(log) if r["event"] == event
            and all(r["fields"].get(k) == v for k, v in fields.items())]


def settle_paused(cfg: Path, log: Path, pid: int) -> int:
    """After a pause: the scheduler (``pid``) says it saw it, the batches in hand finish (no
    claim left) and every worker process started so far has ended; the done count then."""
    assert poll(lambda: events(log, "paused", queue="docs", reason="operator")
                and any(r["pid"] == pid for r in events(log, "paused", queue="docs")), seconds=30)
    assert poll(lambda: counts(cfg).claimed == 0, seconds=60), "the batches in hand never finished"
    assert poll(lambda: len(events(log, "finished", queue="docs"))
                >= len(events(log, "working", queue="docs")), seconds=60), \
        "worker processes of a paused queue should exit on their idle timeout"
    return counts(cfg).done


def test_a_running_scheduler_obeys_pause_and_resume_across_processes_and_restarts(
        tmp_path: Path) -> None:
    cfg = setup(tmp_path, docs=2000)
    log = tmp_path / "run1.log"
    with killed_on_exit(spawn(cfg, log)) as run:
        assert poll(lambda: counts(cfg).done >= 2, seconds=60)
        assert lrq("-c", str(cfg), "pause", "docs", "--by", "tester", check=True).stdout \
            .startswith("docs: paused since ")
        before = counts(cfg)  # in hand as the pause landed (or within the command's exit)
        done = settle_paused(cfg, log, run.pid)
        # Nothing new was claimed beyond what was in hand (and at most one claim per worker
        # that had looked at the pause just before it was written and claims after `before`).
        assert done <= before.done + before.claimed + WORKERS
        pending = counts(cfg).pending
        assert pending > 0, "the run finished before the pause: make the handler slower"
        # The sniffer published nothing more once paused (it may finish the one batch it was
        # writing when the pause landed).
        assert counts(cfg).pending + done <= before.pending + before.done + before.claimed + 1
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 0
    # The pause survives a restart: an until-idle run waits (it does not end as "idle").
    log2 = tmp_path / "run2.log"
    with killed_on_exit(spawn(cfg, log2, "--until-idle")) as run2:
        assert poll(lambda: events(log2, "until-idle-waiting", queue="docs"), seconds=30)
        assert poll(lambda: events(log2, "paused", queue="docs"), seconds=30)
        assert run2.poll() is None and counts(cfg).done == done
        assert not events(log2, "working"), "no worker process is started for a paused queue"
        lrq("-c", str(cfg), "resume", "docs", check=True)
        assert run2.wait(timeout=120) == 0, log2.read_text()[-3000:]
    assert events(log2, "resumed", queue="docs")
    assert any(r.get("worker") == "docs" for r in records(log2)), "worker processes log JSON"
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert "source 2000, results 2000, dead letters 0, missing 0, duplicated 0" in v.stdout


@pytest.mark.slow
def test_a_pause_mid_until_idle_run_holds_then_resume_finishes_exactly_once(
        tmp_path: Path) -> None:
    cfg = setup(tmp_path, docs=6000)
    log = tmp_path / "run.log"
    with killed_on_exit(spawn(cfg, log, "--until-idle")) as run:
        assert poll(lambda: counts(cfg).done >= 3, seconds=60)
        lrq("-c", str(cfg), "pause", "docs", check=True)
        before = counts(cfg)
        done = settle_paused(cfg, log, run.pid)
        assert done <= before.done + before.claimed + WORKERS
        hold_until = time.monotonic() + 5.0  # the hold: 5 s without progress
        while time.monotonic() < hold_until:
            now = counts(cfg)
            assert (now.done, now.claimed) == (done, 0), "a paused queue made progress"
            assert run.poll() is None, "an until-idle run ended while its queue was paused"
            time.sleep(0.2)  # the hold's sampling period, not synchronisation
        assert events(log, "until-idle-waiting", queue="docs")
        lrq("-c", str(cfg), "resume", "docs", check=True)
        assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert len(events(log, "idle")) == 1
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert "source 6000, results 6000, dead letters 0, missing 0, duplicated 0" in v.stdout
