"""Baselines pick structures of the same space at the same targets; FLAP's bias compensation is
the mean of the removed inputs through their weights, and slices and evaluates consistently."""
from __future__ import annotations

import pytest
import torch

from explorer.baselines import (BASELINES, baseline_subnet, flap_scores, magnitude_scores, slice_with_biases,
                                wanda_scores)
from explorer.errors import ExplorerError
from explorer.fitness import FitnessEvaluator
from explorer.importance import compute_importance
from explorer.perplexity import perplexity
from explorer.subnet import ModelShape


@pytest.fixture(scope="module")
def setup():
    from conftest import tiny_llama

    model = tiny_llama(3)
    shape = ModelShape.from_config(model.config)
    torch.manual_seed(0)
    windows = torch.randint(3, 97, (4, 20))
    return model, shape, compute_importance(model, windows, shape), windows


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_baselines_hit_the_target(setup, name, fraction):
    model, shape, stats, _ = setup
    res = baseline_subnet(name, model, stats, shape, fraction, multiple=8, head_multiple=4)
    res.subnet.validate(shape)
    assert fraction - 0.08 < res.subnet.fraction(shape) <= fraction
    if name != "flap":  # one keep ratio everywhere
        assert len({(l.head_dim, l.width) for l in res.subnet.layers}) == 1
    assert bool(res.biases) == (name == "flap")


def test_scores_by_direct_formulas(setup):
    model, shape, stats, _ = setup
    block = model.model.layers[1]
    up, gate, down = (block.mlp.get_submodule(n).weight.detach() for n in ("up_proj", "gate_proj", "down_proj"))
    mag = magnitude_scores(model, shape).mlp[1]
    torch.testing.assert_close(mag, up.pow(2).sum(1) + gate.pow(2).sum(1) + down.pow(2).sum(0))
    xin = stats.stats[1]["mlp_in"].sq_norm.sqrt()
    xd = stats.stats[1]["down_in"].sq_norm.sqrt()
    wanda = wanda_scores(model, stats, shape).mlp[1]
    torch.testing.assert_close(wanda, (up.abs() * xin).sum(1) + (gate.abs() * xin).sum(1) + (down.abs() * xd[None]).sum(0))
    flap = flap_scores(model, stats, shape).mlp[1]
    torch.testing.assert_close(flap, stats.stats[1]["down_in"].variance * down.pow(2).sum(0))


def test_flap_bias_compensation(setup):
    model, shape, stats, windows = setup
    res = baseline_subnet("flap", model, stats, shape, 0.6, multiple=8, head_multiple=4)
    i = 0
    layer = res.subnet.layers[i]
    removed = sorted(set(range(shape.intermediate_size)) - set(layer.mlp_channels))
    wd = model.model.layers[i].mlp.down_proj.weight.detach()
    want = wd[:, removed] @ stats.stats[i]["down_in"].mean[removed]
    torch.testing.assert_close(res.biases[i]["down_proj"], want, rtol=1e-5, atol=1e-6)
    sliced = slice_with_biases(model, res, shape)
    assert sliced.config.o_bias and sliced.config.down_bias
    torch.testing.assert_close(sliced.model.layers[i].mlp.down_proj.bias.detach(), want, rtol=1e-5, atol=1e-6)
    ev = FitnessEvaluator(model, shape, windows)
    assert ev.evaluate(res.subnet, biases=res.biases).ppl == pytest.approx(perplexity(sliced, windows), rel=1e-5)


def test_unknown_baseline(setup):
    model, shape, stats, _ = setup
    with pytest.raises(ExplorerError):
        baseline_subnet("sparsegpt", model, stats, shape, 0.7)
