"""The application layer: every user action is one method here, and both the CLI and the app call
it, so the two cannot answer the same question differently. It owns what several actions share:
the loaded models (one explicit cache keyed by model, dtype and device), the sliced and reformed
subnet models (a bounded LRU), one heavy job per model and per tab with its Stop and its share of
the machine's cores, and the saved runs (`RunFolders`). Inputs arrive parsed (`explorer.app.inputs`).

A browser tab's own choices (its run, pick, reformations) stay with the tab (`Session` in the UI,
plain arguments in the CLI); the workbench only keys jobs by tab. A reformed model is named by
its `Reformation` (settings, digest, sketch): when it has left the cache it is reformed again and
must reproduce those weights, so what a tab calls "reformed" is always the weights it reformed,
for its evaluation, timing, prompts and export alike.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ExplorerError
from ..events import SEARCH_END, EventSink, Progress, check_cancel, no_event
from ..model.cores import CoreShare
from ..model.generation import DecodeSettings, side_by_side
from ..model.latency import SpeedSettings, measure_speed
from ..model.loading import LoadedModel, is_subnet_folder, load_model, weights_fingerprint
from ..model.slicing import candidate_model
from ..model.subnet import Subnet
from ..pick.evaluation import EvalResult, EvalSettings, evaluate, heldout_perplexity, load_subnet_folder
from ..pick.pickfile import PickFile
from ..pick.reform import ReformSettings, reform, same_sketch
from ..search.runs import SHIPPED_RUNS, Candidate, create_run, open_run, run_path
from ..search.sizes import ORIGIN as SIZE_ORIGIN
from ..search.sizes import RunLibrary, Solution, parse_size
from ..settings import SearchSettings
from . import inputs
from .runfolders import DEMO_RUN, RunFolders, model_key, slug, uploads_run_name

log = logging.getLogger(__name__)
MAX_PROMPT_CHARS = 200_000  # far above any context this app serves; beyond it, tokenizing alone is the attack


class Busy(ExplorerError):
    """Another job runs on the same model, or this tab already runs one."""


@dataclass(frozen=True)
class AppSettings:
    """What interactive actions measure, sized for a responsive page on a laptop CPU (the CLI's
    commands take their own settings, whose defaults live with each step)."""

    heldout_windows: int = 8
    seq_len: int = 512
    speed: SpeedSettings = SpeedSettings(prompt_len=64, new_tokens=16, repeats=3)
    reform: ReformSettings = ReformSettings.demo()
    eval_limit: int = 100  # questions per zero-shot task: a quick look, not a benchmark
    stream_interval_s: float = 1.0
    search_overrides: tuple[tuple[str, object], ...] = ()  # applied under the user's own settings
    max_subnets: int = 6  # sliced / reformed models kept in memory
    # Gradio's copies of what the page sends and receives (export zips, reports, uploads): every
    # `[0]` seconds those older than `[1]` seconds are deleted, and all of them when the server stops
    # (the exports themselves stay in the exports folder); unpruned, a day of demos fills a disk
    file_cache: tuple[int, int] = (3600, 86400)

    @classmethod
    def quick(cls) -> "AppSettings":
        """Small measurements for tests and slow machines (SUBNET_EXPLORER_QUICK=1)."""
        return cls(heldout_windows=2, seq_len=256, speed=SpeedSettings(prompt_len=32, new_tokens=8, repeats=1),
                   reform=replace(ReformSettings.demo(), windows=8, seq_len=128), stream_interval_s=0.5,
                   search_overrides=(("calib_windows", 8), ("latency", False), ("library_windows", 1),
                                     ("library_attn_levels", 2), ("library_mlp_levels", 3)))

    @classmethod
    def from_env(cls) -> "AppSettings":
        return cls.quick() if os.environ.get("SUBNET_EXPLORER_QUICK") == "1" else cls()

    @property
    def eval(self) -> EvalSettings:
        return EvalSettings(heldout_windows=self.heldout_windows, seq_len=self.seq_len, limit=self.eval_limit)


@dataclass(frozen=True)
class Pick:
    """A candidate and what rebuilds its model exactly: the run it belongs to and, when it is
    bias-compensated, the channel means its biases are built from."""

    run: str
    candidate: Candidate
    means: Any = None


@dataclass(frozen=True)
class Reformation:
    """What names a reformed model (the model itself may leave the cache): its settings, and the
    digest and sketch of the weights they produced."""

    run: str
    cid: str
    ppl_before: float
    ppl_after: float
    digest: str
    settings: dict
    layers: tuple = ()  # reform.LayerReform.to_dict() per projection: the calibration errors before / after
    sketch: tuple = ()  # reform.reformed_sketch: matches the same reformation on another thread count

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """What a subnet file keeps of it: enough to reform again and check the result."""
        return {"settings": self.settings, "digest": self.digest, "sketch": list(self.sketch)}


class ModelCache:
    """A small LRU of sliced / reformed subnet models (weights of a few subnets, never of base models)."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple, model) -> None:
        with self._lock:
            self._items[key] = model
            self._items.move_to_end(key)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Job:
    kind: str
    cancel: threading.Event = field(default_factory=threading.Event)


