"""A search's calibration statistics: the importance pass (METHOD section 2) with the channel
statistics every baseline and bias compensation need, and the token windows of fitness.

What depends only on the model and the data is computed once and reused: a run keeps its own
copy (`importance.pt`, `channel_means.safetensors`, so a resume or a later pick needs no pass),
and an on-disk cache keyed by the model and the calibration settings serves every later search
of the same model on the same data, in this session or the next.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..calibrate.baselines import BaselineResult, baseline_subnet
from ..calibrate.data import calibration_windows, load_corpus
from ..calibrate.importance import Importance, iter_importance, scoring
from ..events import StageProgress
from ..model.loading import LoadedModel, cache_root, weights_fingerprint
from ..model.slicing import ChannelMeans
from ..model.subnet import Subnet
from ..pick.reform import ReformSettings
from .ladders import LADDER_SCORING, Ladders, LadderSpec, iter_ladders, ladder_bytes
from .library import LIBRARY_FILE, Library, LibrarySpec, measure_library
from .runs import SHIPPED_RUNS, Run

FILES = ("importance.pt", "channel_means.safetensors", "calibration.json")  # what a run holds of its calibration
log = logging.getLogger(__name__)
BASELINES_FILE = "baselines.json"  # a run's baseline subnets, by name, target and windows (seeds the cache)


@dataclass
class Calibration:
    importance: Importance  # OBS scores and the dense pass's input statistics
    means: ChannelMeans  # of o_proj / down_proj inputs: bias compensation
    calib: torch.Tensor  # calibration windows (the importance pass; Wanda-sp runs on the first ones)
    fitness: torch.Tensor  # fitness windows
    from_cache: bool = False
    key: str | None = None  # cache_key: the same model and calibration data have the same one
    cache_dir: Path | None = None
    run_dir: Path | None = None
    selection: torch.Tensor | None = None  # windows that re-score the top candidates for the final pick
    seeds: tuple = ()  # shipped run folders computed on this very calibration data (their library serves too)
    _scorings: dict = field(default_factory=dict, repr=False)

    def scoring(self, name: str, model, shape) -> Importance:
        """An Importance ranking channels by `name` (obs, wanda, wifv), computed once."""
        if name not in self._scorings:
            self._scorings[name] = scoring(name, model, self.importance, shape)
        return self._scorings[name]

    def baseline(self, name: str, model, shape, target: float, cancel=None) -> tuple[BaselineResult, bool]:
        """A baseline's subnet at `target` and whether it was read rather than computed, from the same
        calibration windows as the importance pass. Wanda-sp runs its own sequential pass over them
        (the slow one); every baseline depends only on the model, the calibration data and the target,
        so each is computed once and kept beside the importance pass (`<key>.baselines.json` in the
        cache) and in the run."""
        n_windows = int(self.calib.shape[0])
        entry = f"{name}@{target:.6g}@{n_windows}"
        stores = [p for p in (self._baselines_path(), self.run_dir and self.run_dir / BASELINES_FILE) if p]
        for path in stores:
            found = _read_json(path).get(entry)
            if found is not None:
                result = BaselineResult(name, Subnet.from_dict(found["subnet"]), bool(found["compensated"]))
                break
        else:
            result = baseline_subnet(name, model, self.importance, shape, target, self.calib[:n_windows], cancel)
        for path in stores:
            table = _read_json(path)
            if entry not in table:
                table[entry] = {"subnet": result.subnet.to_dict(compact=True), "compensated": result.compensated}
                _write_json(path, table)
        return result, found is not None

    def has_baseline(self, name: str, target: float) -> bool:
        """Whether a baseline's subnet at `target` is stored (reading it costs nothing)."""
        entry = f"{name}@{target:.6g}@{int(self.calib.shape[0])}"
        stores = [p for p in (self._baselines_path(), self.run_dir and self.run_dir / BASELINES_FILE) if p]
        return any(entry in _read_json(path) for path in stores)

    def ladders(self, model, shape, spec, scoring: str, reform_settings, cancel: threading.Event | None = None
                ) -> Iterator[StageProgress | Ladders]:
        """The reformation-aware search's pre-reformed ladders (`explorer.search.ladders`): built once per
        model, calibration data, ladder and reformation settings, then read from the cache. Yields
        StageProgress, then the Ladders (last item)."""
        order = self.scoring(scoring, model, shape)
        raw = json.dumps([spec.pairs, spec.widths, scoring, reform_settings.damp, reform_settings.intercept,
                          reform_settings.intercept_damp, reform_settings.method, self.means is not None])
        path = None if self.key is None or self.cache_dir is None else \
            Path(self.cache_dir) / f"{self.key}.ladders-{hashlib.sha1(raw.encode()).hexdigest()[:12]}.safetensors"
        if path is not None and path.is_file():
            try:
                found = Ladders.load(path, order)
                yield StageProgress("ladders", 1, 1, "reused from the cache (same model, data and ladder)")
                yield found
                return
            except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, saying so in the log
                log.warning("ignoring the unreadable ladder cache %s", path, exc_info=True)
        result = None
        for item in iter_ladders(model, shape, order, scoring, self.calib, spec, self.means, reform_settings, cancel):
            if isinstance(item, Ladders):
                result = item
            else:
                yield StageProgress(item.stage, item.done, item.total, f"pre-reforming levels, {item.message}")
        if path is not None:
            result.save(path)
        yield result

    def library(self, model, shape, spec: LibrarySpec, windows: int, dtype: torch.dtype, batch: int,
                cancel: threading.Event | None = None, deadline: float | None = None
                ) -> Iterator[StageProgress | Library | None]:
        """The per-block level library (`explorer.search.library`) on the first `windows` calibration
        windows: read where it is stored (`stored_library`), else measured and stored in the run and the
        cache. Measuring resumes from the blocks a cut or stopped measuring kept (`partial_library`) and,
        with a `deadline`, is cut when it would not end before it: then its blocks are kept for the next
        search and this one gets None. Yields StageProgress, then the library or None."""
        own, cached = self._library_paths(spec, windows, dtype)
        found = self.stored_library(spec, windows, dtype)
        if found is not None:
            yield StageProgress("library", 1, 1, f"reused ({found.tokens} tokens, measured in {found.seconds:.0f} s)")
            for path in (own, cached):  # copied where it is missing
                if path is not None and not path.is_file():
                    found.save(path)
            yield found
            return
        part = self._partial_path(spec, windows, dtype)
        lib = None
        for item in measure_library(model, shape, spec, self.scoring(spec.scoring, model, shape),
                                    self.calib[:windows], self.means if spec.compensated else None, dtype, batch,
                                    cancel, self.partial_library(spec, windows, dtype), deadline):
            if not isinstance(item, Library):
                yield item
            elif item.complete(shape):
                lib = item
            elif part is not None and item.num_layers:
                item.save(part)  # before a Stop goes on, so the next search resumes from it
                lib = item
        if lib is None or not lib.complete(shape):
            done = 0 if lib is None else lib.num_layers
            yield StageProgress("library", done, shape.num_layers, (
                f"the level library left out of this search: {done} of {shape.num_layers} blocks measured in "
                f"{0 if lib is None else lib.seconds:.0f} s, and the rest would not end within its share of the time "
                "budget; the blocks are kept and the next search goes on from them (or prepare the search once "
                "without a budget)"))
            yield None
            return
        for path in (own, cached):
            if path is not None:
                lib.save(path)
        if part is not None:
            part.unlink(missing_ok=True)
        yield lib

    def partial_library(self, spec: LibrarySpec, windows: int, dtype) -> Library | None:
        """The blocks a cut or stopped measuring of this library kept, if any (checked again against
        the dense model's NLL when measuring resumes)."""
        path = self._partial_path(spec, windows, dtype)
        if path is None or not path.is_file():
            return None
        try:
            return Library.load(path)
        except Exception:  # noqa: BLE001 - a damaged file is measured again, saying so in the log
            log.warning("ignoring the unreadable partial library %s", path, exc_info=True)
            return None

    def _partial_path(self, spec: LibrarySpec, windows: int, dtype) -> Path | None:
        own, cached = self._library_paths(spec, windows, dtype)
        path = cached or own
        return None if path is None else path.with_name(path.name.removesuffix(".json") + ".partial.json")

    def stored_library(self, spec: LibrarySpec, windows: int, dtype) -> Library | None:
        """The library for these levels, windows and dtype where one is stored: the run's own copy, the
        cache's, or a shipped run's computed on this very calibration data; None if none is."""
        own, cached = self._library_paths(spec, windows, dtype)
        tokens, name = windows * (self.calib.shape[1] - 1), str(dtype).removeprefix("torch.")
        for path in (own, cached, *(Path(s) / LIBRARY_FILE for s in self.seeds)):
            if path is None or not path.is_file():
                continue
            try:
                found = Library.load(path)
            except Exception:  # noqa: BLE001 - a damaged file is measured again, saying so in the log
                log.warning("ignoring the unreadable library %s", path, exc_info=True)
                continue
            if found.spec == spec and found.tokens == tokens and found.dtype == name:
                return found
        return None

    def _library_paths(self, spec: LibrarySpec, windows: int, dtype) -> tuple[Path | None, Path | None]:
        raw = json.dumps([spec.to_dict(), windows, str(dtype).removeprefix("torch.")])
        name = f"{self.key}.library-{hashlib.sha1(raw.encode()).hexdigest()[:12]}.json"
        own = None if self.run_dir is None else Path(self.run_dir) / LIBRARY_FILE
        cached = None if self.key is None or self.cache_dir is None else Path(self.cache_dir) / name
        return own, cached

    def _baselines_path(self) -> Path | None:
        return None if self.key is None or self.cache_dir is None else Path(self.cache_dir) / f"{self.key}.baselines.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("ignoring the unreadable cache file %s", path, exc_info=True)
        return {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def cache_key(lm, settings) -> str:
    """The importance pass depends on the model's weights, its dtype, the corpus and the calibration
    windows; the key is the same on every machine, so a shipped run's pass serves a fresh install."""
    raw = json.dumps([weights_fingerprint(lm.model), str(lm.dtype), lm.shape.to_dict(), settings.corpus,
                      settings.calib_windows, settings.calib_seq_len, settings.seed])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def calibrate(lm, settings, run_dir: Path, cancel: threading.Event | None = None, windows: tuple | None = None,
              cache_dir: Path | None = None, seeds: tuple[Path, ...] = ()) -> Iterator[StageProgress | Calibration]:
    """Yields StageProgress, then the Calibration (last item). `windows` = (calibration, fitness[,
    selection]) token tensors replaces the corpus (tests on tiny models; nothing is cached then). `seeds`: run
    folders (the shipped demo) whose `calibration.json` may name the very pass this search needs."""
    run_dir = Path(run_dir)
    corpus = load_corpus(settings.corpus) if windows is None else None
    calib = windows[0] if windows is not None else calibration_windows(
        lm.tokenizer, corpus, settings.calib_windows, settings.calib_seq_len, seed=settings.seed)
    fitness = windows[1] if windows is not None else calibration_windows(
        lm.tokenizer, corpus, settings.fitness_windows, settings.fitness_seq_len, seed=settings.seed + 1)
    selection = None  # the final pick's re-scoring windows (search.select); none when it is off
    if windows is not None:
        selection = windows[2] if len(windows) > 2 else None
    elif getattr(settings, "select_top", 0) > 1 and settings.select_windows > 0:
        selection = calibration_windows(lm.tokenizer, corpus, settings.select_windows, settings.fitness_seq_len,
                                        seed=settings.seed + 2)
    own = run_dir / "importance.pt"
    key = None if windows is not None else cache_key(lm, settings)
    cached = None if (cache_dir is None or key is None) else Path(cache_dir) / f"{key}.pt"
    matching = []
    if cached is not None:
        for seed in seeds:  # a shipped run computed on the same model and data
            try:
                if json.loads((seed / "calibration.json").read_text()).get("key") != key:
                    continue
                matching.append(seed)
                for src, dst in ((seed / "importance.pt", cached),
                                 (seed / BASELINES_FILE, cached.with_suffix(".baselines.json"))):
                    if src.is_file() and not dst.is_file():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(src, dst)
                break
            except (OSError, ValueError):
                continue
    from_cache = False
    need_heads = getattr(settings, "space", "dims") == "heads"  # a pass saved before per-head scores lacks them
    importance = None
    if own.is_file():
        importance = Importance.load(own)
    elif cached is not None and cached.is_file():
        importance = Importance.load(cached)
        if not (need_heads and importance.heads is None):
            shutil.copyfile(cached, own)
            from_cache = True
            yield StageProgress("importance", 1, 1, "reused from the cache (same model and calibration data)")
    if importance is not None and need_heads and importance.heads is None:
        yield StageProgress("importance", 0, 1, "the saved pass predates per-head scores: computing it again")
        importance = None
    if importance is None:
        for item in iter_importance(lm.model, calib, lm.shape, cancel=cancel):
            if isinstance(item, Importance):
                importance = item
            else:
                yield StageProgress("importance", item.done, item.total, item.message)
        importance.save(own)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            shutil.copyfile(own, tmp)
            tmp.replace(cached)
    means = importance.channel_means()
    if not (run_dir / "channel_means.safetensors").is_file():
        means.save(run_dir / "channel_means.safetensors")
    if key is not None and not (run_dir / "calibration.json").is_file():
        (run_dir / "calibration.json").write_text(json.dumps({"key": key, "corpus": settings.corpus,
                                                             "windows": settings.calib_windows,
                                                             "seq_len": settings.calib_seq_len, "seed": settings.seed}))
    yield Calibration(importance, means, calib, fitness, from_cache, key, None if cache_dir is None else Path(cache_dir),
                      run_dir, selection, tuple(matching))


# ---- a search's calibration steps (process 0; the others load the files they write) ------------------
def search_calibration(lm: LoadedModel, s, run: Run, cancel: threading.Event | None, windows: tuple | None
                       ) -> Iterator[Any]:
    """A search's Calibration (its StageProgress yielded), with the on-disk cache and the shipped runs
    as seeds of it."""
    cal = None
    seeds = tuple(p for p in SHIPPED_RUNS.iterdir() if (p / "importance.pt").is_file()) if SHIPPED_RUNS.is_dir() else ()
    for item in calibrate(lm, s, run.path, cancel, windows, cache_dir=cache_root() / "importance", seeds=seeds):
        if isinstance(item, Calibration):
            cal = item
        else:
            yield item
    return cal


def search_ladders(lm: LoadedModel, s, cal: Calibration, cancel: threading.Event | None) -> Iterator[Any]:
    """The reformation-aware search's ladders, reformed with the project's reformation settings."""
    spec = LadderSpec.of(lm.shape, s.head_multiple, s.multiple, s.ladder_mlp_levels)
    yield StageProgress("ladders", 0, lm.shape.num_layers,
                        f"{len(spec.pairs)} attention and {len(spec.widths)} MLP levels per block, "
                        f"{ladder_bytes(lm.shape, spec) / 2**20:.0f} MB")
    ladders = None
    for item in cal.ladders(lm.model, lm.shape, spec, LADDER_SCORING, ReformSettings(), cancel):
        if isinstance(item, Ladders):
            ladders = item
        else:
            yield item
    return ladders


def library_spec(lm: LoadedModel, s) -> LibrarySpec:
    """The levels a search's library measures: its space's attention options, `library_mlp_levels`
    MLP widths, with the search's compensation."""
    return LibrarySpec.of(lm.shape, s.space, s.head_multiple, s.multiple, s.library_mlp_levels, s.compensate,
                          attn_levels=s.library_attn_levels)


LIBRARY_DTYPE = torch.float32  # whatever the fitness computes in: one library per model and data on every machine


def library_stored(lm: LoadedModel, s, cal: Calibration) -> bool:
    """Whether the search's library is stored already (reading it costs nothing)."""
    return cal.stored_library(library_spec(lm, s), min(s.library_windows, int(cal.calib.shape[0])),
                              LIBRARY_DTYPE) is not None


def search_library(lm: LoadedModel, s, cal: Calibration, cancel: threading.Event | None, measure: bool = True,
                   deadline: float | None = None) -> Iterator[Any]:
    """The search's level library: read where it is stored; measured only if `measure` (a time
    budget too short for it says no), and cut at `deadline` (a `library.clock()` time). Returns
    None when it is neither stored nor measured to its end."""
    spec = library_spec(lm, s)
    windows = min(s.library_windows, int(cal.calib.shape[0]))
    if not measure and not library_stored(lm, s, cal):
        return None
    lib = None
    for item in cal.library(lm.model, lm.shape, spec, windows, LIBRARY_DTYPE, s.fitness_batch, cancel, deadline):
        if isinstance(item, Library) or item is None:
            lib = item
        else:
            yield item
    return lib


def library_partial(lm: LoadedModel, s, cal: Calibration) -> Library | None:
    """The blocks of the search's library a cut measuring kept, if any."""
    return cal.partial_library(library_spec(lm, s), min(s.library_windows, int(cal.calib.shape[0])), LIBRARY_DTYPE)


__all__ = ["Calibration", "calibrate", "FILES", "cache_key", "search_calibration", "search_ladders",
           "search_library", "library_spec", "library_stored", "library_partial"]
