"""Sharing the CPU cores with the other Subnet Explorer jobs on this machine.

Two processes that each run torch with one thread per core on the same cores do not run at half
speed each: their threads spin and wait on one another, and a search measured 20-30 times slower
beside a busy app. So every heavy job (a search, a reformation, an evaluation, an export, a
timing) registers itself in a folder of the cache (`jobs/`, one small file per job, removed when
it ends; a file whose process is gone is ignored and cleaned up), and each job uses its share of
the cores: the threads torch had when the process started, divided by the number of jobs running
on the machine. The share is refreshed between candidates, so a search started alone gives cores
back as soon as another job starts, and takes them again when it ends. Each change is said once
(`CoreShare.note`), as is a machine already busy with other programs at the start of a job.
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
BUSY_SHARE = 0.5  # of the cores in use by other programs, above which a job says the machine is busy
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

    def __enter__(self) -> "CoreShare":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file.write_text(json.dumps(self.record))
        except OSError:
            pass  # an unwritable cache only loses the coordination, never the job
        with _lock:
            _active[id(self)] = self
        self.refresh(force=True)
        busy = busy_share()
        if not self.others and busy > BUSY_SHARE:
            self.notes.append(f"the machine is busy: other programs use {busy:.0%} of its {os.cpu_count()} cores, so "
                              "this runs slower than on a quiet machine (a time budget still holds)")
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
        threads = max(1, FULL_THREADS // processes)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        if threads != self.threads or {r["pid"] for r in others} != {r["pid"] for r in self.others}:
            if others:
                who = ", ".join(sorted({f"pid {r['pid']} ({r['kind']})" for r in others}))
                self.notes.append(f"another Subnet Explorer job shares this machine ({who}): this {self.kind} uses "
                                  f"{threads} of {FULL_THREADS} threads, and runs slower")
            elif self.others:
                self.notes.append(f"the other Subnet Explorer jobs ended: this {self.kind} uses all {threads} threads "
                                  "again")
        self.threads, self.others = threads, others

    @property
    def shared(self) -> bool:
        return bool(self.others)

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


def busy_share(seconds: float = 0.2) -> float:
    """The share of the machine's CPU time that other programs used over a short look."""
    import psutil

    me = psutil.Process()
    t0, mine0 = psutil.cpu_times(), me.cpu_times()
    time.sleep(seconds)
    t1, mine1 = psutil.cpu_times(), me.cpu_times()
    busy = sum(getattr(t1, f) - getattr(t0, f) for f in ("user", "system", "nice"))
    total = busy + (t1.idle - t0.idle)
    mine = (mine1.user - mine0.user) + (mine1.system - mine0.system)
    return max(0.0, (busy - mine) / total) if total > 0 else 0.0


__all__ = ["CoreShare", "running_jobs", "others_running", "busy_share", "FULL_THREADS"]
