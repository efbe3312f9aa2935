"""Exactness of the one sliced model against the base model and an independent reference."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_llama
from explorer.slicing import slice_model
from explorer.subnet import ModelShape, Subnet, SubnetError


def random_subnet(shape: ModelShape, seed: int, drop: tuple[int, ...] = ()) -> Subnet:
    rng = random.Random(seed)
    layers = []
    for i in range(shape.num_layers):
        if i in drop:
            layers.append(None)
            continue
        n = rng.randint(1, shape.n_pairs)
        pairs = [rng.sample(range(shape.n_pairs), n) for _ in range(shape.num_kv_heads)]
        channels = rng.sample(range(shape.intermediate_size), rng.randint(1, shape.intermediate_size))
        layers.append((pairs, channels))
    return Subnet.build(layers)


def zeroed_reference(base, subnet: Subnet, shape: ModelShape):
    """The base model with the omitted rows/columns zeroed, written without explorer.slicing.

    Zeroing the q/k rows of a dropped rotary pair removes its score contribution (both halves
    of the pair are zero, so rotation keeps them zero); zeroing v rows and o columns removes its
    output. Dropped layers are replaced by identity. The softmax scale is unchanged."""
    import copy

    ref = copy.deepcopy(base)
    hd, half, g = shape.head_dim, shape.head_dim // 2, shape.group_size
    keep_layers = []
    with torch.no_grad():
        for i, (layer, block) in enumerate(zip(subnet.layers, ref.model.layers)):
            if layer is None:
                continue
            keep_layers.append(block)
            attn, mlp = block.self_attn, block.mlp
            for h in range(shape.num_heads):
                kept = set(layer.attn_pairs[h // g])
                for p in range(half):
                    if p not in kept:
                        for d in (p, p + half):
                            attn.q_proj.weight[h * hd + d] = 0
                            attn.o_proj.weight[:, h * hd + d] = 0
                            if attn.q_proj.bias is not None:
                                attn.q_proj.bias[h * hd + d] = 0
            for k in range(shape.num_kv_heads):
                kept = set(layer.attn_pairs[k])
                for p in range(half):
                    if p not in kept:
                        for d in (p, p + half):
                            for proj in (attn.k_proj, attn.v_proj):
                                proj.weight[k * hd + d] = 0
                                if proj.bias is not None:
                                    proj.bias[k * hd + d] = 0
            dropped = [c for c in range(shape.intermediate_size) if c not in set(layer.mlp_channels)]
            mlp.gate_proj.weight[dropped] = 0
            mlp.up_proj.weight[dropped] = 0
            mlp.down_proj.weight[:, dropped] = 0
    ref.model.layers = torch.nn.ModuleList(keep_layers)
    for j, block in enumerate(keep_layers):
        block.self_attn.layer_idx = j
    ref.config.num_hidden_layers = len(keep_layers)
    return ref


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 97, (2, 24))


def test_full_width_subnet_reproduces_base_logits(tiny, ids):
    shape = ModelShape.from_config(tiny.config)
    sub = slice_model(tiny, Subnet.full(shape))
    with torch.no_grad():
        torch.testing.assert_close(sub(ids).logits, tiny(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_narrowed_subnet_matches_zeroed_reference(tiny, ids, seed):
    shape = ModelShape.from_config(tiny.config)
    subnet = random_subnet(shape, seed, drop=(2,) if seed == 1 else ())
    sub = slice_model(tiny, subnet)
    ref = zeroed_reference(tiny, subnet, shape)
    with torch.no_grad():
        torch.testing.assert_close(sub(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    # physically smaller: parameter count matches the record's own count
    assert sum(p.numel() for p in sub.parameters()) == subnet.params(shape)


def test_sliced_model_is_smaller_and_counts_match_base(tiny):
    shape = ModelShape.from_config(tiny.config)
    assert sum(p.numel() for p in tiny.parameters()) == shape.dense_params
    subnet = random_subnet(shape, 5, drop=(0, 3))
    sub = slice_model(tiny, subnet)
    assert len(sub.model.layers) == 2
    assert subnet.fraction(shape) < 1


def test_generate_with_cache_equals_without(tiny, ids):
    shape = ModelShape.from_config(tiny.config)
    sub = slice_model(tiny, random_subnet(shape, 3, drop=(1,)))
    prompt = ids[:1, :10]
    with torch.no_grad():
        cached = sub.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        plain = sub.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape[1] == 22
    assert torch.equal(cached, plain)


def test_full_width_generate_matches_base(tiny, ids):
    shape = ModelShape.from_config(tiny.config)
    sub = slice_model(tiny, Subnet.full(shape))
    prompt = ids[:1, :8]
    with torch.no_grad():
        assert torch.equal(sub.generate(prompt, max_new_tokens=10, do_sample=False),
                           tiny.generate(prompt, max_new_tokens=10, do_sample=False))


def test_padded_batch_matches_unpadded(tiny):
    """Left padding with an attention mask gives the same last-token logits as no padding."""
    shape = ModelShape.from_config(tiny.config)
    sub = slice_model(tiny, random_subnet(shape, 4))
    a = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[0, 0, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        want = sub(a).logits[:, -1]
        got = sub(padded, attention_mask=mask, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tied_embeddings_and_qwen_style_bias():
    base = tiny_llama(tie_word_embeddings=True, attention_bias=True)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    shape = ModelShape.from_config(base.config)
    ids = torch.randint(3, 97, (1, 16))
    sub = slice_model(base, Subnet.full(shape))
    assert sub.lm_head.weight is sub.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(sub(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_validation_errors_are_clear(tiny):
    shape = ModelShape.from_config(tiny.config)
    full = Subnet.full(shape)
    with pytest.raises(SubnetError, match="layers"):
        Subnet(full.layers[:3]).validate(shape)
    bad = Subnet.build([([[0, 0], [1, 2]], [0])] + [None] * 3)
    with pytest.raises(SubnetError, match="duplicated|same number"):
        bad.validate(shape)
    with pytest.raises(SubnetError, match="out of range"):
        Subnet.build([([[0], [99]], [0])] + [None] * 3).validate(shape)
    with pytest.raises(SubnetError, match="no channel"):
        Subnet.build([([[0], [1]], [])] + [None] * 3).validate(shape)
    with pytest.raises(SubnetError, match="every layer"):
        Subnet((None,) * 4).validate(shape)


def test_json_round_trip(tiny):
    shape = ModelShape.from_config(tiny.config)
    s = random_subnet(shape, 7, drop=(1,))
    again = Subnet.from_json(s.to_json())
    assert again == s and again.key() == s.key()
    assert again.params(shape) == s.params(shape)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_supported_architectures_full_width(arch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, tie_word_embeddings=False)
    base = model_cls(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.08)
    shape = ModelShape.from_config(base.config)
    assert shape.qkv_bias == (arch == "qwen2")
    ids = torch.randint(3, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(slice_model(base, Subnet.full(shape))(ids).logits, base(ids).logits,
                                   atol=1e-5, rtol=0)
        sub = random_subnet(shape, 11)
        ref = zeroed_reference(base, sub, shape)
        torch.testing.assert_close(slice_model(base, sub)(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_compact_json_round_trip(tiny):
    shape = ModelShape.from_config(tiny.config)
    s = random_subnet(shape, 8, drop=(2,))
    compact = s.to_dict(compact=True)
    assert Subnet.from_dict(compact) == s
    full = Subnet.full(ModelShape(30, 576, 9, 3, 64, 1536, 49152, True))
    assert len(__import__("json").dumps(full.to_dict(compact=True))) * 10 < len(full.to_json())
