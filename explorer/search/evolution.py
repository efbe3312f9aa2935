"""Evolution operators (METHOD section 3): ratio, mask and depth mutation, crossover, the repair
that brings a child into its target's size window, and one generation's breeding.

A gene is one block's LayerChoice (or None for a dropped block). Keep counts move along the
rounded options of the target's space (`explorer.search.space`), and every count change edits the
mask by importance order. A child outside the window is repaired by importance-ordered width
steps on random blocks (the constructive form of "discard and resample": resampling alone almost
never lands in a narrow window); a child that cannot be repaired is resampled by `breed`.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import replace

from ..calibrate.importance import Importance
from ..model.subnet import LayerChoice, ModelShape, Subnet
from ..settings import Probs, SearchSettings
from .space import Space, nearest, nearest_attn, refit, space_top_layer


def mask_mutate(layer: LayerChoice, shape: ModelShape, rng: random.Random, alpha: float) -> LayerChoice:
    """Keep a random alpha share of the kept indices and refill uniformly from the others."""
    groups = tuple(_remask(g, shape.n_pairs, rng, alpha) for g in layer.attn_pairs)
    return replace(layer, attn_pairs=groups, mlp_channels=_remask(layer.mlp_channels, shape.intermediate_size, rng, alpha))


def _remask(kept: tuple[int, ...], limit: int, rng: random.Random, alpha: float) -> tuple[int, ...]:
    n = len(kept)
    if n in (0, limit):
        return kept
    others = sorted(set(range(limit)) - set(kept))
    keep = rng.sample(kept, max(int(round(alpha * n)), n - len(others)))  # the count never changes
    fill = rng.sample(others, n - len(keep))
    return tuple(sorted(keep + fill))


# ---- operators ------------------------------------------------------------------------------------
def mutate(subnet: Subnet, imp: Importance, shape: ModelShape, space: Space, rng: random.Random,
           probs: Probs) -> Subnet | None:
    """Depth, ratio and mask mutation per block, then repair to the window (None: give up)."""
    layers = list(subnet.layers)
    for i, layer in enumerate(layers):
        if rng.random() < probs.depth and space.min_layers < shape.num_layers:
            kept = sum(l is not None for l in layers)
            if layer is not None and kept > space.min_layers:
                layers[i] = None
                continue
            if layer is None:
                layers[i] = space_top_layer(space, imp, i, shape, rng.choice(space.attn_options),
                                            rng.choice(space.width_options))
                continue
        if layer is None:
            continue
        if rng.random() < probs.ratio:
            attn = space.attn_of(layer, shape)
            width = layer.width
            which = rng.random()
            if which < 0.5 or len(space.attn_options) == 1 or not layer.n_kv:  # the MLP alone: less sensitive
                width = rng.choice(space.width_options)
            elif which < 0.75:
                attn = rng.choice(space.attn_options)
            else:
                attn, width = rng.choice(space.attn_options), rng.choice(space.width_options)
            layer = refit(space, imp, i, layer, shape, attn, width)
        if rng.random() < probs.mask:
            layer = mask_mutate(layer, shape, rng, probs.alpha)
        layers[i] = layer
    return repair(Subnet(tuple(layers)), imp, shape, space, rng, start=_first_change(subnet, layers))


def _first_change(parent: Subnet, layers) -> int:
    return next((i for i, (a, b) in enumerate(zip(parent.layers, layers)) if a != b), len(layers))


def crossover(a: Subnet, b: Subnet, imp: Importance, shape: ModelShape, space: Space,
              rng: random.Random) -> Subnet | None:
    """Per block, the gene of one parent or the other; then repair to the window."""
    layers = [x if rng.random() < 0.5 else y for x, y in zip(a.layers, b.layers)]
    while sum(l is not None for l in layers) < space.min_layers:  # both parents' drops may stack up
        i = rng.choice([k for k, l in enumerate(layers) if l is None])
        layers[i] = a.layers[i] if a.layers[i] is not None else b.layers[i]
    start = max(_first_change(a, layers), _first_change(b, layers))
    return repair(Subnet(tuple(layers)), imp, shape, space, rng, start=start)


def repair(subnet: Subnet, imp: Importance, shape: ModelShape, space: Space, rng: random.Random,
           max_steps: int = 4000, start: int = 0) -> Subnet | None:
    """Importance-ordered width steps on random blocks until the size is inside the window.

    Steps go to blocks from `start` on (the first block that differs from the parent), so the
    child keeps its parent's leading blocks and the fitness can reuse their hidden states; if
    those blocks cannot absorb the change, every block may take it."""
    layers = list(subnet.layers)
    fixed = shape.fixed_params
    sizes = [shape.layer_params(l, space.compensated) for l in layers]
    total = fixed + sum(sizes)
    P, W = space.attn_options, space.width_options
    for step in range(max_steps):
        if space.lo_params <= total <= space.hi_params:
            return Subnet(tuple(layers))
        grow = total < space.lo_params
        first = start if step < max_steps // 4 else 0
        idx = [k for k, l in enumerate(layers) if l is not None and k >= first] or \
            [k for k, l in enumerate(layers) if l is not None]
        i = rng.choice(idx)
        l = layers[i]
        kept_attn, width = space.attn_of(l, shape), l.width
        attn = rng.random() < 0.2 and l.n_kv > 0
        opts, cur = (P, nearest_attn(space, shape, kept_attn)) if attn else (W, nearest(W, width))
        k = opts.index(cur) + (1 if grow else -1)
        if not 0 <= k < len(opts):
            continue
        if attn:
            kept_attn = opts[k]
        else:
            width = opts[k]
        layers[i] = refit(space, imp, i, l, shape, kept_attn, width)
        new = shape.layer_params(layers[i], space.compensated)
        total += new - sizes[i]
        sizes[i] = new
    return None


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
