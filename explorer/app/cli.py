"""`python -m explorer`: one subcommand per pipeline step. Bad input ends in one readable line
and a non-zero exit; the traceback goes to the log (SUBNET_EXPLORER_LOG, default stderr at -v)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from tqdm import tqdm

from ..errors import Cancelled, ExplorerError
from ..events import Progress
from ..settings import DataSettings, ModelSettings

log = logging.getLogger("explorer")

# Modules that add subcommands: each has `register(subparsers)`; a step's CLI lives beside it.
COMMAND_MODULES: tuple[str, ...] = ("explorer.app.cli_evaluate", "explorer.app.cli_search", "explorer.app.cli_pick")


class Bars:
    """An event sink for the CLI: one tqdm bar per stage on stderr (a new stage, or a stage that starts
    over, closes the previous bar), with the stage's message beside it; notes about the machine and
    the time budget are lines of their own."""

    NOTES = ("machine", "budget")

    def __init__(self):
        self.bar: tqdm | None = None
        self.stage = ""

    def __call__(self, event) -> None:
        if not isinstance(event, Progress):
            return
        if event.stage in self.NOTES:
            tqdm.write(f"{event.stage}: {event.message}", file=sys.stderr)
            return
        if self.bar is None or event.stage != self.stage or event.done < self.bar.n:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr, leave=False)
        self.bar.total = event.total
        self.bar.update(event.done - self.bar.n)
        if event.message:
            self.bar.set_postfix_str(event.message[:70], refresh=False)
        if event.total and event.done >= event.total and event.message:
            tqdm.write(f"{event.stage}: {event.message}", file=sys.stderr)
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Parser(argparse.ArgumentParser):
    """Bad arguments are one line and exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    m = ModelSettings()
    p.add_argument("--model", default=m.model,
                   help="an embedded model: 'default' (SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma 3 270M); "
                        "or a folder, a .gguf file or a hub id")
    p.add_argument("--dtype", default=m.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=m.device, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--trust-remote-code", action="store_true", default=m.trust_remote_code,
                   help="allow the model folder's own Python code to run (off by default)")
    p.add_argument("--max-memory", default=m.max_memory, metavar="DEV=SIZE,...",
                   help="with --device auto: per-device caps, e.g. cpu=2GB,0=20GB (the rest is offloaded to disk)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    d = DataSettings()
    p.add_argument("--corpus", default=d.corpus, help="bbc (embedded), a UTF-8 text file, or hf:wikitext-2 / hf:c4")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--heldout-windows", type=int, default=d.heldout_windows)


def workbench(exports_root: str | os.PathLike = "exports"):
    """The application layer as the CLI uses it: run folders by path too, runs under ./runs."""
    from .workbench import Workbench

    return Workbench(os.environ.get("SUBNET_EXPLORER_RUNS", "runs"), exports_root, allow_paths=True)


def key_of(args) -> tuple:
    from .runfolders import model_key

    return model_key(args.model, args.dtype, args.device)


def load(wb, args, key: tuple | None = None):
    """Load the model the arguments name (with their memory caps and remote-code choice) into `wb`."""
    return wb.model(key or key_of(args), max_memory=args.max_memory, trust_remote_code=args.trust_remote_code)


def eval_settings(args, **kw):
    """The held-out settings of the data arguments (checked here: a bad value is one line, before any work)."""
    from ..pick.evaluation import EvalSettings

    if args.seq_len < 2 or args.heldout_windows < 0:
        raise ExplorerError("--seq-len must be at least 2 and --heldout-windows at least 0")
    return EvalSettings(corpus=args.corpus, heldout_windows=args.heldout_windows, seq_len=args.seq_len, **kw)


def cmd_info(args) -> int:
    s = None if args.no_ppl else eval_settings(args)
    wb = workbench()
    load(wb, args)
    bars = Bars()
    try:
        info = wb.info("cli", key_of(args), s, on_event=bars)
    finally:
        bars.close()
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m explorer", description=(
        "Subnet Explorer: training-free search for smaller, faster subnets of a causal LM."))
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and tracebacks) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="architecture summary and held-out perplexity, as JSON")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--no-ppl", action="store_true", help="skip the held-out perplexity")
    p.set_defaults(func=cmd_info)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def log_path() -> str:
    """Where the CLI's log (and every traceback) goes: SUBNET_EXPLORER_LOG, else the app's log file."""
    return os.environ.get("SUBNET_EXPLORER_LOG", "subnet-explorer.log")


def setup_logging(verbose: bool) -> None:
    handlers: list[logging.Handler] = []
    try:
        handlers.append(logging.FileHandler(log_path()))
    except OSError:
        pass  # an unwritable log location must not stop the command
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers or [logging.NullHandler()], force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument already said in one line
        return int(e.code or 0)
    setup_logging(args.verbose)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except Cancelled as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    except ExplorerError as e:
        log.exception("command failed")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: one line here, the traceback in the log
        log.exception("unexpected error")
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: unexpected {type(e).__name__}: {first} (the traceback is in {log_path()})", file=sys.stderr)
        return 1
