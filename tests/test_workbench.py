"""The application layer, every user action without a browser: on a tiny random model saved as a
model folder (with the embedded model's tokenizer), so each call runs for real in seconds."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from explorer.app.workbench import AppSettings, Busy, Reformation, Workbench, model_key
from explorer.calibrate.data import calibration_windows, load_corpus
from explorer.errors import ExplorerError
from explorer.events import SearchFinished, SearchStarted
from explorer.model.cores import FULL_THREADS
from explorer.model.generation import DecodeSettings
from explorer.model.perplexity import perplexity
from explorer.model.subnet import uniform_subnet
from explorer.pick.evaluation import EvalSettings
from explorer.pick.reform import ReformSettings
from explorer.search.runs import RunError

pytestmark = pytest.mark.slow  # needs the embedded model's tokenizer

SETTINGS = dict(calib_windows=4, calib_seq_len=64, fitness_windows=2, fitness_seq_len=64, population=4, generations=1,
                mutations=2, crossovers=1, fresh=1, top_k=2, head_multiple=4, window=0.02, split_init=2, latency=False,
                fitness_dtype="float32")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, embedded):
    base = tmp_path_factory.mktemp("wb")
    folder = base / "tiny"
    # tied embeddings and a wide MLP, so the 49k-token embedding is half the model, not nearly all of it
    tiny_llama(11, vocab_size=embedded.shape.vocab_size, tie_word_embeddings=True,
               intermediate_size=4096).save_pretrained(folder)
    embedded.tokenizer.save_pretrained(folder)
    wb = Workbench(base / "runs", base / "exports", AppSettings(heldout_windows=1, seq_len=64,
                                                                  reform=ReformSettings(windows=2, seq_len=64),
                                                                  max_subnets=2),
                   shipped_runs=None)
    key = model_key(str(folder))
    lm, dense = wb.load(key)
    assert dense["heldout_ppl"] > 1 and dense["decode_tok_s"] > 0
    events = []
    for ev in wb.search("tab", key, wb.search_settings("demo", (0.9,), SETTINGS), "r1"):
        events.append(ev)
        if isinstance(ev, SearchFinished):  # whoever is told "finished" may start the next job at once
            with wb.job("another tab", key, "reformation"):
                pass
    assert isinstance(events[0], SearchStarted) and isinstance(events[-1], SearchFinished), events[-1]
    return wb, key, lm


def test_a_refused_search_creates_nothing(bench):
    wb, key, _ = bench
    before = wb.runs()
    with pytest.raises(ExplorerError, match="outside"):
        wb.search("tab", key, wb.search_settings("demo", (1.5,), SETTINGS), "never")
    with pytest.raises(ExplorerError, match="not a valid run name"):
        wb.search("tab", key, wb.search_settings("demo", (0.9,), SETTINGS), "../x")
    with pytest.raises(RunError, match="exists already"):
        wb.search("tab", key, wb.search_settings("demo", (0.9,), SETTINGS), "r1")
    assert wb.runs() == before and not (wb.runs_root / "never").exists()


def test_a_flap_pick_has_the_fitness_it_was_archived_with(bench):
    """The FLAP point's model (compensation rebuilt from the run's channel means) scores on the
    fitness windows exactly what the search stored."""
    wb, key, lm = bench
    run = wb.open("r1")
    flap = next(c for c in run.candidates() if c.origin == "baseline:flap")
    assert flap.compensated
    fit = calibration_windows(lm.tokenizer, load_corpus("bbc"), 2, 64, seed=1)
    assert perplexity(wb.sliced(key, wb.pick("r1", flap.id)), fit) == pytest.approx(flap.fitness, rel=1e-5)
    search = next(c for c in run.candidates() if c.origin == "search")
    assert search.compensated  # the search compensates by default, and its picks carry it too
    assert perplexity(wb.sliced(key, wb.pick("r1", search.id)), fit) == pytest.approx(search.fitness, rel=1e-5)


def test_reformed_means_reformed_even_after_the_cache_let_it_go(bench, tmp_path):
    wb, key, _ = bench
    run = wb.open("r1")
    ids = [c.id for c in run.candidates() if c.origin == "search"][:3]
    r = wb.reform("tab", key, wb.pick("r1", ids[0]))
    assert isinstance(r, Reformation) and r.ppl_after > 0
    for cid in ids[1:]:  # two more models push the reformed one out (the cache holds two)
        wb.sliced(key, wb.pick("r1", cid))
    assert len(wb.subnets) == 2
    p = wb.pick("r1", ids[0])
    model = wb.model_of(key, p, r)  # recomputed, and it must reproduce the digest
    from explorer.pick.reform import reformed_digest, reformed_sketch, same_sketch

    assert reformed_digest(model) == r.digest
    res = wb.export("tab", key, p, tmp_path / "e", r, make_zip=False)
    record = json.loads((Path(res.path) / "export.json").read_text())
    assert res.verified and record["provenance"]["reformed"] and record["provenance"]["reform_digest"] == r.digest
    other = Reformation(**{**r.to_dict(), "digest": "0" * 16, "sketch": tuple(1.01 * x for x in r.sketch)})
    with pytest.raises(ExplorerError, match="gave other weights"):  # another reformation's weights: refused
        wb.model_of(key, p, other)
    torch.set_num_threads(1)  # the same reformation summed in another order: its sketch still matches
    try:
        again = Reformation(**{**r.to_dict(), "digest": "another-order"})
        one_thread = wb.model_of(key, p, again)  # accepted: not refused as "other weights"
        assert same_sketch(reformed_sketch(one_thread), r.sketch)
    finally:
        torch.set_num_threads(FULL_THREADS)


def _logits(model, lm):
    ids = lm.tokenizer("The history of the city begins", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_a_pick_exported_reopens_from_its_subnet_file_as_the_same_model(bench, tmp_path, capsys):
    """run pick -> export -> the export's subnet.json opened (the app's path and the CLI's) -> the same
    logits, bit for bit: its compensation travels in the file. Reformed too: the file records the
    reformation, which is reproduced and checked. The CLI's re-export from the file holds the same
    weights as the first export, and verifies against the compensated reference."""
    from safetensors.torch import load_file

    from explorer.app.cli import main

    wb, key, lm = bench
    c = next(c for c in wb.open("r1").candidates() if c.origin == "search" and c.compensated)
    p = wb.pick("r1", c.id)
    first = wb.export("tab", key, p, tmp_path / "first", make_zip=False)
    opened, r = wb.open_subnet_file(key, Path(first.path) / "subnet.json")
    assert r is None and opened.candidate.compensated and opened.candidate.subnet == c.subnet
    assert torch.equal(_logits(wb.model_of(key, opened, None), lm), _logits(wb.sliced(key, p), lm))
    plain = tmp_path / "plain.json"  # the same subnet without its compensation is another model
    plain.write_text(c.subnet.to_json())
    assert not torch.allclose(_logits(wb.model_of(key, wb.open_subnet_file(key, plain)[0], None), lm),
                              _logits(wb.sliced(key, p), lm))

    code = main(["export", "--subnet", str(Path(first.path) / "subnet.json"), "--model", key[0], "--out",
                 str(tmp_path / "again"), "--heldout-windows", "0", "--no-zip"])
    assert code == 0, capsys.readouterr().err
    a, b = load_file(Path(first.path) / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "export.json").read_text())["provenance"]["compensated"]

    r = wb.reform("tab", key, p)
    reformed = wb.export("tab", key, p, tmp_path / "reformed", r, make_zip=False)
    opened, r2 = wb.open_subnet_file(key, Path(reformed.path) / "subnet.json")
    assert r2 is not None and r2.digest == r.digest
    # the reformation is recomputed from its record: on the same thread count bit for bit, and on another (the
    # machine's share of cores changes when another program runs) within float rounding of the sums
    got, want = _logits(wb.model_of(key, opened, r2), lm), _logits(wb.model_of(key, p, r), lm)
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_a_reformed_pick_is_evaluated_reformed(bench):
    """reform -> evaluate -> the reformed figures: with the tab's reformation the held-out perplexity is
    the one reformation measured after (the same windows), stored as the reformed model's."""
    wb, key, _ = bench
    cid = [c.id for c in wb.open("r1").candidates() if c.origin == "search"][-1]
    p = wb.pick("r1", cid)
    r = wb.reform("tab", key, p)
    res = wb.evaluate("tab", key, p, replace(wb.settings.eval, tasks=("ppl",)), r)
    assert res.ppl == r.ppl_after and res.ppl != r.ppl_before
    assert wb.pick("r1", cid).candidate.metrics["reformed_heldout_ppl"] == r.ppl_after


