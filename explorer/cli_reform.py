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

from tqdm import tqdm

from .errors import ExplorerError
from .events import Progress
from .reform import ReformSettings


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
        p.add_argument("--no-verify", action="store_true", help="skip the reload check in a fresh process")
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


class Bars:
    """One tqdm bar per stage on stderr."""

    def __init__(self):
        self.bar, self.stage = None, ""

    def __call__(self, event) -> None:
        if not isinstance(event, Progress):
            return
        if self.bar is None or event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr)
        self.bar.update(event.done - self.bar.n)
        if event.message:
            self.bar.set_postfix_str(event.message, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def load_source(args):
    """(LoadedModel, Subnet, provenance) from --run/--pick or --subnet."""
    from .cli import load_from_args
    from .loading import load_model
    from .subnet import Subnet

    if args.run:
        if not args.pick:
            raise ExplorerError("--run needs --pick (a candidate id, or best@FRACTION)")
        from .runs import load_candidate, open_run

        subnet, settings = load_candidate(args.run, args.pick)
        candidate = open_run(args.run).pick(args.pick)
        spec = settings.get("model", args.model)
        lm = load_model(spec, args.dtype, args.device, args.trust_remote_code)
        provenance = {"found_by": "Subnet Explorer evolutionary search (training-free, METHOD sections 2-3)",
                      "run": str(Path(args.run).resolve()), "pick": args.pick, "candidate": candidate.id,
                      "target": candidate.target, "origin": candidate.origin, "search_metrics": candidate.metrics,
                      "search_settings": {k: v for k, v in settings.items() if k in (
                          "targets", "seed", "corpus", "calib_windows", "calib_seq_len", "fitness_windows",
                          "fitness_seq_len", "population", "generations")}}
    else:
        if args.pick:
            raise ExplorerError("--pick goes with --run, not with --subnet")
        subnet = Subnet.load(args.subnet)
        lm = load_from_args(args)
        provenance = {"found_by": "a subnet file", "subnet_file": str(Path(args.subnet).resolve())}
    subnet.validate(lm.shape)
    return lm, subnet, provenance


def heldout_ppl(lm, model, args, bars) -> float | None:
    if args.heldout_windows <= 0:
        return None
    from .data import heldout_windows, load_corpus
    from .perplexity import perplexity

    held = heldout_windows(lm.tokenizer, load_corpus(args.corpus), args.heldout_windows, args.seq_len)
    return perplexity(model, held, on_batch=lambda d, t: bars(Progress("held-out perplexity", d, t)))


def run_export(args, do_reform: bool) -> int:
    from .export import export_subnet
    from .slicing import slice_model

    from .export import check_target

    t0 = time.perf_counter()
    check_target(Path(args.out).expanduser().resolve())  # fail before the long work
    lm, subnet, provenance = load_source(args)
    bars = Bars()
    summary: dict = {"subnet": subnet.summary(lm.shape)}
    extra: dict[str, str] = {}
    try:
        if do_reform:
            from .reform import reform

            settings = reform_settings(args)
            unreformed = slice_model(lm.model, subnet, lm.shape)
            summary["heldout_ppl_unreformed"] = heldout_ppl(lm, unreformed, args, bars)
            del unreformed
            result = reform(lm, subnet, settings, on_event=bars)
            model = result.model
            extra["reform.json"] = json.dumps(result.to_dict(), indent=2)
            summary["reform_seconds"] = round(result.seconds, 1)
            provenance = {**provenance, "reformed": True, "reform_settings": settings.to_dict()}
        else:
            model = slice_model(lm.model, subnet, lm.shape)
            provenance = {**provenance, "reformed": False}
        summary["heldout_ppl"] = heldout_ppl(lm, model, args, bars)
        s = summary["subnet"]
        metrics = {"params": s["params"], "fraction_of_total_params": s["fraction"],
                   "fraction_of_prunable_params": s["prunable_fraction"],
                   "ideal_decode_speedup": s["ideal_decode_speedup"]}
        if summary["heldout_ppl"] is not None:
            metrics[f"heldout_ppl ({args.corpus}, {args.heldout_windows}x{args.seq_len} tokens)"] = summary["heldout_ppl"]
        if summary.get("heldout_ppl_unreformed") is not None:
            metrics["heldout_ppl_before_reformation"] = summary["heldout_ppl_unreformed"]
        exported = export_subnet(lm, model, subnet, args.out, metrics, provenance, verify=not args.no_verify,
                                 make_zip=not args.no_zip, on_event=bars, extra_files=extra)
    finally:
        bars.close()
    summary["export"] = exported.to_dict()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary.pop("subnet")
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_reform(args) -> int:
    return run_export(args, do_reform=True)


def cmd_export(args) -> int:
    return run_export(args, do_reform=args.reform)
