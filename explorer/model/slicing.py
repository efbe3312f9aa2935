"""Subnet + base model -> a physically smaller SubnetForCausalLM: the one way a candidate's model
is built, for fitness, reformation, evaluation, prompts, export and the benchmarks.

Which projections lose output rows and which lose input columns is the whole story, so it is
written as a table (as in gpt-fast). Embeddings, norms and lm_head are shared with the base
model, not copied: slicing is cheap enough to run for every candidate of a search.

Bias compensation (FLAP): with the dense model's mean inputs of `o_proj` / `down_proj`
(`capture.ChannelMeans`), the removed columns' mean contribution W[:, removed] @ mean[removed]
becomes a bias of the sliced projection, so a subnet keeps the average of what it removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExplorerError
from .architecture import features, layer_windows, rope_sets
from .configuration_subnet import SubnetConfig
from .devices import is_offloaded, onloaded
from .modeling_subnet import SubnetAttention, SubnetForCausalLM, SubnetRotary, norm_names
from .subnet import LayerChoice, ModelShape, Subnet


@dataclass(frozen=True)
class ChannelMeans:
    """Per base layer, the mean over calibration tokens of the inputs of `o_proj` and `down_proj`,
    from one pass of the dense model: bias compensation (FLAP) adds W[:, removed] @ mean[removed]
    back as a bias for the channels a subnet removes. Small (a vector per layer and projection),
    so a run stores it and every later step rebuilds a candidate's biases exactly."""

    o_proj: tuple[torch.Tensor, ...]  # [num_heads * head_dim] per layer
    down_proj: tuple[torch.Tensor, ...]  # [intermediate_size] per layer

    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{name}.{i}": t.float().contiguous().cpu() for name in ("o_proj", "down_proj")
                   for i, t in enumerate(getattr(self, name))}
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path) -> "ChannelMeans":
        from safetensors.torch import load_file

        t = load_file(str(path))
        n = len([k for k in t if k.startswith("o_proj.")])
        return cls(tuple(t[f"o_proj.{i}"] for i in range(n)), tuple(t[f"down_proj.{i}"] for i in range(n)))

    def digest(self) -> str:
        """sha256 of the float32 values, layer by layer: the identity of the statistics a compensated
        subnet's biases are built from."""
        import hashlib

        h = hashlib.sha256()
        for name in ("o_proj", "down_proj"):
            for v in getattr(self, name):
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        """JSON: each vector as base64 float32 (little-endian), with the digest that checks them."""
        import base64

        enc = lambda v: base64.b64encode(v.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()  # noqa: E731
                                         ).decode("ascii")
        return {"encoding": "base64-float32", "digest": self.digest(),
                "o_proj": [enc(v) for v in self.o_proj], "down_proj": [enc(v) for v in self.down_proj]}

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelMeans":
        """The inverse of `to_dict`; ValueError when the vectors do not match their digest."""
        import base64

        import numpy as np

        if not isinstance(d, dict) or d.get("encoding") != "base64-float32":
            raise ValueError("channel means must be base64-float32 vectors")
        dec = lambda s: torch.from_numpy(np.frombuffer(base64.b64decode(s, validate=True), dtype="<f4").copy())  # noqa: E731
        means = cls(tuple(dec(s) for s in d["o_proj"]), tuple(dec(s) for s in d["down_proj"]))
        if len(means.o_proj) != len(means.down_proj) or means.digest() != d.get("digest"):
            raise ValueError("the channel means do not match their digest (the file was changed)")
        return means


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
# the projections whose input columns are cut: compensation and reformation act on these
INPUT_SLICED = {name: which for name, (which, dim) in SLICE_TABLE.items() if dim == 1}
def subnet_config(base_config, subnet: Subnet, shape: ModelShape, compensated: bool = False) -> SubnetConfig:
    kept = [(i, l) for i, l in enumerate(subnet.layers) if l is not None]
    windows = layer_windows(base_config)
    sets, per_layer = rope_sets(base_config)
    feats = features(base_config)
    return SubnetConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        base_num_attention_heads=shape.num_heads,
        base_num_key_value_heads=shape.num_kv_heads,
        base_head_dim=shape.head_dim,
        hidden_act=feats.hidden_act,
        rms_norm_eps=base_config.rms_norm_eps,
        max_position_embeddings=getattr(base_config, "max_position_embeddings", 2048),
        base_rope_parameters=sets[0],
        rope_sets=sets,
        layer_rope=[per_layer[i] for i, _ in kept],
        **feats.config_fields(),
        tie_word_embeddings=shape.tie_word_embeddings,
        layer_ids=[i for i, _ in kept],
        attn_pairs=[[list(g) for g in l.attn_pairs] for _, l in kept],
        heads_per_group=[l.heads_per_group(shape) for _, l in kept],
        intermediate_sizes=[l.width for _, l in kept],
        sliding_windows=[windows[i] for i, _ in kept],
        qkv_bias=shape.qkv_bias,
        o_bias=shape.o_bias or compensated,
        mlp_bias=shape.mlp_bias,
        down_bias=shape.mlp_bias or compensated,
        base_num_hidden_layers=shape.num_layers,
        base_intermediate_size=shape.intermediate_size,
        base_model_type=getattr(base_config, "model_type", "llama"),
        bos_token_id=getattr(base_config, "bos_token_id", None),
        eos_token_id=getattr(base_config, "eos_token_id", None),
        pad_token_id=getattr(base_config, "pad_token_id", None),
    )


