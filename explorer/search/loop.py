"""The search (METHOD section 3): several targets in one run, every candidate archived as it is
found, streamed as typed events (`explorer.events`).

`run_search` validates its input eagerly (bad targets raise ExplorerError before any work),
then returns the event iterator `search`, which reads top to bottom like the method:

    calibrate; measure the dense model
    for each target:
        the baselines; the initial subnets (importance-ranked, several scorings)
        for each generation: breed children from the elite, evaluate, select, archive, fronts
        the pick: the best few by fitness, re-scored on fresh windows
    time the front for real

The parts each do one job and are passed in: `calibration` (statistics, cached on disk),
`archive` (numbering, resume, twins), `evaluator` (one process or several), `latency_model`
(prediction and paired measurement). The search is deterministic for a seed, which is what makes
resume cheap: a resumed run replays the same decisions and takes the fitness of every stored
candidate from the run directory instead of evaluating it again.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..calibrate.baselines import BASELINES
from ..calibrate.importance import SCORINGS, Importance, initial_subnet, split_subnet
from ..errors import Cancelled, ExplorerError
from ..events import (
    CandidateEvaluated,
    FrontChanged,
    GenerationFinished,
    LatencyMeasured,
    SearchCancelled,
    SearchFailed,
    SearchFinished,
    SearchStarted,
    StageProgress,
    check_cancel,
)
from ..model.loading import LoadedModel, cache_root
from ..model.subnet import ModelShape, Subnet
from ..settings import PRESETS, SearchSettings
from .archive import Archive, Job
from .calibration import FILES as CALIBRATION_FILES
from .calibration import Calibration, calibrate
from .distributed import Group, current_group, leader_first, shared_run
from .evaluator import BatchEvaluator
from .evolution import Space, crossover, make_space, mutate, repair, snap, space_top_layer
from .fitness import FitnessEvaluator, resolve_dtype
from .ladders import Ladders, LadderSpec, ladder_bytes
from .pareto import fronts_of
from .runs import SHIPPED_RUNS, Candidate, Run, RunError, create_run, open_run

SCHEMA = 2
log = logging.getLogger(__name__)


# ---- the loop ---------------------------------------------------------------------------------
def search(lm: LoadedModel, s: SearchSettings, run: Run, cancel: threading.Event | None = None,
           windows: tuple | None = None, group: Group | None = None) -> Iterator[Any]:
    """The search's events (see the module docstring). Process 0 calibrates; the others of a
    distributed search load its files and evaluate their share of every batch."""
    group = group or current_group()
    t0 = time.perf_counter()
    budget = Budget(s.minutes, t0, reserve=0.1 if s.latency else 0.0)
    cal: Calibration = yield from leader_first(group, lambda: _calibrate(lm, s, run, cancel, windows), run.path,
                                               CALIBRATION_FILES)
    latency = yield from leader_first(group, lambda: _latency(lm, s, run, cancel, fit=False), run.path,
                                      ("latency_model.json",))
    reformed = s.fitness_mode == "reformed"
    ladders = (yield from _ladders(lm, s, cal, cancel)) if reformed else None
    archive = Archive(run, lm.shape, latency)
    fitness = FitnessEvaluator(lm.model, lm.shape, cal.fitness, cache_bytes=s.cache_mb * 2**20,
                               dtype=getattr(torch, s.fitness_dtype), batch=s.fitness_batch, means=cal.means,
                               ladders=ladders)
    evaluate = BatchEvaluator(fitness, archive, group, cancel)
    selector = None if cal.selection is None else FitnessEvaluator(
        lm.model, lm.shape, cal.selection, cache_bytes=s.cache_mb * 2**20 // 4, dtype=getattr(torch, s.fitness_dtype),
        batch=s.fitness_batch, means=cal.means, ladders=ladders)
    best: dict[float, Candidate] = {}
    fronts: dict = {"params": [], "latency": []}

    def emit(pairs) -> Iterator[CandidateEvaluated]:
        for c, replayed in pairs:
            yield CandidateEvaluated(c, replayed, len(archive.candidates))

    try:
        yield from emit(evaluate.run([Job(Subnet.full(lm.shape), 1.0, 0, "dense")]))
        for target in s.targets:
            space = target_space(lm.shape, s, target)
            rng = random.Random(f"{s.seed}:{target}")
            fitness.clear()  # prefix states of another target serve no candidate of this one
            baselines = []
            for job in baseline_jobs(lm, s, cal, target):  # each drawn as soon as it is scored
                baselines.append(job)
                yield from emit(evaluate.run([job]))

            elite = Elite(s.top_k)
            seen: set[str] = set()
            inits = initial_jobs(lm, s, cal, target, seen, baselines if s.seed_baselines and not reformed else (), rng)
            for c, replayed in evaluate.run(inits):
                if not elite.consider(c):
                    evaluate.forget(c)
                yield CandidateEvaluated(c, replayed, len(archive.candidates))
            init_best = elite.best.subnet  # its scoring orders every later mask edit at this target
            scored_by = elite.best.metrics.get("init_scoring", "obs")
            imp = cal.scoring(BASELINE_SCORING.get(scored_by, scored_by), lm.model, lm.shape)

            generations = 1 + s.generations
            deadline = budget.target_deadline(len(s.targets) - s.targets.index(target))
            for generation in range(1, generations + 1):
                if generation > 1 and not budget.another_generation(deadline, group):
                    break
                t_gen, evals0, stopped, n = time.perf_counter(), archive.evaluations, 0, 0
                kinds = (["m0"] * s.population if generation == 1 else
                         ["m"] * s.mutations + ["x"] * s.crossovers + ["f"] * s.fresh)
                children = breed(kinds, elite.parents, init_best, imp, lm.shape, space, rng, seen, s)
                jobs = [Job(child, target, generation, "search", s.compensate or reformed, reformed=reformed)
                        for child in children]
                for c, replayed in evaluate.run(jobs, elite.bound() if s.early_stop else None):
                    stopped += int(c.metrics.get("fitness_lower_bound", False))
                    n += 1
                    if not elite.consider(c):
                        evaluate.forget(c)
                    yield CandidateEvaluated(c, replayed, len(archive.candidates))
                best[target] = elite.best
                secs, real = time.perf_counter() - t_gen, archive.evaluations - evals0
                budget.generation_took(secs)
                yield GenerationFinished(target, generation, elite.best.fitness, elite.best.id,
                                         real / secs if real and secs > 0 else 0.0, n, stopped,
                                         generations if budget.minutes is None else 0)
                now = fronts_of(archive.candidates)
                if now != fronts:
                    fronts = now
                    yield FrontChanged(tuple(now["params"]), tuple(now["latency"]))
            best[target] = yield from select(run, elite, selector, s, target, group.leader, cancel)
        if s.latency and group.leader and latency is None:  # timing is process 0's, after every candidate
            if budget.minutes is not None:
                yield StageProgress("latency", 0, 1, "this machine has no latency model yet: fitting it once, after "
                                    "the time budget (it is cached for every later search)")
            latency = yield from _latency(lm, s, run, cancel, fit=True)
            predict_archive(run, archive, latency, lm.shape)
            fronts = fronts_of(archive.candidates)
            yield FrontChanged(tuple(fronts["params"]), tuple(fronts["latency"]))
        if s.latency and group.leader and budget.spent():
            yield StageProgress("latency", 1, 1, "measuring the front skipped: the time budget is spent "
                                "(latencies stay predicted)")
        elif s.latency and group.leader:
            yield from measure_front(lm, run, archive, best, fronts, cal, s.measure_max, cancel)
    except Cancelled as e:
        yield SearchCancelled(summary(archive, best, fronts, fitness, latency, time.perf_counter() - t0), str(e))
        return
    yield SearchFinished(summary(archive, best, fronts, fitness, latency, time.perf_counter() - t0))


class Budget:
    """A search given minutes instead of generations. The targets share what is left of the budget
    equally (a target that ends early leaves its time to the next); within a target, another
    generation starts only if one as long as the last still ends before the target's share is
    spent, and the first always runs, so every target has its best. With latency on, the last tenth
    is kept for timing the front, which is skipped, saying so, if nothing is left. A machine's
    first search fits its latency model after the budget, saying so (minutes, once: it is cached),
    so that even the demo preset's first search plots latencies. The leader's
    clock decides for every process of a distributed search. Without minutes it never stops a
    search; with them a search is reproducible only up to where the clock stopped it."""

    def __init__(self, minutes: float | None, t0: float, reserve: float = 0.0):
        self.minutes = minutes
        self.end = None if minutes is None else t0 + 60.0 * minutes * (1.0 - reserve)
        self.hard_end = None if minutes is None else t0 + 60.0 * minutes
        self.last = 0.0  # seconds of the last generation

    def target_deadline(self, targets_left: int) -> float | None:
        if self.end is None:
            return None
        now = time.perf_counter()
        return now + max(self.end - now, 0.0) / max(targets_left, 1)

    def generation_took(self, seconds: float) -> None:
        self.last = seconds

    def another_generation(self, deadline: float | None, group: Group) -> bool:
        if deadline is None:
            return True
        return bool(group.broadcast(time.perf_counter() + self.last <= deadline))

    def spent(self) -> bool:
        return self.hard_end is not None and time.perf_counter() >= self.hard_end


class Elite:
    """The top k of everything evaluated at a target (initial subnets and children): the parents."""

    def __init__(self, k: int):
        self.k = k
        self.members: list[Candidate] = []

    def consider(self, c: Candidate) -> bool:
        """Add `c` if it ranks among the top k; whether it is in the elite now."""
        if c.fitness < math.inf:
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


# ---- the parts of a target ------------------------------------------------------------------------
def select(run: Run, elite: Elite, selector: FitnessEvaluator | None, s: SearchSettings, target: float,
           leader: bool, cancel: threading.Event | None) -> Iterator[Any]:
    """The target's pick. METHOD picks the best fitness, but the demo's fitness is 4 windows of 256
    tokens, and the top few of an elite differ by less than that estimate's noise (on the embedded
    model the fitness pick at 80 % had held-out 62.9 where the 2nd had 61.6). So the best
    `select_top` by fitness are re-scored on `select_windows` fresh calibration windows (never the
    held-out text) the same way (compensation, pre-reformed levels), and the best there is the pick:
    `selection_ppl` is annotated on each, and `Run.pick("best@T")` reads it. The elite, the fronts
    and the fitness of every candidate stay as the search found them."""
    top = elite.members[: s.select_top]
    if selector is None or len(top) < 2:
        return elite.best
    yield StageProgress("selection", 0, len(top), f"{target:.0%}: re-scoring the best {len(top)} on "
                        f"{selector.windows.shape[0]} fresh windows")
    scored = []
    for n, c in enumerate(top):
        check_cancel(cancel)
        ppl = c.metrics.get("selection_ppl")
        if ppl is None:  # a resumed run has it already
            ppl = selector.evaluate(c.subnet, compensated=c.compensated, cancel=cancel,
                                    reformed=bool(c.metrics.get("fitness_reformed"))).ppl
            c.metrics["selection_ppl"] = ppl
            if leader:
                run.annotate(c.id, {"selection_ppl": ppl})
        scored.append((ppl, c.id, c))
        yield StageProgress("selection", n + 1, len(top), f"{c.id}: {ppl:.4g}")
    return min(scored, key=lambda t: (t[0], t[1]))[2]


# baselines whose subnet needs a pass of its own over the calibration windows: built after the others
SEQUENTIAL_BASELINES = ("wanda-sp",)


def baseline_jobs(lm: LoadedModel, s: SearchSettings, cal: Calibration, target: float) -> Iterator[Job]:
    """The baselines' subnets at this target (METHOD section 6), each with its own compensation:
    those from the dense pass's statistics first (instant), then the sequential ones; each read from
    the calibration's cache when an earlier search built it."""
    for name in sorted(s.baselines, key=lambda n: n in SEQUENTIAL_BASELINES):
        res, _ = cal.baseline(name, lm.model, lm.shape, target, s.baseline_windows)
        yield Job(res.subnet, target, 0, f"baseline:{name}", res.compensated)


