"""Perplexity of any causal LM (the base model or a sliced subnet) on token windows."""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from ..events import check_cancel


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4,
               on_batch: Callable[[int, int], None] | None = None,
               cancel: threading.Event | None = None) -> torch.Tensor:
    """Summed next-token NLL of each window, in fp32: [n_windows]."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch_size):
        check_cancel(cancel)
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        out.append(nll.view(batch.shape[0], -1).sum(-1).cpu())
        if on_batch:
            on_batch(min(start + batch_size, len(windows)), len(windows))
    return torch.cat(out)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, on_batch=None, cancel=None) -> float:
    nll = window_nll(model, windows, batch_size, on_batch, cancel)
    return math.exp(nll.sum().item() / (windows.shape[0] * (windows.shape[1] - 1)))
