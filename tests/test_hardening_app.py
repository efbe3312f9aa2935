"""The app under bad input, Stop and two users at once — the real server (`app_server`), driven through the
real gradio_client and, for two tabs, real headless Chromium."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from browser import ARGS, CHROMIUM, plot_title, wait_text, wait_until
from conftest import tiny_config

from explorer.model.subnet import ModelShape, uniform_subnet

pytestmark = pytest.mark.slow

from explorer.ui.app import MESSAGE_OF, client_outputs

X, Y = "parameters (% of dense)", "held-out perplexity"
SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "assets" / "runs").iterdir()
                 if (p / "run.json").is_file())


def new_client(app_server):
    """A fresh gradio_client Client: its own session, i.e. its own tab."""
    from gradio_client import Client

    return Client(app_server["url"], verbose=False)


def out(result, api_name: str, name: str):
    """One named output of an endpoint's result (each endpoint returns only what it changes)."""
    names = client_outputs(api_name.strip("/"))
    return result if len(names) == 1 and name == names[0] else result[names.index(name)]  # one output: no tuple


def value(o) -> str:
    """A component's value as returned by gradio_client (plain, or an update dict)."""
    return str(o.get("value", "") if isinstance(o, dict) else o or "")


def loaded_client(app_server):
    c = new_client(app_server)
    assert "Dense held-out perplexity" in value(out(c.predict("default", "float32", "cpu", api_name="/load_model"),
                                                    "load_model", "model_info"))
    return c


def refused(client, *args, api_name: str, match: str) -> str:
    """An action refused with one readable line in the page's one message place, and nothing else changed."""
    result = client.predict(*args, api_name=api_name)
    where = MESSAGE_OF[api_name.strip("/")]
    msg = value(out(result, api_name, where))
    assert re.search(match, msg), msg
    assert "Traceback" not in msg and "\n" not in msg.strip(), msg
    others = [value(o) for o, name in zip(result, client_outputs(api_name.strip("/"))) if name != where]
    assert not any(others), f"a refused action changed {others}"
    return msg


def compare_ids(out) -> list[str]:
    data = out.get("value", out) if isinstance(out, dict) else out
    rows = data.get("data", []) if isinstance(data, dict) else []
    return [r[0] for r in rows]


