"""Cheap candidate fitness: perplexity of the physically sliced subnet on a few calibration windows.

Three savings over the naive way (dense model with zeroed weights, every window, every block):

- **Sliced blocks.** Each kept block is built at its own widths (the same SubnetBlock and the
  same weights `explorer.model.slicing` produces), so a 50 % subnet costs about half a dense forward.
- **Prefix reuse.** The hidden state after block i depends only on the choices of blocks 0..i
  (and on whether biases are compensated), so states are cached under a key of that prefix (per
  batch of windows). A mutated child shares the blocks before its first change with its parent
  and starts from the parent's cached state, which is bitwise the same as recomputing it.
- **Early stop.** Windows run in order; once the summed NLL exceeds the bound (the k-th best
  total so far), the candidate provably cannot enter the top k (NLL is never negative), so the
  rest is skipped and its fitness is marked as a lower bound.
"""
from __future__ import annotations

import copy
import functools
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..events import check_cancel
from ..model.devices import execution_device, is_offloaded, onloaded
from ..model.modeling_subnet import RMSNorm, SubnetBlock, SubnetRotary, block_masks, embed, final_logits
from ..model.slicing import ChannelMeans, block_state_dict, fill_buffers, subnet_config
from ..model.subnet import ModelShape, Subnet


@dataclass(frozen=True)
class FitnessResult:
    nll: float  # summed NLL over the windows evaluated
    tokens: int  # predicted tokens over all windows (the denominator of the full perplexity)
    windows_done: int
    complete: bool  # False: stopped early, `ppl` is a lower bound
    reused_blocks: int  # block forwards skipped thanks to cached prefixes (summed over windows)
    computed_blocks: int
    seconds: float
    created: tuple = field(default=(), repr=False, compare=False)  # cache keys this evaluation stored

    @property
    def ppl(self) -> float:
        """exp(mean NLL); with an early stop, the NLL of the skipped windows counts as 0 (a lower bound)."""
        return math.exp(self.nll / self.tokens)


def fast_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where it is measurably faster than float32 on this device, else float32.

    Fitness only has to rank candidates; bf16 keeps the ranking (the quality benchmark reports the
    rank correlation with fp32) and runs several times faster where there are bf16 matrix units.
    CPU flags are not enough to tell: a CPU that reports AMX / AVX512-BF16 ran bf16 matmuls 4x
    *slower* than fp32 under this torch build, so the choice is timed, once per device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return _timed_choice(str(device))


