"""Markdown and tables the page shows: pure formatting of engine records, no Gradio."""
from __future__ import annotations

import time
from dataclasses import replace

import pandas as pd

from ..events import (
    CandidateEvaluated,
    GenerationFinished,
    SearchCancelled,
    SearchFailed,
    SearchFinished,
    SearchStarted,
    StageProgress,
)
from ..search.runs import target_words

NO_PICK = "*Click a point on the plot.*"  # the card when the tab has no pick


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def model_markdown(summary: dict, dense: dict | None) -> str:
    """Two short lines (the model, and what Load measured), the architecture folded under them: the
    search's Start stays on the first screen."""
    s = summary
    lines = [f"**{s['model']}** · {fmt_params(s['params'])} parameters · {s['layers']} layers · {s['dtype']} on "
             f"{s['device']}"]
    if dense is None:
        lines.append("*The dense model's perplexity and speed are measured when the model is free (another job "
                     "runs on it now); press Load again later.*")
    more = [s["source"],
            f"{s['architecture']} · hidden {s['hidden_size']} · {s['heads']} heads ({s['kv_heads']} KV, head dim "
            f"{s['head_dim']}) · MLP {s['intermediate_size']} · vocab {s['vocab_size']}",
            f"{fmt_params(s['prunable_params'])} prunable parameters · {s['param_bytes'] / 2**20:.0f} MiB of weights"]
    if dense:
        lines.append(f"Dense held-out perplexity **{dense['heldout_ppl']:.2f}** · decode "
                     f"**{dense['decode_tok_s']:.1f} tokens/s**")
        more.append(f"held-out: {dense['windows']}×{dense['seq_len']} tokens of BBC News · prefill "
                    f"{dense['prefill_ms']:.0f} ms / {dense['prompt_len']} tokens")
    return "  \n".join(lines) + "\n\n<details><summary>architecture</summary>\n\n" + "  \n".join(more) + "\n\n</details>"


def with_metrics(c, extra: dict):
    """The candidate with what this tab measured on it merged into its metrics (for plots and cards)."""
    if not extra:
        return c
    out = {**c.metrics, **{k: v for k, v in extra.items() if k != "ppl_before"}}
    if "ppl_before" in extra and "heldout_ppl" not in c.metrics:
        out["heldout_ppl"] = extra["ppl_before"]
    return replace(c, metrics=out)


