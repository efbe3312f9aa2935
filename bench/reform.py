"""Perplexity before/after reformation and the exported model's measured speed, at 80/70/60/50 %
of the embedded model (see explorer/benchmarks/reform.py)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from explorer.benchmarks import reform  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=reform.__doc__)
    reform.add_arguments(parser)
    reform.run(parser.parse_args())
