"""The Pareto plot draws the front of the axis it shows, leaves out (and counts) what that axis
cannot place, and never plots a prediction as a measurement."""
from __future__ import annotations

from explorer.app.plots import metric, pareto_figure
from explorer.model.subnet import ModelShape, Subnet
from explorer.search.runs import Candidate

SHAPE = ModelShape(4, 64, 8, 2, 16, 96, 97)
FULL = Subnet.full(SHAPE)


def cand(cid, fraction, fitness, pred=None, speedup=None, origin="search", lower=False):
    m = {"fraction": fraction, "fitness_ppl": fitness, "fitness_nll": fitness, "fitness_lower_bound": lower}
    if pred is not None:
        m["predicted_latency_ms"] = pred
    if speedup is not None:
        m.update(measured_speedup=speedup, measured_dense_ms=40.0, measured_spread=0.02, measured_reliable=True)
    return Candidate(cid, 0.7, 1, origin, FULL, m)


def traces(fig) -> dict:
    return {t.name: [cd[0] for cd in (t.customdata or [])] for t in fig.data}


def test_front_is_the_shown_axis_own():
    # a: small, bad; b: larger, good; c: fast (latency) but large
    cs = [cand("a", 0.5, 50.0, pred=30.0), cand("b", 0.7, 20.0, pred=35.0), cand("c", 0.9, 30.0, pred=10.0),
          cand("d", 0.95, 40.0, pred=40.0)]
    by_params = traces(pareto_figure(cs, "parameters (% of dense)", "search fitness perplexity"))
    front = next(v for k, v in by_params.items() if k.startswith("Pareto front"))
    assert front == ["a", "b"]  # c and d are dominated on size (b is smaller and better)
    by_latency = traces(pareto_figure(cs, "predicted latency (ms/token)", "search fitness perplexity"))
    front = next(v for k, v in by_latency.items() if k.startswith("Pareto front"))
    assert front == ["c", "b"]  # on latency c is the fastest; a and d are dominated
    assert set(by_latency["searched, dominated"]) == {"a", "d"}


def test_measured_axis_shows_only_measured_points_and_says_so():
    cs = [cand("a", 0.5, 50.0, pred=30.0, speedup=1.6), cand("b", 0.7, 20.0, pred=35.0)]
    assert metric(cs[1], "measured_latency_ms") is None  # a prediction is never a measurement
    assert metric(cs[0], "measured_latency_ms") == 40.0 / 1.6
    t = traces(pareto_figure(cs, "measured latency (ms/token)", "search fitness perplexity"))
    shown = {i for ids in t.values() for i in ids}
    assert "b" not in shown and "a" in shown
    assert any(k.startswith("1 candidates not timed") for k in t)


def test_early_stopped_candidates_are_left_out_of_fitness_fronts():
    cs = [cand("a", 0.5, 5.0, lower=True), cand("b", 0.7, 20.0)]
    t = traces(pareto_figure(cs, "parameters (% of dense)", "search fitness perplexity"))
    assert "a" not in {i for ids in t.values() for i in ids}
    assert any("no value on this axis" in k for k in t)


def test_status_says_generation_n_of_n_from_the_start():
    """Before any generation ends the table already says 0/N (N from the run's settings), never "0/…"."""
    from explorer.events import CandidateEvaluated, GenerationFinished, SearchStarted
    from explorer.ui.views import SearchStatus

    st = SearchStatus()
    st.update(SearchStarted("run", (0.7,), {"generations": 4}, False, 0))
    st.update(CandidateEvaluated(cand("a", 0.7, 20.0), False, 1))
    assert "| generation | 0/4 |" in st.markdown() and "| best fitness ppl | 20.000 |" in st.markdown()
    assert "…" not in st.markdown()
    st.update(GenerationFinished(0.7, 1, 20.0, "a", 1.0, 1, 0, 4))
    assert "| generation | 1/4 |" in st.markdown() and "generations 1/4" in st.markdown()
    budgeted = SearchStatus()  # a time budget: the clock, not a count, says how much is left
    budgeted.update(SearchStarted("run", (0.7,), {"generations": 4, "minutes": 5}, False, 0))
    budgeted.update(CandidateEvaluated(cand("a", 0.7, 20.0), False, 1))
    budgeted.update(GenerationFinished(0.7, 1, 20.0, "a", 1.0, 1, 0, 0))
    text = budgeted.markdown()
    assert "budget 5 min" in text and "s left" in text and "| generation | 1/… |" in text


