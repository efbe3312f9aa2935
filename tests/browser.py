"""Shared Playwright helpers: Debian's Chromium (never `playwright install`) and polling for text."""
from __future__ import annotations

import time

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def wait_text(page, selector: str, needle: str, timeout_s: float = 300) -> str:
    """Poll the element's text until it contains `needle` (Gradio streams updates in)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        t = page.locator(selector).inner_text()
        if needle in t:
            return t
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} never appeared in {selector}: {page.locator(selector).inner_text()[:500]}")
