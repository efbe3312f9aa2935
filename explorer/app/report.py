"""A run report: one self-contained HTML file a speaker can open offline or put in slides.

It holds the interactive Pareto plots (on parameters and on predicted latency, plotly.js inlined),
the table of each front, the cards of the subnets someone worked on (reformed, evaluated, timed or
prompted: everything the run's annotations record) and their side-by-side answers to the prompts
tried in the app (`prompts.jsonl` of the run). It reads only the run directory: no model is needed.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

from ..search.runs import Run, _read_jsonl, target_words

FRONT_FIELDS = (("id", "id"), ("origin", "origin"), ("fraction", "params"), ("fitness_ppl", "fitness ppl"),
                ("heldout_ppl", "held-out ppl"), ("ppl_after", "reformed ppl"), ("predicted_latency_ms", "pred. ms/tok"),
                ("measured_speedup", "measured speed-up"))


def _fmt(key: str, v) -> str:
    if v is None or v == "":
        return ""
    if key == "fraction":
        return f"{100 * float(v):.1f} %"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in FRONT_FIELDS)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(k, r.get(k))}</td>" for k, _ in FRONT_FIELDS) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _row(c) -> dict:
    return {"id": c.id, "origin": c.origin + (" (compensated)" if c.compensated else ""), **c.metrics}


def record_prompt(run: Run, prompt: str, answers: dict[str, str], settings: dict) -> None:
    """Append one prompt and the answers each model gave (label -> text) to the run."""
    from ..search.runs import _append_jsonl

    _append_jsonl(run.path / "prompts.jsonl", {"time": time.time(), "prompt": prompt, "answers": answers,
                                               "settings": settings})


def prompts(run: Run) -> list[dict]:
    return _read_jsonl(run.path / "prompts.jsonl")


def build_report(run: Run, title: str | None = None, extra_prompts: list[dict] = ()) -> str:
    """The report's HTML text (self-contained)."""
    from .plots import DEFAULT_Y, pareto_figure

    cands = run.candidates()
    by_id = {c.id: c for c in cands}
    fronts = run.fronts()
    latency = run.latency_model()
    st = run.settings
    title = title or run.path.name
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>model <b>{html.escape(str(st.get('model', '?')))}</b> · preset {html.escape(str(st.get('preset', '?')))}"
             f" · targets {', '.join(target_words(t, st.get('share', 'total')) for t in st.get('targets', []))} · "
             f"{len(cands)} candidates · "
             f"bias compensation {'on' if st.get('compensate') else 'off'} · status {html.escape(run.status)}</p>"]
    y = DEFAULT_Y
    for i, (axis, name) in enumerate((("parameters (% of dense)", "params"), ("predicted latency (ms/token)", "latency"))):
        fig = pareto_figure(cands, axis, y, title=f"{title}: quality vs {axis.split(' (')[0]}", latency=latency)
        parts.append(fig.to_html(include_plotlyjs=i == 0, full_html=False, default_height="560px"))
        rows = [_row(by_id[cid]) for cid in fronts.get(name, []) if cid in by_id]
        parts.append(f"<h2>Front on {html.escape(axis.split(' (')[0])}</h2>" + (_table(rows) if rows else "<p>empty</p>"))
    worked = [c for c in cands if any(k in c.metrics for k in ("ppl_after", "heldout_ppl", "measured_speedup",
                                                                 "zeroshot_acc")) and c.origin != "dense"]
    if worked:
        parts.append("<h2>Subnets worked on</h2>" + _table([_row(c) for c in worked]))
        for c in worked:
            s = c.subnet.summary(run.shape, c.compensated)
            parts.append(f"<h3>{html.escape(c.id)}</h3><p>{100 * s['fraction']:.1f} % of the parameters · "
                         f"{s['layers_kept']} of {run.shape.num_layers} blocks · ideal decode speed-up "
                         f"{s['ideal_decode_speedup']:.2f}x · kept query heads per layer {s['query_heads']} · "
                         f"head dims {s['head_dims']} · MLP widths {s['mlp_widths']}</p>")
    tried = prompts(run) + list(extra_prompts)
    if tried:
        parts.append("<h2>Prompts tried</h2>")
        for p in tried:
            cells = "".join(f"<td><b>{html.escape(k)}</b><pre>{html.escape(v)}</pre></td>"
                            for k, v in p.get("answers", {}).items())
            parts.append(f"<p class='prompt'>{html.escape(p.get('prompt', ''))}</p><table><tr>{cells}</tr></table>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;"
             "margin:1em 0} td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
             "pre{white-space:pre-wrap;max-width:40em} .prompt{font-style:italic}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}<p><small>Subnet Explorer run report, "
            f"{time.strftime('%Y-%m-%d %H:%M')}; run settings: <code>{html.escape(json.dumps(st)[:2000])}"
            f"</code></small></p></body></html>")


def write_report(run: Run, out: str | Path | None = None, extra_prompts: list[dict] = ()) -> Path:
    """Write the report (default: `report.html` in the run's folder)."""
    out = Path(out) if out else run.path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(build_report(run, extra_prompts=extra_prompts), encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["build_report", "write_report", "record_prompt", "prompts"]
