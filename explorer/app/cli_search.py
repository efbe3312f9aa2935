"""`python -m explorer search` (run or resume a search, with a progress bar) and
`python -m explorer front RUN_DIR` (the run's fronts as a table or JSON; needs no model)."""
from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from ..errors import ExplorerError
from ..settings import PRESETS, SearchSettings, parse_override


def _targets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"targets must be comma-separated fractions, got {text!r}") from None


def register(sub) -> None:
    from .cli import add_model_args

    d = SearchSettings()
    p = sub.add_parser("search", help="search subnets at several size targets; writes a run directory", epilog=(
        "Several processes (one model replica each) share the evaluations when launched by "
        "`accelerate launch --multi_gpu --num_processes N -m explorer search ...` or "
        "`python -m torch.distributed.run --nproc_per_node N -m explorer search ...`; with --device cuda "
        "each process takes its own GPU. Process 0 writes the run directory and prints."))
    add_model_args(p)
    p.add_argument("--corpus", default=d.corpus, help="bbc (embedded), a UTF-8 text file, or hf:wikitext-2")
    p.add_argument("--targets", type=_targets, default=d.targets, help="fractions of total parameters, e.g. 0.9,0.7,0.5")
    p.add_argument("--preset", default=d.preset_name, choices=list(PRESETS),
                   help=f"demo: a talk's {PRESETS['demo'].minutes:g} minutes (default); paper: the paper's "
                        "population and generations, no time budget")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fitness-mode", choices=["paper", "reformed"], default=None,
                   help="paper: rank the sliced subnets (default); reformed: rank subnets assembled from "
                        "pre-reformed per-block width ladders, i.e. what reformation will give")
    p.add_argument("--space", choices=["dims", "heads"], default=None,
                   help="dims: narrow every head's dimensions (the paper's space, default); heads: keep whole "
                        "heads (KV groups x query heads per group), exportable as GGUF for llama.cpp")
    p.add_argument("--minutes", type=float, default=None,
                   help="a time budget: the targets share it and each stops with the best it has (the "
                        "generations are then a cap); default: the preset's; --set minutes=null for none")
    p.add_argument("--set", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="override a search setting, e.g. --set generations=8 (repeatable)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", metavar="RUN_DIR", help="a new run directory")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a cancelled or crashed run")
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


def cmd_search(args) -> int:
    from ..search.loop import run_search
    from .cli import load_from_args

    overrides = dict(args.set)
    if args.resume:
        settings = SearchSettings()
    else:
        overrides.update(targets=args.targets, seed=args.seed, corpus=args.corpus)
        if args.minutes is not None:
            overrides["minutes"] = args.minutes
        if args.fitness_mode is not None:
            overrides["fitness_mode"] = args.fitness_mode
        if args.space is not None:
            overrides["space"] = args.space
        if "probs" in overrides or "first_probs" in overrides:
            raise ExplorerError("mutation probabilities are preset-only")
        settings = SearchSettings.preset(args.preset, **overrides)
    from ..search.distributed import init_from_env, rank_device, shutdown

    group = init_from_env()  # several processes when a launcher started us (WORLD_SIZE > 1)
    try:
        args.device = rank_device(args.device, group)
        lm = group.leader_then_others(lambda: load_from_args(args))  # one fills the model cache, then the rest
        events = run_search(lm, settings, args.resume or args.out, resume=bool(args.resume), group=group)
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
        FrontChanged,
        GenerationFinished,
        LatencyMeasured,
        SearchCancelled,
        SearchFailed,
        SearchFinished,
        StageProgress,
    )

    bar, stage = None, None
    code = 0
    try:
        for ev in events:
            if isinstance(ev, StageProgress):
                if stage is None or stage.desc != ev.stage:
                    if stage is not None:
                        stage.close()
                    stage = tqdm(total=ev.total, desc=ev.stage, file=sys.stderr, leave=False)
                stage.update(ev.done - stage.n)
            elif isinstance(ev, CandidateEvaluated):
                if bar is None:
                    if stage is not None:
                        stage.close()
                        stage = None
                    bar = tqdm(desc="search", unit="cand", file=sys.stderr)
                c = ev.candidate
                bar.update(1)
                bar.set_postfix_str(f"target {c.target:.0%} gen {c.generation} ppl {c.fitness:.4g}", refresh=False)
            elif isinstance(ev, GenerationFinished):
                tqdm.write(f"target {ev.target:.0%} generation {ev.progress()}: best {ev.best_id} "
                           f"ppl {ev.best_fitness:.4g}, {ev.evals_per_s:.2f} evals/s", file=sys.stderr)
            elif isinstance(ev, LatencyMeasured):
                m = ev.measurement
                tqdm.write(f"measured {ev.id}: {m['ms']:.2f} ms/token, {m['speedup']:.2f}x the dense model "
                           f"(spread {100 * m['spread']:.0f}%{'' if m['reliable'] else ', unreliable'})",
                           file=sys.stderr)
            elif isinstance(ev, FrontChanged):
                pass
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
        for b in (bar, stage):
            if b is not None:
                b.close()
    return code


