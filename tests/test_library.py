"""The per-block level library and its solver: a library entry is the fitness of its one-block
subnet, measured independently on the sliced model; the solver's subnet is the least-damage
choice a brute force over every combination finds; it lands in the target's window."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama
from tiny_models import tiny_model

from explorer.calibrate.importance import compute_importance, scoring
from explorer.model.perplexity import perplexity
from explorer.model.slicing import slice_model
from explorer.model.subnet import ModelShape, Subnet
from explorer.search.library import Library, LibrarySpec, level_layer, measure_library, one_block
from explorer.search.solver import block_options, solve
from explorer.search.space import make_space


def _library(model, space: str, compensated: bool):
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(1)
    cal, win = torch.randint(3, 97, (6, 24), generator=g), torch.randint(3, 97, (3, 24), generator=g)
    imp = compute_importance(model, cal, shape)
    order = scoring("wifv", model, imp, shape)
    spec = LibrarySpec.of(shape, space, 4, 8, 4, compensated)
    lib = None
    for item in measure_library(model, shape, spec, order, win, imp.channel_means() if compensated else None,
                                dtype=torch.float32):
        if isinstance(item, Library):
            lib = item
    return shape, imp, order, win, lib


@pytest.mark.parametrize("name,space,compensated", [("llama-default", "dims", True), ("qwen2", "dims", False),
                                                    ("gemma3", "heads", True)])
def test_each_entry_is_the_perplexity_of_its_one_block_subnet(name, space, compensated):
    model = tiny_model(name)
    shape, imp, order, win, lib = _library(model, space, compensated)
    means = imp.channel_means() if compensated else None
    dense = math.log(perplexity(model, win))
    assert lib.dense_nll == pytest.approx(dense, abs=1e-4)
    checks = [(i, level_layer(lib.spec, order, i, shape, lib.spec.attn[k]), lib.attn[i][k])
              for i, k in ((0, 0), (2, len(lib.spec.attn) - 1))]
    checks += [(1, level_layer(lib.spec, order, 1, shape, None, lib.spec.widths[0]), lib.mlp[1][0]),
               (3, None, lib.skip[3])]
    for i, layer, damage in checks:
        sub = one_block(shape, i, layer)
        want = math.log(perplexity(slice_model(model, sub, shape, means), win)) - dense
        assert damage == pytest.approx(want, abs=1e-4)
        assert lib.layer_damage(i, layer, shape) == pytest.approx(damage, abs=1e-9)
    again = Library.from_dict(lib.to_dict())
    assert again == lib


def test_a_cut_measuring_keeps_its_blocks_and_resumes_to_the_same_library(monkeypatch):
    """A deadline the first block's timing says the rest would miss cuts measuring after that block;
    resuming from the blocks kept gives exactly the library an uncut measuring gives."""
    from explorer.search import library as library_mod

    model = tiny_llama(0)
    shape, imp, order, win, whole = _library(model, "dims", True)
    means = imp.channel_means()

    def measure(**kw):
        out = [item for item in measure_library(model, shape, whole.spec, order, win, means, dtype=torch.float32,
                                                **kw) if isinstance(item, Library)]
        assert len(out) == 1
        return out[0]

    real = library_mod.clock
    monkeypatch.setattr(library_mod, "clock", lambda: real() + 1e4)  # every block looks far too slow
    cut = measure(deadline=real() + 60.0)
    assert cut.num_layers == 1 and not cut.complete(shape)
    assert cut.attn[0] == whole.attn[0] and cut.mlp[0] == whole.mlp[0] and cut.skip[0] == whole.skip[0]
    monkeypatch.setattr(library_mod, "clock", real)
    resumed = measure(start=Library.from_dict(cut.to_dict()), deadline=real() + 60.0)
    assert resumed.complete(shape)
    assert (resumed.attn, resumed.mlp, resumed.skip, resumed.dense_nll) == (whole.attn, whole.mlp, whole.skip,
                                                                            whole.dense_nll)
    # rows of another measuring (other windows) are not resumed from: measured again from block 1
    other = measure(start=replace(cut, dense_nll=cut.dense_nll + 0.1, attn=((9.0,) * len(cut.attn[0]),)))
    assert other.attn == whole.attn


def _brute(lib, shape, space):
    per_block = [block_options(lib, shape, space, i) for i in range(shape.num_layers)]
    best = (math.inf, None)
    for combo in itertools.product(*per_block):
        kept = sum(o.width is not None for o in combo)
        if kept < space.min_layers:
            continue
        size = shape.fixed_params + sum(o.cost for o in combo)
        if not size <= space.hi_params:
            continue
        dmg = sum(o.damage for o in combo)
        if dmg < best[0]:
            best = (dmg, combo)
    return best


@pytest.mark.parametrize("target", [0.8, 0.6])
def test_solver_finds_the_brute_force_optimum(target):
    model = tiny_llama(0)
    shape, imp, order, win, lib = _library(model, "dims", True)
    space = make_space(shape, target, window=0.05, multiple=8, head_multiple=4, compensated=True)
    space = replace(space, width_options=space.width_options[::4] + (shape.intermediate_size,))  # brute force fits
    want, combo = _brute(lib, shape, space)
    sub = solve(lib, shape, space, order, bins=1 << 15)
    assert sub is not None
    assert space.contains(sub, shape) and sum(l is not None for l in sub.layers) >= space.min_layers
    assert lib.damage(sub, shape) == pytest.approx(want, abs=1e-9)
    # the coarse default grid is near it, and the subnet it names is the one its levels describe
    coarse = solve(lib, shape, space, order)
    assert space.contains(coarse, shape)
    assert lib.damage(coarse, shape) <= want + 0.02
    for i, o in enumerate(combo):
        if o.width is None:
            continue
        assert level_layer(lib.spec, order, i, shape, o.attn, o.width).width == o.width


# ---- the library in the search and in a finished run ----------------------------------------------
def _lm(model, shape):
    from explorer.model.loading import LoadedModel

    return LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu")


def _settings(**kw):
    from explorer.settings import SearchSettings

    base = dict(targets=(0.8, 0.6), head_multiple=4, population=4, generations=1, mutations=3, crossovers=2,
                fresh=1, top_k=3, window=0.01, latency=False, split_init=2, fitness_dtype="float32")
    base.update(kw)
    return SearchSettings.preset("demo", **base)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from explorer.search.run import run_search

    model = tiny_llama(0)
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(0)
    cal, fit = torch.randint(3, 97, (6, 24), generator=g), torch.randint(3, 97, (3, 24), generator=g)
    folder = tmp_path_factory.mktemp("lib") / "run"
    events = list(run_search(_lm(model, shape), _settings(), folder, windows=(cal, fit)))
    return model, shape, cal, fit, folder, events


def test_every_target_has_the_librarys_subnet_before_the_first_target_searches(searched):
    from explorer.events import CandidateEvaluated, SearchFinished
    from explorer.search.runs import open_run

    model, shape, cal, fit, folder, events = searched
    assert isinstance(events[-1], SearchFinished)
    cands = [e.candidate for e in events if isinstance(e, CandidateEvaluated)]
    assert cands[0].origin == "dense"
    first = cands[1:3]  # one per target, before anything else
    assert [c.target for c in first] == [0.8, 0.6]
    assert all(c.origin == "init" and c.metrics["init_scoring"] == "library" for c in first)
    lib = Library.load(folder / "library.json")
    for c in first:
        assert c.metrics["library_ppl"] == pytest.approx(lib.predicted_ppl(c.subnet, shape), rel=1e-3)
        assert c.compensated  # the search's own compensation
    run = open_run(folder)
    variants = [c for c in run.candidates() if c.metrics.get("init_scoring") == "library"]
    assert len(variants) > 2  # the library's other subnets seed each target too


def test_a_size_of_a_finished_run_is_solved_evaluated_and_stored_once(searched):
    from explorer.model.slicing import candidate_model
    from explorer.search.runs import RunError, open_run
    from explorer.search.sizes import RunLibrary, parse_size

    model, shape, cal, fit, folder, _ = searched
    lib = RunLibrary(_lm(model, shape), open_run(folder))
    lo, hi = lib.bounds()
    assert 0 < lo < 0.6 and hi == 1.0
    sol = lib.solve(0.7)
    assert sol.params <= 0.7 * shape.dense_params and sol.predicted_speedup is None
    before = len(open_run(folder).candidates())
    c = lib.pick(0.7, windows=fit)
    assert c.origin == "library" and c.subnet == sol.subnet and c.compensated
    run = open_run(folder)
    assert len(run.candidates()) == before + 1
    want = perplexity(candidate_model(model, c, run.means_of(c)), fit)
    assert c.fitness == pytest.approx(want, rel=1e-5)  # its real fitness, measured on the run's windows
    again = RunLibrary(_lm(model, shape), open_run(folder)).pick(0.7, windows=fit)
    assert again.id == c.id and len(open_run(folder).candidates()) == before + 1  # read back, not stored twice
    assert parse_size("library@0.65") == ("size", 0.65) and parse_size("library@65%") == ("size", 0.65)
    assert parse_size("library@1.5x") == ("speedup", 1.5)
    for bad in ("library@x", "library@0", "library@1.5", "library@0.5x"):
        with pytest.raises(RunError):
            parse_size(bad)
    from explorer.errors import ExplorerError

    with pytest.raises(ExplorerError):
        lib.solve(0.05)  # below what the space can reach: refused in one line


def test_a_budget_too_short_for_the_library_leaves_it_out_saying_so(searched, tmp_path, monkeypatch):
    from explorer.events import CandidateEvaluated, SearchFinished, StageProgress
    from explorer.search import loop
    from explorer.search.run import run_search

    model, shape, cal, fit, _, _ = searched
    monkeypatch.setattr(loop, "library_seconds", lambda *a: 1e6)
    events = list(run_search(_lm(model, shape), _settings(minutes=0.05), tmp_path / "r", windows=(cal, fit)))
    assert isinstance(events[-1], SearchFinished)
    notes = [e.message for e in events if isinstance(e, StageProgress) and e.stage == "library"]
    assert notes and "left out" in notes[0]
    assert not (tmp_path / "r" / "library.json").exists()
    assert not any(isinstance(e, CandidateEvaluated) and e.candidate.metrics.get("init_scoring") == "library"
                   for e in events)


def test_a_library_that_would_overrun_the_budget_is_cut_and_kept_for_the_next_search(searched, tmp_path,
                                                                                       monkeypatch):
    """Measuring starts (its estimate fits) but its first block's timing says it would not end within
    its share of the budget: it stops there, the search goes on without it, saying so, and the
    blocks measured are kept where the next search resumes from them."""
    from explorer.events import CandidateEvaluated, SearchFinished, StageProgress
    from explorer.search import library as library_mod
    from explorer.search import loop
    from explorer.search.run import run_search

    model, shape, cal, fit, _, _ = searched
    estimate = loop.library_seconds
    monkeypatch.setattr(loop, "library_seconds", lambda *a: 0.0)
    real = library_mod.clock
    monkeypatch.setattr(library_mod, "clock", lambda: real() + 1e4)
    folder = tmp_path / "r"
    events = list(run_search(_lm(model, shape), _settings(minutes=0.5), folder, windows=(cal, fit)))
    assert isinstance(events[-1], SearchFinished)
    notes = [e.message for e in events if isinstance(e, StageProgress) and e.stage == "library"]
    assert "left out of this search: 1 of 4 blocks measured" in notes[-1]
    assert not (folder / "library.json").exists()
    kept = Library.load(folder / "library.partial.json")
    assert kept.num_layers == 1
    # the next search's estimate of what is left comes from the kept block's own time
    work = library_mod.block_work(shape)
    left = estimate(_lm(model, shape), _settings(), 1e6, kept)
    assert left == pytest.approx(kept.seconds / work[0] * sum(work[1:]))
    assert not any(isinstance(e, CandidateEvaluated) and e.candidate.metrics.get("init_scoring") == "library"
                   for e in events)
    assert sum(isinstance(e, CandidateEvaluated) and e.candidate.origin == "search" for e in events) > 0


def test_a_predicted_speedup_is_met_with_the_least_damage(searched):
    """library@SPEEDUPx: the solver's subnet under a latency model meets the predicted speed-up, and no
    subnet it could have chosen among the same options with less damage is as fast (brute force)."""
    from explorer.search.latency_model import LatencyModel
    from explorer.search.runs import open_run
    from explorer.search.sizes import RunLibrary
    from explorer.search.solver import latency_cost

    model, shape, cal, fit, folder, _ = searched
    lib = RunLibrary(_lm(model, shape), open_run(folder))
    lib.latency = LatencyModel(fixed_ms=0.2, block_ms=0.05, per_mattn_ms=20.0, per_kwidth_ms=10.0, dense_ms=0.0,
                               device="cpu", speed={})
    dense = lib.latency.predict(Subnet.full(shape), shape)
    lib.latency = replace(lib.latency, dense_ms=dense)
    sol = lib.solve_speedup(1.3)
    assert sol.predicted_speedup >= 1.3 - 1e-9
    cost = latency_cost(lib.latency, shape)
    for l in sol.subnet.layers:
        if l is not None:
            assert cost(l.pairs, l.width) > 0
    space = make_space(shape, lib.bounds()[0], compensated=True, head_multiple=4)
    space = replace(space, width_options=space.width_options[::6] + (shape.intermediate_size,))
    per_block = [block_options(lib.library, shape, space, i, cost) for i in range(shape.num_layers)]
    best = min(sum(o.damage for o in combo) for combo in itertools.product(*per_block)
               if lib.latency.fixed_ms + sum(o.cost for o in combo) <= dense / 1.3
               and sum(o.width is not None for o in combo) >= space.min_layers)
    assert lib.library.damage(sol.subnet, shape) <= best + 1e-9  # at least as good as any coarser choice
