"""GGUF exports in llama.cpp: the dense embedded model vs a whole-head 70 % subnet, side by side.

Per model and weight type: the file size, llama.cpp's held-out perplexity next to transformers' on
the same windows, the llama.cpp check of `explorer.pick.llamacpp` (logits and 16 greedy tokens against
our model) and llama.cpp's decode speed, one token at a time after a 128-token prompt, beside our
transformers model's own (greedy with its KV cache, fp32), each the median of rounds that alternate
between the models (so machine drift hits every row alike).

The 70 % subnet is by default the shipped demo run's uniform-FLAP baseline at 70 % (whole heads,
the same share in every block, FLAP's bias compensation), as picked and after the app's
reformation; --pick (repeatable, RUN_DIR:ID) adds any whole-head candidate, e.g. a heads-space
search's best@0.7.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import add_common_arguments, format_table, machine, main, write_json
from explorer.calibrate.data import heldout_windows, load_corpus
from explorer.model.loading import load_model
from explorer.model.modeling_subnet import _CACHE_FIELD as CACHE_FIELD
from explorer.model.perplexity import perplexity
from explorer.model.slicing import candidate_model, slice_model
from explorer.model.subnet import Subnet
from explorer.pick.export import PROMPT_TEXT
from explorer.pick.export_gguf import base_tokenizer, write_gguf
from explorer.pick.llamacpp import check, open_gguf
from explorer.pick.reform import ReformSettings, reform
from explorer.search.runs import open_run

DEFAULT_PICK = "baseline:flap-uniform@0.7"  # the shipped demo run's uniform FLAP at 70 %


def llamacpp_perplexity(path: Path, windows, threads: int) -> float:
    """Mean next-token NLL over every window, computed from llama.cpp's logits."""
    llm = open_gguf(path, n_ctx=int(windows.shape[1]), threads=threads)
    nll, n = 0.0, 0
    try:
        for w in windows.tolist():
            llm.reset()
            llm.eval(w)
            logits = np.array(llm.scores[: len(w)], dtype=np.float64)[:-1]
            logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
            nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
            n += len(w) - 1
    finally:
        llm.close()
    return math.exp(nll / n)


def decode_rate(path: Path, prompt: list[int], tokens: int, threads: int) -> float:
    llm = open_gguf(path, n_ctx=len(prompt) + tokens + 8, threads=threads)
    try:
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return tokens / (time.perf_counter() - t0)
    finally:
        llm.close()


@torch.no_grad()
def torch_decode_rate(model, prompt: list[int], tokens: int) -> float:
    """Our model's greedy decode with its KV cache, one token at a time after the prompt (tokens/s)."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    cache, nxt = getattr(out, CACHE_FIELD), out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(tokens):
        out = model(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    return tokens / (time.perf_counter() - t0)


def run(args) -> dict:
    t0 = time.perf_counter()
    lm = load_model(args.model, args.dtype, args.device)
    base = base_tokenizer(lm)
    corpus = load_corpus(args.corpus)
    held = heldout_windows(lm.tokenizer, corpus, args.heldout_windows, args.seq_len)
    prompt = held[0, : args.prompt_len].tolist()
    models = {"dense": (slice_model(lm.model, Subnet.full(lm.shape), lm.shape), Subnet.full(lm.shape))}
    picks = []
    for spec in args.pick or [DEFAULT_PICK]:
        run_dir, cid = (args.run, spec) if ":" not in spec or spec.startswith("baseline:") else spec.split(":", 1)
        run = open_run(run_dir)
        c = run.pick(cid)
        means = run.means_of(c)
        space = "whole heads" if run.settings.get("space") == "heads" else "dims"
        label = f"{c.origin.replace('baseline:', '')} {c.target_words}" + (f" ({space})" if c.origin == "search" else "")
        picks.append({"run": str(run_dir), "pick": cid, "id": c.id, "label": label, "compensated": c.compensated})
        models[label] = (candidate_model(lm.model, c, means), c.subnet)
        if not args.no_reform:
            rs = ReformSettings(**{**ReformSettings.demo().to_dict(), "intercept": not args.no_intercept})
            models[f"{label} reformed"] = (reform(lm, c.subnet, rs, means=means).model, c.subnet)
    rows, files = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, sub) in models.items():
            ppl_torch = perplexity(model, held)
            for kind in args.types:
                path = Path(tmp) / f"{len(files)}-{kind}.gguf"
                info = write_gguf(path, model, base, name, kind)
                c = check(path, model, lm.tokenizer, PROMPT_TEXT, kind, threads=args.threads)
                files[(name, kind)] = path
                rows.append({"model": name, "type": kind, "fraction": sub.fraction(lm.shape), "MB": info["bytes"] / 1e6,
                             "ppl_transformers": ppl_torch,
                             "ppl_llamacpp": llamacpp_perplexity(path, held, args.threads),
                             "check_passed": c.passed, "max_logit_diff": c.max_logit_diff,
                             "allowed_diff": c.allowed_diff, "same_tokens": c.same_tokens, "gguf": info})
        rates: dict = {k: [] for k in files}
        torch_rates: dict = {name: [] for name in models}
        torch.set_num_threads(args.threads)
        for _ in range(args.rounds):  # interleaved, so drift affects every file alike
            for k, path in files.items():
                rates[k].append(decode_rate(path, prompt, args.new_tokens, args.threads))
            for name, (model, _) in models.items():
                torch_rates[name].append(torch_decode_rate(model, prompt, args.new_tokens))
    for r in rows:
        r["decode_tok_s"] = statistics.median(rates[(r["model"], r["type"])])
        r["decode_rounds"] = rates[(r["model"], r["type"])]
        r["speedup_vs_dense"] = r["decode_tok_s"] / statistics.median(rates[("dense", r["type"])])
        r["transformers_decode_tok_s"] = statistics.median(torch_rates[r["model"]])
        r["transformers_speedup_vs_dense"] = r["transformers_decode_tok_s"] / statistics.median(torch_rates["dense"])
    cols = ["model", "type", "fraction", "MB", "ppl_transformers", "ppl_llamacpp", "check_passed", "max_logit_diff",
            "same_tokens", "decode_tok_s", "speedup_vs_dense", "transformers_decode_tok_s",
            "transformers_speedup_vs_dense"]
    print(format_table(rows, cols))
    result = {"benchmark": "llamacpp", "model": lm.summary(), "corpus": corpus.description,
              "picks": picks, "heldout_windows": int(held.shape[0]), "seq_len": args.seq_len, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "threads": args.threads, "rows": rows, "machine": machine(),
              "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, result)}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, heldout_windows=16)
    p.add_argument("--run", default="assets/runs/smollm2-135m-demo", help="the run holding the subnet")
    p.add_argument("--pick", action="append", default=None, metavar="[RUN_DIR:]ID",
                   help="a whole-head candidate (repeatable; an id or best@0.7 from --run, or RUN_DIR:ID); "
                        "default: the demo run's uniform FLAP at 70 %%")
    p.add_argument("--no-reform", action="store_true", help="skip the reformed row")
    p.add_argument("--no-intercept", action="store_true",
                   help="reform without output biases (what the GGUF of Qwen3, SmolLM3 and Gemma 3 holds)")
    p.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=["f16", "f32", "q8_0"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="docs/results/llamacpp.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
