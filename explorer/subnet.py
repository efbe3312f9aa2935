"""The subnet record: which blocks, rotary pairs and MLP channels of a base model are kept.

A subnet is only indices into the base model, so it is small, hashable and JSON-friendly;
`explorer.slicing` turns it into a physically smaller model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExplorerError


class SubnetError(ExplorerError):
    """A subnet that does not fit its base model."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family base model that subnets are carved from."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(config, "attention_bias", False)) or getattr(config, "model_type", "") == "qwen2",
            o_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    @property
    def n_pairs(self) -> int:
        return self.head_dim // 2

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def attn_params(self, head_dim: int) -> int:
        """Weights and biases of q/k/v/o at a given kept head dim."""
        D, H, KV = self.hidden_size, self.num_heads, self.num_kv_heads
        n = D * (H + 2 * KV) * head_dim + H * head_dim * D
        if self.qkv_bias:
            n += (H + 2 * KV) * head_dim
        if self.o_bias:
            n += D
        return n

    def mlp_params(self, width: int) -> int:
        D = self.hidden_size
        n = 3 * D * width
        if self.mlp_bias:
            n += 2 * width + D
        return n

    def block_params(self, head_dim: int, width: int) -> int:
        return self.attn_params(head_dim) + self.mlp_params(width) + 2 * self.hidden_size

    @property
    def fixed_params(self) -> int:
        """Embeddings, final norm and lm_head: never pruned."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def dense_params(self) -> int:
        return self.fixed_params + self.num_layers * self.block_params(self.head_dim, self.intermediate_size)

    @property
    def dense_prunable(self) -> int:
        return self.num_layers * self.block_params(self.head_dim, self.intermediate_size)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LayerChoice:
    """What one kept block keeps: rotary-pair indices per KV group, and MLP channel indices."""

    attn_pairs: tuple[tuple[int, ...], ...]
    mlp_channels: tuple[int, ...]

    @property
    def head_dim(self) -> int:
        return 2 * len(self.attn_pairs[0]) if self.attn_pairs else 0

    @property
    def width(self) -> int:
        return len(self.mlp_channels)

    def head_dims(self, shape: ModelShape) -> list[list[int]]:
        """Per KV group, the kept dimensions of the original head, in rotate-half layout."""
        half = shape.n_pairs
        return [list(p) + [i + half for i in p] for p in self.attn_pairs]


@dataclass(frozen=True)
class Subnet:
    """Per base layer, a LayerChoice, or None when the whole block is dropped."""

    layers: tuple[LayerChoice | None, ...]

    # ---- construction -------------------------------------------------------------
    @classmethod
    def full(cls, shape: ModelShape) -> "Subnet":
        pairs = tuple(tuple(range(shape.n_pairs)) for _ in range(shape.num_kv_heads))
        layer = LayerChoice(pairs, tuple(range(shape.intermediate_size)))
        return cls(tuple(layer for _ in range(shape.num_layers)))

    @classmethod
    def build(cls, layers: list) -> "Subnet":
        """From nested lists (or None), sorting indices so equal subnets compare equal."""
        out: list[LayerChoice | None] = []
        for layer in layers:
            if layer is None:
                out.append(None)
                continue
            pairs, channels = layer
            out.append(LayerChoice(tuple(tuple(sorted(int(i) for i in g)) for g in pairs),
                                   tuple(sorted(int(c) for c in channels))))
        return cls(tuple(out))

    # ---- validation -----------------------------------------------------------------
    def validate(self, shape: ModelShape) -> "Subnet":
        if len(self.layers) != shape.num_layers:
            raise SubnetError(f"the subnet has {len(self.layers)} layers but the model has {shape.num_layers}")
        if all(layer is None for layer in self.layers):
            raise SubnetError("the subnet drops every layer")
        for i, layer in enumerate(self.layers):
            if layer is None:
                continue
            if len(layer.attn_pairs) != shape.num_kv_heads:
                raise SubnetError(f"layer {i}: {len(layer.attn_pairs)} KV groups given, the model has {shape.num_kv_heads}")
            counts = {len(g) for g in layer.attn_pairs}
            if len(counts) != 1:
                raise SubnetError(f"layer {i}: every KV group must keep the same number of rotary pairs, got {sorted(counts)}")
            if counts == {0}:
                raise SubnetError(f"layer {i}: attention keeps no dimension (drop the layer instead)")
            for g in layer.attn_pairs:
                _check_indices(g, shape.n_pairs, f"layer {i}: rotary pair")
            if not layer.mlp_channels:
                raise SubnetError(f"layer {i}: the MLP keeps no channel (drop the layer instead)")
            _check_indices(layer.mlp_channels, shape.intermediate_size, f"layer {i}: MLP channel")
        return self

    # ---- size and cost --------------------------------------------------------------
    def params(self, shape: ModelShape) -> int:
        return shape.fixed_params + self.prunable_params(shape)

    def prunable_params(self, shape: ModelShape) -> int:
        return sum(shape.block_params(l.head_dim, l.width) for l in self.layers if l is not None)

    def fraction(self, shape: ModelShape) -> float:
        """Kept fraction of the dense model's total parameters (embeddings included)."""
        return self.params(shape) / shape.dense_params

    def prunable_fraction(self, shape: ModelShape) -> float:
        return self.prunable_params(shape) / shape.dense_prunable

    def decode_weights(self, shape: ModelShape) -> int:
        """Weights read per decoded token: every block matrix plus lm_head (one embedding row is negligible)."""
        return self.prunable_params(shape) + shape.vocab_size * shape.hidden_size

    def flops_per_token(self, shape: ModelShape, context: int = 512) -> int:
        """Multiply-adds x2 for one token at a given context length (matmuls and attention)."""
        attn = sum(4 * shape.num_heads * l.head_dim * context for l in self.layers if l is not None)
        return 2 * self.decode_weights(shape) + attn

    def size_metrics(self, shape: ModelShape) -> dict:
        """The size figures every candidate of a run stores."""
        return {"params": self.params(shape), "fraction": round(self.fraction(shape), 6),
                "prunable_fraction": round(self.prunable_fraction(shape), 6),
                "flops_per_token": self.flops_per_token(shape)}

    def summary(self, shape: ModelShape) -> dict:
        kept = [l for l in self.layers if l is not None]
        return {
            **self.size_metrics(shape),
            "layers_kept": len(kept),
            "head_dims": [l.head_dim if l else 0 for l in self.layers],
            "mlp_widths": [l.width if l else 0 for l in self.layers],
            "ideal_decode_speedup": round(Subnet.full(shape).decode_weights(shape) / self.decode_weights(shape), 4),
        }

    # ---- identity and JSON ------------------------------------------------------------
    def key(self) -> str:
        """A short stable id: equal subnets get equal keys."""
        return hashlib.sha1(json.dumps(self.to_dict(), separators=(",", ":")).encode()).hexdigest()[:12]

    def to_dict(self, compact: bool = False) -> dict:
        """Index lists (readable), or with `compact` bit masks as hex strings (run logs: ~20x smaller)."""
        if compact:
            return {"encoding": "mask", "layers": [None if l is None else {
                "attn_pairs": [_to_mask(g) for g in l.attn_pairs], "mlp_channels": _to_mask(l.mlp_channels)}
                for l in self.layers]}
        return {"layers": [None if l is None else {"attn_pairs": [list(g) for g in l.attn_pairs],
                                                  "mlp_channels": list(l.mlp_channels)} for l in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "Subnet":
        try:
            dec = _from_mask if data.get("encoding") == "mask" else list
            layers = [None if l is None else ([dec(g) for g in l["attn_pairs"]], dec(l["mlp_channels"]))
                      for l in data["layers"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SubnetError(f"not a subnet description: missing or malformed field ({e})") from None
        return cls.build(layers)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Subnet":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SubnetError(f"not valid JSON: {e}") from None
        if isinstance(data, dict) and "subnet" in data:
            data = data["subnet"]
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "Subnet":
        p = Path(path)
        if not p.is_file():
            raise SubnetError(f"no subnet file at {p}")
        return cls.from_json(p.read_text(encoding="utf-8"))


def _to_mask(indices) -> str:
    bits = 0
    for i in indices:
        bits |= 1 << int(i)
    return format(bits, "x")


def _from_mask(mask: str) -> list[int]:
    bits = int(mask, 16)
    return [i for i in range(bits.bit_length()) if bits >> i & 1]


def _check_indices(values: tuple[int, ...], limit: int, what: str) -> None:
    if len(set(values)) != len(values):
        raise SubnetError(f"{what} indices are duplicated")
    bad = [v for v in values if not 0 <= v < limit]
    if bad:
        raise SubnetError(f"{what} index {bad[0]} is out of range [0, {limit})")


def uniform_subnet(shape: ModelShape, attn_keep: float, mlp_keep: float, multiple: int = 8) -> "Subnet":
    """Same keep ratio in every block, keeping the first indices: a structural placeholder for
    tests and speed measurements (importance-ranked choices come from `explorer.importance`)."""
    pairs = max(1, round(shape.n_pairs * attn_keep))
    width = round_width(shape.intermediate_size * mlp_keep, multiple, shape.intermediate_size)
    layer = LayerChoice(tuple(tuple(range(pairs)) for _ in range(shape.num_kv_heads)), tuple(range(width)))
    return Subnet(tuple(layer for _ in range(shape.num_layers)))


def round_width(width: float, multiple: int, limit: int) -> int:
    """Round a kept width to a hardware-friendly multiple, within [multiple, limit]."""
    if limit <= multiple:
        return max(1, min(limit, round(width)))
    return int(min(limit, max(multiple, multiple * round(width / multiple))))
