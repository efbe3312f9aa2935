"""Write a sliced subnet as one GGUF file that llama.cpp (and so Ollama and LM Studio) runs.

llama.cpp reads per-block hyper-parameter arrays: `{arch}.attention.head_count`,
`{arch}.attention.head_count_kv` and `{arch}.feed_forward_length` may hold one entry per block.
Its `deci` architecture (Llama-3.1-Nemotron-51B) builds every block from its own entries, skips
a block's attention where the head count is 0, and is otherwise the Llama graph (RMSNorm, SwiGLU,
optional o_proj / down_proj / q, k, v biases, Llama-3 rope factors). One head size serves the
whole model, so only subnets that keep *whole* heads can be written: the paper's per-dimension
subnets are refused with a line saying why. Dropped blocks are simply not written (a dropped
block is the identity).

What deci cannot express is refused rather than approximated: a skipped attention whose
compensation bias is not zero (deci ignores a skipped block's o_proj bias), a block that keeps
attention but no MLP (deci's graph then discards the attention output), sliding windows and
rope types other than default, linear and llama3.

The tokenizer and chat template are those of the base model (explorer.pick.gguf_tokenizer): copied
from the GGUF file it was read from (the embedded SmolLM2, any `.gguf` base), or converted from
its tokenizer.json (byte-level BPE: Llama 3, Qwen2, SmolLM2), with the pre-tokenizer llama.cpp
itself tokenizes like transformers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ExplorerError
from . import gguf_families as families
from .gguf_families import to_interleaved
from .gguf_tokenizer import GGUFTokenizer, TokenizerError, bpe_keys

ARCH = "deci"  # the plain block (Llama, Mistral, Qwen2), sized per block; other families: gguf_families
OUT_TYPES = ("f16", "f32", "q8_0")


class GGUFExportError(ExplorerError):
    """The subnet or its base cannot be written as a GGUF llama.cpp runs."""


@dataclass(frozen=True)
class BlockPlan:
    """What one written block holds, in llama.cpp's terms."""

    layer: int  # index among the sliced model's blocks
    n_head: int
    n_head_kv: int
    n_ff: int


def source_gguf(lm) -> Path | None:
    """The GGUF file a base model was dequantised from (its cache folder records it), else None."""
    record = Path(lm.path) / "complete.json"
    if not record.is_file():
        return None
    source = Path(json.loads(record.read_text()).get("source", ""))
    return source if source.is_file() else None


def base_tokenizer(lm) -> GGUFTokenizer:
    """The base model's tokenizer as GGUF keys: its own GGUF's, else converted from tokenizer.json."""
    source = source_gguf(lm)
    try:
        if source is not None:
            return GGUFTokenizer.from_gguf(source)
        return GGUFTokenizer.from_transformers(lm.tokenizer, int(lm.model.config.vocab_size))
    except TokenizerError as e:
        raise GGUFExportError(str(e)) from None


def precheck(lm, subnet) -> str | None:
    """The reasons to refuse that need no sliced model (so the CLI fails before a reformation)."""
    if not subnet.head_granular(lm.shape):
        return PER_DIMENSION
    if source_gguf(lm) is None:
        try:
            bpe_keys(lm.tokenizer, int(lm.model.config.vocab_size))
        except TokenizerError as e:
            return str(e)
    return None


PER_DIMENSION = ("this subnet narrows heads to fewer dimensions; llama.cpp has one head size per model, so only "
                 "head-granular subnets (whole heads, as FLAP's baselines keep them) can be written as GGUF")


