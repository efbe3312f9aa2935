"""Plotly figures: the quality-latency/size Pareto plot and the per-layer chart of a subnet.

Each candidate point carries its id in `customdata`, which the page's click bridge sends back
to the server to pick it.
"""
from __future__ import annotations

import math
from typing import Iterable

import plotly.graph_objects as go

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
BASELINE_STYLE = {"magnitude": ("diamond", "#e45756"), "wanda-sp": ("square", "#f58518"), "flap": ("cross", "#b279a2")}


def metric(c, key: str) -> float | None:
    m = c.metrics
    if key == "ppl":
        v = m.get("heldout_ppl", m.get("fitness_ppl"))
    elif key == "fraction":
        v = 100 * m["fraction"] if "fraction" in m else None
    elif key == "measured_latency_ms":
        v = m.get("measured_latency_ms", m.get("predicted_latency_ms"))
    else:
        v = m.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _hover(c) -> str:
    m = c.metrics
    parts = [f"<b>{c.id}</b> ({c.origin}, target {c.target:.0%})", f"params {m.get('fraction', 0):.1%} of dense"]
    for k, label in (("fitness_ppl", "fitness ppl"), ("heldout_ppl", "held-out ppl"),
                     ("predicted_latency_ms", "pred. ms/tok"), ("measured_latency_ms", "meas. ms/tok"),
                     ("zeroshot_acc", "zero-shot acc")):
        if m.get(k) is not None:
            parts.append(f"{label} {m[k]:.4g}")
    return "<br>".join(parts)


def pareto_figure(candidates: Iterable, front_ids: set[str], x_label: str, y_label: str,
                  picked: list[str] | None = None, title: str = "") -> go.Figure:
    xk, yk = X_AXES.get(x_label, "fraction"), Y_AXES.get(y_label, "ppl")
    groups: dict[str, list] = {"candidates": [], "front": [], "dense": []}
    base: dict[str, list] = {}
    for c in candidates:
        x, y = metric(c, xk), metric(c, yk)
        if x is None or y is None:
            continue
        if c.origin == "dense":
            groups["dense"].append((c, x, y))
        elif c.origin.startswith("baseline:"):
            base.setdefault(c.origin.split(":", 1)[1], []).append((c, x, y))
        elif c.id in front_ids:
            groups["front"].append((c, x, y))
        else:
            groups["candidates"].append((c, x, y))
    fig = go.Figure()

    def add(points, name, **style):
        if not points:
            return
        points = sorted(points, key=lambda p: p[1])
        fig.add_trace(go.Scatter(
            x=[p[1] for p in points], y=[p[2] for p in points], name=name,
            customdata=[[p[0].id] for p in points], text=[_hover(p[0]) for p in points],
            hovertemplate="%{text}<extra></extra>", **style))

    add(groups["candidates"], "evaluated", mode="markers",
        marker=dict(size=6, color="rgba(76,120,168,0.25)", line=dict(width=0)))
    add(groups["front"], "Pareto front", mode="lines+markers",
        marker=dict(size=11, color="#4c78a8", line=dict(width=1, color="white")), line=dict(color="#4c78a8"))
    for name, points in sorted(base.items()):
        symbol, color = BASELINE_STYLE.get(name, ("triangle-up", "#54a24b"))
        add(points, f"baseline: {name}", mode="markers", marker=dict(size=11, symbol=symbol, color=color))
    add(groups["dense"], "dense model", mode="markers",
        marker=dict(size=16, symbol="star", color="#000000"))
    if picked:
        pts = [(c, x, y) for g in (*groups.values(), *base.values()) for (c, x, y) in g if c.id in picked]
        add(pts, "picked", mode="markers", marker=dict(size=20, color="rgba(0,0,0,0)",
                                                         line=dict(width=3, color="#d62728")))
    fig.update_layout(
        title=title or None, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white",
        height=480, margin=dict(l=60, r=20, t=40 if title else 20, b=50), clickmode="event",
        legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0), hovermode="closest")
    if yk in ("ppl", "fitness_ppl"):
        fig.update_yaxes(type="log")
    return fig


def layer_figure(summary: dict, shape) -> go.Figure:
    """Kept attention dims and MLP channels per layer, as a fraction of the original width."""
    heads, widths = summary["head_dims"], summary["mlp_widths"]
    layers = list(range(len(heads)))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=layers, y=[h / shape.head_dim for h in heads], name="attention dims kept",
                         marker_color="#4c78a8", customdata=heads,
                         hovertemplate="layer %{x}: %{customdata} of " + str(shape.head_dim) + " dims<extra></extra>"))
    fig.add_trace(go.Bar(x=layers, y=[w / shape.intermediate_size for w in widths], name="MLP channels kept",
                         marker_color="#f58518", customdata=widths,
                         hovertemplate="layer %{x}: %{customdata} of " + str(shape.intermediate_size)
                         + " channels<extra></extra>"))
    fig.update_layout(barmode="group", template="plotly_white", height=260, yaxis=dict(range=[0, 1.05],
                      tickformat=".0%"), xaxis_title="layer", margin=dict(l=50, r=10, t=10, b=40),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0))
    return fig
