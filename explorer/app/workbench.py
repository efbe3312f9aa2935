"""The application layer: every user action is one method here, and both the CLI and the app
call it. It owns what several actions share: the loaded models (one explicit cache keyed by
model, dtype and device), the sliced and reformed subnet models (a bounded LRU), one heavy job
per model and per tab with its Stop, the saved runs, and the reading of subnet files.

A browser tab's own choices (its run, pick, reformations) stay with the tab (`Session` in the
UI, plain arguments in the CLI); the workbench only keys jobs by tab. A reformed model is
identified by the digest of its weights: when it has left the cache it is recomputed and must
reproduce that digest, so what a tab calls "reformed" is always the weights it reformed.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ExplorerError
from ..events import SEARCH_END, EventSink, Progress, check_cancel, no_event
from ..model.generation import DecodeSettings, side_by_side
from ..model.latency import SpeedSettings, measure_speed
from ..model.loading import LoadedModel, load_model
from ..model.slicing import candidate_model
from ..model.subnet import ModelShape, Subnet, SubnetError
from ..pick.evaluation import EvalSettings, evaluate, heldout_perplexity
from ..pick.reform import ReformSettings, reform
from ..search.runs import SHIPPED_RUNS, Candidate, Run, RunError, create_run, open_run, run_path
from ..settings import SearchSettings

log = logging.getLogger(__name__)
DEMO_RUN = "smollm2-135m-demo"  # what a new page opens
MAX_PROMPT_CHARS = 200_000  # far above any context this app serves; beyond it, tokenizing alone is the attack


class Busy(ExplorerError):
    """Another job runs on the same model, or this tab already runs one."""


@dataclass(frozen=True)
class AppSettings:
    """What interactive actions measure, sized for a responsive page on a laptop CPU."""

    heldout_windows: int = 8
    seq_len: int = 512
    speed: SpeedSettings = SpeedSettings(prompt_len=64, new_tokens=16, repeats=3)
    reform: ReformSettings = ReformSettings.demo()
    stream_interval_s: float = 1.0
    search_overrides: tuple[tuple[str, object], ...] = ()  # applied under the user's own settings
    max_subnets: int = 6  # sliced / reformed models kept in memory

    @classmethod
    def quick(cls) -> "AppSettings":
        """Small measurements for tests and slow machines (SUBNET_EXPLORER_QUICK=1)."""
        return cls(heldout_windows=2, seq_len=256, speed=SpeedSettings(prompt_len=32, new_tokens=8, repeats=1),
                   reform=replace(ReformSettings.demo(), windows=8, seq_len=128), stream_interval_s=0.5,
                   search_overrides=(("calib_windows", 8), ("baseline_windows", 2), ("latency", False)))

    @classmethod
    def from_env(cls) -> "AppSettings":
        return cls.quick() if os.environ.get("SUBNET_EXPLORER_QUICK") == "1" else cls()

    @property
    def eval(self) -> EvalSettings:
        return EvalSettings(heldout_windows=self.heldout_windows, seq_len=self.seq_len)


@dataclass(frozen=True)
class Pick:
    """A candidate and what rebuilds its model exactly: the run it belongs to (None for a subnet
    file) and, when it is bias-compensated, the run's channel means."""

    run: str | None
    candidate: Candidate
    means: Any = None


@dataclass(frozen=True)
class Reformation:
    """What a tab knows of a reformation it ran; the model itself may leave the cache."""

    run: str
    cid: str
    ppl_before: float
    ppl_after: float
    digest: str
    settings: dict
    layers: tuple = ()  # reform.LayerReform.to_dict() per projection: the calibration errors before / after

    def to_dict(self) -> dict:
        return asdict(self)


def model_key(spec: str, dtype: str = "float32", device: str = "cpu") -> tuple:
    return ((spec or "").strip() or "default", dtype, device)


# ---- parsing user input -------------------------------------------------------------------------
def parse_targets(text: str) -> tuple[float, ...]:
    """'0.9, 0.8, 70%' -> (0.9, 0.8, 0.7); the search checks what the space can reach."""
    out = []
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(float(part[:-1]) / 100 if part.endswith("%") else float(part))
        except ValueError:
            raise ExplorerError(f"targets must be numbers like 0.7 or 70%, got {part!r}") from None
    if not out:
        raise ExplorerError("give at least one target, e.g. 0.7")
    return tuple(out)


