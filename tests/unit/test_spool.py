"""The on-disk protocol: atomic publish, exclusive claims, ordering, states."""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lrqtest import poll

from lrq.errors import AlreadyRunning, BatchCorrupt
from lrq.spool import MAGIC, Spool, State, flock


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "data", "q").ensure()


def items(n: int, start: int = 0) -> list[dict]:
    return [{"doc_id": f"d{i}", "content": "x" * 10} for i in range(start, start + n)]


def test_publish_then_load_round_trips(spool: Spool) -> None:
    name = spool.publish(items(3), position=3)
    batch = spool.load(name)
    assert batch.items == items(3) and batch.position == 3 and batch.name == name
    assert spool.pending() == [name]
    assert spool.state(name) is State.PENDING
    assert list(spool.tmp.iterdir()) == []


def test_folders_are_private(spool: Spool) -> None:
    for d in (spool.left, spool.right, spool.tmp, spool.failed):
        assert d.stat().st_mode & 0o777 == 0o700


def test_fsync_error_aborts_publish_and_leaves_nothing(spool: Spool, monkeypatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        spool.publish(items(5))
    assert list(spool.left.iterdir()) == []
    assert list(spool.tmp.iterdir()) == []


WRITER = textwrap.dedent("""
    import sys
    from lrq.spool import Spool
    sp = Spool(sys.argv[1], "q").ensure()
    big = [{"doc_id": f"d{i}", "content": "y" * 2000} for i in range(2000)]
    print("ready", flush=True)
    while True:
        sp.publish(big)
""")


def test_killed_writer_never_leaves_a_partial_batch_visible(spool: Spool) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(spool.root.parent)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    poll(lambda: len(spool.pending()) >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    names = spool.pending()
    assert len(names) >= 3
    for name in names:
        assert len(spool.load(name).items) == 2000  # every visible batch is whole


def test_concurrent_reader_only_sees_whole_batches(spool: Spool) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(spool.root.parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        checked: set[str] = set()
        deadline = time.monotonic() + 30
        while len(checked) < 10 and time.monotonic() < deadline:
            for name in spool.pending():
                if name not in checked:
                    assert len(spool.load(name).items) == 2000
                    checked.add(name)
        assert len(checked) >= 10
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_tmp_and_foreign_files_are_ignored(spool: Spool) -> None:
    (spool.tmp / "half-written.pkl").write_bytes(MAGIC + b"\x80")
    (spool.left / "notes.txt").write_text("hello")
    (spool.left / "x.pkl.partial").write_text("junk")
    assert spool.pending() == []
    assert not spool.has_pending()
    assert spool.pick() is None
    name = spool.publish(items(1))
    assert spool.pending() == [name]


def test_claims_are_exclusive(spool: Spool) -> None:
    name = spool.publish(items(2))
    first = spool.claim(name)
    assert first is not None and first.attempt == 1 and first.pid == os.getpid()
    assert spool.claim(name) is None
    other = Spool(spool.root.parent, "q")
    assert other.claim(name) is None
    assert other.pick() is None
    assert spool.state(name) is State.CLAIMED
    assert spool.read_claim(name) == first


def test_pick_hands_each_batch_out_once(spool: Spool) -> None:
    names = {spool.publish(items(1, i)) for i in range(50)}
    a, b = Spool(spool.root.parent, "q"), Spool(spool.root.parent, "q")
    got = []
    while True:
        ca, cb = a.pick(), b.pick()
        got += [c.name for c in (ca, cb) if c is not None]
        if ca is None and cb is None:
            break
    assert sorted(got) == sorted(names)


def test_fifo_order_takes_oldest_first(spool: Spool) -> None:
    names = [spool.publish(items(1, i)) for i in range(5)]
    picked = [spool.pick("fifo").name for _ in range(5)]
    assert picked == names


def test_pick_skips_a_batch_removed_after_listing(spool: Spool) -> None:
    gone = spool.publish(items(1))
    assert spool.pending() == [gone]
    spool._candidates = [gone]
    os.unlink(spool.left / f"{gone}.pkl")
    assert spool.pick() is None
    assert not (spool.right / gone).exists()


def test_names_sort_by_creation_order(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "q")
    names = [sp.new_name() for _ in range(10_000)]
    assert names == sorted(names) and len(set(names)) == len(names)
    frozen = Spool(tmp_path, "q", clock=lambda: 1_800_000_000.0)
    same_clock = [frozen.new_name() for _ in range(1000)]
    assert same_clock == sorted(same_clock)
    assert same_clock[0].startswith("20270115T080000000000-")
    # The random part keeps shortuuid's look: 12 characters of its alphabet.
    assert all(re.fullmatch(r"\d{8}T\d{12}-[2-9A-HJ-NP-Za-km-z]{12}", n) for n in names)


def test_release_only_by_the_owner(spool: Spool) -> None:
    name = spool.publish(items(1))
    claim = spool.claim(name)
    assert claim is not None
    impostor = claim.__class__(**{**claim.__dict__, "ino": claim.ino + 1})
    assert not spool.release(impostor)
    assert spool.release(claim)
    assert spool.pending() == [name]


def test_done_and_failed_states(spool: Spool) -> None:
    a, b = spool.publish(items(1)), spool.publish(items(1, 1))
    ca, cb = spool.claim(a), spool.claim(b)
    spool.mark_done(ca)
    spool.fail(cb, "boom")
    assert spool.state(a) is State.DONE and spool.state(b) is State.FAILED
    assert spool.read_error(b)["error"] == "boom"
    c = spool.counts()
    assert (c.pending, c.claimed, c.done, c.failed) == (0, 0, 1, 1)
    assert spool.load(b).items == items(1, 1)  # a failed batch is still readable


def test_corrupt_batch_is_reported(spool: Spool) -> None:
    (spool.left / "20260101T000000000000-bad.pkl").write_bytes(b"not a batch")
    (spool.left / "20260101T000000000001-cut.pkl").write_bytes(MAGIC + b"\x80\x05\x95")
    with pytest.raises(BatchCorrupt, match="bad magic"):
        spool.load("20260101T000000000000-bad")
    with pytest.raises(BatchCorrupt, match="corrupt"):
        spool.load("20260101T000000000001-cut")


def test_position_is_saved_atomically(spool: Spool) -> None:
    assert spool.read_position() is None
    spool.write_position(41)
    spool.write_position(42)
    assert spool.read_position() == 42
    assert list(spool.tmp.iterdir()) == []


def test_flock_is_exclusive_across_processes(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from lrq.spool import flock
            with flock(Path({str(lock)!r}), "x"):
                print("held", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(AlreadyRunning, match=f"pid {holder.pid}"), flock(lock, "x"):
        pass
    holder.kill()  # the kernel releases a dead holder's lock
    holder.wait(timeout=10)
    with flock(lock, "x"):
        pass


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
def test_every_codec_round_trips_and_readers_follow_the_file(tmp_path: Path, codec: str) -> None:
    writer = Spool(tmp_path, "q", compress=codec).ensure()
    name = writer.publish(items(500))
    reader = Spool(tmp_path, "q")  # configured differently: the file says which codec
    assert reader.load(name).items == items(500)
    plain = Spool(tmp_path, "q", compress="none").ensure().publish(items(500))
    size = (writer.left / f"{name}.pkl").stat().st_size
    assert (size < (writer.left / f"{plain}.pkl").stat().st_size / 2) == (codec != "none")


def test_a_flipped_bit_in_a_compressed_batch_fails_the_signature(tmp_path: Path) -> None:
    sp = Spool(tmp_path, "q", compress="zstd").ensure()
    name = sp.publish(items(100))
    path = sp.left / f"{name}.pkl"
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BatchCorrupt, match="signature does not match"):
        sp.load(name)


def test_has_pending_skips_the_listing_only_for_quiet_unchanged_folders(spool: Spool, monkeypatch) -> None:
    listings = []
    real = spool._claims
    monkeypatch.setattr(spool, "_claims", lambda: listings.append(1) or real())
    assert not spool.has_pending() and not spool.has_pending()
    assert len(listings) == 2  # the folders changed less than a second ago: listed both times
    old = time.time() - 5
    for d in (spool.left, spool.right):
        os.utime(d, (old, old))
    assert not spool.has_pending() and not spool.has_pending()
    assert len(listings) == 3  # quiet and unchanged: the second answer is remembered
    name = spool.publish(items(1))  # a new batch changes left/'s mtime
    assert spool.has_pending() and len(listings) == 4
    spool.claim(name)
    assert not spool.has_pending()


def test_zstd_objects_are_reused_within_a_thread_and_never_shared() -> None:
    """zstandard's (de)compressors are not thread-safe: each thread keeps its own pair."""
    import threading

    from lrq.spool import batchfile

    data = b"".join(b"item %d " % i for i in range(20_000))
    pairs, errors = [], []

    def work() -> None:
        try:
            for _ in range(50):
                packed = batchfile.compress(2, data)
                assert bytes(batchfile.decompress(2, memoryview(packed))) == data
            pairs.append(batchfile._zstd_pair())
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(pairs) == 4
    assert len({id(p[0]) for p in pairs}) == 4  # one compressor per thread
    assert batchfile._zstd_pair() is batchfile._zstd_pair()  # reused within a thread
