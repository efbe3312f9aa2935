"""Plotly figures: the quality-vs-cost Pareto plot and the per-layer chart of a subnet.

Each candidate point carries its id in `customdata`, which the page's click bridge sends back
to the server to pick it. The front is computed on the axes shown (parameters, predicted or
measured latency), never borrowed from another axis; what the axis cannot place (a candidate
not timed, a fitness that is only a lower bound) is left out and counted in the legend.
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
}
Y_AXES = {
    "perplexity (held-out, else search fitness)": "ppl",
    "search fitness perplexity": "fitness_ppl",
    "zero-shot accuracy (avg)": "zeroshot_acc",
}
BASELINE_STYLE = {"magnitude": ("diamond", "#e45756"), "wanda-sp": ("square", "#f58518"), "flap": ("cross", "#b279a2"),
                  "flap-uniform": ("x", "#9d755d")}
HIGHER_IS_BETTER = {"zeroshot_acc"}


def metric(c, key: str, latency=None) -> float | None:
    """A candidate's value on an axis. Measured latency is the paired speed-up over the dense model
    turned into ms/token at the run's dense reference (so points timed at different moments share
    one scale); a point without a measurement has none (it is not drawn with a prediction)."""
    m = c.metrics
    if key == "ppl":
        v = m.get("heldout_ppl")
        if v is None and not m.get("fitness_lower_bound"):
            v = m.get("fitness_ppl")
    elif key == "fitness_ppl":
        v = None if m.get("fitness_lower_bound") else m.get("fitness_ppl")
    elif key == "fraction":
        v = 100 * m["fraction"] if "fraction" in m else None
    elif key == "measured_latency_ms":
        sp = m.get("measured_speedup")
        dense = latency.dense_ms if latency is not None else m.get("measured_dense_ms")
        v = dense / sp if sp and dense else None
    else:
        v = m.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _hover(c, latency=None) -> str:
    m = c.metrics
    parts = [f"<b>{c.id}</b> ({c.origin}{', compensated' if getattr(c, 'compensated', False) else ''}, "
             f"target {c.target:.0%})", f"params {m.get('fraction', 0):.1%} of dense"]
    for k, label in (("fitness_ppl", "fitness ppl"), ("heldout_ppl", "held-out ppl"),
                     ("predicted_latency_ms", "pred. ms/tok"), ("zeroshot_acc", "zero-shot acc")):
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
                  title: str = "", latency=None, compared: list[str] | None = None) -> go.Figure:
    xk, yk = X_AXES.get(x_label, "fraction"), Y_AXES.get(y_label, "ppl")
    points, base, dense, missing = [], {}, [], 0
    for c in candidates:
        x, y = metric(c, xk, latency), metric(c, yk, latency)
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
    fig = go.Figure()

    def add(pts, name, **style):
        if not pts:
            return
        pts = sorted(pts, key=lambda p: p[1])
        fig.add_trace(go.Scatter(
            x=[p[1] for p in pts], y=[p[2] for p in pts], name=name, customdata=[[p[0].id] for p in pts],
            text=[_hover(p[0], latency) for p in pts], hovertemplate="%{text}<extra></extra>", **style))

    # drawn in this order, so dominated points are under everything a click should reach
    add([p for p in points if p[0].id not in front_ids], "evaluated (dominated)", mode="markers",
        marker=dict(size=6, color="rgba(76,120,168,0.25)", line=dict(width=0)))
    for name, pts in sorted(base.items()):
        symbol, color = BASELINE_STYLE.get(name, ("triangle-up", "#54a24b"))
        add(pts, f"baseline: {name}", mode="markers", marker=dict(size=11, symbol=symbol, color=color))
    add([p for p in front if p[0].origin != "dense"] + [p for p in front if p[0].origin == "dense"],
        f"Pareto front ({x_label.split(' (')[0]})", mode="lines+markers",
        marker=dict(size=11, color="#4c78a8", line=dict(width=1, color="white")), line=dict(color="#4c78a8"))
    add(dense, "dense model", mode="markers", marker=dict(size=16, symbol="star", color="#000000"))
    unreliable = [p for p in points + sum(base.values(), []) if xk == "measured_latency_ms"
                  and p[0].metrics.get("measured_reliable") is False]
    # rings around points: "overlay" tells the page's click bridge to pick the marker beneath them
    add(unreliable, "timing unreliable (wide spread)", mode="markers", meta="overlay",
        marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(width=2, color="#ff9da6"), symbol="circle-open"))
    everything = points + dense + sum(base.values(), [])
    if compared:
        add([p for p in everything if p[0].id in compared and p[0].id not in (picked or [])], "compared",
            mode="markers", meta="overlay", marker=dict(size=20, color="rgba(0,0,0,0)", line=dict(width=3, color="#ff9f1c")))
    if picked:
        add([p for p in everything if p[0].id in picked], "picked", mode="markers", meta="overlay",
            marker=dict(size=22, color="rgba(0,0,0,0)", line=dict(width=3, color="#d62728")))
    if missing:  # said, not hidden: why points are absent on this axis
        why = ("not timed" if xk == "measured_latency_ms" else "no value on this axis")
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"{missing} candidates {why}",
                                 marker=dict(size=6, color="rgba(0,0,0,0.15)"), hoverinfo="skip"))
    x_title = x_label
    if xk == "measured_latency_ms" and latency is not None:
        x_title = f"measured decode ms/token (paired with dense = {latency.dense_ms:.1f} ms)"
    fig.update_layout(  # legend under the axis: never over the title, readable on a projector
        title=dict(text=title or None, x=0.01, y=0.98, font=dict(size=20)), xaxis_title=x_title, yaxis_title=y_label,
        template="plotly_white", height=640, font=dict(size=15), margin=dict(l=70, r=20, t=50 if title else 20, b=40),
        clickmode="event", legend=dict(orientation="h", yanchor="top", y=-0.12, x=0), hovermode="closest",
        hoverlabel=dict(font_size=15))
    if yk in ("ppl", "fitness_ppl"):
        ys = [p[2] for p in everything if p[2] and p[2] > 0]
        # over two decades and more, label powers of ten only (Plotly's 2 and 5 between them clutter a projector)
        wide = bool(ys) and max(ys) / min(ys) >= 100
        fig.update_yaxes(type="log", **({"dtick": 1} if wide else {}))
    return fig


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
