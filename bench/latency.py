"""Predicted vs measured decode latency of a demo run's front, against an independent timing (see explorer/benchmarks/latency.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("latency") if __name__ == "__main__" else None
