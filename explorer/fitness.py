"""Cheap candidate fitness: perplexity of the physically sliced subnet on a few calibration windows.

Three savings over the naive way (dense model with zeroed weights, every window, every block):

- **Sliced blocks.** Each kept block is built at its own widths (the same SubnetBlock and the
  same weights `explorer.slicing` produces), so a 50 % subnet costs about half a dense forward.
- **Prefix reuse.** The hidden state after block i depends only on the choices of blocks 0..i,
  so states are cached under a key of that prefix (per window). A mutated child shares the
  blocks before its first change with its parent and starts from the parent's cached state.
  The state is bitwise the same as recomputing it: windows always run one at a time.
- **Early stop.** Windows run in order; once the summed NLL exceeds the bound (the k-th best
  total so far), the candidate provably cannot enter the top k (NLL is never negative), so the
  rest is skipped and its fitness is marked as a lower bound.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .events import check_cancel
from .modeling_subnet import RMSNorm, SubnetBlock, base_inv_freq, rope_table
from .slicing import SLICE_TABLE, block_state_dict, fill_buffers, layer_indices, subnet_config
from .subnet import ModelShape, Subnet


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
    """bfloat16 where the hardware multiplies it natively, else float32.

    Fitness only has to rank candidates; bf16 keeps the ranking (the quality benchmark reports
    the rank correlation with fp32) and runs 2.5-4x faster where there are bf16 matrix units
    (CUDA, x86 with AMX or AVX512-BF16). Elsewhere bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
        except OSError:
            return torch.float32
        return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & set(flags) else torch.float32
    return torch.float32


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
    (early stop is checked between batches)."""

    def __init__(self, base, shape: ModelShape, windows: torch.Tensor, cache_bytes: int = 384 * 2**20,
                 cache_every: int = 1, dtype: torch.dtype | None = None, batch: int = 1,
                 block_cache_bytes: int = 512 * 2**20):
        self.base = base
        self.shape = shape
        self.windows = windows
        self.cache_bytes = cache_bytes
        self.block_cache_bytes = block_cache_bytes
        self.cache_every = max(1, cache_every)
        self.device = base.model.embed_tokens.weight.device
        self.dtype = dtype or base.model.embed_tokens.weight.dtype
        self.tokens = int(windows.shape[0] * (windows.shape[1] - 1))
        self._cache: OrderedDict = OrderedDict()
        self._bytes = 0
        self._blocks: OrderedDict = OrderedDict()  # (base layer, LayerChoice) -> SubnetBlock
        self._block_bytes = 0
        self._rope = None  # cos/sin of the base rotary pairs at the window positions
        n = windows.shape[0]
        batch = max(1, min(batch, n))
        self._chunks = [(a, min(a + batch, n)) for a in range(0, n, batch)]
        with torch.no_grad():
            self._embedded = [base.model.embed_tokens(windows[a:b].to(self.device)).to(self.dtype)
                              for a, b in self._chunks]  # each [b - a, T, D]
        T = windows.shape[1]
        self._positions = torch.arange(T, device=self.device)[None]
        cfg = base.config
        self._norm = RMSNorm(shape.hidden_size, cfg.rms_norm_eps).to(self.device)
        self._norm.weight = torch.nn.Parameter(base.model.norm.weight.detach().to(self.dtype), requires_grad=False)
        w = base.lm_head.weight.detach()
        self._head = w if w.dtype == self.dtype else w.to(self.dtype)
        self.stats = {"evaluations": 0, "stopped_early": 0, "reused_blocks": 0, "computed_blocks": 0,
                      "sliced_blocks": 0, "block_cache_hits": 0, "seconds": 0.0}

    # ---- cache ----------------------------------------------------------------------------
    @staticmethod
    def prefix_keys(subnet: Subnet) -> list[int]:
        """keys[i] identifies the choices of blocks 0..i-1 (keys[0] is the empty prefix)."""
        keys = [0]
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
    def _block(self, config, j: int, layer_id: int, layer, biases: dict | None) -> SubnetBlock:
        """Kept block j (base layer `layer_id`) at its own widths, weights sliced from the base.

        Without extra biases a block depends only on (base layer, its LayerChoice), and children
        share most genes with their parents, so sliced blocks are kept in an LRU. Blocks run
        without a KV cache here, so the block index baked into the module does not matter."""
        key = (layer_id, layer)
        if not biases:
            hit = self._blocks.get(key)
            if hit is not None:
                self._blocks.move_to_end(key)
                self.stats["block_cache_hits"] += 1
                return hit
        with torch.device("meta"):
            block = SubnetBlock(config, j)
        sd = block_state_dict(self.base.model.layers[layer_id], layer, self.shape)
        for name, bkey, flag in (("o_proj", "self_attn.o_proj.bias", config.o_bias),
                                 ("down_proj", "mlp.down_proj.bias", config.down_bias)):
            if flag:
                w = sd[bkey.replace("bias", "weight")]
                extra = (biases or {}).get(name, torch.zeros(w.shape[0])).to(self.device, w.dtype)
                sd[bkey] = sd[bkey] + extra if bkey in sd else extra
        sd = {k: v.to(self.dtype) for k, v in sd.items()}
        block.load_state_dict(sd, assign=True, strict=True)
        fill_buffers(block, config, self.device)
        self.stats["sliced_blocks"] += 1
        if not biases and self.block_cache_bytes > 0:
            size = sum(v.numel() * v.element_size() for v in sd.values())
            self._blocks[key] = block
            self._block_bytes += size
            while self._block_bytes > self.block_cache_bytes and len(self._blocks) > 1:
                _, old = self._blocks.popitem(last=False)
                self._block_bytes -= sum(p.numel() * p.element_size() for p in old.parameters())
        return block

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, subnet: Subnet, bound: float | None = None, biases: dict | None = None,
                 cancel: threading.Event | None = None) -> FitnessResult:
        """Summed NLL over the windows; stops once it exceeds `bound`. `biases` maps a base layer
        to extra {"o_proj", "down_proj"} biases (FLAP); such candidates bypass the caches.

        Block counts are per window (a batch of b windows through one block counts b)."""
        t0 = time.perf_counter()
        subnet.validate(self.shape)
        extra = {}
        if biases:
            extra = {"o_bias": any("o_proj" in b for b in biases.values()),
                     "down_bias": any("down_proj" in b for b in biases.values())}
        config = subnet_config(self.base.config, subnet, self.shape, **extra)
        if self._rope is None:
            inv, scaling = base_inv_freq(config)
            self._rope = rope_table(inv.to(self.device), scaling, self._positions, self.dtype)
        kept = [(i, l) for i, l in enumerate(subnet.layers) if l is not None]
        keys = self.prefix_keys(subnet)
        use_cache = not biases and self.cache_bytes > 0
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
                    blocks[j] = self._block(config, j, i, layer, biases.get(i) if biases else None)
                x = blocks[j](x, self._rope, None, True, None)
                computed += b - a
                if use_cache and (i + 1) % self.cache_every == 0 and self._put((keys[i + 1], c), x):
                    created.append((keys[i + 1], c))
            h = self._norm(x)[:, :-1].reshape(-1, x.shape[-1])  # 2-D: a 3-D strided input makes matmul copy lm_head
            logits = (h @ self._head.T).float()  # [(b - a) * (T-1), V]
            target = self.windows[a:b, 1:].reshape(-1).to(self.device)
            nll += F.cross_entropy(logits, target, reduction="sum").item()
            done = b
            if bound is not None and nll > bound and done < self.windows.shape[0]:
                break
        seconds = time.perf_counter() - t0
        complete = done == self.windows.shape[0]
        s = self.stats
        s["evaluations"] += 1
        s["stopped_early"] += 0 if complete else 1
        s["reused_blocks"] += reused
        s["computed_blocks"] += computed
        s["seconds"] += seconds
        return FitnessResult(nll, self.tokens, done, complete, reused, computed, seconds, tuple(created))


class MaskedEvaluator:
    """The naive reference: the dense model with pruned rows/columns zeroed, every window, every
    block. Same function as the sliced subnet (zeroed dims add nothing to scores or outputs)."""

    def __init__(self, base, shape: ModelShape, windows: torch.Tensor, batch_size: int | None = None):
        self.base, self.shape, self.windows = base, shape, windows
        self.work = copy.deepcopy(base).eval()
        self.batch_size = batch_size or len(windows)
        self.tokens = int(windows.shape[0] * (windows.shape[1] - 1))

    @torch.no_grad()
    def evaluate(self, subnet: Subnet, windows: torch.Tensor | None = None) -> float:
        """Perplexity on all windows (or on `windows`, so one masked copy serves several sets)."""
        from .perplexity import window_nll

        windows = self.windows if windows is None else windows
        for i, layer in enumerate(subnet.layers):
            src, dst = self.base.model.layers[i], self.work.model.layers[i]
            for name, (which, dim) in SLICE_TABLE.items():
                w = src.get_submodule(name).weight.data
                out = dst.get_submodule(name).weight.data
                if layer is None:
                    out.zero_()
                    continue
                idx = layer_indices(self.shape, layer, w.device)[which]
                mask = torch.zeros(w.shape[dim], dtype=w.dtype, device=w.device)
                mask[idx] = 1
                out.copy_(w * (mask[:, None] if dim == 0 else mask[None, :]))
        nll = window_nll(self.work, windows, batch_size=self.batch_size).sum().item()
        return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))
