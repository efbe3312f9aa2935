"""Candidate evaluation spread over processes (torch.distributed): one model replica per process.

Launch `python -m explorer search` under a launcher that starts N copies and sets RANK / WORLD_SIZE
(`accelerate launch --multi_gpu --num_processes N -m explorer search ...`, or
`python -m torch.distributed.run --nproc_per_node N -m explorer search ...`). Every process then runs
the same deterministic search; only the evaluations differ:

- The search decides a whole batch of candidates before evaluating any (a generation's children,
  the baselines, the initial subnets), so the batch can be split round robin: process r evaluates
  items r, r + N, ... and `Group.map` gathers every result on every process (`all_gather_object`).
  Every process then archives the same results in the same order, so their elites, bounds and
  random generators never diverge, and the run equals a one-process run of the same seed.
- Process 0 owns the run directory. The others work in a private scratch copy (`shared_run`), so
  the engine needs no "am I allowed to write" checks, and it is removed when their search ends.
- Calibration (importance, latency model) is computed once, by process 0, and its files are sent
  to the others before they prepare (`leader_first`): they load it instead of recomputing it, so
  all processes rank channels with bitwise the same scores.

The collectives carry a few small Python objects per batch, so they always use a gloo group
(created beside an NCCL default group if a launcher made one); the models stay on their devices.
A failure or cancel in one process is reported through the next collective, so every process
stops with it instead of waiting for a partner that is gone.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from ..errors import Cancelled, ExplorerError

T = TypeVar("T")
R = TypeVar("R")

# Process 0 calibrates (importance, latency model) while the others wait in a broadcast: on a large
# model that can take far longer than torch's 30-minute default before a collective gives up.
TIMEOUT = timedelta(hours=6)
RUN_FILES = ("run.json", "candidates.jsonl", "annotations.jsonl")  # what a resumed run needs to replay


@dataclass(frozen=True)
class Failure:
    """An exception raised in one process, in a form that crosses process boundaries."""

    rank: int
    kind: str  # exception class name
    message: str
    cancelled: bool
    user_error: bool  # an ExplorerError: bad input that every process would have refused alike

    @classmethod
    def of(cls, rank: int, e: BaseException) -> "Failure":
        return cls(rank, type(e).__name__, str(e), isinstance(e, Cancelled), isinstance(e, ExplorerError))

    def error(self) -> ExplorerError:
        """The exception the other processes raise: a cancel stays a cancel, an input error keeps its
        own message, anything else names the process it happened in."""
        if self.cancelled:
            return Cancelled(self.message)
        if self.user_error:
            return ExplorerError(self.message)
        return ExplorerError(f"process {self.rank} failed: {self.kind}: {self.message}")


@dataclass(frozen=True)
class Group:
    """This process's place among the search processes. The default (world 1) means no
    torch.distributed: every method then works locally, so callers need no special case."""

    rank: int = 0
    world: int = 1
    pg: Any = None  # the gloo process group of the collectives (None: the default group)
    owned: bool = False  # init_from_env created the default group (shutdown destroys it)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """Process 0: writes the run directory, prints, measures latency."""
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Process 0's `obj` on every process (the others' argument is ignored)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def tell(self, error: BaseException | None, data: Any = None) -> None:
        """Process 0's verdict on a step the others wait for: its failure, or the data they need."""
        self.broadcast((None if error is None else Failure.of(0, error), data))

    def hear(self) -> Any:
        """The other processes' side of `tell`: process 0's data, or its failure raised here."""
        failure, data = self.broadcast()
        if failure is not None:
            raise failure.error()
        return data

    def leader_then_others(self, fn: Callable[[], R]) -> R:
        """`fn()` on process 0 first, then on the others: for steps that fill a cache every process
        reads (the first run's dequantised embedded model, a hub download), which concurrent copies
        would race on. If process 0 fails, the others raise too instead of trying."""
        if not self.active:
            return fn()
        if self.leader:
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - the others must hear of it before it propagates
                self.tell(e)
                raise
            self.tell(None)
            return out
        self.hear()
        return fn()

    def map(self, items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
        """`[fn(x) for x in items]`, split round robin over the processes, the full list on every one.

        Round robin rather than contiguous blocks: consecutive items tend to cost alike (a generation's
        mutations, then its crossovers), so interleaving balances the work. If `fn` raises on any
        process, every process raises (the one that failed re-raises its own exception)."""
        if not self.active:
            return [fn(x) for x in items]
        mine: dict[int, R] = {}
        failure, error = None, None
        for i in range(self.rank, len(items), self.world):
            try:
                mine[i] = fn(items[i])
            except Exception as e:  # noqa: BLE001 - reported to the other processes, then re-raised
                failure, error = Failure.of(self.rank, e), e
                break
        parts = self.all_gather((mine, failure))
        if error is not None:
            raise error
        for _, f in parts:
            if f is not None:
                raise f.error()
        merged: dict[int, R] = {}
        for part, _ in parts:
            merged.update(part)
        return [merged[i] for i in range(len(items))]


def current_group() -> Group:
    """The group torch.distributed was initialised with, or the one-process default. A default group
    that is not gloo (a launcher's NCCL) gets a gloo group made beside it: a collective call, so every
    process makes it at the same point (once per search, in `run_search`)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return Group()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return Group()
    pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
    return Group(dist.get_rank(), dist.get_world_size(), pg)


def init_from_env() -> Group:
    """Join the process group a launcher described in the environment (WORLD_SIZE > 1), with gloo;
    without a launcher, the one-process default. Safe to call when a group already exists."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Group()
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="gloo", timeout=TIMEOUT)
    return dataclasses.replace(current_group(), owned=owned)


