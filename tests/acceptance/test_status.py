"""``lrq status`` as users script it: the ``--json`` keys pinned, ``--watch`` off a terminal
ended by Ctrl-C, and no ``rich`` import where nothing is drawn (workers, the scheduler)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from lrqtest import ROOT, killed_on_exit, lrq, poll, write_config

#: ``lrq status --json`` keys users script against (before issue 14); keys are only added.
OLD_TOP = {"data_dir", "queues", "bytes", "disk"}
OLD_QUEUE = {"pending", "claimed", "done", "failed", "quarantined", "bytes", "pending_bytes",
             "claimed_bytes", "done_bytes", "failed_bytes", "tmp_bytes", "spare",
             "awaiting_ack", "stale", "foreign", "key_problem", "position", "source",
             "results", "dead_letters", "ledger_batches", "ledger_items"}
OLD_DISK = {"used", "max_bytes", "free_bytes", "total_bytes", "free_inodes", "total_inodes",
            "min_free", "below_min_free", "blocked", "held"}
OLD_HELD = {"pending", "claimed", "done", "failed", "tmp", "logs", "other", "free"}
#: Added by issue 14.
NEW_QUEUE = {"rates", "backlog_items", "eta_seconds", "remaining", "eta_remaining_seconds",
             "paused"}


def test_status_json_keeps_every_old_key_and_adds_rates_and_eta(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=500, batch_size=100)
    lrq("-c", str(cfg), "sniff", "--once", check=True)
    lrq("-c", str(cfg), "work", "--burst", check=True)
    lrq("-c", str(cfg), "sniff", "--once", check=True)
    st = json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)
    assert set(st) == OLD_TOP
    q = st["queues"]["docs"]
    assert set(q) == OLD_QUEUE | NEW_QUEUE
    assert set(st["disk"]) == OLD_DISK and set(st["disk"]["held"]) == OLD_HELD
    assert set(q["foreign"]) == {"count", "sample"} and q["source"] == {"kind": "sql"}
    assert (q["pending"], q["done"], q["ledger_items"], q["position"]) == (1, 1, 100, 200)
    assert q["rates"]["60s"]["items"] == 100 and q["rates"]["600s"]["batches"] == 1
    assert q["remaining"] == 300 and q["backlog_items"] == 100 and q["paused"] is None
    assert q["eta_seconds"] == 60.0 and q["eta_remaining_seconds"] == 240.0  # 100/min
    table = lrq("-c", str(cfg), "status", check=True).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[10:12] == ["items/s", "eta"] and row[9:11] == ["1.7", "1m00s"]
    assert header[-1] == "position" and row[-1] == "200"
    assert any(line.startswith("docs: 1.7 items/s (1 min)") for line in table)


def test_watch_off_a_terminal_prints_a_line_per_refresh_and_exits_0_on_ctrl_c(
        tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=200)
    lrq("-c", str(cfg), "sniff", check=True)
    proc = subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "status", "--watch",
                             "0.2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    with killed_on_exit(proc):
        reader.start()
        assert poll(lambda: len(lines) >= 2, 60), (lines, proc.poll())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    reader.join(timeout=10)
    assert len(lines) >= 2
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ docs pending=2 claimed=0 done=0 "
                            r"failed=0 stale=0 items_per_s=0\.0 eta=- remaining=0\n", line), line


def imports_rich(*args: str, cfg: Path) -> bool:
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "lrq", "-c", str(cfg), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "import time:" in p.stderr  # the check below could not fail without it
    return re.search(r"\|\s+rich(\.|\s*$)", p.stderr, re.M) is not None


def test_workers_and_plain_commands_never_import_rich(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=300)
    assert not imports_rich("sniff", cfg=cfg)
    assert not imports_rich("work", "--burst", cfg=cfg)
    assert not imports_rich("status", cfg=cfg)
    assert not imports_rich("run", "--until-idle", cfg=cfg)
