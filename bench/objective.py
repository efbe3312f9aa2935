"""Which fitness objective ranks subnets like what the user gets: perplexity or KL to the dense model.

The search ranks the candidates of one target by their fitness on a few calibration windows; what
the user downloads is the pick after reformation, scored on held-out text. So a fitness objective
is as good as its rank correlation, within a target, with held-out perplexity after reformation.
For a sample of one run's own candidates per target (spread over the fitness ranking), in one run:

- `ppl`: the search's fitness, perplexity on the fitness windows (recomputed, and compared with the
  stored value);
- `kl`: the mean KL divergence from the dense model's next-token distribution to the subnet's on
  the same windows (the distillation view: how far the subnet is from what it replaces, not from
  the text);
- `heldout`: held-out perplexity of the sliced subnet before reformation (for reference: what the
  unreformed ranking would reach with far more data);

then every sampled candidate is reformed (closed form with intercept, the quality benchmark's
settings) and scored on held-out windows; Spearman of each objective with that, per target.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import add_common_arguments, format_table, machine, main, spearman, write_json
from explorer.calibrate.data import calibration_windows, heldout_windows, load_corpus
from explorer.model.loading import load_model
from explorer.model.perplexity import perplexity
from explorer.model.slicing import candidate_model
from explorer.pick.reform import ReformSettings, reform
from explorer.search.runs import open_run
from explorer.settings import SearchSettings


@torch.no_grad()
def log_probs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities per window, [T-1, V] in fp32 (kept on the CPU)."""
    return [F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1].float(), -1) for w in windows]


@torch.no_grad()
def objectives(model, windows: torch.Tensor, dense: list[torch.Tensor]) -> tuple[float, float]:
    """(perplexity, mean KL(dense || model) per token) on `windows`."""
    nll, kl, n = 0.0, 0.0, 0
    for w, p in zip(windows, dense):
        q = F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1].float(), -1)
        nll += float(F.nll_loss(q, w[1:], reduction="sum"))
        kl += float((p.exp() * (p - q)).sum())
        n += q.shape[0]
    return math.exp(nll / n), kl / n


def sample(cands: list, k: int, rng: random.Random) -> list:
    """k candidates spread evenly over the fitness ranking (best, worst and between), so the
    correlation is measured over the range the search actually ranks."""
    cands = sorted(cands, key=lambda c: c.fitness)
    if len(cands) <= k:
        return cands
    idx = sorted({round(i * (len(cands) - 1) / (k - 1)) for i in range(k)})
    return [cands[i] for i in idx]


def run(args) -> dict:
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    lm = load_model(args.model, args.dtype, args.device)
    run_ = open_run(args.run)
    s = SearchSettings.from_dict(run_.settings)
    if s.fitness_mode != "paper":
        raise SystemExit("the run must rank by the sliced subnet's fitness (fitness_mode=paper)")
    corpus = load_corpus(s.corpus)
    fit = calibration_windows(lm.tokenizer, corpus, s.fitness_windows, s.fitness_seq_len, seed=s.seed + 1)
    cal = calibration_windows(lm.tokenizer, corpus, s.calib_windows, s.calib_seq_len, seed=s.seed)
    held = heldout_windows(lm.tokenizer, corpus, args.heldout_windows, args.seq_len)
    means = run_.channel_means()
    rs = ReformSettings(windows=int(cal.shape[0]), seq_len=int(cal.shape[1]), damp=args.damp, corpus=s.corpus)
    dense = log_probs(lm.model, fit)
    dense_ppl = perplexity(lm.model, held)
    log(f"dense held-out ppl {dense_ppl:.2f}; fitness windows {tuple(fit.shape)}")
    targets = sorted({c.target for c in run_.candidates() if c.origin not in ("dense", "upload")}, reverse=True)
    rows, points = [], []
    for t in targets:
        pool = [c for c in run_.candidates() if c.target == t and c.origin in ("search", "init")
                and "copied_from" not in c.metrics and math.isfinite(c.fitness)]
        picked = sample(pool, args.per_target, random.Random(args.seed))
        measured = []
        for c in picked:
            m = candidate_model(lm.model, c, means)
            ppl, kl = objectives(m, fit, dense)
            before = perplexity(m, held)
            after = perplexity(reform(lm, c.subnet, rs, calib_windows=cal, means=means if c.compensated else None).model,
                               held)
            p = {"target": t, "id": c.id, "fitness_stored": c.fitness, "ppl": ppl, "kl": kl, "heldout": before,
                 "heldout_reformed": after}
            measured.append(p)
            log(f"  {t:.0%} {c.id}: fitness ppl {ppl:.4g} (stored {c.fitness:.4g}), KL {kl:.4f}, held-out "
                f"{before:.4g} -> {after:.4g} reformed")
        points += measured
        after = [p["heldout_reformed"] for p in measured]
        rows.append({"target": t, "candidates": len(measured),
                     "spearman_ppl": spearman([p["ppl"] for p in measured], after),
                     "spearman_kl": spearman([p["kl"] for p in measured], after),
                     "spearman_heldout_unreformed": spearman([p["heldout"] for p in measured], after),
                     "best_by_ppl": min(measured, key=lambda p: p["ppl"])["heldout_reformed"],
                     "best_by_kl": min(measured, key=lambda p: p["kl"])["heldout_reformed"],
                     "best_reformed": min(after),
                     "max_rel_diff_stored": max(abs(p["ppl"] / p["fitness_stored"] - 1) for p in measured)})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("spearman_ppl", "spearman_kl",
                                                            "spearman_heldout_unreformed")}
    print("rank correlation with held-out perplexity after reformation, within each target:")
    print(format_table(rows, ["target", "candidates", "spearman_ppl", "spearman_kl", "spearman_heldout_unreformed",
                              "best_by_ppl", "best_by_kl", "best_reformed"]))
    print("mean over targets:", ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    result = {"benchmark": "objective", "model": lm.summary(), "run": str(args.run), "corpus": corpus.description,
              "fitness_windows": list(fit.shape), "heldout_windows": int(held.shape[0]), "seq_len": args.seq_len,
              "reform_settings": rs.to_dict(), "dense_heldout_ppl": dense_ppl, "rows": rows, "mean": mean,
              "points": points, "machine": machine(), "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, result)}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, heldout_windows=16)
    p.add_argument("--run", required=True, help="a search run (paper fitness) whose candidates are ranked")
    p.add_argument("--per-target", type=int, default=10, help="candidates per target, spread over the ranking")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damp", type=float, default=ReformSettings().damp, help="reformation ridge")
    p.add_argument("--out", default="docs/results/objective.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