def shutdown(group: Group) -> None:
    """Leave the process group `init_from_env` created for `group` (one made by someone else is left alone)."""
    if group.owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(device: str, group: Group) -> str:
    """The device this process's replica goes on: plain "cuda" becomes this process's GPU (LOCAL_RANK,
    wrapping when there are more processes than GPUs); an explicit cuda:N or cpu is kept."""
    if not group.active:
        return device
    if device == "auto":
        raise ExplorerError("--device auto spreads one model over every GPU; with several processes give "
                            "--device cuda (one replica per process) or cpu")
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", group.rank))
            return f"cuda:{local % torch.cuda.device_count()}"
    return device


# ---- the run directory ----------------------------------------------------------------------------
def _read_files(folder: Path, names: Sequence[str]) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)


def shared_run(group: Group, run_dir: Path, resume: bool, start: Callable[[Path], Iterator[Any]]) -> Iterator[Any]:
    """Open the search's run directory on every process: `start(folder)` validates, creates or opens
    the run in `folder` and returns its (not yet started) event iterator.

    Process 0 calls it on `run_dir`. Every other process waits for process 0's verdict (its error, so a
    bad input fails everywhere alike, or on resume the stored run's files), then calls it on a fresh
    scratch folder that mirrors the run; its events remove the folder when they end."""
    if not group.active:
        return start(run_dir)
    if group.leader:
        try:
            events = start(run_dir)
        except Exception as e:  # noqa: BLE001 - the other processes must hear of it before it propagates
            group.tell(e)
            raise
        group.tell(None, _read_files(run_dir, RUN_FILES) if resume else {})
        return events
    files = group.hear()  # process 0's input error is raised here with its own message
    scratch = Path(tempfile.mkdtemp(prefix=f"explorer-rank{group.rank}-"))
    try:
        _write_files(scratch, files)
        events = start(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return _removing(events, scratch)


def _removing(events: Iterator[Any], folder: Path) -> Iterator[Any]:
    try:
        yield from events
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def leader_first(group: Group, steps: Callable[[], Iterator[Any]], folder: Path,
                 files: Sequence[str]) -> Iterator[Any]:
    """Run `steps` (a preparation that writes `files` into `folder`, or reads them when present,
    yielding its progress and returning its result) on process 0 first, then copy those files into
    every other process's `folder` and run `steps` there: they load what process 0 computed
    instead of computing it again. Returns what `steps` returns."""
    if not group.active:
        return (yield from steps())
    if group.leader:
        try:
            out = yield from steps()
        except Exception as e:  # noqa: BLE001 - sent to the others, then re-raised
            group.tell(e)
            raise
        group.tell(None, _read_files(folder, files))
        return out
    _write_files(folder, group.hear())
    return (yield from steps())


__all__ = ["Group", "Failure", "current_group", "init_from_env", "shutdown", "rank_device", "shared_run",
           "leader_first", "TIMEOUT"]
