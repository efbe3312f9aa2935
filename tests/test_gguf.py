"""GGUF export, checked by llama.cpp itself (llama-cpp-python, built by `make llamacpp`).

The references are independent of the writer: at full width the base model's own transformers
class, narrowed the base model with the omitted heads and channels zeroed (plus the compensation
biases); llama.cpp computes the other side with its own graph, tokenizer and kernels."""
from __future__ import annotations

import json

import llama_cpp  # noqa: F401  - the check needs llama.cpp: a missing build fails here, never skips
import pytest
import torch

from explorer.model.loading import embedded_gguf
from explorer.model.reference import zeroed_reference
from explorer.model.slicing import slice_model
from explorer.model.subnet import LayerChoice, ModelShape, Subnet
from explorer.pick.export_gguf import GGUFExportError, refusal, write_gguf
from explorer.pick.gguf_tokenizer import GGUFTokenizer, TokenizerError, bpe_keys
from explorer.pick.llamacpp import TOLERANCE, check, tolerance

PROMPT = "The river runs through the old town, past"
TOKENIZER = GGUFTokenizer.from_gguf(embedded_gguf())  # llama.cpp's converter wrote these keys


def whole_heads(shape: ModelShape, layers: list) -> Subnet:
    """Per layer None or (kept KV groups, kept heads per group, kept MLP channels), full head dim."""
    out = []
    for spec in layers:
        if spec is None:
            out.append(None)
            continue
        groups, heads, channels = spec
        pairs = tuple(tuple(range(shape.n_pairs)) for _ in groups)
        out.append(LayerChoice(pairs, tuple(channels), tuple(groups), tuple(tuple(heads) for _ in groups)))
    return Subnet(tuple(out)).validate(shape)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from explorer.model.loading import ensure_embedded_cache

    return AutoTokenizer.from_pretrained(str(ensure_embedded_cache()))


def tiny(name: str):
    from tiny_models import tiny_model

    model = tiny_model(name, vocab=49152)
    model.config.max_position_embeddings = 256  # room for the prompt and 16 tokens in llama.cpp
    return model, ModelShape.from_config(model.config)


@pytest.mark.parametrize("arch", ["llama-default", "llama-bias", "llama-tied", "llama-llama3", "llama-linear",
                                  "qwen2"])
def test_full_width_gguf_in_llamacpp_equals_the_transformers_model(arch, tokenizer, tmp_path):
    base, shape = tiny(arch)
    sliced = slice_model(base, Subnet.full(shape), shape)
    write_gguf(tmp_path / "m.gguf", sliced, TOKENIZER, arch, "f32")
    res = check(tmp_path / "m.gguf", base, tokenizer, PROMPT, "f32")
    assert res.same_tokenization
    assert res.max_logit_diff <= TOLERANCE["f32"] * res.logit_std, res.to_dict()
    assert res.same_tokens, res.to_dict()


def test_a_narrowed_whole_head_subnet_equals_the_zeroed_base_in_llamacpp(tokenizer, tmp_path):
    """Fewer KV groups, fewer heads per group, a dropped block, narrower MLPs, compensation biases."""
    from test_slicing import random_means

    base, shape = tiny("llama-bias")
    sub = whole_heads(shape, [((1,), (0, 2, 3), range(0, 96, 2)), None, ((0, 1), (1,), range(40)),
                              ((0,), (0, 1, 2, 3), range(96))])
    means = random_means(shape)
    sliced = slice_model(base, sub, shape, means)
    write_gguf(tmp_path / "m.gguf", sliced, TOKENIZER, "narrow", "f32")
    ref = zeroed_reference(base, sub, shape, means)
    res = check(tmp_path / "m.gguf", ref, tokenizer, PROMPT, "f32")
    assert res.max_logit_diff <= TOLERANCE["f32"] * res.logit_std, res.to_dict()
    assert res.same_tokens
    # the check can fail: a GGUF written from the wrong weights disagrees with the reference
    other = slice_model(base, whole_heads(shape, [((0,), (0, 2, 3), range(0, 96, 2)), None, ((0, 1), (1,), range(40)),
                                                  ((0,), (0, 1, 2, 3), range(96))]), shape, means)
    write_gguf(tmp_path / "wrong.gguf", other, TOKENIZER, "wrong", "f32")
    assert check(tmp_path / "wrong.gguf", ref, tokenizer, PROMPT, "f32").max_logit_diff > 0.05 * res.logit_std


