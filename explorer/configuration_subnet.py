"""Configuration of a subnet: a Llama-family decoder whose blocks have their own widths.

This file is copied verbatim into every exported model folder, so it may import only
`transformers` (never `explorer`). The engine uses the very same class.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class SubnetConfig(PretrainedConfig):
    """Hyper-parameters of the base model plus, per kept block, the kept rotary pairs of each
    KV group and the kept MLP width.

    `base_head_dim` is the *original* head dimension: it fixes the softmax scale and the rotary
    frequencies, which a subnet must inherit unchanged (METHOD section 1). The kept widths are
    mirrored into transformers' heterogeneous `per_layer_config` (`head_dim`,
    `intermediate_size` per kept layer), so tools that understand it see the real shapes.
    """

    model_type = "subnet_llm"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        base_head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 2048,
        base_rope_parameters: dict | None = None,
        tie_word_embeddings: bool = False,
        layer_ids: list[int] | None = None,
        attn_pairs: list[list[list[int]]] | None = None,
        intermediate_sizes: list[int] | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        down_bias: bool = False,
        base_num_hidden_layers: int | None = None,
        base_intermediate_size: int | None = None,
        base_model_type: str = "llama",
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.base_head_dim = base_head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.base_rope_parameters = dict(base_rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.layer_ids = list(layer_ids or [])
        self.attn_pairs = [[list(g) for g in layer] for layer in (attn_pairs or [])]
        self.intermediate_sizes = list(intermediate_sizes or [])
        self.num_hidden_layers = len(self.layer_ids)
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.down_bias = down_bias
        self.base_num_hidden_layers = base_num_hidden_layers or len(self.layer_ids)
        self.base_intermediate_size = base_intermediate_size
        self.base_model_type = base_model_type
        self.use_cache = use_cache
        kwargs.pop("num_hidden_layers", None)
        kwargs["per_layer_config"] = {
            j: {"head_dim": 2 * len(pairs[0]), "intermediate_size": int(width)}
            for j, (pairs, width) in enumerate(zip(self.attn_pairs, self.intermediate_sizes))
        } or None
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if len(self.attn_pairs) != self.num_hidden_layers or len(self.intermediate_sizes) != self.num_hidden_layers:
            raise ValueError("layer_ids, attn_pairs and intermediate_sizes must have one entry per kept layer")