# the importance order the reformation-aware search's ladders are nested along (METHOD section 2's)
LADDER_SCORING = "obs"


def target_space(shape: ModelShape, s: SearchSettings, target: float) -> Space:
    """The target's search space; in the reformation-aware mode only the ladders' levels."""
    space = make_space(shape, target, s.window, s.multiple, s.head_multiple, s.depth, compensated=s.compensate,
                       granularity=s.space)
    if s.fitness_mode != "reformed":
        return space
    spec = LadderSpec.of(shape, s.head_multiple, s.multiple, s.ladder_mlp_levels)
    return space.restricted(spec.pairs, spec.widths, shape)


# the scoring that orders mask edits of a child of a baseline's subnet: the one the baseline ranks by
BASELINE_SCORING = {"flap": "wifv", "flap-uniform": "wifv", "wanda-sp": "wanda", "magnitude": "obs"}


def initial_jobs(lm: LoadedModel, s: SearchSettings, cal: Calibration, target: float, seen: set[str],
                 baselines: tuple | list = (), rng: random.Random | None = None) -> list[Job]:
    """The same keep ratio in every block (METHOD section 2), and uniform splits that keep more
    attention and less MLP (or the reverse), for each scoring; with `baselines`, their subnets
    too, evaluated the search's way (so the search starts from the best subnet it knows and can
    only improve on it); duplicates are skipped. In the reformation-aware mode only the ladders'
    scoring ranks, and each subnet is moved onto the ladders' levels (`snap`, with `rng`)."""
    space = target_space(lm.shape, s, target)
    if space.heads:
        return head_initial_jobs(lm, s, cal, target, seen, baselines, space, rng or random.Random(0))
    reformed = s.fitness_mode == "reformed"
    opts = space.pair_options
    picks = sorted({opts[len(opts) - 1 - round(k * (len(opts) - 1) / max(1, s.split_init - 1))]
                    for k in range(s.split_init)}) if s.split_init else []  # widest attention first
    jobs = []
    for name in ((LADDER_SCORING,) if reformed else s.init_scorings):
        sc = cal.scoring(name, lm.model, lm.shape)
        subs = [initial_subnet(sc, lm.shape, target, s.multiple, s.head_multiple, s.compensate)]
        subs += [split_subnet(sc, lm.shape, target, p, s.multiple, s.compensate) for p in picks]
        if reformed:
            subs = [None if sub is None else snap(sub, sc, lm.shape, space, rng or random.Random(0)) for sub in subs]
        for sub in subs:
            if sub is not None and sub.key() not in seen:
                seen.add(sub.key())
                jobs.append(Job(sub, target, 0, "init", s.compensate or reformed, extra={"init_scoring": name},
                                reformed=reformed))
    for b in baselines:
        name = b.origin.split(":", 1)[1]
        if b.subnet.key() not in seen:
            seen.add(b.subnet.key())
            jobs.append(Job(b.subnet, target, 0, "init", s.compensate, extra={"init_scoring": name}))
    return jobs