def card_markdown(c, shape, extra: dict | None = None) -> str:
    m = {**c.metrics, **(extra or {})}
    summ = c.subnet.summary(shape, getattr(c, "compensated", False))
    head = (f"`{c.id}`", c.origin + (" · bias-compensated" if getattr(c, "compensated", False) else "")
            + ("" if c.origin == "dense" else f" · target {c.target_words}"))
    rows = [
            ("parameters", f"{fmt_params(summ['params'])} = {summ['fraction']:.1%} of dense "
                           f"({summ['prunable_fraction']:.1%} of prunable)"),
            ("layers kept", f"{summ['layers_kept']} of {shape.num_layers}"),
            ("ideal decode speed-up", f"{summ['ideal_decode_speedup']:.2f}×"),
            ("GFLOPs / token", f"{summ['flops_per_token'] / 1e9:.3f}")]
    for key, label in (("fitness_ppl", "search fitness ppl"), ("heldout_ppl", "held-out ppl"),
                       ("predicted_latency_ms", "predicted ms/token"),
                       ("ppl_before", "held-out ppl before reform"), ("ppl_after", "held-out ppl after reform"),
                       ("zeroshot_acc", "zero-shot accuracy (avg)")):
        if m.get(key) is not None:
            rows.append((label, f"{m[key]:.4g}" + (" (lower bound: stopped early)" if key == "fitness_ppl"
                                                   and m.get("fitness_lower_bound") else "")))
    if m.get("measured_speedup") is not None and c.origin != "dense":
        dense = m.get("measured_dense_ms")
        text = (f"{m['measured_ms']:.4g} ms/token, {m['measured_speedup']:.2f}x the dense model "
                f"(spread {100 * m.get('measured_spread', 0):.0f}% over {m.get('measured_rounds', '?')} paired rounds"
                + ("" if m.get("measured_reliable", True) else "; unreliable: the machine was busy") + ")")
        rows.append(("measured decode", text))
        if m.get("predicted_latency_ms") and dense:
            err = m["predicted_latency_ms"] / (dense / m["measured_speedup"]) - 1
            rows.append(("prediction error", f"{100 * err:+.0f}%"))
    for k, v in sorted(m.items()):
        if k.startswith("acc:"):
            rows.append((k[4:], f"{v:.3f}"))
    cut = sorted(range(len(summ["head_dims"])), key=lambda i: summ["head_dims"][i] / shape.head_dim
                 + summ["mlp_widths"][i] / shape.intermediate_size)[:3]
    rows.append(("cut most", ", ".join(f"layer {i}" for i in cut)))
    return f"| {head[0]} | {head[1]} |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def size_markdown(sol, shape, share: str = "total", compensated: bool = False) -> str:
    """The card while the size slider moves: the library's subnet at that size, with what the library and
    the latency model predict, worded as predictions (nothing is measured until release)."""
    summ = sol.subnet.summary(shape, compensated)
    rows = [("parameters", f"{fmt_params(sol.params)} = {summ['fraction']:.1%} of dense "
                           f"({summ['prunable_fraction']:.1%} of prunable)"),
            ("layers", f"{summ['layers_kept']} of {shape.num_layers} kept"),
            ("fitness ppl", f"{sol.predicted_ppl:.4g}, predicted by the library")]
    if sol.predicted_speedup is not None:
        rows.append(("decode speed-up", f"{sol.predicted_speedup:.2f}×, predicted by the latency model"))
    rows.append(("ideal decode speed-up", f"{summ['ideal_decode_speedup']:.2f}×"))
    return (f"| `library@{sol.fraction:.2f}` | the library's best subnet at {target_words(sol.fraction, share)} |\n"
            "|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
            + f"\n\n*Solved in {1000 * sol.seconds:.0f} ms, not evaluated yet: release to evaluate and pick it.*")


def size_line(sol, shape, compensated: bool = False) -> str:
    """The slider's one-line answer while dragged: the size, the library's predicted fitness and the
    speed-up (the latency model's where the run has one, else the ideal decode speed-up), as predictions."""
    summ = sol.subnet.summary(shape, compensated)
    speed = (f"{sol.predicted_speedup:.2f}× decode speed-up (predicted)" if sol.predicted_speedup is not None
             else f"{summ['ideal_decode_speedup']:.2f}× ideal decode speed-up")
    return (f"**`library@{sol.fraction:.2f}`**: {fmt_params(sol.params)} parameters ({summ['fraction']:.1%}), "
            f"{summ['layers_kept']} of {shape.num_layers} layers · fitness ppl ≈ {sol.predicted_ppl:.4g} (predicted) · "
            f"{speed} · *release to evaluate and pick it*")


def size_picked_line(c) -> str:
    """The slider's one-line answer on release: the subnet it picked, with its measured fitness."""
    m = c.metrics
    fitness = m.get("fitness_ppl")
    predicted = m.get("library_ppl")
    return (f"**Picked `{c.id}`** ({m.get('fraction', 1.0):.1%} of the parameters): fitness ppl "
            + ("not measured" if fitness is None else f"{fitness:.4g} measured")
            + ("" if predicted is None else f", {predicted:.4g} predicted") + " · its card is below")


def compare_frame(rows: list[dict]) -> pd.DataFrame:
    cols = ["id", "origin", "params %", "pred ms/tok", "speed-up", "fitness ppl", "held-out ppl",
            "reformed ppl", "zero-shot acc", "reformed"]
    return pd.DataFrame([{c: r.get(c, "") for c in cols} for r in rows], columns=cols)


def compare_row(c, extra: dict) -> dict:
    m = {**c.metrics, **extra}
    r = lambda v, n=3: "" if v is None else round(float(v), n)  # noqa: E731
    return {"id": c.id, "origin": c.origin, "params %": r(100 * m.get("fraction", 1.0), 1),
            "pred ms/tok": r(m.get("predicted_latency_ms")), "speed-up": r(m.get("measured_speedup")),
            "fitness ppl": r(m.get("fitness_ppl")), "held-out ppl": r(m.get("heldout_ppl", m.get("ppl_before"))),
            "reformed ppl": r(m.get("ppl_after")), "zero-shot acc": r(m.get("zeroshot_acc")),
            "reformed": "yes" if m.get("ppl_after") is not None else "no"}