def test_what_llamacpp_cannot_run_is_refused_with_a_reason(tmp_path):
    base, shape = tiny("llama-default")
    narrow_dims = Subnet.build([([range(4)] * 2, range(96))] * 4)  # 8 of 16 dims per head
    assert "one head size" in refusal(slice_model(base, narrow_dims, shape))
    no_mlp = whole_heads(shape, [((0, 1), range(4), ()), ((0, 1), range(4), range(96)), None, None])
    assert "no MLP" in refusal(slice_model(base, no_mlp, shape))
    window, wshape = tiny("mistral-window")
    assert "sliding-window" in refusal(slice_model(window, Subnet.full(wshape), wshape))
    with pytest.raises(GGUFExportError, match="one head size"):
        write_gguf(tmp_path / "x.gguf", slice_model(base, narrow_dims, shape), TOKENIZER, "x")
    assert not (tmp_path / "x.gguf").exists()


def test_a_tokenizer_json_converts_to_what_llamacpps_own_converter_wrote(tokenizer, tmp_path):
    """The embedded model's tokenizer.json, converted, holds the keys llama.cpp's convert_hf_to_gguf
    wrote into SmolLM2's GGUF (vocabulary, token types, merges, special ids, chat template); the
    pre-tokenizer is the one llama.cpp tokenizes the probe with as transformers does, and the probe
    tells pre-tokenizers apart (under Llama 3's, llama.cpp splits it otherwise)."""
    from explorer.pick.gguf_tokenizer import PROBE, _llamacpp_ids, _string

    ours = GGUFTokenizer.from_transformers(tokenizer, 49152)
    for key, (value, vtype, _) in TOKENIZER.keys.items():
        assert ours.keys[key][:2] == (value, vtype), key
    assert "'smollm'" in ours.source
    wrong = {**ours.keys, "tokenizer.ggml.pre": _string("llama-bpe")}
    assert _llamacpp_ids(tmp_path / "w.gguf", wrong, 49152) != tokenizer(PROBE, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_llamacpp_cannot_read_alike_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TokenizerError, match="byte-level BPE"):
        bpe_keys(PreTrainedTokenizerFast(tokenizer_object=words), 2)


@pytest.mark.slow
def test_a_base_from_a_transformers_folder_exports_a_gguf_llamacpp_runs(tokenizer, tmp_path):
    """A Llama model read from a folder (config, safetensors, tokenizer.json; no GGUF anywhere):
    the CLI converts its tokenizer and the narrowed subnet's GGUF agrees with our model in llama.cpp."""
    from explorer.app.cli import main

    base, shape = tiny("llama-bias")
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    sub = whole_heads(shape, [((1,), (0, 2, 3), range(0, 96, 2)), ((0, 1), (1,), range(40)), None,
                              ((0,), (0, 1, 2, 3), range(96))])
    (tmp_path / "sub.json").write_text(sub.to_json())
    assert main(["export", "--model", str(tmp_path / "base"), "--subnet", str(tmp_path / "sub.json"), "--format",
                 "gguf", "--out", str(tmp_path / "out"), "--heldout-windows", "0", "--no-zip"]) == 0
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert record["verification"]["llama_cpp"]["passed"] and record["verification"]["llama_cpp"]["same_tokenization"]
    assert record["gguf"]["tokenizer_from"].startswith("converted from tokenizer.json")


@pytest.mark.slow
def test_cli_exports_the_embedded_model_and_a_whole_head_subnet_that_llamacpp_runs(embedded, tmp_path):
    """Dense first (the path proven at full width), then a ~70 % whole-head subnet, both f16 through
    `python -m explorer export --format gguf`; a per-dimension subnet is refused in one line."""
    from explorer.app.cli import main

    shape = embedded.shape
    full = Subnet.full(shape)
    (tmp_path / "full.json").write_text(full.to_json())
    assert main(["export", "--subnet", str(tmp_path / "full.json"), "--format", "gguf", "--out",
                 str(tmp_path / "dense"), "--heldout-windows", "0", "--no-zip"]) == 0
    record = json.loads((tmp_path / "dense" / "export.json").read_text())
    assert record["verification"]["llama_cpp"]["passed"] and record["gguf"]["head_count"] == [9] * 30
    assert (tmp_path / "dense" / "Modelfile").read_text().startswith("# ollama create")

    sub = whole_heads(shape, [((0, 2), (0, 1, 2), range(0, 1536, 2)) if i % 3 else ((1,), (0, 2), range(1024))
                              for i in range(shape.num_layers)])
    assert 0.6 < sub.fraction(shape) < 0.8
    (tmp_path / "sub.json").write_text(sub.to_json())
    assert main(["export", "--subnet", str(tmp_path / "sub.json"), "--format", "gguf", "--out",
                 str(tmp_path / "sub"), "--heldout-windows", "0"]) == 0
    record = json.loads((tmp_path / "sub" / "export.json").read_text())
    cpp = record["verification"]["llama_cpp"]
    assert cpp["passed"] and cpp["same_tokens"] and record["gguf"]["head_count"][0] == 2
    assert (tmp_path / "sub.zip").is_file()

    dims = Subnet.build([([range(16)] * 3, range(1536))] * shape.num_layers)
    (tmp_path / "dims.json").write_text(dims.to_json())
    assert main(["export", "--subnet", str(tmp_path / "dims.json"), "--format", "gguf", "--out",
                 str(tmp_path / "dims"), "--heldout-windows", "0"]) == 2
    assert not (tmp_path / "dims").exists()


