"""Zero-shot accuracy: dense vs a subnet before vs after reformation (see explorer/benchmarks/zeroshot.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("zeroshot") if __name__ == "__main__" else None
