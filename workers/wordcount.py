"""The trivial handler: word count and a sha1 digest of each document's text."""
from __future__ import annotations

import hashlib
from typing import Any


def handle(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for it in items:
        text = it.get("content") or ""
        out.append({"doc_id": it["doc_id"], "words": len(text.split()),
                    "sha1": hashlib.sha1(text.encode()).hexdigest()})
    return out
