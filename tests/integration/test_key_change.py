"""A data dir whose key changed: lrq stops with one line and keeps the backlog; rotation with
previous_secrets drains it; `requeue --quarantined` re-signs only after confirmation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lrqtest import ROOT, lrq, write_config

from lrq import signing
from lrq.spool.batchfile import MAGIC


def status(cfg: Path) -> dict:
    return json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]


def test_a_changed_secret_stops_with_one_line_and_quarantines_nothing(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=300, batch_size=100, top={"secret": "first key"})
    lrq("-c", str(cfg), "sniff", check=True)
    cfg.write_text(cfg.read_text().replace('"first key"', '"second key"'))
    for command in (["work", "--burst"], ["run", "--until-idle"], ["sniff"]):
        r = lrq("-c", str(cfg), *command, timeout=60)
        assert r.returncode == 2, (command, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "queue docs: batch " in lines[0] and "signed with another key" in lines[0]
        assert "previous_secrets" in lines[0] and "nothing was quarantined" in lines[0]
    st = status(cfg)
    assert (st["pending"], st["claimed"], st["quarantined"], st["failed"]) == (3, 0, 0, 0)
    assert "signed with another key" in st["key_problem"]
    assert "WARNING: queue docs: batch" in lrq("-c", str(cfg), "status", check=True).stdout
    assert st["position"] == 300  # the sniffer under `lrq run` did not publish with the new key
    env = {"LRQ_PREVIOUS_SECRETS": "unrelated,first key"}  # the env form
    lrq("-c", str(cfg), "work", "--once", env=env, check=True)
    assert status(cfg)["done"] == 1
    cfg.write_text(cfg.read_text().replace('secret = "second key"',
                                           'secret = "second key"\nprevious_secrets = ["first key"]'))
    lrq("-c", str(cfg), "work", "--burst", check=True)
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0 and "missing 0, duplicated 0" in v.stdout, v.stdout


def test_a_planted_lrq2_file_in_a_drained_queue_is_quarantined_and_the_queue_runs(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=200, batch_size=100, top={"secret": "k"})
    lrq("-c", str(cfg), "run", "--until-idle", check=True)
    planted = tmp_path / "data/docs/left/20260101T000000000000-planted00000.pkl"
    planted.write_bytes(b"LRQ2\n" + b"\0" * 32 + b"\0garbage")
    key_ids = (tmp_path / "data/key-ids").stat().st_mtime
    os.utime(planted, (key_ids + 60, key_ids + 60))  # however coarse the file system's clock
    r = lrq("-c", str(cfg), "run", "--until-idle", timeout=60)
    assert r.returncode == 1 and "signed with another key" not in r.stderr, r.stderr
    st = status(cfg)
    assert (st["quarantined"], st["pending"], st["key_problem"]) == (1, 0, None)


def requeue(cfg: Path, *args: str, stdin: int | None = subprocess.DEVNULL,
            input_: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "requeue", "--quarantined",
                           *args], cwd=ROOT, stdin=stdin, capture_output=True, text=True, timeout=60)


def test_requeue_quarantined_re_signs_only_after_confirmation(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=200, batch_size=100, top={"secret": "k"})
    lrq("-c", str(cfg), "sniff", check=True)
    bad = sorted((tmp_path / "data/docs/left").glob("*.pkl"))[0]
    data = bad.read_bytes()
    start = len(MAGIC) + signing.KEY_ID_SIZE
    bad.write_bytes(data[:start] + b"\0" * signing.SIZE + data[start + signing.SIZE:])  # signature lost
    r = lrq("-c", str(cfg), "work", "--burst")
    assert r.returncode == 1 and "quarantined" in r.stderr
    assert status(cfg)["quarantined"] == 1
    r = lrq("-c", str(cfg), "requeue", bad.stem)
    assert r.returncode == 1 and f"lrq requeue --quarantined {bad.stem}" in r.stderr, r.stderr
    r = requeue(cfg, bad.stem)
    assert r.returncode == 2 and "needs confirmation" in r.stderr and "--yes" in r.stderr
    assert status(cfg)["quarantined"] == 1
    assert requeue(cfg, "20990101T000000000000-nosuchbatch0", "--yes").returncode == 2
    master, slave = os.openpty()  # a terminal: the question is asked, "n" keeps it quarantined
    try:
        os.write(master, b"n\n")
        r = requeue(cfg, bad.stem, stdin=slave)
        assert r.returncode == 1 and "[y/N]" in r.stdout and "nothing re-signed" in r.stdout
        assert status(cfg)["quarantined"] == 1
        os.write(master, b"y\n")
        r = requeue(cfg, bad.stem, stdin=slave)
        assert r.returncode == 0 and "re-signed" in r.stdout, r.stderr
    finally:
        os.close(master)
        os.close(slave)
    st = status(cfg)
    assert (st["quarantined"], st["pending"]) == (0, 1)
    lrq("-c", str(cfg), "work", "--burst", check=True)
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0 and "source 200, results 200" in v.stdout, v.stdout


def test_a_key_file_that_is_a_fifo_or_empty_is_one_line_not_a_hang(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, docs=100)  # no `secret`: the key is data/secret.key
    (tmp_path / "data").mkdir(mode=0o700)
    key = tmp_path / "data" / signing.KEY_FILE
    os.mkfifo(key, 0o600)
    for what, command in (("a FIFO", ["status"]), ("a FIFO", ["run", "--until-idle"]),
                          ("empty", ["work", "--burst"])):
        if what == "empty":
            key.unlink()
            key.write_bytes(b"")
        r = lrq("-c", str(cfg), *command, timeout=30)
        assert r.returncode == 2, (command, r.stderr)
        assert r.stderr == (f"lrq: {key}: the batch-signing key file is {what}; put the key back "
                            "as a regular file, or set `secret` in the config (or LRQ_SECRET)\n")
