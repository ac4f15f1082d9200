"""Deterministic sample documents shaped like the original ``source_data`` table.

``python -m lrq.sample --docs 30000 --url sqlite:///data/source.db``
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, func, insert, select

from lrq.db import make_engine

# Entity mentions (aliases included) the example entity workers know how to map.
ENTITY_WORDS = [
    "Beijing", "Peking", "Shanghai", "Shenzhen", "Hangzhou", "London", "Paris", "Berlin",
    "NYC", "New York", "Tokyo", "Alibaba", "Tencent", "Huawei", "Apple", "Google", "Alphabet",
    "Microsoft", "MSFT", "Amazon", "Xi'an", "Wuhan", "Tesla", "Baidu", "ByteDance", "TikTok",
]
WORDS = (
    "the of and to in is was for on that with as by at from report market growth city company "
    "new year said people data model service update price sales team plan quarter rise fall "
    "today week month government policy trade energy travel research product launch result "
    "customer network cloud phone chip car store office bank fund stock share profit loss"
).split()


def source_table(metadata: MetaData, name: str = "source_data") -> Table:
    return Table(name, metadata,
                 Column("id", Integer, primary_key=True, autoincrement=False),
                 Column("mid", String(50), nullable=False, index=True),
                 Column("content", Text, nullable=False),
                 Column("created", String(50), nullable=False))


def documents(n: int, words: int = 40, seed: int = 0, start: int = 1) -> list[dict]:
    """``n`` documents of ``words`` words; about one word in eight is an entity mention."""
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS + ENTITY_WORDS, dtype=object)
    p = np.full(len(vocab), 7 / 8 / len(WORDS))
    p[len(WORDS):] = 1 / 8 / len(ENTITY_WORDS)
    picks = rng.choice(len(vocab), size=(n, words), p=p)
    base = 1_700_000_000
    return [{"id": start + i, "mid": f"m{start + i:09d}",
             "content": " ".join(vocab[picks[i]]),
             "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(base + start + i))}
            for i in range(n)]


def write_documents(url: str, n: int, *, words: int = 40, seed: int = 0,
                    table: str = "source_data", chunk: int = 20_000) -> int:
    """Create ``table`` at ``url`` holding exactly documents 1..n; return rows written."""
    engine = make_engine(url, what="sample url")
    md = MetaData()
    t = source_table(md, table)
    md.create_all(engine)
    with engine.connect() as conn:
        have = conn.execute(select(func.count()).select_from(t)).scalar_one()
    if have == n:
        return 0
    with engine.begin() as conn:
        conn.execute(t.delete())
    for start in range(1, n + 1, chunk):
        rows = documents(min(chunk, n + 1 - start), words, seed + start, start)
        with engine.begin() as conn:
            conn.execute(insert(t), rows)
    engine.dispose()
    return n


def peek(url: str, table: str, rows: int = 5) -> int:
    """Print a few rows of a results table (the end of ``make demo``)."""
    engine = make_engine(url, what="peek url", create=False)
    t = Table(table, MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(t)).scalar_one()
        print(f"{table}: {total} rows; the first {rows}:")
        first = t.c[t.primary_key.columns.keys()[0]]
        for r in conn.execute(select(t).order_by(first).limit(rows)).mappings():
            print("  " + ", ".join(f"{k}={str(v)[:60]}" for k, v in r.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write deterministic sample documents")
    p.add_argument("--docs", type=int, default=30_000)
    p.add_argument("--words", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default="sqlite:///data/source.db")
    p.add_argument("--table", default="source_data")
    p.add_argument("--peek", nargs=2, metavar=("URL", "TABLE"),
                   help="print the first rows of TABLE at URL instead")
    a = p.parse_args(argv)
    if a.peek:
        return peek(*a.peek)
    n = write_documents(a.url, a.docs, words=a.words, seed=a.seed, table=a.table)
    print(f"{a.url}: {a.docs} documents in {a.table}" + ("" if n else " (already there)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