def refusal(model) -> str | None:
    """One line saying why this sliced model cannot become a GGUF llama.cpp runs, or None."""
    cfg = model.config
    full = cfg.base_head_dim // 2
    for i, pairs in enumerate(cfg.attn_pairs):
        if pairs and any(len(g) != full for g in pairs):
            return f"block {cfg.layer_ids[i]}: {PER_DIMENSION}"
    if cfg.base_model_type in families.ARCHES:
        return families.refusal(model)
    if any(w is not None for w in cfg.sliding_windows):
        return "the base model uses sliding-window attention, which llama.cpp's deci architecture does not have"
    rope = cfg.base_rope_parameters.get("rope_type", "default")
    if rope not in ("default", "linear", "llama3"):
        return f"rope type {rope!r} is not written to GGUF yet (default, linear and llama3 are)"
    for i, block in enumerate(model.model.layers):
        attn, mlp = bool(cfg.attn_pairs[i]), cfg.intermediate_sizes[i] > 0
        if not attn and _bias(block.self_attn, "o_proj") is not None:
            return (f"block {cfg.layer_ids[i]} skips attention but keeps an o_proj bias (bias compensation), "
                    "which llama.cpp ignores for a skipped attention")
        if attn and not mlp:
            return (f"block {cfg.layer_ids[i]} keeps attention but no MLP; llama.cpp's deci graph drops the "
                    "attention output of such a block")
    return None


def block_plans(model) -> list[BlockPlan]:
    """The blocks to write: every sliced block except those that keep nothing (identity)."""
    cfg = model.config
    plans = []
    for i, pairs in enumerate(cfg.attn_pairs):
        n_kv = len(pairs)
        n_ff = cfg.intermediate_sizes[i]
        if n_kv == 0 and n_ff == 0 and not _has_output_bias(model.model.layers[i]):
            continue
        plans.append(BlockPlan(i, n_kv * cfg.heads_per_group[i], n_kv, n_ff))
    return plans


def _bias(sublayer, name: str) -> torch.Tensor | None:
    proj = getattr(sublayer, name, None)
    b = getattr(proj, "bias", None)
    return None if b is None or not torch.any(b != 0) else b


