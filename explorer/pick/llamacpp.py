"""Check a GGUF in llama.cpp itself (through llama-cpp-python) against the sliced model it came from.

The reference is llama.cpp's own graph, tokenizer and kernels: the same prompt token ids go to
both models, the full-sequence logits are compared, and 16 greedy tokens are decoded by each,
llama.cpp's own sampling-free argmax against ours. llama.cpp's tokenization of the prompt is
compared with the transformers tokenizer's too, so a tokenizer copied wrong shows.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ExplorerError

# Max |logit difference| allowed, as a fraction of the reference logits' standard deviation, by
# weight type. Measured on tiny random models at full width (f32 weights: 2-3e-6, f16: 3-6e-3,
# q8_0: 0.07-0.13; the KV cache in f32): a wrong permutation, head or bias gives differences of the
# order of the std itself. q8_0 rounds every weight and activation to 8 bits, which flips near-tied
# greedy choices, so for q8_0 the greedy tokens are reported but not required. For f16 and f32 they
# are, up to the first step where our own model's top two logits lie within the logit tolerance: a
# near-tie that the stated rounding may decide either way (the tokens after it have other contexts).
TOLERANCE = {"f32": 1e-4, "f16": 0.05, "q8_0": 0.25}
# llama.cpp's CPU GELU (gemma3's MLP) reads a float16 table, so even f32 weights differ there: measured
# 4.2e-3 of the std on the tiny Gemma, 4.6e-4 once our GELU's input and output are rounded through
# float16 the same way. Families whose MLP uses GELU get at least this bound.
GELU_TOLERANCE = 0.01
GELU_FAMILIES = ("gemma3_text",)


def tolerance(model, out_type: str) -> float:
    """The allowed |logit difference| / std for this model's family and the GGUF weight type."""
    cfg = model.config
    family = getattr(cfg, "base_model_type", None) or getattr(cfg, "model_type", "")
    return max(TOLERANCE[out_type], GELU_TOLERANCE if family in GELU_FAMILIES else 0.0)
GREEDY_REQUIRED = {"f32": True, "f16": True, "q8_0": False}
INSTALL_HINT = "llama-cpp-python is not installed: run `make llamacpp` (builds llama.cpp, ~4 minutes)"


class LlamaCppError(ExplorerError):
    """llama.cpp is missing, refused the file, or disagrees with our model."""


@dataclass
class LlamaCppCheck:
    """llama.cpp against our model on one prompt."""

    prompt_tokens: int
    same_tokenization: bool
    max_logit_diff: float
    logit_std: float
    allowed_diff: float
    top1_agreement: float  # over the prompt's positions
    greedy_ours: list[int]
    greedy_llamacpp: list[int]
    same_tokens: bool
    first_difference: int | None  # the step where the greedy tokens part, if they do
    near_tie: bool  # there our model's two candidate tokens lie within the allowed logit difference
    llamacpp_text: str
    decode_tokens_per_s: float  # llama.cpp's greedy decode, one token at a time
    threads: int
    out_type: str = "f16"

    @property
    def passed(self) -> bool:
        return (self.same_tokenization and self.max_logit_diff <= self.allowed_diff
                and (self.same_tokens or self.near_tie or not GREEDY_REQUIRED[self.out_type]))

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def open_gguf(path: str | Path, n_ctx: int = 512, threads: int | None = None, f32_cache: bool = True):
    """A llama.cpp model with logits for every position (needed to compare whole sequences). The
    check keeps the KV cache in f32 (llama.cpp's default is f16, which alone moves the logits by
    ~3e-3 of their std): so the file is compared, not the cache's rounding."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LlamaCppError(INSTALL_HINT) from None
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads,
                     n_threads_batch=threads, verbose=False, seed=0,
                     **({"type_k": 0, "type_v": 0} if f32_cache else {}))  # 0: GGML_TYPE_F32
    except Exception as e:  # noqa: BLE001 - llama.cpp reports a bad file as a ValueError or worse
        raise LlamaCppError(f"llama.cpp could not load {Path(path).name}: {e}") from None


def where_greedy_parts(ours: list[int], theirs: list[int], step_logits: list, allowed: float
                       ) -> tuple[int | None, bool]:
    """(the first step where two greedy decodes differ, or None; whether our model's logits for the two
    tokens there lie within `allowed` of each other: a near-tie that rounding may decide)."""
    first = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None:
        return None, False
    margin = float(step_logits[first][ours[first]] - step_logits[first][theirs[first]])
    return first, margin <= allowed


@torch.no_grad()
def check(path: str | Path, model, tokenizer, prompt: str, out_type: str = "f16", new_tokens: int = 16,
          threads: int | None = None) -> LlamaCppCheck:
    """Compare the GGUF at `path` in llama.cpp with `model` (its source) on `prompt`."""
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    llm = open_gguf(path, n_ctx=max(64, len(ids) + new_tokens + 8), threads=threads)
    try:
        theirs_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
        t0 = time.perf_counter()
        greedy_cpp = []
        for _ in range(new_tokens):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy_cpp.append(tok)
            llm.eval([tok])
        rate = new_tokens / (time.perf_counter() - t0)
    finally:
        llm.close()
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    ours = model(input_ids=x, use_cache=False).logits[0].float().cpu().numpy()
    greedy_ours, step_logits = [], []
    for _ in range(new_tokens):
        logits = model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
        tok = int(logits.argmax())
        greedy_ours.append(tok)
        step_logits.append(logits)
        x = torch.cat([x, torch.tensor([[tok]], device=device)], dim=1)
    std = float(ours.std())
    allowed = tolerance(model, out_type) * std
    first, near_tie = where_greedy_parts(greedy_ours, greedy_cpp, step_logits, allowed)
    return LlamaCppCheck(
        prompt_tokens=len(ids), same_tokenization=list(theirs_ids) == list(ids),
        max_logit_diff=float(np.abs(theirs - ours).max()), logit_std=std, allowed_diff=allowed,
        top1_agreement=float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
        greedy_ours=greedy_ours, greedy_llamacpp=greedy_cpp, same_tokens=greedy_ours == greedy_cpp,
        first_difference=first, near_tie=near_tie,
        llamacpp_text=tokenizer.decode(greedy_cpp), decode_tokens_per_s=rate, threads=threads, out_type=out_type)
