"""Honest latency, checked against an independent clock: a demo run's front members from 90 % to
50 % of the parameters, their predicted decode latency (the run's latency model) and their
measured one (the run's own paired timing, `latency_model.measure`), beside an independent
timing of the same subnets exported, reloaded with plain transformers and decoded with
transformers' own `generate`, interleaved with the base model loaded the same way, in one run.

Speed-ups are over the dense model. The independent one is the median over rounds of
dense time / subnet time of the same round, where a model's decode time per token is
(generate(1 + N tokens) - generate(1 token)) / N: prefill cancels, transformers' generation loop
and our exported modeling file do the work.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import add_model_arguments, format_table, machine, main, spearman, write_json
from explorer.model.loading import load_model
from explorer.model.slicing import candidate_model
from explorer.pick.export import export_subnet
from explorer.search.run import run_search
from explorer.search.runs import open_run
from explorer.settings import SearchSettings


def independent_timing(models: dict, vocab: int, new_tokens: int, rounds: int, prompt_len: int = 32) -> dict:
    """Per model: per-round decode ms/token by transformers' `generate`, all models interleaved."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    mask = torch.ones_like(prompt)

    def gen(m, n):
        t0 = time.perf_counter()
        m.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    with torch.inference_mode():
        for m in models.values():  # warm-up
            gen(m, 4)
        out = {k: [] for k in models}
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))  # no model always goes first
            for k in order:
                one, full = gen(models[k], 1), gen(models[k], 1 + new_tokens)
                out[k].append(1000 * (full - one) / new_tokens)
    return out


def front_members(run, low: float, high: float, want: int) -> list:
    """Measured members of the parameters front between `low` and `high` of the parameters, spread."""
    by_id = {c.id: c for c in run.candidates()}
    members = [by_id[i] for i in run.fronts()["params"] if i in by_id and by_id[i].origin != "dense"
               and low - 0.01 <= by_id[i].metrics["fraction"] <= high and "measured_speedup" in by_id[i].metrics]
    members.sort(key=lambda c: -c.metrics["fraction"])
    if len(members) <= want:
        return members
    step = (len(members) - 1) / (want - 1)
    return [members[round(k * step)] for k in range(want)]


def run(args) -> dict:
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    lm = load_model(args.model, args.dtype, args.device)
    if args.run:
        run_dir = Path(args.run)
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="latency-run-")) / "run"
        settings = SearchSettings.preset("demo", targets=tuple(float(t) for t in args.targets.split(",")),
                                         measure_max=args.measure, seed=args.seed)
        log(f"demo search over {settings.targets} (the run measures up to {args.measure} front members)")
        for ev in run_search(lm, settings, run_dir):
            if type(ev).__name__ in ("SearchFailed", "SearchCancelled"):
                raise RuntimeError(f"search ended: {ev}")
    run_obj = open_run(run_dir)
    latency = run_obj.latency_model()
    chosen = front_members(run_obj, 0.5, 0.9, args.members)
    log(f"{len(chosen)} measured front members: {[c.id for c in chosen]}")
    means = run_obj.channel_means()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="bench_latency_") as work:
        models = {"dense": AutoModelForCausalLM.from_pretrained(lm.path, dtype=lm.dtype).eval()}
        for c in chosen:
            m = candidate_model(lm.model, c, means)
            exp = export_subnet(lm, m, c.subnet, f"{work}/{c.id}", {}, {"benchmark": "latency"}, make_zip=False,
                                means=means if c.compensated else None)
            models[c.id] = AutoModelForCausalLM.from_pretrained(exp.path, trust_remote_code=True, dtype=lm.dtype).eval()
            log(f"exported {c.id} (verified against the base model: {exp.verified})")
        log(f"independent timing: {len(models)} models x {args.rounds} rounds of transformers' generate")
        indep = independent_timing(models, lm.shape.vocab_size, args.new_tokens, args.rounds)
    rows = []
    for c in chosen:
        m = c.metrics
        ratios = [a / b for a, b in zip(indep["dense"], indep[c.id])]
        ind = statistics.median(ratios)
        pred = latency.dense_ms / m["predicted_latency_ms"]
        rows.append({"id": c.id, "fraction": m["fraction"], "predicted_ms": m["predicted_latency_ms"],
                     "predicted_speedup": pred, "run_ms": m["measured_ms"], "run_speedup": m["measured_speedup"],
                     "run_spread": m["measured_spread"], "independent_ms": statistics.median(indep[c.id]),
                     "independent_speedup": ind, "run_vs_independent": m["measured_speedup"] / ind - 1,
                     "predicted_vs_run": pred / m["measured_speedup"] - 1, "predicted_vs_independent": pred / ind - 1})
    cols = ["id", "fraction", "predicted_ms", "predicted_speedup", "run_ms", "run_speedup", "run_spread",
            "independent_ms", "independent_speedup", "run_vs_independent", "predicted_vs_run",
            "predicted_vs_independent"]
    print(format_table(rows, cols))
    med = lambda k: statistics.median(abs(r[k]) for r in rows) if rows else float("nan")  # noqa: E731
    checks = {
        "members": len(rows),
        "run_within_10pct_of_independent_all": all(abs(r["run_vs_independent"]) <= 0.10 for r in rows),
        "run_vs_independent_median_abs": med("run_vs_independent"),
        "predicted_vs_run_median_abs": med("predicted_vs_run"),
        "predicted_vs_independent_median_abs": med("predicted_vs_independent"),
        "spearman_predicted_vs_independent": spearman([r["predicted_speedup"] for r in rows],
                                                       [r["independent_speedup"] for r in rows]),
        "spearman_predicted_vs_run": spearman([r["predicted_speedup"] for r in rows], [r["run_speedup"] for r in rows]),
    }
    checks["targets_met"] = (checks["members"] >= 8 and checks["run_within_10pct_of_independent_all"]
                             and checks["predicted_vs_run_median_abs"] <= 0.10
                             and checks["predicted_vs_independent_median_abs"] <= 0.10
                             and checks["spearman_predicted_vs_independent"] >= 0.9)
    print("checks:", ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in checks.items()))
    result = {"benchmark": "latency", "model": lm.summary(), "run_dir": str(run_dir), "latency_model": latency.to_dict(),
              "independent": {"rounds": args.rounds, "new_tokens": args.new_tokens, "per_round_ms": indep},
              "rows": rows, "checks": checks, "machine": machine(), "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, result)}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--run", default=None, help="a finished run with measured front members (default: search now)")
    p.add_argument("--targets", default="0.9,0.8,0.7,0.6,0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", type=int, default=12, help="front members the search measures")
    p.add_argument("--members", type=int, default=10, help="front members compared (at least 8)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default="docs/results/latency.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