def stop_when_running(client, job, timeout_s: float = 300) -> dict:
    """Press Stop as soon as the tab's job has started (Stop answers 'nothing is running' before)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not job.done():
        r = client.predict(api_name="/stop_search")
        if any("Stopping" in value(out(r, "stop_search", k)) for k in ("status", "action_status", "export_status")):
            return r
        time.sleep(0.1)
    raise AssertionError(f"the job never became stoppable (done: {job.done()})")


def app_log(app_server) -> str:
    return Path(app_server["log"]).read_text(encoding="utf-8", errors="replace")


# ---- a subnet JSON in the app: matching, mismatched, garbage ------------------------------------
def test_open_subnet_json_matching_and_mismatched(app_server, embedded, tmp_path):
    from gradio_client import handle_file

    client = loaded_client(app_server)
    client.predict(SHIPPED[0], X, Y, api_name="/open_run")
    client.predict("c00001", X, Y, api_name="/pick")

    other = tmp_path / "tiny-subnet.json"  # a subnet of another (tiny, 4-layer) model
    other.write_text(uniform_subnet(ModelShape.from_config(tiny_config()), 0.5, 0.5).to_json())
    msg = refused(client, handle_file(str(other)), X, Y, api_name="/open_subnet",
                  match="does not fit the loaded model.*4 layers but the model has 30")
    assert msg.count("subnet file") <= 1 and "subscriptable" not in msg
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(os.urandom(2048))
    refused(client, handle_file(str(garbage)), X, Y, api_name="/open_subnet",
            match="not UTF-8 text|is not a subnet file")
    wrong = tmp_path / "wrong-shape.json"  # JSON, but not a subnet's shape
    wrong.write_text('{"layers": [1, 2, 3]}')
    msg = refused(client, handle_file(str(wrong)), X, Y, api_name="/open_subnet", match="is not a subnet file")
    assert msg.count("subnet file") == 1 and "subscriptable" not in msg
    # the refused files left the pick alone: what gets compared is still the shipped run's c00001
    r = client.predict(X, Y, api_name="/add_compare")
    assert "`c00001` added" in value(out(r, "add_compare", "action_status"))

    good = tmp_path / "subnet.json"
    sub = uniform_subnet(embedded.shape, 0.75, 0.75)
    good.write_text(sub.to_json())
    r = client.predict(handle_file(str(good)), X, Y, api_name="/open_subnet")
    cid = value(out(r, "open_subnet", "pick_box"))
    assert cid.startswith("upload-") and f"`{cid}`" in value(out(r, "open_subnet", "card"))
    assert "held-out ppl" in value(out(r, "open_subnet", "card"))
    assert "Opened `subnet.json`" in value(out(r, "open_subnet", "pick_status"))
    assert compare_ids(out(r, "open_subnet", "compare")) == ["c00001"]  # the run stays on the plot, and its picks
    from explorer.app.runfolders import uploads_run_name

    run_dir = app_server["base"] / "runs" / uploads_run_name("default")
    stored = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    assert [d["origin"] for d in stored if d["id"] == cid] == ["upload"]
    # it is a pick like any other
    r = client.predict(X, Y, api_name="/add_compare")
    assert f"`{cid}` added" in value(out(r, "add_compare", "action_status"))
    assert compare_ids(out(r, "add_compare", "compare")) == ["c00001", cid]
    # a refused file after that still leaves this pick in place
    refused(client, handle_file(str(other)), X, Y, api_name="/open_subnet", match="does not fit the loaded model")
    r = client.predict(X, Y, api_name="/add_compare")
    assert compare_ids(out(r, "add_compare", "compare")) == ["c00001", cid]
    assert not re.search(r"unexpected error in open_subnet", app_log(app_server))


# ---- Stop cancels a reformation and an export ----------------------------------------------------
def test_stop_cancels_reform_and_export_leaving_nothing_half_done(app_server, embedded, tmp_path):
    from gradio_client import handle_file

    client = loaded_client(app_server)
    good = tmp_path / "subnet.json"
    good.write_text(uniform_subnet(embedded.shape, 0.5, 0.5).to_json())
    r = client.predict(handle_file(str(good)), X, Y, api_name="/open_subnet")
    cid = value(out(r, "open_subnet", "pick_box"))
    from explorer.app.runfolders import uploads_run_name

    run_dir = app_server["base"] / "runs" / uploads_run_name("default")
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    job = client.submit(api_name="/reform")
    stop_when_running(client, job)
    res = job.result(timeout=600)
    assert f"Reformation of `{cid}` stopped" in value(out(res, "reform", "action_status"))
    # the run is exactly as before: no annotation, no changed candidate; the card shows no reformation
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files
    card = value(out(client.predict(cid, X, Y, api_name="/pick"), "pick", "card"))
    assert "after reform" not in card

    exports = app_server["base"] / "exports"
    before = set(os.listdir(exports)) if exports.is_dir() else set()
    job = client.submit(api_name="/export")
    stop_when_running(client, job)
    res = job.result(timeout=600)
    assert f"Export of `{cid}` stopped" in value(out(res, "export", "export_status"))
    assert not value(out(res, "export", "download"))
    left = set(os.listdir(exports)) - before
    assert not left, f"a cancelled export left {left}"  # neither a finished-looking folder nor a partial one

    # the model is free again: another heavy job of this tab runs to the end
    r = client.predict(["ppl"], 1, X, Y, api_name="/evaluate")
    assert "held-out ppl" in value(out(r, "evaluate", "card"))
    # Stop with nothing running is a note, not an error
    r = client.predict(api_name="/stop_search")
    assert "Nothing is running" in value(out(r, "stop_search", "status"))


# ---- a prompt longer than the context -------------------------------------------------------------
def test_prompt_longer_than_the_context_then_a_normal_one(app_server):
    client = loaded_client(app_server)
    long_prompt = "The sea was calm and the boats came home. " * 1200  # ~12k tokens > 8192
    refused(client, long_prompt, False, 0.7, 0.9, 0, 16, api_name="/generate",
            match=r"the prompt has \d+ tokens.*exceeds the model's context of 8192")
    refused(client, "x" * 300_000, False, 0.7, 0.9, 0, 16, api_name="/generate", match="characters; at most")
    refused(client, "   ", False, 0.7, 0.9, 0, 16, api_name="/generate", match="the prompt is empty")
    job = client.submit("Name a colour.", False, 0.7, 0.9, 0, 8, api_name="/generate")
    job.result(timeout=300)
    texts = [value(out(o, "generate", "out_original")) for o in job.outputs()]
    assert any(t.strip() for t in texts)
    assert "unexpected error in generate" not in app_log(app_server)


# ---- two browser tabs at once -------------------------------------------------------------------




@pytest.mark.browser
def test_two_tabs_one_searches_the_other_is_told_busy(app_server):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            a, b = (browser.new_context(viewport={"width": 1500, "height": 1100}).new_page() for _ in range(2))
            for page in (a, b):
                page.set_default_timeout(120_000)
                page.goto(app_server["url"])
                page.get_by_text("Subnet Explorer").first.wait_for()
            for page in (a, b):  # both load the model (the second waits for the first's measurement)
                page.get_by_role("button", name="Load", exact=True).click()
            for page in (a, b):
                wait_text(page, "#model-info", "Dense held-out perplexity", 400)
            # tab B shows a shipped run and picks one of its candidates
            b_pick = b.locator("#pick-box input, #pick-box textarea").first
            b_pick.fill("typed before opening")
            b.get_by_text("Saved runs").click()
            b.get_by_label("Run", exact=True).fill(SHIPPED[0])
            b.get_by_label("Run", exact=True).press("Enter")
            b.get_by_role("button", name="Open run").click()
            deadline = time.time() + 60
            while b_pick.input_value():  # opening a run clears the pick box: the open has finished
                assert time.time() < deadline, "opening the run never finished"
                time.sleep(0.3)
            wait_until(lambda: plot_title(b) == SHIPPED[0], 60, "tab B's plot showing the shipped run")
            b_pick.fill("c00001")
            b.get_by_role("button", name="Pick", exact=True).click()
            b_card = wait_text(b, "#subnet-card", "c00001", 60)

            # tab A: a long search (single target, no baselines) that will be stopped; the model is A's as
            # soon as the search says it is starting
            a.get_by_label("Targets (fractions)").fill("0.8")
            a.get_by_text("More search settings").click()
            a.get_by_label("Population (blank = preset)").fill("6")
            a.get_by_label("Generations (blank = preset)").fill("50")
            a.get_by_label("Fitness windows (blank = preset)").fill("1")
            a.get_by_label("Also run the baselines (magnitude, Wanda-sp, FLAP)").uncheck()
            a.get_by_label("Run name (blank = automatic)").fill("tab-a-run")
            a.get_by_role("button", name="Start search").click()
            wait_text(a, "#status-box", "importance", 300)

            # tab B at the same time: a heavy job of its own is refused with a readable busy message
            b.get_by_role("button", name="Reform").click()
            b.get_by_text("the model is busy with another job").first.wait_for(timeout=60_000)
            # B's Stop does not reach A's search: B runs nothing
            b.get_by_role("button", name="Stop").first.click()
            b.get_by_text("Nothing is running in this tab").first.wait_for(timeout=60_000)
            assert not re.search("Stopping|stopped|finished", a.locator("#status-box").inner_text())

            # A stops its own search cleanly
            a.get_by_role("button", name="Stop").first.click()
            wait_text(a, "#status-box", "stopped", 300)

            # each tab kept its own state: A shows its run and no pick; B its run and its pick
            deadline = time.time() + 60
            while plot_title(a) != "tab-a-run" and time.time() < deadline:
                time.sleep(0.3)
            assert plot_title(a) == "tab-a-run" and plot_title(b) == SHIPPED[0]
            assert "c00001" not in a.locator("#subnet-card").inner_text()
            assert a.locator("#pick-box input, #pick-box textarea").first.input_value() == ""
            assert b.locator("#subnet-card").inner_text() == b_card
            assert "candidates evaluated" not in b.locator("#status-box").inner_text()

            # the model is free again: B's reformation starts, and B's Stop cancels it. Stop is pressed
            # until it reaches the job (a press before the job starts finds nothing running); the answer of
            # a press may land after the cancellation's, so the cancellation is read from its toast too
            b.get_by_role("button", name="Reform").click()
            cancelled = b.get_by_text(re.compile(r"Reformation of `?c00001`? stopped")).first
            deadline = time.time() + 300
            while not ("Stopping the reformation" in b.locator("#action-status").inner_text()
                       or cancelled.is_visible()):
                assert time.time() < deadline, ("B's reformation was never stopped: "
                                                + b.locator("#action-status").inner_text())
                assert "Reformed" not in b.locator("#action-status").inner_text()
                b.get_by_role("button", name="Stop").nth(1).click()  # the Stop beside Reform
                time.sleep(0.5)
            cancelled.wait_for(timeout=300_000)
            assert "Reformed" not in b.locator("#action-status").inner_text()
            assert b.locator("#subnet-card").inner_text() == b_card  # nothing of it was kept
            for page in (a, b):
                assert "Traceback" not in page.content()
        finally:
            browser.close()
