"""Event wiring: each handler maps widgets to one workbench call and returns a dict keyed by
component. No engine work happens here.

Errors the user can fix arrive as `gr.Error` with the engine's message; anything else is
logged with its traceback and shown as one line.
"""
from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import replace
from pathlib import Path

import gradio as gr

from ..app import plots
from ..app.inputs import parse_limit
from ..app.runfolders import model_key, slug
from ..app.workbench import Workbench, pick_metrics
from ..errors import Cancelled, ExplorerError
from ..events import (
    CandidateEvaluated,
    FrontChanged,
    Progress,
    SearchCancelled,
    SearchFailed,
    SearchFinished,
    SearchStarted,
    StageProgress,
)
from ..model.generation import DecodeSettings
from ..pick.evaluation import parse_tasks
from . import views
from .layout import UI
from .session import Session

log = logging.getLogger("explorer.ui")


def user_errors(fn):
    """Report failure as one message in one place: a handler that fails changes nothing but the page's
    message (no error badge on every output, no half-updated tab); a handler that succeeds clears it.
    Errors the user can fix show the engine's message; anything else is logged with its traceback and
    shown as one line."""

    def message(self, e: Exception) -> dict:
        if isinstance(e, ExplorerError):
            log.info("user error in %s: %s", fn.__name__, e)
            text = str(e)
        else:
            log.exception("unexpected error in %s", fn.__name__)
            text = f"Something went wrong ({type(e).__name__}: {str(e)[:200]}). The log has the details."
        return {self.ui.message: f"⚠️ {text}"}

    def cleared(self, out):
        return {self.ui.message: "", **out} if isinstance(out, dict) else out

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(self, *a, **k):
            first = True
            try:
                for out in fn(self, *a, **k):
                    yield cleared(self, out) if first else out
                    first = False
            except Exception as e:  # noqa: BLE001
                yield message(self, e)
        return gen

    @functools.wraps(fn)
    def plain(self, *a, **k):
        try:
            return cleared(self, fn(self, *a, **k))
        except Exception as e:  # noqa: BLE001
            return message(self, e)
    return plain


def tab_id(request: gr.Request | None) -> str:
    """One id per browser tab (Gradio's session hash; one per gradio_client Client): the key of the tab's
    heavy job, which its Stop button cancels."""
    return (request.session_hash if request is not None else None) or "local"


