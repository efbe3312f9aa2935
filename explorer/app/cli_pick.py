"""`python -m explorer reform` and `python -m explorer export`: a picked subnet (from a search run,
or a subnet file such as an export's subnet.json) as a verified, physically smaller model folder
or GGUF file, reformed or not. The same application-layer calls as the app's buttons.

    python -m explorer reform --run RUN_DIR --pick ID --out DIR      # reform, then export
    python -m explorer export --run RUN_DIR --pick ID [--reform] --out DIR
    python -m explorer export --subnet subnet.json --out DIR         # exactly the model that file describes
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ExplorerError
from ..pick.reform import ReformSettings
from .cli import Bars, add_data_args, add_model_args, eval_settings, key_of, load, workbench


def register(sub) -> None:
    for name, helptext in (("reform", "reform a subnet's o_proj/down_proj on calibration data, then export it"),
                           ("export", "export a subnet as a Hugging Face model folder (+ .zip) or GGUF, verified")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--run", help="a search run directory (with --pick)")
        src.add_argument("--subnet", help="a subnet file: an export's subnet.json (it reopens as exactly that "
                                          "model), or a bare subnet (Subnet.to_json)")
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
    r, demo = ReformSettings(), ReformSettings.demo()
    p.add_argument("--demo", action="store_true", help=f"the app's reformation ({demo.windows} windows of "
                                                       f"{demo.seq_len} tokens, damp {demo.damp}); the flags below "
                                                       "still override it")
    p.add_argument("--calib-windows", type=int, default=None, help=f"calibration windows (default {r.windows})")
    p.add_argument("--calib-seq-len", type=int, default=None, help=f"tokens per window (default {r.seq_len})")
    p.add_argument("--method", choices=["closed", "admm"], default=None, help=f"default {r.method}")
    p.add_argument("--rho", type=float, default=None, help=f"ADMM penalty, relative to the Gram diagonal ({r.rho})")
    p.add_argument("--iterations", type=int, default=None, help=f"ADMM iterations ({r.iterations})")
    p.add_argument("--damp", type=float, default=None, help=f"ridge, relative to the mean Gram diagonal ({r.damp})")
    p.add_argument("--no-intercept", action="store_true",
                   help="fit the kept weights only, no o_proj / down_proj biases (the GGUF of Qwen3, SmolLM3 and "
                        "Gemma 3 cannot hold them)")


def reform_settings(args) -> ReformSettings:
    """The reformation the flags describe: the default's (or with --demo the app's), only what was given replaced."""
    from .inputs import reform_settings as settings

    return settings(args.demo, windows=args.calib_windows, seq_len=args.calib_seq_len, method=args.method,
                    rho=args.rho, iterations=args.iterations, damp=args.damp, corpus=args.corpus,
                    intercept=False if args.no_intercept else None)


def source(args, wb):
    """(model key, Pick, Reformation or None, provenance) from --run/--pick or --subnet: the pick a
    reformation or an export works on, through the workbench like every app action. The file is
    read and checked before the model loads; against the model's shape and weights after."""
    from ..pick.pickfile import read_pick_file

    if args.run:
        if not args.pick:
            raise ExplorerError("--run needs --pick (a candidate id, or best@FRACTION)")
        p = wb.pick(str(Path(args.run)), args.pick)
        key, _ = wb.model_for_run(str(Path(args.run)), key_of(args), max_memory=args.max_memory)
        settings = wb.open(str(Path(args.run))).settings
        provenance = {"found_by": "Subnet Explorer evolutionary search (training-free)",
                      "run": str(Path(args.run).resolve()), "pick": args.pick, "search_metrics": p.candidate.metrics,
                      "search_settings": {k: v for k, v in settings.items() if k in (
                          "targets", "seed", "corpus", "calib_windows", "calib_seq_len", "fitness_windows",
                          "fitness_seq_len", "population", "generations", "minutes", "compensate", "space")}}
        return key, p, None, provenance
    if args.pick:
        raise ExplorerError("--pick goes with --run, not with --subnet")
    record = read_pick_file(Path(args.subnet))  # bounded and parsed before the model loads
    key = key_of(args)
    load(wb, args)
    p, r = wb.open_subnet_file(key, Path(args.subnet))
    provenance = {"found_by": "a subnet file", "subnet_file": str(Path(args.subnet).resolve()),
                  "file_source": record.source}
    return key, p, r, provenance


def run_export(args, do_reform: bool) -> int:
    from ..pick.evaluation import heldout_perplexity
    from ..pick.export import check_target
    from ..pick.export_gguf import check_gguf_target, precheck

    t0 = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    (check_gguf_target if args.format == "gguf" else check_target)(out)  # fail before the long work
    es = eval_settings(args)
    rs = reform_settings(args) if do_reform else None
    wb = workbench(out.parent)
    key, p, r, provenance = source(args, wb)
    lm = wb.loaded(key)
    subnet = p.candidate.subnet
    why = precheck(lm, subnet) if args.format == "gguf" else None
    if why:
        raise ExplorerError(f"cannot export GGUF: {why}")
    bars = Bars()
    s = subnet.summary(lm.shape, p.candidate.compensated)
    summary: dict = {}
    files: dict[str, str] = {}
    try:
        if do_reform:
            r = wb.reform("cli", key, p, rs, es, on_event=bars)
            files["reform.json"] = json.dumps(r.to_dict(), indent=2)
            if es.heldout_windows:
                summary.update(heldout_ppl_unreformed=r.ppl_before, heldout_ppl=r.ppl_after)
        elif es.heldout_windows:
            model = wb.model_of(key, p, r, on_event=bars)
            summary["heldout_ppl"] = heldout_perplexity(model, lm.tokenizer, es, bars)
        metrics = {"fraction_of_prunable_params": s["prunable_fraction"],
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
