"""The search loop behind `explorer.search.run_search`: calibration, then per target the
baselines, the initial subnets and the generations, every candidate archived as it is found.

Determinism is the resume mechanism: random choices come from a generator seeded by (seed,
target), and the only other input to a decision is fitness, which a resumed run reads back from
the JSONL (`memo`) instead of evaluating again.

Candidates are decided in batches (the baselines, the initial subnets, one generation's children)
before any of them is evaluated, and a batch is archived in order afterwards. Nothing in a batch
depends on another member's fitness (the early-stop bound is the elite's at the batch's start), so
the batch can be evaluated by one process or split over several (`explorer.distributed`) with the
same result.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .baselines import baseline_subnet, wanda_scores
from .errors import ExplorerError
from .data import calibration_windows, load_corpus
from .distributed import current_group, leader_first
from .evolution import crossover, make_space, mutate
from .events import check_cancel
from .fitness import FitnessEvaluator, FitnessResult
from .importance import Importance, initial_subnet, iter_importance, split_subnet
from .pareto import fronts_of
from .runs import Candidate
from .search import CandidateEvaluated, FrontChanged, GenerationFinished, StageProgress, _log
from .subnet import Subnet


CALIBRATION_FILES = ("importance.pt", "latency_model.json")  # written by _prepare, read back when present


@dataclass(frozen=True, eq=False)
class Job:
    """One candidate the search has decided on, not yet archived (see the module docstring)."""

    subnet: Subnet
    target: float
    generation: int
    origin: str  # "search" | "init" | "baseline:<name>" | "dense"
    biases: dict | None = None  # extra o_proj / down_proj biases (FLAP): such candidates are never copied
    extra: dict | None = None  # more metrics to store (e.g. the init scoring)

    @property
    def key(self) -> tuple:
        """The memo key: a candidate is the same if its target, subnet and origin are."""
        return (round(self.target, 6), self.subnet.key(), self.origin)


class SearchEngine:
    def __init__(self, lm, settings, run, cancel, windows=None):
        self.lm, self.s, self.run, self.cancel = lm, settings, run, cancel
        self.shape = lm.shape
        self.archive: list[Candidate] = []
        self.memo: dict[tuple, Candidate] = {}
        for c in run.candidates():
            self.memo[(round(c.target, 6), c.subnet.key(), c.origin)] = c
        self.next_id = 1 + max((int(c.id[1:]) for c in self.memo.values() if c.id[1:].isdigit()), default=-1)
        self.importance: Importance | None = None
        self.latency = None
        self.evaluator: FitnessEvaluator | None = None
        self.t0 = time.perf_counter()
        self.eval_seconds = 0.0
        self.evaluations = 0  # real ones (not replayed)
        self.copies = 0  # new candidates whose subnet was already evaluated under another origin
        self.best: dict[float, Candidate] = {}
        self.front: dict = {"params": [], "latency": []}
        self.latency_errors: list[dict] = []
        self._created: tuple = ()  # cache keys stored by the last real evaluation
        self.by_key: dict[tuple, Candidate] = {}  # (target, subnet key) -> an evaluated candidate without biases
        self._scorings: dict[str, Importance] = {}
        self.group = current_group()  # one process, or this one's place among several
        self.windows = windows

    # ---- calibration ------------------------------------------------------------------------
    def _prepare(self) -> Iterator[Any]:
        s, lm = self.s, self.lm
        corpus = load_corpus(s.corpus) if self.windows is None else None
        path = self.run.path / "importance.pt"
        if path.is_file():
            self.importance = Importance.load(path)
        else:
            calib = (self.windows[0] if self.windows is not None else
                     calibration_windows(lm.tokenizer, corpus, s.calib_windows, s.calib_seq_len, seed=s.seed))
            for item in iter_importance(lm.model, calib, self.shape, cancel=self.cancel):
                if isinstance(item, Importance):
                    self.importance = item
                else:
                    yield StageProgress("importance", item.done, item.total, item.message)
            self.importance.save(path)
        fit = (self.windows[1] if self.windows is not None else
               calibration_windows(lm.tokenizer, corpus, s.fitness_windows, s.fitness_seq_len, seed=s.seed + 1))
        self.evaluator = FitnessEvaluator(lm.model, self.shape, fit, cache_bytes=s.cache_mb * 2**20,
                                          dtype=getattr(torch, s.fitness_dtype), batch=s.fitness_batch)
        if s.latency:
            yield from self._latency_model()

    def _latency_model(self) -> Iterator[Any]:
        import json

        from .latency_model import LatencyModel, calibrate

        path = self.run.path / "latency_model.json"
        if path.is_file():
            self.latency = LatencyModel.from_dict(json.loads(path.read_text()))
            return
        spaces = [make_space(self.shape, t, self.s.window, self.s.multiple, self.s.head_multiple, self.s.depth)
                  for t in self.s.targets]
        head_dims = sorted({2 * p for sp in spaces for p in sp.pair_options})
        widths = sorted({w for sp in spaces for w in sp.width_options})
        events: list = []
        yield StageProgress("latency model", 0, 6, "timing sliced models")
        self.latency = calibrate(self.lm.model, self.shape, tuple(head_dims), tuple(widths),
                                 on_event=events.append, cancel=self.cancel)
        path.write_text(json.dumps(self.latency.to_dict(), indent=2))
        for e in events:
            yield StageProgress(e.stage, e.done, e.total, e.message)

    # ---- candidates -----------------------------------------------------------------------------
    def _known(self, job: Job) -> bool:
        """Whether archiving `job` needs no evaluation: stored by an earlier (cancelled) run, or the
        same subnet already evaluated at this target under another origin (copied)."""
        return job.key in self.memo or (not job.biases and job.key[:2] in self.by_key)

    def _evaluate(self, job: Job, bound: float | None) -> FitnessResult:
        check_cancel(self.cancel)
        return self.evaluator.evaluate(job.subnet, bound if self.s.early_stop else None, job.biases, self.cancel)

    def _archive(self, job: Job, result: FitnessResult | None, created: tuple = ()) -> tuple[Candidate, bool]:
        """Store one candidate: replayed from the run, copied from an equal subnet, or from `result`
        (the job's evaluation; `created` = the cache keys it stored in this process). Returns
        (candidate, replayed)."""
        key, target, subnet = job.key, job.target, job.subnet
        if key in self.memo:
            c = self.memo[key]
            self.archive.append(c)
            self._created = ()
            if not job.biases and not c.metrics.get("fitness_lower_bound"):
                self.by_key.setdefault(key[:2], c)
            return c, True
        same = None if job.biases else self.by_key.get(key[:2])
        if same is not None:  # e.g. an initial subnet that is exactly a baseline's: same fitness, no new work
            c = Candidate(f"c{self.next_id:05d}", round(target, 6), job.generation, job.origin, subnet,
                          {**same.metrics, "eval_seconds": 0.0, "copied_from": same.id, **(job.extra or {})})
            self.next_id += 1
            self.run.append(c)
            self.memo[key] = c
            self.archive.append(c)
            self._created = ()
            self.copies += 1
            return c, False
        r = result
        if r is None:
            raise RuntimeError(f"candidate {subnet.key()} at {target} was neither known nor evaluated")
        self.eval_seconds += r.seconds
        self.evaluations += 1
        metrics = {**subnet.size_metrics(self.shape),
                   "fitness_ppl": r.ppl, "fitness_nll": r.nll, "fitness_tokens": r.tokens,
                   "fitness_windows": r.windows_done, "fitness_lower_bound": not r.complete,
                   "eval_seconds": round(r.seconds, 4), "reused_blocks": r.reused_blocks,
                   "computed_blocks": r.computed_blocks, **(job.extra or {})}
        if self.latency is not None:
            metrics["predicted_latency_ms"] = round(self.latency.predict(subnet), 4)
        c = Candidate(f"c{self.next_id:05d}", round(target, 6), job.generation, job.origin, subnet, metrics)
        self.next_id += 1
        self.run.append(c)
        self.memo[key] = c
        if not job.biases and r.complete:
            self.by_key[key[:2]] = c
        self.archive.append(c)
        self._created = created
        return c, False

    def _run(self, jobs: Sequence[Job], bound: float | None = None) -> Iterator[tuple[Candidate, bool]]:
        """Archive a batch in order, yielding (candidate, replayed) for each.

        One process evaluates each job just before archiving it, so a cancel lands between two
        candidates with everything before it stored. Several processes first evaluate the batch's
        unknown jobs (split round robin, gathered everywhere), then archive exactly like one process:
        `bound` is fixed for the batch and a job evaluated in vain (a copy of an equal subnet earlier
        in the same batch) is archived as the copy one process would have made."""
        if not self.group.active:
            for job in jobs:
                if self._known(job):
                    yield self._archive(job, None)
                else:
                    r = self._evaluate(job, bound)
                    yield self._archive(job, r, r.created)
            return
        todo = [i for i, job in enumerate(jobs) if not self._known(job)]
        created: dict[int, tuple] = {}  # cache keys are this process's own: only it may drop them

        def work(i: int) -> FitnessResult:
            r = self._evaluate(jobs[i], bound)
            created[i] = r.created
            return dataclasses.replace(r, created=())

        results = dict(zip(todo, self.group.map(todo, work)))
        for i, job in enumerate(jobs):
            yield self._archive(job, results.get(i), created.get(i, ()))

    def _emit(self, c: Candidate, replayed: bool) -> CandidateEvaluated:
        return CandidateEvaluated(c, replayed, len(self.archive))

    # ---- the run --------------------------------------------------------------------------------
    def events(self) -> Iterator[Any]:
        # process 0 calibrates; the others load its files (importance.pt, latency_model.json)
        yield from leader_first(self.group, self._prepare, self.run.path, CALIBRATION_FILES)
        for c, replayed in self._run([Job(Subnet.full(self.shape), 1.0, 0, "dense")]):
            yield self._emit(c, replayed)
        for target in self.s.targets:
            yield from self._target(target)
        if self.s.latency and self.group.leader:  # timing is process 0's; the others are done
            yield from self._measure_front()

    def _target(self, target: float) -> Iterator[Any]:
        s, shape, imp = self.s, self.shape, self.importance
        space = make_space(shape, target, s.window, s.multiple, s.head_multiple, s.depth)
        rng = random.Random(f"{s.seed}:{target}")
        self.evaluator.clear()
        jobs = []
        for name in s.baselines:
            res = baseline_subnet(name, self.lm.model, imp, shape, target, s.multiple, s.head_multiple)
            jobs.append(Job(res.subnet, target, 0, f"baseline:{name}", biases=res.biases or None))
        for c, rep in self._run(jobs):
            yield self._emit(c, rep)
        seen: set[str] = set()
        elite: list[Candidate] = []  # top k of everything evaluated at this target (search and init)

        def consider(c: Candidate) -> None:
            if c.fitness < float("inf"):
                elite.append(c)
                elite.sort(key=lambda x: (x.metrics["fitness_nll"], x.id))
                del elite[s.top_k:]
            if not any(e.id == c.id for e in elite):
                self.evaluator.drop(self._created)  # its cached states serve no future parent
            self._created = ()

        def bound() -> float | None:
            return elite[-1].metrics["fitness_nll"] if len(elite) >= s.top_k else None

        # initial subnets: the same keep ratio everywhere (METHOD), and uniform splits that keep
        # more attention and less MLP (or the reverse), for each scoring; the scoring of the best
        # one orders every later mask edit at this target
        opts = space.pair_options
        picks = sorted({opts[len(opts) - 1 - round(k * (len(opts) - 1) / max(1, s.split_init - 1))]
                        for k in range(s.split_init)}) if s.split_init else []  # widest attention first
        inits = []
        for name in s.init_scorings:
            sc = self._scoring(name)
            inits.append((name, initial_subnet(sc, shape, target, s.multiple, s.head_multiple)))
            inits += [(name, sub) for sub in (split_subnet(sc, shape, target, p, s.multiple) for p in picks)
                      if sub is not None]
        jobs = []
        for name, sub in inits:
            if sub.key() in seen:
                continue
            seen.add(sub.key())
            jobs.append(Job(sub, target, 0, "init", extra={"init_scoring": name}))
        for c, rep in self._run(jobs):
            consider(c)
            yield self._emit(c, rep)
        init_best = elite[0].subnet
        imp = self._scoring(elite[0].metrics.get("init_scoring", "obs"))

        total_gens = 1 + s.generations
        for generation in range(1, total_gens + 1):
            gen_t0, gen_evals0, stopped, n_gen = time.perf_counter(), self.evaluations, 0, 0
            kinds = (["m0"] * s.population if generation == 1 else
                     ["m"] * s.mutations + ["x"] * s.crossovers + ["f"] * s.fresh)
            children = self._breed(kinds, [c.subnet for c in elite], init_best, imp, space, rng, seen)
            for c, rep in self._run([Job(child, target, generation, "search") for child in children], bound()):
                stopped += int(c.metrics.get("fitness_lower_bound", False))
                n_gen += 1
                consider(c)
                yield self._emit(c, rep)
            secs = time.perf_counter() - gen_t0
            real = self.evaluations - gen_evals0
            self.best[target] = elite[0]
            yield _log(self.run, GenerationFinished(target, generation, elite[0].fitness, elite[0].id,
                                                    real / secs if real and secs > 0 else 0.0, n_gen, stopped,
                                                    total_gens))
            yield from self._front_event()

    def _breed(self, kinds: list[str], parents: list[Subnet], init_best: Subnet, imp: Importance, space,
               rng: random.Random, seen: set[str]) -> list[Subnet]:
        """One generation's children, decided before any is evaluated: "m0" mutates the best initial
        subnet with the first generation's probabilities, "m" a parent, "f" the best initial subnet,
        "x" crosses two parents. A child out of the window or already seen is resampled (up to
        max_tries, else skipped). Only `rng` and `seen` change, in this order, so a seed always
        breeds the same children from the same parents."""
        s, shape = self.s, self.shape
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

    def _scoring(self, name: str) -> Importance:
        """"obs": METHOD section 2's saliency; "wanda": |W| * ||X|| from the same calibration pass
        (first-order, no weight update: it can rank better when nothing is reformed)."""
        if name not in self._scorings:
            if name == "obs":
                self._scorings[name] = self.importance
            elif name == "wanda":
                self._scorings[name] = wanda_scores(self.lm.model, self.importance, self.shape)
            else:
                raise ExplorerError(f"unknown init scoring {name!r}; use obs or wanda")
        return self._scorings[name]

    def _front_event(self) -> Iterator[Any]:
        fronts = fronts_of(self.archive)
        if fronts != self.front:
            self.front = fronts
            yield _log(self.run, FrontChanged(tuple(fronts["params"]), tuple(fronts["latency"])))

    def _measure_front(self) -> Iterator[Any]:
        """Measure the predicted latency of front members for real: best per target first."""
        from .latency_model import measure_decode_ms

        by_id = {c.id: c for c in self.archive}
        ids = [c.id for c in self.best.values()] + [i for i in self.front["params"]]
        chosen = list(dict.fromkeys(i for i in ids if i in by_id))[: self.s.measure_max]
        for n, cid in enumerate(chosen):
            check_cancel(self.cancel)
            c = by_id[cid]
            if "measured_latency_ms" in c.metrics:
                measured = c.metrics["measured_latency_ms"]
            else:
                measured = measure_decode_ms(self.lm.model, c.subnet, self.shape)
                err = c.metrics["predicted_latency_ms"] / measured - 1
                self.run.annotate(cid, {"measured_latency_ms": round(measured, 4), "latency_error": round(err, 4)})
            self.latency_errors.append({"id": cid, "predicted_ms": c.metrics.get("predicted_latency_ms"),
                                        "measured_ms": round(measured, 4)})
            yield StageProgress("measure front", n + 1, len(chosen), cid)

    def summary(self) -> dict:
        by_target = {}
        for t, c in sorted(self.best.items(), reverse=True):
            by_target[str(t)] = {"id": c.id, "fitness_ppl": c.fitness, "params": c.metrics["params"],
                                 "fraction": c.metrics["fraction"],
                                 "predicted_latency_ms": c.metrics.get("predicted_latency_ms")}
        errs = [abs(e["predicted_ms"] / e["measured_ms"] - 1) for e in self.latency_errors
                if e.get("predicted_ms") and e.get("measured_ms")]
        return {"best": by_target, "candidates": len(self.archive), "evaluated": self.evaluations,
                "copied": self.copies, "replayed": len(self.archive) - self.evaluations - self.copies,
                "eval_seconds": round(self.eval_seconds, 3),
                "evals_per_s": self.evaluations / self.eval_seconds if self.eval_seconds else 0.0,
                "wall_seconds": round(time.perf_counter() - self.t0, 3),
                "fitness": dict(self.evaluator.stats) if self.evaluator else {},
                "fronts": self.front, "latency_model": self.latency.to_dict() if self.latency else None,
                "latency_measured": self.latency_errors,
                "latency_mean_abs_error": sum(errs) / len(errs) if errs else None}
