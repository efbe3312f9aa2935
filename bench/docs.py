"""Every figure in README.md and docs/*.md, generated from the committed JSON under docs/results/:
figures are never typed by hand, so they cannot drift from what a benchmark measured.

A generated region in a markdown file is fenced by two comments, inline or around a table:

    <!-- gen:quality.after --> ... <!-- /gen -->

`python bench/docs.py` (or `make docs`) rewrites every region from the JSON; `--check` only lists
the regions that differ (the tests run it, so a README that disagrees with its JSON fails).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
FILES = ("README.md", "docs/benchmarks.md")
REGION = re.compile(r"<!-- gen:(?P<name>[\w.:@+-]+) -->(?P<body>.*?)<!-- /gen -->", re.S)
GENERATORS: dict[str, Callable[..., str]] = {}


def generator(name: str):
    def register(fn):
        GENERATORS[name] = fn
        return fn
    return register


@lru_cache(maxsize=None)
def result(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path.relative_to(ROOT)} is missing: run the benchmark that writes it")
    return json.loads(path.read_text())


# ---- formatting -----------------------------------------------------------------------------------
def num(x, digits: int = 4) -> str:
    """A figure as the tables print it: 4 significant digits, e.g. 69.36, 127.4, 8.7e4."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    if abs(x) >= 10 ** (digits + 1):
        mantissa, exp = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exp)}"
    return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits - 1}f}"


def pct(x, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f} %"


def signed_pct(x, digits: int = 1) -> str:
    return f"{100 * x:+.{digits}f} %"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n" + "\n".join(lines) + "\n"


def target(t) -> str:
    return f"{float(t):.0%}".replace("%", " %")


# ---- quality: search against the faithful baselines -------------------------------------------------------
BASELINE_NAMES = {"magnitude": "magnitude", "wanda-sp": "Wanda-sp", "flap": "FLAP", "flap-uniform": "uniform FLAP",
                  "flap-nobias": "FLAP without bias"}
SEARCH_NAMES = {"search": "search (paper fitness)", "search+comp": "search with compensation",
                "heads": "whole-head search without compensation",
                "search+reform": "reformation-aware search", "heads+comp": "whole-head search",
                "heads+reform": "whole-head reformation-aware search"}
BASELINES = ("magnitude", "wanda-sp", "flap", "flap-uniform")


def searches(q: dict) -> list[str]:
    return list(q["search_seconds"])


def best_of(row: dict, names, suffix: str = "") -> tuple[str, float]:
    return min(((n, row[n + suffix]) for n in names), key=lambda kv: kv[1])


@generator("quality.summary")
def quality_summary() -> str:
    """README's one table: the best search, the best faithful baseline and dense, before and after reformation."""
    q = result("quality")
    rows = []
    for r in q["rows"]:
        s, sv = best_of(r, searches(q))
        b, bv = best_of(r, BASELINES)
        s2, sv2 = best_of(r, searches(q), "_reformed")
        b2, bv2 = best_of(r, BASELINES, "_reformed")
        rows.append([target(r["target"]), f"**{num(sv)}** ({SEARCH_NAMES[s]})", f"{num(bv)} ({BASELINE_NAMES[b]})",
                     f"**{num(sv2)}** ({SEARCH_NAMES[s2]})", f"{num(bv2)} ({BASELINE_NAMES[b2]})"])
    return table(["kept parameters", "best search", "best baseline", "best search, reformed",
                  "best baseline, reformed"], rows)


def _quality_table(suffix: str, name: str = "quality") -> str:
    q = result(name)
    names = [*searches(q), *BASELINES, *(["flap-nobias"] if "flap-nobias" in q["rows"][0] else [])]
    share = " of blocks" if q.get("share", "total") == "prunable" else ""
    rows = []
    for r in q["rows"]:
        best = min(r[n + suffix] for n in names)
        rows.append([target(r["target"]) + share, *[f"**{num(r[n + suffix])}**" if r[n + suffix] == best else
                                                     num(r[n + suffix]) for n in names]])
    return table(["kept", *[SEARCH_NAMES.get(n) or BASELINE_NAMES[n] for n in names]], rows)


# ---- the same benchmark on the second embedded model (Gemma 3 270M, targets of the blocks) --------------------
@generator("gemma3.before")
def gemma3_before() -> str:
    return _quality_table("", "quality-gemma3")


