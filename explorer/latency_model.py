"""A latency model for the device in use, so every candidate carries a predicted latency.

Decode time per token is modelled as a fixed part (embedding, final norm, lm_head) plus, per
kept block, a constant plus terms linear in its kept head dim and MLP width (decode at batch 1
reads each weight once, so time follows the matrix sizes). The coefficients are fitted at the
start of a search from real timings of sliced models over the widths of the search space
(all-narrow, all-wide, mixed, and half the blocks dropped, so the fixed part and the per-block
part separate). Front members are then measured for real and the prediction error reported.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import torch

from .events import EventSink, Progress, check_cancel, no_event
from .latency import SpeedSettings, measure_speed
from .slicing import slice_model
from .subnet import LayerChoice, ModelShape, Subnet

CALIBRATION_SPEED = SpeedSettings(prompt_len=32, new_tokens=8, repeats=3, warmup=1)


@dataclass(frozen=True)
class LatencyModel:
    fixed_ms: float
    block_ms: float
    per_head_dim_ms: float
    per_width_ms: float
    device: str
    speed: dict  # the SpeedSettings the timings used
    samples: int = 0
    fit_error: float = 0.0  # mean relative error on the calibration timings

    def predict(self, subnet: Subnet) -> float:
        """Predicted decode milliseconds per token."""
        t = self.fixed_ms
        for layer in subnet.layers:
            if layer is not None:
                t += self.block_ms + self.per_head_dim_ms * layer.head_dim + self.per_width_ms * layer.width
        return float(t)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        return cls(**d)


def _uniform(shape: ModelShape, head_dim: int, width: int, layers: int) -> Subnet:
    pairs = max(1, head_dim // 2)
    layer = LayerChoice(tuple(tuple(range(pairs)) for _ in range(shape.num_kv_heads)), tuple(range(width)))
    keep = set(range(0, shape.num_layers, max(1, shape.num_layers // layers))[:layers])
    return Subnet(tuple(layer if i in keep else None for i in range(shape.num_layers)))


def calibrate(model, shape: ModelShape, head_dims: tuple[int, ...], widths: tuple[int, ...],
              speed: SpeedSettings = CALIBRATION_SPEED, on_event: EventSink | None = None,
              cancel: threading.Event | None = None) -> LatencyModel:
    """Time sliced models at the extremes and middle of the space's widths, fit the model."""
    on_event = on_event or no_event
    hd = (min(head_dims), max(head_dims))
    ws = (min(widths), max(widths))
    mid = (sorted(head_dims)[len(head_dims) // 2], sorted(widths)[len(widths) // 2])
    L = shape.num_layers
    configs = list(dict.fromkeys([(h, w, L) for h in hd for w in ws] + [(*mid, L), (hd[1], ws[1], max(1, L // 2))]))
    rows, times = [], []
    measure_speed(slice_model(model, Subnet.full(shape), shape), shape.vocab_size, speed)  # warm up threads/allocator
    for n, (h, w, layers) in enumerate(configs):
        check_cancel(cancel)
        sub = _uniform(shape, h, w, layers)
        rep = measure_speed(slice_model(model, sub, shape), shape.vocab_size, speed)
        kept = [l for l in sub.layers if l is not None]
        rows.append([1.0, float(len(kept)), float(sum(l.head_dim for l in kept)), float(sum(l.width for l in kept))])
        times.append(rep.decode_ms_per_token)
        on_event(Progress("latency model", n + 1, len(configs), f"head_dim {h}, MLP {w}, {layers} blocks"))
    X, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)
    coef = nonnegative_lstsq(X, y)  # a negative cost per channel is noise, not physics
    pred = X @ coef
    err = float(((pred - y).abs() / y).mean())
    device = str(next(model.parameters()).device)
    return LatencyModel(float(coef[0]), float(coef[1]), float(coef[2]), float(coef[3]), device, asdict(speed),
                        len(configs), err)


def nonnegative_lstsq(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares with coefficients >= 0: refit without any column that comes out negative."""
    active = list(range(X.shape[1]))
    coef = torch.zeros(X.shape[1], dtype=X.dtype)
    while active:
        sol = torch.linalg.lstsq(X[:, active], y[:, None]).solution[:, 0]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active = [a for a, v in zip(active, sol.tolist()) if v > 0]
    return coef


def measure_decode_ms(model, subnet: Subnet, shape: ModelShape, speed: SpeedSettings = CALIBRATION_SPEED) -> float:
    """Real decode milliseconds per token of the sliced subnet, with the calibration's settings."""
    return measure_speed(slice_model(model, subnet, shape), shape.vocab_size, speed).decode_ms_per_token
