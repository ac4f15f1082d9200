"""``kind = "logfile"``: fetch stepped over real files in tmp_path (tail -F semantics)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from lrq.errors import ConfigError
from lrq.sources import Context, logfile
from lrq.sources.logfile import LogfileSource, Settings


def source(tmp_path: Path, paths: list[str] | None = None, **kw: Any) -> LogfileSource:
    cfg = Settings.parse({"paths": paths or ["app.log"], **kw}, tmp_path, "queues.q.source")
    return logfile.open(cfg, Context(data_dir=tmp_path / "data", queue="q"))


def drain(src: LogfileSource, pos: Any, limit: int = 1000) -> tuple[list[dict[str, Any]], Any]:
    """Fetch until a fetch comes back empty: every item and the last position."""
    out: list[dict[str, Any]] = []
    for _ in range(10_000):
        f = src.fetch(pos, limit)
        pos = f.position
        if not f.items:
            return out, pos
        out += f.items
    raise AssertionError("the source never drained")


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def lines(items: list[dict[str, Any]]) -> list[str]:
    return [i["line"] for i in items]


def test_partial_line_held_back_until_it_completes(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntwo\nhalf-")
    src = source(tmp_path)
    items, pos = drain(src, None)
    assert lines(items) == ["one", "two"]
    assert [i["offset"] for i in items] == [0, 4]
    assert set(items[0]) == set(src.item_fields()) == {"id", "line", "path", "offset"}
    assert src.fetch(pos, 10).items == []  # still no newline: nothing
    append(log, b"written\nnext\n")
    items, pos = drain(src, pos)
    assert lines(items) == ["half-written", "next"]
    assert items[0]["offset"] == 8 and items[0]["path"] == str(log)


def test_long_line_cut_into_parts_keeps_every_byte(tmp_path: Path) -> None:
    text = "é" * 7 + "x" * 20 + "日本語" * 5  # multibyte characters at the cuts
    (tmp_path / "app.log").write_bytes(b"short\n" + text.encode() + b"\nafter\n")
    items, _ = drain(source(tmp_path, max_bytes=10), None)
    parts = [i for i in items if "part" in i]
    assert [i["line"] for i in items if "part" not in i] == ["short", "after"]
    assert "".join(p["line"] for p in parts) == text
    assert "\ufffd" not in "".join(p["line"] for p in parts)  # no character split in two
    assert [p["part"] for p in parts] == list(range(1, len(parts) + 1))
    assert {p["of"] for p in parts} == {len(parts)} and len(parts) >= 6
    assert all(len(p["line"].encode()) <= 10 for p in parts)
    assert {p["offset"] for p in parts} == {6}
    assert len({i["id"] for i in items}) == len(items)


def test_a_cut_line_fills_a_fetch_and_goes_on_in_the_next(tmp_path: Path) -> None:
    (tmp_path / "app.log").write_bytes(b"a\nb\n" + b"z" * 50 + b"\nc\n")
    src = source(tmp_path, max_bytes=10)
    first = src.fetch(None, 4)  # full: a batch never comes back short (short means drained)
    assert [(i["line"], i.get("part")) for i in first.items] == [
        ("a", None), ("b", None), ("z" * 10, 1), ("z" * 10, 2)]
    assert first.position["files"][0]["part"] == 2
    again = source(tmp_path, max_bytes=10).fetch(first.position, 4)  # after a restart too
    assert [(i["line"], i.get("part")) for i in again.items] == [
        ("z" * 10, 3), ("z" * 10, 4), ("z" * 10, 5), ("c", None)]
    assert {i["offset"] for i in first.items[2:] + again.items[:3]} == {4}
    assert {i["of"] for i in first.items[2:] + again.items[:3]} == {5}
    assert again.position["files"][0]["part"] == 0
    assert src.fetch(again.position, 4).items == []


def test_invalid_utf8_replaced_not_dropped(tmp_path: Path) -> None:
    (tmp_path / "app.log").write_bytes(b"ok\nbad \xff\xfe here\n\xc3\n")
    items, _ = drain(source(tmp_path), None)
    assert lines(items) == ["ok", "bad \ufffd\ufffd here", "\ufffd"]
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "app.log").write_bytes(b"caf\xe9\n")
    assert lines(drain(source(latin, encoding="latin-1"), None)[0]) == ["café"]


def test_rename_rotation_reads_old_file_to_its_end_then_the_new_one(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"a1\na2\n")
    src = source(tmp_path)
    items, pos = drain(src, None)
    assert lines(items) == ["a1", "a2"]
    append(log, b"a3\npart")
    os.rename(log, tmp_path / "app.log.1")
    log.write_bytes(b"b1\n")
    append(tmp_path / "app.log.1", b"ial\n")  # the writer had not reopened yet
    items, pos = drain(src, pos)
    assert lines(items) == ["a3", "partial", "b1"]  # old content first
    assert items[0]["path"] == str(tmp_path / "app.log.1")
    assert len({i["id"] for i in items}) == 3
    assert len(pos["files"]) == 2  # the rotated file is watched for GRACE
    src.wall = lambda: time.time() + 2 * logfile.GRACE
    src._rescan = True
    append(log, b"b2\n")
    items, pos = drain(src, pos)
    assert lines(items) == ["b2"]
    assert [f["path"] for f in pos["files"]] == [str(log)]  # finished and forgotten


def test_rotated_file_with_a_partial_last_line_hands_it_out_once_quiet(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"a1\nno-newline")
    src = source(tmp_path)
    items, pos = drain(src, None)
    os.rename(log, tmp_path / "app.log.1")
    log.write_bytes(b"b1\n")
    items, pos = drain(src, pos)
    assert lines(items) == ["b1"]  # not quiet yet: the line may still complete
    src.wall = lambda: time.time() + 2 * logfile.GRACE
    src._rescan = True
    items, pos = drain(src, pos)
    assert lines(items) == ["no-newline"]


def test_copytruncate_is_read_again_from_zero(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"old1\nold2\nold3\n")
    src = source(tmp_path)
    before, pos = drain(src, None)
    with open(log, "r+b") as fh:  # logrotate's copytruncate: same inode, size 0
        fh.truncate(0)
    append(log, b"new1\n")
    with caplog.at_level(logging.WARNING, logger="lrq.sources.logfile"):
        items, pos = drain(src, pos)
    assert lines(items) == ["new1"]
    assert items[0]["offset"] == 0
    assert items[0]["id"] not in {i["id"] for i in before}  # the first line names the file
    assert any(r.message.startswith("truncated") for r in caplog.records)
    assert not any(r.message.startswith("lost") for r in caplog.records)  # all had been read


def test_truncated_and_regrown_past_the_offset_is_caught_by_its_first_line(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"old1\n")
    src = source(tmp_path)
    _, pos = drain(src, None)
    with open(log, "r+b") as fh:
        fh.truncate(0)
    append(log, b"new-1\nnew-2\n")  # longer than before: the size alone would not tell
    items, _ = drain(src, pos)
    assert lines(items) == ["new-1", "new-2"]


def test_deleted_unread_file_is_reported_after_a_restart(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"x\n" * 10)
    src = source(tmp_path)
    first = src.fetch(None, 3)
    assert lines(first.items) == ["x"] * 3
    log.unlink()
    # The same process keeps its descriptor: the deleted file is still read to its end.
    assert lines(drain(src, first.position)[0]) == ["x"] * 7
    src.close()
    # A restart has only the position: the rest is gone, and said so.
    again = source(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lrq.sources.logfile"):
        items, pos = drain(again, first.position)
    assert items == [] and pos["files"] == []
    lost = [r for r in caplog.records if r.message.startswith("lost")]
    assert len(lost) == 1 and str(log) in lost[0].message and "bytes=14" in lost[0].message
    view = again.status()
    assert view["losses"] == 1 and view["lost_bytes"] == 14 and str(log) in view["last_loss"]
    assert [(x.path, x.bytes, x.why) for x in again.losses()] == [(str(log), 14, "missing")]
    drain(source(tmp_path), first.position)  # reported again by another restart: recorded once
    assert source(tmp_path).status()["losses"] == 1


def test_position_survives_a_restart_and_finds_a_file_rotated_meanwhile(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(50)))
    src = source(tmp_path)
    first = src.fetch(None, 20)
    src.close()
    os.rename(log, tmp_path / "app.log.1")  # rotated while lrq was down
    log.write_bytes(b"fresh\n")
    items, _ = drain(source(tmp_path), first.position, limit=7)
    assert lines(first.items + items) == [f"line {i}" for i in range(50)] + ["fresh"]


def test_globs_follow_every_match_and_new_files(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.log").write_bytes(b"a\n")
    (tmp_path / "logs" / "b.log").write_bytes(b"b\n")
    (tmp_path / "logs" / "skip.txt").write_bytes(b"no\n")
    src = source(tmp_path, ["logs/*.log"])
    items, pos = drain(src, None)
    assert sorted(lines(items)) == ["a", "b"]
    (tmp_path / "logs" / "c.log").write_bytes(b"c\n")
    append(tmp_path / "logs" / "a.log", b"a2\n")
    items, pos = drain(src, pos)
    assert sorted(lines(items)) == ["a2", "c"]
    assert len(pos["files"]) == 3


def test_every_line_once_over_many_small_fetches(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    want = [f"{i} " + "y" * (i % 300) for i in range(20_000)]
    log.write_bytes("".join(w + "\n" for w in want).encode())
    src = source(tmp_path)
    got, pos = drain(src, None, limit=97)
    assert lines(got) == want
    assert src.remaining(pos) == 0
    read = log.stat().st_size
    append(log, b"one more\n" * 10_000)  # 90 kB behind, at the mean line length read so far
    assert src.remaining(pos) == round(90_000 * 20_000 / read)


@pytest.mark.parametrize(("table", "message"), [
    ({}, "queues.q.source.paths: missing"),
    ({"paths": []}, "queues.q.source.paths: missing"),
    ({"paths": [" "]}, "queues.q.source.paths: missing"),
    ({"paths": "app.log"}, "queues.q.source.paths: expected list"),
    ({"paths": ["a", 1]}, "queues.q.source.paths: expected a list of strings"),
    ({"paths": ["a"], "max_bytes": 0}, "queues.q.source.max_bytes: 0 is below 1"),
    ({"paths": ["a"], "encoding": "klingon"}, "queues.q.source.encoding: unknown encoding"),
    ({"paths": ["a"], "encoding": "utf-16"}, "queues.q.source.encoding: 'utf-16' does not"),
    ({"paths": ["a"], "follow": True}, "unknown key 'follow' for kind \"logfile\""),
])
def test_config_errors_name_the_key(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.parse(table, tmp_path, "queues.q.source")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_registered_kind_from_a_config_file(tmp_path: Path) -> None:
    from lrqtest import load_app

    (tmp_path / "app.log").write_bytes(b"hello\n")
    path = tmp_path / "lrq.toml"
    path.write_text('data_dir = "data"\ndb_url = "sqlite:///results.db"\n'
                    '[queues.access]\nhandler = "workers.wordcount:handle"\nkey = "id"\n'
                    'batch_size = 100\n'
                    '[queues.access.source]\nkind = "logfile"\npaths = ["app.log"]\n')
    app = load_app(path)
    q = app.queues()[0]
    assert q.source.kind == "logfile" and q.source.settings.paths == (str(tmp_path / "app.log"),)
    app.check_key(q)
    assert lines(app.source(q).fetch(None, 10).items) == ["hello"]


def test_sniffer_saves_the_position_and_status_reads_it(tmp_path: Path) -> None:
    from lrqtest import load_app

    log = tmp_path / "app.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(250)) + b"partial")
    path = tmp_path / "lrq.toml"
    path.write_text('data_dir = "data"\ndb_url = "sqlite:///results.db"\n'
                    '[queues.access]\nhandler = "workers.wordcount:handle"\nkey = "id"\nbatch_size = 100\n'
                    '[queues.access.source]\nkind = "logfile"\npaths = ["app.log"]\n')
    app = load_app(path)
    q = app.queues()[0]
    sniffer = app.sniffer(q)
    with sniffer.spool.lock("sniff"):
        assert sniffer.tick() == 3  # 100 + 100 + 50 lines
    saved = sniffer.spool.read_position()
    assert saved["files"][0]["offset"] == log.stat().st_size - len(b"partial")
    published = [sniffer.spool.load(n).items for n in sniffer.spool.pending()]
    assert [i["line"] for b in published for i in b] == [f"line {i}" for i in range(250)]
    view = app.status().queues[0].source  # what `lrq status` shows: from the saved position
    assert view["kind"] == "logfile" and view["behind_bytes"] == len(b"partial")
    assert view["files"] == [{"path": str(log), "offset": saved["files"][0]["offset"],
                              "size": log.stat().st_size}]
    assert view["losses"] == 0 and view["lag"] == 1  # the partial line, ~ one mean line


def test_a_generation_rotated_away_while_down_is_read_not_skipped(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"a1\na2\n")
    src = source(tmp_path)
    _, pos = drain(src, None)  # the saved position knows a (at app.log)
    src.close()
    append(log, b"a3\n")
    os.rename(log, tmp_path / "app.log.1")  # while lrq is down: a -> .1, b is new ...
    log.write_bytes(b"b1\nb2\n")
    os.rename(tmp_path / "app.log.1", tmp_path / "app.log.2")  # ... and rotated again
    os.rename(log, tmp_path / "app.log.1")
    log.write_bytes(b"c1\n")
    (tmp_path / "app.log.3.gz").write_bytes(b"\x1f\x8b\x08compressed\n")  # never read as text
    items, pos = drain(source(tmp_path), pos)
    assert lines(items) == ["a3", "b1", "b2", "c1"]
    assert [Path(f["path"]).name for f in pos["files"]] == ["app.log.2", "app.log.1", "app.log"]


def test_a_truncation_that_cut_unread_lines_reports_them(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"r1\nr2\nu3\nu4\n")
    src = source(tmp_path)
    first = src.fetch(None, 2)  # r1, r2 read; u3, u4 seen (the size) but not read
    assert lines(first.items) == ["r1", "r2"]
    with open(log, "r+b") as fh:
        fh.truncate(0)
    append(log, b"n1\n")
    with caplog.at_level(logging.WARNING, logger="lrq.sources.logfile"):
        items, _ = drain(src, first.position)
    assert lines(items) == ["n1"]
    assert [(x.bytes, x.why) for x in src.losses()] == [(6, "truncated")]
    assert any(r.message.startswith("lost") and "bytes=6" in r.message for r in caplog.records)


def test_a_line_without_a_newline_past_the_memory_bound_is_cut_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfile, "LONGEST", 100)
    monkeypatch.setattr(logfile, "CHUNK", 64)
    data = b"z" * 250 + b"\nok\n"
    (tmp_path / "app.log").write_bytes(data)
    items, pos = drain(source(tmp_path, max_bytes=40), None, limit=3)
    assert "".join(i["line"] for i in items) == data.decode().replace("\n", "")
    assert [(i["offset"], i["part"], i["of"]) for i in items if "part" in i] == [
        (0, 1, 3), (0, 2, 3), (0, 3, 3), (100, 1, 3), (100, 2, 3), (100, 3, 3),
        (200, 1, 2), (200, 2, 2)]
    assert items[-1]["line"] == "ok" and pos["files"][0]["offset"] == len(data)
    assert len({i["id"] for i in items}) == len(items)


def test_truncated_and_regrown_with_the_same_header_is_caught_and_ids_stay_unique(
        tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"#Version: 1.0\n" + b"".join(b"old %03d\n" % i for i in range(20)))
    src = source(tmp_path)
    before, saved = drain(src, None)
    with open(log, "r+b") as fh:  # copytruncate, then more than before is written at once
        fh.truncate(0)
    append(log, b"#Version: 1.0\n" + b"".join(b"new %04d\n" % i for i in range(40)))
    after, pos = drain(src, saved)
    assert lines(after) == ["#Version: 1.0"] + [f"new {i:04d}" for i in range(40)]
    assert not {i["id"] for i in before} & {i["id"] for i in after}
    assert pos["files"][0]["gen"] == 1
    # A restart from the position saved before the truncation decides the same: same ids.
    replay, _ = drain(source(tmp_path), saved)
    assert [i["id"] for i in replay] == [i["id"] for i in after]


def test_a_reused_inode_with_the_same_first_line_gets_ids_of_its_own(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"#header\nold\n")
    src = source(tmp_path)
    old, pos = drain(src, None)
    src.close()
    # As if this file were gone and a new one had taken its inode with the same header: the
    # position remembers the gone file (``_retire``), not as followed.
    gone = {"files": [], "gone": [[f["dev"], f["ino"], f["tag"], f["gen"]] for f in pos["files"]]}
    new, after = drain(source(tmp_path), gone)
    assert lines(new) == ["#header", "old"]
    assert not {i["id"] for i in old} & {i["id"] for i in new}
    assert after["files"][0]["gen"] == 1 and after["gone"] == gone["gone"]


def test_a_finished_rotated_file_is_remembered_as_gone(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"a\n")
    src = source(tmp_path)
    _, pos = drain(src, None)
    os.rename(log, tmp_path / "app.log.1")
    log.write_bytes(b"b\n")
    _, pos = drain(src, pos)
    src.wall = lambda: time.time() + 2 * logfile.GRACE
    src._rescan = True
    _, pos = drain(src, pos)
    (rotated,) = pos["gone"]
    assert rotated[:2] == [(tmp_path / "app.log.1").stat().st_dev,
                           (tmp_path / "app.log.1").stat().st_ino]