@generator("gemma3.after")
def gemma3_after() -> str:
    return _quality_table("_reformed", "quality-gemma3")


@generator("gemma3.dense")
def gemma3_dense() -> str:
    return num(result("quality-gemma3")["rows"][0]["dense"])


@generator("gemma3.setup")
def gemma3_setup() -> str:
    q = result("quality-gemma3")
    return (f"{len(q['search_seconds'])} searches ({', '.join(SEARCH_NAMES[s] for s in searches(q))}) of "
            f"{num(q['minutes'], 3)} minutes each over "
            f"{', '.join(target(r['target']) for r in q['rows'])} of the blocks' parameters; held-out perplexity on "
            f"{q['heldout_windows']} x {q['seq_len']} tokens")


@generator("quality.scope")
def quality_scope() -> str:
    """Where the searches searched and where this run scored their picks (a run may score fewer)."""
    q = result("quality")
    searched = sorted({float(t) for sm in q["search_summaries"].values() for t in sm["best"]}, reverse=True)
    scored = [r["target"] for r in q["rows"]]
    return (f"searching {', '.join(target(t) for t in searched)} of its parameters together, scored here at "
            f"{', '.join(target(t) for t in scored)}")


@generator("quality.before")
def quality_before() -> str:
    return _quality_table("")


@generator("quality.after")
def quality_after() -> str:
    return _quality_table("_reformed")


@generator("quality.dense")
def quality_dense() -> str:
    return num(result("quality")["rows"][0]["dense"])


@generator("quality.minutes")
def quality_minutes() -> str:
    q = result("quality")
    secs = q["search_seconds"]
    return ", ".join(f"{SEARCH_NAMES[n]} {secs[n]:.0f} s" for n in secs)


@generator("quality.seconds")
def quality_seconds() -> str:
    return f"{result('quality')['seconds']:.0f} s"


@generator("quality.vs-dense")
def quality_vs_dense() -> str:
    q = result("quality")
    return ", ".join(f"{num(r['best_reformed_vs_dense'], 3)}x at {target(r['target'])}" for r in q["rows"])


@generator("quality.zeroshot")
def quality_zeroshot() -> str:
    z = result("quality")["zeroshot"]
    tasks = z["tasks"]
    names = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag",
             "winogrande": "WinoGrande", "boolq": "BoolQ", "openbookqa": "OBQA"}
    rows = []
    for r in z["rows"]:
        label = r["model"]
        for key, nice in SEARCH_NAMES.items():
            if label.startswith(key + " "):
                label = nice + label[len(key):]
        if "heldout_ppl" in r:
            label += f" (held-out {num(r['heldout_ppl'])})"
        without = statistics.mean(r[t] for t in tasks if t != "boolq")
        rows.append([label, *[f"{r[t]:.2f}" for t in tasks], f"**{r['average']:.2f}**", f"{without:.2f}"])
    return table(["model", *[names[t] for t in tasks], "average", "without BoolQ"], rows)


@generator("quality.zeroshot-settings")
def quality_zeroshot_settings() -> str:
    z = result("quality")["zeroshot"]
    return f"{z['limit']} seeded questions per task at {target(z['target'])}"


@generator("quality.spaces")
def quality_spaces() -> str:
    q = result("quality")
    if "heads+comp" not in searches(q):
        return "\n(no whole-head search in this run)\n"
    rows = [[target(r["target"]), num(r["search+comp"]), num(r["heads+comp"]), num(r["dims_vs_heads"], 3),
             num(r["search+comp_reformed"]), num(r["heads+comp_reformed"]), num(r["dims_vs_heads_reformed"], 3)]
            for r in q["rows"]]
    return table(["kept", "per dimension", "whole heads", "ratio", "per dimension, reformed", "whole heads, reformed",
                  "ratio, reformed"], rows)


# ---- the time budget ----------------------------------------------------------------------------------------
@generator("budget")
def budget() -> str:
    b = result("budget")
    cases = {"quiet": "a quiet machine", "busy": "one core kept busy by another program",
             "busy-cold": "one core busy, nothing cached (another seed)"}
    rows = [[cases.get(r["case"], r["case"]), f"{r['command_s']:.0f} s", f"{r['budget_s']:.0f} s",
             f"{r['over_budget_s']:+.0f} s", str(r["evaluated"]),
             ", ".join(f"{target(t)}: {n}" for t, n in r["candidates_per_target"].items())] for r in b["rows"]]
    return table(["machine", "whole command", "budget", "past the budget", "evaluated", "candidates per target"], rows)


