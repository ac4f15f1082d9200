"""The SQL source's keyset paging and the watermark: it moves only after a durable publish."""
from __future__ import annotations

import sqlite3
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from lrqtest import load_app, write_config
from sqlalchemy import MetaData, insert

from lrq.errors import ConfigError, SourceError
from lrq.sample import documents, source_table, write_documents
from lrq.sniffer import Sniffer
from lrq.sources.sql import Settings, SqlSource
from lrq.spool import Spool
from lrq.testing import MemorySource


def sql_source(tmp_path: Path, n: int, **kw) -> SqlSource:
    url = f"sqlite:///{tmp_path / 'src.db'}"
    write_documents(url, n)
    return SqlSource(Settings(url=url, table="source_data", order_by="id",
                                  columns=(("id", "id"), ("doc_id", "mid"), ("content", "content")), **kw))


def test_keyset_paging_reads_each_row_once_in_order(tmp_path: Path) -> None:
    src = sql_source(tmp_path, 250)
    seen, pos = [], None
    while True:
        f = src.fetch(pos, 100)
        if not f.items:
            break
        seen += [i["id"] for i in f.items]
        pos = f.position
    assert seen == list(range(1, 251))
    assert set(src.fetch(None, 1).items[0]) == {"id", "doc_id", "content"}


def test_paging_is_not_disturbed_by_gaps_or_late_rows(tmp_path: Path) -> None:
    src = sql_source(tmp_path, 10)
    t = source_table(MetaData())
    with src.engine.begin() as conn:
        conn.execute(t.delete().where(t.c.id.in_([3, 4, 5])))
    f = src.fetch(None, 4)
    assert [i["id"] for i in f.items] == [1, 2, 6, 7]
    with src.engine.begin() as conn:  # rows appended after the first pages
        conn.execute(insert(t), documents(5, start=11))
    rest = src.fetch(f.position, 100)
    assert [i["id"] for i in rest.items] == [8, 9, 10, 11, 12, 13, 14, 15]


def test_unknown_column_is_a_config_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'src.db'}"
    write_documents(url, 1)
    with pytest.raises(ConfigError, match="no column 'nope'"):
        SqlSource(Settings(url=url, table="source_data", columns=(("x", "nope"),)))
    with pytest.raises(ConfigError, match="not found"):
        SqlSource(Settings(url=url, table="missing"))
    with pytest.raises(ConfigError, match="does not exist"):
        SqlSource(Settings(url=f"sqlite:///{tmp_path / 'absent.db'}", table="t"))
    assert not (tmp_path / "absent.db").exists()


def make_sniffer(tmp_path: Path, source, batch_size: int = 100,
                 max_pending: int | str = 1000) -> Sniffer:
    cfg = write_config(tmp_path / "cfg", docs=None, batch_size=batch_size, max_pending=max_pending)
    app = load_app(cfg)
    q = app.queues("docs")[0]
    return Sniffer(q, Spool(tmp_path / "data", "docs").ensure(), source)


def test_watermark_advances_only_after_the_batch_is_durable(tmp_path: Path, monkeypatch) -> None:
    src = sql_source(tmp_path, 300)
    sn = make_sniffer(tmp_path, src)
    assert sn.tick(max_batches=1) == 1
    assert sn.spool.read_position() == 100

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sn.spool, "publish", disk_full)
    assert sn.tick(max_batches=1) == 0 and sn.paused == "disk-full"
    assert sn.spool.read_position() == 100  # nothing acknowledged
    monkeypatch.undo()
    # A fresh sniffer (a restarted process) resumes from the saved position.
    again = make_sniffer(tmp_path, src)
    assert again.tick() == 2
    ids = [i["id"] for n in again.spool.pending() for i in again.spool.load(n).items]
    assert ids == list(range(1, 301))
    assert again.drained  # the fetch after the last full page came back empty
    assert again.tick() == 0 and again.spool.read_position() == 300


class PositionlessSource(MemorySource):
    """Acknowledged at publish but with no position of its own (as http-agent: the agent
    keeps it): every fetch hands out new items, the position stays None."""

    def fetch(self, position, limit):
        got = super().fetch(self.fetches * limit, limit)
        return type(got)(got.items, None)


def test_left_is_fsynced_for_a_source_without_a_position(tmp_path: Path, monkeypatch) -> None:
    sn = make_sniffer(tmp_path, PositionlessSource([{"id": i} for i in range(250)]))
    syncs: list[int] = []
    sync = sn.spool.sync_published
    monkeypatch.setattr(sn.spool, "sync_published", lambda: (syncs.append(1), sync()))
    assert sn.tick() == 3
    assert syncs, "published batches whose names were never made durable"


