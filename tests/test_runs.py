"""The run directory: JSONL round trip, replay without a model, picks, fronts, safe names, CLI."""
from __future__ import annotations

import json

import pytest

from explorer.app.cli import main
from explorer.model.subnet import ModelShape, Subnet, uniform_subnet
from explorer.search.pareto import pareto_front
from explorer.search.runs import Candidate, RunError, create_run, open_run, run_path

SHAPE = ModelShape(num_layers=2, hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=32,
                   vocab_size=50)


def _cand(i, target, ppl, keep, origin="search", **metrics):
    sub = uniform_subnet(SHAPE, keep, keep, multiple=4)
    m = {"params": sub.params(SHAPE), "fraction": sub.fraction(SHAPE), "fitness_ppl": ppl,
         "predicted_latency_ms": 10 * keep, **metrics}
    return Candidate(f"c{i:05d}", target, 1, origin, sub, m)


@pytest.fixture
def run(tmp_path):
    r = create_run(tmp_path / "r", {"model": "tiny", "targets": [0.9, 0.7], "seed": 0}, SHAPE)
    for c in (_cand(0, 1.0, 10.0, 1.0, "dense"), _cand(1, 0.9, 20.0, 0.9), _cand(2, 0.9, 15.0, 0.9),
              _cand(3, 0.7, 40.0, 0.6), _cand(4, 0.7, 30.0, 0.6, fitness_lower_bound=True),
              _cand(5, 0.7, 50.0, 0.6, "baseline:flap"), _cand(6, 0.7, 90.0, 0.75)):
        r.append(c)
    return r


def test_candidates_round_trip_and_replay_without_model(run):
    again = open_run(run.path)
    cands = again.candidates()
    assert [c.id for c in cands] == [f"c{i:05d}" for i in range(7)]
    assert cands[1] == Candidate.from_dict(json.loads(json.dumps(cands[1].to_dict())))
    assert again.settings["model"] == "tiny" and again.shape == SHAPE and again.status == "running"


def test_torn_last_line_is_skipped(run):
    with open(run.path / "candidates.jsonl", "a") as f:
        f.write('{"id": "c9", "tar')
    assert len(open_run(run.path).candidates()) == 7


def test_pick_by_id_and_best_at_target(run):
    assert open_run(run.path).pick("best@0.7").id == "c00003"  # c4 only has a lower bound; baselines excluded
    assert open_run(run.path).pick("best@0.9").id == "c00002"
    assert isinstance(open_run(run.path).pick("c00001").subnet, Subnet) and open_run(run.path).settings["seed"] == 0
    assert open_run(run.path).pick("baseline:flap@0.7").id == "c00005"
    for bad in ("best@0.5", "best@x", "nope", "baseline:flap@0.9", "baseline:flap@x"):
        with pytest.raises(RunError):
            open_run(run.path).pick(bad)


def test_fronts_and_annotations(run):
    fronts = open_run(run.path).fronts()
    # by params: the 0.6-wide ones (c3 best of them), then 0.9 (c2), then dense; c6 is dominated
    assert fronts["params"] == ["c00003", "c00002", "c00000"]
    run.annotate("c00003", {"measured_latency_ms": 5.5})
    c3 = [c for c in open_run(run.path).candidates() if c.id == "c00003"][0]
    assert c3.metrics["measured_latency_ms"] == 5.5 and c3.metrics["fitness_ppl"] == 40.0


def test_pareto_front_minimal():
    pts = [(1, 9), (2, 5), (3, 7), (4, 1), (4, 3), (5, 2)]
    assert pareto_front(pts, lambda p: p[0], lambda p: p[1]) == [(1, 9), (2, 5), (4, 1)]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", ".hidden", "x" * 101, "a\\b", "/etc"])
def test_run_names_cannot_escape(tmp_path, name):
    with pytest.raises(RunError):
        run_path(name, tmp_path)


def test_run_name_ok_and_no_overwrite(tmp_path, run):
    assert run_path("demo-1.a_b", tmp_path) == (tmp_path / "demo-1.a_b").resolve()
    with pytest.raises(RunError):
        create_run(run.path, {}, SHAPE)
    with pytest.raises(RunError):
        open_run(tmp_path / "missing")


def test_cli_front_table_and_json(run, capsys):
    assert main(["front", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "quality vs parameters" in out and "c00003" in out
    assert main(["front", str(run.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in data["fronts"]["params"]] == ["c00003", "c00002", "c00000"]
    assert main(["front", str(run.path / "nope")]) == 2
