"""The search engine (METHOD section 3): several targets in one run, every candidate archived,
streamed as typed events.

`run_search` validates its input eagerly (bad targets raise ExplorerError before any work),
then returns an iterator of events; the CLI and the UI only render them. Every evaluated
candidate is appended to the run directory as it happens. The search is deterministic for a
seed, which is what makes resume cheap: a resumed run replays the same decisions and takes the
fitness of every stored candidate from the JSONL instead of evaluating it again.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import Cancelled, ExplorerError
from .events import Progress
from .evolution import Probs, make_space
from .loading import LoadedModel
from .subnet import ModelShape

SCHEMA = 1


@dataclass(frozen=True)
class SearchSettings:
    """Everything that decides a search's result; saved in run.json. Defaults = the demo preset."""

    targets: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5)  # fractions of total parameters
    preset_name: str = "demo"  # stored as "preset" in run.json
    seed: int = 0
    corpus: str = "bbc"
    calib_windows: int = 32  # importance calibration
    calib_seq_len: int = 256
    fitness_windows: int = 4  # fitness perplexity
    fitness_seq_len: int = 256
    fitness_dtype: str = "auto"  # compute dtype of fitness; "auto" = bf16 where the hardware has it (stored resolved)
    fitness_batch: int = 2  # windows per forward; early stop is checked between batches
    population: int = 10  # first generation: mutations of the best initial subnet
    generations: int = 4  # after the first
    top_k: int = 5
    mutations: int = 6  # per generation
    crossovers: int = 3
    fresh: int = 1  # mutations of the initial subnet
    first_probs: Probs = Probs(depth=0.0, ratio=0.15, mask=0.0)
    probs: Probs = Probs(depth=0.02, ratio=0.1, mask=0.02)
    window: float = 0.005  # a candidate's size lies in [target - window, target]
    multiple: int = 8  # MLP widths rounded to this
    head_multiple: int = 8  # kept head dims rounded to this (whole rotary pairs)
    depth: bool = True  # allow dropping blocks (METHOD's depth ranges)
    split_init: int = 4  # extra initial subnets: uniform, at this many attention widths
    init_scorings: tuple[str, ...] = ("obs", "wanda")  # scores that rank the initial subnets' channels
    baselines: tuple[str, ...] = ("magnitude", "wanda-sp", "flap")
    early_stop: bool = True
    cache_mb: int = 384  # prefix hidden-state cache
    latency: bool = True  # fit a latency model and measure the front for real
    measure_max: int = 8  # front members measured for real
    max_tries: int = 20  # resamples for a child that is out of the window or already seen

    @classmethod
    def preset(cls, name: str, **overrides) -> "SearchSettings":
        if name not in PRESETS:
            raise ExplorerError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ExplorerError(f"unknown search setting(s): {', '.join(bad)}")
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["preset"] = d.pop("preset_name")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSettings":
        d = dict(d)
        if "preset" in d:
            d["preset_name"] = d.pop("preset")
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d.setdefault("fitness_dtype", "float32")  # runs from before the setting computed fitness in fp32
        d.setdefault("fitness_batch", 1)
        for k in ("first_probs", "probs"):
            if isinstance(d.get(k), dict):
                d[k] = Probs(**d[k])
        for k in ("targets", "baselines", "init_scorings"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


PRESETS: dict[str, SearchSettings] = {
    "demo": SearchSettings(),
    "paper": SearchSettings(
        preset_name="paper", calib_windows=128, calib_seq_len=2048, fitness_windows=5, fitness_seq_len=2048,
        population=100, generations=50, top_k=10, mutations=50, crossovers=30, fresh=20,
        first_probs=Probs(depth=0.0, ratio=0.3, mask=0.6), probs=Probs(depth=0.1, ratio=0.1, mask=0.3),
        window=0.01, cache_mb=2048, measure_max=16),
}


# ---- events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchStarted:
    run_dir: str
    targets: tuple[float, ...]
    settings: dict
    resumed: bool
    stored: int  # candidates already in the run


@dataclass(frozen=True)
class StageProgress(Progress):
    """Calibration steps before the search proper (importance, latency model): a Progress of its own
    type, so the UI and the CLI can tell it from the candidates' stream."""


@dataclass(frozen=True)
class CandidateEvaluated:
    candidate: Any  # runs.Candidate
    replayed: bool  # taken from the run directory, not evaluated again
    evaluated: int  # candidates so far in this run


@dataclass(frozen=True)
class GenerationFinished:
    target: float
    generation: int
    best_fitness: float
    best_id: str
    evals_per_s: float  # this generation's real evaluations per second of evaluation time
    evaluated: int  # evaluated in this generation (replayed included)
    stopped_early: int
    generations: int  # total per target, for progress bars


@dataclass(frozen=True)
class FrontChanged:
    params: tuple[str, ...]
    latency: tuple[str, ...]


@dataclass(frozen=True)
class SearchFinished:
    summary: dict


@dataclass(frozen=True)
class SearchCancelled:
    summary: dict
    message: str = "cancelled by the user"


@dataclass(frozen=True)
class SearchFailed:
    message: str


def validate_targets(targets, shape: ModelShape, settings: SearchSettings) -> tuple[float, ...]:
    if not targets:
        raise ExplorerError("give at least one target fraction, e.g. 0.7")
    out = []
    for t in targets:
        try:
            t = float(t)
        except (TypeError, ValueError):
            raise ExplorerError(f"target {t!r} is not a number") from None
        if not (0 < t <= 1) or math.isnan(t):
            raise ExplorerError(f"target {t} is outside (0, 1]: targets are fractions of the total parameters")
        make_space(shape, t, settings.window, settings.multiple, settings.head_multiple, settings.depth)
        out.append(round(t, 6))
    if len(set(out)) != len(out):
        raise ExplorerError("targets repeat")
    return tuple(sorted(out, reverse=True))


def run_search(lm: LoadedModel, settings: SearchSettings, run_dir: str | Path,
               cancel: threading.Event | None = None, resume: bool = False, *,
               windows: tuple | None = None) -> Iterator[Any]:
    """Validate, then return the event iterator. With `resume`, the run's stored settings win.

    `windows` = (calibration, fitness) token tensors replaces the corpus (tests on tiny models).
    Under torch.distributed every process calls this alike: process 0 owns `run_dir`, the others
    mirror it in a scratch folder (`explorer.distributed.shared_run`)."""
    from .distributed import current_group, shared_run

    return shared_run(current_group(), Path(run_dir), resume,
                      lambda folder: _start(lm, settings, folder, cancel, resume, windows))


def _start(lm: LoadedModel, settings: SearchSettings, run_dir: Path, cancel: threading.Event | None,
           resume: bool, windows: tuple | None) -> Iterator[Any]:
    """run_search's work in one folder: validate, create or open the run, return its events."""
    from .runs import RunError, create_run, open_run

    run_dir = Path(run_dir)
    if resume:
        run = open_run(run_dir)
        stored = dict(run.settings)
        stored.pop("model", None)
        stored.pop("schema", None)
        settings = SearchSettings.from_dict(stored)
        if run.shape != lm.shape:
            raise RunError(f"the run was made on a different model ({run.settings.get('model')})")
    targets = validate_targets(settings.targets, lm.shape, settings)
    settings = dataclasses.replace(settings, targets=targets)
    from .baselines import BASELINES

    unknown = [b for b in settings.baselines if b not in BASELINES]
    if unknown:
        raise ExplorerError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    bad = [n for n in settings.init_scorings if n not in ("obs", "wanda")]
    if bad or not settings.init_scorings:
        raise ExplorerError(f"init_scorings must be a non-empty choice of obs, wanda (got {list(settings.init_scorings)})")
    from .fitness import resolve_dtype

    try:  # stored resolved, so a resumed run computes fitness the same way wherever it continues
        settings = dataclasses.replace(settings, fitness_dtype=resolve_dtype(settings.fitness_dtype, lm.model.get_input_embeddings().weight.device))
    except ValueError as e:
        raise ExplorerError(str(e)) from None
    if settings.fitness_batch < 1:
        raise ExplorerError("fitness_batch must be at least 1")
    if not resume:
        run = create_run(run_dir, {**settings.to_dict(), "model": lm.name, "schema": SCHEMA}, lm.shape)
    return _events(lm, settings, run, cancel, resume, windows)


def _events(lm, settings, run, cancel, resume, windows) -> Iterator[Any]:
    from .engine import SearchEngine

    engine = SearchEngine(lm, settings, run, cancel, windows)
    stored = len(engine.memo)
    yield _log(run, SearchStarted(str(run.path), settings.targets, settings.to_dict(), resume, stored))
    if resume:
        run.set_status("running")
    try:
        yield from engine.events()
    except Cancelled as e:
        run.set_status("cancelled")
        yield _log(run, SearchCancelled(engine.summary(), str(e)))
        return
    except ExplorerError as e:
        run.set_status("failed", error=str(e))
        yield _log(run, SearchFailed(str(e)))
        return
    except Exception as e:  # noqa: BLE001 - reported as an event; the run keeps what it found
        import logging

        logging.getLogger(__name__).exception("search failed")
        run.set_status("failed", error=f"{type(e).__name__}: {e}")
        yield _log(run, SearchFailed(f"{type(e).__name__}: {e}"))
        return
    summary = engine.summary()
    run.set_status("finished", summary=summary)
    yield _log(run, SearchFinished(summary))


def _log(run, event):
    if not isinstance(event, (CandidateEvaluated, StageProgress)):
        run.log_event({"event": type(event).__name__, "time": time.time(),
                       **{f.name: getattr(event, f.name) for f in dataclasses.fields(event)}})
    return event


__all__ = ["SearchSettings", "PRESETS", "run_search", "SearchStarted", "StageProgress", "CandidateEvaluated",
           "GenerationFinished", "FrontChanged", "SearchFinished", "SearchCancelled", "SearchFailed"]
