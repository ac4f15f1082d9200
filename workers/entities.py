"""Local, dictionary-based entity extraction and mapping: the entity service without a network.

The original system posted each document to an entity-mapping HTTP service. The demo's
documents only ever mention the names in :data:`lrq.sample.ENTITY_WORDS`, so a fixed alias
table answers the same question in-process, tens of thousands of documents a second, and
gives tests and benchmarks a reference answer for :mod:`workers.entity_service`.

Matching is case-sensitive on purpose: these are proper nouns, and "apple" or "amazon" in
running text is usually not the company. A mention must stand alone as a word: punctuation
may touch it ("(NYC),", "Google's", "Beijing-based"), letters and digits may not
("Applet", "MSFT2"). Words of a multi-word alias may be separated by any whitespace.
"""
from __future__ import annotations

import re
from typing import Any

#: Alias as written -> canonical name. Every canonical name maps to itself, so a mention of
#: the canonical form is found too. Covers every word of ``lrq.sample.ENTITY_WORDS``.
ALIASES: dict[str, str] = {
    "Beijing": "Beijing", "Peking": "Beijing",
    "Shanghai": "Shanghai",
    "Shenzhen": "Shenzhen",
    "Hangzhou": "Hangzhou",
    "Wuhan": "Wuhan",
    "Xi'an": "Xi'an", "Xian": "Xi'an",
    "London": "London",
    "Paris": "Paris",
    "Berlin": "Berlin",
    "New York": "New York", "New York City": "New York", "NYC": "New York",
    "Tokyo": "Tokyo",
    "Alibaba": "Alibaba",
    "Tencent": "Tencent",
    "Huawei": "Huawei",
    "Baidu": "Baidu",
    "ByteDance": "ByteDance", "TikTok": "ByteDance",
    "Apple": "Apple",
    "Alphabet": "Alphabet", "Google": "Alphabet",
    "Microsoft": "Microsoft", "MSFT": "Microsoft",
    "Amazon": "Amazon",
    "Tesla": "Tesla",
}


def _alias_pattern(alias: str) -> str:
    return r"\s+".join(re.escape(word) for word in alias.split())


# Longest alias first, so "New York City" wins over "New York" at the same position
# (regex alternation takes the first branch that matches, not the longest).
_MATCHER = re.compile(
    r"(?<!\w)(?:"
    + "|".join(_alias_pattern(a) for a in sorted(ALIASES, key=len, reverse=True))
    + r")(?!\w)"
)


def extract(text: str) -> tuple[list[str], list[str]]:
    """Mentions in ``text`` in order of first appearance, and the canonical names they map to.

    Both lists are de-duplicated independently, keeping first-appearance order, so they are
    not parallel: "Peking ... Beijing" gives ``(["Peking", "Beijing"], ["Beijing"])``. That is
    the shape of the service's ``ent_list`` / ``maaped_ent``.
    """
    mentions: dict[str, None] = {}
    canonical: dict[str, None] = {}
    for m in _MATCHER.finditer(text):
        alias = m.group()
        if alias not in ALIASES:
            alias = " ".join(alias.split())  # "New\nYork" is the alias "New York"
        mentions[alias] = None
        canonical[ALIASES[alias]] = None
    return list(mentions), list(canonical)


def map_entities(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entity service's answer for ``items``, in its wire format, one entry per item.

    Each item needs ``doc_id``; a missing or null ``content`` counts as empty text.
    ``maaped_ent`` is misspelled in the service's API and stays that way on the wire.
    """
    out = []
    for it in items:
        ents, mapped = extract(it.get("content") or "")
        out.append({"doc_id": it["doc_id"], "ent_list": ents, "maaped_ent": mapped})
    return out


def to_rows(mapped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wire-format entries -> ``workers.models.DocEntMap`` rows (lists joined by commas)."""
    return [{"doc_id": m["doc_id"], "ent_list_str": ",".join(m["ent_list"]),
             "mapped_list_str": ",".join(m["maaped_ent"])} for m in mapped]


def handle(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lrq handler: one ``DocEntMap`` row per item, computed locally."""
    return to_rows(map_entities(items))
