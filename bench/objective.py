"""Fitness objective (perplexity vs KL to dense) against held-out perplexity after reformation (see explorer/benchmarks/objective.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("objective") if __name__ == "__main__" else None
