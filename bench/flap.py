"""FLAP against the issue's figures over calibration seeds, on our split or the reference's recipe,
with an optional literal cross-check (see explorer/benchmarks/flap.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("flap") if __name__ == "__main__" else None
