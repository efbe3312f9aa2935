"""The search (METHOD section 3): several targets in one run, every candidate archived as it is
found, streamed as typed events (`explorer.events`). `search` reads top to bottom like the method:

    calibrate; the dense model; the level library, and its subnet for every target at once
    for each target:
        the library's subnet; the method's initial subnet; the baselines; the seeded and other
        initial subnets
        for each generation: breed children from the elite, evaluate, select, archive, fronts
        the pick: the best few by fitness, re-scored on fresh windows
    time the front for real

The parts each do one job and are passed in: `calibration` (statistics, cached on disk),
`archive` (numbering, resume, twins), `evaluator` (one process or several), `budget` (the clock,
read between candidates), `timing` (the latency model and real timings). The search is
deterministic for a seed, which is what makes resume cheap: a resumed run replays the same
decisions and takes the fitness of every stored candidate from the run directory instead of
evaluating it again (under a time budget, up to where the clock stopped it).
"""
from __future__ import annotations

import math
import random
import threading
import time
from typing import Any, Iterator

import torch

from ..errors import Cancelled, ExplorerError
from ..events import (
    CandidateEvaluated,
    FrontChanged,
    GenerationFinished,
    SearchCancelled,
    SearchFinished,
    StageProgress,
    check_cancel,
)
from ..model.cores import others_running
from ..model.loading import LoadedModel
from ..model.subnet import Subnet
from ..settings import SearchSettings
from .archive import Archive, Job
from .budget import Budget
from .calibration import FILES as CALIBRATION_FILES
from .calibration import (Calibration, library_partial, library_spec, library_stored, search_calibration,
                          search_ladders, search_library)
from .distributed import Group, current_group, leader_first
from .evaluator import BatchEvaluator
from .evolution import breed
from .library import LIBRARY_FILE, Library, block_work
from .library import clock as library_clock
from .fitness import FitnessEvaluator
from .initial import (
    BASELINE_SCORING,
    library_jobs,
    SEQUENTIAL_BASELINES,
    SEQUENTIAL_COST,
    baseline_jobs,
    baseline_order,
    initial_jobs,
    seeded_jobs,
)
from .pareto import fronts_of
from .runs import Candidate, Run, target_words
from .space import target_space, total_fraction
from .timing import measure_front, predict_archive, search_latency_model


