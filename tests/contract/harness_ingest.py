"""Contract harness: ``kind = "ingest"``, the journal clients fill over HTTP (acknowledged at
publish). ``add`` appends to it the way the web server does (:class:`lrq.journal.Writer`,
one record per request of 50 items), into the data dir the suite's ``config`` makes
(``<tmp_path>/node/data``, queue ``docs``); small segments, so the crash windows also cross
segment changes and deletions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lrq.journal import Reader, Writer

PER_REQUEST = 50


class IngestHarness:
    name = "ingest"
    ack_at = "publish"
    takeover = None
    takeover_seconds = 0.0
    named_consumers = False

    def __init__(self) -> None:
        self.node: Path | None = None
        self.writer: Writer | None = None

    def source_table(self, tmp_path: Path) -> dict[str, Any]:
        self.node = tmp_path / "node"
        return {"kind": "ingest", "segment_bytes": "8KB"}

    @property
    def folder(self) -> Path:
        assert self.node is not None
        return self.node / "data" / "docs" / "ingest"

    def add(self, items: list[dict[str, Any]]) -> None:
        if self.writer is None:
            self.writer = Writer(self.folder, segment_bytes=8000)
        for i in range(0, len(items), PER_REQUEST):
            part = items[i:i + PER_REQUEST]
            self.writer.append(json.dumps(part).encode(), len(part))

    def unacknowledged(self) -> int:
        """Items in the journal past the position the node saved."""
        assert self.node is not None
        saved = self.node / "data" / "docs" / "position.json"
        position = json.loads(saved.read_text())["position"] if saved.exists() else None
        return Reader(self.folder).unread(position).items

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def harness(request: pytest.FixtureRequest) -> IngestHarness:
    return IngestHarness()
