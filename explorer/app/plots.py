"""Plotly figures: the quality-vs-cost Pareto plot and the per-layer chart of a subnet.

Each axis means one thing. The default y axis is held-out perplexity, for every point: measured
on the held-out text where it was (the dense model at Load, a pick once evaluated: it moves
there), and elsewhere estimated from the search's fitness by the dense model's ratio of the two
(held-out / fitness), drawn hollow and saying so in the hover, which always shows the fitness
too. The search fitness and zero-shot accuracy are axes of their own. Points far above the front
(a magnitude baseline at 1e5) sit at the top edge with their value written, instead of
stretching the range. Each point carries its id in `customdata`; a click picks the point the
hover shows. The front is computed on the axes shown, never borrowed from another axis; what an
axis cannot place is left out and counted in the legend.
"""
from __future__ import annotations

import math
from typing import Iterable

import plotly.graph_objects as go

from ..search.pareto import pareto_front

X_AXES = {
    "predicted latency (ms/token)": "predicted_latency_ms",
    "measured latency (ms/token)": "measured_latency_ms",
    "parameters (% of dense)": "fraction",
    "block parameters (% of the dense blocks)": "prunable_fraction",
}
Y_AXES = {
    "held-out perplexity": "heldout",
    "search fitness perplexity": "fitness_ppl",
    "zero-shot accuracy (avg)": "zeroshot_acc",
}
DEFAULT_X, DEFAULT_Y = "parameters (% of dense)", "held-out perplexity"
BASELINE_STYLE = {"magnitude": ("diamond", "#e45756"), "wanda-sp": ("square", "#f58518"), "flap": ("cross", "#b279a2"),
                  "flap-uniform": ("x", "#9d755d")}
HIGHER_IS_BETTER = {"zeroshot_acc"}


def heldout_ratio(candidates) -> float | None:
    """The dense model's held-out perplexity over its fitness perplexity: what turns a fitness into an
    estimate of held-out perplexity (None until the dense model's held-out perplexity is known)."""
    for c in candidates:
        if c.origin == "dense" and c.metrics.get("heldout_ppl") and c.metrics.get("fitness_ppl"):
            return float(c.metrics["heldout_ppl"]) / float(c.metrics["fitness_ppl"])
    return None


def heldout(c, ratio: float | None) -> tuple[float | None, bool]:
    """(held-out perplexity, measured): measured where it was, else estimated from the fitness."""
    m = c.metrics
    if m.get("heldout_ppl") is not None:
        return float(m["heldout_ppl"]), True
    if ratio is None or m.get("fitness_lower_bound") or m.get("fitness_ppl") is None:
        return None, False
    return float(m["fitness_ppl"]) * ratio, False


def metric(c, key: str, latency=None, ratio: float | None = None) -> float | None:
    """A candidate's value on an axis. Measured latency is the paired speed-up over the dense model
    turned into ms/token at the run's dense reference (so points timed at different moments share
    one scale); a point without a measurement has none (it is not drawn with a prediction)."""
    m = c.metrics
    if key == "heldout":
        v = heldout(c, ratio)[0]
    elif key == "fitness_ppl":
        v = None if m.get("fitness_lower_bound") else m.get("fitness_ppl")
    elif key in ("fraction", "prunable_fraction"):
        v = 100 * m[key] if key in m else None
    elif key == "measured_latency_ms":
        sp = m.get("measured_speedup")
        dense = latency.dense_ms if latency is not None else m.get("measured_dense_ms")
        v = dense / sp if sp and dense else None
    else:
        v = m.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


NAMES = {"dense": "the dense model", "search": "searched", "init": "initial subnet", "upload": "opened from a file",
         "baseline:magnitude": "magnitude baseline", "baseline:wanda-sp": "Wanda-sp baseline",
         "baseline:flap": "FLAP baseline", "baseline:flap-uniform": "FLAP baseline, one ratio in every layer"}


