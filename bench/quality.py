"""Search vs baselines vs dense at 80/70/60/50 % of the embedded model (see explorer/benchmarks/quality.py)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from explorer.benchmarks import quality  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=quality.__doc__)
    quality.add_arguments(parser)
    quality.run(parser.parse_args())
