"""Exactness of the one sliced model against the base model and an independent reference, for
every architecture and rope type we accept (tiny random models, random biases and norm gains)."""
from __future__ import annotations

import random
import zlib

import pytest
import torch
from conftest import tiny_llama
from tiny_models import ARCHS, tiny_model

from explorer.model.architecture import ArchitectureError, check_architecture
from explorer.model.reference import zeroed_reference as reference
from explorer.model.slicing import ChannelMeans, slice_model
from explorer.model.subnet import LayerChoice, ModelShape, Subnet, SubnetError


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
    """The base model with the omitted rows/columns zeroed, written without explorer.model.slicing.

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
    Subnet.build([([[0], [1]], [])] + [None] * 3).validate(shape)  # a block may skip its MLP
    with pytest.raises(SubnetError, match="no dimension"):
        Subnet.build([([[], []], [0])] + [None] * 3).validate(shape)
    with pytest.raises(SubnetError, match="query heads"):
        Subnet.build([([[0]], [0], [1], [[0, 1], [2]])] + [None] * 3).validate(shape)
    with pytest.raises(SubnetError, match="every layer"):
        Subnet((None,) * 4).validate(shape)


def test_json_round_trip(tiny):
    shape = ModelShape.from_config(tiny.config)
    s = random_subnet(shape, 7, drop=(1,))
    again = Subnet.from_json(s.to_json())
    assert again == s and again.key() == s.key()
    assert again.params(shape) == s.params(shape)


def real_params(model) -> int:
    seen = set()
    return sum(p.numel() for p in model.parameters() if not (p.data_ptr() in seen or seen.add(p.data_ptr())))


def mixed_subnet(shape: ModelShape, seed: int) -> Subnet:
    """Every kind of block: narrowed heads (whole ones where the family has q/k norms) in fewer groups
    with fewer query heads, one dropped, one without attention, one without MLP."""
    rng = random.Random(seed)
    P, KV, g = shape.n_pairs, shape.num_kv_heads, shape.group_size
    groups = tuple(sorted(rng.sample(range(KV), rng.randint(1, KV))))
    r = rng.randint(1, g - 1)
    heads = tuple(tuple(sorted(rng.sample(range(g), r))) for _ in groups)
    n = P if shape.qk_norm else rng.randint(1, P)  # q/k norms: whole heads only
    pairs = tuple(tuple(sorted(rng.sample(range(P), n))) for _ in groups)
    channels = lambda: tuple(sorted(rng.sample(range(shape.intermediate_size), rng.randint(1, 90))))  # noqa: E731
    return Subnet((LayerChoice(pairs, channels(), groups, heads), None,
                   LayerChoice((), channels(), ()),
                   LayerChoice(tuple(tuple(sorted(rng.sample(range(P), P if shape.qk_norm else 3)))
                                     for _ in range(KV)), ())))


def random_means(shape: ModelShape, seed: int = 0) -> ChannelMeans:
    g = torch.Generator().manual_seed(seed)
    L, q, P = shape.num_layers, shape.num_heads * shape.head_dim, shape.intermediate_size
    return ChannelMeans(tuple(torch.randn(q, generator=g) for _ in range(L)), tuple(torch.randn(P, generator=g)
                                                                                    for _ in range(L)))


LONG = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(3))  # past every window and context


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_full_width_equals_the_original(arch):
    """Every rope type and sliding window: 40 tokens (past max_position_embeddings 32, where dynamic
    and longrope change their frequencies, and past the 16-token windows)."""
    base = tiny_model(arch)
    shape = ModelShape.from_config(base.config)
    with torch.no_grad():
        torch.testing.assert_close(slice_model(base, Subnet.full(shape))(LONG).logits, base(LONG).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("compensated", [False, True])
def test_every_architecture_narrowed_equals_the_zeroed_original(arch, compensated):
    base = tiny_model(arch)
    shape = ModelShape.from_config(base.config)
    sub = mixed_subnet(shape, zlib.crc32(arch.encode()) % 1000)  # the same seed in every process
    means = random_means(shape) if compensated else None
    sliced = slice_model(base, sub, shape, means)
    ref = reference(base, sub, shape, means)
    with torch.no_grad():
        torch.testing.assert_close(sliced(LONG).logits, ref(LONG).logits, atol=1e-5, rtol=0)
        prompt = LONG[:1, :10]
        # generation with the KV cache crosses the window and the context as the original does
        assert torch.equal(sliced.generate(prompt, max_new_tokens=30, do_sample=False),
                           ref.generate(prompt, max_new_tokens=30, do_sample=False))
    assert real_params(sliced) == sub.params(shape, compensated)  # the size it claims


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_module_equals_this_tests_own_zeroing(tiny, ids, seed):
    """explorer.model.reference (used by export verification) agrees with the zeroing written here."""
    shape = ModelShape.from_config(tiny.config)
    subnet = random_subnet(shape, seed, drop=(2,) if seed == 1 else ())
    with torch.no_grad():
        torch.testing.assert_close(reference(tiny, subnet, shape)(ids).logits,
                                   zeroed_reference(tiny, subnet, shape)(ids).logits, atol=1e-5, rtol=0)


def test_unsupported_settings_are_refused_in_one_line():
    from transformers import LlamaConfig

    with pytest.raises(ArchitectureError, match="rope type"):
        check_architecture(LlamaConfig(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}))
    with pytest.raises(ArchitectureError, match="partial"):
        check_architecture(LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.5}))
    check_architecture(tiny_model("llama-llama3").config)  # the supported ones pass


def test_compact_json_round_trip(tiny):
    shape = ModelShape.from_config(tiny.config)
    s = random_subnet(shape, 8, drop=(2,))
    compact = s.to_dict(compact=True)
    assert Subnet.from_dict(compact) == s
    full = Subnet.full(ModelShape(30, 576, 9, 3, 64, 1536, 49152, True))
    assert len(__import__("json").dumps(full.to_dict(compact=True))) * 10 < len(full.to_json())
