"""Small typed events that long engine jobs emit, and the cancel check they share.

Engine steps take `on_event` (a callable, no-op by default) or return an iterator of events, and
a `threading.Event` to cancel; the CLI renders events with tqdm and the app with Gradio progress,
both dispatching on the event's type. Every event type of the project is defined here, once.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, TypeVar

from .errors import Cancelled

EventSink = Callable[[Any], None]
T = TypeVar("T")


def no_event(_event: Any) -> None:
    """Default sink: drop events."""


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def streamed(work: Callable[[EventSink], T]) -> Generator[Any, None, T]:
    """Run `work(on_event)` in a thread and yield its events as they happen (an iterator of events
    cannot yield from inside a blocking call); its result is the generator's return value, and its
    exception is raised here."""
    box: queue.Queue = queue.Queue()
    done = object()
    result: list = []

    def run() -> None:
        try:
            result.append(work(box.put))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result.append(e)
        finally:
            box.put(done)

    thread = threading.Thread(target=run, name="streamed-work", daemon=True)
    thread.start()
    while (item := box.get()) is not done:
        yield item
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


# ---- any long job ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """Generic progress of one stage of a job (`done` of `total` units)."""

    stage: str
    done: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class Finished:
    stage: str
    result: Any = None


# ---- the search ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchStarted:
    run_dir: str
    targets: tuple[float, ...]
    settings: dict
    resumed: bool
    stored: int  # candidates already in the run


@dataclass(frozen=True)
class StageProgress(Progress):
    """Calibration steps before the search proper (importance, latency model, front timing): a
    Progress of its own type, so the UI and the CLI tell it from the candidates' stream."""


@dataclass(frozen=True)
class CandidateEvaluated:
    candidate: Any  # runs.Candidate
    replayed: bool  # taken from the run directory, not evaluated again
    evaluated: int  # candidates so far in this run


@dataclass(frozen=True)
class GenerationFinished:
    target: float
    generation: int
    best_fitness: float
    best_id: str
    evals_per_s: float  # this generation's real evaluations per second of wall time
    evaluated: int  # evaluated in this generation (replayed included)
    stopped_early: int
    generations: int  # total per target, for progress bars (0 under a time budget: the clock decides)

    def progress(self) -> str:
        """'3/5', or '3' under a time budget (no fixed total to show)."""
        return f"{self.generation}/{self.generations}" if self.generations else str(self.generation)


@dataclass(frozen=True)
class FrontChanged:
    params: tuple[str, ...]
    latency: tuple[str, ...]


@dataclass(frozen=True)
class LatencyMeasured:
    """A candidate's decode latency timed for real, paired with the dense model."""

    id: str
    measurement: dict  # latency_model.Measurement.to_dict()


@dataclass(frozen=True)
class SearchFinished:
    summary: dict


@dataclass(frozen=True)
class SearchCancelled:
    summary: dict
    message: str = "cancelled by the user"


@dataclass(frozen=True)
class SearchFailed:
    message: str


SEARCH_END = (SearchFinished, SearchCancelled, SearchFailed)
