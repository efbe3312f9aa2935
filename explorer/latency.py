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

import torch

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

    def to_dict(self) -> dict:
        return asdict(self)


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


@torch.no_grad()
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
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(settings.seed)
    prompt = torch.randint(0, vocab_size, (settings.batch_size, settings.prompt_len), generator=g).to(device)
    for _ in range(settings.warmup):
        _one_run(model, prompt, min(4, settings.new_tokens))
    prefill, decode = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(settings.repeats):  # timed runs: nothing else running in this process
        p, d = _one_run(model, prompt, settings.new_tokens)
        prefill.append(p)
        decode.append(d)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:  # memory in a separate run: the sampling thread would slow the timed ones
        with _PeakRSS() as rss:
            _one_run(model, prompt, settings.new_tokens)
        peak = rss.peak - rss.base
    d_med = statistics.median(decode)
    return SpeedReport(
        prefill_ms=1000 * statistics.median(prefill),
        decode_tokens_per_s=settings.new_tokens * settings.batch_size / d_med,
        decode_ms_per_token=1000 * d_med / settings.new_tokens,
        param_bytes=param_bytes(model),
        peak_memory_bytes=int(peak + param_bytes(model)),
        device=str(device),
        threads=torch.get_num_threads(),
        settings=asdict(settings),
    )
