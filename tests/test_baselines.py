"""Baselines as their official code defines them: each scorer against a direct computation on a
tiny GQA model, whole KV groups for attention, FLAP's global cut is a threshold on standardised
scores, Wanda-sp is sequential, and FLAP's bias compensation is the mean of the removed inputs."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from explorer.calibrate.baselines import BASELINES, baseline_subnet, standardize, wifv_scores
from explorer.calibrate.importance import compute_importance
from explorer.errors import ExplorerError
from explorer.model.perplexity import perplexity
from explorer.model.reference import zeroed_reference
from explorer.model.slicing import slice_model
from explorer.model.subnet import ModelShape, Subnet
from explorer.search.fitness import FitnessEvaluator


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(3)
    shape = ModelShape.from_config(model.config)
    torch.manual_seed(0)
    windows = torch.randint(3, 97, (4, 20))
    return model, shape, compute_importance(model, windows, shape), windows


def inputs_of(model, windows, names=("self_attn.o_proj", "mlp.down_proj")) -> dict:
    """Per (layer, projection), the input rows over every calibration token, by plain forward hooks."""
    got, handles = {}, []
    for i, block in enumerate(model.model.layers):
        for n in names:
            handles.append(block.get_submodule(n).register_forward_pre_hook(
                lambda _m, a, key=(i, n): got.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in got.items()}


def removed_groups(layer, shape) -> set[int]:
    return set(range(shape.num_kv_heads)) - set(layer.kv_groups)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_baselines_hit_the_target_with_whole_groups(setup, name, fraction):
    model, shape, stats, windows = setup
    res = baseline_subnet(name, model, stats, shape, fraction, windows)
    res.subnet.validate(shape)
    assert res.subnet.head_granular(shape)  # whole heads, full head dim
    assert all(l.q_heads is None for l in res.subnet.layers)  # a kept group keeps all its query heads
    assert fraction - 0.05 < res.subnet.fraction(shape, res.compensated) <= fraction
    assert res.compensated == name.startswith("flap")
    if name != "flap":  # one ratio for every block
        assert len({(l.n_kv, l.width) for l in res.subnet.layers}) == 1


def test_magnitude_ranks_by_column_norms(setup):
    model, shape, stats, _ = setup
    sub = baseline_subnet("magnitude", model, stats, shape, 0.6).subnet
    for i, layer in enumerate(sub.layers):
        block = model.model.layers[i]
        o = block.self_attn.o_proj.weight.detach().norm(dim=0).view(shape.num_kv_heads, -1).sum(1)
        d = block.mlp.down_proj.weight.detach().norm(dim=0)
        gone = removed_groups(layer, shape)
        assert all(o[g] <= o[k] for g in gone for k in layer.kv_groups)
        kept = set(layer.mlp_channels)
        assert max(d[c] for c in range(shape.intermediate_size) if c not in kept) <= min(d[c] for c in kept)


def test_flap_scores_and_global_threshold_by_direct_computation(setup):
    """WIFV from hooks on the dense model: variance x squared column norm (squared again for
    attention), standardised per block, a group scored by its channels' mean; one threshold."""
    model, shape, stats, windows = setup
    x = inputs_of(model, windows)
    ours = wifv_scores(model, stats)
    attn, mlp = [], []
    for i, block in enumerate(model.model.layers):
        wo = block.self_attn.o_proj.weight.detach().double().pow(2).sum(0)
        wd = block.mlp.down_proj.weight.detach().double().pow(2).sum(0)
        var_o = x[(i, "self_attn.o_proj")].var(0, unbiased=False)
        var_d = x[(i, "mlp.down_proj")].var(0, unbiased=False)
        a, m = (var_o * wo) ** 2, var_d * wd
        torch.testing.assert_close(ours[i][0].double(), a, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(ours[i][1].double(), m, rtol=1e-3, atol=1e-9)
        attn.append(((a - a.mean()) / a.std()).view(shape.num_kv_heads, -1).mean(1))
        mlp.append((m - m.mean()) / m.std())
    sub = baseline_subnet("flap", model, stats, shape, 0.6).subnet
    kept = [float(attn[i][g]) for i, l in enumerate(sub.layers) for g in l.kv_groups]
    kept += [float(mlp[i][c]) for i, l in enumerate(sub.layers) for c in l.mlp_channels]
    gone = [float(attn[i][g]) for i, l in enumerate(sub.layers) for g in removed_groups(l, shape)]
    gone += [float(mlp[i][c]) for i, l in enumerate(sub.layers) for c in set(range(shape.intermediate_size))
             - set(l.mlp_channels)]
    assert gone and min(kept) >= max(gone) - 1e-6  # one global cut over comparable scores
    assert len({(l.n_kv, l.width) for l in sub.layers}) > 1  # ratios adapt across blocks
    torch.testing.assert_close(standardize(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]))


