"""workers.entities: the local alias dictionary, extraction, and the handler's output shape."""
from __future__ import annotations

import pytest

from lrq.sample import ENTITY_WORDS, documents
from workers import entities
from workers.entities import ALIASES, extract, handle, map_entities


@pytest.mark.parametrize("word", ENTITY_WORDS)
def test_every_sample_entity_word_is_found_and_mapped(word: str) -> None:
    assert word in ALIASES
    assert extract(f"the {word} report") == ([word], [ALIASES[word]])


@pytest.mark.parametrize("alias, canonical", [
    ("Peking", "Beijing"), ("NYC", "New York"), ("Google", "Alphabet"),
    ("MSFT", "Microsoft"), ("TikTok", "ByteDance"), ("Xi'an", "Xi'an"), ("Beijing", "Beijing"),
])
def test_aliases_map_to_canonical_names(alias: str, canonical: str) -> None:
    assert extract(alias) == ([alias], [canonical])


def test_canonical_names_map_to_themselves() -> None:
    for canonical in set(ALIASES.values()):
        assert ALIASES[canonical] == canonical


def test_multi_word_aliases() -> None:
    assert extract("rents in New York rose") == (["New York"], ["New York"])
    # the longest alias wins where several start at the same place
    assert extract("New York City hall") == (["New York City"], ["New York"])
    # any whitespace between the words; the mention is reported in its normal form
    assert extract("New\n  York") == (["New York"], ["New York"])
    assert extract("New Yorkshire") == ([], [])


def test_punctuation_attached_mentions() -> None:
    text = "(NYC), Google's plan; Beijing-based \"Tesla\". MSFT! Xi'an's TikTok?"
    assert extract(text) == (
        ["NYC", "Google", "Beijing", "Tesla", "MSFT", "Xi'an", "TikTok"],
        ["New York", "Alphabet", "Beijing", "Tesla", "Microsoft", "Xi'an", "ByteDance"],
    )


def test_whole_words_only_and_case_sensitive() -> None:
    assert extract("Applet MSFT2 xNYC Parisian GOOGLE apple amazon") == ([], [])


def test_order_of_appearance_and_dedupe_of_each_list() -> None:
    ents, mapped = extract("Peking NYC Beijing Peking Google New York Alphabet NYC")
    assert ents == ["Peking", "NYC", "Beijing", "Google", "New York", "Alphabet"]
    assert mapped == ["Beijing", "New York", "Alphabet"]


def test_empty_and_entity_free_text() -> None:
    assert extract("") == ([], [])
    assert extract("the market rose today") == ([], [])


def test_map_entities_wire_format() -> None:
    items = [{"id": 1, "doc_id": "m1", "content": "Peking and Google"},
             {"id": 2, "doc_id": "m2", "content": None},
             {"id": 3, "doc_id": "m3"}]
    assert map_entities(items) == [
        {"doc_id": "m1", "ent_list": ["Peking", "Google"], "maaped_ent": ["Beijing", "Alphabet"]},
        {"doc_id": "m2", "ent_list": [], "maaped_ent": []},
        {"doc_id": "m3", "ent_list": [], "maaped_ent": []},
    ]


def test_handle_returns_one_doc_ent_map_row_per_item() -> None:
    items = [{"id": d["id"], "doc_id": d["mid"], "content": d["content"]}
             for d in documents(200, seed=7)]
    rows = handle(items)
    assert [r["doc_id"] for r in rows] == [it["doc_id"] for it in items]
    assert all(set(r) == {"doc_id", "ent_list_str", "mapped_list_str"} for r in rows)
    for it, r in zip(items, rows):
        ents, mapped = extract(it["content"])
        assert r["ent_list_str"] == ",".join(ents)
        assert r["mapped_list_str"] == ",".join(mapped)
    # about one word in eight of the sample is an entity: nearly every document has some
    assert sum(1 for r in rows if r["ent_list_str"]) > 150


def test_handle_rows_fit_the_model() -> None:
    from workers.models import DocEntMap

    columns = {c.name for c in DocEntMap.__table__.c}
    rows = handle([{"doc_id": "m1", "content": "NYC"}])
    assert rows == [{"doc_id": "m1", "ent_list_str": "NYC", "mapped_list_str": "New York"}]
    assert set(rows[0]) <= columns


def test_handle_empty_chunk() -> None:
    assert handle([]) == []


def test_to_rows_joins_with_commas() -> None:
    assert entities.to_rows([{"doc_id": "d", "ent_list": ["a", "b"], "maaped_ent": ["c"]}]) == [
        {"doc_id": "d", "ent_list_str": "a,b", "mapped_list_str": "c"}]
