"""The explorer on stage, in real headless Chromium against the real server at 1280x720: a failure is
one message in one place and blocks nothing, a refused search leaves the tab as it was, a click
picks the marker under the cursor, a new page opens the shipped demo, labels say what a model is,
the legend never covers the title, the plot stays while a pick is reformed, the run report
downloads. Every wait is for a state, never a fixed sleep. Screenshots go to artifacts/stage/."""
from __future__ import annotations

import time

import pytest
from browser import plot_title, wait_text, wait_until
from conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TRACES = """() => { const p = document.querySelector('#pareto-plot .js-plotly-plot');
  return p && p.data ? p.data.map(t => ({name: t.name, ids: (t.customdata || []).map(c => c[0])})) : []; }"""
MARKER = """([trace, id]) => { const p = document.querySelector('#pareto-plot .js-plotly-plot');
  const i = p.data.findIndex(t => t.name.startsWith(trace));
  const k = p.data[i].customdata.findIndex(c => c[0] === id);
  const pt = p.querySelectorAll('.scatterlayer .trace')[i].querySelectorAll('.point')[k];
  pt.scrollIntoView({block: 'center'});  // below the fold at 1280x720: a click must land on the screen
  const r = pt.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; }"""


@pytest.fixture
def page(app_server, chromium):
    pg = chromium.new_page(viewport={"width": 1280, "height": 720})
    pg.set_default_timeout(120_000)
    pg.goto(app_server["url"])
    pg.get_by_text("Subnet Explorer").first.wait_for()
    wait_until(lambda: plot_title(pg) != "", 120)
    yield pg


def shot(page, name: str) -> None:
    out = ARTIFACTS / "stage"
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / f"{name}.png"), full_page=False)


def error_badges(page) -> int:
    """Gradio's red "Error" badges, which a raised gr.Error paints on every output of the handler."""
    return page.get_by_text("Error", exact=True).count()


def click_marker(page, trace: str, cid: str) -> None:
    box = page.evaluate(MARKER, [trace, cid])
    page.mouse.move(box["x"] - 30, box["y"] - 30)
    page.mouse.move(box["x"], box["y"], steps=5)
    # Plotly only clicks once it hovers something (here, on purpose, a dominated point under the marker)
    wait_until(lambda: page.locator("#pareto-plot .hoverlayer").text_content(), 30, "a hover label")
    page.mouse.click(box["x"], box["y"])


def test_on_stage(page, app_server):
    from explorer.app.workbench import DEMO_RUN

    # a new page opens the shipped demo run; the legend never sits over the title
    assert plot_title(page) == DEMO_RUN
    title = page.locator("#pareto-plot .gtitle").first.bounding_box()
    legend = page.locator("#pareto-plot .legend").first.bounding_box()
    assert title["y"] + title["height"] <= legend["y"] or legend["y"] + legend["height"] <= title["y"]
    shot(page, "01-open")

    # a click picks the marker under the cursor: the middle of the front, not a faint point beneath it
    front = next(t for t in page.evaluate(TRACES) if t["name"].startswith("Pareto front"))
    cid = front["ids"][len(front["ids"]) // 2]
    click_marker(page, "Pareto front", cid)
    wait_text(page, "#subnet-card", cid, 60)
    assert page.locator("#pick-box input, #pick-box textarea").first.input_value() == cid

    # a failure is one message in one place; nothing else changes, nothing is blocked
    card = page.locator("#subnet-card").inner_text()
    page.get_by_label("Model").fill("/no/such/model")
    page.get_by_role("button", name="Load", exact=True).click()
    msg = wait_text(page, "#message", "no model folder", 120)
    assert "\n" not in msg.strip() and "Traceback" not in page.content()
    assert error_badges(page) == 0
    assert page.locator("#subnet-card").inner_text() == card and plot_title(page) == DEMO_RUN
    shot(page, "02-error")
    click_marker(page, "Pareto front", front["ids"][0])  # the plot still takes clicks
    wait_text(page, "#subnet-card", front["ids"][0], 60)
    assert page.locator("#message").inner_text().strip() == ""  # a success clears the message

    # load the real model; a refused search leaves the tab exactly as it was
    page.get_by_label("Model").fill("default")
    page.get_by_role("button", name="Load", exact=True).click()
    wait_text(page, "#model-info", "Dense held-out perplexity", 600)
    card, status = page.locator("#subnet-card").inner_text(), page.locator("#status-box").inner_text()
    for bad in ("1.5", "abc"):
        page.get_by_label("Targets (fraction of total parameters)").fill(bad)
        page.get_by_role("button", name="Start search").click()
        wait_text(page, "#message", bad, 120)  # this refusal's message, not the one before
        # once the refused event has settled (Gradio may still draw its timer for a moment)
        wait_until(lambda: page.locator("#subnet-card").inner_text() == card, 30, "the card as it was")
        assert page.locator("#status-box").inner_text() == status and plot_title(page) == DEMO_RUN
        assert error_badges(page) == 0
    page.get_by_role("button", name="Pick", exact=True).click()  # the tab still points at its run
    wait_text(page, "#subnet-card", front["ids"][0], 60)

    # reform the pick: the plot stays on the page the whole time, and labels say what a model is
    page.get_by_role("button", name="Reform").click()
    while "Reformed" not in page.locator("#action-status").inner_text():
        assert page.locator("#pareto-plot .js-plotly-plot").is_visible()
        assert page.locator("#pareto-plot .wrap.translucent, #pareto-plot .eta-bar").count() == 0  # no overlay
        time.sleep(0.3)
    shot(page, "03-reformed")
    page.get_by_role("button", name="Add to compare").click()
    wait_text(page, "#action-status", "added to compare", 60)
    page.get_by_role("spinbutton", name="number input for Max new tokens").fill("8")
    page.get_by_role("button", name="Generate").click()
    label = wait_text(page, "#out-a", "done", 300)
    assert "reformed" in label
    shot(page, "04-prompt")

    # the run report, self-contained, with the prompt just tried
    page.get_by_role("button", name="Run report (HTML)").click()
    link = page.locator("#report-file a").first
    link.wait_for()
    with page.expect_download() as dl:
        link.click()
    html = open(dl.value.path(), encoding="utf-8").read()
    assert "<html" in html and "plotly" in html and "Prompts tried" in html and "reformed" in html.lower()


def test_a_new_page_opens_the_demo_even_after_an_upload(app_server, tmp_path, embedded, chromium):
    """Another tab's upload creates a newer run; a fresh page still opens the shipped demo."""
    from gradio_client import Client, handle_file

    from explorer.app.workbench import DEMO_RUN
    from explorer.model.subnet import uniform_subnet

    c = Client(app_server["url"], verbose=False)
    c.predict("default", "float32", "cpu", api_name="/load_model")
    f = tmp_path / "s.json"
    f.write_text(uniform_subnet(embedded.shape, 0.6, 0.6).to_json())
    c.predict(handle_file(str(f)), "parameters (% of dense)", "perplexity (held-out, else search fitness)",
              api_name="/open_subnet")
    pg = chromium.new_page(viewport={"width": 1280, "height": 720})
    pg.goto(app_server["url"])
    assert wait_until(lambda: plot_title(pg), 120) == DEMO_RUN
