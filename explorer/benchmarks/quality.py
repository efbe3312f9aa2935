"""Search vs baselines vs dense: held-out perplexity at several sizes, search cost, and fitness
evaluations per second against the naive way (dense model with masks, every window), in one run.

The search runs once over all targets (same code path as `python -m explorer search`); its best
candidate per target (lowest fitness) is scored on held-out windows beside the magnitude,
Wanda-sp and FLAP baselines picked at the same targets from the same calibration pass.
"""
from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from ..baselines import BASELINES, BaselineResult, baseline_subnet, slice_with_biases
from ..data import calibration_windows, heldout_windows, load_corpus
from ..fitness import MaskedEvaluator
from ..importance import Importance
from ..loading import load_model
from ..perplexity import perplexity
from ..runs import open_run
from ..search import SearchFinished, SearchSettings, run_search
from ..slicing import slice_model
from . import add_common_arguments, format_table, machine, write_json


def _search(lm, settings, run_dir, log) -> dict:
    summary = None
    for ev in run_search(lm, settings, run_dir):
        name = type(ev).__name__
        if name == "GenerationFinished":
            log(f"  target {ev.target:.0%} gen {ev.generation}/{ev.generations}: best ppl {ev.best_fitness:.4g}, "
                f"{ev.evals_per_s:.2f} evals/s")
        elif name in ("SearchFailed", "SearchCancelled"):
            raise RuntimeError(f"search ended: {ev}")
        elif isinstance(ev, SearchFinished):
            summary = ev.summary
    return summary


def _spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation: Pearson's on the ranks (no ties expected among perplexities)."""
    if len(a) < 2:
        return math.nan
    ranks = torch.tensor([a, b], dtype=torch.float64).argsort(1).argsort(1).double()
    return float(torch.corrcoef(ranks)[0, 1])


def naive_rate(lm, run, settings, samples: int, seed: int = 0) -> dict:
    """The naive path on a sample of the search's own candidates, two ways, in this one run.

    `full`: the issue's naive approach, the dense model with masks (the model's own dtype) on the
    full calibration set (the importance windows). `same`: the dense model with masks on exactly
    the fitness windows, which isolates the engineering savings (slicing, caches, bf16, batching)
    from the saving of scoring on a few windows. The rank correlation between our fitness and
    the full-set perplexity says whether those few windows still rank candidates faithfully."""
    cands = [c for c in run.candidates() if c.origin in ("search", "init") and "copied_from" not in c.metrics
             and not c.metrics.get("fitness_lower_bound")]
    pick = random.Random(seed).sample(cands, min(samples, len(cands)))
    corpus = load_corpus(settings.corpus)
    fit = calibration_windows(lm.tokenizer, corpus, settings.fitness_windows, settings.fitness_seq_len,
                              seed=settings.seed + 1)
    calib = calibration_windows(lm.tokenizer, corpus, settings.calib_windows, settings.calib_seq_len,
                                seed=settings.seed)
    out = {"evaluations": len(pick)}
    ppl_full = []
    naive = MaskedEvaluator(lm.model, lm.shape, fit, batch_size=8)  # one masked copy for both sets
    for name, windows in (("same", fit), ("full", calib)):
        naive.evaluate(pick[0].subnet, windows)  # warm-up
        t0 = time.perf_counter()
        ppls = [naive.evaluate(c.subnet, windows) for c in pick]
        secs = time.perf_counter() - t0
        out[name] = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "seconds": secs,
                     "evals_per_s": len(pick) / secs}
        if name == "same":  # ours vs the same windows in the model's dtype: the cost of bf16 fitness
            out[name]["max_rel_diff_vs_ours"] = max(abs(p / c.metrics["fitness_ppl"] - 1) for p, c in zip(ppls, pick))
        else:
            ppl_full = ppls
    out["spearman_fitness_vs_full"] = _spearman([c.metrics["fitness_ppl"] for c in pick], ppl_full)
    out["candidates"] = [{"id": c.id, "fitness_ppl": c.metrics["fitness_ppl"], "full_calibration_ppl": p}
                         for c, p in zip(pick, ppl_full)]
    return out


