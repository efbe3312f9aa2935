"""The search's timing steps: the machine's latency model (read from the cache, or fitted once,
by a deadline after a time budget), predictions for candidates archived before it existed, and
the front timed for real, paired with the dense model. Process 0's work, after every candidate.
Timing blocks for seconds at a time, so it runs in a worker thread (`events.streamed`) and its
rounds are streamed as progress while it runs; Stop is read between runs.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable, Iterator

from ..events import LatencyMeasured, StageProgress, streamed
from ..model.latency import OutOfTime
from ..model.loading import LoadedModel, cache_root
from ..model.slicing import ChannelMeans, candidate_model
from ..model.subnet import ModelShape
from ..settings import SearchSettings
from .archive import Archive
from .latency_model import LatencyModel, cached_latency_model, measure
from .runs import Run


def search_latency_model(lm: LoadedModel, s: SearchSettings, run: Run, cancel: threading.Event | None, fit: bool,
                         deadline: float | None = None) -> Iterator[Any]:
    """The run's latency model: its own file (resume), else the machine's cached one, else (with `fit`)
    fitted now, by `deadline` (perf_counter); without `fit` and without a cached model, None (the
    search then fits it at the end, off the path to the first points). A fit that runs out of time
    is skipped, saying so: latencies then stay unpredicted until a search with time for it fits it."""
    if not s.latency:
        return None
    path = run.path / "latency_model.json"
    if path.is_file():
        return LatencyModel.from_dict(json.loads(path.read_text()))
    # fitted over every width a search of this model can choose, so one fit serves every target
    head_dims = sorted({max(2, s.head_multiple), lm.shape.head_dim})
    widths = sorted({min(s.multiple, lm.shape.intermediate_size), lm.shape.intermediate_size})
    cache = cache_root() / "latency"
    if not fit:
        model, cached = cached_latency_model(lm, head_dims, widths, cache, fit=False)
    else:
        yield StageProgress("latency model", 0, 1, "timing sliced models with the dense one (cached per machine)")
        try:
            model, cached = yield from streamed_stage(
                "latency model", lambda on_event: cached_latency_model(lm, head_dims, widths, cache, on_event, cancel,
                                                                       fit=True, deadline=deadline))
        except OutOfTime as e:
            yield StageProgress("latency model", 1, 1, f"skipped: {e}; a later search with time for it fits it")
            return None
    if model is None:
        return None
    path.write_text(json.dumps(model.to_dict(), indent=2))
    yield StageProgress("latency model", 1, 1, "reused from the cache" if cached else
                        f"fitted (mean error {model.fit_error:.1%})")
    return model


def streamed_stage(stage: str, work: Callable) -> Iterator[Any]:
    """`work(on_event)` in a worker thread, its Progress events yielded as StageProgress of `stage`
    while it runs; returns its result."""
    gen = streamed(work)
    while True:
        try:
            e = next(gen)
        except StopIteration as stop:
            return stop.value
        yield StageProgress(stage, e.done, e.total, e.message)


def predict_archive(run: Run, archive: Archive, latency: LatencyModel, shape: ModelShape) -> None:
    """Predicted latencies for the candidates archived before the latency model existed (annotations)."""
    for c in archive.candidates:
        if "predicted_latency_ms" not in c.metrics:
            ms = latency.dense_ms if c.origin == "dense" else latency.predict(c.subnet, shape)
            extra = {"predicted_latency_ms": round(ms, 4)}
            if c.origin == "dense":
                extra.update(measured_ms=round(latency.dense_ms, 4), measured_speedup=1.0, measured_reliable=True)
            run.annotate(c.id, extra)
    archive.latency = latency
    stored = {c.id: c for c in run.candidates()}  # with the annotations merged
    archive.candidates[:] = [stored.get(c.id, c) for c in archive.candidates]


def measure_front(lm: LoadedModel, run: Run, archive: Archive, best: dict, fronts: dict, means: ChannelMeans,
                  limit: int, cancel: threading.Event | None) -> Iterator[Any]:
    """Time front members for real, paired with the dense model (best per target first), off the
    critical path: every candidate was found before this runs."""
    by_id = {c.id: c for c in archive.candidates}
    ids = [c.id for c in best.values()] + list(fronts["params"]) + list(fronts["latency"])
    chosen = [by_id[i] for i in dict.fromkeys(ids) if i in by_id and by_id[i].origin != "dense"
              and "measured_speedup" not in by_id[i].metrics][:limit]
    if not chosen:
        return
    yield StageProgress("measure front", 0, len(chosen), f"timing {len(chosen)} front members with the dense model")
    models = {c.id: candidate_model(lm.model, c, means) for c in chosen}
    got = yield from streamed_stage("measure front", lambda on_event: measure(
        lm.model, models, lm.shape.vocab_size, cancel=cancel, on_event=on_event))
    for c in chosen:
        m = got[c.id]
        run.annotate(c.id, m.metrics())
        yield LatencyMeasured(c.id, m.to_dict())


__all__ = ["search_latency_model", "predict_archive", "measure_front", "streamed_stage"]
