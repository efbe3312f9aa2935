"""Evolution operators respect the budget window and their claimed sizes; cheap fitness equals
the sliced model's perplexity; the search is reproducible, resumable after a cancel, and rejects
bad targets before any work; an end-to-end demo search on the embedded model yields a front."""
from __future__ import annotations

import random
import threading

import pytest
import torch
from conftest import tiny_llama

from explorer.calibrate.importance import compute_importance
from explorer.errors import ExplorerError
from explorer.events import CandidateEvaluated, FrontChanged, GenerationFinished, SearchCancelled, SearchFinished
from explorer.model.loading import LoadedModel
from explorer.model.perplexity import perplexity
from explorer.model.slicing import ChannelMeans, candidate_model, slice_model
from explorer.model.subnet import ModelShape
from explorer.search.evolution import crossover, mutate
from explorer.search.fitness import FitnessEvaluator, MaskedEvaluator
from explorer.search.initial import initial_subnet, snap
from explorer.search.run import run_search
from explorer.search.runs import open_run
from explorer.search.space import make_space
from explorer.settings import DEMO_MINUTES, Probs, SearchSettings


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(0)
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(0)
    cal, fit = torch.randint(3, 97, (6, 24), generator=g), torch.randint(3, 97, (3, 24), generator=g)
    imp = compute_importance(model, cal, shape)
    return model, shape, imp, cal, fit


def _real_params(model) -> int:
    seen = set()
    return sum(p.numel() for p in model.parameters() if not (p.data_ptr() in seen or seen.add(p.data_ptr())))


@pytest.mark.parametrize("target", [0.85, 0.6])
def test_mutation_and_crossover_stay_in_window_and_sizes_are_real(setup, target):
    model, shape, imp, _, _ = setup
    space = make_space(shape, target, window=0.01, multiple=8, head_multiple=4)
    rng = random.Random(0)
    parents = [snap(initial_subnet(imp, shape, target, 8, 4), imp, shape, space, rng)]  # onto the options
    rough = Probs(depth=0.2, ratio=0.5, mask=0.5)
    for n in range(40):
        if n % 3 == 2 and len(parents) > 1:
            child = crossover(*rng.sample(parents, 2), imp, shape, space, rng)
        else:
            child = mutate(rng.choice(parents), imp, shape, space, rng, rough)
        assert child is not None
        child.validate(shape)
        assert space.lo_params <= child.params(shape) <= space.hi_params
        assert sum(l is not None for l in child.layers) >= space.min_layers
        for layer in child.layers:
            if layer is not None:
                assert len(layer.attn_pairs[0]) in space.pair_options and layer.width in space.width_options
        assert _real_params(slice_model(model, child, shape)) == child.params(shape)  # the size it claims
        parents.append(child)
    assert len({p.key() for p in parents}) > 30  # the operators explore


def test_make_space_rejects_unreachable_targets(setup):
    _, shape, *_ = setup
    for bad in (0.0, 1.5, -0.2, 0.05):
        with pytest.raises(ExplorerError):
            make_space(shape, bad)


def test_fitness_matches_sliced_perplexity_with_reuse_and_early_stop(setup):
    model, shape, imp, _, fit = setup
    ev = FitnessEvaluator(model, shape, fit)
    a = initial_subnet(imp, shape, 0.7, 8, 4)
    want = perplexity(slice_model(model, a, shape), fit)
    r1 = ev.evaluate(a)
    assert r1.complete and r1.reused_blocks == 0
    assert r1.ppl == pytest.approx(want, rel=1e-5)
    assert MaskedEvaluator(model, shape, fit).evaluate(a) == pytest.approx(want, rel=1e-4)
    r2 = ev.evaluate(a)  # every block of every window reused, bitwise the same
    assert r2.nll == r1.nll and r2.computed_blocks == 0
    layers = list(a.layers)
    layers[-1] = initial_subnet(imp, shape, 0.9, 8, 4).layers[-1]  # differs only in the last block
    b = type(a)(tuple(layers))
    r3 = ev.evaluate(b)
    assert r3.reused_blocks == (shape.num_layers - 1) * len(fit)
    assert r3.ppl == pytest.approx(perplexity(slice_model(model, b, shape), fit), rel=1e-5)
    r4 = FitnessEvaluator(model, shape, fit).evaluate(b, bound=1e-3)  # cannot beat it: stops after one window
    assert not r4.complete and r4.windows_done == 1 and r4.ppl <= r3.ppl


