"""Every family we accept through the whole pipeline on tiny random models (random biases and norm
gains, every rope and window setting the family uses): block-by-block replay, importance, fitness,
bias compensation and reformation, each checked against the family's own transformers class;
the search space a family allows; and one-line refusals for what it does not."""
from __future__ import annotations

import random

import pytest
import torch
from test_slicing import LONG, mixed_subnet
from tiny_models import ARCHS, tiny_model

from explorer.calibrate.capture import capture_block_inputs, run_block
from explorer.calibrate.importance import compute_importance
from explorer.errors import ExplorerError
from explorer.model.loading import LoadedModel, ModelLoadError, check_architecture
from explorer.model.perplexity import perplexity
from explorer.model.reference import weights_match, zeroed_reference
from explorer.model.slicing import slice_model
from explorer.model.subnet import ModelShape, Subnet, SubnetError
from explorer.pick.reform import ReformSettings, reform
from explorer.search.fitness import FitnessEvaluator
from explorer.search.space import make_space, space_top_layer
from explorer.search.validate import check_values, default_space
from explorer.settings import SearchSettings

NEW = ["qwen3", "qwen3-bias-window", "smollm3", "smollm3-window", "granite", "granite-llama3", "gemma3"]
WINDOWS = torch.randint(3, 97, (6, 40), generator=torch.Generator().manual_seed(7))  # past the 16-token windows