class SearchStatus:
    """Accumulates search events into the status text: stage, counts, a true evaluation rate,
    generation n of N per target, time left."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.evaluated = 0  # candidates archived (replayed included)
        self.computed = 0  # real evaluations
        self.eval_time = 0.0
        self.best: dict[float, float] = {}
        self.generation: dict[float, tuple[int, int]] = {}
        self.targets: tuple = ()
        self.share = "total"
        self.generations = 0  # N of "generation n of N", known from the settings at the start
        self.minutes: float | None = None  # the search's time budget
        self.state = "running"
        self.stage = ""
        self.message = ""

    def update(self, ev) -> None:
        if isinstance(ev, SearchStarted):
            self.targets = tuple(ev.targets)
            self.share = ev.settings.get("share", "total")
            self.generations = int(ev.settings.get("generations") or 0)
            self.minutes = ev.settings.get("minutes")
            if self.minutes:  # a time budget: the clock ends the generations, so N is only a cap
                self.generations = 0
        elif isinstance(ev, StageProgress):
            self.stage = f"{ev.stage} {ev.done}/{ev.total} {ev.message}".strip()
        elif isinstance(ev, CandidateEvaluated):
            self.stage = ""
            self.evaluated += 1
            c = ev.candidate
            if not ev.replayed and not c.metrics.get("copied_from"):
                self.computed += 1
                self.eval_time += float(c.metrics.get("eval_seconds", 0.0))
            f = c.metrics.get("fitness_ppl")
            if f is not None and not c.origin.startswith(("baseline", "dense")) and not c.metrics.get("fitness_lower_bound"):
                self.best[c.target] = min(self.best.get(c.target, float("inf")), f)
                self.generation.setdefault(c.target, (0, self.generations))
        elif isinstance(ev, GenerationFinished):
            self.generation[ev.target] = (ev.generation, ev.generations)
        elif isinstance(ev, SearchFinished):
            self.state = "finished"
        elif isinstance(ev, SearchCancelled):
            self.state = "stopped — everything found so far is kept"
        elif isinstance(ev, SearchFailed):
            self.state = "failed"
            self.message = ev.message

    def markdown(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.computed / self.eval_time if self.eval_time > 0 else 0.0
        line = [f"**Search {self.state}** · {self.evaluated} candidates evaluated · {rate:.2f} evals/s · {elapsed:.0f} s"]
        totals = [t for _, t in self.generation.values() if t]
        if self.minutes and self.state == "running":
            left = 60 * self.minutes - elapsed
            line.append(f"budget {self.minutes:g} min · {left:.0f} s left" if left > 0 else
                        f"budget {self.minutes:g} min spent · finishing ({self.stage or 'the last candidates'})")
        elif totals and self.state == "running":
            per = max(totals)
            done = sum(g for g, _ in self.generation.values())
            total = per * max(len(self.targets), len(self.generation))
            if done:
                line.append(f"generations {done}/{total} · about {elapsed / done * max(total - done, 0):.0f} s left")
        head = [" · ".join(line)]
        if self.stage and self.state == "running":
            head.append(f"*{self.stage}*")
        parts = ["  \n".join(head)]
        if self.best:  # one column per target: a short table beside the plot
            ts = sorted(self.best, reverse=True)
            gen = {t: self.generation.get(t, (0, self.generations)) for t in ts}
            parts.append("| target | " + " | ".join(target_words(t, self.share) for t in ts) + " |\n|---|"
                         + "---|" * len(ts) + "\n"
                         "| generation | " + " | ".join(f"{gen[t][0]}/{gen[t][1] or '…'}" for t in ts) + " |\n"
                         "| best fitness ppl | " + " | ".join(f"{self.best[t]:.3f}" for t in ts) + " |")
        if self.message:
            parts.append(f"⚠️ {self.message}")
        return "\n\n".join(parts)
