"""Configuration of a subnet: a Llama-family decoder whose blocks have their own widths.

This file is copied verbatim into every exported model folder, so it may import only
`transformers` (never `explorer`). The engine uses the very same class.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class SubnetConfig(PretrainedConfig):
    """Hyper-parameters of the base model plus, per kept block: the kept rotary pairs of each kept
    KV group, the query heads per kept group, the kept MLP width, the block's sliding window and
    which of the base model's rotary settings it uses (`layer_rope`, an index into `rope_sets`;
    None: no rotary embedding).

    The family's block features (`base_model_type`): per-head q/k norms (`qk_norm`), norms after
    each sublayer (`sandwich_norm`), RMSNorm gains of (offset + weight) (`norm_offset`), and the
    constants that scale the embeddings, each residual branch, the softmax and the logits.

    `base_head_dim` is the *original* head dimension: it fixes the softmax scale and the rotary
    frequencies, which a subnet must inherit unchanged (METHOD section 1); the rotary settings are
    the base model's own (`base_rope_parameters`, any rope type transformers defines). A block
    with no KV group skips attention; one with MLP width 0 skips its MLP (their outputs are then
    the o_proj / down_proj bias, when there is one). The kept shapes are mirrored into
    transformers' heterogeneous `per_layer_config` (per kept layer `head_dim`,
    `intermediate_size`, `num_attention_heads`, `num_key_value_heads`), so tools that understand
    it see the real shapes; the base model's head counts are `base_num_attention_heads` and
    `base_num_key_value_heads`.
    """

    model_type = "subnet_llm"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        base_num_attention_heads: int | None = None,
        base_num_key_value_heads: int | None = None,
        base_head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 2048,
        base_rope_parameters: dict | None = None,
        tie_word_embeddings: bool = False,
        layer_ids: list[int] | None = None,
        attn_pairs: list[list[list[int]]] | None = None,
        heads_per_group: list[int] | None = None,
        intermediate_sizes: list[int] | None = None,
        sliding_windows: list[int | None] | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        down_bias: bool = False,
        base_num_hidden_layers: int | None = None,
        base_intermediate_size: int | None = None,
        base_model_type: str = "llama",
        rope_sets: list[dict] | None = None,
        layer_rope: list[int | None] | None = None,
        qk_norm: bool = False,
        sandwich_norm: bool = False,
        norm_offset: float = 0.0,
        embedding_multiplier: float = 1.0,
        residual_multiplier: float = 1.0,
        softmax_scale: float | None = None,
        logits_scaling: float = 1.0,
        final_logit_softcapping: float | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        if base_num_attention_heads is None:  # a config saved before the base_* names held them globally
            base_num_attention_heads = kwargs.get("num_attention_heads", 32)
            base_num_key_value_heads = base_num_key_value_heads or kwargs.get("num_key_value_heads")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.base_num_attention_heads = base_num_attention_heads
        self.base_num_key_value_heads = base_num_key_value_heads or base_num_attention_heads
        self.base_head_dim = base_head_dim or hidden_size // base_num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.base_rope_parameters = dict(base_rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.layer_ids = list(layer_ids or [])
        self.attn_pairs = [[list(g) for g in layer] for layer in (attn_pairs or [])]
        n = len(self.layer_ids)
        group = self.base_num_attention_heads // self.base_num_key_value_heads
        self.heads_per_group = list(heads_per_group) if heads_per_group is not None else [group] * n
        self.intermediate_sizes = list(intermediate_sizes or [])
        self.sliding_windows = list(sliding_windows) if sliding_windows is not None else [None] * n
        self.num_hidden_layers = n
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.down_bias = down_bias
        self.base_num_hidden_layers = base_num_hidden_layers or n
        self.base_intermediate_size = base_intermediate_size
        self.base_model_type = base_model_type
        self.rope_sets = [dict(r) for r in rope_sets] if rope_sets else [dict(self.base_rope_parameters)]
        self.layer_rope = list(layer_rope) if layer_rope is not None else [0] * n
        self.qk_norm = qk_norm
        self.sandwich_norm = sandwich_norm
        self.norm_offset = norm_offset
        self.embedding_multiplier = embedding_multiplier
        self.residual_multiplier = residual_multiplier
        self.softmax_scale = softmax_scale
        self.logits_scaling = logits_scaling
        self.final_logit_softcapping = final_logit_softcapping
        self.use_cache = use_cache
        for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
            kwargs.pop(key, None)  # derived per layer; stale copies from a saved config are dropped
        kwargs["per_layer_config"] = {
            j: {"head_dim": 2 * len(pairs[0]) if pairs else 0, "intermediate_size": int(width),
                "num_attention_heads": len(pairs) * r, "num_key_value_heads": len(pairs)}
            for j, (pairs, r, width) in enumerate(zip(self.attn_pairs, self.heads_per_group, self.intermediate_sizes))
        } or None
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        lists = (self.attn_pairs, self.heads_per_group, self.intermediate_sizes, self.sliding_windows,
                 self.layer_rope)
        if any(len(x) != n for x in lists):
            raise ValueError("layer_ids, attn_pairs, heads_per_group, intermediate_sizes, sliding_windows and "
                             "layer_rope must have one entry per kept layer")