def loaded(model) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=None, shape=ModelShape.from_config(model.config), name="tiny",
                       source="tiny", path="", dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_block_by_block_replay_equals_the_forward(arch):
    """Each block replays with its own arguments (a sliding layer's mask, a Gemma layer's rope)."""
    base = tiny_model(arch)
    inputs = capture_block_inputs(base, WINDOWS, batch_size=4)
    for i, block in enumerate(base.model.layers):
        inputs = inputs.with_hidden(run_block(block, inputs.at(i)))
    seen = []
    handle = base.model.norm.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        base(WINDOWS)
    handle.remove()
    torch.testing.assert_close(torch.cat(inputs.hidden), seen[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", NEW)
def test_fitness_equals_the_sliced_models_perplexity(arch):
    base = tiny_model(arch)
    lm = loaded(base)
    means = compute_importance(base, WINDOWS, lm.shape).channel_means()
    sub = mixed_subnet(lm.shape, 3)
    ev = FitnessEvaluator(base, lm.shape, WINDOWS[:4], means=means, batch=2)
    for compensated in (False, True):
        want = perplexity(slice_model(base, sub, lm.shape, means if compensated else None), WINDOWS[:4])
        assert ev.evaluate(sub, compensated=compensated).ppl == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("arch", NEW)
def test_reformed_model_is_the_original_with_those_weights(arch):
    """Reformation (from the compensated subnet) changes only o_proj / down_proj, and the result is
    the original class with them written in (a Gemma post-norm sees the reformed output)."""
    base = tiny_model(arch)
    lm = loaded(base)
    means = compute_importance(base, WINDOWS, lm.shape).channel_means()
    sub = mixed_subnet(lm.shape, 5)
    result = reform(lm, sub, ReformSettings(batch_size=4), calib_windows=WINDOWS, means=means)
    assert any(r.applied for r in result.layers)
    assert weights_match(base, result.model, sub, lm.shape) == []
    ref = zeroed_reference(base, sub, lm.shape, reformed=result.model)
    with torch.no_grad():
        torch.testing.assert_close(result.model(LONG).logits, ref(LONG).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", NEW)
def test_the_space_a_family_allows(arch):
    base = tiny_model(arch)
    shape = ModelShape.from_config(base.config)
    imp = compute_importance(base, WINDOWS, shape)
    qk = arch.startswith(("qwen3", "gemma3"))
    assert shape.qk_norm == qk and default_space(shape) == ("heads" if qk else "dims")
    if qk:
        with pytest.raises(ExplorerError, match="normalises each query and key head") as e:
            check_values(SearchSettings(space="dims"), shape)
        assert "\n" not in str(e.value)
        narrowed = Subnet(tuple(mixed_subnet(shape, 1).layers[:3]) + (None,))
        layer = narrowed.layers[0]
        half = type(layer)(tuple(g[: len(g) // 2] for g in layer.attn_pairs), layer.mlp_channels, layer.kv_groups,
                           layer.q_heads)
        with pytest.raises(SubnetError, match="whole heads only"):
            Subnet((half,) + narrowed.layers[1:]).validate(shape)
    space = make_space(shape, 0.7, granularity="heads")
    rng = random.Random(0)
    for i in range(shape.num_layers):  # every block's top choice in the heads space is a valid, exact subnet
        layer = space_top_layer(space, imp, i, shape, rng.choice(space.heads), space.width_options[-1])
        one = Subnet(tuple(layer if k == i else None for k in range(shape.num_layers))).validate(shape)
        torch.testing.assert_close(slice_model(base, one, shape)(LONG).logits,
                                   zeroed_reference(base, one, shape)(LONG).logits, atol=1e-5, rtol=0)


def test_the_families_configs_pass_the_load_check_and_others_are_refused():
    for arch in ("Qwen3ForCausalLM", "SmolLM3ForCausalLM", "GraniteForCausalLM", "Gemma3ForCausalLM"):
        check_architecture({"architectures": [arch]}, "x")
    with pytest.raises(ModelLoadError, match="unsupported architecture.*Gemma3ForCausalLM"):
        check_architecture({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}, "x")
    gemma = tiny_model("gemma3").config.to_dict()
    with pytest.raises(ModelLoadError, match="soft-capping"):
        check_architecture({**gemma, "attn_logit_softcapping": 50.0}, "x")


@pytest.mark.slow
def test_gemma3_270m_is_reproduced_exactly():
    """The second embedded model (real weights, 262k vocabulary, sliding window 512 with its own rope
    base): full width equals Gemma3ForCausalLM over 600 tokens, a whole-head subnet equals the
    original with the omitted weights zeroed, logits and 30 greedy tokens with the KV cache."""
    from explorer.model.loading import load_model

    lm = load_model("gemma3-270m")
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and lm.name == "gemma3-270m"
    assert lm.shape.qk_norm and lm.shape.sandwich_norm and lm.summary()["params"] == 268_098_176
    text = ("The river rose through the night, and by morning the old bridge was gone. Farmers along the valley "
            "moved their animals to higher ground while the council met to count the cost. ") * 20
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :600]
    assert ids.shape[1] == 600
    with torch.no_grad():
        torch.testing.assert_close(slice_model(lm.model, Subnet.full(lm.shape))(ids).logits, lm.model(ids).logits,
                                   atol=1e-4, rtol=0)
    rng = random.Random(0)
    layers = []
    for i in range(lm.shape.num_layers):  # 1-4 query heads, a third of the MLP, two blocks dropped
        if i in (4, 11):
            layers.append(None)
            continue
        heads = sorted(rng.sample(range(4), rng.randint(1, 4)))
        layers.append(([list(range(128))], sorted(rng.sample(range(2048), 700)), [0], [heads]))
    sub = Subnet.build(layers).validate(lm.shape)
    sliced = slice_model(lm.model, sub, lm.shape)
    ref = zeroed_reference(lm.model, sub, lm.shape)
    with torch.no_grad():
        # real weights, logits up to ~25: fp32 sums over 700 kept vs 2048 zero-padded channels round apart
        torch.testing.assert_close(sliced(ids).logits, ref(ids).logits, atol=5e-4, rtol=0)
        prompt = ids[:, :20]
        assert torch.equal(sliced.generate(prompt, max_new_tokens=30, do_sample=False),
                           ref.generate(prompt, max_new_tokens=30, do_sample=False))


def test_targets_may_be_a_share_of_the_blocks():
    """Gemma 3 270M's embeddings are 63 % of it: a target of the blocks' parameters is turned into a
    budget of total parameters in one place, refused in one line when out of range, and named with
    its share wherever a target is shown."""
    from explorer.search.runs import Candidate, target_words
    from explorer.search.space import target_space, total_fraction
    from explorer.search.validate import validate_targets

    base = tiny_model("gemma3", vocab=4000)  # embeddings most of the model, as in the real one
    shape = ModelShape.from_config(base.config)
    assert shape.fixed_params / shape.dense_params > 0.5
    s = SearchSettings(share="prunable", space="heads", window=0.02)
    total = total_fraction(shape, "prunable", 0.7)
    assert total * shape.dense_params == pytest.approx(shape.fixed_params + 0.7 * shape.dense_prunable)
    space = target_space(shape, s, 0.7)
    assert space.hi_params == int(total * shape.dense_params)
    assert validate_targets([0.7, 0.6], shape, s) == (0.7, 0.6)
    with pytest.raises(ExplorerError, match="target 30%: 30.0% of the total parameters is below the embeddings"):
        validate_targets([0.3], shape, SearchSettings(space="heads"))  # 30 % of the total cannot be reached
    with pytest.raises(ExplorerError, match="target 20% of blocks: .* below what the search space can reach"):
        validate_targets([0.2], shape, s)
    with pytest.raises(ExplorerError, match="share must be one of total, prunable"):
        check_values(SearchSettings(share="blocks"))
    assert target_words(0.5, "prunable") == "50% of blocks" and target_words(0.5) == "50%"
    c = Candidate("c1", 0.5, 0, "search", Subnet.full(shape), share="prunable")
    again = Candidate.from_dict(c.to_dict())
    assert again.share == "prunable" and again.target_words == "50% of blocks"
    assert "share" not in Candidate("c2", 0.5, 0, "search", Subnet.full(shape)).to_dict()  # old runs read the same


@pytest.mark.parametrize("name", ["gemma3", "qwen3"])
def test_latency_calibration_subnets_keep_whole_heads_where_heads_are_normalised(name):
    """A machine's first latency fit times structural subnets at the space's narrowest attention: for a
    model with per-head q/k norms those are fewer whole heads (a narrowed head is refused), still
    narrower in attention weights than the full block, so the fit separates the attention's cost."""
    from explorer.search.latency_model import calibration_subnets, features

    shape = ModelShape.from_config(tiny_model(name).config)
    subs = calibration_subnets(shape, (8, shape.head_dim), (8, shape.intermediate_size))
    for sub in subs:
        sub.validate(shape)
    attn = sorted({features(sub, shape)[2] / sum(l is not None for l in sub.layers) for sub in subs})
    assert len(attn) == 2 and attn[0] < attn[1]
