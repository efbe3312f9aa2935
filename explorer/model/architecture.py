"""What of a base model's architecture the sliced model reproduces, read from its config: the
rotary settings, the sliding windows per layer, and the settings it refuses (in one line) because
it would compute them differently."""
from __future__ import annotations

from ..errors import ExplorerError

SUPPORTED_ROPE = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


class ArchitectureError(ExplorerError):
    """A base-model setting the sliced model cannot reproduce exactly."""


def rope_parameters(config) -> dict:
    """The base model's rotary settings, from transformers 5 `rope_parameters` or older fields."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return {k: v for k, v in params.items() if v is not None}
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return scaling


def layer_windows(config) -> list[int | None]:
    """Per base layer, its sliding-window span, or None for full attention, as transformers decides:
    Mistral windows every layer when `sliding_window` is set; Qwen2 (and any config with
    `layer_types`) windows the layers typed "sliding_attention"; Llama has no window."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    model_type = getattr(config, "model_type", "llama")
    if model_type == "llama" or window is None:
        return [None] * n
    types = getattr(config, "layer_types", None)
    if model_type == "mistral" or types is None:
        return [int(window)] * n
    return [int(window) if t == "sliding_attention" else None for t in types]


def check_architecture(config) -> None:
    """Refuse, in one line, a setting the sliced model would silently compute differently."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE:
        raise ArchitectureError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE)})")
    if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ArchitectureError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    types = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if types:
        raise ArchitectureError(f"layer types {sorted(types)} are not supported (full and sliding attention are)")
    if getattr(config, "model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise ArchitectureError(f"model type {config.model_type!r} is not supported (llama, mistral, qwen2)")
