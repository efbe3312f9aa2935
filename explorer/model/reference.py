"""An independent reference for a subnet: the base model's own transformers class, at full size,
with every omitted weight zeroed.

A sliced model, a reformed model or an export is checked against this, never against itself:
nothing here uses `explorer.model.slicing` or the sliced model's maths (only the table of the
families' norm names), so a model that matches it computes what the base architecture
(transformers' own code of each family: its rotary embedding, sliding windows, GQA, norms and
multipliers) computes for those weights.

What zeroing means, per block:
- a removed rotary pair of a kept head: its q rows and o_proj columns (both halves of the pair),
  and for its KV group its k and v rows, are zero (a zero pair rotates to zero, so it adds
  nothing to any score, and a zero v row / o column adds nothing to the output);
- a removed query head: all its q rows and o_proj columns; a removed KV group: its k and v rows;
- a removed MLP channel: its gate and up rows and its down_proj column;
- a dropped block: o_proj and down_proj entirely (weights and biases), so the block is the identity.
Compensation (FLAP's bias) and reformed weights are written into the full-size projections:
the reformed kept columns at their base positions, their bias added by a forward hook.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .devices import onloaded
from .modeling_subnet import norm_names
from .subnet import LayerChoice, ModelShape, Subnet


def cpu_float_copy(base: nn.Module) -> nn.Module:
    """The base model as a plain fp32 model on the CPU, weights materialised even when the base is
    spread over devices or offloaded (accelerate)."""
    config = copy.deepcopy(base.config)
    with torch.device("meta"):
        ref = type(base)(config)
    ref = ref.to_empty(device="cpu").float()
    state = {}
    units = [base.model.embed_tokens, base.model.norm, base.lm_head, *base.model.layers]
    prefix = {id(m): n for n, m in base.named_modules()}
    for unit in units:
        with onloaded(unit):
            for name, t in unit.state_dict().items():
                state[f"{prefix[id(unit)]}.{name}"] = t.detach().to("cpu", torch.float32).clone()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise KeyError(f"reference copy misses {missing} / has unexpected {unexpected}")
    if config.tie_word_embeddings:
        ref.tie_weights()
    for name, buf in base.named_buffers():  # computed, never stored (Gemma's embedding scale)
        if buf.device.type != "meta":
            owner, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(owner), leaf, buf.detach().to("cpu").clone())
    rotary = base.model.rotary_emb
    ref.model.rotary_emb = type(rotary)(config)  # its buffers are computed, not stored
    return ref.eval().requires_grad_(False)


def _kept_query_dims(layer: LayerChoice, shape: ModelShape) -> list[tuple[int, list[int]]]:
    """(base query head, its kept dims in the order a sliced o_proj holds them) per kept head."""
    half, g = shape.n_pairs, shape.group_size
    heads = layer.q_heads if layer.q_heads is not None else [tuple(range(g))] * len(layer.kv_groups)
    out = []
    for group, hs, pairs in zip(layer.kv_groups, heads, layer.attn_pairs):
        dims = list(pairs) + [p + half for p in pairs]
        out.extend((group * g + h, dims) for h in hs)
    return out


def _zero_rows(lin: nn.Linear, keep: Iterable[int]) -> None:
    mask = torch.zeros(lin.out_features, dtype=torch.bool)
    mask[list(keep)] = True
    lin.weight.data[~mask] = 0
    if lin.bias is not None:
        lin.bias.data[~mask] = 0


def _zero_columns(lin: nn.Linear, keep: Iterable[int]) -> torch.Tensor:
    """Zero the columns not in `keep`; returns the removed-column mask."""
    mask = torch.zeros(lin.in_features, dtype=torch.bool)
    mask[list(keep)] = True
    lin.weight.data[:, ~mask] = 0
    return ~mask


def _add_bias(lin: nn.Linear, bias: torch.Tensor):
    """Add `bias` to the layer's output (the base projection may have no bias parameter)."""
    b = bias.detach().float().clone()
    return lin.register_forward_hook(lambda _m, _a, out: out + b.to(out.device, out.dtype))


@torch.no_grad()
def zeroed_reference(base: nn.Module, subnet: Subnet, shape: ModelShape, means=None,
                     reformed: nn.Module | None = None) -> nn.Module:
    """The base model (fp32, CPU) computing exactly `subnet`: omitted weights zeroed.

    `means` (capture.ChannelMeans): add the compensation bias W[:, removed] @ mean[removed] of
    o_proj and down_proj, computed here from the base weights. `reformed`: a sliced model whose
    o_proj / down_proj kept columns and biases replace the base ones (its other weights must be
    the base model's; `weights_match` checks that)."""
    ref = cpu_float_copy(base)
    mask_into(ref, ref, subnet, shape, means, reformed)
    return ref