def cmd_report(args) -> int:
    """The run's fronts (interactive plots and tables), the picks worked on and the prompts tried."""
    from ..search.runs import open_run
    from .report import write_report

    print(f"wrote {write_report(open_run(args.run_dir), args.out)}")
    return 0


def cmd_measure(args) -> int:
    """Paired decode timings of candidates (any front member on request); stored as annotations."""
    from ..model.loading import load_model
    from ..model.slicing import candidate_model
    from ..search.latency_model import measure
    from ..search.runs import open_run
    from .cli import Bars

    run = open_run(args.run_dir)
    by_id = {c.id: c for c in run.candidates()}
    fronts = run.fronts()
    ids = [i.strip() for i in args.ids.split(",") if i.strip()] or list(dict.fromkeys(fronts["params"] + fronts["latency"]))
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ExplorerError(f"no candidate {unknown[0]!r} in {args.run_dir}")
    ids = [i for i in ids if by_id[i].origin != "dense"]
    lm = load_model(run.settings.get("model", args.model), args.dtype, args.device, args.trust_remote_code)
    means = run.channel_means() if any(by_id[i].compensated for i in ids) else None
    bars = Bars()
    try:
        got = measure(lm.model, {i: candidate_model(lm.model, by_id[i], means) for i in ids}, lm.shape.vocab_size,
                      on_event=bars)
    finally:
        bars.close()
    latency = run.latency_model()
    rows = []
    for i, m in got.items():
        run.annotate(i, m.metrics())
        pred = by_id[i].metrics.get("predicted_latency_ms")
        rows.append({"id": i, "fraction": by_id[i].metrics.get("fraction"), "measured_ms": m.ms,
                     "speedup": m.speedup, "spread": m.spread, "reliable": m.reliable,
                     "predicted_speedup": latency.dense_ms / pred if latency and pred else ""})
    from ..tables import format_table

    print(format_table(rows, ["id", "fraction", "measured_ms", "speedup", "predicted_speedup", "spread", "reliable"]))
    return 0


FRONT_COLUMNS = ["id", "target", "origin", "generation", "params", "fraction", "fitness_ppl",
                 "predicted_latency_ms", "measured_ms", "measured_speedup", "measured_spread", "heldout_ppl"]


def front_rows(run) -> dict[str, list[dict]]:
    cands = {c.id: c for c in run.candidates()}
    out = {}
    for name, ids in run.fronts().items():
        rows = []
        for i in ids:
            c = cands[i]
            rows.append({"id": c.id, "target": c.target, "origin": c.origin, "generation": c.generation,
                         **{k: c.metrics.get(k, "") for k in FRONT_COLUMNS[4:]}})
        out[name] = rows
    return out


def cmd_front(args) -> int:
    from ..search.runs import open_run
    from ..tables import format_table

    run = open_run(args.run_dir)
    rows = front_rows(run)
    if args.json:
        print(json.dumps({"run_dir": args.run_dir, "status": run.status, "fronts": rows}, indent=2))
        return 0
    print(f"run {args.run_dir} ({run.status}, {len(run.candidates())} candidates)")
    for name, title in (("params", "quality vs parameters"), ("latency", "quality vs predicted latency")):
        print(f"\n{title}:")
        print(format_table(rows[name], FRONT_COLUMNS) if rows[name] else "(empty)")
    return 0


__all__ = ["register", "cmd_search", "cmd_front", "cmd_measure", "cmd_report", "front_rows"]
