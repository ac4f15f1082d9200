"""``kind = "logfile"`` under a real scheduler: rotations, copytruncate, a half-written line,
a cut line and invalid UTF-8, and a SIGKILL mid-tail; every line stored exactly once."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from lrqtest import ROOT, kill_tree, killed_on_exit, lrq, poll, toml_value

STORE = '''
def handle(items):
    return [{"id": i["id"], "line": i["line"], "offset": i["offset"],
             "part": i.get("part"), "of": i.get("of")} for i in items]
'''
MAX_BYTES = 2000


def setup(tmp_path: Path) -> Path:
    (tmp_path / "store.py").write_text(STORE)
    (tmp_path / "logs").mkdir()
    cfg = {"data_dir": "data", "db_url": "sqlite:///results.db", "interval": 0.2, "grace": 10}
    queue = {"handler": "store:handle", "key": "id", "batch_size": 500, "chunk_size": 500,
             "workers": 2, "result_table": "lines"}
    source = {"kind": "logfile", "paths": ["logs/access.log"], "max_bytes": MAX_BYTES}
    lines = [f"{k} = {toml_value(v)}" for k, v in cfg.items()]
    lines += ["[queues.access]"] + [f"{k} = {toml_value(v)}" for k, v in queue.items()]
    lines += ["[queues.access.source]"] + [f"{k} = {toml_value(v)}" for k, v in source.items()]
    path = tmp_path / "lrq.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def env(folder: Path) -> dict[str, str]:
    """The handler module (store.py) beside the config, and this checkout's lrq."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}


def spawn(cfg: Path, *args: str) -> subprocess.Popen[str]:
    """``lrq run`` in the background, its stderr in a file (a pipe nobody reads would fill)."""
    err = open(cfg.parent / "stderr.txt", "a")  # noqa: SIM115 (the child holds it)
    try:
        return subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "run", *args],
                                cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=err,
                                env=env(cfg.parent))
    finally:
        err.close()


def access(i: int) -> bytes:
    return (f'10.0.{i // 250 % 250}.{i % 250} - - [01/Dec/2026:13:{i // 60 % 60:02d}:{i % 60:02d} '
            f'+0000] "GET /page/{i}?q={i * 7} HTTP/1.1" 200 {i % 5000} "-" "bench/{i}"\n').encode()