def search(lm: LoadedModel, s: SearchSettings, run: Run, cancel: threading.Event | None = None,
           windows: tuple | None = None, group: Group | None = None) -> Iterator[Any]:
    """The search's events (see the module docstring). Process 0 calibrates; the others of a
    distributed search load its files and evaluate their share of every batch."""
    group = group or current_group()
    t0 = time.perf_counter()
    budget = Budget(s.minutes, t0)
    cal: Calibration = yield from leader_first(group, lambda: search_calibration(lm, s, run, cancel, windows),
                                               run.path, CALIBRATION_FILES)
    latency = yield from leader_first(group, lambda: search_latency_model(lm, s, run, cancel, fit=False), run.path,
                                      ("latency_model.json",))
    reformed = s.fitness_mode == "reformed"
    ladders = (yield from search_ladders(lm, s, cal, cancel)) if reformed else None
    archive = Archive(run, lm.shape, latency)
    fitness = FitnessEvaluator(lm.model, lm.shape, cal.fitness, cache_bytes=s.cache_mb * 2**20,
                               dtype=getattr(torch, s.fitness_dtype), batch=s.fitness_batch, means=cal.means,
                               ladders=ladders, screen_windows=s.screen_windows)
    evaluate = BatchEvaluator(fitness, archive, group, cancel)
    selector = None if cal.selection is None else FitnessEvaluator(
        lm.model, lm.shape, cal.selection, cache_bytes=s.cache_mb * 2**20 // 4, dtype=getattr(torch, s.fitness_dtype),
        batch=s.fitness_batch, means=cal.means, ladders=ladders)
    best: dict[float, Candidate] = {}
    fronts: dict = {"params": [], "latency": []}

    def per_window() -> float:
        """Seconds one fitness window takes on this machine now (the budget's unit)."""
        return archive.eval_seconds / archive.windows_evaluated if archive.windows_evaluated else 0.0

    def more(extra: float = 0.0) -> bool:
        """Whether a candidate (after `extra` seconds of other work) may start: it ends within the
        target's share, keeping the selection's time (process 0's clock decides for every process)."""
        selection = 0.0 if selector is None else per_window() * s.select_top * selector.windows.shape[0]
        return bool(group.broadcast(budget.another_candidate(extra + per_window() * s.fitness_windows, selection)))

    def consider(pairs, elite: Elite) -> Iterator[CandidateEvaluated]:
        for c, replayed in pairs:
            if elite is not None and not elite.consider(c):
                evaluate.forget(c)
            yield CandidateEvaluated(c, replayed, len(archive.candidates))

    try:
        yield from consider(evaluate.run([Job(Subnet.full(lm.shape), 1.0, 0, "dense")]), None)
        library = None
        if s.library and not reformed:
            cost = library_seconds(lm, s, per_window(), library_partial(lm, s, cal))
            fits = bool(group.broadcast(not budget.limited or cost <= LIBRARY_SHARE * budget.left()))
            stored = library_stored(lm, s, cal)
            if not fits and group.leader and not stored:
                yield StageProgress("library", 1, 1, f"the level library left out: measuring it takes about "
                                    f"{cost:.0f} s, more than {LIBRARY_SHARE:.0%} of the time budget (prepare the "
                                    "search first, or search once without a budget; it is cached)")
            # measured by process 0 only, and cut at its share of the budget if its first blocks say it
            # would not end by then; the others read what process 0 stored
            deadline = None if not budget.limited else library_clock() + LIBRARY_SHARE * budget.left()
            library = yield from leader_first(
                group, lambda: search_library(lm, s, cal, cancel, measure=fits and group.leader, deadline=deadline),
                run.path, (LIBRARY_FILE,))
        solved: dict[float, Candidate] = {}  # every target's library subnet, evaluated before the first target
        if library is not None:
            for c, replayed in evaluate.run(library_jobs(lm, s, cal, library)):
                solved[c.target] = c
                yield CandidateEvaluated(c, replayed, len(archive.candidates))
        for k, target in enumerate(s.targets):
            words = target_words(target, s.share)
            budget.start_target(len(s.targets) - k)
            rng = random.Random(f"{s.seed}:{target}")
            fitness.clear()  # prefix states of another target serve no candidate of this one
            elite, seen = Elite(s.top_k), set()
            if target in solved:
                elite.consider(solved[target])
                seen.add(solved[target].subnet.key())
            own = initial_jobs(lm, s, cal, target, seen, rng)
            # every target has its first subnet whatever the budget: the library's, else the method's own start
            yield from consider(evaluate.run(own[:1], proceed=more if target in solved else None), elite)
            baselines = []
            for name in baseline_order(s):  # each computed when its turn comes, if it fits the budget
                cost = 0.0 if cal.has_baseline(name, total_fraction(lm.shape, s.share, target)) or name not in SEQUENTIAL_BASELINES else (
                    SEQUENTIAL_COST * per_window() * s.calib_windows * s.calib_seq_len / s.fitness_seq_len)
                if not more(cost):
                    if cost:
                        yield StageProgress("budget", 1, 1, f"{words}: {name} left out: its own pass over the "
                                            "calibration windows does not fit the time budget's share (prepare the "
                                            "search first, or search without a budget)")
                    continue
                job = next(baseline_jobs(lm, s, cal, target, (name,), cancel))
                baselines.append(job)
                yield from consider(evaluate.run([job]), None)
            variants = [] if library is None else library_jobs(lm, s, cal, library, (target,), True, seen)
            # with the library's subnets to start from, the uniform initial subnets only spend the budget
            starts = variants + seeded_jobs(lm, s, target, seen, baselines) + (own[1:] if library is None else [])
            yield from consider(evaluate.run(starts, proceed=more), elite)
            init_best = elite.best.subnet  # its scoring orders every later mask edit at this target
            scored_by = elite.best.metrics.get("init_scoring", "obs")
            imp = cal.scoring(BASELINE_SCORING.get(scored_by, scored_by), lm.model, lm.shape)

            space = target_space(lm.shape, s, target)
            generations = 1 + s.generations
            for generation in range(1, generations + 1):
                if not more():
                    n = sum(c.target == target for c in archive.candidates)
                    yield StageProgress("budget", 1, 1, f"{words}: the time budget ends its search with {n} "
                                        f"candidates, {generation - 1} generation{'' if generation == 2 else 's'} "
                                        "after the initial subnets")
                    break
                t_gen, evals0, stopped, n = time.perf_counter(), archive.evaluations, 0, 0
                kinds = (["m0"] * s.population if generation == 1 else
                         ["m"] * s.mutations + ["x"] * s.crossovers + ["f"] * s.fresh)
                children = breed(kinds, elite.parents, init_best, imp, lm.shape, space, rng, seen, s)
                jobs = [Job(child, target, generation, "search", s.compensate or reformed, reformed=reformed)
                        for child in children]
                bound = elite.bound() if s.early_stop else None
                screen = None if bound is None or not s.screen_windows else bound * (1 + s.screen_margin)
                for c, replayed in evaluate.run(jobs, bound, proceed=more, screen=screen):
                    stopped += int(c.metrics.get("fitness_lower_bound", False))
                    n += 1
                    yield from consider([(c, replayed)], elite)
                best[target] = elite.best
                secs, real = time.perf_counter() - t_gen, archive.evaluations - evals0
                yield GenerationFinished(target, generation, elite.best.fitness, elite.best.id,
                                         real / secs if real and secs > 0 else 0.0, n, stopped,
                                         generations if s.minutes is None else 0)
                now = fronts_of(archive.candidates)
                if now != fronts:
                    fronts = now
                    yield FrontChanged(tuple(now["params"]), tuple(now["latency"]))
            best[target] = yield from select(run, elite, selector, s, target, group.leader, cancel, budget,
                                             per_window)
        others = [] if not (s.latency and group.leader) else others_running()
        if s.latency and group.leader and latency is None and others:
            yield StageProgress("latency", 1, 1, "no latency model fitted: another Subnet Explorer job is using the "
                                "cores, and timings taken beside it would be cached as this machine's")
        elif s.latency and group.leader and latency is None:  # timing is process 0's, after every candidate
            deadline = None if not budget.limited else time.perf_counter() + budget.after_seconds()
            if budget.limited:
                yield StageProgress("latency", 0, 1, "this machine has no latency model yet: fitting it once, after "
                                    f"the time budget, in at most {budget.after_seconds():.0f} s (it is cached for "
                                    "every later search)")
            latency = yield from search_latency_model(lm, s, run, cancel, fit=True, deadline=deadline)
            if latency is not None:
                predict_archive(run, archive, latency, lm.shape)
                now = {c.id: c for c in archive.candidates}
                best = {t: now.get(c.id, c) for t, c in best.items()}  # with their predicted latencies
                fronts = fronts_of(archive.candidates)
                yield FrontChanged(tuple(fronts["params"]), tuple(fronts["latency"]))
        if s.latency and group.leader and budget.limited:
            yield StageProgress("latency", 1, 1, "measuring the front skipped: a time budget leaves no time for "
                                "it (latencies stay predicted; Measure times a pick for real)")
        elif s.latency and group.leader and latency is not None and not others:
            yield from measure_front(lm, run, archive, best, fronts, cal.means, s.measure_max, cancel)
    except Cancelled as e:
        yield SearchCancelled(summary(archive, best, fronts, fitness, latency, time.perf_counter() - t0), str(e))
        return
    yield SearchFinished(summary(archive, best, fronts, fitness, latency, time.perf_counter() - t0))


