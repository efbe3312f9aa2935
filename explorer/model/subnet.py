"""The subnet record: which blocks, KV groups, query heads, rotary pairs and MLP channels of a
base model are kept.

A subnet is only indices into the base model, so it is small, hashable and JSON-friendly;
`explorer.model.slicing` turns it into a physically smaller model.

Per kept block the record holds, for attention, the kept KV groups, the kept query heads of
each kept group (the same count in every group, so the block stays a plain GQA attention) and
the kept rotary pairs of each kept group (the same count in every group); for the MLP, the kept
channels. The paper's search space narrows heads (pairs) and keeps every group and head; a
head-granular subnet (FLAP, llama.cpp) keeps whole heads and removes groups or heads. A block
may keep no attention or no MLP at all: that sublayer is skipped (its output is its bias, if
it has one), which is what FLAP's adaptive ratios produce when a block loses every head.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExplorerError


class SubnetError(ExplorerError):
    """A subnet that does not fit its base model."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a base model that subnets are carved from, and the block features that change
    its parameter count or its search space: per-head q/k norms (whole heads only) and Gemma's
    norms after each sublayer."""

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
    qk_norm: bool = False
    sandwich_norm: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        from .architecture import features

        feats = features(config)
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
            qk_norm=feats.qk_norm,
            sandwich_norm=feats.sandwich_norm,
        )

    @property
    def n_pairs(self) -> int:
        return self.head_dim // 2

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.num_heads // self.num_kv_heads

    # ---- parameter counts ------------------------------------------------------------------
    def attn_params(self, head_dim: int, kv: int | None = None, heads_per_group: int | None = None,
                    o_bias: bool | None = None) -> int:
        """Weights, biases and the input norm of one block's attention: `kv` kept groups of
        `heads_per_group` query heads at a kept head dim (default: every group and head). With no
        group kept the sublayer is skipped and only an o_proj bias (if any) remains."""
        D = self.hidden_size
        kv = self.num_kv_heads if kv is None else kv
        r = self.group_size if heads_per_group is None else heads_per_group
        o_bias = self.o_bias if o_bias is None else o_bias
        post = D if self.sandwich_norm else 0  # the norm after the sublayer (kept when it is skipped too)
        if kv == 0 or head_dim == 0:
            return (D if o_bias else 0) + post
        H = kv * r
        n = D * (H + 2 * kv) * head_dim + H * head_dim * D + D + post  # q, k, v, o and the norm(s)
        if self.qk_norm:
            n += 2 * head_dim
        if self.qkv_bias:
            n += (H + 2 * kv) * head_dim
        if o_bias:
            n += D
        return n

    def mlp_params(self, width: int, down_bias: bool | None = None) -> int:
        """Weights, biases and the input norm of one block's MLP (only a down_proj bias when empty)."""
        D = self.hidden_size
        down_bias = self.mlp_bias if down_bias is None else down_bias
        post = D if self.sandwich_norm else 0
        if width == 0:
            return (D if down_bias else 0) + post
        n = 3 * D * width + D + post  # gate, up, down and the norm(s)
        if self.mlp_bias:
            n += 2 * width
        if down_bias:
            n += D
        return n

    def block_params(self, head_dim: int, width: int, compensated: bool = False) -> int:
        """A block that keeps every group and head at `head_dim` and an MLP of `width`."""
        return (self.attn_params(head_dim, o_bias=self.o_bias or compensated)
                + self.mlp_params(width, down_bias=self.mlp_bias or compensated))

    def layer_params(self, layer: "LayerChoice | None", compensated: bool = False) -> int:
        """Parameters of one kept block (0 for a dropped one). `compensated` adds the o_proj and
        down_proj biases that bias compensation writes (explorer.model.slicing)."""
        if layer is None:
            return 0
        return (self.attn_params(layer.head_dim, layer.n_kv, layer.heads_per_group(self), self.o_bias or compensated)
                + self.mlp_params(layer.width, self.mlp_bias or compensated))

    @property
    def fixed_params(self) -> int:
        """Embeddings, final norm and lm_head: never pruned."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def dense_params(self) -> int:
        return self.fixed_params + self.dense_prunable

    @property
    def dense_prunable(self) -> int:
        return self.num_layers * self.block_params(self.head_dim, self.intermediate_size)

    def to_dict(self) -> dict:
        """Its fields; the block features only where a family has them, so the records of a plain-block
        model (run files, calibration cache keys) read as they did before the features existed."""
        return {k: v for k, v in self.__dict__.items() if not (k in ("qk_norm", "sandwich_norm") and not v)}


@dataclass(frozen=True)
class LayerChoice:
    """What one kept block keeps.

    attn_pairs: per kept KV group, its kept rotary pairs (the same count in every group).
    mlp_channels: kept MLP channels; () skips the MLP.
    kv_groups: the kept KV groups (None: every group, one per entry of attn_pairs); () skips attention.
    q_heads: per kept group, the kept query heads within the group (indices 0..group_size-1, the
        same count in every group); None keeps every query head.
    """

    attn_pairs: tuple[tuple[int, ...], ...]
    mlp_channels: tuple[int, ...]
    kv_groups: tuple[int, ...] | None = None
    q_heads: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if self.kv_groups is None:  # canonical: always explicit, so equal choices compare equal
            object.__setattr__(self, "kv_groups", tuple(range(len(self.attn_pairs))))

    @property
    def head_dim(self) -> int:
        """Kept dimensions per head (0 when attention is skipped)."""
        return 2 * len(self.attn_pairs[0]) if self.attn_pairs else 0

    @property
    def pairs(self) -> int:
        return len(self.attn_pairs[0]) if self.attn_pairs else 0

    @property
    def width(self) -> int:
        return len(self.mlp_channels)

    @property
    def n_kv(self) -> int:
        return len(self.kv_groups)

    def heads_per_group(self, shape: ModelShape) -> int:
        return len(self.q_heads[0]) if self.q_heads else shape.group_size

    def n_heads(self, shape: ModelShape) -> int:
        return self.n_kv * self.heads_per_group(shape)

    def query_heads(self, shape: ModelShape) -> list[int]:
        """Base-model indices of the kept query heads, grouped by kept KV group."""
        g = shape.group_size
        heads = self.q_heads or [tuple(range(g))] * self.n_kv
        return [k * g + h for k, hs in zip(self.kv_groups, heads) for h in hs]

    def head_dims(self, shape: ModelShape) -> list[list[int]]:
        """Per kept KV group, the kept dimensions of the original head, in rotate-half layout."""
        half = shape.n_pairs
        return [list(p) + [i + half for i in p] for p in self.attn_pairs]

    def to_dict(self, compact: bool = False) -> dict:
        enc = _to_mask if compact else list
        d: dict = {"attn_pairs": [enc(g) for g in self.attn_pairs], "mlp_channels": enc(self.mlp_channels)}
        if self.kv_groups != tuple(range(len(self.attn_pairs))):
            d["kv_groups"] = list(self.kv_groups)
        if self.q_heads is not None:
            d["q_heads"] = [list(h) for h in self.q_heads]
        return d


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
        """From nested lists (or None), sorting indices so equal subnets compare equal.

        A layer is (pairs, channels) or (pairs, channels, kv_groups, q_heads)."""
        out: list[LayerChoice | None] = []
        for layer in layers:
            if layer is None:
                out.append(None)
                continue
            pairs, channels, *rest = layer
            groups = rest[0] if rest else None
            heads = rest[1] if len(rest) > 1 else None
            out.append(LayerChoice(tuple(_sorted(g) for g in pairs), _sorted(channels),
                                   None if groups is None else _sorted(groups),
                                   None if heads is None else tuple(_sorted(h) for h in heads)))
        return cls(tuple(out))

    # ---- validation -----------------------------------------------------------------
    def validate(self, shape: ModelShape) -> "Subnet":
        if len(self.layers) != shape.num_layers:
            raise SubnetError(f"the subnet has {len(self.layers)} layers but the model has {shape.num_layers}")
        if all(layer is None for layer in self.layers):
            raise SubnetError("the subnet drops every layer")
        for i, layer in enumerate(self.layers):
            if layer is not None:
                _validate_layer(i, layer, shape)
        return self

    # ---- size and cost --------------------------------------------------------------
    def params(self, shape: ModelShape, compensated: bool = False) -> int:
        return shape.fixed_params + self.prunable_params(shape, compensated)

    def prunable_params(self, shape: ModelShape, compensated: bool = False) -> int:
        return sum(shape.layer_params(l, compensated) for l in self.layers)

    def fraction(self, shape: ModelShape, compensated: bool = False) -> float:
        """Kept fraction of the dense model's total parameters (embeddings included)."""
        return self.params(shape, compensated) / shape.dense_params

    def prunable_fraction(self, shape: ModelShape, compensated: bool = False) -> float:
        return self.prunable_params(shape, compensated) / shape.dense_prunable

    def decode_weights(self, shape: ModelShape) -> int:
        """Weights read per decoded token: every block matrix plus lm_head (one embedding row is negligible)."""
        return self.prunable_params(shape) + shape.vocab_size * shape.hidden_size

    def flops_per_token(self, shape: ModelShape, context: int = 512) -> int:
        """Multiply-adds x2 for one token at a given context length (matmuls and attention)."""
        attn = sum(4 * l.n_heads(shape) * l.head_dim * context for l in self.layers if l is not None)
        return 2 * self.decode_weights(shape) + attn

    def size_metrics(self, shape: ModelShape, compensated: bool = False) -> dict:
        """The size figures every candidate of a run stores."""
        return {"params": self.params(shape, compensated), "fraction": round(self.fraction(shape, compensated), 6),
                "prunable_fraction": round(self.prunable_fraction(shape, compensated), 6),
                "flops_per_token": self.flops_per_token(shape)}

    def summary(self, shape: ModelShape, compensated: bool = False) -> dict:
        kept = [l for l in self.layers if l is not None]
        return {
            **self.size_metrics(shape, compensated),
            "layers_kept": len(kept),
            "head_dims": [l.head_dim if l else 0 for l in self.layers],
            "query_heads": [l.n_heads(shape) if l else 0 for l in self.layers],
            "kv_heads": [l.n_kv if l else 0 for l in self.layers],
            "mlp_widths": [l.width if l else 0 for l in self.layers],
            "ideal_decode_speedup": round(Subnet.full(shape).decode_weights(shape) / self.decode_weights(shape), 4),
        }

    def head_granular(self, shape: ModelShape) -> bool:
        """Whether attention keeps whole heads only (every kept head at the full head dim): the form
        inference engines with one head size per model can run."""
        return all(l is None or l.n_kv == 0 or l.pairs == shape.n_pairs for l in self.layers)

    # ---- identity and JSON ------------------------------------------------------------
    def key(self) -> str:
        """A short stable id: equal subnets get equal keys."""
        return hashlib.sha1(json.dumps(self.to_dict(), separators=(",", ":")).encode()).hexdigest()[:12]

    def to_dict(self, compact: bool = False) -> dict:
        """Index lists (readable), or with `compact` bit masks as hex strings (run logs: ~20x smaller)."""
        layers = [None if l is None else l.to_dict(compact) for l in self.layers]
        return {"encoding": "mask", "layers": layers} if compact else {"layers": layers}

    @classmethod
    def from_dict(cls, data: dict) -> "Subnet":
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise SubnetError("not a subnet description: expected an object with a 'layers' list")
        dec = _from_mask if data.get("encoding") == "mask" else list
        layers = []
        for i, l in enumerate(data["layers"]):
            if l is None:
                layers.append(None)
                continue
            if not isinstance(l, dict) or not isinstance(l.get("attn_pairs"), list) or "mlp_channels" not in l:
                raise SubnetError(f"not a subnet description: layer {i} is neither null nor an object with "
                                  "'attn_pairs' and 'mlp_channels'")
            try:
                layers.append(([dec(g) for g in l["attn_pairs"]], dec(l["mlp_channels"]), l.get("kv_groups"),
                               l.get("q_heads")))
            except (TypeError, ValueError, AttributeError):
                raise SubnetError(f"not a subnet description: layer {i} holds something other than index lists") \
                    from None
        try:
            return cls.build(layers)
        except (TypeError, ValueError) as e:
            raise SubnetError(f"not a subnet description: an index is not a whole number ({type(e).__name__})") \
                from None

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
        if not isinstance(data, dict):
            raise SubnetError("not a subnet description: expected a JSON object with a 'layers' list")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "Subnet":
        p = Path(path)
        if not p.is_file():
            raise SubnetError(f"no subnet file at {p}")
        return cls.from_json(p.read_text(encoding="utf-8"))


