"""Subnet Explorer: `python app.py` serves the explorer on http://127.0.0.1:7860 (see --help)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve the Subnet Explorer app.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--model", default="default", help="model preselected in the page")
    p.add_argument("--runs-dir", default=os.environ.get("SUBNET_EXPLORER_RUNS", "runs"),
                   help="where searches are saved (default ./runs)")
    p.add_argument("--exports-dir", default=os.environ.get("SUBNET_EXPLORER_EXPORTS", "exports"),
                   help="where exports are written (default ./exports)")
    p.add_argument("--log", default=os.environ.get("SUBNET_EXPLORER_LOG", "subnet-explorer.log"),
                   help="log file (tracebacks go here, never to the page)")
    return p.parse_args(argv)


def stop_as_interrupt(signum, frame) -> None:
    """SIGTERM (a service manager, `kill`, a test's teardown) stops the server as Ctrl+C does, so
    Gradio closes it cleanly and deletes the files it cached for the page."""
    raise KeyboardInterrupt


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    auth = None
    if args.auth:
        if ":" not in args.auth:
            sys.exit("error: --auth takes USER:PASS")
        auth = tuple(args.auth.split(":", 1))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from explorer.app.workbench import AppSettings
    from explorer.ui.app import create_app, launch_kwargs

    demo, ws = create_app(Path(args.runs_dir), Path(args.exports_dir), default_model=args.model,
                          settings=AppSettings.from_env())
    signal.signal(signal.SIGTERM, stop_as_interrupt)
    print(f"Subnet Explorer on http://{args.host}:{args.port}  (log: {args.log})", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, auth=auth, **launch_kwargs(ws))


if __name__ == "__main__":
    main()
