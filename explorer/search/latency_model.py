"""Honest decode latency: paired measurements against the dense model, and a latency model fitted
from them so every candidate carries a predicted latency.

**Measuring.** A single timing on a shared CPU says little: the load drifts between runs, so a
subnet timed minutes after the dense model can look slower than it is. Every measurement here
times the models *interleaved* in rounds (each round runs the dense model and every subnet once,
`latency.measure_speeds`), and reports per subnet the median over rounds of the round's speed-up
(dense time / subnet time, the same round), with the relative spread (interquartile range /
median) of those speed-ups. A measurement whose spread exceeds `max_spread` is repeated with more
rounds; if it stays wide it is kept but marked unreliable, and never drawn as a fact.

**Predicting.** Decode time per token = a fixed part (embedding, final norm, lm_head: a 49k
vocabulary head is real time) + per kept block a constant + terms linear in the block's attention
weights and MLP channels (decode at batch 1 reads each weight once). The coefficients are fitted
to paired timings of structural subnets at the extremes of the search space's widths and at
several depths (all blocks, half, a quarter), so the fixed part and the per-block part separate;
the fixed part is never dropped from the fit. Speed-ups are predicted against the dense model
(the base transformers model) measured in the same rounds.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..events import EventSink, Progress, check_cancel, no_event
from ..model.cores import FULL_THREADS
from ..model.latency import SpeedSettings, measure_speeds
from ..model.slicing import slice_model
from ..model.subnet import ModelShape, Subnet, first_index_subnet

# 32 decoded tokens per run: on a busy 2-core CPU a run of 8 tokens scattered by 20-30 % from round to round
CALIBRATION_SPEED = SpeedSettings(prompt_len=32, new_tokens=32, repeats=7, warmup=1)
MAX_SPREAD = 0.10  # relative IQR of the per-round speed-ups above which a measurement is not trusted
DENSE = "dense"


@dataclass(frozen=True)
class Measurement:
    """One model's decode latency, timed interleaved with the dense model."""

    ms: float  # median ms per decoded token over the rounds
    dense_ms: float  # the dense model's median in the same rounds
    speedup: float  # median over rounds of (dense time / this model's time) of the same round
    spread: float  # interquartile range / median of those per-round speed-ups
    rounds: int
    reliable: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Measurement":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def metrics(self) -> dict:
        """The fields a candidate's record stores."""
        return {"measured_ms": round(self.ms, 4), "measured_dense_ms": round(self.dense_ms, 4),
                "measured_speedup": round(self.speedup, 4), "measured_spread": round(self.spread, 4),
                "measured_rounds": self.rounds, "measured_reliable": self.reliable}


def _spread(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) / min(values) - 1 if values else float("inf")
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def measure(dense, models: dict[str, torch.nn.Module], vocab_size: int, speed: SpeedSettings = CALIBRATION_SPEED,
            max_spread: float = MAX_SPREAD, retries: int = 1, cancel: threading.Event | None = None,
            on_event: EventSink = no_event, deadline: float | None = None) -> dict[str, Measurement]:
    """Paired decode timings of `models` against `dense`; a model whose spread is too wide is timed
    again (with twice the rounds, up to `retries` times, while `deadline` allows) and, if still wide,
    marked unreliable. Stop (`cancel`) is read between runs; progress moves every round."""
    out: dict[str, Measurement] = {}
    todo = dict(models)
    rounds = speed.repeats
    for attempt in range(retries + 1):
        check_cancel(cancel)
        if attempt and deadline is not None and time.perf_counter() >= deadline:
            break  # no time to time the wide ones again: they stay as measured, unreliable
        what = f"timing {len(todo)} model{'s' if len(todo) > 1 else ''} with the dense one" + (
            f", again for a wider spread ({rounds} rounds)" if attempt else "")
        on_event(Progress("latency", 0, rounds, what))
        reports = measure_speeds({DENSE: dense, **todo}, vocab_size, SpeedSettings(**{**asdict(speed), "repeats": rounds}),
                                 cancel=cancel, deadline=deadline, memory=False,
                                 on_round=lambda done, total: on_event(Progress("latency", done, total, what)))
        d = reports[DENSE]
        for name in list(todo):
            r = reports[name]
            ratios = [a / b for a, b in zip(d.decode_ms_rounds, r.decode_ms_rounds)]
            spread = _spread(ratios)
            m = Measurement(statistics.median(r.decode_ms_rounds), statistics.median(d.decode_ms_rounds),
                            statistics.median(ratios), spread, len(ratios), spread <= max_spread)
            if m.reliable or attempt == retries:
                out[name] = m
                del todo[name]
            else:
                out[name] = m  # kept (unreliable) in case there is no time to time it again
        if not todo:
            break
        rounds *= 2
    return out