def _lm(model, shape):
    return LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu")


def _settings(**kw):
    base = dict(targets=(0.8, 0.6), head_multiple=4, population=4, generations=1, mutations=3, crossovers=2,
                fresh=1, top_k=3, window=0.01, latency=False, split_init=2)
    base.update(kw)
    return SearchSettings.preset("demo", **base)


def _collect(events):
    return list(events)


def test_search_is_reproducible_and_yields_fronts(setup, tmp_path):
    model, shape, _, cal, fit = setup
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        evs = _collect(run_search(_lm(model, shape), _settings(seed=seed, targets=(0.7,)), tmp_path / name,
                                  windows=(cal, fit)))
        assert isinstance(evs[-1], SearchFinished)
        assert any(isinstance(e, GenerationFinished) for e in evs) and any(isinstance(e, FrontChanged) for e in evs)
        runs.append([(c.id, c.subnet.key(), c.metrics["fitness_ppl"]) for c in open_run(tmp_path / name).candidates()])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    run = open_run(tmp_path / "a")
    origins = {c.origin for c in run.candidates()}
    assert {"dense", "init", "search", "baseline:magnitude", "baseline:wanda-sp", "baseline:flap"} <= origins
    assert run.status == "finished" and run.fronts()["params"]


def test_the_pick_is_the_best_of_the_top_few_rescored_on_fresh_windows(setup, tmp_path):
    """search.select: the best `select_top` by fitness are re-scored on the selection windows; each
    score equals the perplexity of that candidate's sliced model on those windows (computed here by
    the sliced model's own forward, not the search's evaluator), and the pick, the summary and
    best@ are the lowest of them."""
    model, shape, _, cal, fit = setup
    sel = torch.randint(3, 97, (4, 24), generator=torch.Generator().manual_seed(5))
    evs = _collect(run_search(_lm(model, shape), _settings(targets=(0.7,), select_top=3, fitness_dtype="float32"), tmp_path / "r",
                              windows=(cal, fit, sel)))
    done = [e for e in evs if isinstance(e, SearchFinished)][0]
    run = open_run(tmp_path / "r")
    rescored = [c for c in run.candidates() if "selection_ppl" in c.metrics]
    assert len(rescored) == 3
    ranked = sorted((c for c in run.candidates() if c.origin in ("search", "init") and c.fitness < float("inf")),
                    key=lambda c: (c.fitness, c.id))
    assert {c.id for c in rescored} <= {c.id for c in ranked[:3 + 2]}  # the elite's best (ties by nll/id)
    means = ChannelMeans.load(tmp_path / "r" / "channel_means.safetensors")
    for c in rescored:
        assert c.metrics["selection_ppl"] == pytest.approx(perplexity(candidate_model(model, c, means), sel), rel=1e-5)
    pick = min(rescored, key=lambda c: (c.metrics["selection_ppl"], c.id))
    assert run.pick("best@0.7").id == pick.id == done.summary["best"]["0.7"]["id"]


def test_resume_after_cancel_continues_without_reevaluating(setup, tmp_path):
    model, shape, _, cal, fit = setup
    full = _collect(run_search(_lm(model, shape), _settings(), tmp_path / "full", windows=(cal, fit)))
    cancel = threading.Event()
    seen = 0
    events = run_search(_lm(model, shape), _settings(), tmp_path / "cut", cancel=cancel, windows=(cal, fit))
    for ev in events:
        if isinstance(ev, CandidateEvaluated):
            seen += 1
            if seen == 14:
                cancel.set()
    assert isinstance(ev, SearchCancelled)
    assert open_run(tmp_path / "cut").status == "cancelled"
    stored = len(open_run(tmp_path / "cut").candidates())
    assert stored == 14
    resumed = _collect(run_search(_lm(model, shape), _settings(targets=(0.5,)), tmp_path / "cut", resume=True,
                                  windows=(cal, fit)))
    assert isinstance(resumed[-1], SearchFinished)
    replayed = [e for e in resumed if isinstance(e, CandidateEvaluated) and e.replayed]
    assert len(replayed) == stored  # nothing stored was evaluated again
    assert isinstance(full[-1], SearchFinished)
    done = resumed[-1].summary
    assert done["replayed"] == stored
    assert done["evaluated"] + done["copied"] == len(open_run(tmp_path / "full").candidates()) - stored
    key = lambda run: [(c.id, c.subnet.key(), c.metrics["fitness_ppl"]) for c in run.candidates()]  # noqa: E731
    assert key(open_run(tmp_path / "cut")) == key(open_run(tmp_path / "full"))