@generator("budget.command")
def budget_command() -> str:
    b = result("budget")
    return f"`python -m explorer search --targets {b['targets']} --minutes {b['minutes']:g}`"


@generator("budget.worst")
def budget_worst() -> str:
    b = result("budget")
    return f"{max(r['command_s'] for r in b['rows']):.0f} s"


# ---- latency: predicted, measured, independent ----------------------------------------------------------------
@generator("latency")
def latency() -> str:
    d = result("latency")
    rows = [[r["id"], pct(r["fraction"], 1), f"{r['predicted_speedup']:.2f}x",
             f"{r['run_speedup']:.2f}x ({pct(r['run_spread'])})", f"{r['independent_speedup']:.2f}x",
             signed_pct(r["run_vs_independent"]), signed_pct(r["predicted_vs_run"]),
             signed_pct(r["predicted_vs_independent"])] for r in d["rows"]]
    return table(["id", "params", "predicted speed-up", "run's measured speed-up (spread)",
                  "independent speed-up (transformers `generate`)", "measured vs independent", "predicted vs measured",
                  "predicted vs independent"], rows)


@generator("latency.summary")
def latency_summary() -> str:
    d = result("latency")
    rows = d["rows"]
    med = lambda k: statistics.median(abs(r[k]) for r in rows)  # noqa: E731
    c = d["checks"]
    spear = "; ".join(f"{k.replace('_', ' ')} {num(v, 3)}" for k, v in c.items() if "spearman" in k)
    return (f"median |predicted vs measured| {pct(med('predicted_vs_run'), 1)}, median |predicted vs independent| "
            f"{pct(med('predicted_vs_independent'), 1)}, median |measured vs independent| "
            f"{pct(med('run_vs_independent'), 1)}" + (f"; {spear}" if spear else ""))


# ---- llama.cpp --------------------------------------------------------------------------------------------------
@generator("llamacpp")
def llamacpp() -> str:
    d = result("llamacpp")
    rows = [[r["model"], r["type"], f"{r['MB']:.1f}", num(r["ppl_transformers"]), num(r["ppl_llamacpp"]),
             "passed" if r["check_passed"] else "FAILED", f"{r['decode_tok_s']:.1f}", f"{r['speedup_vs_dense']:.2f}"]
            for r in d["rows"]]
    return table(["model", "type", "MB", "ppl transformers", "ppl llama.cpp", "check", "decode tok/s", "speed-up"], rows)


@generator("gemma3.llamacpp")
def gemma3_llamacpp() -> str:
    """Gemma 3 270M's GGUFs: llama.cpp's decode speed beside our transformers model's own."""
    d = result("llamacpp-gemma3")
    rows = [[r["model"], r["type"], f"{r['MB']:.1f}", num(r["ppl_transformers"]), num(r["ppl_llamacpp"]),
             "passed" if r["check_passed"] else "FAILED", f"{r['decode_tok_s']:.1f}", f"{r['speedup_vs_dense']:.2f}",
             f"{r['transformers_decode_tok_s']:.1f}", f"{r['transformers_speedup_vs_dense']:.2f}"]
            for r in d["rows"]]
    return table(["model", "type", "MB", "ppl transformers", "ppl llama.cpp", "check", "llama.cpp tok/s",
                  "llama.cpp speed-up", "transformers tok/s", "transformers speed-up"], rows)


@generator("llamacpp.settings")
def llamacpp_settings() -> str:
    d = result("llamacpp")
    return (f"{d['heldout_windows']} windows of {d['seq_len']} tokens; decode one token at a time after a "
            f"{d['prompt_len']}-token prompt, {d['threads']} threads")


# ---- the fitness objective ------------------------------------------------------------------------------------------
@generator("objective")
def objective() -> str:
    d = result("objective")
    rows = [[target(r["target"]), num(r["spearman_ppl"], 2), num(r["spearman_kl"], 2),
             num(r["spearman_heldout_unreformed"], 2)] for r in d["rows"]]
    m = d["mean"]
    rows.append(["mean", num(m["spearman_ppl"], 2), num(m["spearman_kl"], 2), num(m["spearman_heldout_unreformed"], 2)])
    return table(["kept", "perplexity", "KL to dense", "held-out perplexity, unreformed"], rows)


