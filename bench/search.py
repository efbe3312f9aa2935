"""A better subnet per minute, whatever the seed: today's search (no library) against the library
search (its knapsack solution first, then evolution seeded by it) at the same minutes per target,
over several seeds, each pick scored on the same held-out windows before and (with --reform)
after reformation, beside the uniform and FLAP baselines of the same calibration pass.

Per seed the calibration pass, the baselines and the library are built first (`search.prepare`,
timed: the library's own measuring time is reported), so both searches spend their minutes
searching. Also per search: the seconds from Start until every target has a subnet on the plot.
With --screen-sample N, N of the library search's complete candidates are scored on the first
fitness window alone (the staged evaluation's screen), and the Spearman rank correlation of that
screen with their full fitness and with held-out perplexity is reported.

The seed draws the calibration, fitness and selection windows, so the spread over seeds is the
spread a user meets; the held-out windows are the same for every model.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import add_common_arguments, format_table, machine, main, spearman, write_json
from explorer.app.inputs import parse_override
from explorer.calibrate.data import calibration_windows, heldout_windows, load_corpus
from explorer.events import CandidateEvaluated, SearchFailed, SearchFinished, StageProgress
from explorer.model.loading import load_model
from explorer.model.perplexity import perplexity
from explorer.model.slicing import candidate_model
from explorer.pick.reform import ReformSettings, reform
from explorer.search.fitness import FitnessEvaluator
from explorer.search.library import Library
from explorer.search.run import prepare, run_search
from explorer.search.runs import open_run
from explorer.settings import SearchSettings

# today's search; the library search; the library search with the staged evaluation's screen on (a child's
# first fitness window first, the rest only if it could still enter the elite)
SEARCHES = {"today": {"library": False}, "library": {"library": True},
            "library+screen": {"library": True, "screen_windows": 1}}
BASELINES = ("flap-uniform", "flap")


def one_search(lm, settings: SearchSettings, folder: Path, log) -> dict:
    """Run a search; when each target first had a subnet (seconds from Start) and the summary."""
    t0 = time.perf_counter()
    first: dict[float, float] = {}
    summary = None
    for ev in run_search(lm, settings, folder):
        if isinstance(ev, CandidateEvaluated) and ev.candidate.origin != "dense":
            first.setdefault(ev.candidate.target, time.perf_counter() - t0)
        elif isinstance(ev, StageProgress) and ev.stage in ("library", "budget") and ev.done == ev.total:
            log(f"    {ev.message}")
        elif isinstance(ev, SearchFailed):
            raise RuntimeError(ev.message)
        elif isinstance(ev, SearchFinished):
            summary = ev.summary
    return {"first_subnet_s": {str(t): round(s, 2) for t, s in first.items()},
            "all_targets_s": round(max(first.values()), 2) if first else None,
            "evaluated": summary["evaluated"], "wall_s": summary["wall_seconds"]}


def screen_study(lm, run, settings: SearchSettings, corpus, held, n: int, log) -> dict:
    """Rank correlation of the first fitness window's NLL with the full fitness and held-out ppl."""
    cands = [c for c in run.candidates() if c.origin in ("search", "init") and not c.metrics.get("fitness_lower_bound")
             and "copied_from" not in c.metrics]
    pick = random.Random(0).sample(cands, min(n, len(cands)))
    fit = calibration_windows(lm.tokenizer, corpus, settings.fitness_windows, settings.fitness_seq_len,
                              seed=settings.seed + 1)
    means = run.channel_means()
    fe = FitnessEvaluator(lm.model, lm.shape, fit[:1], means=means)
    screen = [fe.evaluate(c.subnet, compensated=c.compensated).nll for c in pick]
    full = [c.metrics["fitness_nll"] for c in pick]
    ts = time.perf_counter()
    heldout = [perplexity(candidate_model(lm.model, c, means), held) for c in pick]
    log(f"  screen study: {len(pick)} candidates, held-out scored in {time.perf_counter() - ts:.0f} s")
    return {"candidates": len(pick), "spearman_screen_vs_fitness": spearman(screen, full),
            "spearman_screen_vs_heldout": spearman(screen, heldout),
            "spearman_fitness_vs_heldout": spearman(full, heldout)}