# ---- the model ------------------------------------------------------------------------------------
def features(subnet: Subnet, shape: ModelShape) -> list[float]:
    """[1, kept blocks, attention weights (millions), MLP channels (thousands)] of a subnet."""
    D = shape.hidden_size
    kept = [l for l in subnet.layers if l is not None]
    attn = sum(D * l.head_dim * 2 * (l.n_heads(shape) + l.n_kv) for l in kept) / 1e6
    return [1.0, float(len(kept)), attn, sum(l.width for l in kept) / 1e3]


@dataclass(frozen=True)
class LatencyModel:
    fixed_ms: float
    block_ms: float
    per_mattn_ms: float  # per million attention weights
    per_kwidth_ms: float  # per thousand MLP channels
    dense_ms: float  # the dense (base) model, measured in the same rounds
    device: str
    speed: dict  # the SpeedSettings the timings used
    samples: int = 0
    fit_error: float = 0.0  # mean relative error on the calibration timings
    timings: list = field(default_factory=list)  # [{"features", "ms", "speedup", "spread"}]

    def predict(self, subnet: Subnet, shape: ModelShape) -> float:
        """Predicted decode milliseconds per token of the sliced subnet."""
        f = features(subnet, shape)
        return float(self.fixed_ms * f[0] + self.block_ms * f[1] + self.per_mattn_ms * f[2] + self.per_kwidth_ms * f[3])

    def predict_speedup(self, subnet: Subnet, shape: ModelShape) -> float:
        return self.dense_ms / self.predict(subnet, shape)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def calibration_subnets(shape: ModelShape, head_dims: tuple[int, ...], widths: tuple[int, ...]) -> list[Subnet]:
    """Structural subnets at the extremes of the widths, and at full, half and a quarter depth."""
    hd, ws, L = (min(head_dims), max(head_dims)), (min(widths), max(widths)), shape.num_layers
    configs = [(h, w, L) for h in hd for w in ws] + [(hd[1], ws[1], max(1, L // 2)), (hd[0], ws[0], max(1, L // 4))]
    return [first_index_subnet(shape, h, w, n) for h, w, n in dict.fromkeys(configs)]


def fit(rows: list[list[float]], times: list[float]) -> torch.Tensor:
    """Least squares with the per-block and per-width coefficients >= 0 (a negative cost is noise,
    not physics); the fixed part always stays in the fit."""
    X, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)
    active = list(range(X.shape[1]))
    coef = torch.zeros(X.shape[1], dtype=torch.float64)
    while True:
        sol = torch.linalg.lstsq(X[:, active], y[:, None]).solution[:, 0]
        bad = [a for a, v in zip(active, sol.tolist()) if v < 0 and a != 0]
        if not bad:
            coef[active] = sol
            return coef
        active = [a for a in active if a not in bad]


def calibrate(model, shape: ModelShape, head_dims: tuple[int, ...], widths: tuple[int, ...],
              speed: SpeedSettings = CALIBRATION_SPEED, on_event: EventSink = no_event,
              cancel: threading.Event | None = None, deadline: float | None = None) -> LatencyModel:
    """Time the calibration subnets paired with the dense model and fit the latency model."""
    subs = calibration_subnets(shape, head_dims, widths)
    models = {f"c{i}": slice_model(model, s, shape) for i, s in enumerate(subs)}
    on_event(Progress("latency model", 0, len(subs), f"timing {len(subs)} sliced models with the dense one"))
    got = measure(model, models, shape.vocab_size, speed, cancel=cancel, on_event=on_event, deadline=deadline)
    dense_ms = statistics.median(m.dense_ms for m in got.values())
    rows = [features(s, shape) for s in subs]
    times = [dense_ms / got[f"c{i}"].speedup for i in range(len(subs))]  # drift removed by the pairing
    coef = fit(rows, times)
    pred = torch.tensor(rows, dtype=torch.float64) @ coef
    err = float(((pred - torch.tensor(times)).abs() / torch.tensor(times)).mean())
    on_event(Progress("latency model", len(subs), len(subs), f"fitted, mean error {err:.1%}"))
    timings = [{"features": r, "ms": t, "speedup": got[f"c{i}"].speedup, "spread": got[f"c{i}"].spread}
               for i, (r, t) in enumerate(zip(rows, times))]
    device = str(next(p for p in model.parameters() if p.device.type != "meta").device)
    return LatencyModel(*(float(c) for c in coef), dense_ms, device, asdict(speed), len(subs), err, timings)


def cache_key(lm, head_dims, widths, speed: SpeedSettings = CALIBRATION_SPEED) -> str:
    """What a latency model depends on: the model, its dtype and device, the threads, torch, the
    widths it was fitted over and the timing settings (not the data)."""
    raw = json.dumps([lm.name, str(lm.dtype), lm.device, FULL_THREADS, torch.__version__,
                      sorted(head_dims), sorted(widths), asdict(speed), lm.shape.to_dict()], default=str)
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def cached_latency_model(lm, head_dims, widths, cache_dir: Path | None, on_event: EventSink = no_event,
                         cancel: threading.Event | None = None, fit: bool = True, deadline: float | None = None
                         ) -> tuple[LatencyModel | None, bool]:
    """The latency model for this model and machine, from the on-disk cache or (with `fit`) fitted
    now and cached; (None, False) when it is neither cached nor to be fitted. Returns (model,
    came_from_cache)."""
    path = None if cache_dir is None else Path(cache_dir) / f"{cache_key(lm, head_dims, widths)}.json"
    if path is not None and path.is_file():
        try:
            return LatencyModel.from_dict(json.loads(path.read_text())), True
        except (OSError, ValueError, TypeError, KeyError):
            pass  # unreadable: fit again and overwrite
    if not fit:
        return None, False
    model = calibrate(lm.model, lm.shape, tuple(head_dims), tuple(widths), on_event=on_event, cancel=cancel,
                      deadline=deadline)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(model.to_dict(), indent=2))
        tmp.replace(path)
    return model, False


def measure_subnets(lm, subnets: dict[str, Subnet], means=None, speed: SpeedSettings = CALIBRATION_SPEED,
                    cancel: threading.Event | None = None, on_event: EventSink = no_event) -> dict[str, Measurement]:
    """Time candidates' sliced models for real (paired with the dense model). `means`: the ids in
    `compensated` that carry bias compensation are built with it (it adds one bias per block)."""
    models = {k: slice_model(lm.model, s, lm.shape, means.get(k) if isinstance(means, dict) else means)
              for k, s in subnets.items()}
    return measure(lm.model, models, lm.shape.vocab_size, speed, cancel=cancel, on_event=on_event)


__all__ = ["Measurement", "LatencyModel", "measure", "calibrate", "cached_latency_model", "measure_subnets",
           "features", "fit", "calibration_subnets", "MAX_SPREAD", "CALIBRATION_SPEED"]
