"""`python -m explorer search` (run or resume a search, with a progress bar), `measure` (time
candidates for real), `front` and `report` (read a run; no model needed). Each command parses its
arguments and makes one call to the application layer."""
from __future__ import annotations

import json
import sys

from tqdm import tqdm

from ..errors import ExplorerError
from ..settings import PRESETS, SearchSettings
from .cli import Bars, add_model_args, key_of, load, workbench

# what decides a new search's result: with --resume the run's stored settings decide instead
SEARCH_FLAGS = ("targets", "share", "preset", "seed", "corpus", "minutes", "fitness_mode", "space", "set", "prepare")


def register(sub) -> None:
    d = SearchSettings()
    p = sub.add_parser("search", help="search subnets at several size targets; writes a run directory", epilog=(
        "Several processes (one model replica each) share the evaluations when launched by "
        "`accelerate launch --multi_gpu --num_processes N -m explorer search ...` or "
        "`python -m torch.distributed.run --nproc_per_node N -m explorer search ...`; with --device cuda "
        "each process takes its own GPU. Process 0 writes the run directory and prints."))
    add_model_args(p)
    p.add_argument("--corpus", default=None, help=f"bbc (embedded), a UTF-8 text file, or hf:wikitext-2 "
                                                  f"(default {d.corpus})")
    p.add_argument("--targets", default=None, help="fractions of the parameters --share names, e.g. 0.9,0.7,0.5 or "
                                                   f"70%% (default {','.join(map(str, d.targets))})")
    p.add_argument("--share", choices=["total", "prunable"], default=None,
                   help="what a target is a fraction of: total (every parameter, the paper's; default) or "
                        "prunable (the blocks, embeddings excluded: Gemma 3 270M's embeddings are 63%% of it)")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"demo: a talk's {PRESETS['demo'].minutes:g} minutes (default); paper: the paper's "
                        "population and generations, no time budget")
    p.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    p.add_argument("--fitness-mode", choices=["paper", "reformed"], default=None,
                   help="paper: rank the sliced subnets (default); reformed: rank subnets assembled from "
                        "pre-reformed per-block width ladders, i.e. what reformation will give")
    p.add_argument("--space", choices=["auto", "dims", "heads"], default=None,
                   help="dims: narrow every head's dimensions (the paper's space); heads: keep whole heads (KV "
                        "groups x query heads per group), exportable as GGUF for llama.cpp; auto (default): dims "
                        "where exact, heads for models with q/k norms (Qwen3, Gemma 3)")
    p.add_argument("--minutes", type=float, default=None,
                   help="a time budget: the targets share it and each stops with the best it has (the "
                        "generations are then a cap); default: the preset's; --set minutes=null for none")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override a search setting, e.g. --set generations=8 (repeatable)")
    p.add_argument("--prepare", action="store_true",
                   help="first build the calibration pass and every baseline into the cache, outside the time "
                        "budget, so the budget is spent searching")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", metavar="RUN_DIR", help="a new run directory")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or crashed run with its own settings")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("measure", help="time candidates' decode for real, paired with the dense model")
    add_model_args(p)
    p.add_argument("run_dir")
    p.add_argument("--ids", default="", help="comma-separated candidate ids (default: the run's fronts)")
    p.set_defaults(func=cmd_measure)
    p = sub.add_parser("report", help="write a run's self-contained HTML report (no model needed)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="the HTML file (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("front", help="print a run's Pareto fronts (no model needed)")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_front)


def search_overrides(args) -> dict:
    """What the user set on the command line (a flag not given leaves the preset's value)."""
    from .inputs import parse_override

    given = dict(parse_override(text) for text in args.set or ())
    for name in ("seed", "corpus", "minutes", "fitness_mode", "space", "share"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    return given


def cmd_search(args) -> int:
    from ..search.distributed import init_from_env, rank_device, shutdown

    wb = workbench()
    if args.resume:
        given = [f"--{f.replace('_', '-')}" for f in SEARCH_FLAGS if getattr(args, f) not in (None, False)]
        if given:
            raise ExplorerError(f"--resume continues the run with its own settings; {', '.join(given)} cannot "
                                "change them (start a new run with --out instead)")
        wb.open(args.resume)  # a missing or broken run is refused before any model loads
    else:
        settings = wb.search_settings(args.preset or SearchSettings().preset_name,
                                      args.targets if args.targets is not None else SearchSettings().targets,
                                      search_overrides(args))
        wb.new_run_dir(args.out)  # a taken folder is refused before any model loads
    group = init_from_env()  # several processes when a launcher started us (WORLD_SIZE > 1)
    try:
        args.device = rank_device(args.device, group)
        key = key_of(args)
        if args.resume:
            key, _ = group.leader_then_others(lambda: wb.model_for_run(args.resume, key, max_memory=args.max_memory))
            events = wb.resume("cli", args.resume, key, group=group)
        else:
            group.leader_then_others(lambda: load(wb, args))  # one fills the model cache, then the rest
            if args.prepare:
                if group.active:
                    raise ExplorerError("--prepare runs in one process: prepare first, then launch the processes")
                bars = Bars()
                try:
                    for ev in wb.prepare("cli", key, settings):
                        bars(ev)
                finally:
                    bars.close()
            events = wb.search("cli", key, settings, args.out, group=group)
        if not group.leader:  # process 0 reports; the others only evaluate their share
            return _quiet(events)
        return _render(events, args.resume or args.out)
    finally:
        shutdown(group)


def _quiet(events) -> int:
    """Run the search without output; the exit code of its last event."""
    from ..events import SearchCancelled, SearchFailed

    code = 0
    for ev in events:
        if isinstance(ev, SearchCancelled):
            code = 130
        elif isinstance(ev, SearchFailed):
            code = 2
    return code


def _render(events, run_dir: str) -> int:
    """Progress bars on stderr, the summary as JSON on stdout; the exit code."""
    from ..events import (
        CandidateEvaluated,
        GenerationFinished,
        LatencyMeasured,
        SearchCancelled,
        SearchFailed,
        SearchFinished,
        StageProgress,
    )

    from ..events import SearchStarted
    from ..search.runs import target_words

    stages, bar, share = Bars(), None, "total"
    code = 0
    try:
        for ev in events:
            if isinstance(ev, SearchStarted):
                share = ev.settings.get("share", "total")
            elif isinstance(ev, StageProgress):
                stages(ev)
            elif isinstance(ev, CandidateEvaluated):
                if bar is None:
                    bar = tqdm(desc="search", unit="cand", file=sys.stderr)
                c = ev.candidate
                bar.update(1)
                bar.set_postfix_str(f"target {c.target_words} gen {c.generation} ppl {c.fitness:.4g}", refresh=False)
            elif isinstance(ev, GenerationFinished):
                tqdm.write(f"target {target_words(ev.target, share)} generation {ev.progress()}: best {ev.best_id} "
                           f"ppl {ev.best_fitness:.4g}, {ev.evals_per_s:.2f} evals/s", file=sys.stderr)
            elif isinstance(ev, LatencyMeasured):
                m = ev.measurement
                tqdm.write(f"measured {ev.id}: {m['ms']:.2f} ms/token, {m['speedup']:.2f}x the dense model "
                           f"(spread {100 * m['spread']:.0f}%{'' if m['reliable'] else ', unreliable'})",
                           file=sys.stderr)
            elif isinstance(ev, SearchFinished):
                s = ev.summary
                print(json.dumps({"run_dir": run_dir, "best": s["best"],
                                  "evaluated": s["evaluated"], "replayed": s["replayed"],
                                  "evals_per_s": round(s["evals_per_s"], 3), "wall_seconds": s["wall_seconds"]},
                                 indent=2))
            elif isinstance(ev, SearchCancelled):
                print(f"stopped: {ev.message}; resume with --resume {run_dir}", file=sys.stderr)
                code = 130
            elif isinstance(ev, SearchFailed):
                print(f"error: {ev.message}", file=sys.stderr)
                code = 2
    finally:
        stages.close()
        if bar is not None:
            bar.close()
    return code


def cmd_report(args) -> int:
    """The run's fronts (interactive plots and tables), the picks worked on and the prompts tried."""
    from pathlib import Path

    out = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
    print(f"wrote {workbench().report(args.run_dir, out=out)}")
    return 0


def cmd_measure(args) -> int:
    """Paired decode timings of candidates (the run's fronts by default); stored with the run."""
    from ..tables import format_table

    wb = workbench()
    run = wb.open(args.run_dir)
    fronts = run.fronts()
    ids = [i.strip() for i in args.ids.split(",") if i.strip()] or list(dict.fromkeys(fronts["params"] +
                                                                                       fronts["latency"]))
    picks = [wb.pick(args.run_dir, i) for i in ids]  # an unknown id is refused before the model loads
    picks = [(p, None) for p in picks if p.candidate.origin != "dense"]
    key, _ = wb.model_for_run(args.run_dir, key_of(args), max_memory=args.max_memory)
    bars = Bars()
    try:
        got = wb.measure("cli", key, picks, on_event=bars)
    finally:
        bars.close()
    latency = run.latency_model()
    rows = []
    for p, _ in picks:
        c, m = p.candidate, got[p.candidate.id]
        pred = c.metrics.get("predicted_latency_ms")
        rows.append({"id": c.id, "fraction": c.metrics.get("fraction"), "measured_ms": m.ms,
                     "speedup": m.speedup, "spread": m.spread, "reliable": m.reliable,
                     "predicted_speedup": latency.dense_ms / pred if latency and pred else ""})
    print(format_table(rows, ["id", "fraction", "measured_ms", "speedup", "predicted_speedup", "spread", "reliable"]))
    return 0


def cmd_front(args) -> int:
    from ..tables import format_table
    from .workbench import FRONT_COLUMNS

    front = workbench().front(args.run_dir)
    if args.json:
        print(json.dumps({"run_dir": args.run_dir, "status": front["status"], "fronts": front["fronts"]}, indent=2))
        return 0
    print(f"run {args.run_dir} ({front['status']}, {front['candidates']} candidates)")
    for name, title in (("params", "quality vs parameters"), ("latency", "quality vs predicted latency")):
        rows = front["fronts"][name]
        print(f"\n{title}:")
        print(format_table(rows, FRONT_COLUMNS) if rows else "(empty)")
    return 0


__all__ = ["register", "cmd_search", "cmd_front", "cmd_measure", "cmd_report"]
