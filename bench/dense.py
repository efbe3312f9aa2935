"""Dense model vs a uniformly narrowed 70 % subnet: parameters, held-out perplexity, speed.

The narrowed subnet is the magnitude baseline's (FLAP repo's `mag_sp`: the same share of KV groups
and MLP channels removed in every block, ranked by column norms: the simplest honest choice),
and the table reports measured vs ideal speed-up (METHOD section 7).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import add_common_arguments, format_table, machine, main, write_json
from explorer.calibrate.baselines import magnitude
from explorer.calibrate.data import heldout_windows, load_corpus
from explorer.model.latency import SpeedSettings, measure_speeds, paired_speedup
from explorer.model.loading import load_model
from explorer.model.perplexity import perplexity
from explorer.model.slicing import slice_model
from explorer.model.subnet import Subnet


def run(args) -> dict:
    t0 = time.perf_counter()
    lm = load_model(args.model, args.dtype, args.device)
    corpus = load_corpus(args.corpus)
    held = heldout_windows(lm.tokenizer, corpus, args.heldout_windows, args.seq_len)
    speed = SpeedSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    dense = Subnet.full(lm.shape)
    narrow = magnitude(lm.model, lm.shape, args.fraction)
    sliced = slice_model(lm.model, narrow, lm.shape)
    rows = []
    models = (("dense", lm.model, dense), (f"uniform {args.fraction:.0%}", sliced, narrow))
    speeds = measure_speeds({name: model for name, model, _ in models}, lm.shape.vocab_size, speed)
    for name, model, sub in models:
        ppl = perplexity(model, held)
        sp = speeds[name]
        rows.append({"model": name, "params": sub.params(lm.shape), "fraction": sub.fraction(lm.shape),
                     "ppl": ppl, "prefill_ms": sp.prefill_ms, "decode_tok_s": sp.decode_tokens_per_s,
                     "param_MB": sp.param_bytes / 2**20, "peak_MB": sp.peak_memory_bytes / 2**20,
                     "ideal_speedup": sub.summary(lm.shape)["ideal_decode_speedup"], "speed": sp.to_dict()})
    d = rows[0]
    for r in rows:  # median over rounds of the paired ratio (see latency.paired_speedup)
        r["decode_speedup"] = paired_speedup(speeds[d["model"]], speeds[r["model"]])
        r["prefill_speedup"] = paired_speedup(speeds[d["model"]], speeds[r["model"]], decode=False)
        r["measured_over_ideal"] = r["decode_speedup"] / r["ideal_speedup"]
    cols = ["model", "params", "fraction", "ppl", "prefill_ms", "decode_tok_s", "param_MB", "peak_MB",
            "decode_speedup", "prefill_speedup", "ideal_speedup", "measured_over_ideal"]
    print(format_table(rows, cols))
    result = {"benchmark": "dense", "model": lm.summary(), "corpus": corpus.description,
              "heldout_windows": int(held.shape[0]), "seq_len": args.seq_len, "rows": rows,
              "machine": machine(), "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, result)}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--fraction", type=float, default=0.7)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="docs/results/dense.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
