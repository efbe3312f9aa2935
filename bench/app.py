"""The app on stage, timed in a real browser against the real server: from Start (embedded model,
demo preset, four targets) to the dense point on the plot, to every baseline, to the first
searched subnet; and from a click on a front marker to the picked subnet's card. Screenshots of
each step go to `--shots` (docs/screenshots for the README).

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
  return p && p.data ? p.data.map(t => ({name: t.name, n: (t.customdata || []).length,
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


def show_plot(page) -> None:
    """Scroll so the plot's panel row is at the top of the viewport (what a projector shows)."""
    page.evaluate("() => document.querySelector('#pareto-plot').scrollIntoView({block: 'start'})")


def traces(page) -> list[dict]:
    return page.evaluate(TRACES)


def run(args) -> dict:
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="bench-app-"))
    shots = Path(args.shots)
    shots.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    result: dict = {}
    with served_app(base, env) as (_, url):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.set_default_timeout(300_000)
            page.goto(url)
            wait_for(page, lambda pg: any(t["n"] for t in traces(pg)), 120)
            show_plot(page)
            page.screenshot(path=str(shots / "01-open.png"))
            ts = time.perf_counter()
            page.get_by_role("button", name="Load", exact=True).click()
            wait_for(page, lambda pg: "Dense held-out perplexity" in pg.locator("#model-info").inner_text(), 600)
            result["load_s"] = time.perf_counter() - ts
            page.screenshot(path=str(shots / "02-loaded.png"))
            page.get_by_label("Targets (fraction of total parameters)").fill(args.targets)
            page.get_by_label("Run name (blank = automatic)").fill("stage")
            start = time.perf_counter()
            page.get_by_role("button", name="Start search").click()

            def names(pg) -> dict:
                """The plot's traces by name, once the plot shows the new run (its title)."""
                title = pg.locator("#pareto-plot .gtitle")
                if not title.count() or (title.first.text_content() or "") != "stage":
                    return {}
                return {t["name"]: t for t in traces(pg)}

            def has_dense(pg) -> bool:
                return names(pg).get("dense model", {}).get("n", 0) > 0

            _, t_dense = wait_for(page, has_dense, args.timeout)
            result["start_to_dense_s"] = t_dense - start
            _, t_base = wait_for(page, lambda pg: sum(1 for n in names(pg) if n.startswith("baseline:")) >= 4,
                                 args.timeout)
            result["start_to_baselines_s"] = t_base - start
            subnet_traces = ("evaluated (dominated)", "Pareto front")
            _, t_first = wait_for(page, lambda pg: any(n.startswith(subnet_traces) and t["n"] > 1
                                                       for n, t in names(pg).items()), args.timeout)
            result["start_to_first_subnet_s"] = t_first - start
            # let the search run on (the screenshot and the pick show a search, not its first point)
            wait_for(page, lambda pg: time.perf_counter() - start >= args.search_seconds, args.search_seconds + 5)
            show_plot(page)
            page.screenshot(path=str(shots / "03-search.png"))
            page.get_by_role("button", name="Stop").click()
            wait_for(page, lambda pg: "stopped" in pg.locator("#status-box").inner_text()
                     or "finished" in pg.locator("#status-box").inner_text(), 600)
            # a click on a front marker: the card must name that very candidate
            now = names(page)
            front = next(t for n, t in now.items() if n.startswith("Pareto front"))
            dense_ids = set(now.get("dense model", {}).get("ids", []))
            # the front's best subnet (lowest perplexity), not the dense star: what a speaker would show
            members = [(y, i) for i, y in zip(front["ids"], front["y"]) if i not in dense_ids] or \
                list(zip(front["y"], front["ids"]))
            target_id = min(members)[1]
            box = page.evaluate("""(id) => { const p = document.querySelector('#pareto-plot .js-plotly-plot');
                const i = p.data.findIndex(t => t.name.startsWith('Pareto front'));
                const k = p.data[i].customdata.findIndex(c => c[0] === id);
                const pt = p.querySelectorAll('.scatterlayer .trace')[i].querySelectorAll('.point')[k];
                pt.scrollIntoView({block: 'center'});
                const r = pt.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; }""",
                                target_id)
            tc = time.perf_counter()  # from the pointer reaching the marker (Plotly clicks what it hovers)
            page.mouse.move(box["x"], box["y"], steps=5)
            wait_for(page, lambda pg: pg.locator("#pareto-plot .hoverlayer").text_content(), 30)
            page.mouse.click(box["x"], box["y"])
            wait_for(page, lambda pg: target_id in pg.locator("#subnet-card").inner_text(), 120)
            result["click_to_card_s"] = time.perf_counter() - tc
            result["clicked"] = target_id
            show_plot(page)
            page.screenshot(path=str(shots / "04-pick.png"))
            # reform the pick (the plot stays), then prompt it beside the original, then an error
            tr = time.perf_counter()
            page.get_by_role("button", name="Reform").click()
            wait_for(page, lambda pg: "Reformed" in pg.locator("#action-status").inner_text(), 900)
            result["reform_s"] = time.perf_counter() - tr
            show_plot(page)
            page.screenshot(path=str(shots / "05-reform.png"))
            page.get_by_role("button", name="Add to compare").click()
            wait_for(page, lambda pg: "added to compare" in pg.locator("#action-status").inner_text(), 60)
            page.get_by_label("Prompt", exact=True).fill(args.prompt)
            page.get_by_role("spinbutton", name="number input for Max new tokens").fill(str(args.new_tokens))
            tg = time.perf_counter()
            page.get_by_role("button", name="Generate").click()
            wait_for(page, lambda pg: all("done" in pg.locator(f"#{b}").inner_text() for b in ("out-original", "out-a")),
                     600)
            result["generate_s"] = time.perf_counter() - tg
            result["answers"] = {b: page.locator(f"#{b} textarea").input_value() for b in ("out-original", "out-a")}
            page.locator("#out-original").scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "06-prompt.png"))
            page.get_by_label("Model").fill("/no/such/model")
            page.get_by_role("button", name="Load", exact=True).click()
            wait_for(page, lambda pg: "no model folder" in pg.locator("#message").inner_text(), 120)
            page.locator("#message").scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "07-error.png"))
            browser.close()
    rows = [{"step": k, "seconds": v} for k, v in result.items() if k.endswith("_s")]
    print("answers:", result["answers"])
    print(format_table(rows, ["step", "seconds"]))
    checks = {"dense_within_30s": result["start_to_dense_s"] <= 30,
              "baselines_within_30s": result["start_to_baselines_s"] <= 30,
              "first_subnet_within_60s": result["start_to_first_subnet_s"] <= 60}
    print("targets:", ", ".join(f"{k}={v}" for k, v in checks.items()))
    out = {"benchmark": "app", "targets": args.targets, "viewport": [args.width, args.height], "result": result,
           "checks": checks, "machine": machine(), "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, out)}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default="0.8,0.7,0.6,0.5")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--search-seconds", type=float, default=90, help="search this long after Start before Stop")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--shots", default="docs/screenshots")
    p.add_argument("--out", default="docs/results/app.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