def head_initial_jobs(lm: LoadedModel, s: SearchSettings, cal: Calibration, target: float, seen: set[str],
                      baselines, space: Space, rng: random.Random) -> list[Job]:
    """The heads space's initial subnets: for each scoring and each attention option (widest
    first, `split_init` + 1 of them), that option in every block with the widest uniform MLP that
    fits, repaired into the window; and the baselines whose every block is an option of the space."""
    shape, jobs = lm.shape, []
    for name in s.init_scorings:
        sc = cal.scoring(name, lm.model, shape)
        if sc.head_order is None:
            raise ExplorerError("these importance scores have no per-head scores (calibrate with space=heads "
                                "computes them)")
        for attn in list(reversed(space.heads))[: s.split_init + 1]:
            per_block = shape.attn_params(shape.head_dim, *attn, o_bias=shape.o_bias or space.compensated)
            width = next((w for w in reversed(space.width_options) if space.hi_params >= shape.fixed_params
                          + shape.num_layers * (per_block + shape.mlp_params(w, shape.mlp_bias or space.compensated))),
                         None)
            if width is None:
                continue
            sub = Subnet(tuple(space_top_layer(space, sc, i, shape, attn, width) for i in range(shape.num_layers)))
            sub = repair(sub, sc, shape, space, rng)
            if sub is not None and sub.key() not in seen:
                seen.add(sub.key())
                jobs.append(Job(sub, target, 0, "init", s.compensate, extra={"init_scoring": name}))
    for b in baselines:
        if space.allows(b.subnet, shape) and b.subnet.key() not in seen:
            seen.add(b.subnet.key())
            jobs.append(Job(b.subnet, target, 0, "init", s.compensate, extra={"init_scoring": b.origin.split(":", 1)[1]}))
    return jobs


