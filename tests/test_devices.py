"""`--device auto`: a model spread by accelerate's device map, with blocks (and lm_head) offloaded to
disk, searches, reforms, evaluates and exports exactly like the same model on one device."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_slicing import random_subnet

from explorer.events import SearchFinished
from explorer.model.loading import load_model
from explorer.model.perplexity import perplexity
from explorer.model.slicing import slice_model
from explorer.pick.reform import ReformSettings, reform
from explorer.search.run import run_search
from explorer.search.runs import open_run
from explorer.settings import SearchSettings

pytestmark = pytest.mark.slow  # needs the embedded model's tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory, embedded):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(7, vocab_size=embedded.shape.vocab_size, intermediate_size=2048, num_hidden_layers=6).save_pretrained(folder)
    embedded.tokenizer.save_pretrained(folder)
    plain = load_model(str(folder))
    embed_mb = plain.shape.vocab_size * plain.shape.hidden_size * 4 / 2**20
    block_mb = plain.shape.block_params(plain.shape.head_dim, plain.shape.intermediate_size) * 4 / 2**20
    # accelerate keeps room for the largest module (the 49k-row embedding) beside what it places, so this
    # keeps the embedding and about three blocks in memory and offloads the rest (lm_head too) to disk
    spread = load_model(str(folder), device="auto", max_memory=f"cpu={2 * embed_mb + 3.5 * block_mb:.2f}MB")
    return plain, spread


def test_the_map_really_offloads(pair):
    _, spread = pair
    where = spread.model.hf_device_map
    assert "disk" in where.values()
    assert any(where.get(f"model.layers.{i}") == "disk" for i in range(spread.shape.num_layers))
    assert spread.model.model.layers[-1].self_attn.q_proj.weight.device.type == "meta"  # not in memory


def test_same_search_candidates_and_fitness(pair, tmp_path):
    g = torch.Generator().manual_seed(0)
    windows = (torch.randint(3, 5000, (6, 24), generator=g), torch.randint(3, 5000, (3, 24), generator=g))
    s = SearchSettings.preset("demo", targets=(0.97,), head_multiple=4, population=4, generations=1, mutations=3,
                              crossovers=1, fresh=1, top_k=2, window=0.01, latency=False, split_init=2, seed=1)
    records = []
    for lm, name in zip(pair, ("plain", "spread")):
        events = list(run_search(lm, s, tmp_path / name, windows=windows))
        assert isinstance(events[-1], SearchFinished), events[-1]
        records.append([(c.id, c.origin, c.subnet.key(), round(c.metrics["fitness_nll"], 3))
                        for c in open_run(tmp_path / name).candidates()])
    assert records[0] == records[1] and len(records[0]) > 5


def test_same_slices_reformation_perplexity_and_verified_export(pair, tmp_path):
    from explorer.pick.export import export_subnet

    plain, spread = pair
    sub = random_subnet(plain.shape, 4, drop=(1,))
    g = torch.Generator().manual_seed(2)
    cal = torch.randint(3, 5000, (4, 32), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(slice_model(spread.model, sub, spread.shape)(cal).logits,
                                   slice_model(plain.model, sub, plain.shape)(cal).logits, atol=1e-5, rtol=0)
    a = reform(plain, sub, ReformSettings(batch_size=2), calib_windows=cal)
    b = reform(spread, sub, ReformSettings(batch_size=2), calib_windows=cal)
    assert a.digest == b.digest
    assert perplexity(spread.model, cal) == pytest.approx(perplexity(plain.model, cal), rel=1e-6)
    res = export_subnet(spread, b.model, sub, tmp_path / "out", {}, {}, make_zip=False,
                        reformed={"digest": b.digest, "settings": b.settings.to_dict()})
    assert res.verified and res.same_tokens and res.max_logit_diff <= 1e-4
