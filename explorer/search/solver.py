"""The library's subnet for any budget: the choice of one level per block (an attention option and
an MLP width, or the block dropped) whose summed library damage is least within a size or a
predicted-latency budget. A multiple-choice knapsack, solved exactly on a grid of the budget by
dynamic programming over the blocks (with the number of dropped blocks as a second state, since
the space bounds the depth); milliseconds for a model's worth of blocks, so a new target or a
slider position is re-solved at once.

The grid rounds each option's cost to the nearest step (1/`bins` of the budget); the solution's
exact size is then checked, and nudged into the window by the evolution's repair when rounding
left it just outside.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ..calibrate.importance import Importance
from ..model.subnet import ModelShape, Subnet
from .evolution import repair
from .library import Library, level_layer
from .space import Space

BINS = 2048


@dataclass(frozen=True)
class Option:
    """One block's level: `attn` (pairs or (kv, r)) and `width`, or both None for the dropped block."""

    attn: object
    width: int | None
    cost: float
    damage: float


def block_options(lib: Library, shape: ModelShape, space: Space, i: int, cost=None,
                  attn_weight: float = 1.0) -> list[Option]:
    """Block i's options in `space` with their cost (parameters, or `cost(attn, width)`) and damage
    (the attention's weighed by `attn_weight`), those that another option beats on both removed
    (Pareto pruning keeps the DP small)."""
    comp = space.compensated
    heads = lib.spec.space == "heads"

    def attn_cost(a) -> float:
        return shape.attn_params(shape.head_dim, *a, o_bias=shape.o_bias or comp) if heads else \
            shape.attn_params(2 * a, o_bias=shape.o_bias or comp)

    attn = [(a, attn_cost(a), attn_weight * lib.attn_damage(i, a, shape)) for a in space.attn_options]
    mlp = [(w, shape.mlp_params(w, shape.mlp_bias or comp), lib.mlp_damage(i, w, shape)) for w in space.width_options]
    opts = [Option(a, w, (ca + cm) if cost is None else cost(a, w), da + dm)
            for a, ca, da in attn for w, cm, dm in mlp if da + dm < float("inf")]
    opts.sort(key=lambda o: (o.cost, o.damage))
    front, best = [], float("inf")
    for o in opts:
        if o.damage < best - 1e-12:
            front.append(o)
            best = o.damage
    if space.min_layers < shape.num_layers:
        front.append(Option(None, None, 0.0 if cost is None else cost(None, None), lib.skip[i]))
    return front


def solve(lib: Library, shape: ModelShape, space: Space, imp: Importance, budget: float | None = None,
          cost=None, fixed: float | None = None, bins: int = BINS, seed: int = 0,
          attn_weight: float = 1.0) -> Subnet | None:
    """The least-damage subnet within `budget` (default: the space's upper size bound) of
    `cost` (default: parameters; else a function (attn, width) -> a block's cost, with `fixed`
    the cost outside the blocks). None when no choice fits."""
    L = shape.num_layers
    if cost is None:
        budget = space.hi_params if budget is None else budget
        fixed = shape.fixed_params
    allowance = float(budget) - float(fixed or 0.0)
    if allowance <= 0:
        return None
    unit = allowance / bins
    max_skip = L - space.min_layers
    S = max_skip + 1
    inf = np.inf
    dp = np.full((S, bins + 1), inf)
    dp[0, 0] = 0.0
    choices = []  # per block: the option index that reached each state
    options = []
    for i in range(L):
        opts = block_options(lib, shape, space, i, cost, attn_weight)
        options.append(opts)
        new = np.full_like(dp, inf)
        arg = np.full(dp.shape, -1, dtype=np.int32)
        for k, o in enumerate(opts):
            u = int(round(o.cost / unit))
            if u > bins:
                continue
            src = dp[:, : bins + 1 - u] + o.damage
            if o.attn is None and o.width is None:  # dropped: one more skip
                if S == 1:
                    continue
                tgt, src = new[1:, u:], src[:-1]
                better = src < tgt
                tgt[better] = src[better]
                arg[1:, u:][better] = k
            else:
                tgt = new[:, u:]
                better = src < tgt
                tgt[better] = src[better]
                arg[:, u:][better] = k
        dp = new
        choices.append(arg)
    if not np.isfinite(dp).any():
        return None
    order = np.argsort(dp, axis=None, kind="stable")  # best first; the first that fits exactly wins
    rng = random.Random(seed)
    for flat in order[:64]:
        s, b = np.unravel_index(flat, dp.shape)
        if not np.isfinite(dp[s, b]):
            break
        picks = []
        for i in range(L - 1, -1, -1):
            k = int(choices[i][s, b])
            o = options[i][k]
            picks.append(o)
            b -= int(round(o.cost / unit))
            s -= int(o.attn is None and o.width is None)
        picks.reverse()
        layers = tuple(None if o.attn is None and o.width is None else
                       level_layer(lib.spec, imp, i, shape, o.attn, o.width) for i, o in enumerate(picks))
        sub = Subnet(layers)
        if cost is not None:  # the exact cost, not the grid's: within the budget, or the next best state
            if float(fixed or 0.0) + sum(o.cost for o in picks) <= float(budget) + 1e-9:
                return sub
            continue
        if space.contains(sub, shape):
            return sub
        fixed_sub = repair(sub, imp, shape, space, rng)
        if fixed_sub is not None:
            return fixed_sub
    return None


def latency_cost(latency, shape: ModelShape):
    """A block's predicted decode milliseconds at (attn, width) under a fitted latency model
    (`latency_model.LatencyModel`: a constant per kept block, terms linear in its attention weights
    and MLP channels); with `fixed=latency.fixed_ms`, `solve` then meets a predicted latency."""
    D = shape.hidden_size

    def cost(attn, width) -> float:
        if attn is None and width is None:
            return 0.0
        kv, r, hd = (*attn, shape.head_dim) if isinstance(attn, tuple) else \
            (shape.num_kv_heads, shape.group_size, 2 * attn)
        weights = D * hd * 2 * (kv * r + kv) / 1e6
        return latency.block_ms + latency.per_mattn_ms * weights + latency.per_kwidth_ms * width / 1e3
    return cost


__all__ = ["Option", "block_options", "solve", "latency_cost", "BINS"]
