"""The app on stage, timed in a real browser against the real server at a projector's 1280x800, twice:
on a quiet machine, and with another program keeping one core busy (as a laptop on stage often is).
Each pass loads the embedded model; runs a search with a 1-minute budget and times Start to the dense
point, to the first searched subnet, and how far past its budget it ended; starts another search and
times Stop to "stopped"; clicks the front's best subnet (the card must name the point the tooltip
named), reforms, evaluates, prompts and exports it. Screenshots of every step of the quiet pass go to
`--shots` (docs/screenshots, linked from the docs).

Runs the server (`app.py`) on a free port with fresh runs and exports folders, and Debian's
Chromium through Playwright (never a downloaded browser).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import format_table, machine, main, write_json

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
TRACES = """() => { const p = document.querySelector('#pareto-plot .js-plotly-plot');
  return p && p.data ? p.data.map(t => ({name: t.name || "", n: (t.customdata || []).length,
                                         ids: (t.customdata || []).map(c => c[0]), y: Array.from(t.y || [])})) : []; }"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


@contextmanager
def served_app(base: Path, env: dict) -> Iterator[tuple[subprocess.Popen, str]]:
    """The real app (`python app.py`) on a free port, with runs, exports and log under `base`; (process,
    url) once it answers, stopped on exit. The tests serve it the same way."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(base / "runs"),
                             "--exports-dir", str(base / "exports"), "--log", str(base / "app.log")], cwd=ROOT,
                            env=env, stdout=open(base / "stdout.txt", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for(page, test, timeout: float, poll: float = 0.25):
    """Poll `test(page)` until it returns something truthy; its value and when (perf_counter)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        got = test(page)
        if got:
            return got, time.perf_counter()
        time.sleep(poll)
    raise TimeoutError(f"not reached in {timeout:.0f} s")


LOAD = "import numpy as np\na = np.random.rand(400, 400)\nwhile True:\n    a = a @ a / 400\n"


def fill(page, label: str, value: str) -> None:
    """Type into a field and wait until the page holds the value (a section opened just before may
    still be mounting its fields, which would drop what was typed)."""
    box = page.get_by_label(label)
    for _ in range(20):
        box.fill(value)
        try:
            wait_for(page, lambda pg: box.input_value() == value, 1.0)
            time.sleep(0.5)
            if box.input_value() == value:
                return
        except TimeoutError:
            pass
    raise TimeoutError(f"{label!r} never kept {value!r}")


def traces(page) -> list[dict]:
    return page.evaluate(TRACES)


def status(page, where: str) -> str:
    return page.locator(where).inner_text()


SHARE_OPTIONS = {"prunable": "of the blocks (no embeddings)"}  # the page's words for --share


