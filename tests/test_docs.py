"""The pages people read say what the benchmarks measured: every figure in README.md and docs/ is
generated from the committed JSON (bench/docs.py), and every link stays inside the repository."""
from __future__ import annotations

import re
from pathlib import Path

from bench import docs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_generated_figure_equals_its_json():
    assert docs.stale() == [], "run `make docs`: these pages' figures differ from docs/results/"
    names = {m.group("name") for page in PAGES for m in docs.REGION.finditer(page.read_text())}
    assert names and names <= set(docs.GENERATORS)


def test_a_generated_region_is_rewritten_from_the_json():
    text = "dense <!-- gen:quality.dense -->0.0<!-- /gen --> on the held-out windows"
    assert docs.render(text) == f"dense <!-- gen:quality.dense -->{docs.quality_dense()}<!-- /gen --> on the held-out windows"


def test_links_stay_inside_the_repository():
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "shared/docs" not in text, page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).resolve().is_file(), f"{page.name} links to a missing {target}"
