"""Reformation (METHOD section 4): recompute `o_proj` and `down_proj` on their kept input
columns so that each reproduces the dense layer's output on calibration data.

Blocks are processed in order. At each kept block, on the block's current input (the output of
the already reformed blocks before it):

- `o_proj`: target = dense `o_proj` applied to the *dense* attention output; regressors = the
  subnet's own attention output (fewer score dimensions, so it differs from the dense one).
- `down_proj` (after `o_proj` is reformed, so it sees that change): on the subnet's MLP input,
  target = dense `down_proj` applied to the full intermediate; regressors = its kept channels.

Only Gram matrices are kept (X_d X_d^T, X_d X_s^T, X_s X_s^T, accumulated by hooks one batch at
a time, summed in fp64); the solves run in fp64, with a ridge that pulls towards the unreformed
weights (with few calibration tokens the plain least-squares fit overfits badly). A solution is adopted only when it lowers the
layer's calibration error, which is exact from the same statistics, so reformation never makes
a layer worse. The base model is never modified: we work on a freshly sliced copy.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .capture import BlockInputs, capture_block_inputs, run_block
from .events import EventSink, Progress, check_cancel, no_event
from .modeling_subnet import SubnetForCausalLM
from .settings import DataSettings
from .slicing import layer_indices, slice_model
from .subnet import Subnet


@dataclass(frozen=True)
class ReformSettings:
    windows: int = DataSettings.calibration_windows  # calibration windows (METHOD: 128)
    seq_len: int = DataSettings.seq_len
    method: str = "closed"  # "closed" (exact solve) or "admm" (METHOD 4's iteration)
    rho: float = 1.0  # ADMM penalty, relative to the mean diagonal of the normalised Gram matrix
    iterations: int = 30
    # Ridge lambda towards the unreformed weights, relative to the mean diagonal of X_s X_s^T. Measured on
    # the embedded model at 60 % with 16x256 calibration tokens, held-out ppl 5857 before reformation:
    # damp 0.01 -> 103240 (overfits calibration: its own ppl 2830 -> 158), 0.1 -> 2723, 1.0 -> 1020, 3.0 -> 1547.
    damp: float = 1.0
    corpus: str = DataSettings.corpus
    batch_size: int = 8
    seed: int = DataSettings.seed

    @classmethod
    def demo(cls) -> "ReformSettings":
        """Small enough for an interactive demo on CPU (about a tenth of the default's tokens)."""
        return cls(windows=16, seq_len=256)

    def __post_init__(self):
        if self.method not in ("closed", "admm"):
            raise ValueError(f"unknown reformation method {self.method!r}; use 'closed' or 'admm'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ReformSettings":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LayerReform:
    """One reformed projection: relative calibration error ||V X_s - W X_d||^2 / ||W X_d||^2."""

    layer: int  # base-model layer index
    name: str  # "self_attn.o_proj" or "mlp.down_proj"
    kept: int  # kept input columns
    total: int  # input columns of the dense layer
    error_before: float
    error_after: float
    applied: bool  # False when nothing was omitted or the solve did not help

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LayerReform":
        return cls(**data)


@dataclass(frozen=True)
class ReformResult:
    model: SubnetForCausalLM = field(repr=False)
    layers: tuple[LayerReform, ...]
    settings: ReformSettings
    seconds: float
    tokens: int

    def to_dict(self) -> dict:
        """Everything but the model (JSON-friendly)."""
        return {"layers": [l.to_dict() for l in self.layers], "settings": self.settings.to_dict(),
                "seconds": self.seconds, "tokens": self.tokens}


# ---- statistics ------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook once it has what it needs, so the rest of the block is not computed."""


@dataclass
class Gram:
    """fp64 sums over tokens of X_d X_d^T [d, d], X_d X_s^T [d, k] and X_s X_s^T [k, k]."""

    dd: torch.Tensor
    ds: torch.Tensor
    ss: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, d: int, k: int, device) -> "Gram":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(d, d), z(d, k), z(k, k))

    def add(self, xd: torch.Tensor, xs: torch.Tensor) -> None:
        """xd [n, d], xs [n, k]: the same tokens, dense and subnet inputs."""
        xd, xs = xd.float(), xs.float()
        self.dd += (xd.T @ xd).double()
        self.ds += (xd.T @ xs).double()
        self.ss += (xs.T @ xs).double()
        self.n += xd.shape[0]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1])


