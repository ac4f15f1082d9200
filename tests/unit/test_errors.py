"""lrq's errors are one line each, whatever the driver's message looked like."""
from __future__ import annotations

from lrq.errors import DatabaseUnreachable, SourceError, one_line

PSYCOPG = ('connection failed: connection to server at "127.0.0.1", port 5432 failed: '
           'Connection refused\n\tIs the server running on that host and accepting TCP/IP '
           'connections?\n')


def test_a_drivers_multi_line_message_becomes_one_line() -> None:
    e = DatabaseUnreachable(f"storing batch b into t failed: {PSYCOPG}")
    assert "\n" not in str(e) and "\t" not in str(e)
    assert str(e).endswith("Connection refused Is the server running on that host and "
                           "accepting TCP/IP connections?")


def test_one_line_keeps_a_single_line_as_it_is() -> None:
    text = "a  b\tc"
    assert one_line(text) is text
    assert str(SourceError()) == "The source cannot be read."
    assert one_line("a\r\n  b\n\n c ") == "a b c"