@functools.lru_cache(maxsize=4)
def _timed_choice(device: str) -> torch.dtype:
    """Time a block-sized matmul in both dtypes; bf16 only when it wins by a clear margin (1.3x)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 576, generator=g), torch.randn(576, 1536, generator=g)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(device, dtype), b.to(device, dtype)
        x @ y  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            x @ y
        best[dtype] = time.perf_counter() - t0
    return torch.bfloat16 if best[torch.bfloat16] * 1.3 < best[torch.float32] else torch.float32


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """"auto" -> the name of `fast_dtype(device)`; explicit names pass through (validated)."""
    if name == "auto":
        return str(fast_dtype(device)).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"fitness dtype must be auto, float32, bfloat16 or float16, not {name!r}")
    return name


class FitnessEvaluator:
    """Evaluates subnets of one base model on fixed token windows, with a byte-bounded LRU of
    prefix hidden states and one of sliced blocks.

    `dtype` is the compute dtype (default: the base model's); `batch` windows run per forward
    (early stop is checked between batches). `means` enables bias compensation: a candidate
    evaluated with `compensated=True` gets the same biases `slicing.slice_model(..., means)` adds.
    Blocks of a model spread by a device map run on their own devices; the hidden state follows."""

    def __init__(self, base, shape: ModelShape, windows: torch.Tensor, cache_bytes: int = 384 * 2**20,
                 cache_every: int = 1, dtype: torch.dtype | None = None, batch: int = 1,
                 block_cache_bytes: int = 512 * 2**20, means: ChannelMeans | None = None, ladders=None,
                 screen_windows: int = 0):
        self.base = base
        self.ladders = ladders  # explorer.search.ladders.Ladders: pre-reformed levels for `reformed` candidates
        self.shape = shape
        self.windows = windows
        self.means = means
        self.cache_bytes = cache_bytes
        self.block_cache_bytes = block_cache_bytes
        self.cache_every = max(1, cache_every)
        embed_tokens, head, norm = base.model.embed_tokens, base.lm_head, base.model.norm
        self.device = execution_device(embed_tokens)
        self.dtype = dtype or next(p for p in base.parameters() if p.device.type != "meta").dtype
        self.tokens = int(windows.shape[0] * (windows.shape[1] - 1))
        self._cache: OrderedDict = OrderedDict()
        self._bytes = 0
        self._blocks: OrderedDict = OrderedDict()  # (base layer, LayerChoice, compensated) -> SubnetBlock
        self._block_bytes = 0
        self._tables: dict = {}  # (device, what) -> rope table / masks at the window positions
        n = windows.shape[0]
        batch = max(1, min(batch, n))
        first = min(screen_windows, n) if screen_windows > 0 else 0  # a screen's windows form the first batch
        self._chunks = ([(0, first)] if first else []) + [(a, min(a + batch, n)) for a in range(first, n, batch)]
        self._config = subnet_config(base.config, Subnet.full(shape), shape)  # the family's constants
        with torch.no_grad(), onloaded(embed_tokens):
            self._embedded = [embed(self._config, embed_tokens.weight, windows[a:b].to(self.device)).to(self.dtype)
                              for a, b in self._chunks]  # each [b - a, T, D]
        T = windows.shape[1]
        self._T = T
        cfg = base.config
        self.head_device = execution_device(head)
        with onloaded(norm), onloaded(head):
            self._norm = RMSNorm(shape.hidden_size, cfg.rms_norm_eps, self._config.norm_offset).to(self.head_device)
            self._norm.weight = torch.nn.Parameter(norm.weight.detach().to(self.head_device, self.dtype).clone(),
                                                   requires_grad=False)
            w = head.weight.detach().to(self.head_device, self.dtype)  # no copy when it is already so
            self._head = w.clone() if is_offloaded(head) else w
        self.stats = {"evaluations": 0, "stopped_early": 0, "reused_blocks": 0, "computed_blocks": 0,
                      "sliced_blocks": 0, "block_cache_hits": 0, "seconds": 0.0}

    # ---- cache ----------------------------------------------------------------------------
    @staticmethod
    def prefix_keys(subnet: Subnet, compensated: bool = False, reformed: bool = False) -> list[int]:
        """keys[i] identifies the choices of blocks 0..i-1 (keys[0] is the empty prefix)."""
        keys = [hash((bool(compensated), bool(reformed)))]
        for layer in subnet.layers:
            keys.append(hash((keys[-1], layer)))
        return keys

    def _get(self, key):
        t = self._cache.get(key)
        if t is not None:
            self._cache.move_to_end(key)
        return t

    def _put(self, key, t: torch.Tensor) -> bool:
        size = t.numel() * t.element_size()
        if size > self.cache_bytes or key in self._cache:
            return False
        self._cache[key] = t
        self._bytes += size
        while self._bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        return True

    def drop(self, keys) -> None:
        """Forget states only this candidate needed (the search calls it for non-elite children)."""
        for key in keys:
            t = self._cache.pop(key, None)
            if t is not None:
                self._bytes -= t.numel() * t.element_size()

    def clear(self) -> None:
        self._cache.clear()
        self._bytes = 0

    # ---- blocks ---------------------------------------------------------------------------
    def _block(self, config, j: int, layer_id: int, layer, compensated: bool, reformed: bool = False) -> SubnetBlock:
        """Kept block j (base layer `layer_id`) at its own widths, weights sliced from the base by
        `slicing.block_state_dict`, the function `slice_model` uses.

        A block depends only on (base layer, its LayerChoice, compensation), and children share
        most genes with their parents, so sliced blocks are kept in an LRU. Blocks run without a
        KV cache here, so the block index baked into the module does not matter. A `reformed`
        block takes its o_proj / down_proj from the ladders' pre-reformed levels."""
        key = (layer_id, layer, compensated, reformed)
        hit = self._blocks.get(key)
        if hit is not None:
            self._blocks.move_to_end(key)
            self.stats["block_cache_hits"] += 1
            return hit
        with torch.device("meta"):
            block = SubnetBlock(config, j)
        sd = block_state_dict(self.base.model.layers[layer_id], layer, self.shape,
                              self.means if compensated else None, layer_id)
        if reformed:
            sd.update(self.ladders.overrides(layer_id, layer))
        sd = {k: v.to(self.dtype) for k, v in sd.items()}
        block.load_state_dict(sd, assign=True, strict=True)
        device = execution_device(self.base.model.layers[layer_id])
        fill_buffers(block, config, device)
        self.stats["sliced_blocks"] += 1
        if self.block_cache_bytes > 0:
            size = sum(v.numel() * v.element_size() for v in sd.values())
            self._blocks[key] = block
            self._block_bytes += size
            while self._block_bytes > self.block_cache_bytes and len(self._blocks) > 1:
                _, old = self._blocks.popitem(last=False)
                self._block_bytes -= sum(p.numel() * p.element_size() for p in old.parameters())
        return block

    def _inputs(self, config, device) -> tuple[torch.Tensor, dict]:
        """The rope table and attention masks at the windows' positions, on one device."""
        key = (str(device), tuple(config.sliding_windows))
        if key not in self._tables:
            positions = torch.arange(self._T, device=device)[None]
            rope = SubnetRotary(config).to(device).table(positions, self.dtype)
            masks = block_masks(config.sliding_windows, None, 1, self._T, 0, device)
            self._tables[key] = (rope, masks)
        return self._tables[key]

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, subnet: Subnet, bound: float | None = None, compensated: bool = False,
                 cancel: threading.Event | None = None, reformed: bool = False, screen: float | None = None
                 ) -> FitnessResult:
        """Summed NLL over the windows; stops once it exceeds `bound`, or once its NLL so far, scaled
        to every window, exceeds `screen` (an estimate, not a proof: the staged evaluation's cheap
        screen; such a result is incomplete like an early stop). Block counts are per window
        (a batch of b windows through one block counts b). `reformed`: the candidate assembled from
        the ladders' pre-reformed levels (the reformation-aware search; compensation is implied)."""
        t0 = time.perf_counter()
        subnet.validate(self.shape)
        if reformed and self.ladders is None:
            raise ValueError("reformed fitness needs the ladders (FitnessEvaluator(ladders=...))")
        compensated = compensated or reformed  # the levels' biases need the biased projections
        if compensated and self.means is None:
            raise ValueError("compensated fitness needs the channel means (FitnessEvaluator(means=...))")
        config = subnet_config(self.base.config, subnet, self.shape, compensated)
        kept = [(i, l) for i, l in enumerate(subnet.layers) if l is not None]
        keys = self.prefix_keys(subnet, compensated, reformed)
        use_cache = self.cache_bytes > 0
        blocks: dict[int, SubnetBlock] = {}
        created, nll, reused, computed, done = [], 0.0, 0, 0, 0
        for c, x0 in enumerate(self._embedded):
            check_cancel(cancel)
            a, b = self._chunks[c]
            start, x = 0, x0  # start = base layer from which to compute
            if use_cache:
                for i in range(self.shape.num_layers, 0, -1):
                    hit = self._get((keys[i], c))
                    if hit is not None:
                        start, x = i, hit
                        break
            for j, (i, layer) in enumerate(kept):
                if i < start:
                    reused += b - a
                    continue
                if j not in blocks:
                    blocks[j] = self._block(config, j, i, layer, compensated, reformed)
                device = execution_device(self.base.model.layers[i])
                rope, masks = self._inputs(config, device)
                x = blocks[j](x.to(device), rope, masks, None)
                computed += b - a
                if use_cache and (i + 1) % self.cache_every == 0 and self._put((keys[i + 1], c), x):
                    created.append((keys[i + 1], c))
            h = self._norm(x.to(self.head_device))[:, :-1].reshape(-1, x.shape[-1])  # 2-D: a 3-D strided input makes matmul copy lm_head
            logits = final_logits(self._config, (h @ self._head.T).float())  # [(b - a) * (T-1), V]
            target = self.windows[a:b, 1:].reshape(-1).to(self.head_device)
            nll += F.cross_entropy(logits, target, reduction="sum").item()
            done = b
            if bound is not None and nll > bound and done < self.windows.shape[0]:
                break
            if screen is not None and nll * self.windows.shape[0] / done > screen and done < self.windows.shape[0]:
                break
        seconds = time.perf_counter() - t0
        complete = done == self.windows.shape[0]
        s = self.stats
        s["evaluations"] += 1
        s["stopped_early"] += 0 if complete else 1
        s["reused_blocks"] += reused
        s["computed_blocks"] += computed
        s["seconds"] += seconds
        return FitnessResult(nll=nll, tokens=self.tokens, windows_done=done, complete=complete, reused_blocks=reused,
                             computed_blocks=computed, seconds=seconds, created=tuple(created))


class MaskedEvaluator:
    """The naive reference: the dense model with pruned rows/columns zeroed (`explorer.model.reference`),
    every window, every block. Same function as the sliced subnet (zeroed dims add nothing to
    scores or outputs)."""

    def __init__(self, base, shape: ModelShape, windows: torch.Tensor, batch_size: int | None = None):
        self.base, self.shape, self.windows = base, shape, windows
        self.work = copy.deepcopy(base).eval()
        self.batch_size = batch_size or len(windows)
        self.tokens = int(windows.shape[0] * (windows.shape[1] - 1))
        self._hooks: list = []

    @torch.no_grad()
    def evaluate(self, subnet: Subnet, windows: torch.Tensor | None = None, means: ChannelMeans | None = None) -> float:
        """Perplexity on all windows (or on `windows`, so one masked copy serves several sets)."""
        from ..model.perplexity import window_nll
        from ..model.reference import mask_into

        for h in self._hooks:
            h.remove()
        self._hooks = mask_into(self.work, self.base, subnet, self.shape, means)
        windows = self.windows if windows is None else windows
        nll = window_nll(self.work, windows, batch_size=self.batch_size).sum().item()
        return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))
