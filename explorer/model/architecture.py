"""What of a base model's architecture the sliced model reproduces, read from its config: the
family's block features, the rotary settings and sliding window of every layer, and the settings
it refuses (in one line) because it would compute them differently.

Every family we accept is a decoder of pre-norm blocks with q/k/v/o and gate/up/down projections
under transformers' usual names; what differs is collected in `Features`:
- Llama, Mistral, Qwen2: the plain block (Qwen2 has q/k/v biases; Mistral and Qwen2 may window).
- Qwen3: an RMSNorm over each head's query and key (`q_norm`, `k_norm`) before the rotation.
- SmolLM3: layers without rotary embeddings (`no_rope_layers[i] == 0`).
- Granite: the embeddings, each sublayer's residual branch and the logits are scaled by constants,
  and the softmax scale is a constant of its own (`attention_multiplier`).
- Gemma 3 (text): embeddings scaled by sqrt(hidden), RMSNorm as x * (1 + w) in fp32, q/k norms,
  a norm after each sublayer as well as before it, softmax scale query_pre_attn_scalar^-1/2,
  sliding windows with their own rotary base (rope settings per layer type), GELU-tanh MLP.
A per-head q/k norm over a narrowed head is not the original function (the norm's mean runs over
every dimension), so families with one keep whole heads only (`narrow_heads` false).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ExplorerError

SUPPORTED_ROPE = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# model_type -> the transformers class we load it as
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM"}


class ArchitectureError(ExplorerError):
    """A base-model setting the sliced model cannot reproduce exactly."""


@dataclass(frozen=True)
class Features:
    """The block features of one base model, all read from its config."""

    family: str  # the transformers model_type
    qk_norm: bool = False  # RMSNorm over each query and key head before the rotation
    sandwich_norm: bool = False  # a norm after each sublayer too (Gemma's post-attention / post-feedforward)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    softmax_scale: float | None = None  # None: 1 / sqrt(head_dim)
    logits_scaling: float = 1.0  # logits are divided by it
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"

    def config_fields(self) -> dict:
        """The SubnetConfig fields of the same names (every feature but the family and activation)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("family", "hidden_act")}

    @property
    def narrow_heads(self) -> bool:
        """Whether a head may keep a subset of its dimensions (the paper's space) exactly."""
        return not self.qk_norm


def features(config) -> Features:
    family = getattr(config, "model_type", "llama")
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
    if family == "qwen3":
        return Features(family, qk_norm=True, hidden_act=act)
    if family == "granite":
        return Features(family, embedding_multiplier=float(config.embedding_multiplier),
                        residual_multiplier=float(config.residual_multiplier),
                        softmax_scale=float(config.attention_multiplier), logits_scaling=float(config.logits_scaling),
                        hidden_act=act)
    if family == "gemma3_text":
        cap = getattr(config, "final_logit_softcapping", None)
        return Features(family, qk_norm=True, sandwich_norm=True, norm_offset=1.0,
                        embedding_multiplier=float(config.hidden_size) ** 0.5,
                        softmax_scale=float(config.query_pre_attn_scalar) ** -0.5,
                        final_logit_softcapping=None if cap is None else float(cap), hidden_act=act)
    return Features(family, hidden_act=act)


def _clean(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


def rope_parameters(config) -> dict:
    """The rotary settings of the base model's full-attention layers (transformers 5
    `rope_parameters`, per layer type where the family has them, or older fields)."""
    return rope_sets(config)[0][0]


def rope_sets(config) -> tuple[list[dict], list[int | None]]:
    """The distinct rotary settings of the base model and, per layer, the index of its own (None:
    the layer has no rotary embedding). Gemma 3 keys its settings by layer type."""
    n = config.num_hidden_layers
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" not in params and params and \
            all(isinstance(v, dict) for v in params.values()):  # per layer type
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        names = sorted(set(types), key=lambda t: (t != "full_attention", t))  # full attention first
        sets = [_clean(params[t]) for t in names]
        per_layer: list[int | None] = [names.index(t) for t in types]
    else:
        if isinstance(params, dict) and "rope_theta" in params:
            one = _clean(params)
        else:
            one = dict(getattr(config, "rope_scaling", None) or {})
            one.setdefault("rope_type", one.pop("type", "default"))
            one["rope_theta"] = getattr(config, "rope_theta", 10000.0)
        sets, per_layer = [one], [0] * n
    if getattr(config, "model_type", "") == "smollm3":
        per_layer = [p if use else None for p, use in zip(per_layer, config.no_rope_layers)]
    return sets, per_layer


def layer_windows(config) -> list[int | None]:
    """Per base layer, its sliding-window span, or None for full attention, as transformers decides:
    Mistral windows every layer when `sliding_window` is set; Qwen2/3, SmolLM3 and Gemma 3 window
    the layers typed "sliding_attention" (SmolLM3 only with `use_sliding_window`); Llama and
    Granite have no window."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    model_type = getattr(config, "model_type", "llama")
    if model_type in ("llama", "granite") or window is None:
        return [None] * n
    if model_type == "smollm3" and not getattr(config, "use_sliding_window", False):
        return [None] * n
    types = getattr(config, "layer_types", None)
    if model_type == "mistral" or types is None:
        return [int(window)] * n
    return [int(window) if t == "sliding_attention" else None for t in types]


def check_architecture(config) -> None:
    """Refuse, in one line, a setting the sliced model would silently compute differently."""
    family = getattr(config, "model_type", "llama")
    if family not in FAMILIES:
        raise ArchitectureError(f"model type {family!r} is not supported ({', '.join(FAMILIES)})")
    sets, _ = rope_sets(config)
    for params in sets:
        rope_type = params.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE:
            raise ArchitectureError(f"rope type {rope_type!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ROPE)})")
        if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise ArchitectureError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    types = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if types:
        raise ArchitectureError(f"layer types {sorted(types)} are not supported (full and sliding attention are)")
    if family == "gemma3_text":
        if getattr(config, "use_bidirectional_attention", False):
            raise ArchitectureError("bidirectional attention (an embedding model's setting) is not supported")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ArchitectureError("attention logit soft-capping is not supported")