LIBRARY_SHARE = 0.5  # of a time budget, at most, that measuring a missing library may take
LIBRARY_COST = 0.6  # a one-block subnet's evaluation, in full evaluations (the dense prefix is reused)


def library_seconds(lm: LoadedModel, s: SearchSettings, per_window: float, partial: Library | None = None) -> float:
    """About how long measuring the library (what is left of it) takes: from the time its blocks
    measured before took, weighed by the work left; else from the seconds one fitness window takes now."""
    work = block_work(lm.shape)
    if partial is not None and 0 < partial.num_layers < len(work):
        return partial.seconds / sum(work[:partial.num_layers]) * sum(work[partial.num_layers:])
    spec = library_spec(lm, s)
    levels = lm.shape.num_layers * (len(spec.attn) + len(spec.widths) + 1)
    return levels * LIBRARY_COST * per_window * s.library_windows * s.calib_seq_len / s.fitness_seq_len


class Elite:
    """The top k of everything evaluated at a target (initial subnets and children): the parents."""

    def __init__(self, k: int):
        self.k = k
        self.members: list[Candidate] = []

    def consider(self, c: Candidate) -> bool:
        """Add `c` if it ranks among the top k; whether it is in the elite now. A candidate stopped
        early (by the bound or the screen) has only part of its NLL and never enters."""
        if c.fitness < math.inf and not c.metrics.get("fitness_lower_bound"):
            self.members.append(c)
            self.members.sort(key=lambda x: (x.metrics["fitness_nll"], x.id))
            del self.members[self.k:]
        return any(e.id == c.id for e in self.members)

    def bound(self) -> float | None:
        """The k-th best summed NLL: a child that exceeds it cannot become a parent (early stop)."""
        return self.members[-1].metrics["fitness_nll"] if len(self.members) >= self.k else None

    @property
    def best(self) -> Candidate:
        if not self.members:
            raise ExplorerError("no initial subnet could be evaluated at this target")
        return self.members[0]

    @property
    def parents(self) -> list[Subnet]:
        return [c.subnet for c in self.members]


