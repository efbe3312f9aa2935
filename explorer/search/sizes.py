"""The library's subnet at any size of a run (the app's size slider, the pick `library@F`).

A run searched with the level library keeps it (`library.json`) beside its importance pass, so
the least-damage subnet at any size is solved again in milliseconds (`explorer.search.solver`),
with its predicted fitness perplexity (the library's additive model) and predicted speed-up (the
run's latency model). `RunLibrary.pick` measures its real fitness on the run's own fitness windows
and stores it in the run as a candidate of origin "library": from then on it is a point like any
other, picked, reformed, evaluated and exported the same way, and a later `library@F` reads it back.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibrate.data import calibration_windows, load_corpus
from ..calibrate.importance import Importance, scoring
from ..errors import ExplorerError
from ..model.subnet import Subnet
from ..settings import SearchSettings
from .archive import Archive, Job
from .fitness import FitnessEvaluator
from .library import LIBRARY_FILE, Library
from .runs import Candidate, Run, RunError, target_words
from .solver import latency_cost, solve
from .space import target_space

ORIGIN = "library"


@dataclass(frozen=True)
class Solution:
    """The library's subnet at one size, with what the library and the latency model predict."""

    fraction: float  # the size asked, in the run's share
    subnet: Subnet
    params: int
    predicted_ppl: float
    predicted_speedup: float | None
    seconds: float  # solving time


def parse_size(pick: str) -> tuple[str, float]:
    """"library@0.63" or "library@63%" -> ("size", 0.63); "library@1.5x" -> ("speedup", 1.5), a predicted
    decode speed-up over the dense model; one clear error otherwise."""
    text = pick.strip().removeprefix(f"{ORIGIN}@").strip()
    kind = "speedup" if text.endswith("x") else "size"
    try:
        value = float(text.rstrip("x%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise RunError(f"bad pick {pick!r}: use library@FRACTION (e.g. library@0.63) or library@SPEEDUPx "
                       "(e.g. library@1.5x)") from None
    if kind == "size" and not 0 < value <= 1:
        raise RunError(f"bad pick {pick!r}: the size must be a fraction in (0, 1]")
    if kind == "speedup" and not 1 <= value < 100:
        raise RunError(f"bad pick {pick!r}: the speed-up must be at least 1x")
    return kind, value


class RunLibrary:
    """A run's library with what solving and scoring need: the base model, the library's channel
    order and the run's settings."""

    def __init__(self, lm, run: Run):
        path = Path(run.path) / LIBRARY_FILE
        if not path.is_file():
            raise RunError(f"{Path(run.path).name} has no level library (it was searched without one): search "
                           "again to pick any size")
        if run.shape != lm.shape:
            raise RunError("the run was made on another model than the one loaded")
        self.lm, self.run = lm, run
        self.library = Library.load(path)
        self.settings = SearchSettings.from_dict(run.settings)
        imp = Importance.load(Path(run.path) / "importance.pt")
        self.order = scoring(self.library.spec.scoring, lm.model, imp, lm.shape)
        self.latency = run.latency_model()
        self._windows: torch.Tensor | None = None  # the run's fitness windows, tokenized once

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest size (in the run's share) a subnet can be solved at."""
        shape, lo, hi = self.lm.shape, 0.05, 1.0
        for _ in range(30):  # bisection on reachability (the space's depth and width minimums)
            mid = (lo + hi) / 2
            try:
                target_space(shape, self.settings, mid)
                hi = mid
            except ExplorerError:
                lo = mid
        return round(hi + 0.005, 3), 1.0

    def solve(self, fraction: float) -> Solution:
        """The least-damage subnet within `fraction` (the run's share) of the parameters."""
        t0 = time.perf_counter()
        shape = self.lm.shape
        space = target_space(shape, self.settings, fraction)  # an unreachable size is refused here
        sub = solve(self.library, shape, space, self.order)
        if sub is None:
            raise ExplorerError(f"the library has no subnet within {target_words(fraction, self.settings.share)}")
        speedup = None if self.latency is None else self.latency.predict_speedup(sub, shape)
        return Solution(fraction, sub, sub.params(shape, self.settings.compensate),
                        self.library.predicted_ppl(sub, shape), speedup, time.perf_counter() - t0)

    def solve_speedup(self, speedup: float) -> Solution:
        """The least-damage subnet whose predicted decode speed-up (the run's latency model) is at least
        `speedup`; its `fraction` is the size it has, in the run's share."""
        if self.latency is None:
            raise ExplorerError("this run has no latency model: pick a size instead (library@0.7)")
        t0 = time.perf_counter()
        shape = self.lm.shape
        space = target_space(shape, self.settings, self.bounds()[0])  # every option the space allows
        sub = solve(self.library, shape, space, self.order, budget=self.latency.dense_ms / speedup,
                    cost=latency_cost(self.latency, shape), fixed=self.latency.fixed_ms)
        if sub is None:
            raise ExplorerError(f"no subnet of the library is predicted {speedup:g}x as fast as the dense model")
        comp = self.settings.compensate
        fraction = round(sub.prunable_fraction(shape, comp) if self.settings.share == "prunable"
                         else sub.fraction(shape, comp), 4)
        return Solution(fraction, sub, sub.params(shape, comp), self.library.predicted_ppl(sub, shape),
                        self.latency.predict_speedup(sub, shape), time.perf_counter() - t0)

    def pick(self, fraction: float | None = None, cancel: threading.Event | None = None,
             windows: torch.Tensor | None = None, speedup: float | None = None) -> Candidate:
        """The solution at `fraction` (or at a predicted `speedup`) as a candidate of the run: read back
        when stored, else its fitness measured on the run's fitness windows (`windows` replaces them)
        and stored."""
        sol = self.solve(fraction) if speedup is None else self.solve_speedup(speedup)
        fraction = sol.fraction
        comp = self.settings.compensate
        job = Job(sol.subnet, fraction, 0, ORIGIN, comp, extra={"library_ppl": round(sol.predicted_ppl, 4)})
        archive = Archive(self.run, self.lm.shape, self.latency)
        if archive.known(job):
            return archive.add(job, None)[0]
        s = self.settings
        if windows is None:
            if self._windows is None:
                self._windows = calibration_windows(self.lm.tokenizer, load_corpus(s.corpus), s.fitness_windows,
                                                    s.fitness_seq_len, seed=s.seed + 1)
            windows = self._windows
        fe = FitnessEvaluator(self.lm.model, self.lm.shape, windows, cache_bytes=0,
                              dtype=getattr(torch, s.fitness_dtype), batch=s.fitness_batch,
                              means=self.run.channel_means() if comp else None)
        result = fe.evaluate(sol.subnet, compensated=comp, cancel=cancel)
        return archive.add(job, result)[0]


__all__ = ["RunLibrary", "Solution", "parse_size", "ORIGIN"]
