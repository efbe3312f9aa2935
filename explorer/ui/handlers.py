"""Event wiring: each handler calls the engine and returns a dict keyed by component.

Errors the user can fix arrive as `gr.Error` with the engine's message; anything else is
logged with its traceback and shown as one line.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr

from ..data import heldout_windows, load_corpus
from ..errors import Cancelled, ExplorerError
from ..events import check_cancel
from ..generation import DecodeSettings, side_by_side
from ..latency import SpeedSettings, measure_speed
from ..perplexity import perplexity
from ..slicing import slice_model
from ..runs import Candidate, create_run, open_run
from ..subnet import ModelShape, Subnet, SubnetError
from . import plots, views
from .layout import UI
from .workspace import Session, Workspace, model_key

log = logging.getLogger("explorer.ui")
MAX_PROMPT_CHARS = 200_000  # far above any context this app can serve; beyond it, tokenizing alone is the attack


@dataclass(frozen=True)
class AppSettings:
    """What the app measures, sized for a responsive page on a laptop CPU."""

    heldout_windows: int = 8
    seq_len: int = 512
    speed: SpeedSettings = SpeedSettings(prompt_len=64, new_tokens=16, repeats=3)
    reform_windows: int = 16
    reform_seq_len: int = 256
    stream_interval_s: float = 1.0
    search_overrides: tuple[tuple[str, object], ...] = ()  # applied under the user's own settings

    @classmethod
    def quick(cls) -> "AppSettings":
        """Small measurements for tests and slow machines (SUBNET_EXPLORER_QUICK=1)."""
        return cls(heldout_windows=2, seq_len=256, speed=SpeedSettings(prompt_len=32, new_tokens=8, repeats=1),
                   reform_windows=8, reform_seq_len=128, stream_interval_s=0.5,
                   search_overrides=(("calib_windows", 8), ("measure_max", 2)))

    @classmethod
    def from_env(cls) -> "AppSettings":
        import os

        return cls.quick() if os.environ.get("SUBNET_EXPLORER_QUICK") == "1" else cls()


def user_errors(fn):
    """Turn engine errors into gr.Error (message only); log everything else with its traceback."""

    def convert(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, ExplorerError):
            log.info("user error in %s: %s", fn.__name__, e)
            return gr.Error(str(e), print_exception=False)
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error(f"Something went wrong ({type(e).__name__}: {str(e)[:200]}). The log has the details.",
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*a, **k):
            try:
                yield from fn(*a, **k)
            except Exception as e:  # noqa: BLE001
                raise convert(e) from None
        return gen

    @functools.wraps(fn)
    def plain(*a, **k):
        try:
            return fn(*a, **k)
        except Exception as e:  # noqa: BLE001
            raise convert(e) from None
    return plain


class Handlers:
    def __init__(self, ui: UI, ws: Workspace, settings: AppSettings = AppSettings()):
        self.ui, self.ws, self.cfg = ui, ws, settings
        self._dense: dict[tuple, dict] = {}
        self._dense_lock = threading.Lock()

    # ---- helpers ------------------------------------------------------------------------
    def _run(self, s: Session):
        if not s.run:
            raise ExplorerError("open a run or start a search first")
        return open_run(self.ws.run_dir(s.run))

    def _candidate(self, s: Session, cid: str):
        for c in self._run(s).candidates():
            if c.id == cid:
                return c
        raise ExplorerError(f"no candidate {cid!r} in run {s.run}")

    def _model_for_run(self, s: Session, progress=None):
        """The base model the current run was made on; loaded on demand."""
        run = self._run(s)
        st = run.settings
        key = model_key(st.get("model", "default"), st.get("dtype", "float32"), st.get("device", "cpu"))
        if s.model_key and s.model_key[0] == key[0]:
            key = s.model_key
        lm = self.ws.model(key, progress=progress)
        s.model_key = key
        return key, lm

    def _subnet_model(self, s: Session, c, key, lm, prefer_reformed: bool = True):
        """The candidate's model: reformed only when *this tab* reformed it (the cache is shared by all
        tabs, and another tab's reformation must not silently change what this one evaluates or exports)."""
        reformed = (key, s.run, c.id, "reformed")
        if prefer_reformed and s.is_reformed(c.id) and self.ws.has_subnet_model(reformed):
            return self.ws.subnet_model(reformed, lambda: None)
        return self.ws.subnet_model((key, s.run, c.id, "sliced"), lambda: build_candidate_model(lm, c))

    def _annotate(self, run_name: str, cid: str, metrics: dict) -> None:
        """Measurements made in the app are appended to the run (the user's runs, not shipped ones)."""
        path = self.ws.run_dir(run_name)
        if path.parent == self.ws.runs_root.resolve():
            open_run(path).annotate(cid, metrics)

    def _heldout(self, lm):
        return heldout_windows(lm.tokenizer, load_corpus("bbc"), self.cfg.heldout_windows, self.cfg.seq_len)

    def _dense_metrics(self, key, lm) -> dict:
        if key not in self._dense:
            ppl = perplexity(lm.model, self._heldout(lm))
            sp = measure_speed(lm.model, lm.shape.vocab_size, self.cfg.speed)
            self._dense[key] = {"heldout_ppl": ppl, "windows": self.cfg.heldout_windows, "seq_len": self.cfg.seq_len,
                                "prefill_ms": sp.prefill_ms, "decode_tok_s": sp.decode_tokens_per_s,
                                "prompt_len": self.cfg.speed.prompt_len}
        return self._dense[key]

    def _figure(self, s: Session, x: str, y: str, run=None):
        run = run or self._run(s)
        cands = [_with_metrics(c, s.extra(c.id)) for c in run.candidates()]
        picked = [i for i in [s.picked, *s.compare] if i]
        return plots.pareto_figure(cands, front_ids(run), x, y, picked=picked, title=s.run)

    # ---- model -----------------------------------------------------------------------------
    @user_errors
    def load(self, spec, dtype, device, session, progress=gr.Progress()):
        s = session or Session()
        key = model_key(spec, dtype, device)
        progress(0.05, desc=f"loading {key[0]}")
        lm = self.ws.model(key, progress=lambda msg: progress(0.2, desc=msg))
        progress(0.5, desc="measuring the dense model (held-out perplexity, speed)")
        with self._dense_lock:  # a second tab loading the same model waits for the first measurement
            dense = self._dense_metrics(key, lm)
        s.model_key = key
        return {self.ui.model_info: views.model_markdown(lm.summary(), dense), self.ui.session: s}

    # ---- search -------------------------------------------------------------------------------
    @user_errors
    def search(self, targets, preset, population, generations, fitness_windows, seed, run_name, baselines,
               x, y, session, request: gr.Request):
        from ..baselines import BASELINES
        from ..search import SearchSettings, run_search

        s = session or Session()
        lm = self.ws.loaded(s.model_key)
        overrides = {k: int(v) for k, v in (("population", population), ("generations", generations),
                                            ("fitness_windows", fitness_windows)) if v not in (None, "")}
        settings = SearchSettings.preset(preset, **{**dict(self.cfg.search_overrides), **overrides},
                                         targets=parse_targets(targets), seed=int(seed or 0),
                                         baselines=tuple(BASELINES) if baselines else ())
        name = (run_name or "").strip() or f"{slug(s.model_key[0])}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = self.ws.new_run_dir(name)
        if run_dir.exists():
            raise ExplorerError(f"a run named {name} exists already; choose another name")
        status = views.SearchStatus()
        cands, front, last = {}, set(), 0.0
        # The tab's Session is changed in place (see switch_run), so only once the job is ours: a "busy"
        # refusal leaves this tab exactly as it was.
        with self.ws.job(tab_id(request), s.model_key, "search", "a search") as cancel:
            switch_run(s, name)
            yield {self.ui.status: "**Search starting** — computing importance scores…", self.ui.session: s,
                   self.ui.compare: self._compare_table(s), self.ui.card: views.NO_PICK, self.ui.layers: None,
                   self.ui.pick_box: ""}
            for ev in run_search(lm, settings, run_dir, cancel=cancel):
                status.update(ev)
                kind = type(ev).__name__
                if kind == "CandidateEvaluated":
                    cands[ev.candidate.id] = ev.candidate
                elif kind == "FrontChanged":
                    front = set(ev.params) | set(ev.latency)
                elif kind == "StageProgress":
                    yield {self.ui.status: f"**{ev.stage}** {ev.done}/{ev.total} {ev.message}"}
                    continue
                terminal = kind in ("SearchFinished", "SearchCancelled", "SearchFailed")
                if terminal or time.perf_counter() - last > self.cfg.stream_interval_s:
                    last = time.perf_counter()
                    fig = plots.pareto_figure(cands.values(), front, x, y, title=name)
                    yield {self.ui.status: status.markdown(), self.ui.plot: fig}
        yield {self.ui.status: status.markdown(), self.ui.plot: self._figure(s, x, y),
               self.ui.runs: gr.update(choices=self.ws.list_runs(), value=name), self.ui.session: s}

    @user_errors
    def stop(self, session, request: gr.Request):
        """Stop whichever heavy job this tab runs (search, reformation, export, evaluation)."""
        kind = self.ws.stop(tab_id(request))
        if kind is None:
            gr.Warning("Nothing is running in this tab.")
            return {self.ui.status: gr.update()}  # Gradio needs one output even when nothing changes
        if kind == "search":
            return {self.ui.status: "**Stopping…** the current candidate finishes, everything found is kept."}
        # also as a toast: while the job runs, its own progress overlay covers the action status
        gr.Info(f"Stopping the {kind}…")
        return {self.ui.action_status: f"**Stopping the {kind}…** nothing it has half done will be kept."}

    # ---- runs and plot --------------------------------------------------------------------------
    @user_errors
    def start_page(self, x, y, session):
        """On page load: list the saved runs and open the newest, so the plot is never empty."""
        s = session or Session()
        runs = self.ws.list_runs()
        out = {self.ui.runs: gr.update(choices=runs, value=runs[0] if runs else None), self.ui.session: s}
        if runs and not s.run:
            out.update(self.open(runs[0], x, y, s))
        return out

    @user_errors
    def open(self, name, x, y, session):
        if not name:
            raise ExplorerError("choose a saved run first")
        self.ws.run_dir(name)  # validates the name
        s = switch_run(session or Session(), name)  # the name is valid: now the tab may change
        run = self._run(s)
        n = len(run.candidates())
        st = run.settings
        info = (f"**Run {name}** · {n} candidates · model {st.get('model', '?')} · preset {st.get('preset', '?')} · "
                f"targets {', '.join(f'{t:.0%}' for t in st.get('targets', []))}")
        return {self.ui.plot: self._figure(s, x, y, run), self.ui.status: info, self.ui.session: s,
                self.ui.compare: self._compare_table(s), self.ui.card: views.NO_PICK, self.ui.layers: None,
                self.ui.pick_box: ""}

    @user_errors
    def replot(self, x, y, session):
        s = session or Session()
        if not s.run:
            return {self.ui.plot: gr.update()}
        return {self.ui.plot: self._figure(s, x, y)}

    @user_errors
    def pick(self, cid, x, y, session):
        s = session or Session()
        cid = (cid or "").strip()
        if not cid:
            raise ExplorerError("give a candidate id (or click a point)")
        c = self._candidate(s, cid)
        s.picked = c.id
        shape = run_shape(self._run(s))
        return {self.ui.card: views.card_markdown(c, shape, s.extra(c.id)),
                self.ui.layers: plots.layer_figure(c.subnet.summary(shape), shape),
                self.ui.plot: self._figure(s, x, y), self.ui.session: s, self.ui.pick_box: c.id}

    @user_errors
    def open_subnet(self, file, x, y, session, progress=gr.Progress()):
        """Open an uploaded subnet JSON as this tab's pick, for the loaded model.

        The file is only read as data (size-limited, UTF-8, `json.loads`) and checked against the loaded
        model's shape before anything changes, so a file for another model is one message and the tab
        keeps its run and pick. Accepted subnets go to a per-model "uploads" run, which gives them what
        every other pick has: reform, evaluate, compare, prompt and export work unchanged.
        """
        s = session or Session()
        lm = self.ws.loaded(s.model_key)
        if not file:
            raise ExplorerError("choose a subnet JSON file (a subnet.json from an export, or Subnet.to_json)")
        path = Path(file if isinstance(file, str) else getattr(file, "path", None) or file["path"])
        subnet = read_subnet_file(path, lm.shape)
        progress(0.1, desc="measuring the uploaded subnet (held-out perplexity)")
        name, c = self._store_upload(s.model_key, lm, subnet)
        switch_run(s, name)  # the file was accepted and stored: now the tab may change
        s.picked = c.id
        return {self.ui.card: views.card_markdown(c, lm.shape, s.extra(c.id)),
                self.ui.layers: plots.layer_figure(c.subnet.summary(lm.shape), lm.shape),
                self.ui.plot: self._figure(s, x, y), self.ui.pick_box: c.id, self.ui.session: s,
                self.ui.runs: gr.update(choices=self.ws.list_runs(), value=name),
                self.ui.compare: self._compare_table(s),
                self.ui.status: f"**Opened `{path.name}`** as `{c.id}` in run {name} (subnets opened from files "
                                f"for {s.model_key[0]})"}

    def _store_upload(self, key: tuple, lm, subnet: Subnet) -> tuple[str, Candidate]:
        """The uploads run of this model (created with the dense model as reference) and the subnet's
        candidate in it; a file opened twice maps to the same candidate, measured once."""
        name = uploads_run_name(key[0])
        path = self.ws.new_run_dir(name)
        cid = f"upload-{subnet.key()[:8]}"
        with self.ws.upload_lock:
            if not (path / "run.json").is_file():
                run = create_run(path, {"model": key[0], "dtype": key[1], "device": key[2],
                                        "preset": "uploaded subnets", "targets": []}, lm.shape)
                dense = self._dense.get(key, {})
                run.append(Candidate("dense", 1.0, 0, "dense", Subnet.full(lm.shape),
                                     {**Subnet.full(lm.shape).size_metrics(lm.shape),
                                      **({"heldout_ppl": dense["heldout_ppl"]} if dense else {})}))
                run.set_status("finished")
            run = open_run(path)
            if run.shape != lm.shape:
                raise ExplorerError(f"the run {name} was made for a model of another shape; rename or remove it")
            known = {c.id: c for c in run.candidates()}
        if cid in known:
            return name, known[cid]
        c = Candidate(cid, round(subnet.fraction(lm.shape), 4), 0, "upload", subnet,
                      subnet.size_metrics(lm.shape))
        model = self.ws.subnet_model((key, name, cid, "sliced"), lambda: build_candidate_model(lm, c))
        c = replace(c, metrics={**c.metrics, "heldout_ppl": perplexity(model, self._heldout(lm))})
        with self.ws.upload_lock:
            if cid not in {k.id for k in run.candidates()}:  # another tab may have opened the same file
                run.append(c)
        return name, c

    # ---- reform, evaluate, compare, export ------------------------------------------------------
    def _picked(self, s: Session):
        if not s.picked:
            raise ExplorerError("pick a subnet first (click a point on the plot)")
        return self._candidate(s, s.picked)

    @user_errors
    def reform(self, session, request: gr.Request, progress=gr.Progress()):
        from ..reform import ReformSettings, reform

        s = session or Session()
        c = self._picked(s)
        if c.origin == "dense":
            raise ExplorerError("the dense model has nothing to reform")
        key, lm = self._model_for_run(s, progress=lambda m: progress(0.05, desc=m))
        run_name = s.run  # the tab may open another run while this one works
        settings = ReformSettings(windows=self.cfg.reform_windows, seq_len=self.cfg.reform_seq_len)
        try:
            with self.ws.job(tab_id(request), key, "reformation") as cancel:
                held = self._heldout(lm)
                sliced = self._subnet_model(s, c, key, lm, prefer_reformed=False)
                progress(0.1, desc="held-out perplexity before")
                before = perplexity(sliced, held, cancel=cancel)

                def on_event(ev):
                    if hasattr(ev, "done") and getattr(ev, "total", 0):
                        progress((ev.done, ev.total), desc=f"reforming block {ev.done}/{ev.total}")

                result = reform(lm, c.subnet, settings, on_event=on_event, cancel=cancel)
                progress(0.95, desc="held-out perplexity after")
                after = perplexity(result.model, held, cancel=cancel)
                check_cancel(cancel)  # Stop pressed at the very end still means: keep nothing
        except Cancelled:
            return self._cancelled("Reformation", c.id, "the subnet, its card and the run are as they were")
        # Only a finished reformation is stored: the model, the tab's record, then the run's annotation.
        self.ws.put_subnet_model((key, run_name, c.id, "reformed"), result.model)
        s.reformed[s.note_key(c.id, run_name)] = {"ppl_before": before, "ppl_after": after}
        self._annotate(run_name, c.id, {"ppl_before": before, "ppl_after": after})
        return {**self._card_if_shown(s, run_name, c, lm.shape), self.ui.session: s,
                self.ui.action_status: f"Reformed `{c.id}`: held-out perplexity {before:.2f} → **{after:.2f}**"}

    def _card_if_shown(self, s: Session, run_name: str, c, shape) -> dict:
        """The refreshed card and compare table, when the tab still shows this pick."""
        if not s.shows(run_name, c.id):
            return {}
        return {self.ui.card: views.card_markdown(c, shape, s.extra(c.id)), self.ui.compare: self._compare_table(s)}

    def _cancelled(self, what: str, cid: str, kept: str) -> dict:
        gr.Info(f"{what} of {cid} cancelled.")
        return {self.ui.action_status: f"**{what} of `{cid}` cancelled** — nothing of it was kept; {kept}."}

    @user_errors
    def evaluate(self, tasks, limit, session, request: gr.Request, progress=gr.Progress()):
        from ..evaluation import EvalSettings, evaluate

        s = session or Session()
        c = self._picked(s)
        if not tasks:
            raise ExplorerError("choose at least one task")
        key, lm = self._model_for_run(s, progress=lambda m: progress(0.05, desc=m))
        run_name = s.run  # the tab may open another run while this one works
        try:
            with self.ws.job(tab_id(request), key, "evaluation") as cancel:
                model = lm.model if c.origin == "dense" else self._subnet_model(s, c, key, lm)
                settings = EvalSettings(heldout_windows=self.cfg.heldout_windows, seq_len=self.cfg.seq_len)

                def on_event(ev):
                    if getattr(ev, "total", 0):
                        progress((ev.done, ev.total), desc=f"{ev.stage} {ev.message}")

                res = evaluate(model, lm.tokenizer, list(tasks), limit=max(1, int(limit or 100)),
                               settings=settings, on_event=on_event, cancel=cancel)
        except Cancelled:
            return self._cancelled("Evaluation", c.id, "its card and the run are as they were")
        extra = {("heldout_ppl" if k == "ppl" else "zeroshot_acc" if k == "average" else f"acc:{k}"): v
                 for k, v in res.metrics().items()}
        k = s.note_key(c.id, run_name)
        s.evaluated[k] = {**s.evaluated.get(k, {}), **extra}
        self._annotate(run_name, c.id, extra)
        return {**self._card_if_shown(s, run_name, c, lm.shape), self.ui.session: s,
                self.ui.action_status: f"Evaluated `{c.id}`: " + ", ".join(
                    f"{k.replace('acc:', '')} {v:.3g}" for k, v in extra.items())}

    @user_errors
    def add_compare(self, session):
        s = session or Session()
        c = self._picked(s)
        if c.id not in s.compare:
            s.compare = (s.compare + [c.id])[-4:]
        return {self.ui.compare: self._compare_table(s), self.ui.session: s,
                self.ui.action_status: f"`{c.id}` added to compare; the first two picks answer prompts."}

    def _compare_table(self, s: Session):
        """The compare table of the current run (compared ids are always of this run: see switch_run)."""
        if not s.compare:
            return views.compare_frame([])
        by_id = {c.id: c for c in self._run(s).candidates()}
        return views.compare_frame([views.compare_row(by_id[i], s.extra(i)) for i in s.compare if i in by_id])

    @user_errors
    def export(self, session, request: gr.Request, progress=gr.Progress()):
        from ..export import export_subnet

        s = session or Session()
        c = self._picked(s)
        if c.origin == "dense":
            raise ExplorerError("pick a subnet, not the dense model")
        key, lm = self._model_for_run(s, progress=lambda m: progress(0.05, desc=m))
        run_name, reformed, extra = s.run, s.is_reformed(c.id), s.extra(c.id)  # as picked, whatever comes next
        model = self._subnet_model(s, c, key, lm)
        out = self.ws.export_dir(tab_id(request)[:8], f"{run_name}-{c.id}{'-reformed' if reformed else ''}")
        try:
            with self.ws.job(tab_id(request), key, "export") as cancel:
                metrics = {**c.metrics, **extra}
                provenance = {"run": run_name, "candidate": c.id, "origin": c.origin, "reformed": reformed,
                              "run_settings": open_run(self.ws.run_dir(run_name)).settings}

                def on_event(ev):
                    if hasattr(ev, "done") and getattr(ev, "total", 0):
                        progress((ev.done, ev.total), desc=getattr(ev, "message", "") or "exporting")

                # export_subnet writes into a temporary sibling and renames it into place only once it is
                # verified; a cancel removes the temporary folder, so nothing finished-looking is left.
                result = export_subnet(lm, model, c.subnet, out, metrics=metrics, provenance=provenance,
                                       on_event=on_event, cancel=cancel)
        except Cancelled:
            return self._cancelled("Export", c.id, "no new model folder or zip was written")
        if not result.verified or not self.ws.is_ours(result.zip_path):
            raise ExplorerError("the export could not be verified, so it is not offered for download")
        return {self.ui.download: str(result.zip_path),
                self.ui.action_status: f"Exported and verified `{c.id}` (max logit difference after reload "
                                       f"{result.max_logit_diff:.1e}). Load it with `AutoModelForCausalLM."
                                       f"from_pretrained(folder, trust_remote_code=True)`."}

    # ---- prompt ----------------------------------------------------------------------------------
    @user_errors
    def generate(self, prompt, sample, temperature, top_p, seed, max_tokens, session):
        s = session or Session()
        if prompt and len(prompt) > MAX_PROMPT_CHARS:  # refuse before tokenizing megabytes
            raise ExplorerError(f"the prompt has {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are "
                                "accepted (and it must fit the model's context in tokens)")
        if s.run and (s.compare or s.picked):
            key, lm = self._model_for_run(s)
        else:
            lm, key = self.ws.loaded(s.model_key), s.model_key
        ids = (s.compare or ([s.picked] if s.picked else []))[:2]
        models = {"Original": lm.model}
        names = {"Original": self.ui.out_original}
        for slot, cid in zip(("Pick A", "Pick B"), ids):
            c = self._candidate(s, cid)
            models[f"{slot}: {cid}"] = lm.model if c.origin == "dense" else self._subnet_model(s, c, key, lm)
            names[f"{slot}: {cid}"] = self.ui.out_a if slot == "Pick A" else self.ui.out_b
        settings = DecodeSettings(max_new_tokens=int(max_tokens), do_sample=bool(sample),
                                  temperature=float(temperature), top_p=float(top_p), seed=int(seed or 0))
        max_ctx = getattr(lm.model.config, "max_position_embeddings", 2048)
        last = 0.0
        for streams in side_by_side(models, lm.tokenizer, prompt, settings, max_ctx):
            if time.perf_counter() - last < 0.2 and not all(st.done for st in streams.values()):
                continue
            last = time.perf_counter()
            yield {names[n]: gr.update(value=st.text, label=f"{n} · {st.tokens} tokens · {st.tokens_per_s:.1f} tok/s"
                                       + (" · done" if st.done else ""))
                   for n, st in streams.items()}


