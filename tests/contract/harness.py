"""The protocol every source kind's contract-suite harness follows (``harness_<kind>.py``).

A harness module exports ``harness(request) -> Harness`` (``request``: the suite's pytest
fixture request, for a harness on a session server fixture): it skips (``pytest.skip``, with the
reason) when its server binary is missing, and fails instead under ``CI=1``
(:func:`missing`). The suite (``test_sources.py``) then runs every contract test against
it, with real ``lrq`` processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

import pytest


class Harness(Protocol):
    #: Shown in test ids.
    name: str
    #: The kind's acknowledgement (a "publish" kind has no ack crash windows).
    ack_at: Literal["publish", "commit"]
    #: The option (and a value in seconds) that makes another consumer take over entries a
    #: node holds without keeping them, or None when the kind has none (SQL).
    takeover: dict[str, Any] | None
    #: Seconds after which that takeover happens (``claim_idle``, a session timeout).
    takeover_seconds: float
    #: Whether each node names its consumer (``consumer = "..."``); False where the broker
    #: tells members apart itself (a Kafka group).
    named_consumers: bool

    def source_table(self, tmp_path: Path) -> dict[str, Any]:
        """The ``[queues.X.source]`` TOML table of a fresh, empty source (its data under
        ``tmp_path``, or a fresh topic/stream/group on the harness's server)."""

    def add(self, items: list[dict[str, Any]]) -> None:
        """Append items (dicts of JSON values: ``id``, ``doc_id``, ``content``)."""

    def unacknowledged(self) -> int:
        """Entries, fetched or not, not yet acknowledged; 0 means nothing pending anywhere.
        A source acknowledged at publish answers from lrq's saved position."""

    def close(self) -> None: ...


def missing(what: str) -> NoReturn:
    """Skip with ``what`` as the reason, or fail under ``CI=1`` (service tests must run)."""
    message = f"{what}; run `make services` (root, Debian)"
    if os.environ.get("CI"):
        pytest.fail(f"{message} [CI is set, so service tests must run]", pytrace=False)
    pytest.skip(message)
