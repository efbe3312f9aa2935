"""`python -m explorer evaluate`: held-out perplexity and zero-shot accuracy of a model, as a
table on stdout and a JSON record (explorer.pick.evaluation.EvalResult) on disk."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from ..pick.evaluation import DEFAULT_TASKS, EvalError, EvalSettings, format_result, parse_tasks
from .cli import Bars


def register(sub) -> None:
    from .cli import add_data_args, add_model_args

    s = EvalSettings()
    p = sub.add_parser("evaluate", help="held-out perplexity and zero-shot accuracy (table + JSON)",
                       description="Score a model (the embedded default, a base model folder or an exported "
                                   "subnet folder) on held-out perplexity and lm-eval-style zero-shot tasks.")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--tasks", default=",".join(s.tasks),
                   help=f"comma-separated, from {', '.join(DEFAULT_TASKS)} (or 'all')")
    p.add_argument("--limit", type=int, default=s.limit,
                   help="questions per task, a seeded subset (0: the whole validation set)")
    p.add_argument("--seed", type=int, default=s.seed, help="picks the subset of questions")
    p.add_argument("--batch-size", type=int, default=s.batch_size)
    p.add_argument("--out", default=None, help="JSON path (default runs/evaluate-<model>.json)")
    p.set_defaults(func=cmd_evaluate)


def default_out(name: str) -> Path:
    return Path("runs") / f"evaluate-{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_') or 'model'}.json"


def cmd_evaluate(args) -> int:
    from ..model.loading import is_subnet_folder
    from .cli import eval_settings, key_of, load, workbench
    from .inputs import parse_limit

    tasks = parse_tasks(args.tasks)  # bad input fails before the model loads
    if args.batch_size < 1:
        raise EvalError("--batch-size must be at least 1")
    settings = eval_settings(args, tasks=tasks, limit=parse_limit(args.limit), seed=args.seed,
                             batch_size=args.batch_size)
    wb = workbench()
    if not is_subnet_folder(args.model):  # an exported folder is rebuilt with our own class, never its code
        load(wb, args)
    bars = Bars()
    try:
        result = wb.evaluate("cli", key_of(args), None, settings, on_event=bars)
    finally:
        bars.close()
    print(f"{result.model}: {result.seconds:.0f} s")
    print(format_result(result))
    out = Path(args.out) if args.out else default_out(result.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.to_json())
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (same as `python -m explorer evaluate ...`)."""
    from .cli import main as cli_main

    return cli_main(["evaluate", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())

