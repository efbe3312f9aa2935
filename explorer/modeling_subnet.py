"""The sliced model: a Llama-family decoder whose blocks have their own widths.

This is the single implementation used for search, reformation, evaluation, generation and
export; `explorer.export` copies this file verbatim into each exported folder, so it imports
only torch and transformers, and its config through a relative import.

Per kept block, every attention head keeps the same number of rotary pairs; the query heads
of a KV group share that group's pairs. A kept pair keeps its original frequency, and the
softmax scale stays 1/sqrt(original head_dim), so a full-width subnet computes exactly what
the base model computes.

Decoding one token on a CPU is a few hundred small ops whose cost does not shrink with the
widths, so this file keeps them few: q/k/v and gate/up are one projection each (checkpoints in
the base model's separate-projection layout are fused on load), the rotary cos/sin of the base
pairs are computed once per forward and gathered per block, and RMSNorm is one fused op in fp32.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_subnet import SubnetConfig

# transformers 5.2x calls the KV cache field `cache`; earlier 5.x `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def base_inv_freq(config: SubnetConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling of the *base* model's rotary embedding."""
    params = dict(config.base_rope_parameters)
    rope_type = params.get("rope_type", "default")
    dim = config.base_head_dim
    if rope_type == "default":
        inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    shim = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=params,
    )
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](shim, "cpu")
    return inv.float(), float(scaling)


def rope_table(inv_freq: torch.Tensor, scaling: float, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cos | sin | -sin of every *base* rotary pair at these positions: [B, T, 3P].

    Computed once per forward; each block gathers its kept pairs from it (`SubnetAttention.rope_index`).
    Decoding one token costs a few dozen small ops per block, so ops saved per block are a
    visible share of a narrow subnet's time per token."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [B, T, P], as the base model computes it
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    return torch.cat((cos, sin, -sin), dim=-1).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        dtype = x.dtype  # low precision: normalise in fp32, round, then scale (as Llama does)
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _fuse_on_load(parts: tuple[str, ...], fused: str):
    """A load_state_dict pre-hook: accept the base model's separate projections (q/k/v, gate/up),
    as the slicer writes them, and concatenate them into the fused one."""

    def hook(state_dict, prefix, *_):
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{p}.{kind}" for p in parts]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)

    return hook


class SubnetAttention(nn.Module):
    """q, k and v come from one fused projection (one matmul instead of three per token)."""

    def __init__(self, config: SubnetConfig, layer: int):
        super().__init__()
        pairs = config.attn_pairs[layer]
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = 2 * len(pairs[0])  # kept dims per head in this block
        self.softmax_scale = 1.0 / math.sqrt(config.base_head_dim)  # of the original head, on purpose
        d, D = self.head_dim, config.hidden_size
        self.qkv_proj = nn.Linear(D, (self.n_heads + 2 * self.n_kv) * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, D, bias=config.o_bias)
        self.register_buffer("rope_index", self.make_rope_index(config, layer), persistent=False)
        self._register_load_state_dict_pre_hook(_fuse_on_load(("q_proj", "k_proj", "v_proj"), "qkv_proj"))

    @staticmethod
    def make_rope_index(config: SubnetConfig, layer: int) -> torch.Tensor:
        """[2, H + KV, d] indices into `rope_table`: cos and signed sin of the kept pairs, per
        query head then per key head; the query heads of a KV group share that group's pairs, and
        a kept pair keeps its own frequency. Signed sin (-sin on the first half) turns
        rotate_half into a plain roll."""
        P = config.base_head_dim // 2
        pairs = torch.tensor(config.attn_pairs[layer], dtype=torch.long)  # [KV, d/2]
        H, KV = config.num_attention_heads, config.num_key_value_heads
        groups = torch.cat((torch.arange(H) // (H // KV), torch.arange(KV)))
        idx = pairs[groups]  # [H + KV, d/2]
        return torch.stack((torch.cat((idx, idx), -1), torch.cat((idx + 2 * P, idx + P), -1)))

    def forward(self, x, rope, mask, is_causal, cache: Cache | None):
        B, T, _ = x.shape
        H, KV, d = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, d)
        cos, sin = rope[:, :, self.rope_index].unbind(2)  # each [B, T, H + KV, d]
        qk = qkv[:, :, :H + KV]
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # == x * cos + rotate_half(x) * sin, exactly
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # [B, H, T, d], [B, KV, T, d]
        v = qkv[:, :, H + KV:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.softmax_scale, enable_gqa=H > KV
        )  # [B, H, T, d]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * d))


class SubnetMLP(nn.Module):
    """gate and up come from one fused projection."""

    def __init__(self, config: SubnetConfig, layer: int):
        super().__init__()
        D, P = config.hidden_size, config.intermediate_sizes[layer]
        self.gate_up_proj = nn.Linear(D, 2 * P, bias=config.mlp_bias)
        self.down_proj = nn.Linear(P, D, bias=config.down_bias)
        # a plain function where there is one: a module call costs as much as the op at decode time
        self.act_fn = F.silu if config.hidden_act == "silu" else ACT2FN[config.hidden_act]
        self._register_load_state_dict_pre_hook(_fuse_on_load(("gate_proj", "up_proj"), "gate_up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class SubnetBlock(nn.Module):
    def __init__(self, config: SubnetConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SubnetAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SubnetMLP(config, layer)

    def forward(self, x, rope, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SubnetPreTrainedModel(PreTrainedModel):
    config_class = SubnetConfig
    config: SubnetConfig
    base_model_prefix = "model"
    _no_split_modules = ["SubnetBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # Weights always come from a base model or a checkpoint; keep init cheap and defined.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, SubnetAttention):
            module.rope_index.copy_(module.make_rope_index(self.config, module.layer))
        elif isinstance(module, SubnetModel):
            module.inv_freq.copy_(base_inv_freq(self.config)[0])


class SubnetModel(SubnetPreTrainedModel):
    def __init__(self, config: SubnetConfig):
        super().__init__(config)
        inv_freq, self.rope_scaling = base_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # of the base model's rotary pairs
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SubnetBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache: bool = False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(T, device=x.device) + past).unsqueeze(0).expand(B, T)
        mask, is_causal = self.attention_mask(attention_mask, B, T, past, x.device)
        rope = rope_table(self.inv_freq, self.rope_scaling, position_ids, x.dtype)
        for block in self.layers:
            x = block(x, rope, mask, is_causal, cache)
        return self.norm(x), cache

    @staticmethod
    def attention_mask(attention_mask, B: int, T: int, past: int, device) -> tuple[torch.Tensor | None, bool]:
        """A boolean [B, 1, T, past+T] mask, or none where SDPA's own causal path is exact."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded:
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        mask = (torch.arange(S, device=device)[None, :] <= q_pos)[None, None]  # [1, 1, T, S]
        if padded:
            mask = mask & attention_mask[:, None, None, -S:].bool()
            # A fully masked row (a left-pad position) would give NaN; let it see itself instead.
            mask = mask | ~mask.any(-1, keepdim=True)
        return mask.expand(B, 1, T, S), False


class SubnetForCausalLM(SubnetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SubnetConfig):
        super().__init__(config)
        self.model = SubnetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


SubnetConfig.register_for_auto_class()
SubnetForCausalLM.register_for_auto_class("AutoModelForCausalLM")