def _hover(c, latency=None, ratio: float | None = None) -> str:
    m = c.metrics
    parts = [f"<b>{c.id}</b> ({NAMES.get(c.origin, c.origin)}{', bias-compensated' if getattr(c, 'compensated', False) else ''}"
             + (f", target {c.target_words})" if c.origin != "dense" else ")"),
             f"params {m.get('fraction', 0):.1%} of dense ({m.get('prunable_fraction', 0):.1%} of the blocks)"]
    value, measured = heldout(c, ratio)
    if value is not None:
        parts.append(f"held-out ppl {value:.4g}" + ("" if measured else " (estimated from the fitness)"))
    if m.get("reformed_heldout_ppl", m.get("ppl_after")) is not None:
        parts.append(f"held-out ppl after reform {m.get('reformed_heldout_ppl', m.get('ppl_after')):.4g}")
    for k, label in (("fitness_ppl", "search fitness ppl"), ("predicted_latency_ms", "pred. ms/tok"),
                     ("zeroshot_acc", "zero-shot acc")):
        if m.get(k) is not None:
            parts.append(f"{label} {m[k]:.4g}")
    if m.get("fitness_lower_bound"):
        parts.append("fitness stopped early (lower bound)")
    meas = metric(c, "measured_latency_ms", latency)
    if meas is not None:
        parts.append(f"meas. ms/tok {meas:.4g} (speed-up {m['measured_speedup']:.2f}x, spread "
                     f"{100 * m.get('measured_spread', 0):.0f}%{'' if m.get('measured_reliable', True) else ', unreliable'})")
    return "<br>".join(parts)


