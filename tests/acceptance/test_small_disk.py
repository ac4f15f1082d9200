"""A real small filesystem (tmpfs) as the data dir: the disk budget holds, ENOSPC loses nothing."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from lrq.disk import space, usage
from lrq.sample import documents
from lrqtest import ROOT, lrq, write_config


@pytest.fixture
def tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    size = getattr(request, "param", "16m")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; run the tests as root (CI does)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=30)


def config(tmp_path: Path, data: Path, docs: int, **keys) -> Path:
    cleanup = keys.pop("cleanup", {})
    return write_config(tmp_path, docs=docs, top={
        "data_dir": str(data), "log_max_bytes": "200KB", "log_backups": 1,
        "cleanup": {"every": 1, **cleanup}}, **keys)


@pytest.mark.parametrize("tmpfs", ["1m"], indirect=True)
def test_a_batch_that_does_not_fit_leaves_nothing_and_acknowledges_nothing(tmp_path: Path,
                                                                            tmpfs: Path) -> None:
    cfg = config(tmp_path, tmpfs, 6000, batch_size=6000,  # ~2 MB: more than the filesystem
                 compress="none", cleanup={"max_bytes": "1GB", "min_free": "0%"})
    r = lrq("-c", str(cfg), "sniff", "--once")
    assert r.returncode == 1, r.stderr
    assert "no room on disk" in r.stderr and "Traceback" not in r.stderr
    st = json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]
    assert (st["pending"], st["position"], st["tmp_bytes"]) == (0, None, 0)
    cfg.write_text(cfg.read_text().replace("batch_size = 6000", "batch_size = 1000"))
    assert lrq("-c", str(cfg), "sniff", "--once").returncode == 0
    lrq("-c", str(cfg), "work", "--burst", check=True)
    st = json.loads(lrq("-c", str(cfg), "status", "--json", check=True).stdout)["queues"]["docs"]
    assert st["ledger_items"] == 1000 and st["position"] == 1000


@pytest.mark.slow
def test_a_source_larger_than_the_disk_flows_through_within_budget(tmp_path: Path,
                                                                   tmpfs: Path) -> None:
    docs, budget = 200_000, 8 * 10**6
    cfg = config(tmp_path, tmpfs, docs, batch_size=500, chunk_size=500, workers=2,
                 cleanup={"max_bytes": budget, "min_free": "10%"})
    fs_size = space(tmpfs).total_bytes
    input_bytes = sum(len(pickle.dumps(documents(500, start=s), protocol=5))
                      for s in range(1, docs + 1, 500))
    peak = {"usage": 0, "fs_used": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            try:
                peak["usage"] = max(peak["usage"], usage(tmpfs, ["docs"], tmpfs / "lrq.log"))
                sp = space(tmpfs)
                peak["fs_used"] = max(peak["fs_used"], sp.total_bytes - sp.free_bytes)
            except OSError:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        done.set()
        sampler.join(timeout=5)
    print(f"\nSMALL-DISK input={input_bytes} fs={fs_size} ratio={input_bytes / fs_size:.1f} "
          f"budget={budget} peak_usage={peak['usage']} ({peak['usage'] / budget:.0%}) "
          f"peak_fs_used={peak['fs_used']}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert input_bytes > 3 * fs_size
    assert 0 < peak["usage"] <= budget
    assert peak["fs_used"] < fs_size
    assert "trimmed" in p.stderr
    v = lrq("-c", str(cfg), "verify")
    assert v.returncode == 0, v.stdout
    assert f"source {docs}, results {docs}, dead letters 0, missing 0, duplicated 0" in v.stdout