def layer_indices(shape: ModelShape, layer: LayerChoice, device) -> dict[str, torch.Tensor]:
    """Row/column indices of the base block's projections that a LayerChoice keeps: "q" (query rows
    and o_proj columns), "kv" (key and value rows), "mlp" (gate/up rows and down_proj columns)."""
    dims = layer.head_dims(shape)  # per kept KV group, kept dims of the original head
    hd, g = shape.head_dim, shape.group_size
    q = [h * hd + d for h in layer.query_heads(shape) for d in dims[layer.kv_groups.index(h // g)]]
    kv = [k * hd + d for k, ds in zip(layer.kv_groups, dims) for d in ds]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return {"q": as_tensor(q), "kv": as_tensor(kv), "mlp": as_tensor(layer.mlp_channels)}


def removed_mask(total: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean[removed], in fp32: the mean output of the removed input columns."""
    removed = removed_mask(weight.shape[1], kept)
    m = mean.to(weight.device, torch.float32) * removed
    return weight.detach().float() @ m


def block_state_dict(block: nn.Module, layer: LayerChoice, shape: ModelShape, means: ChannelMeans | None = None,
                     index: int | None = None) -> dict[str, torch.Tensor]:
    """One base block's weights cut to a LayerChoice, in the base model's (separate-projection) names.

    A skipped sublayer (no KV group, or no MLP channel) keeps only its output projection's bias.
    With `means` (and the block's base `index`), o_proj and down_proj also get the compensation
    bias of the columns they lose (added to their own bias, if they have one)."""
    offloaded = is_offloaded(block)
    own = (lambda t: t.clone()) if offloaded else (lambda t: t)  # offloaded weights return to meta afterwards
    with onloaded(block):
        idx = layer_indices(shape, layer, block.self_attn.o_proj.weight.device)
        kept = {"self_attn": layer.n_kv > 0, "mlp": layer.width > 0}
        sd: dict[str, torch.Tensor] = {}
        for role, name in norm_names(shape.sandwich_norm).items():  # as SubnetBlock decides which exist
            if role.endswith("_out") or kept["self_attn" if role.startswith("attn") else "mlp"]:
                sd[name + ".weight"] = own(block.get_submodule(name).weight.data)
        if kept["self_attn"] and shape.qk_norm:
            for name in ("self_attn.q_norm", "self_attn.k_norm"):
                sd[name + ".weight"] = own(block.get_submodule(name).weight.data)
        for name, (which, dim) in SLICE_TABLE.items():
            lin = block.get_submodule(name)
            sublayer_kept = kept[name.split(".")[0]]
            if dim == 0:  # output rows (and their bias) follow the kept indices
                if sublayer_kept:
                    sd[name + ".weight"] = lin.weight.data.index_select(0, idx[which])
                    if lin.bias is not None:
                        sd[name + ".bias"] = lin.bias.data.index_select(0, idx[which])
                continue
            if sublayer_kept:  # input columns: the bias stays whole
                sd[name + ".weight"] = lin.weight.data.index_select(1, idx[which])
            bias = own(lin.bias.data) if lin.bias is not None else None
            if means is not None:
                mean = (means.o_proj if which == "q" else means.down_proj)[index]
                extra = compensation_bias(lin.weight.data, mean, idx[which]).to(lin.weight.dtype)
                bias = extra if bias is None else bias + extra
            if bias is not None:
                sd[name + ".bias"] = bias
    return sd


def sliced_state_dict(base: nn.Module, subnet: Subnet, shape: ModelShape,
                      means: ChannelMeans | None = None) -> dict[str, torch.Tensor]:
    inner = base.model
    sd: dict[str, torch.Tensor] = {}
    for key, module in (("model.embed_tokens.weight", inner.embed_tokens), ("model.norm.weight", inner.norm),
                        ("lm_head.weight", base.lm_head)):
        with onloaded(module):
            sd[key] = module.weight.data.clone() if is_offloaded(module) else module.weight.data
    kept = [(i, layer) for i, layer in enumerate(subnet.layers) if layer is not None]
    for j, (i, layer) in enumerate(kept):
        block = block_state_dict(inner.layers[i], layer, shape, means, i)
        sd.update({f"model.layers.{j}.{k}": v for k, v in block.items()})
    return sd


def fill_buffers(module: nn.Module, config: SubnetConfig, device) -> None:
    """Set the computed (never stored) buffers of a model or block that was built on `meta`."""
    for m in module.modules():
        if isinstance(m, SubnetAttention):
            index = m.make_rope_index(config, m.layer)
            m.rope_index = None if index is None else index.to(device)
        elif isinstance(m, SubnetRotary):
            m.reset(device)


def slice_model(base: nn.Module, subnet: Subnet, shape: ModelShape | None = None,
                means: ChannelMeans | None = None) -> SubnetForCausalLM:
    """Build the physically smaller model that computes exactly the subnet of `base` (with `means`:
    plus the bias compensation of every removed o_proj / down_proj column)."""
    shape = shape or ModelShape.from_config(base.config)
    subnet.validate(shape)
    config = subnet_config(base.config, subnet, shape, compensated=means is not None)
    return build_model(config, sliced_state_dict(base, subnet, shape, means))


def with_output_biases(model: SubnetForCausalLM) -> SubnetForCausalLM:
    """Give every o_proj and down_proj a bias (zeros where it had none) and say so in the config:
    reformation fits them. In place; returns the model."""
    for block in model.model.layers:
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            if getattr(lin, "bias", None) is None:
                ref = model.model.embed_tokens.weight
                lin.bias = nn.Parameter(torch.zeros(model.config.hidden_size, dtype=ref.dtype, device=ref.device),
                                        requires_grad=False)
    model.config.o_bias = model.config.down_bias = True
    return model


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


def candidate_model(base: nn.Module, candidate, means: ChannelMeans | None) -> SubnetForCausalLM:
    """The model of a run's candidate (anything with `.subnet` and `.compensated`): its subnet
    sliced from `base`, with bias compensation exactly when its fitness was measured with it. The
    one way a candidate's model is built, for fitness, the app, the CLI and the benchmarks."""
    if candidate.compensated and means is None:
        raise ExplorerError("this candidate is bias-compensated, but its run's channel means are missing")
    return slice_model(base, candidate.subnet, None, means if candidate.compensated else None)
