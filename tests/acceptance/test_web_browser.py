"""The web page in a real browser (Debian's chromium driven by Playwright) against a running
``lrq run --http``: pause and resume with the buttons, requeue a failed batch, and markup
from an item's error shown as text, never run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.test_web import DOCS, TOKEN, make_config
from lrqtest import ROOT, killed_on_exit, lrq, poll

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.slow


def _need_browser() -> Any:
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -e '.[test]')"
    if why is None and not os.access(CHROMIUM, os.X_OK):
        why = f"{CHROMIUM} not found (apt-get install chromium, or `make services`)"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why} [CI is set, so the browser tests must run]", pytrace=False)
        pytest.skip(why)
    return sync_playwright


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``lrq run --http 127.0.0.1:0`` on a queue whose first batch fails: (config, url)."""
    cfg = make_config(tmp_path, http_token=TOKEN)
    out = (tmp_path / "run.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "lrq", "-c", str(cfg), "run", "--http",
                             "127.0.0.1:0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    with killed_on_exit(proc):
        log = tmp_path / "run.out"
        found = poll(lambda: re.search(r"http-serving url=(\S+)", log.read_text()), 60)
        assert found, log.read_text()[-3000:]
        yield cfg, found.group(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    out.close()


def status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/status", timeout=30) as r:
        return dict(json.loads(r.read())["queues"]["docs"])


def test_pause_resume_requeue_and_no_script_runs(running: tuple[Path, str],
                                                 tmp_path: Path) -> None:
    sync_playwright = _need_browser()
    cfg, url = running
    settled = poll(lambda: (s := status(url))["failed"] == 1 and s["pending"] == 0
                   and s["claimed"] == 0 and s.get("dead_letters") == 1, 120)
    assert settled, status(url)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            row = page.locator("#queues tr[data-queue=docs]")
            assert row.locator("td.state").text_content(timeout=30_000) == "active"
            # The token is asked for once, then kept for the tab.
            assert page.locator("#tokenbox").is_visible()
            page.fill("#token", TOKEN)
            page.click("#tokenform button")
            assert page.locator("#tokenbox").is_hidden()
            assert page.evaluate("sessionStorage.getItem('lrq-token')") == TOKEN
            assert page.evaluate("document.cookie") == ""

            row.locator("button.pause").click()
            page.wait_for_selector("#queues tr[data-queue=docs] td.state.paused", timeout=30_000)
            assert status(url)["paused"]
            row.locator("button.resume").click()
            page.wait_for_selector("#queues tr[data-queue=docs] td.state.active", timeout=30_000)
            assert not status(url)["paused"]

            # Markup from errors is shown as text, and none of it ran.
            dead = page.locator("#dead td.error").first
            assert "<script>window.pwned = 2</script>" in (dead.text_content(timeout=30_000) or "")
            failed = page.locator("#failed tr").first
            assert "<script>window.pwned = 1</script>" in (failed.text_content() or "")
            assert page.evaluate("typeof window.pwned") == "undefined"
            assert page.locator("#dead script, #failed script, #dead b, #failed b").count() == 0
            page.screenshot(path=str(tmp_path / "page-before-requeue.png"), full_page=True)

            # Fix the handler, requeue the failed batch with its button: it is stored.
            (cfg.parent / "broken").unlink()
            failed.locator("button.requeue").click()
            page.wait_for_selector("#message.ok", timeout=30_000)
            assert poll(lambda: (s := status(url))["failed"] == 0 and s["done"] == DOCS // 100,
                        120), status(url)
            page.wait_for_function("document.querySelectorAll('#failed tr').length === 0",
                                   timeout=30_000)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 0
    assert lrq("-c", str(cfg), "verify").returncode == 0  # every item stored or dead-lettered once
