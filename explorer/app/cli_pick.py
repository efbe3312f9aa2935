"""`python -m explorer reform` and `python -m explorer export`: turn a picked subnet (from a search
run, or a subnet JSON file) into a verified Hugging Face model folder, reformed or not.

    python -m explorer reform --run RUN_DIR --pick ID --out DIR      # reform, then export
    python -m explorer export --run RUN_DIR --pick ID [--reform] --out DIR
    python -m explorer export --subnet subnet.json --out DIR         # a Subnet.to_json file
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..errors import ExplorerError
from ..pick.reform import ReformSettings
from .cli import Bars


def register(sub) -> None:
    from .cli import add_data_args, add_model_args

    for name, helptext in (("reform", "reform a subnet's o_proj/down_proj on calibration data, then export it"),
                           ("export", "export a subnet as a Hugging Face model folder (+ .zip), verified")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--run", help="a search run directory (with --pick)")
        src.add_argument("--subnet", help="a subnet JSON file (Subnet.to_json, or an object with a 'subnet' field)")
        p.add_argument("--pick", help="candidate id in the run, or best@FRACTION (e.g. best@0.7)")
        p.add_argument("--out", required=True, help="the model folder to write (a .zip is written beside it)")
        add_model_args(p)
        add_data_args(p)
        if name == "export":
            p.add_argument("--reform", action="store_true", help="reform o_proj/down_proj before exporting")
        add_reform_args(p)
        p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                       help="hf: a transformers folder (remote code); gguf: one GGUF file for llama.cpp and Ollama "
                            "(whole-head subnets only), verified in llama.cpp")
        p.add_argument("--gguf-type", choices=["f16", "f32", "q8_0"], default="f16", help="GGUF weight type")
        p.add_argument("--no-verify", action="store_true",
                       help="skip the check (a reload in a fresh process; for GGUF, a run in llama.cpp)")
        p.add_argument("--no-zip", action="store_true", help="do not write DIR.zip")
        p.set_defaults(func=cmd_reform if name == "reform" else cmd_export)


def add_reform_args(p) -> None:
    r = ReformSettings()
    p.add_argument("--demo", action="store_true", help=f"small reformation setting ({ReformSettings.demo().windows} "
                                                       f"windows of {ReformSettings.demo().seq_len} tokens)")
    p.add_argument("--calib-windows", type=int, default=r.windows, help="calibration windows for reformation")
    p.add_argument("--calib-seq-len", type=int, default=r.seq_len)
    p.add_argument("--method", choices=["closed", "admm"], default=r.method)
    p.add_argument("--rho", type=float, default=r.rho, help="ADMM penalty (relative to the Gram diagonal)")
    p.add_argument("--iterations", type=int, default=r.iterations, help="ADMM iterations")
    p.add_argument("--damp", type=float, default=r.damp, help="ridge lambda relative to the mean Gram diagonal")


def reform_settings(args) -> ReformSettings:
    base = ReformSettings.demo() if args.demo else ReformSettings(windows=args.calib_windows,
                                                                 seq_len=args.calib_seq_len)
    if args.calib_windows < 1 or args.calib_seq_len < 8:
        raise ExplorerError("--calib-windows must be at least 1 and --calib-seq-len at least 8")
    return replace(base, method=args.method, rho=args.rho, iterations=args.iterations, damp=args.damp,
                   corpus=args.corpus)


def source(args, wb):
    """(model key, Pick, provenance) from --run/--pick or --subnet: the pick a reformation or an export
    works on, through the workbench like every app action."""
    from ..model.subnet import Subnet
    from ..search.runs import Candidate, open_run
    from .workbench import Pick, model_key

    if args.run:
        if not args.pick:
            raise ExplorerError("--run needs --pick (a candidate id, or best@FRACTION)")
        run = open_run(args.run)
        settings = run.settings
        p = wb.pick(str(Path(args.run)), args.pick)
        key = model_key(settings.get("model", args.model), args.dtype, args.device)
        c = p.candidate
        provenance = {"found_by": "Subnet Explorer evolutionary search (training-free, METHOD sections 2-3)",
                      "run": str(Path(args.run).resolve()), "pick": args.pick, "search_metrics": c.metrics,
                      "search_settings": {k: v for k, v in settings.items() if k in (
                          "targets", "seed", "corpus", "calib_windows", "calib_seq_len", "fitness_windows",
                          "fitness_seq_len", "population", "generations", "compensate")}}
    else:
        if args.pick:
            raise ExplorerError("--pick goes with --run, not with --subnet")
        subnet = Subnet.load(args.subnet)
        key = model_key(args.model, args.dtype, args.device)
        shape = wb.model(key, max_memory=args.max_memory).shape
        p = Pick(None, Candidate("file", round(subnet.fraction(shape), 4), 0, "file", subnet.validate(shape)))
        provenance = {"found_by": "a subnet file", "subnet_file": str(Path(args.subnet).resolve())}
    wb.model(key, max_memory=args.max_memory)
    return key, p, provenance


def run_export(args, do_reform: bool) -> int:
    from ..pick.evaluation import EvalSettings, heldout_perplexity
    from ..pick.export import check_target
    from ..pick.export_gguf import check_gguf_target, precheck
    from .workbench import Workbench

    t0 = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    (check_gguf_target if args.format == "gguf" else check_target)(out)  # fail before the long work
    wb = Workbench("runs", out.parent, allow_paths=True)
    key, p, provenance = source(args, wb)
    lm = wb.loaded(key)
    subnet = p.candidate.subnet
    why = precheck(lm, subnet) if args.format == "gguf" else None
    if why:
        raise ExplorerError(f"cannot export GGUF: {why}")
    es = EvalSettings(corpus=args.corpus, heldout_windows=max(args.heldout_windows, 0), seq_len=args.seq_len)
    bars = Bars()
    s = subnet.summary(lm.shape, p.candidate.compensated)
    summary: dict = {}
    files: dict[str, str] = {}
    r = None
    try:
        if do_reform:
            r = wb.reform("cli", key, p, reform_settings(args), es, on_event=bars)
            files["reform.json"] = json.dumps(r.to_dict(), indent=2)
            if es.heldout_windows:
                summary.update(heldout_ppl_unreformed=r.ppl_before, heldout_ppl=r.ppl_after)
        elif es.heldout_windows:
            summary["heldout_ppl"] = heldout_perplexity(wb.sliced(key, p), lm.tokenizer, es, bars)
        metrics = {"params": s["params"], "fraction_of_total_params": s["fraction"],
                   "fraction_of_prunable_params": s["prunable_fraction"],
                   "ideal_decode_speedup": s["ideal_decode_speedup"]}
        if summary.get("heldout_ppl") is not None:
            metrics[f"heldout_ppl ({args.corpus}, {args.heldout_windows}x{args.seq_len} tokens)"] = summary["heldout_ppl"]
        if summary.get("heldout_ppl_unreformed") is not None:
            metrics["heldout_ppl_before_reformation"] = summary["heldout_ppl_unreformed"]
        exported = wb.export("cli", key, p, out, r, on_event=bars, verify=not args.no_verify, make_zip=not args.no_zip,
                             extra=metrics, provenance=provenance, files=files,
                             fmt=args.format, gguf_type=args.gguf_type)
    finally:
        bars.close()
    summary["export"] = exported.to_dict()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_reform(args) -> int:
    return run_export(args, do_reform=True)


def cmd_export(args) -> int:
    return run_export(args, do_reform=args.reform)
