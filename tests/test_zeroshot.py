"""Zero-shot scoring: exact log-likelihoods on the tiny Llama, lm-eval's rules, and the real model."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from explorer.model.slicing import slice_model
from explorer.model.subnet import ModelShape, Subnet
from explorer.pick.zeroshot import (
    TASKS,
    Item,
    ZeroShotError,
    canonical_task,
    continuation_logprobs,
    encode_pair,
    evaluate_task,
    evaluate_tasks,
    load_items,
    score,
    select,
)

WORDS = ("the cat sat on mat dog ran to a park yes no question answer : is it red blue sky grass green "
         "water wet dry fire hot cold ice").split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A hand-made word-level tokenizer over WORDS (ids 3..), whitespace split, for the tiny model."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def reference_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """Written out by hand: one unpadded forward pass, sum of log p(cont_j | ctx, cont_<j)."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


ITEMS = [  # contexts, continuations, gold
    (("question : is the sky blue answer :",) * 2, (" yes", " no"), 0),
    (("the cat sat on the",) * 3, (" mat", " dog ran to a park", " fire"), 2),
    (("the dog ran to", "the cat ran to"), (" a park", " a park"), 1),  # WinoGrande-style: contexts differ
    (("is water wet",) * 4, (" yes it is", " no", " it is dry", " cold ice"), 3),
]


def test_logprobs_match_hand_computed_on_tiny_model():
    model, tok = tiny_llama(seed=3), word_tokenizer()
    pairs = [encode_pair(tok, c, k) for ctxs, conts, _ in ITEMS for c, k in zip(ctxs, conts)]
    expected = [reference_logprob(model, c, k) for c, k in pairs]
    for bs, budget in ((1, 4096), (4, 4096), (16, 4096), (16, 12)):  # sorting, padding, token budget
        got = continuation_logprobs(model, pairs, batch_size=bs, batch_tokens=budget)
        assert got == pytest.approx(expected, abs=1e-4)


def test_accuracy_matches_hand_computed_on_tiny_model():
    model, tok = tiny_llama(seed=3), word_tokenizer()
    items = [Item(c, k, g, tuple(len(x) - 1 for x in k)) for c, k, g in ITEMS]
    lps = [[reference_logprob(model, *encode_pair(tok, c, k)) for c, k in zip(it.contexts, it.continuations)]
           for it in items]
    hits = [max(range(len(lp)), key=lambda i: lp[i]) == it.gold for it, lp in zip(items, lps)]
    hits_norm = [max(range(len(lp)), key=lambda i: lp[i] / it.lengths[i]) == it.gold for it, lp in zip(items, lps)]
    got = score(items, [continuation_logprobs(model, [encode_pair(tok, c, k) for c, k in
                                                      zip(it.contexts, it.continuations)]) for it in items])
    assert got[0] == pytest.approx(sum(hits) / 4) and got[1] == pytest.approx(sum(hits_norm) / 4)


def test_score_rules_by_hand():
    # acc: argmax of the sum; acc_norm: argmax of sum / characters; first maximum wins a tie
    items = [Item(("c",) * 2, (" aaaaaaaaaaaaaaaaaaaa", " bb"), 0, (20, 2)),
             Item(("c",) * 2, (" x", " y"), 1, (1, 1)),
             Item(("c",) * 3, (" p", " q", " r"), 0, (1, 1, 1))]
    lps = [[-10.0, -4.0], [-3.0, -1.0], [-2.0, -2.0, -5.0]]
    acc, acc_norm, acc_se, norm_se = score(items, lps)
    # item 1: acc picks 1 (-4 > -10), acc_norm picks 0 (-0.5 > -2); item 2 both right; item 3 tie -> 0, right
    assert acc == pytest.approx(2 / 3) and acc_norm == pytest.approx(1.0)
    assert acc_se == pytest.approx(math.sqrt((1 / 3) / 3)) and norm_se == 0.0  # sample variance 1/3, n = 3


