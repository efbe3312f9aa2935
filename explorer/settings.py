"""Defaults shared by the CLI, the app and the benchmarks: one place, one value.

Each step's settings are one frozen dataclass; the CLI's flags and the app's widgets read their
defaults from these, and a search saves its resolved `SearchSettings` in run.json.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ExplorerError


@dataclass(frozen=True)
class ModelSettings:
    model: str = "default"  # an embedded model ("default": SmolLM2-135M-Instruct; "gemma3-270m"), a folder or a hub id
    dtype: str = "float32"
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (accelerate device_map)
    trust_remote_code: bool = False
    max_memory: str | None = None  # with device auto: per-device caps, e.g. "cpu=2GB" (the rest is offloaded)


@dataclass(frozen=True)
class DataSettings:
    corpus: str = "bbc"  # bbc, a text file path, or hf:wikitext-2 / hf:c4 (online only)
    seq_len: int = 512  # tokens per window
    heldout_windows: int = 32  # windows of held-out perplexity (evenly spaced over the held-out text)
    calibration_windows: int = 128
    seed: int = 0


@dataclass(frozen=True)
class Probs:
    """Per-block mutation probabilities (METHOD section 3)."""

    depth: float = 0.1
    ratio: float = 0.1
    mask: float = 0.3
    alpha: float = 0.8  # share of kept indices a mask mutation keeps


@dataclass(frozen=True)
class SearchSettings:
    """Everything that decides a search's result; saved in run.json. Defaults = the demo preset but for its
    time budget (DEMO_MINUTES, DEMO_GENERATIONS), so a settings object built in code runs its generations."""

    targets: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5)  # fractions of the parameters `share` names
    # "total": of all parameters (the paper's targets); "prunable": of the blocks' parameters, embeddings and
    # final norm left out (a model whose embeddings are most of it, as Gemma 3 270M's 63 %, needs these)
    share: str = "total"
    preset_name: str = "demo"  # stored as "preset" in run.json
    seed: int = 0
    corpus: str = "bbc"
    calib_windows: int = 32  # importance calibration
    calib_seq_len: int = 256
    fitness_windows: int = 4  # fitness perplexity
    fitness_seq_len: int = 256
    fitness_dtype: str = "auto"  # compute dtype of fitness; "auto" = bf16 where the hardware has it (stored resolved)
    fitness_batch: int = 2  # windows per forward; early stop is checked between batches
    compensate: bool = True  # bias compensation (FLAP's mean of the removed inputs) for every searched subnet
    # "paper": fitness of the sliced subnet (METHOD 3); "reformed": of the subnet assembled from per-block
    # ladders of pre-reformed widths (METHOD 8.1: what the user gets after reformation)
    fitness_mode: str = "paper"
    # "auto": "dims" where it is exact, "heads" for families that normalise each query/key head (stored
    # resolved); "dims": the paper's space (rotary pairs per head, every head kept); "heads": whole heads (KV groups and
    # query heads per group, full head dim), the form llama.cpp and other engines with one head size run
    space: str = "auto"
    ladder_mlp_levels: int = 8  # MLP widths per block's ladder (the attention's: every head_multiple step)
    ladder_mb: int = 2048  # refuse ladders larger than this in memory
    # the per-block level library (explorer.search.library): every block's damage at each level, measured once
    # on the first `library_windows` calibration windows and cached; its knapsack solution (explorer.search.solver)
    # is every target's first subnet and seeds the evolution
    library: bool = True
    library_windows: int = 4
    # levels per block it measures, the full block included (between them the damage is interpolated): head
    # widths of the paper's space (the whole-head space measures every option) and MLP widths
    library_attn_levels: int = 4
    library_mlp_levels: int = 5
    population: int = 10  # first generation: mutations of the best initial subnet
    generations: int = 4  # after the first (with `minutes`: at most this many)
    minutes: float | None = None  # a time budget for the whole search (None: the generations alone decide;
    # the demo preset has DEMO_MINUTES and DEMO_GENERATIONS as its cap)
    top_k: int = 5
    # the final pick per target: the best `select_top` by fitness re-scored on `select_windows` fresh
    # calibration windows (of fitness_seq_len); 4 short fitness windows cannot tell the top few apart
    select_top: int = 4
    select_windows: int = 16
    mutations: int = 6  # per generation
    crossovers: int = 3
    fresh: int = 1  # mutations of the initial subnet
    first_probs: Probs = Probs(depth=0.0, ratio=0.15, mask=0.0)
    probs: Probs = Probs(depth=0.02, ratio=0.1, mask=0.02)
    window: float = 0.005  # a candidate's size lies in [target - window, target]
    multiple: int = 8  # MLP widths rounded to this
    head_multiple: int = 8  # kept head dims rounded to this (whole rotary pairs)
    depth: bool = True  # allow dropping blocks (METHOD's depth ranges)
    split_init: int = 4  # extra initial subnets: uniform, at this many attention widths
    init_scorings: tuple[str, ...] = ("obs", "wanda", "wifv")  # scores that rank the initial subnets' channels
    baselines: tuple[str, ...] = ("magnitude", "wanda-sp", "flap", "flap-uniform")
    seed_baselines: bool = True  # the baselines' subnets are initial subnets too (evaluated the search's way)
    early_stop: bool = True
    # staged evaluation: a child's first `screen_windows` fitness windows are a screen; one whose NLL there,
    # scaled to every window, exceeds the elite's k-th best by more than `screen_margin` stops (0: off)
    screen_windows: int = 0
    screen_margin: float = 0.05
    cache_mb: int = 384  # prefix hidden-state cache
    latency: bool = True  # fit a latency model (cached per machine) and measure the front for real
    measure_max: int = 10  # front members measured for real
    max_tries: int = 20  # resamples for a child that is out of the window or already seen

    @classmethod
    def preset(cls, name: str, **overrides) -> "SearchSettings":
        if name not in PRESETS:
            raise ExplorerError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ExplorerError(f"unknown search setting(s): {', '.join(bad)}")
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["preset"] = d.pop("preset_name")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSettings":
        d = dict(d)
        if "preset" in d:
            d["preset_name"] = d.pop("preset")
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d.setdefault("fitness_dtype", "float32")  # runs from before the setting computed fitness in fp32
        d.setdefault("fitness_batch", 1)
        d.setdefault("compensate", False)  # runs from before compensation searched without it
        d.setdefault("seed_baselines", False)
        d.setdefault("library", False)  # runs from before the library started without it
        d.setdefault("select_top", 0)  # runs from before the selection picked by fitness alone
        for k in ("first_probs", "probs"):
            if isinstance(d.get(k), dict):
                d[k] = Probs(**d[k])
        for k in ("targets", "baselines", "init_scorings"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


DEMO_MINUTES = 4.0  # the demo preset's time budget
DEMO_GENERATIONS = 100  # its cap on generations per target (the clock ends them long before)

PRESETS: dict[str, SearchSettings] = {
    # a talk's slot: four targets of the embedded model in 4 minutes on 2 CPU cores, whatever the machine
    "demo": SearchSettings(minutes=DEMO_MINUTES, generations=DEMO_GENERATIONS),
    "paper": SearchSettings(
        preset_name="paper", calib_windows=128, calib_seq_len=2048, fitness_windows=5, fitness_seq_len=2048,
        population=100, generations=50, top_k=10, mutations=50, crossovers=30, fresh=20,
        first_probs=Probs(depth=0.0, ratio=0.3, mask=0.6), probs=Probs(depth=0.1, ratio=0.1, mask=0.3),
        window=0.01, cache_mb=2048, measure_max=16),
}