def run(args) -> dict:
    t0 = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    lm = load_model(args.model, args.dtype, args.device)
    targets = tuple(float(t) for t in args.targets.split(","))
    from ..cli_search import _override

    overrides = dict(_override(x) for x in args.set)
    settings = SearchSettings.preset(args.preset, **{"targets": targets, "seed": args.seed, "corpus": args.corpus,
                                                     "latency": args.latency, **overrides})
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="quality-run-"))
    log(f"search: {args.preset} preset, targets {targets}, run {run_dir}")
    ts = time.perf_counter()
    summary = _search(lm, settings, run_dir, log)
    search_seconds = time.perf_counter() - ts
    run_obj = open_run(run_dir)
    log("naive evaluation rate ...")
    naive = naive_rate(lm, run_obj, settings, args.naive_samples, args.seed)
    own = [c for c in run_obj.candidates() if c.origin in ("search", "init") and "copied_from" not in c.metrics]
    ours_rate = len(own) / sum(c.metrics["eval_seconds"] for c in own)  # the search's own candidates
    corpus = load_corpus(args.corpus)
    held = heldout_windows(lm.tokenizer, corpus, args.heldout_windows, args.seq_len)
    imp = Importance.load(run_dir / "importance.pt")
    log(f"held-out perplexity on {held.shape[0]} x {held.shape[1]} tokens ...")
    dense_ppl = perplexity(lm.model, held)
    rows = []
    for t in targets:
        best = run_obj.pick(summary["best"][str(t)]["id"])  # what this search visited (not older stored runs)
        row = {"target": t, "search_fraction": best.metrics["fraction"], "search_id": best.id,
               "search_fitness": best.fitness, "search": perplexity(slice_model(lm.model, best.subnet, lm.shape), held)}
        for name in BASELINES:
            res: BaselineResult = baseline_subnet(name, lm.model, imp, lm.shape, t, settings.multiple,
                                                  settings.head_multiple)
            row[name] = perplexity(slice_with_biases(lm.model, res, lm.shape), held)
            row[f"{name}_fraction"] = res.subnet.fraction(lm.shape)
        row["best_baseline"] = min(row[n] for n in BASELINES)
        row["ratio"] = row["search"] / row["best_baseline"]
        row["beats_all"] = all(row["search"] < row[n] for n in BASELINES)
        row["dense"] = dense_ppl
        rows.append(row)
        log(f"  {t:.0%}: search {row['search']:.4g} vs best baseline {row['best_baseline']:.4g} "
            f"(ratio {row['ratio']:.3f})")
    cols = ["target", "search_fraction", "search", "magnitude", "wanda-sp", "flap", "best_baseline", "ratio", "dense"]
    print(format_table(rows, cols))
    speed = {"search_wall_seconds": search_seconds, "evaluated": summary["evaluated"],
             "all_evals_per_s": summary["evals_per_s"], "ours_evals_per_s": ours_rate,
             "naive_evals_per_s": naive["full"]["evals_per_s"],
             "speedup_vs_naive": ours_rate / naive["full"]["evals_per_s"],
             "naive_same_windows_evals_per_s": naive["same"]["evals_per_s"],
             "speedup_same_windows": ours_rate / naive["same"]["evals_per_s"],
             "spearman_fitness_vs_full": naive["spearman_fitness_vs_full"],
             "fitness_dtype": run_obj.settings.get("fitness_dtype"), "fitness_stats": summary["fitness"], "naive": naive}
    print(format_table([speed], ["search_wall_seconds", "evaluated", "ours_evals_per_s", "naive_evals_per_s",
                                 "speedup_vs_naive", "naive_same_windows_evals_per_s", "speedup_same_windows",
                                 "spearman_fitness_vs_full"]))
    targets_ok = all(r["beats_all"] for r in rows) and all(r["ratio"] <= 0.85 for r in rows if r["target"] <= 0.7)
    result = {"benchmark": "quality", "model": lm.summary(), "corpus": corpus.description,
              "heldout_windows": int(held.shape[0]), "seq_len": args.seq_len, "settings": settings.to_dict(),
              "rows": rows, "speed": speed, "targets_met": targets_ok, "run_dir": str(run_dir),
              "search_summary": summary, "machine": machine(), "seconds": time.perf_counter() - t0}
    print(f"targets met: {targets_ok}")
    print(f"wrote {write_json(args.out, result)}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, heldout_windows=16)
    p.add_argument("--targets", default="0.8,0.7,0.6,0.5")
    p.add_argument("--preset", default="demo", choices=["demo", "paper"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency", action="store_true", help="also fit the latency model and measure the front")
    p.add_argument("--naive-samples", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a search setting")
    p.add_argument("--run-dir", default=None, help="where the search's run goes (default: a temporary folder)")
    p.add_argument("--out", default="bench/results/quality.json")