def _validate_layer(i: int, layer: LayerChoice, shape: ModelShape) -> None:
    where = f"layer {i}"
    if shape.qk_norm and layer.n_kv and layer.pairs != shape.n_pairs:
        raise SubnetError(f"{where}: this model normalises each query and key head, so a kept head keeps all "
                          f"{shape.head_dim} dimensions (whole heads only), not {layer.head_dim}")
    _check_indices(layer.kv_groups, shape.num_kv_heads, f"{where}: KV group")
    if len(layer.attn_pairs) != layer.n_kv:
        raise SubnetError(f"{where}: {len(layer.attn_pairs)} lists of rotary pairs for {layer.n_kv} kept KV groups")
    if layer.n_kv:
        counts = {len(g) for g in layer.attn_pairs}
        if len(counts) != 1:
            raise SubnetError(f"{where}: every KV group must keep the same number of rotary pairs, got {sorted(counts)}")
        if counts == {0}:
            raise SubnetError(f"{where}: attention keeps no dimension (keep no KV group instead)")
        for g in layer.attn_pairs:
            _check_indices(g, shape.n_pairs, f"{where}: rotary pair")
    if layer.q_heads is not None:
        if len(layer.q_heads) != layer.n_kv:
            raise SubnetError(f"{where}: {len(layer.q_heads)} lists of query heads for {layer.n_kv} kept KV groups")
        counts = {len(h) for h in layer.q_heads}
        if len(counts) > 1:
            raise SubnetError(f"{where}: every kept KV group must keep the same number of query heads, got "
                              f"{sorted(counts)}")
        if counts == {0}:
            raise SubnetError(f"{where}: a kept KV group keeps no query head (keep fewer KV groups instead)")
        for h in layer.q_heads:
            _check_indices(h, shape.group_size, f"{where}: query head")
    if layer.mlp_channels:
        _check_indices(layer.mlp_channels, shape.intermediate_size, f"{where}: MLP channel")