def test_greedy_tokens_may_part_only_at_a_near_tie():
    """f16 rounding may decide a near-tie either way: the decodes may part where our model's top two
    logits lie within the logit tolerance, and nowhere else."""
    from explorer.pick.llamacpp import where_greedy_parts

    logits = [torch.tensor([0.0, 5.0, 1.0]), torch.tensor([2.0, 0.0, 1.99])]
    assert where_greedy_parts([1, 0], [1, 0], logits, 0.05) == (None, False)
    assert where_greedy_parts([1, 0], [1, 2], logits, 0.05) == (1, True)  # 2.0 against 1.99
    assert where_greedy_parts([1, 0], [2, 0], logits, 0.05) == (0, False)  # 5.0 against 1.0: a real difference


FAMILIES = ["qwen3", "smollm3-nope4", "granite", "gemma3"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_full_width_in_its_own_llamacpp_architecture(arch, tokenizer, tmp_path):
    """qwen3 (q/k norms), smollm3 (no rotation in block 3), granite (four multipliers, biases), gemma3
    (sandwich norms, (1 + w) gains, sliding window 16 with its own rope base, a linear-scaled rope on
    the full layers, query_pre_attn_scalar != head_dim, soft-capped logits, tied embeddings)."""
    base, shape = tiny(arch)
    sliced = slice_model(base, Subnet.full(shape), shape)
    info = write_gguf(tmp_path / "m.gguf", sliced, TOKENIZER, arch, "f32")
    assert info["architecture"] == {"smollm3-nope4": "smollm3"}.get(arch, arch) and not info["padded"]
    res = check(tmp_path / "m.gguf", base, tokenizer, PROMPT * 2, "f32")  # past gemma3's 16-token window
    assert res.prompt_tokens > 16 and res.same_tokenization
    assert res.max_logit_diff <= tolerance(base, "f32") * res.logit_std, res.to_dict()
    assert res.same_tokens, res.to_dict()


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_narrowed_subnet_is_padded_to_one_size_and_equals_the_zeroed_base(arch, tokenizer, tmp_path):
    """Blocks of different widths (fewer KV groups, fewer heads per group, narrower MLPs, a block
    without attention, the last dropped) written at the widest kept size with zero heads and
    channels: llama.cpp computes the zeroed base model (granite with compensation biases too)."""
    from test_slicing import random_means

    base, shape = tiny(arch)
    sub = whole_heads(shape, [((1,), (0, 2, 3), range(0, 96, 2)), ((0, 1), (1,), range(40)), ((), (), range(96)),
                              None])
    means = random_means(shape) if arch == "granite" else None
    sliced = slice_model(base, sub, shape, means)
    info = write_gguf(tmp_path / "m.gguf", sliced, TOKENIZER, "narrow", "f32")
    assert info["padded"] and info["written_at"] == {"head_count": 6, "head_count_kv": 2, "feed_forward_length": 96}
    assert info["head_count"] == [3, 2, 0] and info["feed_forward_length"] == [48, 40, 96]
    ref = zeroed_reference(base, sub, shape, means)
    res = check(tmp_path / "m.gguf", ref, tokenizer, PROMPT * 2, "f32")
    assert res.max_logit_diff <= tolerance(base, "f32") * res.logit_std, res.to_dict()
    assert res.same_tokens, res.to_dict()


def test_what_a_familys_architecture_cannot_hold_is_refused_in_one_line():
    from test_slicing import random_means

    base, shape = tiny("gemma3")
    narrow = whole_heads(shape, [((0, 1), range(4), range(0, 96, 2))] * 4)
    why = refusal(slice_model(base, narrow, shape, random_means(shape)))  # compensation biases
    assert "output-projection bias" in why and "gemma3" in why and "\n" not in why
    base, shape = tiny("smollm3-nope4")
    dropped = whole_heads(shape, [((0, 1), range(4), range(96)), None, ((0, 1), range(4), range(96)),
                                  ((0, 1), range(4), range(96))])
    assert "every fourth block" in refusal(slice_model(base, dropped, shape))
    base, shape = tiny("qwen3-bias-window")
    assert "sliding-window" in refusal(slice_model(base, Subnet.full(shape), shape))
    base, shape = tiny("granite-llama3")
    assert "rope type 'llama3'" in refusal(slice_model(base, Subnet.full(shape), shape))