def test_encode_pair_moves_trailing_space_like_lm_eval():
    tok = word_tokenizer()
    ctx, cont = encode_pair(tok, "the cat sat on the ", "mat")
    assert tok.convert_ids_to_tokens(ctx) == ["the", "cat", "sat", "on", "the"]
    assert tok.convert_ids_to_tokens(cont) == ["mat"]


def test_sliced_full_subnet_scores_like_dense():
    model, tok = tiny_llama(seed=1), word_tokenizer()
    shape = ModelShape.from_config(model.config)
    sliced = slice_model(model, Subnet.full(shape), shape)
    pairs = [encode_pair(tok, c, k) for ctxs, conts, _ in ITEMS for c, k in zip(ctxs, conts)]
    assert continuation_logprobs(sliced, pairs) == pytest.approx(continuation_logprobs(model, pairs), abs=1e-4)


def test_bundled_tasks_load_in_lm_eval_templates():
    sizes = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "winogrande": 1267, "boolq": 3270,
             "openbookqa": 500, "hellaswag": 10042}
    for task, n in sizes.items():
        items = load_items(task)
        assert len(items) == n
        assert all(0 <= it.gold < len(it.continuations) == len(it.contexts) for it in items)
        assert all(k.startswith(" ") and not c.endswith(" ") for it in items for c, k in zip(it.contexts,
                                                                                          it.continuations))
    piqa = load_items("piqa")[0]
    assert piqa.contexts[0].startswith("Question: ") and piqa.contexts[0].endswith("\nAnswer:")
    obqa = load_items("openbookqa")[0]
    assert not obqa.contexts[0].startswith("Question:") and not obqa.contexts[0].endswith("Answer:")
    assert load_items("boolq")[0].continuations == (" yes", " no")
    wino = load_items("winogrande")[0]
    assert wino.contexts[0] != wino.contexts[1] and wino.continuations[0] == wino.continuations[1]


def test_subset_is_seeded_sorted_and_nested():
    a, b = select(1000, 100, seed=0), select(1000, 100, seed=0)
    assert a == b == sorted(a) and len(set(a)) == 100
    assert set(select(1000, 50, seed=0)) <= set(a)
    assert select(1000, 100, seed=1) != a
    assert select(10, 100, seed=0) == list(range(10)) and select(10, None, seed=0) == list(range(10))
    with pytest.raises(ZeroShotError):
        select(10, 0, seed=0)


def test_task_names():
    assert canonical_task("ARC_E") == "arc_easy" and canonical_task("obqa") == "openbookqa"
    with pytest.raises(ZeroShotError, match="unknown task"):
        canonical_task("mmlu")
    with pytest.raises(ZeroShotError):
        evaluate_tasks(tiny_llama(), word_tokenizer(), ["piqa", "nope"])


@pytest.mark.slow
def test_embedded_model_beats_chance_on_piqa(embedded):
    events = []
    r = evaluate_task(embedded.model, embedded.tokenizer, "piqa", limit=100, seed=0, on_event=events.append)
    assert r.n == 100 and r.total == 1838 and r.metric == "acc_norm"
    assert r.acc > 0.55 and r.acc_norm > 0.55  # chance is 50 %; SmolLM2-135M scores ~65-70 %
    assert events[-1].done == events[-1].total == 200


@pytest.mark.slow
def test_embedded_tokenizer_boundary(embedded):
    tok = embedded.tokenizer
    ctx, cont = encode_pair(tok, "Question: Is the sky blue?\nAnswer:", " yes")
    assert tok.decode(ctx) == "Question: Is the sky blue?\nAnswer:" and tok.decode(cont) == " yes"
    ctx2, cont2 = encode_pair(tok, "Question: Is the sky blue?\nAnswer: ", "yes")  # trailing space moves over
    assert (ctx2, cont2) == (ctx, cont)


def test_all_tasks_listed():
    assert set(TASKS) == {"piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa"}
