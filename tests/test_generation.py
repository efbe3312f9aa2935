"""Round-robin generation: same tokens as transformers' greedy generate, seeded sampling repeats."""
from __future__ import annotations

import pytest
import torch

from explorer.model.generation import DecodeSettings, GenerationError, token_stream
from explorer.model.slicing import slice_model
from explorer.model.subnet import ModelShape, Subnet


class WordTok:
    """A minimal tokenizer for the tiny model: token i <-> 'w{i}'."""

    eos_token_id = 2
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)

    def get_vocab(self):
        return {}

    def convert_tokens_to_ids(self, t):
        return None


def test_greedy_stream_matches_generate(tiny):
    sub = slice_model(tiny, Subnet.full(ModelShape.from_config(tiny.config)))
    prompt = torch.tensor([[5, 9, 11, 40]])
    s = DecodeSettings(max_new_tokens=8)
    *_, last = token_stream(sub, WordTok(), prompt, s)
    ref = tiny.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)[0, 4:].tolist()
    if 2 in ref:
        ref = ref[:ref.index(2)]
    assert last.text == WordTok().decode(ref)
    assert last.done


def test_sampling_is_seeded(tiny):
    prompt = torch.tensor([[5, 9, 11, 40]])
    a = list(token_stream(tiny, WordTok(), prompt, DecodeSettings(max_new_tokens=10, do_sample=True, seed=1)))[-1]
    b = list(token_stream(tiny, WordTok(), prompt, DecodeSettings(max_new_tokens=10, do_sample=True, seed=1)))[-1]
    assert a.text == b.text


@pytest.mark.parametrize("kw,msg", [({"max_new_tokens": 0}, "max new tokens"),
                                    ({"do_sample": True, "temperature": 0}, "temperature"),
                                    ({"do_sample": True, "top_p": 1.5}, "top-p")])
def test_absurd_settings_are_refused(kw, msg):
    with pytest.raises(GenerationError, match=msg):
        DecodeSettings(**kw).validate()


def test_a_box_says_why_it_is_empty():
    """A model whose first token is end-of-text gets a label that says so, not a blank box."""
    from explorer.model.generation import Stream
    from explorer.ui.handlers import stream_label

    assert stream_label("Pick A", Stream(done=True)).endswith("done: the model's first token was end-of-text")
    running = stream_label("Pick A", Stream(text="w1", tokens=1, seconds=0.5))
    assert running == "Pick A · 1 tokens · 2.0 tok/s" and "done" not in running
    assert stream_label("Original", Stream(text="w1", tokens=1, seconds=0.5, done=True)).endswith(" · done")
