"""Event wiring: each handler maps widgets to one workbench call and returns a dict keyed by
component. No engine work happens here.

Every action answers where it was asked: its results and its failures go to the one status line
of its own section (Load's under Load, a search's beside Start, Reform's under Reform, an export's
under Export). Errors the user can fix show the engine's message; anything else is logged with
its traceback and shown as one line.
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
from ..app.inputs import parse_limit, parse_override
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
from ..model.generation import DecodeSettings, common_length
from ..search.runs import target_words
from ..pick.evaluation import parse_tasks
from . import views
from .layout import UI
from .session import Session

log = logging.getLogger("explorer.ui")
# where each kind of heavy job answers (Stop included)
JOB_STATUS = {"search": "status", "preparation": "status", "reformation": "action_status",
              "evaluation": "action_status", "latency measurement": "action_status", "export": "export_status"}


def user_errors(where: str, reset: dict | None = None):
    """Report failure as one message in the status line `where` (the section the user acted in): a
    handler that fails changes nothing else (no error badge on every output, no half-updated tab),
    apart from `reset` (e.g. Start enabled again). A handler that succeeds without writing that line
    clears an old message from it."""

    def decorate(fn):
        def message(self, e: Exception) -> dict:
            if isinstance(e, ExplorerError):
                log.info("user error in %s: %s", fn.__name__, e)
                text = str(e)
            else:
                log.exception("unexpected error in %s", fn.__name__)
                text = f"Something went wrong ({type(e).__name__}: {str(e)[:200]}). The log has the details."
            out = {getattr(self.ui, where): f"⚠️ {text}"}
            out.update({getattr(self.ui, k): v for k, v in (reset or {}).items()})
            return out

        def cleared(self, out):
            target = getattr(self.ui, where)
            return {target: "", **out} if isinstance(out, dict) and target not in out else out

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
    return decorate


def tab_id(request: gr.Request | None) -> str:
    """One id per browser tab (Gradio's session hash; one per gradio_client Client): the key of the tab's
    heavy job, which its Stop button cancels."""
    return (request.session_hash if request is not None else None) or "local"


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
        run, cid = s.pick_at
        if not cid or not run:
            raise ExplorerError("pick a subnet first (click a point on the plot)")
        return self.wb.pick(run, cid)

    def _key_for_run(self, s: Session, run: str | None = None, progress=None) -> tuple:
        key, _ = self.wb.model_for_run(run or self._run_name(s), s.model_key, progress)
        s.model_key = key
        return key

    def _dense_heldout(self, s: Session, run) -> dict:
        """The tab's own measurement of the dense model's held-out perplexity, when the run is of the
        loaded model: the picks it evaluates are measured on the same windows."""
        key = s.model_key
        if key is None or key[0] != run.settings.get("model", "default"):
            return {}
        dense = self.wb.dense_figures(key)
        return {"heldout_ppl": dense["heldout_ppl"]} if dense else {}

    def _candidates(self, s: Session, run=None) -> list:
        """What the plot shows: the run's candidates and the subnet files opened onto it, with what this
        tab measured merged in."""
        run = run or self.wb.open(self._run_name(s))
        dense = self._dense_heldout(s, run)
        out = [views.with_metrics(c, {**(dense if c.origin == "dense" else {}), **s.extra(c.id)})
               for c in run.candidates()]
        return out + [views.with_metrics(c, s.extra(c.id, other)) for other, c in self._still_there(s.opened)]

    def _still_there(self, pairs):
        """(run, candidate) for each (run, id) the tab holds whose run still has it (a deleted run is skipped)."""
        for run, cid in pairs:
            try:
                yield run, self.wb.open(run).pick(cid)
            except ExplorerError:
                continue

    def _figure(self, s: Session, x: str, y: str, run=None):
        run = run or self.wb.open(self._run_name(s))
        return plots.pareto_figure(self._candidates(s, run), x, y, picked=[s.picked] if s.picked else [],
                                   compared=[cid for _, cid in s.compare], title=s.run, latency=run.latency_model())

    def _compare_table(self, s: Session):
        rows = [views.compare_row(c, s.extra(c.id, run)) for run, c in self._still_there(s.compare)]
        return views.compare_frame(rows)

    def _card(self, s: Session, c, shape, run: str | None = None) -> dict:
        return {self.ui.card: views.card_markdown(c, shape, s.extra(c.id, run)),
                self.ui.layers: plots.layer_figure(c.subnet.summary(shape), shape)}

    def _card_if_shown(self, s: Session, run_name: str, c, shape) -> dict:
        """The refreshed card and compare table, when the tab still shows this pick."""
        if not s.shows(run_name, c.id):
            return {}
        return {self.ui.card: views.card_markdown(c, shape, s.extra(c.id, run_name)),
                self.ui.compare: self._compare_table(s)}

    def _size_range(self, s: Session, run_name: str) -> dict:
        """The size slider's lower end at the smallest size the run's library reaches, when the tab has the
        run's model loaded (a model is never loaded for this alone) and the run has a library; else the
        slider stays and a size out of reach is refused with the engine's message. Never fails: opening a
        run or finishing a search must not fail over the slider's range."""
        key, cleared = s.model_key, {self.ui.size_readout: ""}  # the readout was the previous run's
        try:
            if key is None or key[0] != model_key(self.wb.open(run_name).settings.get("model", "default"))[0]:
                return cleared
            lo, _ = self.wb.run_library(run_name, prefer=key)[1].bounds()
        except ExplorerError:  # no library (or another model's run): the slider explains itself when dragged
            return cleared
        except Exception:  # noqa: BLE001
            log.warning("no size range for run %s", run_name, exc_info=True)
            return cleared
        return {**cleared, self.ui.size: gr.update(minimum=lo)}

    def _cancelled(self, what: str, cid: str, kept: str, where: str = "action_status") -> dict:
        return {getattr(self.ui, where): f"**{what} of `{cid}` stopped** — nothing of it was kept; {kept}."}

    # ---- 1 · model -------------------------------------------------------------------------
    @user_errors("model_info")
    def load(self, spec, dtype, device, session, progress=gr.Progress()):
        s = session or Session()
        key = model_key(spec, dtype, device)
        progress(0.05, desc=f"loading {key[0]}")
        lm, dense = self.wb.load(key, progress=lambda msg: progress(0.3, desc=msg))
        s.model_key = key
        return {self.ui.model_info: views.model_markdown(lm.summary(), dense), self.ui.session: s}

    # ---- 2 · search -------------------------------------------------------------------------------
    @user_errors("status", reset={"start_btn": gr.update(interactive=True)})
    def search(self, targets, share, preset, population, generations, minutes, fitness_windows, fitness_mode, space,
               seed, run_name, baselines, x, y, compensate, session, request: gr.Request):
        s = session or Session()
        overrides: dict = {}  # what the user set: a blank field leaves the preset's value
        for name, text in (("population", population), ("generations", generations),
                           ("fitness_windows", fitness_windows), ("minutes", minutes)):
            if str(text if text is not None else "").strip():  # a field is the VALUE of the CLI's --set KEY=VALUE
                overrides.update([parse_override(f"{name}={str(text).strip()}")])
        if fitness_mode:
            overrides["fitness_mode"] = fitness_mode
        if space:
            overrides["space"] = space
        if share:
            overrides["share"] = share
        if not baselines:
            overrides["baselines"] = ()
        if compensate is not None:
            overrides["compensate"] = bool(compensate)
        overrides.update([parse_override(f"seed={seed if seed not in (None, '') else 0}")])
        settings = self.wb.search_settings(preset, targets, overrides)
        key = s.model_key
        name = (run_name or "").strip() or f"{slug(key[0] if key else 'model')}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        events = self.wb.search(tab_id(request), key, settings, name)  # a refused search changes nothing
        status = views.SearchStatus()
        cands, last = {}, 0.0
        dense = self.wb.dense_figures(key) or {}
        for ev in events:
            status.update(ev)
            if isinstance(ev, SearchStarted):  # the job is ours: now the tab may change
                s.switch_run(name)
                yield {self.ui.status: status.markdown(), self.ui.session: s, self.ui.compare: self._compare_table(s),
                       self.ui.card: views.NO_PICK, self.ui.layers: None, self.ui.pick_box: "",
                       self.ui.start_btn: gr.update(interactive=False)}
                continue
            if isinstance(ev, CandidateEvaluated):
                c = ev.candidate
                if c.origin == "dense" and dense.get("heldout_ppl"):
                    c = views.with_metrics(c, {"heldout_ppl": dense["heldout_ppl"]})
                cands[c.id] = c
            elif isinstance(ev, StageProgress):
                yield {self.ui.status: status.markdown()}
                continue
            if isinstance(ev, (SearchFinished, SearchCancelled, SearchFailed)):
                continue  # said with the final update below, so "finished"/"stopped" means the page is settled
            if isinstance(ev, FrontChanged) or time.perf_counter() - last > self.wb.settings.stream_interval_s:
                last = time.perf_counter()
                latency = self.wb.open(name).latency_model()
                fig = plots.pareto_figure(cands.values(), x, y, title=name, latency=latency)
                yield {self.ui.status: status.markdown(), self.ui.plot: fig}
        # the last update carries the search's end: a person (or a client) who acts on "Search finished" or
        # "stopped" acts on a settled page, which no late update of this search overwrites
        yield {self.ui.status: status.markdown(), self.ui.plot: self._figure(s, x, y),
               self.ui.runs: gr.update(choices=self.wb.runs(), value=name), self.ui.session: s,
               self.ui.start_btn: gr.update(interactive=True), **self._size_range(s, name)}

    @user_errors("status")
    def stop(self, session, request: gr.Request):
        """Stop whichever heavy job this tab runs (search, reformation, evaluation, timing, export), saying
        so where that job answers."""
        kind = self.wb.stop(tab_id(request))
        if kind is None:
            return {self.ui.status: "Nothing is running in this tab."}
        where = getattr(self.ui, JOB_STATUS.get(kind, "status"))
        if kind == "search":
            return {where: "**Stopping…** the candidate being scored ends its current window; everything found "
                           "is kept."}
        return {where: f"**Stopping the {kind}…** nothing it has half done will be kept."}

    # ---- runs and the plot --------------------------------------------------------------------------
    @user_errors("status")
    def start_page(self, x, y, session):
        """On page load: list the saved runs and open the shipped demo, so the plot is never empty."""
        s = session or Session()
        runs = self.wb.runs()
        first = self.wb.default_run()
        out = {self.ui.runs: gr.update(choices=runs, value=first), self.ui.session: s}
        if first and not s.run:
            out.update(self.open(first, x, y, s))
        return out

    @user_errors("status")
    def open(self, name, x, y, session):
        if not name:
            raise ExplorerError("choose a saved run first")
        run = self.wb.open(name)  # validates the name
        s = (session or Session()).switch_run(name)  # the name is valid: now the tab may change
        n = len(run.candidates())
        st = run.settings
        info = (f"**Run {name}** · {n} candidates · model {st.get('model', '?')} · budget {st.get('preset', '?')} · "
                f"targets {', '.join(target_words(t, st.get('share', 'total')) for t in st.get('targets', []))}")
        return {self.ui.plot: self._figure(s, x, y, run), self.ui.status: info, self.ui.session: s,
                self.ui.compare: self._compare_table(s), self.ui.card: views.NO_PICK, self.ui.layers: None,
                self.ui.pick_box: "", **self._size_range(s, name)}

    @user_errors("pick_status")
    def replot(self, x, y, session):
        s = session or Session()
        if not s.run:
            return {self.ui.plot: gr.update()}
        return {self.ui.plot: self._figure(s, x, y)}

    @user_errors("pick_status")
    def pick(self, cid, x, y, session):
        s = session or Session()
        cid = (cid or "").strip()
        if not cid:
            raise ExplorerError("give a candidate id (or click a point)")
        run = s.run
        opened = {c: r for r, c in s.opened}
        if cid in opened:  # a subnet file opened onto this plot
            run = opened[cid]
        c = self.wb.pick(self._run_name(s) if run is None else run, cid).candidate
        s.choose(run, c.id)
        shape = self.wb.open(run).shape
        return {**self._card(s, c, shape, run), self.ui.plot: self._figure(s, x, y), self.ui.session: s,
                self.ui.pick_box: c.id}

    @user_errors("pick_status")
    def size_preview(self, fraction, said, session):
        """While the size slider is dragged: the library's subnet at that size, solved in milliseconds and
        shown in the card and the layer chart with what the library predicts. Nothing is evaluated or
        stored (that waits for the release), and the tab's pick stays what it was. The pick status (`said`)
        loses only an old warning: what a pick said stays, even when a last preview lands after it.

        The value comes unchecked (a number being typed in the slider's box passes through "0." and
        blanks): such a value waits for the next keystroke instead of raising an error per key."""
        try:
            f = float(fraction)
        except (TypeError, ValueError):
            f = 0.0
        if not 0 < f <= 1:
            return {self.ui.pick_status: gr.update()}
        s = session or Session()
        name = self._run_name(s)
        sol = self.wb.size_preview(name, f, prefer=s.model_key)
        run = self.wb.open(name)
        shape, st = run.shape, run.settings
        return {self.ui.card: views.size_markdown(sol, shape, st.get("share", "total"), bool(st.get("compensate"))),
                self.ui.size_readout: views.size_line(sol, shape, bool(st.get("compensate"))),
                self.ui.layers: plots.layer_figure(sol.subnet.summary(shape), shape),
                self.ui.pick_status: "" if str(said or "").startswith("⚠️") else gr.update()}

    @user_errors("pick_status")
    def pick_size(self, fraction, x, y, session, request: gr.Request):
        """On the size slider's release: the library's subnet at that size, its fitness measured under the
        tab's job and stored in the run (read back when it already is), then picked like a clicked point."""
        s = session or Session()
        name = self._run_name(s)
        c = self.wb.pick(name, f"library@{float(fraction):.3f}", tab=tab_id(request), prefer=s.model_key).candidate
        s.choose(name, c.id)
        shape = self.wb.open(name).shape
        fitness = c.metrics.get("fitness_ppl")
        return {**self._card(s, c, shape, name), self.ui.plot: self._figure(s, x, y), self.ui.session: s,
                self.ui.pick_box: c.id, self.ui.size_readout: views.size_picked_line(c),
                self.ui.pick_status: f"**Picked `{c.id}`**, the library's best subnet at {c.target_words}"
                                     + ("" if fitness is None else f": fitness ppl {fitness:.4g} (measured)")
                                     + ", now a point of the run."}

    @user_errors("pick_status")
    def open_subnet(self, file, x, y, session, request: gr.Request, progress=gr.Progress()):
        """Open a subnet file onto the current plot as this tab's pick, for the loaded model: the workbench
        reads it as data, checks it against the model before anything changes, and rebuilds exactly the
        model it describes (its compensation, and its reformation when it records one), whose held-out
        perplexity is then measured. The plot's run stays."""
        s = session or Session()
        self.wb.loaded(s.model_key)
        if not file:
            raise ExplorerError("choose a subnet file (an export's subnet.json, or Subnet.to_json)")
        path = Path(file if isinstance(file, str) else getattr(file, "path", None) or file["path"])
        p, r = self.wb.open_subnet_file(s.model_key, path)
        c = p.candidate
        if not s.run:
            s.switch_run(p.run)
        s.open_file(p.run, c.id)  # the file was accepted and stored: now the tab may change
        k = s.note_key(c.id, p.run)
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
        return {**self._card(s, c, shape, p.run), self.ui.plot: self._figure(s, x, y), self.ui.pick_box: c.id,
                self.ui.session: s, self.ui.compare: self._compare_table(s),
                self.ui.pick_status: f"**Opened `{path.name}`** as `{c.id}` ({kind}{', reformed' if r else ''}), "
                                     f"drawn on this plot{note}"}

    # ---- 3 · reform, measure, evaluate, compare ------------------------------------------------------
    @user_errors("action_status")
    def reform(self, intercept, session, request: gr.Request, progress=gr.Progress()):
        s = session or Session()
        p = self._picked(s)
        c, run_name = p.candidate, p.run  # the tab may open another run while this one works
        key = self._key_for_run(s, run_name, progress=lambda m: progress(0.05, desc=m))
        try:
            settings = replace(self.wb.settings.reform, intercept=intercept is not False)
            r = self.wb.reform(tab_id(request), key, p, settings, on_event=progress_sink(progress))
        except Cancelled:
            return self._cancelled("Reformation", c.id, "the subnet, its card and the run are as they were")
        s.reformed[s.note_key(c.id, run_name)] = r.to_dict()
        shape = self.wb.loaded(key).shape
        return {**self._card_if_shown(s, run_name, c, shape), self.ui.session: s,
                self.ui.action_status: f"Reformed `{c.id}`: held-out perplexity {r.ppl_before:.2f} → "
                                       f"**{r.ppl_after:.2f}**. Measure, Evaluate, Generate and Export now use the "
                                       "reformed model."}

    @user_errors("action_status")
    def measure(self, session, request: gr.Request, progress=gr.Progress()):
        """Time the pick's decode for real, paired with the dense model (the reformed model when the tab
        reformed it); the card then shows measured beside predicted, and the prediction error."""
        s = session or Session()
        p = self._picked(s)
        c, run_name = p.candidate, p.run
        key = self._key_for_run(s, run_name, progress=lambda m: progress(0.05, desc=m))
        r = s.reformation(c.id, run_name)
        try:
            m = self.wb.measure(tab_id(request), key, [(p, r)], on_event=progress_sink(progress))[c.id]
        except Cancelled:
            return self._cancelled("Latency measurement", c.id, "its card and the run are as they were")
        k = s.note_key(c.id, run_name)
        s.evaluated[k] = {**s.evaluated.get(k, {}), **m.metrics()}
        shape = self.wb.loaded(key).shape
        note = "" if m.reliable else " — unreliable: the spread is wide (the machine is busy)"
        return {**self._card_if_shown(s, run_name, c, shape), self.ui.session: s,
                self.ui.action_status: f"Measured `{c.id}`{' (reformed)' if r else ''}: {m.ms:.1f} ms/token, "
                                       f"**{m.speedup:.2f}x** the dense model (spread {100 * m.spread:.0f}% over "
                                       f"{m.rounds} paired rounds){note}"}

    @user_errors("action_status")
    def evaluate(self, tasks, limit, x, y, session, request: gr.Request, progress=gr.Progress()):
        """Held-out perplexity and zero-shot tasks of the pick as the tab has it: reformed when the tab
        reformed it (the same model its export would hold). The point moves to what was measured."""
        s = session or Session()
        p = self._picked(s)
        c, run_name = p.candidate, p.run
        if not tasks:
            raise ExplorerError("choose at least one task")
        settings = replace(self.wb.settings.eval, tasks=parse_tasks(list(tasks)), limit=parse_limit(limit))
        r = s.reformation(c.id, run_name)
        key = self._key_for_run(s, run_name, progress=lambda m: progress(0.05, desc=m))
        try:
            res = self.wb.evaluate(tab_id(request), key, p, settings, r, on_event=progress_sink(progress))
        except Cancelled:
            return self._cancelled("Evaluation", c.id, "its card and the run are as they were")
        extra = pick_metrics(res, r is not None)
        k = s.note_key(c.id, run_name)
        s.evaluated[k] = {**s.evaluated.get(k, {}), **extra}
        shape = self.wb.loaded(key).shape
        what = f"`{c.id}`" + (" (reformed)" if r else "")
        return {**self._card_if_shown(s, run_name, c, shape), self.ui.session: s, self.ui.plot: self._figure(s, x, y),
                self.ui.action_status: f"Evaluated {what}: " + ", ".join(
                    f"{k.replace('reformed_', '').replace('acc:', '')} {v:.3g}" for k, v in extra.items())}

    @user_errors("action_status")
    def add_compare(self, x, y, session):
        s = session or Session()
        p = self._picked(s)
        c = p.candidate
        if [p.run, c.id] not in s.compare:
            s.compare = (s.compare + [[p.run, c.id]])[-4:]
        return {self.ui.compare: self._compare_table(s), self.ui.session: s, self.ui.plot: self._figure(s, x, y),
                self.ui.action_status: f"`{c.id}` added to compare; the first two compared picks answer prompts."}

    # ---- 4 · prompt ----------------------------------------------------------------------------------
    @user_errors("gen_status")
    def generate(self, prompt, sample, temperature, top_p, seed, max_tokens, session):
        s = session or Session()
        chosen = s.compare[:2] or ([list(s.pick_at)] if s.picked else [])
        key = self._key_for_run(s, chosen[0][0]) if chosen else s.model_key
        lm = self.wb.loaded(key)
        models = {"Original": lm.model}
        boxes = {"Original": self.ui.out_original}
        for slot, (run, cid) in zip(("Pick A", "Pick B"), chosen):
            r = s.reformation(cid, run)
            label = f"{slot}: {cid}" + (" · reformed" if r else "")
            models[label] = self.wb.model_of(key, self.wb.pick(run, cid), r)
            boxes[label] = self.ui.out_a if slot == "Pick A" else self.ui.out_b
        decode = DecodeSettings(max_new_tokens=int(max_tokens), do_sample=bool(sample), temperature=float(temperature),
                                top_p=float(top_p), seed=int(seed or 0))
        last, streams = 0.0, {}
        for streams in self.wb.generate(key, models, prompt, decode):
            if time.perf_counter() - last < 0.2 and not all(st.done for st in streams.values()):
                continue
            last = time.perf_counter()
            yield {boxes[n]: gr.update(value=st.text, label=stream_label(n, st, streams)) for n, st in streams.items()}
        # the tab keeps what it asked and what each model answered: the run report shows it
        s.prompts.append({"run": s.run, "prompt": prompt, "answers": {n: st.text for n, st in streams.items()},
                          "settings": {"max_new_tokens": decode.max_new_tokens, "sample": decode.do_sample,
                                       "seed": decode.seed}})
        n = common_length(streams)
        yield {self.ui.session: s, self.ui.gen_status: (
            f"Decode speed compared over the first {n} tokens every model wrote (the prompt's prefill left out), so "
            "the ratios are like for like." if n >= 2 else "Too few tokens to compare speeds fairly.")}

    # ---- 5 · export ------------------------------------------------------------------------------------
    @user_errors("export_status")
    def export(self, export_format, session, request: gr.Request, progress=gr.Progress()):
        s = session or Session()
        p = self._picked(s)
        c, run_name = p.candidate, p.run
        r = s.reformation(c.id, run_name)  # as picked, whatever comes next
        key = self._key_for_run(s, run_name, progress=lambda m: progress(0.05, desc=m))
        gguf = export_format == "gguf"
        if gguf and (why := llamacpp_missing()):
            raise ExplorerError(why)
        out = self.wb.export_dir(f"{run_name}-{c.id}{'-reformed' if r else ''}{'-gguf' if gguf else ''}")
        try:
            result = self.wb.export(tab_id(request), key, p, out, r, on_event=progress_sink(progress),
                                    extra=s.extra(c.id, run_name), fmt="gguf" if gguf else "hf")
        except Cancelled:
            return self._cancelled("Export", c.id, "no new model folder or zip was written", "export_status")
        if not result.verified or not self.wb.is_ours(result.zip_path):
            raise ExplorerError("the export could not be verified, so it is not offered for download")
        what = f"`{c.id}`{' (reformed)' if r else ''}"
        if gguf:
            return {self.ui.download: str(result.zip_path),
                    self.ui.export_status: f"Exported {what} as GGUF and ran it in llama.cpp: max logit difference "
                                           f"{result.max_logit_diff:.1e}, greedy tokens as ours (up to near-ties). Run "
                                           "it with `llama-cli -m model.gguf`, or `ollama create subnet -f Modelfile`."}
        return {self.ui.download: str(result.zip_path),
                self.ui.export_status: f"Exported and verified {what} against the base model (max logit difference "
                                       f"after reload {result.max_logit_diff:.1e}). Load it with "
                                       "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`."}

    @user_errors("export_status")
    def report(self, session, request: gr.Request):
        """The run's report as one self-contained HTML file (fronts, the picks worked on, the prompts tried)."""
        s = session or Session()
        path = self.wb.report(self._run_name(s), [p for p in s.prompts if p.get("run") == s.run])
        return {self.ui.report_file: str(path),
                self.ui.export_status: f"Report of run {s.run} written: open it offline, or put it in your slides."}


def llamacpp_missing() -> str | None:
    """Why a GGUF export cannot be checked yet (llama.cpp not built, or still building), or None."""
    import importlib.util
    import os

    if importlib.util.find_spec("llama_cpp") is not None:
        return None
    marker = Path(os.environ.get("SUBNET_EXPLORER_LLAMACPP_BUILDING", Path(".venv") / ".llamacpp-building"))
    if marker.is_file() and time.time() - marker.stat().st_mtime < 3600:
        minutes = (time.time() - marker.stat().st_mtime) / 60
        return (f"llama.cpp, which checks every GGUF export, is still being built beside the app (started "
                f"{minutes:.0f} min ago; on one core of this kind of machine it takes about 15 minutes): try again "
                "when it is done")
    return "llama.cpp, which checks every GGUF export, is not installed: run `make llamacpp` (about 10 minutes)"


def stream_label(name: str, st, streams: dict) -> str:
    """A box's label while its model generates: tokens, decode speed over the length every model reached,
    and for a pick its speed against the original's over those same tokens."""
    label = f"{name} · {st.tokens} tokens"
    n = common_length(streams)
    rate = st.decode_rate(n)
    if rate:
        label += f" · {rate:.1f} tok/s"
        base = streams.get("Original")
        ref = base.decode_rate(n) if base is not None and base is not st else None
        if ref:
            label += f" ({rate / ref:.2f}× the original)"
    if st.done and st.tokens == 0:
        return label + " · done: the model's first token was end-of-text"
    return label + (" · done" if st.done else "")


__all__ = ["Handlers", "user_errors", "tab_id", "stream_label", "llamacpp_missing", "JOB_STATUS"]