# ---- FLAP against the official code's figures --------------------------------------------------------------------
def _summary(d: dict, method: str, stat: str) -> dict:
    return next(r for r in d["summary"] if r["method"] == method and r["seed"] == stat)


def _median_range(d: dict, method: str, t: str) -> str:
    med, lo, hi = (_summary(d, method, s)[t] for s in ("median", "min", "max"))
    return f"{num(med)} ({num(lo)}-{num(hi)})"


@generator("flap.draws")
def flap_draws() -> str:
    ref, split, big = result("flap-reference-32"), result("flap-split"), result("flap-split-512")
    rows = []
    for t, official in ref["reference"].items():
        med = _summary(ref, "flap", "median")[t]
        rows.append([target(t), _median_range(ref, "flap", t), _median_range(split, "flap", t),
                     num(_summary(big, "flap", "median")[t]), num(official), signed_pct(med / official - 1)])
    n_ref, n_split = len({r["seed"] for r in ref["rows"]}), len({r["seed"] for r in split["rows"]})
    return table(["kept", f"reference recipe, {n_ref} draws", f"our split, {n_split} draws", "our split, 512 windows",
                  "official code", "reference recipe: median vs official"], rows)


@generator("flap.close-draws")
def flap_close_draws() -> str:
    ref = result("flap-reference-32")
    official = ref["reference"]
    rows = [["official code", *[num(v) for v in official.values()]]]
    for r in ref["rows"]:
        if r["method"] != "flap":
            continue
        gaps = {t: r[t] / v - 1 for t, v in official.items()}
        if all(abs(g) <= 0.10 for g in gaps.values()):
            rows.append([f"seed {r['seed']}", *[f"{num(r[t])} ({signed_pct(gaps[t])})" for t in official]])
    return table(["draw", *[target(t) for t in official]], rows)


@generator("flap.literal")
def flap_literal() -> str:
    d = result("flap-literal")
    ts = list(d["reference"])
    by_seed: dict = {}
    for r in d["rows"]:
        by_seed.setdefault(r["seed"], {})[r["method"]] = r
    rows = [[str(s), " / ".join(num(m["flap"][t]) for t in ts), " / ".join(num(m["flap-literal"][t]) for t in ts)]
            for s, m in by_seed.items() if "flap" in m and "flap-literal" in m]
    return table(["seed", "ours " + " / ".join(target(t) for t in ts), "literal " + " / ".join(target(t) for t in ts)],
                 rows)


@generator("flap.literal-gap")
def flap_literal_gap() -> str:
    gap = result("flap-literal")["literal_gap"]
    return " / ".join(pct(v, 2) for v in gap.values())


READINGS = {"flap-literal": "pooled variance, float32 (the official algorithm; ours)",
            "flap-literal:running-variance": "running variance as `BiasGPT.add_batch` writes it",
            "flap-literal:per-window-variance": "variance within each window, averaged",
            "flap-literal:float16": "statistics pass in float16 (the official code's dtype)",
            "flap-literal:bfloat16": "statistics pass in bfloat16",
            "flap-literal:skip-first-token": "each window's first token left out of the statistics",
            "flap-literal:unsquared-attention": "attention WIFV not squared",
            "flap-literal:group-sum": "a KV group scored by the sum of its heads' means",
            "flap-literal:group-max": "a KV group scored by the max of its heads' means"}


@generator("flap.readings")
def flap_readings() -> str:
    d = result("flap-readings")
    official = d["reference"]
    rows = []
    for method, label in READINGS.items():
        med = _summary(d, method, "median")
        rows.append([label, *[f"{num(med[t])} ({signed_pct(med[t] / v - 1)})" for t, v in official.items()]])
    rows.append(["official code", *[num(v) for v in official.values()]])
    return table(["reading of the literal FLAP", *[target(t) for t in official]], rows)


@generator("flap.uniform")
def flap_uniform() -> str:
    ref, split, big = result("flap-reference-32"), result("flap-split"), result("flap-split-512")
    ts = list(ref["reference"])
    med = lambda d: " / ".join(num(_summary(d, "flap-uniform", "median")[t]) for t in ts)  # noqa: E731
    return f"{med(ref)} on the reference recipe, {med(split)} on our split, {med(big)} with 512 windows"