class Writer:
    """Appends to logs/access.log and remembers every line's text as lrq should store it."""

    def __init__(self, folder: Path) -> None:
        self.log = folder / "logs" / "access.log"
        self.want: Counter[str] = Counter()
        self.items = 0  # rows expected in the results (a cut line is several)
        self.n = 0

    def write(self, data: bytes, path: Path | None = None) -> None:
        with open(path or self.log, "ab") as fh:
            fh.write(data)

    def lines(self, count: int, path: Path | None = None, chunk: int = 2000) -> None:
        for start in range(0, count, chunk):
            block = [access(self.n + i) for i in range(min(chunk, count - start))]
            self.n += len(block)
            self.write(b"".join(block), path)
            for b in block:
                self.want[b[:-1].decode()] += 1
            self.items += len(block)

    def odd(self, line: bytes) -> None:
        """A whole line (with its newline) that counts as one text, cut or not."""
        self.write(line)
        body = line[:-1]
        self.want[body.decode("utf-8", "replace")] += 1
        self.items += max(1, -(-len(body) // MAX_BYTES))  # ceil: its parts (ASCII here)

    def rotate(self, keep: int = 2) -> None:
        """logrotate's default: access.log.(k) -> .(k+1), access.log -> .1, a new access.log."""
        for k in range(keep - 1, 0, -1):
            old = self.log.with_name(f"access.log.{k}")
            if old.exists():
                os.rename(old, self.log.with_name(f"access.log.{k + 1}"))
        os.rename(self.log, self.log.with_name("access.log.1"))
        self.log.touch()

    def copytruncate(self) -> None:
        shutil.copyfile(self.log, self.log.with_name("access.log.copy"))
        with open(self.log, "r+b") as fh:
            fh.truncate(0)


def rows(folder: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(folder / "results.db")) as db:
        return [json.loads(v) for (v,) in db.execute("SELECT value FROM lines")]


def count(folder: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(folder / "results.db")) as db:
            return int(db.execute("SELECT count(*) FROM lines").fetchone()[0])
    except sqlite3.OperationalError:  # the table is created by the first batch stored
        return 0


def stored_texts(folder: Path) -> Counter[str]:
    """The stored lines, path-independent, a cut line joined from its parts."""
    whole: Counter[str] = Counter()
    parts: dict[str, list[tuple[int, int, str]]] = {}
    for r in rows(folder):
        if r.get("part") is None:
            whole[r["line"]] += 1
        else:
            parts.setdefault(r["id"].rsplit(":", 1)[0], []).append((r["part"], r["of"], r["line"]))
    for ps in parts.values():
        ps.sort()
        assert [p for p, _, _ in ps] == list(range(1, ps[0][1] + 1)), ps[:3]
        whole["".join(t for _, _, t in ps)] += 1
    return whole


@pytest.mark.slow  # ~10-15 s
def test_rotations_copytruncate_and_odd_lines_are_stored_exactly_once(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    w = Writer(tmp_path)
    w.lines(20_000)  # part 1
    with killed_on_exit(spawn(cfg)) as proc:
        assert poll(lambda: count(tmp_path) > 0, seconds=60)  # it follows the file
        w.rotate()  # rename rotation 1 mid-read: the old file is finished, then the new one
        w.lines(100, w.log.with_name("access.log.1"))  # the writer had not reopened yet
        w.lines(10_000)  # part 2
        assert poll(lambda: count(tmp_path) == w.items, seconds=120), (count(tmp_path), w.items)
        w.copytruncate()  # all read: nothing is in the copy alone; no line written meanwhile
        w.lines(10_000)
        w.rotate()  # rename rotation 2: .1 -> .2 and access.log -> .1
        w.odd(b"x" * (MAX_BYTES * 3 + 17) + b"\n")  # cut into 4 parts
        w.odd(b"invalid \xff\xfe utf-8 \xc3(\n")
        w.lines(10_000)  # part 3
        w.odd(b"marker before the half line\n")
        w.write(b"half-written")
        assert poll(lambda: count(tmp_path) == w.items, seconds=120), (count(tmp_path), w.items)
        # A second passes with the half line on disk: it must not be published meanwhile.
        early = poll(lambda: any(r["line"].startswith("half-") for r in rows(tmp_path)), seconds=1.0)
        assert not early, "a line without its newline was published"
        w.write(b" line, completed\n")  # a second later, its end
        w.want["half-written line, completed"] += 1
        w.items += 1
        w.lines(9_900)
        assert poll(lambda: count(tmp_path) == w.items, seconds=120), (count(tmp_path), w.items)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert w.n == 60_000
    got = stored_texts(tmp_path)
    assert +w.want == got, (sorted((+w.want - got).items())[:3], sorted((got - +w.want).items())[:3])
    assert count(tmp_path) == w.items
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "truncated path=" in stderr and "lost path=" not in stderr
    v = lrq("-c", str(cfg), "verify", env=env(tmp_path))
    assert v.returncode == 0, v.stdout + v.stderr


@pytest.mark.slow  # ~10-15 s
def test_sigkill_mid_tail_loses_and_doubles_nothing(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    w = Writer(tmp_path)
    w.lines(5_000)
    with killed_on_exit(spawn(cfg)) as proc:
        assert poll(lambda: count(tmp_path) > 0, seconds=60)
        for _ in range(10):  # keep appending while it tails
            seen = count(tmp_path)
            w.lines(1_000, chunk=100)
            assert poll(lambda: count(tmp_path) > seen, seconds=60)  # noqa: B023
        w.lines(1_000)
        kill_tree(proc.pid)  # mid-tail: lines unread, batches pending, a position not saved
        proc.wait(timeout=30)
    before = count(tmp_path)
    assert 0 < before < w.items
    w.lines(3_000)
    w.rotate()  # rotated while lrq is down: found again beside its home
    w.lines(2_000)
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    got = stored_texts(tmp_path)
    assert +w.want == got, (sum((w.want - got).values()), sum((got - w.want).values()))
    assert count(tmp_path) == w.items == 21_000


@pytest.mark.parametrize("point", [  # ~5 s each: one stays in the default run
    pytest.param("sniff-mid-write", marks=pytest.mark.slow),
    pytest.param("sniff-after-rename", marks=pytest.mark.slow),
    pytest.param("sniff-before-dir-sync", marks=pytest.mark.slow),
    "sniff-before-position"])
def test_a_crash_in_each_publish_window_loses_nothing_and_stores_nothing_twice(
        tmp_path: Path, point: str) -> None:
    """``lrq sniff`` killed at each point between the fetch and the saved position; the file
    then rotates while lrq is down; the restart re-reads from the saved position. (Before
    any position is saved lrq has not started following: a file rotated away then is not
    read, as ``tail -F`` started after the rotation would not.)"""
    cfg = setup(tmp_path)
    w = Writer(tmp_path)
    w.lines(1_000)
    lrq("-c", str(cfg), "sniff", env=env(tmp_path), check=True)  # the file is known
    w.lines(2_000)
    r = lrq("-c", str(cfg), "sniff", env={**env(tmp_path), "LRQ_FAILPOINT": point})
    assert r.returncode == -signal.SIGKILL, f"{point} not reached: {r.returncode}\n{r.stderr}"
    w.lines(500)
    w.rotate()
    w.lines(1_500)
    p = subprocess.run([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--until-idle"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert stored_texts(tmp_path) == +w.want
    assert count(tmp_path) == w.items == 5_000
    assert "lost path=" not in p.stderr