def test_the_watermark_is_saved_per_interval_and_at_the_end_of_a_tick(tmp_path: Path,
                                                                      monkeypatch) -> None:
    src = sql_source(tmp_path, 1000)
    sn = make_sniffer(tmp_path, src)
    saves: list[int] = []
    write = sn.spool.write_position
    monkeypatch.setattr(sn.spool, "write_position", lambda p, **kw: (saves.append(p), write(p, **kw)))
    assert sn.tick(max_batches=4) == 4  # a frozen clock: one save, at the end
    assert saves == [400] and sn.spool.read_position() == 400
    ticks = iter(range(0, 1000))  # every clock read is a second later: a save per batch
    sn.clock = lambda: float(next(ticks))
    assert sn.tick(max_seconds=10_000) == 6
    assert saves == [400, 500, 600, 700, 800, 900, 1000]


def test_an_error_mid_tick_saves_the_watermark_of_the_batches_already_durable(
        tmp_path: Path, monkeypatch) -> None:
    src = sql_source(tmp_path, 500)
    sn = make_sniffer(tmp_path, src)
    publish, calls = sn.spool.publish, []

    def fail_fourth(items, position, **kw):
        calls.append(position)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed while writing the fourth batch")
        return publish(items, position, **kw)

    monkeypatch.setattr(sn.spool, "publish", fail_fourth)
    with pytest.raises(KeyboardInterrupt):
        sn.tick()
    monkeypatch.undo()
    assert sn.spool.read_position() == 300
    again = make_sniffer(tmp_path, src)
    assert again.tick() == 2
    ids = [i["id"] for n in again.spool.pending() for i in again.spool.load(n).items]
    assert ids == list(range(1, 501))  # nothing twice, nothing skipped


def test_crash_between_rename_and_watermark_republishes_the_same_items(tmp_path: Path, monkeypatch) -> None:
    src = sql_source(tmp_path, 100)
    sn = make_sniffer(tmp_path, src)

    def crash(position, **_kw):
        raise KeyboardInterrupt("killed before the watermark was saved")

    monkeypatch.setattr(sn.spool, "write_position", crash)
    with pytest.raises(KeyboardInterrupt):
        sn.tick(max_batches=1)
    monkeypatch.undo()
    assert sn.spool.read_position() is None
    assert make_sniffer(tmp_path, src).tick() == 1
    batches = [sn.spool.load(n).items for n in sn.spool.pending()]
    assert len(batches) == 2 and batches[0] == batches[1]  # a replay, absorbed by the sink


def test_sniffer_pauses_at_max_pending_and_logs_once(tmp_path: Path, caplog) -> None:
    sn = make_sniffer(tmp_path, MemorySource([{"doc_id": i} for i in range(1000)]),
                      batch_size=10, max_pending=3)
    caplog.set_level("INFO", logger="lrq.sniffer")
    assert sn.tick() == 3 and sn.paused
    assert sn.tick() == 0 and sn.tick() == 0
    assert [r.message.split()[0] for r in caplog.records] == ["paused"]
    c = sn.spool.claim(sn.spool.pending()[0])
    sn.spool.mark_done(c)
    assert sn.tick() == 1
    assert [r.message.split()[0] for r in caplog.records] == ["paused", "resumed", "paused"]


def test_a_byte_limit_below_one_batch_lets_one_batch_wait_instead_of_stalling(
        tmp_path: Path) -> None:
    sn = make_sniffer(tmp_path, MemorySource([{"doc_id": i} for i in range(100)]),
                      batch_size=10, max_pending="100B")
    assert sn.tick() == 1 and sn.paused == "max_pending"  # each batch is larger than 100 bytes
    assert sn.tick() == 0
    sn.spool.mark_done(sn.spool.claim(sn.spool.pending()[0]))
    assert sn.tick() == 1  # nothing pending: the next batch goes out, however large
    assert sn.tick() == 0


