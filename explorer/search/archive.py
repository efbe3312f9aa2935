"""The candidate archive of one search: every candidate in order, stored as it is found.

It numbers new candidates, gives back the stored record of a candidate a resumed run decides on
again (the search is deterministic for a seed, so a resume replays the same decisions and only
the fitness it reads back differs from evaluating), and copies the fitness of an equal subnet
already evaluated at the same target with the same compensation (an initial subnet that is
exactly a baseline's) instead of evaluating it twice.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.subnet import ModelShape, Subnet
from .fitness import FitnessResult
from .runs import Candidate, Run


@dataclass(frozen=True, eq=False)
class Job:
    """One candidate the search has decided on, not yet archived."""

    subnet: Subnet
    target: float
    generation: int
    origin: str  # "search" | "init" | "baseline:<name>" | "dense"
    compensated: bool = False
    extra: dict | None = None  # more metrics to store (e.g. the init scoring)
    reformed: bool = False  # fitness of the assembled pre-reformed levels (the reformation-aware search)

    @property
    def key(self) -> tuple:
        """The memo key: a candidate is the same if its target, subnet and origin are."""
        return (round(self.target, 6), self.subnet.key(), self.origin)

    @property
    def twin_key(self) -> tuple:
        """Candidates with this key compute the same function: their fitness is shared."""
        return (round(self.target, 6), self.subnet.key(), self.compensated, self.reformed)


class Archive:
    def __init__(self, run: Run, shape: ModelShape, latency=None):
        self.run, self.shape, self.latency = run, shape, latency
        self.candidates: list[Candidate] = []
        self.memo: dict[tuple, Candidate] = {}
        for c in run.candidates():
            self.memo[(round(c.target, 6), c.subnet.key(), c.origin)] = c
        self.next_id = 1 + max((int(c.id[1:]) for c in self.memo.values() if c.id[1:].isdigit()), default=-1)
        self.twins: dict[tuple, Candidate] = {}  # twin key -> an evaluated, complete candidate
        self.evaluations = 0  # real ones in this session (not replayed, not copied)
        self.copies = 0
        self.eval_seconds = 0.0
        self.windows_evaluated = 0  # fitness windows those evaluations scored (early stops score fewer)
        self.stored = len(self.memo)

    def known(self, job: Job) -> bool:
        """Whether archiving `job` needs no evaluation (stored before, or a twin's copy)."""
        return job.key in self.memo or job.twin_key in self.twins

    def add(self, job: Job, result: FitnessResult | None) -> tuple[Candidate, bool]:
        """Archive `job`, from the stored record, a twin, or `result` (its evaluation). Returns
        (candidate, replayed)."""
        if job.key in self.memo:
            c = self.memo[job.key]
            self._keep(c, job)
            return c, True
        twin = self.twins.get(job.twin_key)
        if twin is not None:
            c = self._new(job, {**twin.metrics, "eval_seconds": 0.0, "copied_from": twin.id, **(job.extra or {})})
            self.copies += 1
            return c, False
        if result is None:
            raise RuntimeError(f"candidate {job.subnet.key()} at {job.target} was neither known nor evaluated")
        self.evaluations += 1
        self.eval_seconds += result.seconds
        self.windows_evaluated += result.windows_done
        metrics = {**job.subnet.size_metrics(self.shape, job.compensated),
                   "fitness_ppl": result.ppl, "fitness_nll": result.nll, "fitness_tokens": result.tokens,
                   "fitness_windows": result.windows_done, "fitness_lower_bound": not result.complete,
                   "eval_seconds": round(result.seconds, 4), "reused_blocks": result.reused_blocks,
                   "computed_blocks": result.computed_blocks, **(job.extra or {})}
        if job.reformed:
            metrics["fitness_reformed"] = True  # what the user gets after reformation, not the sliced subnet
        if self.latency is not None and job.origin == "dense":  # the base model itself, timed in every round
            metrics.update(predicted_latency_ms=round(self.latency.dense_ms, 4), measured_ms=round(self.latency.dense_ms, 4),
                           measured_speedup=1.0, measured_reliable=True)
        elif self.latency is not None:
            metrics["predicted_latency_ms"] = round(self.latency.predict(job.subnet, self.shape), 4)
        return self._new(job, metrics), False

    def _new(self, job: Job, metrics: dict) -> Candidate:
        c = Candidate(f"c{self.next_id:05d}", round(job.target, 6), job.generation, job.origin, job.subnet, metrics,
                      job.compensated, share=self.run.settings.get("share", "total"))
        self.next_id += 1
        self.run.append(c)
        self.memo[job.key] = c
        self._keep(c, job)
        return c

    def _keep(self, c: Candidate, job: Job) -> None:
        self.candidates.append(c)
        if not c.metrics.get("fitness_lower_bound"):
            self.twins.setdefault(job.twin_key, c)


__all__ = ["Job", "Archive"]
