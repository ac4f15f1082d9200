"""Rates, ETA and the status records, on a fake clock and in memory (lrq.rates, lrq.status,
lrq.display's plain rendering and progress)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from lrqtest import load_app, write_config

from lrq import display, rates
from lrq.disk import Held
from lrq.spool.listing import Counts
from lrq.status import BatchView, DiskStatus, QueueStatus, Status, Verification


def counts(pending: int = 0, claimed: int = 0, done: int = 0) -> Counts:
    return Counts(pending=pending, claimed=claimed, done=done, failed=0, quarantined=0, bytes=10)


def disk() -> DiskStatus:
    return DiskStatus(used=10, max_bytes=100, free_bytes=5, total_bytes=50, free_inodes=3,
                      total_inodes=9, min_free="10%", below_min_free=None, blocked=None,
                      held=Held(0, 0, 10, 0, 0, 0, 0, 5))


# ------------------------------------------------------------------------- rates and ETA


def test_window_counts_on_a_fake_clock_take_only_each_windows_commits() -> None:
    now = 10_000.0
    finished = [(now - 5, 100), (now - 59, 100), (now - 61, 50), (now - 599, 10),
                (now - 601, 1000), (now + 1, 7)]  # a commit "after now" (skew) is not counted
    got = rates.window_counts(finished, now)
    assert got == {60: (2, 200), 600: (4, 260)}
    r = rates.Rates.from_counts(got)
    assert r.window(60) is not None and r.window(60).items_per_s == pytest.approx(200 / 60)
    assert r.window(600) is not None and r.window(600).batches_per_s == pytest.approx(4 / 600)
    assert r.items_per_s == pytest.approx(200 / 60)  # the shortest window with commits
    assert r.to_json()["600s"] == {"batches": 4, "items": 260, "items_per_s": 0.433,
                                   "batches_per_s": 0.007}


def test_a_stopped_run_falls_back_to_the_long_window_then_to_no_rate() -> None:
    now = 1_000.0
    finished = [(now - 300, 600)]  # the last commit five minutes ago
    r = rates.Rates.from_counts(rates.window_counts(finished, now))
    assert r.window(60).items == 0 and r.items_per_s == pytest.approx(1.0)
    idle = rates.Rates.from_counts(rates.window_counts(finished, now + 1000))
    assert idle.items_per_s == 0.0 and rates.eta(500, idle.items_per_s) is None


@pytest.mark.parametrize(("backlog", "rate", "expected"), [
    (1200, 20.0, 60.0), (0, 0.0, 0.0), (0, 5.0, 0.0), (10, 0.0, None), (None, 3.0, None),
    (-3, 1.0, 0.0), (10, float("nan"), None)])
def test_eta(backlog: int | None, rate: float, expected: float | None) -> None:
    assert rates.eta(backlog, rate) == expected


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0, "0s"), (59.4, "59s"), (60, "1m00s"), (725, "12m05s"), (12_000, "3h20m"),
    (187_200, "2d04h")])
def test_human_seconds(seconds: float | None, text: str) -> None:
    assert rates.human_seconds(seconds) == text


# ------------------------------------------------------------------------------ records


OLD_QUEUE_KEYS = {"pending", "claimed", "done", "failed", "quarantined", "bytes", "pending_bytes",
                  "claimed_bytes", "done_bytes", "failed_bytes", "tmp_bytes", "spare",
                  "awaiting_ack", "stale", "foreign", "key_problem", "position", "source"}
DB_KEYS = {"results", "dead_letters", "ledger_batches", "ledger_items"}
NEW_KEYS = {"rates", "backlog_items", "eta_seconds", "remaining", "eta_remaining_seconds",
            "paused"}


def test_queue_record_json_keeps_the_old_keys_and_adds_the_new_ones() -> None:
    r = rates.Rates.from_counts({60: (6, 600), 600: (6, 600)})
    q = QueueStatus(name="docs", counts=counts(pending=3, claimed=1), stale=0, foreign_count=1,
                    foreign_sample=("x (a directory)",), key_problem=None, position=42,
                    source={"kind": "sql"}, results=600, dead_letters=2, ledger_batches=6,
                    ledger_items=600, rates=r, backlog_items=400,
                    eta_seconds=rates.eta(400, r.items_per_s), remaining=1000,
                    eta_remaining_seconds=rates.eta(1400, r.items_per_s),
                    paused={"since": "2026-12-01T10:00:00Z", "by": "ops"})
    j = q.to_json()
    assert set(j) == OLD_QUEUE_KEYS | DB_KEYS | NEW_KEYS
    assert j["foreign"] == {"count": 1, "sample": ["x (a directory)"]}
    assert (j["eta_seconds"], j["eta_remaining_seconds"]) == (40.0, 140.0)
    assert j["rates"]["60s"]["items_per_s"] == 10.0 and j["paused"]["by"] == "ops"
    st = Status(data_dir="/d", queues=(q,), disk=disk())
    top = st.to_json()
    assert list(top) == ["data_dir", "queues", "bytes", "disk"] and top["bytes"] == 10
    assert st.queue("docs") is q
    line = display.throughput(q)
    assert line.startswith("10.0 items/s (1 min), 1.0 (10 min); backlog ~400 items, ETA 40s")
    assert line.endswith("source has 1000 more, ETA 2m20s")


def test_with_the_database_down_its_keys_are_left_out_and_its_error_shown() -> None:
    q = QueueStatus(name="docs", counts=counts(pending=2), stale=0, foreign_count=0,
                    foreign_sample=(), key_problem=None, position=None, source={"kind": "sql"})
    st = Status(data_dir="/d", queues=(q,), disk=disk(), database_error="refused")
    j = st.to_json()
    assert j["database"] == {"error": "refused"}
    assert not DB_KEYS & set(j["queues"]["docs"]) and j["queues"]["docs"]["rates"] is None
    lines = display.status_lines(st)
    assert lines[0].split() == ["queue", "pending", "claimed", "stale", "done", "failed",
                                "quarantined", "disk", "position"]
    assert lines[1].split()[:2] == ["docs", "2"] and lines[-1] == "database unreachable: refused"
    assert len(lines) == 5


def test_status_lines_show_rate_columns_and_a_paused_queue() -> None:
    r = rates.Rates.from_counts({60: (3, 300), 600: (3, 300)})
    q = QueueStatus(name="docs", counts=counts(pending=1), stale=0, foreign_count=0,
                    foreign_sample=(), key_problem=None, position=7, source={"kind": "sql"},
                    results=300, dead_letters=0, ledger_batches=3, ledger_items=300, rates=r,
                    backlog_items=100, eta_seconds=20.0,
                    paused={"since": "2026-12-01T10:00:00Z", "by": "alice"})
    lines = display.status_lines(Status(data_dir="/d", queues=(q,), disk=disk()))
    header, row = lines[0].split(), lines[1].split()
    assert header[7] == "results" and header[10:12] == ["items/s", "eta"]
    assert header[-2:] == ["disk", "position"] and row[-1] == "7"
    assert row[0] == "docs" and row[10:12] == ["5.0", "20s"] and "(paused)" in lines[1]
    assert "docs: PAUSED since 2026-12-01T10:00:00Z by alice (`lrq resume docs`)" in lines
    plain = display.watch_line(Status(data_dir="/d", queues=(q,), disk=disk()), now=0)
    assert plain == ["1970-01-01T00:00:00Z docs pending=1 claimed=0 done=0 failed=0 stale=0 "
                     "items_per_s=5.0 eta=20s remaining=- paused"]


def test_batch_view_json_leaves_out_what_was_not_found() -> None:
    broken = BatchView(queue="docs", name="b1", state="failed", load_error="bad signature",
                       error={"error": "boom"})
    assert broken.to_json() == {"queue": "docs", "name": "b1", "state": "failed",
                                "load_error": "bad signature", "error": {"error": "boom"},
                                "recorded": False}
    ok = BatchView(queue="docs", name="b2", state="done", created=1.5, items=2,
                   keys=("a", "b"), position=9, recorded=True,
                   dead_letters=({"key": "b", "error": "x"},))
    assert ok.to_json() == {"queue": "docs", "name": "b2", "state": "done", "created": 1.5,
                            "items": 2, "keys": ["a", "b"], "position": 9, "recorded": True,
                            "dead_letters": [{"key": "b", "error": "x"}]}


def test_verification_json_says_ok_and_source_duplicates() -> None:
    v = Verification(queue="docs", source=10, distinct=9, results=9, dead=0, missing=0,
                     duplicated=0, extra=0, failed_batches=0)
    j = v.to_json()
    assert j["ok"] is False and j["source_duplicates"] == 1 and j["missing_sample"] == []
    with pytest.raises(AttributeError):
        v.missing = 3  # type: ignore[misc]  # frozen


def test_app_records_from_a_spool_and_a_sqlite_ledger_in_process(tmp_path: Path) -> None:
    app = load_app(write_config(tmp_path, docs=250, batch_size=100))
    q = app.queues()[0]
    sniffer = app.sniffer(q)
    assert sniffer.tick(max_batches=2) == 2
    names = app.spool(q).pending()
    st = app.status()
    docs = st.queue("docs")
    assert (docs.counts.pending, docs.remaining, docs.position) == (2, 50, 200)
    assert docs.backlog_items == 200 and docs.eta_seconds is None  # nothing committed yet
    assert docs.rates is not None and docs.rates.items_per_s == 0.0 and docs.paused is None
    app.worker(q).run(burst=True)
    docs = app.status().queue("docs")
    assert docs.ledger_items == 200 and docs.rates.window(60).items == 200
    assert docs.eta_seconds == 0.0 and docs.eta_remaining_seconds == pytest.approx(50 / (200 / 60))
    view = app.show(names[0])
    assert (view.state, view.recorded, view.items, view.load_error) == ("done", True, 100, None)
    assert view.to_json()["keys"][0] == "m000000001" and "claim" not in view.to_json()


# ---------------------------------------------------------------------------- progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_counts_rate_and_eta_on_a_fake_clock() -> None:
    n = [0]
    p = display.Progress("work docs", lambda: n[0], total=10, stream=io.StringIO())
    n[0] = 4
    assert p.line(now=p._started + 2) == \
        "progress what=work docs batches=4 total=10 rate=2.0/s eta=3s"
    n[0] = 10
    assert p.line(now=p._started + 5).endswith("eta=0s")
    unknown = display.Progress("verify docs", lambda: 7, unit="keys", stream=io.StringIO())
    assert unknown.line(now=unknown._started + 1).endswith("keys=7 total=- rate=7.0/s eta=-")


def test_progress_draws_a_bar_on_a_terminal() -> None:
    out = Tty()
    n = [0]
    with display.progress("work docs", lambda: n[0], total=10, stream=out):
        n[0] = 3
    text = out.getvalue()
    assert "work docs" in text and "3/10" in text


def test_without_rich_a_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    assert display.can_draw(Tty()) and not display.can_draw(io.StringIO())
    monkeypatch.setattr(display.importlib.util, "find_spec", lambda name: None)
    assert not display.can_draw(Tty())
    assert not display.Progress("sniff docs", lambda: 0, stream=Tty()).tty


def test_a_brokers_remaining_is_its_lag(tmp_path: Path) -> None:
    from lrq.sources import sqlite_broker

    broker = tmp_path / "broker.db"
    sqlite_broker.connect(str(broker)).close()
    sqlite_broker.add(str(broker), [{"doc_id": f"d{i}", "content": "a b"} for i in range(250)])
    cfg = tmp_path / "lrq.toml"
    cfg.write_text('data_dir = "data"\ndb_url = "sqlite:///results.db"\n[queues.docs]\n'
                   'handler = "workers.wordcount:handle"\nkey = "doc_id"\nbatch_size = 100\n'
                   f'[queues.docs.source]\nkind = "sqlite-broker"\npath = "{broker}"\n')
    app = load_app(cfg)
    q = app.queues()[0]
    assert app.remaining(q) == 250
    assert app.sniffer(q).tick(max_batches=1) == 1
    docs = app.status().queue("docs")
    assert (docs.remaining, docs.source["lag"], docs.backlog_items) == (150, 150, 100)


class Stopping:
    """An app whose status is asked ``times`` times, then Ctrl-C arrives."""

    def __init__(self, st: Status, times: int) -> None:
        self.st, self.left = st, times

    def status(self, queue: str | None = None) -> Status:
        if not self.left:
            raise KeyboardInterrupt
        self.left -= 1
        return self.st


def test_watch_prints_each_refresh_and_returns_0_on_ctrl_c() -> None:
    q = QueueStatus(name="docs", counts=counts(pending=4), stale=0, foreign_count=0,
                    foreign_sample=(), key_problem=None, position=None, source={"kind": "sql"})
    st = Status(data_dir="/d", queues=(q,), disk=disk())
    out = io.StringIO()
    assert display.watch(Stopping(st, 3), None, 0.001, out) == 0  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(" docs pending=4 " in line for line in lines)
    out = Tty()  # --json: JSON lines even on a terminal
    assert display.watch(Stopping(st, 2), None, 0.001, out, as_json=True) == 0  # type: ignore[arg-type]
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(docs) == 2 and docs[0] == st.to_json()


def test_with_the_database_down_the_backlog_and_the_source_are_still_counted(
        tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()  # SQLite cannot open a directory: "unable to open"
    app = load_app(write_config(tmp_path, docs=250, batch_size=100,
                                top={"db_url": f"sqlite:///{tmp_path / 'dir.db'}"}))
    assert app.sniffer(app.queues()[0]).tick(max_batches=1) == 1
    st = app.status()
    docs = st.queue("docs")
    assert st.database_error is not None and "unable to open" in st.database_error
    assert (docs.results, docs.rates, docs.backlog_items, docs.remaining) == (None, None, 100, 150)
    assert docs.eta_seconds is None and docs.eta_remaining_seconds is None
