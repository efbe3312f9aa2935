"""Reformation and export on the embedded model: for subnets at 80, 70, 60 and 50 % of the
parameters, held-out perplexity before and after reformation, and the *exported* model's
measured decode speed-up, prefill speed-up and memory against the dense model and against the
ideal (METHOD section 7), all in one run. The full-width subnet, exported the same way, is timed
too: speed-ups against it are what pruning alone buys, with the modeling code held fixed.

Subnets are the importance-ranked uniform initial subnets of METHOD section 2
(`explorer.calibrate.importance.initial_subnet`), or `--init magnitude` for uniform magnitude ranking.
Each reformed subnet is exported (verified in a fresh process), reloaded from its folder with
plain transformers, and timed beside the dense model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import format_table, machine, main, write_json
from explorer.calibrate.data import calibration_windows, heldout_windows, load_corpus
from explorer.model.latency import SpeedSettings, measure_speeds, paired_speedup
from explorer.model.loading import load_model
from explorer.model.perplexity import perplexity
from explorer.model.slicing import slice_model
from explorer.model.subnet import Subnet
from explorer.pick.export import export_subnet
from explorer.pick.reform import ReformSettings, reform
from explorer.settings import DataSettings, ModelSettings

FRACTIONS = (0.8, 0.7, 0.6, 0.5)
FULL = "full width (same code)"


def pick_subnets(lm, fractions, init: str, windows) -> dict[float, Subnet]:
    if init == "magnitude":
        from explorer.calibrate.baselines import magnitude

        return {f: magnitude(lm.model, lm.shape, f) for f in fractions}
    from explorer.calibrate.importance import compute_importance
    from explorer.search.initial import initial_subnet

    imp = compute_importance(lm.model, windows, lm.shape)
    return {f: initial_subnet(imp, lm.shape, f) for f in fractions}


def load_exported(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto").eval()


def run(args) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    lm = load_model(args.model, args.dtype, args.device)
    corpus = load_corpus(args.corpus)
    settings = ReformSettings(windows=args.calib_windows, seq_len=args.calib_seq_len, method=args.method,
                              damp=args.damp, corpus=args.corpus)
    cal = calibration_windows(lm.tokenizer, corpus, settings.windows, settings.seq_len, settings.seed)
    held = heldout_windows(lm.tokenizer, corpus, args.heldout_windows, args.seq_len)
    speed = SpeedSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    subnets = pick_subnets(lm, fractions, args.init, cal[:args.importance_windows])
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    dense_ppl = perplexity(lm.model, held)
    log(f"dense ppl {dense_ppl:.3f}")
    rows = [{"model": "dense", "fraction": 1.0, "params": lm.shape.dense_params, "ppl_before": dense_ppl,
             "ppl_after": dense_ppl}]
    exported = {"dense": lm.model}
    with tempfile.TemporaryDirectory(prefix="bench_reform_") as work:
        # The full-width subnet through the same export and code: speed-ups against it isolate
        # what the pruning buys from how fast our modeling file is next to transformers' Llama.
        full = Subnet.full(lm.shape)
        exp = export_subnet(lm, slice_model(lm.model, full, lm.shape), full, f"{work}/full_width",
                            {"heldout_ppl": dense_ppl}, {"benchmark": "reform"}, verify=True, make_zip=False)
        exported[FULL] = load_exported(exp.path)
        rows.append({"model": FULL, "fraction": 1.0, "params": lm.shape.dense_params, "ppl_before": dense_ppl,
                     "ppl_after": dense_ppl, "verified": exp.verified, "max_logit_diff": exp.max_logit_diff,
                     "ideal_speedup": 1.0})
        for f in fractions:
            sub = subnets[f]
            before = perplexity(slice_model(lm.model, sub, lm.shape), held)
            result = reform(lm, sub, settings, calib_windows=cal)
            after = perplexity(result.model, held)
            log(f"{f:.0%}: ppl {before:.3f} -> {after:.3f} (reform {result.seconds:.0f}s)")
            out = f"{work}/subnet_{int(round(f * 100))}"
            exp = export_subnet(lm, result.model, sub, out, {"heldout_ppl": after}, {"benchmark": "reform"},
                                verify=True, make_zip=False,
                                reformed={"digest": result.digest, "settings": result.settings.to_dict()})
            reform_seconds = result.seconds
            del result
            name = f"subnet {f:.0%}"
            exported[name] = load_exported(exp.path)  # timed below, from its folder, with plain transformers
            s = sub.summary(lm.shape)
            rows.append({"model": name, "fraction": sub.fraction(lm.shape), "params": s["params"],
                         "ppl_before": before, "ppl_after": after, "ppl_change_pct": 100 * (after / before - 1),
                         "reform_s": reform_seconds, "verified": exp.verified, "max_logit_diff": exp.max_logit_diff,
                         "ideal_speedup": s["ideal_decode_speedup"]})
            log(f"{f:.0%}: exported, verified={exp.verified}")
        log(f"timing dense and {len(exported) - 1} exported subnets, interleaved ({speed.repeats} rounds)")
        speeds = measure_speeds(exported, lm.shape.vocab_size, speed)
    for r in rows:
        sp = speeds[r["model"]]
        r.update({"decode_tok_s": sp.decode_tokens_per_s, "prefill_ms": sp.prefill_ms,
                  "param_MB": sp.param_bytes / 2**20, "peak_MB": sp.peak_memory_bytes / 2**20, "speed": sp.to_dict()})
    d, w = rows[0], rows[1]
    d["ideal_speedup"] = 1.0
    for r in rows:  # speed-ups: median over rounds of the paired (same round) ratio
        r["decode_speedup"] = paired_speedup(speeds[d["model"]], speeds[r["model"]])
        r["prefill_speedup"] = paired_speedup(speeds[d["model"]], speeds[r["model"]], decode=False)
        r["measured_over_ideal"] = r["decode_speedup"] / r["ideal_speedup"]
        r["decode_speedup_same_code"] = paired_speedup(speeds[w["model"]], speeds[r["model"]])
        r["same_code_over_ideal"] = r["decode_speedup_same_code"] / r["ideal_speedup"]
        r["memory_ratio"] = r["peak_MB"] / d["peak_MB"]
        r["weights_ratio"] = r["param_MB"] / d["param_MB"]
    cols = ["model", "fraction", "ppl_before", "ppl_after", "ppl_change_pct", "decode_speedup", "ideal_speedup",
            "measured_over_ideal", "same_code_over_ideal", "prefill_speedup", "weights_ratio", "memory_ratio",
            "verified"]
    print(format_table(rows, cols))
    subnets = rows[2:]
    checks = {"reform_lowers_ppl_everywhere": all(r["ppl_after"] < r["ppl_before"] for r in subnets),
              "reform_gain_10pct_at_60_and_below": all(r["ppl_change_pct"] <= -10 for r in subnets
                                                        if r["fraction"] <= 0.605),
              "decode_speedup_at_least_085_of_ideal": all(r["measured_over_ideal"] >= 0.85 for r in subnets),
              "same_code_speedup_at_least_085_of_ideal": all(r["same_code_over_ideal"] >= 0.85 for r in subnets)}
    print("targets:", ", ".join(f"{k}={v}" for k, v in checks.items()))
    result = {"benchmark": "reform", "model": lm.summary(), "corpus": corpus.description, "init": args.init,
              "reform_settings": settings.to_dict(), "heldout_windows": int(held.shape[0]), "seq_len": args.seq_len,
              "speed_settings": speed.__dict__, "rows": rows, "targets": checks, "machine": machine(),
              "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, result)}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    m, d, r = ModelSettings(), DataSettings(), ReformSettings()
    p.add_argument("--model", default=m.model)
    p.add_argument("--dtype", default=m.dtype)
    p.add_argument("--device", default=m.device)
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    p.add_argument("--init", choices=["importance", "magnitude"], default="importance")
    p.add_argument("--calib-windows", type=int, default=r.windows)
    p.add_argument("--calib-seq-len", type=int, default=r.seq_len)
    p.add_argument("--importance-windows", type=int, default=r.windows, help="first N calibration windows")
    p.add_argument("--method", choices=["closed", "admm"], default=r.method)
    p.add_argument("--damp", type=float, default=r.damp)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="held-out window length")
    p.add_argument("--heldout-windows", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--out", default="docs/results/reform.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