def breed(kinds: list[str], parents: list[Subnet], init_best: Subnet, imp: Importance, shape: ModelShape,
          space: Space, rng: random.Random, seen: set[str], s: SearchSettings) -> list[Subnet]:
    """One generation's children, decided before any is evaluated: "m0" mutates the best initial
    subnet with the first generation's probabilities, "m" a parent, "f" the best initial subnet,
    "x" crosses two parents. A child out of the window or already seen is resampled (up to
    max_tries, else skipped). Only `rng` and `seen` change, in this order, so a seed always
    breeds the same children from the same parents.

    The reformation-aware mode has no mask mutation: a ladder level keeps a prefix of the
    importance order, and a random mask would leave the ladder (ratio and depth mutation, which
    edit masks by that order, and crossover, which swaps whole blocks, stay on it)."""
    if s.fitness_mode == "reformed":
        s = dataclasses.replace(s, probs=dataclasses.replace(s.probs, mask=0.0),
                                first_probs=dataclasses.replace(s.first_probs, mask=0.0))
    out: list[Subnet] = []
    for kind in kinds:
        child = None
        for _ in range(s.max_tries):
            if kind == "m0":
                child = mutate(init_best, imp, shape, space, rng, s.first_probs)
            elif kind == "m":
                child = mutate(rng.choice(parents), imp, shape, space, rng, s.probs)
            elif kind == "f":
                child = mutate(init_best, imp, shape, space, rng, s.probs)
            else:
                a, b = rng.sample(parents, 2) if len(parents) > 1 else (parents[0], parents[0])
                child = crossover(a, b, imp, shape, space, rng)
            if child is not None and child.key() not in seen:
                break
            child = None
        if child is not None:
            seen.add(child.key())
            out.append(child)
    return out


