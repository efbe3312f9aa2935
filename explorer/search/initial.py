"""A target's initial subnets, in one place (METHOD section 2): the same keep ratio in every block
ranked by importance, uniform splits that give attention more and the MLP less (or the reverse),
the whole-head space's uniform options, the reformation-aware mode's subnets moved onto the
ladders' levels, and the baselines' subnets (METHOD section 6), which the search evaluates on their
own and, seeded, as initial subnets of its own kind.

The order of `initial_jobs` is the order a time budget reads them in: the method's own initial
subnet first (every target evaluates it, whatever the budget), the seeded baselines next (on a
small model the strongest start), then the other scorings and splits.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterator

from ..calibrate.importance import Importance, top_layer
from ..errors import ExplorerError
from ..model.loading import LoadedModel
from ..model.subnet import ModelShape, Subnet, SubnetError, round_width
from ..settings import SearchSettings
from .archive import Job
from .calibration import Calibration
from .evolution import repair
from .ladders import LADDER_SCORING
from .library import LIBRARY_SCORING, Library
from .solver import solve
from .space import Space, nearest, nearest_attn, refit, space_top_layer, target_space, total_fraction


# ---- uniform subnets from importance scores -------------------------------------------------------
def round_pairs(pairs: float, pair_multiple: int, limit: int) -> int:
    """Kept rotary pairs rounded to a multiple (head_dim multiple / 2), within [multiple, limit]."""
    return round_width(pairs, max(1, pair_multiple), limit)


def uniform_params(shape: ModelShape, pairs: int, width: int, compensated: bool = False) -> int:
    return shape.fixed_params + shape.num_layers * shape.block_params(2 * pairs, width, compensated)


def initial_subnet(importance: Importance, shape: ModelShape, fraction: float, multiple: int = 8,
                   head_multiple: int = 8, compensated: bool = False) -> Subnet:
    """The same keep ratio in every block (attention and MLP alike), top scores kept, the largest
    ratio whose rounded widths stay within `fraction` of the total parameters."""
    budget = fraction * shape.dense_params
    pm = max(1, head_multiple // 2)
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(40):  # bisection on the ratio; rounding makes params a step function of it
        r = (lo + hi) / 2
        pairs = round_pairs(r * shape.n_pairs, pm, shape.n_pairs)
        width = round_width(r * shape.intermediate_size, multiple, shape.intermediate_size)
        if uniform_params(shape, pairs, width, compensated) <= budget:
            best, lo = (pairs, width), r
        else:
            hi = r
    if uniform_params(shape, shape.n_pairs, shape.intermediate_size, compensated) <= budget:
        best = (shape.n_pairs, shape.intermediate_size)
    if best is None:
        raise SubnetError(f"{fraction:.0%} of the parameters is below the smallest uniform subnet")
    pairs, width = best
    return Subnet(tuple(top_layer(importance, i, pairs, width) for i in range(shape.num_layers)))


def split_subnet(importance: Importance, shape: ModelShape, fraction: float, pairs: int, multiple: int = 8,
                 compensated: bool = False) -> Subnet | None:
    """Uniform subnet with a given attention width; the MLP gets the largest uniform width that
    fits the budget, and leftover budget widens the MLP of the most important blocks.
    None when the attention alone exceeds the budget."""
    budget = fraction * shape.dense_params - shape.fixed_params
    L, P = shape.num_layers, shape.intermediate_size
    per_channel = shape.mlp_params(2) - shape.mlp_params(1)
    base = shape.block_params(2 * pairs, 1, compensated) - per_channel  # the block without its MLP channels
    width = int((budget / L - base) // per_channel) // multiple * multiple
    if width < multiple:
        return None
    width = min(width, P)
    widths = [width] * L
    spare = budget - L * shape.block_params(2 * pairs, width, compensated)
    step = multiple * per_channel
    rank = sorted(range(L), key=lambda i: -float(importance.mlp[i][list(importance.mlp_order[i][width:width + multiple])].sum()))
    for i in rank:
        if spare < step or widths[i] + multiple > P:
            continue
        widths[i] += multiple
        spare -= step
    return Subnet(tuple(top_layer(importance, i, pairs, widths[i]) for i in range(L)))


def snap(subnet: Subnet, imp: Importance, shape: ModelShape, space: Space, rng: random.Random) -> Subnet | None:
    """Every block moved to its nearest allowed pair count and width (by importance order), then
    repaired to the window: an initial subnet of the reformation-aware search, whose rounded
    uniform widths need not be ladder levels."""
    layers = tuple(None if l is None else refit(space, imp, i, l, shape,
                                                nearest_attn(space, shape, space.attn_of(l, shape)) if l.n_kv
                                                else space.attn_of(l, shape), nearest(space.width_options, l.width))
                   for i, l in enumerate(subnet.layers))
    return repair(Subnet(layers), imp, shape, space, rng)


# ---- a target's jobs -----------------------------------------------------------------------------
# baselines whose subnet needs a pass of its own over the calibration windows: built after the others
SEQUENTIAL_BASELINES = ("wanda-sp",)
# such a pass, in fitness windows' worth of time per calibration token (a forward with hooks, block by block)
SEQUENTIAL_COST = 1.5


def baseline_order(s: SearchSettings) -> list[str]:
    """The baselines in the order they are computed: from the dense pass's statistics first (instant),
    then the sequential ones."""
    return sorted(s.baselines, key=lambda n: n in SEQUENTIAL_BASELINES)


def baseline_jobs(lm: LoadedModel, s: SearchSettings, cal: Calibration, target: float,
                  names: tuple[str, ...] | None = None, cancel=None) -> Iterator[Job]:
    """The baselines' subnets at this target (METHOD section 6), each with its own compensation,
    computed on the same calibration windows as everything else: those from the dense pass's
    statistics first (instant), then the sequential ones; each read from the calibration's cache
    when an earlier search built it. Lazily, so a spent time budget computes no more of them."""
    total = total_fraction(lm.shape, s.share, target)  # the cache keys baselines by the total fraction
    for name in baseline_order(s) if names is None else names:
        res, _ = cal.baseline(name, lm.model, lm.shape, total, cancel)
        yield Job(res.subnet, target, 0, f"baseline:{name}", res.compensated)


# the scoring that orders mask edits of a child of a baseline's subnet: the one the baseline ranks by
BASELINE_SCORING = {"flap": "wifv", "flap-uniform": "wifv", "wanda-sp": "wanda", "magnitude": "obs",
                    "library": LIBRARY_SCORING}
# the library's other subnets per target: its attention damage weighed by these (attention kept more or
# less than the additive model says), and one that keeps every block
LIBRARY_VARIANTS = (0.5, 2.0)


def library_jobs(lm: LoadedModel, s: SearchSettings, cal: Calibration, library: Library,
                 targets: tuple[float, ...] | None = None, variants: bool = False,
                 seen: set[str] | None = None) -> list[Job]:
    """The library's least-damage subnet at every target (`explorer.search.solver`), its predicted
    fitness perplexity stored beside it; with `variants`, the others of LIBRARY_VARIANTS and a
    subnet without dropped blocks (duplicates of `seen` skipped)."""
    imp = cal.scoring(library.spec.scoring, lm.model, lm.shape)
    seen = set() if seen is None else seen
    jobs = []
    for target in s.targets if targets is None else targets:
        space = target_space(lm.shape, s, target)
        tries = [(1.0, space)] if not variants else \
            [(w, space) for w in LIBRARY_VARIANTS] + [(1.0, replace(space, min_layers=lm.shape.num_layers))]
        for weight, sp in tries:
            sub = solve(library, lm.shape, sp, imp, attn_weight=weight)
            if sub is None or sub.key() in seen:
                continue
            seen.add(sub.key())
            jobs.append(Job(sub, target, 0, "init", s.compensate, extra={
                "init_scoring": "library", "library_ppl": round(library.predicted_ppl(sub, lm.shape), 4)}))
    return jobs


def initial_jobs(lm: LoadedModel, s: SearchSettings, cal: Calibration, target: float, seen: set[str],
                 rng: random.Random | None = None) -> list[Job]:
    """The search's own initial subnets, the method's first: for each scoring the same keep ratio in
    every block (METHOD section 2), then uniform splits that keep more attention and less MLP (or
    the reverse), each moved onto the space's options where rounding left them off (`snap`, with
    `rng`); duplicates skipped. In the reformation-aware mode only the ladders' scoring ranks."""
    space = target_space(lm.shape, s, target)
    rng = rng or random.Random(0)
    if space.heads:
        return head_initial_jobs(lm, s, cal, target, seen, space, rng)
    reformed = s.fitness_mode == "reformed"
    opts = space.pair_options
    picks = sorted({opts[len(opts) - 1 - round(k * (len(opts) - 1) / max(1, s.split_init - 1))]
                    for k in range(s.split_init)}) if s.split_init else []  # widest attention first
    jobs = []
    total = total_fraction(lm.shape, s.share, target)
    for name in ((LADDER_SCORING,) if reformed else s.init_scorings):
        sc = cal.scoring(name, lm.model, lm.shape)
        subs = [initial_subnet(sc, lm.shape, total, s.multiple, s.head_multiple, s.compensate)]
        subs += [split_subnet(sc, lm.shape, total, p, s.multiple, s.compensate) for p in picks]
        # onto the space's options (the ladders' levels when reformed): uniform widths rounded to a step
        # may keep less attention than METHOD's range allows at this target
        subs = [None if sub is None else sub if space.allows(sub, lm.shape) else snap(sub, sc, lm.shape, space, rng)
                for sub in subs]
        for sub in subs:
            if sub is not None and sub.key() not in seen:
                seen.add(sub.key())
                jobs.append(Job(sub, target, 0, "init", s.compensate or reformed, extra={"init_scoring": name},
                                reformed=reformed))
    return jobs


