"""The head-granular search space: whole KV groups and query heads per group at the full head
dim (what llama.cpp can run), ranked by OBS scores summed over the head."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_llama
from test_search import _real_params

from explorer.calibrate.importance import compute_importance, top_layer
from explorer.errors import ExplorerError
from explorer.model.loading import LoadedModel
from explorer.model.reference import zeroed_reference
from explorer.model.slicing import candidate_model, slice_model
from explorer.model.subnet import ModelShape, Subnet
from explorer.search.evolution import crossover, mutate
from explorer.search.run import run_search
from explorer.search.runs import open_run
from explorer.search.space import head_options, make_space, set_heads, space_top_layer
from explorer.settings import Probs, SearchSettings


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(0)
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(0)
    cal, fit = torch.randint(3, 97, (6, 24), generator=g), torch.randint(3, 97, (3, 24), generator=g)
    return model, shape, compute_importance(model, cal, shape), cal, fit


def test_a_heads_own_weights_decide_its_rank_within_its_group(setup):
    """Scale one head's q rows and o columns up: its OBS score (and only its group's order) must
    put it first; a score summed over the wrong rows would not move."""
    model, shape, imp, cal, _ = setup
    hd, g = shape.head_dim, shape.group_size
    for layer, head in ((0, 6), (2, 1)):
        m = tiny_llama(0)
        attn = m.model.layers[layer].self_attn
        with torch.no_grad():
            attn.q_proj.weight[head * hd:(head + 1) * hd] *= 6
            attn.o_proj.weight[:, head * hd:(head + 1) * hd] *= 6
        scaled = compute_importance(m, cal, shape)
        group = head // g
        assert scaled.head_order[layer][group][0] == head % g
        assert imp.head_order[layer][group][0] != head % g or imp.heads[layer][head] < scaled.heads[layer][head] / 10


def test_full_options_are_the_dense_block_and_options_are_whole_heads(setup):
    model, shape, imp, *_ = setup
    full = Subnet.full(shape)
    for i in range(shape.num_layers):
        layer = set_heads(imp, i, top_layer(imp, i, shape.n_pairs, shape.intermediate_size), shape,
                          shape.num_kv_heads, shape.group_size)
        assert layer == full.layers[i]
    opts = head_options(shape, 0.0)
    assert len(opts) == shape.num_kv_heads * shape.group_size and opts[-1] == (shape.num_kv_heads, shape.group_size)
    costs = [shape.attn_params(shape.head_dim, *o) for o in opts]
    assert costs == sorted(costs)
    layer = space_top_layer(make_space(shape, 0.7, granularity="heads"), imp, 1, shape, (1, 3), 40)
    assert layer.n_kv == 1 and layer.heads_per_group(shape) == 3 and layer.pairs == shape.n_pairs
    assert layer.kv_groups == (imp.group_order[1][0],)
    assert set(layer.q_heads[0]) == set(imp.head_order[1][layer.kv_groups[0]][:3])


@pytest.mark.parametrize("target", [0.85, 0.6])
def test_operators_stay_in_window_keep_whole_heads_and_sizes_are_real(setup, target):
    model, shape, imp, *_ = setup
    space = make_space(shape, target, window=0.01, multiple=8, attn_min=0.3, granularity="heads")
    rng = random.Random(0)
    start = Subnet(tuple(space_top_layer(space, imp, i, shape, space.heads[-1], space.width_options[-1])
                         for i in range(shape.num_layers)))
    from explorer.search.evolution import repair

    parents = [repair(start, imp, shape, space, rng)]
    rough = Probs(depth=0.2, ratio=0.5, mask=0.5)
    for n in range(40):
        if n % 3 == 2 and len(parents) > 1:
            child = crossover(*rng.sample(parents, 2), imp, shape, space, rng)
        else:
            child = mutate(rng.choice(parents), imp, shape, space, rng, rough)
        assert child is not None
        child.validate(shape)
        assert child.head_granular(shape) and space.allows(child, shape)
        assert space.lo_params <= child.params(shape) <= space.hi_params
        assert _real_params(slice_model(model, child, shape)) == child.params(shape)
        parents.append(child)
    assert len({p.key() for p in parents}) > 20
    assert len({(l.n_kv, l.heads_per_group(shape)) for p in parents for l in p.layers if l}) > 2


def _settings(**kw):
    base = dict(targets=(0.8, 0.6), head_multiple=4, population=4, generations=1, mutations=3, crossovers=2,
                fresh=1, top_k=3, window=0.01, latency=False, split_init=2, space="heads")
    base.update(kw)
    return SearchSettings.preset("demo", **base)


def test_a_heads_search_finds_whole_head_subnets_that_equal_the_zeroed_base(setup, tmp_path):
    model, shape, _, cal, fit = setup
    lm = LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu")
    events = list(run_search(lm, _settings(), tmp_path / "h", windows=(cal, fit)))
    assert type(events[-1]).__name__ == "SearchFinished"
    run = open_run(tmp_path / "h")
    assert run.settings["space"] == "heads"
    searched = [c for c in run.candidates() if c.origin in ("init", "search")]
    assert searched and all(c.subnet.head_granular(shape) for c in searched)
    narrowed = [c for c in searched if any(l is not None and (l.n_kv < shape.num_kv_heads or l.q_heads)
                                           for l in c.subnet.layers)]
    assert narrowed
    means = run.channel_means()
    x = fit[:2]
    for c in narrowed[:3]:
        m = means if c.compensated else None
        ours = candidate_model(model, c, m)(x).logits
        ref = zeroed_reference(model, c.subnet, shape, m)(x).logits
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_the_heads_space_refuses_the_pair_ladders(setup, tmp_path):
    model, shape, _, cal, fit = setup
    lm = LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu")
    with pytest.raises(ExplorerError, match="dims space"):
        run_search(lm, _settings(fitness_mode="reformed"), tmp_path / "r", windows=(cal, fit))
    with pytest.raises(ExplorerError, match="dims or heads"):
        run_search(lm, _settings(space="rows"), tmp_path / "s", windows=(cal, fit))
