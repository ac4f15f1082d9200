"""The ingest journal (:mod:`lrq.journal`) and the ``kind = "ingest"`` source over it: records
read back exactly once by position, torn records of a writer killed mid-append ignored (and
cut off by a writer that continues the segment), positions across restarts, segments
deleted only behind the saved position."""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from lrqtest import open_source

from lrq import journal
from lrq.errors import ConfigError, SourceError
from lrq.journal import Reader, Writer
from lrq.spool import Spool


def post(w: Writer, keys: list[str]) -> None:
    items = [{"id": k, "v": len(k)} for k in keys]
    w.append(json.dumps(items).encode(), len(items))


def read_all(r: Reader, position: Any = None, limit: int = 7) -> tuple[list[str], Any]:
    out: list[str] = []
    while True:
        items, position = r.read(position, limit)
        out += [i["id"] for i in items]
        if len(items) < limit:
            return out, position


def test_records_read_back_in_order_across_record_boundaries(tmp_path: Path) -> None:
    w = Writer(tmp_path / "ingest")
    keys = [f"k{i}" for i in range(100)]
    for i in range(0, 100, 10):
        post(w, keys[i:i + 10])
    r = Reader(tmp_path / "ingest")
    got, position = read_all(r, limit=7)  # 7 does not divide 10: positions inside records
    assert got == keys
    assert r.read(position, 7) == ([], position)
    u = r.unread(None)
    assert (u.items, u.segments) == (100, 1)
    assert r.unread(position).items == 0
    items, at = r.read(None, 13)
    assert at[2] == 3 and r.unread(at).items == 87  # 3 items of the second record taken


