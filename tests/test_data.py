"""Corpora: the deterministic BBC split, user files, and errors for text that cannot serve."""
from __future__ import annotations

import pytest
import torch

from explorer.calibrate.data import CorpusError, load_corpus, split_text, windows
from explorer.model.perplexity import perplexity


def test_bbc_split_is_disjoint_and_deterministic():
    c = load_corpus("bbc")
    assert 2100 < len(c.calibration) + len(c.heldout) <= 2225
    assert 400 < len(c.heldout) < 500
    assert not set(c.calibration) & set(c.heldout)
    load_corpus.cache_clear()
    assert load_corpus("bbc") == c


def test_windows_random_and_even():
    stream = torch.arange(1000)
    w = windows(stream, 100, 4, seed=3, what="x")
    assert w.shape == (4, 100) and torch.equal(w, windows(stream, 100, 4, seed=3, what="x"))
    assert not torch.equal(w, windows(stream, 100, 4, seed=4, what="x"))
    even = windows(stream, 100, 3, seed=None, what="x")
    assert even[:, 0].tolist() == [0, 400, 900]
    with pytest.raises(CorpusError, match="too short"):
        windows(torch.arange(50), 100, 1, seed=0, what="held-out")


@pytest.mark.parametrize("content,msg", [(b"", "empty"), (b"   \n\n ", "empty"), (b"\x00\x01\x02abc", "binary"),
                                         (b"caf\xe9 au lait " * 20, "not UTF-8")])
def test_bad_text_files(tmp_path, content, msg):
    f = tmp_path / "c.txt"
    f.write_bytes(content)
    with pytest.raises(CorpusError, match=msg):
        load_corpus(str(f))


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="no text file"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_user_text_split():
    text = "\n\n".join(f"paragraph {i} " * 5 for i in range(30))
    c = split_text(text, "mine.txt")
    assert len(c.heldout) == 3 and len(c.calibration) == 27
    short = split_text("just one paragraph of text " * 10, "short.txt")
    assert short.heldout and short.calibration


def test_hub_corpus_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="offline"):
        load_corpus("hf:wikitext-2")


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    assert perplexity(Uniform(), torch.randint(0, 50, (3, 17))) == pytest.approx(50, rel=1e-5)


@pytest.mark.slow
def test_embedded_heldout_perplexity_is_sane(embedded):
    from explorer.calibrate.data import heldout_windows

    held = heldout_windows(embedded.tokenizer, load_corpus("bbc"), 4, 256)
    ppl = perplexity(embedded.model, held)
    assert 8 < ppl < 80, ppl