def pareto_figure(candidates: Iterable, x_label: str, y_label: str, picked: list[str] | None = None,
                  title: str = "", latency=None, compared: list[str] | None = None, height: int = 520) -> go.Figure:
    candidates = list(candidates)
    xk, yk = X_AXES.get(x_label, "fraction"), Y_AXES.get(y_label, "heldout")
    ratio = heldout_ratio(candidates)
    unmeasured = yk == "heldout" and ratio is None  # no held-out value of the dense model in this run yet:
    if unmeasured:  # the fitness, said so on the axis, rather than an empty plot
        yk = "fitness_ppl"
    points, base, dense, missing = [], {}, [], 0
    for c in candidates:
        x, y = metric(c, xk, latency, ratio), metric(c, yk, latency, ratio)
        if x is None or y is None:
            missing += c.origin != "dense"
            continue
        if c.origin == "dense":
            dense.append((c, x, y))
        elif c.origin.startswith("baseline:"):
            base.setdefault(c.origin.split(":", 1)[1], []).append((c, x, y))
        else:
            points.append((c, x, y))
    better = (lambda p: -p[2]) if yk in HIGHER_IS_BETTER else (lambda p: p[2])
    front = pareto_front(points + dense, lambda p: p[1], better)
    front_ids = {p[0].id for p in front}
    everything = points + dense + sum(base.values(), [])
    top = _top_edge(front, dense, everything, yk)
    fig = go.Figure()
    edge_traces: list[str] = []

    def measured(p) -> bool:
        return yk != "heldout" or heldout(p[0], ratio)[1]

    def add(pts, name, marker: dict, edge_values: bool = True, **style):
        """One trace; points past the top edge sit on it as triangles with their value written."""
        if not pts:
            return
        pts = sorted(pts, key=lambda p: p[1])
        over = [top is not None and p[2] > top for p in pts]
        shown = [top if o else p[2] for p, o in zip(pts, over)]
        symbol = marker.pop("symbol", "circle")
        symbols = ["triangle-up" if o else symbol + ("" if measured(p) or style.get("meta") else "-open")
                   for p, o in zip(pts, over)]
        fig.add_trace(go.Scatter(
            x=[p[1] for p in pts], y=shown, name=name, customdata=[[p[0].id] for p in pts],
            text=[_hover(p[0], latency, ratio) + ("<br><i>drawn at the top edge</i>" if o else "")
                  for p, o in zip(pts, over)],
            hovertemplate="%{text}<extra></extra>", marker=dict(symbol=symbols, **marker), **style))
        if any(over) and edge_values:  # each trace's values on its own side, so two at one x stay legible
            side = ("bottom center", "middle right", "middle left")[len(edge_traces) % 3]
            edge_traces.append(name)
            fig.add_trace(go.Scatter(
                x=[p[1] for p, o in zip(pts, over) if o], y=[top for o in over if o], mode="text",
                text=[f"{p[2]:.2g}" for p, o in zip(pts, over) if o], textposition=side, showlegend=False,
                hoverinfo="skip", textfont=dict(size=12, color=marker.get("color", "#555"))))

    # drawn in this order, so dominated points are under everything a click should reach
    add([p for p in points if p[0].id not in front_ids], "searched, dominated", dict(size=6, color="rgba(76,120,168,0.3)"),
        mode="markers", edge_values=False)
    for name, pts in sorted(base.items()):
        symbol, color = BASELINE_STYLE.get(name, ("triangle-up", "#54a24b"))
        add(pts, f"baseline: {BASELINE_LABELS.get(name, name)}", dict(size=11, symbol=symbol, color=color),
            mode="markers")
    add([p for p in front if p[0].origin != "dense"] + [p for p in front if p[0].origin == "dense"],
        f"Pareto front ({x_label.split(' (')[0]})", dict(size=11, color="#4c78a8", line=dict(width=1, color="white")),
        mode="lines+markers", line=dict(color="#4c78a8"))
    add(dense, "dense model", dict(size=16, symbol="star", color="#000000"), mode="markers")
    if yk == "heldout":  # where reformation took an evaluated point: a second marker, joined to the first
        after = [(p[0], p[1], float(p[0].metrics.get("reformed_heldout_ppl", p[0].metrics.get("ppl_after"))))
                 for p in everything if p[0].metrics.get("reformed_heldout_ppl", p[0].metrics.get("ppl_after"))]
        for c, x, y in after:
            fig.add_trace(go.Scatter(x=[x, x], y=[metric(c, yk, latency, ratio), y], mode="lines", showlegend=False,
                                     hoverinfo="skip", line=dict(color="#2ca02c", dash="dot", width=2)))
        add(after, "after reform (measured)", dict(size=13, symbol="diamond", color="#2ca02c"), mode="markers",
            meta="overlay")
    unreliable = [p for p in points + sum(base.values(), []) if xk == "measured_latency_ms"
                  and p[0].metrics.get("measured_reliable") is False]
    # rings around points: "overlay" tells the page's click bridge to pick the marker beneath them
    add(unreliable, "timing unreliable (wide spread)",
        dict(size=18, color="rgba(0,0,0,0)", line=dict(width=2, color="#ff9da6"), symbol="circle-open"),
        mode="markers", meta="overlay")
    if compared:
        add([p for p in everything if p[0].id in compared and p[0].id not in (picked or [])], "compared",
            dict(size=20, color="rgba(0,0,0,0)", line=dict(width=3, color="#ff9f1c")), mode="markers", meta="overlay")
    if picked:
        add([p for p in everything if p[0].id in picked], "picked",
            dict(size=22, color="rgba(0,0,0,0)", line=dict(width=3, color="#d62728")), mode="markers", meta="overlay")
    if missing:  # said, not hidden: why points are absent on this axis
        why = ("not timed" if xk == "measured_latency_ms" else "without a held-out value (load the model to "
               "estimate them)" if yk == "heldout" else "no value on this axis")
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"{missing} candidates {why}",
                                 marker=dict(size=6, color="rgba(0,0,0,0.15)"), hoverinfo="skip"))
    x_title = x_label
    if xk == "measured_latency_ms" and latency is not None:
        x_title = f"measured decode ms/token (paired with dense = {latency.dense_ms:.1f} ms)"
    y_title = {"heldout": "held-out perplexity (hollow = estimated)",
               "fitness_ppl": "search fitness perplexity (calibration windows)"}.get(yk, y_label)
    if unmeasured:
        y_title = "search fitness perplexity (no held-out value of the dense model in this run)"
    fig.update_layout(  # legend under the axis: never over the title, readable on a projector
        title=dict(text=title or None, xref="paper", x=0, y=0.98, font=dict(size=18)), xaxis_title=x_title, yaxis_title=y_title,
        template="plotly_white", height=height, font=dict(size=14), margin=dict(l=80, r=20, t=40 if title else 15, b=40),
        clickmode="event", legend=dict(orientation="h", yanchor="top", y=-0.14, x=0), hovermode="closest",
        hoverlabel=dict(font_size=14))
    if yk in ("heldout", "fitness_ppl"):
        ys = [min(p[2], top) if top else p[2] for p in everything if p[2] and p[2] > 0]
        # over two decades and more, label powers of ten only (Plotly's 2 and 5 between them clutter a projector)
        wide = bool(ys) and max(ys) / min(ys) >= 100
        fig.update_yaxes(type="log", automargin=True, **({"dtick": 1} if wide else {}))
        if ys:
            lo, hi = min(ys) / 1.15, max(ys) * 1.25
            fig.update_yaxes(range=[math.log10(lo), math.log10(hi)])
            if not wide:  # within two decades: 1-2-5 ticks written in full (Plotly's default writes "5" for 500)
                ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                         for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]
                fig.update_yaxes(tickvals=ticks, ticktext=[f"{v:g}" for v in ticks])
    return fig


