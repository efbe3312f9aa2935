"""A search's settings checked before any work: every value of the right type and in range, the
targets reachable in the chosen space, the corpus long enough for every set of windows, and the
machine-dependent settings resolved (the fitness dtype). A refused search leaves nothing behind,
not even its run folder, and says what is wrong in one line.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing

from ..calibrate.baselines import BASELINES
from ..calibrate.data import CorpusError, load_corpus, token_stream
from ..calibrate.importance import SCORINGS
from ..errors import ExplorerError
from ..model.loading import LoadedModel
from ..model.subnet import ModelShape
from ..settings import Probs, SearchSettings
from .fitness import resolve_dtype
from .ladders import LadderSpec, ladder_bytes
from .runs import target_words
from .space import SHARES, target_space

# field -> (smallest allowed value, what it is); integers unless the field is a float
LOWER_BOUNDS: dict[str, tuple[float, str]] = {
    "calib_windows": (1, "calibration windows"), "calib_seq_len": (8, "tokens per calibration window"),
    "fitness_windows": (1, "fitness windows"), "fitness_seq_len": (8, "tokens per fitness window"),
    "fitness_batch": (1, "fitness windows per forward"), "population": (1, "first generation's children"),
    "generations": (0, "generations after the first"), "top_k": (1, "parents kept (top k)"),
    "select_top": (0, "candidates re-scored for the pick"), "select_windows": (0, "re-scoring windows"),
    "mutations": (0, "mutations per generation"), "crossovers": (0, "crossovers per generation"),
    "fresh": (0, "fresh mutations per generation"), "multiple": (1, "MLP width step"),
    "head_multiple": (2, "head dimension step"), "split_init": (0, "split initial subnets"),
    "cache_mb": (0, "prefix cache (MB)"), "measure_max": (0, "front members timed"),
    "max_tries": (1, "tries per child"), "ladder_mlp_levels": (2, "MLP levels per ladder"),
    "ladder_mb": (1, "ladder memory cap (MB)"), "seed": (0, "seed"),
}


WHAT = {**{name: what for name, (_, what) in LOWER_BOUNDS.items()}, "minutes": "the time budget",
        "targets": "fractions of the total parameters", "window": "size window below each target"}


def check_types(s: SearchSettings) -> None:
    """Every field holds a value of its declared type (a --set or an API call can send anything)."""
    hints = typing.get_type_hints(SearchSettings)
    for f in dataclasses.fields(s):
        value, hint = getattr(s, f.name), hints[f.name]
        if not _is(value, hint):
            what = f" ({WHAT[f.name]})" if f.name in WHAT else ""
            raise ExplorerError(f"search setting {f.name}{what} must be {_describe(hint)}, not {value!r}")


def _is(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_is(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(args[0])}s"
    if args:
        return " or ".join(_describe(a) for a in args)
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a text",
            type(None): "null"}.get(hint, hint.__name__)


def check_values(s: SearchSettings, shape: ModelShape | None = None) -> None:
    """Ranges and choices; with `shape`, also what depends on the model (widths within its sizes)."""
    for name, (low, what) in LOWER_BOUNDS.items():
        if getattr(s, name) < low:
            raise ExplorerError(f"{name} ({what}) must be at least {low:g}, not {getattr(s, name)}")
    if s.generations and s.mutations + s.crossovers + s.fresh == 0:
        raise ExplorerError("a generation needs children: mutations, crossovers and fresh are all 0")
    if s.head_multiple % 2:
        raise ExplorerError(f"head_multiple must be an even step (whole rotary pairs), not {s.head_multiple}")
    if shape is not None and s.multiple > shape.intermediate_size:
        raise ExplorerError(f"multiple={s.multiple} is wider than the MLP ({shape.intermediate_size} channels)")
    if shape is not None and s.head_multiple > shape.head_dim:
        raise ExplorerError(f"head_multiple must be at most the head dimension {shape.head_dim}, not "
                            f"{s.head_multiple}")
    if not 0 < s.window < 0.5:
        raise ExplorerError(f"window (the width of a target's size window) must be in (0, 0.5), not {s.window}")
    for name in ("first_probs", "probs"):
        p: Probs = getattr(s, name)
        for field in ("depth", "ratio", "mask"):
            if not 0 <= getattr(p, field) <= 1:
                raise ExplorerError(f"{name}.{field} is a probability in [0, 1], not {getattr(p, field)}")
        if not 0 < p.alpha <= 1:
            raise ExplorerError(f"{name}.alpha (the share a mask mutation keeps) must be in (0, 1], not {p.alpha}")
    if s.minutes is not None and not 0 < s.minutes < 1e6:
        raise ExplorerError(f"the time budget must be a positive number of minutes (got {s.minutes!r})")
    if s.share not in SHARES:
        raise ExplorerError(f"share must be one of {', '.join(SHARES)} (got {s.share!r})")
    if s.space not in ("auto", "dims", "heads"):
        raise ExplorerError(f"space must be auto, dims or heads (got {s.space!r})")
    if shape is not None and shape.qk_norm and s.space == "dims":
        raise ExplorerError("this model normalises each query and key head (q/k RMSNorm), so a head cannot keep "
                            "part of its dimensions exactly: search whole heads (space heads)")
    if s.fitness_mode not in ("paper", "reformed"):
        raise ExplorerError(f"fitness_mode must be paper or reformed (got {s.fitness_mode!r})")
    if s.fitness_mode == "reformed" and (s.space == "heads" or (shape is not None and shape.qk_norm)):
        raise ExplorerError("the reformation-aware ranking has ladders of rotary pairs only: use it with the "
                            "dims space (the heads space ranks the sliced subnets)" if s.space == "heads" else
                            "the reformation-aware ranking narrows heads, which this model's q/k norms do not allow: "
                            "rank the sliced subnets (fitness_mode paper)")
    unknown = [b for b in s.baselines if b not in BASELINES]
    if unknown:
        raise ExplorerError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    bad = [n for n in s.init_scorings if n not in SCORINGS]
    if bad or not s.init_scorings:
        raise ExplorerError(f"init_scorings must be a non-empty choice of {', '.join(SCORINGS)} "
                            f"(got {list(s.init_scorings)})")


def validate_targets(targets, shape: ModelShape, settings: SearchSettings) -> tuple[float, ...]:
    if not targets:
        raise ExplorerError("give at least one target fraction, e.g. 0.7")
    out = []
    for t in targets:
        try:
            t = float(t)
        except (TypeError, ValueError):
            raise ExplorerError(f"target {t!r} is not a number") from None
        if not (0 < t <= 1) or math.isnan(t):
            raise ExplorerError(f"target {t} is outside (0, 1]: targets are fractions of {SHARES[settings.share]}")
        try:
            target_space(shape, settings, t)
        except ExplorerError as e:
            raise ExplorerError(f"target {target_words(t, settings.share)}: {e}") from None
        out.append(round(t, 6))
    if len(set(out)) != len(out):
        raise ExplorerError("targets repeat")
    return tuple(sorted(out, reverse=True))


def check_corpus(lm: LoadedModel, s: SearchSettings) -> None:
    """The calibration text holds every set of windows the search draws from it (each set is drawn
    on its own, without overlap within the set)."""
    try:
        stream = token_stream(lm.tokenizer, load_corpus(s.corpus).calibration)
    except CorpusError as e:
        raise ExplorerError(str(e)) from None
    sets = [("calibration", s.calib_windows, s.calib_seq_len), ("fitness", s.fitness_windows, s.fitness_seq_len)]
    if s.select_top > 1 and s.select_windows:
        sets.append(("selection", s.select_windows, s.fitness_seq_len))
    for what, n, seq_len in sets:
        have = stream.numel() // seq_len
        if n > have:
            raise ExplorerError(f"the calibration text ({s.corpus}: {stream.numel():,} tokens) holds {have} {what} "
                                f"windows of {seq_len} tokens; {n} were asked for")


def default_space(shape: ModelShape) -> str:
    """The paper's narrower heads where they are exact, whole heads where the family normalises q and k."""
    return "heads" if shape.qk_norm else "dims"


