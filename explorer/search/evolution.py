"""Evolution operators (METHOD section 3): ratio, mask and depth mutation, crossover, and the
parameter-budget window every child must land in.

A gene is one block's LayerChoice (or None for a dropped block). Keep counts move along the
rounded options of the target's search space, and every count change edits the mask by
importance order (add the best missing, drop the worst kept). A child outside the window is
repaired by importance-ordered width steps on random blocks (the constructive form of
"discard and resample": resampling alone almost never lands in a narrow window); a child that
cannot be repaired is resampled by the caller.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from ..calibrate.importance import Importance, top_layer
from ..errors import ExplorerError
from ..model.subnet import LayerChoice, ModelShape, Subnet
from ..settings import Probs

# METHOD's reference ranges (LLaMA-7B), keyed by the kept fraction of the prunable weights:
# (fraction, min depth share, min attention keep, min MLP keep). Interpolated between rows.
RANGE_TABLE = ((1.0, 1.0, 1.0, 1.0), (0.9, 1.0, 0.9, 0.6), (0.8, 1.0, 0.8, 0.4), (0.7, 30 / 32, 0.7, 0.2),
               (0.6, 28 / 32, 0.6, 0.1), (0.5, 28 / 32, 0.6, 0.1), (0.3, 28 / 32, 0.5, 0.1), (0.0, 0.8, 0.4, 0.05))


@dataclass(frozen=True)
class Space:
    """What one target allows: the size window and the rounded per-block options."""

    target: float
    lo_params: int
    hi_params: int
    pair_options: tuple[int, ...]
    width_options: tuple[int, ...]
    min_layers: int
    compensated: bool = False  # sizes count the compensation biases
    # the head-granular space: per-block attention options (kept KV groups, query heads per kept
    # group), cheapest first, every kept head at the full head dim; () is the paper's space
    heads: tuple[tuple[int, int], ...] = ()

    @property
    def attn_options(self) -> tuple:
        """What a block's attention may keep: rotary pairs per group, or (groups, heads per group)."""
        return self.heads or self.pair_options

    def attn_of(self, layer: LayerChoice, shape: ModelShape):
        return (layer.n_kv, layer.heads_per_group(shape)) if self.heads else layer.pairs

    def allows(self, subnet: Subnet, shape: ModelShape) -> bool:
        """Whether every kept block is one of this space's options (a baseline may seed it)."""
        return all(l is None or (self.attn_of(l, shape) in self.attn_options and l.width in self.width_options)
                   for l in subnet.layers) and sum(l is not None for l in subnet.layers) >= self.min_layers

    def params(self, subnet: Subnet, shape: ModelShape) -> int:
        return subnet.params(shape, self.compensated)

    def contains(self, subnet: Subnet, shape: ModelShape) -> bool:
        return self.lo_params <= self.params(subnet, shape) <= self.hi_params

    def restricted(self, pairs, widths, shape: ModelShape) -> "Space":
        """Only these pair counts and MLP widths (full width always allowed): a ladder's levels."""
        p = tuple(o for o in self.pair_options if o in pairs or o == shape.n_pairs)
        w = tuple(o for o in self.width_options if o in widths or o == shape.intermediate_size)
        smallest = shape.fixed_params + self.min_layers * shape.block_params(2 * p[0], w[0], self.compensated)
        if smallest > self.hi_params:
            raise ExplorerError(f"target {self.target:.0%} is below what the ladders' levels can reach "
                                f"(smallest: {smallest / shape.dense_params:.1%} of the parameters)")
        return replace(self, pair_options=p, width_options=w)


def _interp(p: float) -> tuple[float, float, float]:
    rows = sorted(RANGE_TABLE)
    for (p0, *a), (p1, *b) in zip(rows, rows[1:]):
        if p0 <= p <= p1:
            t = 0.0 if p1 == p0 else (p - p0) / (p1 - p0)
            return tuple(x + t * (y - x) for x, y in zip(a, b))
    return tuple(rows[0][1:]) if p < rows[0][0] else tuple(rows[-1][1:])


def head_options(shape: ModelShape, attn_lo: float) -> tuple[tuple[int, int], ...]:
    """(KV groups, query heads per group) whose attention keeps at least `attn_lo` of the block's
    attention weights (METHOD's minimum keep, as a share of parameters), cheapest first."""
    full = shape.attn_params(shape.head_dim)
    opts = [(kv, r) for kv in range(1, shape.num_kv_heads + 1) for r in range(1, shape.group_size + 1)
            if shape.attn_params(shape.head_dim, kv, r) >= attn_lo * full - 1e-9]
    return tuple(sorted(opts, key=lambda o: (shape.attn_params(shape.head_dim, *o), o)))