def measure_front(lm: LoadedModel, run: Run, archive: Archive, best: dict, fronts: dict, cal: Calibration,
                  limit: int, cancel: threading.Event | None) -> Iterator[Any]:
    """Time front members for real, paired with the dense model (best per target first), off the
    critical path: every candidate was found before this runs."""
    from ..model.slicing import candidate_model
    from .latency_model import measure

    by_id = {c.id: c for c in archive.candidates}
    ids = [c.id for c in best.values()] + list(fronts["params"]) + list(fronts["latency"])
    chosen = [by_id[i] for i in dict.fromkeys(ids) if i in by_id and by_id[i].origin != "dense"
              and "measured_speedup" not in by_id[i].metrics][:limit]
    if not chosen:
        return
    yield StageProgress("measure front", 0, len(chosen), f"timing {len(chosen)} front members with the dense model")
    models = {c.id: candidate_model(lm.model, c, cal.means) for c in chosen}
    got = measure(lm.model, models, lm.shape.vocab_size, cancel=cancel)
    for n, c in enumerate(chosen):
        m = got[c.id]
        run.annotate(c.id, m.metrics())
        yield LatencyMeasured(c.id, m.to_dict())
        yield StageProgress("measure front", n + 1, len(chosen), c.id)


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


# ---- calibration steps (process 0; the others load the files they write) ----------------------------
def _calibrate(lm, s, run, cancel, windows) -> Iterator[Any]:
    cal = None
    seeds = tuple(p for p in SHIPPED_RUNS.iterdir() if (p / "importance.pt").is_file()) if SHIPPED_RUNS.is_dir() else ()
    for item in calibrate(lm, s, run.path, cancel, windows, cache_dir=cache_root() / "importance", seeds=seeds):
        if isinstance(item, Calibration):
            cal = item
        else:
            yield item
    return cal


def _ladders(lm, s, cal, cancel) -> Iterator[Any]:
    """The reformation-aware search's ladders, reformed with the project's reformation settings."""
    from ..pick.reform import ReformSettings

    spec = LadderSpec.of(lm.shape, s.head_multiple, s.multiple, s.ladder_mlp_levels)
    yield StageProgress("ladders", 0, lm.shape.num_layers,
                        f"{len(spec.pairs)} attention and {len(spec.widths)} MLP levels per block, "
                        f"{ladder_bytes(lm.shape, spec) / 2**20:.0f} MB")
    ladders = None
    for item in cal.ladders(lm.model, lm.shape, spec, LADDER_SCORING, ReformSettings(), cancel):
        if isinstance(item, Ladders):
            ladders = item
        else:
            yield item
    return ladders


