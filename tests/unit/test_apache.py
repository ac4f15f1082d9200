"""workers.apache: the combined-format parser, and sliding windows equal to a direct
computation, whole, split into batches merged by the additive rule, and with replays."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import windowref

from lrq import config
from lrq.errors import ConfigError
from workers import apache
from workers.apache import merge, parse, parse_line, remote_windows, status_windows
from workers.apache_sample import _stamp, read_day, sample_lines, write_day

DOC = ('127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326 '
       '"http://www.example.com/start.html" "Mozilla/4.08 [en] (Win98; I ;Nav)"')


# -- the parser --------------------------------------------------------------------------

def test_the_apache_documentation_line() -> None:
    a = parse_line(DOC)
    assert a == apache.Access(
        remote="127.0.0.1", remote_user="frank", ts=971211336, method="GET",
        url="/apache_pb.gif", protocol="HTTP/1.0", status=200, size=2326,
        referer="http://www.example.com/start.html", agent="Mozilla/4.08 [en] (Win98; I ;Nav)")
    # 13:55:36 at UTC-7 is 20:55:36 UTC
    assert a.ts == 971_136_000 + 20 * 3600 + 55 * 60 + 36


@pytest.mark.parametrize("zone,hours", [("+0000", 0), ("-0700", -7), ("+0530", 5.5), ("+1400", 14)])
def test_time_zones_become_utc(zone: str, hours: float) -> None:
    line = f'::1 - - [01/Jan/2026:00:00:00 {zone}] "GET / HTTP/1.1" 200 1 "-" "-"'
    assert parse_line(line).ts == 1_767_225_600 - int(hours * 3600)


def test_ipv6_remote_dash_size_and_escaped_quotes() -> None:
    line = (r'2001:db8:85a3::8a2e:370:7334 - - [30/Nov/2026:23:59:59 +0000] "HEAD /x?a=\"b\" HTTP/2.0" '
            r'304 - "-" "Mozilla/5.0 (compatible; \"QuoteBot\"/1.0; C:\\bot)"')
    a = parse_line(line)
    assert a.remote == "2001:db8:85a3::8a2e:370:7334"
    assert (a.method, a.url, a.protocol) == ("HEAD", '/x?a="b"', "HTTP/2.0")
    assert (a.status, a.size, a.referer, a.remote_user) == (304, 0, "", "")
    assert a.agent == 'Mozilla/5.0 (compatible; "QuoteBot"/1.0; C:\\bot)'


def test_requests_that_are_not_method_url_protocol_are_kept_as_logged() -> None:
    tls = r'1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "\x16\x03\x01\x00" 400 226 "-" "-"'
    assert parse_line(tls)[3:8] == ("", r"\x16\x03\x01\x00", "", 400, 226)
    timeout = '1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "-" 408 - "-" "-"'
    assert parse_line(timeout)[3:8] == ("", "", "", 408, 0)
    http09 = '1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "GET /old" 200 5 "-" "-"'
    assert parse_line(http09)[3:6] == ("GET", "/old", "")


def test_a_long_url_is_kept_whole() -> None:
    url = "/search?q=" + "y" * 20_000
    a = parse_line(f'1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "GET {url} HTTP/1.1" 200 5 "-" "-"')
    assert a.url == url


@pytest.mark.parametrize("line,problem", [
    ("", "not an Apache combined-format access line"),
    ("hello world", "not an Apache combined-format access line"),
    # the common format (no referer, no agent) is not the combined one
    ('1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 5', "not an Apache combined"),
    ('1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 5 "-" "unterminated',
     "not an Apache combined"),
    ('1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "GET / HTTP/1.1" 20 5 "-" "-"', "not an Apache"),
    ('1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 5k "-" "-"', "not an Apache"),
    ('1.2.3.4 - - [30/Foo/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 5 "-" "-"', "unknown month 'Foo'"),
    ('1.2.3.4 - - [30/Feb/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 5 "-" "-"', "day is out of range"),
    ('1.2.3.4 - - [30/Nov/2026:25:00:00 +0000] "GET / HTTP/1.1" 200 5 "-" "-"', "out of range"),
    ('1.2.3.4 - - [2026-11-30T10:00:00Z] "GET / HTTP/1.1" 200 5 "-" "-"', "is not like 10/Oct/2000"),
])
def test_bad_lines_raise_naming_the_problem_and_quoting_the_line(line: str, problem: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_line(line)
    assert problem in str(e.value)
    assert repr(line) in str(e.value)


def test_a_bad_long_line_is_clipped_in_the_error() -> None:
    line = "x" * 100_000
    with pytest.raises(ValueError) as e:
        parse_line(line)
    assert len(str(e.value)) < apache.CLIP + 100
    assert "(100000 characters)" in str(e.value)


def test_parse_gives_one_row_per_item_keyed_by_its_id_and_raises_on_a_bad_one() -> None:
    items = [{"id": "2049:7:0", "line": DOC, "path": "/l", "offset": 0},
             {"id": "2049:7:150", "line": DOC.replace("frank", "-"), "path": "/l", "offset": 150}]
    rows = parse(items)
    assert [r["id"] for r in rows] == ["2049:7:0", "2049:7:150"]
    assert rows[1]["remote_user"] == "" and rows[0]["ts"] == 971211336
    from workers.models import AccessLine
    assert set(rows[0]) <= {c.name for c in AccessLine.__table__.c}
    with pytest.raises(ValueError, match="garbage"):
        parse([*items, {"id": "2049:7:300", "line": "garbage"}])
    with pytest.raises(ValueError, match="has no text field 'line'"):
        parse([{"id": "x", "text": DOC}])


# -- window factories --------------------------------------------------------------------

@pytest.mark.parametrize("width,interval,problem", [
    (60, 7, "multiple of interval"), (0, 10, "width must be > 0"), (60, 0, "interval must be > 0"),
    (-60, 10, "width must be > 0"), (60.0, 10, "whole number"), (True, 1, "whole number"),
    ("60", 10, "whole number"),
])
def test_factories_refuse_bad_windows(width: Any, interval: Any, problem: str) -> None:
    for factory in (status_windows, remote_windows):
        with pytest.raises(ValueError, match=problem):
            factory(width, interval)


def test_a_bad_window_option_is_a_config_error_of_the_queue() -> None:
    q = config.QueueConfig(name="access", handler="workers.apache:status_windows",
                           source=config.SourceConfig(), handler_options={"width": 60, "interval": 7})
    with pytest.raises(ConfigError, match="multiple of interval"):
        config.load_handler(q)


def test_window_handlers_raise_on_an_unparsable_line() -> None:
    items = [{"id": "a", "line": DOC}, {"id": "b", "line": "not a line"}]
    for handler in (status_windows(), remote_windows()):
        with pytest.raises(ValueError, match="not a line"):
            handler(items)
        assert handler([]) == []


# -- windows against the direct computation ----------------------------------------------

def random_lines(rng: random.Random, n: int, hours: float = 3) -> list[str]:
    """Lines at random times over a few hours, out of order (event time), in several zones."""
    base = 1_795_996_800
    remotes = [f"10.0.{i}.{j}" for i in range(3) for j in range(5)] + ["::1", "2001:db8::7"]
    out = []
    for _ in range(n):
        t = base + rng.randrange(int(hours * 3600))
        zone = rng.choice([0, -7 * 3600, 19800])
        size = rng.choice(["-", str(rng.randrange(0, 10**7))])
        out.append(f'{rng.choice(remotes)} - - [{_stamp(t, zone)}] "GET /{rng.randrange(50)} '
                   f'HTTP/1.1" {rng.choice([200, 200, 200, 304, 404, 500])} {size} "-" "ua"')
    return out


def items_of(lines: list[str]) -> list[dict[str, Any]]:
    return [{"id": f"1:2:{i}", "line": s} for i, s in enumerate(lines)]


def status_of(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    for key, r in rows.items():  # what names the window agrees with the key, after merging
        w = r["window"]
        assert key == f"status:{w['width']}:{w['interval']}:{w['start']}:{w['status']}"
        assert set(r) == {"id", "window", "requests"}
    return {k: r["requests"] for k, r in rows.items()}


def remote_of(rows: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int]]:
    for key, r in rows.items():
        w = r["window"]
        assert key == f"remote:{w['width']}:{w['interval']}:{w['start']}:{w['remote']}"
        assert set(r) == {"id", "window", "requests", "bytes"}
    return {k: (r["requests"], r["bytes"]) for k, r in rows.items()}


WINDOWS = [(60, 10), (60, 60), (10, 10), (300, 60), (3600, 600), (90, 30)]


@pytest.mark.parametrize("width,interval", WINDOWS)
def test_windows_equal_the_direct_computation(width: int, interval: int) -> None:
    rng = random.Random(width * 7 + interval)
    lines = random_lines(rng, 3000)
    parsed = [parse_line(s) for s in lines]
    rows = status_windows(width, interval)(items_of(lines))
    assert len({r["id"] for r in rows}) == len(rows)  # one row per key within a call
    assert status_of(merge([rows])) == windowref.status_counts(parsed, width, interval)
    rows = remote_windows(width, interval)(items_of(lines))
    assert remote_of(merge([rows])) == windowref.remote_counts(parsed, width, interval)
    # every line is in width/interval windows
    assert sum(r["requests"] for r in rows) == len(lines) * (width // interval)


@pytest.mark.parametrize("width,interval", WINDOWS)
def test_windows_of_random_batches_merged_by_the_additive_rule_equal_the_whole(
        width: int, interval: int) -> None:
    rng = random.Random(width * 13 + interval)
    lines = random_lines(rng, 4000)
    expected_status = windowref.status_counts(map(parse_line, lines), width, interval)
    expected_remote = windowref.remote_counts(map(parse_line, lines), width, interval)
    items = items_of(lines)
    rng.shuffle(items)  # batches do not come in event-time order
    batches, at = [], 0
    while at < len(items):
        size = rng.randrange(1, 400)
        batches.append(items[at:at + size])
        at += size
    status, remote = status_windows(width, interval), remote_windows(width, interval)
    s_rows = [status(b) for b in batches]
    r_rows = [remote(b) for b in batches]
    assert status_of(merge(s_rows)) == expected_status
    assert remote_of(merge(r_rows)) == expected_remote
    # the rows are merged as lrq merges an aggregating output's rows (numbers added, the
    # rest newest): what names a window is not a number, so it is never added up
    row = next(r for rows in s_rows for r in rows)
    assert merge([[row], [row]])[row["id"]] == {**row, "requests": 2 * row["requests"]}
    # the merge order does not matter (batches commit in any order)
    assert status_of(merge(s_rows[::-1])) == expected_status
    # a batch merged twice (what the ledger prevents) counts its lines twice
    replayed = status_of(merge([*s_rows, s_rows[0]]))
    assert replayed != expected_status
    assert sum(replayed.values()) == sum(expected_status.values()) + len(batches[0]) * (width // interval)


def test_windows_before_1970_and_on_boundaries() -> None:
    lines = ['1.1.1.1 - - [01/Jan/1970:00:00:05 +0100] "GET / HTTP/1.1" 200 7 "-" "-"',  # -3595
             '1.1.1.1 - - [01/Jan/1970:00:00:00 +0000] "GET / HTTP/1.1" 200 7 "-" "-"',  # 0
             '1.1.1.1 - - [01/Jan/1970:00:00:59 +0000] "GET / HTTP/1.1" 404 7 "-" "-"',  # 59
             '1.1.1.1 - - [01/Jan/1970:00:01:00 +0000] "GET / HTTP/1.1" 200 7 "-" "-"']  # 60
    rows = {r["id"]: r["requests"] for r in status_windows(60, 30)(items_of(lines))}
    assert rows == {"status:60:30:-3630:200": 1, "status:60:30:-3600:200": 1,
                    "status:60:30:-30:200": 1, "status:60:30:0:200": 1, "status:60:30:30:404": 1,
                    "status:60:30:0:404": 1, "status:60:30:30:200": 1, "status:60:30:60:200": 1}
    assert rows == windowref.status_counts(map(parse_line, lines), 60, 30)


def test_the_sample_day_parses_except_its_malformed_lines(tmp_path: Path) -> None:
    w = write_day(tmp_path, lines=3000, seed=3, bad=4)
    assert [p.name for p in w.files] == ["access.log.2", "access.log.1", "access.log"]
    assert {p.name for p in tmp_path.iterdir()} == {"access.log", "access.log.1", "access.log.2"}
    lines = read_day(tmp_path)
    assert lines == sample_lines(3000, seed=3, bad=4)
    good, bad = [], 0
    for s in lines:
        try:
            good.append(parse_line(s))
        except ValueError:
            bad += 1
    assert bad == 4
    ts = [a.ts for a in good]
    assert ts == sorted(ts) and ts[-1] - ts[0] > 20 * 3600
    assert any(len(a.url) > 2000 for a in good) and any(":" in a.remote for a in good)
    assert any('"' in a.agent for a in good) and any(a.size == 0 for a in good)
    # a second day replaces the first
    write_day(tmp_path, lines=30, seed=4, bad=0)
    assert len(read_day(tmp_path)) == 30


def test_merge_is_the_rule_lrq_stores_aggregating_outputs_by() -> None:
    outputs = pytest.importorskip("lrq.outputs", reason="needs the fan-out (outputs branch)")
    rng = random.Random(5)
    batches = [remote_windows(60, 10)(items_of(random_lines(rng, 200))) for _ in range(5)]
    folded: dict[str, dict[str, Any]] = {}
    for rows in batches:
        for r in rows:
            folded[r["id"]] = outputs.merge(folded[r["id"]], r) if r["id"] in folded else r
    assert merge(batches) == folded
