"""A small search of a tiny random GQA Llama on fixed random token windows, for
tests/test_distributed.py. Alone it is the one-process reference; started by a launcher
(`accelerate launch`, `python -m torch.distributed.run`) every process runs it and they share the
evaluations through `explorer.search.distributed`, exactly as `python -m explorer search` does.

    python tests/distributed_search.py RUN_DIR [--resume] [--stats DIR]

`--stats DIR` writes DIR/rank<R>.json with the number of fitness evaluations this process ran,
which shows that the work was really split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's tiny_llama
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the explorer package

import torch  # noqa: E402
from conftest import tiny_llama  # noqa: E402

from explorer.model.loading import LoadedModel  # noqa: E402
from explorer.model.subnet import ModelShape  # noqa: E402
from explorer.search.run import run_search  # noqa: E402
from explorer.settings import SearchSettings


def settings() -> SearchSettings:
    """Three targets, three generations each: enough batches (baselines, inits, generations with an
    early-stop bound, copies: at 100 % the uncompensated baselines are the dense model; FLAP is
    compensated, the search is not, so both kinds of fitness) to exercise
    every path of the distributed archive."""
    return SearchSettings.preset("demo", targets=(1.0, 0.8, 0.6), head_multiple=4, population=6, generations=2,
                                 mutations=4, crossovers=2, fresh=1, top_k=3, window=0.01, latency=False,
                                 split_init=2, seed=3, compensate=False)


def model_and_windows() -> tuple[LoadedModel, tuple[torch.Tensor, torch.Tensor]]:
    """The same model and windows in every process: built from fixed seeds, nothing downloaded.

    On random tokens every subnet of a random model scores about the same, so the early-stop bound
    would never fire. A sharper lm_head and fitness windows the dense model continues greedily make
    the subnets' fitness spread widely (the closer to the dense model, the better), so some
    candidates stop early and the test covers the bound too."""
    model = tiny_llama(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(12)
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(0)
    cal = torch.randint(3, 97, (6, 24), generator=g)
    fit = torch.randint(3, 97, (6, 2), generator=g)
    with torch.no_grad():
        while fit.shape[1] < 24:
            fit = torch.cat([fit, model(fit).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return LoadedModel(model, None, shape, "tiny", "tiny", "", torch.float32, "cpu"), (cal, fit)


def search(run_dir: Path, resume: bool = False, cancel: threading.Event | None = None) -> Iterator[Any]:
    lm, windows = model_and_windows()
    return run_search(lm, settings(), run_dir, cancel=cancel, resume=resume, windows=windows)


def main() -> int:
    from explorer.events import SearchCancelled, SearchFailed, SearchFinished
    from explorer.search.distributed import init_from_env, shutdown

    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stats", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)  # the same arithmetic in every process and in the reference
    group = init_from_env()
    code, fitness = 1, None
    try:
        for ev in search(args.run_dir, args.resume):
            if isinstance(ev, SearchFinished):
                code, fitness = 0, ev.summary["fitness"]  # this process's own evaluator counters
            elif isinstance(ev, (SearchCancelled, SearchFailed)):
                print(f"process {group.rank}: {ev}", file=sys.stderr)
                code = 2
        if args.stats is not None:
            args.stats.mkdir(parents=True, exist_ok=True)
            (args.stats / f"rank{group.rank}.json").write_text(
                json.dumps({"rank": group.rank, "world": group.world, "fitness": fitness}))
    finally:
        shutdown(group)
    return code


if __name__ == "__main__":
    sys.exit(main())
