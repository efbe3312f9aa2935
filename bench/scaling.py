"""Measured cost of every pipeline step at the shape of bigger models (random weights), one run.

Timing and memory depend on shapes, not on what the weights learned, so a randomly initialised
Llama of a real model's shape measures what a search on that model costs on this device: weight
memory, the block-by-block importance pass (peak memory above the weights), fitness evaluations
per second of the sliced subnet against the naive masked dense model on the same windows,
reformation of a 70 % subnet, and dense vs subnet decode speed. Quality numbers are meaningless
here and not reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import format_table, machine, main, write_json

SHAPES = {  # published configs (hidden, MLP, layers, heads, KV heads, head dim, vocab)
    "smollm2-135m": (576, 1536, 30, 9, 3, 64, 49152),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256),
    "llama-2-7b": (4096, 11008, 32, 32, 32, 128, 32000),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128, 128256),
}


def build(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    D, F, L, H, KV, hd, V = SHAPES[name]
    cfg = LlamaConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=KV, head_dim=hd, vocab_size=V, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device) -> int:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak(device, base: int) -> float:
    if torch.device(device).type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    return float("nan")


def timed(fn, device, repeats: int = 3) -> tuple[float, object]:
    fn()
    ts, out = [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def run(args) -> dict:
    t0 = time.perf_counter()
    dev, dtype = args.device, getattr(torch, args.dtype)
    rows = []
    for name in args.shapes.split(","):
        row: dict = {"shape": name}
        rows.append(row)
        try:
            measure_shape(row, dev, dtype, args)  # fills `row` step by step: a failure keeps what was measured
        except Exception as e:  # noqa: BLE001 - a shape that does not fit must not lose the others
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        if torch.device(dev).type == "cuda":
            torch.cuda.empty_cache()
        print(format_table(rows[-1:], list(rows[-1])), flush=True)
        write_json(args.out, {"benchmark": "scaling", "rows": rows, "partial": True})
    cols = ["shape", "params_B", "weights_GiB", "importance_s", "importance_peak_extra_GiB", "fitness_s", "naive_s",
            "fitness_speedup", "reform_s", "reform_peak_extra_GiB", "dense_tok_s", "subnet_tok_s", "decode_speedup",
            "ideal_speedup"]
    print(format_table(rows, cols))
    out = {"benchmark": "scaling", "device": dev, "dtype": args.dtype, "calib_windows": args.calib_windows,
           "fitness_windows": args.fitness_windows, "reform_windows": args.reform_windows, "seq_len": args.seq_len,
           "rows": rows, "machine": machine(), "seconds": time.perf_counter() - t0}
    print(f"wrote {write_json(args.out, out)}")
    return out


def measure_shape(row: dict, dev: str, dtype: torch.dtype, args) -> None:
    from explorer.calibrate.importance import compute_importance
    from explorer.model.latency import SpeedSettings, measure_speeds
    from explorer.model.loading import LoadedModel
    from explorer.model.subnet import ModelShape
    from explorer.pick.reform import ReformSettings, reform
    from explorer.search.fitness import FitnessEvaluator, MaskedEvaluator, fast_dtype
    from explorer.search.initial import initial_subnet

    torch.manual_seed(0)
    name = row["shape"]
    t = time.perf_counter()
    model = build(name, dev, dtype)
    _sync(dev)
    row["build_s"] = time.perf_counter() - t
    shape = ModelShape.from_config(model.config)
    lm = LoadedModel(model, None, shape, name, "random", "", dtype, dev)
    row["params_B"] = shape.dense_params / 1e9
    row["weights_GiB"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, V, (args.calib_windows, args.seq_len), generator=g)
    fit = torch.randint(0, V, (args.fitness_windows, args.seq_len), generator=g)
    base = _peak_reset(dev)
    t = time.perf_counter()
    imp = compute_importance(model, calib, shape)
    _sync(dev)
    row["importance_s"] = time.perf_counter() - t
    row["importance_peak_extra_GiB"] = _peak(dev, base)
    print(f"{name}: importance {row['importance_s']:.1f}s", flush=True)
    sub = initial_subnet(imp, shape, 0.7)
    fd = fast_dtype(dev)
    ev = FitnessEvaluator(model, shape, fit, cache_bytes=0, dtype=fd, batch=args.fitness_batch)
    row["fitness_s"], r = timed(lambda: ev.evaluate(sub), dev)
    del ev
    naive = MaskedEvaluator(model, shape, fit, batch_size=args.fitness_batch)
    row["naive_s"], _ = timed(lambda: naive.evaluate(sub), dev)
    del naive
    row["fitness_speedup"] = row["naive_s"] / row["fitness_s"]
    row["fitness_tokens"] = int(fit.numel())
    print(f"{name}: fitness {row['fitness_s']:.3f}s vs naive {row['naive_s']:.3f}s", flush=True)
    base = _peak_reset(dev)
    t = time.perf_counter()
    result = reform(lm, sub, ReformSettings(windows=args.reform_windows, seq_len=args.seq_len),
                    calib_windows=calib[: args.reform_windows])
    _sync(dev)
    row["reform_s"] = time.perf_counter() - t
    row["reform_peak_extra_GiB"] = _peak(dev, base)
    print(f"{name}: reform {row['reform_s']:.1f}s", flush=True)
    sp = SpeedSettings(prompt_len=128, new_tokens=args.new_tokens, repeats=3)
    speeds = measure_speeds({"dense": model, "subnet": result.model}, V, sp)
    dense, s70 = speeds["dense"], speeds["subnet"]
    row["dense_tok_s"] = dense.decode_tokens_per_s
    row["subnet_tok_s"] = s70.decode_tokens_per_s
    row["decode_speedup"] = s70.decode_tokens_per_s / dense.decode_tokens_per_s
    row["ideal_speedup"] = sub.summary(shape)["ideal_decode_speedup"]
    row["dense_prefill_ms"] = dense.prefill_ms
    row["subnet_prefill_ms"] = s70.prefill_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="smollm2-135m", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--fitness-windows", type=int, default=5)
    p.add_argument("--fitness-batch", type=int, default=1)
    p.add_argument("--reform-windows", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="docs/results/scaling.json")


if __name__ == "__main__":
    main(add_arguments, run, __doc__)