@pytest.mark.parametrize("targets", [(), (0.0,), (1.2,), (0.7, float("nan")), (0.05,)])
def test_bad_targets_fail_before_any_work(setup, tmp_path, targets):
    model, shape, _, cal, fit = setup
    with pytest.raises(ExplorerError):
        run_search(_lm(model, shape), _settings(targets=targets), tmp_path / "bad", windows=(cal, fit))
    assert not (tmp_path / "bad").exists()


def test_a_budget_far_smaller_than_one_generation_holds(setup, tmp_path, monkeypatch):
    """A budget is read between candidates, not generations: with every evaluation slowed to 0.15 s
    (a loaded machine), a first generation of 20 children (3 s) and a 0.6 s budget, the search ends
    within the budget plus one candidate per target, each target with its best (at least the
    method's own initial subnet), its selection re-scoring only what fits, and no generation
    numbered out of order."""
    import time

    slow = 0.15
    evaluate = FitnessEvaluator.evaluate

    def slowed(self, *a, **k):
        time.sleep(slow)
        return evaluate(self, *a, **k)

    monkeypatch.setattr(FitnessEvaluator, "evaluate", slowed)
    model, shape, _, cal, fit = setup
    s = _settings(targets=(0.8, 0.6), population=20, generations=59, minutes=0.01)
    t0 = time.perf_counter()
    evs = _collect(run_search(_lm(model, shape), s, tmp_path / "budget", windows=(cal, fit, fit)))
    wall = time.perf_counter() - t0
    assert isinstance(evs[-1], SearchFinished), evs[-1]
    assert wall < 0.6 + 2 * slow + 1.0, wall  # the budget, one candidate per target, set-up and the tiny model
    run = open_run(tmp_path / "budget")
    assert set(evs[-1].summary["best"]) == {"0.8", "0.6"} and run.status == "finished"
    for target in (0.8, 0.6):
        mine = [c for c in run.candidates() if c.target == target]
        assert any(c.origin == "init" for c in mine) and len(mine) < 20  # not even one generation's children
        assert run.pick(f"best@{target}").target == target
        gens = [e.generation for e in evs if isinstance(e, GenerationFinished) and e.target == target]
        assert gens == list(range(1, len(gens) + 1))
    assert all(e.generations == 0 for e in evs if isinstance(e, GenerationFinished))  # the clock decides


def test_a_machines_first_budgeted_search_fits_its_latency_model_after_the_budget(setup, tmp_path, monkeypatch):
    """The demo preset has a time budget; on a machine without a latency model its first search
    still ends with latencies: the model is fitted once after the budget, saying so, and cached; the
    front's real timing, which the spent budget has no room for, is skipped, saying so."""
    from explorer.events import StageProgress

    monkeypatch.setenv("SUBNET_EXPLORER_CACHE", str(tmp_path / "cache"))  # this "machine" has no latency model
    model, shape, _, cal, fit = setup
    evs = _collect(run_search(_lm(model, shape), _settings(targets=(0.7,), minutes=0.002, latency=True),
                              tmp_path / "r", windows=(cal, fit)))
    assert isinstance(evs[-1], SearchFinished), evs[-1]
    said = [e.message for e in evs if isinstance(e, StageProgress) and e.stage == "latency"]
    assert any("fitting it once, after the time budget" in m for m in said), said
    assert any("measuring the front skipped" in m for m in said), said
    assert evs[-1].summary["latency_model"] is not None
    assert open_run(tmp_path / "r").fronts()["latency"]  # the front in predicted latency exists
    assert list((tmp_path / "cache").rglob("*.json"))  # cached: the next search reads it


@pytest.mark.parametrize("minutes", [0, -1, "five"])
def test_bad_time_budget_fails_before_any_work(setup, tmp_path, minutes):
    model, shape, _, cal, fit = setup
    with pytest.raises(ExplorerError, match="time budget"):
        run_search(_lm(model, shape), _settings(minutes=minutes), tmp_path / "bad", windows=(cal, fit))
    assert not (tmp_path / "bad").exists()


