"""The peer benchmark's plumbing: how ``bench/all.py`` reads ``bench/peer_huey.py``'s JSON
and what it does without Huey; and, where Huey is installed (the ``bench`` extra), one tiny
real run of both systems. Figures are not asserted: speed is the benchmark's business."""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_all(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import each other by name
    return importlib.import_module("all")


def _report(ratios: list[dict[str, Any]]) -> dict[str, Any]:
    results = [{"docs": 1000, "batch": q["batch"], "system": s, "items_per_s": rate}
               for q in ratios for s, rate in (("lrq", 500.0), ("huey-process", 900.0),
                                               ("huey-thread", 1000.0))]
    return {"results": results, "ratios": ratios}


def test_peer_rows_target_batch_100_only(bench_all: ModuleType) -> None:
    rows = bench_all.peer_figures(_report([
        {"docs": 1000, "batch": 100, "lrq/huey": 0.5, "huey": "huey-thread"},
        {"docs": 1000, "batch": 1000, "lrq/huey": 1.2, "huey": "huey-thread"}]))
    at100, at1000 = rows
    assert (at100.figure, at100.op, at100.target, at100.verdict) == (
        "N=1k B=100 lrq/huey items/s", ">=", 1.0, "not met")
    assert "huey-thread 1,000/s" in at100.detail and "lrq 500/s" in at100.detail
    # Batch 1000 is shown, not judged: above 1.0 it still has no verdict of met.
    assert (at1000.measured, at1000.met, at1000.verdict) == (1.2, None, "no target")


def test_peer_without_batch_100_is_a_failed_part(bench_all: ModuleType, tmp_path: Path) -> None:
    only1000 = _report([{"docs": 1000, "batch": 1000, "lrq/huey": 1.2, "huey": "huey-thread"}])
    (tmp_path / "peer.json").write_text(json.dumps(only1000))
    part = next(p for p in bench_all.PARTS if p.key == "peer")
    out = bench_all.Outcome(part="peer", script="bench/peer_huey.py", argv=[],
                            json=str(tmp_path / "peer.json"))
    (row,) = bench_all.figures(part, out)
    assert row.verdict == "failed" and "no lrq/huey ratio at batch 100" in row.detail


def test_skipped_part_reads_skipped(bench_all: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "huey" else real(name, *a))
    assert bench_all.main(["--only", "peer"]) == 0  # a skip is not a failure
    out = capsys.readouterr().out
    assert "peer: W1 against Huey (SQLite): skipped: huey is not installed" in out
    summary = json.loads(Path(bench_all.ROOT, out.rsplit("wrote ", 1)[1].strip()).read_text())
    Path(bench_all.ROOT, out.rsplit("wrote ", 1)[1].strip()).unlink()
    assert [r["verdict"] for r in summary["summary"]] == ["skipped"]
    assert summary["failed"] == [] and summary["parts"] == []


@pytest.mark.skipif(importlib.util.find_spec("huey") is None,
                    reason="Huey is not installed (the bench extra: pip install -e '.[bench]')")
def test_tiny_peer_run_stores_the_same_rows(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Both systems store exactly the 200 rows with equal digests (the script exits 1
    otherwise), lrq's verify passes, and the JSON has the ratios all.py reads."""
    monkeypatch.syspath_prepend(str(BENCH))
    peer = importlib.import_module("peer_huey")
    assert peer.main(["--docs", "200", "--batch", "100", "--repeat", "1",
                      "--tmp", str(tmp_path)]) == 0
    wrote = Path(peer.run.ROOT, capsys.readouterr().out.rsplit("wrote ", 1)[1].strip())
    report = json.loads(wrote.read_text())
    wrote.unlink()
    assert {r["system"] for r in report["results"]} == {"huey-process", "huey-thread", "lrq"}
    assert len({r["digest"] for r in report["results"]}) == 1
    assert report["ratios"][0]["batch"] == 100 and report["ratios"][0]["lrq/huey"] > 0