def uploads_run_name(spec: str) -> str:
    """One uploads run per base model: readable slug plus a hash of the spec (two folders may share a name)."""
    import hashlib

    return f"uploads-{slug(spec)}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}"


def subnet_file_limit(shape: ModelShape) -> int:
    """Largest subnet JSON accepted for a model: every index of every layer written out, 16 bytes each,
    plus slack. Anything larger cannot be a subnet of this model, and is refused before it is read."""
    per_layer = shape.num_kv_heads * shape.n_pairs + shape.intermediate_size
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
        raise SubnetError(f"{name} is not a subnet description: {e}") from None
    except (RecursionError, ValueError, TypeError, OverflowError, AttributeError) as e:
        raise SubnetError(f"{name} is not a subnet description ({type(e).__name__})") from None
    try:
        return subnet.validate(shape)
    except SubnetError as e:
        raise SubnetError(f"{name} does not fit the loaded model ({shape.num_layers} layers, {shape.num_kv_heads} "
                          f"KV groups of {shape.n_pairs} rotary pairs, MLP {shape.intermediate_size}): {e}") from None


def tab_id(request: gr.Request | None) -> str:
    """One id per browser tab (Gradio's session hash; one per gradio_client Client): the key of the tab's
    heavy job, which its Stop button cancels."""
    return (request.session_hash if request is not None else None) or "local"


