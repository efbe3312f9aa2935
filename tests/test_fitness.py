"""The fast fitness path computes the same function as the sliced model: the sliced-block cache
and batching change nothing, bf16 stays close to fp32, early stop works between batches, and
the compute dtype is recorded resolved so a resumed run scores the same way."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_llama

from explorer.calibrate.importance import compute_importance
from explorer.errors import ExplorerError
from explorer.model.loading import LoadedModel
from explorer.model.perplexity import perplexity
from explorer.model.slicing import slice_model
from explorer.model.subnet import ModelShape
from explorer.search.evolution import mutate
from explorer.search.fitness import FitnessEvaluator, fast_dtype, resolve_dtype
from explorer.search.initial import initial_subnet
from explorer.search.run import run_search
from explorer.search.space import make_space
from explorer.settings import Probs, SearchSettings


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(1)
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(1)
    cal, fit = torch.randint(3, 97, (6, 32), generator=g), torch.randint(3, 97, (4, 32), generator=g)
    imp = compute_importance(model, cal, shape)
    space = make_space(shape, 0.7, 0.02, 8, 4, True)
    rng = random.Random(0)
    base = initial_subnet(imp, shape, 0.7, 8, 4)
    subs = [base] + [s for s in (mutate(base, imp, shape, space, rng, Probs(0.1, 0.5, 0.5)) for _ in range(12))
                     if s is not None][:6]
    return model, shape, cal, fit, subs


def test_block_cache_and_batching_compute_the_same_function(setup):
    model, shape, _, fit, subs = setup
    plain = FitnessEvaluator(model, shape, fit, cache_bytes=0, block_cache_bytes=0, batch=1)
    cached = FitnessEvaluator(model, shape, fit, cache_bytes=0, batch=1)
    batched = FitnessEvaluator(model, shape, fit, batch=4)
    for s in subs + subs:  # the second pass hits the block cache for every block
        want = perplexity(slice_model(model, s, shape), fit)
        a, b, c = plain.evaluate(s), cached.evaluate(s), batched.evaluate(s)
        assert a.nll == b.nll  # a cached block is the very block slicing would build
        assert a.ppl == pytest.approx(want, rel=1e-5) and c.ppl == pytest.approx(want, rel=1e-5)
    assert plain.stats["block_cache_hits"] == 0
    assert cached.stats["block_cache_hits"] >= len(subs) * shape.num_layers - 4  # all of the second pass
    assert cached.stats["sliced_blocks"] < plain.stats["sliced_blocks"]


def test_block_cache_respects_its_byte_budget(setup):
    model, shape, _, fit, subs = setup
    one_block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    ev = FitnessEvaluator(model, shape, fit, cache_bytes=0, block_cache_bytes=2 * one_block)
    for s in subs:
        ev.evaluate(s)
        held = sum(p.numel() * p.element_size() for b in ev._blocks.values() for p in b.parameters())
        assert ev._block_bytes == held <= 2 * one_block  # narrower blocks: a few fit, never more than the budget
    assert ev.stats["sliced_blocks"] > len(ev._blocks)


def test_bf16_fitness_stays_close_to_fp32_and_keeps_the_order(setup):
    model, shape, _, fit, subs = setup
    f32 = FitnessEvaluator(model, shape, fit, batch=2)
    b16 = FitnessEvaluator(model, shape, fit, batch=2, dtype=torch.bfloat16)
    p32 = [f32.evaluate(s).ppl for s in subs]
    p16 = [b16.evaluate(s).ppl for s in subs]
    for a, b in zip(p32, p16):
        assert b == pytest.approx(a, rel=0.03)
    best32, best16 = min(range(len(subs)), key=p32.__getitem__), min(range(len(subs)), key=p16.__getitem__)
    assert p32[best16] <= p32[best32] * 1.03  # bf16's pick is (within noise) fp32's pick


def test_early_stop_between_batches(setup):
    model, shape, _, fit, subs = setup
    ev = FitnessEvaluator(model, shape, fit, batch=2)
    full = ev.evaluate(subs[0])
    cut = FitnessEvaluator(model, shape, fit, batch=2).evaluate(subs[0], bound=1e-3)
    assert full.complete and full.windows_done == 4
    assert not cut.complete and cut.windows_done == 2 and cut.nll < full.nll
    assert cut.computed_blocks == 2 * shape.num_layers - sum(l is None for l in subs[0].layers) * 2


def test_dtype_names_resolve_and_bad_ones_are_refused(setup):
    model, shape, cal, fit, _ = setup
    assert resolve_dtype("auto", "cpu") in ("float32", "bfloat16")
    assert fast_dtype("cpu") in (torch.float32, torch.bfloat16)
    assert resolve_dtype("float32", "cpu") == "float32"
    with pytest.raises(ValueError):
        resolve_dtype("int8", "cpu")
    lm = LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu")
    with pytest.raises(ExplorerError, match="fitness dtype"):
        run_search(lm, SearchSettings.preset("demo", targets=(0.8,), fitness_dtype="int8", latency=False, window=0.02,
                                                     head_multiple=4), "/nonexistent/x",
                   windows=(cal, fit))
    with pytest.raises(ExplorerError, match="fitness_batch"):
        run_search(lm, SearchSettings.preset("demo", targets=(0.8,), fitness_batch=0, latency=False, window=0.02,
                                                     head_multiple=4), "/nonexistent/x",
                   windows=(cal, fit))


def test_runs_store_the_resolved_dtype_and_old_runs_read_as_fp32(tmp_path, setup):
    model, shape, cal, fit, _ = setup
    lm = LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu")
    s = SearchSettings.preset("demo", targets=(0.8,), population=1, generations=0, split_init=0, baselines=(),
                              head_multiple=4, window=0.02, latency=False, init_scorings=("obs",))
    events = list(run_search(lm, s, tmp_path / "r", windows=(cal, fit)))
    from explorer.search.runs import open_run

    stored = open_run(tmp_path / "r").settings
    assert stored["fitness_dtype"] in ("float32", "bfloat16") and stored["fitness_dtype"] != "auto"
    assert type(events[-1]).__name__ == "SearchFinished"
    old = {k: v for k, v in s.to_dict().items() if k not in ("fitness_dtype", "fitness_batch")}
    back = SearchSettings.from_dict(old)
    assert back.fitness_dtype == "float32" and back.fitness_batch == 1
