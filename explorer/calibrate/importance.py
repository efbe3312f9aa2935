"""Importance-aware initialization (METHOD section 2): OBS saliency per attention rotary pair
and per MLP channel, and the uniform-ratio initial subnet that keeps the top scores.

Calibration runs block by block (capture the first block's inputs once, then replay one block
at a time with hooks), so memory stays at one block's activations. The same pass also keeps
the per-channel input statistics the baselines need (Wanda-sp's ||X_j||, FLAP's mean and
variance), so a search calibrates once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..events import EventSink, Progress, check_cancel, no_event
from ..model.devices import execution_device, onloaded
from ..model.slicing import ChannelMeans
from ..model.subnet import LayerChoice, ModelShape, SubnetError
from .capture import StatsCollector, block_linears, capture_block_inputs, run_block

# The four distinct linear inputs of a block: q/k/v share one, gate/up share one.
STAT_INPUTS = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj",
               "mlp_in": "mlp.gate_proj", "down_in": "mlp.down_proj"}


@dataclass(frozen=True)
class ChannelStats:
    """Per input channel of one linear layer on calibration data: sum of squares, mean, variance."""

    sq_norm: torch.Tensor  # [d]  ||X_j||^2
    mean: torch.Tensor  # [d]
    variance: torch.Tensor  # [d]
    n: int


@dataclass
class Importance:
    """Per base layer: attention scores [n_kv, n_pairs], MLP scores [intermediate] and per query
    head the scores of its own q and o weights [num_heads] (the head-granular space ranks a KV
    group by the sum of its pair scores, which holds its k, v and every head's q and o, and the
    heads within a group by their own). `stats[layer][name]` holds the ChannelStats of the
    inputs named in STAT_INPUTS. `heads` is None in a pass saved before head scores existed.
    """

    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    stats: list[dict[str, ChannelStats]] = field(default_factory=list)
    tokens: int = 0
    damp: float = 0.01
    heads: list[torch.Tensor] | None = None

    def __post_init__(self):
        # Orders (best first) used by every importance-guided edit of a mask.
        self.attn_order = [[tuple(g.argsort(descending=True, stable=True).tolist()) for g in a] for a in self.attn]
        self.mlp_order = [tuple(m.argsort(descending=True, stable=True).tolist()) for m in self.mlp]
        self.group_order = [tuple(a.sum(1).argsort(descending=True, stable=True).tolist()) for a in self.attn]
        self.head_order = None if self.heads is None else [
            [tuple(g.argsort(descending=True, stable=True).tolist()) for g in h.reshape(a.shape[0], -1)]
            for h, a in zip(self.heads, self.attn)]

    def channel_means(self) -> ChannelMeans:
        """The dense model's mean o_proj / down_proj inputs: what bias compensation needs."""
        return ChannelMeans(tuple(s["o_in"].mean for s in self.stats), tuple(s["down_in"].mean for s in self.stats))

    def save(self, path) -> None:
        torch.save({"attn": self.attn, "mlp": self.mlp, "tokens": self.tokens, "damp": self.damp, "heads": self.heads,
                    "stats": [{k: vars(v) for k, v in s.items()} for s in self.stats]}, path)

    @classmethod
    def load(cls, path) -> "Importance":
        d = torch.load(path, weights_only=True)
        stats = [{k: ChannelStats(**v) for k, v in s.items()} for s in d["stats"]]
        return cls(d["attn"], d["mlp"], stats, d["tokens"], d["damp"], d.get("heads"))


def hinv_diag(xtx: torch.Tensor, n: int, damp: float) -> torch.Tensor:
    """diag of H^-1 for H = 2 X^T X / n + damp * mean(diag H) * I, in fp64 for safety.

    With H = L L^T, H^-1 = L^-T L^-1, so diag(H^-1)_j = sum_i (L^-1)_ij^2: one triangular
    solve (BLAS trsm), much faster than forming H^-1 (cholesky_inverse is slow on CPU). It runs
    where the statistics are: with the solves moved to the CPU, the pass over a 7B-shaped model
    (8 x 2048 tokens) took 187 s on an H200 (fp64 solves of size 11008 per block on 16 CPU cores)."""
    h = 2 * xtx.double() / max(n, 1)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h = h + damp * torch.diagonal(h).mean().clamp_min(1e-12) * eye
    linv = torch.linalg.solve_triangular(torch.linalg.cholesky(h), eye, upper=False)
    return linv.pow(2).sum(0).float()


