"""Pre-reformed width ladders: what the reformation-aware search assembles its candidates from
(METHOD 8.1).

The paper's fitness scores the sliced, unreformed subnet, but the user keeps the reformed one. Here
each block gets a ladder of widths, nested along one importance order (a level keeps a prefix of
the ranked entries): rotary pairs per KV group for the attention, channels for the MLP. For every
level below full width, `o_proj` / `down_proj` are reformed once with the closed form of METHOD 4
(with the intercept, the same solver and guard as `explorer.pick.reform`) on **block-local**
statistics: the dense block's own inputs on the calibration windows, the dense layer's output as
the target. A candidate is then a choice of level per block (and depth), and its fitness is that of
the assembled pre-reformed levels, so the search ranks what the user will get. The chosen subnet
is still reformed sequentially afterwards (`explorer.pick.reform`), as every pick is.

Cost: one pass over the calibration windows, one attention forward per attention level, one MLP
Gram per block and one solve per level; computed once per model, calibration data and ladder, and
cached on disk beside the importance pass. Memory: the levels of one block hold
D x (sum of its kept widths) weights for each of the two projections, about D x F x m / 2 for m MLP
levels; `ladder_bytes` states it before anything is built, and the search refuses a ladder over
its `ladder_mb` setting.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from ..calibrate.capture import BlockInputs, block_linears, capture_block_inputs, run_block
from ..calibrate.importance import Importance, top_layer
from ..errors import ExplorerError
from ..events import EventSink, Progress, check_cancel, no_event
from ..model.devices import execution_device, onloaded
from ..model.subnet import LayerChoice, ModelShape, Subnet

LADDER_SCORING = "obs"  # the importance order the ladders are nested along (METHOD section 2's)


@dataclass(frozen=True)
class LadderSpec:
    """Which levels: kept rotary pairs per KV group and MLP channels (full width excluded: a full
    sublayer needs no reformation)."""

    pairs: tuple[int, ...]
    widths: tuple[int, ...]

    @classmethod
    def of(cls, shape: ModelShape, head_multiple: int, multiple: int, mlp_levels: int) -> "LadderSpec":
        """Every pair count in steps of head_multiple / 2; `mlp_levels` MLP widths evenly spaced
        (rounded to `multiple`) up to the full width."""
        pm, P = max(1, head_multiple // 2), shape.intermediate_size
        pairs = tuple(range(pm, shape.n_pairs, pm))
        widths = sorted({max(multiple, round(P * k / mlp_levels / multiple) * multiple) for k in range(1, mlp_levels)})
        return cls(pairs, tuple(w for w in widths if w < P))


def ladder_bytes(shape: ModelShape, spec: LadderSpec, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the levels of every block hold: weights [D, k] and a bias [D] per level."""
    D, q = shape.hidden_size, shape.num_heads
    per_block = sum(D * (2 * p * q) + D for p in spec.pairs) + sum(D * w + D for w in spec.widths)
    return shape.num_layers * per_block * torch.finfo(dtype).bits // 8