@torch.no_grad()
def mask_into(dst: nn.Module, src: nn.Module, subnet: Subnet, shape: ModelShape, means=None,
              reformed: nn.Module | None = None) -> list:
    """Write `src`'s block weights into the full-size model `dst` (same class; may be `src` itself),
    zeroed outside `subnet`, with compensation or reformed weights as in `zeroed_reference`.
    Returns the bias hooks it registered (remove them before masking `dst` again)."""
    hd = shape.head_dim
    hooks = []
    kept_blocks = [i for i, l in enumerate(subnet.layers) if l is not None]
    for i, (layer, block) in enumerate(zip(subnet.layers, dst.model.layers)):
        if src is not dst:
            with onloaded(src.model.layers[i]):
                for (_, a), (_, b) in zip(block.state_dict(keep_vars=True).items(),
                                          src.model.layers[i].state_dict(keep_vars=True).items()):
                    a.data.copy_(b.data)
        attn, mlp = block.self_attn, block.mlp
        if layer is None:
            for lin in (attn.o_proj, mlp.down_proj):
                lin.weight.data.zero_()
                if lin.bias is not None:
                    lin.bias.data.zero_()
            continue
        heads = _kept_query_dims(layer, shape)
        q_rows = [h * hd + d for h, dims in heads for d in dims]
        kv_rows = [k * hd + d for k, pairs in zip(layer.kv_groups, layer.attn_pairs)
                   for d in list(pairs) + [p + shape.n_pairs for p in pairs]]
        w_o, w_d = attn.o_proj.weight.data.float().clone(), mlp.down_proj.weight.data.float().clone()
        _zero_rows(attn.q_proj, q_rows)
        _zero_rows(attn.k_proj, kv_rows)
        _zero_rows(attn.v_proj, kv_rows)
        removed_o = _zero_columns(attn.o_proj, q_rows)
        _zero_rows(mlp.gate_proj, layer.mlp_channels)
        _zero_rows(mlp.up_proj, layer.mlp_channels)
        removed_d = _zero_columns(mlp.down_proj, layer.mlp_channels)
        if means is not None and reformed is None:
            mo, md = means.o_proj[i].float().to(w_o.device), means.down_proj[i].float().to(w_d.device)
            hooks.append(_add_bias(attn.o_proj, w_o[:, removed_o.to(w_o.device)] @ mo[removed_o.to(w_o.device)]))
            hooks.append(_add_bias(mlp.down_proj, w_d[:, removed_d.to(w_d.device)] @ md[removed_d.to(w_d.device)]))
        if reformed is not None:
            sub = reformed.model.layers[kept_blocks.index(i)]
            for lin, sub_lin, cols in ((attn.o_proj, getattr(sub.self_attn, "o_proj"), q_rows),
                                       (mlp.down_proj, getattr(sub.mlp, "down_proj"), list(layer.mlp_channels))):
                if cols:
                    lin.weight.data[:, cols] = sub_lin.weight.detach().to(lin.weight.device, lin.weight.dtype)
                own = lin.bias.data.float() if lin.bias is not None else torch.zeros(lin.out_features)
                if sub_lin.bias is not None:
                    hooks.append(_add_bias(lin, sub_lin.bias.detach().float().cpu() - own.cpu()))
    return hooks


@torch.no_grad()
def weights_match(base: nn.Module, model: nn.Module, subnet: Subnet, shape: ModelShape) -> list[str]:
    """Which weights of a sliced (possibly reformed) model are *not* the base model's own: every
    weight except the o_proj / down_proj kept columns and biases must equal the base's slice.
    Returns the names that differ (empty: the model is the base model cut to the subnet)."""
    bad = []
    kept = [(i, l) for i, l in enumerate(subnet.layers) if l is not None]
    hd = shape.head_dim
    for j, (i, layer) in enumerate(kept):
        src, dst = base.model.layers[i], model.model.layers[j]
        heads = _kept_query_dims(layer, shape)
        q_rows = torch.tensor([h * hd + d for h, dims in heads for d in dims], dtype=torch.long)
        kv_rows = torch.tensor([k * hd + d for k, pairs in zip(layer.kv_groups, layer.attn_pairs)
                                for d in list(pairs) + [p + shape.n_pairs for p in pairs]], dtype=torch.long)
        ch = torch.tensor(layer.mlp_channels, dtype=torch.long)
        with onloaded(src):
            want = {}
            if layer.n_kv:
                qkv = torch.cat([src.self_attn.q_proj.weight[q_rows], src.self_attn.k_proj.weight[kv_rows],
                                 src.self_attn.v_proj.weight[kv_rows]])
                want["self_attn.qkv_proj.weight"] = qkv
                if shape.qk_norm:
                    want["self_attn.q_norm.weight"] = src.self_attn.q_norm.weight
                    want["self_attn.k_norm.weight"] = src.self_attn.k_norm.weight
            if layer.width:
                want["mlp.gate_up_proj.weight"] = torch.cat([src.mlp.gate_proj.weight[ch], src.mlp.up_proj.weight[ch]])
            for role, name in norm_names(shape.sandwich_norm).items():
                if role.endswith("_out") or (layer.n_kv if role.startswith("attn") else layer.width):
                    want[name + ".weight"] = src.get_submodule(name).weight
            got = dict(dst.named_parameters())
            for name, w in want.items():
                if name not in got or not torch.equal(got[name].detach().cpu().float(), w.detach().cpu().float()):
                    bad.append(f"layers.{j}.{name}")
    return bad


__all__ = ["cpu_float_copy", "zeroed_reference", "weights_match"]
