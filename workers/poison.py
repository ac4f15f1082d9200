"""The W1 handler with 1% poison: documents whose ``id`` ends in 37 (mod 100) raise.

For the poison benchmark (``bench/poison.py``) and tests: the rest is exactly
:func:`workers.wordcount.handle`."""
from __future__ import annotations

from typing import Any

from workers.wordcount import handle as wordcount

EVERY = 100
AT = 37


def is_poison(item: dict[str, Any]) -> bool:
    return int(item["id"]) % EVERY == AT


def handle(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for it in items:
        if is_poison(it):
            raise ValueError(f"cannot map document {it['id']}: poison")
    return wordcount(items)
