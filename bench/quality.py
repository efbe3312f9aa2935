"""Search vs baselines vs dense at 80/70/60/50 % of the embedded model (see explorer/benchmarks/quality.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("quality") if __name__ == "__main__" else None
