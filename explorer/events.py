"""Small typed events that long engine jobs emit, and the cancel check they share.

Engine steps take `on_event` (a callable, no-op by default) and a `threading.Event` to cancel;
the CLI renders events with tqdm and the app with Gradio progress. Nothing here knows either.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from .errors import Cancelled

EventSink = Callable[[Any], None]


def no_event(_event: Any) -> None:
    """Default sink: drop events."""


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


@dataclass(frozen=True)
class Failed:
    stage: str
    message: str


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()
