"""The per-block level library: how much one block's narrowing costs, measured once.

For every block and every level of its ladder (each attention option of the search space, a
ladder of MLP widths, the block dropped) the library holds the damage when *only that block* is
narrowed to that level and every other block stays dense: the increase of the mean NLL per token
on a few calibration windows, the fitness's own unit. Attention and MLP levels are measured
separately (the other sublayer full); a block's damage is their sum, and a subnet's predicted
damage is the sum over its blocks. That additive model ignores interactions between blocks, which
is why the library only *starts* and seeds the evolution (`explorer.search.solver`); the
evolution's fitness is measured on the whole subnet.

Each level is one fitness evaluation of a subnet that differs from the dense model in one block,
so the hidden states before that block are the dense model's, computed once and reused (the
fitness's prefix cache): block i's levels cost the blocks from i on and the head. The library
depends on the model, the calibration data, the scoring that orders each level's kept channels,
compensation and the search space; it is cached on disk beside the importance pass.
"""
from __future__ import annotations

import bisect
import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..calibrate.importance import Importance, top_layer
from ..errors import Cancelled
from ..events import StageProgress, check_cancel
from ..model.slicing import ChannelMeans
from ..model.subnet import LayerChoice, ModelShape, Subnet, round_width
from .fitness import FitnessEvaluator
from .space import set_heads

LIBRARY_FILE = "library.json"  # a run's copy
LIBRARY_SCORING = "wifv"  # FLAP's fluctuation metric orders every level's channels (compensation-aware)


