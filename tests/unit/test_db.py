"""lrq's own SQLite results database: a commit is durable when it returns."""
from __future__ import annotations

from pathlib import Path

from lrq.db import make_engine


def test_a_sqlite_results_database_commits_durably(tmp_path: Path) -> None:
    """WAL with synchronous FULL: a commit waits for the WAL's fsync. With NORMAL, an OS
    crash could roll back commits whose batches were already moved to done/ (lost items)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'results.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()
