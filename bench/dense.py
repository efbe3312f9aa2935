"""Dense vs uniformly narrowed 70 % subnet of the embedded model (see explorer/benchmarks/dense.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("dense") if __name__ == "__main__" else None
