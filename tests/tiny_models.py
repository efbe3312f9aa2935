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
}


def tiny_model(name: str = "llama-default", seed: int = 0, layers: int = 4, vocab: int = VOCAB):
    """One of ARCHS, eval mode, every parameter random (weights ~0.08, biases ~0.1, norms ~1)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    arch, extra = ARCHS[name]
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=8,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch != "llama":
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
