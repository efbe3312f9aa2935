"""A search's life as a run: validate everything (nothing is created for a refused search), create
or reopen the run directory, then the search's events framed by its start and its end, which the
run's status records (running, finished, cancelled, failed). Also `prepare`: what a search reads
before its first candidate, built into the disk cache without searching.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import Cancelled, ExplorerError
from ..events import (
    CandidateEvaluated,
    SearchCancelled,
    SearchFailed,
    SearchFinished,
    SearchStarted,
    StageProgress,
    check_cancel,
)
from ..model.cores import CoreShare
from ..model.loading import LoadedModel
from ..settings import SearchSettings
from .calibration import search_calibration, search_ladders, search_library
from .distributed import Group, current_group, shared_run
from .initial import baseline_jobs
from .loop import search
from .runs import Run, RunError, create_run, open_run, target_words
from .validate import resolve

SCHEMA = 2
log = logging.getLogger(__name__)


def run_search(lm: LoadedModel, settings: SearchSettings, run_dir: str | Path,
               cancel: threading.Event | None = None, resume: bool = False, *,
               windows: tuple | None = None, group: Group | None = None) -> Iterator[Any]:
    """Validate, then return the event iterator. With `resume`, the run's stored settings win.

    `windows` = (calibration, fitness) token tensors replaces the corpus (tests on tiny models).
    Under torch.distributed every process calls this alike: process 0 owns `run_dir`, the others
    mirror it in a scratch folder (`explorer.search.distributed.shared_run`)."""
    group = group or current_group()
    return shared_run(group, Path(run_dir), resume,
                      lambda folder: _start(lm, settings, folder, cancel, resume, windows, group))


def prepare(lm: LoadedModel, settings: SearchSettings, run_dir: str | Path,
            cancel: threading.Event | None = None) -> Iterator[Any]:
    """Build what a search reads before its first candidate into the disk cache, without
    searching: the calibration pass, the baselines' subnets at every target and the level library
    (for the reformation-aware mode, the ladders). A later search on the same model and data reuses them,
    so its time budget is spent on searching (bench/quality.py gives each mode the same minutes
    this way; in the app the cache does the same after the first search). Yields StageProgress."""
    settings = resolve(lm, settings)
    run = _new_run(lm, settings, Path(run_dir))
    cal = yield from search_calibration(lm, settings, run, cancel, None)
    for target in settings.targets:
        words = target_words(target, settings.share)
        yield StageProgress("baselines", 0, len(settings.baselines), words)
        for n, job in enumerate(baseline_jobs(lm, settings, cal, target, cancel=cancel)):
            check_cancel(cancel)
            yield StageProgress("baselines", n + 1, len(settings.baselines), f"{words}: {job.origin}")
    if settings.fitness_mode == "reformed":
        yield from search_ladders(lm, settings, cal, cancel)
    elif settings.library:
        yield from search_library(lm, settings, cal, cancel)


def _start(lm, settings, run_dir: Path, cancel, resume: bool, windows, group: Group) -> Iterator[Any]:
    if resume:
        run = open_run(run_dir)
        stored = {k: v for k, v in run.settings.items() if k not in ("model", "schema")}
        settings = SearchSettings.from_dict(stored)
        if run.shape != lm.shape:
            raise RunError(f"the run was made on a different model ({run.settings.get('model')})")
    settings = resolve(lm, settings, corpus=windows is None)
    if not resume:
        run = _new_run(lm, settings, run_dir)
    return _events(lm, settings, run, cancel, resume, windows, group)


def _new_run(lm, settings: SearchSettings, run_dir: Path) -> Run:
    return create_run(run_dir, {**settings.to_dict(), "model": lm.name, "schema": SCHEMA}, lm.shape)


def _events(lm, settings, run: Run, cancel, resume, windows, group: Group) -> Iterator[Any]:
    """The search's events framed by its start and its end, which the run's status records."""
    yield _log(run, SearchStarted(str(run.path), settings.targets, settings.to_dict(), resume, len(run.candidates())))
    if resume:
        run.set_status("running")
    try:
        with CoreShare("search") as share:  # the machine's cores, shared with its other jobs
            for ev in search(lm, settings, run, cancel, windows, group):
                if isinstance(ev, SearchFinished):
                    run.set_status("finished", summary=ev.summary)
                elif isinstance(ev, SearchCancelled):
                    run.set_status("cancelled")
                share.refresh()
                for note in share.take_notes():
                    yield StageProgress("machine", 1, 1, note)
                yield _log(run, ev)
    except Cancelled as e:  # before the first candidate (calibration)
        run.set_status("cancelled")
        yield _log(run, SearchCancelled({}, str(e)))
    except ExplorerError as e:
        run.set_status("failed", error=str(e))
        yield _log(run, SearchFailed(str(e)))
    except Exception as e:  # noqa: BLE001 - reported as an event; the run keeps what it found
        log.exception("search failed")
        run.set_status("failed", error=f"{type(e).__name__}: {e}")
        yield _log(run, SearchFailed(f"{type(e).__name__}: {e}"))


def _log(run: Run, event):
    if not isinstance(event, (CandidateEvaluated, StageProgress)):
        run.log_event({"event": type(event).__name__, "time": time.time(),
                       **{f.name: getattr(event, f.name) for f in dataclasses.fields(event)}})
    return event


__all__ = ["run_search", "prepare", "SCHEMA"]
