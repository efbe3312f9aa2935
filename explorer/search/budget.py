"""A search's time budget: a promise to whoever waits for it, whatever the machine's load.

The budget covers everything from the search's start to the last target's pick: calibration,
the baselines, the initial subnets, the generations and the final selection. The targets share
what is left of it equally (a target that ends early leaves its time to the next). Within a
target the clock is read **between candidates**: another candidate starts only if one as long as
the average so far still ends before the target's share, less the time kept for its selection
(what re-scoring the best few takes, at most a quarter of the share; the selection then re-scores
as many as the share still allows). The first candidate of a target always runs, so every target
has its best: with one candidate taking seconds, that bounds the overrun by one candidate per
target.

A level library missing from the cache is measured inside the budget only if its estimate fits
half of what is left; it is measured block by block, and cut as soon as the blocks measured say
the rest would not end within that half (the blocks are kept, and the next search resumes them),
so a wrong estimate costs at most one block.

After the budget only bounded work may follow: fitting a machine's first latency model gets
`after_seconds` (a quarter of the budget, between 10 s and 2 minutes), shown moving and stopped
by Stop; timing the front for real is skipped. Without minutes the budget never stops anything.
"""
from __future__ import annotations

import math
import time
from typing import Callable

AFTER_SHARE, AFTER_MIN_S, AFTER_MAX_S = 0.25, 10.0, 120.0
SELECTION_SHARE = 0.25  # of a target's share, at most, kept for its final re-scoring


class Budget:
    def __init__(self, minutes: float | None, start: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.minutes = minutes
        self.clock = clock
        self.start = clock() if start is None else start
        self.end = None if minutes is None else self.start + 60.0 * minutes
        self.target_end: float | None = None
        self.target_share = 0.0

    @property
    def limited(self) -> bool:
        return self.end is not None

    def left(self) -> float:
        return math.inf if self.end is None else max(0.0, self.end - self.clock())

    def spent(self) -> bool:
        return self.end is not None and self.clock() >= self.end

    def start_target(self, targets_left: int) -> None:
        """Give the next target its share of what is left."""
        if self.end is not None:
            self.target_share = self.left() / max(1, targets_left)
            self.target_end = self.clock() + self.target_share

    def another_candidate(self, seconds: float, selection: float = 0.0) -> bool:
        """Whether one more candidate of `seconds` ends within the current target's share, keeping
        the selection's time (`selection` seconds, at most a quarter of the share) free."""
        if self.target_end is None:
            return True
        reserve = min(selection, SELECTION_SHARE * self.target_share)
        return self.clock() + seconds <= self.target_end - reserve

    def another_rescore(self, seconds: float) -> bool:
        """Whether one more selection re-score of `seconds` ends within the target's share."""
        return self.target_end is None or self.clock() + seconds <= self.target_end

    def after_seconds(self) -> float:
        """How long bounded work after the budget may take (a first latency fit)."""
        if self.minutes is None:
            return math.inf
        return min(AFTER_MAX_S, max(AFTER_MIN_S, AFTER_SHARE * 60.0 * self.minutes))


__all__ = ["Budget"]