def test_concurrent_appends_are_each_read_once(tmp_path: Path) -> None:
    w = Writer(tmp_path / "ingest", segment_bytes=4000)
    threads = [threading.Thread(target=lambda t=t: [post(w, [f"{t}-{i}-{j}" for j in range(5)])
                                                    for i in range(40)]) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got, _ = read_all(Reader(tmp_path / "ingest"), limit=50)
    assert len(got) == len(set(got)) == 4 * 40 * 5
    assert len(journal.segments(tmp_path / "ingest")) > 1  # rotated past segment_bytes
    assert w.fsyncs <= 4 * 40 + len(journal.segments(tmp_path / "ingest"))


def torn(folder: Path, keys: list[str]) -> None:
    """Append half of a record past the head: a writer killed mid-append."""
    seg = journal.read_head(folder)
    assert seg is not None
    data = journal.record(json.dumps([{"id": k} for k in keys]).encode(), len(keys))
    with open(folder / journal.segment_name(seg[0]), "ab") as f:
        f.write(data[:len(data) // 2])


def test_a_torn_last_record_is_never_read_and_a_new_writer_goes_on_in_a_new_segment(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "ingest"
    post(Writer(folder), ["a", "b"])
    torn(folder, ["x", "y"])
    r = Reader(folder)
    got, position = read_all(r)
    assert got == ["a", "b"]  # the newest segment is read up to the head only
    post(Writer(folder), ["c"])  # the restarted writer: a new segment
    assert journal.segments(folder) == [1, 2]
    with caplog.at_level(logging.WARNING, logger="lrq.journal"):
        more, position = read_all(r, position)
    assert more == ["c"]
    assert [m for m in caplog.messages if m.startswith("ingest-torn-tail ")]
    assert read_all(Reader(folder))[0] == ["a", "b", "c"]  # from the start: the same


def test_a_writer_that_goes_on_in_the_segment_cuts_the_torn_record_off(tmp_path: Path) -> None:
    folder = tmp_path / "ingest"
    live = Writer(folder)
    post(live, ["a"])
    torn(folder, ["x"])  # another writer of this segment died mid-append
    post(live, ["b"])
    head = journal.read_head(folder)
    assert head is not None
    assert os.path.getsize(folder / journal.segment_name(head[0])) == head[1]
    assert read_all(Reader(folder))[0] == ["a", "b"]
    other = Writer(folder)  # a second live writer: a new segment, the first one follows it
    post(other, ["c"])
    post(live, ["d"])
    assert journal.segments(folder) == [1, 2]
    assert read_all(Reader(folder))[0] == ["a", "b", "c", "d"]


def test_garbage_in_a_closed_segment_is_skipped_and_a_position_past_its_end_moves_on(
        tmp_path: Path) -> None:
    folder = tmp_path / "ingest"
    post(Writer(folder), ["a"])
    with open(folder / journal.segment_name(1), "ab") as f:
        f.write(b"\0" * 100)  # power lost: zeros where unsynced pages were
    post(Writer(folder), ["b"])
    assert read_all(Reader(folder))[0] == ["a", "b"]
    # A saved position past what the segment kept after a power loss: on to the next one.
    assert read_all(Reader(folder), [1, 10_000, 0])[0] == ["b"]


def test_a_position_of_another_kind_is_refused(tmp_path: Path) -> None:
    post(Writer(tmp_path / "ingest"), ["a"])
    with pytest.raises(SourceError, match="not an ingest journal position"):
        Reader(tmp_path / "ingest").read(1234, 10)


# -- the source --------------------------------------------------------------------------
def source(data_dir: Path, **options: Any) -> Any:
    return open_source("ingest", options, data_dir)


def writer(data_dir: Path, segment_bytes: int = 16 * 10**6) -> Writer:
    return Writer(data_dir / "q" / "ingest", segment_bytes)


def test_the_position_holds_across_restarts(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for i in range(10):
        post(w, [f"k{i}-{j}" for j in range(10)])
    spool = Spool(tmp_path, "q").ensure()
    src = source(tmp_path)
    assert src.ack_at == "publish" and src.keys("id") is None and src.item_fields() is None
    first = src.fetch(None, 35)
    spool.write_position(first.position)
    src.close()
    src = source(tmp_path)  # a restart: the saved position, nothing read twice
    seen = [i["id"] for i in first.items]
    position = spool.read_position()
    while (f := src.fetch(position, 35)).items:
        seen += [i["id"] for i in f.items]
        position = f.position
    assert len(seen) == len(set(seen)) == 100
    assert src.status()["lag"] == 65 and src.remaining(position) == 0
    spool.write_position(position)
    assert src.status() == {"lag": 0, "unread_bytes": 0, "segments": 1}


def test_segments_behind_the_saved_position_are_deleted(tmp_path: Path) -> None:
    w = writer(tmp_path, segment_bytes=300)
    for i in range(20):
        post(w, [f"k{i}-{j}" for j in range(5)])
    folder = tmp_path / "q" / "ingest"
    assert len(journal.segments(folder)) >= 5
    spool = Spool(tmp_path, "q").ensure()
    src = source(tmp_path)
    got: list[str] = []
    f = src.fetch(None, 30)
    got += [i["id"] for i in f.items]
    position = f.position
    f = src.fetch(position, 30)  # past several segments, but none saved yet
    got += [i["id"] for i in f.items]
    assert journal.segments(folder)[0] == 1, "deleted behind a position not yet saved"
    spool.write_position(f.position)
    while (f := src.fetch(f.position, 30)).items:
        got += [i["id"] for i in f.items]
    assert len(got) == len(set(got)) == 100
    left = journal.segments(folder)
    assert left[0] == spool.read_position()[0], left  # only the saved position's segment on
    spool.write_position(f.position)
    src.fetch(f.position, 30)
    assert journal.segments(folder) == [f.position[0]]
    assert src.status()["lag"] == 0


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown key 'max_bytes' for kind \"ingest\""):
        source(Path("."), max_bytes=1)
    with pytest.raises(ConfigError, match="max_request_bytes.*not a size"):
        source(Path("."), max_request_bytes="lots")
    with pytest.raises(ConfigError, match="max_unread_bytes.*below max_request_bytes"):
        source(Path("."), max_request_bytes="10MB", max_unread_bytes="1MB")
    s = source(Path("."), max_request_bytes="1MB", segment_bytes=4096).settings
    assert (s.max_request_bytes, s.segment_bytes) == (10**6, 4096)


def test_a_retried_request_s_repeats_are_dropped_within_a_fetch(tmp_path: Path) -> None:
    w = writer(tmp_path)
    post(w, ["a", "b"])
    post(w, ["a", "b"])  # the client saw no 202 and sent it again
    post(w, ["c"])
    src = open_source("ingest", {}, tmp_path)  # the queue's key is "id" (Context.key None)
    f = src.fetch(None, 10)
    assert [i["id"] for i in f.items] == ["a", "b", "c"]
    assert src.fetch(f.position, 10).items == []


def test_a_failed_fsync_acknowledges_nothing_and_the_next_append_starts_a_new_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ingest"
    w = Writer(folder)
    post(w, ["a"])
    real = os.fsync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(journal.JournalFailed, match="Input/output error"):
        post(w, ["b"])
    monkeypatch.setattr(os, "fsync", real)
    post(w, ["c"])  # never after bytes of unknown state: a new segment
    assert journal.segments(folder) == [1, 2]
    # "b" was written (not acknowledged): it may be read, "a" and "c" must be.
    got = read_all(Reader(folder))[0]
    assert got[0] == "a" and got[-1] == "c" and set(got) <= {"a", "b", "c"}


def test_a_failed_write_leaves_the_segment_for_a_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ingest"
    w = Writer(folder)
    post(w, ["a"])
    real = os.pwrite

    def full(fd: int, data: Any, offset: int) -> int:
        if offset > 0 and len(data) > 20:  # the record, not the head
            real(fd, bytes(data)[:10], offset)  # part of it, then the disk is full
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        post(w, ["b"])
    monkeypatch.setattr(os, "pwrite", real)
    post(w, ["c"])
    assert journal.segments(folder) == [1, 2]
    assert read_all(Reader(folder))[0] == ["a", "c"]


def test_repeats_dropped_are_replaced_so_a_short_fetch_means_drained(tmp_path: Path) -> None:
    w = writer(tmp_path)
    post(w, ["a", "b", "c"])
    post(w, ["a", "b", "c"])  # a retry
    post(w, ["d", "e"])
    src = open_source("ingest", {}, tmp_path)
    f = src.fetch(None, 4)
    assert [i["id"] for i in f.items] == ["a", "b", "c", "d"]  # a full batch: not drained
    assert [i["id"] for i in src.fetch(f.position, 4).items] == ["e"]