def solution_of(run, target: float):
    """The library's first subnet at `target` (the plain knapsack solution, before its variants and
    evolution), or None where the search had no library."""
    firsts = [c for c in run.candidates() if c.origin == "init" and c.metrics.get("init_scoring") == "library"
              and abs(c.target - target) < 1e-9]
    return min(firsts, key=lambda c: c.id) if firsts else None


def library_study(lm, run, folder: Path, targets) -> dict | None:
    """How well the additive library ranks the subnets a search actually measured, per target:
    Spearman of predicted against measured fitness, and the interaction factor (measured excess NLL
    over dense divided by the summed single-block damages; 1 would mean the damages add up)."""
    if not (folder / "library.json").is_file():
        return None
    lib = Library.load(folder / "library.json")
    cands = [c for c in run.candidates() if not c.metrics.get("fitness_lower_bound") and c.fitness]
    dense = next(c.fitness for c in cands if c.origin == "dense")
    out = {}
    for t in targets:
        at = [c for c in cands if abs(c.target - t) < 1e-9 and c.origin in ("search", "init")
              and "copied_from" not in c.metrics]
        damage = [lib.damage(c.subnet, lm.shape) for c in at]
        excess = [math.log(c.fitness / dense) for c in at]
        factors = [e / d for e, d in zip(excess, damage) if 0 < d < math.inf]
        sol = solution_of(run, t)
        out[f"{t:g}"] = {"candidates": len(at), "spearman_predicted_vs_fitness": spearman(damage, excess),
                         "interaction_factor": statistics.median(factors) if factors else None,
                         "solution_factor": math.log(sol.fitness / dense) / lib.damage(sol.subnet, lm.shape)
                         if sol else None}
    return out