def saliency(weight: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """phi_ij = W_ij^2 / [H^-1]_jj  -> [out, in]."""
    return weight.detach().float().pow(2) / hinv.to(weight.device)[None, :]


def block_scores(block, hinv: dict[str, torch.Tensor], shape: ModelShape
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention score per (KV group, rotary pair), MLP score per channel and query-head score
    (its q and o saliency summed over the head) of one block."""
    lin = block_linears(block)
    hd, half, g = shape.head_dim, shape.n_pairs, shape.group_size
    q = saliency(lin["self_attn.q_proj"].weight, hinv["attn_in"]).sum(1).view(shape.num_heads, hd)
    k = saliency(lin["self_attn.k_proj"].weight, hinv["attn_in"]).sum(1).view(shape.num_kv_heads, hd)
    v = saliency(lin["self_attn.v_proj"].weight, hinv["attn_in"]).sum(1).view(shape.num_kv_heads, hd)
    o = saliency(lin["self_attn.o_proj"].weight, hinv["o_in"]).sum(0).view(shape.num_heads, hd)
    per_dim = k + v + (q + o).view(shape.num_kv_heads, g, hd).sum(1)  # [n_kv, hd]: sum over the group's heads
    attn = per_dim[:, :half] + per_dim[:, half:]  # rotate-half layout: pair p = dims (p, p + hd/2)
    mlp = (saliency(lin["mlp.up_proj"].weight, hinv["mlp_in"]).sum(1)
           + saliency(lin["mlp.gate_proj"].weight, hinv["mlp_in"]).sum(1)
           + saliency(lin["mlp.down_proj"].weight, hinv["down_in"]).sum(0))
    return attn, mlp, (q + o).sum(1)


@torch.no_grad()
def iter_importance(model, windows: torch.Tensor, shape: ModelShape, batch_size: int = 8, damp: float = 0.01,
                    cancel: threading.Event | None = None) -> Iterator[Progress | Importance]:
    """Yields Progress per block, then the Importance (last item)."""
    inputs = capture_block_inputs(model, windows, batch_size, cancel)
    attn, mlp, heads, stats = [], [], [], []
    L = len(model.model.layers)
    for i, block in enumerate(model.model.layers):
        check_cancel(cancel)
        lin = block_linears(block)
        with StatsCollector({k: lin[v] for k, v in STAT_INPUTS.items()}, execution_device(block)) as col:
            outputs = run_block(block, inputs.at(i))
        hinv = {k: hinv_diag(s.xtx, s.n, damp) for k, s in col.stats.items()}
        with onloaded(block):
            a, m, h = block_scores(block, hinv, shape)
        attn.append(a.cpu())
        mlp.append(m.cpu())
        heads.append(h.cpu())
        stats.append({k: ChannelStats(s.sq_norm.cpu(), s.mean.cpu(), s.variance.cpu(), s.n) for k, s in col.stats.items()})
        inputs = inputs.with_hidden(outputs)
        yield Progress("importance", i + 1, L, f"block {i + 1}/{L}")
    yield Importance(attn, mlp, stats, tokens=int(windows.numel()), damp=damp, heads=heads)


def _per_pair(per_dim_q: torch.Tensor, per_dim_kv: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Sum per-dimension scores of the query heads [H, hd] and KV heads [KV, hd] into [KV, n_pairs]."""
    hd, half, g = shape.head_dim, shape.n_pairs, shape.group_size
    d = per_dim_kv + per_dim_q.view(shape.num_kv_heads, g, hd).sum(1)
    return d[:, :half] + d[:, half:]


@torch.no_grad()
def wanda_importance(model, stats: Importance, shape: ModelShape) -> Importance:
    """|W_ij| * ||X_j|| summed per rotary pair and MLP channel over every projection, from the same
    calibration pass: first order, no weight update (it can rank better where nothing is reformed)."""
    attn, mlp, heads = [], [], []
    for i, block in enumerate(model.model.layers):
        with onloaded(block):
            lin = {k: v.weight.detach().float().abs().cpu() for k, v in block_linears(block).items()}
        norm = {k: st.sq_norm.clamp_min(0).sqrt() for k, st in stats.stats[i].items()}  # ||X_j||
        q = lin["self_attn.q_proj"] @ norm["attn_in"] + lin["self_attn.o_proj"].sum(0) * norm["o_in"]
        kv = lin["self_attn.k_proj"] @ norm["attn_in"] + lin["self_attn.v_proj"] @ norm["attn_in"]
        attn.append(_per_pair(q.view(shape.num_heads, -1), kv.view(shape.num_kv_heads, -1), shape))
        heads.append(q.view(shape.num_heads, -1).sum(1))
        mlp.append(lin["mlp.gate_proj"] @ norm["mlp_in"] + lin["mlp.up_proj"] @ norm["mlp_in"]
                   + lin["mlp.down_proj"].sum(0) * norm["down_in"])
    return Importance(attn, mlp, stats.stats, stats.tokens, stats.damp, heads)


@torch.no_grad()
def wifv_importance(model, stats: Importance, shape: ModelShape) -> Importance:
    """FLAP's fluctuation (input variance x squared column norm of o_proj / down_proj) per rotary
    pair and MLP channel: it ranks what bias compensation can stand in for, because a channel
    that barely varies is well replaced by its mean."""
    attn, mlp, heads = [], [], []
    for i, block in enumerate(model.model.layers):
        with onloaded(block):
            lin = block_linears(block)
            wo = lin["self_attn.o_proj"].weight.detach().float().cpu().pow(2).sum(0)
            wd = lin["mlp.down_proj"].weight.detach().float().cpu().pow(2).sum(0)
        o = wo * stats.stats[i]["o_in"].variance
        attn.append(_per_pair(o.view(shape.num_heads, -1), torch.zeros(shape.num_kv_heads, shape.head_dim), shape))
        heads.append(o.view(shape.num_heads, -1).sum(1))
        mlp.append(wd * stats.stats[i]["down_in"].variance)
    return Importance(attn, mlp, stats.stats, stats.tokens, stats.damp, heads)


SCORINGS = {"obs": None, "wanda": wanda_importance, "wifv": wifv_importance}


def scoring(name: str, model, importance: Importance, shape: ModelShape) -> Importance:
    """An Importance ranking the same structures by `name`: "obs" (METHOD section 2, the pass
    itself), "wanda" or "wifv" (from the same pass's input statistics)."""
    if name not in SCORINGS:
        raise SubnetError(f"unknown scoring {name!r}; choose from {', '.join(SCORINGS)}")
    return importance if SCORINGS[name] is None else SCORINGS[name](model, importance, shape)


def compute_importance(model, windows: torch.Tensor, shape: ModelShape, on_event: EventSink | None = None,
                       cancel: threading.Event | None = None, batch_size: int = 8, damp: float = 0.01) -> Importance:
    on_event = on_event or no_event
    result = None
    for item in iter_importance(model, windows, shape, batch_size, damp, cancel):
        if isinstance(item, Importance):
            result = item
        else:
            on_event(item)
    return result


# ---- building layers from scores ---------------------------------------------------------------
def top_layer(importance: Importance, layer: int, pairs: int, width: int) -> LayerChoice:
    """Keep the `pairs` best rotary pairs of each KV group and the `width` best MLP channels."""
    groups = tuple(tuple(sorted(order[:pairs])) for order in importance.attn_order[layer])
    return LayerChoice(groups, tuple(sorted(importance.mlp_order[layer][:width])))