def switch_run(s: Session, name: str) -> Session:
    """Show run `name` in this tab: the pick is cleared, and so are compared ids when the run changes,
    because they name candidates of the old run (whose base model may even differ).

    In place, like every handler's change to the tab's Session: Gradio hands each handler the tab's one
    stored object and stores whatever it returns, so handlers that overlap (a Load clicked while the page's
    first run is opening, a pick during a search) must all return that same object, or the last to finish
    would silently undo the others' changes.
    """
    if name != s.run:
        s.compare = []
    s.run, s.picked = name, None
    return s


def parse_targets(text: str) -> tuple[float, ...]:
    """'0.9, 0.8, 70%' -> (0.9, 0.8, 0.7); the engine checks what the space can reach."""
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


def _with_metrics(c, extra: dict):
    if not extra:
        return c
    return replace(c, metrics={**c.metrics, **{k: v for k, v in extra.items() if k != "ppl_before"},
                               **({"heldout_ppl": extra["ppl_before"]} if "ppl_before" in extra
                                  and "heldout_ppl" not in c.metrics else {})})


def front_ids(run) -> set[str]:
    fronts = run.fronts()
    if isinstance(fronts, dict):
        return {i for ids in fronts.values() for i in (ids if not isinstance(ids, dict) else ids.get("ids", []))}
    return set(fronts)


def run_shape(run) -> ModelShape:
    return run.shape


def build_candidate_model(lm, c):
    """The physically sliced model of a candidate (baselines that add biases rebuild them)."""
    try:
        from ..baselines import candidate_model
    except ImportError:
        return slice_model(lm.model, c.subnet, lm.shape)
    return candidate_model(lm, c)


def slug(spec: str) -> str:
    import re

    base = "smollm2" if spec in ("default", "") else spec.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base)[:40] or "model"