# ---- the app on stage -------------------------------------------------------------------------------------------------
@generator("app")
def app() -> str:
    return _app_table("app")


@generator("gemma3.app")
def gemma3_app() -> str:
    return _app_table("app-gemma3")


def _app_table(name: str) -> str:
    d = result(name)
    steps = {"load_s": "Load (the model, its held-out perplexity and speed)", "start_to_dense_s": "Start -> dense point",
             "start_to_first_subnet_s": "Start -> first searched subnet on the plot",
             "budget_overrun_s": "a 1-minute budget: past it when the search ended",
             "stop_to_stopped_s": "Stop -> \"stopped\" (a search)", "click_to_card_s": "click on a front marker -> its card",
             "reform_s": "Reform the pick", "evaluate_s": "Evaluate it (held-out perplexity and PIQA)",
             "generate_s": "Generate, original and the reformed pick", "export_s": "Export and verify it",
             "slider_preview_s": "drag the size slider -> the library's subnet in the line under it",
             "slider_release_to_pick_s": "release it -> evaluated, stored and picked"}
    passes = list(d["passes"])
    names = {"quiet": "quiet machine", "busy": "one core kept busy"}
    rows = [[label, *[f"{d['passes'][p][k]:.1f}" for p in passes]] for k, label in steps.items()
            if all(k in d["passes"][p] for p in passes)]
    return table(["step (seconds)", *[names.get(p, p) for p in passes]], rows)


@generator("app.viewport")
def app_viewport() -> str:
    w, h = result("app")["viewport"]
    return f"{w}x{h}"


# ---- rendering -----------------------------------------------------------------------------------------------------------
def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in GENERATORS:
            raise SystemExit(f"unknown generated region {name!r}; known: {', '.join(sorted(GENERATORS))}")
        return f"<!-- gen:{name} -->{GENERATORS[name]()}<!-- /gen -->"

    return REGION.sub(fill, text)


def stale(files=FILES) -> list[str]:
    """The files whose generated regions differ from what their JSON says now."""
    return [f for f in files if render((ROOT / f).read_text()) != (ROOT / f).read_text()]


# ---- search: a better subnet per minute, over seeds ------------------------------------------------------
SPEED_NAMES = {"today": "search without the library", "library": "library search",
               "library+screen": "library search, screen on",
               "library-solution": "the library's subnet before evolution", "flap-uniform": "uniform FLAP",
               "flap": "FLAP"}


SEARCHED = ("today", "library", "library+screen")  # the models whose pick depends on the minutes searched


