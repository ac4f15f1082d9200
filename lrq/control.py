"""Pausing and resuming a queue across processes: filled by the control branch.

This stub lets :mod:`lrq.status` ask whether a queue is paused before that branch lands;
the merge keeps the control branch's module.
"""
from __future__ import annotations

from pathlib import Path


def paused(data_dir: Path, queue: str) -> dict | None:
    """``{"since": ISO time, "by": str}`` while ``queue`` is paused, else None."""
    return None
