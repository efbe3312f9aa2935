"""Training-free baselines in the same code path (METHOD section 6), at the same targets.

All three pick structures of the same search space (rotary pairs per KV group, MLP channels),
so they slice, evaluate and export exactly like a searched subnet:

- `magnitude`: one keep ratio everywhere, structures ranked by squared weight norm.
- `wanda-sp`: one keep ratio everywhere, ranked by sum |W_ij| * ||X_j|| over the structure.
- `flap`: fluctuation (input variance x squared column norm of o_proj / down_proj), scores
  standardized per block and module, one global threshold (so ratios differ across blocks),
  plus bias compensation: the removed inputs' mean times their weight columns becomes a bias.

The calibration statistics come from the importance pass (`Importance.stats`), so a search
calibrates once for its own scores and every baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import block_linears
from .errors import ExplorerError
from .importance import Importance, initial_subnet, round_pairs, top_layer
from .slicing import build_model, sliced_state_dict, subnet_config
from .subnet import ModelShape, Subnet, round_width

BASELINES = ("magnitude", "wanda-sp", "flap")


@dataclass(frozen=True)
class BaselineResult:
    name: str
    subnet: Subnet
    biases: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, compare=False)  # base layer -> extra biases


def _per_pair(per_dim_q, per_dim_kv, shape: ModelShape) -> torch.Tensor:
    """Sum per-dimension scores of the query heads [H, hd] and KV heads [KV, hd] into [KV, n_pairs]."""
    hd, half, g = shape.head_dim, shape.n_pairs, shape.group_size
    d = per_dim_kv + per_dim_q.view(shape.num_kv_heads, g, hd).sum(1)
    return d[:, :half] + d[:, half:]


@torch.no_grad()
def magnitude_scores(model, shape: ModelShape) -> Importance:
    attn, mlp = [], []
    for block in model.model.layers:
        lin = {k: v.weight.detach().float() for k, v in block_linears(block).items()}
        q = lin["self_attn.q_proj"].pow(2).sum(1) + lin["self_attn.o_proj"].pow(2).sum(0)
        kv = lin["self_attn.k_proj"].pow(2).sum(1) + lin["self_attn.v_proj"].pow(2).sum(1)
        attn.append(_per_pair(q.view(shape.num_heads, -1), kv.view(shape.num_kv_heads, -1), shape).cpu())
        mlp.append((lin["mlp.gate_proj"].pow(2).sum(1) + lin["mlp.up_proj"].pow(2).sum(1)
                    + lin["mlp.down_proj"].pow(2).sum(0)).cpu())
    return Importance(attn, mlp)


@torch.no_grad()
def wanda_scores(model, stats: Importance, shape: ModelShape) -> Importance:
    attn, mlp = [], []
    for i, block in enumerate(model.model.layers):
        lin = {k: v.weight.detach().float().abs().cpu() for k, v in block_linears(block).items()}
        norm = {k: s.sq_norm.clamp_min(0).sqrt() for k, s in stats.stats[i].items()}  # ||X_j||
        q = lin["self_attn.q_proj"] @ norm["attn_in"] + lin["self_attn.o_proj"].sum(0) * norm["o_in"]
        kv = lin["self_attn.k_proj"] @ norm["attn_in"] + lin["self_attn.v_proj"] @ norm["attn_in"]
        attn.append(_per_pair(q.view(shape.num_heads, -1), kv.view(shape.num_kv_heads, -1), shape))
        mlp.append(lin["mlp.gate_proj"] @ norm["mlp_in"] + lin["mlp.up_proj"] @ norm["mlp_in"]
                   + lin["mlp.down_proj"].sum(0) * norm["down_in"])
    return Importance(attn, mlp)


@torch.no_grad()
def flap_scores(model, stats: Importance, shape: ModelShape) -> Importance:
    attn, mlp = [], []
    for i, block in enumerate(model.model.layers):
        lin = block_linears(block)
        o = lin["self_attn.o_proj"].weight.detach().float().cpu().pow(2).sum(0) * stats.stats[i]["o_in"].variance
        attn.append(_per_pair(o.view(shape.num_heads, -1), torch.zeros(shape.num_kv_heads, shape.head_dim), shape))
        d = lin["mlp.down_proj"].weight.detach().float().cpu().pow(2).sum(0) * stats.stats[i]["down_in"].variance
        mlp.append(d)
    return Importance(attn, mlp)


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def flap_subnet(scores: Importance, shape: ModelShape, fraction: float, multiple: int = 8,
                head_multiple: int = 8) -> Subnet:
    """One global threshold on per-block, per-module standardized scores, bisected so the rounded
    widths fill the budget."""
    pm = max(1, head_multiple // 2)
    a_std = [_standardize(a) for a in scores.attn]
    m_std = [_standardize(m) for m in scores.mlp]
    budget = fraction * shape.dense_params

    def widths(tau: float):
        out = []
        for a, m in zip(a_std, m_std):
            pairs = round_pairs(float((a > tau).sum(1).float().mean()), pm, shape.n_pairs)
            width = round_width(float((m > tau).sum()), multiple, shape.intermediate_size)
            out.append((pairs, width))
        return out

    def params(ws) -> int:
        return shape.fixed_params + sum(shape.block_params(2 * p, w) for p, w in ws)

    lo, hi = -50.0, 50.0  # tau: low keeps everything, high keeps the minimum
    if params(widths(hi)) > budget:
        raise ExplorerError(f"FLAP cannot reach {fraction:.0%} of the parameters")
    for _ in range(60):
        mid = (lo + hi) / 2
        if params(widths(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    ws = widths(hi)
    return Subnet(tuple(top_layer(scores, i, p, w) for i, (p, w) in enumerate(ws)))


@torch.no_grad()
def flap_biases(model, subnet: Subnet, stats: Importance, shape: ModelShape) -> dict[int, dict[str, torch.Tensor]]:
    """Bias compensation: W[:, removed] @ mean(X[removed]) for o_proj and down_proj inputs."""
    out = {}
    for i, layer in enumerate(subnet.layers):
        if layer is None:
            continue
        lin = block_linears(model.model.layers[i])
        kept_q = torch.zeros(shape.num_heads * shape.head_dim, dtype=torch.bool)
        dims = layer.head_dims(shape)
        for h in range(shape.num_heads):
            kept_q[[h * shape.head_dim + d for d in dims[h // shape.group_size]]] = True
        kept_m = torch.zeros(shape.intermediate_size, dtype=torch.bool)
        kept_m[list(layer.mlp_channels)] = True
        wo = lin["self_attn.o_proj"].weight.detach().float().cpu()
        wd = lin["mlp.down_proj"].weight.detach().float().cpu()
        out[i] = {"o_proj": wo[:, ~kept_q] @ stats.stats[i]["o_in"].mean[~kept_q],
                  "down_proj": wd[:, ~kept_m] @ stats.stats[i]["down_in"].mean[~kept_m]}
    return out


def baseline_subnet(name: str, model, stats: Importance, shape: ModelShape, fraction: float,
                    multiple: int = 8, head_multiple: int = 8) -> BaselineResult:
    """`name` in BASELINES; `stats` is the importance pass (its `.stats` hold the input statistics)."""
    if name == "magnitude":
        return BaselineResult(name, initial_subnet(magnitude_scores(model, shape), shape, fraction, multiple, head_multiple))
    if name == "wanda-sp":
        return BaselineResult(name, initial_subnet(wanda_scores(model, stats, shape), shape, fraction, multiple, head_multiple))
    if name == "flap":
        sub = flap_subnet(flap_scores(model, stats, shape), shape, fraction, multiple, head_multiple)
        return BaselineResult(name, sub, flap_biases(model, sub, stats, shape))
    raise ExplorerError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def slice_with_biases(model, result: BaselineResult, shape: ModelShape):
    """The sliced model of a baseline, with its compensation biases (SubnetConfig o_bias/down_bias)."""
    if not result.biases:
        from .slicing import slice_model

        return slice_model(model, result.subnet, shape)
    sub = result.subnet.validate(shape)
    config = subnet_config(model.config, sub, shape, o_bias=True, down_bias=True)
    sd = sliced_state_dict(model, sub, shape)
    dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    j = 0
    for i, layer in enumerate(sub.layers):
        if layer is None:
            continue
        for name, key in (("o_proj", "self_attn.o_proj"), ("down_proj", "mlp.down_proj")):
            full = f"model.layers.{j}.{key}.bias"
            extra = result.biases.get(i, {}).get(name, torch.zeros(shape.hidden_size)).to(device, dtype)
            sd[full] = sd[full] + extra if full in sd else extra
        j += 1
    return build_model(config, sd)
