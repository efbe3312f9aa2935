"""Tiny randomly initialised models of every architecture and rope type we accept, with random
biases and norm gains too, so a mistake in any part of the maths shows in the logits."""
from __future__ import annotations

import torch

VOCAB = 97

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                 "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)]},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}

# name -> (architecture, config overrides); every one has GQA (8 query heads, 2 KV groups) and
# a max_position_embeddings below the test length, so dynamic and longrope switch mid-sequence.
ARCHS = {
    **{f"llama-{r}": ("llama", {"rope_parameters": ROPES[r]}) for r in ROPES},
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral-window": ("mistral", {"sliding_window": 16}),
    "qwen2": ("qwen2", {}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}),
    "qwen3": ("qwen3", {}),
    "qwen3-bias-window": ("qwen3", {"attention_bias": True, "use_sliding_window": True, "sliding_window": 16,
                                    "max_window_layers": 2}),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),
    "smollm3-nope4": ("smollm3", {}),  # the real models' rule: no rotation in every fourth layer
    "smollm3-window": ("smollm3", {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": 16,
                                   "attention_bias": True, "mlp_bias": True}),
    "granite": ("granite", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                            "logits_scaling": 4.0, "attention_bias": True, "mlp_bias": True}),
    "granite-llama3": ("granite", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                   "attention_multiplier": 0.015625, "logits_scaling": 8.0,
                                   "rope_parameters": ROPES["llama3"], "tie_word_embeddings": True}),
    # Gemma 3: sliding layers with their own rope base, a scaled rope on the full ones, soft-capped logits
    "gemma3": ("gemma3_text", {"sliding_window": 16, "query_pre_attn_scalar": 24, "final_logit_softcapping": 30.0,
                               "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                                               "full_attention"],
                               "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                               "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}),
}


def tiny_model(name: str = "llama-default", seed: int = 0, layers: int = 4, vocab: int = VOCAB):
    """One of ARCHS, eval mode, every parameter random (weights ~0.08, biases ~0.1, norms ~1)."""
    import transformers as tf

    arch, extra = ARCHS[name]
    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
               "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM),
               "granite": (tf.GraniteConfig, tf.GraniteForCausalLM),
               "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=8,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch not in ("llama", "granite"):
        kw.setdefault("sliding_window", None)
    kw.update(extra)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name_.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    return model