def test_reading_a_sqlite_source_leaves_its_journal_mode_and_locks_alone(tmp_path: Path) -> None:
    url = tmp_path / "user.db"
    db = sqlite3.connect(url)
    db.execute("CREATE TABLE source_data (id INTEGER PRIMARY KEY, mid TEXT, content TEXT)")
    db.execute("INSERT INTO source_data VALUES (1, 'm1', 'a b')")
    db.commit()
    src = SqlSource(Settings(url=f"sqlite:///{url}", table="source_data"))
    with src.engine.connect() as conn:  # a reader holding a transaction open ...
        conn.exec_driver_sql("SELECT 1").all()
        db.execute("INSERT INTO source_data VALUES (2, 'm2', 'c d')")  # ... never blocks the user
        db.commit()
    assert [i["id"] for i in src.fetch(None, 10).items] == [1, 2]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_sqlite_pages_take_the_raw_path_with_the_same_rows(tmp_path: Path) -> None:
    src = sql_source(tmp_path, 30)
    assert src._raw is not None  # integer and text columns need no type conversion
    raw = [src.fetch(None, 7), src.fetch(7, 100)]
    src._raw = None  # the general SQLAlchemy path over the same table
    general = [src.fetch(None, 7), src.fetch(7, 100)]
    assert raw == general
    assert [len(f.items) for f in raw] == [7, 23] and raw[1].position == 30


def test_typed_columns_keep_sqlalchemy_conversion(tmp_path: Path) -> None:
    url = tmp_path / "typed.db"
    db = sqlite3.connect(url)
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, at DATETIME, amount NUMERIC)")
    db.execute("INSERT INTO events VALUES (1, '2026-11-23 08:00:00.000000', '1.50')")
    db.commit()
    src = SqlSource(Settings(url=f"sqlite:///{url}", table="events", order_by="id"))
    assert src._raw is None
    item = src.fetch(None, 10).items[0]
    assert item["at"] == datetime(2026, 11, 23, 8, 0) and item["amount"] == Decimal("1.50")


def test_a_broken_source_is_a_source_error_on_the_raw_path(tmp_path: Path) -> None:
    src = sql_source(tmp_path, 3)
    assert src._raw is not None
    with src.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE source_data")
    with pytest.raises(SourceError, match="cannot read source table source_data"):
        src.fetch(None, 10)


def test_a_sqlite_source_tells_a_write_by_its_token(tmp_path: Path) -> None:
    src = sql_source(tmp_path, 3)
    before = src.changed()
    assert before is not None
    t = source_table(MetaData())
    with src.engine.begin() as conn:
        conn.execute(insert(t), documents(1, start=4))
    assert src.changed() != before


def test_a_drained_tick_with_stop_publishes_rows_inserted_while_it_waits(tmp_path: Path) -> None:
    import threading

    src = sql_source(tmp_path, 100)
    sn = make_sniffer(tmp_path, src)
    stop = threading.Event()
    assert sn.tick(stop=stop, max_seconds=60) == 1 and sn.drained
    published: list[int] = []

    def run() -> None:
        published.append(sn.tick(stop=stop, max_seconds=60))

    waiting = threading.Thread(target=run)
    waiting.start()
    t = source_table(MetaData())
    with src.engine.begin() as conn:  # the tick above is watching (or about to): no sleep
        conn.execute(insert(t), documents(100, start=101))
    waiting.join(timeout=60)
    stop.set()
    assert not waiting.is_alive()
    assert published == [1]
    assert len(sn.spool.pending()) == 2


def test_a_drained_tick_with_stop_returns_when_stop_is_set(tmp_path: Path) -> None:
    import threading

    src = sql_source(tmp_path, 100)
    sn = make_sniffer(tmp_path, src)
    stop = threading.Event()
    sn.tick(stop=stop, max_seconds=60)
    stop.set()
    assert sn.tick(stop=stop, max_seconds=60) == 0


def test_a_row_written_just_before_the_first_token_is_not_left_for_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit landing between the fetch that finds the table drained and the watch's first
    look at its stats is already in that first token: the watch must fetch once more, not
    wait for a further write that may never come (until the tick's deadline, a latency of
    ``max_seconds`` instead of a few ms)."""
    import threading

    src = sql_source(tmp_path, 100)
    sn = make_sniffer(tmp_path, src)
    stop = threading.Event()
    assert sn.tick(stop=stop, max_seconds=60) == 1 and sn.drained
    look = src.changed
    t = source_table(MetaData())
    looks: list[int] = []

    def write_then_look() -> object:
        if not looks:  # only the first look writes
            with src.engine.begin() as conn:
                conn.execute(insert(t), documents(1, start=101))
        looks.append(1)
        return look()

    src.changed = write_then_look  # type: ignore[method-assign]
    # The look comes after the write's settle time (a thread descheduled for 20 ms between
    # the fetch and the look, on a loaded machine): the token is the file's stats alone.
    monkeypatch.setattr("lrq.sources.sql.SETTLE_NS", 0)
    assert sn.tick(stop=stop, max_seconds=1.5) == 1  # the old code published 0 at the deadline
    assert len(sn.spool.pending()) == 2
