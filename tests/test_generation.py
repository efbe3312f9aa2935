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

    empty = Stream(done=True)
    assert stream_label("Pick A", empty, {"Pick A": empty}).endswith("done: the model's first token was end-of-text")
    running = Stream(text="w1 w2", tokens=2, seconds=1.0, steps=[0.5, 0.5])
    label = stream_label("Pick A", running, {"Pick A": running})
    assert label == "Pick A · 2 tokens · 2.0 tok/s" and "done" not in label
    done = Stream(text="w1", tokens=1, seconds=0.5, steps=[0.5], done=True)
    assert stream_label("Original", done, {"Original": done}) == "Original · 1 tokens · done"  # no rate from one token


def test_side_by_side_speeds_are_compared_over_the_same_tokens():
    """A model that stops after 7 tokens beside one that writes 64: both rates are over the first 7 tokens
    (the prompt's prefill in the first step left out), and a pick's label gives its ratio to the original."""
    from explorer.model.generation import Stream, common_length
    from explorer.ui.handlers import stream_label

    original = Stream(tokens=7, steps=[1.0] + [0.1] * 6, done=True)  # a slow prefill, then 10 tok/s
    pick = Stream(tokens=64, steps=[0.5] + [0.05] * 30 + [0.5] * 33)  # 20 tok/s early, slower later
    streams = {"Original": original, "Pick A": pick}
    assert common_length(streams) == 7
    assert abs(original.decode_rate(7) - 10.0) < 1e-9 and abs(pick.decode_rate(7) - 20.0) < 1e-9
    assert "20.0 tok/s (2.00× the original)" in stream_label("Pick A", pick, streams)
    assert "10.0 tok/s" in stream_label("Original", original, streams)
    assert Stream(tokens=1, steps=[1.0]).decode_rate(5) is None
