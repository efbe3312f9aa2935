"""Defaults shared by the CLI, the app and the benchmarks: one place, one value."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSettings:
    model: str = "default"  # "default" (embedded SmolLM2-135M-Instruct), a local folder or a hub id
    dtype: str = "float32"
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (accelerate device_map)
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataSettings:
    corpus: str = "bbc"  # bbc, a text file path, or hf:wikitext-2 / hf:c4 (online only)
    seq_len: int = 512  # tokens per window
    heldout_windows: int = 32  # windows of held-out perplexity (evenly spaced over the held-out text)
    calibration_windows: int = 128
    seed: int = 0