@dataclass
class Ladders:
    """Per block, the reformed output projections of every level: attn[i][pairs] = (o_proj weight
    [D, H * 2 * pairs], bias [D]) and mlp[i][width] = (down_proj weight [D, width], bias [D]).
    A level whose reformation would not lower its calibration error is stored unreformed (the
    kept columns and the compensation bias), as `explorer.pick.reform` keeps such a layer."""

    spec: LadderSpec
    scoring: str  # the importance order the levels are nested along
    attn: list[dict[int, tuple[torch.Tensor, torch.Tensor]]]
    mlp: list[dict[int, tuple[torch.Tensor, torch.Tensor]]]
    order: Importance | None = field(default=None, repr=False)  # to check that a block is on the ladder
    reformed: int = 0  # levels whose reformation lowered the error (the others are compensated only)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for side in (self.attn, self.mlp) for block in side
                   for pair in block.values() for t in pair)

    def on_ladder(self, i: int, layer: LayerChoice) -> bool:
        """Whether block i keeps a ladder level: every KV group and query head, the top `pairs` of
        each group and the top `width` channels, each at a stored level or at full width."""
        if self.order is None:
            raise ExplorerError("these ladders were loaded without their importance order")
        if layer.n_kv and (layer.kv_groups != tuple(range(len(self.order.attn_order[i]))) or layer.q_heads):
            return False
        if layer.n_kv and layer.pairs not in self.attn[i] and layer.pairs != len(self.order.attn_order[i][0]):
            return False
        if layer.width not in self.mlp[i] and layer.width != len(self.order.mlp_order[i]):
            return False
        return layer == top_layer(self.order, i, layer.pairs, layer.width) or not layer.n_kv and \
            layer.mlp_channels == tuple(sorted(self.order.mlp_order[i][:layer.width]))

    def overrides(self, i: int, layer: LayerChoice) -> dict[str, torch.Tensor]:
        """The reformed o_proj / down_proj weights and biases of block i's levels, in the base model's
        names; nothing for a full-width sublayer (it computes the dense function already)."""
        if not self.on_ladder(i, layer):
            raise ExplorerError(f"block {i}'s choice is not a level of the ladder (pairs {layer.pairs}, "
                                f"width {layer.width}): the reformation-aware search only assembles levels")
        out = {}
        if layer.n_kv and layer.pairs in self.attn[i]:
            w, b = self.attn[i][layer.pairs]
            out["self_attn.o_proj.weight"], out["self_attn.o_proj.bias"] = w, b
        if layer.width in self.mlp[i]:
            w, b = self.mlp[i][layer.width]
            out["mlp.down_proj.weight"], out["mlp.down_proj.bias"] = w, b
        return out

    def save(self, path: Path) -> None:
        tensors = {}
        for i, (a, m) in enumerate(zip(self.attn, self.mlp)):
            for p, (w, b) in a.items():
                tensors[f"attn.{i}.{p}.w"], tensors[f"attn.{i}.{p}.b"] = w.contiguous(), b.contiguous()
            for c, (w, b) in m.items():
                tensors[f"mlp.{i}.{c}.w"], tensors[f"mlp.{i}.{c}.b"] = w.contiguous(), b.contiguous()
        meta = {"pairs": ",".join(map(str, self.spec.pairs)), "widths": ",".join(map(str, self.spec.widths)),
                "scoring": self.scoring, "blocks": str(len(self.attn)), "reformed": str(self.reformed)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, order: Importance | None = None) -> "Ladders":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
        spec = LadderSpec(ints(meta["pairs"]), ints(meta["widths"]))
        n = int(meta["blocks"])
        attn = [{p: (t[f"attn.{i}.{p}.w"], t[f"attn.{i}.{p}.b"]) for p in spec.pairs if f"attn.{i}.{p}.w" in t}
                for i in range(n)]
        mlp = [{c: (t[f"mlp.{i}.{c}.w"], t[f"mlp.{i}.{c}.b"]) for c in spec.widths if f"mlp.{i}.{c}.w" in t}
               for i in range(n)]
        return cls(spec, meta["scoring"], attn, mlp, order, int(meta.get("reformed", 0)))


def build_ladders(model, shape: ModelShape, order: Importance, scoring: str, windows: torch.Tensor,
                  spec: LadderSpec, means, settings, on_event: EventSink = no_event,
                  cancel: threading.Event | None = None, batch_size: int = 8) -> Ladders:
    """`iter_ladders`, its progress sent to `on_event`."""
    for item in iter_ladders(model, shape, order, scoring, windows, spec, means, settings, cancel, batch_size):
        if isinstance(item, Ladders):
            return item
        on_event(item)
    raise RuntimeError("the ladder pass ended without its result")