def subnet_file_limit(shape: ModelShape) -> int:
    """Largest subnet JSON accepted for a model: every index of every layer written out, 16 bytes each,
    plus slack. Anything larger cannot be a subnet of this model, and is refused before it is read."""
    per_layer = shape.num_kv_heads * shape.n_pairs + shape.intermediate_size + shape.num_heads
    return 64 * 1024 + 16 * shape.num_layers * per_layer


def read_subnet_file(path: Path, shape: ModelShape) -> Subnet:
    """A subnet file, read as data only, that fits `shape`; otherwise one SubnetError line."""
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise SubnetError(f"the file {name} could not be read") from None
    limit = subnet_file_limit(shape)
    if size == 0:
        raise SubnetError(f"{name} is empty")
    if size > limit:
        raise SubnetError(f"{name} has {size / 2**20:.1f} MiB; a subnet of the loaded model takes at most "
                          f"{limit / 2**20:.1f} MiB, so it is not one")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SubnetError(f"{name} is not UTF-8 text, so not a subnet JSON") from None
    try:
        subnet = Subnet.from_json(text)  # json.loads only: data, never code
    except SubnetError as e:
        raise SubnetError(f"{name} is not a subnet description: {str(e).removeprefix('not a subnet description: ')}") \
            from None
    except (RecursionError, ValueError, TypeError, OverflowError, AttributeError, IndexError, KeyError) as e:
        raise SubnetError(f"{name} is not a subnet description ({type(e).__name__})") from None
    try:
        return subnet.validate(shape)
    except SubnetError as e:
        raise SubnetError(f"{name} does not fit the loaded model ({shape.num_layers} layers, {shape.num_kv_heads} "
                          f"KV groups of {shape.n_pairs} rotary pairs, MLP {shape.intermediate_size}): {e}") from None


def slug(spec: str) -> str:
    base = "smollm2" if spec in ("default", "") else spec.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base)[:40] or "model"


def uploads_run_name(spec: str) -> str:
    """One uploads run per base model: readable slug plus a hash of the spec (two folders may share a name)."""
    return f"uploads-{slug(spec)}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}"


# ---- the shared resources -------------------------------------------------------------------------
class ModelCache:
    """A bounded LRU of built models (sliced and reformed subnets); the bound holds on every insert."""

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


