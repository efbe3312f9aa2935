"""The families with llama.cpp architectures of their own (qwen3, smollm3, granite, gemma3): what
each holds and how a sliced model becomes its tensors.

llama.cpp reads `head_count`, `head_count_kv` and `feed_forward_length` as per-block arrays for
every architecture, but these four build every block's tensors and graph at the first block's
sizes (llama.cpp 0.3.36: a block of another size fails to load with "wrong shape"). So a subnet
is written at one size, the widest of its kept blocks: a narrower block's extra query heads, KV
heads and MLP channels are zeros. That is the same function exactly: a zero query row gives a
uniform softmax whose output meets zero o_proj columns, a zero KV head is read only by zero query
heads, a zero MLP channel is act(0) * 0 = 0 (a Gemma post-norm of 0 is 0). Dropped blocks are not
written. The file is then the size of a model whose every block is the widest kept one; the
export says so.

What each architecture cannot hold is refused in one line: output-projection biases (bias
compensation, reformation intercepts) in qwen3, smollm3 and gemma3, whose graphs have none; sliding
windows outside gemma3; smollm3's rotation-free blocks anywhere but every fourth written block
(llama.cpp fixes that rule); rope types other than default and linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# rope layout: NEOX rotates halves (transformers' layout, written as is); NORM rotates adjacent pairs
ARCHES = {"qwen3": ("qwen3", "neox"), "smollm3": ("smollm3", "norm"), "granite": ("granite", "norm"),
          "gemma3_text": ("gemma3", "neox")}
OUTPUT_BIASES = {"granite"}  # families whose llama.cpp graph adds attn_output / ffn_down biases
SMOLLM3_NOPE_STEP = 4  # llama.cpp's smollm3 skips rotation on blocks 3, 7, 11, ...


@dataclass(frozen=True)
class Size:
    """The one size every written block has."""

    n_kv: int
    heads_per_group: int
    n_ff: int

    @property
    def n_head(self) -> int:
        return self.n_kv * self.heads_per_group


def written_blocks(model) -> list[int]:
    """The sliced blocks to write: all but those that keep nothing and add no bias (identities)."""
    cfg = model.config
    out = []
    for i, pairs in enumerate(cfg.attn_pairs):
        block = model.model.layers[i]
        if pairs or cfg.intermediate_sizes[i] or _nonzero_bias(block.self_attn, "o_proj") is not None or \
                _nonzero_bias(block.mlp, "down_proj") is not None:
            out.append(i)
    return out


def one_size(model, blocks: list[int]) -> Size:
    cfg = model.config
    kv = max((len(cfg.attn_pairs[i]) for i in blocks), default=0)
    r = max((cfg.heads_per_group[i] for i in blocks if cfg.attn_pairs[i]), default=0)
    ff = max((cfg.intermediate_sizes[i] for i in blocks), default=0)
    return Size(max(kv, 1), max(r, 1), max(ff, 1))  # a model of skipped sublayers still has one zero head


def _nonzero_bias(sublayer, name: str) -> torch.Tensor | None:
    b = getattr(getattr(sublayer, name, None), "bias", None)
    return None if b is None or not torch.any(b != 0) else b


def refusal(model) -> str | None:
    """One line saying why llama.cpp's architecture of this family cannot hold the model, or None."""
    cfg = model.config
    family = cfg.base_model_type
    arch = ARCHES[family][0]
    for params in cfg.rope_sets:
        if params.get("rope_type", "default") not in ("default", "linear"):
            return f"rope type {params['rope_type']!r} is not written to GGUF for {arch} (default and linear are)"
    blocks = written_blocks(model)
    if not blocks:
        return "the subnet keeps no block"
    if family != "gemma3_text" and any(cfg.sliding_windows[i] is not None for i in blocks):
        return f"the base model uses sliding-window attention, which llama.cpp's {arch} architecture does not have"
    if family not in OUTPUT_BIASES:
        for i in blocks:
            block = model.model.layers[i]
            if any(_nonzero_bias(sub, name) is not None for sub, name in ((block.self_attn, "o_proj"),
                                                                          (block.mlp, "down_proj"))):
                return (f"block {cfg.layer_ids[i]} has an output-projection bias (bias compensation or a reformation "
                        f"intercept), which llama.cpp's {arch} graph does not have: search with compensate=false "
                        "and reform without the intercept to export this family as GGUF")
    if family == "smollm3":
        rotates = [cfg.layer_rope[i] is not None for i in blocks]
        want = [(j + 1) % SMOLLM3_NOPE_STEP != 0 for j in range(len(blocks))]
        if rotates != want:
            return ("llama.cpp's smollm3 graph skips rotation on every fourth block (3, 7, 11, ...), but this "
                    "subnet's blocks without rotation are " + str([j for j, r in enumerate(rotates) if not r]))
    if family == "granite" and len({cfg.layer_rope[i] is None for i in blocks}) > 1:
        return "llama.cpp's granite graph rotates every block or none"
    return None