@torch.no_grad()
def iter_ladders(model, shape: ModelShape, order: Importance, scoring: str, windows: torch.Tensor,
                 spec: LadderSpec, means, settings, cancel: threading.Event | None = None,
                 batch_size: int = 8) -> Iterator[Progress | Ladders]:
    """Reform every level of every block on the dense block's own inputs (`settings`: the
    ReformSettings whose solver, ridge and intercept the levels use; `means`: the channel means
    whose compensation bias is a level's starting point, as for a compensated subnet). Yields
    Progress per block, then the Ladders (last item)."""
    from ..model.modeling_subnet import SubnetBlock, SubnetRotary, block_masks
    from ..model.slicing import block_state_dict, fill_buffers, layer_indices, subnet_config
    from ..pick.reform import Gram, attention_gram, mlp_gram

    L, T = shape.num_layers, windows.shape[1]
    inputs = capture_block_inputs(model, windows, batch_size, cancel)
    attn: list[dict] = []
    mlp: list[dict] = []
    reformed = 0
    for i, block in enumerate(model.model.layers):
        check_cancel(cancel)
        device = execution_device(block)
        with onloaded(block):
            lin = block_linears(block)
            wo, bo = lin["self_attn.o_proj"].weight.detach().clone(), lin["self_attn.o_proj"].bias
            wd, bd = lin["mlp.down_proj"].weight.detach().clone(), lin["mlp.down_proj"].bias
            bo = None if bo is None else bo.detach().clone()
            bd = None if bd is None else bd.detach().clone()
        levels_a: dict = {}
        for p in spec.pairs:  # the sliced block at this attention level, on the dense block's inputs
            layer = top_layer(order, i, p, shape.intermediate_size)
            one = Subnet(tuple(layer if k == i else None for k in range(L)))
            config = subnet_config(model.config, one, shape, means is not None)
            with torch.device("meta"):
                sub = SubnetBlock(config, 0)
            sub.load_state_dict(block_state_dict(block, layer, shape, means, i), assign=True, strict=True)
            fill_buffers(sub, config, device)
            rope = SubnetRotary(config).to(device).table(torch.arange(T, device=device)[None], inputs.hidden[0].dtype)
            masks = block_masks(config.sliding_windows, None, 1, T, 0, device)
            sub_in = BlockInputs(inputs.hidden, [(rope, masks, None)] * len(inputs.hidden), [{}] * len(inputs.hidden))
            with onloaded(block):
                gram = attention_gram(block, sub, inputs.at(i), sub_in, cancel)
            kept = layer_indices(shape, layer, "cpu")["q"]
            start_b = sub.self_attn.o_proj.bias
            levels_a[p], ok = _solve(wo, bo, gram, kept, None if start_b is None else start_b.detach(), settings)
            reformed += ok
        attn.append(levels_a)
        levels_m: dict = {}
        if spec.widths:
            with onloaded(block):  # the dense MLP's own input: one Gram of every channel serves each level
                g = mlp_gram(block, block, inputs.at(i), torch.zeros(0, dtype=torch.long), cancel)
            for w in spec.widths:
                kept = torch.tensor(sorted(order.mlp_order[i][:w]))
                sub_gram = Gram(g.dd, g.dd.index_select(1, kept), g.dd.index_select(0, kept).index_select(1, kept),
                                g.d_sum, g.d_sum.index_select(0, kept), g.n)
                # the sliced block's own down_proj bias (base bias plus compensation): the level's start
                start = block_state_dict(block, top_layer(order, i, shape.n_pairs, w), shape, means, i).get(
                    "mlp.down_proj.bias")
                levels_m[w], ok = _solve(wd, bd, sub_gram, kept, start, settings)
                reformed += ok
        mlp.append(levels_m)
        inputs = inputs.with_hidden(run_block(block, inputs.at(i)))  # the dense block's outputs feed the next
        yield Progress("ladders", i + 1, L, f"block {i + 1}/{L}")
    yield Ladders(spec, scoring, attn, mlp, order, reformed)


def _solve(w, b, gram, kept, start_bias, settings) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """One level: (weight [D, k], bias [D]) reformed, or the start when reformation would not help."""
    from ..pick.reform import solve_layer

    new_w, new_b, _, _ = solve_layer(w, b, gram, kept, start_bias, settings)
    dtype = w.dtype
    if new_w is not None:
        bias = new_b if new_b is not None else (start_bias if start_bias is not None else torch.zeros(w.shape[0]))
        return (new_w.to(dtype).cpu().contiguous(), bias.to(dtype).cpu().contiguous()), True
    start = w.index_select(1, kept.to(w.device)).cpu()
    bias = start_bias if start_bias is not None else torch.zeros(w.shape[0])
    return (start.contiguous(), bias.to(dtype).cpu().contiguous()), False


__all__ = ["LadderSpec", "Ladders", "build_ladders", "iter_ladders", "ladder_bytes"]