def _spread_cell(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{num(d['median'])} ({num(d['min'])}-{num(d['max'])})"


def _search_rows(kind: str) -> tuple[list[str], list[list[str]]]:
    d = result("search")
    summary = d["summary"]
    keys = [k for k in next(iter(summary.values()))]
    header = ["kept"] + [SPEED_NAMES.get(k.split("@")[0], k) + (f", {k.split('@')[1].replace('min', ' min')}"
                                                                  if "@" in k and k.split("@")[0] in SEARCHED else "")
                         for k in keys]
    rows = []
    for t, by in summary.items():
        cells = [by.get(k, {}).get(kind) for k in keys]
        if not any(cells):
            continue
        best = min((c["median"] for c in cells if c), default=None)
        rows.append([target(t)] + [("**" + _spread_cell(c) + "**") if c and c["median"] == best else _spread_cell(c)
                                   for c in cells])
    return header, rows


@generator("search.before")
def search_before() -> str:
    return table(*_search_rows("heldout"))


@generator("search.after")
def search_after() -> str:
    return table(*_search_rows("reformed"))


@generator("search.setup")
def search_setup() -> str:
    d = result("search")
    return (f"{len(d['seeds'])} seeds ({', '.join(str(s) for s in d['seeds'])}), "
            f"{' and '.join(f'{m:g}' for m in d['minutes_per_target'])} minute(s) per target, {_heldout(d)}")


def _heldout(d: dict) -> str:
    h = d["heldout"]
    return f"held-out perplexity on {h['windows']} x {h['seq_len']} tokens (dense {num(h['dense_ppl'])})"


@generator("search.timing")
def search_timing() -> str:
    d = result("search")
    rows = [[SPEED_NAMES.get(k.split("@")[0], k), f"{statistics.median(v):.1f} s ({min(v):.1f}-{max(v):.1f})"]
            for k, v in d["time_to_plot_s"].items()]
    lib = d["library_seconds"]
    rows.append(["measuring the library once (cached after)", f"{statistics.median(lib):.0f} s ({min(lib):.0f}-"
                 f"{max(lib):.0f})"])
    return table(["", "from Start until every target has a subnet on the plot (median, range over seeds)"], rows)


@generator("search.screen")
def search_screen() -> str:
    s = result("search")["screen"]
    return (f"Spearman {s['spearman_screen_vs_fitness']:.2f} with the full fitness, "
            f"{s['spearman_screen_vs_heldout']:.2f} with held-out perplexity (the full fitness: "
            f"{s['spearman_fitness_vs_heldout']:.2f}), over {s['candidates']} candidates")


def _picks(d: dict, model: str, minutes: float | None = None) -> dict[tuple[int, str], dict]:
    """(seed, target) -> that seed's pick of `model` (at `minutes` per target for a search)."""
    return {(rec["seed"], f"{p['target']:g}"): p for rec in d["records"] for p in rec["picks"]
            if p["model"] == model and (minutes is None or rec["minutes_per_target"] == minutes)}


@generator("search.findings")
def search_findings() -> str:
    d = result("search")
    m = d["minutes_per_target"][0]
    lib, today, uni = _picks(d, "library", m), _picks(d, "today", m), _picks(d, "flap-uniform")
    pairs = sorted(set(lib) & set(today))
    wins = [k for k in pairs if lib[k]["heldout_ppl"] < today[k]["heldout_ppl"]]
    losses = ", ".join(f"seed {k[0]} at {target(k[1])}: {num(lib[k]['heldout_ppl'])} against "
                       f"{num(today[k]['heldout_ppl'])}" for k in pairs if k not in wins)
    beat_uni = [k for k in pairs if k in uni and lib[k]["heldout_ppl"] < uni[k]["heldout_ppl"]]
    worst = {t: max(lib[k]["heldout_ppl"] for k in pairs if k[1] == t) for t in {k[1] for k in pairs}}
    uni_best = {t: min(uni[k]["heldout_ppl"] for k in uni if k[1] == t) for t in worst}
    worst_beats = [t for t in worst if worst[t] < uni_best[t]]
    at70 = sorted(lib[k]["heldout_ppl"] for k in pairs if k[1] == "0.7")
    return (f"With {m:g} minute(s) per target, the library search's pick is better than the search without the "
            f"library on {len(wins)} of {len(pairs)} (seed, size) pairs before reformation"
            + (f" (not on {losses})" if losses else "") + f"; it beats its own seed's uniform FLAP on "
            f"{len(beat_uni)} of {len(pairs)}, and its worst seed beats uniform FLAP's best seed at "
            f"{len(worst_beats)} of {len(worst)} sizes. At 70 % its picks score "
            f"{', '.join(num(x) for x in at70)} on the held-out windows")


@generator("search.spread")
def search_spread() -> str:
    """The spread over seeds (worst / best) of each model: the baselines and the library's own subnet
    move only with the data draw, the searches' picks with the data draw and the evolution."""
    d = result("search")
    m = d["minutes_per_target"][0]
    models = [(k, m) for k in ("library-solution", "library", "today")] + [(b, None) for b in ("flap-uniform", "flap")]
    rows = []
    for t in d["targets"]:
        cells = []
        for k, mm in models:
            vals = [p["heldout_ppl"] for (s, tt), p in _picks(d, k, mm).items() if tt == f"{t:g}"]
            cells.append(f"{max(vals) / min(vals):.2f}" if len(vals) > 1 else "-")
        rows.append([target(t)] + cells)
    return table(["kept"] + [SPEED_NAMES[k] for k, _ in models], rows)


@generator("search.library")
def search_library() -> str:
    """How the additive library ranks what the library search measured, median over seeds."""
    d = result("search")
    studies = [rec["library_study"] for rec in d["records"] if rec.get("library_study")]
    rows = []
    for t in d["targets"]:
        at = [s[f"{t:g}"] for s in studies if f"{t:g}" in s]
        if not at:
            continue
        rho = [a["spearman_predicted_vs_fitness"] for a in at if a["spearman_predicted_vs_fitness"] is not None]
        fac = [a["interaction_factor"] for a in at if a["interaction_factor"] is not None]
        sol = [a["solution_factor"] for a in at if a.get("solution_factor") is not None]
        rows.append([target(t), f"{statistics.median([a['candidates'] for a in at]):g}",
                     f"{statistics.median(rho):.2f} ({min(rho):.2f}-{max(rho):.2f})",
                     f"{statistics.median(fac):.2f} ({min(fac):.2f}-{max(fac):.2f})",
                     f"{statistics.median(sol):.2f} ({min(sol):.2f}-{max(sol):.2f})" if sol else "-"])
    return table(["kept", "subnets measured per seed", "Spearman: library's prediction vs measured fitness",
                  "measured damage / summed single-block damages", "the same for the knapsack's own subnet"], rows)


@generator("search.curve")
def search_curve() -> str:
    """One target searched alone for 1, 4 and 16 minutes: the pick's held-out perplexity against minutes."""
    d = result("search-curve")
    t = d["targets"][0]
    rows = []
    for m in d["minutes_per_target"]:
        cells = [f"{m:g}"]
        for name in ("today", "library"):
            recs = [r for r in d["records"] if r["search"] == name and r["minutes_per_target"] == m]
            picks = [p for r in recs for p in r["picks"] if p["model"] == name and p["target"] == t]
            if not picks:
                cells += ["-", "-", "-"]
                continue
            cells += [str(recs[0]["evaluated"]), num(picks[0]["heldout_ppl"]), num(picks[0]["reformed_heldout_ppl"])]
        rows.append(cells)
    return table(["minutes", "evaluations, without the library", "held-out", "reformed",
                  "evaluations, library search", "held-out", "reformed"], rows)


@generator("search.curve.setup")
def search_curve_setup() -> str:
    d = result("search-curve")
    return (f"{target(d['targets'][0])} of the parameters searched alone, seed "
            f"{', '.join(str(s) for s in d['seeds'])}, {_heldout(d)}")


@generator("search.alone.setup")
def search_alone_setup() -> str:
    d = result("search-70")
    return (f"{target(d['targets'][0])} of the parameters searched alone, {len(d['seeds'])} seeds "
            f"({', '.join(str(s) for s in d['seeds'])}), {d['minutes_per_target'][0]:g} minute, {_heldout(d)}")


def _reference() -> tuple[dict, dict]:
    """The 16-minute reference search's record and its pick (docs/results/search-70-reference.json)."""
    rec = result("search-70-reference")["records"][0]
    return rec, next(p for p in rec["picks"] if p["model"] == "today")


@generator("search.alone")
def search_alone() -> str:
    """One target searched alone for a minute on every seed, with the screen off and on, beside the
    library's own subnet and the baselines of the same seeds: every seed's held-out figure, then the
    median and range."""
    d = result("search-70")
    t = f"{d['targets'][0]:g}"
    rows = []
    for key, cell in d["summary"][t].items():
        name = key.split("@")[0]
        recs = [r for r in d["records"] if r["search"] == name]
        picks = sorted(((r["seed"], p) for r in d["records"] for p in r["picks"] if p["model"] == name),
                       key=lambda sp: sp[0])
        work = (f"{statistics.median(r['children'] for r in recs):g} "
                f"({statistics.median(r['children_stopped'] for r in recs):g})" if recs else "-")
        rows.append([SPEED_NAMES.get(name, name), work, ", ".join(num(p["heldout_ppl"]) for _, p in picks),
                     _spread_cell(cell["heldout"]), _spread_cell(cell["reformed"])])
    rec, pick = _reference()
    rows.append([f"reference: {SPEED_NAMES['today']}, {rec['minutes_per_target']:g} minutes, seed {rec['seed']}",
                 f"{rec['children']} ({rec['children_stopped']})", num(pick["heldout_ppl"]), "-",
                 num(pick["reformed_heldout_ppl"])])
    return table(["", "children bred (stopped early), median", "held-out, seeds in order", "held-out",
                  "reformed"], rows)


@generator("search.alone.reference")
def search_alone_reference() -> str:
    """How many seeds' one-minute library picks reach the reference pick, before and after reformation."""
    d, (ref, want) = result("search-70"), _reference()
    picks = [p for r in d["records"] for p in r["picks"] if p["model"] == "library"]
    before = sum(p["heldout_ppl"] <= want["heldout_ppl"] for p in picks)
    after = sum(p["reformed_heldout_ppl"] <= want["reformed_heldout_ppl"] for p in picks)
    return (f"the library search's one-minute pick is at least as good as the {ref['minutes_per_target']:g}-minute "
            f"reference on {before} of {len(picks)} seeds before reformation and on {after} of {len(picks)} after")


@generator("search.alone.screen")
def search_alone_screen() -> str:
    """What the screen changed: per seed, its pick against the same search's without it."""
    d = result("search-70")
    by = {(r["search"], r["seed"]): r for r in d["records"]}
    pick = lambda r: next(p for p in r["picks"] if p["model"] == r["search"])  # noqa: E731
    seeds = [s for s in d["seeds"] if ("library", s) in by and ("library+screen", s) in by]
    better = sum(pick(by["library+screen", s])["heldout_ppl"] < pick(by["library", s])["heldout_ppl"] for s in seeds)
    same = sum(pick(by["library+screen", s])["id"] == pick(by["library", s])["id"] for s in seeds)
    kids = [by["library+screen", s]["children"] - by["library", s]["children"] for s in seeds]
    stopped = [by["library+screen", s]["children_stopped"] for s in seeds]
    return (f"with the screen on, the pick was better on {better} of {len(seeds)} seeds and the very same subnet on "
            f"{same}; the screen stopped {min(stopped)}-{max(stopped)} children per seed early, and the number of "
            f"children bred in the same minute changed by {statistics.median(kids):+g} (median over seeds)")


@generator("search.alone.explored")
def search_alone_explored() -> str:
    """Per seed: the library search's pick against the best of what it measured, in held-out terms."""
    d, want = result("search-70"), _reference()[1]["heldout_ppl"]
    t = f"{d['targets'][0]:g}"
    rows = []
    for r in sorted((r for r in d["records"] if r.get("explored")), key=lambda r: (r["search"], r["seed"])):
        e = r["explored"][t]
        pick = next(p for p in r["picks"] if p["model"] == r["search"])
        rows.append([f"{r['seed']}", num(pick["heldout_ppl"]), num(e["best_heldout"]), f"{e['best_fitness_rank']}",
                     "-" if e["pick_heldout_rank"] is None else f"{e['pick_heldout_rank']}",
                     f"{e['spearman_fitness_vs_heldout']:.2f}", "yes" if e["best_heldout"] <= want else "no"])
    n = next(r["explored"][t]["scored"] for r in d["records"] if r.get("explored"))
    return table(["seed", "pick, held-out", f"best of its {n} best by fitness, held-out", "that one's fitness rank",
                  "the pick's held-out rank", "Spearman fitness vs held-out",
                  f"reference ({num(want)}) reached by anything measured"], rows)


@generator("search.alone.minutes")
def search_alone_minutes() -> str:
    """The library search's pick per seed at one minute and at four, against the reference."""
    want = _reference()[1]["heldout_ppl"]
    rows = []
    for d in (result("search-70"), result("search-70-4min")):
        recs = sorted((r for r in d["records"] if r["search"] == "library"), key=lambda r: r["seed"])
        picks = [next(p for p in r["picks"] if p["model"] == "library") for r in recs]
        held = [p["heldout_ppl"] for p in picks]
        rows.append([f"{d['minutes_per_target'][0]:g}", f"{statistics.median(r['evaluated'] for r in recs):g}",
                     ", ".join(num(h) for h in held), f"{num(statistics.median(held))} ({num(min(held))}-{num(max(held))})",
                     f"{sum(h <= want for h in held)} of {len(held)}"])
    return table(["minutes", "evaluations, median", "held-out, seeds in order", "held-out",
                  f"at least as good as the reference ({num(want)})"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only list the files whose figures differ from the JSON")
    args = p.parse_args(argv)
    out = stale()
    if args.check:
        for f in out:
            print(f"{f}: its figures differ from docs/results (run python bench/docs.py)")
        return 1 if out else 0
    for f in out:
        (ROOT / f).write_text(render((ROOT / f).read_text()))
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