@dataclass(frozen=True)
class LibrarySpec:
    """Which levels a library measures: attention options (rotary pairs per group, or (groups,
    query heads per group) in the heads space) and MLP widths, every one narrower than the block."""

    space: str  # "dims" or "heads"
    attn: tuple  # ints (pairs) or (kv, r) pairs, cheapest first, the full block excluded
    widths: tuple[int, ...]  # MLP widths, narrowest first, the full width excluded
    scoring: str
    compensated: bool

    @classmethod
    def of(cls, shape: ModelShape, space: str, head_multiple: int, multiple: int, mlp_levels: int,
           compensated: bool, scoring: str = LIBRARY_SCORING, attn_levels: int = 4) -> "LibrarySpec":
        """Every whole-head option; otherwise `attn_levels` head widths (rotary pairs, whole steps of
        `head_multiple`) and `mlp_levels` MLP widths, evenly spaced below the full block."""
        if space == "heads":
            attn = tuple(sorted(((kv, r) for kv in range(1, shape.num_kv_heads + 1)
                                 for r in range(1, shape.group_size + 1)
                                 if (kv, r) != (shape.num_kv_heads, shape.group_size)),
                                key=lambda o: (shape.attn_params(shape.head_dim, *o), o)))
        else:
            pm = max(1, head_multiple // 2)
            attn = tuple(sorted({round_width(shape.n_pairs * k / attn_levels, pm, shape.n_pairs)
                                 for k in range(1, attn_levels)} - {shape.n_pairs}))
        P = shape.intermediate_size
        widths = sorted({round_width(P * k / mlp_levels, multiple, P) for k in range(1, mlp_levels)} - {P})
        return cls(space, attn, tuple(widths), scoring, compensated)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attn"] = [list(a) if isinstance(a, tuple) else a for a in self.attn]
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LibrarySpec":
        attn = tuple(tuple(a) if isinstance(a, list) else a for a in d["attn"])
        return cls(d["space"], attn, tuple(d["widths"]), d["scoring"], bool(d["compensated"]))


@dataclass(frozen=True)
class Library:
    """Per block: the damage (nats per token) of each attention level, each MLP width and of
    dropping it; measured on `tokens` predicted tokens in `seconds`."""

    spec: LibrarySpec
    dense_nll: float  # the dense model's mean NLL per token on the library's windows
    attn: tuple[tuple[float, ...], ...]  # [block][level of spec.attn]
    mlp: tuple[tuple[float, ...], ...]  # [block][level of spec.widths]
    skip: tuple[float, ...]  # [block]
    tokens: int
    seconds: float
    dtype: str = "float32"  # the compute dtype it was measured in (the fitness's)

    @property
    def num_layers(self) -> int:
        return len(self.skip)

    def complete(self, shape: ModelShape) -> bool:
        """Whether every block is measured (a cut measuring stores fewer rows)."""
        return self.num_layers == shape.num_layers

    def resumes(self, spec: LibrarySpec, tokens: int, dtype: str, dense_nll: float) -> bool:
        """Whether this partial library's rows belong to a measuring of `spec` on the same windows
        (tokens, dtype and the dense model's NLL on them)."""
        return (self.spec == spec and self.tokens == tokens and self.dtype == dtype
                and math.isclose(self.dense_nll, dense_nll, rel_tol=1e-6, abs_tol=1e-6))

    # ---- lookups -------------------------------------------------------------------------
    def attn_damage(self, i: int, option, shape: ModelShape) -> float:
        """Damage of block i's attention at `option` (pairs, or (kv, r)); 0 at full width. Pair
        counts between two measured levels are interpolated; a heads option not measured is inf."""
        full = (shape.num_kv_heads, shape.group_size) if self.spec.space == "heads" else shape.n_pairs
        if option == full:
            return 0.0
        if self.spec.space == "heads":
            try:
                return self.attn[i][self.spec.attn.index(tuple(option))]
            except ValueError:
                return math.inf
        return _interp(list(self.spec.attn) + [shape.n_pairs], list(self.attn[i]) + [0.0], option)

    def mlp_damage(self, i: int, width: int, shape: ModelShape) -> float:
        """Damage of block i's MLP at `width` channels, interpolated between the measured widths
        (linearly; below the narrowest, towards the dropped block's damage at 0 channels)."""
        if width >= shape.intermediate_size:
            return 0.0
        xs = [0] + list(self.spec.widths) + [shape.intermediate_size]
        ys = [max(self.skip[i], self.mlp[i][0])] + list(self.mlp[i]) + [0.0]
        return _interp(xs, ys, width)

    def layer_damage(self, i: int, layer: LayerChoice | None, shape: ModelShape) -> float:
        if layer is None:
            return self.skip[i]
        option = (layer.n_kv, layer.heads_per_group(shape)) if self.spec.space == "heads" else layer.pairs
        return self.attn_damage(i, option, shape) + self.mlp_damage(i, layer.width, shape)

    def damage(self, subnet: Subnet, shape: ModelShape) -> float:
        """The subnet's predicted damage: the sum of its blocks' (nats per token)."""
        return sum(self.layer_damage(i, l, shape) for i, l in enumerate(subnet.layers))

    def predicted_ppl(self, subnet: Subnet, shape: ModelShape) -> float:
        """exp(dense NLL + predicted damage): the fitness perplexity the additive model expects."""
        return math.exp(min(self.dense_nll + self.damage(subnet, shape), 50.0))

    # ---- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "dense_nll": self.dense_nll, "attn": [list(a) for a in self.attn],
                "mlp": [list(m) for m in self.mlp], "skip": list(self.skip), "tokens": self.tokens,
                "seconds": self.seconds, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "Library":
        return cls(LibrarySpec.from_dict(d["spec"]), float(d["dense_nll"]), tuple(tuple(a) for a in d["attn"]),
                   tuple(tuple(m) for m in d["mlp"]), tuple(d["skip"]), int(d["tokens"]), float(d["seconds"]),
                   str(d.get("dtype", "float32")))

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Library":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _interp(xs: list, ys: list, x: float) -> float:
    k = bisect.bisect_left(xs, x)
    if k < len(xs) and xs[k] == x:
        return ys[k]
    if k == 0:
        return ys[0]
    if k == len(xs):
        return ys[-1]
    t = (x - xs[k - 1]) / (xs[k] - xs[k - 1])
    return ys[k - 1] + t * (ys[k] - ys[k - 1])


def level_layer(spec: LibrarySpec, imp: Importance, i: int, shape: ModelShape, attn=None,
                width: int | None = None) -> LayerChoice:
    """Block i at an attention option and MLP width (None: full), its kept channels the best by `imp`."""
    width = shape.intermediate_size if width is None else width
    if spec.space == "heads":
        layer = top_layer(imp, i, shape.n_pairs, width)
        return layer if attn is None else set_heads(imp, i, layer, shape, *attn)
    return top_layer(imp, i, shape.n_pairs if attn is None else attn, width)


def one_block(shape: ModelShape, i: int, layer: LayerChoice | None) -> Subnet:
    """The dense model with only block i replaced."""
    full = Subnet.full(shape)
    return Subnet(full.layers[:i] + (layer,) + full.layers[i + 1:])


def measure_library(model, shape: ModelShape, spec: LibrarySpec, imp: Importance, windows: torch.Tensor,
                    means: ChannelMeans | None, dtype: torch.dtype | None = None, batch: int = 2,
                    cancel: threading.Event | None = None, start: "Library | None" = None,
                    deadline: float | None = None) -> Iterator[StageProgress | Library]:
    """Measure every level of every block (yields StageProgress per block, then the Library).
    The dense states before each block are cached once; a level's own states are dropped after it.

    `start` holds blocks measured before (a measuring that was cut): they are kept, and measuring
    goes on from the next block. With a `deadline` (a `clock()` time), measuring stops after the
    first block whose timing, weighed by the work of the blocks left, says the rest would end
    after it. A cut or stopped measuring yields the blocks measured so far as a partial Library
    (fewer rows than blocks), which `start` resumes."""
    t0 = clock()
    L = shape.num_layers
    state_bytes = windows.numel() * shape.hidden_size * 4
    fe = FitnessEvaluator(model, shape, windows, cache_bytes=(L + 2) * state_bytes, dtype=dtype, batch=batch,
                          means=means, block_cache_bytes=64 * 2**20)
    comp = spec.compensated
    dense = fe.evaluate(Subnet.full(shape), compensated=comp, cancel=cancel)
    tokens = dense.tokens
    base = dense.nll / tokens
    dtype_name = str(fe.dtype).removeprefix("torch.")
    attn, mlp, skip, before = [], [], [], 0.0
    if start is not None and start.resumes(spec, tokens, dtype_name, base):
        attn, mlp, skip, before = list(start.attn), list(start.mlp), list(start.skip), start.seconds
    first = len(skip)
    per_block = len(spec.attn) + len(spec.widths) + 1

    def partial() -> Library:
        return Library(spec, base, tuple(attn), tuple(mlp), tuple(skip), tokens,
                       round(before + clock() - t0, 2), dtype_name)

    yield StageProgress("library", first, L, f"{per_block} levels per block, {L * per_block} one-block subnets "
                        f"on {tokens} tokens" + (f", blocks 1-{first} measured before" if first else ""))
    work = block_work(shape)
    t_blocks = clock()  # the dense evaluation is not a block's work
    try:
        for i in range(first, L):
            row_a, row_m = [], []
            for option in spec.attn:
                row_a.append(_damage(fe, one_block(shape, i, level_layer(spec, imp, i, shape, option)), comp, base,
                                     cancel))
            for width in spec.widths:
                row_m.append(_damage(fe, one_block(shape, i, level_layer(spec, imp, i, shape, None, width)), comp,
                                     base, cancel))
            skip.append(_damage(fe, one_block(shape, i, None), comp, base, cancel) if L > 1 else math.inf)
            attn.append(tuple(row_a))
            mlp.append(tuple(row_m))
            left = (clock() - t_blocks) / sum(work[first: i + 1]) * sum(work[i + 1:])
            yield StageProgress("library", i + 1, L, f"block {i + 1} of {L}, about {left:.0f} s left")
            if deadline is not None and i + 1 < L and clock() + left > deadline:
                break  # it would not end in time: the blocks measured are kept, the rest waits
    except Cancelled:
        yield partial()  # kept by the caller for the next search, then Stop goes on
        raise
    yield partial()


def block_work(shape: ModelShape) -> list[float]:
    """Each block's share of measuring a library: block i's levels compute blocks i.. and the head,
    so the time left is weighed by that work."""
    work = [(shape.num_layers - i) * shape.block_params(shape.head_dim, shape.intermediate_size)
            + shape.vocab_size * shape.hidden_size for i in range(shape.num_layers)]
    return [w / sum(work) for w in work]


def clock() -> float:
    """The library's clock (the search's budget clock)."""
    return time.perf_counter()


def _damage(fe: FitnessEvaluator, subnet: Subnet, compensated: bool, base: float, cancel) -> float:
    check_cancel(cancel)
    r = fe.evaluate(subnet, compensated=compensated, cancel=cancel)
    fe.drop(r.created)
    return r.nll / r.tokens - base


__all__ = ["LIBRARY_FILE", "Library", "LibrarySpec", "LIBRARY_SCORING", "block_work", "level_layer", "measure_library",
           "one_block"]
