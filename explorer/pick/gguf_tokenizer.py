"""The base model's tokenizer as GGUF `tokenizer.*` keys: copied from the base's own GGUF file, or
converted from a transformers tokenizer (tokenizer.json).

A base read from a GGUF (the embedded SmolLM2) carries llama.cpp's tokenizer keys, which are copied
as they are. A base read from a transformers folder is converted: llama.cpp's byte-level BPE
tokenizer (`tokenizer.ggml.model = "gpt2"`, the one of Llama 3, Qwen2 and SmolLM2) needs the
vocabulary in id order, the merges, each token's type, the special ids, and the *name* of the
pre-tokenizer (the regex that splits text before BPE), which llama.cpp keeps in a table of its
own and tokenizer.json does not name. The name is found by asking llama.cpp: for each
pre-tokenizer it knows that a Llama-family model uses, a vocabulary-only GGUF is loaded and a probe
text (words, contractions, digit runs, whitespace runs, code, accents, CJK, emoji) is tokenized; the
first name under which llama.cpp's ids equal the transformers tokenizer's on the whole probe is
taken. No name agreeing is a refusal, never a guess. SentencePiece-style tokenizers (Llama 2,
Mistral 7B: `tokenizer.ggml.model = "llama"`, scored pieces) are refused for now.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExplorerError

# llama.cpp's pre-tokenizer names tried, in order (those of the Llama-family tokenizers we load)
PRE_TOKENIZERS = ("smollm", "llama-bpe", "qwen2", "tekken", "gpt-2", "default")
PROBE = ("Hello world! I'm sure we'll, they've; don't 'quoted'. 3333333 12 123 1234567.89\n\n"
         "   leading spaces\t\ttabs\r\nline\n\n\n  def f(x):\n\treturn x**2  # é à ü ß Ñ\n"
         "中文字符 日本語 한국어 🚀🦙 ... --- ___ ===  $100 50% e.g. U.S.A.")
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4
KEY_NAMES = {"bos": "bos_token", "eos": "eos_token", "unk": "unknown_token", "pad": "padding_token"}


class TokenizerError(ExplorerError):
    """The base's tokenizer cannot be written as GGUF keys llama.cpp reads the same way."""


@dataclass
class GGUFTokenizer:
    """`tokenizer.*` keys ready to write: key -> (value, GGUF value type, array item type or None)."""

    keys: dict = field(default_factory=dict)
    source: str = ""  # where the keys came from, for the export record

    @classmethod
    def from_gguf(cls, path: str | Path) -> "GGUFTokenizer":
        import gguf

        reader = gguf.GGUFReader(str(path))
        keys = {}
        for key, f in reader.fields.items():
            if key.startswith("tokenizer."):
                vtype = f.types[0]
                keys[key] = (f.contents(), vtype, f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
        if not keys:
            raise TokenizerError(f"{Path(path).name} holds no tokenizer")
        return cls(keys, f"copied from {Path(path).name}")

    @classmethod
    def from_transformers(cls, tokenizer, vocab_size: int) -> "GGUFTokenizer":
        """Convert a fast transformers tokenizer (byte-level BPE); the pre-tokenizer name is the first
        under which llama.cpp tokenizes the probe exactly as `tokenizer` does."""
        keys = bpe_keys(tokenizer, vocab_size)
        want = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        with tempfile.TemporaryDirectory() as tmp:
            for name in PRE_TOKENIZERS:
                trial = {**keys, "tokenizer.ggml.pre": _string(name)}
                if _llamacpp_ids(Path(tmp) / f"{name}.gguf", trial, vocab_size) == want:
                    return cls(trial, f"converted from tokenizer.json (pre-tokenizer {name!r}, the one under which "
                                      "llama.cpp tokenizes the probe text as transformers does)")
        raise TokenizerError("no pre-tokenizer llama.cpp knows splits text as this tokenizer does (tried "
                             f"{', '.join(PRE_TOKENIZERS)}); convert the base with llama.cpp's convert_hf_to_gguf.py "
                             "and load that .gguf")

    def write(self, writer) -> int:
        for key, (value, vtype, sub) in self.keys.items():
            writer.add_key_value(key, value, vtype, sub)
        return len(self.keys)


def _string(value: str) -> tuple:
    import gguf

    return value, gguf.GGUFValueType.STRING, None


def bpe_keys(tokenizer, vocab_size: int) -> dict:
    """Every `tokenizer.*` key but the pre-tokenizer's name, from tokenizer.json."""
    import gguf

    T = gguf.GGUFValueType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError("this base's tokenizer has no tokenizer.json (a slow tokenizer); GGUF export needs one")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) and not model.get("byte_fallback")
    if model.get("type") != "BPE" or not byte_level:
        raise TokenizerError("GGUF export converts byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2); this base's "
                             f"is {model.get('type')!r}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}"
                             ": convert it with llama.cpp's convert_hf_to_gguf.py and load that .gguf")
    vocab = dict(model["vocab"])
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab.update({a["content"]: i for i, a in added.items()})
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise TokenizerError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):  # llama.cpp needs one token per embedding row; holes are unused pads
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL if i not in added else CONTROL if added[i]["special"] else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    keys = {"tokenizer.ggml.model": ("gpt2", T.STRING, None),
            "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
            "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
            "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING),
            "tokenizer.ggml.add_space_prefix": (False, T.BOOL, None)}
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            keys[f"tokenizer.ggml.{KEY_NAMES[name]}_id"] = (int(tid), T.UINT32, None)
    # whether the tokenizer adds BOS / EOS, read from what it does (its post-processor), not from flags
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    keys["tokenizer.ggml.add_bos_token"] = (bos is not None and full[:1] == [bos] and plain[:1] != [bos], T.BOOL, None)
    keys["tokenizer.ggml.add_eos_token"] = (eos is not None and full[-1:] == [eos] and plain[-1:] != [eos], T.BOOL, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        keys["tokenizer.chat_template"] = (template, T.STRING, None)
    return keys


def _llamacpp_ids(path: Path, keys: dict, vocab_size: int) -> list[int] | None:
    """llama.cpp's ids for the probe under `keys`, from a vocabulary-only GGUF (None: refused)."""
    import gguf

    from .llamacpp import INSTALL_HINT, LlamaCppError

    w = gguf.GGUFWriter(str(path), arch="llama")
    for k, v in (("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", 8),
                 ("add_feed_forward_length", 8), ("add_head_count", 1), ("add_layer_norm_rms_eps", 1e-5),
                 ("add_vocab_size", vocab_size)):
        getattr(w, k)(v)
    GGUFTokenizer(keys).write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LlamaCppError(INSTALL_HINT) from None
    try:
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except Exception:  # noqa: BLE001 - llama.cpp refuses an unknown pre-tokenizer name at load
        return None
    try:
        return list(llm.tokenize(PROBE.encode("utf-8"), add_bos=False, special=False))
    finally:
        llm.close()