def _latency(lm, s, run, cancel, fit: bool) -> Iterator[Any]:
    """The run's latency model: its own file (resume), else the machine's cached one, else (with `fit`)
    fitted now; without `fit` and without a cached model, None (the search then fits it at the end,
    off the path to the first points)."""
    import json

    from .latency_model import LatencyModel, cached_latency_model

    if not s.latency:
        return None
    path = run.path / "latency_model.json"
    if path.is_file():
        return LatencyModel.from_dict(json.loads(path.read_text()))
    spaces = [make_space(lm.shape, t, s.window, s.multiple, s.head_multiple, s.depth) for t in s.targets]
    head_dims = sorted({2 * p for sp in spaces for p in sp.pair_options})
    widths = sorted({w for sp in spaces for w in sp.width_options})
    events: list = []
    if fit:
        yield StageProgress("latency model", 0, 1, "timing sliced models with the dense one (cached per machine)")
    model, cached = cached_latency_model(lm, head_dims, widths, cache_root() / "latency", events.append, cancel,
                                         fit=fit)
    if model is None:
        return None
    for e in events:
        yield StageProgress(e.stage, e.done, e.total, e.message)
    path.write_text(json.dumps(model.to_dict(), indent=2))
    yield StageProgress("latency model", 1, 1, "reused from the cache" if cached else
                        f"fitted (mean error {model.fit_error:.1%})")
    return model


def predict_archive(run: Run, archive: Archive, latency, shape: ModelShape) -> None:
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


# ---- entry: validate, create or open the run, then the events -------------------------------------------
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
        target_space(shape, settings, t)
        out.append(round(t, 6))
    if len(set(out)) != len(out):
        raise ExplorerError("targets repeat")
    return tuple(sorted(out, reverse=True))


def resolve(lm: LoadedModel, settings: SearchSettings) -> SearchSettings:
    """Validate every setting and resolve the ones that depend on the machine (fitness dtype)."""
    if settings.space not in ("dims", "heads"):
        raise ExplorerError(f"space must be dims or heads (got {settings.space!r})")
    if settings.space == "heads" and settings.fitness_mode == "reformed":
        raise ExplorerError("the reformation-aware ranking has ladders of rotary pairs only: use it with the "
                            "dims space (the heads space ranks the sliced subnets)")
    settings = dataclasses.replace(settings, targets=validate_targets(settings.targets, lm.shape, settings))
    unknown = [b for b in settings.baselines if b not in BASELINES]
    if unknown:
        raise ExplorerError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    bad = [n for n in settings.init_scorings if n not in SCORINGS]
    if bad or not settings.init_scorings:
        raise ExplorerError(f"init_scorings must be a non-empty choice of {', '.join(SCORINGS)} "
                            f"(got {list(settings.init_scorings)})")
    if settings.fitness_mode not in ("paper", "reformed"):
        raise ExplorerError(f"fitness_mode must be paper or reformed (got {settings.fitness_mode!r})")
    if settings.fitness_mode == "reformed":
        if settings.ladder_mlp_levels < 2:
            raise ExplorerError("ladder_mlp_levels must be at least 2")
        need = ladder_bytes(lm.shape, LadderSpec.of(lm.shape, settings.head_multiple, settings.multiple,
                                                    settings.ladder_mlp_levels))
        if need > settings.ladder_mb * 2**20:
            raise ExplorerError(f"the ladders of this model would hold {need / 2**20:.0f} MB, over ladder_mb="
                                f"{settings.ladder_mb}: lower ladder_mlp_levels or raise ladder_mb")
    if settings.fitness_batch < 1:
        raise ExplorerError("fitness_batch must be at least 1")
    if settings.baseline_windows < 1:
        raise ExplorerError("baseline_windows must be at least 1")
    if settings.minutes is not None and not (isinstance(settings.minutes, (int, float)) and 0 < settings.minutes < 1e6):
        raise ExplorerError(f"the time budget must be a positive number of minutes (got {settings.minutes!r})")
    device = next(p for p in lm.model.parameters() if p.device.type != "meta").device
    try:  # stored resolved, so a resumed run computes fitness the same way wherever it continues
        return dataclasses.replace(settings, fitness_dtype=resolve_dtype(settings.fitness_dtype, device))
    except ValueError as e:
        raise ExplorerError(str(e)) from None


