"""The reformation-aware search's ladders (METHOD 8.1) on a tiny random GQA Llama with random
biases and norm gains: full width is the dense block, every pre-reformed level fits the dense
layer's output on calibration data at least as well as the unreformed level (recomputed here from
the base model with the omitted weights zeroed, not from the Gram matrices the ladders used), a
search assembled from levels ranks candidates by their pre-reformed fitness, and the ladders
survive the disk cache bit for bit."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from explorer.calibrate.capture import capture_block_inputs, run_block
from explorer.calibrate.importance import compute_importance, top_layer
from explorer.errors import ExplorerError
from explorer.events import SearchFinished
from explorer.model.loading import LoadedModel
from explorer.model.reference import zeroed_reference
from explorer.model.slicing import layer_indices
from explorer.model.subnet import ModelShape, Subnet
from explorer.pick.reform import ReformSettings
from explorer.search.calibration import Calibration
from explorer.search.fitness import FitnessEvaluator
from explorer.search.ladders import Ladders, LadderSpec, build_ladders, ladder_bytes
from explorer.search.run import run_search
from explorer.search.runs import open_run
from explorer.settings import SearchSettings


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(5, attention_bias=True, mlp_bias=True)
    with torch.no_grad():  # random biases and norm gains, so a mistake in either shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.1)
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(0)
    cal, fit = torch.randint(3, 97, (8, 24), generator=g), torch.randint(3, 97, (3, 24), generator=g)
    imp = compute_importance(model, cal, shape)
    spec = LadderSpec.of(shape, head_multiple=4, multiple=8, mlp_levels=4)
    ladders = build_ladders(model, shape, imp, "obs", cal, spec, imp.channel_means(), ReformSettings())
    return model, shape, imp, cal, fit, spec, ladders


def test_spec_and_its_stated_memory(setup):
    _, shape, _, _, _, spec, ladders = setup
    assert spec.pairs == (2, 4, 6) and spec.widths == (24, 48, 72)  # full width is never a level
    assert ladders.nbytes == ladder_bytes(shape, spec)
    assert ladders.reformed > 0


def test_full_width_is_the_dense_block(setup):
    model, shape, imp, _, fit, _, ladders = setup
    ev = FitnessEvaluator(model, shape, fit, means=imp.channel_means(), ladders=ladders)
    full = Subnet.full(shape)
    assert all(not ladders.overrides(i, layer) for i, layer in enumerate(full.layers))
    assert ev.evaluate(full, reformed=True).nll == pytest.approx(ev.evaluate(full).nll, rel=1e-6)


@torch.no_grad()
def _dense_inputs(model, windows):
    """Per block, the dense model's hidden states entering it (plain sequential blocks)."""
    inputs = capture_block_inputs(model, windows, 4)
    out = []
    for block in model.model.layers:
        out.append(inputs)
        inputs = inputs.with_hidden(run_block(block, inputs))
    return out


@torch.no_grad()
def test_every_level_fits_at_least_as_well_as_unreformed(setup):
    """Each level's o_proj / down_proj against the dense layer's output on the dense block input:
    never a larger squared error than the kept columns with the compensation bias."""
    model, shape, imp, cal, _, spec, ladders = setup
    means = imp.channel_means()
    per_block = _dense_inputs(model, cal)
    improved = 0
    for i, block in enumerate(model.model.layers):
        for kind, levels in (("attn", spec.pairs), ("mlp", spec.widths)):
            for level in levels:
                layer = top_layer(imp, i, level, shape.intermediate_size) if kind == "attn" else \
                    top_layer(imp, i, shape.n_pairs, level)
                sub = Subnet(tuple(layer if k == i else top_layer(imp, k, shape.n_pairs, shape.intermediate_size)
                                   for k in range(shape.num_layers)))
                ref = zeroed_reference(model, sub, shape)  # the base with this level's omitted weights zeroed
                lin_name = "self_attn.o_proj" if kind == "attn" else "mlp.down_proj"
                seen = {"d": [], "s": []}
                hd = block.get_submodule(lin_name).register_forward_pre_hook(lambda m, a: seen["d"].append(a[0]))
                hs = ref.model.layers[i].get_submodule(lin_name).register_forward_pre_hook(
                    lambda m, a: seen["s"].append(a[0]))
                run_block(block, per_block[i])
                run_block(ref.model.layers[i], per_block[i])
                hd.remove()
                hs.remove()
                xd = torch.cat([x.flatten(0, 1) for x in seen["d"]]).double()
                kept = layer_indices(shape, layer, "cpu")["q" if kind == "attn" else "mlp"]
                xs = torch.cat([x.flatten(0, 1) for x in seen["s"]]).double()[:, kept]
                dense = block.get_submodule(lin_name)
                w, b = dense.weight.double(), dense.bias.double()
                target = xd @ w.T + b
                removed = torch.ones(w.shape[1], dtype=torch.bool)
                removed[kept] = False
                mean = (means.o_proj if kind == "attn" else means.down_proj)[i].double()
                start_b = b + w[:, removed] @ mean[removed]
                old = float((xs @ w[:, kept].T + start_b - target).pow(2).sum())
                lw, lb = (ladders.attn if kind == "attn" else ladders.mlp)[i][level]
                new = float((xs @ lw.double().T + lb.double() - target).pow(2).sum())
                assert new <= old * (1 + 1e-6) + 1e-9, (i, kind, level, new, old)
                improved += new < 0.95 * old
    assert improved > 0