class Workbench(RunFolders):
    def __init__(self, runs_root: str | Path, exports_root: str | Path, settings: AppSettings = AppSettings(),
                 shipped_runs: Path | None = SHIPPED_RUNS, allow_paths: bool = False):
        super().__init__(runs_root, exports_root, shipped_runs, allow_paths)
        self.settings = settings
        self._models: dict[tuple, LoadedModel] = {}
        self._model_locks: dict[tuple, threading.Lock] = {}
        self._load_lock = threading.Lock()
        self._dense: dict[tuple, dict] = {}
        self._measure_lock = threading.Lock()
        self.subnets = ModelCache(settings.max_subnets)
        self._jobs: dict[str, _Job] = {}
        self._guard = threading.Lock()
        self._uploads = threading.Lock()
        self._libraries: dict[tuple, RunLibrary] = {}

    # ---- models -------------------------------------------------------------------------------
    def model(self, key: tuple, progress: Callable[[str], None] | None = None, max_memory: str | None = None,
              trust_remote_code: bool = False) -> LoadedModel:
        """The model `key` names, loaded once."""
        with self._load_lock:
            if key not in self._models:
                self._models[key] = load_model(key[0], key[1], key[2], trust_remote_code, progress=progress,
                                               max_memory=max_memory)
                self._model_locks[key] = threading.Lock()
            return self._models[key]

    def loaded(self, key: tuple | None) -> LoadedModel:
        if key is None or key not in self._models:
            raise ExplorerError("load a model first (Model → Load)")
        return self._models[key]

    def load(self, key: tuple, progress: Callable[[str], None] | None = None) -> tuple[LoadedModel, dict | None]:
        """Load a model and measure the dense reference (held-out perplexity, prefill and decode speed).

        The measurement holds the model's job lock, so it never runs beside another tab's search; while
        such a job runs it is postponed (None) rather than timed on a busy machine. A second tab loading
        the same model waits for the first one's measurement instead."""
        lm = self.model(key, progress)
        with self._measure_lock:
            if key not in self._dense:
                lock = self._model_locks[key]
                if not lock.acquire(blocking=False):
                    return lm, None
                try:
                    if progress:
                        progress("measuring the dense model (held-out perplexity, speed)")
                    s = self.settings
                    ppl = heldout_perplexity(lm.model, lm.tokenizer, s.eval)
                    sp = measure_speed(lm.model, lm.shape.vocab_size, s.speed)
                    self._dense[key] = {"heldout_ppl": ppl, "windows": s.heldout_windows, "seq_len": s.seq_len,
                                        "prefill_ms": sp.prefill_ms, "decode_tok_s": sp.decode_tokens_per_s,
                                        "decode_ms": sp.decode_ms_per_token, "prompt_len": s.speed.prompt_len}
                finally:
                    lock.release()
        return lm, self._dense[key]

    def dense_figures(self, key: tuple | None) -> dict | None:
        """What Load measured of the dense model (held-out perplexity, speed), if it has."""
        return self._dense.get(key) if key is not None else None

    def info(self, tab: str, key: tuple, settings: EvalSettings | None, on_event: EventSink = no_event) -> dict:
        """A model's architecture and, with `settings`, its held-out perplexity."""
        lm = self.model(key)
        out = lm.summary()
        if settings is not None:
            with self.job(tab, key, "evaluation", on_event) as cancel:
                out["heldout_ppl"] = heldout_perplexity(lm.model, lm.tokenizer, settings, on_event, cancel)
            out["heldout"] = {"corpus": settings.corpus, "windows": settings.heldout_windows,
                              "seq_len": settings.seq_len}
        return out

    # ---- jobs -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def job(self, tab: str, key: tuple, kind: str, on_event: EventSink = no_event) -> Iterator[threading.Event]:
        """One heavy job per tab and per model: another tab gets Busy; the tab's Stop reaches the job
        by the tab's id alone (a handler's state is only written back when it returns). The job takes
        its share of the machine's cores, saying so when it shares them."""
        job = _Job(kind)
        with self._guard:
            if tab in self._jobs:
                raise Busy(f"this tab is already running a {self._jobs[tab].kind}; wait for it or press Stop")
            self._jobs[tab] = job
        try:
            lock = self._model_locks[key]
            if not lock.acquire(blocking=False):
                raise Busy(f"the model is busy with another job (another tab or user); the {kind} can start when "
                           "it ends")
            try:
                with CoreShare(kind) as share:
                    for note in share.take_notes():
                        on_event(Progress("machine", 1, 1, note))
                    yield job.cancel
            finally:
                lock.release()
        finally:
            with self._guard:
                if self._jobs.get(tab) is job:
                    del self._jobs[tab]

    def stop(self, tab: str) -> str | None:
        """Cancel the tab's heavy job; its kind, or None when the tab runs none."""
        with self._guard:
            job = self._jobs.get(tab)
        if job is None:
            return None
        job.cancel.set()
        return job.kind

    def running(self, tab: str) -> str | None:
        with self._guard:
            job = self._jobs.get(tab)
        return None if job is None else job.kind

    # ---- runs ---------------------------------------------------------------------------------------
    def model_for_run(self, run: str, prefer: tuple | None = None, progress=None, max_memory: str | None = None
                      ) -> tuple[tuple, LoadedModel]:
        """The base model a run was made on (loaded on demand); `prefer` = the caller's loaded key, when
        it is the same model (its dtype and device then stay the caller's)."""
        st = self.open(run).settings
        key = model_key(st.get("model", "default"), st.get("dtype", "float32"), st.get("device", "cpu"))
        if prefer and prefer[0] == key[0]:
            key = prefer
        return key, self.model(key, progress, max_memory)

    def front(self, run: str) -> dict:
        """A run's Pareto fronts as rows (no model needed)."""
        r = self.open(run)
        cands = {c.id: c for c in r.candidates()}
        return {"status": r.status, "candidates": len(cands),
                "fronts": {name: [front_row(cands[i]) for i in ids] for name, ids in r.fronts().items()}}

    def report(self, run: str, prompts: list[dict] = (), out: Path | None = None) -> Path:
        """The run's self-contained HTML report (explorer.app.report), with the prompts a tab tried;
        by default under the exports folder (so the app may offer it for download)."""
        from .report import write_report

        out = out or self.export_dir(f"{Path(run).name}-report.html")
        return write_report(self.open(run), out, list(prompts))

    # ---- search --------------------------------------------------------------------------------------
    def search_settings(self, preset: str, targets, overrides: dict | None = None) -> SearchSettings:
        """The user's settings over the app's own (quick mode) over the preset's (`inputs.search_settings`)."""
        return inputs.search_settings(preset, targets, overrides or {}, dict(self.settings.search_overrides))

    def search(self, tab: str, key: tuple, settings: SearchSettings, name: str, group=None) -> Iterator[Any]:
        """Validate everything (a refused search creates nothing), then the search's events under the
        tab's job. The first event is SearchStarted, only once the job is the tab's."""
        from ..search.run import run_search
        from ..search.validate import resolve

        lm = self.loaded(key)
        leader = group is None or group.leader
        run_dir = self.new_run_dir(name) if leader else Path(name)  # the others mirror process 0's run
        resolve(lm, settings)  # bad targets and settings are refused here, before the job or the run exist
        dense = self._dense.get(key)

        def start(cancel):
            for ev in run_search(lm, settings, run_dir, cancel=cancel, group=group):
                c = getattr(ev, "candidate", None)
                if dense and leader and c is not None and c.origin == "dense":  # the held-out reference of the plot
                    open_run(run_dir).annotate(c.id, {"heldout_ppl": dense["heldout_ppl"]})
                yield ev

        return self._searching(tab, key, start)

    def prepare(self, tab: str, key: tuple, settings: SearchSettings) -> Iterator[Any]:
        """Build what a search with these settings reads before its first candidate (the calibration
        pass, the baselines at every target, the ladders) into the disk cache, outside any time
        budget, so the search that follows spends its minutes searching (before a talk, say).
        StageProgress events; nothing else is kept."""
        import tempfile

        from ..search.run import prepare

        lm = self.loaded(key)

        def events():
            with self.job(tab, key, "preparation") as cancel, tempfile.TemporaryDirectory(prefix="prepare-") as tmp:
                yield from prepare(lm, settings, Path(tmp) / "run", cancel)

        return events()

    def resume(self, tab: str, run: str, key: tuple | None = None, group=None, max_memory: str | None = None
               ) -> Iterator[Any]:
        """Continue a stopped or crashed search with its stored settings, on its own model (or `key`'s
        dtype and device for that model)."""
        from ..search.run import run_search

        path = self.run_dir(run)
        key, lm = self.model_for_run(run, key, max_memory=max_memory)
        return self._searching(tab, key, lambda cancel: run_search(lm, SearchSettings(), path, cancel=cancel,
                                                                   resume=True, group=group))

    def _searching(self, tab: str, key: tuple, start) -> Iterator[Any]:
        def events():
            end = None
            with self.job(tab, key, "search") as cancel:
                for ev in start(cancel):
                    if isinstance(ev, SEARCH_END):  # told only once the model is free: whoever reads
                        end = ev                    # "stopped" may start the next job at once
                        continue
                    yield ev
            if end is not None:
                yield end

        return events()

    # ---- picks and their models ---------------------------------------------------------------------
    def pick(self, run: str, cid: str, tab: str = "cli", prefer: tuple | None = None) -> Pick:
        """A run's candidate, by id, "best@FRACTION", "baseline:NAME@FRACTION", "library@FRACTION" or
        "library@SPEEDUPx" (the library's subnet at that size or predicted speed-up, `explorer.search.sizes`:
        its fitness measured under the tab's job and stored in the run the first time), with what
        rebuilds its model exactly."""
        r = self.open(run)
        if cid.strip().startswith(f"{SIZE_ORIGIN}@"):
            kind, value = parse_size(cid)
            key, lib = self.run_library(run, prefer)
            if not self.writable(run):
                raise ExplorerError("the shipped example run is read-only: search to pick any size")
            with self.job(tab, key, "library pick") as cancel:
                c = lib.pick(value, cancel) if kind == "size" else lib.pick(None, cancel, speedup=value)
        else:
            c = r.pick(cid)
        return Pick(run, c, r.means_of(c))

    def run_library(self, run: str, prefer: tuple | None = None) -> tuple[tuple, RunLibrary]:
        """The run's level library, ready to solve (the run's model loaded on demand; cached)."""
        key, lm = self.model_for_run(run, prefer)
        path = self.run_dir(run)
        k = (str(path), key)
        lib = self._libraries.get(k)
        if lib is None:
            lib = self._libraries[k] = RunLibrary(lm, open_run(path))
        return key, lib

    def size_preview(self, run: str, fraction: float, prefer: tuple | None = None) -> Solution:
        """The library's subnet at `fraction` of the run's share, solved (milliseconds) but not evaluated."""
        return self.run_library(run, prefer)[1].solve(fraction)

    def open_subnet_file(self, key: tuple, path: Path) -> tuple[Pick, Reformation | None]:
        """A subnet file (an export's subnet.json, or a bare subnet) as a pick of the model's uploads run,
        with its compensation and, when the file records one, its reformation: the very model that
        was exported. The file is read as data and checked against the loaded model before anything
        changes; a file opened twice maps to the same candidate."""
        lm = self.loaded(key)
        record = inputs.read_subnet_file(Path(path), lm.shape, weights_fingerprint(lm.model), key[1])
        name = uploads_run_name(key[0])
        self.runs_root.mkdir(parents=True, exist_ok=True)
        run_dir = run_path(name, self.runs_root)
        with self._uploads:
            if not (run_dir / "run.json").is_file():
                run = create_run(run_dir, {"model": key[0], "dtype": key[1], "device": key[2],
                                           "preset": "subnet files", "targets": []}, lm.shape)
                full = Subnet.full(lm.shape)
                run.append(Candidate("dense", 1.0, 0, "dense", full, full.size_metrics(lm.shape)))
                run.set_status("finished")
            run = open_run(run_dir)
            if run.shape != lm.shape:
                raise ExplorerError(f"the run {name} was made for a model of another shape; rename or remove it")
            digest = run.keep_means(record.means) if record.compensated else None
            cid = f"upload-{record.subnet.key()[:8]}" + (f"-{digest[:6]}" if digest else "")
            known = {c.id: c for c in run.candidates()}
            if cid not in known:
                s = record.subnet
                known[cid] = Candidate(cid, round(s.fraction(lm.shape, record.compensated), 4), 0, "upload", s,
                                       {**s.size_metrics(lm.shape, record.compensated), "file": Path(path).name},
                                       record.compensated, digest)
                run.append(known[cid])
        p = Pick(name, known[cid], record.means)
        r = None
        if record.reformation:
            rec = record.reformation
            r = Reformation(name, cid, math.nan, math.nan, rec["digest"], rec["settings"], (),
                            tuple(rec.get("sketch", ())))
        return p, r

    def pick_file(self, key: tuple, p: Pick, r: Reformation | None = None) -> PickFile:
        """What a subnet file of this pick holds (every export writes it as subnet.json)."""
        c = p.candidate
        return PickFile.of(self.loaded(key), c.subnet, p.means if c.compensated else None,
                           None if r is None else r.record(),
                           {"run": p.run, "candidate": c.id, "origin": c.origin, "target": c.target})

    def sliced(self, key: tuple, p: Pick):
        """A pick's model (`slicing.candidate_model`: compensation exactly as its fitness had it)."""
        lm = self.loaded(key)
        if p.candidate.origin == "dense":
            return lm.model
        k = (key, p.run, p.candidate.id, "sliced")
        model = self.subnets.get(k)
        if model is None:
            model = candidate_model(lm.model, p.candidate, p.means)
            self.subnets.put(k, model)
        return model

    def reformed(self, key: tuple, p: Pick, r: Reformation, cancel=None, on_event: EventSink = no_event):
        """The reformed model `r` names: from the cache, or reformed again and checked to reproduce the
        same weights (the same digest, or on another thread count the same sketch within fp32
        rounding); never something else under that label."""
        k = (key, p.run, p.candidate.id, "reformed", r.digest)
        model = self.subnets.get(k)
        if model is not None:
            return model
        on_event(Progress("reform", 0, 1, f"reforming {p.candidate.id} with its recorded settings"))
        result = reform(self.loaded(key), p.candidate.subnet, ReformSettings.from_dict(r.settings), on_event=on_event,
                        cancel=cancel, means=p.means)
        if result.digest != r.digest and not same_sketch(result.sketch, r.sketch):
            raise ExplorerError(f"reforming {p.candidate.id} again gave other weights than it had (digest "
                                f"{result.digest}, recorded {r.digest}); to use the exported weights, load the export "
                                "folder itself as the model")
        self.subnets.put(k, result.model)
        return result.model

    def model_of(self, key: tuple, p: Pick, r: Reformation | None, **kw):
        """The model a pick stands for: reformed when `r`, else sliced (with its compensation)."""
        return self.sliced(key, p) if r is None else self.reformed(key, p, r, **kw)

    # ---- actions on a pick -----------------------------------------------------------------------------
    def reform(self, tab: str, key: tuple, p: Pick, settings: ReformSettings | None = None,
               eval_settings: EvalSettings | None = None, on_event: EventSink = no_event) -> Reformation:
        """Reform a pick, with held-out perplexity before and after (`eval_settings`, default the app's;
        heldout_windows 0 skips them); stores nothing unless it finishes (a Stop keeps the run as it was)."""
        c = p.candidate
        if c.origin == "dense":
            raise ExplorerError("the dense model has nothing to reform")
        lm = self.loaded(key)
        settings = settings or self.settings.reform
        es = eval_settings or self.settings.eval
        measure = es.heldout_windows > 0
        with self.job(tab, key, "reformation", on_event) as cancel:
            before = heldout_perplexity(self.sliced(key, p), lm.tokenizer, es, on_event, cancel) if measure else math.nan
            result = reform(lm, c.subnet, settings, on_event=on_event, cancel=cancel, means=p.means)
            after = heldout_perplexity(result.model, lm.tokenizer, es, on_event, cancel) if measure else math.nan
            check_cancel(cancel)  # Stop pressed at the very end still means: keep nothing
        r = Reformation(p.run, c.id, before, after, result.digest, result.settings.to_dict(),
                        tuple(layer.to_dict() for layer in result.layers), result.sketch)
        self.subnets.put((key, p.run, c.id, "reformed", r.digest), result.model)
        if measure:
            self.annotate(p, {"ppl_before": before, "ppl_after": after})
        return r

    def evaluate(self, tab: str, key: tuple, p: Pick | None, settings: EvalSettings | None = None,
                 r: Reformation | None = None, on_event: EventSink = no_event) -> EvalResult:
        """Held-out perplexity and zero-shot accuracy of a pick (reformed when `r`), or with no pick of
        the model `key` names (a base model, or an exported subnet folder). A pick's figures are stored
        with the run (`reformed_` ones for the reformed model)."""
        settings = settings or self.settings.eval
        if p is None:
            model, tokenizer, name = self._evaluable(key)
            with self.job(tab, key, "evaluation", on_event) as cancel:
                return evaluate(model, tokenizer, settings=settings, on_event=on_event, cancel=cancel, name=name,
                                info={"model_spec": key[0], "dtype": key[1], "device": key[2],
                                      "params": sum(t.numel() for t in model.parameters())})
        lm = self.loaded(key)
        with self.job(tab, key, "evaluation", on_event) as cancel:
            model = self.model_of(key, p, r, cancel=cancel, on_event=on_event)
            res = evaluate(model, lm.tokenizer, settings=settings, on_event=on_event, cancel=cancel,
                           name=p.candidate.id + (" (reformed)" if r else ""))
        self.annotate(p, pick_metrics(res, r is not None))
        return res

    def _evaluable(self, key: tuple):
        """(model, tokenizer, name) of a model spec: an exported subnet folder is rebuilt with this
        package's own class (no remote code runs), anything else is loaded as a base model."""
        path = Path(key[0]).expanduser()
        if key[0] not in ("", "default") and path.is_dir() and is_subnet_folder(path):
            with self._load_lock:
                if key not in self._models:
                    model, tokenizer = load_subnet_folder(path, key[1], key[2])
                    self._models[key] = LoadedModel(model, tokenizer, None, str(path), path.name, "", model.dtype,
                                                    key[2])
                    self._model_locks[key] = threading.Lock()
            lm = self._models[key]
            return lm.model, lm.tokenizer, path.name
        lm = self.model(key)
        return lm.model, lm.tokenizer, lm.name

    def measure(self, tab: str, key: tuple, picks: list[tuple[Pick, Reformation | None]],
                on_event: EventSink = no_event) -> dict:
        """Time picks' decode for real, paired and interleaved with the dense model (reformed models
        when a Reformation is given); stored with their runs."""
        from ..search.latency_model import measure

        lm = self.loaded(key)
        if any(p.candidate.origin == "dense" for p, _ in picks):
            raise ExplorerError("the dense model is the reference every latency is measured against")
        if not picks:
            raise ExplorerError("nothing to time: pick a subnet")
        with self.job(tab, key, "latency measurement", on_event) as cancel:
            models = {p.candidate.id: self.model_of(key, p, r, cancel=cancel, on_event=on_event) for p, r in picks}
            got = measure(lm.model, models, lm.shape.vocab_size, cancel=cancel, on_event=on_event)
        for p, _ in picks:
            self.annotate(p, got[p.candidate.id].metrics())
        return got

    def annotate(self, p: Pick, metrics: dict) -> None:
        """Measurements are appended to the user's runs (the shipped ones stay as shipped)."""
        if p.run and self.writable(p.run):
            open_run(self.run_dir(p.run)).annotate(p.candidate.id, metrics)

    def generate(self, key: tuple, models: dict[str, Any], prompt: str, decode: DecodeSettings) -> Iterator[dict]:
        """Side-by-side streams of the named models on one prompt (see generation.side_by_side)."""
        if prompt and len(prompt) > MAX_PROMPT_CHARS:  # refuse before tokenizing megabytes
            raise ExplorerError(f"the prompt has {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are "
                                "accepted (and it must fit the model's context in tokens)")
        lm = self.loaded(key)
        max_ctx = getattr(lm.model.config, "max_position_embeddings", 2048)
        return side_by_side(models, lm.tokenizer, prompt, decode, max_ctx)

    def export(self, tab: str, key: tuple, p: Pick, out_dir: Path, r: Reformation | None = None,
               on_event: EventSink = no_event, verify: bool = True, make_zip: bool = True, extra: dict | None = None,
               provenance: dict | None = None, files: dict | None = None, fmt: str = "hf", gguf_type: str = "f16"):
        """A verified export of a pick (reformed when `r`); a Stop leaves no folder behind. `fmt` "hf"
        writes a transformers folder, "gguf" one GGUF file checked in llama.cpp. Either holds the
        pick's subnet file (subnet.json), which reopens as exactly this model."""
        from ..pick.export import export_subnet
        from ..pick.export_gguf import export_gguf, precheck

        c = p.candidate
        if c.origin == "dense":
            raise ExplorerError("pick a subnet, not the dense model")
        lm = self.loaded(key)
        if fmt == "gguf" and (why := precheck(lm, c.subnet)):
            raise ExplorerError(f"cannot export GGUF: {why}")
        record_file = self.pick_file(key, p, r)
        with self.job(tab, key, "export", on_event) as cancel:
            model = self.model_of(key, p, r, cancel=cancel, on_event=on_event)
            metrics = {**c.metrics, **(extra or {})}
            if r is not None and math.isfinite(r.ppl_after):
                metrics.update(heldout_ppl_before_reformation=r.ppl_before, heldout_ppl=r.ppl_after)
            record = {"run": p.run, "candidate": c.id, "origin": c.origin, "target": c.target,
                      **({"run_settings": self.open(p.run).settings} if p.run else {}), **(provenance or {})}
            if fmt == "gguf":
                record.update(compensated=r is None and p.means is not None, reformed=r is not None)
                return export_gguf(lm, model, record_file, out_dir, metrics, record, out_type=gguf_type, verify=verify,
                                   make_zip=make_zip, on_event=on_event, cancel=cancel)
            return export_subnet(lm, model, record_file, out_dir, metrics, record, verify=verify, make_zip=make_zip,
                                 on_event=on_event, cancel=cancel, extra_files=files,
                                 means=p.means if r is None else None,
                                 reformed=None if r is None else {"digest": r.digest, "settings": r.settings})


FRONT_COLUMNS = ["id", "target", "origin", "generation", "params", "fraction", "fitness_ppl",
                 "predicted_latency_ms", "measured_ms", "measured_speedup", "measured_spread", "heldout_ppl"]


def front_row(c: Candidate) -> dict:
    return {"id": c.id, "target": c.target, "origin": c.origin, "generation": c.generation,
            **{k: c.metrics.get(k, "") for k in FRONT_COLUMNS[4:]}}


def pick_metrics(res: EvalResult, reformed: bool) -> dict:
    """An evaluation's figures as a candidate stores them (`reformed_` ones for its reformed model)."""
    prefix = "reformed_" if reformed else ""
    return {prefix + ("heldout_ppl" if k == "ppl" else "zeroshot_acc" if k == "average" else f"acc:{k}"): v
            for k, v in res.metrics().items()}


__all__ = ["Workbench", "AppSettings", "Pick", "Reformation", "Busy", "ModelCache", "model_key", "slug",
           "uploads_run_name", "DEMO_RUN", "FRONT_COLUMNS", "front_row", "pick_metrics"]