def resolve(lm: LoadedModel, settings: SearchSettings, corpus: bool = True) -> SearchSettings:
    """Validate every setting and resolve the ones that depend on the machine (fitness dtype).
    `corpus` False skips the corpus check (windows given directly: tests on tiny models)."""
    check_types(settings)
    if settings.space == "auto":  # stored resolved: a resumed run searches the same space
        settings = dataclasses.replace(settings, space=default_space(lm.shape))
    check_values(settings, lm.shape)
    settings = dataclasses.replace(settings, targets=validate_targets(settings.targets, lm.shape, settings))
    if settings.fitness_mode == "reformed":
        need = ladder_bytes(lm.shape, LadderSpec.of(lm.shape, settings.head_multiple, settings.multiple,
                                                    settings.ladder_mlp_levels))
        if need > settings.ladder_mb * 2**20:
            raise ExplorerError(f"the ladders of this model would hold {need / 2**20:.0f} MB, over ladder_mb="
                                f"{settings.ladder_mb}: lower ladder_mlp_levels or raise ladder_mb")
    if corpus:
        check_corpus(lm, settings)
    device = next(p for p in lm.model.parameters() if p.device.type != "meta").device
    try:  # stored resolved, so a resumed run computes fitness the same way wherever it continues
        return dataclasses.replace(settings, fitness_dtype=resolve_dtype(settings.fitness_dtype, device))
    except ValueError as e:
        raise ExplorerError(str(e)) from None


__all__ = ["resolve", "validate_targets", "check_types", "check_values", "check_corpus"]