def one_pass(page, args, shots: Path | None, tag: str) -> dict:
    """The flow once; its timings (seconds) and what it checked."""
    result: dict = {}

    def shot(name: str) -> None:
        if shots is not None:
            page.screenshot(path=str(shots / f"{name}.png"))

    page.set_default_timeout(300_000)
    wait_for(page, lambda pg: any(t["n"] for t in traces(pg)), 120)
    shot("01-open")
    if args.model != "default":  # the other embedded model, by its name in the model box
        page.get_by_label("Model").fill(args.model)
        page.get_by_label("Model").press("Enter")
    ts = time.perf_counter()
    page.get_by_role("button", name="Load", exact=True).click()
    wait_for(page, lambda pg: "Dense held-out perplexity" in status(pg, "#model-info"), 600)
    result["load_s"] = time.perf_counter() - ts
    shot("02-loaded")

    # a search with a 1-minute budget: the first points, and how far past its budget it ends
    page.get_by_label("Targets (fractions)").fill(args.targets)
    if args.share != "total":
        page.get_by_label("of", exact=True).click()
        page.get_by_role("option", name=SHARE_OPTIONS[args.share]).click()
    page.get_by_text("More search settings").click()
    fill(page, "Minutes", f"{args.minutes:g}")
    fill(page, "Run name (blank = automatic)", f"{tag}-budget")
    page.evaluate("() => window.scrollTo(0, 0)")  # back to the first screen: Start, and the plot it grows
    start = time.perf_counter()
    page.get_by_role("button", name="Start search").click()

    def names(pg) -> dict:
        title = pg.locator("#pareto-plot .gtitle")
        if not title.count() or (title.first.text_content() or "") != f"{tag}-budget":
            return {}
        return {t["name"]: t for t in traces(pg)}

    _, t_dense = wait_for(page, lambda pg: names(pg).get("dense model", {}).get("n", 0) > 0, args.timeout)
    result["start_to_dense_s"] = t_dense - start
    _, t_first = wait_for(page, lambda pg: any(n.startswith(("searched", "Pareto front")) and t["n"] > 1
                                               for n, t in names(pg).items()), args.timeout)
    result["start_to_first_subnet_s"] = t_first - start
    wait_for(page, lambda pg: time.perf_counter() - start >= 30, 40)
    shot("03-search")
    _, t_end = wait_for(page, lambda pg: "Search finished" in status(pg, "#status-box"), args.timeout)
    result["budget_overrun_s"] = t_end - start - 60 * args.minutes
    shot("04-finished")

    # another search, stopped: Stop to "stopped"
    fill(page, "Minutes", "")
    fill(page, "Run name (blank = automatic)", f"{tag}-stopped")
    page.evaluate("() => window.scrollTo(0, 0)")
    page.get_by_role("button", name="Start search").click()
    wait_for(page, lambda pg: "candidates evaluated" in status(pg, "#status-box")
             and f"{tag}-stopped" == (pg.locator("#pareto-plot .gtitle").first.text_content() or ""), args.timeout)
    wait_for(page, lambda pg: True, 1)
    tstop = time.perf_counter()
    page.get_by_role("button", name="Stop").first.click()
    wait_for(page, lambda pg: "stopped" in status(pg, "#status-box"), 600)
    result["stop_to_stopped_s"] = time.perf_counter() - tstop

    # back to the budgeted run; hover the front's best subnet, click it: the card names what the tooltip named
    page.get_by_text("Saved runs").click()
    page.get_by_label("Run", exact=True).fill(f"{tag}-budget")
    page.get_by_label("Run", exact=True).press("Enter")
    page.get_by_role("button", name="Open run").click()
    wait_for(page, lambda pg: (pg.locator("#pareto-plot .gtitle").first.text_content() or "") == f"{tag}-budget", 120)
    front = next(t for t in traces(page) if t["name"].startswith("Pareto front"))
    members = [(y, i) for i, y in zip(front["ids"], front["y"]) if i != "c00000"] or list(zip(front["y"], front["ids"]))
    target_id = min(members)[1]
    page.locator("#pareto-plot").scroll_into_view_if_needed()
    box = page.evaluate("""(id) => { const p = document.querySelector('#pareto-plot .js-plotly-plot');
        const i = p.data.findIndex(t => (t.name || '').startsWith('Pareto front'));
        const k = p.data[i].customdata.findIndex(c => c[0] === id);
        const pt = p.querySelectorAll('.scatterlayer .trace')[i].querySelectorAll('.point')[k];
        const r = pt.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; }""", target_id)
    page.mouse.move(box["x"] - 30, box["y"] - 30)
    page.mouse.move(box["x"], box["y"], steps=5)
    seen: list[str] = []

    def settled(pg) -> str | None:  # the label once Plotly caught up with the mouse: three equal reads
        seen.append(pg.locator("#pareto-plot .hoverlayer").text_content() or "")
        return seen[-1] if len(seen) >= 3 and seen[-1] and seen[-1] == seen[-2] == seen[-3] else None

    label, _ = wait_for(page, settled, 30)
    named = label.split(" (")[0].strip()
    tc = time.perf_counter()
    page.mouse.click(box["x"], box["y"])
    wait_for(page, lambda pg: named in status(pg, "#subnet-card"), 120)
    result["click_to_card_s"] = time.perf_counter() - tc
    result["clicked"], result["hover_equals_click"] = named, named in status(page, "#subnet-card")
    shot("05-pick")

    tr = time.perf_counter()
    page.get_by_role("button", name="Reform").click()
    wait_for(page, lambda pg: "Reformed" in status(pg, "#action-status"), 900)
    result["reform_s"] = time.perf_counter() - tr
    shot("06-reform")
    te = time.perf_counter()
    page.get_by_role("button", name="Evaluate").click()
    wait_for(page, lambda pg: "Evaluated" in status(pg, "#action-status"), 900)
    result["evaluate_s"] = time.perf_counter() - te
    shot("07-evaluate")
    page.get_by_role("button", name="Add to compare").click()
    wait_for(page, lambda pg: "added to compare" in status(pg, "#action-status"), 60)
    page.get_by_label("Prompt", exact=True).fill(args.prompt)
    page.get_by_role("spinbutton", name="number input for Max new tokens").fill(str(args.new_tokens))
    tg = time.perf_counter()
    page.get_by_role("button", name="Generate").click()
    wait_for(page, lambda pg: all("done" in status(pg, f"#{b}") for b in ("out-original", "out-a")), 600)
    result["generate_s"] = time.perf_counter() - tg
    result["answers"] = {b: page.locator(f"#{b} textarea").input_value() for b in ("out-original", "out-a")}
    result["speed_labels"] = {b: status(page, f"#{b}").splitlines()[0] for b in ("out-original", "out-a")}
    page.locator("#out-original").scroll_into_view_if_needed()
    shot("08-prompt")
    tx = time.perf_counter()
    page.get_by_role("button", name="Export & download").click()
    wait_for(page, lambda pg: "verified" in status(pg, "#export-status"), 900)
    result["export_s"] = time.perf_counter() - tx
    page.locator("#export-status").scroll_into_view_if_needed()
    shot("09-export")

    # the size slider: drag (the library's subnet previewed in the line under it and in the card), release
    # (evaluated, stored, picked: the line says so)
    slider = page.locator("#size-slider input[type=range]")
    slider.scroll_into_view_if_needed()
    lo, hi = float(slider.get_attribute("min")), float(slider.get_attribute("max"))
    sb = slider.bounding_box()
    x_at = lambda v: sb["x"] + (v - lo) / (hi - lo) * sb["width"]  # noqa: E731
    size = max(lo + 0.02, min(hi - 0.02, args.slider_size))
    page.mouse.move(x_at(hi - 0.02), sb["y"] + sb["height"] / 2)
    page.mouse.down()
    ts = time.perf_counter()
    page.mouse.move(x_at(size), sb["y"] + sb["height"] / 2, steps=4)
    final = f"library@{float(slider.input_value()):.2f}"  # where the drag ended (earlier steps preview first)
    wait_for(page, lambda pg: final in status(pg, "#size-readout") and "(predicted)" in status(pg, "#size-readout"),
             60)
    result["slider_preview_s"] = time.perf_counter() - ts
    shot("09b-slider")
    was = status(page, "#pick-status")  # the clicked point's "Picked ..." until the release's pick replaces it
    tp = time.perf_counter()
    page.mouse.up()
    wait_for(page, lambda pg: "Picked" in status(pg, "#pick-status") and status(pg, "#pick-status") != was
             and "measured" in status(pg, "#size-readout"), 300)
    result["slider_release_to_pick_s"] = time.perf_counter() - tp
    page.evaluate("() => window.scrollTo(0, 0)")
    page.get_by_label("Model").fill("/no/such/model")
    page.get_by_role("button", name="Load", exact=True).click()
    wait_for(page, lambda pg: "no model folder" in status(pg, "#model-info"), 120)
    shot("10-error")
    return result


