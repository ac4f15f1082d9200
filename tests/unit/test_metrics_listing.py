"""The scrape's listing (:class:`lrq.metrics.Listing`) counts what ``Spool.counts`` counts,
in every state, while it keeps the sizes of done batch files between scrapes."""
from __future__ import annotations

from pathlib import Path

from lrq.metrics import Listing
from lrq.spool import Spool


def items(n: int, start: int = 0) -> list[dict]:
    return [{"doc_id": f"d{i}", "content": "x" * (10 + i)} for i in range(start, start + n)]


def agrees(listing: Listing, sp: Spool) -> None:
    c = sp.counts()
    got = listing.read(sp)
    assert got.batches == {"pending": c.pending, "claimed": c.claimed, "done": c.done,
                           "failed": c.failed, "quarantined": c.quarantined}
    assert got.bytes_by_state == {"pending": c.pending_bytes, "claimed": c.claimed_bytes,
                                  "done": c.done_bytes, "failed": c.failed_bytes,
                                  "tmp": c.tmp_bytes}
    assert got.total_bytes == c.bytes


def test_listing_agrees_with_spool_counts_in_every_state(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "data", "q").ensure()
    listing = Listing()
    agrees(listing, sp)  # empty
    names = [sp.publish(items(3, 10 * i)) for i in range(6)]
    agrees(listing, sp)  # all pending
    claims = [sp.claim(n) for n in names[:5]]
    assert all(claims)
    agrees(listing, sp)  # claimed
    sp.mark_done(claims[0])
    sp.mark_done(claims[1])
    sp.fail(claims[2], "boom")
    sp.quarantine_batch(claims[3], "bad signature")
    (sp.tmp / "partial").write_bytes(b"12345")
    agrees(listing, sp)  # every state at once; done sizes now kept
    assert listing.read(sp).batches["done"] == 2
    sp.mark_done(claims[4])
    agrees(listing, sp)  # a new done batch is stat'ed, the known ones are not
    for p in sorted(sp.done.glob("*.pkl"))[:1]:
        p.unlink()  # retention removed one: forgotten
    agrees(listing, sp)
    assert len(listing.done_sizes["q"]) == 2
