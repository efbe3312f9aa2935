"""Reformation (METHOD section 4): recompute `o_proj` and `down_proj` on their kept input
columns so that each reproduces the dense layer's output on calibration data.

Blocks are processed in order. At each kept block, on the block's current input (the output of
the already reformed blocks before it):

- `o_proj`: target = dense `o_proj` applied to the *dense* attention output; regressors = the
  subnet's own attention output (fewer score dimensions, so it differs from the dense one).
- `down_proj` (after `o_proj` is reformed, so it sees that change): on the subnet's MLP input,
  target = dense `down_proj` applied to the full intermediate; regressors = its kept channels.

Only Gram matrices are kept (X_d X_d^T, X_d X_s^T, X_s X_s^T and the input sums, accumulated by
hooks one batch at a time, summed in fp64); the solves run in fp64, with a ridge that pulls
towards the unreformed weights (with few calibration tokens the plain least-squares fit overfits
badly). The bias is fitted together with the kept weights (an intercept: a constant channel
appended to the regressors), starting from the subnet's own bias, which with bias compensation is
FLAP's W[:, removed] @ mean[removed]; a sublayer that keeps nothing gets its best constant. A
solution is adopted only when it lowers the layer's calibration error against that start, which
is exact from the same statistics, so reformation never makes a layer worse than compensation
alone. The base model is never modified: we work on a freshly sliced copy.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..calibrate.capture import BlockInputs, Stop, capture_block_inputs, run_block
from ..events import EventSink, Progress, check_cancel, no_event
from ..model.devices import onloaded
from ..model.modeling_subnet import SubnetBlock, SubnetForCausalLM, norm_names
from ..model.slicing import ChannelMeans, layer_indices, slice_model, with_output_biases
from ..model.subnet import Subnet
from ..settings import DataSettings


@dataclass(frozen=True)
class ReformSettings:
    windows: int = DataSettings.calibration_windows  # calibration windows (METHOD: 128)
    seq_len: int = DataSettings.seq_len
    method: str = "closed"  # "closed" (exact solve) or "admm" (METHOD 4's iteration)
    rho: float = 1.0  # ADMM penalty, relative to the mean diagonal of the normalised Gram matrix
    iterations: int = 30
    # Ridge lambda towards the unreformed weights, relative to the mean diagonal of X_s X_s^T: a stabiliser
    # (METHOD 8.4). Held-out ppl (16x512 BBC windows, dense 28.99) of demo-search picks of the embedded model,
    # reformed with the intercept (2026-12-02):
    #   70 % pick (159.6 unreformed), 16x256 tokens: damp 0.01 -> 84.2, 0.1 -> 81.0, 1.0 -> 92.0
    #   60 % pick (354.5 unreformed), 16x256 tokens: damp 0.01 -> 117.3, 0.1 -> 112.3, 1.0 -> 117.1
    #   70 % uniform-FLAP subnet (143.0), 32x256: 1e-4 -> 85.7, 0.01 -> 85.5, 0.1 -> 87.0, 1.0 -> 99.5
    #   the same, 128x256: 1e-4 -> 77.6, 0.01 -> 78.5, 0.1 -> 81.8, 1.0 -> 99.1
    # so 0.01 with this default's 128 windows, 0.1 for the demo's 16 (fewer tokens want more ridge).
    damp: float = 0.01
    intercept: bool = True  # fit o_proj / down_proj biases with the kept weights
    intercept_damp: float = 1e-4  # ridge of the bias column, relative to the token count (a stabiliser only)
    corpus: str = DataSettings.corpus
    batch_size: int = 8
    seed: int = DataSettings.seed

    @classmethod
    def demo(cls) -> "ReformSettings":
        """Small enough for an interactive demo on CPU (about a tenth of the default's tokens)."""
        return cls(windows=16, seq_len=256, damp=0.1)

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
    compensated: bool = False  # the reformation started from the bias-compensated subnet
    digest: str = ""  # of the reformed weights (`reformed_digest`): what a "reformed" label must match
    sketch: tuple[float, ...] = ()  # `reformed_sketch`: the same reformation on another thread count matches it

    def to_dict(self) -> dict:
        """Everything but the model (JSON-friendly)."""
        return {"layers": [l.to_dict() for l in self.layers], "settings": self.settings.to_dict(),
                "seconds": self.seconds, "tokens": self.tokens, "compensated": self.compensated,
                "digest": self.digest, "sketch": list(self.sketch)}


def reformed_digest(model) -> str:
    """sha256 over every o_proj / down_proj weight and bias of a sliced model, in block order: the
    identity of a reformation's result, so an export can prove its weights are the ones reformed."""
    h = hashlib.sha256()
    for block in model.model.layers:
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            for t in (getattr(lin, "weight", None), getattr(lin, "bias", None)):
                if t is not None:
                    h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reformed_sketch(model) -> tuple[float, ...]:
    """Per o_proj / down_proj weight and bias of every block: its size, its sum of squares and its dot
    with fixed pseudo-random signs. The digest is exact, but the same reformation run with another
    number of threads sums in another order; its sketch then agrees within fp32 rounding
    (`same_sketch`), while another reformation's does not."""
    out: list[float] = []
    g = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            for t in (getattr(lin, "weight", None), getattr(lin, "bias", None)):
                v = torch.zeros(0, dtype=torch.float64) if t is None else t.detach().double().cpu().flatten()
                signs = torch.randint(0, 2, (v.numel(),), generator=g, dtype=torch.float64) * 2 - 1
                out += [float(v.numel()), float(v @ v), float(v @ signs)]
    return tuple(out)


def same_sketch(a, b, rtol: float = 1e-4) -> bool:
    """Whether two sketches are of one reformation: sizes equal, sums of squares within `rtol`, and
    the signed sums within `rtol` of what rounding of a vector of that size and norm can move."""
    if len(a) != len(b) or not a or len(a) % 3:
        return False
    for (n, sa, da), (m, sb, db) in zip(zip(*[iter(a)] * 3), zip(*[iter(b)] * 3)):
        top = max(sa, sb)
        if n != m or abs(sa - sb) > rtol * top or abs(da - db) > rtol * (n * top) ** 0.5:
            return False
    return True


# ---- statistics ------------------------------------------------------------------------------
@dataclass
class Gram:
    """fp64 sums over tokens of X_d X_d^T [d, d], X_d X_s^T [d, k], X_s X_s^T [k, k] and of the
    inputs themselves (x_d [d], x_s [k]): the normal equations of one layer, intercept included."""

    dd: torch.Tensor
    ds: torch.Tensor
    ss: torch.Tensor
    d_sum: torch.Tensor
    s_sum: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, d: int, k: int, device) -> "Gram":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(d, d), z(d, k), z(k, k), z(d), z(k))

    def add(self, xd: torch.Tensor, xs: torch.Tensor) -> None:
        """xd [n, d], xs [n, k]: the same tokens, dense and subnet inputs."""
        xd, xs = xd.double(), xs.double()
        self.dd += xd.T @ xd
        self.ds += xd.T @ xs
        self.ss += xs.T @ xs
        self.d_sum += xd.sum(0)
        self.s_sum += xs.sum(0)
        self.n += xd.shape[0]

    def augmented(self, intercept: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X_d' X_d'^T, X_d' X_s'^T, X_s' X_s'^T) with a constant 1 appended to both inputs when
        `intercept`: then a weight [W, b] maps [x; 1] to W x + b, and one solve fits both."""
        if not intercept:
            return self.dd, self.ds, self.ss
        n = torch.tensor([[float(self.n)]], dtype=torch.float64, device=self.dd.device)
        dd = torch.cat([torch.cat([self.dd, self.d_sum[:, None]], 1), torch.cat([self.d_sum[None], n], 1)])
        ds = torch.cat([torch.cat([self.ds, self.d_sum[:, None]], 1), torch.cat([self.s_sum[None], n], 1)])
        ss = torch.cat([torch.cat([self.ss, self.s_sum[:, None]], 1), torch.cat([self.s_sum[None], n], 1)])
        return dd, ds, ss


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1])


def _run_until_stop(block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> None:
    try:
        block(h, *args, **kwargs)
    except Stop:
        return
    raise RuntimeError("a statistics hook did not fire")  # the block did not call the hooked layer


@torch.no_grad()
def attention_gram(dense_block: nn.Module, sub_block: nn.Module, dense_in: BlockInputs, sub_in: BlockInputs,
                   cancel: threading.Event | None = None) -> Gram:
    """Inputs of the dense and the subnet `o_proj` on the same block inputs (hooks, one batch held).
    A subnet block that skips attention has no o_proj input: only the dense side (and the count)."""
    d_o = dense_block.self_attn.o_proj
    attends = sub_block.norm("attn_in") is not None
    k = sub_block.self_attn.o_proj.in_features if attends else 0
    gram = Gram.zeros(d_o.in_features, k, "cpu")
    stash: dict[str, torch.Tensor] = {}

    def dense_hook(_m, args):
        stash["x"] = _flat(args[0])
        raise Stop

    def sub_hook(_m, args):
        gram.add(stash.pop("x").cpu(), _flat(args[0]).cpu())
        raise Stop

    handles = [d_o.register_forward_pre_hook(dense_hook)]
    if attends:
        handles.append(sub_block.self_attn.o_proj.register_forward_pre_hook(sub_hook))
    try:
        for b in range(len(sub_in.hidden)):
            check_cancel(cancel)
            _run_until_stop(dense_block, dense_in.hidden[b], dense_in.args[b], dense_in.kwargs[b])
            if attends:
                _run_until_stop(sub_block, sub_in.hidden[b], sub_in.args[b], sub_in.kwargs[b])
            else:
                x = stash.pop("x").cpu()
                gram.add(x, x[:, :0])
    finally:
        for h in handles:
            h.remove()
    return gram


def mlp_norm(block: nn.Module) -> nn.Module | None:
    """The norm before a block's MLP: a sliced block's (None when it skips its MLP), or a base
    block's under its family's name (Gemma's pre_feedforward_layernorm, else post_attention_layernorm)."""
    if isinstance(block, SubnetBlock):
        return block.norm("mlp_in")
    return block.get_submodule(norm_names(hasattr(block, "pre_feedforward_layernorm"))["mlp_in"])


@torch.no_grad()
def mlp_gram(dense_block: nn.Module, sub_block: nn.Module, sub_in: BlockInputs, kept: torch.Tensor,
             cancel: threading.Event | None = None) -> Gram:
    """On the subnet's MLP input: the dense full intermediate (X_d) and its kept channels (X_s).
    A subnet block that skips its MLP has no norm before it: the dense norm is applied here."""
    dense_mlp = dense_block.mlp
    P = dense_mlp.down_proj.in_features
    kept = kept.cpu()
    grams: list[Gram] = []
    sub_norm, dense_norm = mlp_norm(sub_block), mlp_norm(dense_block)

    def hook(_m, args):
        x = args[0] if sub_norm is not None else dense_norm(args[0])
        a = _flat(dense_mlp.act_fn(dense_mlp.gate_proj(x)) * dense_mlp.up_proj(x)).cpu()  # [n, P]
        g = Gram.zeros(P, len(kept), "cpu") if not grams else grams[0]
        g.add(a, a.index_select(1, kept))
        grams[:] = [g]
        raise Stop

    handle = sub_block.mlp.register_forward_pre_hook(hook)
    try:
        with onloaded(dense_block):
            for b in range(len(sub_in.hidden)):
                check_cancel(cancel)
                _run_until_stop(sub_block, sub_in.hidden[b], sub_in.args[b], sub_in.kwargs[b])
    finally:
        handle.remove()
    return grams[0]


# ---- solves ----------------------------------------------------------------------------------
def _sym_solve(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c @ a^-1 for symmetric positive definite a (Cholesky; falls back to lstsq if a is not PD)."""
    if a.shape[0] == 0:
        return c[:, :0]
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(c.T, chol).T
    return torch.linalg.lstsq(a, c.T).solution.T


@dataclass(frozen=True)
class Problem:
    """One layer's least squares, min ||V' X_s' - W' X_d'||^2 + ridge, from Gram matrices alone.

    W' = [W, b] is the dense layer (bias b, or 0), V' the subnet's layer, both with the intercept
    column when `intercept`; `start` = V' before reformation (the kept columns, and the subnet's
    bias: the base bias plus its compensation, if any)."""

    c: torch.Tensor  # W' X_d' X_s'^T  [out, k(+1)]
    ss: torch.Tensor  # X_s' X_s'^T   [k(+1), k(+1)]
    energy: float  # ||W' X_d'||^2
    start: torch.Tensor  # [out, k(+1)]
    intercept: bool

    @classmethod
    def of(cls, w: torch.Tensor, b: torch.Tensor | None, gram: Gram, kept: torch.Tensor, start_bias: torch.Tensor | None,
           intercept: bool) -> "Problem":
        w = w.double().cpu()
        out = w.shape[0]
        b = torch.zeros(out, dtype=torch.float64) if b is None else b.double().cpu()
        dd, ds, ss = gram.augmented(intercept)
        wt = torch.cat([w, b[:, None]], 1) if intercept else w  # the target layer
        start = w.index_select(1, kept.cpu())
        if intercept:
            sb = torch.zeros(out, dtype=torch.float64) if start_bias is None else start_bias.double().cpu()
            start = torch.cat([start, sb[:, None]], 1)
        return cls(wt @ ds, ss, float(((wt @ dd) * wt).sum()), start, intercept)

    def error(self, v: torch.Tensor) -> float:
        """||V' X_s' - W' X_d'||^2 over the calibration tokens."""
        return self.energy - 2 * float((self.c * v).sum()) + float(((v @ self.ss) * v).sum())

    def ridge(self, damp: float, intercept_damp: float, n: int) -> torch.Tensor:
        """Per-column ridge: damp x the mean diagonal of X_s X_s^T for the weights (both sides are
        sums over tokens, so the token count does not change it), intercept_damp x n for the bias."""
        k = self.ss.shape[0] - int(self.intercept)
        lam = damp * float(torch.diagonal(self.ss[:k, :k]).mean()) if k else 0.0
        r = torch.full((self.ss.shape[0],), lam, dtype=torch.float64)
        if self.intercept:
            r[-1] = intercept_damp * max(n, 1)
        return r


def closed_form(problem: Problem, damp: float, intercept_damp: float, n: int) -> torch.Tensor:
    """V' = (W' X_d' X_s'^T + Lambda V0)(X_s' X_s'^T + Lambda)^-1 = V0 + (C - V0 G)(G + Lambda)^-1.

    The ridge pulls the solution towards the unreformed start V0, not towards zero: it damps the
    *correction* (METHOD 4's W_K + W_notK X_notK X_K^T (X_K X_K^T + lambda I)^-1), so a large
    lambda degrades gracefully to no reformation instead of shrinking the layer."""
    lam = problem.ridge(damp, intercept_damp, n)
    return _sym_solve(problem.ss + torch.diag(lam), problem.c + problem.start * lam[None])


def admm(w: torch.Tensor, b: torch.Tensor | None, gram: Gram, kept: torch.Tensor, start_bias: torch.Tensor | None,
         settings: "ReformSettings") -> torch.Tensor:
    """METHOD 4's ADMM on the full-width problem with the omitted columns forced to zero.

    The regressor of a kept column is the subnet's input X_s, of an omitted one the dense input
    (its value does not matter at the optimum), plus the constant column of the intercept (always
    kept). It minimises the same objective as `closed_form` (the same ridge towards the start), to
    which it converges. Returns the kept columns [out, k] (and the bias column)."""
    intercept = settings.intercept
    d, k = gram.dd.shape[0], gram.ss.shape[0]
    n = max(gram.n, 1)
    kept = kept.cpu()
    dropped = torch.tensor(sorted(set(range(d)) - set(kept.tolist())), dtype=torch.long)
    # the mixed regressors [X_s; X_d[dropped]; 1] and the target inputs [X_d; 1], all divided by n
    dd, ds, ss = (m / n for m in gram.augmented(intercept))
    ks = k + int(intercept)  # kept columns of the subnet side, intercept included
    m = ks + len(dropped)
    g = torch.zeros(m, m, dtype=torch.float64)
    g[:ks, :ks] = ss
    dsel = dropped  # omitted channels keep their index in the augmented matrices (the constant is last)
    g[ks:, :ks] = ds.index_select(0, dsel)
    g[:ks, ks:] = g[ks:, :ks].T
    g[ks:, ks:] = dd.index_select(0, dsel).index_select(1, dsel)
    w = w.double().cpu()
    wt = torch.cat([w, (torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.double().cpu())[:, None]], 1) \
        if intercept else w
    c = torch.cat([wt @ ds, wt @ dd.index_select(1, dsel)], dim=1)  # W' X_d' X^T  [out, m]
    problem = Problem.of(w, b, gram, kept, start_bias, intercept)
    lam_kept = problem.ridge(settings.damp, settings.intercept_damp, gram.n) / n
    lam = torch.cat([lam_kept, torch.full((len(dropped),), float(lam_kept[0]) if k else 0.0, dtype=torch.float64)])
    r = settings.rho * float(torch.diagonal(g).mean())
    chol = torch.linalg.cholesky(g + torch.diag(lam + r))
    mask = torch.zeros(m, dtype=torch.float64)
    mask[:ks] = 1
    w0 = torch.cat([problem.start, w.index_select(1, dropped)], 1)  # start: kept columns (and bias), omitted ones
    c = c + lam[None] * w0  # ridge towards the start
    z = w0 * mask
    u = torch.zeros_like(z)
    for _ in range(settings.iterations):
        w_hat = torch.cholesky_solve((c + r * (z - u)).T, chol).T
        z = (w_hat + u) * mask
        u = u + w_hat - z
    return z[:, :ks]


def solve_layer(w: torch.Tensor, b: torch.Tensor | None, gram: Gram, kept: torch.Tensor,
                start_bias: torch.Tensor | None, settings: "ReformSettings"
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, float, float]:
    """(new kept weights, new bias (None without intercept), or (None, None) when they would not
    lower the error against the start; relative error before; after)."""
    problem = Problem.of(w, b, gram, kept, start_bias, settings.intercept)
    v = closed_form(problem, settings.damp, settings.intercept_damp, gram.n) if settings.method == "closed" else \
        admm(w, b, gram, kept, start_bias, settings)
    err0, err1 = problem.error(problem.start), problem.error(v)
    norm = max(problem.energy, 1e-30)
    if not torch.isfinite(v).all() or not err1 < err0:
        return None, None, err0 / norm, err0 / norm
    if settings.intercept:
        return v[:, :-1], v[:, -1], err0 / norm, err1 / norm
    return v, None, err0 / norm, err1 / norm


def _set(linear: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    if weight is not None and getattr(linear, "weight", None) is not None:
        linear.weight = nn.Parameter(weight.to(linear.weight.device, linear.weight.dtype).contiguous(),
                                     requires_grad=False)
    if bias is not None:
        ref = linear.bias
        linear.bias = nn.Parameter(bias.to(ref.device, ref.dtype).contiguous(), requires_grad=False)


# ---- the pass over blocks --------------------------------------------------------------------
@torch.no_grad()
def reform(lm, subnet: Subnet, settings: ReformSettings = ReformSettings(), on_event: EventSink = no_event,
           cancel: threading.Event | None = None, calib_windows: torch.Tensor | None = None,
           means: ChannelMeans | None = None) -> ReformResult:
    """Slice `subnet` out of `lm.model` (with `means`: bias-compensated) and reform its
    `o_proj`/`down_proj` block by block.

    Emits Progress("reform", blocks done, kept blocks). On cancel raises Cancelled; the base
    model is never touched, and the half-reformed copy is dropped.
    """
    t0 = time.perf_counter()
    shape, base = lm.shape, lm.model
    subnet.validate(shape)
    if calib_windows is None:
        from ..calibrate.data import calibration_windows, load_corpus

        calib_windows = calibration_windows(lm.tokenizer, load_corpus(settings.corpus), settings.windows,
                                            settings.seq_len, settings.seed)
    model = slice_model(base, subnet, shape, means)  # o_proj/down_proj weights are fresh copies (index_select)
    q_total, P = shape.num_heads * shape.head_dim, shape.intermediate_size
    omits = any(l is not None and (l.width < P or len(layer_indices(shape, l, "cpu")["q"]) < q_total)
                for l in subnet.layers)
    if settings.intercept and omits:  # only layers that lose input columns are reformed
        model = with_output_biases(model)
    kept_layers = [i for i, layer in enumerate(subnet.layers) if layer is not None]
    on_event(Progress("reform", 0, len(kept_layers), "capturing block inputs"))
    dense_in = capture_block_inputs(base, calib_windows, settings.batch_size, cancel)
    sub_in = capture_block_inputs(model, calib_windows, settings.batch_size, cancel)
    hidden = sub_in.hidden  # the embeddings are shared, so dense and subnet start equal
    reports: list[LayerReform] = []
    for j, i in enumerate(kept_layers):
        layer, dense_block, sub_block = subnet.layers[i], base.model.layers[i], model.model.layers[j]
        idx = layer_indices(shape, layer, "cpu")
        for name, kept in (("self_attn.o_proj", idx["q"]), ("mlp.down_proj", idx["mlp"])):
            check_cancel(cancel)
            dense_lin = dense_block.get_submodule(name)
            total = dense_lin.in_features
            sub_lin = sub_block.get_submodule(name)
            start_bias = None if getattr(sub_lin, "bias", None) is None else sub_lin.bias.detach()
            if len(kept) == total:  # nothing omitted: the subnet sees the dense input
                reports.append(LayerReform(i, name, total, total, 0.0, 0.0, False))
                continue
            if name == "self_attn.o_proj":
                gram = attention_gram(dense_block, sub_block, dense_in.at(i).with_hidden(hidden),
                                      sub_in.at(j).with_hidden(hidden), cancel)
            else:
                gram = mlp_gram(dense_block, sub_block, sub_in.at(j).with_hidden(hidden), kept, cancel)
            with onloaded(dense_lin):  # read after the block ran: an offloaded layer's weights come and go
                w = dense_lin.weight.detach().clone()
                b = None if dense_lin.bias is None else dense_lin.bias.detach().clone()
            new_w, new_b, before, after = solve_layer(w, b, gram, kept, start_bias, settings)
            applied = new_w is not None
            if applied:
                _set(sub_lin, new_w if len(kept) else None, new_b)
            reports.append(LayerReform(i, name, len(kept), total, before, after, applied))
        check_cancel(cancel)
        hidden = run_block(sub_block, sub_in.at(j).with_hidden(hidden))
        on_event(Progress("reform", j + 1, len(kept_layers), f"block {i}"))
    model = model.eval()
    return ReformResult(model, tuple(reports), settings, time.perf_counter() - t0, int(calib_windows.numel()),
                        means is not None, reformed_digest(model), reformed_sketch(model))
