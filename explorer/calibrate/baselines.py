"""Training-free baselines as their papers' official code defines them (CASIA-IVA-Lab/FLAP,
`lib/prune.py`), in the same code path as a searched subnet: each is a subnet record (plus,
for FLAP, bias compensation), sliced, evaluated, reformed and exported like any other.

All four prune attention by whole heads, and under GQA by whole KV groups (a group takes its
key and value heads and every query head it serves), and the MLP by channels:

- `magnitude` (FLAP repo's `mag_sp`): o_proj / down_proj column L2 norms, a head's summed over
  its columns; one pruning ratio for every block; no calibration, no bias.
- `wanda-sp` (`wanda_sp`): |W| * ||X_j|| of o_proj / down_proj, averaged over output rows (a
  head: summed over its columns); one ratio for every block. Sequential as in that code: block
  i is scored on the inputs that the already pruned blocks 0..i-1 produce. No bias.
- `flap` (`flap`, WIFV metric, AL-AM structure): WIFV = variance of the input channel over
  calibration tokens x squared column norm (the attention's squared again, as in that code);
  each block's channel scores standardised within the block, a head (group) scored by the mean
  of its standardised channels; one global ranking of heads and channels, each weighted by its
  parameter cost, cut where the kept cost meets the budget; bias compensation.
- `flap-uniform` (FLAP's UL-UM structure): the same WIFV scores, one ratio for every block;
  bias compensation.

Every statistic but Wanda-sp's comes from one pass of the dense model (the importance pass,
`Importance.stats`). The official code fixes the ratio against the block weights; here the
ratio (or FLAP's global cut) is chosen so the subnet has at most the target share of the
*total* parameters, the convention of every figure in this project. Widths are not rounded:
the masks are exactly what the method selects.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ExplorerError
from ..events import check_cancel
from ..model.devices import execution_device, onloaded
from ..model.subnet import LayerChoice, ModelShape, Subnet
from .capture import StatsCollector, block_linears, capture_block_inputs, run_block
from .importance import Importance

BASELINES = ("magnitude", "wanda-sp", "flap", "flap-uniform")
COMPENSATED = {"magnitude": False, "wanda-sp": False, "flap": True, "flap-uniform": True}


@dataclass(frozen=True)
class BaselineResult:
    name: str
    subnet: Subnet
    compensated: bool  # bias compensation is part of the method (FLAP)


# ---- structures ---------------------------------------------------------------------------------
def group_sum(per_channel: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """o_proj input-channel scores [H * head_dim] -> one per KV group [KV] (sum over its heads' columns)."""
    return per_channel.view(shape.num_kv_heads, -1).sum(1)


def keep_top(scores: torch.Tensor, n_remove: int) -> tuple[int, ...]:
    """Indices kept after removing the `n_remove` lowest scores (stable on ties)."""
    order = scores.argsort(stable=True).tolist()
    return tuple(sorted(order[n_remove:]))


def head_layer(shape: ModelShape, groups: tuple[int, ...], channels: tuple[int, ...]) -> LayerChoice:
    """A block that keeps whole KV groups (every query head, full head dim) and some MLP channels."""
    full = tuple(range(shape.n_pairs))
    return LayerChoice(tuple(full for _ in groups), channels, tuple(groups))


# ---- scores from the dense pass -------------------------------------------------------------------
@torch.no_grad()
def column_norms(model, shape: ModelShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: L2 norm of each o_proj column [H * hd] and each down_proj column [P]."""
    out = []
    for block in model.model.layers:
        with onloaded(block):
            lin = block_linears(block)
            out.append((lin["self_attn.o_proj"].weight.detach().float().norm(dim=0).cpu(),
                        lin["mlp.down_proj"].weight.detach().float().norm(dim=0).cpu()))
    return out


@torch.no_grad()
def wifv_scores(model, stats: Importance) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FLAP's WIFV per block: (variance of o_proj input x squared column norm) squared [H * hd],
    and variance of down_proj input x squared column norm [P]."""
    out = []
    for i, block in enumerate(model.model.layers):
        with onloaded(block):
            lin = block_linears(block)
            wo = lin["self_attn.o_proj"].weight.detach().float().cpu().pow(2).sum(0)
            wd = lin["mlp.down_proj"].weight.detach().float().cpu().pow(2).sum(0)
        out.append(((stats.stats[i]["o_in"].variance * wo) ** 2, stats.stats[i]["down_in"].variance * wd))
    return out


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one block's channels (torch.std: n - 1, as the official code)."""
    return (x - x.mean()) / x.std().clamp_min(1e-12)


# ---- the budget ---------------------------------------------------------------------------------------
def _fits(layers, shape: ModelShape, budget: float, compensated: bool) -> bool:
    return Subnet(tuple(layers)).params(shape, compensated) <= budget


def uniform_cut(attn: list[torch.Tensor], mlp: list[torch.Tensor], shape: ModelShape, fraction: float,
                compensated: bool) -> Subnet:
    """One pruning ratio for every block: the same number of lowest-scoring groups and channels
    removed in each (`uniform_counts`)."""
    g, p = uniform_counts(shape, fraction, compensated)
    return Subnet(tuple(head_layer(shape, keep_top(a, g), keep_top(m, p)) for a, m in zip(attn, mlp)))


def _smallest(fits) -> float:
    """The smallest ratio in [0, 1] for which the (monotone) `fits` holds, by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def uniform_counts(shape: ModelShape, fraction: float, compensated: bool = False) -> tuple[int, int]:
    """(groups, channels) removed per block: `int(ratio * n)` of each, as the official code counts,
    at the smallest ratio whose subnet fits `fraction` of the total parameters. Heads go in whole KV
    groups, so at that ratio the MLP's share is then set to fill the budget (a group's step would
    otherwise leave the baseline well below the target it is compared at). Sizes depend only on
    the counts, not on the scores."""
    budget = fraction * shape.dense_params
    KV, P = shape.num_kv_heads, shape.intermediate_size

    def size(g: int, p: int) -> int:
        return shape.fixed_params + shape.num_layers * (
            shape.attn_params(shape.head_dim, KV - g, o_bias=shape.o_bias or compensated)
            + shape.mlp_params(P - p, down_bias=shape.mlp_bias or compensated))

    if size(KV, P) > budget:
        raise ExplorerError(f"a uniform ratio cannot reach {fraction:.0%} of the parameters")
    ratio = _smallest(lambda r: size(int(r * KV), int(r * P)) <= budget)
    m_ratio = _smallest(lambda r: size(int(ratio * KV), int(r * P)) <= budget)
    return int(ratio * KV), int(m_ratio * P)


def global_subnet(attn: list[torch.Tensor], mlp: list[torch.Tensor], shape: ModelShape, fraction: float,
                  compensated: bool) -> Subnet:
    """FLAP's adaptive structure: one ranking of every group and channel of every block (scores
    already comparable across blocks), kept from the top until the budget is met."""
    budget = fraction * shape.dense_params
    L, KV = shape.num_layers, shape.num_kv_heads
    items = [(float(a[k]), 0, i, k) for i, a in enumerate(attn) for k in range(KV)]
    items += [(float(m[c]), 1, i, c) for i, m in enumerate(mlp) for c in range(shape.intermediate_size)]
    items.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))  # best first, deterministic on ties

    def prefix(n: int):
        groups = [[] for _ in range(L)]
        channels = [[] for _ in range(L)]
        for _, kind, i, k in items[:n]:
            (groups if kind == 0 else channels)[i].append(k)
        return [head_layer(shape, tuple(sorted(g)), tuple(sorted(c))) for g, c in zip(groups, channels)]

    lo, hi = 0, len(items)  # largest prefix that fits
    if not _fits(prefix(0), shape, budget, compensated):
        raise ExplorerError(f"FLAP cannot reach {fraction:.0%} of the parameters")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(prefix(mid), shape, budget, compensated) else (lo, mid - 1)
    return Subnet(tuple(prefix(lo)))


# ---- the four methods ----------------------------------------------------------------------------------
def magnitude(model, shape: ModelShape, fraction: float) -> Subnet:
    norms = column_norms(model, shape)
    return uniform_cut([group_sum(o, shape) for o, _ in norms], [d for _, d in norms], shape, fraction, False)


def flap(model, stats: Importance, shape: ModelShape, fraction: float) -> Subnet:
    scores = wifv_scores(model, stats)
    attn = [standardize(o).view(shape.num_kv_heads, -1).mean(1) for o, _ in scores]
    mlp = [standardize(d) for _, d in scores]
    # the official cut weighs each kept item by its parameter cost (a head: 512/3 channels in
    # LLaMA-7B); keeping the best-first prefix until the exact parameter budget is the same cut
    return global_subnet(attn, mlp, shape, fraction, True)


def flap_uniform(model, stats: Importance, shape: ModelShape, fraction: float) -> Subnet:
    scores = wifv_scores(model, stats)
    return uniform_cut([group_sum(o, shape) for o, _ in scores], [d for _, d in scores], shape, fraction, True)


@torch.no_grad()
def wanda_sp(model, shape: ModelShape, fraction: float, windows: torch.Tensor, batch_size: int = 8,
             cancel=None) -> Subnet:
    """Sequential: block i's statistics come from the inputs the pruned blocks before it produce.
    Stop (`cancel`) is read between blocks."""
    from ..model.modeling_subnet import SubnetBlock, SubnetRotary, block_masks
    from ..model.slicing import block_state_dict, fill_buffers, subnet_config

    n_groups, n_channels = uniform_counts(shape, fraction)
    inputs = capture_block_inputs(model, windows, batch_size, cancel)
    layers: list[LayerChoice] = []
    T = windows.shape[1]
    for i, block in enumerate(model.model.layers):
        check_cancel(cancel)
        lin = block_linears(block)
        names = {"o_in": lin["self_attn.o_proj"], "down_in": lin["mlp.down_proj"]}
        with StatsCollector(names, execution_device(block)) as col:
            run_block(block, inputs.at(i))  # the dense block on the pruned prefix's outputs
        with onloaded(block):
            wo = lin["self_attn.o_proj"].weight.detach().float().abs().cpu()
            wd = lin["mlp.down_proj"].weight.detach().float().abs().cpu()
        xo = col.stats["o_in"].sq_norm.cpu().sqrt()
        xd = col.stats["down_in"].sq_norm.cpu().sqrt()
        attn = group_sum((wo * xo[None]).mean(0), shape)
        mlp = (wd * xd[None]).mean(0)
        layer = head_layer(shape, keep_top(attn, n_groups), keep_top(mlp, n_channels))
        layers.append(layer)
        # run the pruned block (the sliced model's own block) to make the next block's inputs
        one = Subnet(tuple(layer if k == i else None for k in range(shape.num_layers)))
        config = subnet_config(model.config, one, shape)
        with torch.device("meta"):
            pruned = SubnetBlock(config, 0)
        pruned.load_state_dict(block_state_dict(block, layer, shape), assign=True, strict=True)
        device = execution_device(block)
        fill_buffers(pruned, config, device)
        rope = SubnetRotary(config).to(device).table(torch.arange(T, device=device)[None], inputs.hidden[0].dtype)
        masks = block_masks(config.sliding_windows, None, 1, T, 0, device)
        inputs = inputs.with_hidden([pruned(h.to(device), rope, masks, None) for h in inputs.hidden])
    return Subnet(tuple(layers))


def baseline_subnet(name: str, model, stats: Importance, shape: ModelShape, fraction: float,
                    windows: torch.Tensor | None = None, cancel=None) -> BaselineResult:
    """`name` in BASELINES; `stats` is the importance pass; `windows` the calibration tokens that
    Wanda-sp's sequential pass runs on."""
    if name == "magnitude":
        sub = magnitude(model, shape, fraction)
    elif name == "wanda-sp":
        if windows is None:
            raise ExplorerError("Wanda-sp needs calibration windows")
        sub = wanda_sp(model, shape, fraction, windows, cancel=cancel)
    elif name == "flap":
        sub = flap(model, stats, shape, fraction)
    elif name == "flap-uniform":
        sub = flap_uniform(model, stats, shape, fraction)
    else:
        raise ExplorerError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return BaselineResult(name, sub, COMPENSATED[name])


__all__ = ["BASELINES", "COMPENSATED", "BaselineResult", "baseline_subnet", "magnitude", "wanda_sp", "flap",
           "flap_uniform", "wifv_scores", "column_norms", "standardize"]