def number(text, kind, what: str):
    """A number typed into a field: one clear line when it is not one."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ExplorerError(f"{what} must be a number, not {text!r}") from None
    if kind is int:
        if not value.is_integer():
            raise ExplorerError(f"{what} must be a whole number, not {text!r}")
        return int(value)
    return value


def progress_sink(progress):
    """An engine event sink that moves a Gradio progress bar."""

    def on_event(ev):
        if isinstance(ev, Progress) and ev.total:
            progress((ev.done, ev.total), desc=f"{ev.stage} {ev.message}".strip())

    return on_event


class Handlers:
    def __init__(self, ui: UI, wb: Workbench):
        self.ui, self.wb = ui, wb

    # ---- helpers ------------------------------------------------------------------------
    def _run_name(self, s: Session) -> str:
        if not s.run:
            raise ExplorerError("open a run or start a search first")
        return s.run

    def _picked(self, s: Session):
        """The tab's pick (a workbench Pick: the candidate and what rebuilds its model)."""
        if not s.picked:
            raise ExplorerError("pick a subnet first (click a point on the plot)")
        return self.wb.pick(self._run_name(s), s.picked)

    def _key_for_run(self, s: Session, progress=None) -> tuple:
        key, _ = self.wb.model_for_run(self._run_name(s), s.model_key, progress)
        s.model_key = key
        return key

    def _figure(self, s: Session, x: str, y: str, run=None):
        run = run or self.wb.open(self._run_name(s))
        cands = [views.with_metrics(c, s.extra(c.id)) for c in run.candidates()]
        return plots.pareto_figure(cands, x, y, picked=[s.picked] if s.picked else [], compared=s.compare,
                                   title=s.run, latency=run.latency_model())

    def _compare_table(self, s: Session):
        """The compare table of the current run (compared ids are always of this run: see switch_run)."""
        if not s.compare:
            return views.compare_frame([])
        by_id = {c.id: c for c in self.wb.open(self._run_name(s)).candidates()}
        return views.compare_frame([views.compare_row(by_id[i], s.extra(i)) for i in s.compare if i in by_id])

    def _card(self, s: Session, c, shape) -> dict:
        return {self.ui.card: views.card_markdown(c, shape, s.extra(c.id)),
                self.ui.layers: plots.layer_figure(c.subnet.summary(shape), shape)}

    def _card_if_shown(self, s: Session, run_name: str, c, shape) -> dict:
        """The refreshed card and compare table, when the tab still shows this pick."""
        if not s.shows(run_name, c.id):
            return {}
        return {self.ui.card: views.card_markdown(c, shape, s.extra(c.id)), self.ui.compare: self._compare_table(s)}

    def _cancelled(self, what: str, cid: str, kept: str) -> dict:
        gr.Info(f"{what} of {cid} cancelled.")
        return {self.ui.action_status: f"**{what} of `{cid}` cancelled** — nothing of it was kept; {kept}."}

    # ---- model -----------------------------------------------------------------------------
    @user_errors
    def load(self, spec, dtype, device, session, progress=gr.Progress()):
        s = session or Session()
        key = model_key(spec, dtype, device)
        progress(0.05, desc=f"loading {key[0]}")
        lm, dense = self.wb.load(key, progress=lambda msg: progress(0.3, desc=msg))
        s.model_key = key
        return {self.ui.model_info: views.model_markdown(lm.summary(), dense), self.ui.session: s}

    # ---- search -------------------------------------------------------------------------------
    @user_errors
    def search(self, targets, preset, population, generations, minutes, fitness_windows, fitness_mode, space, seed,
               run_name, baselines, x, y, session, request: gr.Request):
        s = session or Session()
        overrides: dict = {}  # what the user set: a blank field leaves the preset's value
        for name, text, kind in (("population", population, int), ("generations", generations, int),
                                 ("fitness_windows", fitness_windows, int), ("minutes", minutes, float)):
            if str(text or "").strip():
                overrides[name] = number(text, kind, name.replace("_", " "))
        if fitness_mode:
            overrides["fitness_mode"] = fitness_mode
        if space:
            overrides["space"] = space
        if not baselines:
            overrides["baselines"] = ()
        overrides["seed"] = number(seed if seed not in (None, "") else 0, int, "seed")
        settings = self.wb.search_settings(preset, targets, overrides)
        key = s.model_key
        name = (run_name or "").strip() or f"{slug(key[0] if key else 'model')}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        events = self.wb.search(tab_id(request), key, settings, name)  # a refused search changes nothing
        status = views.SearchStatus()
        cands, last = {}, 0.0
        for ev in events:
            status.update(ev)
            if isinstance(ev, SearchStarted):  # the job is ours: now the tab may change
                s.switch_run(name)
                yield {self.ui.status: status.markdown(), self.ui.session: s, self.ui.compare: self._compare_table(s),
                       self.ui.card: views.NO_PICK, self.ui.layers: None, self.ui.pick_box: ""}
                continue
            if isinstance(ev, CandidateEvaluated):
                cands[ev.candidate.id] = ev.candidate
            elif isinstance(ev, StageProgress):
                yield {self.ui.status: status.markdown()}
                continue
            terminal = isinstance(ev, (SearchFinished, SearchCancelled, SearchFailed))
            if terminal or isinstance(ev, FrontChanged) or time.perf_counter() - last > self.wb.settings.stream_interval_s:
                last = time.perf_counter()
                latency = self.wb.open(name).latency_model()
                fig = plots.pareto_figure(cands.values(), x, y, title=name, latency=latency)
                yield {self.ui.status: status.markdown(), self.ui.plot: fig}
        yield {self.ui.status: status.markdown(), self.ui.plot: self._figure(s, x, y),
               self.ui.runs: gr.update(choices=self.wb.runs(), value=name), self.ui.session: s}

    @user_errors
    def stop(self, session, request: gr.Request):
        """Stop whichever heavy job this tab runs (search, reformation, export, evaluation)."""
        kind = self.wb.stop(tab_id(request))
        if kind is None:
            gr.Warning("Nothing is running in this tab.")
            return {self.ui.action_status: "Nothing is running in this tab."}
        if kind == "search":
            return {self.ui.status: "**Stopping…** the current candidate finishes, everything found is kept."}
        gr.Info(f"Stopping the {kind}…")
        return {self.ui.action_status: f"**Stopping the {kind}…** nothing it has half done will be kept."}

    # ---- runs and plot --------------------------------------------------------------------------
    @user_errors
    def start_page(self, x, y, session):
        """On page load: list the saved runs and open the shipped demo, so the plot is never empty."""
        s = session or Session()
        runs = self.wb.runs()
        first = self.wb.default_run()
        out = {self.ui.runs: gr.update(choices=runs, value=first), self.ui.session: s}
        if first and not s.run:
            out.update(self.open(first, x, y, s))
        return out

    @user_errors
    def open(self, name, x, y, session):
        if not name:
            raise ExplorerError("choose a saved run first")
        run = self.wb.open(name)  # validates the name
        s = (session or Session()).switch_run(name)  # the name is valid: now the tab may change
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
        c = self.wb.pick(self._run_name(s), cid).candidate
        s.picked = c.id
        shape = self.wb.open(s.run).shape
        return {**self._card(s, c, shape), self.ui.plot: self._figure(s, x, y), self.ui.session: s,
                self.ui.pick_box: c.id}

    @user_errors
    def open_subnet(self, file, x, y, session, request: gr.Request, progress=gr.Progress()):
        """Open a subnet file as this tab's pick, for the loaded model: the workbench reads it as data,
        checks it against the model before anything changes, and rebuilds exactly the model it
        describes (its compensation, and its reformation when it records one), whose held-out
        perplexity is then measured."""
        s = session or Session()
        self.wb.loaded(s.model_key)
        if not file:
            raise ExplorerError("choose a subnet file (an export's subnet.json, or Subnet.to_json)")
        path = Path(file if isinstance(file, str) else getattr(file, "path", None) or file["path"])
        p, r = self.wb.open_subnet_file(s.model_key, path)
        c = p.candidate
        s.switch_run(p.run)  # the file was accepted and stored: now the tab may change
        s.picked = c.id
        k = s.note_key(c.id)
        note = ""
        try:
            res = self.wb.evaluate(tab_id(request), s.model_key, p, replace(self.wb.settings.eval, tasks=("ppl",)), r,
                                   on_event=progress_sink(progress))
            s.evaluated[k] = {**s.evaluated.get(k, {}), **pick_metrics(res, r is not None)}
            if r is not None:
                r = replace(r, ppl_after=res.ppl)
        except Cancelled:
            note = " (its held-out perplexity was not measured: stopped)"
        if r is not None:
            s.reformed[k] = r.to_dict()
        shape = self.wb.loaded(s.model_key).shape
        kind = "bias-compensated" if c.compensated else "without bias compensation"
        return {**self._card(s, c, shape), self.ui.plot: self._figure(s, x, y), self.ui.pick_box: c.id,
                self.ui.session: s, self.ui.runs: gr.update(choices=self.wb.runs(), value=p.run),
                self.ui.compare: self._compare_table(s),
                self.ui.status: f"**Opened `{path.name}`** as `{c.id}` ({kind}{', reformed' if r else ''}) in run "
                                f"{p.run} (subnets opened from files for {s.model_key[0]}){note}"}

    # ---- reform, evaluate, compare, export ------------------------------------------------------
    @user_errors
    def reform(self, session, request: gr.Request, progress=gr.Progress()):
        s = session or Session()
        p = self._picked(s)
        c, run_name = p.candidate, s.run  # the tab may open another run while this one works
        key = self._key_for_run(s, progress=lambda m: progress(0.05, desc=m))
        try:
            r = self.wb.reform(tab_id(request), key, p, on_event=progress_sink(progress))
        except Cancelled:
            return self._cancelled("Reformation", c.id, "the subnet, its card and the run are as they were")
        s.reformed[s.note_key(c.id, run_name)] = r.to_dict()
        shape = self.wb.loaded(key).shape
        return {**self._card_if_shown(s, run_name, c, shape), self.ui.session: s,
                self.ui.action_status: f"Reformed `{c.id}`: held-out perplexity {r.ppl_before:.2f} → "
                                       f"**{r.ppl_after:.2f}**"}

    @user_errors
    def measure(self, session, request: gr.Request, progress=gr.Progress()):
        """Time the pick's decode for real, paired with the dense model (the reformed model when the tab
        reformed it); the card then shows measured beside predicted, and the prediction error."""
        s = session or Session()
        p = self._picked(s)
        c, run_name = p.candidate, s.run
        key = self._key_for_run(s, progress=lambda m: progress(0.05, desc=m))
        try:
            m = self.wb.measure(tab_id(request), key, [(p, s.reformation(c.id, run_name))],
                                on_event=progress_sink(progress))[c.id]
        except Cancelled:
            return self._cancelled("Latency measurement", c.id, "its card and the run are as they were")
        k = s.note_key(c.id, run_name)
        s.evaluated[k] = {**s.evaluated.get(k, {}), **m.metrics()}
        shape = self.wb.loaded(key).shape
        note = "" if m.reliable else " — unreliable: the spread is wide (the machine is busy)"
        return {**self._card_if_shown(s, run_name, c, shape), self.ui.session: s,
                self.ui.action_status: f"Measured `{c.id}`: {m.ms:.1f} ms/token, **{m.speedup:.2f}x** the dense model "
                                       f"(spread {100 * m.spread:.0f}% over {m.rounds} paired rounds){note}"}

    @user_errors
    def evaluate(self, tasks, limit, session, request: gr.Request, progress=gr.Progress()):
        """Held-out perplexity and zero-shot tasks of the pick as the tab has it: reformed when the tab
        reformed it (the same model its export would hold)."""
        s = session or Session()
        p = self._picked(s)
        c, run_name = p.candidate, s.run
        if not tasks:
            raise ExplorerError("choose at least one task")
        settings = replace(self.wb.settings.eval, tasks=parse_tasks(list(tasks)), limit=parse_limit(limit))
        r = s.reformation(c.id, run_name)
        key = self._key_for_run(s, progress=lambda m: progress(0.05, desc=m))
        try:
            res = self.wb.evaluate(tab_id(request), key, p, settings, r, on_event=progress_sink(progress))
        except Cancelled:
            return self._cancelled("Evaluation", c.id, "its card and the run are as they were")
        extra = pick_metrics(res, r is not None)
        k = s.note_key(c.id, run_name)
        s.evaluated[k] = {**s.evaluated.get(k, {}), **extra}
        shape = self.wb.loaded(key).shape
        what = f"`{c.id}`" + (" (reformed)" if r else "")
        return {**self._card_if_shown(s, run_name, c, shape), self.ui.session: s,
                self.ui.action_status: f"Evaluated {what}: " + ", ".join(
                    f"{k.replace('reformed_', '').replace('acc:', '')} {v:.3g}" for k, v in extra.items())}

    @user_errors
    def add_compare(self, x, y, session):
        s = session or Session()
        c = self._picked(s).candidate
        if c.id not in s.compare:
            s.compare = (s.compare + [c.id])[-4:]
        return {self.ui.compare: self._compare_table(s), self.ui.session: s, self.ui.plot: self._figure(s, x, y),
                self.ui.action_status: f"`{c.id}` added to compare; the first two picks answer prompts."}

    @user_errors
    def export(self, export_format, session, request: gr.Request, progress=gr.Progress()):
        s = session or Session()
        p = self._picked(s)
        c, run_name = p.candidate, s.run
        r = s.reformation(c.id, run_name)  # as picked, whatever comes next
        key = self._key_for_run(s, progress=lambda m: progress(0.05, desc=m))
        gguf = export_format == "gguf"
        out = self.wb.export_dir(f"{run_name}-{c.id}{'-reformed' if r else ''}{'-gguf' if gguf else ''}")
        try:
            result = self.wb.export(tab_id(request), key, p, out, r, on_event=progress_sink(progress),
                                    extra=s.extra(c.id), fmt="gguf" if gguf else "hf")
        except Cancelled:
            return self._cancelled("Export", c.id, "no new model folder or zip was written")
        if not result.verified or not self.wb.is_ours(result.zip_path):
            raise ExplorerError("the export could not be verified, so it is not offered for download")
        if gguf:
            return {self.ui.download: str(result.zip_path),
                    self.ui.action_status: f"Exported `{c.id}`{' (reformed)' if r else ''} as GGUF and ran it in llama.cpp: "
                                           f"max logit difference {result.max_logit_diff:.1e}, greedy tokens as ours (up to near-ties). "
                                           "Run it with `llama-cli -m model.gguf` or `ollama create subnet -f Modelfile`."}
        return {self.ui.download: str(result.zip_path),
                self.ui.action_status: f"Exported and verified `{c.id}`{' (reformed)' if r else ''} against the base "
                                       f"model (max logit difference after reload {result.max_logit_diff:.1e}). Load it "
                                       "with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`."}

    # ---- prompt ----------------------------------------------------------------------------------
    @user_errors
    def generate(self, prompt, sample, temperature, top_p, seed, max_tokens, session):
        s = session or Session()
        key = self._key_for_run(s) if s.run and (s.compare or s.picked) else s.model_key
        lm = self.wb.loaded(key)
        ids = (s.compare or ([s.picked] if s.picked else []))[:2]
        models = {"Original": lm.model}
        boxes = {"Original": self.ui.out_original}
        for slot, cid in zip(("Pick A", "Pick B"), ids):
            r = s.reformation(cid)
            label = f"{slot}: {cid}" + (" · reformed" if r else "")
            models[label] = self.wb.model_of(key, self.wb.pick(s.run, cid), r)
            boxes[label] = self.ui.out_a if slot == "Pick A" else self.ui.out_b
        decode = DecodeSettings(max_new_tokens=int(max_tokens), do_sample=bool(sample), temperature=float(temperature),
                                top_p=float(top_p), seed=int(seed or 0))
        last, streams = 0.0, {}
        for streams in self.wb.generate(key, models, prompt, decode):
            if time.perf_counter() - last < 0.2 and not all(st.done for st in streams.values()):
                continue
            last = time.perf_counter()
            yield {boxes[n]: gr.update(value=st.text, label=stream_label(n, st)) for n, st in streams.items()}
        # the tab keeps what it asked and what each model answered: the run report shows it
        s.prompts.append({"run": s.run, "prompt": prompt, "answers": {n: st.text for n, st in streams.items()},
                          "settings": {"max_new_tokens": decode.max_new_tokens, "sample": decode.do_sample,
                                       "seed": decode.seed}})
        yield {self.ui.session: s}

    @user_errors
    def report(self, session, request: gr.Request):
        """The run's report as one self-contained HTML file (fronts, the picks worked on, the prompts tried)."""
        s = session or Session()
        path = self.wb.report(self._run_name(s), [p for p in s.prompts if p.get("run") == s.run])
        return {self.ui.report_file: str(path),
                self.ui.action_status: f"Report of run {s.run} written: open it offline, or put it in your slides."}


def stream_label(name: str, st) -> str:
    """A box's label while its model generates: tokens, speed, and why it ended."""
    label = f"{name} · {st.tokens} tokens · {st.tokens_per_s:.1f} tok/s"
    if st.done and st.tokens == 0:
        return label + " · done: the model's first token was end-of-text"
    return label + (" · done" if st.done else "")


__all__ = ["Handlers", "user_errors", "tab_id", "stream_label"]