def test_wanda_sp_is_sequential(setup):
    """Block 1 is scored on what the already pruned block 0 produces: recompute it with the zeroed
    reference of block 0's choice (block 1 dense) and plain hooks."""
    model, shape, stats, windows = setup
    sub = baseline_subnet("wanda-sp", model, stats, shape, 0.6, windows).subnet
    full = Subnet.full(shape).layers
    prefix = Subnet((sub.layers[0], *full[1:]))
    x = inputs_of(zeroed_reference(model, prefix, shape), windows)
    block = model.model.layers[1]
    wo, wd = block.self_attn.o_proj.weight.detach().double().abs(), block.mlp.down_proj.weight.detach().double().abs()
    o = (wo * x[(1, "self_attn.o_proj")].pow(2).sum(0).sqrt()[None]).mean(0).view(shape.num_kv_heads, -1).sum(1)
    d = (wd * x[(1, "mlp.down_proj")].pow(2).sum(0).sqrt()[None]).mean(0)
    layer = sub.layers[1]
    assert all(o[g] <= o[k] for g in removed_groups(layer, shape) for k in layer.kv_groups)
    kept = set(layer.mlp_channels)
    assert max(d[c] for c in range(shape.intermediate_size) if c not in kept) <= min(d[c] for c in kept) + 1e-9


def test_flap_bias_compensation_in_fitness_and_model(setup):
    model, shape, stats, windows = setup
    res = baseline_subnet("flap", model, stats, shape, 0.6)
    means = stats.channel_means()
    i = 0
    layer = res.subnet.layers[i]
    removed = sorted(set(range(shape.intermediate_size)) - set(layer.mlp_channels))
    wd = model.model.layers[i].mlp.down_proj.weight.detach()
    want = wd[:, removed] @ stats.stats[i]["down_in"].mean[removed]
    sliced = slice_model(model, res.subnet, shape, means)
    assert sliced.config.o_bias and sliced.config.down_bias
    torch.testing.assert_close(sliced.model.layers[i].mlp.down_proj.bias.detach(), want, rtol=1e-5, atol=1e-6)
    ev = FitnessEvaluator(model, shape, windows, means=means)
    assert ev.evaluate(res.subnet, compensated=True).ppl == pytest.approx(perplexity(sliced, windows), rel=1e-5)
    ref = zeroed_reference(model, res.subnet, shape, means)
    assert perplexity(ref, windows) == pytest.approx(perplexity(sliced, windows), rel=1e-5)
    assert perplexity(slice_model(model, res.subnet, shape), windows) != pytest.approx(perplexity(sliced, windows))


def test_unknown_baseline(setup):
    model, shape, stats, _ = setup
    with pytest.raises(ExplorerError):
        baseline_subnet("sparsegpt", model, stats, shape, 0.7)


def test_baselines_are_built_once_per_calibration_and_read_back(setup, tmp_path, caplog):
    """Wanda-sp's sequential pass is the slow part of a search's first seconds: a baseline is
    computed once per model, calibration data and target, then read back (from the cache by any
    later search, from the run by its resume) exactly as computed."""
    from explorer.search.calibration import BASELINES_FILE, Calibration

    model, shape, imp, windows = setup

    def calibration(run_dir, n=2):  # a baseline reads every calibration window, as the importance pass does
        run_dir.mkdir()
        return Calibration(imp, imp.channel_means(), windows[:n], windows[:1], key="k", cache_dir=tmp_path / "cache",
                           run_dir=run_dir)

    direct = baseline_subnet("wanda-sp", model, imp, shape, 0.6, windows[:2])
    first, read = calibration(tmp_path / "a").baseline("wanda-sp", model, shape, 0.6)
    assert not read and first == direct
    later = calibration(tmp_path / "b")
    again, read = later.baseline("wanda-sp", model, shape, 0.6)
    assert read and again == direct
    assert (tmp_path / "b" / BASELINES_FILE).is_file()  # the run keeps its own copy
    flap, read = later.baseline("flap", model, shape, 0.6)
    assert not read and flap == baseline_subnet("flap", model, imp, shape, 0.6, windows[:2]) and flap.compensated
    other, read = calibration(tmp_path / "c", 3).baseline("wanda-sp", model, shape, 0.6)  # other windows: own entry
    assert not read and other == baseline_subnet("wanda-sp", model, imp, shape, 0.6, windows[:3])
    (tmp_path / "cache" / "k.baselines.json").write_text("{garbled")
    fresh, read = Calibration(imp, imp.channel_means(), windows[:2], windows[:1], key="k",
                              cache_dir=tmp_path / "cache").baseline("wanda-sp", model, shape, 0.6)
    assert not read and fresh == direct and "unreadable cache file" in caplog.text