def test_evaluate_measure_generate_and_upload(bench, tmp_path):
    wb, key, lm = bench
    cid = next(c.id for c in wb.open("r1").candidates() if c.origin == "search")
    res = wb.evaluate("tab", key, wb.pick("r1", cid), EvalSettings(tasks=("ppl",), heldout_windows=1, seq_len=64))
    assert math.isfinite(res.ppl) and wb.pick("r1", cid).candidate.metrics["heldout_ppl"] == res.ppl
    m = wb.measure("tab", key, [(wb.pick("r1", cid), None)])[cid]
    assert m.speedup > 0 and m.rounds >= 3
    assert wb.pick("r1", cid).candidate.metrics["measured_speedup"] == round(m.speedup, 4)  # annotated in the run
    streams = list(wb.generate(key, {"Original": lm.model, "pick": wb.sliced(key, wb.pick("r1", cid))},
                               "Hello", DecodeSettings(max_new_tokens=3, chat_template=False)))
    assert streams[-1]["pick"].done and streams[-1]["Original"].done
    f = tmp_path / "sub.json"
    f.write_text(uniform_subnet(lm.shape, 0.5, 0.5, multiple=64).to_json())
    p, r = wb.open_subnet_file(key, f)
    c = p.candidate
    assert p.run.startswith("uploads-") and c.origin == "upload" and r is None and not c.compensated
    assert wb.open_subnet_file(key, f)[0].candidate.id == c.id  # the same file is the same candidate
    f.write_text("{not json")
    with pytest.raises(ExplorerError, match="not valid JSON"):
        wb.open_subnet_file(key, f)


def test_one_heavy_job_per_tab_and_model_and_stop(bench):
    wb, key, _ = bench
    with wb.job("a", key, "search") as cancel:
        with pytest.raises(Busy, match="already running"):
            with wb.job("a", key, "export"):
                pass
        with pytest.raises(Busy, match="busy with another job"):
            with wb.job("b", key, "export"):
                pass
        assert wb.stop("b") is None and wb.stop("a") == "search" and cancel.is_set()
    with wb.job("b", key, "export"):  # free again
        pass


def test_a_new_page_opens_the_shipped_demo(tmp_path):
    wb = Workbench(tmp_path / "runs", tmp_path / "exports")
    assert wb.default_run() == "smollm2-135m-demo"
    (tmp_path / "runs" / "uploads-x").mkdir(parents=True)
    (tmp_path / "runs" / "uploads-x" / "run.json").write_text("{}")
    assert wb.runs()[0] == "uploads-x" and wb.default_run() == "smollm2-135m-demo"  # never the newest upload