def explored_study(lm, run, folder: Path, targets, held, n: int, log) -> dict:
    """What the search measured, in held-out terms: its best `n` candidates by fitness per target
    (initial subnets, seeded baselines and children alike) scored on the held-out windows. Tells apart
    a pick that missed a better subnet the search had found (the selection's limit) from a search that
    never found one (the exploration's). Scores are kept in the search's folder (explored.json)."""
    kept = folder / "explored.json"
    scores = json.loads(kept.read_text()) if kept.is_file() else {}
    means = run.channel_means()
    cands = [c for c in run.candidates() if c.origin != "dense" and c.fitness and "copied_from" not in c.metrics
             and not c.metrics.get("fitness_lower_bound")]
    out = {}
    for t in targets:
        at = sorted((c for c in cands if abs(c.target - t) < 1e-9), key=lambda c: (c.fitness, c.id))[:n]
        for c in at:
            if c.id not in scores:
                scores[c.id] = perplexity(candidate_model(lm.model, c, means), held)
                kept.write_text(json.dumps(scores))
        pick = run.pick(f"best@{t:g}").id
        best = min(at, key=lambda c: scores[c.id])
        held_rank = [c.id for c in sorted(at, key=lambda c: scores[c.id])]
        out[f"{t:g}"] = {"scored": len(at), "best_id": best.id, "best_heldout": scores[best.id],
                         "best_fitness_rank": at.index(best) + 1,
                         "pick_heldout_rank": held_rank.index(pick) + 1 if pick in held_rank else None,
                         "spearman_fitness_vs_heldout": spearman([c.fitness for c in at], [scores[c.id] for c in at])}
        log(f"    explored @ {t:g}: the best of its {len(at)} best by fitness scores {scores[best.id]:.2f} held-out "
            f"(fitness rank {at.index(best) + 1})")
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def run(args) -> dict:
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    lm = load_model(args.model, args.dtype, args.device)
    targets = tuple(float(t) for t in args.targets.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    minutes = [float(m) for m in args.minutes.split(",")]
    searches = [n.strip() for n in args.searches.split(",")]
    reform_at = [float(x) for x in args.reform_at.split(",")] if args.reform_at else []
    overrides = dict(parse_override(x) for x in args.set)
    corpus = load_corpus(args.corpus)
    held = heldout_windows(lm.tokenizer, corpus, args.heldout_windows, args.seq_len)
    dense = perplexity(lm.model, held)
    log(f"dense held-out ppl {dense:.2f} on {held.shape[0]} x {held.shape[1]} tokens")
    root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="search-bench-"))
    records = []
    screen = None
    for seed in seeds:
        base = SearchSettings.preset("demo", **{"targets": targets, "seed": seed, "corpus": args.corpus,
                                                "latency": False, "generations": 1000, **overrides})
        ts = time.perf_counter()
        needs_library = any(SEARCHES[n]["library"] for n in searches)
        ready = root / f"seed{seed}" / "prepared" / ("library.json" if needs_library else "calibration.json")
        if not ready.is_file():
            shutil.rmtree(root / f"seed{seed}" / "prepared", ignore_errors=True)  # an interrupted preparation
            for _ in prepare(lm, SearchSettings.from_dict({**base.to_dict(), "library": needs_library}),
                             root / f"seed{seed}" / "prepared"):
                pass
        lib = Library.load(root / f"seed{seed}" / "prepared" / "library.json") if needs_library else None
        log(f"seed {seed}: calibration, baselines" + (" and library" if lib else "") + " ready in "
            f"{time.perf_counter() - ts:.0f} s" + (f" (library measured in {lib.seconds:.0f} s on {lib.tokens} tokens)"
                                                  if lib else ""))
        cal = calibration_windows(lm.tokenizer, corpus, base.calib_windows, base.calib_seq_len, seed=seed)
        rs = ReformSettings(windows=int(cal.shape[0]), seq_len=int(cal.shape[1]), corpus=args.corpus)
        baselines_done = False
        for per_target in minutes:
            for name in searches:
                settings = SearchSettings.from_dict({**base.to_dict(), **SEARCHES[name],
                                                     "minutes": per_target * len(targets)})
                folder = root / f"seed{seed}" / f"{name}-{per_target:g}min"
                done = folder / "bench.json"
                if done.is_file():  # an interrupted benchmark's finished search, read back
                    info = json.loads(done.read_text())
                    log(f"seed {seed}: {name}, {per_target:g} min per target: read back from {folder}")
                elif args.only_done:
                    log(f"seed {seed}: {name}, {per_target:g} min per target: not run (--only-done)")
                    continue
                else:
                    log(f"seed {seed}: {name}, {per_target:g} min per target")
                    info = one_search(lm, settings, folder, log)
                    done.write_text(json.dumps(info))
                r = open_run(folder)
                means = r.channel_means()
                scored = folder / "scores.json"  # an interrupted benchmark's held-out scores, read back
                known = {(x["model"], x["target"]): x for x in json.loads(scored.read_text())} if scored.is_file() else {}
                rows = []
                picks = [(f"best@{t:g}", name, t) for t in targets]
                if name == searches[-1] and name.startswith("library") and per_target == minutes[0]:
                    # the knapsack's own subnet, before evolution (the same in every library search)
                    picks += [(solution_of(r, t), "library-solution", t) for t in targets]
                if not baselines_done:
                    picks += [(f"baseline:{b}@{t:g}", b, t) for b in BASELINES for t in targets]
                for pick, label, t in picks:
                    if (label, t) in known:
                        rows.append(known[(label, t)])
                        continue
                    try:
                        c = r.pick(pick) if isinstance(pick, str) else pick
                    except Exception as e:  # noqa: BLE001 - a baseline the budget left out
                        log(f"    {pick}: {e}")
                        continue
                    if c is None:
                        continue
                    before = perplexity(candidate_model(lm.model, c, means), held)
                    after = None
                    if args.reform and (not reform_at or any(abs(t - x) < 1e-9 for x in reform_at)):
                        after = perplexity(reform(lm, c.subnet, rs, calib_windows=cal,
                                                  means=means if c.compensated else None).model, held)
                    rows.append({"model": label, "target": t, "id": c.id, "heldout_ppl": before,
                                 "reformed_heldout_ppl": after, "fitness_ppl": c.fitness,
                                 "selection_ppl": c.metrics.get("selection_ppl"),
                                 "library_ppl": c.metrics.get("library_ppl")})
                    log(f"    {label} @ {t:g}: held-out {before:.2f}" + (f", reformed {after:.2f}" if after else ""))
                    scored.write_text(json.dumps(rows))
                baselines_done = True
                searched = [c for c in r.candidates() if c.origin == "search"]
                info["children"] = len(searched)  # children bred; those stopped early (bound or screen) are cheaper
                info["children_stopped"] = sum(bool(c.metrics.get("fitness_lower_bound")) for c in searched)
                records.append({"seed": seed, "search": name, "minutes_per_target": per_target, **info,
                                "library_seconds": lib.seconds if lib else None, "picks": rows,
                                "library_study": library_study(lm, r, folder, targets)})
                if args.explored and name in args.explored_in.split(","):
                    records[-1]["explored"] = explored_study(lm, r, folder, targets, held, args.explored, log)
                log(f"    every target had a subnet after {info['all_targets_s']} s; {info['evaluated']} evaluations")
                if args.screen_sample and name.startswith("library") and screen is None:
                    kept = root / "screen.json"
                    screen = json.loads(kept.read_text()) if kept.is_file() else \
                        screen_study(lm, r, settings, corpus, held, args.screen_sample, log)
                    kept.write_text(json.dumps(screen))
    table, summary = [], {}
    shown = searches + (["library-solution"] if any(n.startswith("library") for n in searches) else [])
    labels = [(n, m) for m in minutes for n in shown] + [(b, None) for b in BASELINES]
    for t in targets:
        for label, m in labels:
            vals = [p for rec in records for p in rec["picks"]
                    if p["model"] == label and p["target"] == t and (m is None or rec["minutes_per_target"] == m)]
            if not vals:
                continue
            key = f"{label}" + (f"@{m:g}min" if m is not None else "")
            before = spread([v["heldout_ppl"] for v in vals])
            reformed = [v["reformed_heldout_ppl"] for v in vals if v["reformed_heldout_ppl"] is not None]
            after = spread(reformed) if reformed else None
            summary.setdefault(str(t), {})[key] = {"heldout": before, "reformed": after}
            table.append({"target": t, "model": key, "seeds": len(vals),
                          "held-out median": before["median"], "range": f"{before['min']:.4g}-{before['max']:.4g}",
                          "reformed median": after["median"] if after else None,
                          "reformed range": f"{after['min']:.4g}-{after['max']:.4g}" if after else ""})
    cols = list(table[0]) if table else []
    print(format_table(table, cols))
    timing = {f"{rec['search']}@{rec['minutes_per_target']:g}min": [] for rec in records}
    for rec in records:
        timing[f"{rec['search']}@{rec['minutes_per_target']:g}min"].append(rec["all_targets_s"])
    for k, v in timing.items():
        print(f"{k}: every target on the plot after {statistics.median(v):.1f} s (median; range "
              f"{min(v):.1f}-{max(v):.1f})")
    if screen:
        print(f"screen (first window) vs full fitness: Spearman {screen['spearman_screen_vs_fitness']:.3f}; "
              f"vs held-out {screen['spearman_screen_vs_heldout']:.3f}; full fitness vs held-out "
              f"{screen['spearman_fitness_vs_heldout']:.3f}")
    result = {"machine": machine(), "model": lm.name, "targets": targets, "seeds": seeds, "minutes_per_target": minutes,
              "heldout": {"windows": int(held.shape[0]), "seq_len": int(held.shape[1]), "dense_ppl": dense},
              "records": records, "summary": summary, "time_to_plot_s": timing, "screen": screen,
              "library_seconds": sorted({rec["library_seconds"] for rec in records if rec["library_seconds"]}),
              "wall_seconds": round(time.perf_counter() - t0, 1), "reformed": bool(args.reform)}
    print(f"wrote {write_json(args.out, result)}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, heldout_windows=16)
    p.add_argument("--targets", default="0.8,0.7,0.6,0.5")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--minutes", default="1", help="minutes per target, comma-separated (each a search)")
    p.add_argument("--searches", default="today,library", help=f"of {', '.join(SEARCHES)}")
    p.add_argument("--reform", action="store_true", help="also score the picks after reformation")
    p.add_argument("--reform-at", default="", help="only at these targets (comma-separated; default: every one)")
    p.add_argument("--screen-sample", type=int, default=0)
    p.add_argument("--explored", type=int, default=0, metavar="N",
                   help="also score each search's N best candidates by fitness on the held-out windows")
    p.add_argument("--explored-in", default="library", help="the searches that --explored studies (comma-separated)")
    p.add_argument("--set", action="append", default=[], help="search setting overrides, KEY=VALUE")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--only-done", action="store_true",
                   help="tabulate the searches already finished in --run-dir, run none")
    p.add_argument("--out", default="docs/results/search.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__.splitlines()[0])