def select(run: Run, elite: Elite, selector: FitnessEvaluator | None, s: SearchSettings, target: float,
           leader: bool, cancel: threading.Event | None, budget: Budget | None = None, per_window=lambda: 0.0
           ) -> Iterator[Any]:
    """The target's pick. METHOD picks the best fitness, but a demo's fitness is a few short
    windows, and the top few of an elite differ by less than that estimate's noise. So the best
    `select_top` by fitness are re-scored, in fitness order, on `select_windows` fresh calibration
    windows (never the held-out text) the same way (compensation, pre-reformed levels), and the best
    there is the pick: `selection_ppl` is annotated on each, and `Run.pick("best@T")` reads it. Under
    a time budget the re-scoring stops where the target's share ends (the best few that were
    re-scored decide; none re-scored: the best fitness). The elite, the fronts and the fitness of
    every candidate stay as the search found them."""
    top = elite.members[: s.select_top]
    if selector is None or len(top) < 2:
        return elite.best
    n_windows, words = selector.windows.shape[0], target_words(target, s.share)
    yield StageProgress("selection", 0, len(top), f"{words}: re-scoring the best {len(top)} on "
                        f"{n_windows} fresh windows")
    scored = []
    for n, c in enumerate(top):
        check_cancel(cancel)
        ppl = c.metrics.get("selection_ppl")
        if ppl is None:  # a resumed run has it already
            if budget is not None and not budget.another_rescore(per_window() * n_windows):
                yield StageProgress("selection", len(top), len(top), f"{words}: the time budget ends the "
                                    f"re-scoring after {n} of {len(top)}")
                break
            ppl = selector.evaluate(c.subnet, compensated=c.compensated, cancel=cancel,
                                    reformed=bool(c.metrics.get("fitness_reformed"))).ppl
            c.metrics["selection_ppl"] = ppl
            if leader:
                run.annotate(c.id, {"selection_ppl": ppl})
        scored.append((ppl, c.id, c))
        yield StageProgress("selection", n + 1, len(top), f"{c.id}: {ppl:.4g}")
    if not scored:
        return elite.best
    return min(scored, key=lambda t: (t[0], t[1]))[2]


def summary(archive: Archive, best: dict, fronts: dict, fitness: FitnessEvaluator, latency, wall: float) -> dict:
    by_target = {str(t): {"id": c.id, "fitness_ppl": c.fitness, "params": c.metrics["params"],
                          "fraction": c.metrics["fraction"], "predicted_latency_ms": c.metrics.get("predicted_latency_ms"),
                          "selection_ppl": c.metrics.get("selection_ppl")}
                 for t, c in sorted(best.items(), reverse=True)}
    return {"best": by_target, "candidates": len(archive.candidates), "evaluated": archive.evaluations,
            "copied": archive.copies, "replayed": len(archive.candidates) - archive.evaluations - archive.copies,
            "eval_seconds": round(archive.eval_seconds, 3),
            "evals_per_s": archive.evaluations / archive.eval_seconds if archive.eval_seconds else 0.0,
            "wall_seconds": round(wall, 3), "fitness": dict(fitness.stats), "fronts": fronts,
            "latency_model": latency.to_dict() if latency else None}


__all__ = ["search", "Elite", "select", "summary"]