def _has_output_bias(block) -> bool:
    return _bias(block.self_attn, "o_proj") is not None or _bias(block.mlp, "down_proj") is not None


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama-3's per-frequency divisors, as llama.cpp's `rope_freqs` tensor holds them."""
    base = rope.get("rope_theta", 10000.0)
    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for k in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (k / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _tensor_writer(w, out_type: str):
    """put(name, tensor): norms and biases in f32 (as llama.cpp's converter keeps them), matrices in
    `out_type`; returns (put, the names q8_0 could not block and kept in f16)."""
    import gguf

    kept_f16: list[str] = []

    def put(tensor_name: str, t: torch.Tensor) -> None:
        a = t.detach().to(torch.float32).cpu().numpy()
        if a.ndim == 1 or out_type == "f32":
            w.add_tensor(tensor_name, a)
        elif out_type == "f16":
            w.add_tensor(tensor_name, a.astype(np.float16))
        elif a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(tensor_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # a row length q8_0 cannot block: this tensor stays f16 (reported)
            kept_f16.append(tensor_name)
            w.add_tensor(tensor_name, a.astype(np.float16))

    return put, kept_f16


FILE_TYPES = {"f16": "MOSTLY_F16", "f32": "ALL_F32", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(path: str | Path, model, tokenizer: GGUFTokenizer, name: str, out_type: str = "f16") -> dict:
    """Write `model` (a sliced SubnetForCausalLM) with the base's `tokenizer` to `path`; returns what
    was written."""
    import gguf

    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"unknown GGUF type {out_type!r}; choose from {', '.join(OUT_TYPES)}")
    why = refusal(model)
    if why:
        raise GGUFExportError(why)
    if model.config.base_model_type in families.ARCHES:
        return _write_family(path, model, tokenizer, name, out_type)
    cfg = model.config
    plans = block_plans(model)
    if not plans:
        raise GGUFExportError("the subnet keeps no block")
    hd = cfg.base_head_dim
    rope = cfg.base_rope_parameters
    w = gguf.GGUFWriter(str(path), arch=ARCH)
    w.add_name(name)
    w.add_type("model")
    w.add_block_count(len(plans))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length([p.n_ff for p in plans])
    w.add_head_count([p.n_head for p in plans])
    w.add_head_count_kv([p.n_head_kv for p in plans])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[out_type]))
    copied = tokenizer.write(w)
    put, kept_f16 = _tensor_writer(w, out_type)

    m = model.model
    put("token_embd.weight", m.embed_tokens.weight)
    put("output_norm.weight", m.norm.weight)
    if not cfg.tie_word_embeddings:
        put("output.weight", model.lm_head.weight)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, hd))
    for b, plan in enumerate(plans):
        block = m.layers[plan.layer]
        pre = f"blk.{b}"
        if plan.n_head:
            attn = block.self_attn
            put(f"{pre}.attn_norm.weight", block.input_layernorm.weight)
            q_rows, kv_rows = plan.n_head * hd, plan.n_head_kv * hd
            wq, wk, wv = attn.qkv_proj.weight.split([q_rows, kv_rows, kv_rows])
            put(f"{pre}.attn_q.weight", to_interleaved(wq, plan.n_head))
            put(f"{pre}.attn_k.weight", to_interleaved(wk, plan.n_head_kv))
            put(f"{pre}.attn_v.weight", wv)
            if attn.qkv_proj.bias is not None:
                bq, bk, bv = attn.qkv_proj.bias.split([q_rows, kv_rows, kv_rows])
                put(f"{pre}.attn_q.bias", to_interleaved(bq, plan.n_head))
                put(f"{pre}.attn_k.bias", to_interleaved(bk, plan.n_head_kv))
                put(f"{pre}.attn_v.bias", bv)
            put(f"{pre}.attn_output.weight", attn.o_proj.weight)
            if attn.o_proj.bias is not None:
                put(f"{pre}.attn_output.bias", attn.o_proj.bias)
        if plan.n_ff:
            mlp = block.mlp
            gate, up = mlp.gate_up_proj.weight.split([plan.n_ff, plan.n_ff])
            put(f"{pre}.ffn_norm.weight", block.post_attention_layernorm.weight)
            put(f"{pre}.ffn_gate.weight", gate)
            put(f"{pre}.ffn_up.weight", up)
            put(f"{pre}.ffn_down.weight", mlp.down_proj.weight)
            if mlp.gate_up_proj.bias is not None:
                bg, bu = mlp.gate_up_proj.bias.split([plan.n_ff, plan.n_ff])
                put(f"{pre}.ffn_gate.bias", bg)
                put(f"{pre}.ffn_up.bias", bu)
            if mlp.down_proj.bias is not None:
                put(f"{pre}.ffn_down.bias", mlp.down_proj.bias)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": Path(path).name, "architecture": ARCH, "type": out_type, "blocks": len(plans),
            "head_count": [p.n_head for p in plans], "head_count_kv": [p.n_head_kv for p in plans],
            "feed_forward_length": [p.n_ff for p in plans], "tokenizer_from": tokenizer.source,
            "tokenizer_keys": copied, "tensors_kept_f16": kept_f16, "bytes": Path(path).stat().st_size}


def _write_family(path: str | Path, model, tokenizer: GGUFTokenizer, name: str, out_type: str) -> dict:
    """A qwen3, smollm3, granite or gemma3 GGUF: every written block at the widest kept size
    (explorer.pick.gguf_families says why)."""
    import gguf

    cfg = model.config
    arch = families.ARCHES[cfg.base_model_type][0]
    blocks = families.written_blocks(model)
    size = families.one_size(model, blocks)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(name)
    w.add_type("model")
    families.write_keys(w, model, blocks, size)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[out_type]))
    copied = tokenizer.write(w)
    put, kept_f16 = _tensor_writer(w, out_type)
    put("token_embd.weight", model.model.embed_tokens.weight)
    put("output_norm.weight", families.output_norm(model))
    if not cfg.tie_word_embeddings:
        put("output.weight", model.lm_head.weight)
    for b, i in enumerate(blocks):
        for tensor_name, t in families.block_tensors(model, i, size).items():
            put(f"blk.{b}.{tensor_name}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    kept = [(len(cfg.attn_pairs[i]) * cfg.heads_per_group[i], len(cfg.attn_pairs[i]), cfg.intermediate_sizes[i])
            for i in blocks]
    return {"file": Path(path).name, "architecture": arch, "type": out_type, "blocks": len(blocks),
            "head_count": [k[0] for k in kept], "head_count_kv": [k[1] for k in kept],
            "feed_forward_length": [k[2] for k in kept],
            "written_at": {"head_count": size.n_head, "head_count_kv": size.n_kv, "feed_forward_length": size.n_ff},
            "padded": any(k != (size.n_head, size.n_kv, size.n_ff) for k in kept), "tokenizer_from": tokenizer.source,
            "tokenizer_keys": copied, "tensors_kept_f16": kept_f16, "bytes": Path(path).stat().st_size}


def modelfile(gguf_name: str, chat_template: str | None) -> str:
    """An Ollama Modelfile beside the GGUF. Ollama does not run Jinja templates, so a ChatML template
    (SmolLM2, Qwen2) is restated in its own syntax; any other template is left to Ollama's detection."""
    lines = ["# ollama create subnet -f Modelfile && ollama run subnet", f"FROM ./{gguf_name}",
             "PARAMETER temperature 0"]
    if chat_template and "<|im_start|>" in chat_template:
        lines += ['TEMPLATE """{{ if .System }}<|im_start|>system',
                  '{{ .System }}<|im_end|>', '{{ end }}{{ if .Prompt }}<|im_start|>user',
                  '{{ .Prompt }}<|im_end|>', '{{ end }}<|im_start|>assistant', '{{ .Response }}<|im_end|>', '"""',
                  'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    return "\n".join(lines) + "\n"


# ---- the whole step ------------------------------------------------------------------------------
GGUF_FILE = "model.gguf"


def check_gguf_target(out_dir: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier GGUF export."""
    if not out_dir.exists():
        return
    record = out_dir / "export.json"
    earlier = record.is_file() and (out_dir / GGUF_FILE).is_file()
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not earlier):
        raise GGUFExportError(f"{out_dir} exists and is not an earlier GGUF export; choose another --out")


def gguf_card(name: str, base: str, info: dict, metrics: dict, check: dict | None) -> str:
    ppl = metrics.get("heldout_ppl")
    arch = info.get("architecture", ARCH)
    how = ("per-block head counts and MLP widths" if arch == ARCH else
           "every block at one size" + (f", {info['written_at']}: narrower blocks padded with zero heads and "
                                         "channels (the same function), because llama.cpp builds this architecture's "
                                         "blocks at one size" if info.get("padded") else ""))
    lines = [f"# {name}", "", f"A subnet of {base} carved by Subnet Explorer, as one GGUF file for llama.cpp "
             f"(architecture `{arch}`: {how}).", "",
             f"- blocks: {info['blocks']}, weights {info['type']}, {info['bytes'] / 1e6:.1f} MB",
             f"- query heads per block: {info['head_count']}", f"- KV heads per block: {info['head_count_kv']}",
             f"- MLP width per block: {info['feed_forward_length']}"]
    if ppl is not None:
        lines.append(f"- held-out perplexity (transformers, before GGUF): {ppl:.2f}")
    if check:
        lines += ["", f"Verified in llama.cpp: max logit difference {check['max_logit_diff']:.3g} "
                  f"(allowed {check['allowed_diff']:.3g}), {len(check['greedy_ours'])} greedy tokens "
                  f"{greedy_words(check)}, llama.cpp decodes "
                  f"{check['decode_tokens_per_s']:.1f} tokens/s on {check['threads']} threads."]
    lines += ["", "## Run it", "", "```", f"llama-cli -m {GGUF_FILE} -p \"The capital of France is\" -n 32",
              "ollama create subnet -f Modelfile && ollama run subnet", "```", ""]
    return "\n".join(lines)


def greedy_words(check: dict) -> str:
    """What the greedy comparison found, in words."""
    if check["same_tokens"]:
        return "the same"
    if check.get("near_tie"):
        return (f"the same up to step {check['first_difference']}, where our model's top two tokens are within the "
                "logit tolerance (a near-tie the rounding decides)")
    return "DIFFERENT"


def export_gguf(lm, model, record, out_dir: str | Path, metrics: dict, provenance: dict, *, out_type: str = "f16",
                verify: bool = True, make_zip: bool = True, on_event=None, cancel=None):
    """Write `model.gguf`, a Modelfile, a card and `export.json` into `out_dir`, verified in llama.cpp.

    Atomic like the transformers export: written and checked in a temporary sibling folder first.
    Raises GGUFExportError (one line) when the subnet cannot be a GGUF, LlamaCppError when
    llama.cpp is missing or disagrees."""
    import shutil
    import tempfile
    import time

    from ..events import Progress, check_cancel, no_event
    from .export import PROMPT_TEXT, ExportResult, _install, base_model_id, zip_folder
    from .llamacpp import LlamaCppError, check

    on_event = on_event or no_event
    t0 = time.perf_counter()
    from ..model.subnet import Subnet
    from .pickfile import PickFile

    if isinstance(record, Subnet):  # a bare subnet: its file records no compensation or reformation
        record = PickFile.of(lm, record)
    subnet = record.subnet  # the pick's subnet file (explorer.pick.pickfile), written beside the GGUF
    why = refusal(model)  # before anything is written or converted
    if why:
        raise GGUFExportError(why)
    tokenizer = base_tokenizer(lm)
    out = Path(out_dir).expanduser().resolve()
    check_gguf_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name.replace('.', '_')}_partial_", dir=out.parent))
    try:
        on_event(Progress("export", 0, 3, f"writing {GGUF_FILE} ({out_type})"))
        info = write_gguf(tmp / GGUF_FILE, model, tokenizer, out.name, out_type)
        check_cancel(cancel)
        result = None
        if verify:
            on_event(Progress("export", 1, 3, "running it in llama.cpp"))
            result = check(tmp / GGUF_FILE, model, lm.tokenizer, PROMPT_TEXT, out_type).to_dict()
            if not result["passed"]:
                raise LlamaCppError(
                    f"llama.cpp disagrees with our model (max logit difference {result['max_logit_diff']:.3g}, "
                    f"allowed {result['allowed_diff']:.3g}; same tokenization {result['same_tokenization']}, "
                    f"same greedy tokens {result['same_tokens']})")
        check_cancel(cancel)
        on_event(Progress("export", 2, 3, "model card"))
        template = getattr(lm.tokenizer, "chat_template", None)
        (tmp / "Modelfile").write_text(modelfile(GGUF_FILE, template if isinstance(template, str) else None))
        record.write(tmp / "subnet.json")
        (tmp / "export.json").write_text(json.dumps(
            {"format": "gguf", "gguf": info, "metrics": metrics, "provenance": provenance,
             "verification": {"verified": result is not None, "llama_cpp": result},
             "subnet": subnet.summary(lm.shape), "base_model": lm.source, "license": lm.license}, indent=2, default=str))
        (tmp / "README.md").write_text(gguf_card(out.name, base_model_id(lm), info, metrics, result))
        files = tuple(sorted(p.name for p in tmp.iterdir()))
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path = str(zip_folder(out)) if make_zip else None
    on_event(Progress("export", 3, 3, "done"))
    return ExportResult(str(out), zip_path, result is not None, None if result is None else result["max_logit_diff"],
                        None if result is None else result["same_tokens"],
                        "" if result is None else result["llamacpp_text"], files, time.perf_counter() - t0)
