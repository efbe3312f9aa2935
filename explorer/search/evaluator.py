"""Evaluate a batch of decided candidates and archive them in order, in one process or spread
over several (`explorer.search.distributed`): the search loop cannot tell the difference.

One process evaluates each job just before archiving it, so a cancel, or a time budget that
says no more (`proceed`), lands between two candidates with everything before it stored. Several processes first evaluate the batch's
unknown jobs (split round robin, gathered everywhere), then archive exactly like one process:
the early-stop bound is fixed for the batch, and a job evaluated in vain (a twin of an equal
subnet earlier in the same batch) is archived as the copy one process would have made.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Iterator, Sequence

from .archive import Archive, Job
from .distributed import Group
from .fitness import FitnessEvaluator, FitnessResult
from .runs import Candidate


class BatchEvaluator:
    def __init__(self, fitness: FitnessEvaluator, archive: Archive, group: Group,
                 cancel: threading.Event | None = None):
        self.fitness, self.archive, self.group, self.cancel = fitness, archive, group, cancel
        self._stored: dict[str, tuple] = {}  # candidate id -> prefix-state cache keys its evaluation stored here

    def _evaluate(self, job: Job, bound: float | None, screen: float | None = None) -> FitnessResult:
        return self.fitness.evaluate(job.subnet, bound=bound, compensated=job.compensated, cancel=self.cancel,
                                     reformed=job.reformed, screen=screen)

    def run(self, jobs: Sequence[Job], bound: float | None = None, proceed: Callable[[], bool] | None = None,
            screen: float | None = None) -> Iterator[tuple[Candidate, bool]]:
        """Archive `jobs` in order, yielding (candidate, replayed) for each; `bound` and `screen` as in
        `FitnessEvaluator.evaluate`, fixed for the batch. `proceed` is asked before
        each job that needs an evaluation (several processes: once, before the batch); when it says
        no, the remaining jobs are dropped, not archived."""
        if not self.group.active:
            for job in jobs:
                known = self.archive.known(job)
                if not known and proceed is not None and not proceed():
                    return
                result = None if known else self._evaluate(job, bound, screen)
                yield self._add(job, result, result.created if result else ())
            return
        if proceed is not None and not self.group.broadcast(proceed()):
            return
        todo = [i for i, job in enumerate(jobs) if not self.archive.known(job)]
        created: dict[int, tuple] = {}  # cache keys are this process's own: only it may drop them

        def work(i: int) -> FitnessResult:
            r = self._evaluate(jobs[i], bound, screen)
            created[i] = r.created
            return dataclasses.replace(r, created=())

        results = dict(zip(todo, self.group.map(todo, work)))
        for i, job in enumerate(jobs):
            yield self._add(job, results.get(i), created.get(i, ()))

    def _add(self, job: Job, result: FitnessResult | None, created: tuple) -> tuple[Candidate, bool]:
        c, replayed = self.archive.add(job, result)
        if created:
            self._stored[c.id] = created
        return c, replayed

    def forget(self, c: Candidate) -> None:
        """Drop the prefix states only `c` needed (it did not become a parent)."""
        self.fitness.drop(self._stored.pop(c.id, ()))


__all__ = ["BatchEvaluator"]
