"""Calibration block by block: capture what the first block receives, replay one block at a
time, and accumulate input statistics of chosen linear layers with hooks.

Memory stays at one block's activations (as in SparseGPT/Wanda). Works for any model whose
blocks live in `model.model.layers` and take the hidden state as their first positional
argument: transformers' families and our SubnetForCausalLM alike. Every other argument is
captured generically, per block (a sliding-window layer gets its own mask, a Gemma layer its own
rotary table), and replayed unchanged.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from ..events import check_cancel
from ..model.devices import execution_device


class Stop(Exception):
    """Raised by a hook once it has what it needs, so the rest of the forward is not computed."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, per batch, and the other arguments the model passed (those of
    the first block; `at(i)` gives block i's own)."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    per_block: list[tuple[list[tuple], list[dict]]] | None = None  # block -> (args, kwargs) per batch

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden, self.args, self.kwargs, self.per_block)

    def at(self, block: int) -> "BlockInputs":
        """The same hidden states with block `block`'s own other arguments."""
        if self.per_block is None:
            return self
        args, kwargs = self.per_block[block]
        return BlockInputs(self.hidden, args, kwargs, self.per_block)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                         cancel: threading.Event | None = None) -> BlockInputs:
    """Run the embedding only, for each batch of windows: every block's forward is replaced for the
    pass by one that records its arguments and passes the hidden state on, and the last one stops it."""
    from ..model.memory import calibration_bytes, check_fits
    from ..model.subnet import ModelShape

    device = execution_device(model.model.embed_tokens)
    if getattr(model.config, "model_type", "") != "subnet_llm":  # base models; subnets are smaller still
        need = calibration_bytes(ModelShape.from_config(model.config), len(windows), windows.shape[1], batch_size)
        check_fits(need, f"calibration on {len(windows)} windows of {windows.shape[1]} tokens", device)
    blocks = list(model.model.layers)
    got = BlockInputs([], [], [], [([], []) for _ in blocks])

    def recorder(i: int):
        def forward(hidden, *args, **kwargs):
            if i == 0:
                got.hidden.append(hidden)
            got.per_block[i][0].append(tuple(args))
            got.per_block[i][1].append(dict(kwargs))
            if i == len(blocks) - 1:
                raise Stop
            return hidden
        return forward

    saved = [b.__dict__.get("forward") for b in blocks]  # an accelerate hook's wrapper, if any
    for i, b in enumerate(blocks):
        b.forward = recorder(i)
    try:
        for start in range(0, len(windows), batch_size):
            check_cancel(cancel)
            try:
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except Stop:
                pass
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f
    got.args, got.kwargs = got.per_block[0]
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
    """Running sums over calibration tokens of a linear layer's input X [n, d].

    `xtx` (fp32) serves the Hessian of OBS; the per-channel moments are kept apart in fp64 and
    shifted by the first batch's mean, so the variance of a channel with a large mean and little
    fluctuation (the channels FLAP removes and compensates) does not vanish in cancellation."""

    xtx: torch.Tensor  # [d, d]  sum of x x^T
    xsum: torch.Tensor  # [d]    sum of x (fp64)
    n: int = 0
    shift: torch.Tensor | None = None  # [d] fp64, the first batch's mean
    dsum: torch.Tensor | None = None  # [d] fp64, sum of (x - shift)
    dsq: torch.Tensor | None = None  # [d] fp64, sum of (x - shift)^2

    def add(self, x: torch.Tensor) -> None:
        """x [n, d] in fp32."""
        self.xtx.addmm_(x.T, x)
        xd = x.double()
        if self.shift is None:
            self.shift = xd.mean(0)
            self.dsum = torch.zeros_like(self.shift)
            self.dsq = torch.zeros_like(self.shift)
        c = xd - self.shift
        self.dsum += c.sum(0)
        self.dsq += c.pow(2).sum(0)
        self.xsum += xd.sum(0)
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.xsum / max(self.n, 1)).float()

    @property
    def sq_norm(self) -> torch.Tensor:
        """Per input channel, the sum of squares over tokens (||X_j||^2, Wanda's statistic)."""
        return torch.diagonal(self.xtx).clone()

    @property
    def variance(self) -> torch.Tensor:
        """Per input channel, the variance over tokens (FLAP's fluctuation)."""
        if self.dsum is None:
            return torch.zeros_like(self.xsum).float()
        n = max(self.n, 1)
        return (self.dsq / n - (self.dsum / n).pow(2)).clamp_min(0).float()


@dataclass
class StatsCollector:
    """Hooks on named linear layers that fill an InputStats each; remove() when done."""

    modules: dict[str, nn.Linear]
    device: torch.device | None = None  # where the sums live (default: each layer's weight device)
    stats: dict[str, InputStats] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __post_init__(self):
        for name, lin in self.modules.items():
            d = lin.in_features
            dev = self.device or lin.weight.device
            self.stats[name] = InputStats(torch.zeros(d, d, device=dev), torch.zeros(d, device=dev, dtype=torch.float64))
            self._handles.append(lin.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, args):
            self.stats[name].add(args[0].detach().reshape(-1, args[0].shape[-1]).float().to(self.stats[name].xtx.device))
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The seven projections of a Llama-family block, by their transformers names."""
    return {n: block.get_submodule(n) for n in PROJECTIONS}