def run(args) -> dict:
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    shots = Path(args.shots)
    shots.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    passes = {}
    for tag in args.passes.split(","):
        base = Path(tempfile.mkdtemp(prefix=f"bench-app-{tag}-"))
        load = None
        if tag == "busy":
            load = subprocess.Popen([sys.executable, "-c", LOAD], env={**env, "OMP_NUM_THREADS": "1",
                                                                       "OPENBLAS_NUM_THREADS": "1"})
        try:
            with served_app(base, env) as (_, url):
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
                    page = browser.new_page(viewport={"width": args.width, "height": args.height})
                    page.goto(url)
                    passes[tag] = one_pass(page, args, shots if tag == "quiet" else None, tag)
                    browser.close()
        finally:
            if load is not None:
                load.kill()
                load.wait()
        print(f"{tag}: {passes[tag]}", flush=True)
    steps = [k for k in next(iter(passes.values())) if k.endswith("_s")]
    rows = [{"step": k, **{tag: round(r[k], 1) for tag, r in passes.items()}} for k in steps]
    print(format_table(rows, ["step", *passes]))
    checks = {f"{tag}_{name}": ok for tag, r in passes.items() for name, ok in (
        ("hover_equals_click", r["hover_equals_click"]), ("stop_within_10s", r["stop_to_stopped_s"] <= 10),
        ("budget_overrun_within_30s", r["budget_overrun_s"] <= 30))}
    print("checks:", ", ".join(f"{k}={v}" for k, v in checks.items()))
    out = {"benchmark": "app", "model": args.model, "share": args.share, "targets": args.targets, "minutes": args.minutes,
           "viewport": [args.width, args.height], "passes": passes, "rows": rows, "checks": checks,
           "machine": machine(), "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, out)}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="an embedded model by name (default, gemma3-270m)")
    p.add_argument("--slider-size", type=float, default=0.65, help="the size the slider is dragged to")
    p.add_argument("--share", default="total", choices=["total", "prunable"], help="what the targets are fractions of")
    p.add_argument("--targets", default="0.8,0.7")
    p.add_argument("--minutes", type=float, default=1.0, help="the budgeted search's time budget")
    p.add_argument("--passes", default="quiet,busy", help="quiet, busy (one core kept busy by another program)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--shots", default="docs/screenshots")
    p.add_argument("--out", default="docs/results/app.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
