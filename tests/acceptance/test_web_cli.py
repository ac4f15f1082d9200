"""``lrq run --until-idle --http`` and ``lrq web`` as users run them: subprocesses serving
``/metrics`` and the page, stopped by idleness or SIGTERM."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from lrqtest import ROOT, killed_on_exit, lrq, poll, write_config

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

SLOW = '''
import time
def handle(items):
    time.sleep(0.1)
    return [{"doc_id": i["doc_id"], "n": len(i["content"])} for i in items]
'''


def served_url(log: Path) -> str | None:
    m = re.search(r"http-serving url=(\S+)", log.read_text(errors="replace"))
    return m.group(1) if m else None


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return bytes(r.read())


def test_run_until_idle_serves_metrics_during_the_run(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    cfg = write_config(tmp_path, docs=3000, handler="slow:handle", batch_size=100,
                       chunk_size=100)
    log = tmp_path / "run.out"
    with log.open("w") as out, killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle", "--http",
             "127.0.0.1:0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)) as proc:
        url = poll(lambda: served_url(log), 60)
        assert url, log.read_text()[-3000:]
        text = get(url + "metrics").decode()
        page = get(url)
        assert proc.poll() is None, "the run ended before the scrape: make it longer"
        families = {f.name: f for f in text_string_to_metric_families(text)}
        states = {s.labels["state"] for s in families["lrq_batches"].samples}
        assert states == {"pending", "claimed", "done", "failed", "quarantined"}
        assert b"<script>" in page
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(url + "metrics")  # the server stopped with the scheduler
    assert lrq("-c", str(cfg), "verify").returncode == 0


def test_lrq_web_serves_a_data_dir_and_stops_on_sigterm(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=200)
    lrq("-c", str(cfg), "sniff", check=True)
    out = tmp_path / "web.out"
    with out.open("w") as f, killed_on_exit(subprocess.Popen(
            [sys.executable, "-m", "lrq", "-c", str(cfg), "web", "--http", "127.0.0.1:0"],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)) as proc:
        url = poll(lambda: served_url(out), 60)
        assert url, out.read_text()
        text = get(url + "metrics").decode()
        assert 'lrq_batches{queue="docs",state="pending"} 2.0' in text
        assert str(tmp_path / "data" / "http.token") in out.read_text()  # where the token is
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_http_address_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import socket

    cfg = write_config(tmp_path, docs=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = lrq("-c", str(cfg), "web", "--http", f"127.0.0.1:{port}", timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
