"""The sliced model: a decoder of the families we accept (Llama, Mistral, Qwen2/3, SmolLM3, Granite,
Gemma 3) whose blocks have their own widths.

This is the single implementation used for search, reformation, evaluation, generation and
export; `explorer.pick.export` copies this file verbatim into each exported folder, so it imports
only torch and transformers, and its config through a relative import.

Per kept block, a subset of the KV groups is kept, each with the same number of query heads
and the same number of rotary pairs; the query heads of a KV group share that group's pairs. A
kept pair keeps its original frequency (any rope type transformers defines, including the ones
that change with the sequence length), the softmax scale stays 1/sqrt(original head_dim), and a
block of a sliding-window layer keeps its window, so a full-width subnet computes exactly what
the base model computes. A block may skip attention or its MLP entirely (FLAP-style subnets):
that sublayer then adds only its bias. What the families add (q/k norms, norms after the
sublayers, layers without rotation, per-layer-type rotary settings, constant multipliers) is read
from the config, so one class computes each family's function.

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


def _rope_shim(config: SubnetConfig, params: dict):
    """A plain LlamaConfig carrying one of the base model's rotary settings: transformers' rope
    functions read head_dim, max_position_embeddings and rope_parameters from a config."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.base_num_attention_heads,
                       head_dim=config.base_head_dim, max_position_embeddings=config.max_position_embeddings,
                       rope_parameters=dict(params))


