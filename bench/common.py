"""Benchmarks: each compares ours, baselines and dense in one run, prints a table, writes JSON."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from explorer.tables import format_table  # noqa: F401 - the benchmarks' tables


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation: Pearson's on the ranks (no ties expected among measured values)."""
    import math

    if len(a) < 2:
        return math.nan
    ranks = torch.tensor([a, b], dtype=torch.float64).argsort(1).argsort(1).double()
    return float(torch.corrcoef(ranks)[0, 1])


def add_model_arguments(p) -> None:
    """--model/--dtype/--device, with the shared defaults."""
    from explorer.settings import ModelSettings

    m = ModelSettings()
    p.add_argument("--model", default=m.model)
    p.add_argument("--dtype", default=m.dtype)
    p.add_argument("--device", default=m.device)


def add_common_arguments(p, heldout_windows: int | None = None) -> None:
    """The model's arguments and --corpus/--seq-len/--heldout-windows, with the shared defaults."""
    from explorer.settings import DataSettings

    d = DataSettings()
    add_model_arguments(p)
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--heldout-windows", type=int, default=heldout_windows or d.heldout_windows)


def write_json(path: str | Path, data: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str))
    return p


def main(add_arguments, run, description: str | None = None, argv: list[str] | None = None) -> dict:
    """A benchmark script's entry: parse its arguments, run it (it prints its table and writes its JSON)."""
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    return run(parser.parse_args(argv))
