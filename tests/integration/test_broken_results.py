"""A handler whose every result the database refuses the same way (a NOT NULL column it
leaves empty) is broken, on SQLite, PostgreSQL and MariaDB: the batch fails loudly
(``failed/``, one ``handler-broken`` line, exit 4), nothing is dead-lettered."""
from __future__ import annotations

from pathlib import Path

import pytest
from lrqtest import load_app, lrq, write_config

MODEL = """\
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class Base(DeclarativeBase):
    pass

class Scored(Base):
    __tablename__ = "scored"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    doc_id: Mapped[str] = mapped_column(String(50), unique=True)
    score: Mapped[int] = mapped_column(Integer, nullable=False)

def forgets_score(items):
    return [{"doc_id": it["doc_id"], "score": None} for it in items]

def some_without_score(items):
    return [{"doc_id": it["doc_id"], "score": None if it["id"] % 10 == 3 else 1}
            for it in items]
"""


def _setup(tmp_path: Path, db_url: str, handler: str, **keys: object) -> Path:
    (tmp_path / "scored.py").write_text(MODEL)
    cfg = write_config(tmp_path, docs=300, batch_size=100, chunk_size=50, result_table=None,
                       model="scored:Scored", handler=f"scored:{handler}", backoff=0,
                       top={"db_url": db_url}, **keys)
    lrq("-c", str(cfg), "sniff", check=True)
    return cfg


@pytest.mark.parametrize("pipeline", [True, False])
def test_every_result_refused_alike_is_a_broken_handler(tmp_path: Path, db_url: str,
                                                        pipeline: bool) -> None:
    cfg = _setup(tmp_path, db_url, "forgets_score", pipeline=pipeline)
    r = lrq("-c", str(cfg), "work", "--burst")
    assert r.returncode == 4, r.stdout + r.stderr
    assert r.stderr.count("handler-broken") == 1
    assert "the database refused all 100 results of the batch the same way" in r.stderr
    app = load_app(cfg)
    q = app.queues("docs")[0]
    counts = app.spool(q).counts()
    # one batch fails; storing behind, the next, handled meanwhile, is released uncommitted
    assert (counts.failed, counts.pending, counts.done) == (1, 2, 0)
    assert app.sink(q).dead_count() == 0 and app.sink(q).count() == 0


def test_some_results_refused_are_dead_lettered_not_a_broken_handler(tmp_path: Path,
                                                                      db_url: str) -> None:
    cfg = _setup(tmp_path, db_url, "some_without_score")
    lrq("-c", str(cfg), "work", "--burst", check=True)
    app = load_app(cfg)
    q = app.queues("docs")[0]
    assert app.sink(q).dead_count() == 30 and app.sink(q).count() == 270
