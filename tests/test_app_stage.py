"""The explorer on stage, in real headless Chromium against the real server at 1280x800 (a projector):
the first screen holds Load, Start and the front; each action answers in its own section; the plot
means one thing (held-out perplexity: the dense star and every evaluated pick at their measured
values); hover and click name the same point; blank advanced fields run the preset; Stop ends every
phase within seconds; a subnet file joins the plot without replacing its run. Every wait is for a
state, never a fixed sleep. Screenshots go to artifacts/stage/."""
from __future__ import annotations

import json
import time

import pytest
from browser import choose, plot_title, wait_text, wait_until
from conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VIEWPORT = {"width": 1280, "height": 800}
TRACES = """() => { const p = document.querySelector('#pareto-plot .js-plotly-plot');
  return p && p.data ? p.data.map(t => ({name: t.name || "", ids: (t.customdata || []).map(c => c[0]),
                                         y: Array.from(t.y || [])})) : []; }"""
MARKER = """([trace, id]) => { const p = document.querySelector('#pareto-plot .js-plotly-plot');
  const i = p.data.findIndex(t => (t.name || "").startsWith(trace));
  const k = p.data[i].customdata.findIndex(c => c[0] === id);
  const pt = p.querySelectorAll('.scatterlayer .trace')[i].querySelectorAll('.point')[k];
  const r = pt.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; }"""
STOP_WITHIN_S = 10


@pytest.fixture
def page(app_server, chromium):
    pg = chromium.new_page(viewport=VIEWPORT, accept_downloads=True)
    pg.set_default_timeout(120_000)
    pg.goto(app_server["url"])
    pg.get_by_text("Subnet Explorer").first.wait_for()
    wait_until(lambda: plot_title(pg) != "", 120)
    yield pg


def shot(page, name: str) -> None:
    out = ARTIFACTS / "stage"
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / f"{name}.png"), full_page=False)


def on_first_screen(page, locator) -> bool:
    box = locator.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"] + 1 \
        and box["x"] + box["width"] <= VIEWPORT["width"] + 1


def traces(page) -> dict:
    return {t["name"]: t for t in page.evaluate(TRACES)}


def hover_then_click(page, trace: str, cid: str) -> str:
    """Hover a marker, read the id the tooltip names, click there: the id the tooltip showed."""
    box = page.evaluate(MARKER, [trace, cid])
    page.mouse.move(box["x"] - 30, box["y"] - 30)
    page.mouse.move(box["x"], box["y"], steps=5)
    seen: list[str] = []

    def settled() -> str | None:
        """The hover label once Plotly has caught up with the mouse: the same text on three reads."""
        seen.append(page.locator("#pareto-plot .hoverlayer").text_content() or "")
        return seen[-1] if len(seen) >= 3 and seen[-1] and seen[-1] == seen[-2] == seen[-3] else None

    label = wait_until(settled, 30, "a settled hover label")
    page.mouse.click(box["x"], box["y"])
    return label.split(" (")[0].strip()


def stopped_within(page, where: str) -> float:
    """Press Stop as soon as the tab's job runs (before, Stop says nothing is running), and time from
    that press to `where` saying the job stopped."""
    deadline = time.time() + 120
    while time.time() < deadline:
        t0 = time.perf_counter()
        page.get_by_role("button", name="Stop").first.click()
        try:
            wait_until(lambda: "Stopping" in page.locator(where).inner_text()
                       or "stopped" in page.locator(where).inner_text(), 2, "Stop taken")
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f"the job never became stoppable: {page.locator(where).inner_text()[:300]}")
    wait_until(lambda: "stopped" in page.locator(where).inner_text(), 60, f"'stopped' in {where}")
    return time.perf_counter() - t0