class Workbench:
    def __init__(self, runs_root: str | Path, exports_root: str | Path, settings: AppSettings = AppSettings(),
                 shipped_runs: Path | None = SHIPPED_RUNS, allow_paths: bool = False):
        self.runs_root = Path(runs_root)
        self.exports_root = Path(exports_root)
        self.shipped_runs = shipped_runs
        self.allow_paths = allow_paths  # the CLI opens run folders by path; the app only by name
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

    # ---- models -------------------------------------------------------------------------------
    def model(self, key: tuple, progress: Callable[[str], None] | None = None, max_memory: str | None = None
              ) -> LoadedModel:
        """The model `key` names, loaded once."""
        with self._load_lock:
            if key not in self._models:
                self._models[key] = load_model(key[0], key[1], key[2], progress=progress, max_memory=max_memory)
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

    # ---- jobs -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def job(self, tab: str, key: tuple, kind: str) -> Iterator[threading.Event]:
        """One heavy job per tab and per model: another tab gets Busy; the tab's Stop reaches the job
        by the tab's id alone (a handler's state is only written back when it returns)."""
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

    # ---- runs -------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        """A run by name: the user's runs first, then the shipped ones. Names cannot escape their folder;
        the CLI (allow_paths) may also give a run folder's path."""
        if self.allow_paths and (Path(name) / "run.json").is_file():
            return Path(name)
        for root in (self.runs_root, self.shipped_runs):
            if root is None:
                continue
            p = run_path(name, root)
            if (p / "run.json").is_file():
                return p
        raise RunError(f"no saved run named {name}")

    def new_run_dir(self, name: str) -> Path:
        if self.allow_paths and ("/" in name or os.sep in name):
            path = Path(name)
        else:
            self.runs_root.mkdir(parents=True, exist_ok=True)
            path = run_path(name, self.runs_root)
        if path.exists():
            raise RunError(f"a run named {name} exists already; choose another name")
        return path

    def open(self, name: str) -> Run:
        return open_run(self.run_dir(name))

    def runs(self) -> list[str]:
        """Saved runs: the user's newest first, then the shipped ones."""
        names = []
        for root in (self.runs_root, self.shipped_runs):
            if root is not None and root.is_dir():
                names += sorted((p.name for p in root.iterdir() if (p / "run.json").is_file()),
                                key=lambda n: -(root / n / "run.json").stat().st_mtime)
        return list(dict.fromkeys(names))

    def default_run(self) -> str | None:
        """What a new page shows: the shipped demo run (never someone's latest upload)."""
        runs = self.runs()
        return DEMO_RUN if DEMO_RUN in runs else (runs[0] if runs else None)

    def model_for_run(self, run: str, prefer: tuple | None = None, progress=None) -> tuple[tuple, LoadedModel]:
        """The base model a run was made on (loaded on demand); `prefer` = the tab's loaded key, when it
        is the same model."""
        st = self.open(run).settings
        key = model_key(st.get("model", "default"), st.get("dtype", "float32"), st.get("device", "cpu"))
        if prefer and prefer[0] == key[0]:
            key = prefer
        return key, self.model(key, progress)

    # ---- search --------------------------------------------------------------------------------------
    def search_settings(self, preset: str, targets, **overrides) -> SearchSettings:
        """The user's settings over the app's own (quick mode) under the preset's defaults."""
        return SearchSettings.preset(preset, **{**dict(self.settings.search_overrides), **overrides},
                                     targets=tuple(targets))

    def search(self, tab: str, key: tuple, settings: SearchSettings, name: str) -> Iterator[Any]:
        """Validate everything (a refused search changes nothing), then the search's events under the
        tab's job. The first event is SearchStarted, only once the job is the tab's."""
        from ..search.loop import resolve, run_search

        lm = self.loaded(key)
        run_dir = self.new_run_dir(name)
        resolve(lm, settings)  # bad targets and settings are refused here, before the job or the run exist

        def events():
            end = None
            with self.job(tab, key, "search") as cancel:
                for ev in run_search(lm, settings, run_dir, cancel=cancel):
                    if isinstance(ev, SEARCH_END):  # told only once the model is free: whoever reads
                        end = ev                    # "stopped" may start the next job at once
                        continue
                    yield ev
            if end is not None:
                yield end

        return events()

    # ---- picks and their models ---------------------------------------------------------------------
    def pick(self, run: str, cid: str) -> "Pick":
        """A run's candidate, by id or "best@FRACTION", with what rebuilds its model exactly."""
        r = self.open(run)
        c = r.pick(cid)
        return Pick(run, c, r.channel_means() if c.compensated else None)

    def sliced(self, key: tuple, p: "Pick"):
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

    def reformed(self, key: tuple, p: "Pick", r: Reformation, cancel=None, on_event: EventSink = no_event):
        """The reformed model `r` names: from the cache, or reformed again (deterministic) and checked to
        reproduce the same weights; never something else under that label."""
        k = (key, p.run, p.candidate.id, "reformed", r.digest)
        model = self.subnets.get(k)
        if model is not None:
            return model
        on_event(Progress("reform", 0, 1, f"re-forming {p.candidate.id} (it left the cache)"))
        result = reform(self.loaded(key), p.candidate.subnet, ReformSettings.from_dict(r.settings), on_event=on_event,
                        cancel=cancel, means=p.means)
        if result.digest != r.digest:
            raise ExplorerError(f"reforming {p.candidate.id} again did not reproduce the weights it had (digest "
                                f"{result.digest} != {r.digest}); reform it again to use it")
        self.subnets.put(k, result.model)
        return result.model

    def model_of(self, key: tuple, p: "Pick", r: Reformation | None, **kw):
        return self.sliced(key, p) if r is None else self.reformed(key, p, r, **kw)

    # ---- actions on a pick -----------------------------------------------------------------------------
    def reform(self, tab: str, key: tuple, p: "Pick", settings: ReformSettings | None = None,
               eval_settings: EvalSettings | None = None, on_event: EventSink = no_event) -> Reformation:
        """Reform a pick, with held-out perplexity before and after (`eval_settings`, default the
        app's; heldout_windows 0 skips them); stores nothing unless it finishes (a Stop keeps the run
        as it was)."""
        c = p.candidate
        if c.origin == "dense":
            raise ExplorerError("the dense model has nothing to reform")
        lm = self.loaded(key)
        settings = settings or self.settings.reform
        es = eval_settings or self.settings.eval
        measure = es.heldout_windows > 0
        with self.job(tab, key, "reformation") as cancel:
            before = heldout_perplexity(self.sliced(key, p), lm.tokenizer, es, on_event, cancel) if measure else math.nan
            result = reform(lm, c.subnet, settings, on_event=on_event, cancel=cancel, means=p.means)
            after = heldout_perplexity(result.model, lm.tokenizer, es, on_event, cancel) if measure else math.nan
            check_cancel(cancel)  # Stop pressed at the very end still means: keep nothing
        r = Reformation(p.run or "", c.id, before, after, result.digest, result.settings.to_dict(),
                        tuple(layer.to_dict() for layer in result.layers))
        self.subnets.put((key, p.run, c.id, "reformed", r.digest), result.model)
        if measure:
            self.annotate(p, {"ppl_before": before, "ppl_after": after})
        return r

    def evaluate(self, tab: str, key: tuple, p: "Pick", tasks, limit: int, r: Reformation | None = None,
                 on_event: EventSink = no_event) -> dict:
        """Held-out perplexity and zero-shot tasks of a pick (reformed when `r`): the metrics stored."""
        lm = self.loaded(key)
        if not tasks:
            raise ExplorerError("choose at least one task")
        with self.job(tab, key, "evaluation") as cancel:
            model = self.model_of(key, p, r, cancel=cancel, on_event=on_event)
            res = evaluate(model, lm.tokenizer, list(tasks), limit=max(1, int(limit)), settings=self.settings.eval,
                           on_event=on_event, cancel=cancel)
        prefix = "reformed_" if r is not None else ""
        extra = {prefix + ("heldout_ppl" if k == "ppl" else "zeroshot_acc" if k == "average" else f"acc:{k}"): v
                 for k, v in res.metrics().items()}
        self.annotate(p, extra)
        return extra

    def measure_latency(self, tab: str, key: tuple, p: "Pick", r: Reformation | None = None,
                        on_event: EventSink = no_event):
        """Time a pick's decode for real, paired with the dense model (latency_model.measure)."""
        from ..search.latency_model import measure

        lm = self.loaded(key)
        if p.candidate.origin == "dense":
            raise ExplorerError("the dense model is the reference every latency is measured against")
        with self.job(tab, key, "latency measurement") as cancel:
            model = self.model_of(key, p, r, cancel=cancel, on_event=on_event)
            m = measure(lm.model, {p.candidate.id: model}, lm.shape.vocab_size, cancel=cancel,
                        on_event=on_event)[p.candidate.id]
        self.annotate(p, m.metrics())
        return m

    def annotate(self, p: "Pick", metrics: dict) -> None:
        """Measurements are appended to the user's runs (the shipped ones stay as shipped)."""
        if not p.run:
            return
        path = self.run_dir(p.run)
        if path.parent.resolve() == self.runs_root.resolve() or self.allow_paths:
            open_run(path).annotate(p.candidate.id, metrics)

    def generate(self, key: tuple, models: dict[str, Any], prompt: str, decode: DecodeSettings) -> Iterator[dict]:
        """Side-by-side streams of the named models on one prompt (see generation.side_by_side)."""
        if prompt and len(prompt) > MAX_PROMPT_CHARS:  # refuse before tokenizing megabytes
            raise ExplorerError(f"the prompt has {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are "
                                "accepted (and it must fit the model's context in tokens)")
        lm = self.loaded(key)
        max_ctx = getattr(lm.model.config, "max_position_embeddings", 2048)
        return side_by_side(models, lm.tokenizer, prompt, decode, max_ctx)

    def export(self, tab: str, key: tuple, p: "Pick", out_dir: Path, r: Reformation | None = None,
               on_event: EventSink = no_event, verify: bool = True, make_zip: bool = True, extra: dict | None = None,
               provenance: dict | None = None, files: dict | None = None, fmt: str = "hf", gguf_type: str = "f16"):
        """A verified export of a pick (reformed when `r`); a Stop leaves no folder behind. `fmt` "hf"
        writes a transformers folder, "gguf" one GGUF file checked in llama.cpp (explorer.pick.export_gguf)."""
        from ..pick.export import export_subnet
        from ..pick.export_gguf import export_gguf, precheck

        c = p.candidate
        if c.origin == "dense":
            raise ExplorerError("pick a subnet, not the dense model")
        lm = self.loaded(key)
        if fmt == "gguf" and (why := precheck(lm, c.subnet)):
            raise ExplorerError(f"cannot export GGUF: {why}")
        with self.job(tab, key, "export") as cancel:
            model = self.model_of(key, p, r, cancel=cancel, on_event=on_event)
            metrics = {**c.metrics, **(extra or {})}
            if r is not None and math.isfinite(r.ppl_after):
                metrics.update(heldout_ppl_before_reformation=r.ppl_before, heldout_ppl=r.ppl_after)
            record = {"run": p.run, "candidate": c.id, "origin": c.origin, "target": c.target,
                      **({"run_settings": self.open(p.run).settings} if p.run else {}), **(provenance or {})}
            if fmt == "gguf":
                record.update(compensated=r is None and p.means is not None, reformed=r is not None)
                return export_gguf(lm, model, c.subnet, out_dir, metrics, record, out_type=gguf_type, verify=verify,
                                   make_zip=make_zip, on_event=on_event, cancel=cancel)
            return export_subnet(lm, model, c.subnet, out_dir, metrics, record, verify=verify, make_zip=make_zip,
                                 on_event=on_event, cancel=cancel, extra_files=files,
                                 means=p.means if r is None else None,
                                 reformed=None if r is None else {"digest": r.digest, "settings": r.settings})

    # ---- subnet files -------------------------------------------------------------------------------------
    def open_subnet_file(self, key: tuple, path: Path) -> tuple[str, Candidate]:
        """A subnet JSON as a candidate of the model's "uploads" run (created with the dense model as its
        reference); a file opened twice maps to the same candidate, measured once. Nothing changes when
        the file is refused."""
        lm, dense = self.load(key)
        subnet = read_subnet_file(Path(path), lm.shape)
        if dense is None:
            raise Busy("the model is busy with another job; open the file when it ends")
        name = uploads_run_name(key[0])
        self.runs_root.mkdir(parents=True, exist_ok=True)
        run_dir = run_path(name, self.runs_root)
        cid = f"upload-{subnet.key()[:8]}"
        with self._uploads:
            if not (run_dir / "run.json").is_file():
                run = create_run(run_dir, {"model": key[0], "dtype": key[1], "device": key[2],
                                           "preset": "uploaded subnets", "targets": []}, lm.shape)
                full = Subnet.full(lm.shape)
                run.append(Candidate("dense", 1.0, 0, "dense", full,
                                     {**full.size_metrics(lm.shape), "heldout_ppl": dense["heldout_ppl"]}))
                run.set_status("finished")
            run = open_run(run_dir)
            if run.shape != lm.shape:
                raise ExplorerError(f"the run {name} was made for a model of another shape; rename or remove it")
            known = {c.id: c for c in run.candidates()}
        if cid in known:
            return name, known[cid]
        c = Candidate(cid, round(subnet.fraction(lm.shape), 4), 0, "upload", subnet, subnet.size_metrics(lm.shape))
        model = self.sliced(key, Pick(name, c))
        c = replace(c, metrics={**c.metrics, "heldout_ppl": heldout_perplexity(model, lm.tokenizer, self.settings.eval)})
        with self._uploads:
            if cid not in {k.id for k in run.candidates()}:  # another tab may have opened the same file
                run.append(c)
        return name, c

    # ---- reports -----------------------------------------------------------------------------------------------
    def report(self, run: str, prompts: list[dict] = (), tag: str = "report") -> Path:
        """The run's HTML report (explorer.app.report), with the prompts a tab tried, under the exports
        folder (so the app may offer it for download)."""
        from .report import write_report

        out = self.export_dir(tag, f"{Path(run).name}-report.html")
        return write_report(self.open(run), out, list(prompts))

    # ---- exports ----------------------------------------------------------------------------------------------
    def export_dir(self, tag: str, name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{tag}-{name}")[:120]
        self.exports_root.mkdir(parents=True, exist_ok=True)
        return self.exports_root / safe

    def is_ours(self, path: str | os.PathLike | None) -> bool:
        """Downloads serve only files the app created under its exports folder."""
        if not path:
            return False
        try:
            Path(path).resolve().relative_to(self.exports_root.resolve())
            return True
        except ValueError:
            return False


__all__ = ["Workbench", "AppSettings", "Pick", "Reformation", "Busy", "ModelCache", "model_key", "parse_targets",
           "read_subnet_file", "subnet_file_limit", "uploads_run_name", "slug", "DEMO_RUN"]
