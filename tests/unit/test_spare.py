"""Spare files: retention retires done batch files into ``spare/`` (emptied, up to
``SPARE_MAX``) and the publisher reuses their inodes; foreign entries there are left alone;
the tmp sweep does not take a spare being written for an orphan."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from lrqtest import load_app, write_config

from lrq import cleanup
from lrq.disk import Space
from lrq.spool import State, listing

DAY = 86400.0


def make_app(tmp_path: Path, **cleanup_keys):
    c = {"keep_done": "7d", "keep_failed": "30d", **cleanup_keys}
    return load_app(write_config(tmp_path, docs=None, compress="none", top={"cleanup": c}))


def done_batch(sp, tag: str, age_days: float = 8.0) -> str:
    name = sp.publish([{"doc_id": f"{tag}{i}", "pad": "x" * 200} for i in range(20)])
    sp.mark_done(sp.claim(name))
    when = time.time() - age_days * DAY
    os.utime(sp.done / f"{name}.pkl", (when, when))
    return name


def spares(sp) -> list[os.stat_result]:
    return [os.lstat(p) for p in sorted(sp.spare.iterdir())]


def test_retention_retires_into_spare_up_to_the_cap_and_unlinks_beyond(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "SPARE_MAX", 2)
    app = make_app(tmp_path)
    sp = app.spool(app.queues("docs")[0])
    names = [done_batch(sp, f"d{i}") for i in range(3)]
    inodes = {(sp.done / f"{n}.pkl").stat().st_ino for n in names}
    size = sum((sp.done / f"{n}.pkl").stat().st_size for n in names)
    (report,) = cleanup.run(app)
    assert report.done_removed == 3 and report.bytes_freed == size  # spares free the bytes
    assert all(sp.state(n) is State.MISSING for n in names)
    kept = spares(sp)
    assert len(kept) == 2  # the cap; the third was unlinked
    assert all(st.st_size == 0 and st.st_nlink == 1 for st in kept)  # no data in a spare
    assert {st.st_ino for st in kept} <= inodes
    assert sp.counts().spare == 2 and sp.counts().done_bytes == 0


def test_the_publisher_reuses_a_spare_inode(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    sp = app.spool(app.queues("docs")[0])
    done_batch(sp, "a")
    cleanup.run(app)
    (spare,) = spares(sp)
    name = sp.publish([{"doc_id": "new"}])
    st = (sp.left / f"{name}.pkl").stat()
    assert st.st_ino == spare.st_ino and st.st_size > 0 and st.st_mode & 0o777 == 0o600
    assert list(sp.spare.iterdir()) == [] and list(sp.tmp.iterdir()) == []
    assert [i["doc_id"] for i in sp.load(name).items] == ["new"]
    # With spare/ used up, a publish creates a new file as before.
    other = sp.publish([{"doc_id": "next"}])
    assert (sp.left / f"{other}.pkl").stat().st_ino != spare.st_ino


def test_foreign_entries_in_spare_are_skipped_and_untouched(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    sp = app.spool(app.queues("docs")[0])
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    (sp.spare / "link").symlink_to(target)
    (sp.spare / "dir").mkdir()
    os.mkfifo(sp.spare / "fifo")
    (sp.spare / "twice").write_bytes(b"two names")
    os.link(sp.spare / "twice", tmp_path / "twice-elsewhere")
    before = {p.name: os.lstat(p) for p in sp.spare.iterdir()}
    name = sp.publish([{"doc_id": "a"}])  # the FIFO has no reader: an open would block
    assert (sp.left / f"{name}.pkl").stat().st_ino not in {st.st_ino for st in before.values()}
    after = {p.name: os.lstat(p) for p in sp.spare.iterdir()}
    assert {n: (st.st_ino, st.st_size, st.st_mtime_ns) for n, st in after.items()} == {
        n: (st.st_ino, st.st_size, st.st_mtime_ns) for n, st in before.items()}
    assert target.read_bytes() == b"keep me" and (tmp_path / "twice-elsewhere").read_bytes() == b"two names"
    assert set(sp.foreign()) >= {str(sp.spare / n) for n in ("link", "dir", "fifo", "twice")}
    assert list(sp.tmp.iterdir()) == []


def test_a_spare_taken_into_tmp_is_not_swept_as_an_orphan(tmp_path: Path) -> None:
    """A spare keeps its retirement's mtime until the publisher writes it; the rename into
    tmp/ set its ctime, which the sweep ages an empty file by."""
    app = make_app(tmp_path)
    sp = app.spool(app.queues("docs")[0])
    taken = sp.tmp / "20261201T000000000000-abc.pkl.123.x"
    taken.write_bytes(b"")
    old = time.time() - 2 * 3600  # older than tmp_age (1h); sets ctime to now
    os.utime(taken, (old, old))
    orphan = sp.tmp / "orphan.pkl.123.y"
    orphan.write_bytes(b"x" * 10)
    os.utime(orphan, (old, old))
    (report,) = cleanup.run(app)
    assert report.tmp_removed == 1 and taken.exists() and not orphan.exists()


def test_spares_are_unlinked_when_free_inodes_run_low(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(tmp_path, min_free="5%")
    sp = app.spool(app.queues("docs")[0])
    done_batch(sp, "a")
    cleanup.run(app)
    assert len(spares(sp)) == 1
    second = done_batch(sp, "b")
    low = Space(free_bytes=10**12, total_bytes=10**12, free_inodes=1, total_inodes=1000)
    monkeypatch.setattr("lrq.disk.Budget.space", lambda self: low)
    cleanup.run(app)
    assert spares(sp) == [] and sp.state(second) is State.MISSING
