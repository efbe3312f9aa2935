"""Measured speed and memory of a model: prefill time, decode tokens/s, weight bytes, peak memory.

Measured on the physically sliced model beside the dense one in the same process, after a
warm-up, as the median of repeats (METHOD section 7). On CPU the peak is the process's resident
memory above what it held before the run, sampled every 2 ms during one extra, untimed run; on
CUDA it is the allocator's peak.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..errors import ExplorerError
from ..events import check_cancel
from .generation import forward_step


@dataclass(frozen=True)
class SpeedSettings:
    prompt_len: int = 128
    new_tokens: int = 32
    batch_size: int = 1
    repeats: int = 5
    warmup: int = 1
    seed: int = 0


@dataclass(frozen=True)
class SpeedReport:
    prefill_ms: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    param_bytes: int
    peak_memory_bytes: int
    device: str
    threads: int
    settings: dict
    prefill_ms_rounds: tuple[float, ...] = ()  # one per timed round, in round order
    decode_ms_rounds: tuple[float, ...] = ()  # ms per token, one per timed round

    def to_dict(self) -> dict:
        return asdict(self)


def paired_speedup(base: SpeedReport, other: SpeedReport, decode: bool = True) -> float:
    """Median over rounds of base time / other time, each round's pair measured back to back.

    On a shared machine the load drifts between rounds; a ratio within one round cancels the
    drift that a ratio of two medians would keep."""
    a, b = (base.decode_ms_rounds, other.decode_ms_rounds) if decode else (base.prefill_ms_rounds,
                                                                         other.prefill_ms_rounds)
    if not a or len(a) != len(b):
        raise ValueError("paired speed-ups need reports from one measure_speeds call")
    return statistics.median(x / y for x, y in zip(a, b))


class _PeakRSS:
    """Samples this process's RSS in a thread; CPU allocations bypass tracemalloc."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()  # no autograd bookkeeping: a decoded token is hundreds of small ops
def _one_run(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    logits, cache = forward_step(model, prompt, None)
    _sync(device)
    t1 = time.perf_counter()
    token = logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        logits, cache = forward_step(model, token, cache)
        token = logits[:, -1:].argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def measure_speed(model, vocab_size: int, settings: SpeedSettings = SpeedSettings()) -> SpeedReport:
    """Prefill a fixed random prompt, then greedily decode `new_tokens` with the KV cache."""
    return measure_speeds({"model": model}, vocab_size, settings)["model"]


class OutOfTime(ExplorerError):
    """A timing reached its deadline before it had enough rounds to say anything."""


MIN_ROUNDS = 3  # a deadline ends the timed rounds only after this many: fewer say nothing about drift


def measure_speeds(models: dict, vocab_size: int, settings: SpeedSettings = SpeedSettings(),
                   cancel: threading.Event | None = None, deadline: float | None = None,
                   on_round: Callable[[int, int], None] | None = None, memory: bool = True) -> dict[str, SpeedReport]:
    """Time several models *interleaved*: each repeat runs every model once, in turn.

    A speed-up is a ratio of two timings; measured minutes apart, a shared machine's drift lands in
    one of them only (we saw a 70 % subnet time 1.07x the dense model that way, and 1.28x when the
    two alternate). Interleaved, drift hits both alike. Memory is measured afterwards, one model
    at a time, in untimed runs (`memory`). `cancel` is read between runs; at `deadline`
    (perf_counter) the rounds end once MIN_ROUNDS are done, and before that OutOfTime is raised.
    `on_round(done, total)` follows the rounds."""
    g = torch.Generator().manual_seed(settings.seed)
    cpu_prompt = torch.randint(0, vocab_size, (settings.batch_size, settings.prompt_len), generator=g)
    prompts = {name: cpu_prompt.to(next(m.parameters()).device) for name, m in models.items()}

    started = time.perf_counter()

    def check(rounds_done: int) -> bool:
        """Whether to go on; raises when stopped, or when the deadline comes (or will come, at the pace
        so far) before MIN_ROUNDS are done."""
        check_cancel(cancel)
        if deadline is None:
            return True
        now, need = time.perf_counter(), min(MIN_ROUNDS, settings.repeats)
        pace = (now - started) / rounds_done if rounds_done else 0.0
        if rounds_done < need and (now >= deadline or now + pace * (need - rounds_done) > deadline):
            raise OutOfTime(f"the time allowed ({deadline - started:.0f} s) holds fewer than {need} timing rounds "
                            f"at this pace ({rounds_done} of {settings.repeats} done)")
        return now + pace <= deadline

    warm = min(4, settings.new_tokens)
    for name, m in models.items():
        for _ in range(settings.warmup):
            check(0)
            _one_run(m, prompts[name], warm)
    if deadline is not None and settings.warmup:  # the warm-up's pace says whether the rounds can fit at all
        per_round = (time.perf_counter() - started) / settings.warmup * (settings.prompt_len + settings.new_tokens) / (
            settings.prompt_len + warm)
        need = min(MIN_ROUNDS, settings.repeats)
        if time.perf_counter() + need * per_round > deadline:
            raise OutOfTime(f"the time allowed ({deadline - started:.0f} s) holds fewer than {need} timing rounds at "
                            f"this pace (about {per_round:.0f} s a round)")
    prefill: dict[str, list] = {n: [] for n in models}
    decode: dict[str, list] = {n: [] for n in models}
    for r in range(settings.repeats):  # timed runs: nothing else running in this process
        if not check(r):
            break
        for name, m in models.items():
            check_cancel(cancel)
            p, d = _one_run(m, prompts[name], settings.new_tokens)
            prefill[name].append(p)
            decode[name].append(d)
        if on_round is not None:
            on_round(r + 1, settings.repeats)
    out = {}
    for name, m in models.items():
        device = prompts[name].device
        peak = 0
        if not memory:
            pass
        elif device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _one_run(m, prompts[name], settings.new_tokens)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:  # the sampling thread would slow timed runs
            with _PeakRSS() as rss:
                _one_run(m, prompts[name], settings.new_tokens)
            peak = rss.peak - rss.base
        d_med = statistics.median(decode[name])
        out[name] = SpeedReport(
            prefill_ms=1000 * statistics.median(prefill[name]),
            decode_tokens_per_s=settings.new_tokens * settings.batch_size / d_med,
            decode_ms_per_token=1000 * d_med / settings.new_tokens,
            param_bytes=param_bytes(m),
            peak_memory_bytes=int(peak + param_bytes(m)),
            device=str(device),
            threads=torch.get_num_threads(),
            settings={**asdict(settings), "repeats": len(decode[name])},
            prefill_ms_rounds=tuple(1000 * p for p in prefill[name]),
            decode_ms_rounds=tuple(1000 * d / settings.new_tokens for d in decode[name]),
        )
    return out