def test_presets_and_overrides():
    paper = SearchSettings.preset("paper")
    assert (paper.population, paper.generations, paper.top_k) == (100, 50, 10)
    assert SearchSettings.preset("demo", generations=7).generations == 7
    # the demo preset is a talk's time budget (its generations a cap); the paper's runs its generations
    assert SearchSettings.preset("demo").minutes == DEMO_MINUTES and paper.minutes is None
    with pytest.raises(ExplorerError):
        SearchSettings.preset("demo", no_such_field=1)
    with pytest.raises(ExplorerError):
        SearchSettings.preset("huge")
    s = SearchSettings.preset("paper", seed=3)
    assert SearchSettings.from_dict(s.to_dict()) == s


@pytest.mark.slow
def test_demo_search_on_embedded_model_yields_front(embedded, tmp_path):
    s = SearchSettings.preset("demo", targets=(0.7,), calib_windows=2, calib_seq_len=64, fitness_windows=1,
                              fitness_seq_len=64, population=2, generations=0, top_k=2, split_init=1,
                              baselines=("magnitude",), latency=False)
    events = list(run_search(embedded, s, tmp_path / "run"))
    assert isinstance(events[-1], SearchFinished), events[-1]
    run = open_run(tmp_path / "run")
    front = run.fronts()["params"]
    assert len(front) >= 2  # the dense model and at least one 70 % subnet
    best = run.pick("best@0.7")
    assert best.metrics["fraction"] <= 0.7 and best.fitness < run.pick(
        [c.id for c in run.candidates() if c.origin == "baseline:magnitude"][0]).fitness


@pytest.mark.slow
def test_reformation_aware_search_on_embedded_model(embedded, tmp_path):
    """End to end on the real model: a search ranked by pre-reformed levels finishes, every searched
    candidate is made of levels, and its fitness is the perplexity of the sliced model with the
    levels' o_proj / down_proj written in, computed here the plain way (slice, write, perplexity)."""
    from explorer.model.loading import cache_root
    from explorer.model.slicing import candidate_model
    from explorer.pick.reform import ReformSettings
    from explorer.search.calibration import calibrate
    from explorer.search.ladders import LADDER_SCORING, Ladders, LadderSpec

    s = SearchSettings.preset("demo", targets=(0.7,), calib_windows=4, calib_seq_len=128, fitness_windows=1,
                              fitness_seq_len=64, population=3, generations=1, mutations=2, crossovers=1, fresh=1,
                              top_k=2, split_init=1, baselines=("flap",), latency=False, fitness_mode="reformed",
                              fitness_dtype="float32")
    events = list(run_search(embedded, s, tmp_path / "run"))
    assert isinstance(events[-1], SearchFinished), events[-1]
    assert any(getattr(e, "stage", "") == "ladders" for e in events)  # the ladder stage showed progress
    run = open_run(tmp_path / "run")
    best = run.pick("best@0.7")
    assert best.metrics["fitness_reformed"] and best.metrics["fraction"] <= 0.7

    (tmp_path / "again").mkdir()
    cal = [x for x in calibrate(embedded, s, tmp_path / "again", cache_dir=cache_root() / "importance")][-1]
    spec = LadderSpec.of(embedded.shape, s.head_multiple, s.multiple, s.ladder_mlp_levels)
    items = list(cal.ladders(embedded.model, embedded.shape, spec, LADDER_SCORING, ReformSettings()))
    assert "reused from the cache" in items[0].message
    ladders = items[-1]
    assert isinstance(ladders, Ladders)
    model = candidate_model(embedded.model, best, cal.means)
    kept = [i for i, l in enumerate(best.subnet.layers) if l is not None]
    with torch.no_grad():
        for j, i in enumerate(kept):
            for name, t in ladders.overrides(i, best.subnet.layers[i]).items():
                target = model.model.layers[j].get_submodule(name.rsplit(".", 1)[0])
                getattr(target, name.rsplit(".", 1)[1]).copy_(t)
    assert perplexity(model, cal.fitness) == pytest.approx(best.fitness, rel=2e-3)