def test_log_axis_labels_powers_of_ten_only_when_it_spans_decades():
    wide = [cand("a", 0.5, 5000.0), cand("b", 0.7, 20.0)]
    narrow = [cand("a", 0.5, 50.0), cand("b", 0.7, 20.0)]
    fig = pareto_figure(wide, "parameters (% of dense)", "search fitness perplexity")
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick == 1
    fig = pareto_figure(narrow, "parameters (% of dense)", "search fitness perplexity")
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick is None  # Plotly's own ticks within a decade


def test_the_heldout_axis_means_one_thing_for_every_point():
    """Held-out perplexity everywhere: the dense star and an evaluated pick at their measured values, the
    rest estimated from their fitness by the dense model's ratio (hollow, and the hover says so); a
    point far above the front sits at the top edge with its value written, not stretching the axis."""
    import math

    dense = Candidate("c00000", 1.0, 0, "dense", FULL, {"fraction": 1.0, "fitness_ppl": 40.0, "fitness_nll": 1.0,
                                                         "heldout_ppl": 30.0})
    evaluated = cand("b", 0.7, 80.0)
    evaluated = Candidate("b", 0.7, 1, "search", FULL, {**evaluated.metrics, "heldout_ppl": 55.0})
    estimated = cand("a", 0.5, 120.0)
    far = cand("m", 0.7, 4e5, origin="baseline:magnitude")
    fig = pareto_figure([dense, evaluated, estimated, far], "parameters (% of dense)", "held-out perplexity")
    by_id = {cd[0]: (t, k) for t in fig.data for k, cd in enumerate(t.customdata or []) if t.name != "picked"}
    star, k = by_id["c00000"]
    assert star.name == "dense model" and star.y[k] == 30.0
    tr, k = by_id["b"]
    assert tr.y[k] == 55.0 and not tr.marker.symbol[k].endswith("-open")
    tr, k = by_id["a"]
    assert math.isclose(tr.y[k], 120.0 * 30.0 / 40.0) and tr.marker.symbol[k].endswith("-open")
    assert "estimated from the fitness" in tr.text[k] and "search fitness ppl 120" in tr.text[k]
    tr, k = by_id["m"]
    top = tr.y[k]
    assert tr.marker.symbol[k] == "triangle-up" and top < 4e5 * 30 / 40 and "top edge" in tr.text[k]
    assert any(t.mode == "text" and "3e+05" in str(t.text) for t in fig.data)  # its value, written
    assert 10 ** fig.layout.yaxis.range[1] < 4e5  # the axis is not stretched to it


def test_a_run_without_a_heldout_dense_value_is_drawn_at_its_fitness_and_says_so():
    """No held-out value of the dense model, so no estimate: every point at its fitness, the axis title
    saying which perplexity it shows, rather than an empty plot."""
    dense = Candidate("c00000", 1.0, 0, "dense", FULL, {"fraction": 1.0, "fitness_ppl": 40.0, "fitness_nll": 1.0})
    fig = pareto_figure([dense, cand("a", 0.5, 120.0)], "parameters (% of dense)", "held-out perplexity")
    ys = {cd[0]: t.y[k] for t in fig.data for k, cd in enumerate(t.customdata or [])}
    assert ys == {"c00000": 40.0, "a": 120.0}
    assert fig.layout.yaxis.title.text.startswith("search fitness perplexity") and "no held-out" in \
        fig.layout.yaxis.title.text