def test_off_ladder_choices_are_refused(setup):
    _, shape, imp, _, _, _, ladders = setup
    layer = top_layer(imp, 0, 3, 48)  # 3 pairs is not a level
    assert not ladders.on_ladder(0, layer)
    with pytest.raises(ExplorerError, match="not a level"):
        ladders.overrides(0, layer)
    other = top_layer(imp, 1, 4, 48)  # block 1's order applied to block 0 is not block 0's prefix
    assert ladders.on_ladder(1, other) and (other == top_layer(imp, 0, 4, 48) or not ladders.on_ladder(0, other))


def test_the_cache_round_trips_the_ladders(setup, tmp_path):
    model, shape, imp, cal, fit, spec, ladders = setup
    cal_ = Calibration(imp, imp.channel_means(), cal, fit, key="k", cache_dir=tmp_path)
    first = [x for x in cal_.ladders(model, shape, spec, "obs", ReformSettings())][-1]
    again = list(cal_.ladders(model, shape, spec, "obs", ReformSettings()))
    assert "reused from the cache" in again[0].message
    loaded = again[-1]
    assert isinstance(loaded, Ladders) and loaded.spec == spec and loaded.reformed == first.reformed
    for a, b in zip(first.mlp + first.attn, loaded.mlp + loaded.attn):
        assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    for a, b in zip(first.mlp, ladders.mlp):
        assert all(torch.allclose(a[k][0], b[k][0]) for k in a)


def test_reformation_aware_search_assembles_levels(setup, tmp_path):
    model, shape, _, cal, fit, spec, _ = setup
    lm = LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu")
    s = SearchSettings.preset("demo", targets=(0.8, 0.6), head_multiple=4, population=4, generations=2, mutations=3,
                              crossovers=2, fresh=1, top_k=3, window=0.02, latency=False, split_init=2,
                              fitness_mode="reformed", ladder_mlp_levels=4)
    events = list(run_search(lm, s, tmp_path / "run", windows=(cal, fit)))
    assert isinstance(events[-1], SearchFinished), events[-1]
    run = open_run(tmp_path / "run")
    assert run.settings["fitness_mode"] == "reformed"
    searched = [c for c in run.candidates() if c.origin in ("init", "search")]
    assert searched and all(c.metrics.get("fitness_reformed") and c.compensated for c in searched)
    imp = compute_importance(model, cal, shape)
    ladders = build_ladders(model, shape, imp, "obs", cal, spec, imp.channel_means(), ReformSettings())
    for c in searched:  # every candidate is made of levels
        assert all(layer is None or ladders.on_ladder(i, layer) for i, layer in enumerate(c.subnet.layers)), c.id
    # its fitness is the assembled levels' (recomputed here), not the sliced subnet's
    ev = FitnessEvaluator(model, shape, fit, means=imp.channel_means(), ladders=ladders,
                          dtype=getattr(torch, run.settings["fitness_dtype"]), batch=run.settings["fitness_batch"])
    best = min((c for c in searched if not c.metrics.get("fitness_lower_bound")), key=lambda c: c.metrics["fitness_nll"])
    assert ev.evaluate(best.subnet, reformed=True).nll == pytest.approx(best.metrics["fitness_nll"], rel=1e-5)
    assert ev.evaluate(best.subnet, compensated=True).nll != pytest.approx(best.metrics["fitness_nll"], rel=1e-3)
    assert {c.origin for c in run.candidates()} >= {"dense", "baseline:flap"}  # baselines still shown, as they are


def test_ladders_over_the_memory_cap_are_refused_before_any_work(setup, tmp_path):
    model, shape, _, cal, fit, _, _ = setup
    lm = LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu")
    s = SearchSettings.preset("demo", targets=(0.8,), head_multiple=4, latency=False, fitness_mode="reformed",
                              ladder_mb=0)
    with pytest.raises(ExplorerError, match="ladder_mb"):
        run_search(lm, s, tmp_path / "run", windows=(cal, fit))
    assert not (tmp_path / "run").exists()
