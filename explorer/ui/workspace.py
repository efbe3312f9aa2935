"""Server-side resources the sessions share: loaded models (one explicit cache keyed by
model/dtype/device), one heavy job per model at a time, cancel tokens, runs and exports.

Per-session state is the small `Session` dataclass kept in `gr.State`; weights never are.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import ExplorerError
from ..loading import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[2]
ASSET_RUNS = ROOT / "assets" / "runs"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")


class Busy(ExplorerError):
    """Another session is running a heavy job on the same model."""


@dataclass
class Session:
    """What one browser tab has chosen; small and copyable."""

    model_key: tuple | None = None
    run: str | None = None  # run name (under the runs root or the shipped assets)
    picked: str | None = None  # candidate id shown in the card
    compare: list[str] = field(default_factory=list)  # ids added to the compare table (first two prompt)
    reformed: dict[str, dict] = field(default_factory=dict)  # id -> {"ppl_before", "ppl_after"}
    evaluated: dict[str, dict] = field(default_factory=dict)  # id -> extra metrics measured in the app

    # Measurements are keyed by run *and* id: candidate ids repeat across runs (every run has a c00000),
    # so a bare id would show one run's reformed perplexity on another run's candidate.
    def note_key(self, cid: str, run: str | None = None) -> str:
        return f"{run or self.run}/{cid}"

    def extra(self, cid: str) -> dict:
        """What this tab measured on candidate `cid` of the current run (evaluation, then reformation)."""
        k = self.note_key(cid)
        return {**self.evaluated.get(k, {}), **self.reformed.get(k, {})}

    def is_reformed(self, cid: str) -> bool:
        return self.note_key(cid) in self.reformed

    def shows(self, run: str | None, cid: str) -> bool:
        """Whether the tab still shows this pick: a job that ends after the user moved on must not
        overwrite the card of what they look at now."""
        return (self.run, self.picked) == (run, cid)


@dataclass
class Job:
    """A heavy job one tab is running: what it is (for messages) and the token Stop sets."""

    kind: str
    cancel: threading.Event = field(default_factory=threading.Event)


def model_key(spec: str, dtype: str, device: str) -> tuple:
    return (spec.strip() or "default", dtype, device)


class Workspace:
    def __init__(self, runs_root: Path, exports_root: Path, max_subnets: int = 6):
        self.runs_root = Path(runs_root)
        self.exports_root = Path(exports_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.exports_root.mkdir(parents=True, exist_ok=True)
        self._models: dict[tuple, LoadedModel] = {}
        self._model_locks: dict[tuple, threading.Lock] = {}
        self._load_lock = threading.Lock()
        self._subnets: OrderedDict[tuple, object] = OrderedDict()
        self._max_subnets = max_subnets
        self._jobs: dict[str, Job] = {}  # tab (Gradio session hash) -> the heavy job it runs
        self._guard = threading.Lock()
        self.upload_lock = threading.Lock()  # creating the per-model uploads run

    # ---- models -----------------------------------------------------------------------
    def model(self, key: tuple, progress=None) -> LoadedModel:
        with self._load_lock:
            if key not in self._models:
                self._models[key] = load_model(key[0], key[1], key[2], progress=progress)
                self._model_locks[key] = threading.Lock()
            return self._models[key]

    def loaded(self, key: tuple | None) -> LoadedModel:
        if key is None or key not in self._models:
            raise ExplorerError("load a model first (Model → Load)")
        return self._models[key]

    @contextlib.contextmanager
    def heavy(self, key: tuple, what: str):
        """One heavy job (search, reform, export, evaluation) per model at a time; others get told."""
        lock = self._model_locks[key]
        if not lock.acquire(blocking=False):
            raise Busy(f"the model is busy with another job (another tab or user); {what} can start when it ends")
        try:
            yield
        finally:
            lock.release()

    # ---- sliced / reformed subnet models, a small LRU -----------------------------------
    def subnet_model(self, key: tuple, build):
        with self._guard:
            if key in self._subnets:
                self._subnets.move_to_end(key)
                return self._subnets[key]
        model = build()
        with self._guard:
            self._subnets[key] = model
            while len(self._subnets) > self._max_subnets:
                self._subnets.popitem(last=False)
        return model

    def put_subnet_model(self, key: tuple, model) -> None:
        with self._guard:
            self._subnets[key] = model
            self._subnets.move_to_end(key)

    def has_subnet_model(self, key: tuple) -> bool:
        return key in self._subnets

    # ---- this tab's heavy job and its Stop ------------------------------------------------------
    @contextlib.contextmanager
    def job(self, tab: str, key: tuple, kind: str, what: str | None = None) -> Iterator[threading.Event]:
        """Run one heavy job for a tab: the model's lock (another tab gets Busy) and a cancel token that
        this tab's Stop reaches by the tab's id alone. Stop cannot go through the tab's `gr.State`,
        because a plain (non-streaming) handler only writes its state back when it returns.
        """
        job = Job(kind)
        with self._guard:
            if tab in self._jobs:
                raise Busy(f"this tab is already running a {self._jobs[tab].kind}; wait for it or press Stop")
            self._jobs[tab] = job
        try:
            with self.heavy(key, what or kind):
                yield job.cancel
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

    # ---- runs -----------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        """A run by name: the user's runs first, then the shipped ones. Names cannot escape."""
        if not name or not RUN_NAME.match(name) or ".." in name:
            raise ExplorerError(f"not a valid run name: {name!r}")
        for root in (self.runs_root, ASSET_RUNS):
            p = (root / name).resolve()
            if p.parent == root.resolve() and (p / "run.json").is_file():
                return p
        raise ExplorerError(f"no saved run named {name}")

    def new_run_dir(self, name: str) -> Path:
        if not RUN_NAME.match(name) or ".." in name:
            raise ExplorerError(f"not a valid run name: {name!r} (letters, digits, '.', '_' and '-')")
        p = (self.runs_root / name).resolve()
        if p.parent != self.runs_root.resolve():
            raise ExplorerError(f"not a valid run name: {name!r}")
        return p

    def list_runs(self) -> list[str]:
        names = []
        for root in (self.runs_root, ASSET_RUNS):
            if root.is_dir():
                names += sorted((p.name for p in root.iterdir() if (p / "run.json").is_file()),
                                key=lambda n: -(root / n / "run.json").stat().st_mtime)
        return list(dict.fromkeys(names))

    # ---- downloads --------------------------------------------------------------------------
    def export_dir(self, session_tag: str, name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{session_tag}-{name}")[:120]
        return self.exports_root / safe

    def is_ours(self, path: str | os.PathLike) -> bool:
        """Downloads serve only files the app created under its exports folder."""
        try:
            Path(path).resolve().relative_to(self.exports_root.resolve())
            return True
        except ValueError:
            return False