def _sorted(values) -> tuple[int, ...]:
    return tuple(sorted(int(v) for v in values))


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


def first_index_subnet(shape: ModelShape, head_dim: int, width: int, layers: int | None = None) -> Subnet:
    """The same widths in every kept block, keeping the first indices, and `layers` blocks spread
    evenly (default all): a structural subnet for speed measurements, whose cost depends only on
    its shapes (importance-ranked choices come from `explorer.calibrate.importance`). A model that
    normalises each query and key head keeps whole heads only: there a narrower `head_dim` becomes
    the same share of query heads per group (at least one), or of KV groups when each has one head."""
    pairs = max(1, head_dim // 2)
    if shape.qk_norm and pairs < shape.n_pairs:
        share = pairs / shape.n_pairs
        r = max(1, round(shape.group_size * share))
        kv = shape.num_kv_heads if shape.group_size > 1 else max(1, round(shape.num_kv_heads * share))
        full = tuple(range(shape.n_pairs))
        layer = LayerChoice(tuple(full for _ in range(kv)), tuple(range(width)), tuple(range(kv)),
                            None if r == shape.group_size else tuple(tuple(range(r)) for _ in range(kv)))
    else:
        layer = LayerChoice(tuple(tuple(range(pairs)) for _ in range(shape.num_kv_heads)), tuple(range(width)))
    n = shape.num_layers if layers is None else max(1, min(layers, shape.num_layers))
    keep = {round(k * shape.num_layers / n) for k in range(n)}
    return Subnet(tuple(layer if i in keep else None for i in range(shape.num_layers)))


def uniform_subnet(shape: ModelShape, attn_keep: float, mlp_keep: float, multiple: int = 8) -> Subnet:
    """`first_index_subnet` at keep ratios: the same share of rotary pairs and MLP channels in every block."""
    pairs = max(1, round(shape.n_pairs * attn_keep))
    return first_index_subnet(shape, 2 * pairs, round_width(shape.intermediate_size * mlp_keep, multiple,
                                                             shape.intermediate_size))


def round_width(width: float, multiple: int, limit: int) -> int:
    """Round a kept width to a hardware-friendly multiple, within [multiple, limit]."""
    if limit <= multiple:
        return max(1, min(limit, round(width)))
    return int(min(limit, max(multiple, multiple * round(width / multiple))))
