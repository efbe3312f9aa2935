"""Subnet + base model -> a physically smaller SubnetForCausalLM.

Which projections lose output rows and which lose input columns is the whole story, so it is
written as a table (as in gpt-fast). Embeddings, norms and lm_head are shared with the base
model, not copied: slicing is cheap enough to run for every candidate of a search.
"""
from __future__ import annotations

import torch
from torch import nn

from .configuration_subnet import SubnetConfig
from .modeling_subnet import SubnetAttention, SubnetForCausalLM, SubnetModel, base_inv_freq
from .subnet import ModelShape, Subnet

# projection -> (which index set, sliced dim: 0 = output rows, 1 = input columns)
SLICE_TABLE: dict[str, tuple[str, int]] = {
    "self_attn.q_proj": ("q", 0),
    "self_attn.k_proj": ("kv", 0),
    "self_attn.v_proj": ("kv", 0),
    "self_attn.o_proj": ("q", 1),
    "mlp.gate_proj": ("mlp", 0),
    "mlp.up_proj": ("mlp", 0),
    "mlp.down_proj": ("mlp", 1),
}


def rope_parameters(config) -> dict:
    """The base model's rotary settings, from transformers 5 `rope_parameters` or older fields."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return {k: v for k, v in params.items() if v is not None}
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return scaling


def subnet_config(base_config, subnet: Subnet, shape: ModelShape, **extra) -> SubnetConfig:
    kept = [(i, l) for i, l in enumerate(subnet.layers) if l is not None]
    return SubnetConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        base_head_dim=shape.head_dim,
        hidden_act=getattr(base_config, "hidden_act", "silu"),
        rms_norm_eps=base_config.rms_norm_eps,
        max_position_embeddings=getattr(base_config, "max_position_embeddings", 2048),
        base_rope_parameters=rope_parameters(base_config),
        tie_word_embeddings=shape.tie_word_embeddings,
        layer_ids=[i for i, _ in kept],
        attn_pairs=[[list(g) for g in l.attn_pairs] for _, l in kept],
        intermediate_sizes=[l.width for _, l in kept],
        qkv_bias=shape.qkv_bias,
        o_bias=shape.o_bias or extra.pop("o_bias", False),
        mlp_bias=shape.mlp_bias,
        down_bias=shape.mlp_bias or extra.pop("down_bias", False),
        base_num_hidden_layers=shape.num_layers,
        base_intermediate_size=shape.intermediate_size,
        base_model_type=getattr(base_config, "model_type", "llama"),
        bos_token_id=getattr(base_config, "bos_token_id", None),
        eos_token_id=getattr(base_config, "eos_token_id", None),
        pad_token_id=getattr(base_config, "pad_token_id", None),
        **extra,
    )


def layer_indices(shape: ModelShape, layer, device) -> dict[str, torch.Tensor]:
    """Row/column indices of the base block's projections that a LayerChoice keeps."""
    dims = layer.head_dims(shape)  # per KV group, kept dims of the original head
    hd, g = shape.head_dim, shape.group_size
    q = [h * hd + d for h in range(shape.num_heads) for d in dims[h // g]]
    kv = [k * hd + d for k in range(shape.num_kv_heads) for d in dims[k]]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return {"q": as_tensor(q), "kv": as_tensor(kv), "mlp": as_tensor(layer.mlp_channels)}


def block_state_dict(block: nn.Module, layer, shape: ModelShape) -> dict[str, torch.Tensor]:
    """One base block's weights cut to a LayerChoice, in the base model's (separate-projection) names."""
    idx = layer_indices(shape, layer, block.input_layernorm.weight.device)
    sd = {"input_layernorm.weight": block.input_layernorm.weight.data,
          "post_attention_layernorm.weight": block.post_attention_layernorm.weight.data}
    for name, (which, dim) in SLICE_TABLE.items():
        lin = block.get_submodule(name)
        sd[name + ".weight"] = lin.weight.data.index_select(dim, idx[which])
        if lin.bias is not None:  # a bias follows the output rows; input slicing keeps it whole
            sd[name + ".bias"] = lin.bias.data.index_select(0, idx[which]) if dim == 0 else lin.bias.data
    return sd


def sliced_state_dict(base: nn.Module, subnet: Subnet, shape: ModelShape) -> dict[str, torch.Tensor]:
    inner = base.model
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": inner.embed_tokens.weight.data,
        "model.norm.weight": inner.norm.weight.data,
        "lm_head.weight": base.lm_head.weight.data,
    }
    kept = [(i, layer) for i, layer in enumerate(subnet.layers) if layer is not None]
    for j, (i, layer) in enumerate(kept):
        sd.update({f"model.layers.{j}.{k}": v for k, v in block_state_dict(inner.layers[i], layer, shape).items()})
    return sd


def fill_buffers(module: nn.Module, config: SubnetConfig, device) -> None:
    """Set the computed (never stored) buffers of a model or block that was built on `meta`."""
    for m in module.modules():
        if isinstance(m, SubnetAttention):
            m.rope_index = m.make_rope_index(config, m.layer).to(device)
        elif isinstance(m, SubnetModel):
            m.inv_freq = base_inv_freq(config)[0].to(device)


def slice_model(base: nn.Module, subnet: Subnet, shape: ModelShape | None = None) -> SubnetForCausalLM:
    """Build the physically smaller model that computes exactly the subnet of `base`."""
    shape = shape or ModelShape.from_config(base.config)
    subnet.validate(shape)
    config = subnet_config(base.config, subnet, shape)
    return build_model(config, sliced_state_dict(base, subnet, shape))


def build_model(config: SubnetConfig, state_dict: dict[str, torch.Tensor]) -> SubnetForCausalLM:
    """Instantiate on `meta`, then adopt the given tensors (no random init, no copy)."""
    with torch.device("meta"):
        model = SubnetForCausalLM(config)
    if config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    # strict=False only for the tied head; the pre-hooks fuse q/k/v and gate/up on the way in
    missing, unexpected = model.load_state_dict(state_dict, assign=True, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise KeyError(f"sliced weights miss {missing} / have unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    fill_buffers(model, config, model.model.embed_tokens.weight.device)
    model.config.dtype = model.model.embed_tokens.weight.dtype
    return model.eval()
