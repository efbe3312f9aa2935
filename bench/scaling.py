"""Pipeline cost at bigger models' shapes (random weights) (see explorer/benchmarks/scaling.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("scaling") if __name__ == "__main__" else None
