"""Chaos: SIGKILL worker processes and the scheduler at random while 20k items flow; restart
the scheduler each time. At the end every item is stored exactly once.

Stress it harder by hand: ``CHAOS_KILLS=40 CHAOS_WORKER_SHARE=0.5 CHAOS_SEED=2 pytest -m slow
tests/acceptance/test_chaos.py -s`` (more kills, more of them on the scheduler).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lrqtest import ROOT, lrq, poll, write_config

DOCS = 20_000
HANDLER = '''
import time
def handle(items):
    time.sleep(0.03)  # a model call, so the run lasts long enough to be shot at
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''


def config(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(HANDLER)
    return write_config(folder, docs=DOCS, batch_size=200, chunk_size=20, workers=2, lease=10,
                        max_attempts=20, handler="model:handle", run_seconds=20,
                        top={"interval": 0.2, "grace": 5, "cleanup": {"every": 1}})


def scheduler(cfg: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def workers_of(cfg: Path) -> list[int]:
    """Worker processes for this config, including orphans of a killed scheduler."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                # Forked workers carry the title "lrq work QUEUE -c CONFIG" (setproctitle).
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").split()
            except OSError:
                continue
            if str(cfg).encode() in cmd and b"work" in cmd:
                pids.append(int(entry.name))
    return pids


def diagnose(cfg: Path, missing: str) -> str:
    """Where the batch of a missing key is: files, ledger rows, log lines."""
    import sqlite3

    from lrqtest import load_app

    app = load_app(cfg)
    q = app.queues("docs")[0]
    sp = app.spool(q)
    out = []
    for folder in (sp.left, sp.failed, sp.quarantine):
        for path in folder.glob("*.pkl"):
            try:
                keys = [i["doc_id"] for i in sp.load(path.stem).items]
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported
                out.append(f"{path}: unreadable {e}")
                continue
            if missing in keys:
                name = path.stem
                right = sorted(p.name for p in sp.right.glob(f"{name}*"))
                db = sqlite3.connect(cfg.parent / "results.db")
                ledger = db.execute("SELECT * FROM lrq_batches WHERE name = ?", (name,)).fetchall()
                out.append(f"{path.parent.name}/{name}: right={right} ledger={ledger} "
                           f"attempts={sp.attempts(name)}")
                log = (app.cfg.data_dir / "lrq.log").read_text().splitlines()
                out += [line for line in log if name in line][-20:]
    return "\n".join(out) or f"no batch file holds {missing}"


def finish(p: subprocess.Popen[bytes], timeout: float = 600) -> None:
    assert p.wait(timeout=timeout) == 0


@pytest.mark.slow
def test_random_sigkills_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    calm_cfg = config(tmp_path / "calm")
    t0 = time.monotonic()
    finish(scheduler(calm_cfg))
    calm = time.monotonic() - t0
    assert lrq("-c", str(calm_cfg), "verify").returncode == 0

    cfg = config(tmp_path / "chaos")
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "20261123")))
    kills = {"worker": 0, "scheduler": 0}
    t0 = time.monotonic()
    sched = scheduler(cfg)
    while sum(kills.values()) < int(os.environ.get("CHAOS_KILLS", "20")) and sched.poll() is None:
        time.sleep(rng.uniform(0.3, 1.2))  # the random kill schedule, not synchronisation
        victims = []
        if rng.random() < float(os.environ.get("CHAOS_WORKER_SHARE", "0.7")):
            # A (re)started scheduler forks its workers once its fork server has imported
            # lrq: wait for one, up to a bound (none comes if the run is finishing).
            victims = poll(lambda: workers_of(cfg), seconds=10)
        if victims:
            os.kill(rng.choice(victims), signal.SIGKILL)
            kills["worker"] += 1
        elif sched.poll() is None:
            sched.kill()
            sched.wait()
            kills["scheduler"] += 1
            sched = scheduler(cfg)
    finish(sched)
    wall = time.monotonic() - t0
    poll(lambda: not workers_of(cfg), seconds=120)  # orphans of a killed scheduler finish
    v = lrq("-c", str(cfg), "verify")
    st = lrq("-c", str(cfg), "status", "--json").stdout
    print(f"\nCHAOS items={DOCS} kills={kills} wall={wall:.1f}s calm={calm:.1f}s "
          f"ratio={wall / calm:.2f}\n{v.stdout}")
    assert kills["worker"] >= 5 and kills["scheduler"] >= 2
    if v.returncode != 0:
        key = v.stdout.split("missing keys (first 10): ")[1].split(",")[0].strip()
        pytest.fail(f"{v.stdout}{st}\n{diagnose(cfg, key)}")
    assert f"source {DOCS}, results {DOCS}, dead letters 0, missing 0, duplicated 0" in v.stdout