def write_keys(w, model, blocks: list[int], size: Size) -> None:
    """The architecture's hyper-parameters (the tokenizer and file type are written by the caller)."""
    cfg = model.config
    family, hd = cfg.base_model_type, cfg.base_head_dim
    w.add_block_count(len(blocks))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length(size.n_ff)
    w.add_head_count(size.n_head)
    w.add_head_count_kv(size.n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    full = cfg.rope_sets[0]  # full attention's (Gemma's sliding layers use the second set)
    w.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if full.get("rope_type") == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    if family == "granite":
        w.add_logit_scale(float(cfg.logits_scaling))
        w.add_residual_scale(float(cfg.residual_multiplier))
        w.add_embedding_scale(float(cfg.embedding_multiplier))
        w.add_attention_scale(float(cfg.softmax_scale if cfg.softmax_scale is not None else hd ** -0.5))
        if all(cfg.layer_rope[i] is None for i in blocks):
            w.add_rope_scaling_finetuned(False)  # llama.cpp's switch for "no rotation anywhere"
    if family == "gemma3_text":
        sliding = [cfg.sliding_windows[i] is not None for i in blocks]
        if any(sliding):
            w.add_sliding_window(int(next(cfg.sliding_windows[i] for i in blocks if cfg.sliding_windows[i])))
            w.add_sliding_window_pattern(sliding)  # per written block
            swa = cfg.rope_sets[cfg.layer_rope[blocks[sliding.index(True)]]]
            w.add_rope_freq_base_swa(float(swa.get("rope_theta", 10000.0)))
        if cfg.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k from rotate-half layout (pair i = dims i, i + d/2) to llama.cpp's NORM layout
    (pair i = dims 2i, 2i + 1), per head: convert_hf_to_gguf's permutation."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def block_tensors(model, i: int, size: Size) -> dict[str, torch.Tensor]:
    """Block i of the sliced model at the one size (zeros where it is narrower), under llama.cpp's
    names (without the `blk.N.` prefix), in float32."""
    cfg = model.config
    block = model.model.layers[i]
    family, hd, D = cfg.base_model_type, cfg.base_head_dim, cfg.hidden_size
    gemma = family == "gemma3_text"
    f = lambda t: t.detach().to(torch.float32).cpu()  # noqa: E731
    gain = (lambda w: f(w) + 1.0) if gemma else f  # llama.cpp's gemma3 multiplies by the stored weight
    ones = torch.ones(D)
    out: dict[str, torch.Tensor] = {}
    K, R, F = size.n_kv, size.heads_per_group, size.n_ff
    kv, r = len(cfg.attn_pairs[i]), cfg.heads_per_group[i]
    q = torch.zeros(K * R * hd, D)
    k, v = torch.zeros(K * hd, D), torch.zeros(K * hd, D)
    o = torch.zeros(D, K * R * hd)
    biases = {}
    if kv:
        attn = block.self_attn
        wq, wk, wv = f(attn.qkv_proj.weight).split([kv * r * hd, kv * hd, kv * hd])
        heads = [(g * R + h, g * r + h) for g in range(kv) for h in range(r)]  # (written slot, sliced head)
        wo = f(attn.o_proj.weight)
        for slot, head in heads:
            q[slot * hd:(slot + 1) * hd] = wq[head * hd:(head + 1) * hd]
            o[:, slot * hd:(slot + 1) * hd] = wo[:, head * hd:(head + 1) * hd]
        k[:kv * hd], v[:kv * hd] = wk, wv
        if attn.qkv_proj.bias is not None:
            bq, bk, bv = f(attn.qkv_proj.bias).split([kv * r * hd, kv * hd, kv * hd])
            pq, pk, pv = torch.zeros(K * R * hd), torch.zeros(K * hd), torch.zeros(K * hd)
            for slot, head in heads:
                pq[slot * hd:(slot + 1) * hd] = bq[head * hd:(head + 1) * hd]
            pk[:kv * hd], pv[:kv * hd] = bk, bv
            biases = {"attn_q.bias": pq, "attn_k.bias": pk, "attn_v.bias": pv}
        if attn.q_norm is not None:
            scale = 1.0
            if gemma and cfg.softmax_scale is not None:  # llama.cpp scales by 1/sqrt(head_dim): fold the rest in
                scale = cfg.softmax_scale * hd ** 0.5
            out["attn_q_norm.weight"] = gain(attn.q_norm.weight) * scale
            out["attn_k_norm.weight"] = gain(attn.k_norm.weight)
    elif cfg.qk_norm:
        out["attn_q_norm.weight"] = out["attn_k_norm.weight"] = torch.ones(hd)
    if ARCHES[family][1] == "norm":
        q, k = to_interleaved(q, K * R), to_interleaved(k, K)
        if biases:
            biases["attn_q.bias"] = to_interleaved(biases["attn_q.bias"], K * R)
            biases["attn_k.bias"] = to_interleaved(biases["attn_k.bias"], K)
    norm = block.norm("attn_in")
    out["attn_norm.weight"] = gain(norm.weight) if norm is not None else ones  # before zero heads: any gain
    out.update({"attn_q.weight": q, "attn_k.weight": k, "attn_v.weight": v, "attn_output.weight": o, **biases})
    ob = getattr(block.self_attn.o_proj, "bias", None)
    if ob is not None and family in OUTPUT_BIASES:
        out["attn_output.bias"] = f(ob)
    n = cfg.intermediate_sizes[i]
    gate, up, down = torch.zeros(F, D), torch.zeros(F, D), torch.zeros(D, F)
    if n:
        mlp = block.mlp
        gate[:n], up[:n] = f(mlp.gate_up_proj.weight).split([n, n])
        down[:, :n] = f(mlp.down_proj.weight)
        if mlp.gate_up_proj.bias is not None:
            bg, bu = torch.zeros(F), torch.zeros(F)
            bg[:n], bu[:n] = f(mlp.gate_up_proj.bias).split([n, n])
            out["ffn_gate.bias"], out["ffn_up.bias"] = bg, bu
    elif cfg.mlp_bias:
        out["ffn_gate.bias"] = out["ffn_up.bias"] = torch.zeros(F)
    norm = block.norm("mlp_in")
    out["ffn_norm.weight"] = gain(norm.weight) if norm is not None else ones
    out.update({"ffn_gate.weight": gate, "ffn_up.weight": up, "ffn_down.weight": down})
    db = getattr(block.mlp.down_proj, "bias", None)
    if db is not None and family in OUTPUT_BIASES:
        out["ffn_down.bias"] = f(db)
    if gemma:
        out["post_attention_norm.weight"] = gain(block.norm("attn_out").weight)
        out["post_ffw_norm.weight"] = gain(block.norm("mlp_out").weight)
    return out


def output_norm(model) -> torch.Tensor:
    w = model.model.norm.weight.detach().to(torch.float32).cpu()
    return w + 1.0 if model.config.base_model_type == "gemma3_text" else w