BASELINE_LABELS = {"flap-uniform": "FLAP, one ratio per layer", "wanda-sp": "Wanda-sp", "flap": "FLAP",
                   "magnitude": "magnitude"}


def _top_edge(front, dense, everything, yk: str) -> float | None:
    """Where a perplexity axis ends: a few times above the front and the dense model, so that a point
    far above them (a baseline in the thousands) does not squash the front into a line."""
    if yk not in ("heldout", "fitness_ppl"):
        return None
    core = [p[2] for p in front + dense if p[2] and p[2] > 0]
    if not core:
        return None
    top = 4.0 * max(core)
    return top if any(p[2] > top for p in everything) else None


def layer_figure(summary: dict, shape) -> go.Figure:
    """Kept attention (query heads x head dims) and MLP channels per layer, as a fraction of the original."""
    heads, dims, widths = summary["query_heads"], summary["head_dims"], summary["mlp_widths"]
    layers = list(range(len(widths)))
    full_attn = shape.num_heads * shape.head_dim
    fig = go.Figure()
    fig.add_trace(go.Bar(x=layers, y=[h * d / full_attn for h, d in zip(heads, dims)], name="attention kept",
                         marker_color="#4c78a8", customdata=[[h, d] for h, d in zip(heads, dims)],
                         hovertemplate="layer %{x}: %{customdata[0]} heads x %{customdata[1]} of "
                                       + str(shape.head_dim) + " dims<extra></extra>"))
    fig.add_trace(go.Bar(x=layers, y=[w / shape.intermediate_size for w in widths], name="MLP channels kept",
                         marker_color="#f58518", customdata=widths,
                         hovertemplate="layer %{x}: %{customdata} of " + str(shape.intermediate_size)
                         + " channels<extra></extra>"))
    fig.update_layout(barmode="group", template="plotly_white", height=330, yaxis=dict(range=[0, 1.05],
                      tickformat=".0%"), xaxis_title="layer", margin=dict(l=50, r=10, t=40, b=90),  # t: under Gradio's label
                      legend=dict(orientation="h", yanchor="top", y=-0.3, x=0))  # under the axis, clear of the label
    return fig
