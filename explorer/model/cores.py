"""Sharing the CPU cores with the other Subnet Explorer jobs on this machine.

Two processes that each run torch with one thread per core on the same cores do not run at half
speed each: their threads spin and wait on one another, and a search measured 20-30 times slower
beside a busy app. So every heavy job (a search, a reformation, an evaluation, an export, a
timing) registers itself in a folder of the cache (`jobs/`, one small file per job, removed when
it ends; a file whose process is gone is ignored and cleaned up), and each job uses its share of
the cores: the threads torch had when the process started, divided by the number of processes
running such jobs. Other programs count too: when they keep cores busy (a compile, a browser, a
matrix loop), a job uses only the cores left free, since a torch thread that waits for a busy core
stalls the others at every step. The share is refreshed between candidates (the load of other
programs measured over the time since the last look, with no waiting), so a search started alone
gives cores back as soon as another job starts, and takes them again when it ends. Each change is
said once (`CoreShare.take_notes`).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch

FULL_THREADS = torch.get_num_threads()  # what this process may use when it has the machine to itself
REFRESH_S = 2.0  # between two looks at the other jobs
BUSY_SHARE = 0.4  # of the machine's CPU time used by other programs, above which a job gives them cores
MIN_LOOK_S = 0.15  # CPU-seconds of the machine a load measurement needs (shorter ones are noise)
_lock = threading.Lock()
_active: dict[int, "CoreShare"] = {}  # this process's registered jobs, by id


def jobs_dir() -> Path:
    from .loading import cache_root

    return cache_root() / "jobs"


def _alive(record: dict) -> bool:
    import psutil

    try:
        return psutil.Process(int(record["pid"])).create_time() == record["created"]
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False


def running_jobs(folder: Path | None = None) -> list[dict]:
    """The heavy jobs registered on this machine whose process still runs (stale files removed)."""
    folder = folder or jobs_dir()
    out = []
    for f in folder.glob("*.json") if folder.is_dir() else ():
        try:
            record = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if _alive(record):
            out.append(record)
        else:
            f.unlink(missing_ok=True)
    return out


def others_running() -> list[dict]:
    """The heavy jobs of other processes on this machine."""
    return [r for r in running_jobs() if r["pid"] != os.getpid()]


class CoreShare:
    """One heavy job's claim on the cores (a context manager); `refresh()` between units of work."""

    def __init__(self, kind: str, folder: Path | None = None):
        import psutil

        self.kind = kind
        self.folder = folder or jobs_dir()
        self.file = self.folder / f"{os.getpid()}-{id(self)}.json"
        self.record = {"pid": os.getpid(), "created": psutil.Process().create_time(), "kind": kind,
                       "started": time.time()}
        self.threads = FULL_THREADS
        self.others: list[dict] = []
        self.notes: list[str] = []  # what changed, for the job to say
        self._seen = 0.0
        self._sample = _cpu_sample()
        self.busy = 0.0  # share of the machine's CPU time other programs used since the last look

    def __enter__(self) -> "CoreShare":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file.write_text(json.dumps(self.record))
        except OSError:
            pass  # an unwritable cache only loses the coordination, never the job
        with _lock:
            _active[id(self)] = self
        time.sleep(0.2)  # a first look at the machine's load
        self.refresh(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.file.unlink(missing_ok=True)
        with _lock:
            _active.pop(id(self), None)
            if not _active:
                torch.set_num_threads(FULL_THREADS)

    def refresh(self, force: bool = False) -> None:
        """Count the machine's jobs again (at most every REFRESH_S) and take this process's share."""
        now = time.monotonic()
        if not force and now - self._seen < REFRESH_S:
            return
        self._seen = now
        mine = {os.getpid()}
        others = [r for r in running_jobs(self.folder) if r["pid"] not in mine]
        processes = 1 + len({r["pid"] for r in others})
        sample = _cpu_sample()
        if sample[0].idle + sum(sample[0][:3]) - self._sample[0].idle - sum(self._sample[0][:3]) >= MIN_LOOK_S:
            busy, self._sample = _others_share(self._sample, sample), sample
        else:  # too short a look to say anything: the last one stands
            busy = self.busy
        cores = os.cpu_count() or 1
        free = cores if busy <= BUSY_SHARE else max(1, round(cores * (1 - busy)))
        threads = max(1, min(FULL_THREADS // processes, free))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        was_busy = self.busy > BUSY_SHARE
        self.busy = busy
        if threads != self.threads or {r["pid"] for r in others} != {r["pid"] for r in self.others} \
                or (busy > BUSY_SHARE) != was_busy:
            if others:
                who = ", ".join(sorted({f"pid {r['pid']} ({r['kind']})" for r in others}))
                self.notes.append(f"another Subnet Explorer job shares this machine ({who}): this {self.kind} uses "
                                  f"{threads} of {FULL_THREADS} threads, and runs slower")
            elif busy > BUSY_SHARE:
                self.notes.append(f"the machine is busy: other programs use {busy:.0%} of its {cores} cores' time, so "
                                  f"this {self.kind} uses {threads} of {FULL_THREADS} threads and runs slower (a time "
                                  "budget still holds)")
            elif self.others or was_busy:
                self.notes.append(f"the machine is free again: this {self.kind} uses {threads} threads")
        self.threads, self.others = threads, others

    @property
    def shared(self) -> bool:
        return bool(self.others)

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


def _cpu_sample() -> tuple:
    import psutil

    return psutil.cpu_times(), psutil.Process().cpu_times()


def _others_share(before: tuple, after: tuple) -> float:
    """The share of the machine's CPU time that other programs used between two samples."""
    (t0, m0), (t1, m1) = before, after
    busy = sum(getattr(t1, f) - getattr(t0, f) for f in ("user", "system", "nice"))
    total = busy + (t1.idle - t0.idle)
    mine = (m1.user - m0.user) + (m1.system - m0.system)
    return max(0.0, min(1.0, (busy - mine) / total)) if total > 0 else 0.0


def busy_share(seconds: float = 0.2) -> float:
    """The share of the machine's CPU time that other programs used over a short look."""
    before = _cpu_sample()
    time.sleep(seconds)
    return _others_share(before, _cpu_sample())


__all__ = ["CoreShare", "running_jobs", "others_running", "busy_share", "FULL_THREADS"]
