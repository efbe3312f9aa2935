"""Token-by-token generation that several models can share fairly (round-robin), so the app
can show the original and picked subnets writing side by side with their own tokens/s.

The same decoding settings (greedy, or sampling with temperature/top-p and a seed) apply to
every model; each model gets its own generator seeded identically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import ExplorerError


class GenerationError(ExplorerError):
    """Generation settings or prompt that cannot work."""


@dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    chat_template: bool = True  # apply the tokenizer's chat template when it has one

    def validate(self) -> "DecodeSettings":
        if not 1 <= self.max_new_tokens <= 2048:
            raise GenerationError(f"max new tokens must be between 1 and 2048, got {self.max_new_tokens}")
        if self.do_sample and not 0.01 <= self.temperature <= 5.0:
            raise GenerationError(f"temperature must be between 0.01 and 5, got {self.temperature}")
        if self.do_sample and not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top-p must be in (0, 1], got {self.top_p}")
        return self


def encode_prompt(tokenizer, prompt: str, settings: DecodeSettings, max_context: int) -> torch.Tensor:
    if not prompt or not prompt.strip():
        raise GenerationError("the prompt is empty")
    if settings.chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([list(ids)], dtype=torch.long)
    if ids.shape[1] + settings.max_new_tokens > max_context:
        raise GenerationError(f"the prompt has {ids.shape[1]} tokens; with {settings.max_new_tokens} new tokens it "
                              f"exceeds the model's context of {max_context}")
    return ids


@dataclass
class Stream:
    """One model's generation in progress."""

    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    done: bool = False
    steps: list[float] = field(default_factory=list)  # seconds of each new token (the first includes the prompt)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def decode_rate(self, n: int) -> float | None:
        """Decode tokens/s over this model's tokens 2..n: the prompt's prefill (in the first step) left out,
        so models compared over the same n are compared fairly. None when it has fewer than 2 tokens."""
        n = min(n, len(self.steps))
        spent = sum(self.steps[1:n])
        return (n - 1) / spent if n >= 2 and spent > 0 else None


def common_length(streams: dict[str, Stream]) -> int:
    """The number of tokens every model that wrote at least two has written: the fair length to compare."""
    counts = [len(s.steps) for s in streams.values() if len(s.steps) >= 2]
    return min(counts) if counts else 0


def forward_step(model, input_ids: torch.Tensor, cache):
    """One forward with the KV cache -> (logits, cache), whichever name this transformers gives it."""
    import inspect

    name = getattr(model, "_cache_kwarg", None)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        try:
            model._cache_kwarg = name
        except AttributeError:
            pass
    out = model(input_ids=input_ids, use_cache=True, **{name: cache})
    new = getattr(out, "cache", None)
    return out.logits, new if new is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def token_stream(model, tokenizer, prompt_ids: torch.Tensor, settings: DecodeSettings) -> Iterator[Stream]:
    """Yield the growing Stream after every new token (KV cache, one token per step)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    eos = set(_eos_ids(model, tokenizer))
    state, ids, cache = Stream(), prompt_ids.to(device), None
    new: list[int] = []
    for _ in range(settings.max_new_tokens):
        t0 = time.perf_counter()
        logits, cache = forward_step(model, ids, cache)
        logits = logits[0, -1].float().cpu()
        token = _choose(logits, settings, gen)
        step = time.perf_counter() - t0
        state.seconds += step
        if token in eos:
            break
        new.append(token)
        state.tokens += 1
        state.steps.append(step)
        # Special tokens other than EOS stay visible: a narrowed model that answers "<|im_start|>" should
        # show that, not an empty box beside a token count.
        state.text = tokenizer.decode(new, skip_special_tokens=False)
        ids = torch.tensor([[token]], device=device)
        yield state
    state.done = True
    yield state


def _choose(logits: torch.Tensor, s: DecodeSettings, gen: torch.Generator) -> int:
    if not s.do_sample:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[pick])


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    extra = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return [i for i in ids + [extra] if i is not None]


def side_by_side(models: dict[str, object], tokenizer, prompt: str, settings: DecodeSettings,
                 max_context: int) -> Iterator[dict[str, Stream]]:
    """Round-robin one token per model per step, yielding every model's Stream each round."""
    settings.validate()
    ids = encode_prompt(tokenizer, prompt, settings, max_context)
    streams = {name: token_stream(m, tokenizer, ids, settings) for name, m in models.items()}
    current = {name: Stream() for name in models}
    while streams:
        for name in list(streams):
            try:
                current[name] = next(streams[name])
            except StopIteration:
                current[name].done = True
                del streams[name]
        yield dict(current)
