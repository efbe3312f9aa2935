"""Benchmarks: each compares ours, baselines and dense in one run, prints a table, writes JSON."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: " | ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), "-+-".join("-" * w for w in widths), *(line(r) for r in cells)])


def add_common_arguments(p, heldout_windows: int | None = None) -> None:
    """--model/--dtype/--device/--corpus/--seq-len/--heldout-windows, with the shared defaults."""
    from ..settings import DataSettings, ModelSettings

    m, d = ModelSettings(), DataSettings()
    p.add_argument("--model", default=m.model)
    p.add_argument("--dtype", default=m.dtype)
    p.add_argument("--device", default=m.device)
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--heldout-windows", type=int, default=heldout_windows or d.heldout_windows)


def write_json(path: str | Path, data: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str))
    return p


def main(name: str, argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Entry point of `bench/NAME.py` and `python -m explorer bench NAME`: parse, run, print, write."""
    import argparse
    import importlib
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mod = importlib.import_module(f"explorer.benchmarks.{name}")
    parser = argparse.ArgumentParser(prog=prog or f"bench/{name}.py", description=mod.__doc__)
    mod.add_arguments(parser)
    return mod.run(parser.parse_args(argv))