def head_initial_jobs(lm: LoadedModel, s: SearchSettings, cal: Calibration, target: float, seen: set[str],
                      space: Space, rng: random.Random) -> list[Job]:
    """The heads space's initial subnets: for each scoring and each attention option (widest
    first, `split_init` + 1 of them), that option in every block with the widest uniform MLP that
    fits, repaired into the window."""
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
    return jobs


def seeded_jobs(lm: LoadedModel, s: SearchSettings, target: float, seen: set[str], baselines: list[Job]) -> list[Job]:
    """The baselines' subnets as initial subnets of the search's own kind (its compensation), so the
    search starts from the best subnet it knows and can only improve on it; in the heads space only
    those whose every block is one of its options. None in the reformation-aware mode (a baseline's
    mask is not a ladder level) or with `seed_baselines` off."""
    if not s.seed_baselines or s.fitness_mode == "reformed":
        return []
    space = target_space(lm.shape, s, target)
    jobs = []
    for b in baselines:
        if (not space.heads or space.allows(b.subnet, lm.shape)) and b.subnet.key() not in seen:
            seen.add(b.subnet.key())
            jobs.append(Job(b.subnet, target, 0, "init", s.compensate, extra={"init_scoring": b.origin.split(":", 1)[1]}))
    return jobs
