"""Perplexity before/after reformation and the exported model's measured speed (see explorer/benchmarks/reform.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("reform") if __name__ == "__main__" else None
