"""A target's search space (METHOD section 1): the size window every subnet must land in, the
rounded per-block options (rotary pairs per KV group or whole heads, MLP widths, depth), and the
per-block edits that move a block between options by importance order (add the best missing
entries, drop the worst kept ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..calibrate.importance import Importance, top_layer
from ..errors import ExplorerError
from ..model.subnet import LayerChoice, ModelShape, Subnet
from ..settings import SearchSettings

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
        raise ExplorerError(f"{target:.1%} of the total parameters is below the embeddings alone "
                            f"({shape.fixed_params / shape.dense_params:.1%} of the parameters)")
    depth_share, attn_lo, mlp_lo = _interp(min(prunable, 1.0))
    if attn_min is not None:
        attn_lo = attn_min
    pm = max(1, head_multiple // 2)
    n, P = shape.n_pairs, shape.intermediate_size
    # the smallest option keeps at least METHOD's minimum share (rounded up to a whole step, never below it)
    pairs = sorted({min(n, pm * k) for k in range(max(1, math.ceil(attn_lo * n / pm - 1e-9)), n // pm + 2)} | {n})
    widths = sorted({min(P, multiple * k) for k in range(max(1, math.ceil(mlp_lo * P / multiple - 1e-9)),
                                                         P // multiple + 2)} | {P})
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
        raise ExplorerError(f"{target:.1%} of the total parameters is below what the search space can reach "
                            f"(smallest subnet: {smallest / shape.dense_params:.1%} of the parameters)")
    return space




SHARES = {"total": "the total parameters", "prunable": "the blocks' parameters (embeddings excluded)"}


def total_fraction(shape: ModelShape, share: str, target: float) -> float:
    """A target as a fraction of the total parameters, the unit every size budget is computed in:
    a share of the blocks becomes (embeddings + share x blocks) / total."""
    if share == "total":
        return target
    return (shape.fixed_params + target * shape.dense_prunable) / shape.dense_params


def target_space(shape: ModelShape, s: SearchSettings, target: float) -> Space:
    """The target's search space under a search's settings (`target` in the settings' share); in
    the reformation-aware mode only the ladders' levels."""
    from .ladders import LadderSpec

    space = make_space(shape, total_fraction(shape, s.share, target), s.window, s.multiple, s.head_multiple,
                       s.depth, compensated=s.compensate, granularity=s.space)
    if s.fitness_mode != "reformed":
        return space
    spec = LadderSpec.of(shape, s.head_multiple, s.multiple, s.ladder_mlp_levels)
    return space.restricted(spec.pairs, spec.widths, shape)


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


def nearest(options: tuple[int, ...], value: int) -> int:
    return min(options, key=lambda o: (abs(o - value), o))


def nearest_attn(space: Space, shape: ModelShape, value):
    """The option nearest `value` (by attention parameters in the heads space)."""
    if not space.heads:
        return nearest(space.pair_options, value)
    if value in space.heads:
        return value
    cost = lambda o: shape.attn_params(shape.head_dim, *o)  # noqa: E731
    return min(space.heads, key=lambda o: (abs(cost(o) - cost(value)), o))