@pytest.mark.slow
def test_prepare_builds_what_a_search_reads_so_its_budget_is_spent_searching(embedded, tmp_path, monkeypatch):
    """bench/quality.py gives every search mode the same minutes: `prepare` puts the calibration pass,
    the baselines and the ladders into the cache first, and the timed search then reads all three
    instead of computing them (checked by what its progress says and by the baselines it scores)."""
    from explorer.events import StageProgress
    from explorer.search.run import prepare

    monkeypatch.setenv("SUBNET_EXPLORER_CACHE", str(tmp_path / "cache"))  # nothing cached before
    s = SearchSettings.preset("demo", targets=(0.7,), calib_windows=4, calib_seq_len=64, fitness_windows=1,
                              fitness_seq_len=64, population=2, generations=0, top_k=2, split_init=1,
                              baselines=("flap", "wanda-sp"), latency=False, select_top=0,
                              fitness_mode="reformed", ladder_mlp_levels=2, fitness_dtype="float32")
    built = [e for e in prepare(embedded, s, tmp_path / "prepared") if isinstance(e, StageProgress)]
    assert {e.stage for e in built} >= {"importance", "ladders"}
    assert not any("reused from the cache" in e.message for e in built)  # it computed them
    events = list(run_search(embedded, s, tmp_path / "run"))
    assert isinstance(events[-1], SearchFinished), events[-1]
    said = {e.stage: e.message for e in events if isinstance(e, StageProgress) and e.done == e.total}
    assert "reused from the cache" in said["importance"] and "reused from the cache" in said["ladders"]
    assert not any("pre-reforming" in e.message for e in events if isinstance(e, StageProgress))
    # the baselines the search scored are the prepared ones, read back (Wanda-sp's sequential pass not rerun)
    from explorer.search.calibration import calibrate

    (tmp_path / "check").mkdir()
    cal = list(calibrate(embedded, s, tmp_path / "check", cache_dir=tmp_path / "cache" / "importance"))[-1]
    run = open_run(tmp_path / "run")
    for name in ("flap", "wanda-sp"):
        res, read = cal.baseline(name, embedded.model, embedded.shape, 0.7)
        assert read and res.subnet == [c for c in run.candidates() if c.origin == f"baseline:{name}"][0].subnet


@pytest.mark.slow
def test_a_fresh_install_reads_the_shipped_runs_baselines(embedded, tmp_path):
    """The demo's first seconds: on an empty cache the shipped run's importance pass and its baseline
    subnets (Wanda-sp's sequential pass is the slow one) are read, not computed, and they are the
    shipped run's own baseline candidates."""
    from explorer.search.calibration import calibrate
    from explorer.search.runs import SHIPPED_RUNS

    shipped = SHIPPED_RUNS / "smollm2-135m-demo"
    s = SearchSettings.preset("demo")
    (tmp_path / "run").mkdir()
    items = list(calibrate(embedded, s, tmp_path / "run", cache_dir=tmp_path / "cache", seeds=(shipped,)))
    cal = items[-1]
    assert cal.from_cache and "reused from the cache" in items[0].message
    stored = {(c.origin, c.target): c for c in open_run(shipped).candidates() if c.origin.startswith("baseline:")}
    for name in ("wanda-sp", "flap"):
        res, read = cal.baseline(name, embedded.model, embedded.shape, 0.7)
        assert read and res.subnet == stored[(f"baseline:{name}", 0.7)].subnet


@pytest.mark.parametrize("stage", ["latency model", "selection", "library"])
def test_stop_ends_every_phase_of_a_search_within_seconds(setup, tmp_path, monkeypatch, stage):
    """Stop during a machine's first latency fit (timed in a worker thread), while the level library is
    measured, or during the final re-scoring ends the search as stopped within seconds, keeping what it
    found (the dense model at least)."""
    import threading
    import time

    from explorer.events import StageProgress

    monkeypatch.setenv("SUBNET_EXPLORER_CACHE", str(tmp_path / "cache"))  # no latency model yet
    model, shape, _, cal, fit = setup
    cancel = threading.Event()
    s = _settings(targets=(0.7,), minutes=None, generations=1, latency=stage == "latency model", select_top=4)
    pressed, evs = None, []
    for ev in run_search(_lm(model, shape), s, tmp_path / "r", cancel=cancel, windows=(cal, fit, fit)):
        evs.append(ev)
        if pressed is None and isinstance(ev, StageProgress) and ev.stage == stage:
            pressed = time.perf_counter()
            cancel.set()
    assert pressed is not None, f"no {stage} phase"
    assert isinstance(evs[-1], SearchCancelled) and time.perf_counter() - pressed < 10
    assert open_run(tmp_path / "r").status == "cancelled" and open_run(tmp_path / "r").candidates()