def _run_until_stop(block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> None:
    try:
        block(h, *args, **kwargs)
    except _Stop:
        return
    raise RuntimeError("a statistics hook did not fire")  # the block did not call the hooked layer


@torch.no_grad()
def attention_gram(dense_block: nn.Module, sub_block: nn.Module, dense_in: BlockInputs, sub_in: BlockInputs,
                   cancel: threading.Event | None = None) -> Gram:
    """Inputs of the dense and the subnet `o_proj` on the same block inputs (hooks, one batch held)."""
    d_o, s_o = dense_block.self_attn.o_proj, sub_block.self_attn.o_proj
    gram = Gram.zeros(d_o.in_features, s_o.in_features, d_o.weight.device)
    stash: dict[str, torch.Tensor] = {}

    def dense_hook(_m, args):
        stash["x"] = _flat(args[0])
        raise _Stop

    def sub_hook(_m, args):
        gram.add(stash.pop("x"), _flat(args[0]))
        raise _Stop

    handles = [d_o.register_forward_pre_hook(dense_hook), s_o.register_forward_pre_hook(sub_hook)]
    try:
        for b in range(len(sub_in.hidden)):
            check_cancel(cancel)
            _run_until_stop(dense_block, dense_in.hidden[b], dense_in.args[b], dense_in.kwargs[b])
            _run_until_stop(sub_block, sub_in.hidden[b], sub_in.args[b], sub_in.kwargs[b])
    finally:
        for h in handles:
            h.remove()
    return gram


@torch.no_grad()
def mlp_gram(dense_mlp: nn.Module, sub_block: nn.Module, sub_in: BlockInputs, kept: torch.Tensor,
             cancel: threading.Event | None = None) -> Gram:
    """On the subnet's MLP input: the dense full intermediate (X_d) and its kept channels (X_s)."""
    P = dense_mlp.down_proj.in_features
    full = torch.zeros(P, P, dtype=torch.float64, device=dense_mlp.down_proj.weight.device)
    count = [0]

    def hook(_m, args):
        x = args[0]
        a = _flat(dense_mlp.act_fn(dense_mlp.gate_proj(x)) * dense_mlp.up_proj(x)).float()  # [n, P]
        full.add_((a.T @ a).double())
        count[0] += a.shape[0]
        raise _Stop

    handle = sub_block.mlp.register_forward_pre_hook(hook)
    try:
        for b in range(len(sub_in.hidden)):
            check_cancel(cancel)
            _run_until_stop(sub_block, sub_in.hidden[b], sub_in.args[b], sub_in.kwargs[b])
    finally:
        handle.remove()
    ds = full.index_select(1, kept)
    return Gram(full, ds, ds.index_select(0, kept), count[0])


# ---- solves ----------------------------------------------------------------------------------
def _sym_solve(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c @ a^-1 for symmetric positive definite a (Cholesky; falls back to lstsq if a is not PD)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(c.T, chol).T
    return torch.linalg.lstsq(a, c.T).solution.T


def layer_error(w: torch.Tensor, v: torch.Tensor, gram: Gram) -> tuple[float, float]:
    """(||V X_s - W X_d||^2, ||W X_d||^2) over the calibration tokens, from the Gram matrices alone."""
    w, v = w.double(), v.double()
    return _error(w @ gram.ds, v, gram.ss, float(((w @ gram.dd) * w).sum()))


def _error(c: torch.Tensor, v: torch.Tensor, ss: torch.Tensor, target: float) -> tuple[float, float]:
    """Same, with C = W X_d X_s^T and the target energy precomputed (both reused across candidates)."""
    return target - 2 * float((c * v).sum()) + float(((v @ ss) * v).sum()), target


def closed_form(w: torch.Tensor, gram: Gram, kept: torch.Tensor, damp: float) -> torch.Tensor:
    """W_hat = (W X_d X_s^T + lambda W_K)(X_s X_s^T + lambda I)^-1 = W_K + (W X_d X_s^T - W_K X_s X_s^T)(...)^-1.

    The ridge pulls the solution towards the unreformed kept weights W_K, not towards zero: it
    damps the *correction* (METHOD 4's W_K + W_notK X_notK X_K^T (X_K X_K^T + lambda I)^-1), so a
    large lambda degrades gracefully to no reformation instead of shrinking the layer.
    lambda = damp * mean diagonal of X_s X_s^T (both sides are sums over tokens, so the count
    of tokens does not change it)."""
    ss, w = gram.ss, w.double()
    lam = damp * float(torch.diagonal(ss).mean())
    eye = torch.eye(ss.shape[0], dtype=ss.dtype, device=ss.device)
    return _sym_solve(ss + lam * eye, w @ gram.ds + lam * w.index_select(1, kept))


def admm(w: torch.Tensor, gram: Gram, kept: torch.Tensor, damp: float, rho: float, iterations: int) -> torch.Tensor:
    """METHOD 4's ADMM on the full-width problem with the omitted columns forced to zero.

    The regressor of a kept column is the subnet's input X_s, of an omitted one the dense input
    (its value does not matter at the optimum). It minimises the same objective as `closed_form`
    (with the ridge towards the original weights), to which it converges. Returns the kept
    columns [out, k].
    """
    d, k = gram.dd.shape[0], gram.ss.shape[0]
    n = max(gram.n, 1)
    dropped = torch.tensor(sorted(set(range(d)) - set(kept.tolist())), dtype=torch.long, device=kept.device)
    order = torch.cat([kept, dropped])  # columns [K, not K]
    dd, ds, ss = gram.dd / n, gram.ds / n, gram.ss / n
    g = torch.zeros(d, d, dtype=torch.float64, device=dd.device)  # Gram of the mixed regressors
    g[:k, :k] = ss
    g[k:, :k] = ds.index_select(0, dropped)
    g[:k, k:] = g[k:, :k].T
    g[k:, k:] = dd.index_select(0, dropped).index_select(1, dropped)
    w = w.double()
    c = torch.cat([w @ ds, w @ dd.index_select(1, dropped)], dim=1)  # W X_d X^T  [out, d]
    lam = damp * float(torch.diagonal(ss).mean())
    r = rho * float(torch.diagonal(g).mean())
    eye = torch.eye(d, dtype=torch.float64, device=dd.device)
    chol = torch.linalg.cholesky(g + (lam + r) * eye)
    mask = torch.zeros(d, dtype=torch.float64, device=dd.device)
    mask[:k] = 1
    w0 = w.index_select(1, order)
    c = c + lam * w0  # ridge towards the original weights
    z = w0 * mask
    u = torch.zeros_like(z)
    for _ in range(iterations):
        w_hat = torch.cholesky_solve((c + r * (z - u)).T, chol).T
        z = (w_hat + u) * mask
        u = u + w_hat - z
    return z[:, :k]


def solve_layer(w: torch.Tensor, gram: Gram, kept: torch.Tensor, settings: ReformSettings
                ) -> tuple[torch.Tensor | None, float, float]:
    """(new kept weights, or None when they would not lower the error; relative error before; after)."""
    w = w.double()
    v = closed_form(w, gram, kept, settings.damp) if settings.method == "closed" else admm(
        w, gram, kept, settings.damp, settings.rho, settings.iterations)
    c, target = w @ gram.ds, float(((w @ gram.dd) * w).sum())
    err0, _ = _error(c, w.index_select(1, kept), gram.ss, target)
    err1, _ = _error(c, v, gram.ss, target)
    norm = max(target, 1e-30)
    if not torch.isfinite(v).all() or not err1 < err0:
        return None, err0 / norm, err0 / norm
    return v, err0 / norm, err1 / norm


def _set_weight(linear: nn.Linear, value: torch.Tensor) -> None:
    linear.weight = nn.Parameter(value.to(linear.weight.dtype).contiguous(), requires_grad=False)


# ---- the pass over blocks --------------------------------------------------------------------
@torch.no_grad()
def reform(lm, subnet: Subnet, settings: ReformSettings = ReformSettings(), on_event: EventSink = no_event,
           cancel: threading.Event | None = None, calib_windows: torch.Tensor | None = None) -> ReformResult:
    """Slice `subnet` out of `lm.model` and reform its `o_proj`/`down_proj` block by block.

    Emits Progress("reform", blocks done, kept blocks). On cancel raises Cancelled; the base
    model is never touched, and the half-reformed copy is dropped.
    """
    t0 = time.perf_counter()
    shape, base = lm.shape, lm.model
    subnet.validate(shape)
    if calib_windows is None:
        from .data import calibration_windows, load_corpus

        calib_windows = calibration_windows(lm.tokenizer, load_corpus(settings.corpus), settings.windows,
                                            settings.seq_len, settings.seed)
    model = slice_model(base, subnet, shape)  # o_proj/down_proj weights are fresh copies (index_select)
    kept_layers = [i for i, layer in enumerate(subnet.layers) if layer is not None]
    on_event(Progress("reform", 0, len(kept_layers), "capturing block inputs"))
    dense_in = capture_block_inputs(base, calib_windows, settings.batch_size, cancel)
    sub_in = capture_block_inputs(model, calib_windows, settings.batch_size, cancel)
    hidden = sub_in.hidden  # the embeddings are shared, so dense and subnet start equal
    reports: list[LayerReform] = []
    for j, i in enumerate(kept_layers):
        layer, dense_block, sub_block = subnet.layers[i], base.model.layers[i], model.model.layers[j]
        idx = layer_indices(shape, layer, dense_block.input_layernorm.weight.device)
        pairs = [("self_attn.o_proj", idx["q"]), ("mlp.down_proj", idx["mlp"])]
        for name, kept in pairs:
            check_cancel(cancel)
            dense_lin = dense_block.get_submodule(name)
            total = dense_lin.in_features
            if len(kept) == total:  # nothing omitted: the subnet already sees the dense input
                reports.append(LayerReform(i, name, total, total, 0.0, 0.0, False))
                continue
            if name == "self_attn.o_proj":
                gram = attention_gram(dense_block, sub_block, dense_in.with_hidden(hidden),
                                      sub_in.with_hidden(hidden), cancel)
            else:
                gram = mlp_gram(dense_block.mlp, sub_block, sub_in.with_hidden(hidden), kept, cancel)
            new, before, after = solve_layer(dense_lin.weight.detach(), gram, kept, settings)
            if new is not None:
                _set_weight(sub_block.get_submodule(name), new)
            reports.append(LayerReform(i, name, len(kept), total, before, after, new is not None))
        check_cancel(cancel)
        hidden = run_block(sub_block, sub_in.with_hidden(hidden))
        on_event(Progress("reform", j + 1, len(kept_layers), f"block {i}"))
    return ReformResult(model.eval(), tuple(reports), settings, time.perf_counter() - t0,
                        int(calib_windows.numel()))