def run_search(lm: LoadedModel, settings: SearchSettings, run_dir: str | Path,
               cancel: threading.Event | None = None, resume: bool = False, *,
               windows: tuple | None = None, group: Group | None = None) -> Iterator[Any]:
    """Validate, then return the event iterator. With `resume`, the run's stored settings win.

    `windows` = (calibration, fitness) token tensors replaces the corpus (tests on tiny models).
    Under torch.distributed every process calls this alike: process 0 owns `run_dir`, the others
    mirror it in a scratch folder (`explorer.search.distributed.shared_run`)."""
    group = group or current_group()
    return shared_run(group, Path(run_dir), resume,
                      lambda folder: _start(lm, settings, folder, cancel, resume, windows, group))


def prepare(lm: LoadedModel, settings: SearchSettings, run_dir: str | Path,
            cancel: threading.Event | None = None) -> Iterator[Any]:
    """Build what a search reads before its first candidate into the disk cache, without
    searching: the calibration pass, the baselines' subnets at every target and, for the
    reformation-aware mode, the ladders. A later search on the same model and data reuses them,
    so its time budget is spent on searching (bench/quality.py gives each mode the same minutes
    this way; in the app the cache does the same after the first search). Yields StageProgress."""
    settings = resolve(lm, settings)
    run = _new_run(lm, settings, Path(run_dir))
    cal = yield from _calibrate(lm, settings, run, cancel, None)
    for target in settings.targets:
        for _ in baseline_jobs(lm, settings, cal, target):
            pass
    if settings.fitness_mode == "reformed":
        yield from _ladders(lm, settings, cal, cancel)


def _start(lm, settings, run_dir: Path, cancel, resume: bool, windows, group: Group) -> Iterator[Any]:
    if resume:
        run = open_run(run_dir)
        stored = {k: v for k, v in run.settings.items() if k not in ("model", "schema")}
        settings = SearchSettings.from_dict(stored)
        if run.shape != lm.shape:
            raise RunError(f"the run was made on a different model ({run.settings.get('model')})")
    settings = resolve(lm, settings)
    if not resume:
        run = _new_run(lm, settings, run_dir)
    return _events(lm, settings, run, cancel, resume, windows, group)


def _new_run(lm, settings: SearchSettings, run_dir: Path) -> Run:
    return create_run(run_dir, {**settings.to_dict(), "model": lm.name, "schema": SCHEMA}, lm.shape)


def _events(lm, settings, run: Run, cancel, resume, windows, group: Group) -> Iterator[Any]:
    """The search's events framed by its start and its end, which the run's status records."""
    yield _log(run, SearchStarted(str(run.path), settings.targets, settings.to_dict(), resume, len(run.candidates())))
    if resume:
        run.set_status("running")
    try:
        for ev in search(lm, settings, run, cancel, windows, group):
            if isinstance(ev, SearchFinished):
                run.set_status("finished", summary=ev.summary)
            elif isinstance(ev, SearchCancelled):
                run.set_status("cancelled")
            yield _log(run, ev)
    except Cancelled as e:  # before the first candidate (calibration)
        run.set_status("cancelled")
        yield _log(run, SearchCancelled({}, str(e)))
    except ExplorerError as e:
        run.set_status("failed", error=str(e))
        yield _log(run, SearchFailed(str(e)))
    except Exception as e:  # noqa: BLE001 - reported as an event; the run keeps what it found
        log.exception("search failed")
        run.set_status("failed", error=f"{type(e).__name__}: {e}")
        yield _log(run, SearchFailed(f"{type(e).__name__}: {e}"))


def _log(run: Run, event):
    if not isinstance(event, (CandidateEvaluated, StageProgress)):
        run.log_event({"event": type(event).__name__, "time": time.time(),
                       **{f.name: getattr(event, f.name) for f in dataclasses.fields(event)}})
    return event


__all__ = ["SearchSettings", "PRESETS", "run_search", "prepare", "search", "Elite", "validate_targets", "check_cancel"]