def base_inv_freq(config: SubnetConfig, params: dict, seq_len=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling of one of the *base* model's rotary settings, by
    transformers' own rope functions (every rope type it defines), always computed on the CPU:
    models are built on `meta`, where a rope function would produce tensors without data."""
    rope_type = params.get("rope_type", "default")
    dim = config.base_head_dim
    with torch.device("cpu"):
        if rope_type == "default":
            inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            return inv, 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kwargs = {} if seq_len is None else {"seq_len": seq_len}
        inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](_rope_shim(config, params), "cpu", **kwargs)
    return inv.float(), float(scaling)


class RopeSet(nn.Module):
    """One of the base model's rotary settings, with transformers' runtime updates: `dynamic` NTK
    rescales once a sequence grows past the cached length (and resets below the original one),
    `longrope` switches to its long factors past the original context. The state machine is the
    one of transformers' `dynamic_rope_update`, so a subnet follows the base model step by step."""

    def __init__(self, config: SubnetConfig, params: dict):
        super().__init__()
        self.config, self.params = config, dict(params)
        self.rope_type = self.params.get("rope_type", "default")
        inv, self.attention_scaling = base_inv_freq(config, self.params)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.register_buffer("original_inv_freq", inv.clone(), persistent=False)
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.long_inv_freq = None

    def reset(self, device) -> None:
        """Recompute the buffers on `device` (a model built on `meta` has none)."""
        inv, self.attention_scaling = base_inv_freq(self.config, self.params)
        self.inv_freq = inv.to(device)
        self.original_inv_freq = inv.clone().to(device)
        self.max_seq_len_cached = self.original_max_seq_len
        self.long_inv_freq = None

    def _update(self, position_ids: torch.Tensor) -> None:
        device = position_ids.device
        if "dynamic" in self.rope_type:
            seq_len = torch.max(position_ids) + 1
            if seq_len > self.max_seq_len_cached:  # growth
                inv, self.attention_scaling = base_inv_freq(self.config, self.params, seq_len=seq_len.cpu())
                self.inv_freq = inv.to(device)
                self.max_seq_len_cached = seq_len
            if seq_len < self.original_max_seq_len and self.max_seq_len_cached > self.original_max_seq_len:  # reset
                self.inv_freq = self.original_inv_freq.to(device)
                self.max_seq_len_cached = self.original_max_seq_len
        elif self.rope_type == "longrope":
            seq_len = torch.max(position_ids) + 1
            original = self.params["original_max_position_embeddings"]
            if self.long_inv_freq is None:
                self.long_inv_freq = base_inv_freq(self.config, self.params, seq_len=original + 1)[0]
            self.inv_freq = torch.where(seq_len > original, self.long_inv_freq.to(device),
                                        self.original_inv_freq.to(device))

    def table(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self._update(position_ids)
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device).float()  # [B, T, P]
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return torch.cat((cos, sin, -sin), dim=-1).to(dtype)


class SubnetRotary(nn.Module):
    """The base model's rotary frequencies, one `RopeSet` per distinct setting (Gemma 3 has one
    for its sliding-window layers and one for the others).

    `table(position_ids, dtype)` is cos | sin | -sin of every base pair of every set: [B, T, 3P * S],
    computed once per forward; each block gathers its kept pairs (`SubnetAttention.rope_index`)."""

    def __init__(self, config: SubnetConfig):
        super().__init__()
        self.sets = nn.ModuleList(RopeSet(config, params) for params in config.rope_sets)

    def reset(self, device) -> None:
        for s in self.sets:
            s.reset(device)

    def table(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tables = [s.table(position_ids, dtype) for s in self.sets]
        return tables[0] if len(tables) == 1 else torch.cat(tables, dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm with a gain of (offset + weight): offset 0 as Llama, 1 as Gemma (whose low-precision
    path also scales before it rounds)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            gain = self.weight + self.offset if self.offset else self.weight
            return F.rms_norm(x, self.weight.shape, gain, self.eps)  # one fused op
        dtype = x.dtype  # low precision: normalise in fp32
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: scale in fp32, then round
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)  # Llama: round, then scale


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
    """q, k and v come from one fused projection (one matmul instead of three per token).

    `cache_slot` is this block's layer in the KV cache: blocks without attention take none, so
    slots count the blocks that attend. With `qk_norm` each query and key head is normalised
    before the rotation (whole heads only: the subnet's head is the base model's)."""

    def __init__(self, config: SubnetConfig, layer: int, cache_slot: int = 0):
        super().__init__()
        pairs = config.attn_pairs[layer]
        self.layer = layer
        self.cache_slot = cache_slot
        self.n_kv = len(pairs)
        self.n_heads = self.n_kv * config.heads_per_group[layer]
        self.head_dim = 2 * len(pairs[0])  # kept dims per head in this block
        scale = config.softmax_scale
        self.softmax_scale = 1.0 / math.sqrt(config.base_head_dim) if scale is None else scale  # the original's
        d, D = self.head_dim, config.hidden_size
        self.qkv_proj = nn.Linear(D, (self.n_heads + 2 * self.n_kv) * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, D, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, config.norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.register_buffer("rope_index", self.make_rope_index(config, layer), persistent=False)
        self._register_load_state_dict_pre_hook(_fuse_on_load(("q_proj", "k_proj", "v_proj"), "qkv_proj"))

    @staticmethod
    def make_rope_index(config: SubnetConfig, layer: int) -> torch.Tensor | None:
        """[2, H + KV, d] indices into the rope table: cos and signed sin of the kept pairs, per
        query head then per key head; the query heads of a KV group share that group's pairs, and
        a kept pair keeps its own frequency (in the block's own rotary set). Signed sin (-sin on
        the first half) turns rotate_half into a plain roll. None: the block has no rotation."""
        which = config.layer_rope[layer]
        if which is None:
            return None
        P = config.base_head_dim // 2
        pairs = torch.tensor(config.attn_pairs[layer], dtype=torch.long)  # [KV, d/2]
        KV, r = pairs.shape[0], config.heads_per_group[layer]
        groups = torch.cat((torch.arange(KV * r) // r, torch.arange(KV)))
        idx = pairs[groups] + which * 3 * P  # [H + KV, d/2]
        return torch.stack((torch.cat((idx, idx), -1), torch.cat((idx + 2 * P, idx + P), -1)))

    def forward(self, x, rope, mask, is_causal, cache: Cache | None):
        B, T, _ = x.shape
        H, KV, d = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, d)
        qk = qkv[:, :, :H + KV]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        if self.rope_index is not None:
            cos, sin = rope[:, :, self.rope_index].unbind(2)  # each [B, T, H + KV, d]
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # == x * cos + rotate_half(x) * sin, exactly
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # [B, H, T, d], [B, KV, T, d]
        v = qkv[:, :, H + KV:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_slot)
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


class SkippedSublayer(nn.Module):
    """A sublayer that keeps no head (or no channel): its output is its projection's bias alone.

    The bias lives under the projection's usual name (`o_proj.bias` / `down_proj.bias`), so a
    checkpoint names it like any other."""

    def __init__(self, config: SubnetConfig, name: str, bias: bool):
        super().__init__()
        self.name = name
        proj = nn.Module()
        proj.register_parameter("bias", nn.Parameter(torch.zeros(config.hidden_size)) if bias else None)
        self.add_module(name, proj)

    def forward(self, x: torch.Tensor, *_args) -> torch.Tensor | None:
        bias = getattr(self, self.name).bias
        return None if bias is None else bias


def norm_names(sandwich: bool) -> dict[str, str]:
    """Role -> the base family's own name of each block norm: "attn_in" before attention, "mlp_in"
    before the MLP, and with Gemma's sandwich norms "attn_out" / "mlp_out" after them."""
    if sandwich:
        return {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"}
    return {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}


class SubnetBlock(nn.Module):
    """A pre-norm block; its norms carry the base family's names (`norm_names`). A norm before a
    sublayer exists when the sublayer is kept; one after it always (a skipped sublayer's bias, which
    compensation or reformation may give it, passes through it as in the base block). Each residual
    branch is scaled by `residual_multiplier` (Granite)."""

    def __init__(self, config: SubnetConfig, layer: int, cache_slot: int = 0):
        super().__init__()
        self.window = config.sliding_windows[layer]  # None: full attention
        self.residual_multiplier = config.residual_multiplier
        attends, feeds = bool(config.attn_pairs[layer]), bool(config.intermediate_sizes[layer])
        self.self_attn = (SubnetAttention(config, layer, cache_slot) if attends
                          else SkippedSublayer(config, "o_proj", config.o_bias))
        self.mlp = SubnetMLP(config, layer) if feeds else SkippedSublayer(config, "down_proj", config.down_bias)
        self.norm_roles = norm_names(config.sandwich_norm)
        for role, name in self.norm_roles.items():
            need = role.endswith("_out") or (attends if role.startswith("attn") else feeds)
            setattr(self, name, RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset) if need else None)

    def norm(self, role: str) -> nn.Module | None:
        name = self.norm_roles.get(role)
        return None if name is None else getattr(self, name)

    def _add(self, x: torch.Tensor, y: torch.Tensor | None, post: nn.Module | None) -> torch.Tensor:
        if y is None:
            return x
        if post is not None:
            y = post(y)
        return x + y if self.residual_multiplier == 1.0 else x + y * self.residual_multiplier

    def forward(self, x, rope, masks: dict, cache):
        pre = self.norm("attn_in")
        if pre is not None:
            mask, is_causal = masks[self.window]
            y = self.self_attn(pre(x), rope, mask, is_causal, cache)
        else:
            y = self.self_attn(x)
        x = self._add(x, y, self.norm("attn_out"))
        pre = self.norm("mlp_in")
        y = self.mlp(pre(x)) if pre is not None else self.mlp(x)
        return self._add(x, y, self.norm("mlp_out"))


def attention_mask(attention_mask, B: int, T: int, past: int, device,
                   window: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """A boolean [B, 1, T, past+T] mask, or none where SDPA's own causal path is exact.

    `window`: a sliding-window layer's span, as transformers masks it (key index > query index -
    window), on cache positions."""
    S = past + T
    padded = attention_mask is not None and not bool(attention_mask.all())
    windowed = window is not None and S > window
    if not padded and not windowed:
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = k_pos <= q_pos
    if windowed:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None, None]  # [1, 1, T, S]
    if padded:
        mask = mask & attention_mask[:, None, None, -S:].bool()
        # A fully masked row (a left-pad position) would give NaN; let it see itself instead.
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask.expand(B, 1, T, S), False


def block_masks(windows, attention_mask_, B: int, T: int, past: int, device) -> dict:
    """window -> (mask, is_causal) for every window the blocks use (None: full attention)."""
    return {w: attention_mask(attention_mask_, B, T, past, device, w) for w in set(windows)}


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
        elif isinstance(module, SkippedSublayer):
            bias = getattr(module, module.name).bias
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(module, SubnetAttention):
            index = module.make_rope_index(self.config, module.layer)
            module.rope_index = None if index is None else index.to(module.qkv_proj.weight.device)
        elif isinstance(module, RopeSet):
            module.reset(module.inv_freq.device)


def cache_slots(config: SubnetConfig) -> list[int]:
    """Per kept block, its layer in the KV cache (blocks that skip attention share slot 0 unused)."""
    slots, n = [], 0
    for pairs in config.attn_pairs:
        slots.append(n if pairs else 0)
        n += bool(pairs)
    return slots


def embed(config: SubnetConfig, weight: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings times the family's multiplier (Gemma: sqrt(hidden) rounded to the weights'
    dtype, as Gemma does; Granite: its embedding_multiplier)."""
    x = F.embedding(input_ids, weight)
    m = config.embedding_multiplier
    if m == 1.0:
        return x
    return x * torch.tensor(m, dtype=x.dtype) if config.norm_offset else x * m


def final_logits(config: SubnetConfig, logits: torch.Tensor) -> torch.Tensor:
    """The family's last step on the logits: Granite divides them, Gemma may soft-cap them."""
    if config.logits_scaling != 1.0:
        logits = logits / config.logits_scaling
    cap = config.final_logit_softcapping
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


class SubnetModel(SubnetPreTrainedModel):
    def __init__(self, config: SubnetConfig):
        super().__init__(config)
        self.rotary = SubnetRotary(config)  # of the base model's rotary pairs
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        slots = cache_slots(config)
        self.layers = nn.ModuleList(SubnetBlock(config, i, slots[i]) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache: bool = False):
        x = embed(self.config, self.embed_tokens.weight, input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(T, device=x.device) + past).unsqueeze(0).expand(B, T)
        masks = block_masks(self.config.sliding_windows, attention_mask, B, T, past, x.device)
        rope = self.rotary.table(position_ids, x.dtype)
        for block in self.layers:
            x = block(x, rope, masks, cache)
        return self.norm(x), cache


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
        logits = final_logits(self.config, self.lm_head(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


SubnetConfig.register_for_auto_class()
SubnetForCausalLM.register_for_auto_class("AutoModelForCausalLM")
