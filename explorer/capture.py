"""Calibration block by block: capture what the first block receives, replay one block at a
time, and accumulate input statistics of chosen linear layers with hooks.

Memory stays at one block's activations (as in SparseGPT/Wanda). Works for any model whose
blocks live in `model.model.layers` and take the hidden state as their first positional
argument: transformers' Llama/Mistral/Qwen2 and our SubnetForCausalLM alike. Every other
argument is captured generically and replayed unchanged.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .events import check_cancel


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering a block, per batch, and the other arguments the model passed."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden, self.args, self.kwargs)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                         cancel: threading.Event | None = None) -> BlockInputs:
    """Run the embedding only, stopping at the first block, for each batch of windows."""
    from .memory import calibration_bytes, check_fits
    from .subnet import ModelShape

    first = model.model.layers[0]
    device = next(first.parameters()).device
    if getattr(model.config, "model_type", "") != "subnet_llm":  # base models; subnets are smaller still
        need = calibration_bytes(ModelShape.from_config(model.config), len(windows), windows.shape[1], batch_size)
        check_fits(need, f"calibration on {len(windows)} windows of {windows.shape[1]} tokens", device)
    got = BlockInputs([], [], [])

    def hook(_module, args, kwargs):
        got.hidden.append(args[0])
        got.args.append(tuple(args[1:]))
        got.kwargs.append(dict(kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            check_cancel(cancel)
            try:
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return got


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every captured batch (the next block's inputs)."""
    outs = []
    for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs):
        out = block(h, *a, **k)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@dataclass
class InputStats:
    """Running fp32 sums over calibration tokens of a linear layer's input X [n, d]."""

    xtx: torch.Tensor  # [d, d]  sum of x x^T
    xsum: torch.Tensor  # [d]    sum of x
    n: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.xsum / max(self.n, 1)

    @property
    def sq_norm(self) -> torch.Tensor:
        """Per input channel, the sum of squares over tokens (||X_j||^2, Wanda's statistic)."""
        return torch.diagonal(self.xtx).clone()

    @property
    def variance(self) -> torch.Tensor:
        """Per input channel, the variance over tokens (FLAP's fluctuation)."""
        return (self.sq_norm / max(self.n, 1) - self.mean.pow(2)).clamp_min(0)

    def hessian(self, damp: float = 0.01) -> torch.Tensor:
        """H = 2 X^T X / n + damp * mean(diag H) * I (METHOD section 2)."""
        h = 2 * self.xtx / max(self.n, 1)
        h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        return h


@dataclass
class StatsCollector:
    """Hooks on named linear layers that fill an InputStats each; remove() when done."""

    modules: dict[str, nn.Linear]
    stats: dict[str, InputStats] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __post_init__(self):
        for name, lin in self.modules.items():
            d = lin.in_features
            dev = lin.weight.device
            self.stats[name] = InputStats(torch.zeros(d, d, device=dev), torch.zeros(d, device=dev))
            self._handles.append(lin.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = self.stats[name]
            s.xtx.addmm_(x.T, x)
            s.xsum.add_(x.sum(0))
            s.n += x.shape[0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The seven projections of a Llama-family block, by their transformers names."""
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return {n: block.get_submodule(n) for n in names}
