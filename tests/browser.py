"""Shared Playwright helpers: Debian's Chromium (never `playwright install`) and polling for text."""
from __future__ import annotations

import time

from bench.app import ARGS, CHROMIUM  # noqa: F401  (one copy, shared)


def wait_text(page, selector: str, needle: str, timeout_s: float = 300) -> str:
    """Poll the element's text until it contains `needle` (Gradio streams updates in)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        t = page.locator(selector).inner_text()
        if needle in t:
            return t
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} never appeared in {selector}: {page.locator(selector).inner_text()[:500]}")


def wait_until(test, timeout_s: float, what: str = "the state"):
    """Poll `test()` until it returns something truthy (and return that)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = test()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"{what} was not reached in {timeout_s} s")


def plot_title(page) -> str:
    """The Pareto plot's title (SVG text: no inner_text); '' while it is not drawn."""
    t = page.locator("#pareto-plot .gtitle")
    return (t.first.text_content() or "") if t.count() else ""


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the dropdown labelled `label`, as a person does: open it, click the option."""
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option).click()