def test_on_stage(page, app_server, embedded, tmp_path):
    from explorer.app.workbench import DEMO_RUN

    # the first screen, unscrolled: Load, Start and the front of the shipped demo run, the y axis one meaning
    assert plot_title(page) == DEMO_RUN
    for what in (page.get_by_role("button", name="Load", exact=True), page.get_by_role("button", name="Start search"),
                 page.locator("#pareto-plot .js-plotly-plot")):
        assert on_first_screen(page, what), what
    assert any(n.startswith("Pareto front") for n in traces(page))
    y_title = page.locator("#pareto-plot .ytitle").first.text_content()
    assert y_title.startswith("held-out perplexity") and "else" not in y_title
    shot(page, "01-first-screen")

    # hover and click name the same point, wherever points overlap
    front = traces(page)[next(n for n in traces(page) if n.startswith("Pareto front"))]
    for cid in front["ids"][1:4]:
        named = hover_then_click(page, "Pareto front", cid)
        wait_text(page, "#subnet-card", named, 60)
        assert page.locator("#pick-box input, #pick-box textarea").first.input_value() == named

    # a failure answers where the user acted, in one line; nothing else changes
    card = page.locator("#subnet-card").inner_text()
    page.get_by_label("Model").fill("/no/such/model")
    page.get_by_role("button", name="Load", exact=True).click()
    msg = wait_text(page, "#model-info", "no model folder", 120)
    assert "\n" not in msg.strip() and "Traceback" not in page.content()
    assert page.locator("#subnet-card").inner_text() == card and plot_title(page) == DEMO_RUN
    shot(page, "02-error-beside-load")

    # load the real model: the dense star sits at the held-out perplexity Load measured
    page.get_by_label("Model").fill("default")
    page.get_by_role("button", name="Load", exact=True).click()
    info = wait_text(page, "#model-info", "Dense held-out perplexity", 600)
    dense_ppl = float(info.split("Dense held-out perplexity")[1].split()[0].replace("*", ""))
    choose(page, "y axis", "search fitness perplexity")  # replot with the tab's measurement
    choose(page, "y axis", "held-out perplexity")
    wait_until(lambda: abs(traces(page)["dense model"]["y"][0] - dense_ppl) < 0.01 * dense_ppl, 60, "the dense star")

    # an evaluated pick moves to its measured held-out perplexity
    cid = front["ids"][len(front["ids"]) // 2]
    page.get_by_label("Click a point, or pick by id").fill(cid)
    page.get_by_role("button", name="Pick", exact=True).click()
    wait_text(page, "#subnet-card", cid, 60)
    page.get_by_role("button", name="Evaluate").click()
    status = wait_text(page, "#action-status", "Evaluated", 300)
    measured = float(status.split("ppl ")[1].split()[0].rstrip(","))
    wait_until(lambda: any(abs(y - measured) < 0.01 * measured for t in traces(page).values()
                           for i, y in zip(t["ids"], t["y"]) if i == cid and t["name"] != "picked"), 60, "the pick moved")
    shot(page, "03-evaluated-pick")

    # a subnet file joins the plot: the run stays, the file's subnet is drawn and picked
    from explorer.model.subnet import uniform_subnet

    f = tmp_path / "subnet.json"
    f.write_text(uniform_subnet(embedded.shape, 0.7, 0.7).to_json())
    page.locator("#subnet-file input[type=file]").set_input_files(str(f))
    opened = wait_text(page, "#pick-status", "Opened", 300)
    uid = opened.split("as ")[1].split()[0].strip("`")
    assert plot_title(page) == DEMO_RUN and any(uid in t["ids"] for t in traces(page).values())
    wait_text(page, "#subnet-card", uid, 60)
    shot(page, "04-file-on-the-plot")


def test_stop_ends_every_phase_and_blank_fields_run_the_preset(page, app_server):
    """Start is disabled while a search runs; Stop ends the calibration pass, the candidates, a
    reformation, an evaluation and an export within seconds, and each says 'stopped'; a search started
    with the advanced fields left blank runs the preset's settings."""
    page.get_by_role("button", name="Load", exact=True).click()
    wait_text(page, "#model-info", "Dense held-out perplexity", 600)
    page.get_by_label("Targets (fractions)").fill("0.7")
    page.get_by_text("More search settings").click()
    for label in ("Population (blank = preset)", "Generations (blank = preset)", "Fitness windows (blank = preset)"):
        assert page.get_by_label(label).input_value() == ""  # blank, not 0
    page.get_by_label("Seed", exact=True).first.fill("7")  # no cached calibration pass for this seed: the first phase is that pass
    page.get_by_label("Run name (blank = automatic)").fill("stop-phases")
    page.get_by_role("button", name="Start search").click()
    wait_text(page, "#status-box", "importance", 300)
    assert page.get_by_role("button", name="Start search").is_disabled()
    took = {"calibration": stopped_within(page, "#status-box")}
    wait_until(lambda: page.get_by_role("button", name="Start search").is_enabled(), 60, "Start enabled again")

    page.get_by_label("Seed", exact=True).first.fill("0")
    page.get_by_label("Run name (blank = automatic)").fill("stop-candidates")
    page.get_by_role("button", name="Start search").click()
    wait_text(page, "#status-box", "best fitness ppl", 300)  # a searched candidate at 70 %, not only the baselines
    took["candidates"] = stopped_within(page, "#status-box")
    run = json.loads((app_server["base"] / "runs" / "stop-candidates" / "run.json").read_text())
    from explorer.settings import PRESETS

    demo = PRESETS["demo"]
    assert (run["settings"]["population"], run["settings"]["generations"], run["settings"]["fitness_windows"],
            run["settings"]["minutes"]) == (demo.population, demo.generations, demo.fitness_windows, demo.minutes)

    page.get_by_label("Click a point, or pick by id").fill("best@0.7")
    page.get_by_role("button", name="Pick", exact=True).click()
    wait_text(page, "#subnet-card", "target 70%", 60)
    page.get_by_role("button", name="Reform").click()
    took["reformation"] = stopped_within(page, "#action-status")
    page.get_by_label("Questions per task").fill("0")  # every question: an evaluation long enough to stop
    page.get_by_role("button", name="Evaluate").click()
    took["evaluation"] = stopped_within(page, "#action-status")
    page.get_by_role("button", name="Export & download").click()
    took["export"] = stopped_within(page, "#export-status")
    page.locator("#export-status").scroll_into_view_if_needed()
    shot(page, "05-stopped")
    assert all(s <= STOP_WITHIN_S for s in took.values()), took