def make_space(shape: ModelShape, target: float, window: float = 0.005, multiple: int = 8,
               head_multiple: int = 8, depth: bool = True, attn_min: float | None = None,
               compensated: bool = False, granularity: str = "dims") -> Space:
    """The target's window [target - window, target] of total params and per-block options from
    METHOD's table at the matching prunable fraction. `granularity` "heads": attention keeps whole
    heads (KV groups and query heads per group) instead of rotary pairs per head."""
    if not 0 < target <= 1:
        raise ExplorerError(f"target {target} must be a fraction in (0, 1]")
    prunable = (target * shape.dense_params - shape.fixed_params) / shape.dense_prunable
    if prunable <= 0:
        raise ExplorerError(f"target {target:.0%} is below the embeddings alone "
                            f"({shape.fixed_params / shape.dense_params:.1%} of the parameters)")
    depth_share, attn_lo, mlp_lo = _interp(min(prunable, 1.0))
    if attn_min is not None:
        attn_lo = attn_min
    pm = max(1, head_multiple // 2)
    n, P = shape.n_pairs, shape.intermediate_size
    pairs = sorted({min(n, pm * k) for k in range(max(1, math.floor(attn_lo * n / pm)), n // pm + 2)} | {n})
    widths = sorted({min(P, multiple * k) for k in range(max(1, math.floor(mlp_lo * P / multiple)), P // multiple + 2)} | {P})
    min_layers = shape.num_layers if not depth else max(1, math.ceil(depth_share * shape.num_layers - 1e-9))
    heads: tuple = ()
    if granularity == "heads":
        pairs, heads = [n], head_options(shape, attn_lo)
    elif granularity != "dims":
        raise ExplorerError(f"unknown search space {granularity!r}; choose dims or heads")
    space = Space(target, int(math.ceil((target - window) * shape.dense_params)), int(target * shape.dense_params),
                  tuple(pairs), tuple(widths), min_layers, compensated, heads)
    smallest = shape.fixed_params + min_layers * (
        shape.block_params(2 * pairs[0], widths[0], compensated) if not heads else
        shape.attn_params(shape.head_dim, *heads[0], o_bias=shape.o_bias or compensated)
        + shape.mlp_params(widths[0], shape.mlp_bias or compensated))
    if smallest > space.hi_params:
        raise ExplorerError(f"target {target:.0%} is below what the search space can reach "
                            f"(smallest subnet: {smallest / shape.dense_params:.1%} of the parameters)")
    return space


# ---- per-block edits ----------------------------------------------------------------------------
def resize(imp: Importance, i: int, layer: LayerChoice, pairs: int, width: int) -> LayerChoice:
    """Change keep counts, editing the masks by importance order (the kept KV groups and query
    heads stay as they are)."""
    groups = tuple(_resize(kept, pairs, imp.attn_order[i][g]) for g, kept in zip(layer.kv_groups, layer.attn_pairs))
    return replace(layer, attn_pairs=groups, mlp_channels=_resize(layer.mlp_channels, width, imp.mlp_order[i]))


def set_heads(imp: Importance, i: int, layer: LayerChoice, shape: ModelShape, kv: int, r: int) -> LayerChoice:
    """Keep `kv` KV groups with `r` query heads each, at the full head dim: groups and heads added
    best first and dropped worst first by importance (those kept stay kept)."""
    if imp.head_order is None:
        raise ExplorerError("these importance scores predate per-head scores; recompute them for the heads space")
    groups = _resize(layer.kv_groups, kv, imp.group_order[i])
    old = dict(zip(layer.kv_groups, layer.q_heads or [tuple(range(shape.group_size))] * layer.n_kv))
    heads = tuple(_resize(old.get(g, ()), r, imp.head_order[i][g]) for g in groups)
    full = tuple(range(shape.n_pairs))
    return replace(layer, attn_pairs=tuple(full for _ in groups), kv_groups=groups,
                   q_heads=None if r == shape.group_size else heads)


def refit(space: Space, imp: Importance, i: int, layer: LayerChoice, shape: ModelShape, attn, width: int) -> LayerChoice:
    """`resize` in either space: `attn` is a pair count, or (groups, heads per group)."""
    if space.heads:
        return resize(imp, i, set_heads(imp, i, layer, shape, *attn), shape.n_pairs, width)
    return resize(imp, i, layer, attn, width)


def space_top_layer(space: Space, imp: Importance, i: int, shape: ModelShape, attn, width: int) -> LayerChoice:
    """The best-scored block at an option of the space (a block a depth mutation brings back)."""
    if space.heads:
        return set_heads(imp, i, top_layer(imp, i, shape.n_pairs, width), shape, *attn)
    return top_layer(imp, i, attn, width)


def _resize(kept: tuple[int, ...], n: int, order: tuple[int, ...]) -> tuple[int, ...]:
    if n == len(kept):
        return kept
    have = set(kept)
    if n > len(kept):
        extra = [c for c in order if c not in have][: n - len(kept)]
        return tuple(sorted(have.union(extra)))
    rank = {c: r for r, c in enumerate(order)}
    return tuple(sorted(sorted(kept, key=rank.__getitem__)[:n]))


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


def _nearest(options: tuple[int, ...], value: int) -> int:
    return min(options, key=lambda o: (abs(o - value), o))


def _nearest_attn(space: Space, shape: ModelShape, value):
    """The option nearest `value` (by attention parameters in the heads space)."""
    if not space.heads:
        return _nearest(space.pair_options, value)
    if value in space.heads:
        return value
    cost = lambda o: shape.attn_params(shape.head_dim, *o)  # noqa: E731
    return min(space.heads, key=lambda o: (abs(cost(o) - cost(value)), o))


def snap(subnet: Subnet, imp: Importance, shape: ModelShape, space: Space, rng: random.Random) -> Subnet | None:
    """Every block moved to its nearest allowed pair count and width (by importance order), then
    repaired to the window: an initial subnet of the reformation-aware search, whose rounded
    uniform widths need not be ladder levels."""
    layers = tuple(None if l is None else refit(space, imp, i, l, shape,
                                                _nearest_attn(space, shape, space.attn_of(l, shape)) if l.n_kv
                                                else space.attn_of(l, shape), _nearest(space.width_options, l.width))
                   for i, l in enumerate(subnet.layers))
    return repair(Subnet(layers), imp, shape, space, rng)


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
        opts, cur = (P, _nearest_attn(space, shape, kept_attn)) if attn else (W, _nearest(W, width))
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