def test_flap_matches_a_literal_reimplementation_of_the_official_prune_flap(setup):
    """bench/flap.py's `literal_flap` (hooks, stacked standardisation, weighted cumulative-sum
    threshold, masked weights with bias hooks; no explorer scoring, cutting or slicing) and our
    FLAP give the same perplexity. At 0.8 and 0.7 of this model both cut rules (nearest kept share,
    longest prefix within budget) keep the same items, so the figures agree to float precision."""
    from bench.flap import literal_flap
    from explorer.model.slicing import candidate_model
    from explorer.search.runs import Candidate

    model, shape, stats, windows = setup
    held = torch.randint(3, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    literal = literal_flap(model, windows, held, (0.8, 0.7))
    for t, want in literal.items():
        res = baseline_subnet("flap", model, stats, shape, t, windows)
        ours = candidate_model(model, Candidate("flap", t, 0, "flap", res.subnet, {}, True), stats.channel_means())
        assert perplexity(ours, held) == pytest.approx(want, rel=1e-5)


class BiasGPT:
    """CASIA-IVA-Lab/FLAP lib/layerwrapper.py `BiasGPT` (WIFV branch) as written, on the CPU in
    float64: the oracle for the running-variance reading."""

    def __init__(self, in_dim: int):
        self.nsamples = 0
        self.baseline_inp = torch.zeros(in_dim, dtype=torch.float64)
        self.fluc_inp = torch.zeros(in_dim, dtype=torch.float64)

    def add_batch(self, inp):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        batch_size = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        old_baseline_inp = self.baseline_inp
        self.baseline_inp *= self.nsamples / (self.nsamples + batch_size)
        self.baseline_inp += torch.mean(inp, dim=1) / (self.nsamples + batch_size)
        if self.nsamples == 0:
            self.fluc_inp = 0
        else:
            self.fluc_inp *= (self.nsamples - 1) / (self.nsamples + batch_size - 1)
            self.fluc_inp += torch.sum((inp - self.baseline_inp.unsqueeze(1)) * (inp - old_baseline_inp.unsqueeze(1)),
                                       dim=1) / (self.nsamples + batch_size)
        self.nsamples += batch_size


def test_flap_readings_estimate_their_statistics_as_direct_computations_do(setup):
    """bench/flap.py's readings of the issue's FLAP: the pooled, per-window and first-token-free
    variances against plain tensor maths on hooked inputs, the running one against FLAP's own
    `BiasGPT.add_batch` fed one window per call as prune_flap does."""
    from bench.flap import Reading, calibration_stats

    model, shape, _, windows = setup
    B, T = windows.shape
    direct = {k: v.view(B, T, -1) for k, v in inputs_of(model, windows).items()}
    readings = {r: calibration_stats(model, windows, Reading(**kw)) for r, kw in (
        ("pooled", {}), ("per-window", {"variance": "per-window"}), ("running", {"variance": "running"}),
        ("skip", {"skip_first": True}))}
    for i in range(shape.num_layers):
        for j, name in enumerate(("self_attn.o_proj", "mlp.down_proj")):
            X = direct[(i, name)]  # [B, T, C]
            flat = X.reshape(B * T, -1)
            want = {"pooled": flat.var(0, unbiased=False), "per-window": X.var(1, unbiased=False).mean(0),
                    "skip": X[:, 1:].reshape(-1, X.shape[-1]).var(0, unbiased=False)}
            oracle = BiasGPT(X.shape[-1])
            for b in range(B):
                oracle.add_batch(X[b:b + 1])
            want["running"] = oracle.fluc_inp
            for r, stats in readings.items():
                mean, var = stats[(i, j)]
                torch.testing.assert_close(var, want[r], rtol=1e-5, atol=1e-9)
                seen = X[:, 1:] if r == "skip" else X
                torch.testing.assert_close(mean, seen.reshape(-1, X.shape[-1]).mean(0), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("reading", ["running-variance", "float16", "skip-first-token", "unsquared-attention",
                                     "group-sum", "group-max"])
def test_every_flap_reading_prunes_and_measures(setup, reading):
    """Each reading of bench/flap.py prunes the tiny model and measures a finite perplexity (a
    float16 statistics pass or a group score that breaks the cut would not)."""
    from bench.flap import READINGS, literal_flap

    model, _, _, windows = setup
    held = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    got = literal_flap(model, windows, held, (0.7,), READINGS[reading])
    assert set(got) == {0.7} and 1.0 < got[0.7] < float("inf")
