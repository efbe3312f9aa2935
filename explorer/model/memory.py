"""Refuse work that would not fit in memory *before* starting it, with the estimate shown,
instead of letting the operating system kill the process halfway."""
from __future__ import annotations

import psutil
import torch

from ..errors import ExplorerError
from .subnet import ModelShape

GiB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class OutOfMemoryRisk(ExplorerError):
    """The estimate exceeds what the device has free."""


def available_bytes(device: str | torch.device = "cpu") -> int:
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return int(psutil.virtual_memory().available)


def check_fits(needed: int, what: str, device: str | torch.device = "cpu", headroom: float = 0.9) -> None:
    have = available_bytes(device)
    if needed > headroom * have:
        raise OutOfMemoryRisk(f"{what} needs about {needed / GiB:.1f} GiB but only {have / GiB:.1f} GiB is free "
                              f"on {device}; use a smaller model, dtype or setting")


def model_bytes(shape: ModelShape, dtype: torch.dtype) -> int:
    return shape.dense_params * BYTES.get(dtype, 4)


def calibration_bytes(shape: ModelShape, windows: int, seq_len: int, batch_size: int = 8) -> int:
    """Block-by-block calibration: every window's hidden state (fp32, inputs and outputs of one
    block), one batch's activations through the block, and the fp32 X^T X sums of one block."""
    tokens = windows * seq_len
    hidden = 2 * tokens * shape.hidden_size * 4
    qkv = shape.num_heads * shape.head_dim + 2 * shape.num_kv_heads * shape.head_dim
    batch = batch_size * seq_len * (4 * shape.hidden_size + qkv + 3 * shape.intermediate_size) * 4
    scores = batch_size * shape.num_heads * seq_len * seq_len * 4
    stats = 4 * (3 * shape.hidden_size**2 + 2 * (shape.num_heads * shape.head_dim) ** 2
                 + shape.intermediate_size**2)
    return hidden + batch + scores + stats
