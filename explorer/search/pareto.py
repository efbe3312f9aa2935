"""Pareto fronts of an archive: lower fitness perplexity for fewer parameters / less latency."""
from __future__ import annotations

from typing import Callable, Iterable


def pareto_front(items: Iterable, cost: Callable, quality: Callable) -> list:
    """Items no other item beats on both (lower cost, lower perplexity), sorted by cost."""
    pool = sorted(((cost(x), quality(x), i, x) for i, x in enumerate(items)), key=lambda t: (t[0], t[1], t[2]))
    front, best = [], float("inf")
    for c, q, _, x in pool:
        if q < best:
            front.append(x)
            best = q
    return front


def fronts_of(candidates) -> dict[str, list[str]]:
    """Ids on the quality-vs-params and quality-vs-latency (predicted, so every candidate is on the
    same scale) fronts. Candidates stopped early (fitness only a lower bound) are left out."""
    pool = [c for c in candidates if c.fitness < float("inf")]

    def latency(c):
        m = c.metrics
        return m.get("predicted_latency_ms", float("inf"))

    return {
        "params": [c.id for c in pareto_front(pool, lambda c: c.metrics.get("params", float("inf")), lambda c: c.fitness)],
        "latency": [c.id for c in pareto_front([c for c in pool if "predicted_latency_ms" in c.metrics], latency,
                                               lambda c: c.fitness)],
    }
